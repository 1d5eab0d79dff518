//! `flint jail`: the front end of the `flint-jail` crate, which does the work.
//!
//! The names the command line uses are re-exported here; [`run`] reports a failure as flint
//! reports any other and exits with the jailed flint's status.

use std::process::ExitCode;

pub use flint_jail::{
    valid_id, CgroupVersion, JailOptions, Rlimit, DEFAULT_CGROUP_SETTINGS, DEFAULT_CHROOT_BASE,
    DEFAULT_RLIMITS,
};

use crate::fail;

/// Run `flint jail`: returns once the jailed flint has ended and the jail is gone.
pub fn run(options: &JailOptions) -> ExitCode {
    match flint_jail::run(options) {
        Ok(status) => ExitCode::from(status),
        Err(e) => fail(&e),
    }
}
