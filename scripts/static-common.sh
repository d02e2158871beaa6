# Shared helpers for the static-agent scripts (build-static, check-static, build-image,
# test-static, bench-static). Sourced, not run; the caller has already done `cd` to the repo root
# and `set -euo pipefail`.

# The three targets the static agent ships for, and the arch names container tools use for them.
STATIC_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
# The armv7 musl standard library is only on the package mirror for this toolchain (see
# shared/docs/recipes.md); the other targets use the project's default toolchain.
ARMV7_TOOLCHAIN=1.94.1

# Where cargo puts its output (CARGO_TARGET_DIR is honoured) and where the static copies go.
TARGET_DIR=${CARGO_TARGET_DIR:-target}
STATIC_DIR=${WISP_STATIC_DIR:-$TARGET_DIR/static}

say() { printf '%s\n' "$*" >&2; }
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# Size budget in bytes for a target's binary.
size_budget() {
    case $1 in
        x86_64-unknown-linux-musl) echo 2097152 ;;       # 2.0 MiB
        aarch64-unknown-linux-musl) echo 1887436 ;;      # 1.8 MiB (1887436.8)
        armv7-unknown-linux-musleabihf) echo 1572864 ;;  # 1.5 MiB
        *) die "no size budget for target $1" ;;
    esac
}

# Container arch (TARGETARCH) for a target, and back.
arch_of_target() {
    case $1 in
        x86_64-unknown-linux-musl) echo amd64 ;;
        aarch64-unknown-linux-musl) echo arm64 ;;
        armv7-unknown-linux-musleabihf) echo arm ;;
        *) die "unknown target $1" ;;
    esac
}
target_of_arch() {
    case $1 in
        amd64 | x86_64) echo x86_64-unknown-linux-musl ;;
        arm64 | aarch64) echo aarch64-unknown-linux-musl ;;
        arm | armv7 | armhf) echo armv7-unknown-linux-musleabihf ;;
        *) die "unknown arch $1 (use amd64, arm64 or arm)" ;;
    esac
}

# Validate a target name against STATIC_TARGETS.
check_target() {
    local t
    for t in "${STATIC_TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done
    die "unknown target $1 (known: ${STATIC_TARGETS[*]})"
}

# Human size: 1234567 -> "1.18 MiB".
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# Install the Debian packages given that are missing; quiet and without `apt-get update` when all
# are present already.
apt_ensure() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    local log
    log=$(mktemp)
    "${sudo[@]}" apt-get update -qq >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; return 1; }
    # Packages such as nginx start their service on install; nothing here wants that.
    local policy=/usr/sbin/policy-rc.d rc=0
    local own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod +x "$policy"
        own_policy=1
    fi
    "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >"$log" 2>&1 || rc=$?
    [ "$own_policy" = 0 ] || "${sudo[@]}" rm -f "$policy"
    [ "$rc" = 0 ] || { cat "$log" >&2; say "apt-get install ${missing[*]} failed"; }
    rm -f "$log"
    return "$rc"
}

# The container engine: podman (installed and configured as recipes.md says if no engine answers),
# or a docker whose daemon answers.
container_engine() {
    if [ -n "${WISP_CONTAINER_ENGINE:-}" ]; then
        echo "$WISP_CONTAINER_ENGINE"
        return
    fi
    if ! command -v podman >/dev/null && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        echo docker
        return
    fi
    apt_ensure podman runc busybox-static
    # crun (podman's default) fails here on setrlimit and hybrid cgroups: use runc and cgroupfs.
    local conf=/etc/containers/containers.conf
    if ! grep -qs '^runtime *= *"runc"' "$conf"; then
        say "writing $conf (runc, cgroupfs, explicit ulimits)"
        mkdir -p /etc/containers
        cat >"$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
    fi
    echo podman
}

# ---- A controller and agents on this machine, for the tests and benchmarks ----
# The caller sets WORK (a temp dir it removes) and calls harness_cleanup from its EXIT trap.

WISP=${WISP_BIN:-$TARGET_DIR/debug/wisp}
HARNESS_PIDS=()
HARNESS_CONTAINERS=()

# Kill what the harness started (agents first, then the controller) and remove its containers.
harness_cleanup() {
    local c p i
    for c in ${HARNESS_CONTAINERS[@]+"${HARNESS_CONTAINERS[@]}"}; do
        "$ENGINE" rm -f -t 0 "$c" >/dev/null 2>&1 || true
    done
    for ((i = ${#HARNESS_PIDS[@]} - 1; i >= 0; i--)); do
        kill "${HARNESS_PIDS[i]}" 2>/dev/null || true
    done
    for p in ${HARNESS_PIDS[@]+"${HARNESS_PIDS[@]}"}; do
        wait "$p" 2>/dev/null || true
    done
}

# Start `wisp serve` on ephemeral ports of 127.0.0.1 with its data in $WORK/ctl; sets CTL (the data
# dir), URL (http://127.0.0.1:PORT/) and AGENT_ADDR (127.0.0.1:PORT). Plain HTTP (`--no-tls`): these
# scripts measure and check the static binaries; TLS itself is tested in tests/tls.rs, and the wss
# benchmark puts nginx in front for TLS.
start_controller() {
    if [ ! -x "$WISP" ]; then
        say "$WISP is missing: run \`cargo build --bins\` first (or set WISP_BIN)"
        return 1
    fi
    CTL=$WORK/ctl
    mkdir -p "$CTL"
    # CTL_SETSID=1: in a session of its own (setsid execs in place, so $! stays the controller's).
    ${CTL_SETSID:+setsid} "$WISP" serve --data "$CTL" --http-port 0 --agent-port 0 --bind 127.0.0.1 --no-tls \
        2>"$WORK/controller.log" &
    CTL_PID=$!
    HARNESS_PIDS+=("$CTL_PID")
    local i
    for ((i = 0; i < 200; i++)); do
        if [ -s "$CTL/listening" ] && grep -q '^agent ' "$CTL/listening"; then
            URL=http://$(sed -n 's/^http //p' "$CTL/listening")/
            AGENT_ADDR=$(sed -n 's/^agent //p' "$CTL/listening")
            return 0
        fi
        kill -0 "$CTL_PID" 2>/dev/null || break
        sleep 0.1
    done
    say "the controller did not start; its log:"
    tail -20 "$WORK/controller.log" >&2
    return 1
}

# Add node NAME (labels: linux NAME) and write its secret to $WORK/NAME.secret; prints the secret.
add_node() {
    "$WISP" node add "$1" --labels "linux $1" --executors 1 --data "$CTL" >"$WORK/$1.add" 2>&1 || {
        say "wisp node add $1 failed:"
        cat "$WORK/$1.add" >&2
        return 1
    }
    "$WISP" node secret "$1" --data "$CTL" >"$WORK/$1.secret" || return 1
    cat "$WORK/$1.secret"
}

# Whether node NAME is online now.
node_online() {
    "$WISP" nodes --data "$CTL" 2>/dev/null | awk -F'\t' -v n="$1" '$1 == n && $2 == "online" { f = 1 } END { exit !f }'
}

# Wait until node NAME is online (default 30 s); fails naming PID's fate if it dies first.
wait_online() {
    local name=$1 pid=${2:-} secs=${3:-30} i
    for ((i = 0; i < secs * 10; i++)); do
        node_online "$name" && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            say "the agent of $name (pid $pid) exited before coming online"
            return 1
        fi
        sleep 0.1
    done
    say "node $name was not online after ${secs}s"
    return 1
}

# Run a one-step pipeline on node NAME: run_step NAME OUTFILE SCRIPT. Returns `wisp run`'s exit code
# (0 success, 1 failure, 2 aborted; 124 if it took over WISP_STEP_TIMEOUT seconds, default 120).
run_step() {
    local name=$1 out=$2 script=$3 yaml
    yaml=$WORK/$name.$RANDOM.yaml
    {
        printf 'name: %s\nagent:\n  label: "%s"\nsteps:\n  - sh: |\n' "$name" "$name"
        printf '%s\n' "$script" | sed 's/^/      /'
    } >"$yaml"
    local rc=0
    timeout "${WISP_STEP_TIMEOUT:-120}" "$WISP" run "$yaml" --follow --data "$CTL" >"$out" 2>&1 || rc=$?
    return "$rc"
}

# ---- shared by the benchmark scripts ----
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
now_ns() { date +%s%N; }

# Start the agent ($AGENT) for node NAME over TRANSPORT; sets APID. Transports: ws, tcp (to $URL,
# $AGENT_ADDR), wss (nginx from setup_wss), pinned (WebSocket to $PIN_URL, a TLS controller whose
# identity $PIN_FP the agent pins).
start_agent() {
    local name=$1 transport=$2 how
    case $transport in
        ws) how=(--url "$URL" --websocket) ;;
        tcp) how=(--url "$URL" --direct "$AGENT_ADDR") ;;
        wss) how=(--url "$WSS_URL" --websocket --cert "$WSS_CA") ;;
        pinned) how=(--url "$PIN_URL" --websocket --instance-identity "$PIN_FP") ;;
    esac
    mkdir -p "$WORK/$name"
    "$AGENT" "${how[@]}" --name "$name" --secret "@$WORK/$name.secret" --work-dir "$WORK/$name" \
        >"$WORK/$name.log" 2>&1 &
    APID=$!
    HARNESS_PIDS+=("$APID")
}

# wss for the benchmarks: nginx terminating TLS in front of the controller's HTTP port ($URL), with a
# throw-away CA the agent trusts with --cert. Sets WSS_URL and WSS_CA, or WSS_NOTE and fails.
WSS_URL=
WSS_NOTE=
setup_wss() {
    apt_ensure nginx openssl || { WSS_NOTE="nginx could not be installed"; return 1; }
    local d=$WORK/tls port
    mkdir -p "$d"
    # A CA and a certificate for 127.0.0.1 signed by it; the agent trusts the CA with --cert.
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=wisp-bench-ca -keyout "$d/ca.key" \
        -out "$d/ca.pem" -addext basicConstraints=critical,CA:TRUE >/dev/null 2>&1 &&
        openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$d/key.pem" -out "$d/req.pem" \
            >/dev/null 2>&1 &&
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$d/ext" &&
        openssl x509 -req -in "$d/req.pem" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
            -extfile "$d/ext" -out "$d/cert.pem" >/dev/null 2>&1 || { WSS_NOTE="openssl failed"; return 1; }
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$d/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $d/body;
    proxy_temp_path $d/proxy;
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $d/cert.pem;
        ssl_certificate_key $d/key.pem;
        location / {
            proxy_pass ${URL};
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host \$host:\$server_port;
            proxy_read_timeout 1h;
            proxy_buffering off;
        }
    }
}
CONF
    nginx -c "$d/nginx.conf" -p "$d" >"$d/stderr" 2>&1 &
    HARNESS_PIDS+=("$!")
    local i
    for ((i = 0; i < 50; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            WSS_URL=https://127.0.0.1:$port/
            WSS_CA=$d/ca.pem
            return 0
        fi
        sleep 0.1
    done
    WSS_NOTE="nginx did not start: $(tail -1 "$d/error.log" 2>/dev/null)"
    return 1
}
