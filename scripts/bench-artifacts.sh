#!/usr/bin/env bash
# Artifacts, stash and matrices (issue 17), each against a comparator in the same run: a 1 GiB
# artifact up and down against tar | socat, a 40,000-file stash and unstash against tar c | tar x,
# and the controller's CPU per cell of a 3 x 10 matrix on 3 agents; on the disk (/var/tmp) and on
# tmpfs (/dev/shm; about 5 GiB of it with the default 1 GiB). Builds the release controller and
# the static agent itself; needs socat (installed if missing).
#
#   scripts/bench-artifacts.sh [--write] [GIB [FILES [RUNS]]]    (defaults: 1 GiB, 40000 files, 3 runs)
#
# --write puts the section into BENCHMARKS.md between <!-- artifacts:begin --> and <!-- artifacts:end -->.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh
cmdline="scripts/bench-artifacts.sh${*:+ $*}"
write=0
[ "${1:-}" != --write ] || { write=1; shift; }
apt_ensure socat
cargo build --release --quiet --bin wisp
bash scripts/build-static.sh "$(uname -m)-unknown-linux-musl" >/dev/null
agent=target/static/$(uname -m)-unknown-linux-musl/wisp-agent
wisp=${CARGO_TARGET_DIR:-target}/release/wisp
# Once with everything on the disk, once on tmpfs: this machine's disk creates files slowly (tar x
# of the 40,000 files takes seconds), and tmpfs shows what wisp itself costs.
out=$(BENCH_DIR=/var/tmp python3 scripts/bench-artifacts.py "$wisp" "$agent" "${1:-1}" "${2:-40000}" "${3:-3}")
out="$out

$(BENCH_DIR=/dev/shm python3 scripts/bench-artifacts.py "$wisp" "$agent" "${1:-1}" "${2:-40000}" "${3:-3}")"
section=$(printf '%s\n\n%s\n\nMade by `%s` on %s (%s cores), %s.\n' "### Artifacts, stash and matrices" \
    "$out" "$cmdline" "$(hostname)" "$(nproc)" "$(date -u '+%Y-%m-%d %H:%M UTC')")
printf '%s\n' "$section"
[ "$write" = 0 ] || printf '%s\n' "$section" | python3 scripts/bench-section.py artifacts
