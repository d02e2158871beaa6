#!/usr/bin/env bash
# Prints the path of the tansu Kafka-API broker that tests/kafka.rs starts, building it first if
# this machine has none: `cargo install tansu` (crates.io, Apache-2.0) with its sqlite storage
# engine only (records that survive a broker restart), once per machine into a cache outside the
# checkout, so a machine does not rebuild it every run. A lock makes a second caller (the test
# helper while scripts/test.sh builds it in the background) wait for the first instead of
# building it again.
# The tests' build is unoptimised (opt-level 0): CI builds it on every fresh machine, within its
# time budget, and the tests move little data. Measured on 2 cores: 800 CPU-seconds, against 1,790
# at opt-level 1 with the dynostore engine as well (which no test uses). scripts/bench-kafka.sh
# asks for level 3, the release profile's, in a root of its own.
#   WISP_TANSU_OPT    the optimisation level (default 0)
#   WISP_TANSU_ROOT   where it goes (default ~/.cache/wisp/tansu-VERSION-O<level>)
set -euo pipefail
VERSION=0.6.0
OPT=${WISP_TANSU_OPT:-0}
ROOT=${WISP_TANSU_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/wisp/tansu-$VERSION-O$OPT}
BIN=$ROOT/bin/tansu
mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock 9
if [ ! -x "$BIN" ]; then
    echo "tansu: building tansu $VERSION into $ROOT (once per machine; log: $ROOT/build.log)" >&2
    start=$SECONDS
    if ! CARGO_PROFILE_RELEASE_OPT_LEVEL=$OPT CARGO_PROFILE_RELEASE_DEBUG=false cargo install tansu --version "$VERSION" --locked --features libsql --root "$ROOT" \
        >"$ROOT/build.log" 2>&1; then
        tail -20 "$ROOT/build.log" >&2
        echo "tansu: the build failed (log: $ROOT/build.log)" >&2
        exit 1
    fi
    echo "tansu: built in $((SECONDS - start)) s" >&2
fi
echo "$BIN"
