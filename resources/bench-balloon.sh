#!/usr/bin/env bash
# Memory benchmark (not a test): the host memory (flint's resident set, summed) of N idle
# sandboxes of 256 MiB, with free page reporting (flint run's default) and without
# (--no-page-reporting): right after they started, and after each wrote and deleted 64 MiB
# in its RAM file system (as a build or a download would). Sandboxes restore the snapshot of a
# booted sandbox (one per mode, made by a first run). Where the local /dev/kvm cannot boot
# Linux (PVM), the sandboxes run inside the nested KVM host.
#
# usage: resources/bench-balloon.sh [-n SANDBOXES]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

count=10
while (($#)); do
    case $1 in
    -n) count=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done

"$here/build-guest-kernel.sh"
"$here/build-sandbox-image.sh"
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet -p flint --bin flint)
flint=$here/../target/release/flint
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
N=$count
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
export FLINT_CACHE=$W/flint-cache
run() { # mode command: one sandbox (exec: in the background, $! is flint itself)
    opt=
    [ "$1" = keep ] && opt=--no-page-reporting
    exec "$BIN/flint" run $opt --memory 256 --kernel "$BIN/vmlinux" \
        --initramfs "$BIN/sandbox.cpio.gz" -- sh -c "$2" </dev/null
}
kib() { sed -n 's/^VmRSS:[^0-9]*\([0-9]*\).*/\1/p' "/proc/$1/status" 2>/dev/null; }
IDLE='echo ready; exec sleep 900'
USED='head -c 67108864 /dev/zero >/tmp/x && rm /tmp/x && echo ready && exec sleep 900'
for mode in report keep; do
    (run $mode true) >/dev/null 2>&1 || echo "BENCH first run failed ($mode)"
    for load in idle used; do
        cmd=$IDLE
        [ $load = used ] && cmd=$USED
        pids=
        i=0
        while [ $i -lt $N ]; do
            run $mode "$cmd" >"$W/$mode-$load-$i.out" 2>&1 &
            pids="$pids $!"
            i=$((i + 1))
        done
        t=0
        while [ "$(cat "$W/$mode-$load"-*.out | grep -c '^ready')" -lt $N ] && [ $t -lt 600 ]; do
            sleep 1; t=$((t + 1))
        done
        ready=$(cat "$W/$mode-$load"-*.out | grep -c '^ready')
        # Linux reports freed memory about 2 s after it is freed; let every guest settle.
        sleep 20
        total=0
        for p in $pids; do total=$((total + $(kib $p || echo 0))); done
        echo "BENCH $mode $load $total $ready"
        kill $pids 2>/dev/null
        wait
    done
done
SCENARIO

files=("$flint:flint" "$FLINT_CACHE/guest/vmlinux:vmlinux"
    "$FLINT_CACHE/sandbox/initramfs.cpio.gz:sandbox.cpio.gz")
budget=$((900 + 120 * count))
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo "BIN=/bench; W=/tmp"; cat "$work/scenario.sh"; } >"$work/nested.sh"
    adds=()
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    "$here/nested-host/run.sh" --mem 4096 --timeout "$budget" --scenario "$work/nested.sh" \
        "${adds[@]}" >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin" "$work/w"
    for f in "${files[@]}"; do ln -s "$(realpath "${f%%:*}")" "$work/bin/${f##*:}"; done
    BIN=$work/bin W=$work/w timeout "$budget" sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

tr -d '\r' <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH first run failed' "$work/clean"; then
    die "a first run failed: $(grep 'BENCH first' "$work/clean")"
fi
echo "flint run memory benchmark, $(date -u +%Y-%m-%d): $count sandboxes at once, 1 vCPU, 256 MiB each"
echo "where: $where; resident memory of the flint processes summed, 20 s after the last was ready"
value() { sed -n "s/.*BENCH $1 $2 \([0-9]*\) \([0-9]*\)$/\1 \2/p" "$work/clean" | head -n1; }
printf '%-44s %24s %24s\n' "" "free page reporting" "--no-page-reporting"
for load in idle used; do
    case $load in
    idle) what="idle after starting" ;;
    used) what="idle after writing and deleting 64 MiB" ;;
    esac
    row=$(printf '%-44s' "$what")
    for mode in report keep; do
        read -r kib ready <<<"$(value $mode $load)"
        [ "${ready:-0}" = "$count" ] || die "$mode/$load: only ${ready:-0} of $count sandboxes were ready"
        row+=$(printf ' %15d MiB total' $((kib / 1024)))
    done
    echo "$row"
done
