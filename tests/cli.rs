//! The `flint` binary's command line as a user meets it: help, version, shell completions, the
//! man page, and one-sentence errors with status 1. No guest, no KVM.

use std::process::{Command, Output, Stdio};

fn flint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Success, nothing on stderr; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = flint(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        text(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Status 1, nothing on stdout, one line `flint: error: ...` on stderr containing `fragment`.
fn refused(args: &[&str], fragment: &str) {
    let out = flint(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("flint: error: "), "{args:?}: {stderr}");
    assert!(
        stderr.contains(fragment),
        "{args:?}: {stderr:?} lacks {fragment:?}"
    );
}

const SUBCOMMANDS: [&str; 5] = ["boot", "run", "exec", "jail", "completions"];

#[test]
fn help_lists_the_subcommands_and_the_api_options() {
    for flag in ["--help", "-h", "help"] {
        let help = ok(&[flag]);
        for sub in SUBCOMMANDS {
            assert!(
                help.lines().any(|l| l.trim_start().starts_with(sub)),
                "{flag}: {sub} missing:\n{help}"
            );
        }
        for option in [
            "--api-sock",
            "--config-file",
            "--no-api",
            "--id",
            "--version",
        ] {
            assert!(help.contains(option), "{flag}: {option} missing:\n{help}");
        }
        assert!(
            !help.contains("\n  man "),
            "the man subcommand is hidden:\n{help}"
        );
    }
    let boot = ok(&["boot", "--help"]);
    for option in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory",
        "--disk",
    ] {
        assert!(boot.contains(option), "{option} missing:\n{boot}");
    }
    for option in [
        "--rootfs",
        "--net",
        "--vsock",
        "--no-seccomp",
        "Exit status",
    ] {
        assert!(boot.contains(option), "{option} missing:\n{boot}");
    }
    assert!(ok(&["run", "--help"]).contains("--copy-out-limit"));
    assert!(ok(&["exec", "-h"]).contains("--api-sock"));
    assert!(ok(&["help", "jail"]).contains("--chroot-base"));
}

#[test]
fn version_names_the_release() {
    for flag in ["--version", "-V"] {
        assert_eq!(
            ok(&[flag]),
            format!("flint {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn completions_name_every_subcommand_and_option() {
    let bash = ok(&["completions", "bash"]);
    assert!(bash.contains("complete -F _flint"), "{bash}");
    for word in SUBCOMMANDS
        .iter()
        .chain(&["--kernel", "--copy-in", "--chroot-base"])
    {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let zsh = ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef flint"), "{zsh}");
    let fish = ok(&["completions", "fish"]);
    assert!(fish.contains("complete -c flint"), "{fish}");
    for sub in SUBCOMMANDS {
        assert!(zsh.contains(sub) && fish.contains(sub), "{sub}");
    }
}

#[test]
fn man_pages_are_roff_from_the_same_definition() {
    let page = ok(&["man"]);
    assert!(page.contains(".TH flint 1"), "{page}");
    assert!(
        page.contains(".SH SYNOPSIS") && page.contains(".SH OPTIONS"),
        "{page}"
    );
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!("flint\\-{sub}(1)")),
            "{sub} missing:\n{page}"
        );
    }
    let boot = ok(&["man", "boot"]);
    assert!(boot.contains(".TH flint-boot 1"), "{boot}");
    assert!(boot.contains(env!("CARGO_PKG_VERSION")), "{boot}");
    // roff escapes dashes.
    assert!(
        boot.contains("\\-\\-kernel") && boot.contains("Exit status"),
        "{boot}"
    );
    refused(&["man", "frob"], "unknown command 'frob'");
}

#[test]
fn bad_command_lines_get_one_sentence_and_status_1() {
    refused(&[], "no command given");
    refused(&["frob"], "unknown command 'frob'");
    refused(&["--frob"], "unknown command '--frob'");
    refused(
        &["boot", "--frobnicate"],
        "unknown option '--frobnicate' for 'flint boot'",
    );
    refused(&["boot", "--kernel"], "--kernel needs a value");
    refused(
        &["boot", "--kernel", "/k", "--vcpus", "two"],
        "--vcpus takes a whole number",
    );
    refused(
        &["boot", "--kernel", "/k", "--kernel", "/j"],
        "--kernel was given more than once",
    );
    refused(
        &["boot", "--kernel", "/k", "--huge-pages", "1G"],
        "--huge-pages takes none, 2M or transparent, not '1G'",
    );
    // Checked before the kernel is opened: huge pages come in 2 MiB.
    refused(
        &[
            "boot",
            "--kernel",
            "/k",
            "--huge-pages",
            "2M",
            "--memory",
            "129",
        ],
        "129 MiB of guest memory cannot be backed by 2 MiB huge pages",
    );
    refused(&["run", "true"], "needs a command after --");
    refused(
        &["run", "--bogus", "--", "true"],
        "unknown option '--bogus' for 'flint run'",
    );
    refused(&["exec", "--", "ls"], "needs --api-sock PATH");
    refused(
        &["jail", "--id", "a", "--uid", "1", "--gid", "1"],
        "flint's arguments after --",
    );
    refused(&["--no-api"], "--no-api needs --config-file");
    refused(&["--api-sock", "/s", "boot"], "cannot be used with");
    refused(&["completions"], "needs <SHELL>");
    refused(&["completions", "tcsh"], "one of bash");
}

/// `flint pool` and `flint run --pool` without a guest: the one-sentence errors a user meets
/// before any sandbox starts.
#[test]
fn pool_command_lines_and_a_missing_pool_get_one_sentence() {
    for size in ["0", "33"] {
        refused(
            &["pool", "--socket", "/tmp/x.sock", "--size", size],
            "--size must be from 1 to 32",
        );
    }
    refused(
        &["pool", "--socket", "/tmp/x.sock", "--size", "two"],
        "--size takes a whole number",
    );
    refused(&["pool"], "--socket");
    for option in [
        &["--vcpus", "2"][..],
        &["--memory", "256"],
        &["--kernel", "/k"],
        &["--cold"],
        &["--copy-out", "/a:/b"],
    ] {
        let mut args = vec!["run", "--pool", "/tmp/x.sock"];
        args.extend_from_slice(option);
        args.extend(["--", "true"]);
        refused(&args, &format!("{} cannot be used with --pool", option[0]));
        // In either order.
        let mut args = vec!["run"];
        args.extend_from_slice(option);
        args.extend(["--pool", "/tmp/x.sock", "--", "true"]);
        refused(&args, &format!("{} cannot be used with --pool", option[0]));
    }
    refused(
        &["run", "--pool", "/tmp/x.sock"],
        "needs a command after --",
    );
    // No pool on the socket: one sentence that says how to start one, status 125 (the
    // sandbox failed), as `flint run` reports a sandbox that cannot start.
    let dir = std::env::temp_dir().join(format!("flint-cli-pool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("none.sock");
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for socket in [&missing, &stale] {
        let out = flint(&["run", "--pool", socket.to_str().unwrap(), "--", "true"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "flint: error: no flint pool listens on {}",
                socket.display()
            )) && stderr.contains("start one with 'flint pool --socket"),
            "{stderr}"
        );
    }
    // A pool whose sandboxes cannot be made says why before it starts any, and leaves no
    // socket.
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args([
            "pool",
            "--socket",
            missing.to_str().unwrap(),
            "--kernel",
            "/no/such/vmlinux",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the guest kernel /no/such/vmlinux does not exist"),
        "{stderr}"
    );
    assert!(!missing.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
