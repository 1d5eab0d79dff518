//! Tier 3: the REST API drives a real Linux guest through Firecracker's getting-started
//! sequence (configure, start, pause, resume, Ctrl-Alt-Del) and through snapshot create and
//! load, with `curl --unix-socket`, in the nested KVM host (or directly on a host whose KVM
//! boots Linux).

mod support;

use std::path::PathBuf;

use support::api_shell::{value, API_SHELL};
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
call describe_before GET /
call boot_source PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\", \"initrd_path\": \"$INITRAMFS\", \"boot_args\": \"$GUEST_CMDLINE\"}"
call machine_config PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256}'
call machine_config_bad PUT /machine-config '{"vcpu_count": 0, "mem_size_mib": 256}'
call entropy PUT /entropy '{}'
call metrics PUT /metrics "{\"metrics_path\": \"$WORK/metrics.json\"}"
head -c 1048576 /dev/zero >"$WORK/data.img"
call drive_data PUT /drives/data "{\"drive_id\": \"data\", \"path_on_host\": \"$WORK/data.img\", \"is_root_device\": false, \"is_read_only\": true}"
call start PUT /actions '{"action_type": "InstanceStart"}'
check_for guest_ready "$WORK/console" 'FLINT-GUEST-READY' 120
check_for shell_prompt "$WORK/console" '/ #' 60
call describe_running GET /
call boot_source_after_start PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\"}"
call pause PATCH /vm '{"state": "Paused"}'
call describe_paused GET /
# While paused the guest runs nothing: a command typed now is not even echoed.
echo 'echo PAUSE-$((40+2))' >"$WORK/console-in"
sleep 3
echo "CHECK ran_while_paused $(grep -q 'PAUSE-42' "$WORK/console" && echo yes || echo no)"
call resume PATCH /vm '{"state": "Resumed"}'
check_for ran_after_resume "$WORK/console" 'PAUSE-42' 60
# Rate limits changed on the running VM, as Firecracker's clients do: 2 requests a second,
# then no limit (a bucket of size 0). Ten uncached 4 KiB reads take about 4 s, then are never
# held back (the drive's throttle counter, read from two metrics flushes, stays put).
READS='i=0; while [ $i -lt 10 ]; do dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$i iflag=direct 2>/dev/null; i=$((i+1)); done'
call limit_drive PATCH /drives/data '{"drive_id": "data", "rate_limiter": {"ops": {"size": 2, "refill_time": 1000}}}'
echo "a=\$(date +%s); $READS; echo SLOW\"\"-S=\$((\$(date +%s) - a))" >"$WORK/console-in"
check_for slow_reads "$WORK/console" 'SLOW-S=' 120
call flush_after_slow PUT /actions '{"action_type": "FlushMetrics"}'
tail -n 1 "$WORK/metrics.json" >"$WORK/metrics-slow"
call unlimit_drive PATCH /drives/data '{"drive_id": "data", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}'
echo "a=\$(date +%s); $READS; echo FAST\"\"-S=\$((\$(date +%s) - a))" >"$WORK/console-in"
check_for fast_reads "$WORK/console" 'FAST-S=' 120
call flush_after_fast PUT /actions '{"action_type": "FlushMetrics"}'
tail -n 1 "$WORK/metrics.json" >"$WORK/metrics-fast"
echo "CHECK slow_s $(sed -n 's/.*SLOW-S=\([0-9]*\).*/\1/p' "$WORK/console" | tail -n 1)"
# The data disk's counters (cumulative) after the limited reads and after the unlimited ones.
drive_counter() {
    sed -n "s/.*\"block_data\":{[^}]*\"$2\":\([0-9]*\).*/\1/p" "$WORK/metrics-$1"
}
echo "CHECK throttled_slow $(drive_counter slow rate_limiter_throttled_events)"
echo "CHECK throttled_fast $(drive_counter fast rate_limiter_throttled_events)"
echo "CHECK reads_slow $(drive_counter slow read_count)"
echo "CHECK reads_fast $(drive_counter fast read_count)"
call patch_unknown_drive PATCH /drives/nope '{"drive_id": "nope", "rate_limiter": {}}'
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

/// Three flints in turn: A boots a guest and snapshots it; B loads that snapshot (paused),
/// resumes it and snapshots it again; C loads B's snapshot and runs on. The guest's shell
/// keeps a variable set before the first snapshot, and its uptime keeps counting.
const SNAPSHOT_SCENARIO: &str = r#"
CURL=$FILES/curl
start_flint a
call a_boot_source PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\", \"initrd_path\": \"$INITRAMFS\", \"boot_args\": \"$GUEST_CMDLINE\"}"
call a_machine PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256}'
call a_vsock PUT /vsock "{\"guest_cid\": 7, \"uds_path\": \"$WORK/v.sock\"}"
call a_entropy PUT /entropy '{}'
call a_start PUT /actions '{"action_type": "InstanceStart"}'
check_for a_prompt "$WORK/a.console" '/ #' 180
echo 'x=41; echo "UPTIME-A $(cut -d. -f1 /proc/uptime)"' >"$WORK/a.in"
check_for a_uptime "$WORK/a.console" 'UPTIME-A [0-9]' 60
call a_snapshot_running PUT /snapshot/create "{\"snapshot_path\": \"$WORK/s1\", \"mem_file_path\": \"$WORK/m1\"}"
call a_pause PATCH /vm '{"state": "Paused"}'
call a_snapshot PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$WORK/s1\", \"mem_file_path\": \"$WORK/m1\"}"
echo "CHECK m1_mode $(stat -c %a "$WORK/m1")"
echo "CHECK m1_sparse $([ $(du -k "$WORK/m1" | cut -f1) -lt $((256 * 1024)) ] && echo yes || echo no)"
stop_flint a
md5_m1=$(md5sum <"$WORK/m1")

start_flint b
call b_load PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s1\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$WORK/m1\"}}"
call b_describe GET /
call b_config GET /vm/config
call b_resume PATCH /vm '{"state": "Resumed"}'
echo 'echo "RESTORED-$((x+1)) UPTIME-B $(cut -d. -f1 /proc/uptime)"' >"$WORK/b.in"
check_for b_restored "$WORK/b.console" 'RESTORED-42' 60
echo "UPTIMES $(grep -o 'UPTIME-A [0-9]*' "$WORK/a.console" | tail -n 1) $(grep -o 'UPTIME-B [0-9]*' "$WORK/b.console" | tail -n 1)"
echo 'x=$((x+1))' >"$WORK/b.in"
sleep 1
call b_pause PATCH /vm '{"state": "Paused"}'
call b_snapshot PUT /snapshot/create "{\"snapshot_path\": \"$WORK/s2\", \"mem_file_path\": \"$WORK/m2\"}"
stop_flint b
echo "CHECK m1_unchanged $([ "$(md5sum <"$WORK/m1")" = "$md5_m1" ] && echo yes || echo no)"

start_flint c
call c_entropy PUT /entropy '{}'
call c_load_configured PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s2\", \"mem_file_path\": \"$WORK/m2\"}"
stop_flint c
start_flint d
call d_load PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s2\", \"mem_file_path\": \"$WORK/m2\", \"resume_vm\": true}"
call d_describe GET /
echo 'echo "AGAIN-$((x+1))"' >"$WORK/d.in"
check_for d_restored "$WORK/d.console" 'AGAIN-43' 60
call d_ctrl_alt_del PUT /actions '{"action_type": "SendCtrlAltDel"}'
i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
if kill -0 $pid 2>/dev/null; then echo "CHECK d_exited no"; else echo "CHECK d_exited yes"; fi
wait $pid; echo "CHECK d_status $?"
stop_flint d
for n in a b d; do echo "--- flint $n stderr"; cat "$WORK/$n.stderr"; echo "--- guest console $n (tail)"; tail -n 15 "$WORK/$n.console"; done
"#;

/// One booted guest snapshotted, then restored twice (B and C, two clones of one snapshot).
/// The guest has one vCPU, no entropy device and no agent (whose Refresh also reseeds): the
/// reseed the test looks for is the kernel's own, on the new VM generation ID flint gives
/// each restored copy. Its generator is initialised before the snapshot (a first read of
/// /dev/urandom makes it gather entropy at once): a kernel reseeds on a new ID only then.
/// Each clone reads /dev/urandom as its first command. (That the two reads differ is
/// asserted too, but on its own it would not prove much: a kernel this young, a few seconds
/// of uptime, also reseeds every uptime/2 seconds from interrupt timings, which differ
/// between clones. The reseed line is what fails without the generation ID.)
const GENERATION_ID_SCENARIO: &str = r#"
CURL=$FILES/curl
start_flint a
call a_boot_source PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\", \"initrd_path\": \"$INITRAMFS\", \"boot_args\": \"$GUEST_CMDLINE\"}"
call a_machine PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 256}'
call a_start PUT /actions '{"action_type": "InstanceStart"}'
check_for a_prompt "$WORK/a.console" '/ #' 180
echo 'head -c 16 /dev/urandom >/dev/null; echo "VMGENID-BOUND $(ls /sys/bus/acpi/drivers/vmgenid | grep -c FLNT0001)"' >"$WORK/a.in"
check_for a_bound "$WORK/a.console" 'VMGENID-BOUND [0-9]' 60
check_for a_crng "$WORK/a.console" 'crng init done' 60
echo "VALUE a_bound $(grep -o 'VMGENID-BOUND [0-9]*' "$WORK/a.console" | tail -n 1 | cut -d' ' -f2)"
call a_pause PATCH /vm '{"state": "Paused"}'
call a_snapshot PUT /snapshot/create "{\"snapshot_path\": \"$WORK/s\", \"mem_file_path\": \"$WORK/m\"}"
stop_flint a
for n in b c; do
    start_flint $n
    call ${n}_load PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s\", \"mem_file_path\": \"$WORK/m\", \"resume_vm\": true}"
    printf '%s\n' 'echo "RANDOM-'$n' $(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n")"' >"$WORK/$n.in"
    check_for ${n}_random "$WORK/$n.console" "RANDOM-$n [0-9a-f]" 60
    echo "VALUE ${n}_random $(grep -o "RANDOM-$n [0-9a-f]*" "$WORK/$n.console" | tail -n 1 | cut -d' ' -f2)"
    check_for ${n}_reseeded "$WORK/$n.console" 'crng reseeded due to virtual machine fork' 30
    stop_flint $n
done
echo "CHECK a_reseeded $(grep -q 'virtual machine fork' "$WORK/a.console" && echo yes || echo no)"
for n in a b c; do echo "--- flint $n stderr"; cat "$WORK/$n.stderr"; echo "--- guest console $n (tail)"; tail -n 15 "$WORK/$n.console"; echo; done
"#;

/// Run `scenario` (after [`API_SHELL`]) in one host VM, with curl; its output.
fn run_api_scenario(scenario: &str) -> String {
    let curl = PathBuf::from("/usr/bin/curl");
    assert!(
        curl.is_file(),
        "curl is needed for this test (apt-get install curl)"
    );
    let script = format!("GUEST_CMDLINE='{DEFAULT_CMDLINE}'\n{API_SHELL}{scenario}");
    let run = run_scenario(&script, &[(curl, "curl")]);
    assert_eq!(run.status, 0, "scenario failed");
    run.output
}

#[test]
fn firecracker_getting_started_sequence() {
    let output = run_api_scenario(SCENARIO);
    let out = &output;
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
        "drive_data",
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
    assert_eq!(step("limit_drive"), "204", "{}", body("limit_drive"));
    assert_eq!(step("unlimit_drive"), "204", "{}", body("unlimit_drive"));
    assert_eq!(check("slow_reads"), "yes", "{out}");
    assert_eq!(check("fast_reads"), "yes", "{out}");
    let number = |name: &str| -> u64 {
        check(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {out}"))
    };
    // 8 requests beyond the bucket's 2 at 2 a second: about 4 s; without the limit none.
    assert!(
        number("slow_s") >= 3,
        "the limit set after start did not apply: {}",
        out
    );
    // Lifted: the unlimited reads were never held back (counted by the device, not timed,
    // since a loaded machine makes any read slow).
    assert_eq!(step("flush_after_slow"), "204");
    assert_eq!(step("flush_after_fast"), "204");
    assert!(
        number("throttled_slow") > 0,
        "the limit held nothing back: {out}"
    );
    assert!(
        number("reads_fast") >= number("reads_slow") + 10,
        "the unlimited reads did not reach the disk: {out}"
    );
    assert_eq!(
        number("throttled_fast"),
        number("throttled_slow"),
        "the limit was not lifted: {out}"
    );
    assert_eq!(step("patch_unknown_drive"), "400");
    assert!(body("patch_unknown_drive").contains("no drive"), "{out}");
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

#[test]
fn snapshot_create_and_load() {
    let output = run_api_scenario(SNAPSHOT_SCENARIO);
    let out = &output;
    let step = |name: &str| value(out, "STEP", name);
    let body = |name: &str| value(out, "BODY", name);
    let check = |name: &str| value(out, "CHECK", name);

    for name in [
        "a_boot_source",
        "a_machine",
        "a_vsock",
        "a_entropy",
        "a_start",
    ] {
        assert_eq!(step(name), "204", "{name}: {}", body(name));
    }
    assert_eq!(check("a_prompt"), "yes", "the guest did not boot");
    assert_eq!(check("a_uptime"), "yes");
    assert_eq!(step("a_snapshot_running"), "400");
    assert!(
        body("a_snapshot_running").contains("pause it first"),
        "{out}"
    );
    assert_eq!(step("a_pause"), "204");
    assert_eq!(step("a_snapshot"), "204", "{}", body("a_snapshot"));
    assert_eq!(
        check("m1_mode"),
        "600",
        "guest memory is private to its owner"
    );
    assert_eq!(check("m1_sparse"), "yes", "zero pages are holes");

    assert_eq!(step("b_load"), "204", "{}", body("b_load"));
    assert!(body("b_describe").contains("\"state\":\"Paused\""), "{out}");
    assert!(body("b_config").contains("\"vcpu_count\":2"), "{out}");
    assert!(body("b_config").contains("\"mem_size_mib\":256"), "{out}");
    assert!(body("b_config").contains("\"guest_cid\":7"), "{out}");
    assert_eq!(step("b_resume"), "204");
    assert_eq!(
        check("b_restored"),
        "yes",
        "the restored guest lost its shell's state"
    );
    let uptimes: Vec<u64> = value(out, "UPTIMES", "UPTIME-A")
        .split(" UPTIME-B ")
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        uptimes[1] >= uptimes[0] && uptimes[1] < uptimes[0] + 600,
        "the restored guest's clock continues from the snapshot: {uptimes:?}"
    );
    assert_eq!(step("b_pause"), "204");
    assert_eq!(
        step("b_snapshot"),
        "204",
        "a restored VM can be snapshotted again: {}",
        body("b_snapshot")
    );
    assert_eq!(
        check("m1_unchanged"),
        "yes",
        "the restored guest wrote to the memory file"
    );

    assert_eq!(step("c_entropy"), "204");
    assert_eq!(step("c_load_configured"), "400");
    assert!(
        body("c_load_configured").contains("no VM resources configured"),
        "{out}"
    );

    assert_eq!(step("d_load"), "204", "{}", body("d_load"));
    assert!(
        body("d_describe").contains("\"state\":\"Running\""),
        "{out}"
    );
    assert_eq!(check("d_restored"), "yes", "the second snapshot lost state");
    assert_eq!(step("d_ctrl_alt_del"), "204");
    assert_eq!(check("d_exited"), "yes", "Ctrl-Alt-Del did not end the VM");
    assert_eq!(check("d_status"), "0");
}

#[test]
fn restored_clones_reseed_their_random_number_generators() {
    let output = run_api_scenario(GENERATION_ID_SCENARIO);
    let out = &output;
    let step = |name: &str| value(out, "STEP", name);
    let body = |name: &str| value(out, "BODY", name);
    let check = |name: &str| value(out, "CHECK", name);

    for name in [
        "a_boot_source",
        "a_machine",
        "a_start",
        "a_pause",
        "a_snapshot",
    ] {
        assert_eq!(step(name), "204", "{name}: {}", body(name));
    }
    assert_eq!(check("a_prompt"), "yes", "the guest did not boot");
    assert_eq!(
        value(out, "VALUE", "a_bound"),
        "1",
        "the guest's vmgenid driver did not find the device in the ACPI tables"
    );
    assert_eq!(
        check("a_crng"),
        "yes",
        "the guest's generator was not ready"
    );
    assert_eq!(check("a_reseeded"), "no", "a booted guest is not a clone");
    let mut randoms = Vec::new();
    for n in ["b", "c"] {
        assert_eq!(
            step(&format!("{n}_load")),
            "204",
            "{}",
            body(&format!("{n}_load"))
        );
        assert_eq!(
            check(&format!("{n}_random")),
            "yes",
            "clone {n} did not run"
        );
        assert_eq!(
            check(&format!("{n}_reseeded")),
            "yes",
            "clone {n}'s kernel did not reseed on its new generation ID"
        );
        let random = value(out, "VALUE", &format!("{n}_random")).to_string();
        assert_eq!(random.len(), 32, "clone {n}: {random:?}");
        randoms.push(random);
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two clones of one snapshot read the same bytes from /dev/urandom"
    );
}
