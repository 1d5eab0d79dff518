//! `flint run --image`: a container image made into the read-only disk a sandbox mounts.
//!
//! Under `$FLINT_CACHE/images` (private to its owner, mode 0700):
//! - `store/`: the blob cache of [`flint_image::Store`], every blob verified against its digest;
//!   an image from a registry is pulled into it by [`flint_image::registry::pull`] and
//!   recorded under its reference, which later runs use without asking the registry again
//!   (`flint image pull` asks again: a tag may have moved);
//! - `disks/<manifest hex>.ext4`: the image's files as an ext4 file system, built once per
//!   image by `mkfs.ext4 -d` from the unpacked layers, never written afterwards (the guest
//!   mounts it read-only under an overlay);
//! - `disks/<manifest hex>.etc/etc/{passwd,group}`: the image's account files, copied without
//!   following links, so later runs resolve `--user` names without unpacking the image again;
//! - `disks/<manifest hex>.lock`: held (flock) exclusively while the disk is built, so that
//!   concurrent runs of one image build it once, and shared while a run uses the disk, so
//!   that `flint image rm` ([`super::image_cache`]) refuses an image in use; everything is
//!   written under a temporary name and renamed into place, the disk last, so a disk that
//!   exists is complete;
//! - `tmp/`: the unpacked layers while the disk is built, removed afterwards.
//!
//! ext4 because the guest kernel has it already and `mkfs.ext4 -d` (e2fsprogs) builds it from
//! a directory without mounting anything, keeping ownership, modes, device nodes, hard links,
//! symbolic links and extended attributes (`security.capability`).

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flint_image::{
    run_spec, Digest, ImageRef, ImageSource, Limits, PullOptions, RunOverrides, RunSpec, Store,
};

/// The largest `/etc/passwd` or `/etc/group` kept (4 MiB, as `flint_image` reads at most).
const MAX_ACCOUNT_FILE: u64 = 4 << 20;
/// Block and inode sizes of the image's disk (`mkfs.ext4 -b`, `-I`).
const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// Why the image could not be made ready.
#[derive(Debug, thiserror::Error)]
pub(super) enum ImageError {
    #[error(transparent)]
    Registry(#[from] flint_image::registry::RegistryError),
    #[error(transparent)]
    Source(#[from] flint_image::source::SourceError),
    #[error(transparent)]
    Store(#[from] flint_image::store::StoreError),
    #[error("the image cannot be unpacked: {0}")]
    Unpack(#[from] flint_image::unpack::UnpackError),
    #[error("the image cannot run: {0}")]
    Config(#[from] flint_image::config::ConfigError),
    #[error("cannot use the image cache at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("mkfs.ext4 was not found: install e2fsprogs (flint builds the image's disk with it)")]
    NoMkfs,
    #[error("mkfs.ext4 could not make {}: {message}", path.display())]
    Mkfs { path: PathBuf, message: String },
    #[error("no image '{0}' in the cache (see 'flint image ls')")]
    Unknown(String),
    #[error("'{0}' names more than one cached image: give more of its digest")]
    Ambiguous(String),
    #[error("image {0} is in use by a sandbox being started or running")]
    InUse(String),
}

pub(super) fn io_at(path: &Path) -> impl Fn(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An image ready to boot: its disk and what runs in it.
#[derive(Debug)]
pub(super) struct Prepared {
    pub disk: PathBuf,
    pub spec: RunSpec,
    /// Held while the sandbox runs: the image is in use.
    _in_use: File,
}

/// Where the cache keeps an image's disk and account files.
pub(super) struct CachePaths {
    pub disk: PathBuf,
    pub etc: PathBuf,
    pub lock: PathBuf,
}

impl CachePaths {
    pub(super) fn new(disks: &Path, manifest: &Digest) -> CachePaths {
        let hex = manifest.hex();
        CachePaths {
            disk: disks.join(format!("{hex}.ext4")),
            etc: disks.join(format!("{hex}.etc")),
            lock: disks.join(format!("{hex}.lock")),
        }
    }

    pub(super) fn ready(&self) -> bool {
        self.disk.is_file() && self.etc.is_dir()
    }
}

/// One line per phase on a terminal; nothing otherwise.
fn progress(message: &str) {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDERR_FILENO) } == 1 {
        eprintln!("flint: {message}");
    }
}

/// Make a private directory (and its missing parents, also private).
fn private_dir(path: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_at(path))
}

/// The image `reference` names, imported and converted into a disk in `cache`
/// (`$FLINT_CACHE`) unless that was done before, and the command `overrides` make of its
/// configuration. The image stays in use (`flint image rm` refuses it) until the returned
/// value is dropped.
pub(super) fn prepare(
    reference: &ImageRef,
    cache: &Path,
    overrides: &RunOverrides,
    registries: &PullOptions,
) -> Result<Prepared, ImageError> {
    let ready = ensure(reference, cache, registries, false)?;
    let spec = run_spec(&ready.image.config, &ready.paths.etc, overrides)?;
    Ok(Prepared {
        disk: ready.paths.disk,
        spec,
        _in_use: ready.in_use,
    })
}

/// `flint image pull`: the image `reference` names, imported (from a registry: pulled again,
/// its tag may have moved) and its disk built as for `flint run --image`; its manifest digest.
pub(crate) fn pull(
    reference: &ImageRef,
    cache: &Path,
    registries: &PullOptions,
) -> Result<Digest, ImageError> {
    Ok(ensure(reference, cache, registries, true)?
        .image
        .manifest_digest)
}

/// Where an image's blobs come from.
enum Origin {
    /// A file, imported into the store when its disk is built.
    File(ImageSource),
    /// The store itself (pulled from a registry).
    Stored(flint_image::Image),
}

impl Origin {
    fn image(&self) -> &flint_image::Image {
        match self {
            Origin::File(source) => source.image(),
            Origin::Stored(image) => image,
        }
    }
}

/// The image a registry reference names: the one cached under that name unless `refresh`,
/// else pulled into the store.
fn from_registry(
    reference: &flint_image::Reference,
    root: &Path,
    registries: &PullOptions,
    refresh: bool,
) -> Result<flint_image::Image, ImageError> {
    let store = Store::open(&root.join("store"))?;
    let name = reference.to_string();
    if !refresh {
        if let Some(digest) = store.find_name(&name)? {
            // A record whose blobs are damaged or gone is pulled again.
            if let Ok(image) = store.image(&digest) {
                return Ok(image);
            }
        }
    }
    let mut bar = PullBar::new(&name);
    let pulled = flint_image::registry::pull(reference, &store, registries, &mut |p| bar.show(p));
    bar.end();
    Ok(pulled?)
}

/// The line that shows a pull's progress on a terminal, redrawn in place; nothing elsewhere.
struct PullBar {
    name: String,
    tty: bool,
    drawn: bool,
}

impl PullBar {
    fn new(name: &str) -> PullBar {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        PullBar {
            name: name.to_string(),
            tty,
            drawn: false,
        }
    }

    fn show(&mut self, p: &flint_image::Progress) {
        if !self.tty {
            return;
        }
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        eprint!(
            "\rflint: pulling {}: {:.1} of {:.1} MiB, {} of {} layers\x1b[K",
            self.name,
            mib(p.bytes_done),
            mib(p.bytes_total),
            p.layers_done,
            p.layers_total
        );
        self.drawn = true;
    }

    fn end(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// An image whose disk is built, held in use.
struct Ready {
    image: flint_image::Image,
    paths: CachePaths,
    /// A shared lock on the image's lock file: `flint image rm` takes it exclusively.
    in_use: File,
}

/// `$FLINT_CACHE/images`, private, with its `disks` directory.
pub(super) fn images_root(cache: &Path) -> Result<PathBuf, ImageError> {
    let root = cache.join("images");
    private_dir(&root)?;
    // An existing cache is made private too: disks hold the images' setuid programs.
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_at(&root))?;
    private_dir(&root.join("disks"))?;
    Ok(root)
}

fn ensure(
    reference: &ImageRef,
    cache: &Path,
    registries: &PullOptions,
    refresh: bool,
) -> Result<Ready, ImageError> {
    let root = images_root(cache)?;
    let source = match reference {
        ImageRef::Registry(r) => Origin::Stored(from_registry(r, &root, registries, refresh)?),
        ImageRef::Layout(dir) => Origin::File(ImageSource::open_layout(dir)?),
        ImageRef::Archive(file) => Origin::File(ImageSource::open_archive(file)?),
    };
    let image = source.image();
    let paths = CachePaths::new(&root.join("disks"), &image.manifest_digest);
    loop {
        if !paths.ready() {
            let _lock = lock(&paths.lock, libc::LOCK_EX)?;
            // Another run may have built it while this one waited.
            if !paths.ready() {
                let built = build(&source, &root, &paths, &reference_name(reference));
                if built.is_err() {
                    // Nothing of a refused image stays, its lock included (a run waiting on
                    // it builds under the unlinked file: temporary names and renames keep
                    // that safe).
                    let _ = fs::remove_file(&paths.lock);
                }
                built?;
            }
        }
        // In use from here: `flint image rm` removes the disk only under an exclusive lock
        // of the file at the lock's path, so the disk is there if it was once this lock is
        // held on that file.
        let in_use = lock(&paths.lock, libc::LOCK_SH)?;
        if paths.ready() && same_file(&in_use, &paths.lock) {
            return Ok(Ready {
                image: image.clone(),
                paths,
                in_use,
            });
        }
    }
}

/// Whether `file` is still the file at `path` (not unlinked nor replaced).
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// How the image is named in the store's record.
fn reference_name(reference: &ImageRef) -> String {
    match reference {
        ImageRef::Registry(r) => r.to_string(),
        ImageRef::Layout(p) | ImageRef::Archive(p) => fs::canonicalize(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
    }
}

/// Hold a flock (`operation`: `LOCK_EX` or `LOCK_SH`, maybe with `LOCK_NB`) on `path`
/// (created if missing) until the file is dropped.
pub(super) fn lock(path: &Path, operation: libc::c_int) -> Result<File, ImageError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode_private()
        .open(path)
        .map_err(io_at(path))?;
    loop {
        // SAFETY: flock on a descriptor this function owns; the result is checked.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_at(path)(e));
        }
    }
}

trait ModePrivate {
    fn mode_private(&mut self) -> &mut Self;
}

impl ModePrivate for fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// Import the image into the store, unpack it and build its disk and account files. On a
/// failure nothing is left in the cache: not the disk, nor the image's record and blobs.
fn build(source: &Origin, root: &Path, paths: &CachePaths, name: &str) -> Result<(), ImageError> {
    let store = Store::open(&root.join("store"))?;
    let image = match source {
        Origin::File(source) => {
            progress(&format!("importing the image {name}"));
            let began = std::time::Instant::now();
            let image = store.import(source, &[name.to_string()])?;
            log::debug!("image: imported in {} ms", began.elapsed().as_millis());
            image
        }
        Origin::Stored(image) => image.clone(),
    };
    let built = unpack_and_make_disk(&store, &image, root, paths);
    if built.is_err() {
        // A refused (hostile or damaged) image keeps nothing; blobs shared with other cached
        // images stay.
        let _ = store.remove_image(&image.manifest_digest);
        let _ = store.prune();
    }
    built
}

fn unpack_and_make_disk(
    store: &Store,
    image: &flint_image::Image,
    root: &Path,
    paths: &CachePaths,
) -> Result<(), ImageError> {
    let tmp = root.join("tmp");
    private_dir(&tmp)?;
    // Removed when dropped, whatever happens; private (0700) before anything goes in.
    let work = tempfile::Builder::new()
        .prefix("unpack-")
        .tempdir_in(&tmp)
        .map_err(io_at(&tmp))?;
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o700))
        .map_err(io_at(work.path()))?;
    let tree = work.path().join("rootfs");
    progress(&format!(
        "unpacking {} layer{}",
        image.layers.len(),
        if image.layers.len() == 1 { "" } else { "s" }
    ));
    let began = std::time::Instant::now();
    let stats = flint_image::unpack(store.layer_inputs(image)?, &tree, &Limits::default())?;
    log::debug!(
        "image: {} layers unpacked ({} entries, {} bytes) in {} ms",
        stats.layers,
        stats.entries,
        stats.bytes,
        began.elapsed().as_millis()
    );

    // The account files first, then the disk: a disk that exists has its account files.
    let etc_tmp = work.path().join("accounts");
    private_dir(&etc_tmp.join("etc"))?;
    for file in ["passwd", "group"] {
        let data = flint_image::read_file_beneath(&tree, &["etc", file], MAX_ACCOUNT_FILE)
            .map_err(io_at(&tree))?;
        if let Some(data) = data {
            let dest = etc_tmp.join("etc").join(file);
            fs::write(&dest, data).map_err(io_at(&dest))?;
        }
    }
    if paths.etc.exists() {
        // Left by a run that stopped before its disk was in place.
        fs::remove_dir_all(&paths.etc).map_err(io_at(&paths.etc))?;
    }

    let size = measure(&tree).map_err(io_at(&tree))?;
    let (bytes, inodes) = disk_geometry(&size);
    progress(&format!("building the image's disk ({} MiB)", bytes >> 20));
    let disk_tmp = work.path().join("disk.ext4");
    let began = std::time::Instant::now();
    make_ext4(&disk_tmp, bytes, Some(&tree), Some(inodes))?;
    log::debug!(
        "image: {} MiB disk with {inodes} inodes built in {} ms",
        bytes >> 20,
        began.elapsed().as_millis()
    );
    if fs::symlink_metadata(tree.join("lost+found")).is_err() {
        remove_lost_found(&disk_tmp);
    }
    // The unpacked tree can go before the disk is moved into place.
    fs::remove_dir_all(&tree).map_err(io_at(&tree))?;
    fs::set_permissions(&disk_tmp, fs::Permissions::from_mode(0o400)).map_err(io_at(&disk_tmp))?;
    fs::rename(&etc_tmp, &paths.etc).map_err(io_at(&paths.etc))?;
    fs::rename(&disk_tmp, &paths.disk).map_err(io_at(&paths.disk))?;
    Ok(())
}

/// What the unpacked tree needs on an ext4 disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct TreeSize {
    /// Data blocks in bytes: files rounded up to whole blocks (hard links once), directories,
    /// and symbolic links too long to be kept in their inode.
    pub data: u64,
    /// Files, directories, links and nodes (hard links once).
    pub inodes: u64,
}

/// Walk `tree` without following links.
pub(super) fn measure(tree: &Path) -> io::Result<TreeSize> {
    let mut size = TreeSize::default();
    let mut seen = std::collections::HashSet::new();
    let mut dirs = vec![tree.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        size.inodes += 1;
        let mut entries = 0u64;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            entries += 1;
            let meta = entry.metadata()?;
            let kind = meta.file_type();
            if kind.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            size.inodes += 1;
            if kind.is_file() {
                size.data += meta.len().div_ceil(BLOCK) * BLOCK;
            } else if kind.is_symlink() && meta.len() >= 60 {
                size.data += BLOCK;
            }
        }
        // A directory entry takes 8 bytes and its name, rounded to 4: ~64 entries a block
        // is generous.
        size.data += (1 + entries / 64) * BLOCK;
    }
    Ok(size)
}

/// The disk's size in bytes (whole MiB) and inode count for a tree of `size`: the data and
/// the inode tables, 20% more for ext4's own metadata (bitmaps, group descriptors, extent
/// blocks), plus 16 MiB.
pub(super) fn disk_geometry(size: &TreeSize) -> (u64, u64) {
    // Some room for lost+found and the reserved inodes.
    let inodes = size.inodes + size.inodes / 10 + 64;
    let raw = size.data + inodes * INODE_SIZE;
    let bytes = raw + raw / 5 + (16 << 20);
    (bytes.div_ceil(1 << 20) << 20, inodes)
}

/// The `mkfs.ext4` arguments for a disk at `path`, from `dir` (`-d`) when given.
pub(super) fn mkfs_args(path: &Path, dir: Option<&Path>, inodes: Option<u64>) -> Vec<String> {
    let mut args: Vec<String> = ["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(dir) = dir {
        // The image's disk: read-only in the guest, so no journal; its root owned by root
        // whatever owns the unpacked directory.
        args.extend(
            [
                "-d",
                &dir.display().to_string(),
                "-L",
                "flint-image",
                "-O",
                "^has_journal",
                "-E",
                "root_owner=0:0",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
    } else {
        args.extend(["-L", "flint-scratch"].iter().map(|s| s.to_string()));
    }
    if let Some(n) = inodes {
        args.push("-N".into());
        args.push(n.to_string());
    }
    args.push(path.display().to_string());
    args
}

/// Make a sparse file of `bytes` at `path` (which must not exist) and an ext4 file system in
/// it, from `dir` when given.
fn make_ext4(
    path: &Path,
    bytes: u64,
    dir: Option<&Path>,
    inodes: Option<u64>,
) -> Result<(), ImageError> {
    make_ext4_with(path, bytes, dir, inodes, &mut |_| {})
}

/// [`make_ext4`], with `customize` applied to the `mkfs.ext4` command before it runs (e.g. to
/// mount `dir` in a mount namespace of the command's own). A failure to start the command
/// (other than a missing `mkfs.ext4`) is [`ImageError::Io`] on `path`.
pub(super) fn make_ext4_with(
    path: &Path,
    bytes: u64,
    dir: Option<&Path>,
    inodes: Option<u64>,
    customize: &mut dyn FnMut(&mut Command),
) -> Result<(), ImageError> {
    let file = File::options()
        .create_new(true)
        .write(true)
        .mode_private()
        .open(path)
        .map_err(io_at(path))?;
    file.set_len(bytes).map_err(io_at(path))?;
    drop(file);
    let mut command = Command::new("mkfs.ext4");
    command
        .args(mkfs_args(path, dir, inodes))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    customize(&mut command);
    let out = command.output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let _ = fs::remove_file(path);
            return Err(ImageError::NoMkfs);
        }
        Err(e) => {
            let _ = fs::remove_file(path);
            return Err(io_at(path)(e));
        }
    };
    if !out.status.success() {
        let _ = fs::remove_file(path);
        let text = String::from_utf8_lossy(&out.stderr);
        let text = if text.trim().is_empty() {
            String::from_utf8_lossy(&out.stdout)
        } else {
            text
        };
        let last = text
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map_or_else(|| out.status.to_string(), str::to_string);
        return Err(ImageError::Mkfs {
            path: path.to_path_buf(),
            message: last,
        });
    }
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_at(path))?;
    Ok(())
}

/// Remove the `/lost+found` that `mkfs.ext4` makes (the image has none; its disk is never
/// checked or repaired) with `debugfs` (e2fsprogs too). Cosmetic: a failure is only logged.
pub(super) fn remove_lost_found(disk: &Path) {
    let out = Command::new("debugfs")
        .args(["-w", "-R", "rmdir /lost+found"])
        .arg(disk)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => log::debug!(
            "image: debugfs could not remove /lost+found: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => log::debug!("image: cannot run debugfs to remove /lost+found: {e}"),
    }
}

/// A throwaway ext4 disk of `bytes` for the overlay's writes, `scratch.ext4` in `work` (the
/// run's private directory, removed after it).
pub(super) fn make_scratch(work: &Path, bytes: u64) -> Result<PathBuf, ImageError> {
    let path = work.join("scratch.ext4");
    make_ext4(&path, bytes, None, None)?;
    Ok(path)
}

/// The overrides of the image's configuration that `options` ask for.
pub(super) fn overrides(options: &super::RunOptions) -> RunOverrides {
    let command = &options.command;
    RunOverrides {
        command: (!command.argv.is_empty()).then(|| command.argv.clone()),
        entrypoint: options.entrypoint.as_ref().map(|e| {
            if e.is_empty() {
                Vec::new()
            } else {
                vec![e.clone()]
            }
        }),
        env: command
            .env
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect(),
        workdir: command.workdir.clone(),
        user: options.user.clone(),
    }
}

/// Write `data` to a new file (tests).
#[cfg(test)]
fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    io::Write::write_all(&mut File::create_new(path)?, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flint-image-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_disk_has_room_for_the_tree_and_its_metadata() {
        let (bytes, inodes) = disk_geometry(&TreeSize {
            data: 100 << 20,
            inodes: 1000,
        });
        assert_eq!(inodes, 1164);
        // 100 MiB + 1164 inodes of 256 bytes, 20% more, 16 MiB more: whole MiB.
        let raw = (100u64 << 20) + 1164 * 256;
        assert!(bytes >= raw + raw / 5 + (16 << 20), "{bytes}");
        assert!(bytes < raw + raw / 5 + (17 << 20), "{bytes}");
        assert_eq!(bytes % (1 << 20), 0);
        // An empty tree still gets a usable file system.
        let (bytes, inodes) = disk_geometry(&TreeSize::default());
        assert_eq!((bytes, inodes), (17 << 20, 64));
    }

    #[test]
    fn the_tree_is_measured_without_following_links_and_hard_links_once() {
        let dir = scratch("measure");
        let tree = dir.join("t");
        fs::create_dir_all(tree.join("sub")).unwrap();
        write_new(&tree.join("a"), &[1; 5000]).unwrap();
        fs::hard_link(tree.join("a"), tree.join("sub/b")).unwrap();
        write_new(&tree.join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("a", tree.join("short")).unwrap();
        std::os::unix::fs::symlink("x".repeat(100), tree.join("long")).unwrap();
        // A link out of the tree is not followed.
        std::os::unix::fs::symlink("/usr", tree.join("usr")).unwrap();
        let size = measure(&tree).unwrap();
        // Two directories, a (once), empty, three links.
        assert_eq!(size.inodes, 7);
        // a: 2 blocks; the long link: 1; each directory: 1.
        assert_eq!(size.data, 5 * BLOCK);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mkfs_is_asked_for_a_read_only_image_or_a_scratch_disk() {
        let args = mkfs_args(
            Path::new("/c/d.ext4"),
            Some(Path::new("/t/rootfs")),
            Some(99),
        );
        let line = args.join(" ");
        assert_eq!(
            line,
            "-q -F -b 4096 -I 256 -m 0 -d /t/rootfs -L flint-image -O ^has_journal \
             -E root_owner=0:0 -N 99 /c/d.ext4"
        );
        let args = mkfs_args(Path::new("/w/scratch.ext4"), None, None);
        assert_eq!(
            args.join(" "),
            "-q -F -b 4096 -I 256 -m 0 -L flint-scratch /w/scratch.ext4"
        );
    }

    #[test]
    fn run_options_become_the_image_overrides() {
        let options = super::super::RunOptions {
            user: Some("app:staff".into()),
            entrypoint: Some(String::new()),
            command: super::super::CommandOptions {
                argv: vec!["ls".into(), "-l".into()],
                env: vec![("A".into(), "1=2".into())],
                workdir: Some("/srv".into()),
            },
            ..Default::default()
        };
        let o = overrides(&options);
        assert_eq!(o.command, Some(vec!["ls".to_string(), "-l".to_string()]));
        assert_eq!(o.entrypoint, Some(Vec::new()));
        assert_eq!(o.env, vec!["A=1=2".to_string()]);
        assert_eq!(o.workdir.as_deref(), Some("/srv"));
        assert_eq!(o.user.as_deref(), Some("app:staff"));
        // No COMMAND: the image's Cmd; no --entrypoint: the image's.
        let o = overrides(&super::super::RunOptions {
            entrypoint: Some("/bin/sh".into()),
            ..Default::default()
        });
        assert_eq!(o.command, None);
        assert_eq!(o.entrypoint, Some(vec!["/bin/sh".to_string()]));
    }
}
