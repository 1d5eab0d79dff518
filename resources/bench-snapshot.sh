#!/usr/bin/env bash
# Snapshot benchmark (not a test): full vs diff snapshots of a guest that dirtied a given share
# of its memory. A guest (1 vCPU, --mem MiB, dirty-page tracking on) boots through the API;
# then each round: resume, the guest writes --dirty-pct of its memory as a new file in its
# tmpfs (after removing the previous round's, so what it holds stays the same), pause, a Diff
# snapshot (the pages changed since the previous round's Full), then a Full snapshot of the
# same state. The time is curl's for the PUT /snapshot/create request (what a client waits for,
# the files fsynced); the size is what the memory file allocates (du). The last round's diff is
# merged into its base with `flint snapshot merge` (timed as well).
#
# usage: resources/bench-snapshot.sh [-n RUNS] [--mem MIB] [--dirty-pct PCT]
#   RUNS measured rounds (default 5) after one warm-up round; medians and ranges are printed
#   (BENCH_RAW=1 also prints every sample)
#
# Where the local /dev/kvm cannot boot Linux (PVM), everything happens inside the nested KVM
# host (resources/nested-host/run.sh), whose files are in RAM (tmpfs): times there are only
# comparable with other times taken in the same rig.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=5
mem=512
pct=5
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --mem) mem=${2:?}; shift ;;
    --dirty-pct) pct=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
dirty_kib=$((mem * 1024 * pct / 100))

ensure_packages curl
"$here/build-guest-kernel.sh"
"$here/build-guest-initramfs.sh"
log "building flint (release)"
(cd "$repo" && cargo build --release --quiet)
flint=${CARGO_TARGET_DIR:-$repo/target}/release/flint
[ -x "$flint" ] || die "flint binary not found at $flint"
guest=$FLINT_CACHE/guest

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
# Runs in the benchmark host (nested or direct); \$BIN points at the files, \$TMPD is scratch.
cd "\$TMPD"
SOCK=\$TMPD/bench.sock
call() { # method path body: prints curl's total time in seconds; fails unless 2xx
    out=\$("\$BIN/curl" -s -o "\$TMPD/body" -w '%{http_code} %{time_total}' --unix-socket "\$SOCK" \\
        -X "\$1" -H 'Content-Type: application/json' -d "\$3" "http://localhost\$2")
    case \$out in 2*) echo "\${out#* }" ;; *) echo "BENCH-FAILED \$2: \$out \$(cat "\$TMPD/body")" >&2; return 1 ;; esac
}
wait_text() { # text seconds
    i=0; while ! grep -q "\$1" "\$TMPD/console"; do
        i=\$((i + 1)); [ \$i -gt \$((\$2 * 10)) ] && { echo "BENCH-FAILED waiting for \$1"; tail "\$TMPD/console"; exit 1; }
        sleep 0.1
    done
}
mkfifo "\$TMPD/in"
sleep 100000 >"\$TMPD/in" &
keep=\$!
"\$BIN/flint" --api-sock "\$SOCK" <"\$TMPD/in" >"\$TMPD/console" 2>"\$TMPD/stderr" &
pid=\$!
i=0; while [ ! -S "\$SOCK" ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
call PUT /boot-source "{\"kernel_image_path\": \"\$BIN/vmlinux\", \"initrd_path\": \"\$BIN/initramfs.cpio.gz\", \"boot_args\": \"console=ttyS0 reboot=k panic=1 pci=off quiet\"}" >/dev/null
call PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": $mem, "track_dirty_pages": true}' >/dev/null
call PUT /actions '{"action_type": "InstanceStart"}' >/dev/null
wait_text '/ #' 300
call PATCH /vm '{"state": "Paused"}' >/dev/null
call PUT /snapshot/create '{"snapshot_path": "full.state", "mem_file_path": "full.mem"}' >/dev/null
r=0
while [ \$r -le $runs ]; do
    if [ \$r -eq 0 ]; then tag=WARMUP; else tag=BENCH; fi
    # The last round's base, for the merge.
    [ \$r -eq $runs ] && cp full.state base.state && cp full.mem base.mem
    call PATCH /vm '{"state": "Resumed"}' >/dev/null
    # The marker is computed by the guest, so that the echo of the typed line does not match.
    echo "rm -f /d*; yes round-\$r | head -c $((dirty_kib * 1024)) >/d\$r; echo DIRTIED-\\\$((\$r+1000))" >"\$TMPD/in"
    wait_text "DIRTIED-\$((r + 1000))" 600
    call PATCH /vm '{"state": "Paused"}' >/dev/null
    t=\$(call PUT /snapshot/create '{"snapshot_type": "Diff", "snapshot_path": "diff.state", "mem_file_path": "diff.mem"}')
    echo "\$tag diff_s \$t"
    echo "\$tag diff_kib \$(du -k diff.mem | cut -f1)"
    t=\$(call PUT /snapshot/create '{"snapshot_path": "full.state", "mem_file_path": "full.mem"}')
    echo "\$tag full_s \$t"
    echo "\$tag full_kib \$(du -k full.mem | cut -f1)"
    r=\$((r + 1))
done
a=\$(cut -d' ' -f1 /proc/uptime)
"\$BIN/flint" snapshot merge --base base.state base.mem --diff diff.state diff.mem --out merged.state merged.mem ||
    echo "BENCH-FAILED merge"
b=\$(cut -d' ' -f1 /proc/uptime)
echo "BENCH merge_s \$(awk -v a=\$a -v b=\$b 'BEGIN { printf "%.2f", b - a }')"
cmp -s merged.mem full.mem && echo "BENCH merged_equals_full yes" || echo "BENCH merged_equals_full no"
kill -KILL \$pid; kill \$keep
SCENARIO

if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    {
        echo 'BIN=/bench; TMPD=/tmp'
        cat "$work/scenario.sh"
    } >"$work/nested.sh"
    "$here/nested-host/run.sh" --timeout $((600 + 300 * runs)) --mem $((2048 + mem * 4)) \
        --scenario "$work/nested.sh" \
        --add "$flint:/bench/flint" --add "$guest/vmlinux:/bench/vmlinux" \
        --add "$guest/initramfs.cpio.gz:/bench/initramfs.cpio.gz" \
        --add "$(command -v curl):/bench/curl" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores; files on tmpfs"
else
    mkdir -p "$work/bin"
    cp "$flint" "$guest/vmlinux" "$guest/initramfs.cpio.gz" "$(command -v curl)" "$work/bin/"
    BIN=$work/bin TMPD=$work sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM; files in $work"
fi

tr -d "\r" <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH-FAILED' "$work/clean"; then
    cat "$work/clean"
    die "a measurement failed (see above)"
fi

samples() { sed -n "s/^BENCH $1 \([0-9.]*\).*/\1/p" "$work/clean" | sort -n; }
median() {
    samples "$1" | awk '{ v[NR] = $1 }
        END {
            if (NR == 0) m = "n/a"
            else if (NR % 2) m = v[(NR + 1) / 2]
            else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
            print m
        }'
}
range() { samples "$1" | awk '{ v[NR] = $1 } END { if (NR) printf "%s-%s", v[1], v[NR] }'; }

echo "flint snapshot benchmark: $mem MiB guest, ${pct}% of its memory (${dirty_kib} KiB) rewritten per round, $runs rounds, $(date -u +%Y-%m-%d)"
echo "where: $where"
printf '%-10s %14s %18s %16s %20s\n' snapshot "time median s" "(min-max)" "size median KiB" "(min-max)"
for kind in full diff; do
    printf '%-10s %14s %18s %16s %20s\n' "$kind" "$(median ${kind}_s)" "($(range ${kind}_s))" \
        "$(median ${kind}_kib)" "($(range ${kind}_kib))"
done
echo "merge of the last diff into its base: $(median merge_s) s; merged memory equals the full snapshot's: $(sed -n 's/^BENCH merged_equals_full //p' "$work/clean")"
