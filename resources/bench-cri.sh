#!/usr/bin/env bash
# CRI benchmark (not a test): pod start to container running through containerd's CRI
# plugin, as a kubelet drives it (cri-client, this workspace's small CRI client):
# RunPodSandbox, CreateContainer, StartContainer, then ContainerStatus until RUNNING, with
# the `flint` runtime handler (io.containerd.flint.v2: one microVM per pod, its pause and
# app containers inside) and with `runc` (the container baseline); pods one at a time, then
# eight at a time as pods per minute. Prints one table.
#
# usage: resources/bench-cri.sh [-n PODS] [--debug]
#
# --debug runs the debug builds of the shim and cri-client (quicker to build; the shim's VM
# runs slower) instead of release builds.
#
# Each pod has one container running `sleep 600` from a one-layer busybox image made here
# (the pause image is the same layer sleeping); both are imported into containerd's
# k8s.io namespace beforehand, so no pull is timed. The pods' network is CNI's bridge plugin
# (host-local addresses, no masquerading). Every pod is stopped and removed after its
# batch (not timed). flint's VM is booted for each pod (no snapshot restore).
#
# Where the local /dev/kvm cannot boot Linux (PVM), everything runs inside the nested KVM
# host (resources/nested-host/run.sh): runc runs with no_pivot there (the host's root is its
# initial RAM file system) and the cgroup v2 hierarchy is mounted for it. Timings there are
# only comparable with other timings taken in the same rig, in the same run. BENCH_RAW=1
# prints the raw output.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"
# shellcheck source=resources/oci-layout.sh
. "$here/oci-layout.sh"

pods=8
profile=release
while (($#)); do
    case $1 in
    -n) pods=${2:?}; shift ;;
    --debug) profile=debug ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
((pods > 0)) || die "-n wants a positive number of pods"

ensure_packages containerd containernetworking-plugins busybox-static e2fsprogs protobuf-compiler
for f in guest/vmlinux sandbox/initramfs.cpio.gz; do
    [ -f "$FLINT_CACHE/$f" ] || die "$FLINT_CACHE/$f is missing: run resources/build-guest-kernel.sh and resources/build-sandbox-image.sh"
done
log "building the containerd shim and cri-client ($profile)"
release=()
[ "$profile" = debug ] || release=(--release)
(cd "$here/.." && cargo build "${release[@]}" --quiet --bin containerd-shim-flint-v2 &&
    cargo build "${release[@]}" --quiet -p cri-client)
target=${CARGO_TARGET_DIR:-$here/../target}/$profile
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The images: busybox-static and its applet links in one layer, imported as IMAGE and PAUSE.
image=docker.io/library/flint-bench:1
pause=docker.io/library/flint-bench-pause:1
mkdir -p "$work/root/tmp" "$work/root/etc"
install_busybox "$work/root"
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/root/etc/passwd"
echo 'root:x:0:' >"$work/root/etc/group"
chmod 1777 "$work/root/tmp"
tar -C "$work/root" --owner=0 --group=0 --numeric-owner --sort=name -cf "$work/root.tar" .
for which in image pause; do
    case $which in
    image) name=$image cmd='["sh"]' ;;
    pause) name=$pause cmd='["sleep","1000000000"]' ;;
    esac
    write_oci_layout "$work/$which" "$work/root.tar" \
        "{\"Env\":[\"PATH=/bin:/usr/bin:/sbin:/usr/sbin\"],\"Cmd\":$cmd}" 1 "resources/bench-cri.sh"
    # `ctr image import` names the image after this annotation.
    sed -i "s|\"annotations\":{|\"annotations\":{\"io.containerd.image.name\":\"$name\",|" "$work/$which/index.json"
    tar -C "$work/$which" -cf "$work/$which.tar" .
done

# containerd with directories and a socket of its own (@DIR@) and its CRI plugin.
cat >"$work/config.toml" <<TOML
version = 2
root = "@DIR@/root"
state = "@DIR@/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "@DIR@/containerd.sock"
[ttrpc]
  address = "@DIR@/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        NoPivotRoot = @NOPIVOT@
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flint]
      runtime_type = "io.containerd.flint.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "@CNI@"
    conf_dir = "@DIR@/cni"
TOML
cat >"$work/cni.conflist" <<'JSON'
{"cniVersion": "0.4.0", "name": "flint-bench", "plugins": [
  {"type": "bridge", "bridge": "flintbench0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.89.0.0/24"}]],
            "dataDir": "@DIR@/cni-ipam"}},
  {"type": "loopback"}]}
JSON

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
PODS=$pods
IMAGE=$image
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
# The first echo ends whatever the firmware left on the console's current line.
echo
export PATH="$BIN:$PATH"
C=$W/containerd
mkdir -p "$C/cni" "$W/shim-work"
nopivot=false
if [ "$NESTED" = 1 ]; then
    nopivot=true
    # runc needs the cgroup v2 hierarchy (the nested host mounts none).
    grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi
# The CRI plugin copies the host's /etc/hosts and /etc/resolv.conf into each pod.
[ -e /etc/hosts ] || echo "127.0.0.1 localhost" >/etc/hosts
[ -e /etc/resolv.conf ] || echo "nameserver 127.0.0.1" >/etc/resolv.conf
sed "s|@DIR@|$C|g; s|@NOPIVOT@|$nopivot|; s|@CNI@|$CNI|" "$BIN/config.toml" >"$C/config.toml"
sed "s|@DIR@|$C|g" "$BIN/cni.conflist" >"$C/cni/10-bench.conflist"
echo "{\"kernel\": \"$BIN/vmlinux\", \"initramfs\": \"$BIN/sandbox.cpio.gz\", \"work_dir\": \"$W/shim-work\"}" \
    >"$W/shim.json"
FLINT_SHIM_CONFIG=$W/shim.json "$BIN/containerd" --config "$C/config.toml" >"$W/containerd.log" 2>&1 &
CPID=$!
n=0
until grep -q "containerd successfully booted" "$W/containerd.log" 2>/dev/null || [ $n -ge 300 ]; do
    sleep 0.2 2>/dev/null || sleep 1
    n=$((n + 1))
done
CTR="$BIN/ctr --address $C/containerd.sock --namespace k8s.io"
for i in image pause; do
    CONTAINERD_SNAPSHOTTER=overlayfs $CTR image import "$BIN/$i.tar" >/dev/null || echo "BENCH-FAIL import $i"
done
echo "BENCH-CONTAINERD $("$BIN/containerd" --version)"
echo "BENCH-RUNC $("$BIN/runc" --version | head -n1)"
CRI="$BIN/cri-client --socket $C/containerd.sock"
for rt in flint runc; do
    # One pod first, unmeasured (shown, but not fatal, if it fails: the nested host's first
    # guest boot now and then stalls).
    $CRI bench $rt "$IMAGE" 1 1 >"$W/warm.out" 2>&1 || { echo "BENCH-WARN $rt warm-up"; cat "$W/warm.out"; }
    $CRI bench $rt "$IMAGE" "$PODS" 1 >"$W/one.out" 2>&1 || { echo "BENCH-FAIL $rt one"; cat "$W/one.out"; }
    sed "s/^/BENCH $rt-one /" "$W/one.out"
    $CRI bench $rt "$IMAGE" 8 8 >"$W/eight.out" 2>&1 || { echo "BENCH-FAIL $rt eight"; cat "$W/eight.out"; }
    sed "s/^/BENCH $rt-eight /" "$W/eight.out"
done
echo "BENCH-LEFT $($CRI pods | wc -l) $($CTR task ls -q | wc -l) $(find "$W/shim-work" -mindepth 1 | wc -l)"
grep -E 'level=(error|fatal|warning)' "$W/containerd.log" | tail -n 8 | sed 's/^/BENCH-LOG /'
kill $CPID
wait $CPID
SCENARIO

files=("$target/containerd-shim-flint-v2:containerd-shim-flint-v2" "$target/cri-client:cri-client"
    "$(command -v containerd):containerd" "$(command -v ctr):ctr" "$(command -v runc):runc"
    "$(command -v containerd-shim-runc-v2):containerd-shim-runc-v2" "$FLINT_CACHE/guest/vmlinux:vmlinux"
    "$FLINT_CACHE/sandbox/initramfs.cpio.gz:sandbox.cpio.gz"
    "$work/config.toml:config.toml" "$work/cni.conflist:cni.conflist"
    "$work/image.tar:image.tar" "$work/pause.tar:pause.tar"
    "$(command -v mkfs.ext4):mkfs.ext4" "$(command -v debugfs):debugfs")
for p in bridge host-local loopback; do files+=("/usr/lib/cni/$p:cni/$p"); done
budget=$((900 + 120 * pods))
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo "BIN=/bench; W=/tmp/bench; CNI=/bench/cni; NESTED=1; mkdir -p \$W"; cat "$work/scenario.sh"; } >"$work/nested.sh"
    adds=()
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    "$here/nested-host/run.sh" --timeout "$budget" --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin/cni" "$work/w"
    for f in "${files[@]}"; do ln -s "$(realpath "${f%%:*}")" "$work/bin/${f##*:}"; done
    BIN=$work/bin W=$work/w CNI=$work/bin/cni NESTED=0 timeout "$budget" sh "$work/scenario.sh" \
        >"$work/out" 2>&1 || { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

tr -d '\r' <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH-FAIL' "$work/clean"; then
    cat "$work/clean"
    die "a pod failed (output above)"
fi
# median LABEL: the median of LABEL's pod_ms lines ("-" without any).
median() {
    sed -n "s/^BENCH $1 pod_ms \([0-9]*\)\$/\1/p" "$work/clean" | sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        printf "%.0f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
value() { sed -n "s/^BENCH $1 $2 //p" "$work/clean" | head -n1; }

echo "CRI benchmark, $(date -u +%Y-%m-%d), flint $(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo '?') ($profile build): $pods pods one at a time, then 8 at once, per runtime handler; one boot of the host"
echo "where: $where"
echo "containerd: $(sed -n 's/.*BENCH-CONTAINERD //p' "$work/clean" | head -n1); runc: $(sed -n 's/.*BENCH-RUNC //p' "$work/clean" | head -n1)"
echo "flint guest: 1 vCPU, 128 MiB, the sandbox initramfs and its agent, booted per pod; root disks: ext4 made by mkfs.ext4 -d"
printf '%-8s %20s %20s %16s\n' handler "one pod, ms (median)" "8 at once, ms (med)" "8 at once"
printf '%-8s %20s %20s %16s\n' "" "RunPodSandbox..RUNNING" "" "pods/min"
for rt in flint runc; do
    printf '%-8s %20s %20s %16s\n' "$rt" "$(median "$rt-one")" "$(median "$rt-eight")" \
        "$(value "$rt-eight" pods_per_minute)"
done
grep '^BENCH-WARN' "$work/clean" || true
echo "left after the runs (pods, tasks, files in the shim's work directory): $(sed -n 's/.*BENCH-LEFT //p' "$work/clean" | head -n1)"
