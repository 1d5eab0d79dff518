//! Unpacking tests: they make device nodes and set ownership, so they run as root.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tar::EntryType;

use super::*;
use crate::testutil::{gzip, zstd, Tar, CAP_NET_RAW, MTIME};

fn input(name: &str, data: Vec<u8>, compression: Compression) -> LayerInput<'static> {
    LayerInput {
        name: name.to_string(),
        reader: Box::new(io::Cursor::new(data)),
        compression,
        diff_id: None,
    }
}

fn plain(name: &str, data: Vec<u8>) -> LayerInput<'static> {
    input(name, data, Compression::None)
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rfs::lgetxattr(path, name, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn base_layer() -> Vec<u8> {
    Tar::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("dev", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("bin/busybox", 0o755, b"#!busybox")
        .file("bin/su", 0o4755, b"su")
        .file("bin/wall", 0o2755, b"wall")
        .symlink("bin/sh", "busybox")
        .hardlink("bin/ls", "bin/busybox")
        .file_as("home/user/notes", 0o600, 1000, 1001, b"mine")
        .node(EntryType::Char, "dev/null", 0o666, 1, 3)
        .node(EntryType::Fifo, "run/fifo", 0o620, 0, 0)
        .pax(&[
            ("SCHILY.xattr.security.capability", &CAP_NET_RAW),
            ("SCHILY.xattr.user.origin", b"layer1"),
        ])
        .file("bin/ping", 0o755, b"ping")
        .pax(&[("SCHILY.xattr.trusted.overlay.opaque", b"y")])
        .file("bin/other", 0o755, b"other")
        .dir("usr/share/doc", 0o755)
        .file("usr/share/doc/a", 0o644, b"a")
        .file("usr/share/doc/b", 0o644, b"b")
        .dir("var/cache", 0o750)
        .file("var/cache/old1", 0o644, b"1")
        .dir("var/cache/olddir", 0o755)
        .file("var/cache/olddir/x", 0o644, b"x")
        .file("replaced", 0o644, b"file")
        .dir("dir-to-file", 0o755)
        .file("dir-to-file/inner", 0o644, b"inner")
        .bytes()
}

fn upper_layer() -> Vec<u8> {
    Tar::new()
        .file("usr/share/doc/.wh.a", 0o644, b"")
        .dir("var/cache", 0o700)
        .file("var/cache/kept", 0o644, b"made before the marker")
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/new", 0o644, b"new")
        .dir("replaced", 0o711)
        .file("dir-to-file", 0o600, b"now a file")
        .file("bin/busybox", 0o755, b"#!busybox v2")
        .bytes()
}

#[test]
fn layers_apply_in_order_with_whiteouts_links_nodes_modes_owners_and_capabilities() {
    let tmp = crate::testutil::tempdir();
    let root = tmp.path().join("rootfs");
    let stats = unpack(
        [
            input("base", gzip(&base_layer()), Compression::Gzip),
            input("upper", zstd(&upper_layer()), Compression::Zstd),
        ],
        &root,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(stats.layers, 2);

    let md = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    // Contents, later layers winning.
    assert_eq!(
        fs::read(root.join("etc/passwd")).unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(fs::read(root.join("usr/share/doc/b")).unwrap(), b"b");
    // Modes with setuid and setgid bits, ownership.
    assert_eq!(md("bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(md("bin/wall").mode() & 0o7777, 0o2755);
    assert_eq!(
        md("var/cache").mode() & 0o7777,
        0o700,
        "the upper layer's directory mode applies"
    );
    assert_eq!(md("home/user/notes").mode() & 0o7777, 0o600);
    assert_eq!(
        (md("home/user/notes").uid(), md("home/user/notes").gid()),
        (1000, 1001)
    );
    assert_eq!(
        md("home").mode() & 0o7777,
        0o755,
        "missing parents are made 0755"
    );
    assert_eq!(md("etc/passwd").mtime(), MTIME as i64);
    assert_eq!(
        md("etc").mtime(),
        MTIME as i64,
        "directory times are set after their contents"
    );
    // Symbolic links as stored, hard links sharing the inode of the original (the original
    // replaced in a later layer keeps the link's old content, as with overlay layers).
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(fs::read(root.join("bin/ls")).unwrap(), b"#!busybox");
    assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), b"#!busybox v2");
    // Device nodes and fifos.
    assert!(md("dev/null").file_type().is_char_device());
    assert_eq!(md("dev/null").rdev(), rfs::makedev(1, 3));
    assert_eq!(md("dev/null").mode() & 0o7777, 0o666);
    assert!(md("run/fifo").file_type().is_fifo());
    assert_eq!(md("run/fifo").mode() & 0o7777, 0o620);
    // File capabilities and user xattrs survive; trusted.* is not taken from an image.
    assert_eq!(
        xattr(&root.join("bin/ping"), "security.capability").as_deref(),
        Some(&CAP_NET_RAW[..])
    );
    assert_eq!(
        xattr(&root.join("bin/ping"), "user.origin").as_deref(),
        Some(&b"layer1"[..])
    );
    assert_eq!(
        xattr(&root.join("bin/other"), "trusted.overlay.opaque"),
        None
    );
    // Whiteouts remove, and are not themselves unpacked.
    assert!(!root.join("usr/share/doc/a").exists());
    assert!(!root.join("usr/share/doc/.wh.a").exists());
    // The opaque directory lost what lower layers put there, not what its own layer did.
    let mut cache: Vec<String> = fs::read_dir(root.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    cache.sort();
    assert_eq!(cache, ["kept", "new"]);
    // A directory replaces a file and a file replaces a directory.
    assert!(md("replaced").is_dir());
    assert_eq!(md("replaced").mode() & 0o7777, 0o711);
    assert_eq!(fs::read(root.join("dir-to-file")).unwrap(), b"now a file");
}

/// Unpacks `layers` next to a sentinel directory and checks that it is refused with `expect`,
/// that the target is gone and that nothing appeared outside it.
fn refused(layers: Vec<Vec<u8>>, limits: Limits, expect: fn(&Refusal) -> bool) -> String {
    let tmp = crate::testutil::tempdir();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    let root = tmp.path().join("a/b/rootfs");
    fs::create_dir_all(root.parent().unwrap()).unwrap();
    fs::set_permissions(root.parent().unwrap(), fs::Permissions::from_mode(0o700)).unwrap();
    let inputs = layers
        .into_iter()
        .enumerate()
        .map(|(i, l)| plain(&format!("layer{i}"), l));
    let err = unpack(inputs, &root, &limits).unwrap_err();
    match &err {
        UnpackError::Entry { reason, .. } => assert!(expect(reason), "unexpected refusal: {err}"),
        other => panic!("expected an entry refusal, got: {other}"),
    }
    assert!(!root.exists(), "the partial target is removed");
    assert_eq!(
        fs::read_dir(root.parent().unwrap()).unwrap().count(),
        0,
        "nothing next to the target"
    );
    assert_eq!(fs::read_dir(tmp.path().join("a")).unwrap().count(), 1);
    let mut outside_names: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    outside_names.sort();
    assert_eq!(outside_names, ["secret"], "nothing written outside");
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "one sentence: {msg}");
    msg
}

#[test]
fn path_traversal_is_refused() {
    let msg = refused(
        vec![Tar::new()
            .file("ok", 0o644, b"")
            .file("a/../../../outside/evil", 0o644, b"x")
            .bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::DotDot),
    );
    assert_eq!(msg, "refusing entry \"a/../../../outside/evil\" of layer 1 (layer0): its path has a .. component");
}

#[test]
fn absolute_paths_are_refused() {
    refused(
        vec![Tar::new().file("/tmp/evil", 0o644, b"x").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::Absolute),
    );
}

#[test]
fn writing_through_a_symlink_is_refused() {
    for target in ["../../../outside", "/", "."] {
        let msg = refused(
            vec![Tar::new()
                .symlink("evil", target)
                .file("evil/secret", 0o644, b"overwritten")
                .bytes()],
            Limits::default(),
            |r| matches!(r, Refusal::ThroughLink(n) if n == "evil"),
        );
        assert!(msg.contains("which is a symbolic link"), "{msg}");
    }
}

#[test]
fn a_symlinked_directory_from_a_lower_layer_is_not_followed() {
    refused(
        vec![
            Tar::new()
                .dir("usr", 0o755)
                .symlink("usr/lib", "../../../../outside")
                .bytes(),
            Tar::new()
                .file("usr/lib/secret", 0o644, b"overwritten")
                .bytes(),
        ],
        Limits::default(),
        |r| matches!(r, Refusal::ThroughLink(n) if n == "lib"),
    );
    // Nor is a whiteout or a device node placed through one.
    refused(
        vec![Tar::new()
            .symlink("l", "../../../outside")
            .file("l/.wh.secret", 0o644, b"")
            .bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::ThroughLink(_)),
    );
    refused(
        vec![Tar::new()
            .symlink("l", "../../../outside")
            .node(EntryType::Fifo, "l/fifo", 0o644, 0, 0)
            .bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::ThroughLink(_)),
    );
}

#[test]
fn hard_links_out_of_the_tree_are_refused() {
    refused(
        vec![Tar::new().hardlink("h", "../../../outside/secret").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::LinkTargetPath(_)),
    );
    refused(
        vec![Tar::new().hardlink("h", "/etc/passwd").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::LinkTargetPath(_)),
    );
    refused(
        vec![Tar::new()
            .symlink("s", "../../../outside")
            .hardlink("h", "s/secret")
            .bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::LinkTarget(_)),
    );
    refused(
        vec![Tar::new().hardlink("h", "missing").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::LinkTarget(_)),
    );
    refused(
        vec![Tar::new().dir("d", 0o755).hardlink("h", "d").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::LinkTarget(_)),
    );
}

#[test]
fn a_symlink_over_an_existing_file_replaces_it_without_following() {
    let tmp = crate::testutil::tempdir();
    let root = tmp.path().join("rootfs");
    fs::write(tmp.path().join("host"), b"host").unwrap();
    unpack(
        [
            plain("1", Tar::new().symlink("f", "../host").bytes()),
            plain("2", Tar::new().file("f", 0o644, b"image").bytes()),
        ],
        &root,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(fs::read(tmp.path().join("host")).unwrap(), b"host");
    assert_eq!(fs::read(root.join("f")).unwrap(), b"image");
    assert!(fs::symlink_metadata(root.join("f")).unwrap().is_file());
}

#[test]
fn byte_bombs_are_refused_at_the_limit() {
    let limits = Limits {
        max_bytes: 1 << 20,
        ..Limits::default()
    };
    // Real data, compressed to almost nothing.
    let big = vec![0u8; 2 << 20];
    let layer = Tar::new()
        .file("small", 0o644, &[1; 1000])
        .file("big", 0o644, &big)
        .bytes();
    let tmp = crate::testutil::tempdir();
    let root = tmp.path().join("rootfs");
    let err = unpack(
        [input("bomb", gzip(&layer), Compression::Gzip)],
        &root,
        &limits,
    )
    .unwrap_err();
    assert!(
        matches!(&err, UnpackError::Entry { entry, reason: Refusal::Bytes(_), .. } if entry == "big"),
        "{err}"
    );
    assert!(!root.exists());
    assert_eq!(
        err.to_string(),
        "refusing entry \"big\" of layer 1 (bomb): the layers hold more than 1048576 bytes of files, the unpack limit"
    );
    // A header that claims a huge size is refused before anything is read.
    refused(
        vec![Tar::new().claim("huge", 1 << 40).bytes()],
        limits.clone(),
        |r| matches!(r, Refusal::Bytes(_)),
    );
    // The limit spans layers.
    let half = vec![7u8; 600 << 10];
    refused(
        vec![
            Tar::new().file("a", 0o644, &half).bytes(),
            Tar::new().file("b", 0o644, &half).bytes(),
        ],
        limits,
        |r| matches!(r, Refusal::Bytes(_)),
    );
}

#[test]
fn entry_path_and_metadata_limits_are_enforced() {
    let mut many = Tar::new();
    for i in 0..20 {
        many.file(&format!("f{i}"), 0o644, b"");
    }
    refused(
        vec![many.bytes()],
        Limits {
            max_entries: 10,
            ..Limits::default()
        },
        |r| matches!(r, Refusal::Entries(10)),
    );
    // Implicitly made parents count too.
    refused(
        vec![Tar::new().file("a/b/c/d/e/f", 0o644, b"").bytes()],
        Limits {
            max_entries: 3,
            ..Limits::default()
        },
        |r| matches!(r, Refusal::Entries(3)),
    );
    refused(
        vec![Tar::new().file("a/b/c/d/e", 0o644, b"").bytes()],
        Limits {
            max_depth: 4,
            ..Limits::default()
        },
        |r| matches!(r, Refusal::Depth(4)),
    );
    refused(
        vec![Tar::new().file(&"x".repeat(60), 0o644, b"").bytes()],
        Limits {
            max_path_len: 50,
            ..Limits::default()
        },
        |r| matches!(r, Refusal::PathLen(50)),
    );
    let huge_pax = vec![b'v'; 2 << 20];
    refused(
        vec![Tar::new()
            .pax(&[("SCHILY.xattr.user.big", &huge_pax)])
            .file("f", 0o644, b"")
            .bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::Metadata(_)),
    );
}

#[test]
fn bad_whiteouts_and_unknown_types_are_refused() {
    refused(
        vec![Tar::new().file(".wh.", 0o644, b"").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::BadWhiteout),
    );
    refused(
        vec![Tar::new().file("d/.wh...", 0o644, b"").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::BadWhiteout),
    );
    refused(
        vec![Tar::new()
            .node(EntryType::new(b'V'), "vol", 0o644, 0, 0)
            .bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::Type('V')),
    );
    refused(
        vec![Tar::new().file("./", 0o644, b"").bytes()],
        Limits::default(),
        |r| matches!(r, Refusal::Root),
    );
}

#[test]
fn a_diff_id_mismatch_is_refused_and_leaves_nothing() {
    let tmp = crate::testutil::tempdir();
    let root = tmp.path().join("rootfs");
    let layer = Tar::new().file("f", 0o644, b"x").bytes();
    let good = Digest::of(&layer);
    let wrong = Digest::of(b"something else");
    let mut l = input("l", gzip(&layer), Compression::Gzip);
    l.diff_id = Some(wrong.clone());
    let err = unpack([l], &root, &Limits::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("layer 1 (l) does not match its diff ID {wrong}: its content hashes to {good}")
    );
    assert!(!root.exists());
    let mut l = input("l", gzip(&layer), Compression::Gzip);
    l.diff_id = Some(good);
    unpack([l], &root, &Limits::default()).unwrap();
}

#[test]
fn an_existing_target_is_refused_and_kept() {
    let tmp = crate::testutil::tempdir();
    let target = tmp.path().join("existing");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("mine"), b"keep").unwrap();
    let err = unpack(
        [plain("l", Tar::new().file("f", 0o644, b"").bytes())],
        &target,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::TargetExists { .. }), "{err}");
    assert_eq!(fs::read(target.join("mine")).unwrap(), b"keep");
}

#[test]
fn corrupt_streams_are_refused_and_leave_nothing() {
    let tmp = crate::testutil::tempdir();
    let root = tmp.path().join("rootfs");
    let mut gz = gzip(&Tar::new().file("f", 0o644, &[5; 10000]).bytes());
    gz.truncate(gz.len() / 2);
    let err = unpack(
        [input("cut", gz, Compression::Gzip)],
        &root,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("layer 1 (cut)"), "{err}");
    assert!(!root.exists());
}

#[test]
fn account_files_are_read_without_following_links() {
    let tmp = crate::testutil::tempdir();
    fs::create_dir_all(tmp.path().join("root/etc")).unwrap();
    fs::write(tmp.path().join("host-passwd"), b"host").unwrap();
    std::os::unix::fs::symlink("../../host-passwd", tmp.path().join("root/etc/passwd")).unwrap();
    assert_eq!(
        read_file_beneath(&tmp.path().join("root"), &["etc", "passwd"], 100).unwrap(),
        None
    );
    fs::write(tmp.path().join("root/etc/group"), b"g").unwrap();
    assert_eq!(
        read_file_beneath(&tmp.path().join("root"), &["etc", "group"], 100).unwrap(),
        Some(b"g".to_vec())
    );
}

#[test]
fn whiteouts_in_missing_directories_hide_nothing_and_make_nothing() {
    let tmp = crate::testutil::tempdir();
    let root = tmp.path().join("rootfs");
    let layer = Tar::new()
        .file("gone/.wh.x", 0o644, b"")
        .file("gone/deeper/.wh..wh..opq", 0o644, b"")
        .bytes();
    unpack([plain("l", layer)], &root, &Limits::default()).unwrap();
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
}

#[test]
fn data_after_the_end_of_the_archive_is_bounded() {
    let tmp = crate::testutil::tempdir();
    let mut layer = Tar::new().file("f", 0o644, b"x").bytes();
    // Padding to a tar record size, as tar writes it, is fine and part of the diff ID.
    layer.resize(layer.len() + 8192, 0);
    let mut l = plain("padded", layer.clone());
    l.diff_id = Some(Digest::of(&layer));
    unpack([l], &tmp.path().join("ok"), &Limits::default()).unwrap();
    layer.resize(layer.len() + (2 << 20), 0);
    let err = unpack(
        [plain("trailer", layer)],
        &tmp.path().join("bad"),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer 1 (trailer) is not a readable tar stream: more than 1048576 bytes follow the end of the archive"
    );
    assert!(!tmp.path().join("bad").exists());
}

#[test]
fn a_directory_replaced_later_in_its_layer_is_no_error() {
    let tmp = crate::testutil::tempdir();
    let root = tmp.path().join("rootfs");
    let layer = Tar::new()
        .dir("d", 0o755)
        .file("d", 0o600, b"file now")
        .dir("e", 0o700)
        .dir("e", 0o751)
        .bytes();
    unpack([plain("l", layer)], &root, &Limits::default()).unwrap();
    assert_eq!(fs::read(root.join("d")).unwrap(), b"file now");
    assert_eq!(
        fs::symlink_metadata(root.join("e")).unwrap().mode() & 0o7777,
        0o751,
        "the last entry wins"
    );
}

#[test]
fn sparse_files_count_with_their_full_size() {
    let tmp = crate::testutil::tempdir();
    let holey = tmp.path().join("holey");
    let f = fs::File::create(&holey).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"end", (8 << 20) - 3).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.sparse(true);
    b.append_path_with_name(&holey, "holey").unwrap();
    let layer = b.into_inner().unwrap();
    assert!(layer.len() < 1 << 20, "the layer stores the file sparsely");
    let err = unpack(
        [plain("sparse", layer.clone())],
        &tmp.path().join("small"),
        &Limits {
            max_bytes: 4 << 20,
            ..Limits::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Entry {
                reason: Refusal::Bytes(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(!tmp.path().join("small").exists());
    let root = tmp.path().join("big");
    let stats = unpack([plain("sparse", layer)], &root, &Limits::default()).unwrap();
    assert_eq!(stats.bytes, 8 << 20);
    let data = fs::read(root.join("holey")).unwrap();
    assert_eq!(data.len(), 8 << 20);
    assert_eq!(&data[data.len() - 3..], b"end");
}

#[test]
fn a_target_other_users_could_reach_is_refused() {
    let tmp = crate::testutil::tempdir();
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
    let layer = Tar::new().file("bin/su", 0o4755, b"su").bytes();
    let err = unpack(
        [plain("l", layer)],
        &shared.join("rootfs"),
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::ParentNotPrivate { .. }), "{err}");
    assert!(!shared.join("rootfs").exists());
}
