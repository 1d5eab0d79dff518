# shellcheck shell=bash
# Shared helpers for the resources/*.sh scripts. Source it; do not run it.

# All built artefacts live outside the work tree so `cargo clean` and git
# never touch them and several checkouts can share them.
FLINT_CACHE=${FLINT_CACHE:-$HOME/.cache/flint}
export FLINT_CACHE

# host_kvm_boots_linux: whether this machine's own /dev/kvm can boot a Linux
# guest: not when it is missing, nor when it is PVM (module kvm_pvm), whose
# instruction emulator cannot run a stock kernel. The scripts that need Linux
# guests run them inside the nested KVM host (nested-host/run.sh) otherwise.
host_kvm_boots_linux() { [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; }

# sandbox_cmdline: the kernel command line `flint run` gives a sandbox (SANDBOX_CMDLINE in
# src/sandbox/machine.rs), for benchmarks that boot the same sandbox under another VMM.
sandbox_cmdline() {
    local src c
    src=$(dirname "${BASH_SOURCE[0]}")/../src/sandbox/machine.rs
    c=$(sed -n '/^const SANDBOX_CMDLINE/,/;$/p' "$src" | tr -d '\n' |
        sed 's/.*"\(.*\)";.*/\1/; s/\\ *//g')
    [ -n "$c" ] || die "cannot read SANDBOX_CMDLINE from $src"
    printf '%s\n' "$c"
}

# sandbox_bench_kernel WITH_PCI: build the guest kernel a sandbox benchmark boots and print
# its ELF vmlinux: the virtio-pci one (build-guest-kernel-pci.sh) when WITH_PCI is 1 (Cloud
# Hypervisor, whose devices are virtio-pci only, is in the run), else the usual one.
sandbox_bench_kernel() {
    local dir
    dir=$(dirname "${BASH_SOURCE[0]}")
    if [ "$1" = 1 ]; then
        "$dir/build-guest-kernel-pci.sh" >&2
        printf '%s\n' "$FLINT_CACHE/pci/guest/vmlinux"
    else
        "$dir/build-guest-kernel.sh" >&2
        printf '%s\n' "$FLINT_CACHE/guest/vmlinux"
    fi
}

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# ensure_packages PKG...: install the Debian packages that are missing.
# `apt-get update` runs only when something actually has to be installed so a
# warm machine never touches the network.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]})); then
        log "installing missing packages: ${missing[*]}"
        local sudo=()
        if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
        # explicit `|| die`: callers may run this where `set -e` is suspended
        "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    fi
}

# pkg_version PKG: installed version of a Debian package.
pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# stamp_of ITEM...: one sha256 over files (by content) and literal strings.
stamp_of() {
    local item
    for item in "$@"; do
        if [ -f "$item" ]; then sha256sum <"$item"; else printf '%s\n' "$item"; fi
    done | sha256sum | cut -d' ' -f1
}

# cpio_dev_nodes: print an uncompressed newc cpio archive (with trailer) that
# holds /dev and /dev/console. The kernel opens /dev/console for PID 1 before
# /init can mount devtmpfs, so the node must be in the initramfs itself;
# writing the header by hand means no root (mknod) is needed to build images.
# Prepend the output to the main archive inside the same gzip stream: the
# kernel unpacks concatenated archives.
cpio_dev_nodes() {
    _cpio_entry dev 040755 0 0
    _cpio_entry dev/console 020600 5 1
    _cpio_entry TRAILER!!! 0 0 0
}
# _cpio_entry NAME OCTAL_MODE RDEV_MAJOR RDEV_MINOR (an entry without data)
_cpio_entry() {
    local name=$1 mode=$((8#$2)) maj=$3 min=$4 namesize=$((${#1} + 1))
    # magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    # rdevmajor, rdevminor, namesize, check
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0
    printf '%s\0' "$name"
    # the 110-byte header plus the name is padded to a multiple of 4
    head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# make_initramfs DIR OUT [gzip|none]: pack DIR (plus /dev/console) as a newc
# archive, all files owned by root, gzip'ed unless told otherwise.
make_initramfs() {
    local dir=$1 out=$2 compress=${3:-gzip}
    local filter=(gzip -6n)
    if [ "$compress" = none ]; then filter=(cat); fi
    {
        cpio_dev_nodes
        (cd "$dir" && find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort |
            cpio -o -H newc -R 0:0 --quiet)
    } | "${filter[@]}" >"$out.tmp"
    mv "$out.tmp" "$out"
}

# install_busybox DIR: busybox-static as DIR/bin/busybox plus one symlink per
# applet (bin/ only: busybox finds its applets by name wherever they are).
install_busybox() {
    local dir=$1 applet
    mkdir -p "$dir/bin" "$dir/sbin" "$dir/usr/bin" "$dir/usr/sbin"
    cp /bin/busybox "$dir/bin/busybox"
    for applet in $("$dir/bin/busybox" --list); do
        [ -e "$dir/bin/$applet" ] || ln -s busybox "$dir/bin/$applet"
    done
}
