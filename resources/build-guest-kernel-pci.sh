#!/usr/bin/env bash
# Build flint's test guest kernel with virtio over PCI, for benchmarks that compare flint with
# a VMM that has no virtio-mmio transport (Cloud Hypervisor):
#   $FLINT_CACHE/pci/guest/vmlinux, bzImage, config
# The configuration is resources/guest-kernel.config with resources/guest-kernel-pci.config's
# settings replacing its own; the build is build-guest-kernel.sh's, run on that fragment with
# its own cache directory (so the default kernel and its stamp are left alone). flint,
# Firecracker and QEMU boot this kernel with pci=off, which leaves it the default kernel for
# them. Skipped when up to date, like the default kernel.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/build-guest-kernel.sh" "$here/lib.sh" "$work/"
# Both fragments' settings, a setting of the PCI fragment replacing the default's (the build
# script checks every line of its fragment, so a contradicting pair must not reach it).
awk '
    /^CONFIG_[A-Za-z0-9_]+=/ { k = $0; sub(/=.*/, "", k) }
    /^# CONFIG_[A-Za-z0-9_]+ is not set$/ { k = $2 }
    k != "" { if (!(k in v)) o[++n] = k; v[k] = $0; k = "" }
    END { for (i = 1; i <= n; i++) print v[o[i]] }' \
    "$here/guest-kernel.config" "$here/guest-kernel-pci.config" >"$work/guest-kernel.config"
FLINT_CACHE=$FLINT_CACHE/pci "$work/build-guest-kernel.sh"
