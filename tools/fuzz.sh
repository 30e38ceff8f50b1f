#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ on stable Rust (the flags cargo-fuzz uses, without a sanitizer) and runs
# each for a time box, seeded from the committed corpora (fuzz/seeds/<target>/, built from the test fixtures).
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      default: 30 s, every target
#   FUZZ_JOBS=2 tools/fuzz.sh 600 weights              longer runs, more processes
#
# A crash, an abort, a timeout or an allocation above fuzz/src/lib.rs's MAX_ALLOC stops the run with a non-zero
# status; the input is saved under fuzz/artifacts/<target>/ (turn it into a regression test: docs/fuzzing.md).
# Each target's statistics go to fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(weights npy image tar config hf_config text)
fi
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# --target keeps the instrumentation off build scripts and proc macros.
cargo build --release --locked --target "$host" --bins
# The targets write their input to files here (for the readers that take a path).
export DINOV2_FUZZ_SCRATCH
DINOV2_FUZZ_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/dinov2-fuzz.XXXXXX")
trap 'rm -rf "$DINOV2_FUZZ_SCRATCH"' EXIT
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" logs
    echo "== fuzzing $t for ${secs}s"
    # -rss_limit_mb: the whole process; -timeout: one input (seconds); -max_len: bytes per input.
    if ! "target/$host/release/$t" "corpus/$t" "seeds/$t" \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=262144 \
        ${FUZZ_JOBS:+-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"} \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"logs/$t.log" 2>&1; then
        echo "!! $t failed; the input is in fuzz/artifacts/$t/, the log in fuzz/logs/$t.log"
        tail -40 "logs/$t.log"
        status=1
    fi
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "logs/$t.log" || true
done
exit $status
