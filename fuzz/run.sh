#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/, see docs/fuzzing.md) for
# SECONDS each, starting from its corpus in fuzz/corpus/<target>/, and fails
# if one finds a panic (a crash or a broken property), a timeout or an
# out-of-memory; the input that did it is left in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh                   every target, 20 s each (as CI runs it)
#   fuzz/run.sh 600               every target, 10 minutes each
#   fuzz/run.sh 60 host_check     one target
#
# Works on stable Rust: with `--sanitizer none` cargo fuzz passes no
# nightly-only flag (the coverage instrumentation is stable `-C` options).
# The targets run safe Rust, whose memory errors AddressSanitizer would
# catch are not there to catch; what they look for are panics, which
# every build sees. Built with optimizations plus debug assertions and
# overflow checks.
#
# New inputs a run finds go to fuzz/target/corpus/<target>/, not into the
# committed corpus; `cargo fuzz cmin` folds them in (docs/fuzzing.md).
# Installs cargo-fuzz when it is missing. CARGO_BUILD_JOBS limits the
# build's parallelism, as for any cargo build.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-20}
if [ $# -gt 0 ]; then shift; fi
targets=("$@")

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
flags=(--release --debug-assertions --sanitizer none)
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "fuzz: built in $((SECONDS - start)) s"

failed=()
for target in "${targets[@]}"; do
  found=target/corpus/$target
  log=target/logs/$target.log
  mkdir -p "$found" "$(dirname "$log")" "corpus/$target"
  started=$SECONDS
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb as
  # libFuzzer's default, named.
  if cargo fuzz run "${flags[@]}" "$target" "$found" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    echo "fuzz: $target: ${runs:-?} runs in $((SECONDS - started)) s (${rate:-?}/s), no failure"
  else
    failed+=("$target")
    # The panic (or libFuzzer's verdict), then the input and how to
    # reproduce it; the whole log is $log.
    echo "fuzz: $target FAILED:" >&2
    sed -n '/panicked at/,/^stack backtrace/p' "$log" | grep -v '^stack backtrace' >&2 || true
    grep -E '^(==[0-9]+== ERROR|SUMMARY): libFuzzer' "$log" >&2 || true
    sed -n '/^Failing input:/,/^Minimize/p' "$log" | grep -Ev '^(Minimize|Output of|$)' >&2 || true
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}; inputs in fuzz/artifacts/<target>/" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no failure"
