#!/usr/bin/env bash
# The long fault variants (#[ignore]d in the normal suite), release build, with their figures.
# Usage: tests/run-long.sh [RELAY_SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${1:-}" ] && export RELAY_SEED=$1
cargo test --release --locked -j2 --test it -- --ignored faults:: --nocapture --test-threads 1
