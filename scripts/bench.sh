#!/usr/bin/env bash
# Side-by-side benchmarks (issue 6), written into BENCHMARKS.md between <!-- bench:begin --> and
# <!-- bench:end --> (the static section is kept):
#   1. footprint: agent and controller idle RSS, agent peak RSS while streaming; buildbot-worker and
#      buildbot master idle RSS;
#   2. streaming throughput of S MiB step output to the stored log over TCP, WebSocket, WebSocket+TLS
#      (the controller's own TLS), plus TCP with a live log reader and WSS through nginx, against a
#      raw loopback pipe (socat into a file) in the same run, and against Buildbot's log streaming;
#   3. dispatch latency (submit of a one-step `true` build to its result) with 1 and 50 agents,
#      against Buildbot (REST force to the build's completion event on /sse);
#   4. trivial builds/s with 100 agents;
#   5. controller scale: N idle agents from one load-generator process (examples/loadgen.rs, the real
#      handshake and pings over TCP): controller RSS, idle CPU, dispatch latency at N.
#
#   scripts/bench.sh [--smoke | --buildbot-only]
#
# --smoke: tiny sizes, no Buildbot, a few seconds per measurement; prints the section, never writes
# BENCHMARKS.md, and fails if any measurement fails.
# --buildbot-only: only the Buildbot measurements (no cargo build, no wisp); prints their figures,
# never writes BENCHMARKS.md, fails if they fail. Sizes: WISP_BB_STREAM_MIB, WISP_BB_LAT_BUILDS.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh
export CARGO_TERM_COLOR=never

smoke=0 bb_only=0
cmdline="${WISP_BENCH_RUNS:+WISP_BENCH_RUNS=$WISP_BENCH_RUNS }scripts/bench.sh${*:+ $*}"
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) smoke=1 ;;
        --buildbot-only) bb_only=1 ;;
        -h | --help) sed -n '2,20s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done
[ "$smoke$bb_only" != 11 ] || die "--smoke and --buildbot-only exclude each other"

if [ "$smoke" = 1 ]; then
    stream_mib=16 runs=2 lat_builds=20 tput_builds=40 agents_many=10 agents_50=5 scale_ns=(50)
    scale_lat_builds=10 idle_cpu_s=2 ping_wait_s=0 storm_n=50 storm_builds=3 storm_probe_s=5
    threads_ns=(1 2) threads_agents=2 threads_mib=4
else
    stream_mib=1024 runs=${WISP_BENCH_RUNS:-3} lat_builds=200 tput_builds=3000 agents_many=100 agents_50=50
    # Idle CPU is measured over one whole ping interval (the controller's default, 15 s), once the
    # first link's first ping is due: every link then pings and is pinged once within it.
    scale_ns=(1000 5000 10000) scale_lat_builds=100 idle_cpu_s=15 ping_wait_s=16
    storm_n=10000 storm_builds=100 storm_probe_s=20
    threads_ns=(1 2 4) threads_agents=8 threads_mib=128
fi
BB_STREAM_MIB=${WISP_BB_STREAM_MIB:-64}
BB_LAT_BUILDS=${WISP_BB_LAT_BUILDS:-20}
LINE=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 12000 ] || [ "$smoke" = 1 ] || [ "$bb_only" = 1 ] || die "cannot raise the fd limit (now $(ulimit -n))"

ROOT_WORK=$(mktemp -d "${TMPDIR:-/tmp}/wisp-bench.XXXXXX")
WORK=$ROOT_WORK
ENGINE=true
EXTRA_PIDS=()
cleanup() {
    local p
    for p in ${EXTRA_PIDS[@]+"${EXTRA_PIDS[@]}"}; do kill "$p" 2>/dev/null || true; done
    for p in ${EXTRA_PIDS[@]+"${EXTRA_PIDS[@]}"}; do wait "$p" 2>/dev/null || true; done
    harness_cleanup
    rm -rf "$ROOT_WORK"
}
trap cleanup EXIT

# ================= Buildbot (run after the wisp measurements, or alone with --buildbot-only) =================
# Debian's buildbot and buildbot-worker; the master runs from a venv over the system site-packages
# that adds the buildbot-www wheel (Debian does not package it) for its REST API and /sse. Builds
# are forced over REST and their completion read from /sse by scripts/bb-drive.py.
BB_NOTE=
bb_worker_kb= bb_master_kb= bb_tput= bb_lat= bb_worker_peak=
BB_VENV=$(realpath -m "$TARGET_DIR")/bench-venv
bb_venv() { # the venv with buildbot-www 3.7.0, made once and kept in the target dir
    "$BB_VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("buildbot-www") != "3.7.0")' \
        2>/dev/null && return 0
    say "making $BB_VENV (buildbot-www 3.7.0 from PyPI)"
    rm -rf "$BB_VENV"
    # /usr/bin/python3: the interpreter Debian's buildbot is installed for (`python3` may be another).
    /usr/bin/python3 -m venv --system-site-packages "$BB_VENV" &&
        "$BB_VENV/bin/pip" install -q --disable-pip-version-check buildbot-www==3.7.0
}
run_buildbot() {
    apt_ensure buildbot buildbot-worker python3-venv ||
        { BB_NOTE="apt-get install buildbot buildbot-worker python3-venv failed"; return 1; }
    local d=$WORK/bb pb www bb drv
    mkdir -p "$d"
    bb_venv >"$d/venv.log" 2>&1 || { BB_NOTE="no venv with buildbot-www: $(tail -1 "$d/venv.log")"; return 1; }
    bb=("$BB_VENV/bin/python" /usr/bin/buildbot)
    pb=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    www=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    drv=("$BB_VENV/bin/python" scripts/bb-drive.py "http://127.0.0.1:$www/")
    bb_stop() {
        buildbot-worker stop "$d/worker" >/dev/null 2>&1 || true
        "${bb[@]}" stop "$d/master" >/dev/null 2>&1 || true
    }
    bb_fail() { BB_NOTE=$1; bb_stop; }
    "${bb[@]}" create-master -q "$d/master" >"$d/create.log" 2>&1 ||
        { BB_NOTE="create-master failed: $(tail -1 "$d/create.log")"; return 1; }
    # authz is the default (no rules): anonymous may force.
    cat >"$d/master/master.cfg" <<CFG
from buildbot.plugins import worker, schedulers, util, steps
c = BuildmasterConfig = {}
c['workers'] = [worker.Worker("w1", "pass")]
c['protocols'] = {'pb': {'port': "tcp:$pb:interface=127.0.0.1"}}
c['schedulers'] = [
    schedulers.ForceScheduler(name="trivial", builderNames=["trivial"]),
    schedulers.ForceScheduler(name="stream", builderNames=["stream"]),
]
c['builders'] = [
    util.BuilderConfig(name="trivial", workernames=["w1"], factory=util.BuildFactory([steps.ShellCommand(command="true")])),
    util.BuilderConfig(name="stream", workernames=["w1"], factory=util.BuildFactory([steps.ShellCommand(
        command="yes $LINE | head -c $((BB_STREAM_MIB * 1048576))", timeout=1200)])),
]
c['title'] = "bench"
c['buildbotURL'] = "http://127.0.0.1:$www/"
c['www'] = dict(port="tcp:$www:interface=127.0.0.1", plugins={})
c['db'] = {'db_url': "sqlite:///state.sqlite"}
CFG
    "${bb[@]}" start "$d/master" >"$d/master.start" 2>&1 ||
        { bb_fail "master did not start: $(tail -2 "$d/master/twistd.log")"; return 1; }
    local mpid wpid
    mpid=$(cat "$d/master/twistd.pid")
    EXTRA_PIDS+=("$mpid")
    buildbot-worker create-worker -q "$d/worker" "127.0.0.1:$pb" w1 pass >/dev/null
    buildbot-worker start "$d/worker" >"$d/worker.start" 2>&1 || { bb_fail "worker did not start"; return 1; }
    wpid=$(cat "$d/worker/twistd.pid")
    EXTRA_PIDS+=("$wpid")
    "${drv[@]}" wait-worker w1 60 2>"$d/drive.err" ||
        { bb_fail "worker w1 did not connect: $(tail -1 "$d/drive.err")"; return 1; }
    sleep 3
    bb_worker_kb=$(status_kb "$wpid" VmRSS) bb_master_kb=$(status_kb "$mpid" VmRSS)
    local lats
    lats=$("${drv[@]}" force trivial trivial "$BB_LAT_BUILDS" 2>"$d/drive.err") ||
        { bb_fail "trivial builds: $(tail -1 "$d/drive.err")"; return 1; }
    [ "$(wc -l <<<"$lats")" = "$BB_LAT_BUILDS" ] || { bb_fail "trivial builds: $(wc -l <<<"$lats") results"; return 1; }
    bb_lat=$(sort -g <<<"$lats" | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)], a[int(NR * 0.99 + 0.999)], a[1], a[NR] }')
    # The stream build, the worker's RSS sampled every 0.1 s while the driver waits for it.
    "${drv[@]}" stream stream stream $((BB_STREAM_MIB * 1048576)) >"$d/stream.out" 2>"$d/drive.err" &
    local dp=$! wpeak=0 cur
    while kill -0 "$dp" 2>/dev/null; do
        cur=$(status_kb "$wpid" VmRSS)
        [ "${cur:-0}" -gt "$wpeak" ] && wpeak=$cur
        sleep 0.1
    done
    wait "$dp" || { bb_fail "stream build: $(tail -1 "$d/drive.err")"; return 1; }
    bb_tput=$(awk -v s="$(cat "$d/stream.out")" -v m="$BB_STREAM_MIB" 'BEGIN { if (s > 0) printf "%.1f", m / s }')
    [ -n "$bb_tput" ] || { bb_fail "stream build: no elapsed time from bb-drive.py"; return 1; }
    bb_worker_peak=$wpeak
    bb_stop
}
if [ "$bb_only" = 1 ]; then
    run_buildbot || die "Buildbot: $BB_NOTE"
    say "Buildbot: buildbot-worker idle RSS $bb_worker_kb kB, master idle RSS $bb_master_kb kB"
    say "Buildbot: dispatch latency p50 p99 min max = $bb_lat ms ($BB_LAT_BUILDS builds)"
    say "Buildbot: streaming $bb_tput MiB/s ($BB_STREAM_MIB MiB), buildbot-worker peak RSS $bb_worker_peak kB"
    exit 0
fi

# ---- tools and binaries ----
apt_ensure socat nginx openssl python3 || die "apt-get failed"
# Smoke mode only checks that every measurement runs: it takes the debug build the tests made
# (a release build with LTO takes minutes of CI time and would be measured by nothing).
if [ "$smoke" = 1 ]; then build=(--profile dev) built=debug; else build=(--release) built=release; fi
say "building $built binaries, the load generator and the static agent"
cargo build "${build[@]}" --bins --example loadgen >&2
# The agent measured is the one wisp ships: the static musl binary, built now so it is never a
# stale one left from an earlier build (and never the glibc build, which is twice its idle RSS).
scripts/build-static.sh x86_64-unknown-linux-musl >&2 || die "could not build the static agent"
WISP=$TARGET_DIR/$built/wisp
AGENT=$STATIC_DIR/x86_64-unknown-linux-musl/wisp-agent
LOADGEN=$TARGET_DIR/$built/examples/loadgen

tck=$(getconf CLK_TCK)
# stats: numbers on stdin -> "median min max"
stats() { sort -g | awk '{ a[NR] = $1 } END { if (!NR) exit 1; m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; print m, a[1], a[NR] }'; }
spread() { awk -v m="$1" -v lo="$2" -v hi="$3" -v f="${4:-%.1f}" 'BEGIN { printf f " (" f "–" f ")", m, lo, hi }'; }
# per_gib TICKS0 TICKS1: CPU seconds per GiB of a stream of $stream_mib MiB.
per_gib() { awk -v a="$1" -v b="$2" -v t="$tck" -v m="$stream_mib" 'BEGIN { printf "%.2f", (b - a) / t / (m / 1024) }'; }
kib_mib() { awk -v k="$1" 'BEGIN { printf "%.2f MiB", k / 1024 }'; }

add_labeled() { # NAME LABELS -> secret in $WORK/NAME.secret
    "$WISP" node add "$1" --labels "$2" --executors 1 --data "$CTL" >/dev/null || die "node add $1"
    "$WISP" node secret "$1" --data "$CTL" >"$WORK/$1.secret" || die "node secret $1"
}
online_count() { "$WISP" nodes --data "${1:-$CTL}" 2>/dev/null | awk -F'\t' '$2 == "online"' | wc -l; }
wait_count() { # N: wait until N nodes are online (60 s)
    local i
    for ((i = 0; i < 600; i++)); do
        [ "$(online_count)" -ge "$1" ] && return 0
        sleep 0.1
    done
    die "only $(online_count) of $1 nodes online after 60 s"
}

GEN="yes $LINE | head -c $((stream_mib * 1048576))"

# ================= wisp: footprint, throughput, latency, builds/s =================
start_controller || die "the controller did not start"
say "controller at $URL (agent port $AGENT_ADDR)"
setup_wss || die "$WSS_NOTE"
sleep 1
ctl_idle_kb=$(status_kb "$CTL_PID" VmRSS)

declare -A tput vs_raw idle_rss peak_rss agent_cpu ctl_cpu
raw_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
raw_samples=()
# raw_once: the same bytes through a raw loopback pipe (socat copying 128 KiB at a time, 16 times
# its default, into a file); prints MiB/s. Run right before each wisp run, so each ratio compares
# two runs made under the same conditions (this machine's speed drifts by a third between
# minutes). Every timed run starts after a `sync`, so the last run's file is not written back
# to disk during the next one.
raw_once() {
    local sp t0 t1
    rm -f "$WORK/raw.out"
    sync
    socat -u -b 131072 "TCP-LISTEN:$raw_port,bind=127.0.0.1,reuseaddr" "CREATE:$WORK/raw.out" &
    sp=$!
    local i hex
    hex=$(printf '%04X' "$raw_port")
    for ((i = 0; i < 250; i++)); do # until socat listens (state 0A in /proc/net/tcp), 5 s at most
        awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' /proc/net/tcp &&
            break
        sleep 0.02
    done
    t0=$(now_ns)
    bash -c "$GEN" | socat -u -b 131072 - "TCP:127.0.0.1:$raw_port"
    wait "$sp"
    t1=$(now_ns)
    [ "$(stat -c %s "$WORK/raw.out")" = $((stream_mib * 1048576)) ] || die "raw pipe lost bytes"
    rm -f "$WORK/raw.out"
    awk -v a="$t0" -v b="$t1" -v m="$stream_mib" 'BEGIN { printf "%.1f", m / ((b - a) / 1e9) }'
}

# tls_ctl DATA HTTP_PORT AGENT_PORT [SERVE_OPTION...]: start a controller on its defaults (TLS on
# both ports, a self-signed identity) with data dir DATA (port 0: any free one; its log DATA.log)
# and wait until it listens; sets TLS_PID, and PIN_URL and PIN_FP for `start_agent NAME pinned`.
tls_ctl() {
    local data=$1 http=$2 agent=$3 i
    shift 3
    mkdir -p "$data"
    rm -f "$data/listening"
    "$WISP" serve --data "$data" --http-port "$http" --agent-port "$agent" --bind 127.0.0.1 "$@" 2>>"$data.log" &
    TLS_PID=$!
    HARNESS_PIDS+=("$TLS_PID")
    for ((i = 0; i < 600; i++)); do
        if grep -q '^url ' "$data/listening" 2>/dev/null; then
            PIN_URL=$(sed -n 's/^url //p' "$data/listening")
            PIN_FP=$(cat "$data/fingerprint")
            return 0
        fi
        kill -0 "$TLS_PID" 2>/dev/null || break
        sleep 0.05
    done
    say "the TLS controller did not start: $(tail -3 "$data.log")"
    return 1
}

# start_loadgen WHAT IDLE_OPTION...: `loadgen idle` in the background ($WORK/loadgen.out, .err),
# waited for until all its agents are connected (300 s); sets LG, LG_T0 (when it started) and
# LG_CONN (seconds until all were connected).
start_loadgen() {
    local what=$1 i
    shift
    LG_T0=$(now_ns)
    "$LOADGEN" idle "$@" >"$WORK/loadgen.out" 2>"$WORK/loadgen.err" &
    LG=$!
    HARNESS_PIDS+=("$LG")
    for ((i = 0; i < 3000; i++)); do
        grep -qs '^connected' "$WORK/loadgen.out" && break
        kill -0 "$LG" 2>/dev/null || die "loadgen $what died: $(tail -3 "$WORK/loadgen.err")"
        sleep 0.1
    done
    grep -q '^connected' "$WORK/loadgen.out" || die "loadgen $what did not connect in 300 s"
    LG_CONN=$(awk -v a="$LG_T0" -v b="$(now_ns)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
}

# idle_cpu PID: PID's CPU in % of a core over idle_cpu_s, from ping_wait_s after LG_T0 on (until
# the first ping is due, the agents only sit there).
idle_cpu() {
    local wait_s c0 c1
    sleep 2
    wait_s=$(awk -v a="$LG_T0" -v b="$(now_ns)" -v w="$ping_wait_s" 'BEGIN { d = w - (b - a) / 1e9; printf "%.1f", (d > 0 ? d : 0) }')
    sleep "$wait_s"
    c0=$(cpu_ticks "$1")
    sleep "$idle_cpu_s"
    c1=$(cpu_ticks "$1")
    awk -v a="$c0" -v b="$c1" -v t="$tck" -v s="$idle_cpu_s" 'BEGIN { printf "%.1f", 100 * (b - a) / t / s }'
}

# The controller's own TLS (its default; the main bench controller runs --no-tls): a second
# controller for the wss row, the agent pinning its self-signed identity.
TLS_CTL=$WORK/ctl-tls
tls_ctl "$TLS_CTL" 0 0 || die "the TLS controller for the wss row did not start"

# stream_stored NAME: stream $GEN as a build on node NAME of the controller with data dir $CTL and
# wait for its result (`wisp run --wait`: step stdout to the stored log, no reader attached); fails
# unless every byte is stored.
stream_stored() {
    local yaml=$WORK/$1.$RANDOM.yaml out
    printf 'name: %s\nagent:\n  label: "%s"\nsteps:\n  - sh: %s\n' "$1" "$1" "$GEN" >"$yaml"
    out=$(timeout 600 "$WISP" run "$yaml" --wait --data "$CTL" 2>&1) || die "streaming on $1 failed: $out"
    grep -q "SUCCESS ($((stream_mib * 1048576)) output bytes stored)" <<<"$out" || die "streaming on $1: $out"
}

# Rows: tcp, ws, wss (the controller's TLS) to the stored log; tcp with a live `wisp run --follow`
# reader (the log streamed back out while it is stored); wss through nginx terminating TLS.
for tr in tcp ws wss tcp_follow wss_nginx; do
    name=stream_$tr
    main_ctl=$CTL
    cpid=$CTL_PID
    [ "$tr" != wss ] || { CTL=$TLS_CTL; cpid=$TLS_PID; }
    add_labeled "$name" "$name"
    case $tr in
        wss) start_agent "$name" pinned ;;
        tcp_follow) start_agent "$name" tcp ;;
        wss_nginx) start_agent "$name" wss ;;
        *) start_agent "$name" "$tr" ;;
    esac
    wait_online "$name" "$APID" || die "agent over $tr did not come online: $(tail -3 "$WORK/$name.log")"
    sleep 1
    idle_rss[$tr]=$(status_kb "$APID" VmRSS)
    s=() q=() cpu=() ccpu=()
    for ((r = 0; r < runs; r++)); do
        raw=$(raw_once)
        raw_samples+=("$raw")
        sync
        a0=$(cpu_ticks "$APID") k0=$(cpu_ticks "$cpid")
        t0=$(now_ns)
        if [ "$tr" = tcp_follow ]; then
            rc=0
            WISP_STEP_TIMEOUT=600 run_step "$name" /dev/null "$GEN" || rc=$?
            [ "$rc" = 0 ] || die "streaming over $tr failed (wisp run exit $rc)"
        else
            stream_stored "$name"
        fi
        t1=$(now_ns)
        # The agent's and the controller's CPU (user + system) per GiB streamed.
        cpu+=("$(per_gib "$a0" "$(cpu_ticks "$APID")")")
        ccpu+=("$(per_gib "$k0" "$(cpu_ticks "$cpid")")")
        s+=("$(awk -v a="$t0" -v b="$t1" -v m="$stream_mib" 'BEGIN { printf "%.1f", m / ((b - a) / 1e9) }')")
        q+=("$(awk -v w="${s[-1]}" -v r="$raw" 'BEGIN { printf "%.3f", w / r }')")
    done
    tput[$tr]=$(printf '%s\n' "${s[@]}" | stats)
    vs_raw[$tr]=$(printf '%s\n' "${q[@]}" | stats)
    agent_cpu[$tr]=$(printf '%s\n' "${cpu[@]}" | stats)
    ctl_cpu[$tr]=$(printf '%s\n' "${ccpu[@]}" | stats)
    peak_rss[$tr]=$(status_kb "$APID" VmHWM)
    say "$tr: ${tput[$tr]} MiB/s (/ raw pipe run just before: ${vs_raw[$tr]}), CPU s/GiB agent ${agent_cpu[$tr]} controller ${ctl_cpu[$tr]}, agent idle ${idle_rss[$tr]} kB, peak ${peak_rss[$tr]} kB"
    kill "$APID"
    wait "$APID" 2>/dev/null || true
    CTL=$main_ctl
done

read -r raw_med raw_min raw_max < <(printf '%s\n' "${raw_samples[@]}" | stats)
say "raw pipe: $raw_med MiB/s"

# Dispatch latency and builds/s: agents over TCP, labels pool1 (1 agent), pool50, pool100.
for ((i = 0; i < agents_many; i++)); do
    l="pool100"
    [ "$i" -lt "$agents_50" ] && l="$l pool50"
    [ "$i" -eq 0 ] && l="$l pool1"
    add_labeled "a$i" "$l"
done
start_agent a0 tcp
wait_count 1
lat_out() { # LABEL BUILDS CONC -> sets LAT (p50 p99 min max) and BPS
    local o
    o=$("$LOADGEN" dispatch --url "$URL" --data "$CTL" --label "$1" --builds "$2" --concurrency "$3") ||
        die "dispatch to $1 failed: $o"
    LAT=$(awk '$1 == "latency_ms" { print $2, $3, $4, $5 }' <<<"$o")
    BPS=$(awk '$1 == "builds_per_s" { print $2 }' <<<"$o")
}
# lat_runs LABEL: `runs` runs of lat_builds builds one after another -> LATS: the median of the
# runs' p50 and p99, the lowest and highest latency of all, then the lowest and highest p50 and p99
# of a run.
lat_runs() {
    local r all=()
    for ((r = 0; r < runs; r++)); do
        lat_out "$1" "$lat_builds" 1
        all+=("$LAT")
    done
    LATS=$(printf '%s\n' "${all[@]}" | awk '{ p50[NR] = $1; p99[NR] = $2; lo[NR] = $3; hi[NR] = $4 }
        function med(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
        END { n = NR; m50 = med(p50, n); m99 = med(p99, n); med(lo, n); med(hi, n)
            printf "%.3f %.3f %.3f %.3f", m50, m99, lo[1], hi[n]
            printf " %.3f %.3f %.3f %.3f\n", p50[1], p50[n], p99[1], p99[n] }')
}
lat_runs pool1
lat1=$LATS
say "1 agent: latency p50 p99 min max = $lat1 ms"
for ((i = 1; i < agents_50; i++)); do start_agent "a$i" tcp; done
wait_count "$agents_50"
lat_runs pool50
lat50=$LATS
say "$agents_50 agents: latency $lat50 ms"
for ((i = agents_50; i < agents_many; i++)); do start_agent "a$i" tcp; done
wait_count "$agents_many"
# spawn_once: the steps alone, as fast as this machine starts them: `sh -c true` tput_builds
# times, agents_many at a time, by xargs (no agent, no controller); prints starts per second. Run
# right before each builds/s run: the ceiling no agent can pass, measured under the same
# conditions (this machine's speed drifts by half within minutes).
spawn_once() {
    local t0 t1
    t0=$(now_ns)
    seq "$tput_builds" | xargs -P "$agents_many" -n 1 sh -c true
    t1=$(now_ns)
    awk -v a="$t0" -v b="$t1" -v n="$tput_builds" 'BEGIN { printf "%.1f", n / ((b - a) / 1e9) }'
}
# bps_runs: `runs` builds/s runs on pool100, each right after a run of the steps alone; appends
# to spawn, and sets BR: "median min max" of the builds/s, then of the ratios to the steps alone.
spawn=()
bps_runs() {
    local r b=() q=()
    for ((r = 0; r < runs; r++)); do
        spawn+=("$(spawn_once)")
        lat_out pool100 "$tput_builds" "$agents_many"
        b+=("$BPS")
        q+=("$(awk -v w="$BPS" -v r="${spawn[-1]}" 'BEGIN { printf "%.3f", w / r }')")
    done
    BR="$(printf '%s\n' "${b[@]}" | stats) $(printf '%s\n' "${q[@]}" | stats)"
}
bps_runs
read -r bps_med bps_min bps_max bq_med bq_min bq_max <<<"$BR"
say "$agents_many agents: $bps_med builds/s"
harness_cleanup
HARNESS_PIDS=()

# Builds/s again with the controller in a session of its own, as it runs when it is a service: a
# systemd unit or a container has a scheduling group of its own, so the controller competes with
# the agents and their steps group against group, not as one thread among hundreds. Here the
# kernel's autogroup does the same for a session (if it is on, which the table says).
autogroup=$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo absent)
WORK=$ROOT_WORK/service
mkdir -p "$WORK"
CTL_SETSID=1 start_controller || die "the controller in its own session did not start"
for ((i = 0; i < agents_many; i++)); do
    add_labeled "a$i" pool100
    start_agent "a$i" tcp
done
wait_count "$agents_many"
lat_out pool100 "$tput_builds" "$agents_many" # warm-up, not counted
bps_runs
read -r bsv_med bsv_min bsv_max sq_med sq_min sq_max <<<"$BR"
read -r sp_med sp_min sp_max < <(printf '%s\n' "${spawn[@]}" | stats)
say "$agents_many agents, controller in its own session: $bsv_med builds/s"
harness_cleanup
HARNESS_PIDS=()

# ================= controller scale =================
declare -A sc_rss sc_cpu sc_lat sc_conn sc_per
for n in "${scale_ns[@]}"; do
    WORK=$ROOT_WORK/scale$n
    mkdir -p "$WORK"
    start_controller || die "controller for N=$n did not start"
    add_labeled one one
    start_agent one tcp
    wait_online one "$APID" || die "agent one did not come online"
    sleep 1
    base_kb=$(status_kb "$CTL_PID" VmRSS)
    start_loadgen "N=$n" --url "$URL" --data "$CTL" --addr "$AGENT_ADDR" --n "$n"
    sc_conn[$n]=$LG_CONN
    sc_cpu[$n]=$(idle_cpu "$CTL_PID")
    lat_out one "$scale_lat_builds" 1
    sc_lat[$n]=$LAT
    sc_rss[$n]=$(status_kb "$CTL_PID" VmRSS)
    sc_per[$n]=$(awk -v a="$base_kb" -v b="${sc_rss[$n]}" -v n="$n" 'BEGIN { printf "%.1f", (b - a) / n }')
    kill -0 "$LG" 2>/dev/null || die "loadgen N=$n lost agents: $(tail -3 "$WORK/loadgen.err")"
    say "N=$n: connected in ${sc_conn[$n]} s, controller RSS ${sc_rss[$n]} kB (${sc_per[$n]} KiB per agent), idle CPU ${sc_cpu[$n]}%, latency ${sc_lat[$n]}"
    harness_cleanup
    HARNESS_PIDS=()
done
WORK=$ROOT_WORK

# ================= the defaults: N agents over WebSocket+TLS, then a reconnect storm =================
# A controller as it starts with no options (TLS on both ports, a self-signed identity the agents
# pin), on fixed ports once the first start has picked them, so that a restart is found where the
# agents left it. N idle agents from the load generator dial WebSocket+TLS at /wsagents/ and, on a
# lost link, dial again with the agent's own backoff; storm_builds real agents run a step each of
# about 20 s when the controller is SIGKILLed and started again at once.
WORK=$ROOT_WORK/storm
mkdir -p "$WORK"
CTL=$WORK/ctl
tls_ctl "$CTL" 0 0 || die "the TLS controller for the storm did not start"
http_port=$(sed -n 's/^http .*://p' "$CTL/listening")
agent_port=$(sed -n 's/^agent .*://p' "$CTL/listening")
sleep 1
wss_base_kb=$(status_kb "$TLS_PID" VmRSS)
start_loadgen "over wss" --url "$PIN_URL" --data "$CTL" --ws --reconnect --n "$storm_n" --prefix w
wss_conn=$LG_CONN
wss_cpu=$(idle_cpu "$TLS_PID")
wss_rss=$(status_kb "$TLS_PID" VmRSS)
wss_per=$(awk -v a="$wss_base_kb" -v b="$wss_rss" -v n="$storm_n" 'BEGIN { printf "%.1f", (b - a) / n }')
say "N=$storm_n over wss: connected in $wss_conn s, controller RSS $wss_rss kB ($wss_per KiB per agent), idle CPU $wss_cpu%"

# The storm's builds: one real agent each (the static agent over wss, identity pinned).
for ((i = 0; i < storm_builds; i++)); do
    add_labeled "s$i" storm
    start_agent "s$i" pinned
done
all=$((storm_n + storm_builds))
wait_count "$all"
STORM_STEP='i=0; while [ $i -lt 80 ]; do echo "storm line $i"; i=$((i + 1)); sleep 0.25; done'
seq 0 79 | sed 's/^/storm line /' >"$WORK/storm.expected"
storm_bytes=$(stat -c %s "$WORK/storm.expected")
printf 'name: storm\nagent:\n  label: storm\nsteps:\n  - sh: %s\n' "'$STORM_STEP'" >"$WORK/storm.yaml"
run_pids=()
for ((i = 0; i < storm_builds; i++)); do
    timeout 600 "$WISP" run "$WORK/storm.yaml" --wait --data "$CTL" >"$WORK/run$i.out" 2>"$WORK/run$i.err" &
    run_pids+=("$!")
done
for ((i = 0; i < 300; i++)); do # until every build runs (`wisp builds`)
    [ "$("$WISP" builds --data "$CTL" 2>/dev/null | grep -c $'\trunning\t')" -ge "$storm_builds" ] && break
    sleep 0.1
done
sleep 2
kill -KILL "$TLS_PID"
t_kill=$(now_ns)
wait "$TLS_PID" 2>/dev/null || true
tls_ctl "$CTL" "$http_port" "$agent_port" || die "the controller did not start again after SIGKILL"
t_up=$(now_ns)
"$LOADGEN" probe --url "$PIN_URL" --data "$CTL" --path /api/nodes --seconds "$storm_probe_s" >"$WORK/probe.out" \
    2>"$WORK/probe.err" &
probe_pid=$!
t_back=
for ((i = 0; i < 1200; i++)); do
    [ "$(online_count)" -ge "$all" ] && { t_back=$(now_ns); break; }
    sleep 0.05
done
[ -n "$t_back" ] || say "storm: only $(online_count) of $all nodes back after 60 s"
wait "$probe_pid" || die "the API probe during the storm failed: $(tail -3 "$WORK/probe.err")"
storm_lost=0
for ((i = 0; i < storm_builds; i++)); do
    if ! wait "${run_pids[$i]}" || ! grep -q "SUCCESS ($storm_bytes output bytes stored)" "$WORK/run$i.out"; then
        storm_lost=$((storm_lost + 1))
        say "storm build $i: $(cat "$WORK/run$i.out") $(tail -2 "$WORK/run$i.err")"
        continue
    fi
    id=$(sed -n 's/^build #\([0-9]*\) .*/\1/p' "$WORK/run$i.out")
    cmp -s "$CTL/builds/$id/1.log" "$WORK/storm.expected" || {
        storm_lost=$((storm_lost + 1))
        say "storm build $i (#$id): its log differs from what the step printed"
    }
done
storm_restart=$(awk -v a="$t_kill" -v b="$t_up" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
storm_back=$( [ -n "$t_back" ] && awk -v a="$t_up" -v b="$t_back" 'BEGIN { printf "%.1f", (b - a) / 1e9 }' || echo "> 60")
read -r sp50 sp99 _ spmax < <(awk '$1 == "latency_ms" { print $2, $3, $4, $5 }' "$WORK/probe.out")
probe_n=$(awk '$1 == "answered" { print $2 }' "$WORK/probe.out")
probe_err=$(awk '$1 == "errors" { print $2 }' "$WORK/probe.out")
say "storm: restarted in $storm_restart s, all $all back $storm_back s later, $storm_lost of $storm_builds builds lost; GET /api/nodes p50 $sp50 p99 $sp99 max $spmax ms ($probe_n answered, $probe_err failed)"
harness_cleanup
HARNESS_PIDS=()
WORK=$ROOT_WORK

# ================= the controller's executor threads, with TLS streams from many agents =================
# threads_agents agents over WebSocket+TLS (identity pinned) stream threads_mib MiB each at once
# to the stored log; the same for each --threads value. Figures: aggregate MiB/s and the
# controller's CPU per GiB.
declare -A th_tput th_cpu
for th in "${threads_ns[@]}"; do
    WORK=$ROOT_WORK/threads$th
    mkdir -p "$WORK"
    CTL=$WORK/ctl
    tls_ctl "$CTL" 0 0 --threads "$th" || die "the controller with --threads $th did not start"
    for ((i = 0; i < threads_agents; i++)); do
        add_labeled "t$i" "t$i"
        start_agent "t$i" pinned
    done
    wait_count "$threads_agents"
    tgen="yes $LINE | head -c $((threads_mib * 1048576))"
    sync
    k0=$(cpu_ticks "$TLS_PID")
    t0=$(now_ns)
    tp=()
    for ((i = 0; i < threads_agents; i++)); do
        printf 'name: t%s\nagent:\n  label: "t%s"\nsteps:\n  - sh: %s\n' "$i" "$i" "$tgen" >"$WORK/t$i.yaml"
        timeout 600 "$WISP" run "$WORK/t$i.yaml" --wait --data "$CTL" >"$WORK/t$i.out" 2>&1 &
        tp+=("$!")
    done
    for ((i = 0; i < threads_agents; i++)); do
        wait "${tp[$i]}" && grep -q "SUCCESS ($((threads_mib * 1048576)) output bytes stored)" "$WORK/t$i.out" ||
            die "--threads $th: stream t$i failed: $(cat "$WORK/t$i.out")"
    done
    t1=$(now_ns)
    k1=$(cpu_ticks "$TLS_PID")
    total=$((threads_agents * threads_mib))
    th_tput[$th]=$(awk -v a="$t0" -v b="$t1" -v m="$total" 'BEGIN { printf "%.1f", m / ((b - a) / 1e9) }')
    th_cpu[$th]=$(awk -v a="$k0" -v b="$k1" -v t="$tck" -v m="$total" 'BEGIN { printf "%.2f", (b - a) / t / (m / 1024) }')
    say "--threads $th: $threads_agents wss streams of $threads_mib MiB at once: ${th_tput[$th]} MiB/s, controller ${th_cpu[$th]} s/GiB"
    harness_cleanup
    HARNESS_PIDS=()
done
WORK=$ROOT_WORK

# ================= Buildbot (run_buildbot is defined above) =================
if [ "$smoke" = 1 ]; then
    BB_NOTE="not run in smoke mode"
else
    run_buildbot || say "Buildbot: $BB_NOTE"
fi

# ================= report =================
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mark() { if awk "BEGIN { exit !($1) }"; then echo met; else echo "**not met**"; fi; }
read -r tcp_med tcp_min tcp_max <<<"${tput[tcp]}"
read -r ws_med ws_min ws_max <<<"${tput[ws]}"
read -r wss_med wss_min wss_max <<<"${tput[wss]}"
read -r tf_med tf_min tf_max <<<"${tput[tcp_follow]}"
read -r wn_med wn_min wn_max <<<"${tput[wss_nginx]}"
read -r l1p50 l1p99 l1min l1max l1p50lo l1p50hi l1p99lo l1p99hi <<<"$lat1"
read -r l50p50 l50p99 l50min l50max l50p50lo l50p50hi l50p99lo l50p99hi <<<"$lat50"
read -r tcp_q tcp_qlo tcp_qhi <<<"${vs_raw[tcp]}"
read -r wss_q wss_qlo wss_qhi <<<"${vs_raw[wss]}"
nmax=${scale_ns[-1]}
section=$WORK/section.md
{
    echo '<!-- bench:begin -->'
    echo '## Side by side: wisp against a raw pipe and Buildbot'
    echo
    printf 'Measured %s on %s, %s cores (%s), Linux %s; %s build (`%s`, agent `%s`). Ratios measured in the same run are the headline; absolute figures are noisy (the machine is shared).\n' \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(uname -m)" "$(nproc)" \
        "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" "$(uname -r | cut -d- -f1)" "$built" \
        "$(realpath --relative-to=. "$WISP")" "$(realpath --relative-to=. "$AGENT")"
    echo
    echo "Command: \`$cmdline\` (median and min–max over $runs runs where a spread is shown)"
    echo
    echo '### Headline'
    echo
    echo '| goal | measured | |'
    echo '| --- | ---: | --- |'
    pct() { awk -v r="$1" -v lo="$2" -v hi="$3" 'BEGIN { printf "%.0f%% (%.0f–%.0f%%)", 100 * r, 100 * lo, 100 * hi }'; }
    echo "| streaming over TCP ≥ 75% of the raw pipe (0.51 before issue 19) | $(pct "$tcp_q" "$tcp_qlo" "$tcp_qhi") | $(mark "$tcp_q >= 0.75") |"
    echo "| streaming over WSS ≥ 60% of the raw pipe (0.33 before) | $(pct "$wss_q" "$wss_qlo" "$wss_qhi") | $(mark "$wss_q >= 0.6") |"
    for tr in tcp ws wss; do
        read -r c clo chi <<<"${agent_cpu[$tr]}"
        case $tr in tcp) was=3.9 ;; ws) was=4.6 ;; wss) was=5.8 ;; esac
        echo "| agent CPU per GiB streamed over $tr ≤ half of before ($was s) | $(spread "$c" "$clo" "$chi" %.2f) s | $(mark "$c <= $was / 2") |"
    done
    echo "| controller memory per idle agent over plain TCP ≤ 16 KiB (about 39 before) | ${sc_per[$nmax]} KiB at $nmax agents | $(mark "${sc_per[$nmax]} <= 16") |"
    echo "| $storm_n agents over WebSocket+TLS (the defaults): controller RSS ≤ 512 MiB | $(kib_mib "$wss_rss") | $(mark "$wss_rss <= 524288") |"
    echo "| $storm_n agents over WebSocket+TLS: idle CPU ≤ 5% of a core | $wss_cpu% | $(mark "$wss_cpu <= 5") |"
    echo "| reconnect storm ($all agents, $storm_builds builds running, controller SIGKILLed and restarted): all back within 15 s of the restart | $storm_back s | $(mark "${storm_back/> /1000+} <= 15") |"
    echo "| reconnect storm: no running build lost (each log byte-exact) | $storm_lost of $storm_builds lost | $(mark "$storm_lost == 0") |"
    echo "| reconnect storm: the API answers throughout (every \`GET /api/nodes\` answered, p99 ≤ 500 ms) | p99 $sp99 ms, max $spmax ms; $probe_n answered, $probe_err failed | $(mark "$probe_err == 0 && $sp99 <= 500") |"
    if [ -n "$bb_tput" ]; then
        echo "| throughput against Buildbot (context only: that goal is withdrawn) | $(ratio "$tcp_med" "$bb_tput")× (TCP) | |"
    else
        echo "| throughput against Buildbot (context only) | not measured ($BB_NOTE) | |"
    fi
    g=$(awk -v a="${peak_rss[tcp]}" -v b="${idle_rss[tcp]}" 'BEGIN { printf "%.2f", (a - b) / 1024 }')
    echo "| agent RSS flat while streaming (peak − idle < 1 MiB, TCP) | +$g MiB | $(mark "$g < 1") |"
    echo "| dispatch p50 ≤ 2 ms at $agents_50 agents | $l50p50 ms | $(mark "$l50p50 <= 2") |"
    echo "| dispatch p99 ≤ 20 ms at $agents_50 agents | $l50p99 ms | $(mark "$l50p99 <= 20") |"
    echo "| ≥ 1,000 trivial builds/s with $agents_many agents | $bsv_med (controller in its own session, as a service); $bps_med (in the agents' session); the steps alone: $(printf %.1f "$sp_med") | $(mark "$bsv_med >= 1000") |"
    echo "| $nmax agents with controller RSS ≤ 1 GiB | $(kib_mib "${sc_rss[$nmax]}") | $(mark "${sc_rss[$nmax]} <= 1048576") |"
    if [ -n "$bb_worker_kb" ]; then
        r=$(ratio "$bb_worker_kb" "${idle_rss[tcp]}"); echo "| agent idle RSS ≥ 25× smaller than buildbot-worker's | ${r}× | $(mark "$r >= 25") |"
        [ -z "$bb_lat" ] || echo "| dispatch vs Buildbot (p50, 1 agent) | $(ratio "$(awk '{ print $1 }' <<<"$bb_lat")" "$l1p50")× faster | |"
    else
        echo "| agent idle RSS ≥ 25× smaller than buildbot-worker's | not measured ($BB_NOTE) | not measured |"
    fi
    echo
    echo '### 1. Footprint'
    echo
    echo '| process | idle RSS | peak RSS while streaming |'
    echo '| --- | ---: | ---: |'
    for tr in tcp ws wss; do
        echo "| wisp-agent ($tr) | $(kib_mib "${idle_rss[$tr]}") | $(kib_mib "${peak_rss[$tr]}") ($stream_mib MiB, VmHWM) |"
    done
    echo "| wisp serve (no agent) | $(kib_mib "$ctl_idle_kb") | |"
    if [ -n "$bb_worker_kb" ]; then
        echo "| buildbot-worker | $(kib_mib "$bb_worker_kb") | $(kib_mib "${bb_worker_peak:-0}") ($BB_STREAM_MIB MiB, sampled every 0.1 s) |"
        echo "| buildbot master | $(kib_mib "$bb_master_kb") | |"
    else
        echo "| buildbot-worker, master | not measured: $BB_NOTE | |"
    fi
    echo
    echo "### 2. Streaming throughput ($stream_mib MiB of step stdout to the controller's stored log: \`wisp run --wait\`, submit to result, every byte checked stored)"
    echo
    echo '| path | MiB/s | / raw pipe (each run against a raw run just before it) | agent CPU, s/GiB | controller CPU, s/GiB |'
    echo '| --- | ---: | ---: | ---: | ---: |'
    echo "| raw loopback pipe (\`yes \| head -c \| socat -b 131072\` into a file) | $(spread "$raw_med" "$raw_min" "$raw_max") | 1.00 | | |"
    echo "| wisp over TCP | $(spread "$tcp_med" "$tcp_min" "$tcp_max") | $(spread ${vs_raw[tcp]} %.2f) | $(spread ${agent_cpu[tcp]} %.2f) | $(spread ${ctl_cpu[tcp]} %.2f) |"
    echo "| wisp over WebSocket | $(spread "$ws_med" "$ws_min" "$ws_max") | $(spread ${vs_raw[ws]} %.2f) | $(spread ${agent_cpu[ws]} %.2f) | $(spread ${ctl_cpu[ws]} %.2f) |"
    echo "| wisp over WebSocket+TLS (the controller's own TLS, identity pinned) | $(spread "$wss_med" "$wss_min" "$wss_max") | $(spread ${vs_raw[wss]} %.2f) | $(spread ${agent_cpu[wss]} %.2f) | $(spread ${ctl_cpu[wss]} %.2f) |"
    echo "| wisp over TCP, with \`wisp run --follow\` reading the log back live | $(spread "$tf_med" "$tf_min" "$tf_max") | $(spread ${vs_raw[tcp_follow]} %.2f) | $(spread ${agent_cpu[tcp_follow]} %.2f) | $(spread ${ctl_cpu[tcp_follow]} %.2f) |"
    echo "| wisp over WebSocket+TLS through nginx terminating TLS | $(spread "$wn_med" "$wn_min" "$wn_max") | $(spread ${vs_raw[wss_nginx]} %.2f) | $(spread ${agent_cpu[wss_nginx]} %.2f) | $(spread ${ctl_cpu[wss_nginx]} %.2f) |"
    if [ -n "$bb_tput" ]; then
        echo "| Buildbot ($BB_STREAM_MIB MiB, one run, REST force to the build's completion event on /sse) | $bb_tput | $(ratio "$bb_tput" "$raw_med") | | |"
    else
        echo "| Buildbot | not measured ($BB_NOTE) | |"
    fi
    echo
    echo '### 3. Dispatch latency (submit of a one-step `true` build to its result), ms'
    echo
    echo "Median over $runs runs of $lat_builds builds each (p50 and p99: median, and the lowest–highest run)."
    echo
    echo '| setup | builds | p50 | p99 | min | max |'
    echo '| --- | ---: | ---: | ---: | ---: | ---: |'
    echo "| wisp, 1 agent | $runs × $lat_builds | $(spread "$l1p50" "$l1p50lo" "$l1p50hi" %.3f) | $(spread "$l1p99" "$l1p99lo" "$l1p99hi" %.3f) | $l1min | $l1max |"
    echo "| wisp, $agents_50 agents | $runs × $lat_builds | $(spread "$l50p50" "$l50p50lo" "$l50p50hi" %.3f) | $(spread "$l50p99" "$l50p99lo" "$l50p99hi" %.3f) | $l50min | $l50max |"
    if [ -n "$bb_lat" ]; then
        read -r a b c e <<<"$bb_lat"
        echo "| Buildbot, 1 worker (REST \`force\` to the build's completion event on \`/sse\`) | $BB_LAT_BUILDS | $a | $b | $c | $e |"
    else
        echo "| Buildbot | not measured ($BB_NOTE) | | | | |"
    fi
    echo
    echo '### 4. Build throughput'
    echo
    echo "| setup | builds per run | builds/s | / the steps alone (each run against a run just before it) |"
    echo '| --- | ---: | ---: | ---: |'
    echo "| the steps alone: \`sh -c true\` started by \`xargs -P $agents_many\`, no agent or controller | $tput_builds | $(spread "$sp_med" "$sp_min" "$sp_max") | 1.00 |"
    echo "| wisp, $agents_many agents, $agents_many submitters, all in one session | $tput_builds | $(spread "$bps_med" "$bps_min" "$bps_max") | $(spread "$bq_med" "$bq_min" "$bq_max" %.2f) |"
    echo "| the same, the controller in a session of its own (\`setsid\`, like a service; autogroup $autogroup) | $tput_builds | $(spread "$bsv_med" "$bsv_min" "$bsv_max") | $(spread "$sq_med" "$sq_min" "$sq_max" %.2f) |"
    echo
    echo "- The steps alone are the ceiling: each build starts \`sh -c true\` once, and that start (fork, exec, dynamic loading of dash) is most of a trivial build's cost here. The ratio column compares each wisp run with a run of the steps alone made just before it."
    echo "- One session: the controller is one thread among the $agents_many agents and their steps in one scheduling group, and the kernel shares the CPU per thread; while it waits for its turn, every build waits with it and the cores can go idle. A service (systemd unit, container) gets a group of its own, which \`setsid\` gives it here through autogroup. Buildbot's master and worker put themselves in sessions of their own when they start (twistd daemonizes)."
    echo
    echo '### 5. Controller scale (idle agents from one `examples/loadgen.rs` process over TCP, real handshake and pings, plus one real agent)'
    echo
    echo '| N | time to connect all | controller RSS | per idle agent | controller CPU while idle | dispatch p50 / p99 at N (ms) |'
    echo '| ---: | ---: | ---: | ---: | ---: | ---: |'
    for n in "${scale_ns[@]}"; do
        read -r a b _ _ <<<"${sc_lat[$n]}"
        echo "| $n | ${sc_conn[$n]} s | $(kib_mib "${sc_rss[$n]}") | ${sc_per[$n]} KiB | ${sc_cpu[$n]}% of a core over ${idle_cpu_s} s | $a / $b |"
    done
    echo
    echo "- Idle CPU is the controller's over ${idle_cpu_s} s, from ${ping_wait_s} s after the agents began to connect: with the default ping interval (15 s), the first link's first ping is then due, and each link is pinged once and pings once within the window."
    echo '- Latency is measured by the load generator as a client sees it: one `POST /api/builds?wait=60` per build (submit, held until the build is final, answered with the result), on kept-alive HTTP connections; the step is `sh -c true` started by the agent, which alone costs about 1 ms of CPU on this machine (dash is dynamically linked).'
    echo '- Throughput rows other than the live-reader one end when `wisp run --wait` has the result, which the controller gives once the last byte is in the stored log; the step output goes through the agent'"'"'s spool (its newest 64 KiB in memory; what leaves that unacknowledged is written to disk) and is stored in `DATA/builds/ID/1.log` (checked: every byte). The raw pipe writes into a file the same way.'
    echo '- Buildbot (Debian `buildbot`, `buildbot-worker` 3.7.0; the master with the `buildbot-www` 3.7.0 wheel for its REST API) is driven by `scripts/bb-drive.py` the way its web UI forces a build: a JSON-RPC `force` call to a ForceScheduler (`POST /api/v2/forceschedulers/NAME`) per build, one at a time, and the build'"'"'s `builds/*/finished` event (matched by build request) on the master'"'"'s `/sse` stream, no polling; latency runs from just before the POST to that event'"'"'s arrival. The master RSS includes its web server.'
    echo "- Per idle agent: the controller's RSS at N less its RSS with only the real agent online, over N."
    echo
    echo '### 6. The defaults: agents over WebSocket+TLS, and a reconnect storm'
    echo
    echo "A controller started without options (TLS on both ports, its self-signed identity pinned by the agents). $storm_n idle agents from one load generator over WebSocket+TLS at \`/wsagents/\`, then $storm_builds real static agents, each running a build whose step prints $storm_bytes bytes over 20 s. The controller is SIGKILLed while the builds run and started again at once on the same ports; the load generator and the agents dial again with the agent's backoff (1 s doubling to 10 s, plus up to half of jitter)."
    echo
    echo '| measure | figure |'
    echo '| --- | ---: |'
    echo "| time to connect $storm_n over WebSocket+TLS | $wss_conn s |"
    echo "| controller RSS with $storm_n connected | $(kib_mib "$wss_rss") ($wss_per KiB per agent) |"
    echo "| controller CPU while idle | $wss_cpu% of a core over ${idle_cpu_s} s |"
    echo "| SIGKILL to listening again (the store opened, $all nodes loaded) | $storm_restart s |"
    echo "| listening again to all $all nodes online (\`wisp nodes\`, polled every 50 ms) | $storm_back s |"
    echo "| builds lost (not SUCCESS, or a stored log not byte-exact) | $storm_lost of $storm_builds |"
    echo "| \`GET /api/nodes\` ($all nodes) during the storm, one call after another every 100 ms for ${storm_probe_s} s from the restart: p50 / p99 / max | $sp50 / $sp99 / $spmax ms ($probe_n answered, $probe_err failed) |"
    echo
    echo '### 7. Executor threads (`wisp serve --threads`), TLS streams from many agents'
    echo
    echo "$threads_agents agents over WebSocket+TLS (identity pinned) each stream $threads_mib MiB to the stored log at once."
    echo
    echo '| --threads | aggregate MiB/s | controller CPU, s/GiB |'
    echo '| ---: | ---: | ---: |'
    for th in "${threads_ns[@]}"; do
        echo "| $th | ${th_tput[$th]} | ${th_cpu[$th]} |"
    done
    echo '<!-- bench:end -->'
} >"$section"

cat "$section"
[ "$smoke" = 0 ] || { say "smoke mode: BENCHMARKS.md not written"; exit 0; }
if grep -q '<!-- bench:begin -->' BENCHMARKS.md; then
    awk -v f="$section" '
        /<!-- bench:begin -->/ { while ((getline l < f) > 0) print l; skip = 1; next }
        /<!-- bench:end -->/ { skip = 0; next }
        !skip { print }' BENCHMARKS.md >"$WORK/bench.md"
    cat "$WORK/bench.md" >BENCHMARKS.md
else
    { echo; cat "$section"; } >>BENCHMARKS.md
fi
say "updated BENCHMARKS.md"
