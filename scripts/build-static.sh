#!/usr/bin/env bash
# Builds the fully static, size-optimised `wisp-agent` for musl targets and copies each binary to
# target/static/<target>/wisp-agent (under CARGO_TARGET_DIR if that is set).
#
#   scripts/build-static.sh [--check] [--kafka] [TARGET...]
#
# --kafka builds the agent with the Kafka transport (`--features kafka`) into
# target/static-kafka/<target>/wisp-agent instead; the default agent has no Kafka code.
#
# TARGET is one of x86_64-unknown-linux-musl, aarch64-unknown-linux-musl,
# armv7-unknown-linux-musleabihf (default: all three); --check runs scripts/check-static.sh on the
# results. Installs what it needs itself, and stays quiet when it is all there: the rustup targets,
# toolchain 1.94.1 for armv7 (the only one whose armv7 musl std the mirror has), and Debian's cross C
# compilers (linker and CC settings are in .cargo/config.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

check=0
features=()
out_dir=$STATIC_DIR
targets=()
for arg in "$@"; do
    case $arg in
        --check) check=1 ;;
        --kafka) features=(--features kafka); out_dir=${STATIC_DIR}-kafka ;;
        -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) die "unknown option $arg" ;;
        *) check_target "$arg"; targets+=("$arg") ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${STATIC_TARGETS[@]}")

command -v rustup >/dev/null || die "rustup is needed to add the musl targets"

# Make sure TOOLCHAIN (empty: the default one here) has TARGET's standard library.
ensure_rust_target() {
    local toolchain=$1 target=$2 plus=()
    [ -z "$toolchain" ] || plus=("+$toolchain")
    if [ -n "$toolchain" ] && ! rustup toolchain list | grep -q "^$toolchain-"; then
        say "installing Rust toolchain $toolchain with $target"
        rustup toolchain install "$toolchain" --profile minimal --target "$target" >/dev/null 2>&1 ||
            die "rustup could not install toolchain $toolchain with target $target"
    fi
    if ! rustup "${plus[@]}" target list --installed | grep -qx "$target"; then
        say "adding Rust target $target${toolchain:+ to toolchain $toolchain}"
        rustup "${plus[@]}" target add "$target" >/dev/null 2>&1 ||
            die "rustup could not add target $target${toolchain:+ to toolchain $toolchain}"
    fi
}

# Debian cross compilers: linker drivers, and C compilers (with the C headers) for ring.
debs=()
for t in "${targets[@]}"; do
    case $t in
        aarch64-*) debs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armv7-*) debs+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
        x86_64-*) debs+=(gcc libc6-dev) ;;
    esac
done
apt_ensure "${debs[@]}"

mkdir -p "$out_dir"
for t in "${targets[@]}"; do
    toolchain=
    [ "$t" != armv7-unknown-linux-musleabihf ] || toolchain=$ARMV7_TOOLCHAIN
    ensure_rust_target "$toolchain" "$t"
    cargo_cmd=(cargo)
    [ -z "$toolchain" ] || cargo_cmd=(cargo "+$toolchain")
    say "building wisp-agent for $t${toolchain:+ (toolchain $toolchain)}"
    "${cargo_cmd[@]}" build --quiet --profile agent --no-default-features "${features[@]}" --bin wisp-agent \
        --target "$t"
    mkdir -p "$out_dir/$t"
    cp "$TARGET_DIR/$t/agent/wisp-agent" "$out_dir/$t/wisp-agent"
    # image/Dockerfile finds the binary by container arch: target/static/amd64 -> x86_64-...
    ln -sfn "$t" "$out_dir/$(arch_of_target "$t")"
done

for t in "${targets[@]}"; do
    bytes=$(stat -c %s "$out_dir/$t/wisp-agent")
    printf '%-32s %9d bytes  %s  %s\n' "$t" "$bytes" "$(mib "$bytes")" "$out_dir/$t/wisp-agent"
done

if [ "$check" = 1 ] && [ ${#features[@]} -eq 0 ]; then
    exec bash scripts/check-static.sh "${targets[@]}"
fi
