#!/usr/bin/env bash
# Checks what scripts/release.sh made, as a user would meet it:
#   a. SHA256SUMS lists every archive and each one matches;
#   b. each tarball unpacks to its one directory: the binary (mode 755), the systemd unit and the
#      completions; every binary is fully static (no interpreter, no dynamic section) and the
#      agents are within their size budgets;
#   c. every binary prints the release's version and commit: x86_64 natively, aarch64 and armv7
#      under qemu-user;
#   d. the aarch64 controller, under qemu, serves an armv7 agent, under qemu, that runs a step;
#   e. each image archive loads with `podman load` and carries its architecture; the multi-arch
#      archive loads, and its x86_64 image runs --version under podman.
#
#   scripts/check-release.sh DIR        (DIR: target/release-VERSION)
#
# Ends with `N passed, N failed`; exits 1 if any failed. Installs what it needs (qemu-user-static,
# podman, file, binutils).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

[ $# -eq 1 ] && [ -d "$1" ] || die "usage: scripts/check-release.sh target/release-VERSION"
dir=$(cd "$1" && pwd)
version=$(basename "$dir")
version=${version#release-}
[ "$version" != "$(basename "$dir")" ] || die "$1 is not a release-VERSION directory"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wisp-release-check.XXXXXX")
ENGINE=podman
cleanup() {
    harness_cleanup
    if [ -n "${LOADED:-}" ]; then podman rmi -f "$LOADED" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
apt_ensure file binutils qemu-user-static
ENGINE=$(container_engine)

passed=0
failed=0
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

AGENT_ARCHES=(x86_64 aarch64 armv7)
CONTROLLER_ARCHES=(x86_64 aarch64)
IMAGE_ARCHES=(amd64 arm64 arm)
archives=()
for a in "${AGENT_ARCHES[@]}"; do archives+=("wisp-agent-$version-linux-$a.tar.gz"); done
for a in "${CONTROLLER_ARCHES[@]}"; do archives+=("wisp-$version-linux-$a.tar.gz"); done
for a in "${IMAGE_ARCHES[@]}"; do archives+=("wisp-agent-image-$version-$a.tar"); done
archives+=("wisp-agent-image-$version.tar")

# The commit the binaries must name: this checkout's HEAD (release.sh adds -dirty to a dirty tree).
commit=$(git rev-parse --short=12 HEAD)

# ---- a. checksums ----
test_checksums() {
    local f ok=0
    (cd "$dir" && sha256sum --quiet -c SHA256SUMS) || { say "sha256sum -c SHA256SUMS failed"; return 1; }
    for f in "${archives[@]}"; do
        [ -f "$dir/$f" ] || { say "$f is missing"; ok=1; continue; }
        awk -v f="$f" '$2 == f || $2 == "*" f { found = 1 } END { exit !found }' "$dir/SHA256SUMS" ||
            { say "SHA256SUMS does not list $f"; ok=1; }
    done
    [ "$(wc -l <"$dir/SHA256SUMS")" -eq "${#archives[@]}" ] ||
        { say "SHA256SUMS lists $(wc -l <"$dir/SHA256SUMS") files, expected ${#archives[@]}"; ok=1; }
    return "$ok"
}

# ---- b. tarballs: layout, static, size ----
# unpack NAME: $WORK/NAME/ from $dir/NAME.tar.gz, which must hold NAME/ and nothing beside it.
unpack() {
    local name=$1 top
    top=$(tar -tzf "$dir/$name.tar.gz" | cut -d/ -f1 | sort -u)
    [ "$top" = "$name" ] || { say "$name.tar.gz holds $top, expected only $name/"; return 1; }
    tar -C "$WORK" -xzf "$dir/$name.tar.gz"
}

# static_ok BIN WHAT: fully static, as check-static.sh checks the agents.
static_ok() {
    local bin=$1 what=$2
    readelf -h "$bin" >/dev/null 2>&1 || { say "$what is not an ELF file: $(file -b "$bin")"; return 1; }
    if readelf -lW "$bin" | grep -q 'INTERP'; then say "$what has an interpreter: $(file -b "$bin")"; return 1; fi
    if readelf -dW "$bin" 2>/dev/null | grep -q 'NEEDED'; then say "$what needs shared libraries"; return 1; fi
    file -b "$bin" | grep -q 'statically linked' || { say "$what: file says $(file -b "$bin")"; return 1; }
}

# want_machine BIN ARCH: the ELF machine matches the tarball's arch.
want_machine() {
    local m
    m=$(readelf -hW "$1" | sed -n 's/^ *Machine: *//p')
    case $2 in
        x86_64) [[ $m == *X86-64* ]] ;;
        aarch64) [[ $m == *AArch64* ]] ;;
        armv7) [[ $m == ARM ]] ;;
    esac || { say "$1 is for $m, not $2"; return 1; }
}

test_tarballs() {
    local a name bin ok=0 f bytes
    for a in "${AGENT_ARCHES[@]}"; do
        name=wisp-agent-$version-linux-$a
        unpack "$name" || { ok=1; continue; }
        bin=$WORK/$name/wisp-agent
        for f in wisp-agent wisp-agent.service completions/wisp-agent.bash completions/_wisp-agent; do
            [ -f "$WORK/$name/$f" ] || { say "$name.tar.gz has no $f"; ok=1; }
        done
        [ "$(stat -c %a "$bin")" = 755 ] || { say "$name/wisp-agent has mode $(stat -c %a "$bin")"; ok=1; }
        static_ok "$bin" "$name/wisp-agent" && want_machine "$bin" "$a" || ok=1
        bytes=$(stat -c %s "$bin")
        local t budget
        t=$(target_of_arch "$a")
        budget=$(size_budget "$t")
        printf '  %-40s %9d bytes (%s), budget %s\n' "$name/wisp-agent" "$bytes" "$(mib "$bytes")" "$(mib "$budget")"
        [ "$bytes" -le "$budget" ] || { say "$name/wisp-agent is over its budget"; ok=1; }
    done
    for a in "${CONTROLLER_ARCHES[@]}"; do
        name=wisp-$version-linux-$a
        unpack "$name" || { ok=1; continue; }
        bin=$WORK/$name/wisp
        for f in wisp wisp.service completions/wisp.bash completions/_wisp; do
            [ -f "$WORK/$name/$f" ] || { say "$name.tar.gz has no $f"; ok=1; }
        done
        [ "$(stat -c %a "$bin")" = 755 ] || { say "$name/wisp has mode $(stat -c %a "$bin")"; ok=1; }
        static_ok "$bin" "$name/wisp" && want_machine "$bin" "$a" || ok=1
        bytes=$(stat -c %s "$bin")
        printf '  %-40s %9d bytes (%s)\n' "$name/wisp" "$bytes" "$(mib "$bytes")"
    done
    return "$ok"
}

# ---- c. versions ----
# run_arch ARCH BIN ARGS...: BIN natively or under qemu-user.
run_arch() {
    local a=$1
    shift
    case $a in
        x86_64) "$@" ;;
        aarch64) qemu-aarch64-static "$@" ;;
        armv7) qemu-arm-static "$@" ;;
    esac
}

test_versions() {
    local a out want ok=0
    for a in "${AGENT_ARCHES[@]}"; do
        want="wisp-agent $version ($commit"
        out=$(run_arch "$a" "$WORK/wisp-agent-$version-linux-$a/wisp-agent" --version 2>&1) || true
        printf '  %-8s %s\n' "$a" "$out"
        [[ $out == "$want)" || $out == "$want-dirty)" ]] || { say "expected \"$want)\""; ok=1; }
    done
    for a in "${CONTROLLER_ARCHES[@]}"; do
        want="wisp $version ($commit"
        out=$(run_arch "$a" "$WORK/wisp-$version-linux-$a/wisp" --version 2>&1) || true
        printf '  %-8s %s\n' "$a" "$out"
        [[ $out == "$want)" || $out == "$want-dirty)" ]] || { say "expected \"$want)\""; ok=1; }
    done
    return "$ok"
}

# ---- d. the ARM controller serves an ARM agent ----
test_arm_controller_and_agent() {
    local name=armbox secret pid rc=0
    # The harness runs "$WISP": a wrapper that runs the aarch64 controller under qemu.
    printf '#!/bin/sh\nexec qemu-aarch64-static %s "$@"\n' "$WORK/wisp-$version-linux-aarch64/wisp" >"$WORK/wisp-arm64"
    chmod +x "$WORK/wisp-arm64"
    WISP=$WORK/wisp-arm64
    start_controller || return 1
    secret=$(add_node "$name") || return 1
    qemu-arm-static "$WORK/wisp-agent-$version-linux-armv7/wisp-agent" --url "$URL" --name "$name" \
        --secret "@$WORK/$name.secret" --direct "$AGENT_ADDR" --work-dir "$WORK/$name-work" \
        >"$WORK/$name.log" 2>&1 &
    pid=$!
    HARNESS_PIDS+=("$pid")
    wait_online "$name" "$pid" 90 || { tail -n 15 "$WORK/$name.log" >&2; return 1; }
    "$WISP" nodes --data "$CTL" | grep -q "$version ($commit.*armv7\|$version ($commit.*arm/" ||
        { say "wisp nodes does not show the agent's version $version and arch:"; "$WISP" nodes --data "$CTL" >&2; return 1; }
    WISP_STEP_TIMEOUT=180 run_step "$name" "$WORK/$name.out" 'echo "hello from $(uname -m)"' || rc=$?
    [ "$rc" = 0 ] && grep -q "hello from" "$WORK/$name.out" ||
        { say "the step failed ($rc):"; tail -n 20 "$WORK/$name.out" >&2; tail -n 15 "$WORK/$name.log" >&2; return 1; }
}

# ---- e. images ----
test_images() {
    local a f out arch ok=0 want
    for a in "${IMAGE_ARCHES[@]}"; do
        f=$dir/wisp-agent-image-$version-$a.tar
        out=$(podman load -q -i "$f" 2>&1) || { say "podman load -i $(basename "$f"): $out"; ok=1; continue; }
        arch=$(podman image inspect --format '{{.Architecture}}' "localhost/wisp-agent:$version-$a" 2>&1) || arch="?"
        printf '  %-6s %s: %s\n' "$a" "$(basename "$f")" "$arch"
        [ "$arch" = "$a" ] || { say "the $a image says its architecture is $arch"; ok=1; }
        podman rmi -f "localhost/wisp-agent:$version-$a" >/dev/null 2>&1 || true
    done
    # The manifest list: podman load takes this machine's image from it.
    f=$dir/wisp-agent-image-$version.tar
    out=$(podman load -q -i "$f" 2>&1) || { say "podman load -i $(basename "$f"): $out"; return 1; }
    LOADED=$(sed -n 's/^Loaded image: *//p' <<<"$out" | tail -n 1)
    [ -n "$LOADED" ] || { say "podman load printed no image: $out"; return 1; }
    out=$(podman run --rm "$LOADED" --version 2>&1) || { say "podman run $LOADED --version: $out"; return 1; }
    printf '  multi-arch %s: %s\n' "$LOADED" "$out"
    want="wisp-agent $version ($commit"
    [[ $out == "$want)" || $out == "$want-dirty)" ]] || { say "expected \"$want)\""; ok=1; }
    # It lists all three architectures.
    local index
    index=$(tar -xOf "$f" index.json)
    for a in "${IMAGE_ARCHES[@]}"; do
        grep -q "\"architecture\":\"$a\"" <<<"$(tar -xOf "$f" "blobs/sha256/$(python3 -c '
import json, sys
idx = json.loads(sys.argv[1])
m = idx["manifests"][0]
print(m["digest"].split(":")[1])' "$index")")" ||
            { say "the manifest list has no $a image"; ok=1; }
    done
    return "$ok"
}

check "a: SHA256SUMS lists every archive and each matches" test_checksums
check "b: tarballs unpack to one directory; binaries static, for their arch, agents within budget" test_tarballs
check "c: every binary prints $version and commit $commit (ARM under qemu)" test_versions
check "d: the aarch64 controller (qemu) serves an armv7 agent (qemu) that runs a step" test_arm_controller_and_agent
check "e: the image archives load with podman; the multi-arch one runs --version" test_images

printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
