#!/usr/bin/env bash
# Boot benchmark (not a test): boots the test guest N times and prints the median and spread
# of (a) flint's process start -> guest /init (the boot-timer write) and (b) the VMM's
# resident memory beyond the guest's own pages, measured when the guest reboots.
#
# usage: resources/bench-boot.sh [-n RUNS] [--vcpus N] [--memory MIB] [--format elf|bzimage]
#
# Where the local /dev/kvm cannot boot Linux (PVM), the runs happen inside the nested KVM
# host (resources/nested-host/run.sh); timings there are only comparable with other timings
# taken in the same rig.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=10
vcpus=1
memory=128
format=elf
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --vcpus) vcpus=${2:?}; shift ;;
    --memory) memory=${2:?}; shift ;;
    --format) format=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done

"$here/build-guest-kernel.sh"
"$here/build-guest-initramfs.sh"
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet)
flint=$here/../target/release/flint
guest=$FLINT_CACHE/guest
case $format in
elf) kernel_name=vmlinux ;;
bzimage) kernel_name=bzImage ;;
*) die "--format is elf or bzimage" ;;
esac

# The guest script is empty: /init writes the boot-timer byte, then reboots at once.
cmdline="console=ttyS0 reboot=k panic=1 pci=off quiet flint.exec=$(printf 'true' | base64 -w0)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
# Runs in the benchmark host (nested or direct); \$BIN points at the files.
i=0
while [ \$i -lt $runs ]; do
    FLINT_LOG=debug \$BIN/flint boot --kernel \$BIN/$kernel_name --initrd \$BIN/initramfs.cpio.gz \\
        --vcpus $vcpus --memory $memory --cmdline "$cmdline" </dev/null >/dev/null 2>\$TMPD/err || {
        echo "BENCH-FAILED run \$i"; cat \$TMPD/err; exit 1; }
    grep -E 'guest boot time|VMM overhead' \$TMPD/err | sed 's/^/BENCH /'
    i=\$((i + 1))
done
SCENARIO

if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running $runs boots inside the nested KVM host"
    {
        echo 'BIN=/bench; TMPD=/tmp'
        cat "$work/scenario.sh"
    } >"$work/nested.sh"
    "$here/nested-host/run.sh" --timeout $((120 + 30 * runs)) --scenario "$work/nested.sh" \
        --add "$flint:/bench/flint" --add "$guest/$kernel_name:/bench/$kernel_name" \
        --add "$guest/initramfs.cpio.gz:/bench/initramfs.cpio.gz" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin"
    cp "$flint" "$guest/$kernel_name" "$guest/initramfs.cpio.gz" "$work/bin/"
    BIN=$work/bin TMPD=$work sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

# stats LABEL UNIT: median, min, max, p90 of the numbers on stdin.
stats() {
    sort -n | awk -v label="$1" -v unit="$2" '
        { v[NR] = $1 }
        END {
            if (NR == 0) { printf "%-34s no samples\n", label; exit 1 }
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            p90 = v[int(NR * 0.9 + 0.999)]
            printf "%-34s median %7.1f %s   min %7.1f   p90 %7.1f   max %7.1f   (n=%d)\n",
                label, med, unit, v[1], p90, v[NR], NR
        }'
}

tr -d "\r" <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
echo "flint boot benchmark: $runs boots, $format kernel, $vcpus vCPU(s), $memory MiB, $(date -u +%Y-%m-%d)"
echo "where: $where"
sed -n 's/.*BENCH flint: guest boot time: \([0-9]*\) ms$/\1/p' "$work/clean" |
    stats "process start -> guest /init" ms
sed -n 's/.*BENCH flint: debug: memory: VMM overhead \([0-9]*\) KiB.*/\1/p' "$work/clean" |
    awk '{ print $1 / 1024 }' | stats "VMM memory beyond guest RAM" MiB
