//! `flint image pull|ls|rm|prune`: the cache of container images that `flint run --image`
//! keeps in `$FLINT_CACHE/images` (its layout is described in [`super::image`]), managed by
//! hand.
//!
//! Removing an image's disk also removes the sandbox templates (snapshots in
//! `$FLINT_CACHE/sandbox/snapshots`) whose VM had it: their key names the disk's inode and
//! modification time, so no run could restore them again.
//!
//! An image is in use while a `flint run --image` of it holds a shared lock on its lock file
//! (`disks/<hex>.lock`): `rm` and `prune` remove an image's disk only under an exclusive lock
//! of that file, taken without waiting, so they never pull a disk from under a sandbox.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use flint_image::store::{ImageRecord, StoreError};
use flint_image::{Digest, ImageRef, Store};

use super::image::{images_root, io_at, lock, pull, CachePaths, ImageError};

/// What `flint image` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageCommand {
    /// Import an image (pulled again from a registry, allowed over plain HTTP from the
    /// `insecure` registries) and build its disk.
    Pull {
        reference: ImageRef,
        insecure: Vec<String>,
    },
    /// List the cached images (only their digests when `quiet`).
    List { quiet: bool },
    /// Remove the images these names or digests name.
    Remove(Vec<String>),
    /// Remove the blobs and disks no image uses.
    Prune,
}

/// The fewest hex digits of a digest that may name an image.
const MIN_PREFIX: usize = 4;
/// The hex digits `flint image ls` shows of a digest.
const SHORT: usize = 12;

/// Run `command` on the cache in `cache` (`$FLINT_CACHE`).
pub fn run(command: &ImageCommand, cache: &Path) -> ExitCode {
    let result = match command {
        ImageCommand::Pull {
            reference,
            insecure,
        } => {
            let registries = flint_image::PullOptions {
                insecure: insecure.clone(),
                ..Default::default()
            };
            pull(reference, cache, &registries).map(|d| format!("{d}\n"))
        }
        ImageCommand::List { quiet } => list(cache).map(|images| {
            if *quiet {
                images.iter().map(|i| format!("{}\n", i.digest)).collect()
            } else {
                table(&images)
            }
        }),
        ImageCommand::Remove(names) => return remove_all(names, cache),
        ImageCommand::Prune => prune(cache).map(|freed| format!("{freed}\n")),
    };
    match result {
        Ok(text) => print(&text),
        Err(e) => crate::fail(&e),
    }
}

fn print(text: &str) -> ExitCode {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::fail(&format!("cannot write to stdout: {e}")),
    }
}

/// The image store and the disks directory of the cache.
fn open(cache: &Path) -> Result<(Store, PathBuf), ImageError> {
    let root = images_root(cache)?;
    Ok((Store::open(&root.join("store"))?, root.join("disks")))
}

/// One line of `flint image ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    digest: Digest,
    names: Vec<String>,
    /// The bytes of its blobs (some may be shared with other images).
    blobs: u64,
    /// The bytes its disk and account files take, if built.
    disk: Option<u64>,
}

fn list(cache: &Path) -> Result<Vec<Listed>, ImageError> {
    let (store, disks) = open(cache)?;
    store
        .images()?
        .into_iter()
        .map(|record| {
            let paths = CachePaths::new(&disks, &record.manifest);
            let disk = paths
                .ready()
                .then(|| Ok::<_, ImageError>(usage(&paths.disk)? + usage(&paths.etc)?))
                .transpose()?;
            let blobs = record
                .blobs
                .iter()
                .map(|d| fs::metadata(store.blob_path(d)).map_or(0, |m| m.len()))
                .sum();
            Ok(Listed {
                digest: record.manifest,
                names: record.names,
                blobs,
                disk,
            })
        })
        .collect()
}

/// The table `flint image ls` prints: one image a line, names last.
fn table(images: &[Listed]) -> String {
    let rows: Vec<[String; 4]> = images
        .iter()
        .map(|i| {
            [
                i.digest.hex().chars().take(SHORT).collect(),
                human(i.blobs),
                i.disk.map_or_else(|| "-".to_string(), human),
                i.names.join(", "),
            ]
        })
        .collect();
    let header = ["DIGEST", "SIZE", "DISK", "NAMES"].map(String::from);
    let mut widths = [0; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|[digest, size, disk, names]| {
            let line = format!(
                "{digest:<w0$}  {size:>w1$}  {disk:>w2$}  {names}",
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            format!("{}\n", line.trim_end())
        })
        .collect()
}

/// `bytes` for people: B, KiB, MiB, GiB or TiB, one decimal above bytes.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The bytes a file or a tree takes on the host's disk (allocated blocks: the image's disk
/// is sparse), links not followed; 0 if it is gone.
fn usage(path: &Path) -> Result<u64, ImageError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_at(path)(e)),
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_at(path))? {
            total += usage(&entry.map_err(io_at(path))?.path())?;
        }
    }
    Ok(total)
}

/// The image `name` names among `records`: a digest (`sha256:HEX` or `HEX`, or at least
/// [`MIN_PREFIX`] of its first hex digits) or a name it was imported as (for a file, its
/// path, relative or absolute).
fn resolve(records: &[ImageRecord], name: &str) -> Result<Digest, ImageError> {
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if hex.len() >= MIN_PREFIX && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let hex = hex.to_ascii_lowercase();
        let mut found = records
            .iter()
            .filter(|r| r.manifest.hex().starts_with(&hex));
        match (found.next(), found.next()) {
            (Some(r), None) => return Ok(r.manifest.clone()),
            (Some(_), Some(_)) => return Err(ImageError::Ambiguous(name.to_string())),
            (None, _) => {}
        }
    }
    let canonical = fs::canonicalize(name).ok().map(|p| p.display().to_string());
    records
        .iter()
        .find(|r| {
            r.names
                .iter()
                .any(|n| n == name || Some(n) == canonical.as_ref())
        })
        .map(|r| r.manifest.clone())
        .ok_or_else(|| ImageError::Unknown(name.to_string()))
}

/// Hold the image's lock exclusively if no one holds it; `None` if someone does.
fn lock_unused(paths: &CachePaths) -> Result<Option<fs::File>, ImageError> {
    match lock(&paths.lock, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(file) => Ok(Some(file)),
        Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Remove the image's disk and account files (the lock held), and the sandbox templates
/// made with the disk; the bytes freed.
fn remove_disk(paths: &CachePaths, cache: &Path) -> Result<u64, ImageError> {
    let freed = usage(&paths.disk)? + usage(&paths.etc)?;
    let templates = crate::template::remove_using_disk(cache, &paths.disk);
    if templates > 0 {
        log::debug!(
            "image: removed {templates} sandbox template(s) of {}",
            paths.disk.display()
        );
    }
    // The disk first: without it, the image is not ready and will be built again.
    match fs::remove_file(&paths.disk) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&paths.disk)(e)),
        _ => {}
    }
    match fs::remove_dir_all(&paths.etc) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&paths.etc)(e)),
        _ => {}
    }
    Ok(freed)
}

/// `flint image rm`: each image, or one sentence for each that cannot be removed.
fn remove_all(names: &[String], cache: &Path) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for name in names {
        match remove(name, cache) {
            Ok(digest) => {
                if print(&format!("{digest}\n")) != ExitCode::SUCCESS {
                    return ExitCode::from(crate::STATUS_ERROR);
                }
            }
            Err(e) => code = crate::fail(&e),
        }
    }
    code
}

/// Remove the image `name` names: its record, disk, account files and lock file.
fn remove(name: &str, cache: &Path) -> Result<Digest, ImageError> {
    let (store, disks) = open(cache)?;
    let digest = resolve(&store.images()?, name)?;
    let paths = CachePaths::new(&disks, &digest);
    let Some(_lock) = lock_unused(&paths)? else {
        return Err(ImageError::InUse(digest.to_string()));
    };
    remove_disk(&paths, cache)?;
    match store.remove_image(&digest) {
        // Removed by another `rm` meanwhile.
        Err(StoreError::UnknownImage(_)) => {}
        other => other?,
    }
    let _ = fs::remove_file(&paths.lock);
    Ok(digest)
}

/// What `flint image prune` freed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Freed {
    blobs: usize,
    blob_bytes: u64,
    disks: usize,
    disk_bytes: u64,
}

impl std::fmt::Display for Freed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        write!(
            f,
            "freed {} blob{} ({}) and {} disk{} ({})",
            self.blobs,
            plural(self.blobs),
            human(self.blob_bytes),
            self.disks,
            plural(self.disks),
            human(self.disk_bytes)
        )
    }
}

/// The manifest digests that files in `disks` are named after.
fn disk_digests(disks: &Path) -> Result<Vec<Digest>, ImageError> {
    let mut digests = Vec::new();
    for entry in fs::read_dir(disks).map_err(io_at(disks))? {
        let name = entry.map_err(io_at(disks))?.file_name();
        let Some(hex) = name
            .to_str()
            .and_then(|n| n.rsplit_once('.'))
            .map(|(hex, _)| hex)
        else {
            continue;
        };
        if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
            if !digests.contains(&d) {
                digests.push(d);
            }
        }
    }
    Ok(digests)
}

/// `flint image prune`: the disks and blobs of no cached image.
fn prune(cache: &Path) -> Result<Freed, ImageError> {
    let (store, disks) = open(cache)?;
    let mut freed = Freed::default();
    for digest in disk_digests(&disks)? {
        let known =
            |store: &Store| !matches!(store.image(&digest), Err(StoreError::UnknownImage(_)));
        if known(&store) {
            continue;
        }
        let paths = CachePaths::new(&disks, &digest);
        // Being built (its record not written yet): not ours.
        let Some(_lock) = lock_unused(&paths)? else {
            continue;
        };
        // Built meanwhile, before the lock was free.
        if known(&store) {
            continue;
        }
        let bytes = remove_disk(&paths, cache)?;
        let _ = fs::remove_file(&paths.lock);
        if bytes > 0 {
            freed.disks += 1;
            freed.disk_bytes += bytes;
        }
    }
    let stats = store.prune()?;
    freed.blobs = stats.blobs;
    freed.blob_bytes = stats.bytes;
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(first: char) -> Digest {
        format!("sha256:{}", first.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn record(first: char, names: &[&str]) -> ImageRecord {
        ImageRecord {
            manifest: digest(first),
            names: names.iter().map(|n| n.to_string()).collect(),
            blobs: Vec::new(),
        }
    }

    #[test]
    fn an_image_is_named_by_its_digest_a_prefix_or_a_name() {
        let records = [record('a', &["/srv/app.tar"]), record('b', &["/srv/web"])];
        let b = digest('b');
        assert_eq!(resolve(&records, &b.to_string()).unwrap(), b);
        assert_eq!(resolve(&records, b.hex()).unwrap(), b);
        assert_eq!(resolve(&records, "bbbb").unwrap(), b);
        assert_eq!(resolve(&records, "sha256:BBBBBB").unwrap(), b);
        assert_eq!(resolve(&records, "/srv/app.tar").unwrap(), digest('a'));
        // Too short a prefix is not a digest; an unknown name is one sentence.
        let e = resolve(&records, "bbb").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no image 'bbb' in the cache (see 'flint image ls')"
        );
        assert!(matches!(
            resolve(&records, "cccc"),
            Err(ImageError::Unknown(_))
        ));
        let twins = [record('a', &[]), {
            let mut r = record('a', &[]);
            r.manifest = format!("sha256:aaaa{}", "b".repeat(60)).parse().unwrap();
            r
        }];
        assert!(matches!(
            resolve(&twins, "aaaa"),
            Err(ImageError::Ambiguous(_))
        ));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(20 << 20), "20.0 MiB");
        assert_eq!(human(3 << 40), "3.0 TiB");
    }

    #[test]
    fn the_listing_is_a_table_with_names_last() {
        let images = [
            Listed {
                digest: digest('a'),
                names: vec!["/srv/app.tar".into(), "/srv/app".into()],
                blobs: 2 << 20,
                disk: Some(20 << 20),
            },
            Listed {
                digest: digest('b'),
                names: vec!["/srv/web".into()],
                blobs: 100,
                disk: None,
            },
        ];
        assert_eq!(
            table(&images),
            "DIGEST           SIZE      DISK  NAMES\n\
             aaaaaaaaaaaa  2.0 MiB  20.0 MiB  /srv/app.tar, /srv/app\n\
             bbbbbbbbbbbb    100 B         -  /srv/web\n"
        );
        assert_eq!(table(&[]), "DIGEST  SIZE  DISK  NAMES\n");
    }

    #[test]
    fn prune_says_what_it_freed() {
        let freed = Freed {
            blobs: 1,
            blob_bytes: 2048,
            disks: 0,
            disk_bytes: 0,
        };
        assert_eq!(
            freed.to_string(),
            "freed 1 blob (2.0 KiB) and 0 disks (0 B)"
        );
    }
}
