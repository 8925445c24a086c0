#!/usr/bin/env bash
# Builds the agent's linux/arm64 image on an x86_64 Debian 12 machine that
# cannot pull base images, and checks it:
#
#   scripts/build-arm64-image.sh [TAG]      (default eventpi/autoupdate:arm64)
#
# 1. The agent: cargo build --release --target aarch64-unknown-linux-gnu
#    --features gpio (linker from .cargo/config.toml; scripts/setup-host.sh
#    installs gcc-aarch64-linux-gnu and adds the Rust target).
# 2. The tools layer: Debian bookworm's arm64 packages git, openssh-client
#    and ca-certificates with every dependency apt resolves for them, and the
#    docker-compose binary (Compose v2) of Debian trixie's arm64 package,
#    unpacked with dpkg -x. No maintainer script runs, since an arm64 script
#    cannot run here, so the script writes what they would: /etc/passwd,
#    /etc/group and the CA bundle. The root filesystem tarball is cached in
#    $EVENTPI_CACHE_DIR (default /var/cache/eventpi-autoupdate), keyed by a
#    hash of this script, and imported as its own image, so that the agent's
#    layer sits on top of a layer that changes only with this script.
# 3. The image: the agent binary in a second layer, then the configuration
#    rewritten to linux/arm64 by scripts/set-image-platform.sh, because
#    Docker Engine 20.10's docker import --platform keeps the engine's own
#    architecture.
# 4. The check: the image's configuration names linux/arm64, and the agent,
#    Compose and git from the image's own filesystem run under
#    qemu-aarch64-static with that filesystem as their root for libraries.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=${1:-eventpi/autoupdate:arm64}
cargo=${CARGO:-cargo}
target=aarch64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$repo/target}
cache_dir=${EVENTPI_CACHE_DIR:-/var/cache/eventpi-autoupdate}
mirror=${EVENTPI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
script_hash=$(sha256sum "$(readlink -f "${BASH_SOURCE[0]}")" | cut -c1-12)
rootfs_tar=$cache_dir/arm64-tools-rootfs-$script_hash.tar
tools_image=eventpi/autoupdate-tools:arm64-$script_hash

log() {
  echo "build-arm64-image.sh: $*" >&2
}

for tool in qemu-aarch64-static aarch64-linux-gnu-gcc dpkg apt-get python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "$tool is missing; run scripts/setup-host.sh as root"
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Runs apt-get for arm64 with its own lists, cache and an empty dpkg status,
# so that it resolves every dependency and touches nothing of the host.
apt_arm64() {
  local suite=$1
  shift
  local dir=$work/apt-$suite
  mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/etc/preferences.d"
  [ -e "$dir/status" ] || : >"$dir/status"
  echo "deb [arch=arm64] $mirror $suite main" >"$dir/sources.list"
  apt-get -q -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::Etc::Preferences="$dir/etc/preferences" -o Dir::Etc::PreferencesParts="$dir/etc/preferences.d" \
    -o Dir::State::Lists="$dir/lists" -o Dir::State::status="$dir/status" -o Dir::Cache::Archives="$dir/archives" \
    -o Dir::Cache="$dir" -o APT::Architecture=arm64 -o APT::Architectures::=arm64 \
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

build_rootfs() {
  local rootfs=$work/rootfs
  mkdir -p "$rootfs"
  log "resolving bookworm arm64 packages for git, openssh-client and ca-certificates"
  apt_arm64 bookworm update >&2
  apt_arm64 bookworm install --download-only --yes --no-install-recommends libc6 git openssh-client ca-certificates >&2
  for deb in "$work"/apt-bookworm/archives/*.deb; do
    dpkg-deb -x "$deb" "$rootfs"
  done

  log "unpacking docker-compose (Compose v2) from trixie's arm64 package"
  apt_arm64 trixie update >&2
  (cd "$work" && apt_arm64 trixie download docker-compose >&2)
  dpkg-deb -x "$work"/docker-compose_*_arm64.deb "$work/compose"
  install -D -m 0755 "$work/compose/usr/libexec/docker/cli-plugins/docker-compose" "$rootfs/usr/local/bin/docker-compose"

  # What the maintainer scripts of base-passwd and ca-certificates would write.
  mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/root" "$rootfs/run"
  chmod 1777 "$rootfs/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
  find "$rootfs/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z | xargs -0 cat >"$rootfs/etc/ssl/certs/ca-certificates.crt"

  mkdir -p "$cache_dir"
  tar -c -C "$rootfs" --numeric-owner . >"$rootfs_tar.partial"
  mv "$rootfs_tar.partial" "$rootfs_tar"
}

log "building the agent for $target (release)"
"$cargo" build --quiet --release --locked --manifest-path "$repo/Cargo.toml" --target "$target" --features gpio >&2
binary=$target_dir/$target/release/autoupdate

if [ ! -s "$rootfs_tar" ]; then
  build_rootfs
fi
if ! docker image inspect "$tools_image" >/dev/null 2>&1; then
  log "importing the tools layer as $tools_image"
  docker import "$rootfs_tar" "$tools_image" >/dev/null
fi

context=$work/context
mkdir -p "$context"
cp "$binary" "$context/autoupdate"
cat >"$context/Dockerfile" <<DOCKERFILE
FROM $tools_image
COPY autoupdate /usr/local/bin/autoupdate
LABEL org.opencontainers.image.title="eventpi-autoupdate" \\
      org.opencontainers.image.description="Keeps a headless Raspberry Pi up to date"
ENTRYPOINT ["/usr/local/bin/autoupdate"]
CMD ["run", "--config", "/etc/eventpi/autoupdate.toml"]
DOCKERFILE
docker build --quiet --tag "$tag-unlabelled" "$context" >/dev/null
"$repo/scripts/set-image-platform.sh" "$tag-unlabelled" linux/arm64 "$tag" >&2
docker rmi "$tag-unlabelled" >/dev/null

log "checking $tag"
platform=$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$tag")
if [ "$platform" != linux/arm64 ]; then
  log "the image's configuration says $platform, not linux/arm64"
  exit 1
fi
layers=$(docker image inspect --format '{{len .RootFS.Layers}}' "$tag")
container=$(docker create "$tag" 2>/dev/null)
mkdir -p "$work/image"
docker export "$container" | tar -x -C "$work/image"
docker rm "$container" >/dev/null
qemu() {
  qemu-aarch64-static -L "$work/image" "$work/image$1" "${@:2}"
}
agent_version=$(qemu /usr/local/bin/autoupdate --version)
compose_version=$(qemu /usr/local/bin/docker-compose version --short)
git_version=$(qemu /usr/bin/git --version)
ssh_version=$(qemu /usr/bin/ssh -V 2>&1)
size=$(docker image inspect --format '{{.Size}}' "$tag")
agent_layer=$(stat -c %s "$binary")
cat <<REPORT
image:     $tag ($platform, $layers layers, $((size / 1024 / 1024)) MiB; agent layer $((agent_layer / 1024 / 1024)) MiB)
agent:     $agent_version
compose:   $compose_version
git:       $git_version
ssh:       $ssh_version
REPORT
