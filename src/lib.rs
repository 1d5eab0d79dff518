//! The `flint` library: everything behind the `flint` command. `src/main.rs` only calls
//! [`main_entry`]; integration tests use the modules directly (e.g. [`api`], [`config_file`]).

pub mod api;
mod api_mode;
mod cli;
mod commands;
pub mod config_file;
mod jail;
mod lean;
pub mod logger;
mod sandbox;
pub use sandbox::pod;
pub use sandbox::podnet;
mod seccomp;
mod template;
mod terminal;

use std::process::ExitCode;
use std::time::Instant;

use cli::Command;
use vmm::{ConsoleIo, Ending};

/// Exit status when flint itself fails (bad input, host problem, guest fault).
const STATUS_ERROR: u8 = 1;
/// Exit status when the user quits from the console, as for Ctrl-C on a shell.
const STATUS_CONSOLE_QUIT: u8 = 130;

/// Run flint with the process's arguments and return its exit status.
pub fn main_entry() -> ExitCode {
    let start = Instant::now();
    logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match cli::parse(&args) {
        Ok(Command::Help(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("flint {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Boot(config)) => boot(&config, start),
        Ok(Command::Api(options)) => api_mode::run(&options, start),
        Ok(Command::DescribeSnapshot(path)) => match vmm::snapshot::state_version(&path) {
            Ok(version) => {
                println!("v{version}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Ok(Command::SnapshotVersion) => {
            println!("v{}", vmm::snapshot::VERSION);
            ExitCode::SUCCESS
        }
        Ok(Command::SnapshotMerge { base, diff, out }) => {
            match vmm::snapshot::merge((&base.0, &base.1), (&diff.0, &diff.1), (&out.0, &out.1)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Ok(Command::Run(options)) => {
            // A sandbox's output is the command's: flint itself only speaks up for problems.
            logger::quiet_unless_asked();
            let code = sandbox::run(&options, start);
            log::debug!("sandbox: cleaned up at {} ms", start.elapsed().as_millis());
            code
        }
        Ok(Command::Exec(options)) => sandbox::exec(&options),
        Ok(Command::Pool(options)) => sandbox::pool::pool(&options),
        Ok(Command::PoolMember(options)) => {
            logger::quiet_unless_asked();
            sandbox::pool::member(&options, start)
        }
        Ok(Command::RunInPool(options)) => sandbox::pool::run_in_pool(&options),
        Ok(Command::Image(command)) => sandbox::image_cache::run(&command, &cache_dir()),
        Ok(Command::Jail(options)) => jail::run(&options),
        Ok(Command::Completions(shell)) => {
            let mut script = Vec::new();
            commands::write_completions(shell, &mut script);
            print_all(&script)
        }
        Ok(Command::Man(command)) => {
            let mut page = Vec::new();
            match commands::write_man_page(command.as_deref(), &mut page) {
                Ok(()) => print_all(&page),
                Err(e) => fail(&e),
            }
        }
        Err(e) => fail(&e),
    }
}

/// Write `bytes` to stdout; a closed pipe is flint's error like any other.
fn print_all(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot write to stdout: {e}")),
    }
}

/// `$FLINT_CACHE`, where the resources/ scripts put the guest kernel and the sandbox image
/// and flint keeps sandbox snapshots: `$HOME/.cache/flint` when it is unset or empty, as in
/// resources/lib.sh (the scripts' one definition) and for the tests.
pub fn cache_dir() -> std::path::PathBuf {
    match std::env::var_os("FLINT_CACHE").filter(|dir| !dir.is_empty()) {
        Some(dir) => dir.into(),
        None => {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/flint")
        }
    }
}

pub(crate) fn fail(message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("flint: error: {message}");
    ExitCode::from(STATUS_ERROR)
}

fn boot(config: &vmm::VmConfig, start: Instant) -> ExitCode {
    // Validate before touching the terminal so that bad input leaves it as it was.
    if let Err(e) = config.validate() {
        return fail(&commands::config_error(&e));
    }
    let raw_terminal = terminal::RawMode::enable_on_stdin();
    let console = ConsoleIo {
        output: Box::new(std::io::stdout()),
        input: Some(Box::new(std::io::stdin())),
        escape: raw_terminal.is_some(),
    };
    let result = vmm::run(config, console, start, &seccomp::vmm_thread());
    // Restore the terminal before printing anything of our own.
    drop(raw_terminal);
    match result {
        Err(e) => fail(&e),
        Ok(outcome) => report_outcome(outcome),
    }
}

/// Log what a finished VM run counted and turn its ending into flint's exit status.
pub(crate) fn report_outcome(outcome: vmm::Outcome) -> ExitCode {
    if outcome.unhandled_pio + outcome.unhandled_mmio > 0 {
        log::info!(
            "ignored {} port and {} MMIO accesses that no device handles",
            outcome.unhandled_pio,
            outcome.unhandled_mmio
        );
    }
    log::debug!("vCPU exits: {}", outcome.exits);
    if let Some(m) = outcome.memory {
        log::debug!(
            "memory: VMM overhead {} KiB (resident {} KiB, of which guest RAM {} KiB)",
            m.overhead_kib(),
            m.rss_kib,
            m.guest_kib
        );
    }
    match outcome.ending {
        Ending::Reset => ExitCode::SUCCESS,
        Ending::Fault { vcpu, reason } => fail(&format!("vCPU {vcpu}: {reason}")),
        Ending::PageFaultHandlerGone(path) => {
            fail(&vmm::Error::PageFaultHandlerGone(path).to_string())
        }
        Ending::ConsoleQuit => {
            log::warn!("stopped the VM from the console (Ctrl-A x)");
            ExitCode::from(STATUS_CONSOLE_QUIT)
        }
        Ending::Signal(sig) => {
            log::warn!("stopped the VM on signal {}", signal_name(sig));
            ExitCode::from(128u8.saturating_add(sig as u8))
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("{n}"),
    }
}
