//! The command line's definition (clap derive), one module per subcommand: each holds its
//! arguments and their conversion into the options the rest of flint consumes. `--help`, the
//! shell completions (`flint completions SHELL`) and the man pages (`flint man`) all come from
//! this one definition.

pub(crate) mod api;
pub(crate) mod boot;
pub(crate) mod exec;
pub(crate) mod image;
pub(crate) mod jail;
pub(crate) mod pool;
pub(crate) mod run;
pub(crate) mod snapshot;
pub(crate) mod values;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::cli::{CliError, Command, DEFAULT_API_SOCK};
use crate::sandbox::CommandOptions;

fn main_after_help() -> String {
    format!(
        "\
Usage forms:
  flint boot --kernel PATH [OPTIONS]
        boot a guest kernel on the serial console ('flint boot --help')
  flint run [OPTIONS] -- COMMAND [ARG]...
  flint run --image REF [OPTIONS] [-- COMMAND [ARG]...]
        run a command in a throwaway microVM (in a container image's files with --image)
        and exit with its status
  flint pool --socket PATH [--size N] [OPTIONS]
        keep sandboxes warm; 'flint run --pool PATH -- COMMAND' runs a command in one
  flint exec --api-sock PATH [OPTIONS] -- COMMAND [ARG]...
        run a command in a running microVM
  flint --api-sock PATH [--config-file FILE] [--id ID]
        serve the REST API (Firecracker-compatible) on a Unix socket; configure and start
        the VM through it
  flint --config-file FILE [--no-api | --api-sock PATH] [--id ID]
        boot the VM a JSON config file describes (same schema as the API bodies); the API
        is served on PATH (default {DEFAULT_API_SOCK}) unless --no-api
  flint image pull REF | ls [-q] | rm IMAGE... | prune
        manage the cache of container images that 'flint run --image' uses
  flint jail --id ID --uid UID --gid GID [OPTIONS] -- FLINT_ARGS...
        run flint in a jail ('flint jail --help')
  flint snapshot merge --base STATE MEM --diff STATE MEM --out STATE MEM
        merge a diff snapshot into its base ('flint snapshot --help')
  flint completions SHELL
        print a completion script for bash, zsh, fish, elvish or powershell

Errors are one line on stderr, 'flint: error: ...', with exit status 1."
    )
}

/// flint: a KVM-based microVM monitor
#[derive(Debug, Parser)]
#[command(
    name = "flint",
    version,
    about = "A KVM-based microVM monitor",
    after_help = main_after_help(),
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = false,
    max_term_width = 100
)]
pub(crate) struct Cli {
    #[command(flatten)]
    api: api::ApiArgs,

    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    #[command(about = boot::ABOUT, after_help = boot::AFTER_HELP,
              override_usage = "flint boot --kernel PATH [OPTIONS]")]
    Boot(boot::BootArgs),
    #[command(about = run::ABOUT, after_help = run::after_help(), args_override_self = true,
              override_usage = "flint run [OPTIONS] -- COMMAND [ARG]...\n       flint run --image REF [OPTIONS] [-- COMMAND [ARG]...]")]
    Run(Box<run::RunArgs>),
    #[command(about = pool::ABOUT, after_help = pool::after_help(),
              override_usage = "flint pool --socket PATH [--size N] [OPTIONS]")]
    Pool(pool::PoolArgs),
    #[command(hide = true, name = "pool-member")]
    PoolMember(pool::PoolMemberArgs),
    #[command(about = exec::ABOUT, after_help = exec::AFTER_HELP,
              override_usage = "flint exec --api-sock PATH [OPTIONS] -- COMMAND [ARG]...")]
    Exec(exec::ExecArgs),
    #[command(about = image::ABOUT, after_help = image::AFTER_HELP,
              subcommand_required = true)]
    Image(image::ImageArgs),
    #[command(about = jail::ABOUT, after_help = jail::AFTER_HELP,
              override_usage = "flint jail --id ID --uid UID --gid GID [OPTIONS] -- FLINT_ARGS...")]
    Jail(jail::JailArgs),
    #[command(about = snapshot::ABOUT, after_help = snapshot::AFTER_HELP,
              subcommand_required = true)]
    Snapshot(snapshot::SnapshotArgs),
    /// Print a shell completion script (e.g. 'flint completions bash > /etc/bash_completion.d/flint')
    Completions {
        /// The shell to complete flint's command line in
        shell: clap_complete::Shell,
    },
    /// Print a man page in roff: flint(1), or flint-COMMAND(1) for a subcommand
    #[command(hide = true)]
    Man {
        /// The subcommand whose page to print
        command: Option<String>,
    },
}

/// The options `run` and `exec` share: the command's environment and working directory.
#[derive(Debug, Args)]
pub(crate) struct CommandArgs {
    /// Set an environment variable for COMMAND (repeatable)
    #[arg(long, value_name = "KEY=VALUE", allow_hyphen_values = true, value_parser = values::env)]
    env: Vec<(String, String)>,

    /// COMMAND's working directory in the guest (default: /)
    #[arg(long, value_name = "DIR", allow_hyphen_values = true,
          value_parser = values::guest_path, overrides_with = "workdir")]
    workdir: Option<String>,
}

impl CommandArgs {
    pub(crate) fn into_options(self, argv: Vec<String>) -> CommandOptions {
        CommandOptions {
            argv,
            env: self.env,
            workdir: self.workdir,
        }
    }
}

/// The value of an option that may be given at most once (clap collects every occurrence, so
/// that a bad value is reported before the repetition, in the order given).
fn once<T>(option: &str, mut values: Vec<T>) -> Result<Option<T>, CliError> {
    if values.len() > 1 {
        return Err(CliError::Repeated(option.to_string()));
    }
    Ok(values.pop())
}

/// `--no-seccomp`: flint's threads run without their seccomp filters.
fn no_seccomp(asked: bool) {
    if asked {
        vmm::seccomp::disable();
    }
}

/// The clap definition of flint's command line.
pub(crate) fn definition() -> clap::Command {
    Cli::command()
}

/// What the parsed command line `matches` asks for.
pub(crate) fn command_from(matches: &ArgMatches) -> Result<Command, CliError> {
    let cli = Cli::from_arg_matches(matches).map_err(|e| CliError::Usage(e.to_string()))?;
    match cli.command {
        None => cli.api.into_command(),
        Some(Sub::Boot(args)) => {
            let sub = matches.subcommand_matches("boot").unwrap_or(matches);
            args.into_command(sub)
        }
        Some(Sub::Run(args)) => args.into_command(),
        Some(Sub::Exec(args)) => args.into_command(),
        Some(Sub::Pool(args)) => args.into_command(),
        Some(Sub::PoolMember(args)) => args.into_command(),
        Some(Sub::Image(args)) => args.into_command(),
        Some(Sub::Jail(args)) => args.into_command(),
        Some(Sub::Snapshot(args)) => args.into_command(),
        Some(Sub::Completions { shell }) => Ok(Command::Completions(shell)),
        Some(Sub::Man { command }) => {
            man_page(command.as_deref())?;
            Ok(Command::Man(command))
        }
    }
}

/// Write the completion script for `shell` to `out`.
pub(crate) fn write_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut definition(), "flint", out);
}

/// The clap command whose man page `flint man [COMMAND]` prints, ready to render.
fn man_page(command: Option<&str>) -> Result<clap::Command, CliError> {
    let mut cli = definition().disable_help_subcommand(true);
    cli.build();
    match command {
        None => Ok(cli),
        Some(name) => cli
            .get_subcommands()
            .find(|s| s.get_name() == name && !s.is_hide_set())
            .cloned()
            .ok_or_else(|| CliError::UnknownCommand(name.to_string())),
    }
}

/// Write the man page of `command` (flint's own when `None`) to `out`, in roff.
pub(crate) fn write_man_page(
    command: Option<&str>,
    out: &mut dyn std::io::Write,
) -> Result<(), CliError> {
    let page = man_page(command)?;
    clap_mangen::Man::new(page)
        .source(format!("flint {}", env!("CARGO_PKG_VERSION")))
        .manual("flint manual")
        .render(out)
        .map_err(|e| CliError::Usage(format!("cannot write the man page: {e}")))
}

/// The command-line option a configuration error is about, if one is.
fn option_for(field: vmm::Field) -> Option<&'static str> {
    use vmm::Field;
    Some(match field {
        Field::Vcpus => "--vcpus",
        Field::Memory => "--memory",
        Field::Cmdline => "--cmdline",
        Field::DriveRoot | Field::DriveId | Field::DrivePartuuid | Field::DrivePath => "--disk",
        Field::NetTap | Field::NetId | Field::NetMac | Field::NetMtu => "--net",
        Field::VsockCid => "--vsock",
        // The sentence names the device and the limiter itself; the device count has no
        // single option.
        Field::RateLimiter | Field::Devices | Field::MetricsPath | Field::Mmds | Field::Balloon => {
            return None
        }
    })
}

/// A VM configuration the command line described that cannot be used, as one sentence that
/// names the option (the VMM's validation is the same for every front end).
pub(crate) fn config_error(e: &vmm::ConfigError) -> String {
    match option_for(e.field()) {
        Some(option) => format!("{option}: {e}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod config_error_tests {
    #[test]
    fn configuration_errors_name_the_option() {
        let mut c = vmm::VmConfig::new("/k");
        c.vcpus = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(
            super::config_error(&e),
            "--vcpus: a VM needs at least 1 vCPU"
        );
        c.vcpus = 1;
        c.nets = vec![vmm::NetConfig::new("tap0"), vmm::NetConfig::new("tap0")];
        let e = c.validate().unwrap_err();
        assert!(super::config_error(&e).starts_with("--net: TAP device tap0"));
    }
}
