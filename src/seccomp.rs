//! The seccomp filters of flint's own threads, composed from `vmm::seccomp`'s building blocks:
//! the API server thread, `flint run`'s agent-client thread, and the VMM thread, which the
//! front ends restrict (through [`vmm::Vm::start`]) to what the VM needs there plus what they
//! do there themselves.
//!
//! - **api** (the HTTP API server): `accept4` and calls on accepted connections, `epoll_*`,
//!   `ioctl` only `FIONBIO`, `unlink`/`unlinkat`. **No `socket` or `connect`**: its listening
//!   socket was bound before it started. `openat` fails with `EACCES`.
//! - **agent-client** (`flint run`): `socket` **only `AF_UNIX`, `SOCK_STREAM`** and `connect`
//!   (the vsock device's Unix socket), calls on that connection, `poll`; `ioctl` only
//!   `FIONBIO` and `TCGETS`; `getrandom` (entropy for a restored guest); thread creation for
//!   its stdin forwarder (`clone3`, `clone`, `set_robust_list`, `rseq`, and `prctl` **only
//!   `PR_SET_NAME`**, which names it); file reads for `--copy-in`: `openat` **read-only** (no
//!   `O_CREAT`, no `O_TRUNC`, access mode `O_RDONLY`). Only when the run has `--copy-out` may
//!   it create files: `openat` with any flags, `mkdir`, `rename`, `unlink`, `fchmod`,
//!   `chmod`, `ftruncate`.
//! - **vmm**: [`vmm::seccomp::Filter::vmm_thread`] (the VM's needs), and for the front ends:
//!   `poll` and `epoll_*` (waiting for the VM's end and their own events); `sendto` and
//!   `shutdown` (telling a `flint run` agent to kill the command); `getdents64`, `rmdir` and
//!   `unlink` (removing `flint run`'s temporary directory, the API socket); `rename`
//!   (publishing a finished snapshot of a booted sandbox); `ioctl` `TCGETS`/`TCSETS`
//!   (restoring the terminal). Still no `socket`, no `connect`.
//!
//! `FLINT_SECCOMP_SELF_TEST=api:<probe>` and `agent-client:<probe>` test these threads like
//! the VMM's own (see `vmm::seccomp`).

use vmm::seccomp::{Filter, CONNECTED_SOCKETS, FILE_CHANGES, OPEN_FILES, THREAD_CREATION};

/// The API server thread.
pub fn api() -> Filter {
    Filter::new("api")
        .allow(CONNECTED_SOCKETS)
        // Removing its socket when it stops.
        .allow(&[libc::SYS_unlink, libc::SYS_unlinkat])
        .allow_ioctls(&[libc::FIONBIO])
        .refuse_opens()
}

/// `flint run`'s agent-client thread: talks to the guest agent over the vsock Unix socket,
/// copies files in and out, and writes the command's output. Only with `copies_out` may it
/// create files.
pub fn agent_client(copies_out: bool) -> Filter {
    let filter = Filter::new("agent-client")
        .allow(CONNECTED_SOCKETS)
        .allow(OPEN_FILES)
        // Its stdin forwarder thread.
        .allow(THREAD_CREATION)
        .allow(&[
            libc::SYS_connect,
            libc::SYS_copy_file_range,
            libc::SYS_sendfile,
            libc::SYS_poll,
            libc::SYS_ppoll,
            // Entropy for a restored guest's random number generator.
            libc::SYS_getrandom,
        ])
        .allow_unix_stream_sockets()
        .allow_ioctls(&[libc::FIONBIO, libc::TCGETS])
        // Naming its stdin forwarder thread ("agent-stdin"), which glibc does with prctl.
        .allow_when(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
    if copies_out {
        filter.allow(FILE_CHANGES).allow(&[libc::SYS_openat])
    } else {
        filter.allow_read_only_opens()
    }
}

/// The VMM thread of every front end (`flint boot`, API mode, `flint run`) once its VM runs.
pub fn vmm_thread() -> Filter {
    Filter::vmm_thread()
        .allow(&[
            // Waiting for the VM's end together with the front end's own events.
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            // Telling the guest agent to kill the command when a signal stops `flint run`
            // (std writes to a Unix stream socket with send).
            libc::SYS_sendto,
            libc::SYS_shutdown,
            // Removing `flint run`'s temporary directory at the end, and the API socket.
            libc::SYS_getdents64,
            libc::SYS_rmdir,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            // Publishing a finished snapshot of a booted sandbox (`flint run`).
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
        ])
        // Restoring the terminal from raw mode.
        .allow_ioctls(&[libc::TCGETS, libc::TCSETS])
}

/// The VMM thread of a `flint pool` member: [`vmm_thread`], plus receiving its client's
/// connection and streams (`recvmsg` with `SCM_RIGHTS`) and putting them in place of its
/// standard descriptors (`dup3`). Still no `socket`, no `connect`.
pub fn pool_member() -> Filter {
    vmm_thread().allow(&[libc::SYS_recvmsg, libc::SYS_recvfrom, libc::SYS_dup3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn front_end_filters() -> [Filter; 5] {
        [
            api(),
            agent_client(false),
            agent_client(true),
            vmm_thread(),
            pool_member(),
        ]
    }

    #[test]
    fn every_front_end_filter_builds() {
        for filter in front_end_filters() {
            let bpf = filter.program().unwrap();
            assert!(bpf.len() > 10, "{}", filter.thread());
        }
    }

    #[test]
    fn the_api_thread_makes_no_sockets_and_opens_no_files() {
        let api = api();
        assert!(api.allows(libc::SYS_accept4));
        assert!(!api.allows(libc::SYS_socket) && !api.allows(libc::SYS_connect));
        assert!(api.refuses_opens());
    }

    #[test]
    fn the_vmm_thread_may_signal_the_guest_agent_but_makes_no_sockets() {
        // A signal that stops `flint run` makes the VMM thread tell the agent to kill the
        // command: std writes to the agent's Unix socket with sendto.
        let vmm = vmm_thread();
        assert!(vmm.allows(libc::SYS_sendto));
        assert!(!vmm.allows(libc::SYS_socket) && !vmm.allows(libc::SYS_connect));
        assert!(!vmm.refuses_opens());
        // What the VM itself needs there stays as strict: signals only to its own threads.
        assert!(vmm.allows(libc::SYS_tgkill) && !vmm.allows_any_arguments(libc::SYS_tgkill));
        assert!(!vmm.allows_any_arguments(libc::SYS_ioctl));
    }

    #[test]
    fn a_pool_member_receives_descriptors_but_makes_no_sockets() {
        let member = pool_member();
        assert!(member.allows(libc::SYS_recvmsg) && member.allows(libc::SYS_dup3));
        assert!(!member.allows(libc::SYS_socket) && !member.allows(libc::SYS_connect));
        assert!(!vmm_thread().allows(libc::SYS_dup3));
    }

    #[test]
    fn only_a_copy_out_lets_the_agent_client_create_files() {
        let reader = agent_client(false);
        let writer = agent_client(true);
        for &call in FILE_CHANGES {
            assert!(!reader.allows(call) && writer.allows(call), "{call}");
        }
        // Read-only opens for --copy-in: a rule on the flags, not "any arguments".
        assert!(reader.allows(libc::SYS_openat));
        assert!(!reader.allows_any_arguments(libc::SYS_openat));
        assert!(writer.allows_any_arguments(libc::SYS_openat));
        for client in [reader, writer] {
            assert!(!client.refuses_opens());
            assert!(!client.allows_any_arguments(libc::SYS_socket));
            assert!(!client.allows_any_arguments(libc::SYS_prctl));
        }
    }
}
