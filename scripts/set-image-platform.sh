#!/usr/bin/env bash
# Copies a local image under a new tag with another platform in its
# configuration:  set-image-platform.sh SOURCE PLATFORM TAG
# PLATFORM is os/arch or os/arch/variant, such as linux/arm64.
#
# Docker Engine 20.10's `docker import --platform` keeps the engine's own
# architecture in the image configuration, so this script rewrites the
# configuration instead: docker save, set os/architecture/variant in the
# config JSON, store it under its new sha256, point manifest.json at it,
# docker load. The layers stay byte for byte the same. Needs python3.
set -euo pipefail

if [ "$#" -ne 3 ]; then
  echo "usage: $0 SOURCE PLATFORM TAG (for example: $0 agent:amd64 linux/arm64 agent:arm64)" >&2
  exit 2
fi
source=$1
platform=$2
tag=$3
IFS=/ read -r os architecture variant <<<"$platform"
if [ -z "$os" ] || [ -z "${architecture:-}" ]; then
  echo "set-image-platform.sh: $platform is not a platform: write os/arch or os/arch/variant" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
docker save "$source" | tar -x -C "$work"

python3 - "$work" "$os" "$architecture" "${variant:-}" "$tag" <<'PYTHON'
import hashlib
import json
import os
import sys

work, os_name, architecture, variant, tag = sys.argv[1:]
manifest_path = os.path.join(work, "manifest.json")
with open(manifest_path) as file:
    manifest = json.load(file)
if len(manifest) != 1:
    sys.exit(f"set-image-platform.sh: the saved archive holds {len(manifest)} images, expected one")
entry = manifest[0]
config_path = os.path.join(work, entry["Config"])
with open(config_path) as file:
    config = json.load(file)

config["os"] = os_name
config["architecture"] = architecture
if variant:
    config["variant"] = variant
else:
    config.pop("variant", None)

data = json.dumps(config, separators=(",", ":")).encode()
name = hashlib.sha256(data).hexdigest() + ".json"
with open(os.path.join(work, name), "wb") as file:
    file.write(data)
if os.path.join(work, name) != config_path:
    os.remove(config_path)
entry["Config"] = name
entry["RepoTags"] = [tag]
with open(manifest_path, "w") as file:
    json.dump(manifest, file)
PYTHON

# The legacy tag index would tag the old configuration too.
rm -f "$work/repositories"
tar -c -C "$work" . | docker load >&2
docker image inspect --format "$tag is {{.Os}}/{{.Architecture}}{{if .Variant}}/{{.Variant}}{{end}}" "$tag"
