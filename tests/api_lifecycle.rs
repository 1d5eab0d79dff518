//! Tier 3: the REST API drives a real Linux guest through Firecracker's getting-started
//! sequence (configure, start, pause, resume, Ctrl-Alt-Del) with `curl --unix-socket`, in the
//! nested KVM host (or directly on a host whose KVM boots Linux).

mod support;

use std::path::PathBuf;

use support::{run_scenario, DEFAULT_CMDLINE};

/// Steps print `STEP <name> <http status>` or `CHECK <name> <yes|no>` lines; the Rust side
/// asserts on them.
const SCENARIO: &str = r#"
CURL=$FILES/curl
SOCK=$WORK/flint.sock
mkfifo "$WORK/console-in"
# Keep the fifo open for writing so flint's stdin stays connected.
sleep 600 >"$WORK/console-in" &
keep=$!
"$FLINT" --api-sock "$SOCK" --id api-e2e <"$WORK/console-in" >"$WORK/console" 2>"$WORK/stderr" &
pid=$!
i=0; while [ ! -S "$SOCK" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
call() { # name method path [body]
    name=$1; method=$2; path=$3; body=${4:-}
    if [ -n "$body" ]; then
        code=$("$CURL" -s -o "$WORK/$name.body" -w '%{http_code}' --unix-socket "$SOCK" -X "$method" \
            -H 'Content-Type: application/json' -d "$body" "http://localhost$path")
    else
        code=$("$CURL" -s -o "$WORK/$name.body" -w '%{http_code}' --unix-socket "$SOCK" -X "$method" \
            "http://localhost$path")
    fi
    echo "STEP $name $code"
    echo "BODY $name $(cat "$WORK/$name.body")"
}
wait_for() { # file text seconds
    i=0; while ! grep -q "$2" "$1" 2>/dev/null && [ $i -lt $(($3 * 10)) ]; do sleep 0.1; i=$((i+1)); done
    grep -q "$2" "$1" && echo yes || echo no
}
call describe_before GET /
call boot_source PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\", \"initrd_path\": \"$INITRAMFS\", \"boot_args\": \"$GUEST_CMDLINE\"}"
call machine_config PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256}'
call machine_config_bad PUT /machine-config '{"vcpu_count": 0, "mem_size_mib": 256}'
call entropy PUT /entropy '{}'
call metrics PUT /metrics "{\"metrics_path\": \"$WORK/metrics.json\"}"
call start PUT /actions '{"action_type": "InstanceStart"}'
echo "CHECK guest_ready $(wait_for "$WORK/console" 'FLINT-GUEST-READY' 120)"
echo "CHECK shell_prompt $(wait_for "$WORK/console" '/ #' 60)"
call describe_running GET /
call boot_source_after_start PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\"}"
call pause PATCH /vm '{"state": "Paused"}'
call describe_paused GET /
# While paused the guest runs nothing: a command typed now is not even echoed.
echo 'echo PAUSE-$((40+2))' >"$WORK/console-in"
sleep 3
echo "CHECK ran_while_paused $(grep -q 'PAUSE-42' "$WORK/console" && echo yes || echo no)"
call resume PATCH /vm '{"state": "Resumed"}'
echo "CHECK ran_after_resume $(wait_for "$WORK/console" 'PAUSE-42' 60)"
call vm_config GET /vm/config
call flush_metrics PUT /actions '{"action_type": "FlushMetrics"}'
echo "CHECK metrics_line $(grep -c utc_timestamp_ms "$WORK/metrics.json")"
call ctrl_alt_del PUT /actions '{"action_type": "SendCtrlAltDel"}'
i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
if kill -0 $pid 2>/dev/null; then echo "CHECK flint_exited no"; kill -9 $pid; else echo "CHECK flint_exited yes"; fi
wait $pid; echo "CHECK flint_status $?"
echo "CHECK socket_removed $([ -e "$SOCK" ] && echo no || echo yes)"
kill $keep 2>/dev/null
echo "--- flint stderr"; cat "$WORK/stderr"
echo "--- guest console (tail)"; tail -n 30 "$WORK/console"
"#;

fn value<'a>(output: &'a str, kind: &str, name: &str) -> &'a str {
    let prefix = format!("{kind} {name} ");
    output
        .lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {kind} {name} line in the output:\n{output}"))
}

#[test]
fn firecracker_getting_started_sequence() {
    let curl = PathBuf::from("/usr/bin/curl");
    assert!(
        curl.is_file(),
        "curl is needed for this test (apt-get install curl)"
    );
    let script = format!("GUEST_CMDLINE='{DEFAULT_CMDLINE}'\n{SCENARIO}");
    let run = run_scenario(&script, &[(curl, "curl")]);
    assert_eq!(run.status, 0, "scenario failed");
    let out = &run.output;
    let step = |name: &str| value(out, "STEP", name);
    let body = |name: &str| value(out, "BODY", name);
    let check = |name: &str| value(out, "CHECK", name);

    assert_eq!(step("describe_before"), "200");
    assert!(
        body("describe_before").contains("\"state\":\"Not started\""),
        "{out}"
    );
    assert!(
        body("describe_before").contains("\"id\":\"api-e2e\""),
        "{out}"
    );
    for name in [
        "boot_source",
        "machine_config",
        "entropy",
        "metrics",
        "start",
    ] {
        assert_eq!(step(name), "204", "{name}: {}", body(name));
    }
    assert_eq!(step("machine_config_bad"), "400");
    assert!(body("machine_config_bad").contains("vcpu_count"), "{out}");
    assert_eq!(check("guest_ready"), "yes", "the guest did not boot");
    assert_eq!(check("shell_prompt"), "yes");
    assert!(
        body("describe_running").contains("\"state\":\"Running\""),
        "{out}"
    );
    assert_eq!(step("boot_source_after_start"), "400");
    assert!(
        body("boot_source_after_start").contains("before the VM starts"),
        "{out}"
    );
    assert_eq!(step("pause"), "204");
    assert!(
        body("describe_paused").contains("\"state\":\"Paused\""),
        "{out}"
    );
    assert_eq!(
        check("ran_while_paused"),
        "no",
        "a paused guest ran a command"
    );
    assert_eq!(step("resume"), "204");
    assert_eq!(
        check("ran_after_resume"),
        "yes",
        "the guest did not run after resume"
    );
    assert_eq!(step("vm_config"), "200");
    assert!(body("vm_config").contains("\"vcpu_count\":2"), "{out}");
    assert!(body("vm_config").contains("\"mem_size_mib\":256"), "{out}");
    assert_eq!(step("flush_metrics"), "204");
    assert_ne!(check("metrics_line"), "0", "no metrics line written");
    assert_eq!(step("ctrl_alt_del"), "204");
    assert_eq!(
        check("flint_exited"),
        "yes",
        "Ctrl-Alt-Del did not end the VM"
    );
    assert_eq!(
        check("flint_status"),
        "0",
        "flint should exit 0 after the guest reboots"
    );
    assert_eq!(
        check("socket_removed"),
        "yes",
        "the API socket was left behind"
    );
}
