//! The shared libraries flint runs with, which the jail copies next to it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};

/// The executable files mapped into this process other than its own binary: the dynamic
/// loader and shared libraries (none when flint is linked statically).
pub(crate) fn mapped_libraries() -> Result<Vec<PathBuf>> {
    let maps =
        std::fs::read_to_string("/proc/self/maps").cannot(|| "read /proc/self/maps".into())?;
    let exe = std::fs::read_link("/proc/self/exe").cannot(|| "read /proc/self/exe".into())?;
    let mut libs = executable_mappings(&maps, &exe);
    // The loader is mapped under its real path; the kernel looks for it under the one the
    // binary names (e.g. /lib64/ld-linux-x86-64.so.2, a symlink).
    let binary = std::fs::read("/proc/self/exe").cannot(|| "read /proc/self/exe".into())?;
    if let Some(interp) = elf_interpreter(&binary) {
        if !libs.contains(&interp) {
            libs.push(interp);
        }
    }
    Ok(libs)
}

/// The regular files mapped executable in `maps` (the text of /proc/PID/maps), each once,
/// other than `exe`.
fn executable_mappings(maps: &str, exe: &Path) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 6 || !fields[1].contains('x') || !fields[5].starts_with('/') {
            continue;
        }
        let path = PathBuf::from(fields[5]);
        if path != exe && !libs.contains(&path) && path.is_file() {
            libs.push(path);
        }
    }
    libs
}

/// The PT_INTERP path of a 64-bit little-endian ELF file, if it has one.
pub(crate) fn elf_interpreter(elf: &[u8]) -> Option<PathBuf> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| {
        let v = u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return None;
    }
    let phoff = u64_at(32)?;
    let (phentsize, phnum) = (usize::from(u16_at(54)?), usize::from(u16_at(56)?));
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == PT_INTERP {
            let (offset, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let bytes = elf.get(offset..offset.checked_add(size)?)?;
            let path = bytes.split(|&b| b == 0).next()?;
            return Some(PathBuf::from(OsStr::from_bytes(path)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with `headers` program headers of (type, offset, size), and
    /// `tail` appended at offset 0x100.
    fn elf(headers: &[(u32, u64, u64)], tail: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 0x100];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&(headers.len() as u16).to_le_bytes()); // e_phnum
        for (i, &(kind, offset, size)) in headers.iter().enumerate() {
            let ph = 64 + i * 56;
            e[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            e[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
            e[ph + 32..ph + 40].copy_from_slice(&size.to_le_bytes());
        }
        e.extend_from_slice(tail);
        e
    }

    #[test]
    fn the_interpreter_is_read_from_pt_interp() {
        let interp = b"/lib/ld-test.so.1\0";
        let n = interp.len() as u64;
        // PT_LOAD first, then PT_INTERP.
        let e = elf(&[(1, 0, 0x100), (3, 0x100, n)], interp);
        assert_eq!(
            elf_interpreter(&e),
            Some(PathBuf::from("/lib/ld-test.so.1"))
        );
        // No PT_INTERP: a static binary.
        assert_eq!(elf_interpreter(&elf(&[(1, 0, 0x100)], interp)), None);
        // Cut short, pointing past the end, or not a 64-bit little-endian ELF: none.
        assert_eq!(elf_interpreter(&e[..100]), None);
        assert_eq!(elf_interpreter(&elf(&[(3, 0x100, 0x1000)], interp)), None);
        assert_eq!(elf_interpreter(&elf(&[(3, u64::MAX, 2)], interp)), None);
        let mut e32 = e.clone();
        e32[4] = 1;
        assert_eq!(elf_interpreter(&e32), None);
        assert_eq!(elf_interpreter(b""), None);
    }

    #[test]
    fn this_binary_names_its_loader() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let interp = elf_interpreter(&exe).expect("the test binary is linked dynamically");
        assert!(interp.is_absolute(), "{interp:?}");
        assert!(interp.exists(), "{interp:?}");
    }

    #[test]
    fn libraries_are_the_executable_files_mapped() {
        let exe = Path::new("/proc/self/exe").canonicalize().unwrap();
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let maps = format!(
            "55d0-55d1 r-xp 00000000 08:01 1 {exe}\n\
             7f00-7f01 r--p 00000000 08:01 2 {file}\n\
             7f01-7f02 r-xp 00000000 08:01 3 {file}\n\
             7f02-7f03 r-xp 00000000 08:01 3 {file}\n\
             7f03-7f04 r-xp 00000000 00:00 0 [vdso]\n\
             7f04-7f05 rw-p 00000000 00:00 0\n\
             7f05-7f06 r-xp 00000000 08:01 4 /nonexistent/lib.so\n\
             7f06-7f07 r-xp 00000000 08:01 5 /tmp\n",
            exe = exe.display()
        );
        assert_eq!(executable_mappings(&maps, &exe), [PathBuf::from(file)]);

        let libs = mapped_libraries().unwrap();
        assert!(!libs.is_empty(), "the test binary is linked dynamically");
        assert!(!libs.contains(&exe));
        assert!(libs.iter().any(|l| l
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libc."))));
        let interp = elf_interpreter(&std::fs::read(&exe).unwrap()).unwrap();
        assert!(libs.contains(&interp), "{libs:?} lacks {interp:?}");
        for l in &libs {
            assert!(l.is_absolute() && l.is_file(), "{l:?}");
        }
    }
}
