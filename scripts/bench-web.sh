#!/usr/bin/env bash
# The web page's server side with a big store (issue 16): render times of its pages with 10,000
# nodes and 100,000 builds, the bytes of a first page load, dispatch latency with and without a
# /metrics scrape every 100 ms, and the live log in Chromium against a step writing 50 MiB/s.
# Builds the release controller, agent and load generator; needs chromium and chromium-driver.
#
#   scripts/bench-web.sh [--write] [NODES [BUILDS]]      (defaults: 10000 nodes, 100000 builds)
#
# --write puts the section into BENCHMARKS.md between <!-- web:begin --> and <!-- web:end -->.
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="scripts/bench-web.sh${*:+ $*}"
write=0
[ "${1:-}" != --write ] || { write=1; shift; }
cargo build --release --quiet --bins --example loadgen
rel=${CARGO_TARGET_DIR:-target}/release
out=$(python3 scripts/bench-web.py "$rel/wisp" "$rel/wisp-agent" "$rel/examples/loadgen" "$@")
# The live log in a real Chromium against a step writing 50 MiB/s for 40 s.
out="$out

$(python3 scripts/bench-web-log.py "$rel/wisp" "$rel/wisp-agent" 50 40)"
section=$(printf '%s\n\n%s\n\nMade by `%s` on %s (%s cores), %s.\n' "### The web page" "$out" \
    "$cmdline" "$(hostname)" "$(nproc)" "$(date -u '+%Y-%m-%d %H:%M UTC')")
printf '%s\n' "$section"
[ "$write" = 0 ] || printf '%s\n' "$section" | python3 scripts/bench-section.py web
