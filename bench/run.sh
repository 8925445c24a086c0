#!/usr/bin/env bash
# Measures the agent's footprint and costs and prints one line per figure,
# then a summary against the targets. `make bench` runs it.
#
# Settings (environment):
#   BENCH_RSS_MINUTES  minutes of polling before resident memory is read (10)
#   BENCH_POLLS        seconds of 1-second polls for the poll-cost figures (60)
#   BENCH_UPDATES      stack updates timed against plain `docker compose up -d` (5)
#   BENCH_SKIP_CROSS   set to 1 to skip the aarch64 and armv7 builds
#   BENCH_HANDOVERS    self-update handovers timed against docker run -d (5)
#   BENCH_SKIP_HANDOVER  set to 1 to skip the handover figures
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work="$root/.work/bench"
rss_minutes=${BENCH_RSS_MINUTES:-10}
poll_seconds=${BENCH_POLLS:-60}
updates=${BENCH_UPDATES:-5}
project=eventpi-bench
plain_project=eventpi-bench-plain
branch=bench-device
agent="$root/target/release/autoupdate"

say() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'bench: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
record() { # key value
  printf '%s %s\n' "$1" "$2" >>"$work/results.txt"
  printf '  %-44s %s\n' "$1" "$2"
}

pids=()
agent_pid=
cleanup() {
  if [ -n "$agent_pid" ]; then kill -TERM "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
  for name in "$project" "$plain_project"; do
    docker ps -aq --filter "label=com.docker.compose.project=$name" | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network ls -q --filter "label=com.docker.compose.project=$name" | xargs -r docker network rm >/dev/null 2>&1 || true
  done
  docker images --format '{{.Repository}}:{{.Tag}}' | grep -E "^(127\.0\.0\.1:$registry_port/bench/|autoupdate-keep/$project:)" | xargs -r docker rmi -f >/dev/null 2>&1 || true
}
registry_port=0
trap cleanup EXIT

rm -rf "$work"
mkdir -p "$work"
: >"$work/results.txt"

say "Machine"
record machine.cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
record machine.cores "$(nproc)"
record machine.memory_mib "$(( $(grep MemTotal /proc/meminfo | awk '{print $2}') / 1024 ))"
record machine.kernel "$(uname -r)"
record machine.docker_engine "$(docker version --format '{{.Server.Version}}')"
record machine.compose "$(docker compose version --short)"

say "Release binaries (stripped by the release profile)"
(cd "$root" && cargo build --quiet --release --bin autoupdate)
record binary.x86_64_bytes "$(stat -c %s "$root/target/release/autoupdate")"
if [ "${BENCH_SKIP_CROSS:-0}" != 1 ]; then
  for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    (cd "$root" && cargo build --quiet --release --bin autoupdate --target "$target")
    record "binary.${target%%-*}_bytes" "$(stat -c %s "$root/target/$target/release/autoupdate")"
  done
  version=$(qemu-aarch64-static -L /usr/aarch64-linux-gnu "$root/target/aarch64-unknown-linux-gnu/release/autoupdate" --version)
  record binary.aarch64_runs_under_qemu "$version"
fi

say "Journal"
(cd "$root" && cargo bench --quiet --bench journal 2>/dev/null) | while read -r key value; do record "$key" "$value"; done

say "Servers: a registry, git daemon and a byte-counting proxy in front of git"
registry_port=$(free_port)
git_port=$(free_port)
proxy_port=$(free_port)
registry="127.0.0.1:$registry_port"
mkdir -p "$work/registry" "$work/git"
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $registry
YAML
setsid docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
setsid git daemon --verbose --reuseaddr --export-all --listen=127.0.0.1 --port="$git_port" \
  --base-path="$work/git" "$work/git" >"$work/git-daemon.log" 2>&1 &
pids+=($!)
setsid python3 "$root/bench/count_proxy.py" "$proxy_port" "$git_port" "$work/git-proxy.stats" >"$work/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fsS "http://$registry/v2/" >/dev/null 2>&1 && break; sleep 0.2; done

say "Images FROM scratch with busybox, pushed"
mkdir -p "$work/images/base"
cp "$(command -v busybox)" "$work/images/base/busybox"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n' >"$work/images/base/Dockerfile"
docker build --quiet --tag eventpi-bench/busybox:1 "$work/images/base" >/dev/null 2>>"$work/build.log"
for version in v1 v2; do
  mkdir -p "$work/images/$version"
  printf 'FROM eventpi-bench/busybox:1\nLABEL bench.version=%s\nCMD ["sh", "-c", "trap \x27exit 0\x27 TERM; while true; do sleep 1; done"]\n' "$version" >"$work/images/$version/Dockerfile"
  docker build --quiet --tag "$registry/bench/web:$version" "$work/images/$version" >/dev/null 2>>"$work/build.log"
  docker push --quiet "$registry/bench/web:$version" >/dev/null
done

compose_for() { # version
  printf 'services:\n  web:\n    image: %s/bench/web:%s\n    stop_grace_period: 1s\n  db:\n    image: %s/bench/web:v1\n    stop_grace_period: 1s\n' "$registry" "$1" "$registry"
}
git init --quiet --bare --initial-branch=main "$work/git/stack.git"
git init --quiet --initial-branch="$branch" "$work/operator"
git -C "$work/operator" config user.name Bench
git -C "$work/operator" config user.email bench@example.invalid
git -C "$work/operator" remote add origin "$work/git/stack.git"
commit() { # version message
  compose_for "$1" >"$work/operator/compose.yaml"
  git -C "$work/operator" add compose.yaml
  git -C "$work/operator" commit --quiet --allow-empty -m "$2"
  git -C "$work/operator" push --quiet --force origin "HEAD:refs/heads/$branch"
  git -C "$work/operator" rev-parse HEAD
}
first=$(commit v1 "web v1")

cat >"$work/agent.toml" <<TOML
[journal]
directory = "$work/device/reserved/journal"

[stack]
repository = "git://127.0.0.1:$proxy_port/stack.git"
branch = "$branch"
checkout = "$work/device/stack"
project = "$project"
poll_interval = "1s"
poll_jitter_percent = 0
probation = "3s"

[control]
socket = "$work/control.sock"
TOML
status() { "$agent" status --journal "$work/device/reserved/journal" 2>/dev/null || true; }
wait_for() { # text
  for _ in $(seq 300); do status | grep -q "$1" && return 0; sleep 0.5; done
  fail "timed out waiting for: $1"
}

say "Agent: release build, 1-second polls"
AUTOUPDATE_LOG=warn setsid "$agent" run --config "$work/agent.toml" >"$work/agent.log" 2>&1 &
agent_pid=$!
agent_started=$(date +%s)
wait_for "known-good commit $first"

cpu_ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$agent_pid/stat"; }
proxy_stat() { tr ' ' '\n' <"$work/git-proxy.stats" | grep "^$1=" | cut -d= -f2; }
upload_packs() { grep -c 'Request upload-pack' "$work/git-daemon.log" || true; }
registry_requests() { grep -c 'http.request.method' "$work/registry.log" || true; }

say "Poll cost over ${poll_seconds}s of polls where nothing changed"
sleep 3
ticks_before=$(cpu_ticks); packs_before=$(upload_packs); registry_before=$(registry_requests)
bytes_before=$(proxy_stat bytes_down); up_before=$(proxy_stat bytes_up)
sleep "$poll_seconds"
ticks_after=$(cpu_ticks); packs_after=$(upload_packs); registry_after=$(registry_requests)
bytes_after=$(proxy_stat bytes_down); up_after=$(proxy_stat bytes_up)
polls=$((packs_after - packs_before))
[ "$polls" -gt 0 ] || fail "no poll reached the git daemon"
tick=$(getconf CLK_TCK)
record poll.count "$polls"
record poll.cpu_ms_per_poll "$(python3 -c "print(round(($ticks_after - $ticks_before) * 1000 / $tick / $polls, 2))")"
record poll.git_ref_advertisements_per_poll "$(python3 -c "print(round(($packs_after - $packs_before) / $polls, 2))")"
record poll.bytes_downloaded_per_poll "$(( (bytes_after - bytes_before) / polls ))"
record poll.bytes_uploaded_per_poll "$(( (up_after - up_before) / polls ))"
record poll.registry_requests_per_poll "$(python3 -c "print(round(($registry_after - $registry_before) / $polls, 2))")"

say "Stack update with the images present: agent against plain docker compose up -d"
docker pull --quiet "$registry/bench/web:v2" >/dev/null
agent_times=()
for round in $(seq "$updates"); do
  version=$([ $((round % 2)) -eq 1 ] && echo v2 || echo v1)
  pushed=$(now_ms)
  target=$(commit "$version" "round $round")
  "$agent" update-now --config "$work/agent.toml" >"$work/update-$round.log" 2>&1 || fail "update-now failed: $(cat "$work/update-$round.log")"
  applied=$("$agent" replay --json --journal "$work/device/reserved/journal" |
    python3 -c 'import json,sys; print([t for t in json.load(sys.stdin) if t["event"]=="Applied"][-1]["wall_ms"])')
  agent_times+=($((applied - pushed)))
  wait_for "known-good commit $target"
done
plain_dir="$work/plain"
mkdir -p "$plain_dir"
plain_times=()
for round in $(seq "$updates"); do
  version=$([ $((round % 2)) -eq 1 ] && echo v2 || echo v1)
  compose_for "$version" >"$plain_dir/compose.yaml"
  started=$(now_ms)
  docker compose --ansi never --progress plain -p "$plain_project" -f "$plain_dir/compose.yaml" up -d >/dev/null 2>&1
  plain_times+=($(( $(now_ms) - started )))
done
mean() { python3 -c "import sys; values=[int(v) for v in sys.argv[1:]]; print(round(sum(values)/len(values)))" "$@"; }
agent_mean=$(mean "${agent_times[@]}")
plain_mean=$(mean "${plain_times[@]}")
record update.agent_ms_mean "$agent_mean (rounds: ${agent_times[*]})"
record update.plain_compose_ms_mean "$plain_mean (rounds: ${plain_times[*]})"
record update.ratio "$(python3 -c "print(round($agent_mean / $plain_mean, 2))")"
record update.budget_ms "$(python3 -c "print(round($plain_mean * 1.2 + 500))")"

say "Resident memory after ${rss_minutes} minutes of polling"
remaining=$(( rss_minutes * 60 - ($(date +%s) - agent_started) ))
[ "$remaining" -gt 0 ] && sleep "$remaining"
record rss.minutes_running "$(( ($(date +%s) - agent_started) / 60 ))"
record rss.vm_rss_kib "$(awk '/^VmRSS/ {print $2}' "/proc/$agent_pid/status")"
record rss.vm_hwm_kib "$(awk '/^VmHWM/ {print $2}' "/proc/$agent_pid/status")"
record rss.private_kib "$(awk '/^Private_(Clean|Dirty)/ {sum += $2} END {print sum}' "/proc/$agent_pid/smaps_rollup")"
record rss.pss_kib "$(awk '/^Pss:/ {print $2}' "/proc/$agent_pid/smaps_rollup")"
record rss.anonymous_kib "$(awk '/^Anonymous:/ {print $2}' "/proc/$agent_pid/smaps_rollup")"

if [ "${BENCH_SKIP_HANDOVER:-0}" != 1 ]; then
  say "Self-update handover (release agent in a FROM scratch image)"
  "$root/bench/handover.sh" | while read -r key value; do record "$key" "$value"; done
fi

say "Summary against the targets"
python3 "$root/bench/summary.py" "$work/results.txt"
