//! `flint run --net nat`: outbound IPv4 and DNS for a sandbox through NAT on the host.
//!
//! Every sandbox gets an anonymous network namespace of its own (held only by file
//! descriptors of this process, so it disappears with it, even after `kill -9`). Inside it:
//! the TAP [`TAP_NAME`] the guest's NIC uses, with the gateway address, and the end
//! [`UPLINK`] of a veth pair whose other end, `flvN`, is in flint's own namespace. Both
//! namespaces masquerade: the guest's fixed address ([`GUEST_ADDR`], the same in every
//! sandbox, so that every copy restored from one snapshot keeps working) becomes the veth's
//! address inside, and that becomes the uplink's address on the host. The guest's DNS servers
//! ([`DNS_ADDRS`]) are addresses inside the namespace that are forwarded (DNAT) to the host's
//! own resolvers.
//!
//! On the host, an nftables table per sandbox ([`host_ruleset`]) named after flint's pid,
//! start time and veth keeps the sandbox from reaching the host's own addresses and other
//! sandboxes, and applies `allow=`. That table is the only thing `kill -9` can leave behind:
//! the next `flint run --net nat` removes tables whose flint is gone
//! ([`remove_stale_tables`]).
//!
//! The interface to the kernel is Debian's `ip` (iproute2) and `nft` (nftables), run as child
//! processes; the ones that act inside the sandbox's namespace are started from this thread
//! while it is inside ([`Nat::inside`]).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// The TAP of the guest's NIC, inside the sandbox's namespace.
pub const TAP_NAME: &str = "flint0";
/// The guest's MAC address (locally administered), the same in every sandbox.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x66, 0x6c, 0x00, 0x00, 0x0f];
/// The TAP's own MAC address: fixed too, so that the gateway's entry in a restored guest's
/// neighbour cache stays right.
const GATEWAY_MAC: &str = "02:66:6c:00:00:02";
/// The guest's address and prefix length.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GUEST_PREFIX: u8 = 24;
/// The guest's default gateway: the TAP's address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's name servers: addresses of the TAP, forwarded to the host's resolvers.
pub const DNS_ADDRS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 2, 3),
    Ipv4Addr::new(10, 0, 2, 4),
    Ipv4Addr::new(10, 0, 2, 5),
];
/// The sandbox's end of the veth pair.
const UPLINK: &str = "uplink";
/// The host's end of sandbox N's veth pair is `flvN`.
const VETH_PREFIX: &str = "flv";
/// The veth pairs' addresses: a /30 each from 10.254.0.0/16, the host's end first.
const VETH_BASE: u32 = u32::from_be_bytes([10, 254, 0, 0]);
/// How many sandboxes with `--net nat` may run at once (/30s in a /16).
const MAX_SANDBOXES: u32 = 1 << 14;
/// The prefix of the host's nftables tables: `flint_PID_STARTTIME_N` (N of `flvN`).
const TABLE_PREFIX: &str = "flint_";
/// The kernel command-line parameter the sandbox's init configures the guest's eth0 from.
pub const NET_PARAM: &str = "flint.net";

/// One `allow=CIDR[:PORT]` of `--net nat`: a destination the sandbox may reach (all ports
/// with no port; TCP and UDP to that port with one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    /// The network's first address (host bits cleared).
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// `--net nat[,allow=CIDR[:PORT]]...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatOptions {
    /// Empty: any destination but the host's own addresses and other sandboxes.
    pub allow: Vec<Allow>,
}

/// Why a `--net nat...` value is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatSpecError {
    #[error("--net nat takes only allow=CIDR[:PORT] options, as in --net nat,allow=192.0.2.0/24:443; got '{0}'")]
    Option(String),
    #[error("--net nat allow= needs an IPv4 address or network, optionally with a port, as in allow=192.0.2.0/24:443; got '{0}'")]
    Allow(String),
}

/// Parse `nat[,allow=CIDR[:PORT]]...`; `None` when `spec` is not `nat...` at all.
pub fn parse(spec: &str) -> Option<Result<NatOptions, NatSpecError>> {
    let mut parts = spec.split(',');
    if parts.next() != Some("nat") {
        return None;
    }
    let mut options = NatOptions::default();
    for part in parts {
        let Some(value) = part.strip_prefix("allow=") else {
            return Some(Err(NatSpecError::Option(part.to_string())));
        };
        match parse_allow(value) {
            Some(allow) => options.allow.push(allow),
            None => return Some(Err(NatSpecError::Allow(value.to_string()))),
        }
    }
    Some(Ok(options))
}

/// `ADDR[/PREFIX][:PORT]`.
fn parse_allow(value: &str) -> Option<Allow> {
    let (cidr, port) = match value.split_once(':') {
        Some((cidr, port)) => (cidr, Some(port)),
        None => (value, None),
    };
    let (addr, prefix) = match cidr.split_once('/') {
        Some((addr, prefix)) => (addr, prefix),
        None => (cidr, "32"),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(prefix) {
        return None;
    }
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let port = match port {
        Some(p) if digits(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
        Some(_) => return None,
        None => None,
    };
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Some(Allow {
        net: Ipv4Addr::from(u32::from(addr) & mask),
        prefix,
        port,
    })
}

/// The value of [`NET_PARAM`] on the guest's kernel command line:
/// `ADDR/PREFIX,GATEWAY,DNS...`.
pub fn guest_param() -> String {
    let mut s = format!("{NET_PARAM}={GUEST_ADDR}/{GUEST_PREFIX},{GATEWAY}");
    for dns in DNS_ADDRS {
        let _ = write!(s, ",{dns}");
    }
    s
}

/// Why the sandbox's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("--net nat needs root (it creates a network namespace, network interfaces and nftables rules)")]
    NotRoot,
    #[error("--net nat needs `{tool}` ({package}) on PATH: {source}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("--net nat: `{command}` failed: {message}")]
    ToolFailed { command: String, message: String },
    #[error("--net nat needs IPv4 forwarding on the host, and net.ipv4.ip_forward cannot be set to 1: {0}")]
    Forwarding(std::io::Error),
    #[error("--net nat: cannot {what} the sandbox's network namespace: {source}")]
    Namespace {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("--net nat: all {MAX_SANDBOXES} interface names flv0 to flv{} are taken", MAX_SANDBOXES - 1)]
    NoFreeVeth,
}

/// The addresses of sandbox `index`'s veth pair: the host's end, the sandbox's end.
fn veth_addrs(index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = VETH_BASE + index * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// The nftables rules in the host's namespace for the sandbox whose veth end is `veth`
/// (address `sandbox_addr` on the sandbox's side), in table `table`, for `nft -f`.
pub fn host_ruleset(
    table: &str,
    veth: &str,
    sandbox_addr: Ipv4Addr,
    resolvers: &[Ipv4Addr],
    allow: &[Allow],
) -> String {
    // What the sandbox may reach: its resolvers (DNS only), and what allow= names (nothing
    // listed: anything that is not the host itself).
    let mut permitted = String::new();
    for r in resolvers {
        for proto in ["udp", "tcp"] {
            let _ = writeln!(
                permitted,
                "    iifname \"{veth}\" ip daddr {r} {proto} dport 53 accept"
            );
        }
    }
    for a in allow {
        match a.port {
            Some(port) => {
                for proto in ["udp", "tcp"] {
                    let _ = writeln!(
                        permitted,
                        "    iifname \"{veth}\" ip daddr {a} {proto} dport {port} accept"
                    );
                }
            }
            None => {
                let _ = writeln!(permitted, "    iifname \"{veth}\" ip daddr {a} accept");
            }
        }
    }
    let rest = if allow.is_empty() { "accept" } else { "drop" };
    format!(
        "table ip {table} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {sandbox_addr} oifname != \"{veth}\" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    oifname \"{veth}\" ct state established,related accept
    oifname \"{veth}\" drop
    iifname \"{veth}\" oifname \"{VETH_PREFIX}*\" drop
{permitted}    iifname \"{veth}\" {rest}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
{permitted}    iifname \"{veth}\" drop
  }}
}}
"
    )
}

/// The nftables rules inside the sandbox's namespace: the guest's name servers forwarded to
/// the host's `resolvers`, and everything leaving by the uplink masqueraded.
pub fn sandbox_ruleset(resolvers: &[Ipv4Addr]) -> String {
    let mut dnat = String::new();
    if !resolvers.is_empty() {
        for (i, dns) in DNS_ADDRS.iter().enumerate() {
            let to = resolvers[i % resolvers.len()];
            for proto in ["udp", "tcp"] {
                let _ = writeln!(
                    dnat,
                    "    iifname \"{TAP_NAME}\" ip daddr {dns} {proto} dport 53 dnat to {to}"
                );
            }
        }
    }
    format!(
        "table ip flint {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{dnat}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{UPLINK}\" masquerade
  }}
}}
"
    )
}

/// The `ip -batch` commands that set up the sandbox's namespace: `lo`, the uplink with
/// `sandbox_addr` and a default route to `host_addr`, and the TAP with the gateway's and the
/// name servers' addresses and MAC address.
fn sandbox_ip_script(sandbox_addr: Ipv4Addr, host_addr: Ipv4Addr) -> String {
    let mut script = format!(
        "link set lo up
addr add {sandbox_addr}/30 dev {UPLINK}
link set {UPLINK} up
route add default via {host_addr}
tuntap add dev {TAP_NAME} mode tap vnet_hdr
link set {TAP_NAME} address {GATEWAY_MAC}
addr add {GATEWAY}/{GUEST_PREFIX} dev {TAP_NAME}
"
    );
    for dns in DNS_ADDRS {
        let _ = writeln!(script, "addr add {dns}/32 dev {TAP_NAME}");
    }
    let _ = writeln!(script, "link set {TAP_NAME} up");
    script
}

/// The IPv4 name servers of a resolv.conf, but loopback ones (unreachable from a sandbox),
/// at most 3 (as the C library uses).
pub fn resolvers_in(text: &str) -> Vec<Ipv4Addr> {
    let mut found = Vec::new();
    for line in text.lines().take(1000) {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(addr)) = words.next().map(str::parse::<Ipv4Addr>) else {
            continue;
        };
        if !addr.is_loopback() && !addr.is_unspecified() && !found.contains(&addr) {
            found.push(addr);
        }
        if found.len() == 3 {
            break;
        }
    }
    found
}

/// The host's resolvers: /etc/resolv.conf's, or systemd-resolved's upstream ones when it
/// names only a local stub.
fn host_resolvers() -> Vec<Ipv4Addr> {
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        if let Ok(text) = read_small(path) {
            let found = resolvers_in(&text);
            if !found.is_empty() {
                return found;
            }
        }
    }
    Vec::new()
}

/// A text file of at most 64 KiB (the rest is ignored).
fn read_small(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    File::open(path)?.take(64 << 10).read_to_string(&mut text)?;
    Ok(text)
}

/// `ip ARGS` or `nft ARGS` (with `input` on its standard input), in the calling thread's
/// network namespace.
fn tool(name: &'static str, args: &[&str], input: Option<&str>) -> Result<(), NatError> {
    let package = if name == "nft" {
        "nftables"
    } else {
        "iproute2"
    };
    let mut child = Command::new(name)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NatError::ToolMissing {
            tool: name,
            package,
            source,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error shows as the tool's failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NatError::ToolMissing {
            tool: name,
            package,
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let message = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message")
        .to_string();
    Err(NatError::ToolFailed {
        command: format!("{name} {}", args.join(" ")),
        message: format!("{message} ({})", out.status),
    })
}

/// `ip ARGS`.
fn ip(args: &[&str]) -> Result<(), NatError> {
    tool("ip", args, None)
}

/// The start time of process `pid` (field 22 of /proc/PID/stat), if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = read_small(&format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// This flint's table name for sandbox `index` (`flvINDEX`).
fn own_table(index: u32) -> String {
    let pid = std::process::id();
    format!(
        "{TABLE_PREFIX}{pid}_{}_{index}",
        start_time(pid).unwrap_or(0)
    )
}

/// Whether the calling thread's network namespace has an interface `name`.
fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a NUL-terminated string that outlives the call, which only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// The flint tables (`flint_PID_STARTTIME_N`) in `listing` (`nft list tables` output) that
/// belong to no sandbox any more, judged by `alive(pid, start_time, n)`.
pub fn stale_tables(listing: &str, alive: impl Fn(u32, u64, u32) -> bool) -> Vec<String> {
    let mut stale = Vec::new();
    for line in listing.lines().take(100_000) {
        let Some(name) = line.trim().strip_prefix("table ip ") else {
            continue;
        };
        let Some(rest) = name.strip_prefix(TABLE_PREFIX) else {
            continue;
        };
        let parts: Vec<&str> = rest.splitn(4, '_').collect();
        let [pid, start, index] = parts[..] else {
            continue;
        };
        if let (Ok(pid), Ok(start), Ok(index)) = (pid.parse(), start.parse(), index.parse()) {
            if !alive(pid, start, index) {
                stale.push(name.to_string());
            }
        }
    }
    stale
}

/// Whether the sandbox of table `flint_PID_START_INDEX` may still run: its flint does (the
/// same process: same start time), or its veth `flvINDEX` is still there (its flint may run
/// in another PID namespace, where `pid` means nothing; a killed flint's veth goes with it).
fn sandbox_alive(pid: u32, start: u64, index: u32) -> bool {
    start_time(pid) == Some(start) || interface_exists(&format!("{VETH_PREFIX}{index}"))
}

/// Remove the host's nftables tables of `flint run --net nat` processes that are gone (they
/// were killed before they could remove their own). Best effort: another flint may remove
/// the same table at the same time.
pub fn remove_stale_tables() -> Result<(), NatError> {
    let out = Command::new("nft")
        .args(["list", "tables", "ip"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| NatError::ToolMissing {
            tool: "nft",
            package: "nftables",
            source,
        })?;
    let listing = String::from_utf8_lossy(&out.stdout);
    for table in stale_tables(&listing, sandbox_alive) {
        log::debug!("sandbox: removing the nftables table {table} of a flint that is gone");
        let _ = tool("nft", &["delete", "table", "ip", &table], None);
    }
    Ok(())
}

/// The calling thread's network namespace.
fn thread_netns() -> std::io::Result<OwnedFd> {
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}

/// Move the calling thread into the network namespace `ns`.
fn enter(ns: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: setns takes a namespace descriptor, which `ns` owns and keeps open, and changes
    // only the calling thread's network namespace; no memory is passed.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Write `value` to the sysctl file `path` of the calling thread's network namespace.
fn sysctl(path: &str, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// What a sandbox's network leaves in the host's namespace until removed.
#[derive(Debug, Clone, Default)]
struct HostSide {
    /// The host's end of the veth pair (empty until created).
    veth: String,
    /// The nftables table (`None` until loaded).
    table: Option<String>,
}

impl HostSide {
    /// Delete both. Deleting the host's end of the veth pair deletes the sandbox's too.
    fn remove(&self) {
        if !self.veth.is_empty() {
            if let Err(e) = ip(&["link", "del", &self.veth]) {
                log::warn!("sandbox: {e}");
            }
        }
        if let Some(table) = &self.table {
            if let Err(e) = tool("nft", &["delete", "table", "ip", table], None) {
                log::warn!("sandbox: {e}");
            }
        }
    }
}

/// A thread that removes the [`HostSide`] when told to (or when its sender is dropped). It
/// is started before the VM: the thread that runs the VM may not start programs once the VM
/// runs (its seccomp filter), this one may.
struct Remover {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// A sandbox's network: its namespace, veth pair and host rules, removed on drop (the
/// namespace and what is in it go when the last descriptor of it closes, the VM's TAP
/// included).
pub struct Nat {
    host: OwnedFd,
    sandbox: OwnedFd,
    /// Until the [`Remover`] has it.
    host_side: HostSide,
    remover: Option<Remover>,
}

impl Nat {
    /// Create the sandbox's namespace, TAP, veth pair, addresses, routes and rules.
    pub fn setup(options: &NatOptions) -> Result<Nat, NatError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NatError::NotRoot);
        }
        let began = std::time::Instant::now();
        remove_stale_tables()?;
        let forwarding = read_small("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
        if forwarding.trim() != "1" {
            sysctl("/proc/sys/net/ipv4/ip_forward", "1").map_err(NatError::Forwarding)?;
        }
        let ns_err = |what| move |source| NatError::Namespace { what, source };
        let host = thread_netns().map_err(ns_err("open flint's own"))?;
        // SAFETY: unshare with CLONE_NEWNET only moves the calling thread into a new network
        // namespace; no memory is passed.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
            return Err(ns_err("create")(std::io::Error::last_os_error()));
        }
        let sandbox = thread_netns();
        enter(&host).expect("cannot return to flint's own network namespace");
        let mut nat = Nat {
            host,
            sandbox: sandbox.map_err(ns_err("open"))?,
            host_side: HostSide::default(),
            remover: None,
        };
        let resolvers = host_resolvers();
        if resolvers.is_empty() {
            log::warn!("sandbox: the host's resolv.conf names no IPv4 name server but loopback ones; the sandbox has no DNS");
        }
        let index = nat.add_veth()?;
        let (host_addr, sandbox_addr) = veth_addrs(index);
        let veth = nat.host_side.veth.clone();
        let host_script = format!("addr add {host_addr}/30 dev {veth}\nlink set {veth} up\n");
        tool("ip", &["-batch", "-"], Some(&host_script))?;
        let table = own_table(index);
        tool(
            "nft",
            &["-f", "-"],
            Some(&host_ruleset(
                &table,
                &veth,
                sandbox_addr,
                &resolvers,
                &options.allow,
            )),
        )?;
        nat.host_side.table = Some(table);
        nat.inside(|| {
            // No IPv6 in the sandbox: only what the rules above cover goes out.
            for conf in ["all", "default"] {
                let _ = sysctl(&format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
            }
            sysctl("/proc/sys/net/ipv4/ip_forward", "1").map_err(NatError::Forwarding)?;
            tool(
                "ip",
                &["-batch", "-"],
                Some(&sandbox_ip_script(sandbox_addr, host_addr)),
            )?;
            tool("nft", &["-f", "-"], Some(&sandbox_ruleset(&resolvers)))
        })??;
        let (stop, stopped) = mpsc::channel::<()>();
        let host_side = nat.host_side.clone();
        let thread = std::thread::Builder::new()
            .name("flint-nat".into())
            .spawn(move || {
                // A message or a dropped sender: either way, time to go.
                let _ = stopped.recv();
                host_side.remove();
            })
            .map_err(|source| NatError::Namespace {
                what: "start the thread that cleans up after",
                source,
            })?;
        nat.host_side = HostSide::default();
        nat.remover = Some(Remover { stop, thread });
        log::debug!(
            "sandbox: network namespace on {veth} ({host_addr}/30) set up in {} ms",
            began.elapsed().as_millis()
        );
        Ok(nat)
    }

    /// Create the veth pair, its host end `flvN` for the first free N; N.
    fn add_veth(&mut self) -> Result<u32, NatError> {
        let ns_path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.sandbox.as_raw_fd()
        );
        for index in 0..MAX_SANDBOXES {
            let name = format!("{VETH_PREFIX}{index}");
            if interface_exists(&name) {
                continue;
            }
            // Creating it is what reserves the name: another flint may have taken it since.
            match ip(&[
                "link", "add", &name, "type", "veth", "peer", "name", UPLINK, "netns", &ns_path,
            ]) {
                Ok(()) => {
                    self.host_side.veth = name;
                    return Ok(index);
                }
                Err(NatError::ToolFailed { message, .. }) if message.contains("exists") => continue,
                Err(e) => return Err(e),
            }
        }
        Err(NatError::NoFreeVeth)
    }

    /// Run `f` on this thread inside the sandbox's network namespace (a TAP opened there is
    /// the sandbox's; programs started there act on it), then return to flint's.
    pub fn inside<T>(&self, f: impl FnOnce() -> T) -> Result<T, NatError> {
        enter(&self.sandbox).map_err(|source| NatError::Namespace {
            what: "enter",
            source,
        })?;
        let result = f();
        // Staying in the sandbox's namespace would make flint act on the wrong network.
        enter(&self.host).expect("cannot return to flint's own network namespace");
        Ok(result)
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        // The namespace itself goes with the last descriptor of it.
        match self.remover.take() {
            Some(Remover { stop, thread }) => {
                drop(stop);
                let _ = thread.join();
            }
            // Setting up failed: this thread still may start programs.
            None => self.host_side.remove(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_options_parse() {
        assert_eq!(parse("tap=x"), None);
        assert_eq!(parse("natty"), None);
        assert_eq!(parse("nat"), Some(Ok(NatOptions::default())));
        let o = parse("nat,allow=10.1.2.3,allow=192.168.7.9/24:443")
            .unwrap()
            .unwrap();
        assert_eq!(
            o.allow,
            vec![
                Allow {
                    net: Ipv4Addr::new(10, 1, 2, 3),
                    prefix: 32,
                    port: None
                },
                Allow {
                    net: Ipv4Addr::new(192, 168, 7, 0),
                    prefix: 24,
                    port: Some(443)
                },
            ]
        );
        let all = parse("nat,allow=0.0.0.0/0").unwrap().unwrap();
        assert_eq!(all.allow[0].prefix, 0);
        for bad in [
            "10.0.0.1/33",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1/",
            "10.0.0.1/+8",
            "10.0.0.1:-1",
            "10.0.0",
            "::1",
            "example.com",
            "",
        ] {
            assert_eq!(
                parse(&format!("nat,allow={bad}")),
                Some(Err(NatSpecError::Allow(bad.to_string()))),
                "{bad}"
            );
        }
        assert_eq!(
            parse("nat,bw=100"),
            Some(Err(NatSpecError::Option("bw=100".into())))
        );
        assert_eq!(parse("nat,"), Some(Err(NatSpecError::Option("".into()))));
    }

    #[test]
    fn the_guest_parameter_names_address_gateway_and_name_servers() {
        assert_eq!(
            guest_param(),
            "flint.net=10.0.2.15/24,10.0.2.2,10.0.2.3,10.0.2.4,10.0.2.5"
        );
    }

    #[test]
    fn veth_addresses_are_distinct_slash_30s() {
        assert_eq!(
            veth_addrs(0),
            (Ipv4Addr::new(10, 254, 0, 1), Ipv4Addr::new(10, 254, 0, 2))
        );
        assert_eq!(
            veth_addrs(MAX_SANDBOXES - 1),
            (
                Ipv4Addr::new(10, 254, 255, 253),
                Ipv4Addr::new(10, 254, 255, 254)
            )
        );
    }

    #[test]
    fn the_host_rules_keep_the_sandbox_off_the_host_and_other_sandboxes() {
        let r = [Ipv4Addr::new(192, 0, 2, 53)];
        let open = host_ruleset("flint_1_2", "flv3", Ipv4Addr::new(10, 254, 0, 14), &r, &[]);
        assert_eq!(
            open,
            r#"table ip flint_1_2 {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.254.0.14 oifname != "flv3" masquerade
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    oifname "flv3" ct state established,related accept
    oifname "flv3" drop
    iifname "flv3" oifname "flv*" drop
    iifname "flv3" ip daddr 192.0.2.53 udp dport 53 accept
    iifname "flv3" ip daddr 192.0.2.53 tcp dport 53 accept
    iifname "flv3" accept
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "flv3" ip daddr 192.0.2.53 udp dport 53 accept
    iifname "flv3" ip daddr 192.0.2.53 tcp dport 53 accept
    iifname "flv3" drop
  }
}
"#
        );
        let allow = parse("nat,allow=10.7.0.0/16,allow=10.8.0.1:80")
            .unwrap()
            .unwrap()
            .allow;
        let limited = host_ruleset("t", "flv0", Ipv4Addr::new(10, 254, 0, 2), &[], &allow);
        let forward: Vec<&str> = limited
            .split("chain forward")
            .nth(1)
            .unwrap()
            .split("chain input")
            .next()
            .unwrap()
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("iifname"))
            .collect();
        assert_eq!(
            forward,
            [
                r#"iifname "flv0" oifname "flv*" drop"#,
                r#"iifname "flv0" ip daddr 10.7.0.0/16 accept"#,
                r#"iifname "flv0" ip daddr 10.8.0.1/32 udp dport 80 accept"#,
                r#"iifname "flv0" ip daddr 10.8.0.1/32 tcp dport 80 accept"#,
                r#"iifname "flv0" drop"#,
            ]
        );
        // What allow= names is reachable on the host too; nothing else there is.
        let input = limited.split("chain input").nth(1).unwrap();
        assert!(input.contains(r#"iifname "flv0" ip daddr 10.7.0.0/16 accept"#));
        assert!(input.trim_end().ends_with("iifname \"flv0\" drop\n  }\n}"));
    }

    #[test]
    fn the_namespace_script_sets_up_uplink_and_tap() {
        let script = sandbox_ip_script(Ipv4Addr::new(10, 254, 0, 6), Ipv4Addr::new(10, 254, 0, 5));
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(
            lines,
            [
                "link set lo up",
                "addr add 10.254.0.6/30 dev uplink",
                "link set uplink up",
                "route add default via 10.254.0.5",
                "tuntap add dev flint0 mode tap vnet_hdr",
                "link set flint0 address 02:66:6c:00:00:02",
                "addr add 10.0.2.2/24 dev flint0",
                "addr add 10.0.2.3/32 dev flint0",
                "addr add 10.0.2.4/32 dev flint0",
                "addr add 10.0.2.5/32 dev flint0",
                "link set flint0 up",
            ]
        );
    }

    #[test]
    fn the_sandbox_rules_forward_dns_and_masquerade() {
        let rules = sandbox_ruleset(&[Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]);
        assert!(
            rules.contains("iifname \"flint0\" ip daddr 10.0.2.3 udp dport 53 dnat to 192.0.2.1\n")
        );
        assert!(
            rules.contains("iifname \"flint0\" ip daddr 10.0.2.4 tcp dport 53 dnat to 192.0.2.2\n")
        );
        assert!(
            rules.contains("iifname \"flint0\" ip daddr 10.0.2.5 udp dport 53 dnat to 192.0.2.1\n")
        );
        assert!(rules.contains("oifname \"uplink\" masquerade"));
        assert!(!sandbox_ruleset(&[]).contains("dnat"));
    }

    #[test]
    fn resolvers_skip_loopback_and_ipv6() {
        let text = "# generated\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 192.0.2.1\n\
                    search example\nnameserver 192.0.2.1\nnameserver  198.51.100.7 # x\n\
                    nameserver 203.0.113.1\nnameserver 203.0.113.2\n";
        assert_eq!(
            resolvers_in(text),
            [
                Ipv4Addr::new(192, 0, 2, 1),
                Ipv4Addr::new(198, 51, 100, 7),
                Ipv4Addr::new(203, 0, 113, 1)
            ]
        );
        assert!(resolvers_in("nameserver 127.0.0.53\n").is_empty());
    }

    #[test]
    fn stale_tables_are_those_whose_flint_is_gone() {
        let listing = "table ip nat\ntable ip flint_10_500_0\ntable ip flint_11_600_1\n\
                       table ip flint_12_700_2\ntable ip flint_x_1_3\ntable inet flint_13_1_4\n\
                       table ip flint_14_1\ntable ip flint_15_1_5_6\ntable ip flint_16_1_7\n";
        // 10 runs; 12 is another process now; 16 is gone but its veth flv7 is there.
        let alive = |pid: u32, start: u64, index: u32| {
            (pid, start) == (10, 500) || (pid, start) == (12, 1) || index == 7
        };
        assert_eq!(
            stale_tables(listing, alive),
            ["flint_11_600_1", "flint_12_700_2"]
        );
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(start_time(std::process::id()).is_some());
        let pid = std::process::id();
        let table = own_table(3);
        assert!(table.starts_with(&format!("flint_{pid}_")), "{table}");
        assert!(table.ends_with("_3"), "{table}");
        assert!(sandbox_alive(pid, start_time(pid).unwrap(), u32::MAX));
        assert!(!sandbox_alive(pid, start_time(pid).unwrap() + 1, u32::MAX));
        assert!(interface_exists("lo"));
    }
}
