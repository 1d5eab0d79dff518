#!/usr/bin/env bash
# Fetch the kernel of the nested KVM host VM (see run.sh): Debian's stock
# cloud kernel, whose kvm_amd works under QEMU TCG with +svm (run.sh turns npt off).
#   $FLINT_CACHE/host/vmlinuz
#   $FLINT_CACHE/host/modules/*.ko     (uncompressed)
#   $FLINT_CACHE/host/modules/order    (load order, dependencies first)
# The package is only downloaded and unpacked in the cache, never installed:
# it must not replace the machine's own kernel.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/../lib.sh"

out=$FLINT_CACHE/host
stampfile=$out/host.stamp
mkdir -p "$out"

ensure_packages kmod xz-utils zstd qemu-system-x86 busybox-static cpio gzip

# Modules the rig needs: KVM itself, plus tun/veth/bridge for network tests,
# nftables with connection tracking and NAT for `flint run --net nat` (tests/nat.rs),
# tc's ingress qdisc with matchall and mirred to join a pod's TAP to its CNI
# interface (containerd shim), and overlayfs for containerd's default snapshotter.
# Their dependencies are added from `modinfo -F depends` below.
wanted=(irqbypass kvm kvm-amd tun veth bridge vhost_net vhost_vsock
    nf_tables nf_conntrack nf_nat nft_ct nft_chain_nat nft_nat nft_masq
    sch_ingress cls_matchall act_mirred overlay)

# linux-image-cloud-amd64 is a metapackage; its Depends names the real,
# versioned package (e.g. linux-image-6.1.0-56-cloud-amd64).
resolve_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}
pkg=$(resolve_pkg)
if [ -z "$pkg" ]; then
    # fresh machine whose package lists were never fetched
    apt-get update -qq
    pkg=$(resolve_pkg)
fi
[ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 to a versioned package"
version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')

stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/../lib.sh" "$pkg=$version" "${wanted[*]}")
if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/modules/order" ]; then
    log "host kernel is up to date ($pkg $version)"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log "downloading $pkg $version..."
# (no _apt sandbox: the temp dir is private to us and the warning is noise)
(cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$version")
dpkg-deb -x "$tmp"/*.deb "$tmp/root"

vmlinuz=$(find "$tmp/root/boot" -name 'vmlinuz-*' | head -n1)
[ -n "$vmlinuz" ] || die "no vmlinuz in $pkg"
kver=${vmlinuz##*/vmlinuz-}
moddir=$tmp/root/lib/modules/$kver
[ -d "$moddir" ] || die "no /lib/modules/$kver in $pkg"

rm -rf "$out/modules.new"
mkdir -p "$out/modules.new"

# find_module NAME: path of NAME.ko[.xz|.zst] (modules use - and _ alike)
find_module() {
    local n1=${1//_/-} n2=${1//-/_}
    find "$moddir/kernel" \( -name "$n1.ko*" -o -name "$n2.ko*" \) | head -n1
}

# add_module NAME: copy NAME (decompressed; busybox insmod may not read
# compressed modules) after its dependencies, appending to the load order.
declare -A seen=()
add_module() {
    local name=$1 path dep base
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    path=$(find_module "$name")
    [ -n "$path" ] || die "module $name not found in $pkg"
    for dep in $(modinfo -F depends "$path" | tr ',' ' '); do
        add_module "$dep"
    done
    base=$(basename "$path")
    case $base in
    *.ko.xz) xz -dc "$path" >"$out/modules.new/${base%.xz}" ;;
    *.ko.zst) zstd -qdc "$path" >"$out/modules.new/${base%.zst}" ;;
    *) cp "$path" "$out/modules.new/$base" ;;
    esac
    echo "${base%%.ko*}.ko" >>"$out/modules.new/order"
}
for m in "${wanted[@]}"; do add_module "$m"; done

rm -rf "$out/modules"
mv "$out/modules.new" "$out/modules"
cp "$vmlinuz" "$out/vmlinuz"
echo "$kver" >"$out/kernel-release"
echo "$stamp" >"$stampfile"
log "host kernel ready: $kver, modules: $(tr '\n' ' ' <"$out/modules/order")"
