//! flint without a subcommand: serve the REST API and/or boot the VM a config file describes.

use std::path::PathBuf;

use clap::Args;

use super::once;
use crate::api_mode::ApiOptions;
use crate::cli::{CliError, Command, DEFAULT_API_SOCK};

#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// Serve the REST API (Firecracker-compatible) on this Unix socket; configure and start the
    /// VM through it
    #[arg(long = "api-sock", value_name = "PATH", allow_hyphen_values = true)]
    api_sock: Vec<PathBuf>,

    /// Boot the VM this JSON file describes (same schema as the API bodies); the API is still
    /// served, on --api-sock or the default socket, unless --no-api
    #[arg(long = "config-file", value_name = "FILE", allow_hyphen_values = true)]
    config_file: Vec<PathBuf>,

    /// The instance's id, as the API reports it
    #[arg(long, value_name = "ID", allow_hyphen_values = true)]
    id: Vec<String>,

    /// Do not serve the API (needs --config-file)
    #[arg(long = "no-api", overrides_with = "no_api")]
    no_api: bool,

    /// Do not install seccomp filters (debugging only)
    #[arg(long = "no-seccomp", overrides_with = "no_seccomp")]
    no_seccomp: bool,
}

impl ApiArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        super::no_seccomp(self.no_seccomp);
        let mut api_sock = once("--api-sock", self.api_sock)?;
        let config_file = once("--config-file", self.config_file)?;
        let id = once("--id", self.id)?;
        if self.no_api && api_sock.is_some() {
            return Err(CliError::NoApiWithSocket);
        }
        if self.no_api && config_file.is_none() {
            return Err(CliError::NoApiWithoutConfig);
        }
        if !self.no_api && api_sock.is_none() {
            api_sock = Some(PathBuf::from(DEFAULT_API_SOCK));
        }
        Ok(Command::Api(ApiOptions {
            api_sock,
            config_file,
            id: id.unwrap_or_else(|| "anonymous-instance".to_string()),
        }))
    }
}
