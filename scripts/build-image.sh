#!/usr/bin/env bash
# Builds the FROM-scratch agent image (image/Dockerfile) with podman, or with docker if a docker
# daemon answers and podman is absent. Installs and configures podman itself if needed.
#
#   scripts/build-image.sh [--tag IMAGE] [ARCH...]
#
# ARCH is amd64, arm64 or arm (default: this machine's). Each arch is tagged IMAGE-ARCH, and this
# machine's arch also IMAGE (default IMAGE: localhost/wisp-agent:dev). A static binary that
# target/static does not hold yet is built first with scripts/build-static.sh. The build context is
# a small staging directory, so a large target dir (or CARGO_TARGET_DIR elsewhere) costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

image=localhost/wisp-agent:dev
arches=()
while [ $# -gt 0 ]; do
    case $1 in
        --tag) image=${2:?--tag needs an image name}; shift ;;
        -h | --help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) arches+=("$(arch_of_target "$(target_of_arch "$1")")") ;;
    esac
    shift
done
host_arch=$(arch_of_target "$(target_of_arch "$(uname -m)")")
[ ${#arches[@]} -gt 0 ] || arches=("$host_arch")

engine=$(container_engine)

ctx=$(mktemp -d "${TMPDIR:-/tmp}/wisp-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/image"
cp -r image/rootfs "$ctx/image/"

for arch in "${arches[@]}"; do
    t=$(target_of_arch "$arch")
    [ -f "$STATIC_DIR/$t/wisp-agent" ] || bash scripts/build-static.sh "$t"
    # Only this arch's binary is staged: a build that picked the wrong stage fails loudly.
    rm -rf "$ctx/target"
    mkdir -p "$ctx/target/static/$arch"
    cp "$STATIC_DIR/$t/wisp-agent" "$ctx/target/static/$arch/wisp-agent"
    tags=(-t "$image-$arch")
    [ "$arch" != "$host_arch" ] || tags+=(-t "$image")
    say "building $image-$arch with $engine"
    platform=linux/$arch
    [ "$arch" != arm ] || platform=linux/arm/v7
    "$engine" build --quiet --platform "$platform" --build-arg "TARGETARCH=$arch" "${tags[@]}" \
        -f image/Dockerfile "$ctx" >/dev/null
    size=$("$engine" image inspect --format '{{.Size}}' "$image-$arch")
    printf '%-6s %s  %s bytes (%s)\n' "$arch" "$image-$arch" "$size" "$(mib "$size")"
done
