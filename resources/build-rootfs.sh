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
# shellcheck source=resources/guest-init.sh
. "$here/guest-init.sh"

out=$FLINT_CACHE/guest
target=$out/rootfs.ext4
stampfile=$out/rootfs.stamp
size_mib=32
mkdir -p "$out"

ensure_packages busybox-static e2fsprogs

stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/lib.sh" "$here/guest-init.sh" \
    "busybox-static=$(pkg_version busybox-static)" "e2fsprogs=$(pkg_version e2fsprogs)" \
    "size=$size_mib")
if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] && [ -f "$target" ]; then
    log "guest rootfs is up to date ($target)"
    exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root" "$target.tmp"' EXIT

install_busybox "$root"
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/root" "$root/etc" "$root/mnt"
echo flint-guest >"$root/etc/hostname"

# PID 1 of the guest (the kernel's default init, /sbin/init; resources/guest-init.sh). Kept
# small: it runs under emulation on CI.
write_guest_init "$root/sbin/init" rootfs

# -d: populate from the staging dir; -T default: 4 KiB blocks (not the 1 KiB that mke2fs
# picks for small file systems); -m 0: no blocks reserved for root (tests fill it);
# -E root_owner: / owned by root even when a user builds the image.
rm -f "$target.tmp"
mkfs.ext4 -q -F -T default -L flint-root -m 0 -E root_owner=0:0 -d "$root" \
    "$target.tmp" "${size_mib}M" >/dev/null || die "mkfs.ext4 failed"
mv "$target.tmp" "$target"
echo "$stamp" >"$stampfile"
log "guest rootfs ready: $target ($size_mib MiB, $(du -k "$target" | cut -f1) KiB allocated)"
