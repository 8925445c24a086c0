#!/usr/bin/env bash
# Runs the agent against a local example: a registry and a git server on
# 127.0.0.1, a two-service stack (web and db) on a device branch, and a
# scenario that pushes a good update and then commits the agent must refuse.
# Everything lives in .work/example; `example/run.sh --clean` removes it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work="$root/.work/example"
registry_port=${EXAMPLE_REGISTRY_PORT:-5550}
git_port=${EXAMPLE_GIT_PORT:-9550}
web_port=${EXAMPLE_WEB_PORT:-8088}
registry="127.0.0.1:$registry_port"
project=eventpi-example
branch=device-0001
agent="$root/target/debug/autoupdate"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
fail() { printf 'example: %s\n' "$*" >&2; exit 1; }

clean() {
  docker ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r docker rm -f >/dev/null
  docker network ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker network rm >/dev/null
  docker volume ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker volume rm >/dev/null
  docker images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$registry/example/*" | xargs -r docker rmi -f >/dev/null
  docker images --format '{{.Repository}}:{{.Tag}}' --filter "reference=autoupdate-keep/$project:*" | xargs -r docker rmi >/dev/null
  docker images --format '{{.Repository}}:{{.Tag}}' --filter "reference=eventpi-example/busybox:*" | xargs -r docker rmi >/dev/null 2>&1 || true
  rm -rf "$work"
}

if [ "${1:-}" = "--clean" ]; then
  clean
  echo "example: removed $work and the example's containers and images"
  exit 0
fi

for tool in docker git docker-registry busybox curl; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run 'sudo scripts/setup-host.sh' first"
done
docker compose version >/dev/null 2>&1 || fail "docker compose v2 is missing: run 'sudo scripts/setup-host.sh' first"
# An earlier run's web container uses the web port, so clean up first.
clean
for port in "$registry_port" "$git_port" "$web_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port on 127.0.0.1 is in use by another program; set EXAMPLE_REGISTRY_PORT, EXAMPLE_GIT_PORT or EXAMPLE_WEB_PORT"
  fi
done
mkdir -p "$work"
pids=()
agent_pid=
stop_all() {
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
  fi
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

say "Building the agent"
(cd "$root" && cargo build --quiet)

say "Starting a registry on $registry and a git server on 127.0.0.1:$git_port"
mkdir -p "$work/registry" "$work/git"
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $registry
YAML
setsid docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
setsid git daemon --reuseaddr --export-all --listen=127.0.0.1 --port="$git_port" \
  --base-path="$work/git" "$work/git" >"$work/git-daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fsS "http://$registry/v2/" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://$registry/v2/" >/dev/null || fail "the registry did not start: see $work/registry.log"

say "Building the example images FROM scratch with busybox, and pushing them"
base="$work/images/base"
mkdir -p "$base"
cp "$(command -v busybox)" "$base/busybox"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n' >"$base/Dockerfile"
docker build --quiet --tag eventpi-example/busybox:1 "$base" >/dev/null 2>>"$work/build.log"
build_image() { # name tag command [healthcheck]
  local dir="$work/images/$1-$2"
  mkdir -p "$dir"
  {
    echo "FROM eventpi-example/busybox:1"
    echo "LABEL example.version=\"$1 $2\""
    [ -n "${4:-}" ] && echo "HEALTHCHECK --interval=2s --timeout=2s --retries=2 CMD $4"
    echo "CMD [\"sh\", \"-c\", \"$3\"]"
  } >"$dir/Dockerfile"
  docker build --quiet --tag "$registry/example/$1:$2" "$dir" >/dev/null 2>>"$work/build.log"
  docker push --quiet "$registry/example/$1:$2" >/dev/null
  echo "  pushed $registry/example/$1:$2"
}
web() { echo "mkdir -p /www && echo '<h1>example web $1</h1>' > /www/index.html && exec httpd -f -p 8080 -h /www"; }
build_image web v1 "$(web v1)" "wget -q -O /dev/null http://127.0.0.1:8080/"
build_image web v2 "$(web v2)" "wget -q -O /dev/null http://127.0.0.1:8080/"
build_image web v3 "echo web v3 starting; sleep 2; echo web v3 crashed >&2; exit 1"
build_image db v1 "mkdir -p /data && echo ready > /data/state && trap 'exit 0' TERM; while true; do sleep 1; done"

say "Creating the stack repository with the device branch $branch"
git init --quiet --bare --initial-branch=main "$work/git/stack.git"
git init --quiet --initial-branch="$branch" "$work/operator"
cd "$work/operator"
git config user.name "Example Operator"
git config user.email operator@example.invalid
git remote add origin "$work/git/stack.git"
compose() { # web-image
  cat <<YAML
services:
  web:
    image: $registry/example/web:$1
    ports: ["127.0.0.1:$web_port:8080"]
    restart: unless-stopped
    stop_grace_period: 2s
  db:
    image: $registry/example/db:v1
    volumes: ["db-data:/data"]
    stop_grace_period: 2s
volumes:
  db-data: {}
YAML
}
commit() { # message web-image
  compose "$2" >compose.yaml
  git add compose.yaml
  git commit --quiet -m "$1"
  git push --quiet --force origin "HEAD:refs/heads/$branch"
  git rev-parse HEAD
}
first=$(commit "Run web v1 and db" v1)
echo "  commit ${first:0:12}: web v1 and db"

cat >"$work/agent.toml" <<TOML
[agent]
name = "example-device"

[journal]
directory = "$work/device/reserved/journal"
size_kib = 1024

[control]
socket = "$work/device/autoupdate.sock"

[stack]
repository = "git://127.0.0.1:$git_port/stack.git"
branch = "$branch"
checkout = "$work/device/stack"
project = "$project"
poll_interval = "2s"
probation = "6s"
retry_backoff_min = "2s"
retry_backoff_max = "10s"
TOML
"$agent" check-config "$work/agent.toml" >/dev/null

say "Starting the agent (its log follows; the LED is simulated in the log)"
AUTOUPDATE_LOG=info "$agent" run --config "$work/agent.toml" 2>&1 | sed -u 's/^/  agent | /' &
agent_pid=$(pgrep -n -f "autoupdate run --config $work/agent.toml" || true)
status() { "$agent" status --journal "$work/device/reserved/journal" 2>/dev/null || true; }
wait_for() { # description text
  for _ in $(seq 150); do
    if status | grep -q "$2"; then return 0; fi
    sleep 1
  done
  fail "timed out waiting for: $1"
}

wait_for "the first commit to be applied" "known-good commit $first"
say "Applied ${first:0:12}; the web service answers: $(curl -fsS "http://127.0.0.1:$web_port/")"

second=$(commit "Update web to v2" v2)
say "Pushed ${second:0:12}, which updates web to v2"
wait_for "the update to be applied" "known-good commit $second"
say "Applied ${second:0:12}; the web service answers: $(curl -fsS "http://127.0.0.1:$web_port/")"

third=$(commit "Update web to v9, which was never pushed" v9)
say "Pushed ${third:0:12}, which names the image web:v9 that the registry does not have"
wait_for "the bad commit to be refused" "rejected commit ${third:0:12}"
say "Refused ${third:0:12}; the stack still runs ${second:0:12}: $(curl -fsS "http://127.0.0.1:$web_port/")"

fourth=$(commit "Update web to v3, which crashes after two seconds" v3)
say "Pushed ${fourth:0:12}, whose web v3 crashes two seconds after it starts"
wait_for "the agent to roll back" "last outcome: rolled back"
say "Rolled back to ${second:0:12} by its pinned digests: $(curl -fsS "http://127.0.0.1:$web_port/")"

printf 'services:\n  web:\n    image: %s/example/web:v2\n   ports: [oops\n' "$registry" >compose.yaml
git commit --quiet -am "Break the YAML"
git push --quiet --force origin "HEAD:refs/heads/$branch"
fifth=$(git rev-parse HEAD)
say "Pushed ${fifth:0:12}, whose compose.yaml is not valid YAML"
wait_for "the broken commit to be refused" "rejected commit ${fifth:0:12}"

say "Stopping the agent"
kill -TERM "$agent_pid"
wait "$agent_pid" 2>/dev/null || true
agent_pid=
sleep 1

say "The journal: every transition, replayed"
"$agent" replay --journal "$work/device/reserved/journal"
say "The status a technician sees"
status
say "Done. The example stack keeps running; remove everything with: example/run.sh --clean"
