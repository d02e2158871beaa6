#!/usr/bin/env bash
# Builds a release of wisp: static binaries for three architectures, tarballs with checksums and
# the FROM-scratch agent image for each architecture plus one multi-arch manifest.
#
#   scripts/release.sh [--quick] [--allow-dirty] [--check] VERSION
#
# VERSION is Cargo.toml's version, or that with a pre-release or build suffix (0.1.0-rc.1,
# 0.1.0-smoke): the binaries print it and the commit they come from (`wisp-agent 0.1.0 (1a2b3c..)`).
# Everything goes to target/release-VERSION/ (under CARGO_TARGET_DIR if set):
#   wisp-agent-VERSION-linux-ARCH.tar.gz   the static agent, ARCH x86_64, aarch64, armv7
#   wisp-VERSION-linux-ARCH.tar.gz         the static controller and CLI, ARCH x86_64, aarch64
#       each unpacks to one directory of the same name: the binary, bash and zsh completions, the
#       systemd unit (examples/systemd)
#   wisp-agent-image-VERSION-ARCH.tar      the agent image for ARCH amd64, arm64, arm: an OCI
#                                          archive, `podman load -i FILE` (or docker load)
#   wisp-agent-image-VERSION.tar           the three as one multi-arch manifest list
#                                          (localhost/wisp-agent:VERSION), `podman load -i FILE`
#   SHA256SUMS                             `sha256sum -c SHA256SUMS`
#
#   --quick        the controller at the `release-quick` profile (no LTO, opt-level 0): what CI
#                  makes to test this script in minutes; the agents are always the real, size-
#                  optimised build (their size budget is part of the check)
#   --allow-dirty  build from a work tree with uncommitted changes (the commit then reads
#                  `HASH-dirty`); without it such a tree is refused
#   --check        run scripts/check-release.sh on the result
# Installs what it needs (rustup targets, Debian's cross compilers, podman) itself.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/static-common.sh

quick=0
dirty_ok=0
check=0
version=
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        --allow-dirty) dirty_ok=1 ;;
        --check) check=1 ;;
        -h | --help) sed -n '2,27s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) [ -z "$version" ] || die "one VERSION only (got $version and $arg)"; version=$arg ;;
    esac
done
[ -n "$version" ] || die "usage: scripts/release.sh [--quick] [--allow-dirty] [--check] VERSION"

# The version: Cargo.toml's, optionally with -PRE and/or +BUILD (what build.rs accepts, and short
# enough that "VERSION (COMMIT-dirty)" fits the handshake's 64 bytes).
pkg_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$pkg_version" ] || die "no version in Cargo.toml"
if ! [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]+)?$ ]] || [ ${#version} -gt 40 ]; then
    die "VERSION $version is not a version: use MAJOR.MINOR.PATCH with an optional -PRE or +BUILD (at most 40 characters)"
fi
base=${version%%[-+]*}
[ "$base" = "$pkg_version" ] ||
    die "VERSION $version does not match Cargo.toml's version $pkg_version: bump Cargo.toml first (or use $pkg_version-SUFFIX)"

# The commit the binaries name: HEAD, and "-dirty" where the tree has changes (refused by default:
# a release must be what its commit says).
command -v git >/dev/null && git rev-parse --git-dir >/dev/null 2>&1 || die "not a git checkout: the release names its commit"
commit=$(git rev-parse --short=12 HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    [ "$dirty_ok" = 1 ] || die "the work tree has uncommitted changes (git status); commit them, or pass --allow-dirty"
    commit=$commit-dirty
fi
# build.rs names the package version and HEAD by itself: the variables are set only where the
# release says something else, so that a release of the package version from a clean tree is the
# same cargo build as scripts/build-static.sh's (CI makes its smoke release after those).
[ "$version" = "$pkg_version" ] || export WISP_RELEASE_VERSION=$version
[ "$commit" = "$(git rev-parse --short=12 HEAD)" ] || export WISP_COMMIT=$commit
# Reproducible archives: every file dated at the commit.
epoch=$(git log -1 --format=%ct HEAD)

out=$TARGET_DIR/release-$version
stage=$out/.stage
rm -rf "$out"
mkdir -p "$stage"
say "release $version ($commit) into $out"

host_target=$(target_of_arch "$(uname -m)")

# ---- the agents: scripts/build-static.sh, the size-optimised static build, into our own stage ----
export WISP_STATIC_DIR=$stage/static
bash scripts/build-static.sh --check

# ---- the controller: static musl for x86_64 and aarch64 (SQLite is bundled C, built by cc) ----
CONTROLLER_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
profile=release
[ "$quick" = 0 ] || profile=release-quick
# SQLite is C that uses libc: it must be compiled against musl's headers, not glibc's (whose
# open64/stat64/... musl does not have). Debian's musl-dev for each architecture has them, and a
# gcc specs file that makes gcc use them; Rust's musl targets bring the libc that is linked.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    say "adding arm64 to dpkg's architectures (for musl-dev:arm64, the aarch64 musl headers)"
    if [ "$(id -u)" -eq 0 ]; then dpkg --add-architecture arm64; else sudo dpkg --add-architecture arm64; fi
fi
apt_ensure musl-dev musl-dev:arm64
for t in "${CONTROLLER_TARGETS[@]}"; do
    # build-static.sh has added the targets and the cross compilers.
    say "building wisp (the controller) for $t, profile $profile"
    triple=${t%%-unknown-*}-linux-musl
    specs=/usr/lib/$triple/musl-gcc.specs
    [ -f "$specs" ] || die "no $specs: musl-dev for $t did not install"
    export "CFLAGS_${t//-/_}=-specs=$specs"
    cargo build --quiet --profile "$profile" --bin wisp --target "$t"
    mkdir -p "$stage/controller/$t"
    cp "$TARGET_DIR/$t/$profile/wisp" "$stage/controller/$t/wisp"
done

# Completions come from the binaries' own --help: this machine's build of each.
host_ctl=$stage/controller/$host_target/wisp
host_agent=$WISP_STATIC_DIR/$host_target/wisp-agent
[ -x "$host_ctl" ] || die "no controller for this machine ($host_target) to generate completions with"
mkdir -p "$stage/completions"
python3 scripts/completions.py bash "$host_ctl" >"$stage/completions/wisp.bash"
python3 scripts/completions.py bash "$host_agent" >"$stage/completions/wisp-agent.bash"
python3 scripts/completions.py zsh "$host_ctl" >"$stage/completions/_wisp"
python3 scripts/completions.py zsh "$host_agent" >"$stage/completions/_wisp-agent"

# short_arch TARGET: the name in the tarball's (what `uname -m` says, armv7l shortened).
short_arch() {
    case $1 in
        x86_64-*) echo x86_64 ;;
        aarch64-*) echo aarch64 ;;
        armv7-*) echo armv7 ;;
        *) die "no short name for $1" ;;
    esac
}

# pack NAME BINARY UNIT COMPLETION...: $out/NAME.tar.gz holding NAME/ with the binary (mode 755),
# the unit and the completions, owned by root and dated at the commit.
pack() {
    local name=$1 bin=$2 unit=$3
    shift 3
    local dir=$stage/pack/$name c
    rm -rf "$dir"
    mkdir -p "$dir/completions"
    install -m 755 "$bin" "$dir/$(basename "$bin")"
    install -m 644 "$unit" "$dir/"
    for c in "$@"; do install -m 644 "$stage/completions/$c" "$dir/completions/"; done
    tar -C "$stage/pack" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -cf - "$name" |
        gzip -n -9 >"$out/$name.tar.gz"
}

for t in "${STATIC_TARGETS[@]}"; do
    pack "wisp-agent-$version-linux-$(short_arch "$t")" "$WISP_STATIC_DIR/$t/wisp-agent" \
        examples/systemd/wisp-agent.service wisp-agent.bash _wisp-agent
done
for t in "${CONTROLLER_TARGETS[@]}"; do
    pack "wisp-$version-linux-$(short_arch "$t")" "$stage/controller/$t/wisp" examples/systemd/wisp.service \
        wisp.bash _wisp
done

# ---- the images: one per arch (scripts/build-image.sh), saved alone and as one manifest list ----
engine=$(container_engine)
[ "$engine" = podman ] || die "the multi-arch manifest needs podman (found $engine)"
repo=localhost/wisp-agent
arches=(amd64 arm64 arm)
bash scripts/build-image.sh --tag "$repo:build-$version" "${arches[@]}" >/dev/null
podman manifest rm "$repo:$version" >/dev/null 2>&1 || true
podman manifest create "$repo:$version" >/dev/null
for a in "${arches[@]}"; do
    podman tag "$repo:build-$version-$a" "$repo:$version-$a"
    podman save --quiet --format oci-archive -o "$out/wisp-agent-image-$version-$a.tar" "$repo:$version-$a"
    podman manifest add "$repo:$version" "containers-storage:$repo:$version-$a" >/dev/null
done
podman manifest push --quiet --all "$repo:$version" "oci-archive:$out/wisp-agent-image-$version.tar:$repo:$version" \
    >/dev/null
podman rmi "$repo:build-$version" "${arches[@]/#/$repo:build-$version-}" >/dev/null 2>&1 || true

rm -rf "$stage"
(cd "$out" && sha256sum -- *.tar.gz *.tar >SHA256SUMS)

say "release $version ($commit):"
(cd "$out" && for f in *.tar.gz *.tar; do printf '  %-48s %s\n' "$f" "$(mib "$(stat -c %s "$f")")"; done) >&2

[ "$check" = 0 ] || bash scripts/check-release.sh "$out"
