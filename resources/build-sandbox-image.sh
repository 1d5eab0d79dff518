#!/usr/bin/env bash
# Build flint's default sandbox image and the guest agent (agent/):
#   $FLINT_CACHE/sandbox/initramfs.cpio.gz  busybox, /usr/bin/flint-agent and an /init
#                                           that starts the agent (see below)
#   $FLINT_CACHE/sandbox/flint-agent        the static agent on its own (for other images)
#   $FLINT_CACHE/sandbox/agent-client       a static host-side client (tests, by hand)
# Cached: rebuilt only when the agent's sources, this script, busybox or rustc change.
# Cargo builds in $FLINT_CACHE/sandbox/target, so a rebuild is incremental. Installed without
# the sources (the .deb puts this script in /usr/lib/flint), it packs the static flint-agent
# and agent-client that were installed beside it instead of building them.
#
# The guest's root file system is the initramfs itself (a tmpfs), so nothing the sandboxed
# commands do reaches any file on the host. /init mounts proc, sys, devtmpfs, devpts and
# tmpfs on /tmp, /run and /dev/shm, brings up `lo`, signals "booted" through flint's
# boot-timer port, then runs flint-agent (vsock port 52) and restarts it, after 1 s, should
# it ever exit (the VM stays up for `flint exec`). The host powers the guest off through the
# agent: a `Shutdown` request makes it `sync` and `reboot(2)`; with flint's `reboot=k` the
# VM resets and flint exits 0.
#
# A container image (`flint run --image`): with `flint.image=/dev/vdX` on the kernel command
# line (flint_agent::IMAGE_PARAM), /init mounts that disk (the image's files, ext4) read-only
# and a writable overlay over it at /run/flint/root (flint_agent::IMAGE_ROOT), the overlay's
# writes in guest memory, or on the ext4 disk named by `flint.scratch=/dev/vdY`
# (flint_agent::SCRATCH_PARAM; the host formats it). Inside go proc, sysfs, devtmpfs (with
# the /dev/fd, /dev/std* links), devpts, a tmpfs on /dev/shm, and bind mounts of this
# initramfs's /etc/hosts, /etc/hostname and /etc/resolv.conf over the image's (as Docker
# does; the image itself is never written). The agent keeps running from the initramfs and
# the host runs the image's commands with that directory as their root. The root appears
# only once all of it is mounted: if anything fails (logged to the kernel log), it is
# missing and the agent says so to the host.
#
# `flint run --net nat` and the containerd shim's pod networking: with
# `flint.net=ADDR/PREFIX,GATEWAY,DNS...` on the kernel command line, /init gives eth0 that
# address and default route (none when GATEWAY is empty), and writes the name servers to
# /etc/resolv.conf (which an image's root then sees too).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

out=$FLINT_CACHE/sandbox
target=$out/initramfs.cpio.gz
stampfile=$out/initramfs.stamp
triple=x86_64-unknown-linux-gnu
mkdir -p "$out"

[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported"
if [ -f "$repo/agent/Cargo.toml" ]; then
    # A source checkout: build the agent.
    ensure_packages busybox-static cpio gzip libc6-dev
    command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup)"
    mapfile -t sources < <(find "$repo/agent" -type f \( -name '*.rs' -o -name Cargo.toml \) | LC_ALL=C sort)
    stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/lib.sh" "$repo/Cargo.toml" "$repo/Cargo.lock" \
        "${sources[@]}" "busybox-static=$(pkg_version busybox-static)" "$(rustc -vV)")
    built=$out/target/$triple/release
else
    # Installed: the static agent and client ship beside this script.
    ensure_packages busybox-static cpio gzip
    for bin in flint-agent agent-client; do
        [ -x "$here/$bin" ] || die "$here/$bin is missing (no agent sources in $repo either)"
    done
    stamp=$(stamp_of "${BASH_SOURCE[0]}" "$here/lib.sh" "$here/flint-agent" "$here/agent-client" \
        "busybox-static=$(pkg_version busybox-static)")
    built=$here
fi
if [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ] && [ -f "$target" ] &&
    [ -x "$out/flint-agent" ] && [ -x "$out/agent-client" ]; then
    log "sandbox image is up to date ($target)"
    exit 0
fi

if [ "$built" != "$here" ]; then
    # Static (glibc's libc.a): the image has no shared libraries. Unwinding panics so that a
    # bug hit by one connection ends that connection's thread, not the agent.
    log "building flint-agent (static)"
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_PANIC=unwind \
        cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p flint-agent --bins \
        --target "$triple" --target-dir "$out/target"
fi
for bin in flint-agent agent-client; do
    if ldd "$built/$bin" >/dev/null 2>&1 && ! ldd "$built/$bin" 2>&1 | grep -q 'statically linked'; then
        die "$built/$bin is dynamically linked: $(ldd "$built/$bin" 2>&1 | tr '\n' ' ')"
    fi
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install_busybox "$root"
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run" "$root/root" \
    "$root/etc" "$root/var" "$root/usr/local/bin"
cp "$built/flint-agent" "$root/usr/bin/flint-agent"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    >"$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$root/etc/group"
printf '127.0.0.1 localhost sandbox\n::1 localhost\n' >"$root/etc/hosts"
echo sandbox >"$root/etc/hostname"
# Empty until the host configures name resolution (it is bind-mounted into an image's root:
# write it in place, not by renaming another file over it).
: >"$root/etc/resolv.conf"

# PID 1. Kept small. As the parent of the agent it also reaps every orphaned process
# (busybox sh collects any child while it waits for the foreground one).
cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
ip link set lo up
hostname sandbox

log_error() {
    echo "<3>flint-sandbox: $*" >/dev/kmsg
}

# Make $1 (a path inside the image's overlay) a directory, or a regular file with "file", to
# mount on, replacing whatever else is there (in the overlay: the image itself is never
# written). A symbolic link is never kept: mount would follow it out of the image's root.
mount_point() {
    if [ "$2" = file ]; then
        [ -f "$1" ] && [ ! -L "$1" ] && return 0
        rm -rf "$1" && : >"$1"
    else
        [ -d "$1" ] && [ ! -L "$1" ] && return 0
        rm -rf "$1" && mkdir -p "$1"
    fi
}

# The container image on disk $1 (read-only ext4) under an overlay whose writes go to guest
# memory, or to the ext4 disk $2; assembled at $3 (then moved to its final place).
mount_image() {
    r=$3
    mkdir -p /run/flint/image /run/flint/rw "$r" || return 1
    mount -t ext4 -o ro,noload "$1" /run/flint/image || return 1
    if [ -n "$2" ]; then
        mount -t ext4 -o noatime "$2" /run/flint/rw || return 1
    else
        mount -t tmpfs -o mode=755 tmpfs /run/flint/rw || return 1
    fi
    mkdir -p /run/flint/rw/upper /run/flint/rw/work || return 1
    mount -t overlay -o lowerdir=/run/flint/image,upperdir=/run/flint/rw/upper,workdir=/run/flint/rw/work \
        overlay "$r" || return 1
    for d in proc sys dev; do
        mount_point "$r/$d" || return 1
    done
    if [ ! -e "$r/tmp" ] && [ ! -L "$r/tmp" ]; then
        mkdir -m 1777 "$r/tmp" || return 1
    fi
    mount -t proc proc "$r/proc" &&
        mount -t sysfs sysfs "$r/sys" &&
        mount -t devtmpfs devtmpfs "$r/dev" &&
        mkdir -p "$r/dev/pts" "$r/dev/shm" &&
        mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts "$r/dev/pts" &&
        mount -t tmpfs -o mode=1777 tmpfs "$r/dev/shm" || return 1
    # The devtmpfs is the guest's own /dev: the links are then there too.
    ln -sfn /proc/self/fd "$r/dev/fd" &&
        ln -sfn /proc/self/fd/0 "$r/dev/stdin" &&
        ln -sfn /proc/self/fd/1 "$r/dev/stdout" &&
        ln -sfn /proc/self/fd/2 "$r/dev/stderr" || return 1
    # Name resolution as in the rest of the sandbox. An image whose /etc is a link (to be
    # followed inside its root, which mount cannot do) keeps its own files.
    if [ ! -e "$r/etc" ] && [ ! -L "$r/etc" ]; then
        mkdir -m 755 "$r/etc" || return 1
    fi
    if [ -d "$r/etc" ] && [ ! -L "$r/etc" ]; then
        for f in hosts hostname resolv.conf; do
            mount_point "$r/etc/$f" file && mount --bind "/etc/$f" "$r/etc/$f" || return 1
        done
    else
        log_error "the image's /etc is not a directory: its hosts, hostname and resolv.conf stay"
    fi
}

# eth0's address, the gateway and the name servers from
# flint.net=ADDR/PREFIX,GATEWAY[,DNS]...: the same in every sandbox with `flint run --net nat`,
# those of the network namespace's interface for the containerd shim's pods, whose GATEWAY
# may be empty (no default route).
configure_net() {
    old_ifs=$IFS
    IFS=,
    # shellcheck disable=SC2086  # split at the commas (globbing is off)
    set -- $1
    IFS=$old_ifs
    [ $# -ge 1 ] || return 1
    ip link set eth0 up && ip addr add "$1" dev eth0 || return 1
    if [ -n "${2:-}" ]; then
        ip route add default via "$2" || return 1
    fi
    shift
    [ $# -eq 0 ] || shift
    # In place: the file is bind-mounted into an image's root.
    : >/etc/resolv.conf || return 1
    for dns in "$@"; do
        echo "nameserver $dns" >>/etc/resolv.conf || return 1
    done
}

image=
scratch=
net=
set -f # the words of the command line are not patterns
for arg in $(cat /proc/cmdline); do
    case $arg in
    flint.image=*) image=${arg#flint.image=} ;;
    flint.scratch=*) scratch=${arg#flint.scratch=} ;;
    flint.net=*) net=${arg#flint.net=} ;;
    esac
done
if [ -n "$net" ]; then
    configure_net "$net" || log_error "cannot configure eth0 from flint.net=$net"
fi
set +f
if [ -n "$image" ]; then
    if mount_image "$image" "$scratch" /run/flint/staging; then
        mkdir -p /run/flint/root && mount --move /run/flint/staging /run/flint/root ||
            log_error "cannot move the image's root to /run/flint/root"
    else
        log_error "cannot mount the container image on $image${scratch:+ (scratch disk $scratch)}; see the messages above"
    fi
fi

# Boot timer: byte 123 to I/O port 0x3f0 (offset 1008 of /dev/port).
printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1 conv=notrunc 2>/dev/null

# The agent serves the host on vsock port 52 and reboots the guest when the host asks for
# a shutdown. Should it exit, restart it: the VM stays usable for `flint exec`.
while :; do
    /usr/bin/flint-agent </dev/null
    echo "<3>flint-sandbox: flint-agent exited with status $?; restarting it" >/dev/kmsg
    sleep 1
done
INIT
chmod 755 "$root/init"

make_initramfs "$root" "$target"
cp "$built/flint-agent" "$out/flint-agent.tmp" && mv "$out/flint-agent.tmp" "$out/flint-agent"
cp "$built/agent-client" "$out/agent-client.tmp" && mv "$out/agent-client.tmp" "$out/agent-client"
echo "$stamp" >"$stampfile"
log "sandbox image ready: $target ($(du -k "$target" | cut -f1) KiB)"
