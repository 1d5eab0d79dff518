#!/usr/bin/env bash
# The single test command of flint (CI runs it through .ci/run):
#   1. install the Debian packages the rig needs (only the missing ones),
#   2. build the cached test images: guest kernel, guest initramfs, nested host, a Debian
#      container image with Python (from Debian's mirror, once),
#   3. cargo fmt --check, cargo clippy -D warnings, cargo test --workspace
#      (all tiers; tier 3 boots real guests in the nested host, see
#      tests/support/mod.rs),
#   4. the benchmark guard (bench-guard.sh: a short boot and sandbox benchmark
#      of the debug build the tests used, printed as ratios to QEMU's boot in
#      the same run; it prints, it fails nothing),
#   5. schemathesis against the REST API (fuzz-api.sh) and every cargo-fuzz
#      target for 20 s (fuzz.sh).
# Artefacts are cached in $FLINT_CACHE (default ~/.cache/flint), so a warm run
# only pays for cargo.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

total_start=$SECONDS
timings=()

# stage NAME CMD...: run one stage with a header and its duration.
stage() {
    local name=$1 start=$SECONDS rc=0
    shift
    printf '\n==================== %s ====================\n' "$name"
    "$@" || rc=$?
    local took=$((SECONDS - start))
    timings+=("$(printf '%-28s %4d s%s' "$name" "$took" "$( ((rc)) && echo '  FAILED')")")
    if ((rc)); then
        printf '==================== %s FAILED (status %d, %d s) ====================\n' "$name" "$rc" "$took"
        summary
        exit "$rc"
    fi
    printf -- '-------------------- %s: done in %d s\n' "$name" "$took"
}

# What went wrong, where a truncated log still shows it: each nested-host scenario try (see
# rig_failure in tests/support/mod.rs) and the first lines of each test panic.
rig_log=$repo/target/nested-scenario-tries.log
test_log=$repo/target/cargo-test-output.log
export FLINT_TEST_RIG_LOG=$rig_log

run_cargo_test() {
    mkdir -p "$(dirname "$rig_log")"
    : >"$rig_log"
    cargo test --workspace --no-fail-fast 2>&1 | tee "$test_log"
}

# The benchmark guard prints figures; a slow or failed run of it fails nothing (the tests
# before it decide whether flint works).
bench_guard() {
    "$here/bench-guard.sh" --flint "${CARGO_TARGET_DIR:-$repo/target}/debug/flint" ||
        echo "benchmark guard: no figures this run (its output is above); CI does not fail on it"
}

summary() {
    if [ -s "$rig_log" ]; then
        printf '\n==================== nested-host scenario tries ====================\n'
        cat "$rig_log"
    fi
    if [ -s "$test_log" ] && grep -q "panicked at" "$test_log"; then
        printf '\n==================== test panics (first lines) ====================\n'
        grep -A3 "panicked at" "$test_log" | cut -c1-300 | head -n 60
    fi
    printf '\n==================== timing summary ====================\n'
    printf '%s\n' "${timings[@]}"
    printf '%-28s %4d s\n' total $((SECONDS - total_start))
}

packages() {
    # Everything the build scripts and the tier-3 tests use, so a fresh Debian
    # 12 machine needs a single apt-get run.
    ensure_packages \
        qemu-system-x86 busybox-static linux-source-6.1 \
        build-essential bc flex bison libelf-dev libssl-dev \
        cpio gzip xz-utils zstd kmod e2fsprogs util-linux binutils curl iproute2 \
        docker-registry skopeo apache2-utils \
        nftables dnsmasq-base mmdebstrap containerd containernetworking-plugins \
        protobuf-compiler
    command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup)"
    cargo --version
    rustc --version
}

cd "$repo"
stage "packages" packages
stage "guest kernel" "$here/build-guest-kernel.sh"
stage "guest initramfs" "$here/build-guest-initramfs.sh"
stage "guest rootfs" "$here/build-rootfs.sh"
stage "sandbox image" "$here/build-sandbox-image.sh"
stage "Debian Python image" "$here/build-debian-image.sh"
stage "Firecracker client venv" "$here/build-client-venv.sh"
stage "nested host kernel" "$here/nested-host/build-host.sh"
stage "cargo fmt" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
stage "cargo test" run_cargo_test
stage "benchmark guard" bench_guard
stage "API fuzzing" "$here/fuzz-api.sh"
stage "fuzz targets" "$here/fuzz.sh" --seconds 20
summary
