#!/usr/bin/env bash
# Run flint's cargo-fuzz targets (fuzz/) and print one table of what each did.
#
#   resources/fuzz.sh [--seconds N | --runs N [--max-seconds S]] [--jobs J] [TARGET...]
#
# --seconds N  run each target for N seconds (default 25: what CI runs)
# --runs N     run each target for N executions instead (the long run: --runs 10000000)
# --max-seconds S  with --runs: stop a target after S seconds even if it has not made N runs
# --jobs J     run J targets at a time (default 1)
# TARGET...    the targets to run (default: every target `cargo fuzz list` knows)
#
# Each target starts from its committed seeds (fuzz/seeds/NAME) plus what earlier runs found
# (fuzz/corpus/NAME, not committed). libFuzzer stops a target that crashes, leaks, times out on
# one input (-timeout=10) or grows past -rss_limit_mb=2048; the input is kept under
# fuzz/artifacts/NAME/. The script exits non-zero if any target failed, after the table.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

seconds=25
runs=
max_seconds=
jobs=1
targets=()
while (($#)); do
    case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --max-seconds) max_seconds=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) targets+=("$1"); shift ;;
    esac
done

# cargo-fuzz from crates.io, pinned; libFuzzer needs the nightly-only sanitizer flags, which the
# stable toolchain accepts with RUSTC_BOOTSTRAP=1.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1

cd "$repo/fuzz"
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi
log "building ${#targets[@]} fuzz targets"
cargo fuzz build -O

out_dir=$(mktemp -d)
trap 'rm -rf "$out_dir"' EXIT

# run_target NAME: one libFuzzer run; its log goes to $out_dir/NAME.log, its status to NAME.rc.
run_target() {
    local name=$1 limit
    limit=(-max_total_time="$seconds")
    if [ -n "$runs" ]; then limit=(-runs="$runs"); fi
    if [ -n "$runs" ] && [ -n "$max_seconds" ]; then limit+=(-max_total_time="$max_seconds"); fi
    mkdir -p "corpus/$name"
    local seeds=()
    [ -d "seeds/$name" ] && seeds=("seeds/$name")
    local rc=0
    cargo fuzz run -O "$name" "corpus/$name" "${seeds[@]}" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$out_dir/$name.log" 2>&1 || rc=$?
    echo "$rc" >"$out_dir/$name.rc"
}

start=$SECONDS
running=0
for name in "${targets[@]}"; do
    log "fuzzing $name"
    run_target "$name" &
    running=$((running + 1))
    if ((running >= jobs)); then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

stat() { sed -n "s/^stat::$2: *//p" "$out_dir/$1.log" | tail -n1; }
failed=0
if [ -n "$runs" ]; then budget="$runs runs each${max_seconds:+, at most $max_seconds s}"; else budget="$seconds s each"; fi
printf '\nfuzz targets (%s, %s at a time, %s, %d cores)\n' "$budget" "$jobs" "$(date -u +%F)" "$(nproc)"
printf '%-18s %12s %10s %12s %8s  %s\n' target executions exec/s corpus-new rss-MB result
for name in "${targets[@]}"; do
    rc=$(cat "$out_dir/$name.rc")
    result=ok
    if [ "$rc" != 0 ]; then
        result="FAILED (status $rc)"
        failed=1
    fi
    printf '%-18s %12s %10s %12s %8s  %s\n' "$name" "$(stat "$name" number_of_executed_units)" \
        "$(stat "$name" average_exec_per_sec)" "$(stat "$name" new_units_added)" \
        "$(stat "$name" peak_rss_mb)" "$result"
done
printf 'total %d s\n' $((SECONDS - start))
if ((failed)); then
    for name in "${targets[@]}"; do
        if [ "$(cat "$out_dir/$name.rc")" != 0 ]; then
            printf '\n---- %s (last 40 lines) ----\n' "$name"
            tail -n 40 "$out_dir/$name.log"
        fi
    done
    exit 1
fi
