//! `flint --api-sock PATH` / `flint --config-file FILE`: a VMM process configured through the
//! REST API and/or a config file, whose VMM thread (this one) executes requests in order and
//! owns the VM.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flint_agent::poll::wait_readable;
use vmm::controller::{Controller, MetricsConfig, Request, RequestError, Response};
use vmm::{ConsoleIo, Ending};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::routes::{self, Reply};
use crate::api::{schema, ApiError, ApiRequest, ApiServer};
use crate::logger::LoggerConfig;
use crate::{config_file, fail, report_outcome, terminal};

/// How the process was asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiOptions {
    pub api_sock: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub id: String,
    /// The logger from `--level`, `--log-path`, ..., set before anything else.
    pub logger: Option<LoggerConfig>,
    /// `--metrics-path`, set before the config file's requests.
    pub metrics_path: Option<PathBuf>,
    /// `--boot-timer`: Firecracker's boot-timer MMIO device too.
    pub boot_timer: bool,
    /// The largest API request body accepted (`--http-api-max-payload-size`).
    pub max_body: usize,
    /// `--start-time-us`: when the process started (wall clock, µs since the epoch), the
    /// origin of the guest's boot time.
    pub start_time_us: Option<u64>,
    /// `--metadata`: a JSON file that fills the MMDS data store at startup.
    pub metadata: Option<PathBuf>,
    /// `--mmds-size-limit`.
    pub mmds_size_limit: Option<usize>,
}

impl ApiOptions {
    /// The requests the command line makes before a config file's: the logger, metrics, then
    /// the MMDS data of `--metadata`.
    fn startup_requests(&self) -> Result<Vec<ApiRequest>, String> {
        let logger = self.logger.clone().map(ApiRequest::SetLogger);
        let metrics = self
            .metrics_path
            .clone()
            .map(|p| ApiRequest::Vmm(Request::SetMetrics(MetricsConfig::to_path(p))));
        let metadata = match &self.metadata {
            None => None,
            Some(path) => {
                let limit = self
                    .mmds_size_limit
                    .unwrap_or(devices::mmds::DEFAULT_SIZE_LIMIT);
                // Room for the file's own whitespace; the store checks the data's size.
                let cap = (limit as u64).saturating_mul(4).max(1 << 20);
                let mut bytes = Vec::new();
                std::fs::File::open(path)
                    .and_then(|f| {
                        use std::io::Read;
                        f.take(cap + 1).read_to_end(&mut bytes)
                    })
                    .map_err(|e| format!("--metadata: cannot read {}: {e}", path.display()))?;
                if bytes.len() as u64 > cap {
                    return Err(format!(
                        "--metadata: {} is larger than {cap} bytes",
                        path.display()
                    ));
                }
                let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    format!("--metadata: {} is not valid JSON: {e}", path.display())
                })?;
                Some(ApiRequest::Vmm(Request::PutMmds(value)))
            }
        };
        Ok(logger.into_iter().chain(metrics).chain(metadata).collect())
    }
}

/// `start` moved back to `start_time_us` (wall clock), when that is in the past.
fn process_start(start: Instant, start_time_us: Option<u64>) -> Instant {
    let Some(us) = start_time_us else {
        return start;
    };
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let before = Duration::from_micros(now_us.saturating_sub(us));
    Instant::now()
        .checked_sub(before)
        .unwrap_or(start)
        .min(start)
}

/// The VMM thread's side of the API and the config file: the controller that owns the VM,
/// and the front end's own settings (where flint logs), so that a config file and the API
/// are carried out the same way.
struct Frontend {
    controller: Controller,
    logger: Option<LoggerConfig>,
}

impl Frontend {
    fn handle(&mut self, request: &ApiRequest) -> Result<Response, RequestError> {
        match request {
            ApiRequest::Vmm(request) => self.controller.handle(request.clone()),
            ApiRequest::SetLogger(logger) => {
                self.controller.count_request("put_logger");
                if let Err(message) = crate::logger::redirect(logger) {
                    self.controller.count_refusal("put_logger");
                    return Err(RequestError {
                        field: None,
                        message,
                    });
                }
                self.logger = Some(logger.clone());
                Ok(Response::Done)
            }
        }
    }

    /// Carry out an API request and answer in HTTP terms.
    fn reply(&mut self, request: ApiRequest) -> Reply {
        let result = self.handle(&request);
        routes::reply_for(&request, result, self.logger.as_ref())
    }
}

/// How often metrics are written when a metrics file is configured.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// Run the VMM thread: configure from the file, serve the API, and exit when the VM ends.
pub fn run(options: &ApiOptions, start: Instant) -> ExitCode {
    let start = process_start(start, options.start_time_us);
    let wake = match EventFd::new(EFD_NONBLOCK) {
        Ok(w) => w,
        Err(e) => return fail(&format!("cannot create an eventfd: {e}")),
    };
    if let Err(e) = vmm::install_stop_signals(&wake) {
        return fail(&format!("cannot install signal handlers: {e}"));
    }
    let raw_terminal = terminal::RawMode::enable_on_stdin();
    let console = ConsoleIo {
        output: Box::new(std::io::stdout()),
        input: Some(Box::new(std::io::stdin())),
        escape: raw_terminal.is_some(),
    };
    let mut frontend = Frontend {
        controller: Controller::new(
            options.id.clone(),
            console,
            start,
            crate::seccomp::vmm_thread(),
        ),
        logger: None,
    };
    if options.boot_timer {
        frontend.controller.enable_boot_timer();
    }
    if let Some(limit) = options.mmds_size_limit {
        frontend.controller.set_mmds_size_limit(limit);
    }
    let startup = match options.startup_requests() {
        Ok(requests) => requests,
        Err(e) => return fail(&e),
    };
    for request in startup {
        if let Err(e) = frontend.handle(&request) {
            return fail(&schema::request_error_message(&e));
        }
    }

    // The API server first: its thread must start, and its socket be bound, before a VM from
    // the config file starts and this thread restricts itself (its filter allows neither, and
    // threads inherit it).
    let (tx, rx) = mpsc::channel::<(ApiRequest, mpsc::Sender<Reply>)>();
    let server = match &options.api_sock {
        Some(path) => match wake.try_clone().map_err(|e| e.to_string()).and_then(|w| {
            ApiServer::start_with_max_body(path, tx, w, options.max_body)
                .map_err(|e: ApiError| e.to_string())
        }) {
            Ok(server) => Some(server),
            Err(e) => {
                drop(raw_terminal);
                return fail(&e);
            }
        },
        None => None,
    };

    if let Some(path) = &options.config_file {
        let requests = match config_file::load(path) {
            Ok(r) => r,
            Err(e) => {
                drop(raw_terminal);
                return fail(&e);
            }
        };
        for request in requests.into_iter().chain([Request::Start.into()]) {
            if let Err(e) = frontend.handle(&request) {
                drop(raw_terminal);
                return fail(&format!(
                    "{}: {}",
                    path.display(),
                    schema::request_error_message(&e)
                ));
            }
        }
    }

    let mut next_metrics = Instant::now() + METRICS_PERIOD;
    let ending = loop {
        let controller = &mut frontend.controller;
        let mut fds: Vec<&dyn AsRawFd> = vec![&wake];
        if let Some(vm) = controller.vm() {
            fds.push(vm.ending_event());
        }
        wait_readable(
            &fds,
            Some(next_metrics.saturating_duration_since(Instant::now())),
        );
        if Instant::now() >= next_metrics {
            if let Err(e) = controller.flush_metrics() {
                log::warn!("{e}");
            }
            next_metrics = Instant::now() + METRICS_PERIOD;
        }
        let _ = wake.read();
        while let Ok((request, reply)) = rx.try_recv() {
            // The client may have gone away; nothing to do then.
            let _ = reply.send(frontend.reply(request));
        }
        let controller = &mut frontend.controller;
        if let Some(vm) = controller.vm() {
            if let Some(ending) = vm.ending() {
                break Some(ending);
            }
        } else if let Some(sig) = vmm::stop_signal_received() {
            break Some(Ending::Signal(sig));
        }
    };
    // A last metrics line, with the VM's final counts.
    if let Err(e) = frontend.controller.flush_metrics() {
        log::warn!("{e}");
    }
    let outcome = match (ending, frontend.controller.take_vm()) {
        (Some(ending), Some(vm)) => Some(vm.shutdown(ending)),
        _ => None,
    };
    if let Some(server) = server {
        server.stop();
    }
    drop(raw_terminal);
    match outcome {
        Some(outcome) => report_outcome(outcome),
        None => {
            let sig = vmm::stop_signal_received().unwrap_or(libc::SIGTERM);
            log::warn!("stopped on signal {sig} before the VM started");
            ExitCode::from(128u8.saturating_add(sig as u8))
        }
    }
}
