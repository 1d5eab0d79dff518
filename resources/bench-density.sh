#!/usr/bin/env bash
# Density benchmark (not a test): the host memory N idle sandboxes take (default 50), each
# restored from one snapshot of a booted sandbox, flint against Firecracker and Cloud
# Hypervisor. Same guest kernel, sandbox image and command line, 1 vCPU, 128 MiB, the same
# devices (vsock, entropy, balloon with free page reporting). flint: `flint run -- sh -c 'echo
# ready; exec sleep 900'` (the snapshot made by a first run); each peer: its snapshot of the
# same booted sandbox (resources/fc-snapshot.sh, resources/ch-snapshot.sh) loaded by
# resources/fc-sandbox.c (Firecracker: File backend, each with its own vsock socket; Cloud
# Hypervisor: `vm.restore` with resume, each from a restore directory naming its own vsock
# socket) and the same command run through the same agent by `agent-client --refresh`.
# Sandboxes start five at a time; 20 s after the last is ready, each VMM process's memory is
# read from /proc/PID/smaps: PSS (proportional set size: a page shared by k processes counts
# 1/k in each, so the sum counts the snapshot's page cache, shared by all, once; RSS would
# count it N times), split into the guest memory mapping (the mapping of the guest's size) and
# the rest (the VMM's own: heap, stacks, binary, libraries). Also the drop of the host's
# MemAvailable, which includes what no process owns: KVM's kernel memory (page tables, which
# in this rig shadow the guest's) and the page cache of the snapshot.
#
# Cloud Hypervisor has virtio over PCI only, and the sandbox kernel has no virtio-pci; with
# cloud-hypervisor in --vmms every VMM boots the kernel of resources/build-guest-kernel-pci.sh
# (the same kernel plus virtio-pci and MSI), its ELF vmlinux, flint and Firecracker with the
# sandbox command line as always (pci=off: for them the default kernel), Cloud Hypervisor
# without pci=off. Cloud Hypervisor restores guest memory by copying the snapshot's memory
# file into private anonymous memory (memory_restore_mode Copy, its default; --ch-restore
# ondemand: userfaultfd, pages copied in on first touch and the rest in the background, so an
# idle guest is wholly resident seconds later), not by mapping the file: nothing of the guest
# is shared between its sandboxes. So with it in the run the nested host's
# default RAM grows to hold N private guests (--host-mem).
#
# usage: resources/bench-density.sh [-n SANDBOXES] [--peers DIR] [--vmms LIST] [--host-mem MIB]
#                                   [--baseline FLINT] [--ch-restore copy|ondemand]
#   --vmms: comma-separated, from flint, firecracker, cloud-hypervisor (default: all three,
#           cloud-hypervisor only when its binary is in --peers); `--vmms flint,firecracker`
#           is the run before Cloud Hypervisor was added, on the default kernel
#   --host-mem: the nested KVM host's RAM (default 4096; with cloud-hypervisor at least
#               1024 + 160 per sandbox)
#   --baseline: another flint binary (e.g. main's build) measured the same way in the same
#               run, in a column of its own: a before/after comparison on equal terms
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

count=50
host_mem=
peers=$repo/../shared/peers
baseline=
vmms=
ch_restore=copy
while (($#)); do
    case $1 in
    -n) count=${2:?}; shift ;;
    --peers) peers=${2:?}; shift ;;
    --vmms) vmms=${2:?}; shift ;;
    --host-mem) host_mem=${2:?}; shift ;;
    --baseline) baseline=${2:?}; shift ;;
    --ch-restore) ch_restore=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
((count > 0)) || die "-n wants a positive number of sandboxes"
[ -z "$baseline" ] || [ -x "$baseline" ] || die "--baseline: no executable $baseline"
if [ -z "$vmms" ]; then
    vmms=flint,firecracker
    [ ! -x "$peers/cloud-hypervisor" ] || vmms=$vmms,cloud-hypervisor
fi
vmms=${vmms//,/ }
for v in $vmms; do
    case $v in
    flint) ;;
    firecracker) [ -x "$peers/firecracker" ] || die "no firecracker binary in $peers (see --peers)" ;;
    cloud-hypervisor) [ -x "$peers/cloud-hypervisor" ] || die "no cloud-hypervisor binary in $peers (see --peers)" ;;
    *) die "unknown VMM '$v' in --vmms (flint, firecracker, cloud-hypervisor)" ;;
    esac
done
[ -z "$baseline" ] || vmms="baseline $vmms"
has() { [[ " $vmms " == *" $1 "* ]]; }
case $ch_restore in
copy) ch_mode=Copy ;;
ondemand) ch_mode=OnDemand ;;
*) die "--ch-restore takes copy or ondemand, got '$ch_restore'" ;;
esac
if [ -z "$host_mem" ]; then
    host_mem=4096
    ! has cloud-hypervisor || ((1024 + 160 * count < host_mem)) || host_mem=$((1024 + 160 * count))
fi
load_before=$(uptime)

ensure_packages curl gcc libc6-dev
kernel=$(sandbox_bench_kernel "$(has cloud-hypervisor && echo 1)")
"$here/build-sandbox-image.sh"
log "building flint (release)"
(cd "$repo" && cargo build --release --quiet --bin flint)
target=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O2 -Wall -o "$work/fc-sandbox" "$here/fc-sandbox.c" || die "cannot compile fc-sandbox"
cmdline=$(sandbox_cmdline)

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
N=$count
CMDLINE='$cmdline'
VMMS='$vmms'
CH_MODE=$ch_mode
SCENARIO
! has firecracker || cat "$here/fc-snapshot.sh" >>"$work/scenario.sh"
! has cloud-hypervisor || cat "$here/ch-snapshot.sh" >>"$work/scenario.sh"
cat >>"$work/scenario.sh" <<'SCENARIO'
# Each flint binary makes its own snapshot (a template is tied to the binary) in a cache of
# its own.
for f in flint baseline; do
    case " $VMMS " in *" $f "*) ;; *) continue ;; esac
    FLINT_CACHE=$W/$f-cache "$BIN/$f" run --memory 128 --kernel "$BIN/vmlinux" --initramfs "$BIN/sandbox.cpio.gz" -- true \
        </dev/null >"$W/first.out" 2>&1 || { echo "BENCH-FAILED $f's first run"; cat "$W/first.out"; exit 1; }
done
IDLE='echo ready; exec sleep 900'
echo "BENCH thp $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
avail() { sed -n 's/^MemAvailable: *\([0-9]*\).*/\1/p' /proc/meminfo; }
start_flint() { # binary i: in the background, $! is flint itself
    (FLINT_CACHE=$W/$1-cache exec "$BIN/$1" run --memory 128 --kernel "$BIN/vmlinux" --initramfs "$BIN/sandbox.cpio.gz" \
        -- sh -c "$IDLE" </dev/null >"$W/out-$2" 2>&1) &
    echo $! >"$W/pid-$2"
}
start_fc() { # i
    rm -f "$W/fc-$1.vsock"
    load="{\"snapshot_path\": \"$W/fc.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$W/fc.mem\"}, \"resume_vm\": true, \"vsock_override\": {\"uds_path\": \"$W/fc-$1.vsock\"}}"
    FC_PIDFILE=$W/pid-$1 "$BIN/fc-sandbox" "$BIN/firecracker" "$W/fc-$1.sock" "$load" "$W/fc-$1.log" \
        -- "$BIN/agent-client" "$W/fc-$1.vsock" --refresh -- sh -c "$IDLE" </dev/null >"$W/out-$1" 2>&1 &
    echo $! >"$W/driver-$1"
}
start_ch() { # i
    ch_restore_dir "$W/ch-$1" "$W/ch-$1.vsock"
    load="{\"source_url\": \"file://$W/ch-$1\", \"memory_restore_mode\": \"$CH_MODE\", \"resume\": true}"
    FC_PIDFILE=$W/pid-$1 "$BIN/fc-sandbox" --cloud-hypervisor "$BIN/cloud-hypervisor" "$W/ch-$1.sock" "$load" "$W/ch-$1.log" \
        -- "$BIN/agent-client" "$W/ch-$1.vsock" --refresh -- sh -c "$IDLE" </dev/null >"$W/out-$1" 2>&1 &
    echo $! >"$W/driver-$1"
}
ready() { cat "$W"/out-* 2>/dev/null | grep -c '^ready'; }
# measure PID: "pss rss guest_pss" in KiB; the guest mapping is the one of 128 MiB or more.
measure() {
    awk '/^Size:/ { big = ($2 >= 131072) }
         /^Rss:/ { rss += $2 }
         /^Pss:/ { pss += $2; if (big) guest += $2 }
         END { printf "%d %d %d\n", pss, rss, guest }' "/proc/$1/smaps"
}
for vmm in $VMMS; do
    rm -f "$W"/out-* "$W"/pid-* "$W"/driver-*
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    sleep 5
    before=$(avail)
    i=0
    while [ $i -lt $N ]; do
        j=0
        while [ $j -lt 5 ] && [ $i -lt $N ]; do
            case $vmm in
            firecracker) start_fc $i ;;
            cloud-hypervisor) start_ch $i ;;
            *) start_flint $vmm $i ;;
            esac
            i=$((i + 1)); j=$((j + 1))
        done
        t=0
        while [ "$(ready)" -lt $i ] && [ $t -lt 1200 ]; do sleep 0.5; t=$((t + 1)); done
    done
    echo "BENCH $vmm ready $(ready) of $N"
    sleep 20
    after=$(avail)
    total_pss=0; total_rss=0; total_guest=0; clients=0
    i=0
    while [ $i -lt $N ]; do
        pid=$(cat "$W/pid-$i" 2>/dev/null || echo 0)
        if [ -r "/proc/$pid/smaps" ]; then
            set -- $(measure $pid)
            total_pss=$((total_pss + $1)); total_rss=$((total_rss + $2)); total_guest=$((total_guest + $3))
            echo "BENCH one $vmm $i pss $1 rss $2 guest $3"
        fi
        if [ $vmm = firecracker ] || [ $vmm = cloud-hypervisor ]; then
            # agent-client, the driver's child: the host side of the command (flint run's
            # own process holds that too).
            for c in $(cat "/proc/$(cat "$W/driver-$i")/task/"*/children 2>/dev/null); do
                [ "$c" = "$pid" ] || { set -- $(measure $c); clients=$((clients + $1)); }
            done
        fi
        i=$((i + 1))
    done
    # Where sandbox 0's memory is, mapping by mapping (BENCH_RAW=1 shows it).
    awk -v vmm=$vmm '/^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "") ? "[anon]" : $6 }
        /^Size:/ { size = $2 } /^Private_Dirty:/ { pd = $2 }
        /^Pss:/ { pss = $2 }
        /^VmFlags:/ { if (pss > 0) printf "BENCH map %s %s size %d pss %d private_dirty %d\n", vmm, name, size, pss, pd }' \
        "/proc/$(cat "$W/pid-0")/smaps"
    echo "BENCH $vmm pss $total_pss rss $total_rss guest $total_guest clients $clients avail $((before - after))"
    # flint run ends its sandbox and removes its work directory on SIGTERM; the peers get
    # SIGKILL (as in their runs).
    case $vmm in firecracker | cloud-hypervisor) sig=KILL ;; *) sig=TERM ;; esac
    for f in "$W"/pid-*; do kill -$sig "$(cat "$f")" 2>/dev/null || true; done
    t=0
    for f in "$W"/pid-*; do
        while kill -0 "$(cat "$f")" 2>/dev/null && [ $t -lt 60 ]; do sleep 0.5; t=$((t + 1)); done
        kill -KILL "$(cat "$f")" 2>/dev/null && echo "BENCH $vmm $(basename "$f") needed SIGKILL"
    done
    wait
    # a SIGKILLed peer leaves its API and vsock sockets (Cloud Hypervisor a lock file too)
    rm -rf "$W"/fc-*.sock "$W"/fc-*.vsock "$W"/ch-[0-9]*
done
echo "BENCH leftover $(cat /proc/[0-9]*/comm 2>/dev/null | grep -cE '^(flint|baseline|firecracker|cloud-hyperviso|agent-client|fc-sandbox)$') VMM processes, $(find "$W" /tmp/flint-run-* -type s 2>/dev/null | wc -l) sockets"
echo "BENCH done"
SCENARIO

adds=(--add "$target/flint:/bench/flint" --add "$FLINT_CACHE/sandbox/agent-client:/bench/agent-client"
    --add "$kernel:/bench/vmlinux" --add "$FLINT_CACHE/sandbox/initramfs.cpio.gz:/bench/sandbox.cpio.gz"
    --add "$work/fc-sandbox:/bench/fc-sandbox" --add "$(command -v curl):/bench/curl")
[ -z "$baseline" ] || adds+=(--add "$baseline:/bench/baseline")
! has firecracker || adds+=(--add "$peers/firecracker:/bench/firecracker")
! has cloud-hypervisor || adds+=(--add "$peers/cloud-hypervisor:/bench/cloud-hypervisor")
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host ($host_mem MiB)"
    { echo 'BIN=/bench; W=/tmp/bench; mkdir -p $W'; cat "$work/scenario.sh"; } >"$work/nested.sh"
    "$here/nested-host/run.sh" --mem "$host_mem" --timeout $((1200 + 40 * count)) \
        --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG with kvm_amd, no nested paging, $host_mem MiB), $(nproc) host cores; files on its tmpfs"
else
    mkdir -p "$work/bin" "$work/w"
    for ((i = 1; i < ${#adds[@]}; i += 2)); do
        a=${adds[i]}
        cp "${a%%:*}" "$work/bin/${a##*/}"
    done
    BIN=$work/bin W=$work/w timeout $((1200 + 40 * count)) sh "$work/scenario.sh" >"$work/out" 2>&1 ||
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
for vmm in $vmms; do
    n=$(sed -n "s/^BENCH $vmm ready \([0-9]*\) of .*/\1/p" "$work/clean")
    [ "$n" = "$count" ] || { cat "$work/clean"; die "$vmm: only ${n:-0} of $count sandboxes were ready"; }
done
val() { sed -n "s/^BENCH $1 pss .*/&/p" "$work/clean" | awk -v k="$2" '{ for (i = 3; i < NF; i += 2) if ($i == k) print $(i + 1) }'; }
others=
! has firecracker || others="$("$peers/firecracker" --version 2>/dev/null | sed -n 1p)"
! has cloud-hypervisor || others="${others:+$others; }$("$peers/cloud-hypervisor" --version 2>/dev/null | sed -n 1p) (restore: memory_restore_mode $ch_mode)"
echo "density, $(tr ' ' '\n' <<<"$vmms" | paste -sd, | sed 's/,/, /g'), $(date -u +%Y-%m-%d): $count idle sandboxes restored from one snapshot, 20 s after the last was ready"
echo "where: $where"
echo "guest: the sandbox image, 1 vCPU, 128 MiB each; kernel: $kernel${others:+; other VMMs: $others (+ agent-client per sandbox)}; host transparent huge pages: $(sed -n 's/^BENCH thp //p' "$work/clean")"
echo "left in the benchmark host at the end: $(sed -n 's/^BENCH leftover //p' "$work/clean")"
[ -z "$baseline" ] || echo "baseline: $baseline"
echo "load (this machine) at the start: ${load_before##*load average: }; at the end: $(uptime | sed 's/.*load average: //')"
mib() { awk -v k="$1" 'BEGIN { printf "%.0f MiB", k / 1024 }'; }
per() { awk -v k="$1" -v n="$count" 'BEGIN { printf "%.0f KiB", k / n }'; }
# The median process's PSS beyond its guest mapping.
median_over() {
    sed -n "s/^BENCH one $1 [0-9]* pss \([0-9]*\) rss [0-9]* guest \([0-9]*\)$/\1 \2/p" "$work/clean" |
        awk '{ print $1 - $2 }' | sort -n | awk '{ v[NR] = $1 } END { printf "%d KiB", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
label() {
    case $1 in
    baseline) echo "flint run (baseline)" ;;
    flint) echo "flint run" ;;
    firecracker) echo "Firecracker" ;;
    cloud-hypervisor) echo "Cloud Hypervisor" ;;
    esac
}
row() { # label cell...
    printf '| %-66s' "$1"
    shift
    for c in "$@"; do printf ' | %-20s' "$c"; done
    printf ' |\n'
}
over() { echo "$(per $(($(val "$1" pss) - $(val "$1" guest)))); $(median_over "$1")"; }
clients() { if [ "$1" = firecracker ] || [ "$1" = cloud-hypervisor ]; then mib "$(val "$1" clients)"; else printf -- '-'; fi; }
pss() { mib "$(val "$1" pss)"; }
guest() { mib "$(val "$1" guest)"; }
guest_per() { per "$(val "$1" guest)"; }
rss() { mib "$(val "$1" rss)"; }
avail() { mib "$(val "$1" avail)"; }
table_row() { # label function
    local cells=() v
    for v in $vmms; do cells+=("$("$2" "$v")"); done
    row "$1" "${cells[@]}"
}
table_row "figure ($count sandboxes)" label
table_row "VMM processes, PSS summed" pss
table_row "· of it guest memory mappings" guest
table_row "· guest memory per sandbox (PSS)" guest_per
table_row "· VMM overhead beyond guest pages, per sandbox (PSS; mean; median)" over
table_row "agent-client processes, PSS summed (in flint run's process)" clients
table_row "VMM processes, RSS summed (shared pages counted per process)" rss
table_row "host MemAvailable drop (incl. KVM and page cache)" avail
