#!/usr/bin/env bash
# Builds a small build-container image for pod templates: FROM scratch with Debian's static
# busybox as /bin/busybox and /bin/sh (and the usual applets linked to it). No registry is
# needed, so it works on hosts that cannot pull images. Installs and configures podman if needed.
#
#   scripts/build-busybox-image.sh [--tag IMAGE]     (default IMAGE: localhost/wisp-busybox:dev)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

image=localhost/wisp-busybox:dev
while [ $# -gt 0 ]; do
    case $1 in
        --tag) image=${2:?--tag needs an image name}; shift ;;
        -h | --help) sed -n '2,6s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done

engine=$(container_engine)
apt_ensure busybox-static
ctx=$(mktemp -d "${TMPDIR:-/tmp}/wisp-busybox.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
# No /home/jenkins/agent: podman copies what an image has at a volume's mount point into the
# volume, with the image's owner and mode, which would take the shared workspace from the agent.
mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp"
cp /bin/busybox "$ctx/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ctx/rootfs/bin/$applet"
done
chmod 1777 "$ctx/rootfs/tmp"
cat >"$ctx/Containerfile" <<'CF'
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
CMD ["/bin/sh"]
CF
say "building $image with $engine"
"$engine" build --quiet -t "$image" -f "$ctx/Containerfile" "$ctx" >/dev/null
size=$("$engine" image inspect --format '{{.Size}}' "$image")
printf '%s  %s bytes (%s)\n' "$image" "$size" "$(mib "$size")"
