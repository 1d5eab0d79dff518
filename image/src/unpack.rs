//! Applies image layers in order to a new directory, treating every layer as hostile input.
//!
//! Nothing is ever written outside the target directory:
//! - every entry's parent directory is reached from the target one component at a time with
//!   `openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)`, so a path through a symbolic link (or through a
//!   file) is refused instead of followed; well-formed layers never hold one, because the tools
//!   that make layers record the resolved path of every file;
//!   (this needs no `openat2(RESOLVE_BENEATH)`, which would resolve links below the target
//!   rather than refuse them, and works on every kernel);
//! - paths with a `..` component and absolute paths are refused;
//! - symbolic links are stored as they are and never followed; hard links are made with `linkat`
//!   from a source reached the same way, so they can only name an entry already in the tree;
//! - files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` after removing whatever was there, and
//!   ownership, modes, times and extended attributes are set on the open file or with
//!   `AT_SYMLINK_NOFOLLOW`.
//!
//! Whiteouts (`.wh.NAME`) remove NAME as left by the lower layers; an opaque marker
//! (`.wh..wh..opq`) empties its directory of what the lower layers left there. Device nodes and
//! fifos are made with `mknodat` and ownership is set with `fchown`, both of which need root (flint
//! has it when it runs virtual machines). Modes are applied after ownership so that setuid and
//! setgid bits survive, and `security.capability` after both, since `chown` clears it. Of the
//! extended attributes carried in PAX headers (`SCHILY.xattr.*`), `security.capability` and the
//! `user.*` namespace are applied; others (`trusted.*`, `security.selinux`, ...) are skipped
//! because they would speak for the host's or the guest's security policy, not the image's.
//!
//! The target's parent directory must be accessible only to its owner: an image may hold setuid
//! programs and device nodes, which other users of the host must not reach.
//!
//! [`Limits`] bound the bytes written, the number of entries, the length and depth of paths, and
//! the tar metadata (PAX headers, long names) of each entry. Sparse files are written out in full
//! and so count with their full size. A violation, or any other failure, is one sentence naming
//! the layer and the entry, and the target directory is removed.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::digest::{Digest, HashingReader};
use crate::fsutil::{self, WalkError};
use crate::source::Compression;

/// Bounds on what a set of layers may make. The defaults fit the largest images in common use
/// (tens of GiB) while keeping a hostile image from filling the cache's disk or memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content across all layers (default 32 GiB). Sparse files count in full.
    pub max_bytes: u64,
    /// Entries across all layers, directories made for missing parents included (default 1,000,000).
    pub max_entries: u64,
    /// Length of an entry's path in bytes (default 4,096, Linux's `PATH_MAX`).
    pub max_path_len: usize,
    /// Components in an entry's path (default 256).
    pub max_depth: usize,
    /// Tar metadata (headers, PAX records, long names and link names) for one entry
    /// (default 1 MiB); this bounds the memory the tar reader may take for it.
    pub max_entry_metadata: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 32 << 30,
            max_entries: 1_000_000,
            max_path_len: 4096,
            max_depth: 256,
            max_entry_metadata: 1 << 20,
        }
    }
}

/// One layer to apply.
pub struct LayerInput<'a> {
    /// How messages name the layer, usually its digest.
    pub name: String,
    /// The layer blob as stored (compressed or not).
    pub reader: Box<dyn Read + 'a>,
    /// How the blob is compressed.
    pub compression: Compression,
    /// The digest of the uncompressed tar stream (the image configuration's `rootfs.diff_ids`),
    /// checked once the layer is applied.
    pub diff_id: Option<Digest>,
}

/// What an unpack made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub layers: usize,
    pub entries: u64,
    pub bytes: u64,
}

/// Why unpacking stopped. The target directory has been removed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot unpack the image into {path}: it already exists")]
    TargetExists { path: PathBuf },
    #[error("cannot unpack the image into {path}: its parent directory must be accessible only to its owner (mode 0700), since an image may hold setuid programs and device nodes")]
    ParentNotPrivate { path: PathBuf },
    #[error("cannot unpack the image into {path}: {source}")]
    Target { path: PathBuf, source: io::Error },
    #[error("layer {layer} is not a readable tar stream: {source}")]
    Read { layer: String, source: io::Error },
    #[error("layer {layer} does not match its diff ID {expected}: its content hashes to {actual}")]
    DiffId {
        layer: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("refusing entry {entry:?} of layer {layer}: {reason}")]
    Entry {
        layer: String,
        entry: String,
        reason: Refusal,
    },
}

/// Why one entry of a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("its path has a .. component")]
    DotDot,
    #[error("its path is absolute")]
    Absolute,
    #[error("its path goes through {0:?}, which is a symbolic link or not a directory")]
    ThroughLink(String),
    #[error("it is a hard link to {0:?}, which is not a file already unpacked")]
    LinkTarget(String),
    #[error("its hard link target {0:?} is absolute or has a .. component")]
    LinkTargetPath(String),
    #[error("the layers hold more than {0} bytes of files, the unpack limit")]
    Bytes(u64),
    #[error("the layers hold more than {0} entries, the unpack limit")]
    Entries(u64),
    #[error("its path is longer than {0} bytes, the unpack limit")]
    PathLen(usize),
    #[error("its path has more than {0} components, the unpack limit")]
    Depth(usize),
    #[error("its tar metadata is larger than {0} bytes, the unpack limit")]
    Metadata(u64),
    #[error("its tar type {0:?} is not supported")]
    Type(char),
    #[error("it is a whiteout without a valid name")]
    BadWhiteout,
    #[error("it would replace the image's root directory with something else")]
    Root,
    #[error("{op} failed: {source}")]
    Io { op: &'static str, source: io::Error },
}

fn io_refusal(op: &'static str) -> impl Fn(rustix::io::Errno) -> Refusal {
    move |e| Refusal::Io {
        op,
        source: e.into(),
    }
}

/// Applies `layers` in order to `target`, which must not exist yet and is created. On any error
/// the target is removed.
pub fn unpack<'a>(
    layers: impl IntoIterator<Item = LayerInput<'a>>,
    target: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    // A setuid-root shell or a device node of the host's disk from the image must not be
    // reachable by other users of the host.
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let md = fs::metadata(parent).map_err(|source| UnpackError::Target {
        path: target.to_path_buf(),
        source,
    })?;
    if md.permissions().mode() & 0o077 != 0 {
        return Err(UnpackError::ParentNotPrivate {
            path: target.to_path_buf(),
        });
    }
    match fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(UnpackError::TargetExists {
                path: target.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(UnpackError::Target {
                path: target.to_path_buf(),
                source,
            })
        }
    }
    let result = unpack_into(layers, target, limits);
    if result.is_err() {
        // The target is ours (we made it); std's remove_dir_all never follows symbolic links.
        let _ = fs::remove_dir_all(target);
    }
    result
}

fn unpack_into<'a>(
    layers: impl IntoIterator<Item = LayerInput<'a>>,
    target: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    let root = rfs::open(
        target,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Target {
        path: target.to_path_buf(),
        source: e.into(),
    })?;
    let mut state = State {
        root,
        limits,
        stats: UnpackStats::default(),
    };
    for (index, layer) in layers.into_iter().enumerate() {
        let name = format!("{} ({})", index + 1, layer.name);
        state.apply_layer(&name, layer)?;
        state.stats.layers += 1;
    }
    Ok(state.stats)
}

/// Counts the raw tar stream and fails once it passes a window that the unpacker moves forward
/// entry by entry, so that no single entry's metadata can grow without bound.
struct Metered<R> {
    inner: R,
    consumed: Rc<Cell<u64>>,
    window_end: Rc<Cell<u64>>,
}

/// The marker for a `Metered` overrun, told apart from other I/O errors by its message.
const METADATA_OVERRUN: &str = "tar metadata over the limit";

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.window_end.get().saturating_sub(self.consumed.get());
        if room == 0 && !buf.is_empty() {
            return Err(io::Error::other(METADATA_OVERRUN));
        }
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.consumed.set(self.consumed.get() + n as u64);
        Ok(n)
    }
}

fn decompressor<'a>(r: Box<dyn Read + 'a>, c: Compression) -> io::Result<Box<dyn Read + 'a>> {
    let r = BufReader::with_capacity(1 << 16, r);
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    })
}

/// A directory whose metadata is applied once its layer is done (adding entries changes its
/// modification time, and a read-only mode would get in the way of non-root callers).
struct DirMeta {
    path: Vec<OsString>,
    meta: Meta,
}

#[derive(Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

struct State<'l> {
    root: OwnedFd,
    limits: &'l Limits,
    stats: UnpackStats,
}

impl State<'_> {
    fn apply_layer(&mut self, layer: &str, input: LayerInput<'_>) -> Result<(), UnpackError> {
        let read_err = |source: io::Error| UnpackError::Read {
            layer: layer.to_string(),
            source,
        };
        let decompressed = decompressor(input.reader, input.compression).map_err(read_err)?;
        let mut hashing = HashingReader::new(decompressed);
        let consumed = Rc::new(Cell::new(0u64));
        let window_end = Rc::new(Cell::new(self.limits.max_entry_metadata));
        let metered = Metered {
            inner: &mut hashing,
            consumed: consumed.clone(),
            window_end: window_end.clone(),
        };
        let mut archive = tar::Archive::new(metered);
        // Paths this layer made: whiteouts and opaque markers only hide what lower layers made.
        let mut made: HashSet<Vec<OsString>> = HashSet::new();
        let mut dirs: Vec<DirMeta> = Vec::new();
        let mut entries = archive.entries().map_err(read_err)?;
        let mut last_entry = String::from("(start of layer)");
        loop {
            window_end.set(consumed.get() + self.limits.max_entry_metadata);
            let next = match entries.next() {
                None => break,
                Some(n) => n,
            };
            let mut entry = match next {
                Ok(e) => e,
                Err(e) if e.to_string().contains(METADATA_OVERRUN) => {
                    return Err(UnpackError::Entry {
                        layer: layer.to_string(),
                        entry: format!("after {last_entry}"),
                        reason: Refusal::Metadata(self.limits.max_entry_metadata),
                    })
                }
                Err(e) => return Err(read_err(e)),
            };
            let raw_path = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            last_entry = format!("{shown:?}");
            let size = entry.size().max(entry.header().entry_size().unwrap_or(0));
            window_end.set(consumed.get().saturating_add(size).saturating_add(1024));
            let refuse = |reason: Refusal| UnpackError::Entry {
                layer: layer.to_string(),
                entry: shown.clone(),
                reason,
            };
            self.apply_entry(&mut entry, &raw_path, size, &mut made, &mut dirs)
                .map_err(|r| match r {
                    Refusal::Io { source, .. } if source.to_string().contains(METADATA_OVERRUN) => {
                        refuse(Refusal::Metadata(self.limits.max_entry_metadata))
                    }
                    r => refuse(r),
                })?;
            // Data that an entry of another type carries is skipped here, inside its window.
            io::copy(&mut entry, &mut io::sink()).map_err(read_err)?;
        }
        // What follows the end-of-archive blocks (padding to the tar record size) still belongs
        // to the blob and its diff ID; more than the metadata limit of it is refused.
        let mut metered = archive.into_inner();
        window_end.set(consumed.get() + self.limits.max_entry_metadata);
        io::copy(&mut metered, &mut io::sink()).map_err(|e| {
            if e.to_string().contains(METADATA_OVERRUN) {
                read_err(io::Error::other(format!(
                    "more than {} bytes follow the end of the archive",
                    self.limits.max_entry_metadata
                )))
            } else {
                read_err(e)
            }
        })?;
        // In the layer's order, so that a directory listed twice gets its last entry's metadata
        // (setting a directory's metadata leaves its parent's modification time alone).
        for d in &dirs {
            self.set_dir_meta(d).map_err(|reason| UnpackError::Entry {
                layer: layer.to_string(),
                entry: display_path(&d.path),
                reason,
            })?;
        }
        let (actual, _) = hashing.finish();
        if let Some(expected) = input.diff_id {
            if expected != actual {
                return Err(UnpackError::DiffId {
                    layer: layer.to_string(),
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }

    fn count_entry(&mut self) -> Result<(), Refusal> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(Refusal::Entries(self.limits.max_entries));
        }
        Ok(())
    }

    fn split_path(&self, raw: &[u8]) -> Result<Vec<OsString>, Refusal> {
        if raw.len() > self.limits.max_path_len {
            return Err(Refusal::PathLen(self.limits.max_path_len));
        }
        if raw.first() == Some(&b'/') {
            return Err(Refusal::Absolute);
        }
        let mut parts = Vec::new();
        for c in raw.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err(Refusal::DotDot),
                c => parts.push(OsStr::from_bytes(c).to_os_string()),
            }
        }
        if parts.len() > self.limits.max_depth {
            return Err(Refusal::Depth(self.limits.max_depth));
        }
        Ok(parts)
    }

    /// Opens the directory holding `parts`' last component, making missing parents.
    fn open_parent(&mut self, parts: &[OsString]) -> Result<OwnedFd, Refusal> {
        let mut created = 0;
        let r = fsutil::walk_dirs(
            &self.root,
            parts[..parts.len() - 1].iter().map(|p| p.as_os_str()),
            true,
            &mut created,
        );
        for _ in 0..created {
            self.count_entry()?;
        }
        r.map_err(|e| match e {
            WalkError::NotDirectory(n) | WalkError::Missing(n) => Refusal::ThroughLink(n),
            WalkError::Io(source) => Refusal::Io {
                op: "opening the parent directory",
                source,
            },
        })
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        size: u64,
        made: &mut HashSet<Vec<OsString>>,
        dirs: &mut Vec<DirMeta>,
    ) -> Result<(), Refusal> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if matches!(kind, T::XGlobalHeader) {
            return Ok(());
        }
        self.count_entry()?;
        let parts = self.split_path(raw_path)?;
        // Every entry's data counts, whatever its type claims, since the reader has to pass it.
        if self.stats.bytes.saturating_add(size) > self.limits.max_bytes {
            return Err(Refusal::Bytes(self.limits.max_bytes));
        }

        let Some(last) = parts.last() else {
            // The archive's root ("./"): only a directory may describe it.
            if !matches!(kind, T::Directory) {
                return Err(Refusal::Root);
            }
            dirs.push(DirMeta {
                path: Vec::new(),
                meta: meta_of(entry)?,
            });
            return Ok(());
        };
        let last = last.clone();

        // Whiteouts.
        if let Some(hidden) = last.as_bytes().strip_prefix(b".wh.") {
            let opaque = hidden == b".wh..opq";
            if !opaque
                && (hidden.is_empty()
                    || hidden == b"."
                    || hidden == b".."
                    || hidden.starts_with(b".wh."))
            {
                return Err(Refusal::BadWhiteout);
            }
            // A whiteout in a directory that does not exist hides nothing.
            let parent = match fsutil::walk_dirs(
                &self.root,
                parts[..parts.len() - 1].iter().map(|p| p.as_os_str()),
                false,
                &mut 0,
            ) {
                Ok(p) => p,
                Err(WalkError::Missing(_)) => return Ok(()),
                Err(WalkError::NotDirectory(n)) => return Err(Refusal::ThroughLink(n)),
                Err(WalkError::Io(source)) => {
                    return Err(Refusal::Io {
                        op: "opening the parent directory",
                        source,
                    })
                }
            };
            if opaque {
                let dir_path = parts[..parts.len() - 1].to_vec();
                let keep = |n: &OsStr| {
                    let mut p = dir_path.clone();
                    p.push(n.to_os_string());
                    made.contains(&p)
                };
                let dir = rfs::openat(
                    &parent,
                    ".",
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_refusal("opening the opaque directory"))?;
                fsutil::clear_dir_except(&dir, &keep).map_err(|source| Refusal::Io {
                    op: "emptying the opaque directory",
                    source,
                })?;
                return Ok(());
            }
            let mut target = parts.clone();
            *target.last_mut().expect("non-empty") = OsStr::from_bytes(hidden).to_os_string();
            if !made.contains(&target) {
                fsutil::remove_all_at(&parent, OsStr::from_bytes(hidden)).map_err(|source| {
                    Refusal::Io {
                        op: "removing the whited-out entry",
                        source,
                    }
                })?;
            }
            return Ok(());
        }

        let parent = self.open_parent(&parts)?;
        made.insert(parts.clone());
        match kind {
            T::Directory => {
                // A directory over a directory merges; over anything else it replaces.
                match rfs::statat(&parent, &last, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory => {
                    }
                    Ok(_) => {
                        remove(&parent, &last)?;
                        rfs::mkdirat(&parent, &last, Mode::from_raw_mode(0o700))
                            .map_err(io_refusal("mkdir"))?;
                    }
                    Err(rustix::io::Errno::NOENT) => {
                        rfs::mkdirat(&parent, &last, Mode::from_raw_mode(0o700))
                            .map_err(io_refusal("mkdir"))?
                    }
                    Err(e) => return Err(io_refusal("stat")(e)),
                }
                dirs.push(DirMeta {
                    path: parts,
                    meta: meta_of(entry)?,
                });
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let meta = meta_of(entry)?;
                remove(&parent, &last)?;
                let fd = rfs::openat(
                    &parent,
                    &last,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io_refusal("creating the file"))?;
                let mut file = fs::File::from(fd);
                self.copy_data(entry, &mut file)?;
                set_meta_fd(&file, &meta)?;
            }
            T::Symlink => {
                let meta = meta_of(entry)?;
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| Refusal::Io {
                        op: "reading the link target",
                        source: io::Error::other("no link name"),
                    })?
                    .into_owned();
                remove(&parent, &last)?;
                rfs::symlinkat(OsStr::from_bytes(&link), &parent, &last)
                    .map_err(io_refusal("symlink"))?;
                chown_nofollow(&parent, &last, &meta)?;
                rfs::utimensat(
                    &parent,
                    &last,
                    &times(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(io_refusal("utimensat"))?;
            }
            T::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| Refusal::Io {
                        op: "reading the link target",
                        source: io::Error::other("no link name"),
                    })?
                    .into_owned();
                let shown = String::from_utf8_lossy(&link).into_owned();
                let src = self
                    .split_path(&link)
                    .map_err(|_| Refusal::LinkTargetPath(shown.clone()))?;
                let Some(src_last) = src.last() else {
                    return Err(Refusal::LinkTarget(shown));
                };
                let mut created = 0;
                let src_parent = fsutil::walk_dirs(
                    &self.root,
                    src[..src.len() - 1].iter().map(|p| p.as_os_str()),
                    false,
                    &mut created,
                )
                .map_err(|_| Refusal::LinkTarget(shown.clone()))?;
                match rfs::statat(&src_parent, src_last, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::Directory => {
                    }
                    _ => return Err(Refusal::LinkTarget(shown)),
                }
                if src == parts {
                    return Ok(());
                }
                remove(&parent, &last)?;
                rfs::linkat(&src_parent, src_last, &parent, &last, AtFlags::empty())
                    .map_err(io_refusal("link"))?;
            }
            T::Char | T::Block | T::Fifo => {
                let meta = meta_of(entry)?;
                let (ft, dev) = match kind {
                    T::Char => (rfs::FileType::CharacterDevice, device(entry)?),
                    T::Block => (rfs::FileType::BlockDevice, device(entry)?),
                    _ => (rfs::FileType::Fifo, 0),
                };
                remove(&parent, &last)?;
                rfs::mknodat(&parent, &last, ft, Mode::from_raw_mode(0o600), dev)
                    .map_err(io_refusal("mknod"))?;
                // The node was just made under this name, so the name is no link to follow.
                chown_nofollow(&parent, &last, &meta)?;
                rfs::chmodat(
                    &parent,
                    &last,
                    Mode::from_raw_mode(meta.mode),
                    AtFlags::empty(),
                )
                .map_err(io_refusal("chmod"))?;
                rfs::utimensat(
                    &parent,
                    &last,
                    &times(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(io_refusal("utimensat"))?;
            }
            other => return Err(Refusal::Type(other.as_byte() as char)),
        }
        Ok(())
    }

    fn copy_data<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut fs::File,
    ) -> Result<(), Refusal> {
        use std::io::Write;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Refusal::Io {
                        op: "reading the entry",
                        source,
                    })
                }
            };
            self.stats.bytes += n as u64;
            if self.stats.bytes > self.limits.max_bytes {
                return Err(Refusal::Bytes(self.limits.max_bytes));
            }
            file.write_all(&buf[..n]).map_err(|source| Refusal::Io {
                op: "writing the file",
                source,
            })?;
        }
    }

    fn set_dir_meta(&self, d: &DirMeta) -> Result<(), Refusal> {
        let walk = fsutil::walk_dirs(
            &self.root,
            d.path.iter().map(|p| p.as_os_str()),
            false,
            &mut 0,
        );
        let dir = match walk {
            Ok(dir) => dir,
            // A later entry of the layer replaced or removed the directory: nothing to set.
            Err(WalkError::NotDirectory(_) | WalkError::Missing(_)) => return Ok(()),
            Err(WalkError::Io(source)) => {
                return Err(Refusal::Io {
                    op: "opening the directory",
                    source,
                })
            }
        };
        // walk_dirs gives an O_PATH descriptor; metadata calls need a real one.
        let fd = rfs::openat(
            &dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_refusal("opening the directory"))?;
        set_meta_fd(&fd, &d.meta)
    }
}

fn display_path(parts: &[OsString]) -> String {
    if parts.is_empty() {
        return "./".into();
    }
    parts
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Removes whatever is at `name` (a directory with everything below it).
fn remove(parent: &OwnedFd, name: &OsStr) -> Result<(), Refusal> {
    fsutil::remove_all_at(parent, name).map_err(|source| Refusal::Io {
        op: "replacing the existing entry",
        source,
    })
}

fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, Refusal> {
    let h = entry.header();
    let bad = |what: &'static str| move |source| Refusal::Io { op: what, source };
    let mode = h.mode().map_err(bad("reading the mode"))? & 0o7777;
    let uid =
        u32::try_from(h.uid().map_err(bad("reading the owner"))?).map_err(|e| Refusal::Io {
            op: "reading the owner",
            source: io::Error::other(e),
        })?;
    let gid =
        u32::try_from(h.gid().map_err(bad("reading the group"))?).map_err(|e| Refusal::Io {
            op: "reading the group",
            source: io::Error::other(e),
        })?;
    let mtime = h.mtime().unwrap_or(0);
    let mut xattrs = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts {
            let ext = ext.map_err(bad("reading a PAX record"))?;
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                if name == b"security.capability" || name.starts_with(b"user.") {
                    xattrs.push((
                        OsStr::from_bytes(name).to_os_string(),
                        ext.value_bytes().to_vec(),
                    ));
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

fn device<R: Read>(entry: &tar::Entry<'_, R>) -> Result<rfs::Dev, Refusal> {
    let h = entry.header();
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    Ok(rfs::makedev(major, minor))
}

/// Give the entry `last` in `parent` the owner `meta` names, without following it if it is a
/// link.
fn chown_nofollow(parent: &impl AsFd, last: &OsStr, meta: &Meta) -> Result<(), Refusal> {
    rfs::chownat(
        parent,
        last,
        Some(uid(meta.uid)),
        Some(gid(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io_refusal("chown"))
}

fn uid(n: u32) -> rfs::Uid {
    rfs::Uid::from_raw(n)
}

fn gid(n: u32) -> rfs::Gid {
    rfs::Gid::from_raw(n)
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Ownership, then mode (chown clears setuid/setgid), then extended attributes (chown clears
/// `security.capability`), then times.
fn set_meta_fd(fd: &impl AsFd, meta: &Meta) -> Result<(), Refusal> {
    rfs::fchown(fd, Some(uid(meta.uid)), Some(gid(meta.gid))).map_err(io_refusal("chown"))?;
    rfs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(io_refusal("chmod"))?;
    for (name, value) in &meta.xattrs {
        rfs::fsetxattr(fd, name.as_os_str(), value, rfs::XattrFlags::empty())
            .map_err(io_refusal("setting an extended attribute"))?;
    }
    rfs::futimens(fd, &times(meta.mtime)).map_err(io_refusal("setting the times"))?;
    Ok(())
}

/// Reads up to `max` bytes of the regular file at `path` (relative to `root`) without following
/// a symbolic link anywhere on the way; `None` if it is missing, a link, or not a regular file.
pub fn read_file_beneath(root: &Path, path: &[&str], max: u64) -> io::Result<Option<Vec<u8>>> {
    let root = rfs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let Some((last, dirs)) = path.split_last() else {
        return Ok(None);
    };
    let dir = match fsutil::walk_dirs(&root, dirs.iter().map(OsStr::new), false, &mut 0) {
        Ok(d) => d,
        Err(WalkError::Io(e)) => return Err(e),
        Err(_) => return Ok(None),
    };
    let fd = match rfs::openat(
        &dir,
        *last,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let st = rfs::fstat(&fd)?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return Ok(None);
    }
    let mut data = Vec::new();
    fs::File::from(fd).take(max).read_to_end(&mut data)?;
    Ok(Some(data))
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
