#!/usr/bin/env bash
# Build the busybox initramfs of flint's test guest:
#   $FLINT_CACHE/guest/initramfs.cpio.gz
# Its /init mounts the usual filesystems, signals "booted" to flint through the
# boot-timer port, prints FLINT-GUEST-READY, and then either runs the test
# script carried on the kernel command line (flint.exec=<base64>) or, for a
# demo, gives the user a shell on the serial console.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

out=$FLINT_CACHE/guest
target=$out/initramfs.cpio.gz
stampfile=$out/initramfs.stamp
mkdir -p "$out"

ensure_packages busybox-static cpio gzip

stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/lib.sh" "busybox-static=$(pkg_version busybox-static)")
if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] && [ -f "$target" ]; then
    log "guest initramfs is up to date ($target)"
    exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install_busybox "$root"
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/root" "$root/etc"

# PID 1 of the guest. Kept small: it runs under emulation on CI.
cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

# Boot timer: byte 123 to I/O port 0x3f0 (offset 1008 of /dev/port); flint
# measures the time from its start to this write.
printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1 conv=notrunc 2>/dev/null

echo FLINT-GUEST-READY

exec_b64=
for word in $(cat /proc/cmdline); do
    case $word in
    flint.exec=*) exec_b64=${word#flint.exec=} ;;
    esac
done

if [ -n "$exec_b64" ]; then
    # Test mode: the harness put a shell script on the command line.
    echo "$exec_b64" | base64 -d >/tmp/flint-exec.sh
    sh /tmp/flint-exec.sh
    echo "FLINT-GUEST-EXIT $?"
else
    echo "flint demo guest: this is a busybox shell; type 'exit' (or Ctrl-D) to reboot, which ends flint."
    # cttyhack gives the shell the real console as controlling terminal so
    # that Ctrl-C and job control work.
    setsid cttyhack sh
fi
# -f: reboot(2) directly (there is no init daemon to ask); with reboot=k the
# kernel resets through the i8042 controller and flint exits with status 0.
reboot -f
# Should reboot(2) ever return, do not let PID 1 exit (that would panic).
while :; do sleep 60; done
INIT
chmod 755 "$root/init"

make_initramfs "$root" "$target"
echo "$stamp" >"$stampfile"
log "guest initramfs ready: $target ($(du -k "$target" | cut -f1) KiB)"
