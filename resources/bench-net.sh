#!/usr/bin/env bash
# Network benchmark (not a test). One guest with a virtio-net NIC on a TAP and a vsock device
# measures, RUNS times each:
#   - TCP throughput host -> guest and guest -> host: MIB (default 100) through vsock-io
#     (64 KiB per system call; busybox nc moves a few KiB per call and measures itself),
#     timed from the first byte received to the end of the stream;
#   - vsock throughput both ways: MIB through vsock-io (guest AF_VSOCK <-> flint's Unix
#     socket on the host, or the host's AF_VSOCK under QEMU), timed the same way;
# and once: ping round-trip latency (min/avg/max over N pings, 200 ms apart) and, as the
# ceiling of this rig, how fast the same tools move bytes through a pipe in the guest
# (generating and checksumming cost guest CPU too).
# The same guest then runs under QEMU's microvm machine (vhost-net, vhost-vsock) in the same
# host, and every figure is printed for both VMMs.
#
# usage: resources/bench-net.sh [-n RUNS] [--tcp-mib MIB] [--vsock-mib MIB] [--pings N]
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
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --tcp-mib) tcp_mib=${2:?}; shift ;;
    --vsock-mib) vsock_mib=${2:?}; shift ;;
    --pings) pings=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
for v in "$runs" "$tcp_mib" "$vsock_mib" "$pings"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || die "counts and sizes are positive integers, got '$v'"
done

ensure_packages iproute2 cpio busybox-static
"$here/build-guest-kernel.sh"
"$here/build-guest-initramfs.sh"
target=${CARGO_TARGET_DIR:-$here/../target}
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet)
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
echo "BENCH guest-pipe $($T gen ${TCP}M | $T sum)"
ping -c "$PINGS" -i 0.2 10.0.0.1 | sed -n 's/^round-trip/BENCH ping &/p'
r=0
while [ $r -lt "$RUNS" ]; do
    echo "BENCH-STEP run $r: TCP"
    timeout "$LIMIT" $T connect tcp:10.0.0.1:5101 --recv --retry 30 | sed 's/^/BENCH tcp-h2g /'
    timeout "$LIMIT" $T connect tcp:10.0.0.1:5102 --send ${TCP}M --seed $r --retry 30 >/dev/null
    r=$((r + 1))
done
r=0
while [ $r -lt "$RUNS" ]; do
    echo "BENCH-STEP run $r: vsock guest -> host"
    timeout "$LIMIT" $T connect vsock:2:6000 --send ${VSOCK}M --seed $r --retry 30 >/dev/null
    r=$((r + 1))
done
timeout "$LIMIT" $T listen vsock:5000 --conns "$RUNS" --recv | sed 's/^/BENCH vsock-h2g /' &
sleep 1
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
exec_script="TCP=$tcp_mib VSOCK=$vsock_mib PINGS=$pings RUNS=$runs LIMIT=$limit sh /tools/bench.sh"
cmdline="console=ttyS0 reboot=k panic=1 pci=off acpi=off quiet flint.exec=$(printf '%s' "$exec_script" | base64 -w0)"

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
CMDLINE='$cmdline'
QEMU_ARGS='$qemu_args'
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

# bench VMM: the whole guest run under VMM (flint or qemu); its results follow "BENCH-VMM VMM".
bench() {
    vmm=$1
    D=$W/$vmm
    mkdir -p "$D"
    $NS "$T" listen tcp:5101 --conns "$RUNS" --send ${TCP}M >/dev/null 2>&1 &
    $NS "$T" listen tcp:5102 --conns "$RUNS" --recv >"$D/tcp-g2h" 2>&1 &
    if [ "$vmm" = flint ]; then
        "$T" listen unix:"$D/v.sock_6000" --conns "$RUNS" --recv >"$D/vsock-g2h" 2>&1 &
        $NS "$BIN/flint" boot --kernel "$BIN/bzImage" --initrd "$BIN/initramfs-bench.cpio" \
            --memory 256 --net tap=flbench0 --vsock cid=3,uds="$D/v.sock" --cmdline "$CMDLINE" \
            </dev/null >"$D/guest.out" 2>"$D/guest.err" &
        to_guest="flint:$D/v.sock:5000"
    else
        "$T" listen vsock:6000 --conns "$RUNS" --recv >"$D/vsock-g2h" 2>&1 &
        # shellcheck disable=SC2086
        $NS "$QEMU" $QEMU_ARGS -kernel "$BIN/bzImage" -initrd "$BIN/initramfs-bench.cpio" \
            -append "$CMDLINE reboot=t" </dev/null >"$D/guest.out" 2>"$D/guest.err" &
        to_guest="vsock:3:5000"
    fi
    VMM_PID=$!
    # the guest's console, live (progress for BENCH_RAW=1, and for the nested host's console)
    tail -f "$D/guest.out" 2>/dev/null | sed "s/^/live $vmm: /" &
    TAIL_PID=$!
    i=0
    while [ $i -lt 3000 ] && ! grep -q BENCH-VSOCK-READY "$D/guest.out" 2>/dev/null &&
        kill -0 $VMM_PID 2>/dev/null; do
        sleep 1
        i=$((i + 1))
    done
    r=0
    while [ $r -lt "$RUNS" ]; do
        timeout 600 "$T" connect "$to_guest" --send ${VSOCK}M --seed $r --retry 30 >/dev/null
        r=$((r + 1))
    done
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
    if [ $status -ne 0 ] || ! grep -q 'FLINT-GUEST-EXIT 0' "$D/guest.out"; then
        echo "BENCH-FAILED $vmm status $status"
        cat "$D/guest.err"
        exit 1
    fi
}
echo "BENCH-QEMU-VERSION $("$QEMU" --version | head -n1)"
bench flint
bench qemu
SCENARIO

files=("$flint:flint" "$guest/bzImage:bzImage" "$work/initramfs-bench.cpio:initramfs-bench.cpio"
    "$tool:vsock-io" "$ip:ip")
budget=$((600 + runs * (2 * tcp_mib + vsock_mib) * 2))
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

# rates VMM NAME: "MiB/s Gbit/s" per run of VMM's BENCH NAME vsock-io lines (bytes / secs).
rates() {
    awk -v vmm="$1" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" |
        grep -E "^BENCH $2 vsock-io: .* ok\$" |
        sed -n 's/.* bytes=\([0-9]*\) .* secs=\([0-9.]*\) ok$/\1 \2/p' |
        awk '$2 > 0 { printf "%.2f %.3f\n", $1 / $2 / 1048576, $1 * 8 / $2 / 1e9 }'
}
# stats LABEL: median, min, max of the "MiB/s Gbit/s" lines on stdin.
stats() {
    sort -n | awk -v label="$1" '
        { m[NR] = $1; g[NR] = $2 }
        END {
            if (NR == 0) { printf "%-28s no samples\n", label; exit 1 }
            i = int((NR + 1) / 2)
            printf "%-28s median %8.2f MiB/s (%.3f Gbit/s)   min %8.2f   max %8.2f   (n=%d)\n",
                label, m[i], g[i], m[1], m[NR], NR
        }'
}

echo "flint network benchmark, $(date -u +%Y-%m-%d): TCP ${tcp_mib} MiB and vsock ${vsock_mib} MiB per run, $runs runs"
echo "where: $where; guest: 1 vCPU, 256 MiB, vsock-io on both ends"
echo "other VMM: $(sed -n 's/.*BENCH-QEMU-VERSION //p' "$work/clean" | head -n1), microvm, vhost-net, vhost-vsock"
for vmm in flint qemu; do
    echo "--- $vmm"
    rates $vmm tcp-h2g | stats "TCP host -> guest"
    rates $vmm tcp-g2h | stats "TCP guest -> host"
    rates $vmm vsock-h2g | stats "vsock host -> guest"
    rates $vmm vsock-g2h | stats "vsock guest -> host"
    awk -v vmm="$vmm" '/^BENCH-VMM /{ cur = $2 } cur == vmm' "$work/clean" |
        sed -n 's/^BENCH ping round-trip min\/avg\/max = \(.*\)$/\1/p' | head -n1 |
        awk -v n="$pings" -F/ '{ printf "%-28s min %s ms   avg %s ms   max %s (n=%d)\n", "ping round trip", $1, $2, $3, n }'
    rates $vmm guest-pipe | stats "pipe in the guest (ceiling)"
done
