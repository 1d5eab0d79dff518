//! flint without a subcommand: serve the REST API and/or boot the VM a config file describes.

use std::path::PathBuf;

use clap::Args;

use super::once;
use crate::api::http::{MAX_BODY, MAX_BODY_LIMIT};
use crate::api_mode::ApiOptions;
use crate::cli::{CliError, Command, DEFAULT_API_SOCK};
use crate::logger::LoggerConfig;

/// The largest MMDS data store `--mmds-size-limit` may allow.
const MAX_MMDS_LIMIT: u64 = 64 << 20;

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

    /// Log the guest's boot time when it writes 123 to Firecracker's boot-timer MMIO address
    /// 0xd0000000 (flint's port 0x3f0 always works)
    #[arg(long = "boot-timer", help_heading = "Firecracker options")]
    boot_timer: bool,

    /// The log level: Error, Warning, Info, Debug, Trace or Off (as PUT /logger)
    #[arg(long, value_name = "LEVEL", help_heading = "Firecracker options",
          value_parser = crate::logger::level_name)]
    level: Vec<String>,

    /// Write flint's log to this file or named pipe (as PUT /logger)
    #[arg(
        long = "log-path",
        value_name = "PATH",
        allow_hyphen_values = true,
        help_heading = "Firecracker options"
    )]
    log_path: Vec<PathBuf>,

    /// Put the level in every log line
    #[arg(long = "show-level", help_heading = "Firecracker options")]
    show_level: bool,

    /// Put the source file and line in every log line
    #[arg(long = "show-log-origin", help_heading = "Firecracker options")]
    show_log_origin: bool,

    /// Log only lines from this Rust module path and below (e.g. vmm)
    #[arg(long, value_name = "MODULE", help_heading = "Firecracker options")]
    module: Vec<String>,

    /// Write metrics to this file or named pipe (as PUT /metrics)
    #[arg(
        long = "metrics-path",
        value_name = "PATH",
        allow_hyphen_values = true,
        help_heading = "Firecracker options"
    )]
    metrics_path: Vec<PathBuf>,

    /// The largest API request body accepted, in bytes (default 51200)
    #[arg(
        long = "http-api-max-payload-size",
        value_name = "BYTES",
        help_heading = "Firecracker options"
    )]
    http_api_max_payload_size: Vec<u64>,

    /// When the process was started (wall clock, microseconds since the epoch): the guest's
    /// boot time is counted from then
    #[arg(
        long = "start-time-us",
        value_name = "US",
        help_heading = "Firecracker options"
    )]
    start_time_us: Vec<u64>,

    /// Accepted for Firecracker's jailer, which passes it; flint does not use it
    #[arg(
        long = "start-time-cpu-us",
        value_name = "US",
        help_heading = "Firecracker options"
    )]
    start_time_cpu_us: Vec<u64>,

    /// Accepted for Firecracker's jailer, which passes it; flint does not use it
    #[arg(
        long = "parent-cpu-time-us",
        value_name = "US",
        help_heading = "Firecracker options"
    )]
    parent_cpu_time_us: Vec<u64>,

    /// Print the data format version of a flint snapshot state file and exit
    #[arg(
        long = "describe-snapshot",
        value_name = "FILE",
        allow_hyphen_values = true,
        help_heading = "Firecracker options"
    )]
    describe_snapshot: Vec<PathBuf>,

    /// Print the snapshot data format version this flint writes and exit
    #[arg(long = "snapshot-version", help_heading = "Firecracker options")]
    snapshot_version: bool,

    /// Refused: flint installs its own per-thread filters (see --no-seccomp)
    #[arg(long = "seccomp-filter", value_name = "FILE", hide = true)]
    seccomp_filter: Vec<PathBuf>,

    /// Fill the MMDS data store from this JSON file at startup (as PUT /mmds)
    #[arg(
        long,
        value_name = "FILE",
        allow_hyphen_values = true,
        help_heading = "Firecracker options"
    )]
    metadata: Vec<PathBuf>,

    /// The most bytes of JSON the MMDS data store holds (default 51200)
    #[arg(
        long = "mmds-size-limit",
        value_name = "BYTES",
        help_heading = "Firecracker options"
    )]
    mmds_size_limit: Vec<u64>,

    /// Refused: flint's devices are virtio-mmio
    #[arg(long = "enable-pci", hide = true)]
    enable_pci: bool,
}

impl ApiArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        let unsupported = |option: &'static str, reason: &'static str| {
            Err(CliError::Unsupported { option, reason })
        };
        if !self.seccomp_filter.is_empty() {
            return unsupported(
                "--seccomp-filter",
                "flint installs its own seccomp filter on each of its threads and loads no \
                 other (--no-seccomp runs without them)",
            );
        }
        if self.enable_pci {
            return unsupported(
                "--enable-pci",
                "flint's devices are on virtio-mmio; it has no PCI bus",
            );
        }
        if let Some(path) = once("--describe-snapshot", self.describe_snapshot)? {
            return Ok(Command::DescribeSnapshot(path));
        }
        if self.snapshot_version {
            return Ok(Command::SnapshotVersion);
        }
        super::no_seccomp(self.no_seccomp);
        let level = once("--level", self.level)?;
        let log_path = once("--log-path", self.log_path)?;
        let module = once("--module", self.module)?;
        let logger = (level.is_some()
            || log_path.is_some()
            || module.is_some()
            || self.show_level
            || self.show_log_origin)
            .then_some(LoggerConfig {
                path: log_path,
                level,
                show_level: self.show_level,
                show_log_origin: self.show_log_origin,
                module,
            });
        let max_body = match once(
            "--http-api-max-payload-size",
            self.http_api_max_payload_size,
        )? {
            None => MAX_BODY,
            Some(n) if (1..=MAX_BODY_LIMIT as u64).contains(&n) => n as usize,
            Some(n) => {
                return Err(CliError::Range {
                    option: "--http-api-max-payload-size",
                    value: n.to_string(),
                    min: 1,
                    max: MAX_BODY_LIMIT as u64,
                })
            }
        };
        once("--start-time-cpu-us", self.start_time_cpu_us)?;
        once("--parent-cpu-time-us", self.parent_cpu_time_us)?;
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
            logger,
            metrics_path: once("--metrics-path", self.metrics_path)?,
            boot_timer: self.boot_timer,
            max_body,
            start_time_us: once("--start-time-us", self.start_time_us)?,
            metadata: once("--metadata", self.metadata)?,
            mmds_size_limit: match once("--mmds-size-limit", self.mmds_size_limit)? {
                None => None,
                Some(n) if (1..=MAX_MMDS_LIMIT).contains(&n) => Some(n as usize),
                Some(n) => {
                    return Err(CliError::Range {
                        option: "--mmds-size-limit",
                        value: n.to_string(),
                        min: 1,
                        max: MAX_MMDS_LIMIT,
                    })
                }
            },
        }))
    }
}
