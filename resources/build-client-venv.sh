#!/usr/bin/env bash
# A virtualenv with an unmodified Firecracker client library from PyPI, which
# tests/firecracker_clients.rs drives flint with:
#   $FLINT_CACHE/venv-fc-clients/bin/python   (firecracker-python, pinned)
# Cached; rebuilt when the pinned version or Debian's python3 changes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

# Pinned: bump deliberately.
CLIENT=firecracker-python==0.0.5

python=/usr/bin/python3
ensure_packages python3 python3-venv util-linux
venv=$FLINT_CACHE/venv-fc-clients
stamp=$(stamp_of "${BASH_SOURCE[0]}" "$CLIENT" "$("$python" --version 2>&1)")
if [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$stamp" ] && [ -x "$venv/bin/python" ]; then
    log "Firecracker client venv is up to date ($CLIENT)"
    exit 0
fi
log "installing $CLIENT into $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "$CLIENT" ||
    die "pip install $CLIENT failed"
echo "$stamp" >"$venv/.stamp"
log "Firecracker client venv ready"
