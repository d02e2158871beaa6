#!/usr/bin/env bash
# Pod builds under podman (issue 15): submit to first output split into wisp's own share and
# podman's, podman alone in the same run, and the controller's CPU per pod for a burst of pod
# builds. Builds the release controller, the static agent and both images itself.
#
#   scripts/bench-pods.sh [--write] [RUNS [BURST]]      (defaults: 20 runs, a burst of 20)
#
# --write puts the section into BENCHMARKS.md between <!-- pods:begin --> and <!-- pods:end -->.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh
cmdline="scripts/bench-pods.sh${*:+ $*}"
write=0
[ "${1:-}" != --write ] || { write=1; shift; }
runs=${1:-20} burst=${2:-20}

[ "$(id -u)" = 0 ] || die "run as root: podman runs the pods rootful here"
cargo build --release --quiet --bin wisp --bin wisp-agent
bash scripts/build-static.sh "$(uname -m)-unknown-linux-musl" >/dev/null
bash scripts/build-image.sh >/dev/null
bash scripts/build-busybox-image.sh >/dev/null
rel=${CARGO_TARGET_DIR:-target}/release
out=$(python3 scripts/bench-pods.py "$rel/wisp" "$rel/wisp-agent" localhost/wisp-agent:dev \
    localhost/wisp-busybox:dev "$runs" "$burst")
section=$(printf '%s\n\n%s\n\nMade by `%s` on %s (%s cores), %s.\n' "### Pod builds under podman" "$out" \
    "$cmdline" "$(hostname)" "$(nproc)" "$(date -u '+%Y-%m-%d %H:%M UTC')")
printf '%s\n' "$section"
[ "$write" = 0 ] || printf '%s\n' "$section" | python3 scripts/bench-section.py pods
