#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 20), one after the other.
#   bash scripts/fuzz.sh [SECONDS]
# Installs cargo-fuzz if it is missing and uses a nightly toolchain when there is one (installing
# it if it can, else falling back to stable with RUSTC_BOOTSTRAP=1). Seeds from fuzz/seeds/TARGET
# are copied into the (git-ignored) corpus fuzz/corpus/TARGET first, so runs build on each other.
# Prints one summary line per target and exits non-zero if any target crashed; the crashing input
# is left in fuzz/artifacts/TARGET/ and the full libFuzzer log in fuzz/target/TARGET.log.
#   WISP_FUZZ_SANITIZER  cargo-fuzz sanitizer (default: cargo-fuzz's default, address; `none` is faster)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-20}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS]   (seconds per target, a positive integer)" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

toolchain=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
    toolchain=(+nightly)
elif command -v rustup >/dev/null 2>&1 && rustup toolchain install nightly --profile minimal; then
    toolchain=(+nightly)
else
    echo "fuzz: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
fi

sanitizer=()
if [ -n "${WISP_FUZZ_SANITIZER:-}" ]; then
    sanitizer=(--sanitizer "$WISP_FUZZ_SANITIZER")
fi

cargo "${toolchain[@]}" fuzz --version
mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz: no targets found in fuzz/" >&2
    exit 1
fi

# Build every target first, so the time limit is spent fuzzing.
cargo "${toolchain[@]}" fuzz build "${sanitizer[@]}"

mkdir -p fuzz/target
failed=0
summary=()
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus"
    if [ -d "fuzz/seeds/$t" ]; then
        cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    fi
    log="fuzz/target/$t.log"
    echo "fuzz: running $t for ${secs}s (log: $log)"
    status=ok
    start=$SECONDS
    if ! cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" "$t" "$corpus" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        status=CRASHED
        failed=1
        # The panic or sanitizer report, where the input was saved and how to reproduce it.
        report=$({
            grep -E -A1 "panicked at" "$log" | head -n 4
            grep -E "ERROR: (libFuzzer|AddressSanitizer)|Test unit written to|^\s+cargo fuzz run|^error" "$log" | head -n 10
        } || true)
        if [ -n "$report" ]; then echo "$report"; else tail -n 40 "$log"; fi
    fi
    elapsed=$((SECONDS - start))
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n 1 || true)
    if [ -z "$runs" ]; then
        runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -n 1 || true)
    fi
    cov=$(grep -oE ' cov: [0-9]+' "$log" | tail -n 1 | grep -oE '[0-9]+' || true)
    files=$(find "$corpus" -type f | wc -l)
    summary+=("$(printf '%-16s %-7s %10s runs in %3ss, coverage %s, corpus %s inputs' \
        "$t" "$status" "${runs:-?}" "$elapsed" "${cov:-?}" "$files")")
done

echo "fuzz summary:"
printf '  %s\n' "${summary[@]}"
exit "$failed"
