//! Builders for synthetic layers and images in tests.

use std::io::Write;

use tar::{EntryType, Header};

/// A layer tar built in memory, with raw paths so hostile entries can be made.
pub(crate) struct Tar(tar::Builder<Vec<u8>>);

pub(crate) const MTIME: u64 = 1_700_000_000;

impl Tar {
    pub fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
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
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    fn push(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.push(Self::header(EntryType::Directory, path, mode, 0), b"")
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_as(path, mode, 0, 0, data)
    }

    pub fn file_as(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, path, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, data)
    }

    /// A header that claims `size` bytes, followed by none.
    pub fn claim(&mut self, path: &str, size: u64) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, path, 0o644, size);
        h.set_cksum();
        self.0.get_mut().write_all(h.as_bytes()).unwrap();
        self
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, path, 0o777, 0);
        let l = &mut h.as_old_mut().linkname;
        l[..target.len()].copy_from_slice(target.as_bytes());
        self.push(h, b"")
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target)
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target)
    }

    pub fn node(
        &mut self,
        kind: EntryType,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, path, mode, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.push(h, b"")
    }

    /// PAX records for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    pub fn bytes(&mut self) -> Vec<u8> {
        let mut b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.finish().unwrap();
        b.into_inner().unwrap()
    }
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub(crate) fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

/// A `security.capability` value (revision 2) granting CAP_NET_RAW, effective.
pub(crate) const CAP_NET_RAW: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

use std::path::Path;

use serde_json::json;

use crate::digest::Digest;

/// An image configuration document.
pub(crate) fn config_json(arch: &str, diff_ids: &[Digest], config: serde_json::Value) -> Vec<u8> {
    let ids: Vec<String> = diff_ids.iter().map(|d| d.to_string()).collect();
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": ids},
    }))
    .unwrap()
}

/// An image manifest document; `layers` are (digest, size, media type).
pub(crate) fn manifest_json(config: &[u8], layers: &[(Digest, usize, &str)]) -> Vec<u8> {
    let ls: Vec<_> = layers
        .iter()
        .map(|(d, s, mt)| json!({"mediaType": mt, "digest": d.to_string(), "size": s}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of(config).to_string(), "size": config.len()},
        "layers": ls,
    }))
    .unwrap()
}

/// Writes a blob into an OCI layout directory.
pub(crate) fn put(dir: &Path, data: &[u8]) -> Digest {
    let d = Digest::of(data);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(d.hex()), data).unwrap();
    d
}

/// Writes the blobs of a single-platform image (layers given uncompressed, stored gzip-compressed)
/// and returns its manifest.
pub(crate) fn write_image(
    dir: &Path,
    arch: &str,
    layers: &[Vec<u8>],
    config: serde_json::Value,
) -> Vec<u8> {
    let diff_ids: Vec<Digest> = layers.iter().map(|l| Digest::of(l)).collect();
    let mut descs = Vec::new();
    for l in layers {
        let gz = gzip(l);
        descs.push((
            put(dir, &gz),
            gz.len(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ));
    }
    let cfg = config_json(arch, &diff_ids, config);
    put(dir, &cfg);
    let m = manifest_json(&cfg, &descs);
    put(dir, &m);
    m
}

/// Writes `oci-layout` and an `index.json` listing `manifests` (JSON descriptors).
pub(crate) fn write_index(dir: &Path, manifests: Vec<serde_json::Value>) {
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

pub(crate) fn manifest_desc(manifest: &[u8], platform: Option<(&str, &str)>) -> serde_json::Value {
    let mut d = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": Digest::of(manifest).to_string(),
        "size": manifest.len(),
    });
    if let Some((os, arch)) = platform {
        d["platform"] = json!({"os": os, "architecture": arch});
    }
    d
}

/// Tars up a directory (as an OCI archive is made from a layout).
pub(crate) fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// A temporary directory only its owner can enter, as unpacking requires of a target's parent.
pub(crate) fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}
