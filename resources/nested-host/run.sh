#!/usr/bin/env bash
# Run a scenario script inside a nested KVM host: a QEMU TCG virtual machine
# (AMD SVM exposed, nested paging not: see the QEMU command below) booting
# Debian's cloud kernel with kvm_amd loaded. This is how flint boots real Linux
# guests on machines whose own /dev/kvm cannot (see
# /work/shared/notes/kvm-on-ci-machines.md).
#
# usage: run.sh [--interactive] [--mem MIB] [--timeout SECS]
#               --scenario SCRIPT [--add HOST_PATH:GUEST_PATH]...
#
#   --scenario SCRIPT  shell script run as /scenario.sh by busybox sh in the
#                      host VM. NOTE for scenario authors: busybox sh runs its
#                      own applets before searching PATH, so call programs
#                      you added with --add by their FULL PATH (/flint, not
#                      flint). The scenario runs as root with /proc, /sys,
#                      /dev (devtmpfs), /tmp (tmpfs) mounted and `lo` up;
#                      `/dev/kvm` is guaranteed to exist.
#   --add H:G          copy host file (or directory) H to G in the host VM; for
#                      a dynamically linked ELF its `ldd` libraries are copied
#                      too, so it runs as is.
#   --mem MIB          host VM memory (default 3072). The whole initramfs
#                      lives in it, so count the added files.
#   --timeout SECS     kill QEMU after SECS seconds (default 600), exit 98.
#   --interactive      give the scenario the serial console as controlling
#                      terminal (type into a nested guest's shell; Ctrl-C is
#                      passed through; Ctrl-A x quits QEMU).
#
# Environment: FLINT_HOST_QEMU_ARGS, extra QEMU arguments (split at spaces), for
# debugging the host VM, e.g. "-monitor unix:/tmp/mon.sock,server,nowait" to read
# its CPUs' registers with `info registers -a` when it hangs. FLINT_HOST_QEMU, the
# QEMU binary to run (default: qemu-system-x86_64 on PATH).
#
# Exit status: the scenario's (from the FLINT-HOST-SCENARIO-EXIT marker);
# 98 on timeout; 99 when the marker is missing (host crashed, no /dev/kvm...).
# The console (scenario output included) is copied to stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/../lib.sh"

usage() {
    sed -n '/^# usage:/,/^# The console/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

interactive=0
mem=${MEM:-3072}
timeout=600
scenario=
adds=()
while (($#)); do
    case $1 in
    --interactive) interactive=1 ;;
    --mem) mem=${2:?}; shift ;;
    --timeout) timeout=${2:?}; shift ;;
    --scenario) scenario=${2:?}; shift ;;
    --add) adds+=("${2:?}"); shift ;;
    -h | --help) usage ;;
    *) echo "run.sh: unknown argument: $1" >&2; usage ;;
    esac
    shift
done
[ -n "$scenario" ] || usage
[ -f "$scenario" ] || die "scenario not found: $scenario"

# Cached; a no-op when up to date.
"$here/build-host.sh"
host=$FLINT_CACHE/host

tmp=$(mktemp -d "${TMPDIR:-/tmp}/flint-host.XXXXXX")
qemu_pid=
tee_pid=
# shellcheck disable=SC2317  # invoked from the trap
cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
# On a signal: clean up (via the EXIT trap) and report it in the status.
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

root=$tmp/root
install_busybox "$root"
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run" "$root/root" \
    "$root/etc" "$root/lib/flint-modules"
cp "$host"/modules/*.ko "$host/modules/order" "$root/lib/flint-modules/"
cp "$scenario" "$root/scenario.sh"
chmod 755 "$root/scenario.sh"

# copy_with_libs HOST GUEST: the file plus, for a dynamic ELF, every library
# (and the ELF interpreter) that ldd resolves, at the same absolute paths.
copy_with_libs() {
    local src=$1 dst=$2 lib
    mkdir -p "$root$(dirname "$dst")"
    if [ -d "$src" ]; then
        cp -a "$src/." "$root$dst/"
        return
    fi
    cp -L "$src" "$root$dst"
    if head -c4 "$src" | grep -q 'ELF' && ldd "$src" >/dev/null 2>&1; then
        for lib in $(ldd "$src" | grep -oE '/[^ ]+'); do
            [ -e "$root$lib" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    fi
}
# kvm-hold keeps a VM open in the host for the whole run (see guest-tools/src/bin/kvm-hold.rs:
# without it, QEMU's multi-threaded TCG now and then freezes the host when the host kernel
# patches its scheduler as the first VM starts or the last one ends).
log "building kvm-hold"
tools_target=${CARGO_TARGET_DIR:-$here/../../target}/guest-tools
(cd "$here/../.." && cargo build --release --quiet -p guest-tools --bin kvm-hold \
    --target-dir "$tools_target")
copy_with_libs "$tools_target/release/kvm-hold" /bin/kvm-hold
for a in "${adds[@]}"; do
    case $a in
    *:/*) copy_with_libs "${a%%:*}" "${a#*:}" ;;
    *) die "--add wants HOST_PATH:/ABSOLUTE/GUEST_PATH, got '$a'" ;;
    esac
done

# PID 1 of the host VM.
cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
ip link set lo up 2>/dev/null

# Dependencies first (the order file was written that way by build-host.sh).
for m in $(cat /lib/flint-modules/order); do
    insmod "/lib/flint-modules/$m" || echo "FLINT-HOST-INSMOD-FAILED $m"
done
if [ ! -c /dev/kvm ]; then
    echo "FLINT-HOST-NO-KVM"
    poweroff -f
fi

# A VM that stays open, so that flint's VMs coming and going never patch the host
# kernel (kvm-hold prints "ready" once its VM exists).
/bin/kvm-hold >/tmp/kvm-hold.out 2>&1 &
i=0
until grep -q ready /tmp/kvm-hold.out 2>/dev/null || [ $i -ge 100 ]; do
    sleep 0.1 2>/dev/null || sleep 1
    i=$((i + 1))
done
grep -q ready /tmp/kvm-hold.out || echo "FLINT-HOST-KVM-HOLD-FAILED $(cat /tmp/kvm-hold.out)"

# Keep host kernel messages off the console while the scenario prints: its
# output is parsed. They are dumped below if the scenario fails.
dmesg -n 1
if grep -q 'flint.interactive=1' /proc/cmdline; then
    # the serial console becomes the scenario's controlling terminal
    setsid cttyhack sh /scenario.sh
    status=$?
else
    sh /scenario.sh </dev/null
    status=$?
fi
if [ "$status" -ne 0 ]; then
    echo "--- host kernel log (last 40 lines), scenario failed"
    dmesg | tail -n 40
    echo "--- end of host kernel log"
fi
echo "FLINT-HOST-SCENARIO-EXIT $status"
poweroff -f
INIT
chmod 755 "$root/init"

# Uncompressed: decompressing tens of MiB under TCG would cost seconds.
make_initramfs "$root" "$tmp/host.cpio" none
rm -rf "$root"

append="console=ttyS0 panic=-1 quiet"
if ((interactive)); then
    append+=" flint.interactive=1"
    # signal=off: Ctrl-C goes to the guest; mux with the monitor for Ctrl-A x.
    serial=(-chardev "stdio,id=con,mux=on,signal=off" -serial chardev:con -mon chardev=con)
else
    serial=(-serial stdio)
fi

# The console is copied to our stdout and to a file that is parsed for the
# exit marker. QEMU's warnings about CPU features TCG (or the host) lacks are
# dropped. `timeout --foreground` keeps QEMU in our process group so it can
# read the terminal, and forwards TERM to it.
#
# -npt: the host VM's CPU has SVM but no nested paging, so its kvm_amd shadows the
# guests' page tables. With nested paging (QEMU 7.2 and 10.0 alike), guests died of
# triple faults at random points and the host kernel itself crashed now and then
# (recursive page faults in error_entry) when two guests ran at once: 6 of 20
# boots failed in a stress loop of two guests booting together, 0 of 60 without
# it, and the loop ran twice as fast.
qemu_extra=()
read -r -a qemu_extra <<<"${FLINT_HOST_QEMU_ARGS:-}"
exec {con}> >(tee "$tmp/console.log")
tee_pid=$!
exec 3<&0
timeout --foreground "$timeout" "${FLINT_HOST_QEMU:-qemu-system-x86_64}" \
    -accel tcg,thread=multi -cpu EPYC,+svm,-npt -smp 2 -m "$mem" \
    -nodefaults -no-user-config -nographic "${serial[@]}" -no-reboot \
    -kernel "$host/vmlinuz" -initrd "$tmp/host.cpio" -append "$append" \
    "${qemu_extra[@]}" \
    <&3 >&"$con" 2> >(grep -v "support requested feature" >&2) &
qemu_pid=$!
rc=0
wait "$qemu_pid" || rc=$?
qemu_pid=
exec {con}>&-
wait "$tee_pid" 2>/dev/null || true

if [ "$rc" -eq 124 ]; then
    echo "run.sh: timed out after $timeout s; QEMU killed" >&2
    exit 98
fi
if grep -q '^FLINT-HOST-NO-KVM' "$tmp/console.log"; then
    echo "run.sh: /dev/kvm did not appear in the host VM (kvm_amd failed to load?)" >&2
    exit 99
fi
marker=$(tr -d '\r' <"$tmp/console.log" | sed -n 's/^FLINT-HOST-SCENARIO-EXIT \([0-9]*\)$/\1/p' | tail -n1)
if [ -z "$marker" ]; then
    echo "run.sh: the host VM ended without FLINT-HOST-SCENARIO-EXIT (QEMU status $rc)" >&2
    exit 99
fi
exit "$marker"
