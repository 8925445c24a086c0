#!/usr/bin/env bash
# Runs the self-update handover benchmark (scripts/bench-self-update.sh) and
# prints its medians as `key value` lines for bench/run.sh.
#
# Settings (environment):
#   BENCH_HANDOVERS  handover rounds (5)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
output=$("$root/scripts/bench-self-update.sh" "${BENCH_HANDOVERS:-5}")
printf '%s\n' "$output" >&2
printf '%s\n' "$output" | python3 -c '
import re, sys
text = sys.stdin.read()
median = re.search(r"median handover (\d+) ms, median docker run -d (\d+) ms, ratio ([0-9.]+)", text)
steps = re.search(r"newer lease: (\d+)", text)
if not median or not steps:
    sys.exit("handover.sh: the benchmark printed no medians; run scripts/bench-self-update.sh to see why")
rounds = [line.split()[1] for line in text.splitlines() if re.match(r"\s*\d+\s+\d+", line)]
print("handover.ms_median", median.group(1), "(rounds:", " ".join(rounds) + ")")
print("handover.docker_run_ms_median", median.group(2))
print("handover.ratio", round(int(median.group(1)) / max(int(median.group(2)), 1), 2))
print("handover.steps_under_older_lease", steps.group(1))
'
