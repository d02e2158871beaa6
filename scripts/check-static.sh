#!/usr/bin/env bash
# Checks the static agents that scripts/build-static.sh made: each must be fully static (no dynamic
# section, no interpreter) and within its size budget.
#
#   scripts/check-static.sh [TARGET...]     (default: all three targets)
#
# Budgets: x86_64 <= 2.0 MiB, aarch64 <= 1.8 MiB, armv7 <= 1.5 MiB. Exits 1 naming every binary that
# is missing, dynamic or too big.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

targets=()
for arg in "$@"; do
    case $arg in
        -h | --help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) die "unknown option $arg" ;;
        *) check_target "$arg"; targets+=("$arg") ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${STATIC_TARGETS[@]}")

apt_ensure file binutils

failures=0
fail() {
    printf 'FAIL %s\n' "$*" >&2
    failures=$((failures + 1))
}

for t in "${targets[@]}"; do
    bin=$STATIC_DIR/$t/wisp-agent
    if [ ! -f "$bin" ]; then
        fail "$t: $bin is missing; run scripts/build-static.sh $t"
        continue
    fi
    ok=1
    desc=$(file -b "$bin")
    if ! readelf -h "$bin" >/dev/null 2>&1; then
        fail "$t: $bin is not an ELF file: $desc"
        continue
    fi
    # A static binary has no dynamic section and no program interpreter. (static-pie would have a
    # dynamic section; the musl targets here link plain static executables.)
    dyn=$(readelf -d "$bin" 2>&1) || true
    if ! grep -q 'There is no dynamic section' <<<"$dyn"; then
        fail "$t: $bin has a dynamic section, so it is not fully static:"
        grep -E 'NEEDED|INTERP' <<<"$dyn" >&2 || printf '%s\n' "$dyn" | head -5 >&2
        ok=0
    fi
    if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
        fail "$t: $bin asks for a program interpreter: $(readelf -l "$bin" | grep -o 'interpreter: [^]]*')"
        ok=0
    fi
    if ! grep -q 'statically linked' <<<"$desc"; then
        fail "$t: file(1) does not call $bin statically linked: $desc"
        ok=0
    fi
    bytes=$(stat -c %s "$bin")
    budget=$(size_budget "$t")
    if [ "$bytes" -gt "$budget" ]; then
        fail "$t: $bin is $bytes bytes ($(mib "$bytes")), over its budget of $budget bytes ($(mib "$budget")) by $((bytes - budget)) bytes"
        ok=0
    fi
    if [ "$ok" = 1 ]; then
        printf 'ok   %-32s static, %d bytes (%s) of %s budget\n' "$t" "$bytes" "$(mib "$bytes")" "$(mib "$budget")"
    fi
done

if [ "$failures" -gt 0 ]; then
    printf 'check-static: %d problem(s) with the static agent binaries\n' "$failures" >&2
    exit 1
fi
