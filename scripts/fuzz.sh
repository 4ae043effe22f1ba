#!/usr/bin/env bash
# Runs cargo-fuzz targets (fuzz/fuzz_targets/) with libFuzzer on the stable
# toolchain: the targets are built with the sanitizer-coverage flags that
# cargo-fuzz passes (no address sanitizer, which needs nightly), then each
# runs for the given time on its corpus under target/fuzz/corpus/TARGET.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   scripts/fuzz.sh frame_decode 600
#   scripts/fuzz.sh all 15          # what CI runs
#
# Prints one line per target: `FUZZ target runs=N seconds=S new_units=U`.
# Exits non-zero when a target crashes; the crashing input is kept under
# target/fuzz/artifacts/TARGET/ (rerun it: the binary with that file).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
which="${1:-all}"
seconds="${2:-60}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$root/target/fuzz"
# cargo-fuzz's flags: coverage counters, comparison tracing, checks on.
# Only the target (not build scripts) gets them: hence the explicit --target.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cdebug-assertions -Coverflow-checks"
cargo build --quiet --release --manifest-path "$root/fuzz/Cargo.toml" --target "$triple" --bins

if [ "$which" = all ]; then
  targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$root/fuzz/Cargo.toml" | grep -v '^proto-fuzz$')
else
  targets="$which"
fi
status=0
for t in $targets; do
  corpus="$CARGO_TARGET_DIR/corpus/$t"
  artifacts="$CARGO_TARGET_DIR/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  log="$CARGO_TARGET_DIR/$t.log"
  rc=0
  "$CARGO_TARGET_DIR/$triple/release/$t" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$corpus" >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  added=$(sed -n 's/^stat::new_units_added: *//p' "$log")
  echo "FUZZ $t runs=${runs:-?} seconds=$seconds new_units=${added:-?} exit=$rc"
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$log" >&2
    status=1
  fi
done
exit $status
