#!/usr/bin/env bash
# Sandbox start against Firecracker (benchmark, not a test): `flint run -- true` restored from
# the snapshot of a booted sandbox (made by a first run), against Firecracker loading a
# snapshot of the same booted sandbox and running `true` through the same guest agent over its
# vsock socket. Same guest kernel, sandbox image (resources/build-sandbox-image.sh) and
# command line, 1 vCPU, 128 MiB; Firecracker's VM has the devices flint run's has (vsock,
# entropy, a balloon with free page reporting). Firecracker's snapshot is made once: booted
# from a config file with its API up, the agent asked to run `true` (so the guest is as far
# as flint's template), paused and snapshotted (Full). Each Firecracker run is the helper
# resources/fc-sandbox.c: start firecracker --api-sock, `PUT /snapshot/load` (File backend,
# resume_vm, vsock_override to a socket of its own) as soon as the API accepts, then
# `agent-client VSOCK_UDS --refresh -- true` (the same clock and entropy refresh flint run
# does on a restored guest), then SIGKILL and reap Firecracker. Each time is fork to exit of
# the whole run (the stopwatch helper), flint and Firecracker alternating.
#
# Without --phases, a third column: `flint run --pool` against a `flint pool --size 2` of the
# same sandboxes, started (and warmed with one job) before the timed runs. Its time is the
# client's, fork to exit, like the others'; the pool's work before the job (restoring and
# starting the VM, connecting the agent) is not in it, that is the point. After each pooled
# run the script waits until the pool has two ready sandboxes again, so that no restore in
# the background overlaps a timed run. The three alternate (rotating which goes first).
#
# With --phases, prints instead where each one's time goes: flint's own debug log (`FLINT_LOG=
# debug`: restored, agent connected, refreshed, command ended, status in, VM stopped, in ms
# since flint's main started) and fc-sandbox's marks (API accepting, load answered, client
# exited, Firecracker reaped).
#
# Cloud Hypervisor is not in the table: its devices are virtio-pci only, and the sandbox
# image's kernel (resources/guest-kernel.config) has no virtio-pci driver, so a Cloud
# Hypervisor guest of this image has no vsock and no agent.
#
# usage: resources/bench-sandbox-peers.sh [-n RUNS] [--phases] [--peers DIR]
#   RUNS timed runs of each (default 20) after one warm-up each; BENCH_RAW=1 prints samples
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=20
phases=
peers=$repo/../shared/peers
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --phases) phases=1 ;;
    --peers) peers=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
((runs > 0)) || die "-n wants a positive number of runs"
[ -x "$peers/firecracker" ] || die "no firecracker binary in $peers (see --peers)"

ensure_packages curl gcc libc6-dev
"$here/build-guest-kernel.sh"
"$here/build-sandbox-image.sh"
log "building flint (release)"
(cd "$repo" && cargo build --release --quiet --bin flint)
target=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O2 -Wall -o "$work/stopwatch" "$here/stopwatch.c" || die "cannot compile the stopwatch helper"
gcc -O2 -Wall -o "$work/fc-sandbox" "$here/fc-sandbox.c" || die "cannot compile fc-sandbox"
cmdline=$(sandbox_cmdline)

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
RUNS=$runs
PHASES=$phases
CMDLINE='$cmdline'
SCENARIO
cat "$here/fc-snapshot.sh" >>"$work/scenario.sh"
cat >>"$work/scenario.sh" <<'SCENARIO'
export FLINT_CACHE=$W/flint-cache
"$BIN/flint" run --memory 128 --kernel "$BIN/vmlinux" --initramfs "$BIN/sandbox.cpio.gz" -- true \
    </dev/null >"$W/first.out" 2>&1 || { echo "BENCH-FAILED flint's first run"; cat "$W/first.out"; exit 1; }
echo "BENCH flint-snapshot $(du -sk "$FLINT_CACHE" | cut -f1) KiB in the cache"
LOAD="{\"snapshot_path\": \"$W/fc.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$W/fc.mem\"}, \"resume_vm\": true, \"vsock_override\": {\"uds_path\": \"$W/fc-run.vsock\"}}"
one_flint() { # tag
    if [ -n "$PHASES" ]; then
        FLINT_LOG=debug "$BIN/stopwatch" "$1" "$BIN/flint" run --memory 128 --kernel "$BIN/vmlinux" \
            --initramfs "$BIN/sandbox.cpio.gz" -- true </dev/null 2>"$W/flint.err" 3>&1
        sed -n 's/.*sandbox: \(.*\) at \([0-9]*\) ms.*/\1|\2/p' "$W/flint.err" |
            awk -F'|' '{ gsub(/ /, "_", $1); print "BENCH flint-phase", $1, $2 }'
    else
        "$BIN/stopwatch" "$1" "$BIN/flint" run --memory 128 --kernel "$BIN/vmlinux" \
            --initramfs "$BIN/sandbox.cpio.gz" -- true </dev/null 2>"$W/flint.err" 3>&1
    fi
}
one_fc() { # tag
    rm -f "$W/fc-run.vsock"
    "$BIN/stopwatch" "$1" "$BIN/fc-sandbox" "$BIN/firecracker" "$W/fc-run.sock" "$LOAD" "$W/fc-run.log" \
        -- "$BIN/agent-client" "$W/fc-run.vsock" --refresh -- true </dev/null 2>"$W/fc.err" 3>&1
    sed -n 's/^FCPHASE /BENCH fc-phase /p' "$W/fc.err"
    grep -v '^FCPHASE' "$W/fc.err" | sed 's/^/BENCH fc-stderr /' | head -n 5
}
POOL=$W/pool.sock
ready=0
pool_ready() { # wait until the pool has reported N ready sandboxes in all
    n=0
    until [ "$(grep -c 'is ready' "$W/pool.err")" -ge "$1" ] || [ $n -ge 600 ]; do sleep 0.1 2>/dev/null || sleep 1; n=$((n + 1)); done
}
one_pool() { # tag
    "$BIN/stopwatch" "$1" "$BIN/flint" run --pool "$POOL" -- true </dev/null 2>"$W/pool-run.err" 3>&1
    ready=$((ready + 1))
    pool_ready $ready
}
if [ -z "$PHASES" ]; then
    FLINT_LOG=debug "$BIN/flint" pool --socket "$POOL" --size 2 --memory 128 --kernel "$BIN/vmlinux" \
        --initramfs "$BIN/sandbox.cpio.gz" </dev/null >/dev/null 2>"$W/pool.err" &
    pool=$!
    ready=2
    pool_ready $ready
    [ -S "$POOL" ] || { echo "BENCH-FAILED the pool did not start"; cat "$W/pool.err"; exit 1; }
    one_pool WARM-pool
fi
one_flint WARM-flint; one_fc WARM-fc
r=1
while [ $r -le $RUNS ]; do
    if [ -n "$PHASES" ]; then
        if [ $((r % 2)) -eq 0 ]; then one_flint flint; one_fc firecracker; else one_fc firecracker; one_flint flint; fi
    else
        case $((r % 3)) in
        0) one_flint flint; one_pool pool; one_fc firecracker ;;
        1) one_pool pool; one_fc firecracker; one_flint flint ;;
        2) one_fc firecracker; one_flint flint; one_pool pool ;;
        esac
    fi
    r=$((r + 1))
done
if [ -n "$PHASES" ]; then :; else
    kill -TERM $pool; wait $pool
    echo "BENCH pool-exit $? $(ls -d /tmp/flint-run-* 2>/dev/null | wc -l) $([ -e "$POOL" ] && echo left || echo gone)"
fi
echo "BENCH done"
SCENARIO

# The nested host's RAM: its own initramfs, two snapshots' memory files on its tmpfs, and
# two running guests.
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo 'BIN=/bench; W=/tmp/bench; mkdir -p $W'; cat "$work/scenario.sh"; } >"$work/nested.sh"
    "$here/nested-host/run.sh" --timeout $((900 + 30 * runs)) --scenario "$work/nested.sh" \
        --add "$target/flint:/bench/flint" --add "$FLINT_CACHE/sandbox/agent-client:/bench/agent-client" \
        --add "$peers/firecracker:/bench/firecracker" \
        --add "$FLINT_CACHE/guest/vmlinux:/bench/vmlinux" \
        --add "$FLINT_CACHE/sandbox/initramfs.cpio.gz:/bench/sandbox.cpio.gz" \
        --add "$work/stopwatch:/bench/stopwatch" --add "$work/fc-sandbox:/bench/fc-sandbox" \
        --add "$(command -v curl):/bench/curl" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG with kvm_amd, no nested paging), $(nproc) host cores; files on its tmpfs"
else
    mkdir -p "$work/bin" "$work/w"
    cp "$target/flint" "$FLINT_CACHE/sandbox/agent-client" "$peers/firecracker" "$FLINT_CACHE/guest/vmlinux" \
        "$work/stopwatch" "$work/fc-sandbox" "$(command -v curl)" "$work/bin/"
    cp "$FLINT_CACHE/sandbox/initramfs.cpio.gz" "$work/bin/sandbox.cpio.gz"
    BIN=$work/bin W=$work/w timeout $((900 + 30 * runs)) sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

# The console may put control sequences before a line.
tr -d '\r' <"$work/out" | sed 's/^.*BENCH/BENCH/' >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH-FAILED' "$work/clean" || ! grep -q '^BENCH done' "$work/clean"; then
    cat "$work/clean"
    die "a measurement failed (see above)"
fi
# stopwatch lines: "BENCH LABEL MICROSECONDS STATUS"
bad=$(grep -E '^BENCH (flint|firecracker|pool) [0-9]+ [0-9]+$' "$work/clean" | grep -cv ' 0$' || true)
samples() { sed -n "s/^BENCH $1 \([0-9]*\) 0$/\1/p" "$work/clean" | sort -n; }
stats() { # prints "median (min-max) n" in ms of the sorted microsecond samples on stdin
    awk '{ v[NR] = $1 / 1000 } END {
        if (NR == 0) { printf "no samples"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.0f ms (%.0f-%.0f), n=%d", m, v[1], v[NR], NR }'
}
median_of() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) { printf "-"; exit }
    printf "%.0f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

fcver=$("$peers/firecracker" --version 2>/dev/null | head -n1)
echo "sandbox start, flint against Firecracker, $(date -u +%Y-%m-%d): $runs runs each after a warm-up, alternating"
echo "where: $where"
echo "guest: the sandbox image (kernel + initramfs with the guest agent), 1 vCPU, 128 MiB; other VMM: $fcver"
echo "snapshots: flint's template $(sed -n 's/^BENCH flint-snapshot //p' "$work/clean"); Firecracker's memory file $(sed -n 's/^BENCH fc-snapshot //p' "$work/clean")"
[ "$bad" = 0 ] || echo "runs that failed (not timed): $bad"
if [ -z "$phases" ]; then
    fl=$(samples flint | stats)
    fp=$(samples pool | stats)
    fc=$(samples firecracker | stats)
    ratio_to_fc() { awk -v a="$(samples "$1" | median_of)" -v b="$(samples firecracker | median_of)" \
        'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
    echo "pool: $(sed -n 's/^BENCH pool-exit //p' "$work/clean" | awk '{ printf "exit status %s after SIGTERM, %s work directories left, socket %s", $1, $2, $3 }')"
    printf '| %-50s | %-24s | %-24s | %-24s |\n' "figure" "flint run (restored)" "flint run --pool (warm)" "Firecracker + agent"
    printf '| %-50s | %-24s | %-24s | %-24s |\n' "start -> \`true\` ran -> exit, median (min-max)" "$fl" "$fp" "$fc"
    printf '| %-50s | %-24s | %-24s | %-24s |\n' "ratio to Firecracker (medians)" "$(ratio_to_fc flint)" "$(ratio_to_fc pool)" "1.00"
    exit 0
fi
# Phase table: medians of the marks, and the time between consecutive marks.
phase() { sed -n "s/^BENCH $1 \(.*\)$/\1/p" "$work/clean"; }
fm() { phase flint-phase | awk -v k="$1" '$1 == k { print $2 }' | median_of; }
cm() { phase fc-phase | awk -v i="$1" '{ print $i / 1000 }' | median_of; }
total_fl=$(samples flint | awk '{ print $1 / 1000 }' | median_of)
total_fc=$(samples firecracker | awk '{ print $1 / 1000 }' | median_of)
printf '| %-44s | %-13s | %-50s | %-13s |\n' "flint phase (ms since flint's main)" "median ms" "Firecracker phase (ms since fc-sandbox started)" "median ms"
printf '| %-44s | %-13s | %-50s | %-13s |\n' "VM restored (template loaded, vCPU ready)" "$(fm restored)" "API socket accepting (process up)" "$(cm 1)"
printf '| %-44s | %-13s | %-50s | %-13s |\n' "agent connected (first answer)" "$(fm agent_connected)" "snapshot load answered (resumed)" "$(cm 2)"
printf '| %-44s | %-13s | %-50s | %-13s |\n' "clock and RNG refreshed" "$(fm guest_clock_and_RNG_refreshed)" "agent-client exited (connect, refresh, true)" "$(cm 3)"
printf '| %-44s | %-13s | %-50s | %-13s |\n' "command ended" "$(fm command_ended)" "Firecracker killed and reaped" "$(cm 4)"
printf '| %-44s | %-13s | %-50s | %-13s |\n' "status in" "$(fm status_in)" "" ""
printf '| %-44s | %-13s | %-50s | %-13s |\n' "VM stopped" "$(fm VM_stopped)" "" ""
printf '| %-44s | %-13s | %-50s | %-13s |\n' "cleaned up (work directory removed)" "$(fm cleaned_up)" "" ""
printf '| %-44s | %-13s | %-50s | %-13s |\n' "whole run, fork to exit (stopwatch)" "$total_fl" "whole run, fork to exit (stopwatch)" "$total_fc"
