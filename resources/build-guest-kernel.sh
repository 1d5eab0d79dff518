#!/usr/bin/env bash
# Build flint's test guest kernel from Debian's linux-source-6.1:
#   $FLINT_CACHE/guest/vmlinux   ELF with the PVH note (direct ELF boot)
#   $FLINT_CACHE/guest/bzImage   the same kernel in the bzImage format
#   $FLINT_CACHE/guest/config    the resulting .config, for reference
# Config = `make tinyconfig` + resources/guest-kernel.config + olddefconfig.
# The build is skipped when the stamp (fragment + this script + source
# package version) matches the one of the last successful build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

fragment=$here/guest-kernel.config
out=$FLINT_CACHE/guest
stampfile=$out/kernel.stamp
mkdir -p "$out"

ensure_packages linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev xz-utils binutils

src_version=$(pkg_version linux-source-6.1)
stamp=$(stamp_of "$fragment" "${BASH_SOURCE[0]}" "linux-source-6.1=$src_version")

if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] \
    && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    log "guest kernel is up to date ($out)"
    exit 0
fi

# The unpacked tree is kept between builds (incremental rebuilds after a
# fragment change take a minute instead of five); it is re-extracted only when
# the source package version changes.
build=$out/build
tree=$build/linux-source-6.1
if [ "$(cat "$build/src-version" 2>/dev/null || true)" != "$src_version" ]; then
    log "unpacking linux-source-6.1 $src_version..."
    rm -rf "$build"
    mkdir -p "$build"
    tar -C "$build" -xf /usr/src/linux-source-6.1.tar.xz
    echo "$src_version" >"$build/src-version"
fi

k() { make -C "$tree" ARCH=x86_64 "$@"; }

log "configuring (tinyconfig + $(basename "$fragment"))..."
rm -f "$tree/.config"
# Output goes to a log: the "override: ... changes choice state" warnings are
# expected; the check below is what matters.
if ! { k -s tinyconfig &&
    "$tree/scripts/kconfig/merge_config.sh" -m -O "$tree" "$tree/.config" "$fragment" &&
    k -s olddefconfig; } >"$build/config.log" 2>&1; then
    cat "$build/config.log" >&2
    die "kernel configuration failed"
fi

# Kconfig silently drops options whose dependencies are unmet; make that a
# hard error so a missing feature shows up here and not as a hung guest.
dropped=0
while IFS= read -r line; do
    case $line in
    CONFIG_*=*)
        if ! grep -qxF -- "$line" "$tree/.config"; then
            got=$(grep -E "^(# )?${line%%=*}[= ]" "$tree/.config" || echo 'absent')
            log "config option dropped: wanted '$line', got '$got'"
            dropped=1
        fi
        ;;
    "# CONFIG_"*" is not set")
        opt=${line#\# }
        opt=${opt%% *}
        if grep -q "^$opt=" "$tree/.config"; then
            log "config option should be unset but is: $(grep "^$opt=" "$tree/.config")"
            dropped=1
        fi
        ;;
    esac
done <"$fragment"
if [ "$dropped" -ne 0 ]; then
    die "guest kernel config check failed (see above); fix $fragment"
fi

log "building guest kernel (about 5 minutes from scratch, less when incremental)..."
start=$SECONDS
k -j"$(nproc)" vmlinux bzImage >"$build/make.log" 2>&1 || {
    tail -n 40 "$build/make.log" >&2
    die "kernel build failed (full log: $build/make.log)"
}
log "kernel built in $((SECONDS - start)) s"

# Direct ELF boot of vmlinux needs the PVH entry note
# (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12, owner "Xen").
if ! readelf -n "$tree/vmlinux" | grep -A1 -E '^ *Xen ' | grep -qiE '0x0*12|PHYS32'; then
    die "vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"
fi

# Publish atomically-ish: copy under temporary names, then rename, then stamp.
cp "$tree/vmlinux" "$out/vmlinux.tmp"
cp "$tree/arch/x86/boot/bzImage" "$out/bzImage.tmp"
cp "$tree/.config" "$out/config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
mv "$out/bzImage.tmp" "$out/bzImage"
echo "$stamp" >"$stampfile"
log "guest kernel ready: $out/vmlinux $out/bzImage"
