//! Tier 3: the balloon device with a real Linux guest, driven over the API with
//! `curl --unix-socket` in the nested KVM host (or directly on a host whose KVM boots Linux).
//!
//! A guest of 512 MiB fills 300 MiB of a tmpfs and frees it; flint's resident memory stays up
//! until the balloon is inflated, then drops by at least 250 MiB. The guest's statistics change
//! at the polling interval; deflate on OOM lets the guest allocate past what the balloon left
//! it; the balloon's target and statistics survive a snapshot and load. A second guest with
//! free page reporting gives freed memory back without any balloon target.

mod support;

use std::path::PathBuf;

use support::api_shell::{json, value, API_SHELL};
use support::{run_scenario, DEFAULT_CMDLINE};

/// `call NAME METHOD PATH [BODY]` prints `STEP NAME <status>` and `BODY NAME <body>`;
/// `check_for NAME FILE TEXT SECONDS` prints `CHECK NAME yes|no`; `field NAME KEY` is the
/// number at `"KEY":` in the body of step NAME; `rss` is flint's resident memory in KiB;
/// `guest NAME CMD` types CMD at the guest's shell and waits for it to finish (`CHECK NAME`).
const HELPERS: &str = r#"
field() { sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p" "$WORK/$1.body"; }
rss() { sed -n 's/^VmRSS:[^0-9]*\([0-9]*\).*/\1/p' /proc/$pid/status; }
n=0
guest() {
    n=$((n+1))
    echo "$2; echo DONE-$1-\$((0+$n)) \$?" >"$WORK/in"
    check_for "$1" "$CONSOLE" "DONE-$1-$n " 240
}
start_flint() {
    SOCK=$WORK/$1.sock
    CONSOLE=$WORK/$1.console
    "$FLINT" --api-sock "$SOCK" --id "$1" <"$WORK/in" >"$CONSOLE" 2>"$WORK/$1.stderr" &
    pid=$!
    i=0; while [ ! -S "$SOCK" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
}
boot() { # name balloon-body
    start_flint "$1"
    call "$1_boot_source" PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\", \"initrd_path\": \"$INITRAMFS\", \"boot_args\": \"$GUEST_CMDLINE\"}"
    call "$1_machine" PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 512}'
    call "$1_balloon" PUT /balloon "$2"
    call "$1_start" PUT /actions '{"action_type": "InstanceStart"}'
    check_for "$1_prompt" "$CONSOLE" '/ #' 180
    guest "$1_tmpfs" 'mkdir -p /t && mount -t tmpfs -o size=480m none /t'
}
stop_flint() {
    kill -KILL $pid 2>/dev/null; wait $pid 2>/dev/null
}
"#;

const SCENARIO: &str = r#"
CURL=$FILES/curl
mkfifo "$WORK/in"
sleep 900 >"$WORK/in" &
keep=$!

boot a '{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}'
call a_hinting PUT /balloon '{"amount_mib": 0, "deflate_on_oom": true, "free_page_hinting": true}'
sleep 3
call a_stats_idle GET /balloon/statistics
guest a_fill 'dd if=/dev/zero of=/t/fill bs=1M count=300 2>/dev/null'
# Two polling intervals: the statistics show the fill.
sleep 3
call a_stats_full GET /balloon/statistics
echo "CHECK a_rss_full $(rss)"
guest a_free 'rm /t/fill'
sleep 2
echo "CHECK a_rss_freed $(rss)"
call a_inflate PATCH /balloon '{"amount_mib": 420}'
i=0
while [ $i -lt 120 ]; do
    call a_poll GET /balloon/statistics >/dev/null
    [ "$(field a_poll actual_mib)" -ge 420 ] 2>/dev/null && break
    sleep 1; i=$((i+1))
done
call a_stats_inflated GET /balloon/statistics
echo "CHECK a_rss_inflated $(rss)"
call a_get GET /balloon
call a_stats_off PATCH /balloon/statistics '{"stats_polling_interval_s": 0}'
call a_stats_interval PATCH /balloon/statistics '{"stats_polling_interval_s": 2}'
# About 40 MiB are left to the guest: 100 more only fit if the balloon deflates.
guest a_alloc 'dd if=/dev/zero of=/t/more bs=1M count=100 2>/dev/null && [ $(du -m /t/more | cut -f1) -ge 100 ]'
sed -n 's/.*\(DONE-a_alloc-[0-9]* [0-9]*\).*/CHECK a_alloc_status \1/p' "$CONSOLE" | tail -n 1
sleep 3
call a_stats_oom GET /balloon/statistics
call a_pause PATCH /vm '{"state": "Paused"}'
call a_snapshot PUT /snapshot/create "{\"snapshot_path\": \"$WORK/s\", \"mem_file_path\": \"$WORK/m\"}"
stop_flint

start_flint b
call b_load PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$WORK/m\"}, \"resume_vm\": true}"
call b_get GET /balloon
call b_stats GET /balloon/statistics
call b_deflate PATCH /balloon '{"amount_mib": 0}'
i=0
while [ $i -lt 120 ]; do
    call b_poll GET /balloon/statistics >/dev/null
    [ "$(field b_poll actual_mib)" -eq 0 ] 2>/dev/null && break
    sleep 1; i=$((i+1))
done
call b_stats_deflated GET /balloon/statistics
guest b_alive 'cat /t/more >/dev/null'
stop_flint
rm -f "$WORK/m" "$WORK/s"

boot c '{"amount_mib": 0, "deflate_on_oom": false, "free_page_reporting": true}'
guest c_fill 'dd if=/dev/zero of=/t/fill bs=1M count=300 2>/dev/null'
full=$(rss)
echo "CHECK c_rss_full $full"
guest c_free 'rm /t/fill'
# Linux reports free memory about 2 s after it is freed.
i=0
while [ $i -lt 60 ] && [ $(( full - $(rss) )) -lt 256000 ]; do sleep 1; i=$((i+1)); done
echo "CHECK c_rss_reported $(rss)"
stop_flint

kill $keep 2>/dev/null
echo "--- flint stderr"; cat "$WORK"/*.stderr
for f in "$WORK"/*.console; do echo "--- $f (tail)"; tail -n 15 "$f"; echo; done
"#;

#[test]
fn balloon_gives_memory_back_reports_statistics_and_survives_a_snapshot() {
    let curl = PathBuf::from("/usr/bin/curl");
    assert!(
        curl.is_file(),
        "curl is needed for this test (apt-get install curl)"
    );
    let script = format!("GUEST_CMDLINE='{DEFAULT_CMDLINE}'\n{API_SHELL}{HELPERS}{SCENARIO}");
    let run = run_scenario(&script, &[(curl, "curl")]);
    assert_eq!(run.status, 0, "scenario failed");
    let out = &run.output;
    let step = |name: &str| value(out, "STEP", name);
    let check = |name: &str| value(out, "CHECK", name);
    let kib = |name: &str| -> i64 {
        check(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {out}"))
    };
    let num = |name: &str, key: &str| -> i64 {
        json(out, name)[key]
            .as_i64()
            .unwrap_or_else(|| panic!("{name}.{key}: {out}"))
    };

    for name in ["a_boot_source", "a_machine", "a_balloon", "a_start"] {
        assert_eq!(step(name), "204", "{name}: {out}");
    }
    assert_eq!(check("a_prompt"), "yes", "the guest did not boot: {out}");
    for name in ["a_tmpfs", "a_fill", "a_free"] {
        assert_eq!(check(name), "yes", "{name}: {out}");
    }
    // Refused after start, and hinting at any time.
    assert_eq!(step("a_hinting"), "400");

    // Statistics: the guest reports them and they follow its memory at the interval.
    let total = num("a_stats_idle", "total_memory");
    assert!(
        (400 << 20..=512 << 20).contains(&total),
        "total_memory {total}: {out}"
    );
    let free_idle = num("a_stats_idle", "free_memory");
    let free_full = num("a_stats_full", "free_memory");
    assert!(
        free_idle - free_full >= 250 << 20,
        "free_memory did not follow a 300 MiB fill ({free_idle} -> {free_full}): {out}"
    );
    assert_eq!(num("a_stats_idle", "target_mib"), 0);

    // Inflating gives the freed memory back to the host.
    assert_eq!(step("a_inflate"), "204", "{out}");
    assert_eq!(num("a_stats_inflated", "target_mib"), 420);
    assert_eq!(num("a_stats_inflated", "target_pages"), 420 * 256);
    assert_eq!(num("a_stats_inflated", "actual_mib"), 420, "{out}");
    let (full, freed, inflated) = (kib("a_rss_full"), kib("a_rss_freed"), kib("a_rss_inflated"));
    assert!(
        full - freed < 100 << 10,
        "memory the guest freed went back without the balloon ({full} -> {freed} KiB): {out}"
    );
    assert!(
        freed - inflated >= 250 << 10,
        "inflating the balloon gave back only {} KiB ({freed} -> {inflated} KiB): {out}",
        freed - inflated
    );
    assert_eq!(
        json(out, "a_get"),
        serde_json::json!({"amount_mib": 420, "deflate_on_oom": true,
            "stats_polling_interval_s": 1, "free_page_reporting": false,
            "free_page_hinting": false})
    );
    assert_eq!(step("a_stats_off"), "400", "{out}");
    assert_eq!(step("a_stats_interval"), "204", "{out}");

    // Deflate on OOM: the guest got its 100 MiB, taken back from the balloon.
    assert_eq!(check("a_alloc"), "yes", "{out}");
    assert!(
        check("a_alloc_status").ends_with(" 0"),
        "the guest could not allocate past the balloon: {out}"
    );
    assert!(num("a_stats_oom", "actual_mib") < 420, "{out}");

    // The snapshot keeps the target, the interval and what the guest reported.
    assert_eq!(step("a_snapshot"), "204", "{out}");
    assert_eq!(step("b_load"), "204", "{out}");
    let get = json(out, "b_get");
    assert_eq!(get["amount_mib"], 420, "{out}");
    assert_eq!(get["stats_polling_interval_s"], 2, "{out}");
    assert_eq!(
        num("b_stats", "actual_mib"),
        num("a_stats_oom", "actual_mib")
    );
    assert!(num("b_stats", "total_memory") > 0);
    assert_eq!(step("b_deflate"), "204", "{out}");
    assert_eq!(num("b_stats_deflated", "actual_mib"), 0, "{out}");
    assert_eq!(check("b_alive"), "yes", "{out}");

    // Free page reporting: freed memory goes back with no target.
    assert_eq!(step("c_balloon"), "204", "{out}");
    assert_eq!(check("c_free"), "yes", "{out}");
    let (full, reported) = (kib("c_rss_full"), kib("c_rss_reported"));
    assert!(
        full - reported >= 250 << 10,
        "free page reporting gave back only {} KiB ({full} -> {reported} KiB): {out}",
        full - reported
    );
}
