#!/usr/bin/env bash
# Restore benchmark (not a test): restore-to-first-command time of one snapshot, loaded with the
# File memory backend (the memory file mapped copy-on-write) and with the Uffd backend served by
# the example page-fault handler (flint-uffd-handler, which fills each page on first touch
# from the same memory file). A guest (1 vCPU, --mem MiB) boots through the API and is
# snapshotted at its shell prompt. Then each round, for each backend (their order alternating
# from round to round): a new flint (and, for Uffd, a new handler) is started, and a timed
# script sends `PUT /snapshot/load` with `resume_vm` and types a command at the guest's serial
# console; the time ends when the guest's answer (a number it computes) is on the console.
# The time is the stopwatch helper's (compiled here: fork to wait, CLOCK_MONOTONIC), so it
# includes starting curl; the load request alone (curl's time) is printed beside it.
#
# usage: resources/bench-restore.sh [-n RUNS] [--mem MIB]
#   RUNS measured rounds (default 10) after one warm-up round; medians and ranges are printed
#   (BENCH_RAW=1 also prints every sample)
#
# Where the local /dev/kvm cannot boot Linux (PVM), everything happens inside the nested KVM
# host (resources/nested-host/run.sh), whose files are in RAM (tmpfs): times there are only
# comparable with other times taken in the same rig, in the same run.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=10
mem=256
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --mem) mem=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
((runs > 0)) || die "-n wants a positive number of runs"

ensure_packages curl gcc libc6-dev
"$here/build-guest-kernel.sh"
"$here/build-guest-initramfs.sh"
log "building flint and the example page-fault handler (release)"
(cd "$repo" && cargo build --release --quiet --bin flint && cargo build --release --quiet -p vmm --bin flint-uffd-handler)
target=${CARGO_TARGET_DIR:-$repo/target}/release
for b in flint flint-uffd-handler; do
    [ -x "$target/$b" ] || die "$b not found at $target/$b"
done
guest=$FLINT_CACHE/guest

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O2 -Wall -o "$work/stopwatch" "$here/stopwatch.c" || die "cannot compile the stopwatch helper"

# The timed part: load the snapshot (prints curl's time for it on fd 3) and wait for the
# guest's answer to a typed command. Arguments: socket, load body, marker number, console.
cat >"$work/restore.sh" <<'RESTORE'
#!/bin/sh
out=$("$BIN/curl" -s -o "$TMPD/body" -w '%{http_code} %{time_total}' --unix-socket "$1" \
    -X PUT -H 'Content-Type: application/json' -d "$2" http://localhost/snapshot/load)
case $out in 2*) ;; *) echo "BENCH-FAILED load: $out $(cat "$TMPD/body")" >&3; exit 1 ;; esac
echo "LOAD ${out#* }" >&3
# The guest computes the marker, so the echo of the typed line does not match.
echo "echo ANSWER-\$(($3+1000))" >"$TMPD/in"
i=0
while ! grep -q "ANSWER-$(($3 + 1000))" "$4"; do
    i=$((i + 1))
    if [ $i -gt 6000 ]; then
        echo "BENCH-FAILED no answer from the guest: $(tail -n 3 "$4" | tr '\n' ' ')" >&3
        exit 1
    fi
    sleep 0.01
done
RESTORE

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
# Runs in the benchmark host (nested or direct); \$BIN points at the files, \$TMPD is scratch.
# The first echo ends whatever the firmware left on the console's current line.
echo
cd "\$TMPD"
call() { # socket method path body; fails unless 2xx
    out=\$("\$BIN/curl" -s -o "\$TMPD/body" -w '%{http_code}' --unix-socket "\$1" \\
        -X "\$2" -H 'Content-Type: application/json' -d "\$4" "http://localhost\$3")
    case \$out in 2*) ;; *) echo "BENCH-FAILED \$3: \$out \$(cat "\$TMPD/body")"; exit 1 ;; esac
}
wait_sock() { i=0; while [ ! -S "\$1" ] && [ \$i -lt 200 ]; do sleep 0.05; i=\$((i + 1)); done; }
mkfifo "\$TMPD/in"
sleep 100000 >"\$TMPD/in" &
keep=\$!
start_flint() { # name: \$pid, \$sock, \$console
    sock=\$TMPD/\$1.sock; console=\$TMPD/\$1.console
    rm -f "\$sock"
    "\$BIN/flint" --api-sock "\$sock" <"\$TMPD/in" >"\$console" 2>"\$TMPD/\$1.stderr" &
    pid=\$!
    wait_sock "\$sock"
}
start_flint boot
call "\$sock" PUT /boot-source "{\"kernel_image_path\": \"\$BIN/vmlinux\", \"initrd_path\": \"\$BIN/initramfs.cpio.gz\", \"boot_args\": \"console=ttyS0 reboot=k panic=1 pci=off quiet\"}"
call "\$sock" PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": $mem}'
call "\$sock" PUT /actions '{"action_type": "InstanceStart"}'
i=0; while ! grep -q '/ #' "\$console"; do
    i=\$((i + 1)); [ \$i -gt 3000 ] && { echo "BENCH-FAILED boot"; tail "\$console"; exit 1; }
    sleep 0.1
done
sleep 1
call "\$sock" PATCH /vm '{"state": "Paused"}'
call "\$sock" PUT /snapshot/create "{\"snapshot_path\": \"\$TMPD/vm.state\", \"mem_file_path\": \"\$TMPD/vm.mem\"}"
kill -KILL \$pid; wait \$pid 2>/dev/null
echo "SNAPSHOT \$(du -k vm.mem | cut -f1) KiB allocated of \$(stat -c %s vm.mem) bytes"

one() { # backend round
    start_flint "\$1-\$2"
    if [ "\$1" = uffd ]; then
        rm -f "\$TMPD/handler.sock"
        "\$BIN/flint-uffd-handler" "\$TMPD/handler.sock" "\$TMPD/vm.mem" 2>"\$TMPD/handler.err" &
        handler=\$!
        wait_sock "\$TMPD/handler.sock"
        body="{\"snapshot_path\": \"\$TMPD/vm.state\", \"mem_backend\": {\"backend_type\": \"Uffd\", \"backend_path\": \"\$TMPD/handler.sock\"}, \"resume_vm\": true}"
    else
        body="{\"snapshot_path\": \"\$TMPD/vm.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"\$TMPD/vm.mem\"}, \"resume_vm\": true}"
    fi
    "\$BIN/stopwatch" "\$1" sh "\$BIN/restore.sh" "\$sock" "\$body" "\$2" "\$console" 3>"\$TMPD/sw"
    if [ \$2 -eq 0 ]; then tag=WARMUP; else tag=BENCH; fi
    # "BENCH file LOAD seconds", "BENCH file BENCH file microseconds status" (and failures)
    while read -r line; do echo "\$tag \$1 \$line"; done <"\$TMPD/sw"
    kill -KILL \$pid; wait \$pid 2>/dev/null
    [ "\$1" = uffd ] && { kill \$handler 2>/dev/null; wait \$handler 2>/dev/null; }
    rm -f "\$TMPD/\$1-\$2".*
}
r=0
while [ \$r -le $runs ]; do
    if [ \$((r % 2)) -eq 0 ]; then one file \$r; one uffd \$r; else one uffd \$r; one file \$r; fi
    r=\$((r + 1))
done
kill \$keep
SCENARIO

if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running inside the nested KVM host"
    {
        echo 'BIN=/bench; TMPD=/tmp/bench; mkdir -p $TMPD; export BIN TMPD'
        cat "$work/scenario.sh"
    } >"$work/nested.sh"
    "$here/nested-host/run.sh" --timeout $((600 + 60 * runs)) --mem $((2048 + mem * 3)) \
        --scenario "$work/nested.sh" \
        --add "$target/flint:/bench/flint" --add "$target/flint-uffd-handler:/bench/flint-uffd-handler" \
        --add "$guest/vmlinux:/bench/vmlinux" --add "$guest/initramfs.cpio.gz:/bench/initramfs.cpio.gz" \
        --add "$work/stopwatch:/bench/stopwatch" --add "$work/restore.sh:/bench/restore.sh" \
        --add "$(command -v curl):/bench/curl" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores; files on tmpfs"
else
    mkdir -p "$work/bin" "$work/tmp"
    cp "$target/flint" "$target/flint-uffd-handler" "$guest/vmlinux" "$guest/initramfs.cpio.gz" \
        "$work/stopwatch" "$(command -v curl)" "$work/bin/"
    cp "$work/restore.sh" "$work/bin/restore.sh"
    BIN=$work/bin TMPD=$work/tmp sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM; files in $work"
fi

tr -d "\r" <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
if grep -q 'BENCH-FAILED' "$work/clean"; then
    cat "$work/clean"
    die "a measurement failed (see above)"
fi

if grep '^BENCH [a-z]* BENCH ' "$work/clean" | grep -qv ' 0$'; then
    cat "$work/clean"
    die "a timed restore failed (see above)"
fi
# samples BACKEND first|load: restore-to-answer microseconds or load request seconds
samples() {
    case $2 in
    first) sed -n "s/^BENCH $1 BENCH $1 \([0-9]*\) 0$/\1/p" "$work/clean" ;;
    load) sed -n "s/^BENCH $1 LOAD \([0-9.]*\)$/\1/p" "$work/clean" ;;
    esac | sort -n
}
median() {
    samples "$1" "$2" | awk -v scale="$3" '{ v[NR] = $1 * scale }
        END {
            if (NR == 0) m = "n/a"
            else if (NR % 2) m = v[(NR + 1) / 2]
            else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%.0f", m
        }'
}
range() { samples "$1" "$2" | awk -v scale="$3" '{ v[NR] = $1 * scale } END { if (NR) printf "%.0f-%.0f", v[1], v[NR] }'; }
count() { samples "$1" first | wc -l; }

echo "flint restore benchmark: $mem MiB guest snapshotted at its shell prompt ($(sed -n 's/.*SNAPSHOT //p' "$work/clean")), $runs rounds after a warm-up, backends alternating, $(date -u +%Y-%m-%d)"
echo "where: $where"
printf '%-28s %8s %24s %16s %22s\n' "memory backend" runs "load → answer median ms" "(min-max)" "load request median ms"
for backend in file uffd; do
    case $backend in
    file) name="File (mapped memory file)" ;;
    uffd) name="Uffd (flint-uffd-handler)" ;;
    esac
    printf '%-28s %8s %24s %16s %22s\n' "$name" "$(count $backend)" \
        "$(median $backend first 0.001)" "($(range $backend first 0.001))" \
        "$(median $backend load 1000)"
done
