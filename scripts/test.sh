#!/usr/bin/env bash
# Runs every test of wisp: formatting, lints, unit and end-to-end tests, a short fuzz run, and the
# static/ARM/container checks. Installs what it needs (rustup components and targets, Debian
# packages, cargo-fuzz) itself, so it works on a fresh machine.
#   WISP_FUZZ_SECONDS   seconds per fuzz target (default 20; four targets)
#   WISP_FUZZ_SANITIZER  the fuzz build's sanitizer (default here: none; `address` for ASan)
#   WISP_SKIP_STATIC=1  skip the static-binary, image, ARM, release and systemd tests (for quick
#                       local runs)
#   WISP_RELEASE_SMOKE=0  skip the smoke release (release.sh --quick --check, then
#                       test-systemd.sh; about ten minutes), which runs by default after the static
#                       tests
# Some tests need root: network namespaces and iptables (tests/faults.rs), a small tmpfs for the
# full-disk test (tests/controller.rs) and a PID namespace (tests/agent.rs). tests/kube_backend.rs
# runs kmock, an in-memory Kubernetes API emulator from PyPI (no real API server installs here);
# tests/kafka.rs runs tansu, a Kafka-API broker from crates.io (see scripts/tansu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

# Each section header says how long the run has taken so far (CI has a time budget).
START=$SECONDS
section() { printf '\n==== %s (at %d s) ====\n' "$*" $((SECONDS - START)); }

section "toolchain"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo --version

section "packages the tests start"
# shellcheck source=scripts/static-common.sh
. scripts/static-common.sh
# Real peers: nginx and haproxy as reverse proxies (tests/proxy.rs, tests/faults.rs), iptables and
# iproute2 for the network partitions of tests/faults.rs, mount (tmpfs) and util-linux (unshare) for
# the full-disk and PID 1 tests, procps (pgrep), podman, runc and busybox-static for the real containers of
# tests/podman_backend.rs and tests/pods.rs (which also write podman's settings themselves), chromium
# and its WebDriver (chromium-driver) for the web page's tests in a real browser (tests/web.rs), bash
# and zsh for the shell completions' test (tests/cli.rs). Installed only if missing.
apt_ensure nginx haproxy iptables iproute2 mount util-linux procps podman runc busybox-static chromium \
    chromium-driver bash zsh
# kmock (PyPI), the Kubernetes API emulator of tests/kube_backend.rs, in a venv under the target
# dir; the test's helper (tests/common/kmock.rs) makes the same venv when it is missing.
apt_ensure python3 python3-venv
KMOCK_VENV=${CARGO_TARGET_DIR:-target}/kmock-venv
if [ ! -e "$KMOCK_VENV/.kmock-0.8" ]; then
    rm -rf "$KMOCK_VENV"
    python3 -m venv "$KMOCK_VENV"
    "$KMOCK_VENV/bin/python" -m pip install -q --disable-pip-version-check kmock==0.8
    touch "$KMOCK_VENV/.kmock-0.8"
fi

# tansu, the Kafka-API broker of tests/kafka.rs (crates.io; no Apache Kafka installs here), is built
# once per machine and kept outside the checkout (scripts/tansu.sh); where it is missing the build
# starts now in the background, the test's helper waits for it (a lock), and kafka-python, its
# independent client, goes into a venv under the target dir when the test first needs it.
mkdir -p "${CARGO_TARGET_DIR:-target}"
nice -n 10 bash scripts/tansu.sh >/dev/null 2>"${CARGO_TARGET_DIR:-target}/tansu.log" &
section "cargo fmt --check"
cargo fmt --check

section "cargo clippy"
cargo clippy --all-targets -- -D warnings
cargo clippy --no-default-features --lib --bin wisp-agent -- -D warnings
# The parsers alone, as the fuzz targets build them.
cargo clippy --no-default-features --features parsers --lib -- -D warnings

section "cargo test"
cargo build --bins
rm -f target/tmp/faults.txt
# Every test but tests/kafka.rs, which runs last (below): tansu may still be building, and each
# minute it has before then is a minute the run does not wait for it.
# Two lanes at once, all built first: tests/faults.rs and tests/pods.rs spend most of their five
# minutes waiting (partitions, grace periods, podman starting pods), so they run beside the others
# instead of after them. Each lane has its own output; both count in the summary.
targets=() slow_args=()
for f in tests/*.rs; do
    t=$(basename "$f" .rs)
    case $t in
        kafka) ;;
        faults | pods) slow_args+=(--test "$t") ;;
        *) targets+=(--test "$t") ;;
    esac
done
cargo test --no-run --lib --bins --examples "${targets[@]}" "${slow_args[@]}"
cargo test --no-fail-fast "${slow_args[@]}" >target/test-output-slow.txt 2>&1 &
slow_pid=$!
main_rc=0
cargo test --no-fail-fast --lib --bins --examples "${targets[@]}" 2>&1 | tee target/test-output.txt || main_rc=$?
cargo test --no-fail-fast --doc 2>&1 | tee -a target/test-output.txt || main_rc=$?
slow_rc=0
wait "$slow_pid" || slow_rc=$?
echo "---- the other lane: ${slow_args[*]} ----"
cat target/test-output-slow.txt
cat target/test-output-slow.txt >>target/test-output.txt
[ "$main_rc" = 0 ] && [ "$slow_rc" = 0 ] || { echo "cargo test failed (exit $main_rc, other lane $slow_rc)"; exit 1; }

section "fuzz"
# Without AddressSanitizer unless WISP_FUZZ_SANITIZER says otherwise: the fuzzed parsers are safe
# Rust, where a bug shows as a panic, a hang or an overflow (debug assertions are on), and the
# instrumented build is one of CI's largest costs (it is wisp's `parsers` feature only, not the whole
# controller: 460 CPU-seconds instead of 860).
WISP_FUZZ_SANITIZER=${WISP_FUZZ_SANITIZER:-none} bash scripts/fuzz.sh "${WISP_FUZZ_SECONDS:-20}"

if [ "${WISP_SKIP_STATIC:-0}" != 1 ]; then
    section "static agent, image, ARM under emulation"
    bash scripts/test-static.sh
fi

if [ "${WISP_SKIP_STATIC:-0}" != 1 ] && [ "${WISP_RELEASE_SMOKE:-1}" = 1 ]; then
    # A smoke release (the controller without LTO) checked as a user meets it, then the README's
    # install section followed under a real systemd with its files.
    section "release smoke: scripts/release.sh, check-release.sh, test-systemd.sh"
    # Cargo.toml's own version from a clean tree: the agents are the cargo builds test-static.sh
    # has just made (release.sh only copies them), the controllers are built --quick.
    smoke=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
    bash scripts/release.sh --quick --allow-dirty --check "$smoke"
    bash scripts/test-systemd.sh "${CARGO_TARGET_DIR:-target}/release-$smoke"
fi

section "bench smoke"
bash scripts/bench.sh --smoke

section "cargo test --test kafka"
cargo test --no-fail-fast --test kafka 2>&1 | tee -a target/test-output.txt

section "summary"
if [ -f target/tmp/faults.txt ]; then
    echo "fault scenarios (tests/faults.rs):"
    cat target/tmp/faults.txt
fi
grep -E '^test result:' target/test-output.txt | awk '{p+=$4; f+=$6} END {printf "cargo test: %d passed, %d failed\n", p, f}'
