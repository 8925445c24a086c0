#!/usr/bin/env bash
# Removes what tests leave in the shared Docker engine when they are killed
# before their own cleanup runs: everything labelled eventpi.test=1, the
# Compose projects named eventpi-test-*, and their keep-tags and factory tags.
set -uo pipefail

docker ps -aq --filter label=eventpi.test=1 | xargs -r docker rm -f >/dev/null
for project in $(docker ps -a --format '{{.Label "com.docker.compose.project"}}' | grep '^eventpi-test-' | sort -u); do
  docker ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r docker rm -f >/dev/null
done
docker network ls --format '{{.Name}}' | grep '^eventpi-test-' | xargs -r docker network rm >/dev/null 2>&1
docker volume ls --format '{{.Name}}' | grep '^eventpi-test-' | xargs -r docker volume rm -f >/dev/null 2>&1
docker images --format '{{.Repository}}:{{.Tag}}' | grep -E '^autoupdate-(keep|factory)/eventpi-test-|^127\.0\.0\.1:[0-9]+/' | grep -v '/example/' | xargs -r docker rmi -f >/dev/null 2>&1
exit 0
