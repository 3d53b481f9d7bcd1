#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes (see fuzz/README.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds the libFuzzer targets of fuzz/ (stable Rust: RUSTC_BOOTSTRAP=1 lets
# rustc take the AddressSanitizer flag), then runs each target for
# SECONDS_PER_TARGET (default 30, the CI run) with a 1 s per-input timeout and
# a 1024 MB memory limit, starting from the committed corpus fuzz/corpus/<t>/.
# New interesting inputs go to fuzz/target/corpus-work/<t>/ (not committed);
# any crash, timeout or out-of-memory input is written to
# fuzz/artifacts/<t>/ and the script exits non-zero.
#
# Environment: TQ_FUZZ_SANITIZER=address (default) or none (about 2× faster,
# no memory-error detection); TQ_FUZZ_MAX_LEN (default 16384 bytes).
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
secs="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(tqc npy fvecs kv_calib tqi)
triple="$(rustc -vV | sed -n 's/^host: //p')"
san="${TQ_FUZZ_SANITIZER:-address}"
max_len="${TQ_FUZZ_MAX_LEN:-16384}"

flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
if [ "$san" = address ]; then
    flags+=" -Zsanitizer=address -Cforce-frame-pointers"
fi
echo "fuzz: building ${targets[*]} (sanitizer: $san)" >&2
RUSTC_BOOTSTRAP=1 RUSTFLAGS="$flags" cargo build --release --locked --target "$triple" \
    --target-dir "target/fuzz-$san" $(printf -- '--bin %s ' "${targets[@]}")
bin="target/fuzz-$san/$triple/release"

export RAYON_NUM_THREADS=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}"
failed=()
for t in "${targets[@]}"; do
    work="target/corpus-work/$t"
    mkdir -p "$work" "artifacts/$t"
    log="target/fuzz-$t.log"
    start=$(date +%s)
    set +e
    extra=(); [ -d "regressions/$t" ] && extra=("regressions/$t")
    "$bin/$t" "$work" "corpus/$t" "${extra[@]}" -max_total_time="$secs" -timeout=1 -rss_limit_mb=1024 -malloc_limit_mb=1024 \
        -max_len="$max_len" -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    wall=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    printf 'fuzz: %-9s %s executions, %s exec/s, %s s wall, exit %s\n' "$t" "${execs:-?}" "${rate:-?}" "$wall" "$rc"
    if [ $rc -ne 0 ]; then
        failed+=("$t")
        grep -E 'ERROR|panicked|SUMMARY|Test unit written|tq-fuzz:' "$log" | head -20 >&2 || true
        echo "fuzz: $t failed; full log in fuzz/$log" >&2
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: findings in ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: no findings"
