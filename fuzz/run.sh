#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with cargo-fuzz on nightly, and prints
# how long each ran, how many executions and whether it found anything. Not in CI.
# Each target's corpus is fuzz/corpus/TARGET/ (committed; the seeds come from
# tests/it/fuzz_corpus.rs's write_seeds). Crashes land in fuzz/artifacts/TARGET/: commit them,
# and the normal `cargo test` replays them (and the corpora) through pbx_remote::fuzzing.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for target in $(cargo +nightly fuzz list); do
  log=$(mktemp)
  start=$(date +%s)
  if cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=1024 >"$log" 2>&1; then
    verdict="no crash"
  else
    verdict="CRASH: see fuzz/artifacts/$target/"
  fi
  runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' || echo "?")
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 || true)
  printf '%-20s %4ss  %10s runs  %-10s %s\n' "$target" "$(( $(date +%s) - start ))" "$runs" "$cov" "$verdict"
  rm -f "$log"
done
