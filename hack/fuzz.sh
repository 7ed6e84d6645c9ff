#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS_EACH seconds (cargo fuzz and
# libFuzzer), starting from the seeds in fuzz/seeds/<target>/. `make fuzz`
# runs it for a minute per target; `make test` for a few seconds, which keeps
# the targets building and catches the shallow crashes.
#
# cargo-fuzz comes from hack/setup.sh (CREDBROKER_CARGO_FUZZ, installed into
# the setup cache); without it, this says how to get it. The targets build
# with sanitizer flags that need nightly features; RUSTC_BOOTSTRAP=1 unlocks
# them on the pinned stable toolchain, here only. A crash is saved under
# fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
SECONDS_EACH=${1:-60}
cd "$(dirname "$0")/.."

CARGO_FUZZ=${CREDBROKER_CARGO_FUZZ:-$(command -v cargo-fuzz || true)}
if [[ -z "$CARGO_FUZZ" || ! -x "$CARGO_FUZZ" ]]; then
  echo "[fuzz] cargo-fuzz is missing: run \`make setup\` (hack/setup.sh installs it into its cache)" >&2
  exit 1
fi
# cargo finds `cargo fuzz` through PATH.
fuzz_bin_dir=$(dirname "$CARGO_FUZZ")
export PATH="$fuzz_bin_dir:$PATH"
export RUSTC_BOOTSTRAP=1
start=$SECONDS
cargo fuzz build -O
echo "[fuzz] built the targets in $((SECONDS - start))s" >&2
for target in $(cargo fuzz list); do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus"
  seeds=()
  [[ -d "fuzz/seeds/$target" ]] && seeds=("fuzz/seeds/$target")
  log="fuzz/target/$target.log"
  mkdir -p fuzz/target
  echo "[fuzz] $target for ${SECONDS_EACH}s" >&2
  status=0
  cargo fuzz run -O "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  # libFuzzer's progress lines are noise here; its summary and any crash are not.
  grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|==[0-9]+==|SUMMARY|Test unit written|thread .* panicked)" "$log" >&2 || true
  if [[ $status -ne 0 ]]; then
    echo "[fuzz] $target failed (exit $status); the input is under fuzz/artifacts/$target, the log in $log" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
done
echo "[fuzz] done in $((SECONDS - start))s" >&2
