#!/usr/bin/env bash
# Builds the agent image that the self-update tests run, without any base
# image from a registry. The image is FROM scratch with the tests'
# busybox-static layer (sleep and wget for the test containers) and the
# agent as a stripped static x86_64 binary with the failpoints feature.
#
# The image is tagged eventpi-test/agent:<first 12 hex digits of the binary's
# sha256>, so it is built once per change of the binary; older tags of the
# same repository are removed. Prints the image name on standard output.
# Runs cargo ($CARGO or cargo), which rebuilds only what changed.
# AGENT_PROFILE=release builds the optimised agent instead of the debug one
# (the handover benchmark uses it).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cargo=${CARGO:-cargo}
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$repo/target}
busybox_image=eventpi-test/busybox:1
profile=${AGENT_PROFILE:-debug}
case $profile in
  debug) profile_flag= ;;
  release) profile_flag=--release ;;
  *) echo "self-update-test-image.sh: AGENT_PROFILE=$profile is neither debug nor release" >&2; exit 2 ;;
esac

log() {
  echo "self-update-test-image.sh: $*" >&2
}

# Tests start this script from several processes; one build at a time.
exec 9>"${TMPDIR:-/tmp}/eventpi-self-update-test-image.lock"
flock 9

RUSTFLAGS='-C target-feature=+crt-static' "$cargo" build --quiet --manifest-path "$repo/Cargo.toml" \
  --target "$target" --features failpoints --bin autoupdate $profile_flag >&2
binary=$target_dir/$target/$profile/autoupdate
if ldd "$binary" 2>&1 | grep -q '=>'; then
  log "$binary is linked dynamically; a FROM scratch image needs a static build"
  exit 1
fi

hash=$(sha256sum "$binary" | cut -c1-12)
image=eventpi-test/agent:$hash
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

if ! docker image inspect "$busybox_image" >/dev/null 2>&1; then
  log "building $busybox_image from /bin/busybox"
  cp /bin/busybox "$context/busybox"
  printf '%s\n' 'FROM scratch' 'COPY busybox /bin/busybox' 'RUN ["/bin/busybox", "--install", "-s", "/bin"]' \
    'LABEL eventpi.test=1' >"$context/Dockerfile"
  docker build --quiet --tag "$busybox_image" "$context" >&2
  rm -f "$context/busybox"
fi

log "building $image from $binary"
strip -o "$context/autoupdate" "$binary"
cat >"$context/Dockerfile" <<DOCKERFILE
FROM $busybox_image
COPY autoupdate /autoupdate
LABEL eventpi.test=1
ENTRYPOINT ["/autoupdate"]
CMD ["run", "--config", "/etc/eventpi/autoupdate.toml"]
DOCKERFILE
docker build --quiet --tag "$image" "$context" >&2

for old in $(docker images --format '{{.Repository}}:{{.Tag}}' eventpi-test/agent); do
  [ "$old" = "$image" ] || docker rmi "$old" >/dev/null 2>&1 || true
done
echo "$image"
