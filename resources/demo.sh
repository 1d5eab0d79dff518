#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a shell in a flint microVM:
# installs what is missing, builds the guest kernel and initramfs if absent (cached in
# $FLINT_CACHE, default ~/.cache/flint), builds flint, and boots the demo guest on this
# terminal. Type `exit` in the guest shell (it reboots, flint exits 0) or Ctrl-A x.
#
# usage: resources/demo.sh [extra `flint boot` options, e.g. --vcpus 2 --memory 256]
#
# Where this machine's /dev/kvm cannot boot Linux (the PVM nested KVM, module kvm_pvm), the
# demo runs flint inside a nested KVM host (QEMU with software emulation and AMD SVM, see
# resources/nested-host/); there Ctrl-A x quits QEMU.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

ensure_packages build-essential qemu-system-x86 busybox-static
command -v cargo >/dev/null 2>&1 ||
    die "Rust is not installed: install a toolchain >= 1.85 with rustup, then run this again"
"$here/build-guest-kernel.sh"
"$here/build-guest-initramfs.sh"
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet)
flint=$here/../target/release/flint
guest=$FLINT_CACHE/guest

if host_kvm_boots_linux; then
    exec "$flint" boot --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" "$@"
fi

echo "demo: this machine's /dev/kvm is PVM (kvm_pvm) and cannot boot a Linux guest; running flint inside a nested KVM host (QEMU, about 10 s to a prompt)."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quoted=
for a in "$@"; do quoted+=" '${a//\'/\'\\\'\'}'"; done
cat >"$work/demo.sh" <<SCENARIO
#!/bin/sh
/demo/flint boot --kernel /demo/vmlinux --initrd /demo/initramfs.cpio.gz$quoted
SCENARIO
"$here/nested-host/run.sh" --interactive --timeout 86400 --scenario "$work/demo.sh" \
    --add "$flint:/demo/flint" --add "$guest/vmlinux:/demo/vmlinux" \
    --add "$guest/initramfs.cpio.gz:/demo/initramfs.cpio.gz"
