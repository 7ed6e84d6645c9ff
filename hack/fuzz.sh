#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS_EACH seconds (cargo fuzz and
# libFuzzer), installing the pinned cargo-fuzz if it is missing. `make fuzz`
# runs it for a minute per target; `make test` for a few seconds, which keeps
# the targets building and catches the shallow crashes.
#
# The targets build with sanitizer flags that need nightly features;
# RUSTC_BOOTSTRAP=1 unlocks them on the pinned stable toolchain, here only.
# A crash is saved under fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
SECONDS_EACH=${1:-60}
CARGO_FUZZ_VERSION=0.13.1
cd "$(dirname "$0")/.."

if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION ..." >&2
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" >&2
fi
export RUSTC_BOOTSTRAP=1
start=$SECONDS
cargo fuzz build -O
echo "[fuzz] built the targets in $((SECONDS - start))s" >&2
for target in $(cargo fuzz list); do
  mkdir -p "fuzz/corpus/$target"
  echo "[fuzz] $target for ${SECONDS_EACH}s" >&2
  cargo fuzz run -O "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|Test unit written)" || true
  # grep hides libFuzzer's progress lines; the exit status that counts is cargo fuzz's.
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "[fuzz] $target failed; see fuzz/artifacts/$target" >&2; exit 1; }
done
echo "[fuzz] done in $((SECONDS - start))s" >&2
