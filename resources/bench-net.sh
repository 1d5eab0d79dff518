#!/usr/bin/env bash
# Network benchmark (not a test). One guest with a virtio-net NIC on a TAP and a vsock device
# measures, once per boot:
#   - TCP throughput host -> guest and guest -> host: MIB (default 100) through vsock-io
#     (64 KiB per system call; busybox nc moves a few KiB per call and measures itself),
#     timed from the first byte received to the end of the stream;
#   - vsock throughput both ways: MIB through vsock-io (guest AF_VSOCK <-> the VMM's Unix
#     socket on the host, or the host's AF_VSOCK under QEMU), timed the same way;
#   - per TCP transfer, the guest's virtio interrupts and its eth0 frames (from
#     /proc/interrupts and /proc/net/dev before and after), as interrupts per 1000 frames;
# and in the first round only: ping round-trip latency (min/avg/max over N pings, 200 ms
# apart) and, as the ceiling of this rig, how fast the same tools move bytes through a pipe in
# the guest (generating and checksumming cost guest CPU too).
# Each VMM boots the same kernel, initramfs and command line on the same TAP with the same
# tools: flint; `--flint-base BIN`, a second flint binary (e.g. the previous commit's) as
# "flint-base"; Firecracker (from --peers, default ../shared/peers: `--no-api --config-file`
# with the NIC on the same TAP and its vsock, whose host side speaks flint's protocol); Cloud
# Hypervisor (same --peers: `--net tap=` on the same TAP, virtio over PCI, and its hybrid
# vsock, `--vsock cid=3,socket=`, the same protocol again); and QEMU's microvm machine with
# vhost-net and vhost-vsock. RUNS rounds, one boot per VMM per round, the order rotating each
# round so that drifting load hits all alike; medians.
#
# Cloud Hypervisor has no virtio-mmio transport, and the project's guest kernel has no virtio
# over PCI; with cloud-hypervisor in --vmms every VMM boots the kernel of
# `build-guest-kernel-pci.sh` (the same kernel plus virtio-pci and MSI; flint, Firecracker
# and QEMU with pci=off as always, Cloud Hypervisor without, its ELF vmlinux, the others its
# bzImage). The vsock receivers are told the byte count (`vsock-io --recv --expect`) and close
# when they have it: Firecracker's device does not pass a guest's half-close
# (`shutdown(SHUT_WR)`) on to the host's Unix socket, so a receiver waiting for the end of the
# stream would wait forever (that hung this script's vsock step under Firecracker).
#
# With --profile, every boot also records where the TCP transfers' time goes, in counts and CPU
# times that machine load does not change much (the host and guest hand over through a sync
# connection before and after each transfer, so the snapshots bracket it): the guest's CPU busy
# share (/proc/stat), each VMM thread's CPU time (/proc/PID/task/*/{stat,schedstat}; threads
# with guest time are vCPUs), KVM's exit counters for the VM (debugfs, the same for every VMM),
# the TAP's frames and bytes each way (average frame size: TSO/GSO in effect or not) and the
# guest's interrupts, all per MiB; with --syscalls also the VMM's system calls per MiB by kind
# and thread (perf stat counting syscall tracepoints in the kernel: cheap, the transfer keeps
# its pace), with --strace the same from strace -c -f (which slows the VMM so much that its
# frames and calls per MiB change: for a look at rare calls only).
#
# usage: resources/bench-net.sh [-n RUNS] [--tcp-mib MIB] [--vsock-mib MIB|0] [--pings N]
#                               [--vmms LIST] [--flint-base BIN] [--peers DIR]
#                               [--profile] [--syscalls] [--strace] [--from-log FILE]
#   --from-log FILE: no run; print the tables from FILE, the output of an earlier run made with
#                    BENCH_RAW=1 in the environment (give the same options as that run)
#   --vmms LIST: comma-separated, from flint, flint-base, firecracker, cloud-hypervisor, qemu
#                (default: flint, firecracker, cloud-hypervisor, qemu, plus flint-base when
#                --flint-base is given)
#
# Where the local /dev/kvm cannot boot Linux (PVM), everything runs inside the nested KVM host
# (resources/nested-host/run.sh); timings there are only comparable with other timings taken
# in the same rig. On hardware KVM it runs here, as root, in a network namespace of its own.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=3
tcp_mib=100
vsock_mib=100
pings=20
vmms=
flint_base=
peers=$here/../../shared/peers
profile=0
strace=0
perf=0
from_log=
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --tcp-mib) tcp_mib=${2:?}; shift ;;
    --vsock-mib) vsock_mib=${2:?}; shift ;;
    --pings) pings=${2:?}; shift ;;
    --vmms) vmms=${2:?}; shift ;;
    --flint-base) flint_base=$(realpath "${2:?}"); shift ;;
    --peers) peers=${2:?}; shift ;;
    --profile) profile=1 ;;
    --strace) profile=1 strace=1 ;;
    --syscalls) profile=1 perf=1 ;;
    --from-log) from_log=$(realpath "${2:?}"); shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
for v in "$runs" "$tcp_mib" "$pings"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || die "counts and sizes are positive integers, got '$v'"
done
[[ $vsock_mib =~ ^(0|[1-9][0-9]*)$ ]] || die "--vsock-mib takes a size in MiB (0: no vsock runs), got '$vsock_mib'"

if [ -z "$vmms" ]; then
    vmms=flint,firecracker,cloud-hypervisor,qemu
    [ -z "$flint_base" ] || vmms=flint,flint-base,firecracker,cloud-hypervisor,qemu
fi
for v in ${vmms//,/ }; do
    case $v in
    flint | qemu) ;;
    flint-base) [ -x "$flint_base" ] || die "--vmms has flint-base: give its binary with --flint-base" ;;
    firecracker) [ -x "$peers/firecracker" ] || die "no Firecracker binary at $peers/firecracker (--peers)" ;;
    cloud-hypervisor) [ -x "$peers/cloud-hypervisor" ] || die "no Cloud Hypervisor binary at $peers/cloud-hypervisor (--peers)" ;;
    *) die "unknown VMM '$v' in --vmms (flint, flint-base, firecracker, cloud-hypervisor, qemu)" ;;
    esac
done

if [ -n "$from_log" ]; then
    kernel_dir="(from $from_log)"
    where="(from $from_log)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    tr -d '\r' <"$from_log" | sed 's/^live [a-z-]*: //' >"$work/clean"
else
ensure_packages iproute2 cpio busybox-static
kernel_dir=$FLINT_CACHE/guest
if [[ ,$vmms, == *,cloud-hypervisor,* ]]; then
    "$here/build-guest-kernel-pci.sh"
    kernel_dir=$FLINT_CACHE/pci/guest
else
    "$here/build-guest-kernel.sh"
fi
"$here/build-guest-initramfs.sh"
target=${CARGO_TARGET_DIR:-$here/../target}
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet --bin flint)
flint=$target/release/flint
log "building vsock-io (release, static)"
(cd "$here/.." && CARGO_ENCODED_RUSTFLAGS=-Ctarget-feature=+crt-static cargo build --release \
    --quiet -p guest-tools --bin vsock-io --target x86_64-unknown-linux-gnu \
    --target-dir "$target/guest-tools")
tool=$target/guest-tools/x86_64-unknown-linux-gnu/release/vsock-io
ldd "$tool" 2>&1 | grep -qE 'statically linked|not a dynamic executable' ||
    die "$tool is not static (the guest has no libc); is libc6-dev installed?"
ip=$(command -v ip || true)
[ -x "$ip" ] || die "iproute2's ip not found"
guest=$FLINT_CACHE/guest

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Guest side: /tools/bench.sh and /tools/vsock-io appended to the test initramfs.
mkdir -p "$work/extra/tools"
cp "$tool" "$work/extra/tools/vsock-io"
cat >"$work/extra/tools/bench.sh" <<'GUEST'
T=/tools/vsock-io
ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0
i=0
while [ $i -lt 90 ] && ! ping -c 1 -W 1 10.0.0.1 >/dev/null 2>&1; do i=$((i + 1)); done
# counts: virtio interrupts (all devices; only the NIC is busy during a TCP transfer), eth0's
# received and sent frames and bytes, the guest CPU's busy and idle ticks
counts() {
    irq=$(awk '/virtio/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts)
    pk=$(awk -F'[: ]+' '/eth0:/ { print $4, $12, $3, $11 }' /proc/net/dev)
    cpu=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat)
    echo "$irq $pk $cpu"
}
# sync: with PROFILE=1, tell the host a transfer comes next (or has ended) so it can take its
# snapshots around it
sync() { [ "$PROFILE" != 1 ] || $T connect tcp:10.0.0.1:5100 --send 1 --retry 30 >/dev/null; }
if [ "$FIRST" = 1 ]; then
    echo "BENCH guest-pipe $($T gen ${TCP}M | $T sum)"
    ping -c "$PINGS" -i 0.2 10.0.0.1 | sed -n 's/^round-trip/BENCH ping &/p'
fi
# the NIC's negotiated feature bits (virtio device id 1), as the guest sees them
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" != 0x0001 ] || echo "BENCH net-features $(cat "$d/features")"
done
echo "BENCH-STEP TCP"
sync
a=$(counts)
timeout "$LIMIT" $T connect tcp:10.0.0.1:5101 --recv --retry 30 | sed 's/^/BENCH tcp-h2g /'
b=$(counts)
sync
b2=$(counts)
timeout "$LIMIT" $T connect tcp:10.0.0.1:5102 --send ${TCP}M --seed 1 --retry 30 >/dev/null
c=$(counts)
echo "BENCH counts tcp-h2g $a $b"
echo "BENCH counts tcp-g2h $b2 $c"
if [ "$VSOCK" != 0 ]; then
    echo "BENCH-STEP vsock guest -> host"
    timeout "$LIMIT" $T connect vsock:2:6000 --send ${VSOCK}M --seed 1 --retry 30 >/dev/null
    timeout "$LIMIT" $T listen vsock:5000 --conns 1 --recv --expect ${VSOCK}M | sed 's/^/BENCH vsock-h2g /' &
    sleep 1
fi
echo BENCH-VSOCK-READY
wait
GUEST
cp "$guest/initramfs.cpio.gz" "$work/initramfs-bench.cpio"
# An uncompressed archive after the gzip'ed one has to start at a multiple of 4 bytes.
truncate -s %4 "$work/initramfs-bench.cpio"
make_initramfs "$work/extra" "$work/extra.cpio" none
cat "$work/extra.cpio" >>"$work/initramfs-bench.cpio"

# LIMIT: seconds for any one step (at 1 MiB/s at worst)
limit=$((60 + tcp_mib + vsock_mib))
exec_script="PROFILE=$profile TCP=$tcp_mib VSOCK=$vsock_mib PINGS=$pings LIMIT=$limit sh /tools/bench.sh"
cmdline_of() { # FIRST
    printf '%s' "console=ttyS0 reboot=k panic=1 pci=off acpi=off quiet flint.exec="
    printf '%s' "FIRST=$1 $exec_script" | base64 -w0
}

# The other VMM: QEMU's microvm machine with the fastest back ends it has for these devices,
# vhost-net for the NIC and vhost-vsock (the host side is then AF_VSOCK, not a Unix socket).
qemu=/usr/bin/qemu-system-x86_64
qemu_args="-M microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=off,pic=off,acpi=off \
-enable-kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config -nographic -serial stdio \
-no-reboot -netdev tap,id=n0,ifname=flbench0,script=no,downscript=no,vhost=on \
-device virtio-net-device,netdev=n0 -device vhost-vsock-device,guest-cid=3"

cat >"$work/scenario.sh" <<SCENARIO
# Runs in the benchmark host (nested or direct); \$BIN points at the files, \$W is scratch.
RUNS=$runs
TCP=$tcp_mib
VSOCK=$vsock_mib
VMMS='${vmms//,/ }'
CMDLINE_FIRST='$(cmdline_of 1)'
CMDLINE_REST='$(cmdline_of 0)'
VSOCK_BYTES=$((vsock_mib * 1048576))
QEMU_ARGS='$qemu_args'
PROFILE=$profile
STRACE=$strace
PERF=$perf
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
IP=$BIN/ip
T=$BIN/vsock-io
NSN=flint-bench-$$
"$IP" netns add "$NSN" || { echo "BENCH-FAILED cannot create a network namespace"; exit 1; }
NS="$IP netns exec $NSN"
cleanup() {
    for p in $(jobs -p); do kill "$p" 2>/dev/null; done
    "$IP" netns del "$NSN" 2>/dev/null
}
trap cleanup EXIT
$NS "$IP" link set lo up
$NS "$IP" tuntap add dev flbench0 mode tap
$NS "$IP" addr add 10.0.0.1/24 dev flbench0
$NS "$IP" link set flbench0 up
if [ "$PROFILE" = 1 ]; then
    [ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    [ -d /sys/kernel/debug/kvm ] || echo "BENCH-NOTE no KVM debugfs: no exit counts"
    [ "$PERF" != 1 ] || [ -d /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
fi
# system calls counted with --syscalls
SYSCALLS="read readv write writev ioctl futex epoll_wait epoll_pwait clock_gettime poll ppoll recvfrom sendto recvmsg sendmsg"
EVENTS=
for c in $SYSCALLS; do EVENTS="$EVENTS${EVENTS:+,}syscalls:sys_enter_$c"; done

# snap NAME: one snapshot for --profile, into $D/prof: wall time, each VMM thread's CPU time
# (stat: utime stime guest_time in ticks; schedstat: run time in ns), the TAP's counters, the
# VM's KVM exit counters.
snap() {
    {
        echo "BENCH prof $1 wall $(cut -d' ' -f1 /proc/uptime)"
        # the whole benchmark host's CPUs: busy (user nice system irq softirq) and idle ticks
        echo "BENCH prof $1 host $(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat)"
        for t in /proc/$VMM_PID/task/*; do
            st=$(sed 's/^.*) //' "$t/stat")
            # fields after "pid (comm) ": 12 utime, 13 stime, 41 guest_time
            echo "BENCH prof $1 thread ${t##*/} $(tr ' ' _ <"$t/comm") $(echo "$st" | cut -d' ' -f12,13,41) $(cut -d' ' -f1 "$t/schedstat")"
        done
        s=/sys/class/net/flbench0/statistics
        echo "BENCH prof $1 tap $($NS cat $s/rx_packets $s/rx_bytes $s/tx_packets $s/tx_bytes | tr '\n' ' ')"
        for k in /sys/kernel/debug/kvm/$VMM_PID-*; do
            [ -d "$k" ] || continue
            printf 'BENCH prof %s kvm' "$1"
            for f in exits io_exits mmio_exits halt_exits irq_exits irq_window_exits irq_injections \
                halt_wakeup signal_exits request_irq_exits; do
                [ -f "$k/$f" ] && printf ' %s=%s' "$f" "$(cat "$k/$f")"
            done
            echo
        done
    } >>"$D/prof"
}
# profile: the host's side of the TCP transfers with --profile: waits for the guest's sync,
# snapshots, runs the transfer (and strace with --strace), snapshots again.
profile() {
    for dir in h2g g2h; do
        $NS "$T" listen tcp:5100 --conns 1 --recv >/dev/null 2>&1 || return
        snap "$dir-a"
        sp=
        if [ "$STRACE" = 1 ]; then
            "$BIN/strace" -c -f -q -p "$VMM_PID" -o "$D/strace-$dir" 2>/dev/null &
            sp=$!
            sleep 0.3
        elif [ "$PERF" = 1 ]; then
            "$BIN/perf" stat -x, --per-thread -e "$EVENTS" -p "$VMM_PID" -o "$D/perf-$dir" 2>"$D/perf-err-$dir" &
            sp=$!
            sleep 0.3
        fi
        if [ $dir = h2g ]; then
            $NS "$T" listen tcp:5101 --conns 1 --send ${TCP}M >/dev/null 2>&1
        else
            $NS "$T" listen tcp:5102 --conns 1 --recv >"$D/tcp-g2h" 2>&1
        fi
        snap "$dir-b"
        [ -z "$sp" ] || { kill -INT "$sp"; wait "$sp"; }
    done
}

# bench VMM ROUND: one boot of the guest under VMM; its results follow "BENCH-VMM VMM".
bench() {
    vmm=$1
    D=$W/$vmm-$2
    mkdir -p "$D"
    CMDLINE=$CMDLINE_REST
    [ "$2" != 0 ] || CMDLINE=$CMDLINE_FIRST
    if [ "$PROFILE" != 1 ]; then
        $NS "$T" listen tcp:5101 --conns 1 --send ${TCP}M >/dev/null 2>&1 &
        $NS "$T" listen tcp:5102 --conns 1 --recv >"$D/tcp-g2h" 2>&1 &
    fi
    case $vmm in
    flint | flint-base)
        "$T" listen unix:"$D/v.sock_6000" --conns 1 --recv --expect "$VSOCK_BYTES" >"$D/vsock-g2h" 2>&1 &
        $NS "$BIN/$vmm" boot --kernel "$BIN/bzImage" --initrd "$BIN/initramfs-bench.cpio" \
            --memory 256 --net tap=flbench0 --vsock cid=3,uds="$D/v.sock" --cmdline "$CMDLINE" \
            </dev/null >"$D/guest.out" 2>"$D/guest.err" &
        to_guest="flint:$D/v.sock:5000"
        ;;
    firecracker)
        "$T" listen unix:"$D/v.sock_6000" --conns 1 --recv --expect "$VSOCK_BYTES" >"$D/vsock-g2h" 2>&1 &
        cat >"$D/fc.json" <<FC_JSON
{"boot-source": {"kernel_image_path": "$BIN/bzImage",
                 "initrd_path": "$BIN/initramfs-bench.cpio",
                 "boot_args": "$CMDLINE"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "flbench0"}],
 "vsock": {"guest_cid": 3, "uds_path": "$D/v.sock"},
 "drives": []}
FC_JSON
        $NS "$BIN/firecracker" --no-api --config-file "$D/fc.json" --level Error \
            </dev/null >"$D/guest.out" 2>"$D/guest.err" &
        to_guest="flint:$D/v.sock:5000"
        ;;
    cloud-hypervisor)
        "$T" listen unix:"$D/v.sock_6000" --conns 1 --recv --expect "$VSOCK_BYTES" >"$D/vsock-g2h" 2>&1 &
        # virtio over PCI: the same command line without pci=off; the guest's reset (it
        # reboots at the end) would restart it, so it is stopped after its exit marker below.
        $NS "$BIN/cloud-hypervisor" --kernel "$BIN/vmlinux" --initramfs "$BIN/initramfs-bench.cpio" \
            --cmdline "$(echo "$CMDLINE" | sed 's/ pci=off//')" --cpus boot=1 --memory size=256M \
            --net tap=flbench0,ip=10.0.0.1,mask=255.255.255.0 --vsock cid=3,socket="$D/v.sock" \
            --serial tty --console off </dev/null >"$D/guest.out" 2>"$D/guest.err" &
        to_guest="flint:$D/v.sock:5000"
        ;;
    qemu)
        "$T" listen vsock:6000 --conns 1 --recv --expect "$VSOCK_BYTES" >"$D/vsock-g2h" 2>&1 &
        # shellcheck disable=SC2086
        $NS "$QEMU" $QEMU_ARGS -kernel "$BIN/bzImage" -initrd "$BIN/initramfs-bench.cpio" \
            -append "$CMDLINE reboot=t" </dev/null >"$D/guest.out" 2>"$D/guest.err" &
        to_guest="vsock:3:5000"
        ;;
    esac
    VMM_PID=$!
    [ "$PROFILE" != 1 ] || profile &
    # the guest's console, live (progress on the nested host's console)
    tail -f "$D/guest.out" 2>/dev/null | sed "s/^/live $vmm: /" &
    i=0
    while [ $i -lt 3000 ] && ! grep -q BENCH-VSOCK-READY "$D/guest.out" 2>/dev/null &&
        kill -0 $VMM_PID 2>/dev/null; do
        sleep 1
        i=$((i + 1))
    done
    [ "$VSOCK" = 0 ] ||
        timeout 600 "$T" connect "$to_guest" --send ${VSOCK}M --seed 1 --retry 30 >/dev/null
    if [ "$vmm" = cloud-hypervisor ]; then
        i=0
        while [ $i -lt 600 ] && ! grep -q FLINT-GUEST-EXIT "$D/guest.out" 2>/dev/null &&
            kill -0 $VMM_PID 2>/dev/null; do
            sleep 1
            i=$((i + 1))
        done
        sleep 1
        kill $VMM_PID 2>/dev/null
    fi
    wait $VMM_PID
    status=$?
    sleep 1
    # Listeners still waiting (when the guest ended early) must not hold up the run.
    for p in $(jobs -p); do kill "$p" 2>/dev/null; done
    wait
    echo "BENCH-VMM $vmm"
    cat "$D/guest.out"
    sed 's/^/BENCH tcp-g2h /' "$D/tcp-g2h"
    sed 's/^/BENCH vsock-g2h /' "$D/vsock-g2h"
    [ ! -f "$D/prof" ] || cat "$D/prof"
    for dir in h2g g2h; do
        [ ! -f "$D/strace-$dir" ] || sed "s/^/BENCH strace $dir /" "$D/strace-$dir"
        [ ! -f "$D/perf-$dir" ] || sed "s/^/BENCH perf $dir /" "$D/perf-$dir" "$D/perf-err-$dir"
    done
    echo "BENCH-VMM-END $vmm round $2: $(grep -h 'vsock-io: conn' "$D/guest.out" "$D/tcp-g2h" "$D/vsock-g2h" | tr -d '\r' | sed -n 's/.*bytes=\([0-9]*\) .*secs=\([0-9.]*\) ok$/\1 \2/p' | awk '$2 > 0 { printf "%.0f ", $1 / $2 / 1048576 }')MiB/s"
    # Firecracker's exit status on the guest's reset is not 0, and Cloud Hypervisor was
    # stopped; the guest's marker says it all.
    [ "$vmm" = firecracker ] || [ "$vmm" = cloud-hypervisor ] && status=0
    if [ $status -ne 0 ] || ! grep -q 'FLINT-GUEST-EXIT 0' "$D/guest.out"; then
        echo "BENCH-FAILED $vmm status $status"
        cat "$D/guest.err"
        exit 1
    fi
}
echo "BENCH-QEMU-VERSION $("$QEMU" --version | head -n1)"
[ -x "$BIN/firecracker" ] && echo "BENCH-FC-VERSION $("$BIN/firecracker" --version 2>&1 | head -n1)"
[ -x "$BIN/cloud-hypervisor" ] && echo "BENCH-CH-VERSION $("$BIN/cloud-hypervisor" --version 2>&1 | head -n1)"
set -- $VMMS
n=$#
r=0
while [ $r -lt "$RUNS" ]; do
    # rotate: round r starts with the (r mod n)-th VMM
    k=0
    while [ $k -lt $n ]; do
        j=$(((r + k) % n + 1))
        eval "bench \${$j} $r"
        k=$((k + 1))
    done
    r=$((r + 1))
done
SCENARIO

files=("$flint:flint" "$kernel_dir/bzImage:bzImage" "$kernel_dir/vmlinux:vmlinux" "$work/initramfs-bench.cpio:initramfs-bench.cpio"
    "$tool:vsock-io" "$ip:ip")
[ -z "$flint_base" ] || files+=("$flint_base:flint-base")
[[ ,$vmms, != *,firecracker,* ]] || files+=("$peers/firecracker:firecracker")
[[ ,$vmms, != *,cloud-hypervisor,* ]] || files+=("$peers/cloud-hypervisor:cloud-hypervisor")
if [ "$perf" = 1 ]; then
    s=$(command -v perf || true)
    [ -x "$s" ] || die "--syscalls needs perf on this machine (it is copied into the benchmark host)"
    files+=("$s:perf")
fi
if [ "$strace" = 1 ]; then
    s=$(command -v strace || true)
    [ -x "$s" ] || die "--strace needs strace on this machine (it is copied into the benchmark host)"
    files+=("$s:strace")
fi
nv=$(tr , "\n" <<<"$vmms" | wc -l)
budget=$((600 + runs * nv * (120 + 2 * tcp_mib + 2 * vsock_mib)))
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running the benchmark inside the nested KVM host"
    {
        echo "BIN=/bench; W=/tmp; QEMU=$qemu"
        cat "$work/scenario.sh"
    } >"$work/nested.sh"
    adds=(--add "$qemu:$qemu" --add /usr/share/qemu:/usr/share/qemu)
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    "$here/nested-host/run.sh" --timeout "$budget" --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    [ "$(id -u)" -eq 0 ] || die "run as root: the benchmark creates a TAP in a network namespace"
    modprobe -a vhost_net vhost_vsock 2>/dev/null || true
    mkdir -p "$work/bin" "$work/w"
    for f in "${files[@]}"; do ln -s "$(realpath "${f%%:*}")" "$work/bin/${f##*:}"; done
    BIN=$work/bin W=$work/w QEMU=$qemu timeout "$budget" sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

tr -d '\r' <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
fi

# rates VMM NAME: MiB/s per run of VMM's BENCH NAME vsock-io lines (bytes / secs).
rates() {
    awk -v vmm="$1" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" |
        { grep -E "^BENCH $2 vsock-io: .* ok\$" || true; } |
        sed -n 's/.* bytes=\([0-9]*\) .* secs=\([0-9.]*\) ok$/\1 \2/p' |
        awk '$2 > 0 { printf "%.2f\n", $1 / $2 / 1048576 }'
}
# median: "median (min-max)" of the numbers on stdin, or "-".
median() {
    sort -n | awk '{ m[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        printf "%.0f (%.0f-%.0f)\n", m[int((NR + 1) / 2)], m[1], m[NR] }'
}
# irqs VMM NAME: guest interrupts per 1000 eth0 frames (both directions) per TCP transfer.
irqs() {
    awk -v vmm="$1" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" |
        awk -v name="$2" '$1 == "BENCH" && $2 == "counts" && $3 == name {
            f = ($12 - $5) + ($13 - $6); if (f > 0) printf "%.1f\n", ($11 - $4) * 1000 / f }' |
        sort -n | awk '{ m[NR] = $1 } END { if (NR == 0) print "-"; else print m[int((NR + 1) / 2)] }'
}
# frames VMM NAME: eth0 frames (both directions) per MiB moved, median.
frames() {
    awk -v vmm="$1" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" |
        awk -v name="$2" -v mib="$tcp_mib" '$1 == "BENCH" && $2 == "counts" && $3 == name {
            printf "%.0f\n", (($12 - $5) + ($13 - $6)) / mib }' |
        sort -n | awk '{ m[NR] = $1 } END { if (NR == 0) print "-"; else print m[int((NR + 1) / 2)] }'
}
# features VMM: the NIC's negotiated virtio features (bit numbers) in VMM's first boot.
features() {
    awk -v vmm="$1" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" |
        sed -n 's/^BENCH net-features //p' | head -n1 |
        awk '{ s = ""; for (i = 1; i <= length($1); i++) if (substr($1, i, 1) == "1") s = s (s == "" ? "" : " ") (i - 1); print (s == "" ? "-" : s) }'
}
ping_avg() {
    awk -v vmm="$1" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" |
        sed -n 's/^BENCH ping round-trip min\/avg\/max = \(.*\)$/\1/p' | head -n1 |
        awk -F/ '{ printf "%s ms\n", $2 }'
}

vmm_list=${vmms//,/ }
# peers: the columns flint is divided by
peers_in=
for p in firecracker cloud-hypervisor; do
    [[ " $vmm_list " != *" $p "* ]] || peers_in="$peers_in $p"
done
[[ " $vmm_list " == *" flint "* ]] || peers_in=
echo "flint network benchmark, $(date -u +%Y-%m-%d): TCP ${tcp_mib} MiB and vsock ${vsock_mib} MiB per boot, $runs rounds (one boot per VMM per round, order rotating)"
echo "where: $where; guest: 1 vCPU, 256 MiB, one TAP, vsock-io on both ends"
echo "guest kernel: $kernel_dir (the same for all VMMs)"
[[ " $vmm_list " != *" qemu "* ]] ||
    echo "qemu: $(sed -n 's/.*BENCH-QEMU-VERSION //p' "$work/clean" | head -n1), microvm, vhost-net, vhost-vsock"
[[ " $vmm_list " != *" firecracker "* ]] ||
    echo "firecracker: $(sed -n 's/.*BENCH-FC-VERSION //p' "$work/clean" | head -n1)"
[[ " $vmm_list " != *" cloud-hypervisor "* ]] ||
    echo "cloud-hypervisor: $(sed -n 's/.*BENCH-CH-VERSION //p' "$work/clean" | head -n1), virtio-pci"
echo "MiB/s: median (min-max) of $runs; irq/kframe: guest virtio interrupts per 1000 eth0 frames"
echo
{
    printf '| figure |'
    for v in $vmm_list; do printf ' %s |' "$v"; done
    for p in $peers_in; do printf ' flint / %s |' "$p"; done
    echo
    printf '|---|'
    for v in $vmm_list $peers_in; do printf -- '---|'; done
    echo
    for fig in tcp-h2g:"TCP host -> guest" tcp-g2h:"TCP guest -> host" \
        vsock-h2g:"vsock host -> guest" vsock-g2h:"vsock guest -> host"; do
        name=${fig%%:*}
        printf '| %s, MiB/s |' "${fig#*:}"
        for v in $vmm_list; do printf ' %s |' "$(rates "$v" "$name" | median)"; done
        for p in $peers_in; do
            f=$(rates flint "$name" | median | cut -d' ' -f1)
            c=$(rates "$p" "$name" | median | cut -d' ' -f1)
            awk -v f="$f" -v c="$c" 'BEGIN { if (c > 0 && f > 0) printf " %.2fx |", f / c; else printf " - |" }'
        done
        echo
        case $name in tcp-*)
            printf '| %s, irq/kframe (frames/MiB) |' "${fig#*:}"
            for v in $vmm_list; do printf ' %s (%s) |' "$(irqs "$v" "$name")" "$(frames "$v" "$name")"; done
            for p in $peers_in; do printf ' |'; done
            echo
            ;;
        esac
    done
    printf '| ping round trip, avg |'
    for v in $vmm_list; do printf ' %s |' "$(ping_avg "$v")"; done
    for p in $peers_in; do printf ' |'; done
    echo
    printf '| pipe in the guest (ceiling), MiB/s |'
    for v in $vmm_list; do printf ' %s |' "$(rates "$v" guest-pipe | median)"; done
    for p in $peers_in; do printf ' |'; done
    echo
}

[ "$profile" = 1 ] || exit 0
# prof VMM: "DIR METRIC VALUE" per boot of VMM, from its --profile snapshots and counts.
prof() {
    awk -v vmm="$1" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" | awk -v mib="$tcp_mib" '
    function flush(   d, t, ns, vcpu_ns, oth_ns, gt, ut, best, bestn, secs, k) {
        if (!have) return
        for (d in dirs) {
            secs = sec[d]
            vcpu_ns = 0; oth_ns = 0; gt = 0; ut = 0; best = 0; bestn = "-"
            for (t in tb) {
                split(t, p, SUBSEP); if (p[1] != d) continue
                split(ta[t], A, " "); split(tb[t], B, " ")
                ns = B[5] - A[5]
                if (B[4] > 0) { vcpu_ns += ns; gt += B[4] - A[4]; ut += (B[2] + B[3]) - (A[2] + A[3]) }
                else {
                    oth_ns += ns
                    if (ns > best) { best = ns; bestn = B[1] }
                    th[d, B[1]] += ns
                }
            }
            for (k in th) { split(k, p, SUBSEP); if (p[1] == d) print d, "thread:" p[2], th[k] / 1e6 / mib }
            print d, "vcpu_ms", vcpu_ns / 1e6 / mib
            print d, "vcpu_guest_ms", gt * 10 / mib
            print d, "vcpu_host_ms", (ut - gt) * 10 / mib
            print d, "vmm_ms", oth_ns / 1e6 / mib
            if (secs > 0) {
                print d, "busiest_pct", best / 1e7 / secs
                print d, "vcpu_pct", vcpu_ns / 1e7 / secs
            }
            if (d in hbb) {
                hb = hbb[d] - hba[d]; hi = hib[d] - hia[d]
                print d, "host_busy_ms", hb * 10 / mib
                if (hb + hi > 0) print d, "host_busy_pct", hb * 100 / (hb + hi)
            }
            split(tapa[d], A, " "); split(tapb[d], B, " ")
            print d, "tap_rx_frames", (B[1] - A[1]) / mib
            if (B[1] > A[1]) print d, "tap_rx_bytes_per_frame", (B[2] - A[2]) / (B[1] - A[1])
            print d, "tap_tx_frames", (B[3] - A[3]) / mib
            if (B[3] > A[3]) print d, "tap_tx_bytes_per_frame", (B[4] - A[4]) / (B[3] - A[3])
            for (k in kb) { split(k, p, SUBSEP); if (p[1] == d) print d, "kvm:" p[2], (kb[k] - ka[k]) / mib }
        }
        for (k in sc) { split(k, p, SUBSEP); print p[1], "sys:" p[2], sc[k] / mib }
        for (k in pt) { split(k, p, SUBSEP); if (pt[k] > 0) print p[1], "sys:" p[2], pt[k] / mib }
        delete ta; delete tb; delete tapa; delete tapb; delete ka; delete kb; delete th; delete sc; delete pt; delete sec; delete hba; delete hbb; delete hia; delete hib
        have = 0
    }
    $1 == "BENCH-VMM-END" { flush() }
    $1 == "BENCH" && $2 == "counts" {
        d = substr($3, 5); dirs[d] = 1
        busy = $16 - $9; idle = $17 - $10
        if (busy + idle > 0) print d, "guest_busy_pct", busy * 100 / (busy + idle)
        print d, "guest_irqs", ($11 - $4) / mib
        print d, "guest_rx_frames", ($12 - $5) / mib
        print d, "guest_tx_frames", ($13 - $6) / mib
        if ($12 > $5) print d, "guest_rx_bytes_per_frame", ($14 - $7) / ($12 - $5)
        if ($13 > $6) print d, "guest_tx_bytes_per_frame", ($15 - $8) / ($13 - $6)
    }
    $1 == "BENCH" && ($2 == "tcp-h2g" || $2 == "tcp-g2h") && / ok$/ {
        s = $0; sub(/.*secs=/, "", s); sub(/ .*/, "", s); sec[substr($2, 5)] = s
        if (s > 0) print substr($2, 5), "mibps", mib / s
    }
    $1 == "BENCH" && $2 == "prof" {
        have = 1
        split($3, p, "-"); d = p[1]; ab = p[2]
        if ($4 == "thread") { v = $6 " " $7 " " $8 " " $9 " " $10; if (ab == "a") ta[d, $5] = v; else tb[d, $5] = v }
        else if ($4 == "host") { if (ab == "a") { hba[d] = $5; hia[d] = $6 } else { hbb[d] = $5; hib[d] = $6 } }
        else if ($4 == "tap") { v = $5 " " $6 " " $7 " " $8; if (ab == "a") tapa[d] = v; else tapb[d] = v }
        else if ($4 == "kvm") for (i = 5; i <= NF; i++) { split($i, kv, "="); if (ab == "a") ka[d, kv[1]] = kv[2]; else kb[d, kv[1]] = kv[2] }
    }
    # strace -c rows: % time, seconds, usecs/call, calls, [errors,] syscall
    $1 == "BENCH" && $2 == "strace" && $4 ~ /^[0-9.]+$/ && $NF ~ /^[a-z_0-9]+$/ && $NF != "total" { sc[$3, $NF] += $7 }
    # perf stat -x, --per-thread rows: COMM-TID,COUNT,UNIT,EVENT,...
    $1 == "BENCH" && $2 == "perf" && /,syscalls:sys_enter_/ {
        # the thread name may hold spaces (Firecracker'"'"'s "fc_vcpu 0")
        line = $0; sub(/^BENCH perf [a-z0-9]+ +/, "", line); gsub(/ /, "_", line)
        n = split(line, f, ","); if (f[2] !~ /^[0-9]+$/) next
        ev = f[4]; sub(/^syscalls:sys_enter_/, "", ev)
        t = f[1]; sub(/-[0-9]+$/, "", t)
        sc[$3, ev] += f[2]; pt[$3, t "." ev] += f[2]
    }
    END { flush() }'
}
for v in $vmm_list; do prof "$v" | sed "s/^/$v /"; done >"$work/prof"
# pm VMM DIR METRIC: median over boots, or "-"
pm() {
    awk -v v="$1" -v d="$2" -v m="$3" '$1 == v && $2 == d && $3 == m { print $4 }' "$work/prof" |
        sort -g | awk '{ x[NR] = $1 } END { if (NR == 0) print "-"; else { y = x[int((NR + 1) / 2)]; printf (y >= 100 || y == int(y)) ? "%.0f\n" : "%.2f\n", y } }'
}
echo
echo "Profile (--profile): medians over boots; per MiB of TCP payload; CPU times from /proc (ms), exits from KVM's debugfs"
for v in $vmm_list; do echo "$v: NIC features negotiated (bits): $(features "$v")"; done
cat <<'LEGEND'
mibps: the transfer's rate; guest_busy_pct: the guest CPU's non-idle share (its /proc/stat);
host_busy_pct, host_busy_ms: the whole benchmark host's CPUs (all processes, the TCP peer
included); vcpu_pct: vCPU threads' run time / transfer time; busiest_pct: the same for the
busiest other VMM thread; vcpu_ms: vCPU threads' run time (schedstat), vcpu_guest_ms of it in
guest mode, vcpu_host_ms outside (ticks, 10 ms); vmm_ms and thread:NAME: the other threads'
run time; guest_*: eth0 frames, bytes per frame and virtio interrupts in the guest; tap_*: the
TAP's frames and bytes per frame on the host (tx: to the guest); kvm:*: KVM's counters for
the VM; sys:CALL and sys:THREAD.CALL: system calls (--syscalls or --strace).
LEGEND
for dir in h2g g2h; do
    echo
    [ $dir = h2g ] && echo "TCP host -> guest" || echo "TCP guest -> host"
    printf '| figure |'
    for v in $vmm_list; do printf ' %s |' "$v"; done
    echo
    printf '|---|'
    for v in $vmm_list; do printf -- '---|'; done
    echo
    metrics=$(awk -v d=$dir '$2 == d { print $3 }' "$work/prof" | sort -u)
    for m in mibps guest_busy_pct host_busy_pct host_busy_ms vcpu_pct busiest_pct vcpu_ms vcpu_guest_ms vcpu_host_ms vmm_ms \
        $(grep '^thread:' <<<"$metrics") guest_irqs guest_rx_frames guest_rx_bytes_per_frame \
        guest_tx_frames guest_tx_bytes_per_frame tap_tx_frames tap_tx_bytes_per_frame \
        tap_rx_frames tap_rx_bytes_per_frame $(grep '^kvm:' <<<"$metrics") \
        $(grep '^sys:' <<<"$metrics"); do
        printf '| %s |' "$m"
        for v in $vmm_list; do printf ' %s |' "$(pm "$v" $dir "$m")"; done
        echo
    done
done
