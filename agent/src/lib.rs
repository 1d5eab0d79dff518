//! flint's sandbox guest agent: the wire protocol ([`protocol`]) between a host program and
//! the agent that runs in the guest (the `flint-agent` binary, listening on vsock port
//! [`AGENT_PORT`]), and the host-side client ([`AgentClient`]).
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use flint_agent::{AgentClient, ExecSpec, AGENT_PORT};
//!
//! let mut client = AgentClient::connect(Path::new("/tmp/v.sock"), AGENT_PORT, Duration::from_secs(30))?;
//! let spec = ExecSpec::new(["sh", "-c", "echo hello; exit 3"]).env("FOO", "bar");
//! let status = client.run(&spec, None::<std::io::Empty>, std::io::stdout(), std::io::stderr())?;
//! assert_eq!(status.code(), 3);
//! client.shutdown()?; // the guest reboots, flint exits 0
//! # Ok::<(), flint_agent::AgentError>(())
//! ```

pub mod client;
pub mod part_file;
pub mod poll;
pub mod protocol;
pub mod stats;
pub mod vsock;

pub use client::{
    agent_text, host_file_mode, AgentClient, AgentError, CommandStatus, CopyOutBudget, Signaller,
    COPY_OUT_LIMIT, COPY_OUT_TIMEOUT, REFRESH_ENTROPY,
};
pub use protocol::{
    ExecSpec, FrameError, FromAgent, InContainer, Message, ProtocolError, ToAgent, UserSpec,
    WindowSize, AGENT_PORT, CONTAINERS_DIR, DATA_CHUNK, IMAGE_ROOT, MAX_PAYLOAD, MAX_TERMINAL_SIZE,
};
pub use stats::{CgroupStats, MemoryStats, PidsStats};

/// The kernel command-line parameter that makes the sandbox's `/init` use a container image:
/// `flint.image=/dev/vdX` names the read-only ext4 disk holding the image's files. `/init`
/// mounts it read-only under a writable overlay at [`IMAGE_ROOT`], with `/proc`, `/sys`,
/// `/dev` (devtmpfs), `/dev/pts`, `/dev/shm` inside and the sandbox's own `/etc/hosts`,
/// `/etc/hostname` and `/etc/resolv.conf` bind-mounted over the image's; the agent keeps
/// running from the initramfs and the host runs commands with `root` set to [`IMAGE_ROOT`].
/// The image is never written.
pub const IMAGE_PARAM: &str = "flint.image";
/// With [`IMAGE_PARAM`]: `flint.scratch=/dev/vdY` names an ext4 disk (formatted by the host)
/// that holds the overlay's writes instead of guest memory.
pub const SCRATCH_PARAM: &str = "flint.scratch";

/// The environment every command starts from (the `Exec` request's variables are added).
pub const DEFAULT_ENV: [(&str, &str); 2] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
];
