//! Command-line parsing: turns arguments into a [`Command`], with one-sentence errors. The
//! command line itself is defined with clap in [`crate::commands`]; this module runs it and
//! turns clap's errors into flint's sentences.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use vmm::VmConfig;

use crate::api_mode::ApiOptions;
use crate::commands;
use crate::jail::JailOptions;
use crate::sandbox::image_cache::ImageCommand;
use crate::sandbox::{ExecOptions, RunOptions};

/// What the user asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Print this help text and exit.
    Help(String),
    Version,
    Boot(VmConfig),
    /// Serve the REST API and/or boot from a config file.
    Api(ApiOptions),
    /// Run a command in a throwaway microVM.
    Run(Box<RunOptions>),
    /// Run a command in a running microVM.
    Exec(ExecOptions),
    /// Keep sandboxes warm (`flint pool`).
    Pool(Box<crate::sandbox::pool::PoolOptions>),
    /// One warm sandbox of a pool (the hidden `flint pool-member`).
    PoolMember(Box<RunOptions>),
    /// Run a command in a pool's sandbox (`flint run --pool`).
    RunInPool(crate::sandbox::pool::PoolRunOptions),
    /// Manage the image cache.
    Image(ImageCommand),
    /// Run flint in a jail.
    Jail(JailOptions),
    /// Print a shell completion script.
    Completions(clap_complete::Shell),
    /// Print a man page: flint's own, or a subcommand's.
    Man(Option<String>),
    /// Print the data format version of a snapshot state file.
    DescribeSnapshot(std::path::PathBuf),
    /// Print the snapshot data format version this flint writes.
    SnapshotVersion,
    /// Merge a diff snapshot into its base: `(state file, memory file)` each.
    SnapshotMerge {
        base: (std::path::PathBuf, std::path::PathBuf),
        diff: (std::path::PathBuf, std::path::PathBuf),
        out: (std::path::PathBuf, std::path::PathBuf),
    },
}

/// Where the API socket goes when a config file is given without `--api-sock` or `--no-api`.
pub const DEFAULT_API_SOCK: &str = "/run/flint.socket";

/// A command line that cannot be understood.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("no command given (see 'flint --help')")]
    NoCommand,
    #[error("unknown command '{0}' (see 'flint --help')")]
    UnknownCommand(String),
    #[error("unknown option '{option}' for 'flint {command}' (see 'flint {command} --help')")]
    UnknownOption {
        command: &'static str,
        option: String,
    },
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{option} takes a whole number, not '{value}'")]
    NotANumber { option: &'static str, value: String },
    #[error("--huge-pages takes none, 2M or transparent, not '{0}'")]
    HugePages(String),
    #[error("{0} was given more than once")]
    Repeated(String),
    #[error("{option} is not supported: {reason}")]
    Unsupported {
        option: &'static str,
        reason: &'static str,
    },
    #[error("{option} must be from {min} to {max}, not {value}")]
    Range {
        option: &'static str,
        value: String,
        min: u64,
        max: u64,
    },
    #[error(
        "--no-api needs --config-file: without the API, the VM can only be configured from a file"
    )]
    NoApiWithoutConfig,
    #[error("--no-api and --api-sock contradict each other")]
    NoApiWithSocket,
    #[error(
        "'flint {0}' needs a command after --, as in 'flint {0} [OPTIONS] -- COMMAND [ARG]...'"
    )]
    NoCommandToRun(&'static str),
    #[error("{option} takes KEY=VALUE, not '{value}'")]
    EnvSpec { option: &'static str, value: String },
    #[error("{option} takes {form}, not '{value}'")]
    CopySpec {
        option: &'static str,
        form: &'static str,
        value: String,
    },
    #[error("unknown --rootfs option '{0}' (expected bw=BYTES_PER_SEC or iops=N)")]
    RootfsOption(String),
    #[error("--rootfs needs a path before its options, as in --rootfs IMAGE[,bw=BYTES_PER_SEC][,iops=N]")]
    RootfsPath,
    #[error("'flint exec' needs --api-sock PATH (the API socket of the running VM)")]
    NoApiSock,
    #[error("{0} must be an absolute path inside the guest")]
    GuestPath(String),
    #[error("'flint boot' needs --kernel PATH")]
    NoKernel,
    #[error("--disk needs a path before its options, as in --disk PATH[,ro][,root][,id=NAME]")]
    DiskPath,
    #[error(
        "unknown --disk option '{0}' (expected ro, root, id=NAME, bw=BYTES_PER_SEC or iops=N)"
    )]
    DiskOption(String),
    #[error(
        "--net needs tap=NAME, as in --net tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,bw=BYTES_PER_SEC][,mtu=N]; got '{0}'"
    )]
    NetSpec(String),
    #[error("{option} {key}= must be a whole number from 1 to {max}, not '{value}'")]
    Rate {
        option: &'static str,
        key: &'static str,
        value: String,
        max: u64,
    },
    #[error("--net: {0}")]
    NetMac(vmm::MacError),
    #[error(transparent)]
    NatSpec(#[from] crate::sandbox::nat::NatSpecError),
    #[error("--vsock needs cid=N,uds=PATH; got '{0}'")]
    VsockSpec(String),
    #[error("'flint jail' needs {0}")]
    JailNeeds(&'static str),
    #[error("the jail id '{0}' must be 1 to 64 letters, digits and dashes")]
    JailId(String),
    #[error("'flint jail' needs a non-zero --uid: the jailed flint must not run as root")]
    JailRootUid,
    #[error("--cgroup-version takes 1 or 2, not '{0}'")]
    CgroupVersion(String),
    #[error("--cgroup takes FILE=VALUE with a cgroup file name such as memory.max, not '{0}'")]
    CgroupSpec(String),
    #[error("--rlimit takes RESOURCE=N[,RESOURCE=N]... with RESOURCE one of nofile, fsize, nproc, core, as, memlock; got '{0}'")]
    RlimitSpec(String),
    #[error("--file {0} must be an absolute path without '.' or '..'")]
    JailFile(String),
    #[error("{what} takes one of {valid}, not '{value}'")]
    NotOneOf {
        what: String,
        value: String,
        valid: String,
    },
    #[error("'flint {command}' needs {argument}")]
    MissingArgument { command: String, argument: String },
    /// Any other command line clap refuses, in clap's words.
    #[error("{0}")]
    Usage(String),
    #[error("{option} takes a size in bytes with an optional K, M or G suffix (powers of 1024), as in 512M, not '{value}'")]
    Size { option: &'static str, value: String },
    #[error("--insecure-registry takes a registry as image references name it, HOST[:PORT] (e.g. 127.0.0.1:5000), not '{0}'")]
    InsecureRegistry(String),
    #[error("--image {0}: no such OCI layout directory, OCI archive or docker save tarball")]
    ImageMissing(String),
    #[error("--image {value}: {reason}")]
    ImageRef { value: String, reason: String },
    #[error("{0}: no such OCI layout directory, OCI archive or docker save tarball")]
    PullMissing(String),
    #[error("{value}: {reason}")]
    PullRef { value: String, reason: String },
    #[error("'flint image' needs a command: pull, ls, rm or prune (see 'flint image --help')")]
    NoImageCommand,
    #[error("'flint snapshot' needs a command: merge (see 'flint snapshot --help')")]
    NoSnapshotCommand,
    #[error("{0} cannot be used with --pool: the pool's sandboxes are made by 'flint pool' (give VM options there), and 'flint run --pool' takes only --env, --workdir and --timeout")]
    PoolOption(String),
    #[error("--scratch takes a size from 8 MiB to 1 TiB (MiB without a suffix, as in 512 or 2G), not '{0}'")]
    ScratchSize(String),
}

/// The subcommands, by name, as `CliError::UnknownOption` names them.
const SUBCOMMANDS: [&str; 10] = [
    "boot",
    "run",
    "pool",
    "pool-member",
    "exec",
    "image",
    "jail",
    "snapshot",
    "completions",
    "man",
];

/// Parse the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    if args.is_empty() {
        return Err(CliError::NoCommand);
    }
    let argv = std::iter::once("flint").chain(args.iter().map(String::as_str));
    match commands::definition().try_get_matches_from(argv) {
        Ok(matches) => commands::command_from(&matches),
        Err(e) => from_clap(&e, args),
    }
}

/// One string of a clap error's context.
fn context(e: &clap::Error, kind: ContextKind) -> Option<String> {
    match e.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        _ => None,
    }
}

/// The option's name in clap's `--name <VALUE>`.
fn option_name(arg: &str) -> String {
    arg.split([' ', '=']).next().unwrap_or(arg).to_string()
}

/// What a command line clap refused means: help, the version, or flint's one-sentence error.
fn from_clap(e: &clap::Error, args: &[String]) -> Result<Command, CliError> {
    let sub = SUBCOMMANDS.iter().copied().find(|s| args[0] == *s);
    let arg = context(e, ContextKind::InvalidArg)
        .or_else(|| context(e, ContextKind::InvalidSubcommand))
        .unwrap_or_default();
    let error = match e.kind() {
        ErrorKind::DisplayHelp => return Ok(Command::Help(e.to_string())),
        ErrorKind::DisplayVersion => return Ok(Command::Version),
        ErrorKind::ValueValidation => {
            match std::error::Error::source(e).and_then(|s| s.downcast_ref::<CliError>()) {
                Some(mine) => mine.clone(),
                None => usage(e),
            }
        }
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            if sub == Some("image") =>
        {
            CliError::NoImageCommand
        }
        ErrorKind::InvalidSubcommand if sub == Some("image") => {
            CliError::UnknownCommand(format!("image {arg}"))
        }
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            if sub == Some("snapshot") =>
        {
            CliError::NoSnapshotCommand
        }
        ErrorKind::InvalidSubcommand if sub == Some("snapshot") => {
            CliError::UnknownCommand(format!("snapshot {arg}"))
        }
        ErrorKind::UnknownArgument | ErrorKind::InvalidSubcommand => match sub {
            None => CliError::UnknownCommand(arg),
            // A word where options go: the command that should follow `--`.
            Some(command @ ("run" | "exec")) if !arg.starts_with('-') && !dashes(args) => {
                CliError::NoCommandToRun(command)
            }
            Some("jail") if !arg.starts_with('-') && !dashes(args) => {
                CliError::JailNeeds(commands::jail::NEEDS_FLINT_ARGS)
            }
            Some(command) => CliError::UnknownOption {
                command,
                option: arg,
            },
        },
        ErrorKind::ArgumentConflict
            if context(e, ContextKind::PriorArg).as_deref() == Some(arg.as_str()) =>
        {
            CliError::Repeated(option_name(&arg))
        }
        ErrorKind::ArgumentConflict if sub == Some("run") => {
            let prior = context(e, ContextKind::PriorArg).unwrap_or_default();
            match (option_name(&arg), option_name(&prior)) {
                (pool, other) | (other, pool) if pool == "--pool" => CliError::PoolOption(other),
                _ => usage(e),
            }
        }
        ErrorKind::InvalidValue if context(e, ContextKind::InvalidValue).as_deref() == Some("") => {
            CliError::MissingValue(option_name(&arg))
        }
        ErrorKind::InvalidValue => match e.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) => CliError::NotOneOf {
                what: arg,
                value: context(e, ContextKind::InvalidValue).unwrap_or_default(),
                valid: valid.join(", "),
            },
            _ => usage(e),
        },
        ErrorKind::MissingRequiredArgument => CliError::MissingArgument {
            command: match (sub, args.get(1)) {
                // `flint image rm`: the image command's own name too.
                (Some("image"), Some(command)) => format!("image {command}"),
                (Some("snapshot"), Some(command)) => format!("snapshot {command}"),
                _ => sub.unwrap_or("").to_string(),
            },
            argument: arg,
        },
        _ => usage(e),
    };
    Err(error)
}

/// Whether the arguments have a `--`.
fn dashes(args: &[String]) -> bool {
    args.iter().any(|a| a == "--")
}

/// clap's own sentence for a refused command line: the first line of its message.
fn usage(e: &clap::Error) -> CliError {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let sentence = first.strip_prefix("error: ").unwrap_or(first);
    CliError::Usage(format!("{sentence} (see 'flint --help')"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use vmm::{DriveConfig, NetConfig, RateLimiterConfig, TokenBucketConfig, VsockConfig};

    use super::*;
    use crate::jail::{CgroupVersion, Rlimit};
    use crate::sandbox::SandboxNet;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    fn boot(s: &[&str]) -> Result<VmConfig, CliError> {
        let mut all = vec!["boot"];
        all.extend_from_slice(s);
        match parse(&args(&all))? {
            Command::Boot(c) => Ok(c),
            other => panic!("expected boot, got {other:?}"),
        }
    }

    #[test]
    fn snapshot_merge_takes_three_pairs_of_files() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            parse(&args(&[
                "snapshot", "merge", "--diff", "d.s", "d.m", "--base", "b.s", "b.m", "--out",
                "o.s", "o.m"
            ])),
            Ok(Command::SnapshotMerge {
                base: (p("b.s"), p("b.m")),
                diff: (p("d.s"), p("d.m")),
                out: (p("o.s"), p("o.m")),
            })
        );
        assert_eq!(
            parse(&args(&["snapshot"])),
            Err(CliError::NoSnapshotCommand)
        );
        let missing = parse(&args(&[
            "snapshot", "merge", "--base", "b.s", "b.m", "--diff", "d.s", "d.m",
        ]))
        .unwrap_err();
        assert_eq!(
            missing.to_string(),
            "'flint snapshot merge' needs --out <STATE> <MEM>"
        );
        let twice = parse(&args(&[
            "snapshot", "merge", "--base", "b.s", "b.m", "--diff", "d.s", "d.m", "--out", "o.s",
            "o.m", "--out", "x.s", "x.m",
        ]))
        .unwrap_err();
        assert_eq!(twice, CliError::Repeated("--out".into()));
        assert_eq!(
            parse(&args(&["snapshot", "split"])),
            Err(CliError::UnknownCommand("snapshot split".into()))
        );
    }

    #[test]
    fn boot_with_defaults() {
        let c = boot(&["--kernel", "/k"]).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
    }

    #[test]
    fn boot_with_every_option_in_both_spellings() {
        let c = boot(&[
            "--kernel=/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--vcpus=4",
            "--memory",
            "2048",
        ])
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!((c.vcpus, c.mem_mib), (4, 2048));
    }

    #[test]
    fn boot_huge_pages_take_the_machine_config_values() {
        assert_eq!(
            boot(&["--kernel", "/k"]).unwrap().huge_pages,
            vmm::HugePages::None
        );
        for (given, expected) in [
            ("none", vmm::HugePages::None),
            ("2M", vmm::HugePages::Size2M),
            ("2m", vmm::HugePages::Size2M),
            ("transparent", vmm::HugePages::Transparent),
            ("Transparent", vmm::HugePages::Transparent),
        ] {
            let c = boot(&["--kernel", "/k", "--huge-pages", given]).unwrap();
            assert_eq!(c.huge_pages, expected, "--huge-pages {given}");
        }
        let c = boot(&["--kernel", "/k", "--huge-pages=2M", "--memory", "256"]).unwrap();
        assert_eq!((c.huge_pages, c.mem_mib), (vmm::HugePages::Size2M, 256));
    }

    #[test]
    fn cmdline_values_may_contain_equals_signs() {
        let c = boot(&["--kernel", "/k", "--cmdline", "root=/dev/vda rw"]).unwrap();
        assert_eq!(c.cmdline, "root=/dev/vda rw");
        let c = boot(&["--kernel", "/k", "--cmdline=a=b c=d"]).unwrap();
        assert_eq!(c.cmdline, "a=b c=d");
    }

    #[test]
    fn bad_command_lines_get_one_sentence() {
        let cases: &[(&[&str], CliError)] = &[
            (&[], CliError::NoCommand),
            (&["frob"], CliError::UnknownCommand("frob".into())),
            (&["boot"], CliError::NoKernel),
            (
                &["boot", "--kernel"],
                CliError::MissingValue("--kernel".into()),
            ),
            (
                &["boot", "--kernel", "/k", "--vcpus", "two"],
                CliError::NotANumber {
                    option: "--vcpus",
                    value: "two".into(),
                },
            ),
            (
                &["boot", "--kernel", "/k", "--memory", "-5"],
                CliError::NotANumber {
                    option: "--memory",
                    value: "-5".into(),
                },
            ),
            (
                &["boot", "--kernel", "/k", "--kernel", "/j"],
                CliError::Repeated("--kernel".into()),
            ),
            (
                &["boot", "--kernel", "/k", "--huge-pages", "1G"],
                CliError::HugePages("1G".into()),
            ),
            (
                &["boot", "--kernel", "/k", "--huge-pages", ""],
                CliError::HugePages("".into()),
            ),
            (
                &[
                    "boot",
                    "--kernel",
                    "/k",
                    "--huge-pages",
                    "2M",
                    "--huge-pages",
                    "none",
                ],
                CliError::Repeated("--huge-pages".into()),
            ),
            (
                &["boot", "--kernel", "/k", "--frobnicate", "x"],
                CliError::UnknownOption {
                    command: "boot",
                    option: "--frobnicate".into(),
                },
            ),
            (
                &["boot", "--kernel", "/k", "--disk", ",ro"],
                CliError::DiskPath,
            ),
            (
                &["boot", "--kernel", "/k", "--disk", "/d,rw"],
                CliError::DiskOption("rw".into()),
            ),
        ];
        for (argv, want) in cases {
            let got = parse(&args(argv)).unwrap_err();
            assert_eq!(&got, want, "for {argv:?}");
            assert!(!got.to_string().contains('\n'));
        }
    }

    #[test]
    fn disk_and_net_rate_limits() {
        let c = boot(&[
            "--kernel",
            "/k",
            "--disk",
            "/a.img,bw=1048576,iops=100,ro",
            "--disk=/b.img,iops=5",
            "--net",
            "tap=t0,bw=125000",
        ])
        .unwrap();
        let per_sec = |size| TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        assert_eq!(
            c.drives[0].rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: Some(per_sec(1 << 20)),
                ops: Some(per_sec(100)),
            })
        );
        assert!(c.drives[0].read_only);
        assert_eq!(
            c.drives[1].rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(per_sec(5)),
            })
        );
        let want = Some(RateLimiterConfig {
            bandwidth: Some(per_sec(125_000)),
            ops: None,
        });
        assert_eq!(c.nets[0].rx_rate_limiter, want);
        assert_eq!(c.nets[0].tx_rate_limiter, want);
        assert_eq!(
            boot(&["--kernel", "/k", "--disk", "/a.img"])
                .unwrap()
                .drives[0]
                .rate_limiter,
            None
        );
        for (option, spec) in [
            ("--disk", "/a,bw=0"),
            ("--disk", "/a,iops=-1"),
            ("--disk", "/a,bw=1k"),
            ("--disk", "/a,iops="),
            ("--disk", "/a,bw=+5"),
            ("--disk", "/a,bw=99999999999999999999"),
            ("--net", "tap=t,bw=0"),
        ] {
            let err = boot(&["--kernel", "/k", option, spec]).unwrap_err();
            assert!(matches!(err, CliError::Rate { .. }), "{spec}: {err:?}");
            assert!(err.to_string().starts_with(option), "{err}");
        }
        assert!(matches!(
            boot(&["--kernel", "/k", "--net", "tap=t,bw=5,bw=6"]),
            Err(CliError::NetSpec(_))
        ));
        assert!(matches!(
            boot(&["--kernel", "/k", "--net", "tap=t,iops=5"]),
            Err(CliError::NetSpec(_))
        ));
    }

    #[test]
    fn disks_in_every_form() {
        let c = boot(&[
            "--kernel",
            "/k",
            "--disk",
            "/a.img",
            "--disk=/b.img,ro,id=data",
            "--rootfs",
            "/root.ext4",
        ])
        .unwrap();
        let want = vec![
            DriveConfig::new("/a.img"),
            DriveConfig {
                read_only: true,
                id: Some("data".into()),
                ..DriveConfig::new("/b.img")
            },
            DriveConfig {
                root: true,
                ..DriveConfig::new("/root.ext4")
            },
        ];
        assert_eq!(c.drives, want);
        assert!(c.entropy);
    }

    #[test]
    fn nets_and_vsock() {
        let c = boot(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0",
            "--net=tap=tap1,mac=02:00:00:00:00:01",
            "--vsock",
            "cid=3,uds=/tmp/v.sock",
        ])
        .unwrap();
        assert_eq!(
            c.nets,
            vec![
                NetConfig::new("tap0"),
                NetConfig {
                    mac: Some([2, 0, 0, 0, 0, 1]),
                    ..NetConfig::new("tap1")
                },
            ]
        );
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into()
            })
        );
        for bad in [
            "mac=02:00:00:00:00:01",
            "tap=",
            "tap=a,foo=b",
            "tap=a,tap=b",
        ] {
            assert!(
                matches!(
                    boot(&["--kernel", "/k", "--net", bad]),
                    Err(CliError::NetSpec(_))
                ),
                "{bad}"
            );
        }
        for bad in [
            "01:00:00:00:00:01",
            "00:00:00:00:00:00",
            "02:00:00:00:00",
            "zz:00:00:00:00:01",
        ] {
            let spec = format!("tap=t,mac={bad}");
            assert!(
                matches!(
                    boot(&["--kernel", "/k", "--net", &spec]),
                    Err(CliError::NetMac(_))
                ),
                "{bad}"
            );
        }
        for bad in ["cid=3", "uds=/x", "cid=x,uds=/x", "cid=3,uds=/x,extra=1"] {
            assert!(
                matches!(
                    boot(&["--kernel", "/k", "--vsock", bad]),
                    Err(CliError::VsockSpec(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn run_image_options() {
        let run = |argv: &[&str]| match parse(&args(argv)) {
            Ok(Command::Run(o)) => Ok(o),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let dir = std::env::temp_dir().join(format!("flint-cli-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("oci-layout"), b"{}").unwrap();
        std::fs::write(dir.join("index.json"), b"{}").unwrap();
        let layout = dir.display().to_string();
        let archive = dir.join("image.tar");
        std::fs::write(&archive, b"").unwrap();
        // The image's own command runs without COMMAND.
        let o = run(&["run", "--image", &layout]).unwrap();
        assert_eq!(o.image, Some(flint_image::ImageRef::Layout(dir.clone())));
        assert!(o.command.argv.is_empty());
        assert_eq!(
            (o.user.clone(), o.entrypoint.clone(), o.scratch),
            (None, None, None)
        );
        let o = run(&[
            "run",
            "--initramfs",
            "/s/initramfs.cpio.gz",
            "--image",
            &archive.display().to_string(),
            "--user",
            "app:staff",
            "--entrypoint",
            "",
            "--scratch",
            "64",
            "--",
            "ls",
        ])
        .unwrap();
        assert_eq!(o.initramfs, Some(PathBuf::from("/s/initramfs.cpio.gz")));
        assert_eq!(
            o.image,
            Some(flint_image::ImageRef::Archive(archive.clone()))
        );
        assert_eq!(o.user.as_deref(), Some("app:staff"));
        assert_eq!(o.entrypoint.as_deref(), Some(""));
        assert_eq!(o.scratch, Some(64 << 20));
        assert_eq!(o.command.argv, ["ls"]);
        for (value, bytes) in [("8", 8u64 << 20), ("2G", 2 << 30), ("100M", 100 << 20)] {
            let o = run(&["run", "--image", &layout, "--scratch", value]).unwrap();
            assert_eq!(o.scratch, Some(bytes), "{value}");
        }
        for bad in ["7", "1k", "2T", "x", "", "99999999999999"] {
            let e = run(&["run", "--image", &layout, &format!("--scratch={bad}")]).unwrap_err();
            assert!(
                matches!(e, CliError::ScratchSize(_) | CliError::Size { .. }),
                "{bad}: {e:?}"
            );
        }
        // Registry references, with registries allowed over plain HTTP.
        let o = run(&["run", "--image", "python:3.12-slim", "--", "true"]).unwrap();
        assert_eq!(
            o.image,
            Some(flint_image::ImageRef::parse("python:3.12-slim").unwrap())
        );
        assert!(o.insecure_registries.is_empty());
        let o = run(&[
            "run",
            "--image",
            "127.0.0.1:5000/app:1",
            "--insecure-registry",
            "127.0.0.1:5000",
            "--insecure-registry=registry.local",
        ])
        .unwrap();
        assert_eq!(o.insecure_registries, ["127.0.0.1:5000", "registry.local"]);
        for bad in ["http://127.0.0.1:5000", "127.0.0.1:5000/x", "", "a:b"] {
            let e = run(&[
                "run",
                "--image",
                "app",
                &format!("--insecure-registry={bad}"),
            ])
            .unwrap_err();
            assert_eq!(e, CliError::InsecureRegistry(bad.into()), "{bad}");
        }
        let e = run(&["run", "--image", "/no/such/image", "--", "true"]).unwrap_err();
        assert_eq!(e, CliError::ImageMissing("/no/such/image".into()));
        let e = run(&["run", "--image", "missing.tar", "--", "true"]).unwrap_err();
        assert_eq!(e, CliError::ImageMissing("missing.tar".into()));
        // --image and --rootfs are two different roots; the image options need an image.
        assert!(matches!(
            run(&["run", "--image", &layout, "--rootfs", "/r.img"]),
            Err(CliError::Usage(_))
        ));
        for option in ["--user", "--entrypoint", "--scratch"] {
            let e = run(&["run", option, "64", "--", "true"]).unwrap_err();
            assert!(e.to_string().contains("--image"), "{option}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_and_exec_options() {
        let run = |argv: &[&str]| match parse(&args(argv)) {
            Ok(Command::Run(o)) => Ok(o),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let o = run(&[
            "run",
            "--memory",
            "256",
            "--timeout=5",
            "--env",
            "A=b=c",
            "--workdir",
            "/tmp",
            "--copy-in",
            "/h/in:/g/in",
            "--copy-out",
            "/g/out:/h/out",
            "--net",
            "tap=t0",
            "--",
            "sh",
            "-c",
            "echo --env",
        ])
        .unwrap();
        assert_eq!(o.mem_mib, 256);
        assert_eq!(o.timeout, Some(std::time::Duration::from_secs(5)));
        assert_eq!(o.command.env, vec![("A".to_string(), "b=c".to_string())]);
        assert_eq!(o.command.workdir.as_deref(), Some("/tmp"));
        assert_eq!(o.command.argv, ["sh", "-c", "echo --env"]);
        assert_eq!(
            o.copy_in,
            vec![(PathBuf::from("/h/in"), "/g/in".to_string())]
        );
        assert_eq!(
            o.copy_out,
            vec![("/g/out".to_string(), PathBuf::from("/h/out"))]
        );
        assert!(
            matches!(&o.net, Some(SandboxNet::Tap(n)) if n.tap == "t0"),
            "{:?}",
            o.net
        );
        assert!(!o.cold, "restoring the snapshot is the default");
        assert!(run(&["run", "--cold", "--", "true"]).unwrap().cold);
        assert!(!o.no_page_reporting, "free page reporting is the default");
        assert!(
            run(&["run", "--no-page-reporting", "--", "true"])
                .unwrap()
                .no_page_reporting
        );
        // Copy-outs are limited by default; --copy-out-limit takes K, M and G.
        assert_eq!(o.copy_out_limit, 1 << 30);
        for (value, bytes) in [
            ("0", 0),
            ("1000", 1000),
            ("4k", 4096),
            ("512M", 512 << 20),
            ("2G", 2 << 30),
        ] {
            let o = run(&["run", "--copy-out-limit", value, "--", "true"]).unwrap();
            assert_eq!(o.copy_out_limit, bytes, "{value}");
        }
        for bad in ["", "M", "1.5G", "-1", "1T", "1 G", "99999999999G"] {
            let e = run(&["run", &format!("--copy-out-limit={bad}"), "--", "true"]).unwrap_err();
            assert!(matches!(e, CliError::Size { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains("K, M or G"), "{e}");
        }
        assert_eq!(
            run(&["run", "true"]).unwrap_err(),
            CliError::NoCommandToRun("run")
        );
        assert_eq!(
            run(&["run", "--"]).unwrap_err(),
            CliError::NoCommandToRun("run")
        );
        assert!(matches!(
            run(&["run", "--env", "noequals", "--", "x"]),
            Err(CliError::EnvSpec { .. })
        ));
        assert!(matches!(
            run(&["run", "--copy-in", "nocolon", "--", "x"]),
            Err(CliError::CopySpec { .. })
        ));
        assert_eq!(
            run(&["run", "--copy-in", "/h:relative", "--", "x"]).unwrap_err(),
            CliError::GuestPath("relative".into())
        );
        assert_eq!(
            run(&["run", "--net", "eth0", "--", "x"]).unwrap_err(),
            CliError::NetSpec("eth0".into())
        );
        // Rate limits for the sandbox's NIC and root disk, as for flint boot.
        let o = run(&[
            "run",
            "--net",
            "tap=t1,mac=02:00:00:00:00:01,bw=1000000",
            "--rootfs",
            "/img,bw=2000000,iops=300",
            "--",
            "true",
        ])
        .unwrap();
        let Some(SandboxNet::Tap(net)) = o.net else {
            panic!("--net tap=t1 is a TAP: {:?}", o.net)
        };
        assert_eq!(net.tap, "t1");
        assert_eq!(net.mac, Some([2, 0, 0, 0, 0, 1]));
        let bw = Some(TokenBucketConfig::per_second(1_000_000));
        assert_eq!(net.rx_rate_limiter.unwrap().bandwidth, bw);
        assert_eq!(net.tx_rate_limiter.unwrap().bandwidth, bw);
        assert_eq!(o.rootfs, Some(PathBuf::from("/img")));
        let disk = o.rootfs_rate_limiter.unwrap();
        assert_eq!(
            disk.bandwidth,
            Some(TokenBucketConfig::per_second(2_000_000))
        );
        assert_eq!(disk.ops, Some(TokenBucketConfig::per_second(300)));
        assert_eq!(
            run(&["run", "--rootfs", "/img", "--", "true"])
                .unwrap()
                .rootfs_rate_limiter,
            None
        );
        assert_eq!(
            run(&["run", "--rootfs", "/img,ro", "--", "x"]).unwrap_err(),
            CliError::RootfsOption("ro".into())
        );
        // Errors name --rootfs, not the --disk option it resembles.
        let err = run(&["run", "--rootfs", "/img,bw=0", "--", "x"]).unwrap_err();
        assert!(
            matches!(
                err,
                CliError::Rate {
                    option: "--rootfs",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("--rootfs bw="), "{err}");
        for bad in [",bw=5", ""] {
            let err = run(&["run", "--rootfs", bad, "--", "x"]).unwrap_err();
            assert_eq!(err, CliError::RootfsPath);
            assert!(
                err.to_string().starts_with("--rootfs needs a path"),
                "{err}"
            );
        }
        assert_eq!(
            run(&["run", "--rootfs", "/img,id=x", "--", "x"]).unwrap_err(),
            CliError::RootfsOption("id=x".into())
        );
        match parse(&args(&[
            "exec",
            "--api-sock",
            "/s",
            "--env",
            "K=V",
            "--",
            "ls",
            "-l",
        ]))
        .unwrap()
        {
            Command::Exec(o) => {
                assert_eq!(o.api_sock, PathBuf::from("/s"));
                assert_eq!(o.command.argv, ["ls", "-l"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(&args(&["exec", "--", "ls"])).unwrap_err(),
            CliError::NoApiSock
        );
        assert!(matches!(
            parse(&args(&["run", "--help"])),
            Ok(Command::Help(_))
        ));
    }

    #[test]
    fn api_mode_options() {
        let api = |argv: &[&str]| match parse(&args(argv)) {
            Ok(Command::Api(o)) => Ok(o),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let o = api(&["--api-sock", "/tmp/f.sock"]).unwrap();
        assert_eq!(o.api_sock, Some(PathBuf::from("/tmp/f.sock")));
        assert_eq!(o.config_file, None);
        let o = api(&["--config-file=/c.json", "--no-api", "--id", "vm1"]).unwrap();
        assert_eq!((o.api_sock, o.id.as_str()), (None, "vm1"));
        let o = api(&["--config-file", "/c.json"]).unwrap();
        assert_eq!(o.api_sock, Some(PathBuf::from(DEFAULT_API_SOCK)));
        assert_eq!(
            api(&["--no-api"]).unwrap_err(),
            CliError::NoApiWithoutConfig
        );
        assert_eq!(
            api(&["--no-api", "--config-file", "/c", "--api-sock", "/s"]).unwrap_err(),
            CliError::NoApiWithSocket
        );
        assert_eq!(
            api(&["--api-sock", "/s", "--bogus"]).unwrap_err(),
            CliError::UnknownCommand("--bogus".into())
        );
    }

    fn jail(s: &[&str]) -> Result<JailOptions, CliError> {
        let mut all = vec!["jail"];
        all.extend_from_slice(s);
        match parse(&args(&all))? {
            Command::Jail(o) => Ok(o),
            other => panic!("expected jail, got {other:?}"),
        }
    }

    #[test]
    fn jail_options() {
        let o = jail(&[
            "--id",
            "vm-1",
            "--uid",
            "1000",
            "--gid=100",
            "--",
            "boot",
            "--kernel",
            "/k",
        ])
        .unwrap();
        assert_eq!(
            o,
            JailOptions {
                id: "vm-1".into(),
                uid: 1000,
                gid: 100,
                chroot_base: PathBuf::from("/srv/flint"),
                netns: None,
                cgroup_version: None,
                cgroups: vec![],
                rlimits: vec![],
                files: vec![],
                flint_args: args(&["boot", "--kernel", "/k"]),
            }
        );
        let o = jail(&[
            "--id=a",
            "--uid=1",
            "--gid=2",
            "--chroot-base",
            "/tmp/j",
            "--netns",
            "/var/run/netns/x",
            "--cgroup-version",
            "2",
            "--cgroup",
            "memory.max=268435456",
            "--cgroup=cpu.max=50000 100000",
            "--rlimit",
            "nofile=64,fsize=1000",
            "--rlimit=core=0",
            "--file",
            "/k",
            "--file=/d/disk.img",
            "--",
            "--id",
            "x",
        ])
        .unwrap();
        assert_eq!(o.chroot_base, PathBuf::from("/tmp/j"));
        assert_eq!(o.netns, Some(PathBuf::from("/var/run/netns/x")));
        assert_eq!(o.cgroup_version, Some(CgroupVersion::V2));
        assert_eq!(
            o.cgroups,
            vec![
                ("memory.max".to_string(), "268435456".to_string()),
                ("cpu.max".to_string(), "50000 100000".to_string())
            ]
        );
        assert_eq!(
            o.rlimits,
            vec![
                (Rlimit::NoFile, 64),
                (Rlimit::FSize, 1000),
                (Rlimit::Core, 0)
            ]
        );
        assert_eq!(
            o.files,
            vec![PathBuf::from("/k"), PathBuf::from("/d/disk.img")]
        );
        // Options after -- are flint's, not the jail's.
        assert_eq!(o.flint_args, args(&["--id", "x"]));
        assert!(matches!(
            parse(&args(&["jail", "--help"])),
            Ok(Command::Help(_))
        ));
    }

    #[test]
    fn bad_jail_command_lines_get_one_sentence() {
        let base = ["--id", "a", "--uid", "1", "--gid", "1"];
        let with = |extra: &[&str], tail: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            v.extend_from_slice(tail);
            jail(&v).unwrap_err().to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            (
                with(&[], &[]),
                "'flint jail' needs flint's arguments after --",
            ),
            (
                with(&[], &["--"]),
                "'flint jail' needs flint's arguments after --",
            ),
            (
                jail(&["--id", "a", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "'flint jail' needs --uid UID",
            ),
            (
                jail(&["--uid", "1", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "'flint jail' needs --id ID",
            ),
            (
                jail(&["--id", "a", "--uid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "'flint jail' needs --gid GID",
            ),
            (
                jail(&["--id", "a", "--uid", "0", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "non-zero --uid",
            ),
            (
                jail(&["--id", "a/b", "--uid", "1", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "the jail id 'a/b' must be 1 to 64 letters, digits and dashes",
            ),
            (
                with(&["--uid", "2"], &["--", "boot"]),
                "--uid was given more than once",
            ),
            (
                with(&["--cgroup-version", "3"], &["--", "boot"]),
                "--cgroup-version takes 1 or 2",
            ),
            (
                with(&["--cgroup", "memory"], &["--", "boot"]),
                "--cgroup takes FILE=VALUE",
            ),
            (
                with(&["--cgroup", "../x=1"], &["--", "boot"]),
                "--cgroup takes FILE=VALUE",
            ),
            (
                with(&["--rlimit", "nofile=x"], &["--", "boot"]),
                "--rlimit takes",
            ),
            (
                with(&["--rlimit", "stack=1"], &["--", "boot"]),
                "--rlimit takes",
            ),
            (
                with(&["--file", "k"], &["--", "boot"]),
                "--file k must be an absolute path",
            ),
            (
                with(&["--file", "/a/../b"], &["--", "boot"]),
                "must be an absolute path",
            ),
            (
                with(&["--bogus"], &["--", "boot"]),
                "unknown option '--bogus' for 'flint jail'",
            ),
            (
                with(&["--uid", "x"], &["--", "boot"]),
                "--uid takes a whole number",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            assert!(!message.contains('\n'), "{message:?}");
        }
    }

    #[test]
    fn help_and_version() {
        assert!(
            matches!(parse(&args(&["--help"])), Ok(Command::Help(t)) if t.contains("flint boot"))
        );
        assert!(
            matches!(parse(&args(&["boot", "--kernel", "/k", "--help"])), Ok(Command::Help(t)) if t.contains("--memory <MIB>"))
        );
        assert_eq!(parse(&args(&["--version"])), Ok(Command::Version));
    }

    #[test]
    fn disks_and_root_disks_keep_the_order_given() {
        let c = boot(&[
            "--kernel",
            "/k",
            "--rootfs",
            "/r",
            "--disk",
            "/a",
            "--rootfs=/s",
        ])
        .unwrap();
        let paths: Vec<_> = c.drives.iter().map(|d| (d.path.clone(), d.root)).collect();
        assert_eq!(
            paths,
            [
                (PathBuf::from("/r"), true),
                (PathBuf::from("/a"), false),
                (PathBuf::from("/s"), true)
            ]
        );
    }

    #[test]
    fn everything_after_the_first_double_dash_is_the_command() {
        let o = jail(&[
            "--id", "a", "--uid", "1", "--gid", "1", "--", "run", "--", "sh", "--help",
        ])
        .unwrap();
        assert_eq!(o.flint_args, args(&["run", "--", "sh", "--help"]));
        match parse(&args(&["run", "--", "--env", "--", "-h"])).unwrap() {
            Command::Run(o) => assert_eq!(o.command.argv, ["--env", "--", "-h"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn completions_man_pages_and_the_help_subcommand() {
        assert_eq!(
            parse(&args(&["completions", "zsh"])),
            Ok(Command::Completions(clap_complete::Shell::Zsh))
        );
        assert_eq!(parse(&args(&["man"])), Ok(Command::Man(None)));
        assert_eq!(
            parse(&args(&["man", "run"])),
            Ok(Command::Man(Some("run".into())))
        );
        assert_eq!(
            parse(&args(&["man", "nope"])),
            Err(CliError::UnknownCommand("nope".into()))
        );
        assert!(
            matches!(parse(&args(&["help", "jail"])), Ok(Command::Help(t)) if t.contains("--chroot-base"))
        );
        let e = parse(&args(&["completions", "tcsh"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bash") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn the_definition_is_consistent() {
        let definition = commands::definition();
        definition.clone().debug_assert();
        let names: Vec<&str> = definition
            .get_subcommands()
            .map(|s| s.get_name())
            .filter(|n| *n != "help")
            .collect();
        assert_eq!(names, SUBCOMMANDS);
    }
}
