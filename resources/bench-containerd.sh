#!/usr/bin/env bash
# containerd benchmark (not a test): a container from start to end through containerd,
# `ctr run --rm IMAGE ID true`, with flint's shim (`--runtime io.containerd.flint.v2`: a
# microVM per container, its root disk built from the snapshot) and with runc (containerd's
# default runtime: the container baseline), in the same containerd, alternating; then eight
# at a time, as containers per minute. The image is a one-layer busybox image made here.
# Prints one table.
#
# usage: resources/bench-containerd.sh [-n RUNS]
#
# Each run is timed by a small helper (stopwatch, compiled here) from fork to the end of
# wait of `ctr run --rm`, with CLOCK_MONOTONIC: create (for flint: mkfs.ext4 of the
# container's root file system and the VM's boot), start (for flint: the agent answering),
# `true`, its exit, delete. flint's VM is booted every time (the shim restores no snapshot).
#
# Where the local /dev/kvm cannot boot Linux (PVM), everything runs inside the nested KVM
# host (resources/nested-host/run.sh), whose kernel has no overlay module: containerd uses
# its native snapshotter there (for both runtimes), and runc runs with --no-pivot (the
# host's root is its initial RAM file system). Timings there are only comparable with other
# timings taken in the same rig, in the same run. BENCH_RAW=1 prints the raw output.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"
# shellcheck source=resources/oci-layout.sh
. "$here/oci-layout.sh"

runs=10
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
((runs > 0)) || die "-n wants a positive number of runs"

ensure_packages containerd busybox-static e2fsprogs gcc libc6-dev
# The guest kernel and sandbox image as they are in the cache (not rebuilt here).
for f in guest/vmlinux sandbox/initramfs.cpio.gz; do
    [ -f "$FLINT_CACHE/$f" ] || die "$FLINT_CACHE/$f is missing: run resources/build-guest-kernel.sh and resources/build-sandbox-image.sh"
done
log "building the containerd shim (release)"
(cd "$here/.." && cargo build --release --quiet --bin containerd-shim-flint-v2)
shim=${CARGO_TARGET_DIR:-$here/../target}/release/containerd-shim-flint-v2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gcc -O2 -Wall -o "$work/stopwatch" "$here/stopwatch.c" || die "cannot compile the stopwatch helper"

# The image: busybox-static and its applet links, one layer, imported under IMAGE.
image=docker.io/library/flint-bench:1
mkdir -p "$work/root/tmp" "$work/root/etc"
install_busybox "$work/root"
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/root/etc/passwd"
echo 'root:x:0:' >"$work/root/etc/group"
chmod 1777 "$work/root/tmp"
tar -C "$work/root" --owner=0 --group=0 --numeric-owner --sort=name -cf "$work/root.tar" .
write_oci_layout "$work/layout" "$work/root.tar" '{"Env":["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],"Cmd":["sh"]}' \
    1 "resources/bench-containerd.sh"
# `ctr image import` names the image after this annotation.
sed -i "s|\"annotations\":{|\"annotations\":{\"io.containerd.image.name\":\"$image\",|" "$work/layout/index.json"
tar -C "$work/layout" -cf "$work/image.tar" .

# containerd with directories and a socket of its own (@DIR@), no CRI plugin.
cat >"$work/config.toml" <<'TOML'
version = 2
root = "@DIR@/root"
state = "@DIR@/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "@DIR@/containerd.sock"
[ttrpc]
  address = "@DIR@/containerd.sock.ttrpc"
TOML

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
RUNS=$runs
IMAGE=$image
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
# The first echo ends whatever the firmware left on the console's current line.
echo
export PATH="$BIN:$PATH"
C=$W/containerd
mkdir -p "$C" "$W/shim-work"
sed "s|@DIR@|$C|g" "$BIN/config.toml" >"$C/config.toml"
echo "{\"kernel\": \"$BIN/vmlinux\", \"initramfs\": \"$BIN/sandbox.cpio.gz\", \"work_dir\": \"$W/shim-work\"}" \
    >"$W/shim.json"
runc_flags=
if [ "$NESTED" = 1 ]; then
    export CONTAINERD_SNAPSHOTTER=native
    runc_flags=--no-pivot
    # runc needs the cgroup v2 hierarchy (the nested host mounts none).
    grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi
FLINT_SHIM_CONFIG=$W/shim.json "$BIN/containerd" --config "$C/config.toml" >"$W/containerd.log" 2>&1 &
CPID=$!
n=0
until grep -q "containerd successfully booted" "$W/containerd.log" 2>/dev/null || [ $n -ge 300 ]; do
    sleep 0.2 2>/dev/null || sleep 1
    n=$((n + 1))
done
CTR="$BIN/ctr --address $C/containerd.sock --namespace bench"
$CTR image import "$BIN/image.tar" >/dev/null || echo "BENCH-FAIL import"
echo "BENCH-CONTAINERD $("$BIN/containerd" --version)"
echo "BENCH-RUNC $("$BIN/runc" --version | head -n1)"
FLINT="$CTR run --rm --runtime io.containerd.flint.v2 $IMAGE"
RUNC="$CTR run --rm $runc_flags --runc-binary $BIN/runc $IMAGE"
# eight LABEL COMMAND...: COMMAND ID true, eight at once with IDs LABEL-1..8, timed together;
# each one that fails is reported.
cat >"$W/eight.sh" <<'EIGHT'
label=$1
shift
k=1
while [ $k -le 8 ]; do
    ("$@" "$label-$k" true </dev/null >/dev/null 2>"$W/$label-$k.err" ||
        echo "BENCH-FAIL $label-$k $(cat "$W/$label-$k.err")") &
    k=$((k + 1))
done
wait
EIGHT
# One of each first, unmeasured (and shown if it fails).
$FLINT warm-flint true </dev/null >"$W/warm.out" 2>&1 || { echo "BENCH-FAIL flint"; cat "$W/warm.out"; }
$RUNC warm-runc true </dev/null >"$W/warm.out" 2>&1 || { echo "BENCH-FAIL runc"; cat "$W/warm.out"; }
i=0
while [ $i -lt $RUNS ]; do
    "$BIN/stopwatch" flint $FLINT "f$i" true 3>&1 </dev/null >"$W/run.out" 2>&1
    "$BIN/stopwatch" runc $RUNC "r$i" true 3>&1 </dev/null >"$W/run.out" 2>&1
    i=$((i + 1))
done
for b in 1 2; do
    W=$W "$BIN/stopwatch" eight-flint sh "$W/eight.sh" "ef$b" $FLINT 3>&1
    W=$W "$BIN/stopwatch" eight-runc sh "$W/eight.sh" "er$b" $RUNC 3>&1
done
echo "BENCH-LEFT $($CTR task ls -q | wc -l) $(find "$W/shim-work" -mindepth 1 | wc -l)"
kill $CPID
wait $CPID
SCENARIO

files=("$shim:containerd-shim-flint-v2" "$(command -v containerd):containerd"
    "$(command -v ctr):ctr" "$(command -v runc):runc"
    "$(command -v containerd-shim-runc-v2):containerd-shim-runc-v2" "$FLINT_CACHE/guest/vmlinux:vmlinux"
    "$FLINT_CACHE/sandbox/initramfs.cpio.gz:sandbox.cpio.gz" "$work/stopwatch:stopwatch"
    "$work/config.toml:config.toml" "$work/image.tar:image.tar"
    "$(command -v mkfs.ext4):mkfs.ext4" "$(command -v debugfs):debugfs")
budget=$((600 + 60 * runs))
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo "BIN=/bench; W=/tmp/bench; NESTED=1; mkdir -p \$W"; cat "$work/scenario.sh"; } >"$work/nested.sh"
    adds=()
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    "$here/nested-host/run.sh" --timeout "$budget" --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin" "$work/w"
    for f in "${files[@]}"; do ln -s "$(realpath "${f%%:*}")" "$work/bin/${f##*:}"; done
    BIN=$work/bin W=$work/w NESTED=0 timeout "$budget" sh "$work/scenario.sh" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

tr -d '\r' <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH-FAIL' "$work/clean"; then
    cat "$work/clean"
    die "a container failed (output above)"
fi
# median LABEL: median milliseconds of the runs of LABEL that exited 0 ("-" without any).
median() {
    sed -n "s/^BENCH $1 \([0-9]*\) 0\$/\1/p" "$work/clean" | sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.0f", med / 1000 }'
}
# per_minute LABEL: containers a minute, from the batches of eight of LABEL (all of them).
per_minute() {
    sed -n "s/^BENCH $1 \([0-9]*\) 0\$/\1/p" "$work/clean" | awk '{ t += $1; n += 8 } END {
        if (n == 0) { print "-"; exit }
        printf "%.1f", n * 60000000 / t }'
}
failed() { grep -c "^BENCH $1 [0-9]* [1-9][0-9]*\$" "$work/clean" || true; }

echo "containerd benchmark, $(date -u +%Y-%m-%d), flint $(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo '?'): medians of $runs runs each, one boot of the host"
echo "where: $where"
echo "containerd: $(sed -n 's/.*BENCH-CONTAINERD //p' "$work/clean" | head -n1); runc: $(sed -n 's/.*BENCH-RUNC //p' "$work/clean" | head -n1)"
echo "flint guest: 1 vCPU, 128 MiB, the sandbox initramfs and its agent, booted; root disk: ext4 made by mkfs.ext4 -d"
printf '%-8s %14s %18s\n' runtime "ctr run --rm" "8 at a time"
printf '%-8s %14s %18s\n' "" "ms (median)" "containers/min"
for rt in flint runc; do
    printf '%-8s %14s %18s\n' "$rt" "$(median "$rt")" "$(per_minute "eight-$rt")"
done
for rt in flint runc eight-flint eight-runc; do
    n=$(failed "$rt")
    if ((n)); then echo "$rt: $n runs failed (not counted)"; fi
done
echo "left after the runs (tasks, files in the shim's work directory): $(sed -n 's/.*BENCH-LEFT //p' "$work/clean" | head -n1)"
echo "ctr run --rm IMAGE ID true, fork to exit: create, start, true, exit, delete"
