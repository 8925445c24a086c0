#!/usr/bin/env bash
# Measures the self-update handover on the local Docker engine and prints
# the figures per round and as medians. The handover time runs from the new
# image pulled to the old container gone, without the new agent's
# confirmation cycle. It is printed beside the wall time of `docker run -d`
# of the same image, with the number of self-update steps that the journal
# shows written under an older lease.
#
#   scripts/bench-self-update.sh [ROUNDS]      (default 5)
#
# The agent is built as the self-update tests build it
# (scripts/self-update-test-image.sh), in a FROM scratch image, but with the
# release profile unless AGENT_PROFILE sets another.
set -euo pipefail
cd "$(dirname "$0")/.."
export AGENT_PROFILE=${AGENT_PROFILE:-release}
BENCH_ROUNDS=${1:-5} cargo nextest run --features failpoints --test self_update_bench \
  --run-ignored only --no-capture --failure-output final 2>&1 |
  grep -E '^ *(round|[0-9]+ |median|self-update steps)' || {
    echo "bench-self-update.sh: the benchmark failed; run it with cargo nextest directly to see why" >&2
    exit 1
  }
