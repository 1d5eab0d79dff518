//! The jail's cgroup `flint/<id>`: under the cgroup2 file system, or under each cgroup v1
//! hierarchy with a controller the jail uses; the settings written into it; moving the jailed
//! flint into it; and removing it again.

use std::io;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::error::{Context, Error, Result};
use crate::options::{CgroupVersion, JailOptions};

/// What the jail writes into its cgroup unless `--cgroup` sets it, where the host has the
/// controller: room for the threads of a VM with the most vCPUs (254) and its devices, and
/// no fork bomb.
pub const DEFAULT_CGROUP_SETTINGS: [(&str, &str); 1] = [("pids.max", "512")];
/// The cgroup (under each hierarchy) that holds every jail's cgroup.
const CGROUP_PARENT: &str = "flint";
/// The v1 controllers a jail's cgroup is created under, when the host has them mounted.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The v2 controllers enabled for the jail's cgroup, when the host has them.
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// Where the host's cgroup file systems are usually mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One directory of the jail's cgroup: `shown` is how messages name it.
#[derive(Debug)]
pub(crate) struct Cgroup {
    pub path: PathBuf,
    pub shown: String,
}

/// A mounted cgroup file system, from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    pub path: PathBuf,
    pub v2: bool,
    /// The mount options, among them the v1 controllers of this hierarchy (`memory`, ...).
    pub controllers: Vec<String>,
}

/// The default cgroup settings `given` does not set.
pub(crate) fn default_settings(given: &[(String, String)]) -> Vec<(&'static str, &'static str)> {
    DEFAULT_CGROUP_SETTINGS
        .into_iter()
        .filter(|(file, _)| !given.iter().any(|(g, _)| g == file))
        .collect()
}

/// The cgroup file systems this process sees mounted.
pub(crate) fn mounts() -> Result<Vec<CgroupMount>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .cannot(|| "read /proc/self/mountinfo".into())?;
    Ok(parse_mountinfo(&info))
}

/// The cgroup file systems in `info`, the text of /proc/PID/mountinfo.
fn parse_mountinfo(info: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (fs_type, options) = (right.next(), right.nth(1).unwrap_or(""));
        let v2 = match fs_type {
            Some("cgroup2") => true,
            Some("cgroup") => false,
            _ => continue,
        };
        mounts.push(CgroupMount {
            path: PathBuf::from(mount_point.replace("\\040", " ")),
            v2,
            controllers: options.split(',').map(str::to_string).collect(),
        });
    }
    mounts
}

/// The controller a cgroup file belongs to: `memory` for `memory.max`.
fn controller_of(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

/// The interface to use: the one `asked`; else v2 where /sys/fs/cgroup is cgroup2, v1 where
/// any v1 hierarchy is mounted, v2 where a cgroup2 file system is mounted elsewhere.
fn choose_version(asked: Option<CgroupVersion>, mounts: &[CgroupMount]) -> Result<CgroupVersion> {
    match asked {
        Some(v) => Ok(v),
        None if mounts
            .iter()
            .any(|m| m.v2 && m.path == Path::new(CGROUP_ROOT)) =>
        {
            Ok(CgroupVersion::V2)
        }
        None if mounts.iter().any(|m| !m.v2) => Ok(CgroupVersion::V1),
        None if mounts.iter().any(|m| m.v2) => Ok(CgroupVersion::V2),
        None => Err(Error::NoCgroupMounted),
    }
}

/// Create the jail's cgroups under `mounts` and write the settings (`--cgroup`, then the
/// defaults where the cgroup has their file). Each cgroup made is pushed to `made` before
/// anything else can fail, for the caller to remove.
pub(crate) fn create(
    o: &JailOptions,
    mounts: &[CgroupMount],
    made: &mut Vec<Cgroup>,
) -> Result<()> {
    match choose_version(o.cgroup_version, mounts)? {
        CgroupVersion::V2 => create_v2(o, mounts, made),
        CgroupVersion::V1 => create_v1(o, mounts, made),
    }
}

/// mkdir the jail's cgroup under `base` (creating `flint` as needed) and push it to `made`.
fn make_cgroup(made: &mut Vec<Cgroup>, base: &Path, prefix: &str, id: &str) -> Result<()> {
    let parent = base.join(CGROUP_PARENT);
    let shown = format!("{prefix}{CGROUP_PARENT}/{id}");
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).cannot(|| format!("create the jail's cgroup {shown}")),
    }
    let path = parent.join(id);
    match std::fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::CgroupInUse {
                cgroup: shown,
                id: id.into(),
            })
        }
        Err(e) => return Err(e).cannot(|| format!("create the jail's cgroup {shown}")),
    }
    made.push(Cgroup { path, shown });
    Ok(())
}

/// One cgroup per v1 hierarchy that has a controller the jail uses (a hierarchy may hold
/// several, as `cpu,cpuacct`), named after the first of them in messages.
fn create_v1(o: &JailOptions, mounts: &[CgroupMount], made: &mut Vec<Cgroup>) -> Result<()> {
    let mut wanted: Vec<&str> = V1_CONTROLLERS.to_vec();
    for (file, _) in &o.cgroups {
        let c = controller_of(file);
        if !wanted.contains(&c) {
            wanted.push(c);
        }
    }
    let find = |c: &str| {
        mounts
            .iter()
            .position(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
    };
    // (mount, index in `made`) of each hierarchy's cgroup.
    let mut ours: Vec<(usize, usize)> = Vec::new();
    for c in &wanted {
        let Some(m) = find(c) else {
            if V1_CONTROLLERS.contains(c) {
                continue;
            }
            return Err(Error::NoV1Controller((*c).into()));
        };
        if ours.iter().any(|&(mm, _)| mm == m) {
            continue;
        }
        make_cgroup(made, &mounts[m].path, &format!("{c}/"), &o.id)?;
        ours.push((m, made.len() - 1));
    }
    if ours.is_empty() {
        return Err(Error::NoV1Hierarchy);
    }
    for (file, value) in &o.cgroups {
        let m = find(controller_of(file)).expect("every controller got a cgroup");
        let (_, i) = ours.iter().find(|&&(mm, _)| mm == m).expect("made above");
        write_setting(&made[*i], file, value)?;
    }
    for (file, value) in default_settings(&o.cgroups) {
        let made_for =
            find(controller_of(file)).and_then(|m| ours.iter().find(|&&(mm, _)| mm == m));
        if let Some(&(_, i)) = made_for {
            write_default(&made[i], file, value)?;
        }
    }
    Ok(())
}

/// One cgroup under the cgroup2 file system (the one at /sys/fs/cgroup if there are
/// several), with the controllers the jail uses enabled down to it where the host has them.
fn create_v2(o: &JailOptions, mounts: &[CgroupMount], made: &mut Vec<Cgroup>) -> Result<()> {
    let base = v2_base(mounts).ok_or(Error::NoCgroup2Mounted)?;
    let mut wanted: Vec<&str> = V2_CONTROLLERS.to_vec();
    for (file, _) in &o.cgroups {
        let c = controller_of(file);
        if c != "cgroup" && !wanted.contains(&c) {
            wanted.push(c);
        }
    }
    // Make the controllers' files appear in flint/<id>: enable them in the subtree_control
    // of the root and of flint/, where available.
    let parent = base.join(CGROUP_PARENT);
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).cannot(|| format!("create the jail's cgroup {CGROUP_PARENT}")),
    }
    enable_controllers(base, &wanted)?;
    enable_controllers(&parent, &wanted)?;
    make_cgroup(made, base, "", &o.id)?;
    let cg = made.last().expect("made above");
    for (file, value) in &o.cgroups {
        write_setting(cg, file, value)?;
    }
    for (file, value) in default_settings(&o.cgroups) {
        write_default(cg, file, value)?;
    }
    Ok(())
}

/// The cgroup2 file system to use: the one at /sys/fs/cgroup, else the first mounted.
fn v2_base(mounts: &[CgroupMount]) -> Option<&Path> {
    mounts
        .iter()
        .filter(|m| m.v2)
        .min_by_key(|m| m.path != Path::new(CGROUP_ROOT))
        .map(|m| m.path.as_path())
}

/// Enable in the v2 cgroup `dir` for its children each controller of `wanted` it has and
/// has not enabled yet, one at a time.
fn enable_controllers(dir: &Path, wanted: &[&str]) -> Result<()> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let available = read("cgroup.controllers");
    let enabled = read("cgroup.subtree_control");
    for c in wanted {
        let has = |s: &str| s.split_whitespace().any(|x| x == *c);
        if has(&available) && !has(&enabled) {
            std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"))
                .cannot(|| format!("enable the cgroup {c} controller in {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Write `value` to the cgroup file `file` (a name, not a path) of `cg`, which must have it.
fn write_setting(cg: &Cgroup, file: &str, value: &str) -> Result<()> {
    let path = cg.path.join(file);
    if file.contains('/') || !path.is_file() {
        return Err(Error::NoSuchCgroupFile {
            file: file.into(),
            cgroup: cg.shown.clone(),
        });
    }
    std::fs::write(&path, value)
        .cannot(|| format!("write {file}={value} in the jail's cgroup {}", cg.shown))
}

/// Write a default setting, where the cgroup has the file (its controller is enabled).
fn write_default(cg: &Cgroup, file: &str, value: &str) -> Result<()> {
    if cg.path.join(file).is_file() {
        write_setting(cg, file, value)?;
    }
    Ok(())
}

impl Cgroup {
    /// Move the process `pid` into this cgroup.
    pub(crate) fn join(&self, pid: i32) -> Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .cannot(|| format!("move the jailed flint into the cgroup {}", self.shown))
    }

    /// Remove this cgroup (gone already is fine), waiting up to a second while the kernel
    /// still counts a process that has just ended in it.
    pub(crate) fn remove(&self) -> io::Result<()> {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if tries < 100 && Errno::from_io_error(&e) == Some(Errno::BUSY) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::tests::options;
    use crate::tree::tests::{message, Scratch};

    fn v1(path: &Path, options: &str) -> CgroupMount {
        CgroupMount {
            path: path.into(),
            v2: false,
            controllers: options.split(',').map(str::to_string).collect(),
        }
    }

    fn v2(path: &Path) -> CgroupMount {
        CgroupMount {
            path: path.into(),
            v2: true,
            controllers: vec!["rw".into()],
        }
    }

    fn setting(file: &str, value: &str) -> (String, String) {
        (file.into(), value.into())
    }

    #[test]
    fn defaults_give_way_to_what_is_asked() {
        assert_eq!(default_settings(&[]), [("pids.max", "512")]);
        let asked = [setting("memory.max", "1")];
        assert_eq!(default_settings(&asked), [("pids.max", "512")]);
        let asked = [setting("pids.max", "64")];
        assert!(default_settings(&asked).is_empty());
    }

    #[test]
    fn controllers_of_files() {
        assert_eq!(controller_of("memory.max"), "memory");
        assert_eq!(controller_of("cpu.cfs_quota_us"), "cpu");
        assert_eq!(controller_of("pids.max"), "pids");
        assert_eq!(controller_of("cgroup.max.depth"), "cgroup");
        assert_eq!(controller_of("tasks"), "tasks");
    }

    #[test]
    fn mountinfo_gives_the_cgroup_file_systems() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:21 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup rw,cpu,cpuacct
29 25 0:25 / /sys/fs/cgroup/my\\040pids rw shared:13 - cgroup cgroup rw,pids
30 22 0:26 / /cgroup-opt rw master:3 unbindable - cgroup none rw,memory
no separator here
31 22 0:27 / /proc rw - proc proc rw
";
        let mounts = parse_mountinfo(info);
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            mounts,
            [
                CgroupMount {
                    path: root.join("unified"),
                    v2: true,
                    controllers: vec!["rw".into(), "nsdelegate".into()],
                },
                v1(&root.join("cpu,cpuacct"), "rw,cpu,cpuacct"),
                v1(&root.join("my pids"), "rw,pids"),
                // Optional fields before the separator do not shift the mount point.
                v1(Path::new("/cgroup-opt"), "rw,memory"),
            ]
        );
        let mine = super::mounts().unwrap();
        assert!(mine.iter().all(|m| m.path.is_absolute()), "{mine:?}");
    }

    #[test]
    fn the_version_is_the_one_asked_else_what_the_host_uses() {
        let root = Path::new(CGROUP_ROOT);
        let hybrid = [v2(&root.join("unified")), v1(&root.join("pids"), "rw,pids")];
        let unified = [v2(root)];
        let elsewhere = [v2(Path::new("/mnt/cg2"))];
        let mixed = [v1(&root.join("pids"), "rw,pids"), v2(root)];
        let version = |asked, m: &[CgroupMount]| choose_version(asked, m).unwrap();
        assert_eq!(version(None, &hybrid), CgroupVersion::V1);
        assert_eq!(version(None, &unified), CgroupVersion::V2);
        assert_eq!(version(None, &elsewhere), CgroupVersion::V2);
        assert_eq!(version(None, &mixed), CgroupVersion::V2);
        assert_eq!(version(Some(CgroupVersion::V2), &hybrid), CgroupVersion::V2);
        assert_eq!(
            version(Some(CgroupVersion::V1), &unified),
            CgroupVersion::V1
        );
        assert_eq!(
            message(choose_version(None, &[])),
            "cannot create the jail's cgroup: this host has no cgroup file system mounted"
        );
    }

    /// Fake v1 hierarchies `memory`, `cpu,cpuacct` and `pids` under `root`.
    fn v1_hierarchies(root: &Path) -> Vec<CgroupMount> {
        ["memory", "cpu,cpuacct", "pids"]
            .iter()
            .map(|h| {
                std::fs::create_dir(root.join(h)).unwrap();
                v1(&root.join(h), &format!("rw,{h}"))
            })
            .collect()
    }

    #[test]
    fn v1_makes_one_cgroup_per_hierarchy_used() {
        let root = Scratch::new("cg-v1");
        let mounts = v1_hierarchies(&root.0);
        let mut made = Vec::new();
        let mut o = options("v1");
        o.cgroup_version = Some(CgroupVersion::V1);
        // cpuacct shares the cpu hierarchy: no second cgroup for it.
        o.cgroups = vec![setting("cpuacct.usage", "0")];
        let m = message(create(&o, &mounts, &mut made));
        // The fake hierarchy has no files: the setting is refused, naming the cgroup.
        assert_eq!(
            m,
            "cannot set cpuacct.usage in the jail's cgroup cpu/flint/v1: there is no such \
             cgroup file"
        );
        let shown: Vec<&str> = made.iter().map(|c| c.shown.as_str()).collect();
        assert_eq!(shown, ["memory/flint/v1", "cpu/flint/v1", "pids/flint/v1"]);
        for (cg, h) in made.iter().zip(["memory", "cpu,cpuacct", "pids"]) {
            assert_eq!(cg.path, root.0.join(h).join("flint/v1"));
            assert!(cg.path.is_dir());
        }

        // The same id again: in use, and nothing more made.
        let mut again = Vec::new();
        o.cgroups.clear();
        assert_eq!(
            message(create(&o, &mounts, &mut again)),
            "the jail's cgroup memory/flint/v1 is in use (is a jail with id v1 running?)"
        );
        assert!(again.is_empty());
        for cg in &made {
            cg.remove().unwrap();
            assert!(!cg.path.exists());
            // Gone already: fine.
            cg.remove().unwrap();
        }
        // The parents stay for other jails.
        assert!(root.0.join("pids/flint").is_dir());
    }

    #[test]
    fn settings_go_only_into_files_the_cgroup_has() {
        // A real cgroup has its files from the start; this one gets them by hand.
        let dir = Scratch::new("cg-files");
        for f in ["pids.max", "cpu.cfs_quota_us", "cgroup.procs"] {
            std::fs::write(dir.0.join(f), "max\n").unwrap();
        }
        let cg = Cgroup {
            path: dir.0.clone(),
            shown: "pids/flint/files".into(),
        };
        let read = |f: &str| std::fs::read_to_string(dir.0.join(f)).unwrap();
        write_setting(&cg, "cpu.cfs_quota_us", "50000").unwrap();
        assert_eq!(read("cpu.cfs_quota_us"), "50000");
        write_default(&cg, "pids.max", "512").unwrap();
        assert_eq!(read("pids.max"), "512");
        // A default whose file the cgroup lacks (its controller is off) is left out...
        write_default(&cg, "memory.max", "1").unwrap();
        assert!(!dir.0.join("memory.max").exists());
        // ...but a setting asked for is refused, and so is a path instead of a file name.
        for file in ["memory.max", "../cg-files/pids.max", "/etc/passwd"] {
            assert_eq!(
                message(write_setting(&cg, file, "1")),
                format!(
                    "cannot set {file} in the jail's cgroup pids/flint/files: there is no such \
                     cgroup file"
                )
            );
        }
        assert!(!dir.0.join("memory.max").exists());
        assert_eq!(read("pids.max"), "512");
        cg.join(1234).unwrap();
        assert_eq!(read("cgroup.procs"), "1234");
    }

    #[test]
    fn v1_refuses_controllers_the_host_lacks() {
        let root = Scratch::new("cg-v1-missing");
        let mounts = v1_hierarchies(&root.0);
        let mut o = options("missing");
        o.cgroups = vec![setting("hugetlb.2MB.limit_in_bytes", "0")];
        let mut made = Vec::new();
        assert_eq!(
            message(create_v1(&o, &mounts, &mut made)),
            "cannot use the cgroup hugetlb controller: no cgroup v1 hierarchy on this host has it"
        );
        // What was made before is the caller's to remove.
        assert_eq!(made.len(), 3);

        let only_v2 = [v2(&root.0)];
        assert_eq!(
            message(create_v1(&options("none"), &only_v2, &mut Vec::new())),
            "cannot create the jail's cgroup: this host has no cgroup v1 hierarchy with the \
             memory, cpu or pids controller mounted"
        );
        let other = [v1(&root.0.join("memory"), "rw,freezer")];
        assert!(
            message(create_v1(&options("none"), &other, &mut Vec::new()))
                .contains("no cgroup v1 hierarchy with the memory, cpu or pids")
        );
    }

    #[test]
    fn v2_enables_the_controllers_down_to_the_jail() {
        let root = Scratch::new("cg-v2");
        std::fs::write(root.0.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        std::fs::write(root.0.join("cgroup.subtree_control"), "cpu memory\n").unwrap();
        // flint/ exists with nothing enabled and nothing available.
        std::fs::create_dir(root.0.join("flint")).unwrap();
        let mounts = [v1(&root.0.join("x"), "rw,pids"), v2(&root.0)];
        let mut o = options("v2");
        o.cgroup_version = Some(CgroupVersion::V2);
        o.cgroups = vec![setting("io.max", "8:0 rbps=1")];
        let mut made = Vec::new();
        let m = message(create(&o, &mounts, &mut made));
        assert_eq!(
            m,
            "cannot set io.max in the jail's cgroup flint/v2: there is no such cgroup file"
        );
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].path, root.0.join("flint/v2"));
        // pids and io were missing at the root (written one at a time: io last); flint/ has
        // no controllers available, so nothing is written there.
        assert_eq!(
            std::fs::read_to_string(root.0.join("cgroup.subtree_control")).unwrap(),
            "+io"
        );
        assert!(!root.0.join("flint/cgroup.subtree_control").exists());

        // Everything enabled already: nothing written.
        std::fs::write(root.0.join("cgroup.subtree_control"), "cpu io memory pids").unwrap();
        enable_controllers(&root.0, &["memory", "pids", "io", "hugetlb"]).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.0.join("cgroup.subtree_control")).unwrap(),
            "cpu io memory pids"
        );
        assert_eq!(
            message(create_v2(&o, &[v1(&root.0, "rw,pids")], &mut Vec::new())),
            "cannot create the jail's cgroup: this host has no cgroup2 file system mounted"
        );
    }

    #[test]
    fn v2_prefers_the_file_system_at_sys_fs_cgroup() {
        let root = Path::new(CGROUP_ROOT);
        let other = Path::new("/mnt/cg2");
        let pick = |m: &[CgroupMount]| v2_base(m).map(|p| p.to_path_buf());
        assert_eq!(pick(&[v2(other), v2(root)]), Some(root.into()));
        assert_eq!(pick(&[v2(root), v2(other)]), Some(root.into()));
        assert_eq!(pick(&[v1(root, "rw,pids"), v2(other)]), Some(other.into()));
        assert_eq!(pick(&[v1(root, "rw,pids")]), None);
    }
}
