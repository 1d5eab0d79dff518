//! Sandbox templates: a snapshot of a booted sandbox guest whose agent is listening, cached on
//! disk, that `flint run` restores instead of booting Linux.
//!
//! A template is a directory `$FLINT_CACHE/sandbox/snapshots/<key>` holding `state.json` and
//! `memory` (written by [`vmm::Vm::snapshot`]). The key covers everything the snapshot
//! depends on: the flint binary (its state format), the kernel, the initramfs and a container
//! image's disk (path, size, modification time and inode), vCPUs, memory and the entropy device. A template is made by
//! writing into a private temporary directory ([`Staging`]) and renaming it into place, so
//! concurrent runs never see half a template; when two make one at once, the first rename
//! wins.

use std::hash::Hasher;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vmm::VmConfig;

const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory";

/// FNV-1a, 64 bits: a stable hash for cache keys (std's `DefaultHasher` may change between
/// Rust releases).
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn new_hasher() -> Fnv {
    Fnv(0xcbf2_9ce4_8422_2325)
}

/// Identity of a file's contents as far as the cache cares: path, size, mtime and inode.
fn hash_file(h: &mut Fnv, path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    h.write(path.as_os_str().as_encoded_bytes());
    h.write_u8(0);
    for n in [meta.len(), meta.ino(), meta.dev()] {
        h.write_u64(n);
    }
    h.write_i64(meta.mtime());
    h.write_i64(meta.mtime_nsec());
    Ok(())
}

/// Where the template for one sandbox configuration lives.
#[derive(Debug, Clone)]
pub struct Template {
    dir: PathBuf,
    /// The key's part that names the flint binary: templates of other binaries are stale.
    binary: String,
}

impl Template {
    /// The template for sandboxes booted from `config`, under `cache` (`$FLINT_CACHE`).
    pub fn for_config(cache: &Path, config: &VmConfig) -> std::io::Result<Template> {
        let mut h = new_hasher();
        hash_file(&mut h, &std::env::current_exe()?)?;
        let binary = format!("{:016x}", h.finish());
        let mut h = new_hasher();
        hash_file(&mut h, &config.kernel)?;
        if let Some(initrd) = &config.initrd {
            hash_file(&mut h, initrd)?;
        }
        // A container image's disk (its path names the image's digest); a sandbox has no
        // other disk that a template may hold.
        for drive in &config.drives {
            hash_file(&mut h, &drive.path)?;
            h.write_u8(u8::from(drive.read_only));
        }
        // `--net nat`'s NIC (always the same TAP name and MAC address).
        for net in &config.nets {
            h.write(net.tap.as_bytes());
            h.write(&net.mac.unwrap_or_default());
        }
        h.write(config.cmdline.as_bytes());
        h.write_u32(config.vcpus);
        h.write_u64(config.mem_mib);
        h.write_u8(u8::from(config.entropy));
        // The balloon (free page reporting or none): a guest restored without the one it
        // booted with would not be the sandbox asked for.
        if let Some(b) = &config.balloon {
            h.write_u8(1);
            h.write_u32(b.amount_mib);
            h.write_u8(u8::from(b.free_page_reporting));
            h.write_u8(u8::from(b.deflate_on_oom));
            h.write_u16(b.stats_polling_interval_s);
        }
        Ok(Template {
            dir: cache
                .join("sandbox/snapshots")
                .join(format!("{binary}-{:016x}", h.finish())),
            binary,
        })
    }

    /// The state and memory files, if the template has been made, by this user, and nobody
    /// else could have changed it: see [`trusted_files`](Self::trusted_files). A template
    /// that exists but fails the checks is not used (with a warning).
    pub fn files(&self) -> Option<(PathBuf, PathBuf)> {
        if std::fs::symlink_metadata(&self.dir).is_err() {
            return None;
        }
        self.trusted_files()
            .map_err(|why| {
                log::warn!(
                    "sandbox: not using the snapshot in {}: {why}; booting instead",
                    self.dir.display()
                )
            })
            .ok()
    }

    /// The state and memory files to load, named through the template directory's canonical
    /// path (no symbolic links), after checking everything they are read through. A template
    /// anyone else could have planted or changed would run their guest in this user's
    /// sandboxes, so:
    /// - the files are regular files owned by the effective user, not group- or
    ///   world-writable;
    /// - the template directory and the directory holding it belong to the effective user
    ///   and are not group- or world-writable;
    /// - every directory above those belongs to the effective user or root and is not group-
    ///   or world-writable, unless it has the sticky bit (as `/tmp`), where nobody else can
    ///   rename or remove what is ours.
    pub fn trusted_files(&self) -> Result<(PathBuf, PathBuf), String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let dir = std::fs::canonicalize(&self.dir)
            .map_err(|e| format!("cannot resolve {}: {e}", self.dir.display()))?;
        let meta = |path: &Path| {
            std::fs::symlink_metadata(path)
                .map_err(|e| format!("cannot inspect {}: {e}", path.display()))
        };
        let writable_by_others = |m: &std::fs::Metadata| m.mode() & 0o022 != 0;
        for (depth, ancestor) in dir.ancestors().enumerate() {
            let m = meta(ancestor)?;
            let shown = ancestor.display();
            if !m.is_dir() {
                return Err(format!("{shown} is not a directory"));
            }
            if depth <= 1 {
                // The template directory and the snapshot cache holding it: private.
                if m.uid() != me {
                    return Err(format!("{shown} belongs to another user"));
                }
                if writable_by_others(&m) {
                    return Err(format!("{shown} is writable by other users"));
                }
            } else {
                if m.uid() != me && m.uid() != 0 {
                    return Err(format!("{shown} belongs to another user"));
                }
                if writable_by_others(&m) && m.mode() & libc::S_ISVTX == 0 {
                    return Err(format!("{shown} is writable by other users"));
                }
            }
        }
        let state = dir.join(STATE_FILE);
        let memory = dir.join(MEMORY_FILE);
        for file in [&state, &memory] {
            let m = meta(file)?;
            let shown = file.display();
            if !m.file_type().is_file() {
                return Err(format!("{shown} is not a regular file"));
            }
            if m.uid() != me {
                return Err(format!("{shown} belongs to another user"));
            }
            if writable_by_others(&m) {
                return Err(format!("{shown} is writable by other users"));
            }
        }
        Ok((state, memory))
    }

    /// Remove a template that could not be restored, so that the next run makes a new one.
    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Get ready to make the template: create its private temporary directory. Done before
    /// the VM starts, as the VMM thread's seccomp filter allows no `mkdir` or `chmod`.
    pub fn prepare(&self) -> Result<Staging, String> {
        use std::os::unix::fs::DirBuilderExt;
        let parent = self.dir.parent().unwrap_or(Path::new("/"));
        // New directories are private from the start; an existing cache is made private.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        std::fs::set_permissions(parent, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", parent.display()))?;
        remove_abandoned(parent);
        let tmp = parent.join(format!(".new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        Ok(Staging {
            template: self.clone(),
            tmp,
        })
    }

    /// Remove the templates of other flint binaries.
    fn remove_stale(&self, parent: &Path) {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with('.') && !name.starts_with(&self.binary) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Remove the templates under `cache` (`$FLINT_CACHE`) whose VM has the disk `disk` (a
/// container image's, removed from the cache): nothing could restore them, as a rebuilt disk
/// makes another key. A template whose state cannot be read is left alone. Returns how
/// many were removed.
pub fn remove_using_disk(cache: &Path, disk: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(cache.join("sandbox/snapshots")) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if uses_disk(&entry.path().join(STATE_FILE), disk)
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Whether the state file at `state` (flint's own: [`vmm::snapshot::SnapshotState`]) is of a
/// VM with the disk `disk`. Only the drives of its configuration are read.
fn uses_disk(state: &Path, disk: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct State {
        config: Config,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        drives: Vec<Drive>,
    }
    #[derive(serde::Deserialize)]
    struct Drive {
        path: PathBuf,
    }
    let Ok(file) = std::fs::File::open(state) else {
        return false;
    };
    serde_json::from_reader::<_, State>(std::io::BufReader::new(file))
        .is_ok_and(|s| s.config.drives.iter().any(|d| d.path == disk))
}

/// Remove the staging directories (`.new-PID`) of runs that died while making a template.
fn remove_abandoned(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".new-"))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists; nothing is sent.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A template being made: its files go into a private temporary directory that becomes the
/// template when complete, and is removed otherwise.
#[derive(Debug)]
pub struct Staging {
    template: Template,
    tmp: PathBuf,
}

impl Staging {
    /// Make the template with `write(state_path, memory_path)`, which writes both files.
    /// Templates of other flint binaries are removed: they can never be used again.
    pub fn commit(
        self,
        write: impl FnOnce(&Path, &Path) -> Result<(), String>,
    ) -> Result<(), String> {
        write(&self.tmp.join(STATE_FILE), &self.tmp.join(MEMORY_FILE))?;
        // When another run made the template first, the directory exists and is not empty:
        // that one stays, and dropping `self` removes this one.
        let _ = std::fs::rename(&self.tmp, &self.template.dir);
        if let Some(parent) = self.template.dir.parent() {
            self.template.remove_stale(parent);
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flint-template-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_key_follows_the_kernel_image_and_machine() {
        let dir = scratch("key");
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("image"), b"image").unwrap();
        let mut config = VmConfig::new(dir.join("vmlinux"));
        config.initrd = Some(dir.join("image"));
        let key = |c: &VmConfig| Template::for_config(&dir, c).unwrap().dir;
        let first = key(&config);
        assert_eq!(key(&config), first, "the key is stable");
        let mut more_memory = config.clone();
        more_memory.mem_mib *= 2;
        let mut two_cpus = config.clone();
        two_cpus.vcpus = 2;
        assert_ne!(key(&more_memory), first);
        assert_ne!(key(&two_cpus), first);
        // With and without free page reporting: two templates.
        let mut reporting = config.clone();
        reporting.balloon = Some(vmm::BalloonConfig {
            free_page_reporting: true,
            ..Default::default()
        });
        assert_ne!(key(&reporting), first);
        // A container image's disk is part of the key: another image, another template.
        std::fs::write(dir.join("a.ext4"), b"disk a").unwrap();
        std::fs::write(dir.join("b.ext4"), b"disk b").unwrap();
        let with_disk = |name: &str| {
            let mut c = config.clone();
            let mut drive = vmm::DriveConfig::new(dir.join(name));
            drive.read_only = true;
            c.drives.push(drive);
            c
        };
        let disk_a = key(&with_disk("a.ext4"));
        assert_ne!(disk_a, first);
        assert_eq!(key(&with_disk("a.ext4")), disk_a);
        assert_ne!(key(&with_disk("b.ext4")), disk_a);
        std::fs::write(dir.join("image"), b"a different image").unwrap();
        assert_ne!(key(&config), first, "a rebuilt image makes a new template");
        std::fs::remove_file(dir.join("image")).unwrap();
        assert!(Template::for_config(&dir, &config).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_template_appears_whole_or_not_at_all_and_stale_ones_go() {
        let dir = scratch("make");
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        let config = VmConfig::new(dir.join("vmlinux"));
        let template = Template::for_config(&dir, &config).unwrap();
        let stale = dir.join("sandbox/snapshots/0000000000000000-1111111111111111");
        std::fs::create_dir_all(&stale).unwrap();
        assert!(template.files().is_none());

        let err = template
            .prepare()
            .unwrap()
            .commit(|state, _| {
                std::fs::write(state, b"{}").unwrap();
                Err("the VM could not be paused".into())
            })
            .unwrap_err();
        assert_eq!(err, "the VM could not be paused");
        assert!(template.files().is_none());
        assert!(
            stale.exists(),
            "nothing is removed when no template was made"
        );

        template
            .prepare()
            .unwrap()
            .commit(|state, memory| {
                std::fs::write(state, b"{}").unwrap();
                std::fs::write(memory, b"").unwrap();
                Ok(())
            })
            .unwrap();
        let (state, memory) = template.files().unwrap();
        assert!(state.is_file() && memory.is_file());
        assert!(
            !stale.exists(),
            "templates of other flint binaries are removed"
        );
        let left = || -> Vec<_> {
            std::fs::read_dir(dir.join("sandbox/snapshots"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        assert_eq!(
            left().len(),
            1,
            "no temporary directory is left: {:?}",
            left()
        );

        // The cache is private to its user.
        let mode = std::fs::metadata(dir.join("sandbox/snapshots"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // A template others could have written is not used.
        let (_, memory) = template.files().unwrap();
        std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            template.files().is_none(),
            "a world-writable memory file is used"
        );
        std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(template.files().is_some());
        // The staging directory of a run that died is removed by the next maker.
        let dead = dir.join("sandbox/snapshots/.new-999999999");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join(MEMORY_FILE), b"x").unwrap();
        drop(template.prepare().unwrap());
        assert!(!dead.exists(), "an abandoned staging directory stayed");

        // A second maker (another run that raced) leaves the first template in place.
        template.prepare().unwrap().commit(|_, _| Ok(())).unwrap();
        assert!(template.files().is_some());
        drop(template.prepare().unwrap());
        assert_eq!(left().len(), 1, "an unused staging directory is removed");
        template.discard();
        assert!(template.files().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_templates_of_a_removed_disk_go_and_others_stay() {
        let dir = scratch("by-disk");
        let snapshots = dir.join("sandbox/snapshots");
        let template = |name: &str, state: &str| {
            std::fs::create_dir_all(snapshots.join(name)).unwrap();
            std::fs::write(snapshots.join(name).join(STATE_FILE), state).unwrap();
        };
        let disk = dir.join("images/disks/a.ext4");
        let with = |path: &Path| {
            serde_json::json!({ "magic": "x", "config": { "kernel": "/k", "drives": [
                { "path": "/other.ext4" }, { "path": path } ] } })
            .to_string()
        };
        template("b-1", &with(&disk));
        template("b-2", &with(&dir.join("images/disks/b.ext4")));
        template("b-3", r#"{"config":{"drives":[]}}"#);
        template("b-4", "not json");
        template(".new-1", &with(&disk));
        assert_eq!(remove_using_disk(&dir, &disk), 1);
        let mut left: Vec<String> = std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".new-1", "b-2", "b-3", "b-4"]);
        assert_eq!(remove_using_disk(&dir.join("none"), &disk), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A cache at `dir/<name>` with a made template; the template.
    fn made(dir: &Path, cache: &Path) -> Template {
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        let config = VmConfig::new(dir.join("vmlinux"));
        let template = Template::for_config(cache, &config).unwrap();
        template
            .prepare()
            .unwrap()
            .commit(|state, memory| {
                std::fs::write(state, b"{}").unwrap();
                std::fs::write(memory, b"").unwrap();
                Ok(())
            })
            .unwrap();
        template
    }

    #[test]
    fn every_directory_the_snapshot_is_read_through_is_checked() {
        let dir = scratch("ancestors");
        let cache = dir.join("home/user/.cache/flint");
        let template = made(&dir, &cache);
        assert!(template.files().is_some());
        let home = dir.join("home");
        let mode = |path: &Path, bits: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(bits)).unwrap()
        };
        // Anyone who can rename entries of a directory above the cache could swap in a
        // template of theirs.
        for bits in [0o775, 0o757, 0o777] {
            mode(&home, bits);
            let e = template.trusted_files().unwrap_err();
            assert!(
                e.contains("home is writable by other users"),
                "{bits:o}: {e}"
            );
            assert!(template.files().is_none(), "{bits:o}");
        }
        // Unless the sticky bit keeps them from touching what is not theirs (as in /tmp).
        mode(&home, 0o1777);
        assert!(template.files().is_some());
        mode(&home, 0o755);
        mode(&cache, 0o777);
        assert!(template.files().is_none());
        mode(&cache, 0o755);
        assert!(template.files().is_some());
        // The files themselves.
        let (state, _) = template.files().unwrap();
        mode(&state, 0o620);
        assert!(template
            .trusted_files()
            .unwrap_err()
            .contains("state.json is writable"));
        mode(&state, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_snapshot_is_read_through_no_symbolic_link() {
        let dir = scratch("symlinks");
        let real = dir.join("real-cache");
        let template = made(&dir, &real);
        // A cache reached through a symbolic link: the files are named by the real path.
        std::os::unix::fs::symlink(&real, dir.join("link")).unwrap();
        let config = VmConfig::new(dir.join("vmlinux"));
        let through_link = Template::for_config(&dir.join("link"), &config).unwrap();
        let (state, memory) = through_link.files().unwrap();
        let canonical = std::fs::canonicalize(&dir).unwrap();
        for file in [&state, &memory] {
            assert!(
                file.starts_with(canonical.join("real-cache")),
                "{}",
                file.display()
            );
            assert_eq!(std::fs::canonicalize(file).unwrap(), *file);
        }
        // A snapshot file that is a symbolic link (to a file planted elsewhere) is refused.
        let (_, memory) = template.files().unwrap();
        let planted = dir.join("planted");
        std::fs::write(&planted, b"").unwrap();
        std::fs::remove_file(&memory).unwrap();
        std::os::unix::fs::symlink(&planted, &memory).unwrap();
        let e = template.trusted_files().unwrap_err();
        assert!(e.contains("memory is not a regular file"), "{e}");
        assert!(template.files().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
