#!/usr/bin/env bash
# Follows the README's install section on a clean root, under a real systemd, with the files of a
# release (scripts/release.sh), and so tests the release's systemd units as the README uses them:
#   a. a container booted by systemd-nspawn (this machine's own systemd and /usr; --volatile=yes: an
#      empty root in memory, /etc empty, /usr/local empty, a network of its own, the release at
#      file:///mnt/release) runs the README's one-line install (a working agent), then its
#      controller block: the controller comes up as its unit's dedicated user and `wisp node add`
#      works; then the agent block, with the node's secret and identity: the agent comes online;
#   b. `systemd-analyze verify` accepts both units as installed there;
#   c. a build runs on it as the dedicated user: HOME and the work dir under /var/lib/wisp-agent,
#      the system read-only, no root, no new privileges, the secret not in the step's environment;
#   d. `systemctl kill -s KILL wisp-agent`: Restart=always brings it back and a build runs;
#   e. the README's upgrade block mid-build (the binary replaced, `systemctl reload`): the same main
#      PID now runs the new file, and the build succeeds with every line of its log;
#   f. `systemctl stop wisp-agent` stops it within TimeoutStopSec and the node goes offline.
#
#   scripts/test-systemd.sh target/release-VERSION      (as root)
#   WISP_KEEP_TEST_DIR=1   keep the temp dir (the container's journal is in it)
# Ends with `N passed, N failed`; exits 1 if any failed. Installs systemd-container if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

[ $# -eq 1 ] && [ -f "$1/SHA256SUMS" ] || die "usage: scripts/test-systemd.sh target/release-VERSION"
RELEASE=$(cd "$1" && pwd)
VERSION=$(basename "$RELEASE")
VERSION=${VERSION#release-}
[ "$(id -u)" = 0 ] || die "needs root (systemd-nspawn)"
apt_ensure systemd systemd-container curl

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wisp-systemd-test.XXXXXX")
MACHINE=wisp-systemd-$$
NSPAWN_PID=
cleanup() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # A clean power-off first (the journal is flushed), then no mercy.
        inside systemctl poweroff >/dev/null 2>&1 || true
        for _ in $(seq 1 100); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    if [ "${WISP_KEEP_TEST_DIR:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

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
        return 1
    fi
}

# What the container gets besides this machine's /usr: an empty /usr/local (bin/ and share/, as
# every system has them), the release read-only, and a directory to hand files in.
mkdir -p "$WORK/local/bin" "$WORK/local/share" "$WORK/share"

# readme_block NAME: the shell block under `<!-- install: NAME -->` in README.md.
readme_block() {
    awk -v want="<!-- install: $1 -->" '
        $0 == want { found = 1; next }
        found == 1 && /^```sh$/ { found = 2; next }
        found == 2 && /^```$/ { exit }
        found == 2 { print }
        found == 1 && !/^$/ { exit }' README.md
}
# set_vars BLOCK NAME=VALUE...: BLOCK with the line assigning each NAME replaced; fails when BLOCK
# does not assign one of them (the README changed: this test must follow it).
set_vars() {
    local block=$1 kv
    shift
    for kv in "$@"; do
        grep -q "^${kv%%=*}=" <<<"$block" || { say "README block does not set ${kv%%=*}:"; say "$block"; return 1; }
        block=$(awk -v k="${kv%%=*}" -v line="$kv" 'index($0, k "=") == 1 { print line; next } { print }' <<<"$block")
    done
    printf '%s\n' "$block"
}

# inside CMD...: run CMD in the container (its mount, PID, network and other namespaces).
LEADER=
inside() { nsenter -t "$LEADER" -m -u -i -n -p -- "$@"; }
# in_sh SCRIPT: a shell script in the container, stdin passed on.
in_sh() { inside /bin/sh -c "$1"; }

# The host arch's tarballs, unpacked here for test a.
ARCH=$(uname -m | sed 's/^armv7.*/armv7/')
AGENT_PKG=wisp-agent-$VERSION-linux-$ARCH
CTL_PKG=wisp-$VERSION-linux-$ARCH

# ---- a. systemd-analyze verify, in the container once the README has installed the units ----
test_verify() {
    local out
    # verify checks that ExecStart's binaries exist and every unit named is there: the container
    # has both, as the README left them.
    out=$(inside systemd-analyze verify /etc/systemd/system/wisp.service /etc/systemd/system/wisp-agent.service 2>&1) ||
        { say "systemd-analyze verify failed: $out"; return 1; }
    # verify prints warnings without failing: none are expected from these units.
    if grep -E 'wisp(-agent)?\.service' <<<"$out"; then say "systemd-analyze verify complained (above)"; return 1; fi
    say "  systemd-analyze verify: no complaints"
}

# ---- b. boot, then the README's blocks ----
boot() {
    systemd-nspawn --quiet --directory=/ --volatile=yes --register=no --keep-unit --private-network \
        --machine="$MACHINE" --bind="$WORK/local:/usr/local" --bind-ro="$RELEASE:/mnt/release" \
        --bind="$WORK/share:/mnt/share" --boot -- systemd.firstboot=off \
        systemd.mask=systemd-networkd-wait-online.service \
        >"$WORK/console.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    local i p pp
    for ((i = 0; i < 300; i++)); do
        # The container's PID 1: a systemd whose PID in its own namespace is 1, below nspawn.
        for p in $(pgrep -x systemd || true); do
            grep -qE '^NSpid:\s+[0-9]+\s+1$' "/proc/$p/status" 2>/dev/null || continue
            pp=$(ps -o ppid= -p "$p" | tr -d ' ')
            if [ "$pp" = "$NSPAWN_PID" ] || [ "$(ps -o ppid= -p "$pp" | tr -d ' ')" = "$NSPAWN_PID" ]; then
                LEADER=$p
            fi
        done
        [ -z "$LEADER" ] || break
        kill -0 "$NSPAWN_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$LEADER" ] || { say "the container did not boot:"; tail -n 30 "$WORK/console.log" >&2; return 1; }
    local state
    for ((i = 0; i < 300; i++)); do
        state=$(inside systemctl is-system-running 2>/dev/null || true)
        case $state in running | degraded) break ;; esac
        sleep 0.2
    done
    case $state in running | degraded) ;; *)
        say "the container's systemd did not finish booting: $state; its jobs:"
        inside systemctl list-jobs --no-pager >&2 || true
        return 1 ;;
    esac
    # Every systemd system has this directory; the empty /etc of --volatile=yes does not.
    inside mkdir -p /etc/systemd/system
}

DATA=/var/lib/wisp
# ctl ARGS...: the CLI in the container, against the controller's data dir.
ctl() { inside /usr/local/bin/wisp "$@" --data "$DATA"; }

journal() { inside journalctl --no-pager -u "$1" -n "${2:-30}" >&2 || true; }

# readme BLOCK VAR=VALUE...: run the README's settings block with RELEASES and V set for this
# release, the given settings, then BLOCK, in bash -eu in the container; output to $WORK/BLOCK.out.
readme() {
    local name=$1 settings script
    shift
    settings=$(set_vars "$(readme_block settings)" RELEASES=file:///mnt/release "V=$VERSION") || return 1
    script=$(readme_block "$name")
    [ -n "$script" ] || { say "README.md has no \`<!-- install: $name -->\` block"; return 1; }
    if [ $# -gt 0 ]; then
        settings+=$'\n'$(set_vars "$(readme_block "$name settings")" "$@") || return 1
    fi
    printf 'set -eu\n%s\n%s\n' "$settings" "$script" >"$WORK/share/$name.sh"
    inside bash /mnt/share/"$name.sh" >"$WORK/$name.out" 2>&1 ||
        { say "the README's $name block failed:"; tail -n 20 "$WORK/$name.out" >&2; return 1; }
}

test_readme_install() {
    boot || return 1
    # The one-line install first: it must leave a working agent (the agent block installs it again).
    readme one-line || return 1
    local v
    v=$(inside /usr/local/bin/wisp-agent --version) || { say "the one-line install left no working agent"; return 1; }
    [[ $v == "wisp-agent $VERSION ("* ]] || { say "the one-line install's agent says: $v"; return 1; }
    say "  one-line install: $v"
    readme controller || { journal wisp.service; return 1; }
    [ "$(inside systemctl is-active wisp.service)" = active ] || { say "wisp.service is not active"; journal wisp.service; return 1; }
    local pid user
    pid=$(inside systemctl show -p MainPID --value wisp.service)
    user=$(inside ps -o user= -p "$pid" | tr -d ' ')
    [ -n "$user" ] && [ "$user" != root ] || { say "the controller runs as '$user'"; return 1; }
    say "  controller: pid $pid, user $user"
    local secret identity
    secret=$(ctl node secret builder1) || return 1
    identity=$(grep -oE 'sha256:[0-9a-f]{64}' "$WORK/controller.out" | head -n 1)
    [ -n "$identity" ] || { say "wisp node add printed no instance identity:"; cat "$WORK/controller.out" >&2; return 1; }
    readme agent URL=https://127.0.0.1:8080/ NAME=builder1 "SECRET=$secret" "IDENTITY=$identity" ||
        { journal wisp-agent.service; return 1; }
    wait_node_online builder1 || { journal wisp-agent.service; return 1; }
    ctl nodes | sed 's/^/  /'
}

wait_node_online() {
    local i
    for ((i = 0; i < ${2:-300}; i++)); do
        ctl nodes 2>/dev/null | awk -F'\t' -v n="$1" '$1 == n && $2 == "online" { f = 1 } END { exit !f }' && return 0
        sleep 0.2
    done
    say "node $1 is not online:"
    ctl nodes >&2 || true
    return 1
}

# run_pipeline FILE OUT: `wisp run FILE --follow` in the container; returns its exit code.
run_pipeline() {
    local rc=0
    inside cp "/mnt/share/$1" "/root/$1"
    timeout 300 nsenter -t "$LEADER" -m -u -i -n -p -- /usr/local/bin/wisp run "/root/$1" --follow --data "$DATA" \
        >"$2" 2>&1 || rc=$?
    return "$rc"
}

# ---- c. a build as the dedicated user ----
test_build_as_service_user() {
    cat >"$WORK/share/checks.yaml" <<'EOF'
name: checks
agent: {label: linux}
steps:
  - sh: |
      echo "uid=$(id -u) home=$HOME pwd=$PWD"
      test "$(id -u)" != 0 || { echo "FAIL: runs as root"; exit 1; }
      # DynamicUser= keeps the state under /var/lib/private, /var/lib/wisp-agent a link to it.
      case $PWD in "$(readlink -f /var/lib/wisp-agent)"/*) ;; *) echo "FAIL: work dir $PWD"; exit 1 ;; esac
      test "$HOME" = /var/lib/wisp-agent || { echo "FAIL: HOME=$HOME"; exit 1; }
      echo cached >"$HOME/.cache-probe" || { echo "FAIL: HOME not writable"; exit 1; }
      echo built >artifact.txt || { echo "FAIL: workspace not writable"; exit 1; }
      echo tmp >/tmp/probe || { echo "FAIL: /tmp not writable"; exit 1; }
      if touch /usr/probe 2>/dev/null || touch /etc/probe 2>/dev/null; then echo "FAIL: system writable"; exit 1; fi
      grep -q '^NoNewPrivs:[[:space:]]*1' /proc/self/status || { echo "FAIL: may gain privileges"; exit 1; }
      if env | grep -q 'JENKINS_SECRET\|WISP_SECRET'; then echo "FAIL: secret in env"; exit 1; fi
      echo all-checks-passed
EOF
    local rc=0
    run_pipeline checks.yaml "$WORK/checks.out" || rc=$?
    [ "$rc" = 0 ] && grep -q all-checks-passed "$WORK/checks.out" ||
        { say "the build failed ($rc):"; tail -n 20 "$WORK/checks.out" >&2; journal wisp-agent.service; return 1; }
    grep 'uid=' "$WORK/checks.out" | sed 's/^/  /'
}

# ---- d. Restart=always ----
test_restart_after_kill() {
    local before after i
    before=$(inside systemctl show -p MainPID --value wisp-agent.service)
    inside systemctl kill -s KILL wisp-agent.service
    for ((i = 0; i < 300; i++)); do
        after=$(inside systemctl show -p MainPID --value wisp-agent.service)
        [ "$after" != 0 ] && [ "$after" != "$before" ] && break
        sleep 0.1
    done
    [ "$after" != 0 ] && [ "$after" != "$before" ] || { say "the agent was not restarted (MainPID $after)"; journal wisp-agent.service; return 1; }
    wait_node_online builder1 || return 1
    cat >"$WORK/share/again.yaml" <<'EOF'
name: again
agent: {label: linux}
steps: [{sh: echo back-after-kill}]
EOF
    run_pipeline again.yaml "$WORK/again.out" && grep -q back-after-kill "$WORK/again.out" ||
        { say "no build after the restart:"; tail -n 20 "$WORK/again.out" >&2; return 1; }
}

# ---- e. upgrade in place ----
test_upgrade_by_reload() {
    local pid_before pid_after rc=0 i
    # The check is the process: the same main PID now runs the new file (its inode is that of
    # /proc/PID/exe), and the build goes on. (tests/upgrade.rs replaces an agent of the previous
    # commit by this one and checks the version the node reports.)
    cat >"$WORK/share/long.yaml" <<'EOF'
name: long
agent: {label: linux}
steps:
  - sh: |
      i=0
      while [ $i -lt 40 ]; do echo "line $i"; i=$((i + 1)); sleep 0.25; done
      echo long-done
EOF
    pid_before=$(inside systemctl show -p MainPID --value wisp-agent.service)
    inside cp /mnt/share/long.yaml /root/long.yaml
    timeout 300 nsenter -t "$LEADER" -m -u -i -n -p -- /usr/local/bin/wisp run /root/long.yaml --follow --data "$DATA" \
        >"$WORK/long.out" 2>&1 &
    local run=$!
    for ((i = 0; i < 200; i++)); do grep -q 'line 5' "$WORK/long.out" 2>/dev/null && break; sleep 0.1; done
    grep -q 'line 5' "$WORK/long.out" || { say "the long build did not start:"; cat "$WORK/long.out" >&2; wait "$run" || true; return 1; }
    readme upgrade || rc=1
    wait "$run" || rc=$?
    pid_after=$(inside systemctl show -p MainPID --value wisp-agent.service)
    [ "$pid_after" = "$pid_before" ] || { say "the main PID changed: $pid_before -> $pid_after"; rc=1; }
    local inode_now inode_exe
    inode_now=$(inside stat -c %i /usr/local/bin/wisp-agent)
    inode_exe=$(inside stat -L -c %i "/proc/$pid_after/exe" 2>/dev/null || echo none)
    [ "$inode_now" = "$inode_exe" ] || { say "the agent still runs the old binary (inode $inode_exe, file $inode_now)"; rc=1; }
    for i in $(seq 0 39); do
        grep -qx "line $i" "$WORK/long.out" || { say "line $i is missing from the log"; rc=1; break; }
    done
    grep -q long-done "$WORK/long.out" || rc=1
    [ "$rc" = 0 ] || { tail -n 20 "$WORK/long.out" >&2; journal wisp-agent.service 40; }
    return "$rc"
}

# ---- f. stop ----
test_stop() {
    local t0=$SECONDS i
    inside systemctl stop wisp-agent.service || { say "systemctl stop failed"; return 1; }
    [ $((SECONDS - t0)) -le 30 ] || { say "the stop took $((SECONDS - t0)) s"; return 1; }
    for ((i = 0; i < 300; i++)); do
        ctl nodes 2>/dev/null | awk -F'\t' '$1 == "builder1" && $2 == "online" { f = 1 } END { exit f }' && return 0
        sleep 0.2
    done
    say "builder1 is still online after the stop"
    return 1
}

if check "a: the README's install blocks under systemd (nspawn, a clean root): controller up, agent online" \
    test_readme_install; then
    check "b: systemd-analyze verify accepts the installed wisp.service and wisp-agent.service" test_verify || true
    check "c: a build runs as the dedicated user, HOME and work dir in /var/lib/wisp-agent, system read-only" \
        test_build_as_service_user || true
    check "d: killed with SIGKILL, Restart=always brings the agent back" test_restart_after_kill || true
    check "e: the README's upgrade mid-build: same PID runs the new file, build complete" \
        test_upgrade_by_reload || true
    check "f: systemctl stop stops the agent and the node goes offline" test_stop || true
fi
inside journalctl --no-pager >"$WORK/journal.txt" 2>&1 || true

printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
