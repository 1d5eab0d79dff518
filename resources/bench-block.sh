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
# Then the same commands run on the host side against the same image file, and the
# guest/host ratio is printed.
#
# usage: resources/bench-block.sh [-n RUNS] [--disk-mib MIB] [--reads N]
#   RUNS measured rounds (default 3) after one warm-up round; medians and spreads are printed
#   (BENCH_RAW=1 also prints every sample)
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
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --disk-mib) disk_mib=${2:?}; shift ;;
    --reads) reads=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done

ensure_packages gcc libc6-dev
"$here/build-guest-kernel.sh"
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

guest_script='mkdir /tmp/t && tar -xf /dev/vdb -C /tmp/t && sh /tmp/t/io-bench.sh /dev/vda guest'
cmdline="console=ttyS0 reboot=k panic=1 pci=off acpi=off quiet flint.exec=$(printf '%s' "$guest_script" | base64 -w0)"

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
# Runs in the benchmark host (nested or direct); \$BIN points at the files, \$TMPD is scratch.
img=\$TMPD/bench-disk.img
rm -f "\$img"
dd if=/dev/zero of="\$img" bs=1M count=$disk_mib 2>/dev/null
\$BIN/flint boot --kernel \$BIN/bzImage --initrd \$BIN/initramfs.cpio.gz --memory 256 \\
    --disk "\$img" --disk "\$BIN/tools.tar,ro" --cmdline "$cmdline" </dev/null >\$TMPD/guest.out 2>\$TMPD/guest.err || {
    echo "BENCH-FAILED flint"; cat \$TMPD/guest.out \$TMPD/guest.err; exit 1; }
grep -E '^(BENCH|WARMUP)' \$TMPD/guest.out
mkdir -p \$TMPD/tools
tar -xf \$BIN/tools.tar -C \$TMPD/tools
sh \$TMPD/tools/io-bench.sh "\$img" host
rm -f "\$img"
SCENARIO

if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    {
        echo 'BIN=/bench; TMPD=/tmp'
        cat "$work/scenario.sh"
    } >"$work/nested.sh"
    "$here/nested-host/run.sh" --timeout $((300 + 240 * runs)) --mem $((2048 + disk_mib * 2)) \
        --scenario "$work/nested.sh" \
        --add "$flint:/bench/flint" --add "$guest/bzImage:/bench/bzImage" \
        --add "$guest/initramfs.cpio.gz:/bench/initramfs.cpio.gz" \
        --add "$work/tools.tar:/bench/tools.tar" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores; host-side files on tmpfs"
else
    mkdir -p "$work/bin"
    cp "$flint" "$guest/bzImage" "$guest/initramfs.cpio.gz" "$work/tools.tar" "$work/bin/"
    BIN=$work/bin TMPD=$work sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM; image in $work"
fi

tr -d "\r" <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH-FAILED' "$work/clean"; then
    cat "$work/clean"
    die "a measurement failed (see above)"
fi

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

echo "flint block benchmark: ${disk_mib} MiB virtio-blk disk (raw file), $runs runs, busybox dd + randread ($reads reads), $(date -u +%Y-%m-%d)"
echo "where: $where"
echo "guest: project 6.1 kernel, 1 vCPU, 256 MiB, initramfs root; flint release build"
printf '%-26s %14s %16s %14s %16s %8s\n' metric "guest median" "(min-max)" "host median" "(min-max)" "g/h"
for metric in seq_write_MiBps seq_read_direct_MiBps seq_read_buffered_MiBps rand_read_4k_IOPS; do
    g=$(median guest $metric)
    h=$(median host $metric)
    ratio=$(awk -v g="$g" -v h="$h" 'BEGIN { if (g + 0 > 0 && h + 0 > 0) printf "%.3g", g / h; else print "n/a" }')
    printf '%-26s %14s %16s %14s %16s %8s\n' "$metric" "$g" "($(spread guest $metric))" "$h" "($(spread host $metric))" "$ratio"
done
gm=$(mode guest rand_read_4k_IOPS)
hm=$(mode host rand_read_4k_IOPS)
echo "random reads: guest ${gm:-?} I/O on /dev/vda, host ${hm:-?} I/O on the image file"
