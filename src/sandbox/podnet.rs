//! Pod networking for the containerd shim: a container's (or a pod's) network namespace,
//! as containerd's CRI plugin sets it up with CNI (or `ctr run --with-ns network:PATH`
//! names it), reaches the guest.
//!
//! The namespace's interface that carries its IPv4 address (the one of the default route,
//! CNI's `eth0`) is joined to a TAP made in the same namespace, [`POD_TAP`], with tc: an
//! ingress qdisc on both and on each a `matchall` filter whose `mirred` action redirects
//! every frame to the other's egress. So whatever reaches the interface goes to the guest,
//! and whatever the guest sends leaves by the interface, untouched: the guest's NIC has the
//! interface's MAC address and MTU, and the guest's `eth0` its address, prefix and default
//! gateway (see [`guest_param`]). The interface keeps its address: the namespace's own stack
//! sees none of the traffic any more (the redirect takes it first), but the address is still
//! there for whoever reads it (CNI's `DEL`, `ip netns exec ... ip addr`), and nothing has to
//! be put back afterwards.
//!
//! Nothing here moves a thread of the shim but the short-lived ones that enter the
//! namespace ([`PodNet::inside`]): the netlink socket opened on one of them stays bound to
//! the namespace, and the VM's TAP is opened on one of them (the TAP is the VM's, created
//! when it opens it and gone when it closes it, with its qdisc). What stays behind after
//! the VM is the interface's ingress qdisc, which [`PodNet`] deletes when dropped. A shim
//! killed with SIGKILL leaves it, redirecting to a TAP that is gone: containerd's cleanup
//! (the shim's `delete` action) removes it ([`remove_stale`]), and so does the next
//! [`PodNet::open`] of the namespace; CNI's `DEL` deletes the interface itself anyway.
//!
//! The kernel is spoken to over rtnetlink (the `netlink-packet-route` crate's messages),
//! synchronously; nothing is run as a child process.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterMatchAllOption, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The TAP of the guest's NIC, inside the pod's network namespace.
pub const POD_TAP: &str = "flint0";
/// The priority of the redirecting filters.
const FILTER_PRIORITY: u32 = 1;
/// `ETH_P_ALL`: the filters take every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// The ingress qdisc's handle (`ffff:`), the filters' parent.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// The most messages one request's answer may have.
const MAX_REPLIES: usize = 1 << 16;
/// The receive buffer: the kernel's dump messages fit (it sends at most 32 KiB at once).
const RECV_BUFFER: usize = 64 << 10;

/// Why a network namespace cannot be the guest's network.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("the container's network namespace {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("cannot open the container's network namespace {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{} is not a network namespace", .0.display())]
    NotNamespace(PathBuf),
    #[error("the container's network namespace {} is the shim's own (the host's): flint joins a VM only to a namespace of the container's own", .0.display())]
    HostNamespace(PathBuf),
    #[error("cannot enter the container's network namespace {}: {source}", path.display())]
    Enter { path: PathBuf, source: io::Error },
    #[error("the container's network namespace {} has no interface with an IPv4 address (but loopback) for the VM", .0.display())]
    NoInterface(PathBuf),
    #[error("the container's network namespace {} has a TAP {POD_TAP} already (another VM uses it)", .0.display())]
    TapExists(PathBuf),
    #[error("the interface {iface} of the container's network namespace {} has an ingress qdisc already (flint needs it for the VM's traffic)", path.display())]
    IngressTaken { path: PathBuf, iface: String },
    #[error("cannot {what} in the container's network namespace: {source}")]
    Netlink { what: String, source: io::Error },
    #[error("cannot start a thread to enter the container's network namespace: {0}")]
    Thread(io::Error),
}

fn netlink(what: impl Into<String>) -> impl FnOnce(io::Error) -> PodNetError {
    let what = what.into();
    move |source| PodNetError::Netlink { what, source }
}

/// What the guest's NIC takes over from the namespace's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// The default route's gateway through it, if there is one.
    pub gateway: Option<Ipv4Addr>,
}

/// A link of the namespace, as far as choosing the guest's interface goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    index: u32,
    name: String,
    /// Six bytes for an Ethernet interface.
    mac: Option<[u8; 6]>,
    mtu: u32,
    loopback: bool,
}

/// An IPv4 address of link `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Addr {
    index: u32,
    addr: Ipv4Addr,
    prefix: u8,
}

/// An IPv4 route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    prefix: u8,
    oif: Option<u32>,
    gateway: Option<Ipv4Addr>,
}

/// The interface whose address the guest takes: the default route's, else the first
/// Ethernet one with an IPv4 address (never loopback nor [`POD_TAP`]).
fn choose(links: &[Link], addrs: &[Addr], routes: &[Route]) -> Option<PodInterface> {
    let usable = |link: &Link| !link.loopback && link.name != POD_TAP && link.mac.is_some();
    let first_addr = |index: u32| addrs.iter().find(|a| a.index == index);
    let defaults: Vec<&Route> = routes
        .iter()
        .filter(|r| r.prefix == 0 && r.oif.is_some())
        .collect();
    let by_route = defaults.iter().find_map(|r| {
        let link = links.iter().find(|l| Some(l.index) == r.oif)?;
        (usable(link) && first_addr(link.index).is_some()).then_some(link)
    });
    let link = by_route.or_else(|| {
        links
            .iter()
            .find(|l| usable(l) && first_addr(l.index).is_some())
    })?;
    let addr = first_addr(link.index)?;
    let gateway = defaults
        .iter()
        .filter(|r| r.oif == Some(link.index))
        .find_map(|r| r.gateway);
    Some(PodInterface {
        name: link.name.clone(),
        index: link.index,
        mac: link.mac?,
        mtu: link.mtu,
        addr: addr.addr,
        prefix: addr.prefix,
        gateway,
    })
}

/// The guest's network settings for its `/init` ([`super::nat::NET_PARAM`]):
/// `flint.net=ADDR/PREFIX,GATEWAY[,DNS]...`, the gateway empty when there is none.
pub fn guest_param(iface: &PodInterface, dns: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "{}={}/{},{}",
        super::nat::NET_PARAM,
        iface.addr,
        iface.prefix,
        iface.gateway.map(|g| g.to_string()).unwrap_or_default()
    );
    for d in dns.iter().take(3) {
        s.push(',');
        s.push_str(&d.to_string());
    }
    s
}

/// The IPv4 name servers of the resolv.conf at `path` (at most 3, no loopback ones); none
/// when it cannot be read.
pub fn name_servers(path: &Path) -> Vec<Ipv4Addr> {
    use std::io::Read;
    let mut text = String::new();
    match File::open(path).and_then(|f| f.take(64 << 10).read_to_string(&mut text)) {
        Ok(_) => super::nat::resolvers_in(&text),
        Err(e) => {
            log::warn!(
                "pod network: cannot read {} for the guest's name servers: {e}",
                path.display()
            );
            Vec::new()
        }
    }
}

/// An rtnetlink socket (bound to the network namespace of the thread that opened it).
struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Send `message` with `flags`; the answer's messages (a dump's, or none for an
    /// acknowledged request), or the kernel's error.
    fn exchange(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?.min(buf.len());
            let mut offset = 0;
            while offset < n {
                let packet = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = packet.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len.next_multiple_of(4);
                if packet.header.sequence_number != self.seq {
                    continue;
                }
                match packet.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        if replies.len() >= MAX_REPLIES {
                            return Err(io::Error::other("too many netlink messages"));
                        }
                        replies.push(m);
                    }
                    _ => {}
                }
            }
        }
    }

    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.exchange(message, NLM_F_REQUEST | NLM_F_DUMP)
    }

    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.exchange(message, NLM_F_REQUEST | NLM_F_ACK | flags)
            .map(drop)
    }

    fn links(&mut self) -> io::Result<Vec<Link>> {
        let mut links = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
            let RouteNetlinkMessage::NewLink(link) = m else {
                continue;
            };
            let mut l = Link {
                index: link.header.index,
                name: String::new(),
                mac: None,
                mtu: 0,
                loopback: link.header.link_layer_type == LinkLayerType::Loopback
                    || link.header.flags.contains(LinkFlags::Loopback),
            };
            for attr in link.attributes {
                match attr {
                    LinkAttribute::IfName(name) => l.name = name,
                    LinkAttribute::Mtu(mtu) => l.mtu = mtu,
                    LinkAttribute::Address(a) if a.len() == 6 => {
                        let mut mac = [0; 6];
                        mac.copy_from_slice(&a);
                        // A usable unicast address for the guest.
                        if mac[0] & 1 == 0 && mac != [0; 6] {
                            l.mac = Some(mac);
                        }
                    }
                    _ => {}
                }
            }
            if link.header.link_layer_type != LinkLayerType::Ether {
                l.mac = None;
            }
            links.push(l);
        }
        Ok(links)
    }

    fn addrs(&mut self) -> io::Result<Vec<Addr>> {
        let mut request = AddressMessage::default();
        request.header.family = AddressFamily::Inet;
        let mut addrs = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetAddress(request))? {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.family != AddressFamily::Inet {
                continue;
            }
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's on a
            // point-to-point link); either will do when only one is there.
            let mut local = None;
            let mut address = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(std::net::IpAddr::V4(v4)) => local = Some(*v4),
                    AddressAttribute::Address(std::net::IpAddr::V4(v4)) => address = Some(*v4),
                    _ => {}
                }
            }
            if let Some(addr) = local.or(address) {
                addrs.push(Addr {
                    index: a.header.index,
                    addr,
                    prefix: a.header.prefix_len.min(32),
                });
            }
        }
        Ok(addrs)
    }

    fn routes(&mut self) -> io::Result<Vec<Route>> {
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        let mut routes = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetRoute(request))? {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let mut table = u32::from(r.header.table);
            let mut route = Route {
                prefix: r.header.destination_prefix_length,
                oif: None,
                gateway: None,
            };
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = Some(*g),
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            if r.header.address_family == AddressFamily::Inet
                && table == u32::from(RouteHeader::RT_TABLE_MAIN)
            {
                routes.push(route);
            }
        }
        Ok(routes)
    }

    /// Bring link `index` up with MTU `mtu`.
    fn set_up(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        link.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    fn ingress_message(index: u32) -> TcMessage {
        let mut tc = TcMessage::with_index(index as i32);
        tc.header.handle = INGRESS_HANDLE;
        tc.header.parent = TcHandle::INGRESS;
        tc
    }

    fn add_ingress(&mut self, index: u32) -> io::Result<()> {
        let mut tc = Rtnl::ingress_message(index);
        tc.attributes.push(TcAttribute::Kind("ingress".into()));
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(tc),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    fn del_ingress(&mut self, index: u32) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::DelQueueDiscipline(Rtnl::ingress_message(index)),
            0,
        )
    }

    /// The links that have an ingress qdisc.
    fn ingress_links(&mut self) -> io::Result<Vec<u32>> {
        let mut found = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()))? {
            let RouteNetlinkMessage::NewQueueDiscipline(tc) = m else {
                continue;
            };
            let ingress = tc
                .attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "ingress"));
            if ingress {
                if let Ok(index) = u32::try_from(tc.header.index) {
                    found.push(index);
                }
            }
        }
        Ok(found)
    }

    /// Redirect every frame that reaches link `from` to the egress of link `to`.
    fn redirect(&mut self, from: u32, to: u32) -> io::Result<()> {
        let mut tc = TcMessage::with_index(from as i32);
        tc.header.parent = INGRESS_HANDLE;
        tc.header.info = (FILTER_PRIORITY << 16) | u32::from(ETH_P_ALL.to_be());
        let mut mirror = TcMirror::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        tc.attributes = vec![
            TcAttribute::Kind("matchall".into()),
            TcAttribute::Options(vec![TcOption::MatchAll(TcFilterMatchAllOption::Action(
                vec![action],
            ))]),
        ];
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(tc),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Where the `matchall` filters on link `index`'s ingress redirect to (`mirred`'s
    /// target; 0 when it is gone).
    fn redirect_targets(&mut self, index: u32) -> io::Result<Vec<u32>> {
        let mut request = TcMessage::with_index(index as i32);
        request.header.parent = INGRESS_HANDLE;
        let mut targets = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetTrafficFilter(request))? {
            let RouteNetlinkMessage::NewTrafficFilter(tc) = m else {
                continue;
            };
            targets.extend(mirred_targets(&tc));
        }
        Ok(targets)
    }
}

/// The targets of the `mirred` actions of a `matchall` filter.
fn mirred_targets(tc: &TcMessage) -> Vec<u32> {
    let matchall = tc
        .attributes
        .iter()
        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "matchall"));
    if !matchall {
        return Vec::new();
    }
    let mut targets = Vec::new();
    for attr in &tc.attributes {
        let TcAttribute::Options(options) = attr else {
            continue;
        };
        for option in options {
            let TcOption::MatchAll(TcFilterMatchAllOption::Action(actions)) = option else {
                continue;
            };
            for action in actions {
                for a in &action.attributes {
                    let TcActionAttribute::Options(options) = a else {
                        continue;
                    };
                    for o in options {
                        if let TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) = o {
                            targets.push(m.ifindex);
                        }
                    }
                }
            }
        }
    }
    targets
}

/// Enter the network namespace `ns` on the calling thread.
fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns only changes the calling thread's network namespace; the descriptor is
    // open for the call's duration.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` on a new thread inside the network namespace `ns` (named `path`); the thread,
/// and its place in the namespace, end with `f`.
fn in_namespace<T: Send>(
    ns: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, PodNetError> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("pod-netns".into())
            .spawn_scoped(scope, || {
                enter(ns).map_err(|source| match source.raw_os_error() {
                    Some(libc::EINVAL) => PodNetError::NotNamespace(path.to_path_buf()),
                    _ => PodNetError::Enter {
                        path: path.to_path_buf(),
                        source,
                    },
                })?;
                Ok(f())
            })
            .map_err(PodNetError::Thread)?;
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Open the network namespace at `path`, which must be one and not the shim's own.
fn open_namespace(path: &Path) -> Result<File, PodNetError> {
    let ns = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => PodNetError::Missing(path.to_path_buf()),
        _ => PodNetError::Open {
            path: path.to_path_buf(),
            source,
        },
    })?;
    // The namespace files are on nsfs; its inode is the namespace's.
    let own = std::fs::metadata("/proc/thread-self/ns/net").ok();
    let theirs = ns.metadata().map_err(|source| PodNetError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if own
        .as_ref()
        .is_some_and(|o| (o.dev(), o.ino()) == (theirs.dev(), theirs.ino()))
    {
        return Err(PodNetError::HostNamespace(path.to_path_buf()));
    }
    Ok(ns)
}

/// The network of a pod's VM: the namespace, a netlink socket in it and the interface the
/// guest takes over. Its redirect is removed when dropped.
pub struct PodNet {
    ns: File,
    path: PathBuf,
    rtnl: Rtnl,
    iface: PodInterface,
    /// The interface's ingress qdisc is this pod's (delete it when done).
    ingress: bool,
}

impl PodNet {
    /// Open the network namespace at `path` and find the interface the guest takes over.
    /// An ingress qdisc a killed shim left there ([`remove_stale`]) is removed first.
    pub fn open(path: &Path) -> Result<PodNet, PodNetError> {
        let ns = open_namespace(path)?;
        let mut rtnl =
            in_namespace(&ns, path, Rtnl::open)?.map_err(netlink("open a netlink socket"))?;
        let links = rtnl.links().map_err(netlink("list the interfaces"))?;
        if links.iter().any(|l| l.name == POD_TAP) {
            return Err(PodNetError::TapExists(path.to_path_buf()));
        }
        let addrs = rtnl.addrs().map_err(netlink("list the addresses"))?;
        let routes = rtnl.routes().map_err(netlink("list the routes"))?;
        let iface = choose(&links, &addrs, &routes)
            .ok_or_else(|| PodNetError::NoInterface(path.to_path_buf()))?;
        let taken = rtnl
            .ingress_links()
            .map_err(netlink("list the qdiscs"))?
            .contains(&iface.index);
        if taken {
            if !stale_redirect(&mut rtnl, &links, iface.index) {
                return Err(PodNetError::IngressTaken {
                    path: path.to_path_buf(),
                    iface: iface.name.clone(),
                });
            }
            log::warn!(
                "pod network: removing the ingress qdisc a killed shim left on {} in {}",
                iface.name,
                path.display()
            );
            rtnl.del_ingress(iface.index).map_err(netlink(format!(
                "delete the ingress qdisc of {}",
                iface.name
            )))?;
        }
        Ok(PodNet {
            ns,
            path: path.to_path_buf(),
            rtnl,
            iface,
            ingress: false,
        })
    }

    /// The interface the guest takes over.
    pub fn interface(&self) -> &PodInterface {
        &self.iface
    }

    /// The guest's NIC: on [`POD_TAP`], with the interface's MAC address and MTU.
    pub fn nic(&self) -> vmm::NetConfig {
        vmm::NetConfig {
            mac: Some(self.iface.mac),
            mtu: u16::try_from(self.iface.mtu).ok().filter(|m| *m >= 68),
            ..vmm::NetConfig::new(POD_TAP)
        }
    }

    /// Run `f` on a thread inside the namespace (the VM is built there, so that its TAP
    /// is the namespace's).
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, PodNetError> {
        in_namespace(&self.ns, &self.path, f)
    }

    /// Join the VM's TAP (created by the VM built [`PodNet::inside`]) and the interface.
    pub fn connect(&mut self) -> Result<(), PodNetError> {
        let links = self.rtnl.links().map_err(netlink("list the interfaces"))?;
        let tap = links
            .iter()
            .find(|l| l.name == POD_TAP)
            .map(|l| l.index)
            .ok_or_else(|| PodNetError::Netlink {
                what: format!("find the VM's TAP {POD_TAP}"),
                source: io::Error::from(io::ErrorKind::NotFound),
            })?;
        let iface = self.iface.clone();
        self.rtnl
            .set_up(tap, iface.mtu)
            .map_err(netlink(format!("bring the TAP {POD_TAP} up")))?;
        self.rtnl
            .add_ingress(iface.index)
            .map_err(netlink(format!("add an ingress qdisc to {}", iface.name)))?;
        self.ingress = true;
        self.rtnl
            .add_ingress(tap)
            .map_err(netlink(format!("add an ingress qdisc to {POD_TAP}")))?;
        self.rtnl
            .redirect(iface.index, tap)
            .map_err(netlink(format!(
                "redirect {}'s traffic to {POD_TAP}",
                iface.name
            )))?;
        self.rtnl
            .redirect(tap, iface.index)
            .map_err(netlink(format!(
                "redirect {POD_TAP}'s traffic to {}",
                iface.name
            )))?;
        log::debug!(
            "pod network: {} ({}/{}) joined to {POD_TAP} in {}",
            iface.name,
            iface.addr,
            iface.prefix,
            self.path.display()
        );
        Ok(())
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        if self.ingress {
            if let Err(e) = self.rtnl.del_ingress(self.iface.index) {
                // Gone with the interface (CNI deleted it) is fine.
                if e.raw_os_error() != Some(libc::ENODEV) && e.raw_os_error() != Some(libc::EINVAL)
                {
                    log::warn!(
                        "pod network: cannot delete the ingress qdisc of {} in {}: {e}",
                        self.iface.name,
                        self.path.display()
                    );
                }
            }
        }
        // The TAP, and its qdisc, go with the VM that opened it.
    }
}

/// Whether link `index`'s ingress filters redirect (only) to an interface that is gone:
/// what a killed shim leaves.
fn stale_redirect(rtnl: &mut Rtnl, links: &[Link], index: u32) -> bool {
    let Ok(targets) = rtnl.redirect_targets(index) else {
        return false;
    };
    !targets.is_empty()
        && targets
            .iter()
            .all(|t| *t == 0 || !links.iter().any(|l| l.index == *t))
}

/// After a shim that was killed: remove the ingress qdisc it left in the network namespace
/// at `path` (one whose filters redirect to a TAP that is gone). Whether one was removed;
/// nothing happens when the namespace is gone or the VM's TAP is still there.
pub fn remove_stale(path: &Path) -> Result<bool, PodNetError> {
    let ns = match open_namespace(path) {
        Ok(ns) => ns,
        Err(PodNetError::Missing(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut rtnl =
        in_namespace(&ns, path, Rtnl::open)?.map_err(netlink("open a netlink socket"))?;
    let links = rtnl.links().map_err(netlink("list the interfaces"))?;
    if links.iter().any(|l| l.name == POD_TAP) {
        return Ok(false);
    }
    let mut removed = false;
    for index in rtnl.ingress_links().map_err(netlink("list the qdiscs"))? {
        if stale_redirect(&mut rtnl, &links, index) {
            rtnl.del_ingress(index)
                .map_err(netlink("delete an ingress qdisc"))?;
            removed = true;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mac: Option<[u8; 6]>) -> Link {
        Link {
            index,
            name: name.into(),
            mac,
            mtu: 1450,
            loopback: name == "lo",
        }
    }

    const MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05];

    #[test]
    fn the_default_routes_interface_is_chosen() {
        let links = [
            link(1, "lo", None),
            link(2, "dummy0", Some([2, 0, 0, 0, 0, 9])),
            link(3, "eth0", Some(MAC)),
        ];
        let addrs = [
            Addr {
                index: 1,
                addr: Ipv4Addr::LOCALHOST,
                prefix: 8,
            },
            Addr {
                index: 2,
                addr: Ipv4Addr::new(192, 0, 2, 1),
                prefix: 24,
            },
            Addr {
                index: 3,
                addr: Ipv4Addr::new(10, 244, 1, 5),
                prefix: 24,
            },
        ];
        let routes = [
            Route {
                prefix: 24,
                oif: Some(3),
                gateway: None,
            },
            Route {
                prefix: 0,
                oif: Some(3),
                gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
            },
        ];
        let chosen = choose(&links, &addrs, &routes).unwrap();
        assert_eq!(
            chosen,
            PodInterface {
                name: "eth0".into(),
                index: 3,
                mac: MAC,
                mtu: 1450,
                addr: Ipv4Addr::new(10, 244, 1, 5),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
            }
        );
        assert_eq!(
            guest_param(&chosen, &[Ipv4Addr::new(10, 96, 0, 10)]),
            "flint.net=10.244.1.5/24,10.244.1.1,10.96.0.10"
        );
        // Without a default route: the first Ethernet interface with an address.
        let only = choose(&links, &addrs, &routes[..1]).unwrap();
        assert_eq!((only.name.as_str(), only.gateway), ("dummy0", None));
        assert_eq!(
            guest_param(&only, &[]),
            "flint.net=192.0.2.1/24,",
            "no gateway"
        );
    }

    #[test]
    fn loopback_the_tap_and_addressless_interfaces_are_never_chosen() {
        let links = [
            link(1, "lo", None),
            link(2, POD_TAP, Some([2, 1, 1, 1, 1, 1])),
            link(3, "eth0", Some(MAC)),
            link(4, "tun0", None),
        ];
        let addrs = [
            Addr {
                index: 1,
                addr: Ipv4Addr::LOCALHOST,
                prefix: 8,
            },
            Addr {
                index: 2,
                addr: Ipv4Addr::new(10, 0, 0, 1),
                prefix: 24,
            },
            Addr {
                index: 4,
                addr: Ipv4Addr::new(10, 9, 0, 1),
                prefix: 32,
            },
        ];
        let default_via_lo = [Route {
            prefix: 0,
            oif: Some(1),
            gateway: None,
        }];
        assert_eq!(choose(&links, &addrs, &default_via_lo), None);
        assert_eq!(choose(&links, &[], &[]), None);
    }

    #[test]
    fn mirred_targets_are_read_from_matchall_filters() {
        let mut mirror = TcMirror::default();
        mirror.ifindex = 7;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        let mut tc = TcMessage::with_index(3);
        tc.attributes = vec![
            TcAttribute::Kind("matchall".into()),
            TcAttribute::Options(vec![TcOption::MatchAll(TcFilterMatchAllOption::Action(
                vec![action],
            ))]),
        ];
        assert_eq!(mirred_targets(&tc), [7]);
        tc.attributes[0] = TcAttribute::Kind("u32".into());
        assert_eq!(mirred_targets(&tc), Vec::<u32>::new());
    }

    #[test]
    fn a_missing_namespace_is_one_sentence() {
        let e = PodNet::open(Path::new("/nonexistent/netns/x"))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "the container's network namespace /nonexistent/netns/x does not exist"
        );
        assert!(!remove_stale(Path::new("/nonexistent/netns/x")).unwrap());
    }

    #[test]
    fn the_shims_own_namespace_is_refused() {
        let e = PodNet::open(Path::new("/proc/self/ns/net"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is the shim's own (the host's)"), "{e}");
    }
}
