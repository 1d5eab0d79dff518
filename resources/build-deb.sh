#!/usr/bin/env bash
# Build a Debian package of flint with cargo-deb:
#   target/debian/flint_<version>-1_amd64.deb
# It installs
#   /usr/bin/flint and /usr/bin/containerd-shim-flint-v2 (containerd's runtime shim)
#   /usr/share/man/man1/flint.1.gz and flint-<command>.1.gz (from `flint man`)
#   bash, zsh and fish completions (from `flint completions SHELL`)
#   /usr/lib/flint/: the guest assets' builders (build-guest-kernel.sh, build-guest-initramfs.sh,
#     build-sandbox-image.sh, build-rootfs.sh with lib.sh, guest-init.sh and
#     guest-kernel.config) and the static flint-agent and agent-client that
#     build-sandbox-image.sh packs when it has no sources to build them from.
# The man pages, completions and --help all come from one clap definition (src/commands/).
# Installs cargo-deb (`cargo install cargo-deb --locked`) and the Debian packages it needs
# when they are missing. Extra arguments go to `cargo deb` (e.g. --output DIR).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup)"
ensure_packages dpkg-dev
if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb"
    cargo install cargo-deb --locked
fi

target_dir=${CARGO_TARGET_DIR:-$repo/target}
assets=$target_dir/release/deb

log "building flint and its containerd shim (release)"
cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p flint \
    --bin flint --bin containerd-shim-flint-v2
flint=$target_dir/release/flint

log "generating man pages and shell completions"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$flint" man >"$assets/man/flint.1"
# One page per subcommand that flint(1) lists as flint-COMMAND(1).
mapfile -t commands < <(sed -n 's/^flint\\-\([a-z-]*\)(1)$/\1/p' "$assets/man/flint.1")
((${#commands[@]})) || die "flint man lists no subcommand pages"
gzip -9n "$assets/man/flint.1"
for command in "${commands[@]}"; do
    "$flint" man "$command" | gzip -9n >"$assets/man/flint-$command.1.gz"
done
"$flint" completions bash >"$assets/completions/flint.bash"
"$flint" completions zsh >"$assets/completions/_flint"
"$flint" completions fish >"$assets/completions/flint.fish"

# The static agent, built exactly as the sandbox image's (cached in $FLINT_CACHE/sandbox).
"$here/build-sandbox-image.sh"
cp "$FLINT_CACHE/sandbox/flint-agent" "$FLINT_CACHE/sandbox/agent-client" "$assets/"

log "packing the .deb"
cargo deb --no-build --manifest-path "$repo/Cargo.toml" -p flint "$@"
