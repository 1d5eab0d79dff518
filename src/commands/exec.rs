//! `flint exec`: run a command in a running microVM.

use std::path::PathBuf;

use clap::Args;

use super::{once, CommandArgs};
use crate::cli::{CliError, Command};
use crate::sandbox::ExecOptions;

pub(crate) const ABOUT: &str = "Run a command in a running microVM";

pub(crate) const AFTER_HELP: &str = "\
Run COMMAND in the running microVM whose API socket is PATH (its guest must run flint-agent
and the VM must have a vsock device), like 'flint run' but without a new VM; any number of
times. First the agent sets the guest's clock from the host's and reseeds the guest's random
number generator (the VM may have been loaded from a snapshot).

Exit status: COMMAND's, or 125 when flint cannot reach the agent.";

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// The API socket of the running VM
    #[arg(long = "api-sock", value_name = "PATH", allow_hyphen_values = true)]
    api_sock: Vec<PathBuf>,

    #[command(flatten)]
    command: CommandArgs,

    /// The command to run in the guest and its arguments
    #[arg(last = true, value_name = "COMMAND")]
    argv: Vec<String>,
}

impl ExecArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        if self.argv.is_empty() {
            return Err(CliError::NoCommandToRun("exec"));
        }
        Ok(Command::Exec(ExecOptions {
            api_sock: once("--api-sock", self.api_sock)?.ok_or(CliError::NoApiSock)?,
            command: self.command.into_options(self.argv),
        }))
    }
}
