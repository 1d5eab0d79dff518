#!/usr/bin/env bash
# Block I/O benchmark (not a test): a guest with a data disk measures, from inside, with
# busybox dd
#   - sequential write: dd bs=1M from /dev/zero to the disk, conv=fsync (page cache +
#     writeback + flush, as an application sees it),
#   - sequential read: dd bs=1M iflag=direct (O_DIRECT: every byte comes through virtio-blk),
#     and buffered after dropping the guest's caches (with the kernel's readahead),
#   - 4 KiB random reads: busybox has no fio, and a shell loop of `dd skip=$RANDOM` would
#     measure process start-up, not the disk; so a tiny C program built here (`randread`:
#     pread(2) of 4 KiB at random aligned offsets, O_DIRECT when the file allows it) is
#     shipped to the guest on a second, read-only disk (a tar archive).
# The same guest (kernel, initramfs, command line, 1 vCPU, 256 MiB) does this under flint and,
# when their binaries are in --peers (default ../shared/peers), under Firecracker (`--no-api
# --config-file`, two `drives`) and Cloud Hypervisor (`--disk path=...`, its defaults), each on
# the same raw image file, BOOTS boots per VMM with the order rotating. Then the same commands
# run on the host side against the same image file, and the ratios are printed.
#
# Cloud Hypervisor has virtio over PCI only, which the project's guest kernel leaves out; with
# cloud-hypervisor in --vmms every VMM boots the kernel of build-guest-kernel-pci.sh (the same
# kernel plus virtio-pci; flint and Firecracker with pci=off as always, so for them it is the
# default kernel). Cloud Hypervisor restarts a guest that resets, so it is stopped once its
# guest has printed its exit marker. Which of the guest's two disks holds the tools is found
# by content, as the VMMs need not name them in the same order.
#
# usage: resources/bench-block.sh [-n RUNS] [--disk-mib MIB] [--reads N] [--boots B]
#                                 [--vmms LIST] [--peers DIR]
#   RUNS measured rounds (default 3) per boot after one warm-up round; medians and spreads
#   of all boots' rounds are printed (BENCH_RAW=1 also prints every sample)
#   --vmms LIST: comma-separated, from flint, firecracker, cloud-hypervisor (default: flint and
#   the peers found in --peers)
#
# Where the local /dev/kvm cannot boot Linux (PVM), everything happens inside the nested KVM
# host (resources/nested-host/run.sh); its "host side" is then that VM, whose files live in
# RAM (tmpfs, which refuses O_DIRECT, so host-side reads are page-cache reads). Timings there
# are only comparable with other timings taken in the same rig.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=3
disk_mib=256
reads=5000
boots=1
vmms=
peers=$here/../../shared/peers
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --disk-mib) disk_mib=${2:?}; shift ;;
    --reads) reads=${2:?}; shift ;;
    --boots) boots=${2:?}; shift ;;
    --vmms) vmms=${2:?}; shift ;;
    --peers) peers=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done

for v in "$runs" "$disk_mib" "$reads" "$boots"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || die "counts and sizes are positive integers, got '$v'"
done
if [ -z "$vmms" ]; then
    vmms=flint
    for p in firecracker cloud-hypervisor; do [ ! -x "$peers/$p" ] || vmms=$vmms,$p; done
fi
for v in ${vmms//,/ }; do
    case $v in
    flint) ;;
    firecracker | cloud-hypervisor) [ -x "$peers/$v" ] || die "no $v binary in $peers (--peers)" ;;
    *) die "unknown VMM '$v' in --vmms (flint, firecracker, cloud-hypervisor)" ;;
    esac
done

ensure_packages gcc libc6-dev
kernel_dir=$FLINT_CACHE/guest
if [[ ,$vmms, == *,cloud-hypervisor,* ]]; then
    "$here/build-guest-kernel-pci.sh"
    kernel_dir=$FLINT_CACHE/pci/guest
else
    "$here/build-guest-kernel.sh"
fi
"$here/build-guest-initramfs.sh"
log "building flint (release)"
(cd "$repo" && cargo build --release --quiet)
flint=${CARGO_TARGET_DIR:-$repo/target}/release/flint
[ -x "$flint" ] || die "flint binary not found at $flint"
guest=$FLINT_CACHE/guest

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tools"

# randread FILE BLOCK_BYTES COUNT: COUNT preads of BLOCK_BYTES at random BLOCK-aligned
# offsets; prints "RANDREAD <iops> <MiB/s> <direct|buffered>".
cat >"$work/randread.c" <<'C'
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: randread FILE BLOCK_BYTES COUNT\n");
        return 2;
    }
    long bs = atol(argv[2]), count = atol(argv[3]);
    const char *mode = "direct";
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        mode = "buffered";
        fd = open(argv[1], O_RDONLY);
    }
    if (fd < 0 || bs <= 0 || count <= 0) {
        perror(argv[1]);
        return 1;
    }
    off_t blocks = lseek(fd, 0, SEEK_END) / bs;
    void *buf;
    if (blocks <= 0 || posix_memalign(&buf, 4096, bs)) {
        fprintf(stderr, "randread: %s is too small or out of memory\n", argv[1]);
        return 1;
    }
    uint64_t x = 0x9e3779b97f4a7c15ull;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (pread(fd, buf, bs, (off_t)(x % blocks) * bs) != bs) {
            perror("randread: pread");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("RANDREAD %.0f %.1f %s\n", count / secs, count * (double)bs / secs / 1048576, mode);
    return 0;
}
C
gcc -O2 -static -o "$work/tools/randread" "$work/randread.c" || die "cannot build randread"

# io-bench.sh TARGET LABEL: the measurements, as "BENCH LABEL METRIC VALUE" lines. The same
# script runs in the guest (TARGET /dev/vda) and on the host side (TARGET the image file).
cat >"$work/tools/io-bench.sh" <<SH
target=\$1
label=\$2
dir=\$(dirname "\$0")
now() { cut -d' ' -f1 /proc/uptime; }
rate() { awk -v a="\$1" -v b="\$2" -v mib=$disk_mib 'BEGIN { if (b > a) printf "%.1f", mib / (b - a); else print "inf" }'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; }
# Round 0 warms up (TCG translates the code paths once) and is reported as WARMUP.
tag() { if [ \$r -eq 0 ]; then echo WARMUP; else echo BENCH; fi; }
r=0
while [ \$r -le $runs ]; do
    drop
    t0=\$(now)
    dd if=/dev/zero of="\$target" bs=1M count=$disk_mib conv=fsync,notrunc 2>/dev/null || echo "BENCH-FAILED \$label write"
    t1=\$(now)
    echo "\$(tag) \$label seq_write_MiBps \$(rate \$t0 \$t1)"
    drop
    t0=\$(now)
    if dd if="\$target" of=/dev/null bs=1M iflag=direct 2>/dev/null; then
        t1=\$(now)
        echo "\$(tag) \$label seq_read_direct_MiBps \$(rate \$t0 \$t1)"
    else
        echo "\$(tag) \$label seq_read_direct_MiBps n/a"
    fi
    drop
    t0=\$(now)
    dd if="\$target" of=/dev/null bs=1M 2>/dev/null || echo "BENCH-FAILED \$label read"
    t1=\$(now)
    echo "\$(tag) \$label seq_read_buffered_MiBps \$(rate \$t0 \$t1)"
    drop
    set -- \$("\$dir/randread" "\$target" 4096 $reads)
    [ "\$1" = RANDREAD ] || echo "BENCH-FAILED \$label randread"
    echo "\$(tag) \$label rand_read_4k_IOPS \$2 (\$4)"
    r=\$((r + 1))
done
SH

# The tools go to the guest as a tar archive on a disk (GNU tar pads it to 10 KiB records,
# a multiple of 512 bytes).
tar -cf "$work/tools.tar" -C "$work/tools" .

# The guest finds its tools on whichever disk has them (an all-zero disk is an empty archive).
guest_script='mkdir /tmp/t && for d in vdb vda; do tar -xf /dev/$d -C /tmp/t 2>/dev/null; [ -f /tmp/t/io-bench.sh ] && break; done
[ -f /tmp/t/io-bench.sh ] || { echo "BENCH-FAILED no disk holds the tools"; exit 1; }
data=/dev/vda; [ $d = vda ] && data=/dev/vdb
sh /tmp/t/io-bench.sh $data $L'
cmdline_of() { # VMM: the command line, telling the guest which VMM it runs under
    local c="console=ttyS0 reboot=k panic=1 pci=off acpi=off quiet"
    [ "$1" != cloud-hypervisor ] || c="console=ttyS0 reboot=k panic=1 acpi=off quiet"
    printf '%s flint.exec=%s' "$c" "$(printf 'L=%s\n%s' "$1" "$guest_script" | base64 -w0)"
}

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
# Runs in the benchmark host (nested or direct); \$BIN points at the files, \$TMPD is scratch.
VMMS='${vmms//,/ }'
BOOTS=$boots
CMD_flint='$(cmdline_of flint)'
CMD_firecracker='$(cmdline_of firecracker)'
CMD_ch='$(cmdline_of cloud-hypervisor)'
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
img=$TMPD/bench-disk.img
rm -f "$img"
dd if=/dev/zero of="$img" bs=1M count=DISK_MIB 2>/dev/null
[ -x "$BIN/firecracker" ] && echo "BENCH-FC-VERSION $("$BIN/firecracker" --version 2>&1 | head -n1)"
[ -x "$BIN/cloud-hypervisor" ] && echo "BENCH-CH-VERSION $("$BIN/cloud-hypervisor" --version 2>&1 | head -n1)"
# boot VMM: one boot of the guest under VMM on the image; its lines on stdout.
boot() {
    out=$TMPD/guest-$1.out
    err=$TMPD/guest-$1.err
    case $1 in
    flint)
        "$BIN/flint" boot --kernel "$BIN/bzImage" --initrd "$BIN/initramfs.cpio.gz" --memory 256 \
            --disk "$img" --disk "$BIN/tools.tar,ro" --cmdline "$CMD_flint" </dev/null >"$out" 2>"$err"
        status=$?
        ;;
    firecracker)
        cat >"$TMPD/fc.json" <<FC_JSON
{"boot-source": {"kernel_image_path": "$BIN/bzImage", "initrd_path": "$BIN/initramfs.cpio.gz",
                 "boot_args": "$CMD_firecracker"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
 "drives": [{"drive_id": "data", "path_on_host": "$img", "is_root_device": false,
             "is_read_only": false},
            {"drive_id": "tools", "path_on_host": "$BIN/tools.tar", "is_root_device": false,
             "is_read_only": true}]}
FC_JSON
        "$BIN/firecracker" --no-api --config-file "$TMPD/fc.json" --level Error \
            </dev/null >"$out" 2>"$err"
        # its exit status on the guest's reset is not 0; the guest's marker says it all
        status=0
        ;;
    cloud-hypervisor)
        "$BIN/cloud-hypervisor" --kernel "$BIN/vmlinux" --initramfs "$BIN/initramfs.cpio.gz" \
            --cmdline "$CMD_ch" --cpus boot=1 --memory size=256M \
            --disk path="$img" path="$BIN/tools.tar,readonly=on" \
            --serial tty --console off </dev/null >"$out" 2>"$err" &
        pid=$!
        i=0
        while [ $i -lt 900 ] && ! grep -q FLINT-GUEST-EXIT "$out" 2>/dev/null && kill -0 $pid 2>/dev/null; do
            sleep 1
            i=$((i + 1))
        done
        kill $pid 2>/dev/null
        wait $pid
        status=0
        ;;
    esac
    if [ $status -ne 0 ] || ! grep -q 'FLINT-GUEST-EXIT 0' "$out"; then
        echo "BENCH-FAILED $1 (status $status)"
        cat "$out" "$err"
        return 1
    fi
    tr -d '\r' <"$out" | grep -E '^(BENCH|WARMUP)'
}
set -- $VMMS
n=$#
r=0
while [ $r -lt "$BOOTS" ]; do
    k=0
    while [ $k -lt $n ]; do
        j=$(((r + k) % n + 1))
        eval "boot \${$j}" || exit 1
        k=$((k + 1))
    done
    r=$((r + 1))
done
mkdir -p $TMPD/tools
tar -xf $BIN/tools.tar -C $TMPD/tools
sh $TMPD/tools/io-bench.sh "$img" host
rm -f "$img"
SCENARIO
sed -i "s/DISK_MIB/$disk_mib/" "$work/scenario.sh"

files=("$flint:flint" "$kernel_dir/bzImage:bzImage" "$kernel_dir/vmlinux:vmlinux"
    "$guest/initramfs.cpio.gz:initramfs.cpio.gz" "$work/tools.tar:tools.tar")
for p in firecracker cloud-hypervisor; do
    [[ ,$vmms, != *,$p,* ]] || files+=("$peers/$p:$p")
done
nv=$(tr , "\n" <<<"$vmms" | wc -l)
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    {
        echo 'BIN=/bench; TMPD=/tmp'
        cat "$work/scenario.sh"
    } >"$work/nested.sh"
    adds=()
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    "$here/nested-host/run.sh" --timeout $((300 + boots * nv * (120 + 120 * runs) + 120 * runs)) \
        --mem $((2048 + disk_mib * 2)) --scenario "$work/nested.sh" "${adds[@]}" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores; host-side files on tmpfs"
else
    mkdir -p "$work/bin"
    for f in "${files[@]}"; do cp "${f%%:*}" "$work/bin/${f##*:}"; done
    BIN=$work/bin TMPD=$work sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM; image in $work"
fi

tr -d "\r" <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
# A failed step (a guest's dd that exited with an error) still has its time in the table;
# the failures are listed after it and the script then fails. A failed boot has no figures.
failed=$(grep '^BENCH-FAILED' "$work/clean" | sort | uniq -c || true)

# median LABEL METRIC: median of that metric's samples ("n/a" if there are none).
median() {
    sed -n "s/^BENCH $1 $2 \([0-9.]*\).*/\1/p" "$work/clean" | sort -n |
        awk '{ v[NR] = $1 }
            END {
                if (NR == 0) m = "n/a"
                else if (NR % 2) m = v[(NR + 1) / 2]
                else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
                print m
            }'
}
spread() {
    sed -n "s/^BENCH $1 $2 \([0-9.]*\).*/\1/p" "$work/clean" | sort -n |
        awk '{ v[NR] = $1 } END { if (NR) printf "%s-%s", v[1], v[NR] }'
}
mode() { sed -n "s/^BENCH $1 $2 [0-9.]* (\(.*\))/\1/p" "$work/clean" | head -n1; }

vmm_list=${vmms//,/ }
peers_in=
for p in firecracker cloud-hypervisor; do [[ " $vmm_list " != *" $p "* ]] || peers_in="$peers_in $p"; done
echo "flint block benchmark: ${disk_mib} MiB virtio-blk disk (raw file), $boots boot(s) per VMM x $runs runs, busybox dd + randread ($reads reads), $(date -u +%Y-%m-%d)"
echo "where: $where"
echo "guest: project 6.1 kernel ($kernel_dir), 1 vCPU, 256 MiB, initramfs root; flint release build"
[[ " $vmm_list " != *" firecracker "* ]] ||
    echo "firecracker: $(sed -n 's/.*BENCH-FC-VERSION //p' "$work/clean" | head -n1)"
[[ " $vmm_list " != *" cloud-hypervisor "* ]] ||
    echo "cloud-hypervisor: $(sed -n 's/.*BENCH-CH-VERSION //p' "$work/clean" | head -n1), virtio-pci"
echo "median (min-max) of all measured rounds; MiB/s, random reads in IOPS"
echo
{
    printf '| metric |'
    for v in $vmm_list; do printf ' %s |' "$v"; done
    printf ' host side |'
    for p in $peers_in; do printf ' flint / %s |' "$p"; done
    printf ' flint / host |\n|---|'
    for v in $vmm_list $peers_in; do printf -- '---|'; done
    printf -- '---|---|\n'
    for metric in seq_write_MiBps seq_read_direct_MiBps seq_read_buffered_MiBps rand_read_4k_IOPS; do
        printf '| %s |' "$metric"
        for v in $vmm_list host; do printf ' %s (%s) |' "$(median "$v" $metric)" "$(spread "$v" $metric)"; done
        f=$(median flint $metric)
        for p in $peers_in host; do
            awk -v g="$f" -v h="$(median "$p" $metric)" 'BEGIN { if (g + 0 > 0 && h + 0 > 0) printf " %.2fx |", g / h; else printf " n/a |" }'
        done
        echo
    done
}
gm=$(mode flint rand_read_4k_IOPS)
hm=$(mode host rand_read_4k_IOPS)
echo "random reads: guest ${gm:-?} I/O on its data disk, host ${hm:-?} I/O on the image file"
if [ -n "$failed" ]; then
    echo "FAILED steps (count, step); their times are in the table all the same:"
    echo "$failed"
    die "a measurement failed (BENCH_RAW=1 shows the raw output)"
fi
