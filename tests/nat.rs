//! Tier 3: `flint run --net nat` gives a sandbox outbound IPv4 and DNS through NAT on the
//! host, limits it with `allow=`, keeps it off the host's own addresses, and leaves nothing
//! behind, even after `kill -9`. One nested host VM (tests/support) runs every case.
//!
//! The "internet" is a network namespace the scenario makes, reached from the host's over a
//! veth pair: busybox httpd serves a page on 10.77.0.1 there, and dnsmasq answers for
//! `web.flint.test` on the same address, which the host's /etc/resolv.conf names. Another
//! httpd listens on the host's own addresses (port 8080). A one-layer busybox image made here
//! checks that an `--image` sandbox's root sees the name servers. flint finds Debian's `ip`,
//! `nft` and `mkfs.ext4` on PATH.

mod support;

use std::path::PathBuf;

use support::{cache_dir, run_scenario_with, ScenarioOptions, RIG_FAULT_SH};

/// The first of `candidates` that exists, or a panic naming the Debian package.
fn tool(candidates: &[&str], package: &str) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{} is missing (apt-get install {package})", candidates[0]))
}

/// The hex SHA-256 of `data`.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A one-layer OCI image layout at `dir`: static busybox as /bin/busybox and the applets the
/// scenario calls as links, PATH=/bin. Nothing else: no /etc at all, so the name servers the
/// guest sees in it come from the sandbox.
fn busybox_image(dir: &std::path::Path) {
    let busybox = std::fs::read(tool(&["/bin/busybox"], "busybox-static")).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, path: &str, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_path(path).unwrap();
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    };
    let mut dir_header = header(tar::EntryType::Directory, "bin/", 0o755, 0);
    dir_header.set_cksum();
    layer.append(&dir_header, &[][..]).unwrap();
    let mut bin = header(
        tar::EntryType::Regular,
        "bin/busybox",
        0o755,
        busybox.len() as u64,
    );
    bin.set_cksum();
    layer.append(&bin, &busybox[..]).unwrap();
    for applet in ["sh", "cat", "tr", "nc", "nslookup", "awk", "tail"] {
        let mut link = header(tar::EntryType::Symlink, &format!("bin/{applet}"), 0o777, 0);
        link.set_link_name("busybox").unwrap();
        link.set_cksum();
        layer.append(&link, &[][..]).unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        serde_json::json!({ "digest": format!("sha256:{hex}"), "size": data.len() })
    };
    let mut layer_desc = put(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_desc["digest"].clone()] },
    });
    let mut config_desc = put(&serde_json::to_vec(&config).unwrap());
    layer_desc["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
    config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    });
    let mut manifest_desc = put(&serde_json::to_vec(&manifest).unwrap());
    manifest_desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [manifest_desc] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

const SCENARIO: &str = r#"
IP=$FILES/ip
NFT=$FILES/nft
# flint runs `ip` and `nft` from PATH: Debian's, not busybox's applets.
export PATH="$FILES:$PATH"
export FLINT_CACHE=$WORK/flint-cache
R="$FLINT run --kernel $VMLINUX --initramfs $FILES/sandbox.cpio.gz"
echo 'root:x:0:0:root:/root:/bin/sh' >>/etc/passwd
echo 'root:x:0:' >>/etc/group

# The "internet": a namespace with a web server and a name server on 10.77.0.1 (and
# 10.78.0.1, unused), the host's end of the link 10.77.0.2.
"$IP" netns add natweb
"$IP" link add natw0 type veth peer name natw1 netns natweb
# No IPv6 on the test's link: its addresses would change while the scenario runs (DAD).
echo 1 >/proc/sys/net/ipv6/conf/natw0/disable_ipv6
"$IP" netns exec natweb sh -c 'echo 1 >/proc/sys/net/ipv6/conf/natw1/disable_ipv6'
"$IP" addr add 10.77.0.2/24 dev natw0
"$IP" link set natw0 up
"$IP" netns exec natweb "$IP" link set lo up
"$IP" netns exec natweb "$IP" addr add 10.77.0.1/24 dev natw1
"$IP" netns exec natweb "$IP" addr add 10.78.0.1/24 dev natw1
"$IP" netns exec natweb "$IP" link set natw1 up
mkdir -p "$WORK/www" "$WORK/hostwww"
echo flint-nat-page >"$WORK/www/index.html"
echo host-page >"$WORK/hostwww/index.html"
"$IP" netns exec natweb /bin/busybox httpd -f -vv -p 10.77.0.1:80 -h "$WORK/www" 2>"$WORK/httpd.log" &
web_pid=$!
/bin/busybox httpd -f -p 8080 -h "$WORK/hostwww" 2>"$WORK/hosthttpd.log" &
host_web_pid=$!
"$IP" netns exec natweb "$FILES/dnsmasq" --keep-in-foreground --user=root --group=root \
    --pid-file= --no-resolv --no-hosts --bind-interfaces --listen-address=10.77.0.1 \
    --address=/web.flint.test/10.77.0.1 --log-facility="$WORK/dnsmasq.log" 2>"$WORK/dnsmasq.err" &
dns_pid=$!
# The host's resolver: a loopback one (skipped by flint) and the test's.
printf 'nameserver 127.0.0.53\nnameserver 10.77.0.1\n' >/etc/resolv.conf
sleep 2
for p in $web_pid $host_web_pid $dns_pid; do kill -0 $p || echo "SERVER $p is gone"; done
# HTTP with nc (Debian's busybox 1.35 wget crashes with -T, which the refused cases need):
# `fetch ADDRESS [PORT]` prints the page's last line, or FETCH-FAILED.
fetch_fn='fetch() {
    page=$(printf "GET / HTTP/1.0\r\n\r\n" | nc -w 8 "$1" "${2:-80}" 2>/dev/null | tail -n 1)
    echo "${page:-FETCH-FAILED}"
}'
eval "$fetch_fn"
echo "HOST_FETCH $(fetch 10.77.0.1)"
[ "$(fetch 10.77.0.1)" = flint-nat-page ] ||
    tail -n 5 "$WORK/httpd.log" "$WORK/dnsmasq.err" "$WORK/dnsmasq.log"

# Everything a sandbox could leave behind: interfaces, addresses, routes, nftables rules,
# named and process network namespaces.
state() {
    "$IP" -o link | sed 's/ link\/.*//'
    "$IP" -o addr | sed 's/ tentative//'
    "$IP" route
    "$NFT" list ruleset
    "$IP" netns list
    for p in /proc/[0-9]*/task/*; do readlink "$p/ns/net"; done 2>/dev/null | sort -u
}
state >"$WORK/state.before"
leaks() {
    state >"$WORK/state.now"
    if cmp -s "$WORK/state.before" "$WORK/state.now"; then
        echo "LEAK $1 none"
    else
        echo "LEAK $1 [$(diff "$WORK/state.before" "$WORK/state.now" | grep '^[-+][^-+]' | tr '\n' ' ')]"
    fi
}
# sandbox NAME FLINT-ARGS...: one `flint run`; its status, output and leftovers.
sandbox() {
    name=$1
    shift
    t0=$(cut -d' ' -f1 /proc/uptime)
    FLINT_LOG=debug timeout -k 10 240 $R "$@" </dev/null >"$WORK/$name.out" 2>"$WORK/$name.err"
    rc=$?
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "STATUS $name $rc"
    echo "TIMING $name: run $(echo "$t0 $t1" | awk '{ printf "%d", ($2 - $1) * 1000 }') ms, network $(grep -o 'set up in [0-9]* ms' "$WORK/$name.err")"
    echo "OUT $name [$(tr '\n' ' ' <"$WORK/$name.out")]"
    if [ $rc != 0 ] && [ $rc != 1 ]; then
        rig_fault $rc "$WORK/$name.err" || grep -v 'flint: debug' "$WORK/$name.err" | tail -n 15
    fi
    echo "RESTORED $name $(grep -c 'sandbox: restored at' "$WORK/$name.err")"
    leaks "$name"
}
fetch="$fetch_fn; fetch 10.77.0.1"

sandbox first --net nat -- sh -c "$fetch; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'"
echo "MADE $(grep -c 'snapshot of the booted guest made' "$WORK/first.err")"
sandbox restored --net nat -- sh -c "$fetch"
# busybox nslookup asks the name servers of /etc/resolv.conf itself.
sandbox dns --net nat -- sh -c "$fetch_fn"'
    addr=$(nslookup web.flint.test | awk "/^Name:/ { n = 1 } n && /^Address/ { print \$2 }")
    echo "RESOLVED:$addr"; fetch "$addr"'
sandbox denied --net nat,allow=10.78.0.0/24 -- sh -c "$fetch"
sandbox allowed --net nat,allow=10.78.0.0/24,allow=10.77.0.1:80 -- sh -c "$fetch"
sandbox wrongport --net nat,allow=10.77.0.1:81 -- sh -c "$fetch"
# A container image's root sees the sandbox's name servers (it has no /etc of its own); the
# first run converts the image (mkfs.ext4 from PATH) and boots, the second restores.
image_cmd="echo \$(cat /etc/resolv.conf); $fetch_fn"'
    addr=$(nslookup web.flint.test | awk "/^Name:/ { n = 1 } n && /^Address/ { print \$2 }")
    fetch "$addr"'
sandbox image1 --image "$FILES/image" --net nat -- sh -c "$image_cmd"
sandbox image2 --image "$FILES/image" --net nat -- sh -c "$image_cmd"
sandbox hostaddr --net nat -- sh -c "$fetch_fn; fetch 10.77.0.2 8080"
sandbox hostallowed --net nat,allow=10.77.0.2:8080 -- sh -c "$fetch_fn; fetch 10.77.0.2 8080"

# Eight at once.
for i in 1 2 3 4 5 6 7 8; do
    ( timeout -k 10 300 $R --net nat -- sh -c "$fetch" </dev/null >"$WORK/par$i.out" 2>"$WORK/par$i.err"
      echo $? >"$WORK/par$i.rc" ) &
done
wait_all=0
for i in 1 2 3 4 5 6 7 8; do
    while [ ! -s "$WORK/par$i.rc" ] && [ $wait_all -lt 400 ]; do sleep 1; wait_all=$((wait_all + 1)); done
done
for i in 1 2 3 4 5 6 7 8; do
    rc=$(cat "$WORK/par$i.rc")
    echo "PAR $i $rc $(tr '\n' ' ' <"$WORK/par$i.out")"
    [ "$rc" = 0 ] || rig_fault "$rc" "$WORK/par$i.err" || tail -n 5 "$WORK/par$i.err"
done
sleep 1
leaks parallel

# kill -9 of flint: the namespace, TAP and veth pair go with it; the host's nftables table
# stays until the next `flint run --net nat`.
$R --net nat -- sh -c 'echo started; exec sleep 600' </dev/null >"$WORK/killed.out" 2>"$WORK/killed.err" &
pid=$!
if wait_for "$WORK/killed.out" started 240; then
    echo "KILL_TABLES_BEFORE $("$NFT" list tables | grep -c flint_)"
    kill -9 $pid
    wait $pid
    echo "STATUS killed $?"
    n=0
    while ls /sys/class/net | grep -q '^flv' && [ $n -lt 60 ]; do sleep 0.5; n=$((n + 1)); done
    echo "KILL_VETHS $(ls /sys/class/net | grep -c '^flv')"
    echo "KILL_TABLES_AFTER $("$NFT" list tables | grep -c flint_)"
    sandbox afterkill --net nat -- sh -c "$fetch"
else
    kill -9 $pid
fi

kill $web_pid $host_web_pid $dns_pid 2>/dev/null
wait
"#;

fn line<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {key:?} line in the scenario output:\n{output}"))
}

#[test]
fn flint_run_net_nat() {
    let sandbox = cache_dir().join("sandbox/initramfs.cpio.gz");
    assert!(
        sandbox.is_file(),
        "sandbox image missing: run resources/build-sandbox-image.sh (resources/run-tests.sh does)"
    );
    let image = support::TempDir::new("nat-image");
    busybox_image(&image.0.join("image"));
    let files = [
        (sandbox, "sandbox.cpio.gz"),
        (
            tool(
                &["/usr/sbin/ip", "/usr/bin/ip", "/sbin/ip", "/bin/ip"],
                "iproute2",
            ),
            "ip",
        ),
        (tool(&["/usr/sbin/nft", "/usr/bin/nft"], "nftables"), "nft"),
        (tool(&["/usr/sbin/dnsmasq"], "dnsmasq-base"), "dnsmasq"),
        (
            tool(&["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"], "e2fsprogs"),
            "mkfs.ext4",
        ),
        (image.0.join("image"), "image"),
    ];
    let options = ScenarioOptions {
        timeout_secs: 1500,
        ..ScenarioOptions::default()
    };
    let run = run_scenario_with(&format!("{RIG_FAULT_SH}{SCENARIO}"), &files, &options);
    assert_eq!(
        run.status, 0,
        "scenario failed (98: timeout, 99: host VM failure)"
    );
    let out = &run.output;
    assert_eq!(
        line(out, "HOST_FETCH "),
        "flint-nat-page",
        "the test's web server"
    );
    let status = |name: &str| line(out, &format!("STATUS {name} "));
    let output = |name: &str| line(out, &format!("OUT {name} "));
    let leaks = |name: &str| line(out, &format!("LEAK {name} "));

    assert_eq!(status("first"), "0");
    assert_eq!(
        output("first"),
        "[flint-nat-page inet 10.0.2.15/24 ]",
        "the guest fetches a page through NAT, from its fixed address"
    );
    assert_eq!(
        line(out, "MADE "),
        "1",
        "the first --net nat run snapshots its guest"
    );
    assert_eq!(status("restored"), "0");
    assert_eq!(line(out, "RESTORED restored "), "1", "a restored run");
    assert_eq!(
        output("restored"),
        "[flint-nat-page ]",
        "a guest restored from the snapshot has the network"
    );
    assert_eq!(status("dns"), "0");
    assert_eq!(
        output("dns"),
        "[RESOLVED:10.77.0.1 flint-nat-page ]",
        "names resolve through the host's resolver"
    );
    assert_eq!(
        output("denied"),
        "[FETCH-FAILED ]",
        "allow= naming another network drops the rest"
    );
    assert_eq!(
        output("allowed"),
        "[flint-nat-page ]",
        "allow= lets through"
    );
    assert_eq!(
        output("wrongport"),
        "[FETCH-FAILED ]",
        "allow= with a port lets only that port through"
    );
    for run in ["image1", "image2"] {
        assert_eq!(status(run), "0");
        assert_eq!(
            output(run),
            "[nameserver 10.0.2.3 nameserver 10.0.2.4 nameserver 10.0.2.5 flint-nat-page ]",
            "{run}: a container image's root sees the sandbox's name servers, which work"
        );
    }
    assert_eq!(
        line(out, "RESTORED image2 "),
        "1",
        "an image's --net nat run restores the snapshot"
    );
    assert_eq!(
        output("hostaddr"),
        "[FETCH-FAILED ]",
        "the guest cannot reach the host's own addresses"
    );
    assert_eq!(
        output("hostallowed"),
        "[host-page ]",
        "unless allow= names them"
    );
    for i in 1..=8 {
        assert_eq!(
            line(out, &format!("PAR {i} ")),
            "0 flint-nat-page",
            "sandbox {i} of eight at once"
        );
    }
    for name in [
        "first",
        "restored",
        "dns",
        "denied",
        "allowed",
        "wrongport",
        "hostaddr",
        "hostallowed",
        "image1",
        "image2",
        "parallel",
    ] {
        assert_eq!(leaks(name), "none", "after {name}: something was left");
    }
    assert_eq!(line(out, "KILL_TABLES_BEFORE "), "1");
    assert_eq!(status("killed"), "137");
    assert_eq!(
        line(out, "KILL_VETHS "),
        "0",
        "the veth pair goes with a killed flint"
    );
    assert_eq!(
        line(out, "KILL_TABLES_AFTER "),
        "1",
        "only the host's nftables table stays after kill -9"
    );
    assert_eq!(status("afterkill"), "0");
    assert_eq!(output("afterkill"), "[flint-nat-page ]");
    assert_eq!(
        leaks("afterkill"),
        "none",
        "the next --net nat run removes what a killed flint left"
    );
}

/// `flint run --net nat` as `uid` (none: as this user) with `path` as PATH, on this machine;
/// its status and stderr. No guest starts: setting up the network fails first.
fn nat_run_local(uid: Option<u32>, path: &str) -> (Option<i32>, String) {
    let dummy = support::TempDir::new("nat-local");
    let file = dummy.write("dummy", b"not a kernel");
    std::fs::set_permissions(
        &dummy.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_string(),
            ])
            .arg(support::flint_bin());
            c
        }
        None => std::process::Command::new(support::flint_bin()),
    };
    let out = cmd
        .args(["run", "--net", "nat", "--kernel"])
        .arg(&file)
        .arg("--initramfs")
        .arg(&file)
        .args(["--", "true"])
        .env("PATH", path)
        .env("FLINT_CACHE", &dummy.0)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn net_nat_needs_root_and_nftables_and_says_so_in_one_sentence() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (status, stderr) = nat_run_local(root.then_some(65534), "/usr/sbin:/usr/bin:/sbin:/bin");
    assert_eq!(status, Some(125), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "flint: error: --net nat needs root (it creates a network namespace, network \
         interfaces and nftables rules)"
    );
    if root {
        let (status, stderr) = nat_run_local(None, "/nonexistent");
        assert_eq!(status, Some(125), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("flint: error: --net nat needs `nft` (nftables) on PATH: "),
            "{stderr}"
        );
    }
}
