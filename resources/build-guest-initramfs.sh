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
# shellcheck source=resources/guest-init.sh
. "$here/guest-init.sh"

out=$FLINT_CACHE/guest
target=$out/initramfs.cpio.gz
stampfile=$out/initramfs.stamp
mkdir -p "$out"

ensure_packages busybox-static cpio gzip

stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/lib.sh" "$here/guest-init.sh" \
    "busybox-static=$(pkg_version busybox-static)")
if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] && [ -f "$target" ]; then
    log "guest initramfs is up to date ($target)"
    exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install_busybox "$root"
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/root" "$root/etc"

# PID 1 of the guest (resources/guest-init.sh). Kept small: it runs under emulation on CI.
write_guest_init "$root/init" initramfs

make_initramfs "$root" "$target"
echo "$stamp" >"$stampfile"
log "guest initramfs ready: $target ($(du -k "$target" | cut -f1) KiB)"
