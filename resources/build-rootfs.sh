#!/usr/bin/env bash
# Build the ext4 root filesystem of flint's test guest:
#   $FLINT_CACHE/guest/rootfs.ext4
# for `flint boot --kernel ... --rootfs rootfs.ext4` (no initrd). It holds busybox and an
# /sbin/init (the kernel's default init, so the plain --rootfs flag boots it) that follows the
# same protocol as the initramfs's /init (resources/build-guest-initramfs.sh): boot-timer byte,
# FLINT-GUEST-READY, the flint.exec= script with FLINT-GUEST-EXIT <status>, or a demo shell;
# then sync, remount / read-only and reboot.
#
# The image is made with `mkfs.ext4 -d` from a staging directory: no loop device, no mount.
# It is 32 MiB and mostly free (about 2 MiB used) so tests can write to it. Run as root
# (CI does), files are owned by root; otherwise by the builder, which the guest's root user
# does not mind. There are no device nodes in it: the kernel mounts devtmpfs on /dev
# (CONFIG_DEVTMPFS_MOUNT) before it runs /sbin/init, and the console is already open then.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

out=$FLINT_CACHE/guest
target=$out/rootfs.ext4
stampfile=$out/rootfs.stamp
size_mib=32
mkdir -p "$out"

ensure_packages busybox-static e2fsprogs

stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/lib.sh" "busybox-static=$(pkg_version busybox-static)" \
    "e2fsprogs=$(pkg_version e2fsprogs)" "size=$size_mib")
if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] && [ -f "$target" ]; then
    log "guest rootfs is up to date ($target)"
    exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root" "$target.tmp"' EXIT

install_busybox "$root"
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/root" "$root/etc" "$root/mnt"
echo flint-guest >"$root/etc/hostname"

# PID 1 of the guest (the kernel's default init, /sbin/init). Kept small: it runs under
# emulation on CI.
cat >"$root/sbin/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Usually mounted by the kernel already (CONFIG_DEVTMPFS_MOUNT).
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
    echo "flint demo guest (ext4 root on /dev/vda): this is a busybox shell; type 'exit' (or Ctrl-D) to reboot, which ends flint."
    setsid cttyhack sh
fi
# Whatever was written reaches the disks before the reset, and / is left clean (journal
# checkpointed, no recovery needed: e2fsck -n on the image passes).
sync
mount -o remount,ro / 2>/dev/null
# -f: reboot(2) directly (there is no init daemon to ask); with reboot=k the
# kernel resets through the i8042 controller and flint exits with status 0.
reboot -f
# Should reboot(2) ever return, do not let PID 1 exit (that would panic).
while :; do sleep 60; done
INIT
chmod 755 "$root/sbin/init"

# -d: populate from the staging dir; -T default: 4 KiB blocks (not the 1 KiB that mke2fs
# picks for small file systems); -m 0: no blocks reserved for root (tests fill it);
# -E root_owner: / owned by root even when a user builds the image.
rm -f "$target.tmp"
mkfs.ext4 -q -F -T default -L flint-root -m 0 -E root_owner=0:0 -d "$root" \
    "$target.tmp" "${size_mib}M" >/dev/null || die "mkfs.ext4 failed"
mv "$target.tmp" "$target"
echo "$stamp" >"$stampfile"
log "guest rootfs ready: $target ($size_mib MiB, $(du -k "$target" | cut -f1) KiB allocated)"
