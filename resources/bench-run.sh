#!/usr/bin/env bash
# Sandbox benchmark (not a test): latency of `flint run -- true` (start to exit) over N runs,
# and sandboxes per minute with P running in parallel: restored from the snapshot of a booted
# sandbox (the default; the first run, which boots and makes that snapshot, is reported on its
# own), booted (`--cold`), and QEMU's microvm booting the same kernel and image, with the
# command run through the same guest agent (over vhost-vsock). Where the local /dev/kvm cannot boot Linux (PVM), the runs happen inside the
# nested KVM host; timings there are only comparable with other timings taken in the same rig.
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
client=$FLINT_CACHE/sandbox/agent-client
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The other VMM: QEMU's microvm machine booting the same kernel (PVH entry) and sandbox image,
# with vhost-vsock; the same guest agent runs the command, driven over AF_VSOCK by
# agent-client. Like flint run, a run ends when the command's status is in: QEMU is then
# stopped, not waited for.
qemu=/usr/bin/qemu-system-x86_64
cmdline=$(sandbox_cmdline)

# busybox has no date +%N: /proc/uptime gives centiseconds, enough for runs of seconds.
cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
RUNS=$runs
PARALLEL=$parallel
ROUNDS=$rounds
CMDLINE='$cmdline'
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
now() { cut -d' ' -f1 /proc/uptime; }
# Where flint run keeps the snapshot of a booted sandbox: empty at first.
export FLINT_CACHE=$W/flint-cache
# once_flint N / once_cold N / once_qemu N: one sandbox running `true`; N tells parallel runs
# apart.
once_flint() {
    "$BIN/flint" run --kernel "$BIN/vmlinux" --initramfs "$BIN/sandbox.cpio.gz" -- true </dev/null
}
once_cold() {
    "$BIN/flint" run --cold --kernel "$BIN/vmlinux" --initramfs "$BIN/sandbox.cpio.gz" -- true </dev/null
}
once_qemu() {
    cid=$((3 + $1))
    "$QEMU" -M microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=off,pic=off,acpi=off \
        -enable-kvm -cpu host -m 128 -smp 1 -nodefaults -no-user-config -display none \
        -serial null -no-reboot -kernel "$BIN/vmlinux" -initrd "$BIN/sandbox.cpio.gz" \
        -append "$CMDLINE" -device vhost-vsock-device,guest-cid=$cid </dev/null &
    q=$!
    "$BIN/agent-client" vsock:$cid --timeout 60 -- true </dev/null
    rc=$?
    kill $q 2>/dev/null
    wait $q 2>/dev/null
    return $rc
}
bench() {
    vmm=$1
    echo "BENCH-VMM $vmm"
    i=0
    while [ $i -lt $RUNS ]; do
        t0=$(now)
        if once_$vmm 0 >"$W/out" 2>&1; then
            t1=$(now); echo "BENCH run $t0 $t1"
        else
            # Counted, not timed: the guest died (see the README on this rig) or flint failed.
            echo "BENCH fail $vmm run $i"; tail -n 3 "$W/out"
        fi
        i=$((i + 1))
    done
    r=0
    while [ $r -lt $ROUNDS ]; do
        t0=$(now)
        j=0
        while [ $j -lt $PARALLEL ]; do once_$vmm $j >/dev/null 2>&1 & j=$((j + 1)); done
        fails=0
        for pid in $(jobs -p); do wait $pid || fails=$((fails + 1)); done
        t1=$(now); echo "BENCH round $t0 $t1 $fails"
        r=$((r + 1))
    done
}
echo "BENCH-QEMU-VERSION $("$QEMU" --version | head -n1)"
t0=$(now)
once_flint 0 >"$W/out" 2>&1 || { echo "BENCH first run failed"; cat "$W/out"; }
t1=$(now); echo "BENCH-FIRST $t0 $t1"
bench flint
bench cold
bench qemu
SCENARIO

files=("$flint:flint" "$FLINT_CACHE/guest/vmlinux:vmlinux"
    "$FLINT_CACHE/sandbox/initramfs.cpio.gz:sandbox.cpio.gz" "$client:agent-client")
budget=$((600 + 3 * (20 * runs + 60 * rounds)))
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo "BIN=/bench; W=/tmp; QEMU=$qemu"; cat "$work/scenario.sh"; } >"$work/nested.sh"
    adds=(--add "$qemu:$qemu" --add /usr/share/qemu:/usr/share/qemu)
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    "$here/nested-host/run.sh" --timeout "$budget" --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    modprobe vhost_vsock 2>/dev/null || true
    mkdir -p "$work/bin" "$work/w"
    for f in "${files[@]}"; do ln -s "$(realpath "${f%%:*}")" "$work/bin/${f##*:}"; done
    BIN=$work/bin W=$work/w QEMU=$qemu timeout "$budget" sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

tr -d '\r' <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
echo "flint run benchmark, $(date -u +%Y-%m-%d): $runs sequential runs, $rounds rounds of $parallel in parallel"
echo "where: $where; guest: 1 vCPU, 128 MiB, the sandbox image and its agent"
echo "other VMM: $(sed -n 's/.*BENCH-QEMU-VERSION //p' "$work/clean" | head -n1), microvm, vhost-vsock, agent-client over AF_VSOCK"
first=$(sed -n 's/.*BENCH-FIRST \([0-9.]*\) \([0-9.]*\)$/\1 \2/p' "$work/clean" | awk '{ printf "%.0f", ($2 - $1) * 1000 }')
echo "flint's first run (boots, then snapshots the booted sandbox for the runs after it): ${first:-failed} ms"
echo "flint: restored from that snapshot (default); cold: flint run --cold (boots every time)"
for vmm in flint cold qemu; do
    awk -v vmm="$vmm" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" >"$work/$vmm"
    sed -n 's/.*BENCH run \([0-9.]*\) \([0-9.]*\)$/\1 \2/p' "$work/$vmm" | awk '{ print ($2 - $1) * 1000 }' |
        sort -n | awk -v vmm="$vmm" '{ v[NR] = $1 } END {
            if (NR == 0) { printf "%-5s no samples\n", vmm; exit 1 }
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            p95 = v[int(NR * 0.95 + 0.999)]
            printf "%-5s run -- true, start to exit   median %6.0f ms   p95 %6.0f   min %6.0f   max %6.0f   (n=%d)\n", vmm, med, p95, v[1], v[NR], NR }'
    echo "$vmm  sequential runs that failed: $(grep -c '^BENCH fail' "$work/$vmm")"
    sed -n 's/.*BENCH round \([0-9.]*\) \([0-9.]*\) \([0-9]*\)$/\1 \2 \3/p' "$work/$vmm" |
        awk -v p="$parallel" -v vmm="$vmm" '{ secs = $2 - $1; total += secs; n++; fails += $3 } END {
            if (n == 0) { printf "%-5s no rounds\n", vmm; exit 1 }
            printf "%-5s %d in parallel: %.1f s per round, %.0f sandboxes per minute, %d failed (n=%d rounds)\n", vmm, p, total / n, 60 * p * n / total, fails, n }'
done
