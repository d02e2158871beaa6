#!/usr/bin/env bash
# Benchmarks of the static agent (issue 3), written into BENCHMARKS.md between the markers
# <!-- static:begin --> and <!-- static:end --> (other sections are kept):
#   - binary size per target;
#   - idle RSS of the x86_64 agent once connected, over WebSocket, TCP, and WebSocket over TLS
#     (wss, through an nginx that terminates TLS in front of the controller);
#   - peak RSS (VmHWM) and CPU time of the agent while one step streams 1 GiB of output;
#   - time from starting the agent process to its node being online at the controller.
#
#   scripts/bench-static.sh [--runs N] [--stream-mib N] [--no-write]
#
# --runs: start-to-online samples per transport (default 10); --stream-mib: output size of the
# streaming step (default 1024); --no-write: print the section without touching BENCHMARKS.md.
# Uses the static binaries in target/static (building what is missing) and the controller at
# WISP_BIN (default target/debug/wisp). Everything listens on ephemeral ports of 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

runs=10
stream_mib=1024
write=1
cmdline="scripts/bench-static.sh${*:+ $*}"
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?}; shift ;;
        --stream-mib) stream_mib=${2:?}; shift ;;
        --no-write) write=0 ;;
        -h | --help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wisp-static-bench.XXXXXX")
ENGINE=true
cleanup() {
    harness_cleanup
    rm -rf "$WORK"
}
trap cleanup EXIT

missing=()
for t in "${STATIC_TARGETS[@]}"; do
    [ -f "$STATIC_DIR/$t/wisp-agent" ] || missing+=("$t")
done
[ ${#missing[@]} -eq 0 ] || bash scripts/build-static.sh "${missing[@]}"
AGENT=$STATIC_DIR/x86_64-unknown-linux-musl/wisp-agent

start_controller || die "the controller did not start"
say "controller at $URL (agent port $AGENT_ADDR)"

setup_wss || say "wss not measured: $WSS_NOTE"

stop_agent() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

transports=(ws tcp)
[ -z "$WSS_URL" ] || transports+=(wss)
declare -A idle_rss idle_hwm peak_hwm stream_s stream_cpu online_ms

tck=$(getconf CLK_TCK)
for tr in "${transports[@]}"; do
    # Idle, then streaming, on one agent.
    name=bench_$tr
    add_node "$name" >/dev/null
    start_agent "$name" "$tr"
    wait_online "$name" "$APID" || { show=$(tail -5 "$WORK/$name.log"); die "agent over $tr did not come online: $show"; }
    sleep 2
    idle_rss[$tr]=$(status_kb "$APID" VmRSS)
    idle_hwm[$tr]=$(status_kb "$APID" VmHWM)
    say "$tr: idle VmRSS ${idle_rss[$tr]} kB"
    c0=$(cpu_ticks "$APID")
    t0=$(now_ns)
    rc=0
    WISP_STEP_TIMEOUT=1800 run_step "$name" /dev/null \
        "yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde | head -c $((stream_mib * 1048576))" || rc=$?
    t1=$(now_ns)
    [ "$rc" = 0 ] || die "the $stream_mib MiB step over $tr failed (wisp run exit $rc)"
    peak_hwm[$tr]=$(status_kb "$APID" VmHWM)
    stream_cpu[$tr]=$(awk -v a="$c0" -v b="$(cpu_ticks "$APID")" -v t="$tck" 'BEGIN { printf "%.2f", (b - a) / t }')
    stream_s[$tr]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    say "$tr: ${stream_mib} MiB in ${stream_s[$tr]} s, agent VmHWM ${peak_hwm[$tr]} kB, CPU ${stream_cpu[$tr]} s"
    stop_agent "$APID"

    # Start to online, a fresh node each time.
    samples=()
    for ((i = 1; i <= runs; i++)); do
        name=boot_${tr}_$i
        add_node "$name" >/dev/null
        t0=$(now_ns)
        start_agent "$name" "$tr"
        until node_online "$name"; do
            kill -0 "$APID" 2>/dev/null || die "agent $name exited: $(tail -3 "$WORK/$name.log")"
            [ $(($(now_ns) - t0)) -lt 30000000000 ] || die "agent $name not online after 30 s"
        done
        t1=$(now_ns)
        samples+=($(((t1 - t0) / 1000)))
        stop_agent "$APID"
    done
    # median, min, max in ms
    online_ms[$tr]=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{ a[NR] = $1 } END {
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "%.1f ms (min %.1f, max %.1f)", m / 1000, a[1] / 1000, a[NR] / 1000 }')
    say "$tr: start to online ${online_ms[$tr]}"
done

# Poll cost bounds the start-to-online resolution.
t0=$(now_ns)
for ((i = 0; i < 20; i++)); do node_online none || true; done
poll_ms=$(awk -v a="$t0" -v b="$(now_ns)" 'BEGIN { printf "%.1f", (b - a) / 20 / 1e6 }')

kb_mib() { awk -v k="$1" 'BEGIN { printf "%.2f MiB", k / 1024 }'; }
cell() { # cell ARRAY-NAME TRANSPORT FORMATTER
    local -n arr=$1
    if [ -n "${arr[$2]:-}" ]; then "$3" "${arr[$2]}"; else printf 'not measured'; fi
}
plain() { printf '%s' "$1"; }
secs() { printf '%s s' "$1"; }
rate() { awk -v s="$1" -v m="$stream_mib" 'BEGIN { printf "%.2f s (%.0f MiB/s)", s, m / s }'; }
all=(ws tcp wss)

section=$WORK/section.md
{
    echo '<!-- static:begin -->'
    echo '## Static agent: size, memory, start-up'
    echo
    printf 'Measured %s on %s (%s cores, %s); rustc %s (armv7: %s), profile `agent`; ' \
        "$(date -u +%Y-%m-%d)" "$(uname -m)" "$(nproc)" "Linux $(uname -r | cut -d- -f1)" \
        "$(rustc --version | awk '{ print $2 }')" "$ARMV7_TOOLCHAIN"
    printf 'the figures below are for the x86_64 agent against the controller `%s` on 127.0.0.1.\n' \
        "$(realpath --relative-to=. "$WISP")"
    echo
    echo "Command: \`$cmdline\`"
    echo
    echo '| target | size (bytes) | size | budget |'
    echo '| --- | ---: | ---: | ---: |'
    for t in "${STATIC_TARGETS[@]}"; do
        b=$(stat -c %s "$STATIC_DIR/$t/wisp-agent")
        printf '| %s | %d | %s | %s |\n' "$t" "$b" "$(mib "$b")" "$(mib "$(size_budget "$t")")"
    done
    echo
    echo '| x86_64 agent | ws | tcp | wss |'
    echo '| --- | ---: | ---: | ---: |'
    printf '| idle RSS once connected (VmRSS) |'
    for tr in "${all[@]}"; do printf ' %s |' "$(cell idle_rss "$tr" kb_mib)"; done
    printf '\n| peak RSS while a step streams %s MiB (VmHWM) |' "$stream_mib"
    for tr in "${all[@]}"; do printf ' %s |' "$(cell peak_hwm "$tr" kb_mib)"; done
    printf '\n| time to stream %s MiB through `wisp run --follow` |' "$stream_mib"
    for tr in "${all[@]}"; do printf ' %s |' "$(cell stream_s "$tr" rate)"; done
    printf '\n| agent CPU time for those %s MiB |' "$stream_mib"
    for tr in "${all[@]}"; do printf ' %s |' "$(cell stream_cpu "$tr" secs)"; done
    printf '\n| process start to node online, median of %d |' "$runs"
    for tr in "${all[@]}"; do printf ' %s |' "$(cell online_ms "$tr" plain)"; done
    echo
    echo
    case $WISP in
        */debug/*) kind="a debug build" ;;
        */release/*) kind="a release build" ;;
        *) kind="the one named above" ;;
    esac
    echo "- The streaming step is \`yes <64-byte line> | head -c N\`; its time is end to end: the agent relays the output, the controller ($kind) stores it and streams it to \`wisp run --follow\`, which writes it to /dev/null."
    echo "- Start to online is timed from just before the agent is spawned until \`wisp nodes\` lists it online; one poll takes about $poll_ms ms, which bounds the resolution."
    if [ -n "$WSS_URL" ]; then
        echo "- wss goes through nginx on 127.0.0.1 terminating TLS with a throw-away CA (the controller itself serves plain HTTP); the agent trusts it with \`--cert\`."
    else
        echo "- wss: not measured ($WSS_NOTE)."
    fi
    echo "- The aarch64 and armv7 binaries are run under qemu-user in the tests; their RSS there is the emulator's, so it is not reported."
    echo '<!-- static:end -->'
} >"$section"

cat "$section"
[ "$write" = 1 ] || exit 0
if [ -f BENCHMARKS.md ] && grep -q '<!-- static:begin -->' BENCHMARKS.md; then
    awk -v f="$section" '
        /<!-- static:begin -->/ { while ((getline l < f) > 0) print l; skip = 1; next }
        /<!-- static:end -->/ { skip = 0; next }
        !skip { print }' BENCHMARKS.md >"$WORK/bench.md"
    cat "$WORK/bench.md" >BENCHMARKS.md
else
    [ -f BENCHMARKS.md ] || printf '# Benchmarks\n' >BENCHMARKS.md
    { echo; cat "$section"; } >>BENCHMARKS.md
fi
say "updated BENCHMARKS.md"
