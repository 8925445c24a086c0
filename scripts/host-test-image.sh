#!/usr/bin/env bash
# Builds the Docker image that the host-patch tests run as their "host": a
# Debian bookworm root filesystem made by mmdebstrap with openssh-server, sudo,
# apt and dpkg, plus two helpers that simulate a boot and a reboot.
#
# The root filesystem tarball is cached in $EVENTPI_CACHE_DIR (default
# /var/cache/eventpi-autoupdate), keyed by a hash of this script, so it is
# built once per change of this script. The image is imported from the
# tarball when missing. Prints the image name on standard output.
#
# Inside the image:
#   /usr/local/sbin/eventpi-test-init    container entry point: writes a new
#       boot id to /etc/eventpi-test/boot_id, makes the kernel named in
#       /etc/eventpi-test/boot_kernel the running one (in
#       /etc/eventpi-test/kernel_release), creates missing sshd host keys and
#       runs sshd in the foreground.
#   /usr/local/sbin/eventpi-test-reboot  appends a line to
#       /etc/eventpi-test/reboots and stops the entry point one second later;
#       the container's restart policy starts it again.
#   apt reads only file:/srv/repo (a flat repository the tests mount there).
set -euo pipefail

script_path=$(readlink -f "${BASH_SOURCE[0]}")
cache_dir=${EVENTPI_CACHE_DIR:-/var/cache/eventpi-autoupdate}
script_hash=$(sha256sum "$script_path" | cut -c1-12)
tarball="$cache_dir/host-test-rootfs-bookworm-$script_hash.tar"
image="eventpi-test/host:bookworm-$script_hash"
mirror=${EVENTPI_DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() {
  echo "host-test-image.sh: $*" >&2
}

write_helpers() {
  local root=$1
  mkdir -p "$root/usr/local/sbin" "$root/etc/eventpi-test" "$root/srv/repo"

  cat >"$root/usr/local/sbin/eventpi-test-init" <<'INIT'
#!/bin/sh
# Simulated boot: new boot id, the kernel chosen by the simulated boot
# loader, sshd host keys, then sshd in the foreground as PID 1.
set -eu
state=/etc/eventpi-test
mkdir -p "$state" /run/sshd
cat /proc/sys/kernel/random/uuid >"$state/boot_id"
if [ -s "$state/boot_kernel" ]; then
  cp "$state/boot_kernel" "$state/kernel_release"
fi
ssh-keygen -A >/dev/null
exec /usr/sbin/sshd -D -e
INIT

  cat >"$root/usr/local/sbin/eventpi-test-reboot" <<'REBOOT'
#!/bin/sh
# Simulated reboot: PID 1 (sshd) gets SIGTERM one second from now, so this
# command still returns its exit status over SSH. Docker's restart policy
# then starts the container again.
date +%s >>/etc/eventpi-test/reboots
setsid -f sh -c 'sleep 1; kill -TERM 1' </dev/null >/dev/null 2>&1
echo "reboot scheduled"
REBOOT

  chmod 0755 "$root/usr/local/sbin/eventpi-test-init" "$root/usr/local/sbin/eventpi-test-reboot"

  # The running kernel at first boot, one older kernel of the same flavour
  # and a newer kernel of another flavour, as on a Pi image that carries
  # kernels for several boards.
  echo "6.6.51+rpt-rpi-v8" >"$root/etc/eventpi-test/kernel_release"
  mkdir -p "$root/lib/modules/6.6.51+rpt-rpi-v8" "$root/lib/modules/6.6.31+rpt-rpi-v8" \
           "$root/lib/modules/6.6.62+rpt-rpi-2712"

  echo "deb [trusted=yes] file:/srv/repo ./" >"$root/etc/apt/sources.list"
  rm -f "$root/etc/apt/sources.list.d/"*
  rm -f "$root/etc/ssh/ssh_host_"*
  mkdir -p "$root/root/.ssh"
  chmod 0700 "$root/root/.ssh"
}

# mmdebstrap calls this script back with the root directory as a hook.
if [ "${1:-}" = "--write-helpers" ]; then
  write_helpers "$2"
  exit 0
fi

for tool in mmdebstrap docker sha256sum; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "$tool is missing; run scripts/setup-host.sh as root"
    exit 1
  fi
done

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

# Test binaries running side by side build the tarball once.
mkdir -p "$cache_dir"
exec 9>"$cache_dir/.host-test-image.lock"
flock 9

if [ ! -s "$tarball" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  log "building $tarball from $mirror (a few minutes)"
  mmdebstrap --quiet --variant=minbase --include=openssh-server,sudo \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    --customize-hook="\"$script_path\" --write-helpers \"\$1\"" \
    bookworm "$work/rootfs.tar" "$mirror"
  mv "$work/rootfs.tar" "$tarball.partial"
  mv "$tarball.partial" "$tarball"
  # Tarballs of earlier versions of this script are not used any more.
  find "$cache_dir" -maxdepth 1 -name 'host-test-rootfs-bookworm-*.tar' ! -name "${tarball##*/}" -delete
fi

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
log "importing $tarball as $image"
docker import \
  --change 'LABEL eventpi.test=1' \
  --change 'CMD ["/usr/local/sbin/eventpi-test-init"]' \
  "$tarball" "$image" >/dev/null

# Images of earlier versions of this script are not used any more. An image
# that a container still uses stays, because rmi without -f refuses it.
docker images --format '{{.Repository}}:{{.Tag}}' eventpi-test/host | grep -v -x -F "$image" | xargs -r docker rmi >/dev/null 2>&1 || true
echo "$image"
