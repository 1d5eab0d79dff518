//! Reads an image from a file: an OCI image layout directory, an OCI archive (a tar of a layout)
//! or a `docker save` tarball (`manifest.json`, the configuration and the layer tars; newer
//! Docker also puts an OCI layout in it, which is then preferred).
//!
//! What is read is the manifest, the image configuration and the ordered layers; the blobs
//! themselves are read later (by [`crate::store::Store::import`], which verifies them). A
//! multi-platform index resolves to linux/amd64. Manifests, indexes and configurations are
//! checked against their digests here, since they are read whole.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};
use serde::{Deserialize, Serialize};

use crate::digest::{BadDigest, Digest};

/// The largest manifest, index or configuration document read (16 MiB).
pub const MAX_DOCUMENT: u64 = 16 << 20;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer media type (OCI's and Docker's), or `None` if the media type is
    /// not a layer that can be unpacked.
    pub fn of_media_type(mt: &str) -> Option<Compression> {
        match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// Guesses from a blob's first bytes (for `docker save` layers, which carry no media type).
    fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    fn oci_media_type(self) -> MediaType {
        match self {
            Compression::None => MediaType::ImageLayer,
            Compression::Gzip => MediaType::ImageLayerGzip,
            Compression::Zstd => MediaType::ImageLayerZstd,
        }
    }
}

/// One layer of an image, in stack order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Digest of the blob as stored.
    pub digest: Digest,
    /// Size of the blob as stored.
    pub size: u64,
    pub media_type: String,
    pub compression: Compression,
    /// Digest of the uncompressed tar stream, from the configuration.
    pub diff_id: Option<Digest>,
}

/// An image: its manifest, its configuration and its layers.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest_digest: Digest,
    /// The manifest exactly as stored (its digest is `manifest_digest`).
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfiguration,
    pub layers: Vec<Layer>,
}

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not an OCI image layout (it has no oci-layout and index.json)")]
    NotLayout(PathBuf),
    #[error("{0} is neither an OCI archive nor a docker save tarball (it has no index.json or manifest.json)")]
    NotArchive(PathBuf),
    #[error("{path} lacks {what}")]
    Missing { path: PathBuf, what: String },
    #[error("{what} in {path} is not valid: {source}")]
    Json {
        path: PathBuf,
        what: String,
        source: serde_json::Error,
    },
    #[error("{what} in {path} is larger than {MAX_DOCUMENT} bytes")]
    TooLarge { path: PathBuf, what: String },
    #[error("{what} in {path} does not match its digest {expected}: it hashes to {actual}")]
    DigestMismatch {
        path: PathBuf,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{path} has no image for linux/amd64")]
    NoPlatform { path: PathBuf },
    #[error("{path} holds {count} images; flint reads archives and layouts that hold one")]
    SeveralImages { path: PathBuf, count: usize },
    #[error("layer {digest} of {path} has media type {media_type}, which is not a layer flint can unpack")]
    LayerMediaType {
        path: PathBuf,
        digest: String,
        media_type: String,
    },
    #[error("{path} names a manifest of media type {0}, which is neither an image manifest nor an index", media_type)]
    ManifestMediaType { path: PathBuf, media_type: String },
    #[error("the configuration in {path} lists {diff_ids} layers but the manifest {layers}")]
    LayerCount {
        path: PathBuf,
        diff_ids: usize,
        layers: usize,
    },
    #[error("{path} names an invalid digest: {source}")]
    Digest { path: PathBuf, source: BadDigest },
    #[error("{path} nests image indexes too deeply")]
    TooDeep { path: PathBuf },
}

/// Where the files of a layout or archive are.
enum Files {
    Dir(PathBuf),
    Tar {
        file: File,
        index: HashMap<String, TarItem>,
        _decompressed: Option<tempfile::NamedTempFile>,
    },
}

#[derive(Debug, Clone)]
enum TarItem {
    File { offset: u64, size: u64 },
    Link(String),
}

/// An image read from a file, with access to its blobs.
pub struct ImageSource {
    path: PathBuf,
    files: Files,
    /// For each blob digest, its path among `files`.
    blobs: HashMap<Digest, String>,
    image: Image,
}

impl ImageSource {
    /// Reads an OCI image layout directory.
    pub fn open_layout(dir: &Path) -> Result<ImageSource, SourceError> {
        if !dir.join("oci-layout").is_file() || !dir.join("index.json").is_file() {
            return Err(SourceError::NotLayout(dir.to_path_buf()));
        }
        let files = Files::Dir(dir.to_path_buf());
        Self::from_oci(dir, files)
    }

    /// Reads an OCI archive or a `docker save` tarball (either possibly gzip-compressed).
    pub fn open_archive(path: &Path) -> Result<ImageSource, SourceError> {
        let io_err = |source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let mut head = [0u8; 4];
        let n = read_up_to(&mut file, &mut head).map_err(io_err)?;
        file.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let mut decompressed = None;
        if Compression::sniff(&head[..n]) == Compression::Gzip {
            let mut tmp = tempfile::NamedTempFile::new().map_err(io_err)?;
            io::copy(
                &mut flate2::read::MultiGzDecoder::new(io::BufReader::new(&file)),
                tmp.as_file_mut(),
            )
            .map_err(io_err)?;
            file = tmp.reopen().map_err(io_err)?;
            decompressed = Some(tmp);
        }
        let index = index_tar(&mut file).map_err(io_err)?;
        let files = Files::Tar {
            file,
            index,
            _decompressed: decompressed,
        };
        if files.exists("oci-layout") && files.exists("index.json") {
            Self::from_oci(path, files)
        } else if files.exists("manifest.json") {
            Self::from_docker_save(path, files)
        } else {
            Err(SourceError::NotArchive(path.to_path_buf()))
        }
    }

    /// The image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Where the image was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a blob of the image, as stored and not yet verified.
    pub fn open_blob(&self, digest: &Digest) -> Result<Box<dyn Read + '_>, SourceError> {
        let p = self.blobs.get(digest).ok_or_else(|| SourceError::Missing {
            path: self.path.clone(),
            what: format!("blob {digest}"),
        })?;
        self.files.open(&self.path, p)
    }

    fn from_oci(path: &Path, files: Files) -> Result<ImageSource, SourceError> {
        let index_bytes = files.read_doc(path, "index.json", "index.json")?;
        let index: ImageIndex = parse_json(path, "index.json", &index_bytes)?;
        let mut descs = index.manifests().clone();
        let mut depth = 0;
        let (manifest_digest, manifest_bytes) = loop {
            let d = pick(path, &descs)?;
            let digest = desc_digest(path, &d)?;
            let what = format!("manifest {digest}");
            let bytes = files.read_doc(path, &blob_path(&digest), &what)?;
            check_digest(path, &what, &digest, &bytes)?;
            let mt = document_media_type(d.media_type(), &bytes);
            if is_index(&mt) {
                depth += 1;
                if depth > 4 {
                    return Err(SourceError::TooDeep {
                        path: path.to_path_buf(),
                    });
                }
                let sub: ImageIndex = parse_json(path, &what, &bytes)?;
                descs = sub.manifests().clone();
                continue;
            }
            if !is_manifest(&mt) {
                return Err(SourceError::ManifestMediaType {
                    path: path.to_path_buf(),
                    media_type: mt,
                });
            }
            break (digest, bytes);
        };
        let manifest: ImageManifest = parse_json(
            path,
            &format!("manifest {manifest_digest}"),
            &manifest_bytes,
        )?;
        let config_digest = desc_digest(path, manifest.config())?;
        let what = format!("configuration {config_digest}");
        let config_bytes = files.read_doc(path, &blob_path(&config_digest), &what)?;
        check_digest(path, &what, &config_digest, &config_bytes)?;
        let image = Image::from_manifest(
            path,
            manifest_digest,
            manifest_bytes,
            manifest,
            config_bytes,
        )?;
        let mut blobs = HashMap::new();
        for d in std::iter::once(&image.config_digest).chain(image.layers.iter().map(|l| &l.digest))
        {
            blobs.insert(d.clone(), blob_path(d));
        }
        Ok(ImageSource {
            path: path.to_path_buf(),
            files,
            blobs,
            image,
        })
    }

    fn from_docker_save(path: &Path, files: Files) -> Result<ImageSource, SourceError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct SaveEntry {
            config: String,
            layers: Vec<String>,
        }
        let bytes = files.read_doc(path, "manifest.json", "manifest.json")?;
        let entries: Vec<SaveEntry> =
            serde_json::from_slice(&bytes).map_err(|source| SourceError::Json {
                path: path.to_path_buf(),
                what: "manifest.json".into(),
                source,
            })?;
        let entry = match entries.as_slice() {
            [one] => one,
            [] => {
                return Err(SourceError::Missing {
                    path: path.to_path_buf(),
                    what: "an image in manifest.json".into(),
                })
            }
            more => {
                return Err(SourceError::SeveralImages {
                    path: path.to_path_buf(),
                    count: more.len(),
                })
            }
        };
        let config_bytes = files.read_doc(path, &entry.config, "the configuration")?;
        let config_digest = Digest::of(&config_bytes);
        let mut blobs = HashMap::new();
        blobs.insert(config_digest.clone(), entry.config.clone());
        // docker save records no layer digests: hash each layer file once.
        let mut layer_descs = Vec::new();
        for l in &entry.layers {
            let mut r = crate::digest::HashingReader::new(files.open(path, l)?);
            let mut head = [0u8; 4];
            let n = read_up_to(&mut r, &mut head).map_err(|source| SourceError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            io::copy(&mut r, &mut io::sink()).map_err(|source| SourceError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let (digest, size) = r.finish();
            let mt = Compression::sniff(&head[..n]).oci_media_type();
            layer_descs.push(Descriptor::new(mt, size, oci_digest(&digest)));
            blobs.insert(digest, l.clone());
        }
        // The manifest docker save leaves out, made from what it does record.
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_bytes.len() as u64,
                oci_digest(&config_digest),
            ))
            .layers(layer_descs)
            .build()
            .expect("all required manifest fields are set");
        let manifest_bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let manifest_digest = Digest::of(&manifest_bytes);
        let image = Image::from_parts(path, manifest_digest, manifest_bytes, config_bytes)?;
        Ok(ImageSource {
            path: path.to_path_buf(),
            files,
            blobs,
            image,
        })
    }
}

impl Image {
    /// Builds an image from its manifest and configuration documents (already verified).
    pub fn from_parts(
        path: &Path,
        manifest_digest: Digest,
        manifest_bytes: Vec<u8>,
        config_bytes: Vec<u8>,
    ) -> Result<Image, SourceError> {
        let manifest: ImageManifest = parse_json(
            path,
            &format!("manifest {manifest_digest}"),
            &manifest_bytes,
        )?;
        Image::from_manifest(
            path,
            manifest_digest,
            manifest_bytes,
            manifest,
            config_bytes,
        )
    }

    /// [`Image::from_parts`] with the manifest already parsed from `manifest_bytes`.
    fn from_manifest(
        path: &Path,
        manifest_digest: Digest,
        manifest_bytes: Vec<u8>,
        manifest: ImageManifest,
        config_bytes: Vec<u8>,
    ) -> Result<Image, SourceError> {
        let config_digest = desc_digest(path, manifest.config())?;
        let config: ImageConfiguration = parse_json(
            path,
            &format!("configuration {config_digest}"),
            &config_bytes,
        )?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(SourceError::LayerCount {
                path: path.to_path_buf(),
                diff_ids: diff_ids.len(),
                layers: manifest.layers().len(),
            });
        }
        let mut layers = Vec::new();
        for (d, diff_id) in manifest.layers().iter().zip(diff_ids) {
            let digest = desc_digest(path, d)?;
            let media_type = d.media_type().to_string();
            let compression = Compression::of_media_type(&media_type).ok_or_else(|| {
                SourceError::LayerMediaType {
                    path: path.to_path_buf(),
                    digest: digest.to_string(),
                    media_type: media_type.clone(),
                }
            })?;
            let diff_id = diff_id
                .parse::<Digest>()
                .map_err(|source| SourceError::Digest {
                    path: path.to_path_buf(),
                    source,
                })?;
            layers.push(Layer {
                digest,
                size: d.size(),
                media_type,
                compression,
                diff_id: Some(diff_id),
            });
        }
        Ok(Image {
            manifest_digest,
            manifest_bytes,
            manifest,
            config_digest,
            config_bytes,
            config,
            layers,
        })
    }
}

fn oci_digest(d: &Digest) -> oci_spec::image::Digest {
    d.to_string()
        .parse()
        .expect("a sha256 digest is a valid OCI digest")
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn desc_digest(path: &Path, d: &Descriptor) -> Result<Digest, SourceError> {
    Digest::try_from(d.digest()).map_err(|source| SourceError::Digest {
        path: path.to_path_buf(),
        source,
    })
}

fn check_digest(
    path: &Path,
    what: &str,
    expected: &Digest,
    bytes: &[u8],
) -> Result<(), SourceError> {
    let actual = Digest::of(bytes);
    if &actual != expected {
        return Err(SourceError::DigestMismatch {
            path: path.to_path_buf(),
            what: what.to_string(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    bytes: &[u8],
) -> Result<T, SourceError> {
    serde_json::from_slice(bytes).map_err(|source| SourceError::Json {
        path: path.to_path_buf(),
        what: what.to_string(),
        source,
    })
}

/// The media type of a manifest document: its descriptor's, or else the document's own field.
fn document_media_type(desc: &MediaType, bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let declared = desc.to_string();
    if is_index(&declared) || is_manifest(&declared) {
        return declared;
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(mt),
            ..
        }) => mt,
        Ok(Probe {
            manifests: Some(_), ..
        }) => MediaType::ImageIndex.to_string(),
        _ => MediaType::ImageManifest.to_string(),
    }
}

/// Whether `mt` is an image index's media type (OCI's or Docker's manifest list).
pub(crate) fn is_index(mt: &str) -> bool {
    mt == "application/vnd.oci.image.index.v1+json"
        || mt == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// Whether `mt` is an image manifest's media type (OCI's or Docker's).
pub(crate) fn is_manifest(mt: &str) -> bool {
    mt == "application/vnd.oci.image.manifest.v1+json"
        || mt == "application/vnd.docker.distribution.manifest.v2+json"
}

/// Whether an index entry is for linux/amd64.
pub(crate) fn is_linux_amd64(d: &Descriptor) -> bool {
    d.platform()
        .as_ref()
        .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
}

/// The one descriptor to follow: those for linux/amd64 (or without a platform) are candidates,
/// and exactly one must remain. Several linux/amd64 variants pick the first.
fn pick(path: &Path, descs: &[Descriptor]) -> Result<Descriptor, SourceError> {
    let amd64: Vec<&Descriptor> = descs.iter().filter(|d| is_linux_amd64(d)).collect();
    if let Some(first) = amd64.first() {
        return Ok((*first).clone());
    }
    let unplatformed: Vec<&Descriptor> = descs.iter().filter(|d| d.platform().is_none()).collect();
    match unplatformed.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(SourceError::NoPlatform {
            path: path.to_path_buf(),
        }),
        more => Err(SourceError::SeveralImages {
            path: path.to_path_buf(),
            count: more.len(),
        }),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Lists an uncompressed tar's files and symbolic links with where their data is.
fn index_tar(file: &mut File) -> io::Result<HashMap<String, TarItem>> {
    let mut index = HashMap::new();
    let mut archive = tar::Archive::new(&*file);
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let name = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let item = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => TarItem::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = String::from_utf8_lossy(&entry.link_name_bytes().unwrap_or_default())
                    .into_owned();
                if entry.header().entry_type() == tar::EntryType::Symlink {
                    let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                    TarItem::Link(normalize(&format!("{dir}/{target}")))
                } else {
                    TarItem::Link(normalize(&target))
                }
            }
            _ => continue,
        };
        index.insert(name, item);
    }
    Ok(index)
}

/// A path inside an archive with `.` and `..` resolved and no leading `/` or `./`.
fn normalize(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

impl Files {
    fn exists(&self, name: &str) -> bool {
        match self {
            Files::Dir(d) => d.join(name).is_file(),
            Files::Tar { index, .. } => index.contains_key(name),
        }
    }

    fn open(&self, path: &Path, name: &str) -> Result<Box<dyn Read + '_>, SourceError> {
        let missing = || SourceError::Missing {
            path: path.to_path_buf(),
            what: name.to_string(),
        };
        match self {
            Files::Dir(d) => {
                let p = d.join(name);
                let f = File::open(&p).map_err(|source| match source.kind() {
                    io::ErrorKind::NotFound => missing(),
                    _ => SourceError::Io {
                        path: p.clone(),
                        source,
                    },
                })?;
                Ok(Box::new(f))
            }
            Files::Tar { file, index, .. } => {
                let mut key = normalize(name);
                for _ in 0..8 {
                    match index.get(&key).ok_or_else(missing)? {
                        TarItem::Link(t) => key = t.clone(),
                        TarItem::File { offset, size } => {
                            return Ok(Box::new(PosReader {
                                file,
                                pos: *offset,
                                end: offset + size,
                            }));
                        }
                    }
                }
                Err(missing())
            }
        }
    }

    fn read_doc(&self, path: &Path, name: &str, what: &str) -> Result<Vec<u8>, SourceError> {
        let r = self.open(path, name)?;
        let mut bytes = Vec::new();
        r.take(MAX_DOCUMENT + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| SourceError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(SourceError::TooLarge {
                path: path.to_path_buf(),
                what: what.to_string(),
            });
        }
        Ok(bytes)
    }
}

/// Reads a range of a file with positioned reads, so that several readers can share it.
struct PosReader<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for PosReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let room = usize::try_from(self.end - self.pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if room == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..room], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside a file",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
