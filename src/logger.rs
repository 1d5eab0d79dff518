//! A minimal logger: one line per message on stderr (or the file `PUT /logger` names),
//! prefixed with `flint:`.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use devices::guest_log::Limiter;
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where flint logs (`PUT /logger`, a config file's `logger`): the front end's own setting,
/// which the VMM never sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggerConfig {
    /// Where log lines go; `None`: standard error, as before.
    pub path: Option<std::path::PathBuf>,
    /// "Error", "Warning", "Info", "Debug" (or "Trace", "Off").
    pub level: Option<String>,
    pub show_level: bool,
    pub show_log_origin: bool,
    /// Only lines from this module path and below (e.g. `vmm` or `flint::api`).
    pub module: Option<String>,
}

struct Target {
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

struct FlintLogger {
    target: Mutex<Target>,
}

impl Log for FlintLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) || !admit_target(record.target()) {
            return;
        }
        let mut target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = &target.module {
            if !in_module(record.target(), module) {
                return;
            }
        }
        let prefix = match (record.level(), target.show_level) {
            (Level::Error, _) => "error: ".to_string(),
            (Level::Warn, _) => "warning: ".to_string(),
            (Level::Info, false) => String::new(),
            (Level::Debug | Level::Trace, false) => "debug: ".to_string(),
            (level, true) => format!("{}: ", level.as_str().to_lowercase()),
        };
        let origin = match (target.show_origin, record.file(), record.line()) {
            (true, Some(file), Some(line)) => format!("[{file}:{line}] "),
            _ => String::new(),
        };
        let line = format!("flint: {prefix}{origin}{}\n", record.args());
        match target.file.as_mut() {
            // A failed log write has nowhere better to go.
            Some(file) => {
                let _ = file.write_all(line.as_bytes());
            }
            None => eprint!("{line}"),
        }
    }

    fn flush(&self) {}
}

/// Whether the module path `target` is `module` or inside it (`vmm::vcpu` is in `vmm`, `vmmx`
/// is not).
fn in_module(target: &str, module: &str) -> bool {
    target
        .strip_prefix(module)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// Whether a record from the crate or module `target` is written. The virtio-queue library
/// logs every malformed queue it sees, and what a queue holds is the guest's doing: flint
/// checks queues before the library does, and whatever still gets through is limited like a
/// guest warning (`devices::guest_warn!`: a burst, then one line per interval, all counted).
fn admit_target(target: &str) -> bool {
    static VIRTIO_QUEUE: Limiter = Limiter::new();
    !target.starts_with("virtio_queue") || VIRTIO_QUEUE.admit().is_some()
}

static LOGGER: FlintLogger = FlintLogger {
    target: Mutex::new(Target {
        file: None,
        show_level: false,
        show_origin: false,
        module: None,
    }),
};

/// Install the logger. `FLINT_LOG=debug` (or `warn`, `error`, `off`) changes the level from the
/// default `info`.
pub fn init() {
    let level = std::env::var("FLINT_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Log only warnings and errors, unless `FLINT_LOG` chose a level.
pub fn quiet_unless_asked() {
    if std::env::var_os("FLINT_LOG").is_none() {
        log::set_max_level(LevelFilter::Warn);
    }
}

/// A log level as `--level` takes it (the API's names, in any case), in its API spelling.
pub(crate) fn level_name(level: &str) -> Result<String, String> {
    crate::api::schema::LOG_LEVELS
        .iter()
        .find(|l| l.eq_ignore_ascii_case(level))
        .map(|l| l.to_string())
        .ok_or_else(|| {
            format!(
                "expected one of {}",
                crate::api::schema::LOG_LEVELS.join(", ")
            )
        })
}

/// Parse an API log level ("Error", "Warning", "Info", "Debug", "Trace", "Off").
fn parse_level(level: &str) -> Option<LevelFilter> {
    match level.to_ascii_lowercase().as_str() {
        "warning" => Some(LevelFilter::Warn),
        other => other.parse().ok(),
    }
}

/// Send log lines to the file `config` names (standard error when it names none), at its
/// level, from its module: opened as [`vmm::controller::open_output`] does (appended to or
/// created with mode 0600, never through a symbolic link, a named pipe without blocking).
pub fn redirect(config: &LoggerConfig) -> Result<(), String> {
    let level = match &config.level {
        Some(l) => Some(parse_level(l).ok_or_else(|| {
            format!("level: {l:?} is not one of Error, Warning, Info, Debug, Trace, Off")
        })?),
        None => None,
    };
    let file = match &config.path {
        Some(path) => {
            Some(vmm::controller::open_output(path).map_err(|e| format!("log_path: {e}"))?)
        }
        None => None,
    };
    let mut target = LOGGER.target.lock().unwrap_or_else(|e| e.into_inner());
    target.file = file;
    target.show_level = config.show_level;
    target.show_origin = config.show_log_origin;
    target.module = config.module.clone();
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(path: &std::path::Path) -> LoggerConfig {
        LoggerConfig {
            path: Some(path.to_path_buf()),
            level: None,
            show_level: false,
            show_log_origin: false,
            module: None,
        }
    }

    #[test]
    fn the_log_is_never_written_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("flint-log-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        let link = dir.join("log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = redirect(&config(&link)).unwrap_err();
        assert!(
            e.starts_with("log_path: cannot open") && e.contains("symbolic link"),
            "{e}"
        );
        assert!(!target.exists(), "the symlink was followed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn virtio_queue_lines_are_limited_and_others_are_not() {
        let written = (0..100_000)
            .filter(|_| admit_target("virtio_queue::queue"))
            .count() as u64;
        assert!(
            written <= devices::guest_log::BURST + 2,
            "{written} virtio-queue lines"
        );
        assert!((0..1000).all(|_| admit_target("flint::api")));
        assert!((0..1000).all(|_| admit_target("vmm::vstate")));
    }

    #[test]
    fn the_module_filter_keeps_the_module_and_its_children() {
        assert!(in_module("vmm", "vmm"));
        assert!(in_module("vmm::vcpu", "vmm"));
        assert!(in_module("flint::api::server", "flint::api"));
        assert!(!in_module("vmmx", "vmm"));
        assert!(!in_module("flint::api_mode", "flint::api"));
        assert!(!in_module("devices", "vmm"));
    }

    #[test]
    fn api_levels_parse() {
        assert_eq!(parse_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("Debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("Off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
