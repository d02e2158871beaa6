#!/usr/bin/env bash
# Tests of the firmware-style agent (issue 3), run by scripts/test.sh after `cargo build --bins`:
#   a. the static agents build for x86_64, aarch64 and armv7, are fully static and within budget;
#   b. the FROM-scratch image runs under podman against a controller on this machine: the agent
#      comes online, a `sh` step fails with its "no shell" message, and with a static busybox
#      mounted as /bin/sh a step succeeds as uid 1000 in a writable work dir;
#   c. the bare binary (this machine's arch) alone in an empty root (chroot) connects and runs step
#      requests;
#   d. the aarch64 and armv7 binaries under qemu-user connect over WebSocket and over TCP and run a
#      step;
#   e. wisp builds itself with .wisp/pipeline.yaml on two agents (tests/selfbuild.rs).
# Installs what it needs (qemu-user-static, podman, runc, busybox-static, file, cross compilers).
# Everything listens on ephemeral ports of 127.0.0.1; the EXIT trap kills what it started and
# removes its containers and temp dirs. Ends with `N passed, N failed`; exits 1 if any failed.
#   WISP_BIN=PATH          the controller binary (default target/debug/wisp)
#   WISP_KEEP_TEST_DIR=1   keep the temp dir (logs, outputs, controller data) for a look afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wisp-static-test.XXXXXX")
ENGINE=podman
cleanup() {
    harness_cleanup
    if [ "${WISP_KEEP_TEST_DIR:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

apt_ensure file binutils qemu-user-static busybox-static coreutils
ENGINE=$(container_engine)
IMAGE=localhost/wisp-agent:static-test
BUSYBOX=$(command -v busybox || echo /bin/busybox)

passed=0
failed=0
# check NAME CMD...: one test; its checks print why they fail and return non-zero.
check() {
    local name=$1
    shift
    printf -- '--- %s\n' "$name"
    if "$@"; then
        printf 'PASS %s\n' "$name"
        passed=$((passed + 1))
    else
        printf 'FAIL %s\n' "$name"
        failed=$((failed + 1))
    fi
}

# expect_in FILE PHRASE: FILE contains PHRASE, else show FILE and fail.
expect_in() {
    grep -qF -- "$2" "$1" && return 0
    say "expected \"$2\" in $(basename "$1"), which holds:"
    sed 's/^/    /' "$1" | tail -20 >&2
    return 1
}

# expect_rc WANT GOT WHAT
expect_rc() {
    [ "$2" = "$1" ] && return 0
    say "$3 exited $2, expected $1"
    return 1
}

# Dump an agent's log after a failure.
show_log() {
    [ -s "$1" ] || return 0
    say "agent log ($(basename "$1")):"
    tail -15 "$1" | sed 's/^/    /' >&2
}

# ---- a. build, static, size ----
test_build_static() {
    bash scripts/build-static.sh --check
}

# ---- b. the image under podman ----
test_image_builds_and_runs() {
    bash scripts/build-image.sh --tag "$IMAGE" || return 1
    local out
    out=$("$ENGINE" run --rm "$IMAGE" --version 2>&1) || { say "$out"; return 1; }
    [[ $out == "wisp-agent "* ]] || { say "unexpected --version output: $out"; return 1; }
    [ "$("$ENGINE" image inspect --format '{{.Config.User}}' "$IMAGE")" = 1000:1000 ] ||
        { say "the image does not run as 1000:1000"; return 1; }
}

# Start the image as a Kubernetes pod template does: args SECRET NAME, JENKINS_* in the env.
start_container() {
    local name=$1 secret=$2
    shift 2
    local cname=wisp-static-test-$$-$name
    HARNESS_CONTAINERS+=("$cname")
    "$ENGINE" run -d --name "$cname" --network host -e "JENKINS_URL=$URL" "$@" "$IMAGE" "$secret" "$name" \
        >/dev/null 2>"$WORK/$name.run" || { cat "$WORK/$name.run" >&2; return 1; }
}
container_log() {
    "$ENGINE" logs "wisp-static-test-$$-$1" >"$WORK/$1.log" 2>&1 || true
    show_log "$WORK/$1.log"
}

test_image_without_shell() {
    local name=img_noshell secret rc=0
    secret=$(add_node "$name") || return 1
    start_container "$name" "$secret" -e JENKINS_WEB_SOCKET=true || return 1
    wait_online "$name" || { container_log "$name"; return 1; }
    run_step "$name" "$WORK/$name.out" 'echo this needs a shell' || rc=$?
    expect_rc 1 "$rc" "wisp run" && expect_in "$WORK/$name.out" "no shell" || { container_log "$name"; return 1; }
}

test_image_with_busybox_sh() {
    local name=img_busybox secret rc=0
    secret=$(add_node "$name") || return 1
    # JENKINS_URL alone: the agent finds the TCP port at /tcpSlaveAgentListener/ as agent.jar does.
    start_container "$name" "$secret" -v "$BUSYBOX:/bin/sh:ro" || return 1
    wait_online "$name" || { container_log "$name"; return 1; }
    run_step "$name" "$WORK/$name.out" '
echo hello-from-scratch-image
while read -r key value rest; do [ "$key" = Uid: ] && echo "uid=$value"; done </proc/self/status
echo proof >proof.txt && echo "wrote $PWD/proof.txt"' || rc=$?
    expect_rc 0 "$rc" "wisp run" &&
        expect_in "$WORK/$name.out" hello-from-scratch-image &&
        expect_in "$WORK/$name.out" "uid=1000" &&
        expect_in "$WORK/$name.out" "wrote /home/wisp/agent/" || { container_log "$name"; return 1; }
}

# ---- c. the bare binary in an empty root ----
test_bare_binary_in_empty_root() {
    local name=bare_root secret rc=0 root=$WORK/root pid
    local bin=$STATIC_DIR/$(target_of_arch "$(uname -m)")/wisp-agent
    [ -f "$bin" ] || { say "$bin is missing"; return 1; }
    secret=$(add_node "$name") || return 1
    mkdir -p "$root"
    cp "$bin" "$root/wisp-agent"
    printf '%s\n' "$secret" >"$root/secret"
    chroot "$root" /wisp-agent --url "$URL" --name "$name" --secret @/secret --direct "$AGENT_ADDR" \
        >"$WORK/$name.log" 2>&1 &
    pid=$!
    HARNESS_PIDS+=("$pid")
    wait_online "$name" "$pid" || { show_log "$WORK/$name.log"; return 1; }
    run_step "$name" "$WORK/$name.out" 'echo this needs a shell' || rc=$?
    expect_rc 1 "$rc" "wisp run (no shell in the root)" && expect_in "$WORK/$name.out" "no shell" ||
        { show_log "$WORK/$name.log"; return 1; }
    # Give the same running agent a shell (and nothing else: no /dev, no /tmp) and run again; the
    # step reads an empty stdin and sees its file system.
    mkdir -p "$root/bin"
    cp "$BUSYBOX" "$root/bin/sh"
    rc=0
    run_step "$name" "$WORK/$name.out2" 'read x; echo "hello-from-empty-root read=[$x]"' || rc=$?
    expect_rc 0 "$rc" "wisp run (busybox as /bin/sh)" && expect_in "$WORK/$name.out2" "hello-from-empty-root read=[]" ||
        { show_log "$WORK/$name.log"; return 1; }
}

# ---- d. ARM binaries under qemu-user ----
test_arm_under_qemu() {
    local target=$1 transport=$2 qemu name secret rc=0 pid
    case $target in
        aarch64-*) qemu=qemu-aarch64-static ;;
        armv7-*) qemu=qemu-arm-static ;;
    esac
    local bin=$STATIC_DIR/$target/wisp-agent
    [ -f "$bin" ] || { say "$bin is missing"; return 1; }
    name=${target%%-*}_$transport
    secret=$(add_node "$name") || return 1
    local how=(--websocket)
    [ "$transport" = ws ] || how=(--direct "$AGENT_ADDR")
    mkdir -p "$WORK/$name"
    "$qemu" "$bin" --url "$URL" --name "$name" --secret "@$WORK/$name.secret" "${how[@]}" \
        --work-dir "$WORK/$name" >"$WORK/$name.log" 2>&1 &
    pid=$!
    HARNESS_PIDS+=("$pid")
    wait_online "$name" "$pid" 60 || { show_log "$WORK/$name.log"; return 1; }
    run_step "$name" "$WORK/$name.out" "echo hello-from-$name" || rc=$?
    kill "$pid" 2>/dev/null || true
    expect_rc 0 "$rc" "wisp run" && expect_in "$WORK/$name.out" "hello-from-$name" ||
        { show_log "$WORK/$name.log"; return 1; }
}

# ---- e. wisp builds itself ----
# .wisp/pipeline.yaml on a local controller with two agents (TCP and WebSocket): the static agents
# of (a) are built again through it (a cache hit), stashed, archived and tested in parallel
# stages; the archived binaries' SHA-256 must be those of target/static (tests/selfbuild.rs).
test_selfbuild() {
    cargo test --quiet --test selfbuild -- --ignored --nocapture >"$WORK/selfbuild.log" 2>&1 ||
        { tail -n 60 "$WORK/selfbuild.log"; return 1; }
}

check "a: static agents build, are fully static and within budget" test_build_static
check "b: the FROM-scratch image builds and runs --version as uid 1000" test_image_builds_and_runs
if start_controller; then
    say "controller at $URL, agent port $AGENT_ADDR"
    check "b: container agent comes online; a sh step fails with 'no shell'" test_image_without_shell
    check "b: container agent with busybox as /bin/sh runs a step as uid 1000" test_image_with_busybox_sh
    check "c: bare static binary in an empty root connects and runs steps" test_bare_binary_in_empty_root
    for t in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
        for transport in ws tcp; do
            check "d: $t under qemu over $transport runs a step" test_arm_under_qemu "$t" "$transport"
        done
    done
else
    check "controller starts (tests b to d need it)" false
fi
check "e: wisp builds itself: .wisp/pipeline.yaml on two agents, archived agents match" test_selfbuild

printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
