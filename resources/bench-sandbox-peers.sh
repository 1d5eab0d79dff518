#!/usr/bin/env bash
# Sandbox start against Firecracker and Cloud Hypervisor (benchmark, not a test): `flint run --
# true` restored from the snapshot of a booted sandbox (made by a first run), against each peer
# loading a snapshot of the same booted sandbox and running `true` through the same guest agent
# over its vsock socket. Same guest kernel, sandbox image (resources/build-sandbox-image.sh)
# and command line, 1 vCPU, 128 MiB; each peer's VM has the devices flint run's has (vsock,
# entropy, a balloon with free page reporting). Each peer's snapshot is made once: booted with
# its API up, the agent asked to run `true` (so the guest is as far as flint's template),
# paused and snapshotted (Firecracker: resources/fc-snapshot.sh, Full; Cloud Hypervisor:
# resources/ch-snapshot.sh). Each peer run is the helper resources/fc-sandbox.c: start the VMM
# with its API socket, ask it to load the snapshot as soon as the API accepts (Firecracker:
# `PUT /snapshot/load`, File backend, resume_vm, vsock_override to a socket of its own; Cloud
# Hypervisor: `PUT /api/v1/vm.restore` with resume, from a restore directory whose config.json
# names a vsock socket of its own, see ch-snapshot.sh), then `agent-client VSOCK_UDS --refresh
# -- true` (the same clock and entropy refresh flint run does on a restored guest), then
# SIGKILL and reap the VMM. Each time is fork to exit of the whole run (the stopwatch helper),
# the VMMs alternating (rotating which goes first).
#
# Cloud Hypervisor has virtio over PCI only, and the sandbox kernel (resources/guest-kernel
# .config) has no virtio-pci; with cloud-hypervisor in --vmms every VMM boots the kernel of
# resources/build-guest-kernel-pci.sh (the same kernel plus virtio-pci and MSI), its ELF
# vmlinux: flint and Firecracker with the sandbox command line as always (it has pci=off, so
# for them it is the default kernel), Cloud Hypervisor with the same line without pci=off.
# Cloud Hypervisor restores guest memory by copying the snapshot's memory file into anonymous
# memory (its default `memory_restore_mode` Copy; --ch-restore ondemand: userfaultfd, pages
# copied in on first touch and the rest in the background), where Firecracker and flint map
# theirs.
#
# The `pool` column: `flint run --pool` against a `flint pool --size 2` of the same sandboxes,
# started (and warmed with one job) before the timed runs. Its time is the client's, fork to
# exit, like the others'; the pool's work before the job (restoring and starting the VM,
# connecting the agent) is not in it, that is the point. After each pooled run the script
# waits until the pool has two ready sandboxes again, so that no restore in the background
# overlaps a timed run.
#
# With --phases (no pool), prints instead where each one's time goes: flint's own debug log
# (`FLINT_LOG=debug`: restored, agent connected, refreshed, command ended, status in, VM
# stopped, in ms since flint's main started) and fc-sandbox's marks for each peer (API
# accepting, load answered, client exited, VMM reaped).
#
# usage: resources/bench-sandbox-peers.sh [-n RUNS] [--phases] [--peers DIR] [--vmms LIST]
#                                         [--ch-restore copy|ondemand]
#   RUNS timed runs of each (default 20) after one warm-up each; BENCH_RAW=1 prints samples
#   --vmms LIST: comma-separated, from flint, pool, firecracker, cloud-hypervisor (default:
#                all four, cloud-hypervisor only when its binary is in --peers; pool not with
#                --phases). `--vmms flint,pool,firecracker` is the run before Cloud
#                Hypervisor was added, on the default kernel.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=20
phases=
peers=$repo/../shared/peers
vmms=
ch_restore=copy
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --phases) phases=1 ;;
    --peers) peers=${2:?}; shift ;;
    --vmms) vmms=${2:?}; shift ;;
    --ch-restore) ch_restore=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
((runs > 0)) || die "-n wants a positive number of runs"
if [ -z "$vmms" ]; then
    vmms=flint,pool,firecracker
    [ ! -x "$peers/cloud-hypervisor" ] || vmms=$vmms,cloud-hypervisor
fi
vmms=${vmms//,/ }
[ -z "$phases" ] || vmms=$(tr ' ' '\n' <<<"$vmms" | grep -vx pool | tr '\n' ' ')
vmms=$(echo $vmms) # one space between names, none around
for v in $vmms; do
    case $v in
    flint | pool) ;;
    firecracker) [ -x "$peers/firecracker" ] || die "no firecracker binary in $peers (see --peers)" ;;
    cloud-hypervisor) [ -x "$peers/cloud-hypervisor" ] || die "no cloud-hypervisor binary in $peers (see --peers)" ;;
    *) die "unknown VMM '$v' in --vmms (flint, pool, firecracker, cloud-hypervisor)" ;;
    esac
done
[ -n "${vmms// /}" ] || die "--vmms: nothing to measure"
has() { [[ " $vmms " == *" $1 "* ]]; }
case $ch_restore in
copy) ch_mode=Copy ;;
ondemand) ch_mode=OnDemand ;;
*) die "--ch-restore takes copy or ondemand, got '$ch_restore'" ;;
esac

ensure_packages curl gcc libc6-dev
kernel=$(sandbox_bench_kernel "$(has cloud-hypervisor && echo 1)")
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
VMMS='$vmms'
CH_MODE=$ch_mode
SCENARIO
! has firecracker || cat "$here/fc-snapshot.sh" >>"$work/scenario.sh"
! has cloud-hypervisor || cat "$here/ch-snapshot.sh" >>"$work/scenario.sh"
cat >>"$work/scenario.sh" <<'SCENARIO'
has() { case " $VMMS " in *" $1 "*) return 0 ;; esac; return 1; }
export FLINT_CACHE=$W/flint-cache
if has flint || has pool; then
    "$BIN/flint" run --memory 128 --kernel "$BIN/vmlinux" --initramfs "$BIN/sandbox.cpio.gz" -- true \
        </dev/null >"$W/first.out" 2>&1 || { echo "BENCH-FAILED flint's first run"; cat "$W/first.out"; exit 1; }
    echo "BENCH flint-snapshot $(du -sk "$FLINT_CACHE" | cut -f1) KiB in the cache"
fi
LOAD="{\"snapshot_path\": \"$W/fc.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$W/fc.mem\"}, \"resume_vm\": true, \"vsock_override\": {\"uds_path\": \"$W/fc-run.vsock\"}}"
CH_LOAD="{\"source_url\": \"file://$W/ch-run\", \"memory_restore_mode\": \"$CH_MODE\", \"resume\": true}"
one_flint() { # tag
    if [ -n "$PHASES" ]; then
        FLINT_LOG=debug "$BIN/stopwatch" "$1" "$BIN/flint" run --memory 128 --kernel "$BIN/vmlinux" \
            --initramfs "$BIN/sandbox.cpio.gz" -- true </dev/null 2>"$W/flint.err" 3>&1
        # the phase table is of the timed runs, not the warm-up
        case $1 in WARM-*) ;; *)
            sed -n 's/.*sandbox: \(.*\) at \([0-9]*\) ms.*/\1|\2/p' "$W/flint.err" |
                awk -F'|' '{ gsub(/ /, "_", $1); print "BENCH flint-phase", $1, $2 }' ;;
        esac
    else
        "$BIN/stopwatch" "$1" "$BIN/flint" run --memory 128 --kernel "$BIN/vmlinux" \
            --initramfs "$BIN/sandbox.cpio.gz" -- true </dev/null 2>"$W/flint.err" 3>&1
    fi
}
one_firecracker() { # tag
    rm -f "$W/fc-run.vsock"
    "$BIN/stopwatch" "$1" "$BIN/fc-sandbox" "$BIN/firecracker" "$W/fc-run.sock" "$LOAD" "$W/fc-run.log" \
        -- "$BIN/agent-client" "$W/fc-run.vsock" --refresh -- true </dev/null 2>"$W/fc.err" 3>&1
    case $1 in WARM-*) ;; *) sed -n 's/^FCPHASE /BENCH fc-phase /p' "$W/fc.err" ;; esac
    grep -v '^FCPHASE' "$W/fc.err" | sed 's/^/BENCH fc-stderr /' | head -n 5
}
one_ch() { # tag
    # a fresh restore directory (its vsock socket path free), outside the timed run
    ch_restore_dir "$W/ch-run" "$W/ch-run.vsock"
    rm -f "$W/ch-run.sock.lock"
    "$BIN/stopwatch" "$1" "$BIN/fc-sandbox" --cloud-hypervisor "$BIN/cloud-hypervisor" "$W/ch-run.sock" "$CH_LOAD" \
        "$W/ch-run.log" -- "$BIN/agent-client" "$W/ch-run.vsock" --refresh -- true </dev/null 2>"$W/ch.err" 3>&1
    case $1 in WARM-*) ;; *) sed -n 's/^FCPHASE /BENCH ch-phase /p' "$W/ch.err" ;; esac
    grep -v '^FCPHASE' "$W/ch.err" | sed 's/^/BENCH ch-stderr /' | head -n 5
    [ ! -s "$W/ch.err" ] || grep -q '^FCPHASE' "$W/ch.err" || tail -n 5 "$W/ch-run.log" | sed 's/^/BENCH ch-log /'
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
# one VMM: the run of that column
one() {
    case $1 in
    flint) one_flint flint ;;
    pool) one_pool pool ;;
    firecracker) one_firecracker firecracker ;;
    cloud-hypervisor) one_ch cloud-hypervisor ;;
    esac
}
if has pool; then
    FLINT_LOG=debug "$BIN/flint" pool --socket "$POOL" --size 2 --memory 128 --kernel "$BIN/vmlinux" \
        --initramfs "$BIN/sandbox.cpio.gz" </dev/null >/dev/null 2>"$W/pool.err" &
    pool=$!
    ready=2
    pool_ready $ready
    [ -S "$POOL" ] || { echo "BENCH-FAILED the pool did not start"; cat "$W/pool.err"; exit 1; }
    one_pool WARM-pool
fi
! has flint || one_flint WARM-flint
! has firecracker || one_firecracker WARM-fc
! has cloud-hypervisor || one_ch WARM-ch
set -- $VMMS
nvmm=$#
r=1
while [ $r -le $RUNS ]; do
    # rotate: round r starts with the (r mod nvmm)-th VMM
    k=0
    while [ $k -lt $nvmm ]; do
        j=$(((r + k) % nvmm + 1))
        eval "one \${$j}"
        k=$((k + 1))
    done
    r=$((r + 1))
done
if has pool; then
    kill -TERM $pool; wait $pool
    echo "BENCH pool-exit $? $(ls -d /tmp/flint-run-* 2>/dev/null | wc -l) $([ -e "$POOL" ] && echo left || echo gone)"
fi
# Left: VMM processes; sockets other than the peers' (a SIGKILLed peer leaves its API and
# vsock sockets, and Cloud Hypervisor its API socket's lock file: removed here).
left_sockets=$(find "$W" /tmp/flint-run-* -type s ! -name 'fc-*' ! -name 'ch-*' 2>/dev/null | wc -l)
rm -rf "$W"/fc-*.sock "$W"/fc-*.vsock "$W"/ch-*.sock "$W"/ch-*.sock.lock "$W"/ch-*.vsock "$W/ch-run"
echo "BENCH leftover $(cat /proc/[0-9]*/comm 2>/dev/null | grep -cE '^(flint|firecracker|cloud-hyperviso|agent-client|fc-sandbox)$') VMM processes, $left_sockets sockets of flint's"
echo "BENCH done"
SCENARIO

# The nested host's RAM: its own initramfs, the peers' snapshot memory files on its tmpfs, and
# two running guests.
adds=(--add "$target/flint:/bench/flint" --add "$FLINT_CACHE/sandbox/agent-client:/bench/agent-client"
    --add "$kernel:/bench/vmlinux" --add "$FLINT_CACHE/sandbox/initramfs.cpio.gz:/bench/sandbox.cpio.gz"
    --add "$work/stopwatch:/bench/stopwatch" --add "$work/fc-sandbox:/bench/fc-sandbox"
    --add "$(command -v curl):/bench/curl")
! has firecracker || adds+=(--add "$peers/firecracker:/bench/firecracker")
! has cloud-hypervisor || adds+=(--add "$peers/cloud-hypervisor:/bench/cloud-hypervisor")
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo 'BIN=/bench; W=/tmp/bench; mkdir -p $W'; cat "$work/scenario.sh"; } >"$work/nested.sh"
    "$here/nested-host/run.sh" --timeout $((900 + 40 * runs)) --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG with kvm_amd, no nested paging), $(nproc) host cores; files on its tmpfs"
else
    mkdir -p "$work/bin" "$work/w"
    for ((i = 1; i < ${#adds[@]}; i += 2)); do
        a=${adds[i]}
        cp "${a%%:*}" "$work/bin/${a##*/}"
    done
    BIN=$work/bin W=$work/w timeout $((900 + 40 * runs)) sh "$work/scenario.sh" >"$work/out" 2>&1 ||
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
bad=$(grep -E '^BENCH (flint|firecracker|pool|cloud-hypervisor) [0-9]+ [0-9]+$' "$work/clean" | grep -cv ' 0$' || true)
samples() { sed -n "s/^BENCH $1 \([0-9]*\) 0$/\1/p" "$work/clean" | sort -n; }
stats() { # prints "median (min-max) n" in ms of the sorted microsecond samples on stdin
    awk '{ v[NR] = $1 / 1000 } END {
        if (NR == 0) { printf "no samples"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.0f ms (%.0f-%.0f), n=%d", m, v[1], v[NR], NR }'
}
median_of() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) { printf "-"; exit }
    printf "%.0f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

others=
! has firecracker || others="$("$peers/firecracker" --version 2>/dev/null | sed -n 1p)"
! has cloud-hypervisor || others="${others:+$others; }$("$peers/cloud-hypervisor" --version 2>/dev/null | sed -n 1p) (restore: memory_restore_mode $ch_mode)"
echo "sandbox start, $(tr ' ' '\n' <<<"$vmms" | paste -sd, | sed 's/,/, /g'), $(date -u +%Y-%m-%d): $runs runs each after a warm-up, rotating"
echo "where: $where"
echo "guest: the sandbox image (initramfs with the guest agent), 1 vCPU, 128 MiB; kernel: $kernel${others:+; other VMMs: $others}"
snaps=
! has flint && ! has pool || snaps="flint's template $(sed -n 's/^BENCH flint-snapshot //p' "$work/clean")"
! has firecracker || snaps="${snaps:+$snaps; }Firecracker's memory file $(sed -n 's/^BENCH fc-snapshot //p' "$work/clean")"
! has cloud-hypervisor || snaps="${snaps:+$snaps; }Cloud Hypervisor's memory-ranges $(sed -n 's/^BENCH ch-snapshot //p' "$work/clean")"
echo "snapshots: $snaps"
echo "left in the benchmark host at the end: $(sed -n 's/^BENCH leftover //p' "$work/clean")"
[ "$bad" = 0 ] || echo "runs that failed (not timed): $bad"
label() {
    case $1 in
    flint) echo "flint run (restored)" ;;
    pool) echo "flint run --pool (warm)" ;;
    firecracker) echo "Firecracker + agent" ;;
    cloud-hypervisor) echo "Cloud Hypervisor + agent" ;;
    esac
}
if [ -z "$phases" ]; then
    ! has pool || echo "pool: $(sed -n 's/^BENCH pool-exit //p' "$work/clean" | awk '{ printf "exit status %s after SIGTERM, %s work directories left, socket %s", $1, $2, $3 }')"
    ratio_to() { awk -v a="$(samples "$1" | median_of)" -v b="$(samples "$2" | median_of)" \
        'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else printf "-" }'; }
    row() { printf '| %-50s' "$1"; shift; for c in "$@"; do printf ' | %-24s' "$c"; done; printf ' |\n'; }
    cells=(); for v in $vmms; do cells+=("$(label "$v")"); done
    row "figure" "${cells[@]}"
    cells=(); for v in $vmms; do cells+=("$(samples "$v" | stats)"); done
    row "start -> \`true\` ran -> exit, median (min-max)" "${cells[@]}"
    for p in firecracker cloud-hypervisor; do
        has "$p" || continue
        cells=(); for v in $vmms; do cells+=("$(ratio_to "$v" "$p")"); done
        row "ratio to $(label "$p" | sed 's/ + agent//') (medians)" "${cells[@]}"
    done
    exit 0
fi
# Phase table: medians of the marks.
phase() { sed -n "s/^BENCH $1 \(.*\)$/\1/p" "$work/clean"; }
fm() { phase flint-phase | awk -v k="$1" '$1 == k { print $2 }' | median_of; }
pm() { phase "$1" | awk -v i="$2" '{ print $i / 1000 }' | median_of; }
total() { samples "$1" | awk '{ print $1 / 1000 }' | median_of; }
if has flint; then
    printf '| %-58s | %-9s |\n' "flint phase (ms since flint's main)" "median ms"
    printf '| %-58s | %-9s |\n' "VM restored (template loaded, vCPU ready)" "$(fm restored)"
    printf '| %-58s | %-9s |\n' "agent connected (first answer)" "$(fm agent_connected)"
    printf '| %-58s | %-9s |\n' "clock and RNG refreshed" "$(fm guest_clock_and_RNG_refreshed)"
    printf '| %-58s | %-9s |\n' "command ended" "$(fm command_ended)"
    printf '| %-58s | %-9s |\n' "status in" "$(fm status_in)"
    printf '| %-58s | %-9s |\n' "VM stopped" "$(fm VM_stopped)"
    printf '| %-58s | %-9s |\n' "cleaned up (work directory removed)" "$(fm cleaned_up)"
    printf '| %-58s | %-9s |\n' "whole run, fork to exit (stopwatch)" "$(total flint)"
fi
peers_in=
! has firecracker || peers_in="firecracker:fc-phase"
! has cloud-hypervisor || peers_in="$peers_in cloud-hypervisor:ch-phase"
if [ -n "$peers_in" ]; then
    head="| %-58s"; for p in $peers_in; do head="$head | %-24s"; done; head="$head |\n"
    # shellcheck disable=SC2059
    prow() { local l=$1 i=$2 c=(); for p in $peers_in; do c+=("$(pm "${p#*:}" "$i")"); done; printf "$head" "$l" "${c[@]}"; }
    c=(); for p in $peers_in; do c+=("$(label "${p%%:*}" | sed 's/ + agent//'), median ms"); done
    # shellcheck disable=SC2059
    printf "$head" "peer phase (ms since fc-sandbox started)" "${c[@]}"
    prow "API socket accepting (process up)" 1
    prow "snapshot loaded and resumed (API answered)" 2
    prow "agent-client exited (connect, refresh, true)" 3
    prow "VMM killed and reaped" 4
    c=(); for p in $peers_in; do c+=("$(total "${p%%:*}")"); done
    # shellcheck disable=SC2059
    printf "$head" "whole run, fork to exit (stopwatch)" "${c[@]}"
fi
