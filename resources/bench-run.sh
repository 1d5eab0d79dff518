#!/usr/bin/env bash
# Sandbox benchmark (not a test): latency of `flint run -- true` (start to exit) over N runs,
# and sandboxes per minute with P running in parallel. Where the local /dev/kvm cannot boot
# Linux (PVM), the runs happen inside the nested KVM host; timings there are only comparable
# with other timings taken in the same rig.
#
# usage: resources/bench-run.sh [-n RUNS] [-p PARALLEL] [--rounds R]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=50
parallel=8
rounds=3
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    -p) parallel=${2:?}; shift ;;
    --rounds) rounds=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done

"$here/build-guest-kernel.sh"
"$here/build-sandbox-image.sh"
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet)
flint=$here/../target/release/flint
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# busybox has no date +%N: /proc/uptime gives centiseconds, enough for runs of seconds.
cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
R="\$BIN/flint run --kernel \$BIN/vmlinux --image \$BIN/sandbox.cpio.gz"
now() { cut -d' ' -f1 /proc/uptime; }
i=0
while [ \$i -lt $runs ]; do
    t0=\$(now); \$R -- true </dev/null || { echo "BENCH-FAILED run \$i"; exit 1; }
    t1=\$(now); echo "BENCH run \$t0 \$t1"
    i=\$((i + 1))
done
r=0
while [ \$r -lt $rounds ]; do
    t0=\$(now)
    j=0
    while [ \$j -lt $parallel ]; do \$R -- true </dev/null >/dev/null 2>&1 & j=\$((j + 1)); done
    fails=0
    for pid in \$(jobs -p); do wait \$pid || fails=\$((fails + 1)); done
    t1=\$(now); echo "BENCH round \$t0 \$t1 \$fails"
    r=\$((r + 1))
done
SCENARIO

if [ -e /sys/module/kvm_pvm ] || [ ! -e /dev/kvm ]; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo 'BIN=/bench'; cat "$work/scenario.sh"; } >"$work/nested.sh"
    "$here/nested-host/run.sh" --timeout $((300 + 20 * runs + 60 * rounds)) --scenario "$work/nested.sh" \
        --add "$flint:/bench/flint" --add "$FLINT_CACHE/guest/vmlinux:/bench/vmlinux" \
        --add "$FLINT_CACHE/sandbox/initramfs.cpio.gz:/bench/sandbox.cpio.gz" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin"
    cp "$flint" "$FLINT_CACHE/guest/vmlinux" "$work/bin/"
    cp "$FLINT_CACHE/sandbox/initramfs.cpio.gz" "$work/bin/sandbox.cpio.gz"
    BIN=$work/bin sh "$work/scenario.sh" >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

tr -d '\r' <"$work/out" >"$work/clean"
echo "flint run benchmark, $(date -u +%Y-%m-%d): $runs sequential runs, $rounds rounds of $parallel in parallel"
echo "where: $where"
sed -n 's/.*BENCH run \([0-9.]*\) \([0-9.]*\)$/\1 \2/p' "$work/clean" | awk '{ print ($2 - $1) * 1000 }' |
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "no samples"; exit 1 }
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        p95 = v[int(NR * 0.95 + 0.999)]
        printf "flint run -- true, start to exit       median %6.0f ms   p95 %6.0f   min %6.0f   max %6.0f   (n=%d)\n", med, p95, v[1], v[NR], NR }'
sed -n 's/.*BENCH round \([0-9.]*\) \([0-9.]*\) \([0-9]*\)$/\1 \2 \3/p' "$work/clean" |
    awk -v p="$parallel" '{ secs = $2 - $1; total += secs; n++; fails += $3 } END {
        if (n == 0) { print "no rounds"; exit 1 }
        printf "%d in parallel: %.1f s per round, %.0f sandboxes per minute, %d failed (n=%d rounds)\n", p, total / n, 60 * p * n / total, fails, n }'
