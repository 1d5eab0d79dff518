//! The image cache: blobs keyed by their sha256 digest and shared between images, and a record of
//! which images (by manifest digest) use which blobs.
//!
//! Layout under the cache directory:
//! - `blobs/sha256/HEX`: one file per blob, complete and verified;
//! - `images/HEX.json`: one [`ImageRecord`] per image, named by its manifest digest;
//! - `tmp/`: blobs being written; a blob is hashed while written to a temporary file here, then
//!   synced and renamed into `blobs/`, so an interrupted, truncated or mismatching write leaves
//!   no entry; `tmp/partial-HEX` is a blob a registry pull was downloading
//!   ([`Store::partial_blob`]): kept when the download is cut short so that the next pull
//!   resumes it, never visible in `blobs/` before it is complete and verified;
//! - `lock`: imports hold it shared, [`Store::prune`] exclusively, so a prune never removes a
//!   blob an import has written but not yet recorded.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, HashingReader};
use crate::source::{Image, ImageSource, SourceError};
use crate::unpack::LayerInput;

/// Why the cache could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the image cache at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("blob {digest} does not match its digest (its content hashes to {actual}), so it was not cached")]
    DigestMismatch { digest: Digest, actual: Digest },
    #[error("blob {digest} is truncated ({got} of {expected} bytes), so it was not cached")]
    Truncated {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("blob {digest} is longer than the {expected} bytes its descriptor gives, so it was not cached")]
    TooLong { digest: Digest, expected: u64 },
    #[error("cannot read blob {digest} ({source}), so it was not cached")]
    Read { digest: Digest, source: io::Error },
    #[error("the image cache has no blob {0}")]
    MissingBlob(Digest),
    #[error("the image cache has no image with manifest {0}")]
    UnknownImage(Digest),
    #[error("the image record {path} is damaged: {source}")]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Which blobs an image uses, and the names it was imported under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest: Digest,
    pub names: Vec<String>,
    /// The manifest, the configuration and the layers.
    pub blobs: Vec<Digest>,
}

/// What [`Store::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub blobs: usize,
    pub bytes: u64,
}

/// A blob cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the cache at `root`, creating its directories.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let s = Store {
            root: root.to_path_buf(),
        };
        // Only its owner may enter the cache: images unpacked next to it hold setuid programs.
        for d in [
            s.root.clone(),
            s.root.join("blobs/sha256"),
            s.root.join("images"),
            s.root.join("tmp"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|source| StoreError::Io {
                    path: d.clone(),
                    source,
                })?;
        }
        Ok(s)
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            path: path.clone(),
            source,
        }
    }

    /// Where the blob with `digest` is (or would be).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob is cached.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a cached blob.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        File::open(self.blob_path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(digest.clone()),
            _ => StoreError::Io {
                path: self.blob_path(digest),
                source: e,
            },
        })
    }

    /// Caches the blob read from `reader`, which must hash to `digest` and, if `size` is given,
    /// be exactly that long. Nothing is cached unless both hold. A blob already cached is not
    /// read again.
    pub fn put_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
        reader: impl Read,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(digest);
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&tmp_dir)
            .map_err(self.io(&tmp_dir))?;
        let limit = size.map_or(u64::MAX, |s| s.saturating_add(1));
        let mut hashing = HashingReader::new(reader.take(limit));
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match hashing.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(StoreError::Read {
                        digest: digest.clone(),
                        source,
                    })
                }
            };
            tmp.as_file_mut()
                .write_all(&buf[..n])
                .map_err(self.io(tmp.path()))?;
        }
        let (actual, got) = hashing.finish();
        if let Some(expected) = size {
            if got > expected {
                return Err(StoreError::TooLong {
                    digest: digest.clone(),
                    expected,
                });
            }
            if got < expected {
                return Err(StoreError::Truncated {
                    digest: digest.clone(),
                    expected,
                    got,
                });
            }
        }
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                digest: digest.clone(),
                actual,
            });
        }
        tmp.as_file().sync_all().map_err(self.io(tmp.path()))?;
        tmp.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        Ok(dest)
    }

    /// Caches every blob of the image read from `source` and records the image under `names`.
    pub fn import(&self, source: &ImageSource, names: &[String]) -> Result<Image, StoreError> {
        let _lock = self.lock(false)?;
        let image = source.image();
        self.put_blob(
            &image.manifest_digest,
            Some(image.manifest_bytes.len() as u64),
            &image.manifest_bytes[..],
        )?;
        self.put_blob(
            &image.config_digest,
            Some(image.config_bytes.len() as u64),
            &image.config_bytes[..],
        )?;
        for l in &image.layers {
            if !self.has_blob(&l.digest) {
                self.put_blob(&l.digest, Some(l.size), source.open_blob(&l.digest)?)?;
            }
        }
        self.add_record(image, names)?;
        Ok(image.clone())
    }

    /// Records `image` (all its blobs cached) under `names` and the names it had.
    fn add_record(&self, image: &Image, names: &[String]) -> Result<(), StoreError> {
        let mut names_all = names.to_vec();
        if let Ok(old) = self.record(&image.manifest_digest) {
            for n in old.names {
                if !names_all.contains(&n) {
                    names_all.push(n);
                }
            }
        }
        let mut blobs = vec![image.manifest_digest.clone(), image.config_digest.clone()];
        blobs.extend(image.layers.iter().map(|l| l.digest.clone()));
        self.write_record(&ImageRecord {
            manifest: image.manifest_digest.clone(),
            names: names_all,
            blobs,
        })
    }

    /// Records `image`, pulled from a registry with all its blobs cached, under `name`, which
    /// no other image keeps: a tag names one image at a time.
    pub(crate) fn record_pulled(&self, image: &Image, name: &str) -> Result<(), StoreError> {
        for mut other in self.images()? {
            if other.manifest != image.manifest_digest && other.names.iter().any(|n| n == name) {
                other.names.retain(|n| n != name);
                self.write_record(&other)?;
            }
        }
        self.add_record(image, &[name.to_string()])
    }

    /// The cached image recorded under `name`, if any.
    pub fn find_name(&self, name: &str) -> Result<Option<Digest>, StoreError> {
        Ok(self
            .images()?
            .into_iter()
            .find(|r| r.names.iter().any(|n| n == name))
            .map(|r| r.manifest))
    }

    /// Held (shared) while blobs are added for an image not yet recorded, so that
    /// [`Store::prune`] does not remove them meanwhile.
    pub(crate) fn import_lock(&self) -> Result<File, StoreError> {
        self.lock(false)
    }

    /// The partial download of the blob `digest` (`tmp/partial-HEX`), created empty if there
    /// is none, held exclusively (a concurrent pull of the same blob waits for it).
    pub(crate) fn partial_blob(&self, digest: &Digest) -> Result<PartialBlob, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let path = self
            .root
            .join("tmp")
            .join(format!("partial-{}", digest.hex()));
        let file = loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(self.io(&path))?;
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
                StoreError::Io {
                    path: path.clone(),
                    source: e.into(),
                }
            })?;
            // The pull that held it may have finished (renamed) or refused (removed) it.
            let held = file.metadata().map_err(self.io(&path))?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => break file,
                _ => continue,
            }
        };
        let len = file.metadata().map_err(self.io(&path))?.len();
        Ok(PartialBlob {
            store: self.clone(),
            digest: digest.clone(),
            path,
            file,
            len,
        })
    }

    fn record_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", manifest.hex()))
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        let dir = self.root.join("images");
        let mut tmp = tempfile::Builder::new()
            .prefix(".record-")
            .tempfile_in(&dir)
            .map_err(self.io(&dir))?;
        serde_json::to_writer_pretty(tmp.as_file_mut(), rec).expect("a record serializes");
        let dest = self.record_path(&rec.manifest);
        tmp.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    fn record(&self, manifest: &Digest) -> Result<ImageRecord, StoreError> {
        let p = self.record_path(manifest);
        let bytes = fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::UnknownImage(manifest.clone()),
            _ => StoreError::Io {
                path: p.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Record { path: p, source })
    }

    /// The cached images, ordered by manifest digest.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(self.io(&dir))? {
            let e = e.map_err(self.io(&dir))?;
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(d) = format!("sha256:{hex}").parse::<Digest>() else {
                continue;
            };
            out.push(self.record(&d)?);
        }
        out.sort_by(|a, b| a.manifest.cmp(&b.manifest));
        Ok(out)
    }

    /// A cached image, read back from its manifest and configuration blobs.
    pub fn image(&self, manifest: &Digest) -> Result<Image, StoreError> {
        self.record(manifest)?;
        let read = |d: &Digest| -> Result<Vec<u8>, StoreError> {
            let mut v = Vec::new();
            self.open_blob(d)?
                .read_to_end(&mut v)
                .map_err(self.io(&self.blob_path(d)))?;
            Ok(v)
        };
        let manifest_bytes = read(manifest)?;
        let m: oci_spec::image::ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| StoreError::Record {
                path: self.blob_path(manifest),
                source,
            })?;
        let config_digest =
            Digest::try_from(m.config().digest()).map_err(|source| SourceError::Digest {
                path: self.blob_path(manifest),
                source,
            })?;
        let config_bytes = read(&config_digest)?;
        Ok(Image::from_parts(
            &self.blob_path(manifest),
            manifest.clone(),
            manifest_bytes,
            config_bytes,
        )?)
    }

    /// The layers of a cached image, ready for [`crate::unpack::unpack`].
    pub fn layer_inputs(&self, image: &Image) -> Result<Vec<LayerInput<'static>>, StoreError> {
        image
            .layers
            .iter()
            .map(|l| {
                Ok(LayerInput {
                    name: l.digest.short(),
                    reader: Box::new(self.open_blob(&l.digest)?),
                    compression: l.compression,
                    diff_id: l.diff_id.clone(),
                })
            })
            .collect()
    }

    /// Forgets an image; its blobs stay until [`Store::prune`].
    pub fn remove_image(&self, manifest: &Digest) -> Result<(), StoreError> {
        let p = self.record_path(manifest);
        fs::remove_file(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::UnknownImage(manifest.clone()),
            _ => StoreError::Io {
                path: p.clone(),
                source: e,
            },
        })
    }

    /// Removes the blobs no recorded image uses, and leftover temporary files.
    pub fn prune(&self) -> Result<PruneStats, StoreError> {
        let _lock = self.lock(true)?;
        let used: std::collections::HashSet<Digest> =
            self.images()?.into_iter().flat_map(|r| r.blobs).collect();
        let mut stats = PruneStats::default();
        let dir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&dir).map_err(self.io(&dir))? {
            let e = e.map_err(self.io(&dir))?;
            let keep = e
                .file_name()
                .to_str()
                .and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
                .is_some_and(|d| used.contains(&d));
            if !keep {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(self.io(&e.path()))?;
                stats.blobs += 1;
                stats.bytes += len;
            }
        }
        // With the lock held exclusively no import is writing: every temporary file is stale.
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(self.io(&tmp))? {
            let e = e.map_err(self.io(&tmp))?;
            let _ = fs::remove_file(e.path());
        }
        Ok(stats)
    }

    fn lock(&self, exclusive: bool) -> Result<File, StoreError> {
        let p = self.root.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(self.io(&p))?;
        let op = if exclusive {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::LockShared
        };
        rustix::fs::flock(&f, op).map_err(|e| StoreError::Io {
            path: p,
            source: e.into(),
        })?;
        Ok(f)
    }
}

/// A blob being downloaded into `tmp/partial-HEX`: appended to as bytes arrive, kept when the
/// download is cut short, and moved into `blobs/` by [`PartialBlob::finish`] only once it is
/// complete and hashes to its digest.
#[derive(Debug)]
pub(crate) struct PartialBlob {
    store: Store,
    digest: Digest,
    path: PathBuf,
    file: File,
    len: u64,
}

impl PartialBlob {
    /// The bytes downloaded so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Drops what was downloaded, to start again from the first byte.
    pub(crate) fn restart(&mut self) -> Result<(), StoreError> {
        self.file.set_len(0).map_err(self.store.io(&self.path))?;
        self.len = 0;
        Ok(())
    }

    /// Appends `data`.
    pub(crate) fn append(&mut self, data: &[u8]) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, self.len)
            .map_err(self.store.io(&self.path))?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Verifies the whole download against the digest and `size` and moves it into the cache.
    /// A download of the right size that does not hash to its digest is removed (the next pull
    /// starts it again).
    pub(crate) fn finish(self, size: u64) -> Result<PathBuf, StoreError> {
        if self.len < size {
            return Err(StoreError::Truncated {
                digest: self.digest.clone(),
                expected: size,
                got: self.len,
            });
        }
        let mut hashing = HashingReader::new((&self.file).take(size.saturating_add(1)));
        let read = io::copy(
            &mut io::BufReader::with_capacity(1 << 16, &mut hashing),
            &mut io::sink(),
        );
        let (actual, got) = hashing.finish();
        let refused = match read {
            Err(source) => Some(StoreError::Io {
                path: self.path.clone(),
                source,
            }),
            Ok(_) if got != size => Some(StoreError::TooLong {
                digest: self.digest.clone(),
                expected: size,
            }),
            Ok(_) if actual != self.digest => Some(StoreError::DigestMismatch {
                digest: self.digest.clone(),
                actual,
            }),
            Ok(_) => None,
        };
        if let Some(e) = refused {
            let _ = fs::remove_file(&self.path);
            return Err(e);
        }
        self.file.sync_all().map_err(self.store.io(&self.path))?;
        let dest = self.store.blob_path(&self.digest);
        fs::rename(&self.path, &dest).map_err(self.store.io(&dest))?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use super::*;
    use crate::testutil::*;
    use crate::unpack::{unpack, Limits};

    fn tmp_is_empty(s: &Store) -> bool {
        fs::read_dir(s.root.join("tmp")).unwrap().count() == 0
    }

    #[test]
    fn a_partial_download_resumes_and_enters_the_cache_only_verified() {
        let dir = crate::testutil::tempdir();
        let s = Store::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&data);
        // Cut short: kept in tmp/, not in the cache; the next try carries on from there.
        let mut p = s.partial_blob(&d).unwrap();
        p.append(&data[..30_000]).unwrap();
        assert!(matches!(
            p.finish(100_000),
            Err(StoreError::Truncated { got: 30_000, .. })
        ));
        assert!(!s.has_blob(&d));
        let mut p = s.partial_blob(&d).unwrap();
        assert_eq!(p.len(), 30_000);
        p.append(&data[30_000..]).unwrap();
        let path = p.finish(100_000).unwrap();
        assert_eq!(fs::read(path).unwrap(), data);
        assert!(tmp_is_empty(&s));
        // A complete download that does not hash to its digest is dropped, so the next try
        // starts from the first byte.
        let other = Digest::of(b"other");
        let mut p = s.partial_blob(&other).unwrap();
        p.append(b"otheR").unwrap();
        assert!(matches!(
            p.finish(5),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!s.has_blob(&other) && tmp_is_empty(&s));
        let mut p = s.partial_blob(&other).unwrap();
        assert_eq!(p.len(), 0);
        p.append(b"oth").unwrap();
        p.restart().unwrap();
        p.append(b"other").unwrap();
        p.finish(5).unwrap();
        assert!(s.has_blob(&other));
    }

    #[test]
    fn a_verified_blob_is_cached_once() {
        let dir = crate::testutil::tempdir();
        let s = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        let p = s.put_blob(&d, Some(5), &b"hello"[..]).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        assert!(s.has_blob(&d));
        // Already cached: not read again.
        s.put_blob(&d, Some(5), &b"junk"[..]).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        assert!(tmp_is_empty(&s));
    }

    #[test]
    fn mismatching_truncated_long_or_interrupted_blobs_leave_no_entry() {
        let dir = crate::testutil::tempdir();
        let s = Store::open(dir.path()).unwrap();
        let data = vec![9u8; 100_000];
        let d = Digest::of(&data);

        let err = s
            .put_blob(&d, Some(100_000), &vec![8u8; 100_000][..])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("blob {d} does not match its digest (its content hashes to {}), so it was not cached", Digest::of(&[8u8; 100_000]))
        );
        let err = s.put_blob(&d, Some(100_000), &data[..50_000]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("blob {d} is truncated (50000 of 100000 bytes), so it was not cached")
        );
        let err = s.put_blob(&d, Some(99_999), &data[..]).unwrap_err();
        assert!(matches!(err, StoreError::TooLong { .. }), "{err}");
        // Without a size, a truncated blob is a digest mismatch.
        let err = s.put_blob(&d, None, &data[..50_000]).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");

        struct Interrupted(usize);
        impl Read for Interrupted {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "connection reset",
                    ));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(9);
                self.0 -= n;
                Ok(n)
            }
        }
        let err = s
            .put_blob(&d, Some(100_000), Interrupted(70_000))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read blob {d} (connection reset), so it was not cached")
        );

        assert!(!s.has_blob(&d));
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        assert!(tmp_is_empty(&s));
        // A later complete download succeeds.
        s.put_blob(&d, Some(100_000), &data[..]).unwrap();
        assert!(s.has_blob(&d));
    }

    #[test]
    fn a_layer_that_does_not_match_its_descriptor_is_not_imported() {
        let dir = crate::testutil::tempdir();
        let layout = dir.path().join("layout");
        let m = write_image(
            &layout,
            "amd64",
            &[Tar::new().file("a", 0o644, b"a").bytes()],
            json!({}),
        );
        write_index(&layout, vec![manifest_desc(&m, None)]);
        let src = ImageSource::open_layout(&layout).unwrap();
        let l = src.image().layers[0].digest.clone();
        // Corrupt the layer blob after the source was read.
        let p = layout.join("blobs/sha256").join(l.hex());
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&p, &bytes).unwrap();
        let s = Store::open(&dir.path().join("cache")).unwrap();
        let err = s.import(&src, &[]).unwrap_err();
        assert!(
            matches!(&err, StoreError::DigestMismatch { digest, .. } if *digest == l),
            "{err}"
        );
        assert!(!s.has_blob(&l));
        assert!(s.images().unwrap().is_empty());
        assert!(tmp_is_empty(&s));
    }

    #[test]
    fn images_share_blobs_and_prune_removes_only_unused_ones() {
        let dir = crate::testutil::tempdir();
        let shared = Tar::new().file("shared", 0o644, b"common base").bytes();
        let make = |name: &str, own: &[u8]| {
            let layout = dir.path().join(name);
            let m = write_image(
                &layout,
                "amd64",
                &[shared.clone(), Tar::new().file(name, 0o644, own).bytes()],
                json!({}),
            );
            write_index(&layout, vec![manifest_desc(&m, None)]);
            ImageSource::open_layout(&layout).unwrap()
        };
        let (a, b) = (make("a", b"aa"), make("b", b"bb"));
        let s = Store::open(&dir.path().join("cache")).unwrap();
        let ia = s.import(&a, &["a:latest".into()]).unwrap();
        let ib = s.import(&b, &["b:latest".into()]).unwrap();
        assert_eq!(
            ia.layers[0].digest, ib.layers[0].digest,
            "the base layer is one blob"
        );
        let blobs = || {
            fs::read_dir(dir.path().join("cache/blobs/sha256"))
                .unwrap()
                .count()
        };
        assert_eq!(blobs(), 7, "2 manifests, 2 configs, 3 layers");
        let recs = s.images().unwrap();
        assert_eq!(recs.len(), 2);
        assert!(recs
            .iter()
            .any(|r| r.manifest == ia.manifest_digest && r.names == ["a:latest"]));

        // A cached image reads back and unpacks from the cache alone.
        let back = s.image(&ia.manifest_digest).unwrap();
        assert_eq!(back.layers, ia.layers);
        let root = dir.path().join("rootfs");
        unpack(s.layer_inputs(&back).unwrap(), &root, &Limits::default()).unwrap();
        assert_eq!(fs::read(root.join("shared")).unwrap(), b"common base");
        assert_eq!(fs::read(root.join("a")).unwrap(), b"aa");

        assert_eq!(s.prune().unwrap(), PruneStats::default());
        s.remove_image(&ia.manifest_digest).unwrap();
        let pruned = s.prune().unwrap();
        assert_eq!(pruned.blobs, 3, "a's manifest, config and own layer");
        assert!(s.has_blob(&ib.layers[0].digest) && s.has_blob(&ib.layers[1].digest));
        assert!(s.image(&ib.manifest_digest).is_ok());
        assert!(matches!(
            s.remove_image(&ia.manifest_digest),
            Err(StoreError::UnknownImage(_))
        ));
        s.remove_image(&ib.manifest_digest).unwrap();
        assert_eq!(s.prune().unwrap().blobs, 4);
        assert_eq!(blobs(), 0);
    }
}
