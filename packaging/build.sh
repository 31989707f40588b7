#!/usr/bin/env bash
# Builds the agent's .deb (cargo-deb) and .rpm (cargo-generate-rpm) into target/pkg/ and prints
# both paths. Installs the two cargo tools if missing. Usage: packaging/build.sh [--deb-only]
# PBXRA_PKG_PROFILE=dev packages the debug build instead of release (CI checks the package's
# shape, not its speed); CARGO_INSTALL_FLAGS is passed to `cargo install` (CI: --debug).
set -euo pipefail
cd "$(dirname "$0")/.."
deb_only=false
[ "${1:-}" = "--deb-only" ] && deb_only=true

need() { # need TOOL CRATE
  # shellcheck disable=SC2086
  command -v "$1" >/dev/null 2>&1 || cargo install --locked -j2 ${CARGO_INSTALL_FLAGS:-} "$2" >&2
}
need cargo-deb cargo-deb
$deb_only || need cargo-generate-rpm cargo-generate-rpm
command -v strip >/dev/null || { apt-get update -qq && apt-get install -y -qq binutils >/dev/null; }

pkg=target/pkg
rm -rf "$pkg"
mkdir -p "$pkg/debian" "$pkg/rpm"

# The binary users get: the release profile, stripped.
profile=${PBXRA_PKG_PROFILE:-release}
cargo build --profile "$profile" --locked -j2 --bin pbx-remote-agent >&2
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
strip -o "$pkg/pbx-remote-agent" "target/$dir/pbx-remote-agent"

# Man page and completions from the clap definitions.
cargo run --quiet --locked -j2 --example pkg-docs -- "$pkg" >/dev/null
gzip -9n "$pkg/pbx-remote-agent.8"

# Maintainer scripts with the shared functions inlined.
inline() { # inline SRC DEST
  awk -v common="packaging/common.sh" '
    /^#COMMON#$/ { while ((getline line < common) > 0) print line; next } { print }' "$1" >"$2"
}
for s in postinst prerm postrm; do
  inline "packaging/debian/$s" "$pkg/debian/$s"
  chmod 0755 "$pkg/debian/$s"
done
for s in pre post preun postun; do
  inline "packaging/rpm/$s.sh" "$pkg/rpm/$s.sh"
done

cargo deb --no-build --no-strip --locked -o "$pkg/" >&2
deb=$(ls "$pkg"/*.deb)
echo "$deb"
if ! $deb_only; then
  cargo generate-rpm -o "$pkg/" >&2
  ls "$pkg"/*.rpm
fi
