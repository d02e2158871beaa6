#!/usr/bin/env bash
# Prints the path of the tansu Kafka-API broker that tests/kafka.rs starts, building it first if
# this machine has none: `cargo install tansu` (crates.io, Apache-2.0) with the sqlite storage
# engine (records that survive a broker restart), once per machine into a cache outside the
# checkout, so CI does not rebuild it every run (10 to 30 minutes on 2 cores). A lock makes a
# second caller (the test helper while scripts/test.sh builds it in the background) wait for the
# first instead of building it again.
# The tests' build is optimised at level 1: it compiles in less time than a full release build (CI
# builds it on every fresh machine, within its time budget), and the tests move little data;
# scripts/bench-kafka.sh asks for level 3, the release profile's, in a root of its own.
#   WISP_TANSU_OPT    the optimisation level (default 1)
#   WISP_TANSU_ROOT   where it goes (default ~/.cache/wisp/tansu-VERSION-O<level>)
set -euo pipefail
VERSION=0.6.0
OPT=${WISP_TANSU_OPT:-1}
ROOT=${WISP_TANSU_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/wisp/tansu-$VERSION-O$OPT}
BIN=$ROOT/bin/tansu
mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock 9
if [ ! -x "$BIN" ]; then
    echo "tansu: building tansu $VERSION into $ROOT (once per machine; log: $ROOT/build.log)" >&2
    start=$SECONDS
    if ! CARGO_PROFILE_RELEASE_OPT_LEVEL=$OPT cargo install tansu --version "$VERSION" --locked --features dynostore,libsql --root "$ROOT" \
        >"$ROOT/build.log" 2>&1; then
        tail -20 "$ROOT/build.log" >&2
        echo "tansu: the build failed (log: $ROOT/build.log)" >&2
        exit 1
    fi
    echo "tansu: built in $((SECONDS - start)) s" >&2
fi
echo "$BIN"
