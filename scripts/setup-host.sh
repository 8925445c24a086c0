#!/usr/bin/env bash
# Installs the tools that the example and the tests need on a Debian 12 host.
# They are Compose v2 (from Debian trixie's package, unpacked as a CLI plugin),
# the registry with htpasswd (apache2-utils) for its basic authentication,
# sshd and ssh-keygen, graphviz, busybox-static, the cross linkers and the disk
# image tools of tests/provision.rs (sfdisk, mkfs.vfat, e2fsprogs).
# Safe to run again: each step is skipped when its result is already present.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host.sh: run as root (it installs Debian packages)" >&2
    exit 1
  fi
}

install_debian_packages() {
  local wanted=(docker-registry openssh-server openssh-client graphviz busybox-static
                dpkg-dev mmdebstrap e2fsprogs fdisk dosfstools parted util-linux
                gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf qemu-user-static
                libc6-dev-arm64-cross libc6-dev-armhf-cross
                apache2-utils python3-prometheus-client)
  local missing=()
  for package in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup-host.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# Debian 12 ships Compose v1 only. Trixie's docker-compose 2.x depends on
# libc6 >= 2.34 alone, so its binary runs here as a docker CLI plugin.
install_compose_v2() {
  local plugin_dir=/usr/local/lib/docker/cli-plugins
  # Trixie's build prints "2.26.1-4" without the "v" that upstream builds
  # print ("v2.x.y").
  if docker compose version --short 2>/dev/null | grep -Eq '^v?2\.'; then
    return
  fi
  local work
  work=$(mktemp -d)
  mkdir -p "$work/lists/partial" "$work/archives/partial"
  echo "deb http://deb.debian.org/debian trixie main" >"$work/sources.list"
  local apt_options=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
                     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
                     -o Debug::NoLocking=1)
  apt-get "${apt_options[@]}" update -qq
  (cd "$work" && apt-get "${apt_options[@]}" download docker-compose)
  dpkg -x "$work"/docker-compose_*.deb "$work/root"
  mkdir -p "$plugin_dir"
  install -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-compose" "$plugin_dir/docker-compose"
  rm -rf "$work"
  docker compose version
}

install_rust_targets() {
  if command -v rustup >/dev/null 2>&1; then
    rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf >/dev/null 2>&1 || \
      echo "setup-host.sh: rustup could not add the cross targets; cross builds will fail" >&2
  fi
}

need_root
install_debian_packages
install_compose_v2
install_rust_targets
echo "setup-host.sh: host ready"
