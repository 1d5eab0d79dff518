//! Keeping a long-lived, mostly idle VMM process small. A sandbox's `flint run` process lives
//! as long as its command, idle most of that time, and a host runs many of them side by side:
//! every private page it holds beyond the guest's own is paid once per sandbox.
//!
//! Two things glibc and the kernel do by default cost more than flint needs:
//! - glibc gives every thread that allocates an arena of its own (up to 8 per core): each
//!   keeps its own free memory and its own partly used pages, 20-70 KiB a thread for the few
//!   allocations of `flint run`'s event loop, vCPU and agent-client threads.
//! - The main thread's stack keeps every page it ever touched: the setup (argument parsing,
//!   reading the snapshot state, building the devices) goes about 100 KiB deep, the idle
//!   wait after it a few KiB.
//! - glibc keeps up to 7 freed chunks of each small size (up to 1 KiB) per thread in a
//!   cache (the tcache) instead of giving them back to the heap, and the setup frees
//!   thousands of small allocations (the snapshot state's JSON, the device tree). Measured in
//!   an idle restored sandbox: with the cache the heap holds 112 KiB "in use" for 40 KiB of
//!   live allocations and keeps 136 KiB of pages; without it 50 KiB in use and 80 KiB of
//!   pages. The cache can only be turned off before the process starts (`GLIBC_TUNABLES`).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// glibc's tunable that turns its per-thread cache of freed chunks off.
const NO_TCACHE: &str = "glibc.malloc.tcache_count=0";

/// Start this program again, with the same arguments, without glibc's per-thread cache of
/// freed chunks (see the module's documentation), unless it already runs so: call first
/// thing in a long-lived mode, before any other thread starts, any file is opened or any
/// input is read. The cache makes small allocations a few nanoseconds faster, which a
/// mostly idle process does not need. Returns (continuing as it is) if the program cannot be
/// started again (its file is gone), the variable is already set for the cache (the caller's choice stands) or
/// the process runs in secure mode (set-id: glibc ignores the variable there, so a restart
/// would loop).
pub(crate) fn restart_without_malloc_cache() {
    // SAFETY: getauxval has no preconditions.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        return;
    }
    let Some(tunables) = tunables_without_cache(std::env::var_os("GLIBC_TUNABLES").as_deref())
    else {
        return;
    };
    let mut args = std::env::args_os();
    let Some(arg0) = args.next() else {
        return;
    };
    // By its path, not /proc/self/exe: the process keeps its name ("flint", not "exe").
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            log::debug!("cannot restart without glibc's malloc cache: {e}");
            return;
        }
    };
    let error = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .exec();
    log::debug!("cannot restart without glibc's malloc cache: {error}");
}

/// `GLIBC_TUNABLES` with the cache turned off added to `current`; `None` if `current` already
/// sets the cache's size.
fn tunables_without_cache(current: Option<&OsStr>) -> Option<OsString> {
    let current = current.filter(|t| !t.is_empty());
    let sets_cache = current.is_some_and(|t| {
        t.as_bytes()
            .split(|&b| b == b':')
            .any(|setting| setting.starts_with(b"glibc.malloc.tcache_count="))
    });
    if sets_cache {
        return None;
    }
    Some(match current {
        None => NO_TCACHE.into(),
        Some(t) => {
            let mut tunables = t.to_owned();
            tunables.push(":");
            tunables.push(NO_TCACHE);
            tunables
        }
    })
}

/// Get the process ready to stay small; call first thing, before any other thread starts.
/// Puts every thread's allocations in the main heap (glibc's `M_ARENA_MAX` = 1): flint's
/// threads allocate rarely once the VM runs (a few small buffers per vsock packet or agent
/// message), so sharing one heap's lock costs nothing measurable, while an arena per thread
/// costs its partly used pages in every sandbox. Notes where the main thread's stack is, for
/// [`release_setup_memory`] (which may run under a seccomp filter that allows no reading of
/// `/proc`). Best effort: a libc without the option keeps its default.
pub(crate) fn prepare() {
    // SAFETY: mallopt takes two integers and changes only the allocator's policy; called
    // before other threads exist.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if ok != 1 {
        log::debug!("cannot limit malloc to one arena");
    }
    if let Some((low, size)) = stack_bounds() {
        STACK_LOW.store(low, Ordering::Relaxed);
        STACK_HIGH.store(low.saturating_add(size), Ordering::Relaxed);
    }
}

/// The stack of the thread that called [`prepare`]: lowest and highest address (0: unknown).
static STACK_LOW: AtomicUsize = AtomicUsize::new(0);
static STACK_HIGH: AtomicUsize = AtomicUsize::new(0);

/// How far below the current frame the stack is left alone: room for the frames of the
/// calls made from here (`madvise`, `malloc_trim`) and a signal handler's.
const STACK_MARGIN: usize = 8 << 10;

/// Give the host back what the setup left behind and the idle process no longer uses: the
/// heap's free pages (`malloc_trim`) and the calling thread's stack pages below the current
/// frame (the kernel maps a zero page again at their next touch, as for any stack growth).
/// Call on the thread that called [`prepare`], from a shallow frame, once the deep setup work
/// is done. Makes no system calls but `madvise` and `brk`. Best effort: any step that fails
/// leaves that memory as it was.
pub(crate) fn release_setup_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    release_stack_below_here(
        STACK_LOW.load(Ordering::Relaxed),
        STACK_HIGH.load(Ordering::Relaxed),
    );
}

/// Release the pages of the calling thread's stack, [low, high), more than [`STACK_MARGIN`]
/// below the current frame; nothing if the current frame is not in that stack.
#[inline(never)]
fn release_stack_below_here(low: usize, high: usize) {
    if let Some((low, high)) = unused_stack_below_here(low, high) {
        // SAFETY: [low, high) lies within this thread's stack mapping, more than
        // STACK_MARGIN below the caller's frame and everything below it (the stack grows
        // down): no live data is there, and MADV_DONTNEED on private anonymous memory only
        // makes the next touch fault in a zeroed page.
        let rc =
            unsafe { libc::madvise(low as *mut libc::c_void, high - low, libc::MADV_DONTNEED) };
        // The main thread's stack is mapped only as deep as it ever went: the kernel releases
        // the mapped part and answers ENOMEM for the rest, which is expected.
        let error = std::io::Error::last_os_error();
        if rc != 0 && error.raw_os_error() != Some(libc::ENOMEM) {
            log::debug!("cannot release the setup's stack pages: {error}");
        }
    }
}

/// The page-aligned part of the stack [low, high) more than [`STACK_MARGIN`] below the
/// current frame, if the current frame is in that stack (so it is the calling thread's).
fn unused_stack_below_here(low: usize, high: usize) -> Option<(usize, usize)> {
    let page = page_size()?;
    let here = {
        let marker = 0u8;
        std::ptr::addr_of!(marker) as usize
    };
    if !(low..high).contains(&here) {
        return None;
    }
    let high = here.checked_sub(STACK_MARGIN)? & !(page - 1);
    // The lowest page of glibc's reported range may be the guard or not mapped yet.
    let low = (low + page - 1) & !(page - 1);
    (high > low).then_some((low, high))
}

fn page_size() -> Option<usize> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().filter(|p| p.is_power_of_two())
}

/// The calling thread's stack: lowest address and size, as glibc reports them. For the main
/// thread, from /proc/self/maps and the stack size limit: the range the stack may grow into,
/// never beyond the end of the mapping below it.
fn stack_bounds() -> Option<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_getattr_np initialises `attr` for the calling thread when it returns 0.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return None;
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialised above; the out pointers are valid.
    let rc = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) };
    // SAFETY: `attr` was initialised above and is not used after this.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    (rc == 0 && !addr.is_null()).then_some((addr as usize, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here() -> usize {
        let marker = 0u8;
        std::ptr::addr_of!(marker) as usize
    }

    /// Touches `n` pages of stack below the caller's frame; their sum.
    #[inline(never)]
    fn deep(n: usize) -> u64 {
        let buf = std::hint::black_box([n as u8; 4096]);
        let s = buf.iter().map(|&b| u64::from(b)).sum::<u64>();
        if n == 0 {
            s
        } else {
            s + deep(n - 1)
        }
    }

    /// The cache is turned off once, next to the caller's other settings, and a caller's own
    /// cache size is kept (no restart, so no loop).
    #[test]
    fn the_malloc_cache_goes_off_once_and_the_callers_setting_stands() {
        let t = |s: &str| tunables_without_cache(Some(OsStr::new(s)));
        assert_eq!(tunables_without_cache(None), Some(NO_TCACHE.into()));
        assert_eq!(t(""), Some(NO_TCACHE.into()));
        assert_eq!(
            t("glibc.malloc.arena_max=2"),
            Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0".into())
        );
        let restarted = tunables_without_cache(None).unwrap();
        assert_eq!(tunables_without_cache(Some(&restarted)), None);
        assert_eq!(
            t("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=7"),
            None
        );
        assert_eq!(
            t("glibc.malloc.tcache_count_x=1"),
            Some("glibc.malloc.tcache_count_x=1:glibc.malloc.tcache_count=0".into())
        );
    }

    /// The released range is inside the thread's stack and below the caller's frame, and the
    /// thread goes on using its stack: deeper calls fault in fresh pages and compute the same.
    #[test]
    fn the_released_stack_is_below_the_frame_and_the_thread_goes_on() {
        let (low, size) = stack_bounds().expect("stack bounds");
        let at = here();
        assert!((low..low + size).contains(&at));
        let (from, to) =
            unused_stack_below_here(low, low + size).expect("a thread's stack has room below");
        assert!(
            from >= low && to <= at - STACK_MARGIN,
            "{from:x}-{to:x} {at:x}"
        );
        let before = deep(32);
        release_stack_below_here(low, low + size);
        assert_eq!(deep(32), before);
        assert_eq!(
            unused_stack_below_here(0, 0),
            None,
            "an unknown stack is left alone"
        );
        // Another thread's stack (as if `prepare` had run there) is left alone.
        let other = std::thread::spawn(|| stack_bounds().unwrap())
            .join()
            .unwrap();
        assert_eq!(
            unused_stack_below_here(other.0, other.0 + other.1),
            None,
            "only the calling thread's own stack is released"
        );
    }
}
