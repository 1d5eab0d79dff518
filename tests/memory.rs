//! Tier 3: guest memory backed by 2 MiB huge pages, diff snapshots merged into their base, and
//! lazy restore through the example page-fault handler (`Uffd` backend), with a real Linux
//! guest driven through the REST API (`curl --unix-socket`) in the nested KVM host (or
//! directly on a host whose KVM boots Linux). The host's huge page pool is set by the scenario
//! (`/proc/sys/vm/nr_hugepages`).
//!
//! The three scenarios run one after the other in one scenario script, so that the file costs
//! one boot of the nested host ([`shared_run`]); each test reads its own section of the output.

mod support;

use std::path::PathBuf;
use std::sync::OnceLock;

use support::api_shell::{value, API_SHELL};
use support::{
    exec_cmdline, run_scenario_with, sh_quote, ScenarioOptions, ScenarioRun, DEFAULT_CMDLINE,
};

/// Besides [`API_SHELL`]: `boot_source NAME` sets the test guest as NAME's boot source,
/// `meminfo FIELD` reads the host's /proc/meminfo, `show_flints NAME...` prints their stderr
/// and console tails.
const HELPERS: &str = r#"
boot_source() { # name
    call "$1_boot_source" PUT /boot-source "{\"kernel_image_path\": \"$VMLINUX\", \"initrd_path\": \"$INITRAMFS\", \"boot_args\": \"$GUEST_CMDLINE\"}"
}
meminfo() { # field
    sed -n "s/^$1: *\([0-9]*\).*/\1/p" /proc/meminfo
}
show_flints() {
    for n in "$@"; do echo "--- flint $n stderr"; cat "$WORK/$n.stderr"; echo "--- guest console $n (tail)"; tail -n 8 "$WORK/$n.console"; echo; done
}
"#;

/// With a pool of 80 huge pages: a 256 MiB guest with 2 MiB pages is refused (it needs 128); a
/// 128 MiB one boots (the pool then has 64 fewer to give, some already in use), is
/// snapshotted, and is loaded in a second flint with huge pages again. Also: a memory size
/// that is not a multiple of 2 MiB.
const HUGE_PAGES_SCENARIO: &str = r#"
# First, while the host's memory is least fragmented (the kernel finds what 2 MiB blocks it can).
echo 3 >/proc/sys/vm/drop_caches
echo 1 >/proc/sys/vm/compact_memory
echo 80 >/proc/sys/vm/nr_hugepages
echo "VALUE total $(meminfo HugePages_Total)"
start_flint few
boot_source few
call few_odd PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}'
call few_machine PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "2M"}'
call few_get GET /machine-config
call few_start PUT /actions '{"action_type": "InstanceStart"}'
stop_flint few

echo "VALUE free_before $(meminfo HugePages_Free)"
echo "VALUE rsvd_before $(meminfo HugePages_Rsvd)"
start_flint a
boot_source a
call a_machine PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}'
call a_start PUT /actions '{"action_type": "InstanceStart"}'
check_for a_prompt "$WORK/a.console" '/ #' 180
echo 'x=41; echo "SET-$((x+1))"' >"$WORK/a.in"
check_for a_set "$WORK/a.console" 'SET-42' 60
echo "VALUE free_running $(meminfo HugePages_Free)"
echo "VALUE rsvd_running $(meminfo HugePages_Rsvd)"
call a_pause PATCH /vm '{"state": "Paused"}'
call a_snapshot PUT /snapshot/create "{\"snapshot_path\": \"$WORK/s1\", \"mem_file_path\": \"$WORK/m1\"}"
stop_flint a
echo "VALUE free_after $(meminfo HugePages_Free)"
echo "VALUE rsvd_after $(meminfo HugePages_Rsvd)"

start_flint b
call b_load PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s1\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$WORK/m1\"}, \"resume_vm\": true}"
call b_get GET /machine-config
echo 'echo "RESTORED-$((x+1))"' >"$WORK/b.in"
check_for b_restored "$WORK/b.console" 'RESTORED-42' 60
echo "VALUE free_restored $(meminfo HugePages_Free)"
echo "VALUE rsvd_restored $(meminfo HugePages_Rsvd)"
stop_flint b
show_flints few a b

# The same from the command line: too few pages for 256 MiB, then a 128 MiB guest on them.
flint_case cli_few "$FLINT" boot --kernel "$VMLINUX" --initrd "$INITRAMFS" --memory 256 --huge-pages 2M
bg_case cli_boot "$FLINT" boot --kernel "$VMLINUX" --initrd "$INITRAMFS" --memory 128 --huge-pages 2M --cmdline "$HUGE_CMDLINE"
if wait_for "$WORK/cli_boot.out" 'CLI-HUGE-42' 180; then
    echo "VALUE cli_free $(meminfo HugePages_Free)"
    echo "VALUE cli_rsvd $(meminfo HugePages_Rsvd)"
fi
end_case cli_boot $BG_PID
# Give the pool back for the sections after this one.
echo 0 >/proc/sys/vm/nr_hugepages
"#;

/// A guest with dirty-page tracking: a full snapshot (the base), then the guest writes 8 MiB
/// of a known pattern, then a diff snapshot. The diff holds about those pages; it does not load
/// by itself; merged into its base with `flint snapshot merge` it loads, and the guest has the
/// pattern and goes on. Loaded without tracking, the VM refuses a diff.
const DIFF_SCENARIO: &str = r#"
PATTERN='yes FLINT-DIFF-PATTERN | head -c 8388608'
echo "VALUE expected $(sh -c "$PATTERN" | md5sum | cut -d' ' -f1)"
start_flint a
boot_source a
call a_machine PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}'
call a_get GET /machine-config
call a_start PUT /actions '{"action_type": "InstanceStart"}'
check_for a_prompt "$WORK/a.console" '/ #' 180
call a_pause PATCH /vm '{"state": "Paused"}'
call a_diff_first PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$WORK/s1\", \"mem_file_path\": \"$WORK/m1\"}"
call a_base PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$WORK/s0\", \"mem_file_path\": \"$WORK/m0\"}"
call a_resume PATCH /vm '{"state": "Resumed"}'
echo "$PATTERN >/pattern; echo \"WROTE \$(md5sum </pattern | cut -d' ' -f1)\"" >"$WORK/a.in"
check_for a_wrote "$WORK/a.console" 'WROTE [0-9a-f]' 120
call a_pause2 PATCH /vm '{"state": "Paused"}'
call a_diff PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$WORK/s1\", \"mem_file_path\": \"$WORK/m1\"}"
stop_flint a
echo "VALUE base_kib $(du -k "$WORK/m0" | cut -f1)"
echo "VALUE diff_kib $(du -k "$WORK/m1" | cut -f1)"
echo "VALUE diff_size $(stat -c %s "$WORK/m1")"

start_flint b
call b_load_diff PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s1\", \"mem_file_path\": \"$WORK/m1\"}"
stop_flint b

"$FLINT" snapshot merge --base "$WORK/s0" "$WORK/m0" --diff "$WORK/s1" "$WORK/m1" --out "$WORK/s2" "$WORK/m2" 2>"$WORK/merge.err"
echo "VALUE merge_status $? $(cat "$WORK/merge.err")"
"$FLINT" snapshot merge --base "$WORK/s1" "$WORK/m1" --diff "$WORK/s1" "$WORK/m1" --out "$WORK/s3" "$WORK/m3" 2>"$WORK/merge_bad.err"
echo "VALUE merge_bad $? $(cat "$WORK/merge_bad.err")"

start_flint c
call c_load PUT /snapshot/load "{\"snapshot_path\": \"$WORK/s2\", \"mem_file_path\": \"$WORK/m2\", \"resume_vm\": true, \"track_dirty_pages\": false}"
echo 'echo "SEEN $(md5sum </pattern | cut -d" " -f1)"; echo "CONTINUES-$((6*7))"' >"$WORK/c.in"
check_for c_continues "$WORK/c.console" 'CONTINUES-42' 60
echo "VALUE seen $(sed -n 's/.*SEEN \([0-9a-f]*\).*/\1/p' "$WORK/c.console" | tail -n 1)"
call c_get GET /machine-config
call c_pause PATCH /vm '{"state": "Paused"}'
call c_diff PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$WORK/s4\", \"mem_file_path\": \"$WORK/m4\"}"
stop_flint c
show_flints a b c
"#;

/// Lazy restore, on the merged snapshot of [`DIFF_SCENARIO`] (its guest holds 8 MiB of a known
/// pattern in `/pattern`): the example handler serves the memory file, a new flint loads the
/// snapshot with the `Uffd` backend, and its guest runs on and reads the pattern; flint never
/// maps the memory file. Then the guest fills its tmpfs a little at a time (fresh pages, not
/// yet faulted in) and the handler is killed meanwhile: flint must end with status 1 and its
/// one sentence, not hang (a watchdog kills it after 60 s, which shows as status 137).
const UFFD_SCENARIO: &str = r#"
SNAP=$SHARED/diff
HANDLER_SOCK=$WORK/handler.sock
echo "VALUE handler_sock $HANDLER_SOCK"
"$FILES/flint-uffd-handler" "$HANDLER_SOCK" "$SNAP/m2" >"$WORK/handler.log" 2>&1 &
handler=$!
i=0; while [ ! -S "$HANDLER_SOCK" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
start_flint d
call d_load PUT /snapshot/load "{\"snapshot_path\": \"$SNAP/s2\", \"mem_backend\": {\"backend_type\": \"Uffd\", \"backend_path\": \"$HANDLER_SOCK\"}, \"resume_vm\": true}"
echo 'echo "SEEN $(md5sum </pattern | cut -d" " -f1)"; echo "CONTINUES-$((6*7))"' >"$WORK/d.in"
check_for d_continues "$WORK/d.console" 'CONTINUES-42' 120
echo "VALUE seen $(sed -n 's/.*SEEN \([0-9a-f]*\).*/\1/p' "$WORK/d.console" | tail -n 1)"
echo "VALUE maps_memory_file $(grep -c "$SNAP/m2" /proc/$pid/maps)"
if kill -0 $handler 2>/dev/null; then echo "VALUE handler_serving yes"; else echo "VALUE handler_serving no"; fi
echo 'i=0; while [ $i -lt 200 ]; do i=$((i+1)); yes FILL | head -c 262144 >/fill$i; echo "TOUCHED-$((i+1000))"; sleep 0.2; done' >"$WORK/d.in"
check_for d_touching "$WORK/d.console" 'TOUCHED-1005' 120
kill -KILL $handler
(sleep 60; kill -KILL $pid 2>/dev/null) &
dog=$!
wait $pid
echo "VALUE status $?"
kill $dog 2>/dev/null
eval "kill \$keep_d" 2>/dev/null
echo "VALUE last_touched $(sed -n 's/.*TOUCHED-\([0-9]*\).*/\1/p' "$WORK/d.console" | tail -n 1)"
echo "VALUE stderr_lines $(grep -c . "$WORK/d.stderr")"
echo "VALUE error $(grep 'flint: error:' "$WORK/d.stderr")"
show_flints d
"#;

fn number(output: &str, name: &str) -> u64 {
    let v = value(output, "VALUE", name);
    v.parse()
        .unwrap_or_else(|_| panic!("VALUE {name} is {v:?}:\n{output}"))
}

/// The example page-fault handler, built with the vmm crate's binaries (`cargo test
/// --workspace` builds them; alone: `cargo build -p vmm --bin flint-uffd-handler`).
fn uffd_handler() -> PathBuf {
    let path = support::flint_bin().with_file_name("flint-uffd-handler");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p vmm --bin flint-uffd-handler",
        path.display()
    );
    path
}

/// The sections of [`shared_run`], in order: each runs with its own `$WORK` (`$SHARED/NAME`).
const SECTIONS: [(&str, &str); 3] = [
    ("huge", HUGE_PAGES_SCENARIO),
    ("diff", DIFF_SCENARIO),
    ("uffd", UFFD_SCENARIO),
];

/// The one run of every scenario of this file in one host VM (with curl and the example
/// page-fault handler), shared by the tests: the first test to ask runs it, the others wait
/// for it. Not a panic inside: a failed run is reported by every test.
fn shared_run() -> &'static ScenarioRun {
    static RUN: OnceLock<ScenarioRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let curl = PathBuf::from("/usr/bin/curl");
        // The guest of `flint boot --huge-pages 2M` in the huge pages section: it prints its
        // marker and stays up a few seconds, while the scenario reads the host's pool.
        let huge_cmdline = exec_cmdline("echo \"CLI-HUGE-$((40+2))\"; sleep 4");
        let mut script = format!(
            "GUEST_CMDLINE='{DEFAULT_CMDLINE}'\nHUGE_CMDLINE={}\nCURL=$FILES/curl\n\
             SHARED=$WORK\n{API_SHELL}{HELPERS}",
            sh_quote(&huge_cmdline)
        );
        for (name, scenario) in SECTIONS {
            script.push_str(&format!(
                "echo \"MEMORY-SECTION {name}\"\nWORK=$SHARED/{name}\nmkdir -p \"$WORK\"\n{scenario}\n"
            ));
        }
        script.push_str("echo \"MEMORY-SECTION end\"\n");
        let files = [(curl, "curl"), (uffd_handler(), "flint-uffd-handler")];
        let options = ScenarioOptions {
            timeout_secs: 900,
            ..ScenarioOptions::default()
        };
        run_scenario_with(&script, &files, &options)
    })
}

/// The output of section `name` of [`shared_run`] (which must have succeeded).
fn section(name: &str) -> &'static str {
    let curl = PathBuf::from("/usr/bin/curl");
    assert!(
        curl.is_file(),
        "curl is needed for this test (apt-get install curl)"
    );
    let run = shared_run();
    assert_eq!(run.status, 0, "scenario failed:\n{}", run.output);
    let start = format!("MEMORY-SECTION {name}\n");
    let begin = run
        .output
        .find(&start)
        .unwrap_or_else(|| panic!("no section {name} in the output:\n{}", run.output))
        + start.len();
    let rest = &run.output[begin..];
    &rest[..rest.find("MEMORY-SECTION ").unwrap_or(rest.len())]
}

#[test]
fn guest_memory_on_huge_pages() {
    let out = section("huge");
    let step = |name: &str| value(out, "STEP", name);
    let body = |name: &str| value(out, "BODY", name);
    let check = |name: &str| value(out, "CHECK", name);

    assert_eq!(
        number(out, "total"),
        80,
        "the host could not make 80 huge pages:\n{out}"
    );
    assert_eq!(step("few_odd"), "400", "{out}");
    assert!(
        body("few_odd").contains(
            r#"129 MiB of guest memory cannot be backed by 2 MiB huge pages: with huge_pages \"2M\" it must be a multiple of 2 MiB"#
        ),
        "{}",
        body("few_odd")
    );
    assert_eq!(step("few_machine"), "204", "{}", body("few_machine"));
    assert!(body("few_get").contains(r#""huge_pages":"2M""#), "{out}");
    // Too few huge pages: one sentence when the VM is built, not a fault later.
    assert_eq!(step("few_start"), "400", "{out}");
    assert!(
        body("few_start").contains(
            "cannot back 256 MiB of guest memory with 2 MiB huge pages: it needs 128 of them and \
             the host has 80 free (raise vm.nr_hugepages, /proc/sys/vm/nr_hugepages)"
        ),
        "{}",
        body("few_start")
    );

    let (free, rsvd) = (number(out, "free_before"), number(out, "rsvd_before"));
    assert_eq!((free, rsvd), (80, 0), "{out}");
    assert_eq!(step("a_start"), "204", "{}", body("a_start"));
    assert_eq!(
        check("a_prompt"),
        "yes",
        "the guest did not boot on huge pages"
    );
    assert_eq!(check("a_set"), "yes");
    // While the guest runs, all 64 of its pages are out of the pool's reach: taken (no longer
    // free) or reserved for it; some are taken, as the guest has used them.
    let (free_running, rsvd_running) = (number(out, "free_running"), number(out, "rsvd_running"));
    assert_eq!(
        free - (free_running - rsvd_running),
        64,
        "free {free_running}, reserved {rsvd_running}:\n{out}"
    );
    assert!(free_running < free, "the guest took no huge page:\n{out}");
    assert_eq!(step("a_snapshot"), "204", "{}", body("a_snapshot"));
    // Gone with the VM.
    assert_eq!(
        (number(out, "free_after"), number(out, "rsvd_after")),
        (80, 0),
        "{out}"
    );

    // A restored guest is on huge pages again (the snapshot's setting) and runs on.
    assert_eq!(step("b_load"), "204", "{}", body("b_load"));
    assert!(body("b_get").contains(r#""huge_pages":"2M""#), "{out}");
    assert_eq!(
        check("b_restored"),
        "yes",
        "the restored guest lost its state"
    );
    let (free_restored, rsvd_restored) =
        (number(out, "free_restored"), number(out, "rsvd_restored"));
    assert_eq!(free - (free_restored - rsvd_restored), 64, "{out}");
    assert!(free_restored < free, "{out}");

    // From the command line: `flint boot --huge-pages 2M`.
    let run = shared_run();
    let few = run.case("cli_few");
    assert_eq!(few.status, 1, "{}", few.show());
    assert_eq!(
        few.stderr_lines(),
        ["flint: error: cannot back 256 MiB of guest memory with 2 MiB huge pages: it needs 128 \
          of them and the host has 80 free (raise vm.nr_hugepages, /proc/sys/vm/nr_hugepages)"],
        "{}",
        few.show()
    );
    let boot = run.case("cli_boot");
    assert_eq!(boot.status, 0, "{}", boot.show());
    assert!(boot.stdout.contains("CLI-HUGE-42"), "{}", boot.show());
    boot.assert_no_errors();
    let (cli_free, cli_rsvd) = (number(out, "cli_free"), number(out, "cli_rsvd"));
    assert_eq!(
        free - (cli_free - cli_rsvd),
        64,
        "`flint boot --huge-pages 2M` did not put its 128 MiB guest on the pool's pages:\n{out}"
    );
}

#[test]
fn diff_snapshots_merge_into_their_base() {
    let out = section("diff");
    let step = |name: &str| value(out, "STEP", name);
    let body = |name: &str| value(out, "BODY", name);
    let check = |name: &str| value(out, "CHECK", name);

    assert_eq!(step("a_machine"), "204", "{}", body("a_machine"));
    assert!(
        body("a_get").contains(r#""track_dirty_pages":true"#),
        "{out}"
    );
    assert_eq!(check("a_prompt"), "yes", "the guest did not boot");
    assert_eq!(step("a_diff_first"), "400", "{out}");
    assert!(
        body("a_diff_first").contains("a diff snapshot needs a base"),
        "{out}"
    );
    assert_eq!(step("a_base"), "204", "{}", body("a_base"));
    assert_eq!(check("a_wrote"), "yes", "{out}");
    assert_eq!(step("a_diff"), "204", "{}", body("a_diff"));

    // The diff is as long as the guest's memory but holds about the 8 MiB the guest wrote
    // (plus what its kernel changed meanwhile), far less than the base.
    assert_eq!(number(out, "diff_size"), 128 << 20);
    let (diff_kib, base_kib) = (number(out, "diff_kib"), number(out, "base_kib"));
    assert!(
        (8 << 10..=12 << 10).contains(&diff_kib),
        "{diff_kib} KiB allocated for 8 MiB written (base {base_kib} KiB):\n{out}"
    );

    assert_eq!(step("b_load_diff"), "400", "{out}");
    assert!(
        body("b_load_diff").contains("is a diff snapshot, which holds only the pages changed since its base: merge it into its base first (flint snapshot merge)"),
        "{}", body("b_load_diff")
    );
    assert_eq!(value(out, "VALUE", "merge_status"), "0", "{out}");
    assert!(
        value(out, "VALUE", "merge_bad").starts_with("1 flint: error: the diff snapshot"),
        "{out}"
    );

    assert_eq!(step("c_load"), "204", "{}", body("c_load"));
    assert_eq!(
        check("c_continues"),
        "yes",
        "the merged snapshot's guest did not run on"
    );
    assert_eq!(
        value(out, "VALUE", "seen"),
        value(out, "VALUE", "expected"),
        "the merged snapshot's guest does not have the pattern:\n{out}"
    );
    // Loaded without tracking: no diff.
    assert!(
        body("c_get").contains(r#""track_dirty_pages":false"#),
        "{out}"
    );
    assert_eq!(step("c_diff"), "400", "{out}");
    assert!(
        body("c_diff").contains(
            "cannot create the snapshot: a diff snapshot needs dirty-page tracking: set \
             track_dirty_pages in the machine configuration (or the snapshot load) before the VM \
             starts"
        ),
        "{}",
        body("c_diff")
    );
}

#[test]
fn a_snapshot_loads_lazily_through_the_example_handler_and_its_death_ends_flint() {
    let diff = section("diff");
    let out = section("uffd");
    let step = |name: &str| value(out, "STEP", name);
    let body = |name: &str| value(out, "BODY", name);
    let check = |name: &str| value(out, "CHECK", name);

    assert_eq!(step("d_load"), "204", "{}", body("d_load"));
    assert_eq!(
        check("d_continues"),
        "yes",
        "the guest restored through the page-fault handler did not run on:\n{out}"
    );
    assert_eq!(
        value(out, "VALUE", "seen"),
        value(diff, "VALUE", "expected"),
        "the guest restored through the page-fault handler does not have the pattern:\n{out}"
    );
    // Its memory came from the handler: flint never mapped the memory file.
    assert_eq!(number(out, "maps_memory_file"), 0, "{out}");
    assert_eq!(value(out, "VALUE", "handler_serving"), "yes", "{out}");

    // The handler is killed while the guest fills fresh pages of its tmpfs.
    assert_eq!(check("d_touching"), "yes", "{out}");
    let last = number(out, "last_touched");
    assert!(
        (1005..1200).contains(&last),
        "the guest was not still filling memory when the handler died (last mark {last}):\n{out}"
    );
    assert_eq!(
        number(out, "status"),
        1,
        "flint did not end with status 1 when its page-fault handler died (137: it hung and \
         the watchdog killed it):\n{out}"
    );
    assert_eq!(number(out, "stderr_lines"), 1, "{out}");
    assert_eq!(
        value(out, "VALUE", "error"),
        format!(
            "flint: error: the page-fault handler for guest memory ({}) went away, so the \
             guest cannot continue",
            value(out, "VALUE", "handler_sock")
        ),
        "{out}"
    );
}
