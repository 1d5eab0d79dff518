//! Tier 3: the real `flint` binary boots the real guest kernel (resources/build-guest-*.sh).
//!
//! On machines whose own KVM cannot boot Linux (the PVM-based dev and CI machines) every
//! scenario runs in the nested KVM host VM (resources/nested-host/run.sh). A host VM boot
//! costs about 10 s and each guest boot a few seconds, so the cases are grouped into few
//! scenarios. The rig must be built beforehand (resources/run-tests.sh does it); when it is
//! missing these tests fail, they never skip.

mod support;

use support::{exec_cmdline, run_scenario, sh_quote, Case, DEFAULT_CMDLINE};

/// Guest-side script of the boot cases: proves it ran, reports CPUs, the processor's name
/// and memory, and ends with a distinctive status that the guest init reports as
/// `FLINT-GUEST-EXIT 7`.
const GUEST_PROBE: &str = "echo GUEST-SCRIPT-RAN
echo CPUS=$(grep -c ^processor /proc/cpuinfo)
echo MODEL=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-)
grep MemTotal /proc/meminfo
exit 7
";

/// MemTotal of the guest in KiB.
fn mem_total_kib(case: &Case) -> u64 {
    case.stdout
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("MemTotal:")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no MemTotal line in the guest output\n{}", case.show()))
}

/// The N of the single `flint: guest boot time: N ms` line on stderr.
fn boot_time_ms(case: &Case) -> u64 {
    let lines: Vec<&str> = case
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("guest boot time"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one boot-time line on stderr\n{}",
        case.show()
    );
    lines[0]
        .trim()
        .strip_prefix("flint: guest boot time: ")
        .and_then(|r| r.strip_suffix(" ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("malformed boot-time line {:?}\n{}", lines[0], case.show()))
}

/// Checks shared by every successful boot.
fn assert_clean_boot(case: &Case) {
    assert_eq!(
        case.status,
        0,
        "flint should exit 0 after the guest reboots\n{}",
        case.show()
    );
    let ready = case.stdout.find("FLINT-GUEST-READY");
    assert!(
        ready.is_some(),
        "guest init never printed FLINT-GUEST-READY\n{}",
        case.show()
    );
    case.assert_no_errors();
    let ms = boot_time_ms(case);
    assert!(
        ms > 0 && ms < 120_000,
        "implausible guest boot time {ms} ms\n{}",
        case.show()
    );
}

/// Checks of a boot that ran GUEST_PROBE with `vcpus` and `mem_mib`.
fn assert_probe_boot(case: &Case, vcpus: u32, mem_mib: u64) {
    assert_clean_boot(case);
    let ready = case.stdout.find("FLINT-GUEST-READY").unwrap();
    let ran = case.stdout.find("GUEST-SCRIPT-RAN");
    assert!(
        ran.is_some_and(|r| r > ready),
        "the flint.exec script did not run after FLINT-GUEST-READY\n{}",
        case.show()
    );
    assert!(
        case.stdout
            .lines()
            .any(|l| l.trim() == "FLINT-GUEST-EXIT 7"),
        "guest script did not finish (no FLINT-GUEST-EXIT 7)\n{}",
        case.show()
    );
    assert_eq!(
        case.value_of("CPUS"),
        vcpus.to_string(),
        "guest sees the wrong number of CPUs\n{}",
        case.show()
    );
    // The processor's name, not Linux's "family/model" stand-in (e.g. "17/01") for a CPU
    // whose brand-string leaves are empty.
    let model = case.value_of("MODEL");
    assert!(
        model.chars().any(|c| c.is_ascii_alphabetic()),
        "the guest's CPU has no name: model name {model:?}\n{}",
        case.show()
    );
    let total = mem_total_kib(case);
    let requested = mem_mib * 1024;
    assert!(
        total * 100 >= requested * 80 && total <= requested,
        "guest MemTotal {total} KiB is not within 80%-100% of the requested {requested} KiB\n{}",
        case.show()
    );
}

/// Lists what the guest found of the 19 virtio devices flint can give it (18 disks and the
/// entropy device): with ACPI it finds them in the DSDT, and those on interrupt lines above
/// 15 only there.
const GUEST_DEVICES: &str =
    "for d in /sys/block/vd*; do echo \"DISK $(basename $d) $(cat $d/serial)\"; done
echo VIRTIO=$(ls /sys/bus/virtio/devices | wc -l)
exit 7
";

/// What the guest makes of its CPU topology.
const GUEST_TOPOLOGY: &str = "t=/sys/devices/system/cpu
echo SIBLINGS0=$(cat $t/cpu0/topology/thread_siblings_list)
echo SIBLINGS3=$(cat $t/cpu3/topology/thread_siblings_list)
echo CPUS=$(grep -c ^processor /proc/cpuinfo)
exit 7
";

#[test]
fn boots_linux_guests() {
    let cmdline = sh_quote(&exec_cmdline(GUEST_PROBE));
    // Base64 and plain words: nothing to escape in JSON.
    let topology = exec_cmdline(GUEST_TOPOLOGY);
    let devices = sh_quote(&exec_cmdline(GUEST_DEVICES));
    let script = format!(
        r#"
# A boot takes about 5 s in the nested host; a hung one must not eat the whole budget.
CASE_TIMEOUT=60
G={cmdline}
DISKS=
i=0
while [ $i -lt 18 ]; do
    head -c 4096 /dev/zero >"$WORK/d$i.img"
    DISKS="$DISKS --disk $WORK/d$i.img,ro,id=d$i"
    i=$((i + 1))
done
flint_case elf_19_devices "$FLINT" boot --kernel "$VMLINUX" --initrd "$INITRAMFS" --cmdline {devices} $DISKS
flint_case elf_1cpu_128m "$FLINT" boot --kernel "$VMLINUX" --initrd "$INITRAMFS" --cmdline "$G" --vcpus 1 --memory 128
flint_case bzimage_1cpu_128m "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRAMFS" --cmdline "$G" --vcpus 1 --memory 128
flint_case elf_4cpu_2048m "$FLINT" boot --kernel "$VMLINUX" --initrd "$INITRAMFS" --cmdline "$G" --vcpus 4 --memory 2048
flint_case bzimage_2cpu_512m "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRAMFS" --cmdline "$G" --vcpus 2 --memory 512
# Firecracker's smt: true, through a config file.
printf '{{"boot-source": {{"kernel_image_path": "%s", "initrd_path": "%s", "boot_args": "%s"}},
  "machine-config": {{"vcpu_count": 4, "mem_size_mib": 256, "smt": true}}}}' \
    "$VMLINUX" "$INITRAMFS" "{topology}" >"$WORK/smt.json"
flint_case elf_smt_4cpu "$FLINT" --no-api --config-file "$WORK/smt.json"

# Default command line: the guest offers its demo shell on the console. Once its hint
# is on flint's stdout, type a command and `exit` into flint's stdin; the shell's exit
# reboots the guest. This checks stdin forwarding and the default command line.
(
    i=0
    while [ $i -lt 100 ] && ! grep -q 'flint demo guest' "$WORK/demo_shell.out" 2>/dev/null; do
        sleep 1
        i=$((i + 1))
    done
    printf 'echo DEMO-$((6 * 7))\n'
    sleep 1
    printf 'exit\n'
) | flint_case_stdin demo_shell "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRAMFS"
"#
    );
    let run = run_scenario(&script, &[]);
    run.assert_ok();

    let elf = run.case("elf_1cpu_128m");
    assert_probe_boot(&elf, 1, 128);
    let bz = run.case("bzimage_1cpu_128m");
    assert_probe_boot(&bz, 1, 128);
    assert_probe_boot(&run.case("elf_4cpu_2048m"), 4, 2048);
    assert_probe_boot(&run.case("bzimage_2cpu_512m"), 2, 512);

    // Two threads per core: vCPUs 0 and 1 share a core, 2 and 3 the other.
    let smt = run.case("elf_smt_4cpu");
    assert_clean_boot(&smt);
    assert_eq!(smt.value_of("CPUS"), "4", "{}", smt.show());
    assert_eq!(smt.value_of("SIBLINGS0"), "0-1", "{}", smt.show());
    assert_eq!(smt.value_of("SIBLINGS3"), "2-3", "{}", smt.show());

    let many = run.case("elf_19_devices");
    assert_clean_boot(&many);
    assert_eq!(many.value_of("VIRTIO"), "19", "{}", many.show());
    // In order: vda is the first disk given, ..., vdr the 18th.
    let disks: Vec<&str> = many
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("DISK "))
        .collect();
    let expected: Vec<String> = (0..18)
        .map(|i| format!("vd{} d{i}", (b'a' + i as u8) as char))
        .collect();
    assert_eq!(disks, expected, "{}", many.show());

    let demo = run.case("demo_shell");
    assert_clean_boot(&demo);
    assert!(
        demo.stdout.contains("flint demo guest"),
        "default command line did not reach the demo shell\n{}",
        demo.show()
    );
    assert!(
        demo.stdout.lines().any(|l| l.trim() == "DEMO-42"),
        "input on flint's stdin did not reach the guest shell\n{}",
        demo.show()
    );
    assert!(
        !demo.stdout.contains("flint.exec"),
        "the default command line should not carry a script\n{}",
        demo.show()
    );
    // The default command line really is the documented one: the guest kernel echoes it.
    assert!(
        demo.stdout.contains(DEFAULT_CMDLINE),
        "guest kernel log does not show the default command line {DEFAULT_CMDLINE:?}\n{}",
        demo.show()
    );
}

/// Checks of a rejected invocation: exit status 1, nothing on stdout, exactly one stderr
/// line `flint: error: ...` mentioning one of `keywords` (case-insensitive), no panic.
fn assert_rejected(case: &Case, keywords: &[&str]) {
    let all = format!("{}{}", case.stdout, case.stderr);
    assert!(
        !all.contains("panicked") && !all.contains("RUST_BACKTRACE"),
        "flint panicked instead of reporting an error\n{}",
        case.show()
    );
    assert_eq!(
        case.status,
        1,
        "flint should exit with status 1\n{}",
        case.show()
    );
    let lines = case.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line\n{}",
        case.show()
    );
    assert!(
        lines[0].starts_with("flint: error: ") && lines[0].len() > "flint: error: ".len(),
        "stderr line is not `flint: error: <sentence>`\n{}",
        case.show()
    );
    let lower = lines[0].to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(k)),
        "error message should mention one of {keywords:?}\n{}",
        case.show()
    );
    assert!(
        case.stdout.trim().is_empty(),
        "nothing should reach stdout (the guest must not have started)\n{}",
        case.show()
    );
}

#[test]
fn rejects_bad_inputs() {
    let script = r#"
CASE_TIMEOUT=30
head -c 65536 /dev/urandom >"$WORK/junk.bin"
dd if=/dev/zero of="$WORK/big.initrd" bs=1048576 count=96 2>/dev/null
LONG=$(head -c 5000 /dev/zero | tr '\0' a)
ok="--kernel $VMLINUX --initrd $INITRAMFS"

flint_case missing_kernel "$FLINT" boot --kernel /nonexistent/vmlinux --initrd "$INITRAMFS"
flint_case not_a_kernel "$FLINT" boot --kernel "$WORK/junk.bin" --initrd "$INITRAMFS"
flint_case vcpus_0 "$FLINT" boot $ok --vcpus 0
flint_case vcpus_1000 "$FLINT" boot $ok --vcpus 1000
flint_case memory_16 "$FLINT" boot $ok --memory 16
flint_case initrd_too_big "$FLINT" boot --kernel "$VMLINUX" --initrd "$WORK/big.initrd" --memory 64
flint_case cmdline_5000 "$FLINT" boot $ok --cmdline "$LONG"

# No /dev/kvm: a private mount namespace with an empty tmpfs over /dev.
if [ "$(id -u)" = 0 ]; then ns="unshare -m"; else ns="unshare -r -m"; fi
flint_case no_kvm $ns sh -c 'mount -t tmpfs tmpfs /dev && exec "$@"' sh "$FLINT" boot $ok
"#;
    let run = run_scenario(script, &[]);
    run.assert_ok();

    assert_rejected(
        &run.case("missing_kernel"),
        &[
            "/nonexistent/vmlinux",
            "no such file",
            "not found",
            "kernel",
        ],
    );
    assert_rejected(
        &run.case("not_a_kernel"),
        &["kernel", "elf", "bzimage", "format"],
    );
    assert_rejected(&run.case("vcpus_0"), &["vcpu", "cpu"]);
    assert_rejected(&run.case("vcpus_1000"), &["vcpu", "cpu"]);
    assert_rejected(&run.case("memory_16"), &["memory", "mib"]);
    assert_rejected(
        &run.case("initrd_too_big"),
        &["memory", "mib", "initrd", "initramfs", "fit"],
    );
    assert_rejected(&run.case("cmdline_5000"), &["command line", "cmdline"]);
    assert_rejected(&run.case("no_kvm"), &["kvm"]);
}
