//! Tier 3 storage: virtio-blk disks and the virtio-rng device, seen from a real Linux guest
//! booted by the real `flint` binary, checked against the image files on the host.
//!
//! Like `tests/linux_boot.rs` the scenarios run in the nested KVM host VM on PVM machines
//! (tests/support). Each nested scenario costs a host VM boot (about 10 s) plus a few seconds
//! per guest boot, so the cases are grouped into three scenarios. The rig, including the ext4
//! root filesystem of `resources/build-rootfs.sh`, must be built beforehand
//! (`resources/run-tests.sh` does it); when it is missing these tests fail, they never skip.
//!
//! Bad disk arguments are checked on the local `/dev/kvm` (no guest ever starts).
//!
//! Conventions: guest scripts print `KEY=value` lines (read with [`value_of`]); the scenario
//! prints host-side facts (checksums of image files) as `HOST name=value` lines (read with
//! [`support::ScenarioRun::host_value`]).

mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use support::{
    assert_one_error, base64_encode, cache_dir, run_scenario_with, sh_quote, Case, ScenarioOptions,
    DEFAULT_CMDLINE, GUEST_CMDLINE_MAX,
};

/// The ext4 root filesystem image of `resources/build-rootfs.sh`.
fn rootfs_image() -> PathBuf {
    let path = cache_dir().join("guest").join("rootfs.ext4");
    assert!(
        path.is_file(),
        "guest root filesystem missing: {} does not exist; run resources/build-rootfs.sh (or \
         resources/run-tests.sh, which builds every image)",
        path.display()
    );
    path
}

/// Kernel command line that runs `guest_script` after boot (like `support::exec_cmdline`),
/// leaving room for what flint appends: one `virtio_mmio.device=` per device and `root=`.
fn guest_cmdline(guest_script: &str) -> String {
    let cmdline = format!(
        "{DEFAULT_CMDLINE} flint.exec={}",
        base64_encode(guest_script.as_bytes())
    );
    // 6 devices at most in these tests, 36 bytes each, plus `root=/dev/vda rw`.
    let room = 6 * 36 + 20;
    assert!(
        cmdline.len() + room < GUEST_CMDLINE_MAX,
        "guest script too long for the kernel command line ({} bytes + {room} for flint)",
        cmdline.len()
    );
    sh_quote(&cmdline)
}

fn options(timeout_secs: u32) -> ScenarioOptions {
    ScenarioOptions {
        timeout_secs,
        ..ScenarioOptions::default()
    }
}

/// An md5 checksum as `md5sum` prints it: 32 lowercase hex digits.
fn assert_md5(what: &str, sum: &str) {
    assert!(
        sum.len() == 32 && sum.bytes().all(|b| b.is_ascii_hexdigit()),
        "{what}: {sum:?} is not an md5 checksum"
    );
}

/// md5 of `len` zero bytes, as the host-side checks print it.
fn md5_of_zeros(len: usize) -> &'static str {
    match len {
        0x10_0000 => "b6d81b360a5672d80c27430f39153e2c",
        0x400_0000 => "7f614da9329cd3aebf59b91aadc30bf0",
        _ => panic!("no precomputed md5 for {len} zero bytes"),
    }
}

/// Checks shared by every guest boot that should have gone well: flint exits 0 after the
/// guest ran its whole script and rebooted, without kernel trouble or errors from flint.
fn assert_clean_boot(case: &Case) {
    assert_eq!(
        case.status,
        0,
        "flint should exit 0 after the guest reboots\n{}",
        case.show()
    );
    assert!(
        case.stdout.contains("FLINT-GUEST-READY"),
        "guest init never printed FLINT-GUEST-READY\n{}",
        case.show()
    );
    case.assert_no_errors_or(&["I/O error", "EXT4-fs error"]);
    assert!(
        case.stderr.contains("flint: guest boot time: "),
        "no boot-time line: the guest's init did not write the boot-timer port\n{}",
        case.show()
    );
}

/// [`assert_clean_boot`] for a guest that ran a script ending in `echo SCRIPT-DONE`.
fn assert_script_ran(case: &Case) {
    assert_clean_boot(case);
    assert!(
        case.stdout.lines().any(|l| l.trim() == "SCRIPT-DONE"),
        "the guest script did not run to its end\n{}",
        case.show()
    );
    assert!(
        case.stdout
            .lines()
            .any(|l| l.trim() == "FLINT-GUEST-EXIT 0"),
        "the guest script failed (no FLINT-GUEST-EXIT 0)\n{}",
        case.show()
    );
}

/// Which device holds `/`, per /proc/self/mountinfo (major:minor), the device numbers of
/// vda, and the file system type and options of `/`.
const GUEST_ROOT_PROBE: &str = r#"awk '$5 == "/" { print "ROOT-DEV=" $3; print "ROOT-OPTS=" $6; print "ROOT-FSTYPE=" $(NF - 2) }' /proc/self/mountinfo
echo VDA-DEV=$(cat /sys/block/vda/dev)
echo ROOT-MOUNTS=$(grep ' / ' /proc/mounts | grep -v '^rootfs')
echo ROOT-ARGS=$(tr ' ' '\n' </proc/cmdline | grep -E '^(root=.*|rw|ro)$' | tr '\n' ' ')
"#;

/// The root filesystem boots without an initrd, `/` is the ext4 of /dev/vda, writable, and what
/// the guest writes there persists across boots and leaves a clean file system. The entropy
/// device works in the same guest.
#[test]
fn boots_from_an_ext4_rootfs_with_entropy() {
    let rootfs = rootfs_image();
    // Distinct per run: the second boot must read what this run's first boot wrote.
    let token = format!(
        "token-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let first = guest_cmdline(&format!(
        r#"{GUEST_ROOT_PROBE}touch /root-is-writable && echo ROOT-WRITABLE=yes
echo {token} >/persist
dd if=/dev/urandom of=/big bs=65536 count=128 2>/dev/null
echo BIG-MD5=$(md5sum </big | cut -d' ' -f1)
head -c 4096 /dev/hwrng >/tmp/r1
head -c 4096 /dev/hwrng >/tmp/r2
echo RNG-BYTES=$(wc -c </tmp/r1)
echo RNG-DISTINCT=$(od -An -v -tx1 /tmp/r1 | tr -s ' ' '\n' | grep . | sort -u | wc -l)
cmp -s /tmp/r1 /tmp/r2 && echo RNG-REPEATS=yes || echo RNG-REPEATS=no
echo RNG-CURRENT=$(cat /sys/class/misc/hw_random/rng_current)
echo SCRIPT-DONE
"#
    ));
    let second = guest_cmdline(&format!(
        r#"{GUEST_ROOT_PROBE}echo PERSIST=$(cat /persist)
echo BIG-MD5=$(md5sum </big | cut -d' ' -f1)
echo VDB-SERIAL=$(cat /sys/block/vdb/serial)
echo VDB-SIZE=$(cat /sys/block/vdb/size)
echo SCRIPT-DONE
"#
    ));
    let script = format!(
        r#"
CASE_TIMEOUT=150
cp "$FILES/rootfs.ext4" "$WORK/root.ext4"
truncate -s 3M "$WORK/extra.img"
flint_case first_boot "$FLINT" boot --kernel "$BZIMAGE" --rootfs "$WORK/root.ext4" --cmdline {first}
flint_case fsck_after_first "$FILES/e2fsck" -fn "$WORK/root.ext4"
# The root disk comes first in the guest whatever the order of the options.
flint_case second_boot "$FLINT" boot --kernel "$VMLINUX" --disk "$WORK/extra.img,id=extra-disk" \
    --rootfs "$WORK/root.ext4" --cmdline {second}
flint_case fsck_after_second "$FILES/e2fsck" -fn "$WORK/root.ext4"

# The plain flag with the default command line: the kernel runs /sbin/init of the image, which
# offers a shell; type into it through flint's stdin, then exit (the guest reboots).
(
    i=0
    while [ $i -lt 120 ] && ! grep -q 'flint demo guest' "$WORK/demo_shell.out" 2>/dev/null; do
        sleep 1
        i=$((i + 1))
    done
    printf 'echo DEMO-$((6 * 7)) $(cat /persist)\n'
    sleep 1
    printf 'exit\n'
) | flint_case_stdin demo_shell "$FLINT" boot --kernel "$BZIMAGE" --rootfs "$WORK/root.ext4"
"#
    );
    let started = Instant::now();
    let run = run_scenario_with(
        &script,
        &[
            (rootfs, "rootfs.ext4"),
            (PathBuf::from("/sbin/e2fsck"), "e2fsck"),
        ],
        &options(900),
    );
    println!(
        "rootfs scenario done after {:?} (including any wait for other scenarios)",
        started.elapsed()
    );
    run.assert_ok();

    let first = run.case("first_boot");
    assert_script_ran(&first);
    for boot in [&first, &run.case("second_boot")] {
        assert_eq!(
            boot.value_of("ROOT-DEV"),
            boot.value_of("VDA-DEV"),
            "/ is not mounted from /dev/vda\n{}",
            boot.show()
        );
        assert_eq!(boot.value_of("ROOT-FSTYPE"), "ext4", "{}", boot.show());
        assert!(
            boot.value_of("ROOT-OPTS").starts_with("rw"),
            "/ is not mounted read-write\n{}",
            boot.show()
        );
        assert!(
            boot.value_of("ROOT-MOUNTS").contains(" / ext4 rw"),
            "/proc/mounts does not show a read-write ext4 root\n{}",
            boot.show()
        );
        assert_eq!(
            boot.value_of("ROOT-ARGS"),
            "root=/dev/vda rw",
            "the guest's /proc/cmdline lacks flint's root=/dev/vda rw\n{}",
            boot.show()
        );
    }
    assert_eq!(first.value_of("ROOT-WRITABLE"), "yes", "{}", first.show());
    let big_md5 = first.value_of("BIG-MD5");
    assert_md5("md5 of /big", big_md5);

    // Entropy: 4096 bytes from virtio-rng, which look random.
    assert_eq!(first.value_of("RNG-BYTES"), "4096", "{}", first.show());
    let distinct: u32 = first.value_of("RNG-DISTINCT").parse().unwrap();
    assert!(
        distinct >= 200,
        "4096 bytes from /dev/hwrng hold only {distinct} distinct byte values\n{}",
        first.show()
    );
    assert_eq!(
        first.value_of("RNG-REPEATS"),
        "no",
        "two reads of /dev/hwrng gave the same bytes\n{}",
        first.show()
    );
    assert!(
        first.value_of("RNG-CURRENT").starts_with("virtio_rng"),
        "the guest's hw_random device is not virtio-rng\n{}",
        first.show()
    );

    for name in ["fsck_after_first", "fsck_after_second"] {
        let fsck = run.case(name);
        assert_eq!(
            fsck.status,
            0,
            "e2fsck -fn finds the root file system damaged or unclean after a guest boot\n{}",
            fsck.show()
        );
    }

    let second = run.case("second_boot");
    assert_script_ran(&second);
    assert_eq!(
        second.value_of("PERSIST"),
        token,
        "a file written in the first boot did not survive\n{}",
        second.show()
    );
    assert_eq!(
        second.value_of("BIG-MD5"),
        big_md5,
        "an 8 MiB file written in the first boot reads back differently\n{}",
        second.show()
    );
    assert_eq!(
        second.value_of("VDB-SERIAL"),
        "extra-disk",
        "{}",
        second.show()
    );
    assert_eq!(second.value_of("VDB-SIZE"), "6144", "{}", second.show());

    let demo = run.case("demo_shell");
    assert_clean_boot(&demo);
    assert!(
        demo.stdout.contains("ext4 root on /dev/vda"),
        "the default command line did not reach the rootfs demo shell\n{}",
        demo.show()
    );
    assert!(
        demo.stdout
            .lines()
            .any(|l| l.trim() == format!("DEMO-42 {token}")),
        "the demo shell did not run the typed command on the persisted root\n{}",
        demo.show()
    );
}

/// 64 MiB of random data written by the guest reaches the image file byte for byte and reads
/// back in a new boot; data the guest synced survives `kill -9` of flint.
#[test]
fn guest_writes_reach_the_image_file() {
    const MIB: usize = 1 << 20;
    let write = guest_cmdline(
        r#"t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/urandom of=/tmp/data bs=1M count=64 2>/dev/null
echo WRITTEN-MD5=$(md5sum </tmp/data | cut -d' ' -f1)
t1=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/data of=/dev/vda bs=1M conv=fsync 2>/dev/null
t2=$(cut -d' ' -f1 /proc/uptime)
echo WRITE-SECS=$t0 $t1 $t2
rm /tmp/data
echo 3 >/proc/sys/vm/drop_caches
echo REREAD-MD5=$(md5sum </dev/vda | cut -d' ' -f1)
echo SCRIPT-DONE
"#,
    );
    let read = guest_cmdline(
        r#"echo VDA-SIZE=$(cat /sys/block/vda/size)
echo READ-MD5=$(md5sum </dev/vda | cut -d' ' -f1)
echo SCRIPT-DONE
"#,
    );
    // 4 MiB at offset 1 MiB of an 8 MiB disk, fsync'ed; then the guest waits to be killed.
    let durable = guest_cmdline(
        r#"head -c 4194304 /dev/urandom >/tmp/p
echo PATTERN-MD5=$(md5sum </tmp/p | cut -d' ' -f1)
dd if=/tmp/p of=/dev/vda bs=1M seek=1 conv=fsync && echo DURABLE-SYNCED
sleep 1000
"#,
    );
    let script = format!(
        r#"
CASE_TIMEOUT=300
md5() {{ md5sum | cut -d' ' -f1; }}
truncate -s 64M "$WORK/data.img"
echo "HOST zeros64=$(md5 <"$WORK/data.img")"
t0=$(date +%s)
flint_case write_64m "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRAMFS" --memory 256 \
    --disk "$WORK/data.img" --cmdline {write}
echo "HOST write_secs=$(($(date +%s) - t0))"
echo "HOST after_write=$(md5 <"$WORK/data.img")"
echo "HOST size_after_write=$(wc -c <"$WORK/data.img")"
t0=$(date +%s)
flint_case read_64m "$FLINT" boot --kernel "$VMLINUX" --initrd "$INITRAMFS" --disk "$WORK/data.img" --cmdline {read}
echo "HOST read_secs=$(($(date +%s) - t0))"
echo "HOST after_read=$(md5 <"$WORK/data.img")"

# Durability: flint in the background, killed with SIGKILL once the guest says its fsync
# returned.
truncate -s 8M "$WORK/durable.img"
"$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRAMFS" --disk "$WORK/durable.img" --cmdline {durable} \
    </dev/null >"$WORK/durable.out" 2>"$WORK/durable.err" &
pid=$!
i=0
while [ $i -lt 300 ] && ! grep -q '^DURABLE-SYNCED' "$WORK/durable.out"; do
    kill -0 $pid 2>/dev/null || break
    sleep 0.5
    i=$((i + 1))
done
kill -9 $pid
wait $pid
_flint_case_report durable $?
echo "HOST durable_region=$(dd if="$WORK/durable.img" bs=1M skip=1 count=4 2>/dev/null | md5)"
echo "HOST durable_before=$(dd if="$WORK/durable.img" bs=1M count=1 2>/dev/null | md5)"
echo "HOST durable_after=$(dd if="$WORK/durable.img" bs=1M skip=5 count=1 2>/dev/null | md5)"
echo "HOST durable_size=$(wc -c <"$WORK/durable.img")"
"#
    );
    let started = Instant::now();
    let run = run_scenario_with(&script, &[], &options(900));
    println!(
        "data scenario done after {:?} (including any wait for other scenarios)",
        started.elapsed()
    );
    run.assert_ok();
    println!(
        "64 MiB guest write+sync+reread boot: {} s, read-back boot: {} s",
        run.host_value("write_secs"),
        run.host_value("read_secs")
    );

    let write = run.case("write_64m");
    assert_script_ran(&write);
    let times: Vec<f64> = write
        .value_of("WRITE-SECS")
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    if let [t0, t1, t2] = times[..] {
        println!(
            "in the guest: 64 MiB from /dev/urandom to tmpfs + md5sum {:.2} s, dd to the disk \
             with conv=fsync {:.2} s",
            t1 - t0,
            t2 - t1
        );
    }
    let written = write.value_of("WRITTEN-MD5");
    assert_md5("md5 of the data the guest wrote", written);
    assert_ne!(
        written,
        md5_of_zeros(64 * MIB),
        "the guest wrote zeros, not random data\n{}",
        write.show()
    );
    assert_eq!(run.host_value("zeros64"), md5_of_zeros(64 * MIB));
    assert_eq!(
        run.host_value("after_write"),
        written,
        "the image file does not hold the 64 MiB the guest wrote\n{}",
        write.show()
    );
    assert_eq!(
        run.host_value("size_after_write"),
        (64 * MIB).to_string(),
        "the image file changed size"
    );
    assert_eq!(
        write.value_of("REREAD-MD5"),
        written,
        "re-reading the disk in the same boot (caches dropped) gives other data\n{}",
        write.show()
    );

    let read = run.case("read_64m");
    assert_script_ran(&read);
    assert_eq!(read.value_of("VDA-SIZE"), "131072", "{}", read.show());
    assert_eq!(
        read.value_of("READ-MD5"),
        written,
        "a new boot reads back other data than was written\n{}",
        read.show()
    );
    assert_eq!(
        run.host_value("after_read"),
        written,
        "reading the disk changed the image file"
    );

    let durable = run.case("durable");
    assert!(
        durable.stdout.lines().any(|l| l.trim() == "DURABLE-SYNCED"),
        "the guest never reported its fsync'ed write\n{}",
        durable.show()
    );
    assert_eq!(
        durable.status,
        137,
        "flint should have been running until killed with SIGKILL (status 137)\n{}",
        durable.show()
    );
    let pattern = durable.value_of("PATTERN-MD5");
    assert_md5("md5 of the durable pattern", pattern);
    assert_eq!(
        run.host_value("durable_region"),
        pattern,
        "after kill -9 the image does not hold the 4 MiB the guest had fsync'ed\n{}",
        durable.show()
    );
    assert_eq!(
        run.host_value("durable_before"),
        md5_of_zeros(MIB),
        "the MiB before the written region changed"
    );
    assert_eq!(
        run.host_value("durable_after"),
        md5_of_zeros(MIB),
        "the MiB after the written region changed"
    );
    assert_eq!(run.host_value("durable_size"), (8 * MIB).to_string());
}

/// A read-only disk refuses writes and its file stays unchanged; four disks show up in order
/// with their sizes and ids.
#[test]
fn disk_options_ro_ids_and_sizes() {
    // vda: read-write 2 MiB (the control), vdb: read-only 1 MiB of random data.
    let ro = guest_cmdline(
        r#"echo VDA-RO=$(cat /sys/block/vda/ro)
echo VDB-RO=$(cat /sys/block/vdb/ro)
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync
echo RO-WRITE=$?
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 seek=8 oflag=direct
echo RO-DIRECT-WRITE=$?
echo RO-MD5=$(md5sum </dev/vdb | cut -d' ' -f1)
head -c 4096 /dev/urandom >/tmp/b
dd if=/tmp/b of=/dev/vda bs=4096 seek=3 conv=fsync
echo RW-WRITE=$?
echo RW-MD5=$(md5sum </tmp/b | cut -d' ' -f1)
echo SCRIPT-DONE
"#,
    );
    let four = guest_cmdline(
        r#"for d in vda vdb vdc vdd; do
echo $d-SIZE=$(cat /sys/block/$d/size)
echo $d-SERIAL=$(cat /sys/block/$d/serial)
echo $d-RO=$(cat /sys/block/$d/ro)
done
echo DISKS=$(ls /sys/block | grep vd | tr '\n' ' ')
echo VDD-MD5=$(md5sum </dev/vdd | cut -d' ' -f1)
echo SCRIPT-DONE
"#,
    );
    let script = format!(
        r#"
CASE_TIMEOUT=150
md5() {{ md5sum | cut -d' ' -f1; }}
head -c 1048576 /dev/urandom >"$WORK/ro.img"
truncate -s 2M "$WORK/rw.img"
echo "HOST ro_before=$(md5 <"$WORK/ro.img")"
flint_case ro_disk "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRAMFS" \
    --disk "$WORK/rw.img" --disk "$WORK/ro.img,ro" --cmdline {ro}
echo "HOST ro_after=$(md5 <"$WORK/ro.img")"
echo "HOST rw_block3=$(dd if="$WORK/rw.img" bs=4096 skip=3 count=1 2>/dev/null | md5)"

truncate -s 1M "$WORK/a.img"
truncate -s 2M "$WORK/b.img"
truncate -s 3M "$WORK/c.img"
# Not a multiple of 4 KiB: 2049 sectors, the last one partly random.
head -c 1049088 /dev/urandom >"$WORK/d.img"
echo "HOST d_md5=$(md5 <"$WORK/d.img")"
flint_case four_disks "$FLINT" boot --kernel "$VMLINUX" --initrd "$INITRAMFS" \
    --disk "$WORK/a.img,id=alpha" --disk "$WORK/b.img,id=bravo-2" \
    --disk "$WORK/c.img,ro,id=charlie.3" --disk "$WORK/d.img,id=delta-has-20-chars!!" --cmdline {four}
"#
    );
    let started = Instant::now();
    let run = run_scenario_with(&script, &[], &options(900));
    println!(
        "options scenario done after {:?} (including any wait for other scenarios)",
        started.elapsed()
    );
    run.assert_ok();

    let ro = run.case("ro_disk");
    assert_script_ran(&ro);
    assert_eq!(ro.value_of("VDA-RO"), "0", "{}", ro.show());
    assert_eq!(
        ro.value_of("VDB-RO"),
        "1",
        "the ,ro disk is not read-only in the guest\n{}",
        ro.show()
    );
    assert_ne!(
        ro.value_of("RO-WRITE"),
        "0",
        "a write to the read-only disk succeeded\n{}",
        ro.show()
    );
    assert_ne!(
        ro.value_of("RO-DIRECT-WRITE"),
        "0",
        "an O_DIRECT write to the read-only disk succeeded\n{}",
        ro.show()
    );
    let ro_before = run.host_value("ro_before");
    assert_md5("md5 of ro.img", ro_before);
    assert_eq!(
        run.host_value("ro_after"),
        ro_before,
        "the read-only disk's image file changed"
    );
    assert_eq!(
        ro.value_of("RO-MD5"),
        ro_before,
        "the guest reads other data from the read-only disk than the file holds\n{}",
        ro.show()
    );
    // The control: the read-write disk next to it takes the same kind of write.
    assert_eq!(ro.value_of("RW-WRITE"), "0", "{}", ro.show());
    assert_eq!(
        run.host_value("rw_block3"),
        ro.value_of("RW-MD5"),
        "a write to the read-write disk did not reach its image file\n{}",
        ro.show()
    );

    let four = run.case("four_disks");
    assert_script_ran(&four);
    assert_eq!(
        four.value_of("DISKS"),
        "vda vdb vdc vdd",
        "the guest should see exactly four disks\n{}",
        four.show()
    );
    let expected = [
        ("vda", "2048", "alpha", "0"),
        ("vdb", "4096", "bravo-2", "0"),
        ("vdc", "6144", "charlie.3", "1"),
        ("vdd", "2049", "delta-has-20-chars!!", "0"),
    ];
    for (disk, size, serial, ro) in expected {
        assert_eq!(
            four.value_of(&format!("{disk}-SIZE")),
            size,
            "{disk} has the wrong size (512-byte sectors)\n{}",
            four.show()
        );
        assert_eq!(
            four.value_of(&format!("{disk}-SERIAL")),
            serial,
            "{disk} has the wrong serial (id=)\n{}",
            four.show()
        );
        assert_eq!(
            four.value_of(&format!("{disk}-RO")),
            ro,
            "{disk} has the wrong read-only flag\n{}",
            four.show()
        );
    }
    let d_md5 = run.host_value("d_md5");
    assert_md5("md5 of d.img", d_md5);
    assert_eq!(
        four.value_of("VDD-MD5"),
        d_md5,
        "the guest reads other data from a 2049-sector disk than the file holds\n{}",
        four.show()
    );
}

/// A file in the temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, len: usize) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("flint-storage-{tag}-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; len]).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self, options: &str) -> String {
        format!("{}{options}", self.0.display())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bad disk arguments fail before any guest runs, with one sentence naming the problem. These
/// run on the local /dev/kvm: flint opens it before the disks, and checks disks before it
/// creates the VM.
#[test]
fn rejects_bad_disks() {
    let odd = TempFile::new("odd", 1000);
    let good = TempFile::new("good", 4096);
    let other = TempFile::new("other", 4096);

    assert_one_error(
        &["--disk", &odd.arg("")],
        &[&odd.path().display().to_string(), "512"],
    );
    assert_one_error(
        &["--rootfs", &odd.arg("")],
        &[&odd.path().display().to_string(), "512"],
    );

    let missing = "/nonexistent/flint-storage-test/disk.img";
    assert_one_error(&["--disk", missing], &[missing]);
    assert_one_error(&["--disk", &format!("{missing},ro")], &[missing]);

    let dir = std::env::temp_dir();
    assert_one_error(
        &["--disk", &dir.display().to_string()],
        &[&dir.display().to_string()],
    );

    assert_one_error(
        &["--disk", &good.arg(",root"), "--disk", &other.arg(",root")],
        &["root"],
    );
    assert_one_error(
        &["--rootfs", &good.arg(""), "--rootfs", &other.arg("")],
        &["root"],
    );

    assert_one_error(&["--disk", &good.arg(",foo")], &["foo"]);
    assert_one_error(&["--disk", "x,foo"], &["foo"]);
    assert_one_error(&["--disk", ",ro"], &["--disk"]);

    assert_one_error(
        &["--disk", &good.arg(",id=a-name-with-21-chars!")],
        &["a-name-with-21-chars!"],
    );
    assert_one_error(
        &[
            "--disk",
            &good.arg(",id=same"),
            "--disk",
            &other.arg(",id=same"),
        ],
        &["same"],
    );
}
