#!/usr/bin/env bash
# The Kafka transport against TCP in the same run (issue 18): throughput of step output to the
# stored log, dispatch latency, and the Kafka agent's RSS idle and while streaming. Builds the
# release controller, the Kafka-enabled static agent (scripts/build-static.sh --kafka) and tansu
# (scripts/tansu.sh, once per machine).
#   scripts/bench-kafka.sh [--write] [MIB [RUNS]]    (defaults: 1024 MiB, 3 runs)
# --write puts the section into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh
cmdline="scripts/bench-kafka.sh${*:+ $*}"
write=0
[ "${1:-}" != --write ] || { write=1; shift; }
tansu=$(WISP_TANSU_OPT=3 bash scripts/tansu.sh) # the release profile's optimisation, as measured before
cargo build --release --quiet --bin wisp
bash scripts/build-static.sh --kafka "$(uname -m)-unknown-linux-musl" >/dev/null
agent=${STATIC_DIR}-kafka/$(uname -m)-unknown-linux-musl/wisp-agent
wisp=${CARGO_TARGET_DIR:-target}/release/wisp
out=$(python3 scripts/bench-kafka.py "$wisp" "$agent" "$tansu" "${1:-1024}" "${2:-3}")
section=$(printf '%s\n\n%s\n\nMade by `%s` on %s (%s cores), %s.\n' "### The Kafka transport" \
    "$out" "$cmdline" "$(hostname)" "$(nproc)" "$(date -u '+%Y-%m-%d %H:%M UTC')")
printf '%s\n' "$section"
[ "$write" = 0 ] || printf '%s\n' "$section" | python3 scripts/bench-section.py kafka
