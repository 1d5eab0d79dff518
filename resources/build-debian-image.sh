#!/usr/bin/env bash
# Build a real Debian container image with Python, for the tier-3 tests and the image
# benchmark (resources/bench-image.sh):
#   $FLINT_CACHE/test-images/debian-python/   an OCI image layout (oci-layout, index.json, blobs/)
# for `flint run --image $FLINT_CACHE/test-images/debian-python -- python3 -c '...'`.
#
# Debian's mmdebstrap makes the root file system (bookworm, variant minbase, plus python3
# and what it depends on) from Debian's mirror as a tarball; that tarball, gzip'ed, is the
# image's single layer. The configuration sets Env PATH and Cmd ["python3"], as the
# official python images do. Kept small: no man pages, info pages, documentation (but the
# copyright files), translations, apt lists or recommended packages; /usr is merged with
# directory symlinks as debootstrap (and so Debian's official images) does it, not with the
# usrmerge package, which would pull in perl; the .pyc files python3's postinst compiled
# stay (without them every run would compile the standard library again).
#
# Cached: rebuilt only when this script, lib.sh, mmdebstrap, the suite or the mirror change
# (not when Debian publishes updates: delete the directory to pick them up). Needs root (or
# a user namespace mmdebstrap can use) and the network, once.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"
# shellcheck source=resources/oci-layout.sh
. "$here/oci-layout.sh"

suite=bookworm
mirror=${FLINT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
out=$FLINT_CACHE/test-images
target=$out/debian-python
stampfile=$out/debian-python.stamp
mkdir -p "$out"

ensure_packages mmdebstrap gzip coreutils

stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/lib.sh" "$here/oci-layout.sh" \
    "mmdebstrap=$(pkg_version mmdebstrap)" "suite=$suite" "mirror=$mirror")
if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] && [ -f "$target/index.json" ]; then
    log "Debian Python image is up to date ($target)"
    exit 0
fi

work=$(mktemp -d "$out/.debian-python.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Everything dpkg would put under these paths is never unpacked (dpkg's path filters, so
# no package's maintainer script sees half a package); the apt lists and the downloaded
# .debs go at the end (mmdebstrap's default cleanup, made explicit).
log "building the root file system with mmdebstrap ($suite, minbase + python3; about a minute)"
mode=()
if [ "$(id -u)" -eq 0 ]; then mode=(--mode=root); fi
# shellcheck disable=SC2016  # $1 is for the hook's shell: the chroot's directory
mmdebstrap "${mode[@]}" --variant=minbase --include=python3 --format=tar --quiet \
    --aptopt='APT::Install-Recommends "false"' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/share/linda/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin \
        "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old \
        "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log' \
    "$suite" "$work/rootfs.tar" "$mirror" || die "mmdebstrap failed"

log "packing the OCI image layout"
path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
write_oci_layout "$work/layout" "$work/rootfs.tar" "{\"Env\":[\"PATH=$path\"],\"Cmd\":[\"python3\"]}" \
    "$suite-python" "mmdebstrap --variant=minbase --include=python3 $suite (resources/build-debian-image.sh)"
layer_mib=$(oci_layer_blobs "$work/layout" | xargs stat -c %s | awk '{ printf "%.1f", $1 / 1048576 }')

rm -rf "$target"
mv "$work/layout" "$target"
echo "$stamp" >"$stampfile"
log "Debian Python image ready: $target (one layer, $layer_mib MiB gzip'ed)"
