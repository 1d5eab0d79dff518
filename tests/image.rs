//! `flint run --image`: container images from local files (no network), made by the test
//! itself as OCI image layouts: a busybox image in three layers with whiteouts, an opaque
//! directory, a hard link, symbolic links, a device node, owners, a setuid file, a file
//! capability, Env, WorkingDir, User and Entrypoint/Cmd; and a hostile image whose layer
//! writes `../escape`.
//!
//! - `the_image_becomes_a_faithful_disk_and_a_hostile_one_leaves_nothing` runs on this host
//!   without a guest: flint builds the image's disk before it boots anything, so a kernel
//!   that cannot boot still leaves the cached disk, which `debugfs` (e2fsprogs) inspects; the
//!   progress lines on a terminal (`script`, util-linux) and the hostile image's refusal.
//! - `images_are_pulled_from_a_registry_verified_and_resumed` and
//!   `registry_credentials_come_from_the_docker_configuration` run on this host too: a real
//!   registry (Debian's `docker-registry`) on a loopback port, filled with `skopeo`, and
//!   `htpasswd` (apache2-utils) for basic auth; the tests fail when these are missing.
//! - `images_run_in_sandboxes` (tier 3) runs sandboxes of the image in the nested KVM host (or
//!   directly on a host whose KVM boots Linux): default command, configuration, user, file
//!   properties as seen in the guest, private writes, an unchanged cached disk, the snapshot
//!   fast path, --scratch, an OCI archive of the same image, exit statuses; and, in the same
//!   nested host, a real Debian image with Python (bookworm, made from Debian's packages by
//!   `resources/build-debian-image.sh`, which `resources/run-tests.sh` runs) running
//!   `python3 -c` on a file copied in, first booted and then restored.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest as _, Sha256};
use support::{cache_dir, flint_bin, run_scenario_with, ScenarioOptions, TempDir, RIG_FAULT_SH};
use tar::{EntryType, Header};

/// A `security.capability` value (revision 2) granting CAP_NET_RAW, permitted and effective.
const CAP_NET_RAW: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A layer tar built in memory, with raw paths so that hostile entries can be made.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, path: &str, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        let name = &mut h.as_old_mut().name;
        assert!(path.len() < name.len(), "test paths fit the header");
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    }

    fn push(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.push(Self::header(EntryType::Directory, path, mode, 0), b"")
    }

    fn dir_as(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = Self::header(EntryType::Directory, path, mode, 0);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, b"")
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_as(path, mode, 0, 0, data)
    }

    fn file_as(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, path, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, data)
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, path, 0o777, 0);
        let l = &mut h.as_old_mut().linkname;
        l[..target.len()].copy_from_slice(target.as_bytes());
        self.push(h, b"")
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target)
    }

    fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(EntryType::Char, path, mode, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.push(h, b"")
    }

    /// PAX records for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    fn bytes(&mut self) -> Vec<u8> {
        let mut b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.finish().unwrap();
        b.into_inner().unwrap()
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Write an OCI image layout at `dir` with uncompressed `layers` and the configuration
/// `config` (its `rootfs` is filled in); returns the manifest's digest (hex).
fn oci_layout(dir: &Path, layers: &[Vec<u8>], mut config: serde_json::Value) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        (format!("sha256:{hex}"), data.len())
    };
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let (digest, size) = put(layer);
        diff_ids.push(serde_json::Value::from(digest.clone()));
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": size,
        }));
    }
    config["architecture"] = "amd64".into();
    config["os"] = "linux".into();
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": diff_ids });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descs,
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest_digest.strip_prefix("sha256:").unwrap().to_string()
}

/// The busybox applets the scenarios call, as links in /bin.
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "ls",
    "id",
    "stat",
    "readlink",
    "pwd",
    "touch",
    "rm",
    "mkdir",
    "grep",
    "head",
    "tr",
    "wc",
    "md5sum",
    "sha256sum",
    "env",
    "test",
    "[",
    "sleep",
    "true",
    "dd",
    "df",
    "cut",
    "cp",
    "chmod",
];

/// The test image (see the module documentation); returns its manifest digest (hex).
fn busybox_image(dir: &Path) -> String {
    let busybox = std::fs::read("/bin/busybox")
        .expect("the test image needs a static busybox at /bin/busybox (busybox-static)");
    let mut base = Layer::new();
    base.dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("home", 0o755)
        .dir_as("home/app", 0o755, 1000, 1000)
        .dir("root", 0o700)
        .dir("tmp", 0o1777)
        .dir("data", 0o755)
        .dir("data/old", 0o755)
        .dir("app", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        base.symlink(&format!("bin/{applet}"), "busybox");
    }
    base.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .file(
        "etc/group",
        0o644,
        b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .file("data/gone", 0o644, b"whited out by the second layer\n")
    .file("data/old/x", 0o644, b"hidden by the opaque directory\n")
    .file("usr/bin/suidbox", 0o4755, b"#!/bin/sh\necho setuid\n")
    .pax(&[("SCHILY.xattr.security.capability", &CAP_NET_RAW)])
    .file("usr/bin/busybox-caps", 0o755, &busybox);
    let mut second = Layer::new();
    second
        .file("data/.wh.gone", 0o644, b"")
        .dir("data/old", 0o755)
        .file("data/old/.wh..wh..opq", 0o644, b"")
        .file("data/old/y", 0o644, b"kept\n")
        .file("app/file", 0o644, b"hello from the image\n")
        .hardlink("app/hardlink", "app/file")
        .symlink("app/link", "file")
        .char_device("app/null", 0o666, 1, 3);
    let mut third = Layer::new();
    third.file_as("app/owned", 0o640, 1000, 50, b"app's\n");
    let config = serde_json::json!({
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
            "WorkingDir": "/app",
            "User": "app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo \"default: $GREETING from $(pwd) as $(id -u):$(id -g)\""],
        }
    });
    oci_layout(dir, &[base.bytes(), second.bytes(), third.bytes()], config)
}

/// An image whose one layer writes `../escape`.
fn hostile_image(dir: &Path) -> String {
    let mut layer = Layer::new();
    layer
        .dir("bin", 0o755)
        .file("bin/ok", 0o755, b"fine\n")
        .file("../escape", 0o644, b"out of the tree\n");
    let config = serde_json::json!({ "config": { "Cmd": ["/bin/ok"] } });
    oci_layout(dir, &[layer.bytes()], config)
}

/// An OCI archive (a tar of the layout) of the layout at `dir`.
fn oci_archive(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap().flush().unwrap();
}

/// A program's full path, from the usual directories (tests may run with a short PATH).
fn program(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is missing: install e2fsprogs");
}

/// `debugfs -R REQUEST DISK`'s output.
fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new(program("debugfs"))
        .args(["-R", request])
        .arg(disk)
        .stdin(Stdio::null())
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value after `key` on the line that has it.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.split_once(key).map(|(_, rest)| rest.trim()))
        .unwrap_or_else(|| panic!("no {key:?} in\n{text}"))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn the_image_becomes_a_faithful_disk_and_a_hostile_one_leaves_nothing() {
    let tmp = TempDir::new("image-disk");
    let image = tmp.0.join("image");
    let manifest = busybox_image(&image);
    let hostile = tmp.0.join("hostile");
    hostile_image(&hostile);
    let cache = tmp.0.join("cache");
    // Not a kernel: flint gets as far as booting it, with the image's disk made by then.
    let kernel = tmp.write("vmlinux", b"not a kernel");
    let initramfs = tmp.write("initramfs", b"not an initramfs");
    let mkfs_dir = program("mkfs.ext4");
    let path = format!(
        "{}:/usr/sbin:/usr/bin:/sbin:/bin",
        mkfs_dir.parent().unwrap().display()
    );
    let run = |image: &Path| {
        Command::new(flint_bin())
            .env("FLINT_CACHE", &cache)
            .env("PATH", &path)
            .args(["run", "--cold", "--kernel"])
            .arg(&kernel)
            .arg("--initramfs")
            .arg(&initramfs)
            .arg("--image")
            .arg(image)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&image);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The kernel is refused, after the image was prepared; nothing else is said (stderr is
    // not a terminal: no progress lines).
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("neither an ELF vmlinux"), "{stderr}");
    let disks = cache.join("images/disks");
    let disk = disks.join(format!("{manifest}.ext4"));
    assert!(disk.is_file(), "no disk in {:?}", files_in(&disks));
    assert_eq!(
        files_in(&disks),
        [
            format!("{manifest}.etc"),
            format!("{manifest}.ext4"),
            format!("{manifest}.lock")
        ]
    );
    assert_eq!(
        std::fs::read_to_string(disks.join(format!("{manifest}.etc/etc/passwd"))).unwrap(),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
    );
    // The unpacked tree is gone; the cache is private.
    assert!(files_in(&cache.join("images/tmp")).is_empty());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cache.join("images"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    // What the disk holds, as ext4 sees it.
    let stat = |p: &str| debugfs(&disk, &format!("stat {p}"));
    let file = stat("/app/file");
    let hardlink = stat("/app/hardlink");
    assert_eq!(
        field(&file, "Inode:").split_whitespace().next(),
        field(&hardlink, "Inode:").split_whitespace().next()
    );
    assert!(field(&file, "Links:").starts_with('2'), "{file}");
    assert!(
        stat("/app/link").contains("Fast link dest: \"file\""),
        "{}",
        stat("/app/link")
    );
    assert!(
        stat("/usr/bin/suidbox").contains("Mode:  04755"),
        "{}",
        stat("/usr/bin/suidbox")
    );
    let owned = stat("/app/owned");
    assert!(owned.contains("User:  1000   Group:    50"), "{owned}");
    assert!(owned.contains("Mode:  0640"), "{owned}");
    let node = stat("/app/null");
    assert!(node.contains("Type: character special"), "{node}");
    assert!(node.contains("Device major/minor number: 01:03"), "{node}");
    assert!(stat("/tmp").contains("Mode:  01777"), "{}", stat("/tmp"));
    let caps = debugfs(&disk, "ea_list /usr/bin/busybox-caps");
    assert!(
        caps.contains("security.capability (20) = 01 00 00 02 00 20 00 00"),
        "{caps}"
    );
    // `ls -p`: one `/inode/mode/uid/gid/name/size/` line per entry.
    let names = |p: &str| -> Vec<String> {
        let mut names: Vec<String> = debugfs(&disk, &format!("ls -p {p}"))
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(str::to_string))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names("/"),
        ["app", "bin", "data", "etc", "home", "root", "tmp", "usr"],
        "the image's files, and no lost+found"
    );
    assert_eq!(names("/data"), ["old"], "the whiteout");
    assert_eq!(names("/data/old"), ["y"], "the opaque directory");
    assert_eq!(names("/app"), ["file", "hardlink", "link", "null", "owned"]);
    let root = stat("/");
    assert!(root.contains("User:     0   Group:     0"), "{root}");

    // A second run uses the disk as it is.
    let before = std::fs::metadata(&disk).unwrap();
    let out = run(&image);
    assert_eq!(out.status.code(), Some(125));
    let after = std::fs::metadata(&disk).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((before.ino(), before.mtime()), (after.ino(), after.mtime()));

    // The same image as an OCI archive is the same image: the same disk.
    let archive = tmp.0.join("image.tar");
    oci_archive(&image, &archive);
    assert_eq!(run(&archive).status.code(), Some(125));
    let again = std::fs::metadata(&disk).unwrap();
    assert_eq!((before.ino(), before.mtime()), (again.ino(), again.mtime()));
    assert_eq!(files_in(&disks).len(), 3);

    // On a terminal, each phase says so in one line (a new cache: the image is new there).
    let terminal_cache = tmp.0.join("terminal-cache");
    let command = format!(
        "FLINT_CACHE={} PATH={} {} run --cold --kernel {} --initramfs {} --image {} -- true",
        terminal_cache.display(),
        path,
        flint_bin().display(),
        kernel.display(),
        initramfs.display(),
        image.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    let shown = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let phases: Vec<&str> = shown
        .lines()
        .filter(|l| l.starts_with("flint: ") && !l.starts_with("flint: error"))
        .collect();
    assert_eq!(phases.len(), 3, "{shown}");
    assert!(
        phases[0].starts_with("flint: importing the image /"),
        "{shown}"
    );
    assert_eq!(phases[1], "flint: unpacking 3 layers", "{shown}");
    assert!(
        phases[2].starts_with("flint: building the image's disk ("),
        "{shown}"
    );

    // A hostile image: one sentence, and nothing of it stays in the cache.
    let store_before = files_in(&cache.join("images/store/blobs/sha256"));
    let out = run(&hostile);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("flint: error: "), "{stderr}");
    assert!(
        stderr.contains("../escape") && stderr.contains(".."),
        "{stderr}"
    );
    assert!(!tmp.0.join("escape").exists() && !cache.join("images/escape").exists());
    assert_eq!(
        files_in(&disks),
        [
            format!("{manifest}.etc"),
            format!("{manifest}.ext4"),
            format!("{manifest}.lock")
        ]
    );
    assert_eq!(
        files_in(&cache.join("images/store/blobs/sha256")),
        store_before
    );
    assert_eq!(
        files_in(&cache.join("images/store/images")),
        [format!("{manifest}.json")]
    );
    assert!(files_in(&cache.join("images/tmp")).is_empty());
    assert!(files_in(&cache.join("images/store/tmp")).is_empty());
}

/// Shell prelude of the scenario (after [`support::RIG_FAULT_SH`]): `$R` runs a sandbox.
const PRELUDE: &str = r#"
# flint finds mkfs.ext4 on PATH.
export PATH="$FILES:$PATH"
export FLINT_CACHE=$WORK/flint-cache
R="$FLINT run --kernel $VMLINUX --initramfs $FILES/sandbox.cpio.gz"
disks=$FLINT_CACHE/images/disks
"#;

const SCENARIO: &str = r#"
# The first run converts the image, boots and snapshots the booted sandbox.
FLINT_LOG=debug $R --image "$FILES/image" >"$WORK/first.out" 2>"$WORK/first.err"
rc=$?; echo "STATUS first $rc"; rig_fault $rc "$WORK/first.err" || true
[ $rc = 0 ] || tail -n 20 "$WORK/first.err"
echo "FIRST $(cat "$WORK/first.out")"
echo "MADE $(grep -c 'snapshot of the booted guest made' "$WORK/first.err")"
disk=$(ls "$disks"/*.ext4)
echo "DISKS $(ls "$disks" | grep -c '\.ext4$')"
echo "DISK_SHA before $(sha256sum "$disk" | cut -d' ' -f1)"
echo "CAPS $("$FILES/debugfs" -R 'ea_list /usr/bin/busybox-caps' "$disk" 2>/dev/null | tr '\n' ' ')"
# The image's configuration and files, as its user sees them (restored from the snapshot).
FLINT_LOG=debug $R --image "$FILES/image" -- '
echo "GREETING=$GREETING"; echo "PWD=$(pwd)"; echo "HOME=$HOME"
echo "IDS=$(id -u):$(id -g)"; echo "GROUPS=$(id -G)"
[ -e /data/gone ] && echo "WHITEOUT=kept" || echo "WHITEOUT=gone"
echo "OPAQUE=$(ls -A /data/old | tr "\n" " ")"
echo "INODES=$(stat -c %i /app/file) $(stat -c %i /app/hardlink)"
echo "LINK=$(readlink /app/link) $(cat /app/link)"
echo "SUID=$(stat -c %a /usr/bin/suidbox)"
echo "OWNED=$(stat -c "%u:%g %a" /app/owned)"
echo "NODE=$(stat -c "%F %t:%T" /app/null)"
echo "TMP=$(stat -c %a /tmp)"
echo "CAPEFF=$(/usr/bin/busybox-caps grep CapEff /proc/self/status | tr -d "\t" | cut -d: -f2)"
echo "PLAIN=$(grep CapEff /proc/self/status | tr -d "\t" | cut -d: -f2)"
' >"$WORK/details.out" 2>"$WORK/details.err"
rc=$?; echo "STATUS details $rc"; rig_fault $rc "$WORK/details.err" || true
cat "$WORK/details.out"
echo "RESTORED details $(grep -c 'sandbox: restored at' "$WORK/details.err")"
# For the record (not checked): the conversion's phases and the runs' milestones.
grep -h -e 'image:' -e 'agent connected at' -e 'command ended at' -e 'restored at' \
    "$WORK/first.err" "$WORK/details.err" | sed 's/^/TIMING /'

# Writes everywhere (as root), then another sandbox looks: nothing of the first is there.
$R --image "$FILES/image" --user root -- '
for d in / /bin /etc /data /data/old /app /usr/bin /root /tmp; do echo x >"$d/written-here" || exit 1; done
chmod 777 /data && echo y >/usr/bin/busybox-caps && rm -f /app/file /etc/passwd /bin/busybox && echo wrote-everywhere
' >"$WORK/writes.out" 2>&1
rc=$?; echo "STATUS writes $rc"; rig_fault $rc "$WORK/writes.out" || true
echo "WRITES $(cat "$WORK/writes.out")"
$R --image "$FILES/image" --user 0:0 -- '
echo "SEEN=$(ls / /bin /etc /data /app /usr/bin /root /tmp | grep -c written-here)"
echo "STILL=$(cat /app/file) $(stat -c %a /data) $(head -c 4 /usr/bin/busybox-caps | tr -dc A-Z)"
echo "UID=$(id -u)"
' >"$WORK/second.out" 2>&1
rc=$?; echo "STATUS second $rc"; rig_fault $rc "$WORK/second.out" || true
cat "$WORK/second.out"
echo "DISK_SHA after $(sha256sum "$disk" | cut -d' ' -f1)"
# Exit statuses, --entrypoint, copies in and out (relative to the image's root).
for code in 0 3 42; do
    $R --image "$FILES/image" -- "exit $code" </dev/null >/dev/null 2>"$WORK/exit.err"
    rc=$?; echo "STATUS exit$code $rc"; rig_fault $rc "$WORK/exit.err" || true
done
$R --image "$FILES/image" --entrypoint /bin/echo -- from the entrypoint >"$WORK/ep.out" 2>&1
rc=$?; echo "STATUS entrypoint $rc"; rig_fault $rc "$WORK/ep.out" || true
echo "ENTRYPOINT $(cat "$WORK/ep.out")"
$R --image "$FILES/image" --env GREETING=hi --workdir /tmp -- 'echo "$GREETING in $(pwd)"' >"$WORK/env.out" 2>&1
rc=$?; echo "STATUS env $rc"; rig_fault $rc "$WORK/env.out" || true
echo "OVERRIDES $(cat "$WORK/env.out")"
head -c 100000 /dev/urandom >"$WORK/blob"
echo "MD5 blob $(md5sum <"$WORK/blob" | cut -d' ' -f1)"
$R --image "$FILES/image" --copy-in "$WORK/blob:/home/app/in" --copy-out "/home/app/out:$WORK/blob.back" \
    -- 'cp ~/in ~/out && md5sum ~/in | cut -d" " -f1' >"$WORK/copy.out" 2>&1
rc=$?; echo "STATUS copies $rc"; rig_fault $rc "$WORK/copy.out" || true
echo "MD5 inside $(cat "$WORK/copy.out")"
echo "MD5 back $(md5sum <"$WORK/blob.back" | cut -d' ' -f1)"
# --scratch: the writes go to a 16 MiB disk (boots cold): 30 MB do not fit there, while
# the default overlay in guest memory takes them.
FLINT_LOG=debug $R --image "$FILES/image" --user 0 --scratch 16 -- \
    'dd if=/dev/zero of=/big bs=1M count=30 2>/dev/null && echo fits || echo full' >"$WORK/scratch.out" 2>"$WORK/scratch.err"
rc=$?; echo "STATUS scratch $rc"; rig_fault $rc "$WORK/scratch.err" || true
echo "SCRATCH $(cat "$WORK/scratch.out") restored=$(grep -c 'sandbox: restored at' "$WORK/scratch.err")"
$R --image "$FILES/image" --user 0 -- \
    'dd if=/dev/zero of=/big bs=1M count=30 2>/dev/null && echo fits || echo full' >"$WORK/ram.out" 2>&1
rc=$?; echo "STATUS ram $rc"; rig_fault $rc "$WORK/ram.out" || true
echo "RAM $(cat "$WORK/ram.out")"
echo "WORKDIRS $(ls -d /tmp/flint-run-* 2>/dev/null | wc -l)"
# The same image as an OCI archive: the same disk, no second one.
$R --image "$FILES/image.tar" >"$WORK/archive.out" 2>&1
rc=$?; echo "STATUS archive $rc"; rig_fault $rc "$WORK/archive.out" || true
echo "ARCHIVE $(cat "$WORK/archive.out")"
echo "DISKS_AFTER $(ls "$disks" | grep -c '\.ext4$')"
# A user the image does not have.
$R --image "$FILES/image" --user nobody -- true >"$WORK/nouser.out" 2>&1
echo "STATUS nouser $?"; echo "NOUSER $(cat "$WORK/nouser.out")"
"#;

/// The part of the scenario with the Debian Python image (`$FILES/debian`): a computation on
/// a file copied in, first run (converts the image, boots, snapshots), then restored twice.
const DEBIAN_SCENARIO: &str = r#"
PY='
import hashlib, json, sys
data = open("/srv/numbers.json", "rb").read()
numbers = json.loads(data)["numbers"]
release = dict(l.split("=", 1) for l in open("/etc/os-release").read().splitlines() if "=" in l)
print("PY_VERSION=%d.%d" % sys.version_info[:2])
print("PY_OS=" + release["VERSION_CODENAME"])
print("PY_RESULT=" + json.dumps({"sum": sum(numbers), "max": max(numbers),
    "sha256": hashlib.sha256(data).hexdigest()}, sort_keys=True))
'
for run in py1 py2; do
    FLINT_LOG=debug $R --image "$FILES/debian" --copy-in "$FILES/numbers.json:/srv/numbers.json" \
        -- python3 -c "$PY" >"$WORK/$run.out" 2>"$WORK/$run.err"
    rc=$?; echo "STATUS $run $rc"; rig_fault $rc "$WORK/$run.err" || true
    [ $rc = 0 ] || tail -n 20 "$WORK/$run.err"
    sed "s/^/$run /" "$WORK/$run.out"
    echo "$run made=$(grep -c 'snapshot of the booted guest made' "$WORK/$run.err")"
    echo "$run restored=$(grep -c 'sandbox: restored at' "$WORK/$run.err")"
    echo "$run python-stderr=$(grep -vc '^flint: ' "$WORK/$run.err")"
done
FLINT_LOG=debug $R --image "$FILES/debian" -- python3 -c 'import sys; print("leaving"); sys.exit(3)' \
    >"$WORK/py3.out" 2>"$WORK/py3.err"
rc=$?; echo "STATUS py3 $rc"; rig_fault $rc "$WORK/py3.err" || true
echo "py3 $(cat "$WORK/py3.out") restored=$(grep -c 'sandbox: restored at' "$WORK/py3.err")"
echo "DEBIAN_DISKS $(ls "$disks" | grep -c '\.ext4$')"
# For the record (not checked): the conversion's phases and the runs' milestones.
grep -h -e 'image:' -e 'agent connected at' -e 'command ended at' -e 'restored at' \
    "$WORK/py1.err" "$WORK/py2.err" | sed 's/^/TIMING debian /'
"#;

fn line<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key:?} line in the scenario output (above)"))
}

/// The Debian image with Python that `resources/build-debian-image.sh` builds; panics (the
/// test fails, it never skips) when it is missing.
fn debian_python_image() -> PathBuf {
    let dir = cache_dir().join("test-images/debian-python");
    assert!(
        dir.join("index.json").is_file(),
        "Debian Python image missing: {} has no index.json; run resources/build-debian-image.sh \
         (resources/run-tests.sh does)",
        dir.display()
    );
    dir
}

#[test]
fn images_run_in_sandboxes() {
    let tmp = TempDir::new("image-run");
    let image = tmp.0.join("image");
    busybox_image(&image);
    let archive = tmp.0.join("image.tar");
    oci_archive(&image, &archive);
    let sandbox = cache_dir().join("sandbox/initramfs.cpio.gz");
    assert!(
        sandbox.is_file(),
        "sandbox image missing: run resources/build-sandbox-image.sh (resources/run-tests.sh does)"
    );
    let numbers: Vec<u32> = (1..=200).map(|n| n * n % 997).collect();
    let numbers_json = serde_json::to_vec(&serde_json::json!({ "numbers": numbers })).unwrap();
    let numbers_file = tmp.write("numbers.json", &numbers_json);
    let files = [
        (sandbox, "sandbox.cpio.gz"),
        (image, "image"),
        (archive, "image.tar"),
        (debian_python_image(), "debian"),
        (numbers_file, "numbers.json"),
        (program("mkfs.ext4"), "mkfs.ext4"),
        (program("debugfs"), "debugfs"),
    ];
    let run = run_scenario_with(
        &format!("{RIG_FAULT_SH}{PRELUDE}{SCENARIO}{DEBIAN_SCENARIO}"),
        &files,
        &ScenarioOptions {
            timeout_secs: 900,
            ..ScenarioOptions::default()
        },
    );
    run.assert_ok();
    let out = &run.output;
    let status = |name: &str| line(out, &format!("STATUS {name} "));
    for name in [
        "first",
        "details",
        "writes",
        "second",
        "exit0",
        "entrypoint",
        "env",
        "copies",
        "scratch",
        "ram",
        "archive",
    ] {
        assert_eq!(status(name), "0", "{name}");
    }
    // The image's default command, as its user, in its working directory.
    assert_eq!(line(out, "FIRST "), "default: hello from /app as 1000:1000");
    assert_eq!(
        line(out, "MADE "),
        "1",
        "the first run snapshots the booted sandbox"
    );
    assert_eq!(line(out, "DISKS "), "1");
    assert!(
        line(out, "CAPS ").contains("security.capability (20) = 01 00 00 02 00 20 00 00"),
        "{}",
        line(out, "CAPS ")
    );
    // Later runs restore that snapshot, with the image mounted.
    assert_eq!(line(out, "RESTORED details "), "1");
    assert_eq!(line(out, "GREETING="), "hello");
    assert_eq!(line(out, "PWD="), "/app");
    assert_eq!(line(out, "HOME="), "/home/app");
    assert_eq!(line(out, "IDS="), "1000:1000");
    let groups: Vec<&str> = line(out, "GROUPS=").split_whitespace().collect();
    assert!(
        groups.contains(&"1000") && groups.contains(&"50"),
        "{groups:?}"
    );
    assert_eq!(line(out, "WHITEOUT="), "gone");
    assert_eq!(line(out, "OPAQUE="), "y");
    let inodes: Vec<&str> = line(out, "INODES=").split_whitespace().collect();
    assert_eq!(inodes.len(), 2);
    assert_eq!(inodes[0], inodes[1], "the hard link is the same file");
    assert_eq!(line(out, "LINK="), "file hello from the image");
    assert_eq!(line(out, "SUID="), "4755");
    assert_eq!(line(out, "OWNED="), "1000:50 640");
    assert_eq!(line(out, "NODE="), "character special file 1:3");
    assert_eq!(line(out, "TMP="), "1777");
    // The file capability works: CAP_NET_RAW (bit 13) for user 1000, who has none otherwise.
    assert_eq!(line(out, "CAPEFF="), "0000000000002000");
    assert_eq!(line(out, "PLAIN="), "0000000000000000");
    // Writes stay in their sandbox; the cached disk never changes.
    assert_eq!(line(out, "WRITES "), "wrote-everywhere");
    assert_eq!(line(out, "SEEN="), "0");
    assert_eq!(line(out, "STILL="), "hello from the image 755 ELF");
    assert_eq!(line(out, "UID="), "0");
    assert_eq!(line(out, "DISK_SHA before "), line(out, "DISK_SHA after "));
    assert_eq!(status("exit3"), "3");
    assert_eq!(status("exit42"), "42");
    assert_eq!(line(out, "ENTRYPOINT "), "from the entrypoint");
    assert_eq!(line(out, "OVERRIDES "), "hi in /tmp");
    let blob = line(out, "MD5 blob ");
    assert_eq!(line(out, "MD5 inside "), blob);
    assert_eq!(line(out, "MD5 back "), blob);
    // The scratch disk takes the writes (and is gone with the run's directory).
    assert_eq!(line(out, "SCRATCH "), "full restored=0");
    assert_eq!(line(out, "RAM "), "fits");
    assert_eq!(line(out, "WORKDIRS "), "0");
    assert_eq!(
        line(out, "ARCHIVE "),
        "default: hello from /app as 1000:1000"
    );
    assert_eq!(line(out, "DISKS_AFTER "), "1");
    assert_eq!(status("nouser"), "125");
    assert_eq!(
        line(out, "NOUSER "),
        "flint: error: the image cannot run: user \"nobody\" is not in the image's /etc/passwd"
    );

    // The Debian image: Python computes on the file copied in, booted first, then restored.
    let expected = format!(
        r#"{{"max": {}, "sha256": "{}", "sum": {}}}"#,
        numbers.iter().max().unwrap(),
        sha256_hex(&numbers_json),
        numbers.iter().sum::<u32>()
    );
    for (run, made, restored) in [("py1", "1", "0"), ("py2", "0", "1")] {
        assert_eq!(status(run), "0", "{run}");
        assert_eq!(line(out, &format!("{run} PY_VERSION=")), "3.11", "{run}");
        assert_eq!(line(out, &format!("{run} PY_OS=")), "bookworm", "{run}");
        assert_eq!(line(out, &format!("{run} PY_RESULT=")), expected, "{run}");
        assert_eq!(line(out, &format!("{run} made=")), made, "{run}");
        assert_eq!(line(out, &format!("{run} restored=")), restored, "{run}");
        assert_eq!(line(out, &format!("{run} python-stderr=")), "0", "{run}");
    }
    assert_eq!(status("py3"), "3", "sys.exit(3) is the sandbox's status");
    assert_eq!(line(out, "py3 "), "leaving restored=1");
    assert_eq!(line(out, "DEBIAN_DISKS "), "2");
}

#[test]
fn concurrent_first_runs_of_an_image_build_its_disk_once() {
    let tmp = TempDir::new("image-concurrent");
    let image = tmp.0.join("image");
    let manifest = busybox_image(&image);
    let cache = tmp.0.join("cache");
    let kernel = tmp.write("vmlinux", b"not a kernel");
    let initramfs = tmp.write("initramfs", b"not an initramfs");
    let mkfs = program("mkfs.ext4");
    let path = format!(
        "{}:/usr/sbin:/usr/bin:/sbin:/bin",
        mkfs.parent().unwrap().display()
    );
    let runs: Vec<_> = (0..4)
        .map(|_| {
            Command::new(flint_bin())
                .env("FLINT_CACHE", &cache)
                .env("PATH", &path)
                .env("FLINT_LOG", "debug")
                .args(["run", "--cold", "--kernel"])
                .arg(&kernel)
                .arg("--initramfs")
                .arg(&initramfs)
                .arg("--image")
                .arg(&image)
                .args(["--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut built = 0;
    for run in runs {
        let out = run.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Each got as far as the kernel, with the disk ready.
        assert_eq!(out.status.code(), Some(125), "{stderr}");
        assert!(stderr.contains("neither an ELF vmlinux"), "{stderr}");
        built += stderr.matches("disk with").count();
    }
    assert_eq!(
        built, 1,
        "one run builds the disk, the others wait and use it"
    );
    let disks = cache.join("images/disks");
    assert_eq!(
        files_in(&disks),
        [
            format!("{manifest}.etc"),
            format!("{manifest}.ext4"),
            format!("{manifest}.lock")
        ]
    );
    assert!(files_in(&cache.join("images/tmp")).is_empty());
    assert_eq!(
        files_in(&cache.join("images/store/images")),
        [format!("{manifest}.json")]
    );
}

/// A small image of one layer, sharing no blob with the busybox image.
fn small_image(dir: &Path) -> String {
    let mut layer = Layer::new();
    layer
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("hello", 0o644, b"small\n");
    let config = serde_json::json!({ "config": { "Cmd": ["/hello"] } });
    oci_layout(dir, &[layer.bytes()], config)
}

/// `flint image ARGS` with the cache at `cache`: its exit status, stdout and stderr.
fn flint_image(cache: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    flint_image_env(cache, &[], args)
}

/// [`flint_image`] with environment variables `env` set too.
fn flint_image_env(
    cache: &Path,
    env: &[(&str, &Path)],
    args: &[&str],
) -> (Option<i32>, String, String) {
    let out = Command::new(flint_bin())
        .env("FLINT_CACHE", cache)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .arg("image")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run flint image");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `flint image ARGS` succeeds with nothing on stderr; its stdout.
fn image_ok(cache: &Path, args: &[&str]) -> String {
    let (code, out, err) = flint_image(cache, args);
    assert_eq!(code, Some(0), "flint image {args:?}: {out}{err}");
    assert_eq!(err, "", "flint image {args:?}");
    out
}

/// `flint image ARGS` fails with status 1, nothing on stdout and one `flint: error:` line
/// on stderr that contains `needle`.
fn image_fails(cache: &Path, args: &[&str], needle: &str) {
    let (code, out, err) = flint_image(cache, args);
    assert_eq!(code, Some(1), "flint image {args:?}: {out}{err}");
    assert_eq!(out, "", "flint image {args:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "flint image {args:?}: {err}");
    assert!(
        lines[0].starts_with("flint: error: ") && lines[0].contains(needle),
        "flint image {args:?}: {err}"
    );
}

#[test]
fn image_commands_pull_list_remove_and_prune_the_cache() {
    let tmp = TempDir::new("image-commands");
    let busybox_dir = tmp.0.join("busybox");
    let busybox = busybox_image(&busybox_dir);
    let small_dir = tmp.0.join("small");
    let small = small_image(&small_dir);
    let small_tar = tmp.0.join("small.tar");
    oci_archive(&small_dir, &small_tar);
    let cache = tmp.0.join("cache");
    let disks = cache.join("images/disks");
    let records = cache.join("images/store/images");
    let blobs = cache.join("images/store/blobs/sha256");
    let inode =
        |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());

    // Pull: the image's disk built as a run builds it, the manifest digest printed; pulling
    // again finds it in the cache and builds nothing.
    let busybox_path = busybox_dir.to_str().unwrap();
    assert_eq!(
        image_ok(&cache, &["pull", busybox_path]),
        format!("sha256:{busybox}\n")
    );
    let disk = disks.join(format!("{busybox}.ext4"));
    let built = inode(&disk);
    assert!(disks.join(format!("{busybox}.etc/etc/passwd")).is_file());
    assert_eq!(
        image_ok(&cache, &["pull", busybox_path]),
        format!("sha256:{busybox}\n")
    );
    assert_eq!(inode(&disk), built, "a second pull builds nothing");
    let busybox_blobs = files_in(&blobs);
    assert_eq!(busybox_blobs.len(), 5, "manifest, config and three layers");
    let small_tar_path = small_tar.to_str().unwrap();
    assert_eq!(
        image_ok(&cache, &["pull", small_tar_path]),
        format!("sha256:{small}\n")
    );

    // ls: both images, by short digest, with their sizes and names; -q: the digests.
    let listing = image_ok(&cache, &["ls"]);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 3, "{listing}");
    assert!(lines[0].starts_with("DIGEST"), "{listing}");
    for (digest, name) in [(&busybox, &busybox_dir), (&small, &small_tar)] {
        let row = lines
            .iter()
            .find(|l| l.starts_with(&digest[..12]))
            .unwrap_or_else(|| panic!("no {digest} in\n{listing}"));
        let name = std::fs::canonicalize(name).unwrap();
        assert!(row.ends_with(name.to_str().unwrap()), "{listing}");
        // Both sizes are known: the blobs' and the built disk's.
        assert_eq!(row.matches("iB").count(), 2, "{listing}");
    }
    let mut digests = [format!("sha256:{busybox}"), format!("sha256:{small}")];
    digests.sort();
    assert_eq!(
        image_ok(&cache, &["ls", "-q"]),
        format!("{}\n{}\n", digests[0], digests[1])
    );

    // An image a sandbox holds (as `flint run --image` holds it while it runs) is not removed.
    let lock = std::fs::File::open(disks.join(format!("{busybox}.lock"))).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&lock);
    // SAFETY: flock on a descriptor this test owns.
    let locked = unsafe { libc::flock(fd, libc::LOCK_SH) };
    assert_eq!(locked, 0);
    image_fails(&cache, &["rm", &busybox[..12]], "is in use");
    assert!(disk.is_file());
    drop(lock);

    // rm by the name it was imported as (a relative path works too): record, disk, account
    // files and lock file go; the other image stays whole.
    let relative = small_tar
        .strip_prefix(std::env::current_dir().unwrap())
        .map(Path::to_path_buf)
        .unwrap_or(small_tar.clone());
    assert_eq!(
        image_ok(&cache, &["rm", relative.to_str().unwrap()]),
        format!("sha256:{small}\n")
    );
    let mut left = vec![
        format!("{busybox}.etc"),
        format!("{busybox}.ext4"),
        format!("{busybox}.lock"),
    ];
    assert_eq!(files_in(&disks), left);
    assert_eq!(files_in(&records), [format!("{busybox}.json")]);
    image_fails(&cache, &["rm", small_tar_path], "no image");

    // prune: the removed image's three blobs go, the other image's stay.
    let freed = image_ok(&cache, &["prune"]);
    assert!(
        freed.starts_with("freed 3 blobs (") && freed.ends_with(" and 0 disks (0 B)\n"),
        "{freed}"
    );
    assert_eq!(files_in(&blobs), busybox_blobs);
    assert_eq!(
        image_ok(&cache, &["prune"]),
        "freed 0 blobs (0 B) and 0 disks (0 B)\n"
    );

    // A disk whose image record is gone is pruned too.
    image_ok(&cache, &["pull", small_tar_path]);
    std::fs::remove_file(records.join(format!("{small}.json"))).unwrap();
    let freed = image_ok(&cache, &["prune"]);
    assert!(
        freed.starts_with("freed 3 blobs (") && freed.contains(" and 1 disk ("),
        "{freed}"
    );
    assert_eq!(files_in(&disks), left);

    // rm by digest: the cache is empty; prune frees the blobs. The sandbox templates made
    // with its disk go too (no run could restore them: a new disk makes a new key).
    let snapshots = cache.join("sandbox/snapshots");
    for (name, drive) in [("t-busybox", &disk), ("t-other", &disks.join("other.ext4"))] {
        std::fs::create_dir_all(snapshots.join(name)).unwrap();
        let state = serde_json::json!({ "config": { "drives": [{ "path": drive }] } });
        std::fs::write(snapshots.join(name).join("state.json"), state.to_string()).unwrap();
    }
    assert_eq!(
        image_ok(&cache, &["rm", &format!("sha256:{busybox}")]),
        format!("sha256:{busybox}\n")
    );
    left.clear();
    assert_eq!(files_in(&disks), left);
    assert_eq!(files_in(&snapshots), ["t-other"]);
    assert_eq!(image_ok(&cache, &["ls"]), "DIGEST  SIZE  DISK  NAMES\n");
    assert_eq!(image_ok(&cache, &["ls", "--quiet"]), "");
    assert!(image_ok(&cache, &["prune"]).starts_with("freed 5 blobs ("));
    assert!(files_in(&blobs).is_empty());
    assert!(files_in(&cache.join("images/tmp")).is_empty());
}

#[test]
fn image_command_errors_are_one_sentence() {
    let tmp = TempDir::new("image-errors");
    let cache = tmp.0.join("cache");
    image_fails(
        &cache,
        &[],
        "'flint image' needs a command: pull, ls, rm or prune",
    );
    image_fails(&cache, &["frob"], "unknown command 'image frob'");
    image_fails(&cache, &["rm"], "'flint image rm' needs");
    image_fails(&cache, &["rm", "nope"], "no image 'nope' in the cache");
    // A registry that does not answer (a loopback port nothing listens on).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = format!("127.0.0.1:{port}");
    image_fails(
        &cache,
        &[
            "pull",
            &format!("{unreachable}/app:1"),
            "--insecure-registry",
            &unreachable,
        ],
        &format!("cannot reach registry {unreachable}"),
    );
    image_fails(
        &cache,
        &["pull", "/no/such/image.tar"],
        "/no/such/image.tar: no such OCI layout directory",
    );
    // A refused image leaves nothing behind.
    let hostile = tmp.0.join("hostile");
    hostile_image(&hostile);
    image_fails(&cache, &["pull", hostile.to_str().unwrap()], "");
    assert!(files_in(&cache.join("images/disks")).is_empty());
    assert!(files_in(&cache.join("images/store/images")).is_empty());
}

// Registry pulls, against a real registry (Debian's docker-registry) on a loopback port, filled
// by skopeo. These run on this host without a guest.

/// A tool the registry tests need, from its Debian package; missing, the test fails.
fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is missing: install {package} (resources/run-tests.sh does)");
}

/// A loopback port free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A `docker-registry` serving `root` on a loopback port, with basic auth from `htpasswd`
/// when given; stopped when dropped.
struct Registry {
    child: std::process::Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    root: PathBuf,
}

impl Registry {
    fn start(dir: &Path, htpasswd: Option<&Path>) -> Registry {
        let binary = tool("docker-registry", "docker-registry");
        let root = dir.join("storage");
        std::fs::create_dir_all(&root).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            root.display()
        );
        if let Some(file) = htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: flint-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child, addr, root };
        let began = std::time::Instant::now();
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                began.elapsed() < std::time::Duration::from_secs(20),
                "docker-registry did not listen on {}",
                registry.addr
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        registry
    }

    /// Push the OCI layout at `layout` as `name:tag`; with `all`, the index it names `all`
    /// and every image of it.
    fn push(&self, layout: &Path, name: &str, creds: Option<&str>, all: bool) {
        let mut cmd = Command::new(tool("skopeo", "skopeo"));
        cmd.args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        let source = if all { ":all" } else { "" };
        let out = cmd
            .arg(format!("oci:{}{source}", layout.display()))
            .arg(format!("docker://{}/{name}", self.addr))
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy to {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The manifest or index the registry serves for `name:tag`, and its digest (hex).
    fn manifest(&self, name: &str) -> (serde_json::Value, String) {
        let out = Command::new(tool("skopeo", "skopeo"))
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                "--creds",
                "flint:s3cret",
            ])
            .arg(format!("docker://{}/{name}", self.addr))
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            serde_json::from_slice(&out.stdout).unwrap(),
            sha256_hex(&out.stdout),
        )
    }

    /// The file the registry keeps the blob `hex` in.
    fn blob(&self, hex: &str) -> PathBuf {
        self.root
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image of one layer with `size` bytes of data no other image has.
fn big_image(dir: &Path, tag: &str, size: usize) -> String {
    let mut data = Vec::with_capacity(size);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ tag.len() as u64;
    for b in tag.bytes() {
        x = x.wrapping_mul(31).wrapping_add(u64::from(b));
    }
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    let mut layer = Layer::new();
    layer
        .dir("data", 0o755)
        .file("data/blob", 0o644, &data)
        .file("data/tag", 0o644, tag.as_bytes());
    let config = serde_json::json!({ "config": { "Cmd": ["/data/tag"] } });
    oci_layout(dir, &[layer.bytes()], config)
}

/// The blobs and records the cache at `cache` has, and its partial downloads.
fn cache_contents(cache: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    (
        files_in(&cache.join("images/store/blobs/sha256")),
        files_in(&cache.join("images/store/images")),
        files_in(&cache.join("images/store/tmp")),
    )
}

/// A TCP relay to `target` that, while `cut` is set, closes a connection 256 KiB into the
/// answer to a request for the blob `hex`; it counts the requests that asked for a range.
struct CuttingProxy {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ranges: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    fn start(target: &str, hex: &str) -> CuttingProxy {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(true));
        let ranges = Arc::new(AtomicUsize::new(0));
        let (target, needle) = (target.to_string(), format!("blobs/sha256:{hex}"));
        let (cut2, ranges2) = (cut.clone(), ranges.clone());
        // The thread ends with the test process; each connection's relays end with it.
        std::thread::spawn(move || {
            for client in listener.incoming().take(64) {
                let Ok(client) = client else { break };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let asked = Arc::new(AtomicBool::new(false));
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (asked_up, ranges_up, needle) =
                    (asked.clone(), ranges2.clone(), needle.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = std::io::Read::read(&mut c_in, &mut buf) {
                        if n == 0 {
                            break;
                        }
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if text.contains(&needle) {
                            asked_up.store(true, Ordering::SeqCst);
                            if text.to_ascii_lowercase().contains("range: bytes=") {
                                ranges_up.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Both);
                });
                let cut = cut2.clone();
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    let mut sent = 0usize;
                    while let Ok(n) = std::io::Read::read(&mut s_in, &mut buf) {
                        if n == 0 {
                            break;
                        }
                        if asked.load(Ordering::SeqCst) && cut.load(Ordering::SeqCst) {
                            sent += n;
                            if sent > 256 << 10 {
                                break;
                            }
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                    let _ = s_in.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { addr, cut, ranges }
    }
}

#[test]
fn images_are_pulled_from_a_registry_verified_and_resumed() {
    let tmp = TempDir::new("image-registry");
    let registry = Registry::start(&tmp.0.join("registry"), None);
    let reg_addr = registry.addr.clone();
    let reg = reg_addr.as_str();
    let busybox_dir = tmp.0.join("busybox");
    let busybox = busybox_image(&busybox_dir);
    registry.push(&busybox_dir, "busybox:1", None, false);
    let cache = tmp.0.join("cache");
    let no_creds = tmp.0.join("docker-empty");
    std::fs::create_dir_all(&no_creds).unwrap();
    let env = [("DOCKER_CONFIG", no_creds.as_path())];
    let pull = |reference: &str| -> (Option<i32>, String, String) {
        flint_image_env(
            &cache,
            &env,
            &["pull", reference, "--insecure-registry", reg],
        )
    };
    let pull_fails = |reference: &str, needle: &str| {
        let (code, out, err) = pull(reference);
        assert_eq!(code, Some(1), "pull {reference}: {out}{err}");
        assert_eq!(out, "");
        assert_eq!(err.lines().count(), 1, "pull {reference}: {err}");
        assert!(
            err.starts_with("flint: error: ") && err.contains(needle),
            "pull {reference}: {err}"
        );
    };

    // A pull: the manifest the registry serves (skopeo compressed the layers with gzip), its
    // disk built, the reference its name; quiet off a terminal.
    let (code, out, err) = pull(&format!("{reg}/busybox:1"));
    assert_eq!((code, err.as_str()), (Some(0), ""), "{out}{err}");
    let (served, busybox_remote) = registry.manifest("busybox:1");
    assert_eq!(out, format!("sha256:{busybox_remote}\n"));
    assert_eq!(
        served["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let disks = cache.join("images/disks");
    let disk = disks.join(format!("{busybox_remote}.ext4"));
    assert!(disk.is_file());
    assert_eq!(debugfs(&disk, "cat /app/file"), "hello from the image\n");
    let listing = image_ok(&cache, &["ls"]);
    assert!(
        listing.contains(&format!("{}  ", &busybox_remote[..12]))
            && listing.contains(&format!("{reg}/busybox:1")),
        "{listing}"
    );
    // The same disk as from the layout: the same files.
    let local_cache = tmp.0.join("local-cache");
    image_ok(&local_cache, &["pull", busybox_dir.to_str().unwrap()]);
    let local_disk = local_cache.join(format!("images/disks/{busybox}.ext4"));
    for request in ["ls -l /app", "ls -l /usr/bin", "stat /usr/bin/suidbox"] {
        let strip = |t: String| -> String {
            t.lines()
                .filter(|l| {
                    !["time:", "Generation", "checksum"]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(debugfs(&disk, request)),
            strip(debugfs(&local_disk, request)),
            "{request}"
        );
    }

    // On a terminal: one line, redrawn, with the bytes and layers.
    let command = format!(
        "FLINT_CACHE={} DOCKER_CONFIG={} {} image pull {reg}/busybox:1 --insecure-registry {reg}",
        cache.display(),
        no_creds.display(),
        flint_bin().display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    let shown = String::from_utf8_lossy(&out.stdout);
    let last = shown
        .split(['\r', '\n'])
        .rfind(|l| l.starts_with("flint: pulling"))
        .unwrap_or_else(|| panic!("no progress in {shown:?}"));
    assert!(
        last.starts_with(&format!("flint: pulling {reg}/busybox:1: "))
            && last.contains(" MiB, 3 of 3 layers"),
        "{shown:?}"
    );

    // A multi-platform index resolves to linux/amd64.
    let multi_dir = tmp.0.join("multi");
    let other = small_image(&multi_dir);
    let other_size = std::fs::metadata(multi_dir.join("blobs/sha256").join(&other))
        .unwrap()
        .len();
    let amd64 = big_image(&multi_dir, "amd64", 4096);
    let amd64_size = std::fs::metadata(multi_dir.join("blobs/sha256").join(&amd64))
        .unwrap()
        .len();
    let entry = |hex: &str, size: u64, arch: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": size,
            "platform": { "architecture": arch, "os": "linux" },
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&other, other_size, "arm64"), entry(&amd64, amd64_size, "amd64")],
    });
    let index = index.to_string();
    let index_hex = sha256_hex(index.as_bytes());
    std::fs::write(multi_dir.join("blobs/sha256").join(&index_hex), &index).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{index_hex}"),
            "size": index.len(),
            "annotations": { "org.opencontainers.image.ref.name": "all" },
        }],
    });
    std::fs::write(multi_dir.join("index.json"), top.to_string()).unwrap();
    registry.push(&multi_dir, "multi:1", None, true);
    let (index, _) = registry.manifest("multi:1");
    let amd64_remote = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, err) = pull(&format!("{reg}/multi:1"));
    assert_eq!(
        (code, out, err),
        (Some(0), format!("{amd64_remote}\n"), String::new())
    );

    // Unknown images and tags, and plain HTTP without --insecure-registry: one sentence.
    pull_fails(
        &format!("{reg}/busybox:2"),
        &format!("registry {reg} has no image busybox:2 (no such repository, tag or digest)"),
    );
    pull_fails(&format!("{reg}/nothing:1"), "has no image nothing:1");
    image_fails(
        &cache,
        &["pull", &format!("{reg}/busybox:1")],
        &format!("registry {reg} does not answer over HTTPS"),
    );

    // A layer that does not match its digest: refused, nothing of it cached.
    let before = cache_contents(&cache);
    let tampered_dir = tmp.0.join("tampered");
    big_image(&tampered_dir, "tampered", 100_000);
    registry.push(&tampered_dir, "tampered:1", None, false);
    let (served, _) = registry.manifest("tampered:1");
    let layer = served["layers"][0]["digest"].as_str().unwrap()[7..].to_string();
    let stored = registry.blob(&layer);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[50_000] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    pull_fails(
        &format!("{reg}/tampered:1"),
        &format!("layer sha256:{layer} from registry {reg} does not match its digest"),
    );
    let (blobs, records, partials) = cache_contents(&cache);
    assert!(
        !blobs.contains(&layer),
        "the mismatching layer is not cached"
    );
    assert_eq!(records, before.1, "no image recorded");
    assert!(partials.is_empty(), "{partials:?}");

    // A hostile layer: refused by unpacking; no record, none of its blobs.
    let hostile_dir = tmp.0.join("hostile");
    hostile_image(&hostile_dir);
    registry.push(&hostile_dir, "hostile:1", None, false);
    pull_fails(&format!("{reg}/hostile:1"), "");
    let (served, hostile_remote) = registry.manifest("hostile:1");
    let (blobs, records, _) = cache_contents(&cache);
    assert_eq!(records, before.1);
    let hostile_layer = &served["layers"][0]["digest"].as_str().unwrap()[7..];
    assert!(
        !blobs.iter().any(|b| b == hostile_layer),
        "the hostile layer is cached"
    );
    assert!(!blobs.contains(&hostile_remote));
    assert!(files_in(&disks)
        .iter()
        .all(|f| !f.starts_with(&hostile_remote)));

    // A download cut short (each of the three tries a pull makes, the second and third
    // resuming with a range request): one sentence, no blob nor record, the partial download
    // kept; the next pull resumes it with a range request and succeeds.
    let cut_dir = tmp.0.join("cut");
    big_image(&cut_dir, "cut", 2 << 20);
    registry.push(&cut_dir, "cut:1", None, false);
    let (served, cut_remote) = registry.manifest("cut:1");
    let cut_layer = served["layers"][0]["digest"].as_str().unwrap()[7..].to_string();
    let proxy = CuttingProxy::start(reg, &cut_layer);
    let via = proxy.addr.as_str();
    let pull_via = || {
        flint_image_env(
            &cache,
            &env,
            &["pull", &format!("{via}/cut:1"), "--insecure-registry", via],
        )
    };
    let (code, out, err) = pull_via();
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "the download of layer sha256:{cut_layer} from registry {via} was cut short"
        )),
        "{err}"
    );
    let (blobs, records, partials) = cache_contents(&cache);
    assert!(!blobs.contains(&cut_layer));
    assert_eq!(records, before.1);
    assert_eq!(partials, [format!("partial-{cut_layer}")]);
    assert!(!image_ok(&cache, &["ls"]).contains("cut:1"));
    proxy.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    let (code, out, err) = pull_via();
    assert_eq!(
        (code, out, err),
        (Some(0), format!("sha256:{cut_remote}\n"), String::new())
    );
    assert_eq!(
        proxy.ranges.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "two tries of the first pull and the second pull resumed the layer"
    );
    let (blobs, _, partials) = cache_contents(&cache);
    assert!(blobs.contains(&cut_layer) && partials.is_empty());
    assert!(image_ok(&cache, &["ls"]).contains(&format!("{via}/cut:1")));

    // A tag that moved: pulling it again gets the new image and moves the name to it.
    registry.push(&cut_dir, "busybox:1", None, false);
    let (code, out, err) = pull(&format!("{reg}/busybox:1"));
    assert_eq!(
        (code, out, err),
        (Some(0), format!("sha256:{cut_remote}\n"), String::new())
    );
    let listing = image_ok(&cache, &["ls"]);
    let named: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains(&format!("{reg}/busybox:1")))
        .collect();
    assert_eq!(named.len(), 1, "{listing}");
    assert!(named[0].starts_with(&cut_remote[..12]), "{listing}");

    // `flint run --image` of a pulled reference uses the cache without asking the registry
    // (stopped here): it gets as far as the kernel, which is not one; a reference never
    // pulled needs the registry.
    drop(registry);
    let kernel = tmp.write("vmlinux", b"not a kernel");
    let initramfs = tmp.write("initramfs", b"not an initramfs");
    let run = |reference: &str| {
        let out = Command::new(flint_bin())
            .env("FLINT_CACHE", &cache)
            .env("DOCKER_CONFIG", &no_creds)
            .args(["run", "--cold", "--kernel"])
            .arg(&kernel)
            .arg("--initramfs")
            .arg(&initramfs)
            .args([
                "--image",
                reference,
                "--insecure-registry",
                reg,
                "--",
                "true",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&format!("{reg}/busybox:1"));
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("neither an ELF vmlinux"), "{err}");
    let (code, err) = run(&format!("{reg}/busybox:9"));
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains(&format!("cannot reach registry {reg}")),
        "{err}"
    );
}

#[test]
fn registry_credentials_come_from_the_docker_configuration() {
    let tmp = TempDir::new("image-registry-auth");
    let out = Command::new(tool("htpasswd", "apache2-utils"))
        .args(["-Bbn", "flint", "s3cret"])
        .output()
        .expect("run htpasswd");
    assert!(out.status.success());
    let htpasswd = tmp.write("htpasswd", &out.stdout);
    let registry = Registry::start(&tmp.0.join("registry"), Some(&htpasswd));
    let reg = registry.addr.as_str();
    let image_dir = tmp.0.join("small");
    small_image(&image_dir);
    registry.push(&image_dir, "private/small:1", Some("flint:s3cret"), false);
    let cache = tmp.0.join("cache");
    let config = |name: &str, user_pass: &str| -> PathBuf {
        use base64::Engine as _;
        let dir = tmp.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
        let json = serde_json::json!({ "auths": { reg: { "auth": auth } } });
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        dir
    };
    let reference = format!("{reg}/private/small:1");
    let pull = |dir: &Path| {
        flint_image_env(
            &cache,
            &[("DOCKER_CONFIG", dir)],
            &["pull", &reference, "--insecure-registry", reg],
        )
    };
    let refused = |dir: &Path, needle: &str| {
        let (code, out, err) = pull(dir);
        assert_eq!(code, Some(1), "{out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("registry {reg} refused access to private/small"))
                && err.contains(needle),
            "{err}"
        );
    };
    let empty = tmp.0.join("none");
    std::fs::create_dir_all(&empty).unwrap();
    refused(&empty, "without credentials");
    refused(
        &config("wrong", "flint:wrong"),
        "with the credentials of \"flint\"",
    );
    assert_eq!(image_ok(&cache, &["ls", "-q"]), "");
    let (code, out, err) = pull(&config("right", "flint:s3cret"));
    let (_, served) = registry.manifest("private/small:1");
    assert_eq!(
        (code, out, err),
        (Some(0), format!("sha256:{served}\n"), String::new())
    );
}
