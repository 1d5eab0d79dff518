#!/usr/bin/env bash
# Property-based fuzzing of flint's REST API against its OpenAPI description
# (docs/api.yaml) with schemathesis, on the real flint binary; then a second pass
# with Firecracker's own description (see step 5), so that what Firecracker's
# clients send as valid is accepted.
#
#   resources/fuzz-api.sh            # needs target/debug/flint (cargo build / cargo test)
#
# Environment: FUZZ_API_EXAMPLES (max examples per operation and phase, default
# 1000; FUZZ_API_FIRECRACKER_EXAMPLES for the second pass, default 300),
# FUZZ_API_FIRECRACKER_SPEC (Firecracker's description to use), FUZZ_API_SEED (default 20241124), FUZZ_API_MAX_TIME (seconds, default 300:
# a safety bound, a normal run takes about a minute).
#
# What runs:
#   - the real `target/debug/flint --api-sock SOCK` with no VM, seccomp ON (the
#     API thread's filter is part of what is tested), so every request goes
#     through the real HTTP server, the real schema parser and the real VMM-side
#     checks (Controller::handle, VmConfig::validate, Vm::build up to /dev/kvm).
#     Not the fake-VMM helper of tests/api.rs (`serve_for_fuzzing`): it would
#     skip the VMM thread, its validation and its seccomp filter.
#   - flint runs as `nobody` (setpriv, no capabilities, no supplementary
#     groups) in a directory of its own. The fuzzer sends arbitrary paths, and
#     PUT /logger and PUT /metrics create the file they name (PUT /vsock's
#     uds_path and drive paths are only used at start): as root that would
#     litter or append to any file on the machine. As nobody, relative paths
#     land in the private directory (removed on exit), absolute ones fail with
#     400 (Permission denied) except in world-writable directories. It also
#     guarantees that nothing boots: /dev/kvm is root-only (0600) here, so
#     InstanceStart ends with 400 "no permission to open /dev/kvm" once
#     VmConfig::validate has passed, and no TAP device can be created (no
#     CAP_NET_ADMIN). (Even as root a random kernel path cannot boot:
#     e.g. /proc/self/exe, flint itself, is refused with 400 "Invalid entry
#     address"; but the file-creation problem remains, hence nobody.)
#   - schemathesis speaks TCP only, so a small Python proxy on 127.0.0.1
#     forwards each connection to the Unix socket. It exits by itself when this
#     script's process disappears or after FUZZ_API_MAX_TIME + 60 s.
#   - after the run flint must still be alive, answer GET / with 200, and its
#     RSS must have stayed below 64 MiB more than before the run.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

# Pinned: bump deliberately (the venv is rebuilt when this changes).
SCHEMATHESIS_VERSION=4.32.5
examples=${FUZZ_API_EXAMPLES:-1000}
seed=${FUZZ_API_SEED:-20241124}
max_time=${FUZZ_API_MAX_TIME:-300}
rss_growth_limit_kib=$((64 * 1024))

flint=$repo/target/debug/flint
[ -x "$flint" ] || die "$flint is missing: run cargo build (or cargo test) first"

# --- 1. schemathesis in a cached virtualenv ----------------------------------
# Debian's python3 (3.11 on Debian 12), not whatever python3 a version manager
# puts first on PATH, so the cached venv always matches python3-venv.
python=/usr/bin/python3
ensure_packages python3 python3-venv util-linux curl
venv=$FLINT_CACHE/venv-schemathesis
stamp=$(stamp_of "schemathesis==$SCHEMATHESIS_VERSION" "$("$python" --version 2>&1)")
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ] || ! [ -x "$venv/bin/schemathesis" ]; then
    log "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    rm -rf "$venv"
    mkdir -p "$FLINT_CACHE"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION" || die "pip install schemathesis failed"
    echo "$stamp" >"$venv/.stamp"
fi
"$venv/bin/schemathesis" --version

# --- cleanup -----------------------------------------------------------------
tmp=$(mktemp -d /tmp/flint-fuzz-api.XXXXXX)
flint_pid='' proxy_pid=''
cleanup() {
    local pid
    for pid in "$proxy_pid" "$flint_pid"; do
        [ -n "$pid" ] || continue
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$proxy_pid" "$flint_pid"; do
        [ -n "$pid" ] || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- 2. the real flint, unprivileged ------------------------------------------
run_dir=$tmp/flint
mkdir -p "$run_dir"
chmod 755 "$tmp"
sock=$run_dir/api.sock
as_user=()
if [ "$(id -u)" -eq 0 ]; then
    chown nobody:nogroup "$run_dir"
    as_user=(setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all)
else
    log "not root: flint runs as $(id -un), which can create files where that user can"
fi
(
    cd "$run_dir"
    exec "${as_user[@]}" "$flint" --api-sock "$sock" --id fuzz </dev/null >"$tmp/flint.out" 2>&1
) &
flint_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { cat "$tmp/flint.out" >&2; die "flint did not create $sock"; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$flint_pid/status"; }

# --- 3. TCP -> Unix socket proxy on 127.0.0.1 -----------------------------------
cat >"$tmp/proxy.py" <<'EOF'
import os, socket, sys, threading, time
sock_path, port_file, owner, lifetime = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + lifetime

def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s in (dst, src):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

def serve(client):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(sock_path)
    except OSError:
        client.close()
        return
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
    pump(client, upstream)

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(64)
listener.settimeout(1.0)
with open(port_file + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)
while time.monotonic() < deadline:
    try:
        os.kill(owner, 0)  # the script is gone: stop
    except ProcessLookupError:
        break
    try:
        client, _ = listener.accept()
    except socket.timeout:
        continue
    client.settimeout(None)
    threading.Thread(target=serve, args=(client,), daemon=True).start()
EOF
"$python" "$tmp/proxy.py" "$sock" "$tmp/port" "$$" "$((max_time + 60))" &
proxy_pid=$!
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.05; done
[ -s "$tmp/port" ] || die "the proxy did not start"
port=$(cat "$tmp/port")
url=http://127.0.0.1:$port

curl -sf --max-time 5 "$url/" >/dev/null || die "flint does not answer GET / through the proxy"
rss_before=$(rss_kib)

# --- 4. schemathesis -------------------------------------------------------------
# Every check except positive_data_acceptance: a path id must equal the id in the
# body (PUT /drives/{drive_id}), which OpenAPI cannot express, so schema-valid
# requests are legitimately refused with 400. The checks that matter here:
# not_a_server_error (no 5xx), status_code_conformance (every status is
# documented), content_type_conformance, response_schema_conformance,
# response_headers_conformance, negative_data_rejection (schema-invalid input
# is refused with 4xx), unsupported_method and allow_header_conformance (405
# with a correct Allow header), missing_required_header.
# One worker and a fixed seed: the same run every time.
log "fuzzing $repo/docs/api.yaml through $url (flint pid $flint_pid, RSS ${rss_before} KiB)"
rc=0
(
    cd "$tmp"
    timeout --foreground -k 10 "$max_time" "$venv/bin/schemathesis" run "$repo/docs/api.yaml" \
        --url "$url" \
        --checks all --exclude-checks positive_data_acceptance \
        --mode all \
        --phases examples,coverage,fuzzing \
        --max-examples "$examples" \
        --seed "$seed" \
        --generation-database none \
        --workers 1 \
        --request-timeout 15 \
        --no-color
) || rc=$?

# --- 5. schemathesis against Firecracker's own API description ------------------------
# Firecracker's clients were written against its published description, not flint's: every
# request it calls valid must pass flint's parser (the valid_firecracker_request_accepted
# check of schemathesis_flint_checks.py) and none may get a 5xx. Only the operations flint
# serves: the balloon's free page hinting and the features flint lacks answer a 400 that
# names them (see README, "REST API").
# The description: Firecracker's (with its licence) beside this checkout in
# ../shared/reference/firecracker/ when there is one, else the copy that crates.io's
# firecracker-api 0.1.0 ships (Firecracker 1.15's, checksum pinned), fetched once into
# $FLINT_CACHE. FUZZ_API_FIRECRACKER_SPEC=FILE overrides both.
fc_examples=${FUZZ_API_FIRECRACKER_EXAMPLES:-300}
fc_crate=firecracker-api-0.1.0
fc_crate_sha256=a26b0e4da8ab6e1d80cc6d71fd788c757c4feeae9bb8e4ae6879e80d22a5411e
firecracker_spec() {
    local shared=$repo/../shared/reference/firecracker/firecracker.yaml
    local dir=$FLINT_CACHE/$fc_crate
    if [ -n "${FUZZ_API_FIRECRACKER_SPEC:-}" ]; then
        echo "$FUZZ_API_FIRECRACKER_SPEC"
    elif [ -f "$shared" ]; then
        echo "$shared"
    else
        if ! [ -f "$dir/spec/firecracker.yaml" ]; then
            curl -sSf --max-time 60 -o "$tmp/$fc_crate.crate" \
                "https://static.crates.io/crates/firecracker-api/$fc_crate.crate" ||
                return 1
            echo "$fc_crate_sha256  $tmp/$fc_crate.crate" | sha256sum -c --quiet - || return 1
            mkdir -p "$dir.tmp"
            tar -xzf "$tmp/$fc_crate.crate" -C "$dir.tmp" --strip-components=1 || return 1
            rm -rf "$dir" && mv "$dir.tmp" "$dir"
        fi
        echo "$dir/spec/firecracker.yaml"
    fi
}
fc_rc=0
if ((rc == 0)); then
    fc_spec=$(firecracker_spec) || die "cannot get Firecracker's API description (see above)"
    log "fuzzing with Firecracker's description $fc_spec (positive mode)"
    "$venv/bin/python" "$here/schemathesis_flint_checks.py" "$fc_spec" "$tmp/firecracker.yaml" ||
        die "cannot read Firecracker's API description $fc_spec"
    (
        cd "$tmp"
        PYTHONPATH=$here SCHEMATHESIS_HOOKS=schemathesis_flint_checks \
            timeout --foreground -k 10 "$max_time" "$venv/bin/schemathesis" run "$tmp/firecracker.yaml" \
            --url "$url" \
            --checks not_a_server_error,valid_firecracker_request_accepted \
            --exclude-path-regex '^/(balloon/hinting|cpu-config|pmem|serial|hotplug)(/|$)' \
            --mode positive \
            --phases examples,coverage,fuzzing \
            --max-examples "$fc_examples" \
            --seed "$seed" \
            --generation-database none \
            --workers 1 \
            --request-timeout 15 \
            --no-color
    ) || fc_rc=$?
fi

# --- flint must have survived --------------------------------------------------------
if ! kill -0 "$flint_pid" 2>/dev/null; then
    rc_flint=0
    wait "$flint_pid" || rc_flint=$?
    flint_pid=''
    case $rc_flint in
        129 | 130 | 143) log "interrupted (flint stopped on a signal)"; exit "$rc_flint" ;;
    esac
    log "flint died during the run (status $rc_flint); its output:"
    cat "$tmp/flint.out" >&2
    die "flint did not survive the fuzzing"
fi
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --unix-socket "$sock" http://localhost/) || true
[ "$status" = 200 ] || die "flint answers GET / with '$status' after the run, not 200"
rss_after=$(rss_kib)
log "flint alive after the run; RSS ${rss_before} KiB -> ${rss_after} KiB"
if ((rss_after - rss_before > rss_growth_limit_kib)); then
    die "flint's RSS grew by $(((rss_after - rss_before) / 1024)) MiB during the run"
fi
((rc == 0)) || die "schemathesis found failures (status $rc): see above; rerun with FUZZ_API_SEED=$seed"
((fc_rc == 0)) || die "schemathesis found failures with Firecracker's description (status $fc_rc): see above; rerun with FUZZ_API_SEED=$seed"
log "API fuzzing passed"
