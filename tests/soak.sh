#!/usr/bin/env bash
# Soak: SOAK_MINUTES (default 30) of visits, WebSockets and downloads at 1% loss, a server
# restart every 5 minutes and a rebinding every 2; prints RSS drift, fds, reconnects, errors.
# Usage: tests/soak.sh [MINUTES]     (not CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_MINUTES=${1:-${SOAK_MINUTES:-30}}
cargo test --release --locked -j2 --test it -- --ignored soak:: --nocapture
