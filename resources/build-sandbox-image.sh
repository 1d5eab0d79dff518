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
