#!/usr/bin/env bash
# Container image benchmark (not a test): `flint run --image I -- true`, start to exit,
# restored from the snapshot of the image's booted sandbox (the default) and booted
# (`--cold`), against `crun run` of the same image unpacked as an OCI bundle (Debian's crun:
# the container baseline), plus the conversion of the image into flint's disk (`flint image
# pull` into an empty cache: import, unpack, mkfs.ext4) per MiB of unpacked layers. Two
# images: a one-layer busybox image (made here from busybox-static) and the Debian image with
# Python of build-debian-image.sh. Every figure comes from one boot of the same host, in the
# same run; the runs of flint and crun alternate. Prints one table.
#
# usage: resources/bench-image.sh [-n RUNS]
#
# crun runs `true` with the default `crun spec` configuration (its own PID, mount, network,
# IPC, UTS and cgroup namespaces, a read-only root, the image's files from a directory),
# terminal off; its time includes creating and deleting the container. flint's includes
# opening the image, restoring (or booting) the VM, mounting the image and its overlay, the
# agent running `true` and the VM's end. Each run is timed by a small helper (stopwatch,
# compiled here) from fork to the end of wait, with CLOCK_MONOTONIC.
#
# Where the local /dev/kvm cannot boot Linux (PVM), everything runs inside the nested KVM
# host (resources/nested-host/run.sh); timings there are only comparable with other timings
# taken in the same rig, in the same run. BENCH_RAW=1 prints the raw output.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"
# shellcheck source=resources/oci-layout.sh
. "$here/oci-layout.sh"

runs=20
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
((runs > 0)) || die "-n wants a positive number of runs"

ensure_packages crun busybox-static e2fsprogs gcc libc6-dev python3
"$here/build-guest-kernel.sh"
"$here/build-sandbox-image.sh"
"$here/build-debian-image.sh"
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet --bin flint)
flint=${CARGO_TARGET_DIR:-$here/../target}/release/flint
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gcc -O2 -Wall -o "$work/stopwatch" "$here/stopwatch.c" || die "cannot compile the stopwatch helper"

# The busybox image: busybox-static and its applet links, one layer, Cmd ["sh"].
mkdir -p "$work/busybox-root/tmp" "$work/busybox-root/etc"
install_busybox "$work/busybox-root"
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/busybox-root/etc/passwd"
echo 'root:x:0:' >"$work/busybox-root/etc/group"
chmod 1777 "$work/busybox-root/tmp"
tar -C "$work/busybox-root" --owner=0 --group=0 --numeric-owner --sort=name -cf "$work/busybox.tar" .
write_oci_layout "$work/busybox" "$work/busybox.tar" '{"Env":["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],"Cmd":["sh"]}' \
    busybox "resources/bench-image.sh"
images=(busybox debian-python)
declare -A layout=([busybox]=$work/busybox [debian-python]=$FLINT_CACHE/test-images/debian-python)
declare -A unpacked_bytes
for img in "${images[@]}"; do
    unpacked_bytes[$img]=$(oci_layer_blobs "${layout[$img]}" | xargs cat | gzip -dc | wc -c)
done

# crun's bundle configuration: `crun spec`'s default with `true` as the process, no terminal.
(cd "$work" && crun spec)
python3 - "$work/config.json" <<'PY'
import json, sys
path = sys.argv[1]
spec = json.load(open(path))
spec["process"]["args"] = ["true"]
spec["process"]["terminal"] = False
json.dump(spec, open(path, "w"), indent=1)
PY

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
RUNS=$runs
IMAGES='${images[*]}'
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
# The first echo ends whatever the firmware left on the console's current line.
echo
export PATH="$BIN:$PATH"
R="$BIN/flint run --kernel $BIN/vmlinux --initramfs $BIN/sandbox.cpio.gz"
# crun needs the cgroup v2 hierarchy (the nested host mounts none) and a state directory.
if [ "$NESTED" = 1 ] && ! grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts; then
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi
mkdir -p /run/crun
echo "BENCH-CRUN $(crun --version | head -n1)"
for img in $IMAGES; do
    layout=$IMAGES_DIR/$img
    # The crun bundle: the image's layers unpacked in order (one each here).
    bundle=$W/bundle-$img
    mkdir -p "$bundle/rootfs"
    for layer in $(cat "$layout.layers"); do tar -xzf "$layout/blobs/sha256/$layer" -C "$bundle/rootfs"; done
    cp "$BIN/config.json" "$bundle/config.json"
    # pivot_root(2) cannot leave the initial RAM file system (the nested host's root):
    # there, crun moves the new root over / and chroots instead (--no-pivot).
    crun_flags=
    if ! crun run --bundle "$bundle" "probe-$img" </dev/null >"$W/crun.out" 2>&1; then
        crun_flags=--no-pivot
        crun run $crun_flags --bundle "$bundle" "probe2-$img" </dev/null >"$W/crun.out" 2>&1 ||
            { echo "BENCH-FAIL crun $img"; cat "$W/crun.out"; }
    fi
    echo "BENCH-CRUN-FLAGS ${crun_flags:-none}"
    # A fresh cache: the conversion, then the first run (boots and snapshots), then both
    # kinds of run alternating with crun.
    export FLINT_CACHE=$W/cache-$img
    "$BIN/stopwatch" "convert-$img" "$BIN/flint" image pull "$layout" 3>&1 </dev/null >"$W/pull.out" 2>&1 ||
        { echo "BENCH-FAIL pull $img"; cat "$W/pull.out"; }
    grep -q '^sha256:' "$W/pull.out" || { echo "BENCH-FAIL pull $img"; cat "$W/pull.out"; }
    echo "BENCH-DISK $img $(stat -c %s "$FLINT_CACHE"/images/disks/*.ext4)"
    "$BIN/stopwatch" "first-$img" $R --image "$layout" -- true 3>&1 </dev/null >"$W/first.out" 2>&1
    i=0
    while [ $i -lt $RUNS ]; do
        "$BIN/stopwatch" "restored-$img" $R --image "$layout" -- true 3>&1 </dev/null >"$W/run.out" 2>&1
        "$BIN/stopwatch" "crun-$img" crun run $crun_flags --bundle "$bundle" "bench-$img-$i" \
            3>&1 </dev/null >"$W/crun.out" 2>&1
        i=$((i + 1))
    done
    grep -v '^$' "$W/run.out" "$W/crun.out" | head -n 5 | sed 's/^/BENCH-LAST /'
    i=0
    while [ $i -lt $RUNS ]; do
        "$BIN/stopwatch" "cold-$img" $R --cold --image "$layout" -- true 3>&1 </dev/null >"$W/cold.out" 2>&1
        i=$((i + 1))
    done
    grep -v '^$' "$W/cold.out" | head -n 5 | sed 's/^/BENCH-LAST /'
    # For the record: where a restored run's time goes, as flint logs it.
    FLINT_LOG=debug $R --image "$layout" -- true </dev/null 2>&1 | grep -o 'sandbox: .* at [0-9]* ms' |
        sed "s/^/BENCH-TRACE $img /"
    rm -rf "$bundle" "$W/cache-$img"
done
SCENARIO

files=("$flint:flint" "$FLINT_CACHE/guest/vmlinux:vmlinux"
    "$FLINT_CACHE/sandbox/initramfs.cpio.gz:sandbox.cpio.gz" "$work/stopwatch:stopwatch"
    "$work/config.json:config.json" "$(command -v mkfs.ext4):mkfs.ext4" "$(command -v crun):crun")
for img in "${images[@]}"; do
    oci_layer_blobs "${layout[$img]}" | xargs -n1 basename >"$work/$img.layers"
done
budget=$((900 + 30 * runs))
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo "BIN=/bench; W=/tmp; IMAGES_DIR=/images; NESTED=1"; cat "$work/scenario.sh"; } >"$work/nested.sh"
    adds=()
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    for img in "${images[@]}"; do
        adds+=(--add "${layout[$img]}:/images/$img" --add "$work/$img.layers:/images/$img.layers")
    done
    "$here/nested-host/run.sh" --timeout "$budget" --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin" "$work/w" "$work/images"
    for f in "${files[@]}"; do ln -s "$(realpath "${f%%:*}")" "$work/bin/${f##*:}"; done
    for img in "${images[@]}"; do
        ln -s "$(realpath "${layout[$img]}")" "$work/images/$img"
        cp "$work/$img.layers" "$work/images/$img.layers"
    done
    BIN=$work/bin W=$work/w IMAGES_DIR=$work/images NESTED=0 timeout "$budget" sh "$work/scenario.sh" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

tr -d '\r' <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH-FAIL' "$work/clean"; then
    cat "$work/clean"
    die "a conversion or crun failed (output above)"
fi
# median LABEL: median milliseconds of the runs of LABEL that exited 0 ("-" without any).
median() {
    sed -n "s/^BENCH $1 \([0-9]*\) 0\$/\1/p" "$work/clean" | sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.0f", med / 1000 }'
}
# failed LABEL: how many runs of LABEL did not exit 0.
failed() { grep -c "^BENCH $1 [0-9]* [1-9][0-9]*\$" "$work/clean" || true; }
# once LABEL: milliseconds of the one run of LABEL, if it exited 0 ("-" otherwise).
once() {
    sed -n "s/^BENCH $1 \([0-9]*\) 0\$/\1/p" "$work/clean" |
        awk '{ v = $1 } END { if (NR) printf "%.0f", v / 1000; else print "-" }'
}

echo "flint run --image benchmark, $(date -u +%Y-%m-%d), flint $(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo '?'): medians of $runs runs, one boot of the host"
echo "where: $where; guest: 1 vCPU, 128 MiB, the sandbox initramfs and its agent; image disk: ext4"
crun_flags=$(sed -n 's/.*BENCH-CRUN-FLAGS //p' "$work/clean" | head -n1)
echo "container baseline: $(sed -n 's/.*BENCH-CRUN //p' "$work/clean" | head -n1) (Debian), crun run of the image unpacked as an OCI bundle (crun spec defaults; extra flags: $crun_flags)"
printf '%-14s %9s %9s %10s %9s %9s %9s %9s %8s %8s\n' image unpacked disk conversion "" first restored cold crun restored/
printf '%-14s %9s %9s %10s %9s %9s %9s %9s %8s %8s\n' "" MiB MiB ms ms/MiB ms ms ms ms crun
for img in "${images[@]}"; do
    mib=$(awk -v b="${unpacked_bytes[$img]}" 'BEGIN { printf "%.1f", b / 1048576 }')
    disk=$(sed -n "s/.*BENCH-DISK $img \([0-9]*\)\$/\1/p" "$work/clean" | awk '{ printf "%.1f", $1 / 1048576 }')
    conv=$(once "convert-$img")
    per=$(awk -v c="$conv" -v m="$mib" 'BEGIN { if (c + 0 > 0) printf "%.1f", c / m; else print "-" }')
    restored=$(median "restored-$img")
    crun=$(median "crun-$img")
    ratio=$(awk -v r="$restored" -v c="$crun" 'BEGIN { if (c + 0 > 0 && r + 0 > 0) printf "%.1fx", r / c; else print "-" }')
    printf '%-14s %9s %9s %10s %9s %9s %9s %9s %8s %8s\n' "$img" "$mib" "$disk" "$conv" "$per" \
        "$(once "first-$img")" "$restored" "$(median "cold-$img")" "$crun" "$ratio"
done
for img in "${images[@]}"; do
    for kind in restored cold crun; do
        n=$(failed "$kind-$img")
        if ((n)); then echo "$img: $n $kind runs failed (not counted)"; fi
    done
done
for img in "${images[@]}"; do
    echo "one restored run of $img, as flint logs it: $(sed -n "s/.*BENCH-TRACE $img sandbox: //p" "$work/clean" |
        paste -sd, | sed 's/,/, /g')"
done
echo "conversion: flint image pull into an empty cache (import, unpack, mkfs.ext4), per MiB unpacked;"
echo "first: the image's first flint run (boots, then snapshots the booted sandbox); restored: later runs"
echo "(the default); cold: flint run --cold; crun: crun run, create to delete; aim: restored within 2x of crun"
