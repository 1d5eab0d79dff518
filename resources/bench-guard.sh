#!/usr/bin/env bash
# Benchmark guard (not a test, never fails on a slow figure): a short run of the boot and
# sandbox benchmarks that CI prints after the tests, so that a change costing 20% shows in
# the log. One nested-host boot (or the local hardware KVM) runs, in turn:
#   - `flint boot` of the test guest (1 vCPU, 128 MiB, initramfs, `true`, reboot) N times,
#   - Debian's QEMU microvm booting the same guest N times: the yardstick for this machine,
#   - `flint run -- true` restored from the snapshot of a booted sandbox N times (after the
#     first run, which boots and makes that snapshot).
# Machines differ by 2x or more and this rig's boots swing widely, so the guard prints each
# median both in milliseconds and as a ratio to QEMU's boot median of the same run; the ratios
# are what to compare with the reference figures in resources/bench-guard.ref (taken on the
# development machine, the commit and date noted there). A ratio 20% above its reference is
# flagged with "SLOWER" in the table; nothing fails.
#
# usage: resources/bench-guard.sh [-n RUNS] [--flint PATH] [--update-ref]
#   --flint PATH   the flint binary to measure (default: target/release/flint, built here);
#                  CI passes its debug build (target/debug/flint), already built by the tests.
#   --update-ref   write this run's ratios to resources/bench-guard.ref.
# Exit status: 0 with the table printed; 1 when the runs themselves failed (their output is
# printed then).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=5
flint=
update_ref=0
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --flint) flint=${2:?}; shift ;;
    --update-ref) update_ref=1 ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
[[ $runs =~ ^[1-9][0-9]?$ ]] || die "-n takes 1 to 99 runs"

"$here/build-guest-kernel.sh" >/dev/null
"$here/build-guest-initramfs.sh" >/dev/null
"$here/build-sandbox-image.sh" >/dev/null
if [ -z "$flint" ]; then
    log "building flint (release)"
    (cd "$here/.." && cargo build --release --quiet --bin flint)
    flint=${CARGO_TARGET_DIR:-$here/../target}/release/flint
fi
[ -x "$flint" ] || die "$flint is not an executable flint binary"
build=release
case $flint in *debug*) build=debug ;; esac
qemu=/usr/bin/qemu-system-x86_64
[ -x "$qemu" ] || die "$qemu is missing (install qemu-system-x86)"
ref=$here/bench-guard.ref

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

exec_b64=$(printf 'true' | base64 -w0)
cmdline="console=ttyS0 panic=1 pci=off acpi=off quiet flint.exec=$exec_b64"
cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
RUNS=$runs
CMDLINE='$cmdline'
QEMU_ARGS='-M microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=off,pic=off,acpi=off -enable-kvm -cpu host -m 128 -smp 1 -nodefaults -no-user-config -nographic -serial stdio -no-reboot'
SCENARIO
cat >>"$work/scenario.sh" <<'SCENARIO'
# busybox has no date +%N: /proc/uptime gives centiseconds, enough for runs of seconds.
now() { cut -d' ' -f1 /proc/uptime; }
export FLINT_CACHE=$W/flint-cache
boot_flint() {
    "$BIN/flint" boot --kernel "$BIN/vmlinux" --initrd "$BIN/initramfs.cpio.gz" --vcpus 1 \
        --memory 128 --cmdline "$CMDLINE reboot=k" </dev/null
}
boot_qemu() {
    # shellcheck disable=SC2086
    "$QEMU" $QEMU_ARGS -kernel "$BIN/vmlinux" -initrd "$BIN/initramfs.cpio.gz" \
        -append "$CMDLINE reboot=t" </dev/null
}
run_flint() {
    "$BIN/flint" run --kernel "$BIN/vmlinux" --initramfs "$BIN/sandbox.cpio.gz" -- true </dev/null
}
# time_it KIND: one timed run; a failure is printed and counted, not timed.
time_it() {
    t0=$(now)
    if "$1" >"$W/out" 2>&1; then
        t1=$(now); echo "GUARD $1 $t0 $t1"
    else
        echo "GUARD-FAILED $1"; tail -n 5 "$W/out"
    fi
}
run_flint >"$W/out" 2>&1 || { echo "GUARD-FAILED first flint run"; tail -n 20 "$W/out"; }
i=0
while [ $i -lt $RUNS ]; do
    # alternate the order so that drifting load hits all three alike
    if [ $((i % 2)) -eq 0 ]; then
        time_it boot_flint; time_it boot_qemu; time_it run_flint
    else
        time_it run_flint; time_it boot_qemu; time_it boot_flint
    fi
    i=$((i + 1))
done
SCENARIO

files=("$flint:flint" "$FLINT_CACHE/guest/vmlinux:vmlinux"
    "$FLINT_CACHE/guest/initramfs.cpio.gz:initramfs.cpio.gz"
    "$FLINT_CACHE/sandbox/initramfs.cpio.gz:sandbox.cpio.gz")
budget=$((300 + 90 * runs))
if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    { echo "BIN=/bench; W=/tmp; QEMU=$qemu"; cat "$work/scenario.sh"; } >"$work/nested.sh"
    adds=(--add "$qemu:$qemu" --add /usr/share/qemu:/usr/share/qemu)
    for f in "${files[@]}"; do adds+=(--add "${f%%:*}:/bench/${f##*:}"); done
    rc=0
    "$here/nested-host/run.sh" --timeout "$budget" --scenario "$work/nested.sh" "${adds[@]}" \
        >"$work/out" 2>&1 || rc=$?
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin" "$work/w"
    for f in "${files[@]}"; do ln -s "$(realpath "${f%%:*}")" "$work/bin/${f##*:}"; done
    rc=0
    BIN=$work/bin W=$work/w QEMU=$qemu timeout "$budget" sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        rc=$?
    where="local hardware KVM"
fi
tr -d '\r' <"$work/out" >"$work/clean"

# median KIND: the median of one kind's times in ms, or nothing without samples.
median() {
    sed -n "s/.*GUARD $1 \\([0-9.]*\\) \\([0-9.]*\\)\$/\\1 \\2/p" "$work/clean" |
        awk '{ print ($2 - $1) * 1000 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR) printf "%.0f\n", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
count() { grep -c "GUARD $1 " "$work/clean" || true; }
qemu_ms=$(median boot_qemu)
if ((rc)) || [ -z "$qemu_ms" ] || [ -z "$(median boot_flint)" ] || [ -z "$(median run_flint)" ]; then
    tail -n 60 "$work/clean"
    echo "benchmark guard: the runs failed (status $rc), no figures; output above"
    exit 1
fi

# ref_of NAME: the reference ratio for NAME from the .ref file, if any.
ref_of() {
    [ -f "$ref" ] || return 0
    sed -n "s/^$1 \\([0-9.]*\\)\$/\\1/p" "$ref" | head -n1
}
echo "benchmark guard, $(date -u +%Y-%m-%d), $runs runs each, alternating; flint $build build ($flint)"
echo "where: $where; guest: 1 vCPU, 128 MiB"
[ ! -f "$ref" ] || sed -n 's/^# taken /reference: taken /p' "$ref"
printf '%-44s %9s %9s %9s %9s  %s\n' figure "median" "n" "/QEMU" "ref" "change"
ratios=()
for kind in boot_qemu boot_flint run_flint; do
    case $kind in
    boot_qemu) label="QEMU microvm boot (the yardstick)" ;;
    boot_flint) label="flint boot, start to exit" ;;
    run_flint) label="flint run -- true, restored" ;;
    esac
    ms=$(median $kind)
    ratio=$(awk -v a="$ms" -v b="$qemu_ms" 'BEGIN { printf "%.3f", a / b }')
    r=$(ref_of "$kind")
    change=-
    if [ -n "$r" ] && [ "$kind" != boot_qemu ]; then
        change=$(awk -v a="$ratio" -v b="$r" 'BEGIN {
            c = (a / b - 1) * 100; printf "%+.0f%%%s", c, (c >= 20 ? "  SLOWER" : "") }')
    fi
    printf '%-44s %7s ms %9s %9s %9s  %s\n' "$label" "$ms" "$(count $kind)" "$ratio" "${r:--}" "$change"
    ratios+=("$kind $ratio")
done
fails=$(grep -c '^GUARD-FAILED' "$work/clean" || true)
echo "runs that failed (counted, not timed): $fails"
if ((update_ref)); then
    {
        echo "# Reference ratios for resources/bench-guard.sh (median / QEMU microvm boot median)."
        echo "# taken $(date -u +%Y-%m-%d) at $(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo '?'), $runs runs, flint $build build, $where"
        printf '%s\n' "${ratios[@]}"
    } >"$ref"
    echo "wrote $ref"
fi
