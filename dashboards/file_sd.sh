#!/usr/bin/env bash
# Writes Prometheus file_sd target files for a local `aha run` from its ready files.
#
#   dashboards/file_sd.sh RUN_DIR TARGETS_DIR            # once
#   dashboards/file_sd.sh RUN_DIR TARGETS_DIR --watch    # every 2 s until interrupted
#
# Each daemon of a run writes RUN_DIR/procs/<role>.ready ({"pid", "control", "metrics"} as JSON)
# once it listens; its metrics port is chosen at start (port 0), so a restarted daemon comes back
# on another one. This writes TARGETS_DIR/<role>.json,
#   [{"targets": ["127.0.0.1:41234"], "labels": {"role": "actor-0", "run": "<run dir name>"}}]
# which dashboards/prometheus.yml reads (targets/ beside it). A role whose ready file is gone
# (stopped, or being restarted) gets an empty target list. Files are replaced atomically and only
# when their content changes, so Prometheus sees no partial file.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ] || { [ $# -eq 3 ] && [ "$3" != "--watch" ]; }; then
  echo "usage: $0 RUN_DIR TARGETS_DIR [--watch]" >&2
  exit 2
fi
run_dir=$1
targets_dir=$2
watch=${3:-}
[ -d "$run_dir/procs" ] || { echo "$0: $run_dir/procs does not exist (not a run directory?)" >&2; exit 2; }
mkdir -p "$targets_dir"
run_name=$(basename "$(cd "$run_dir" && pwd)")

write_if_changed() {  # path content
  if [ ! -f "$1" ] || [ "$(cat "$1")" != "$2" ]; then
    printf '%s\n' "$2" > "$1.tmp"
    mv "$1.tmp" "$1"
  fi
}

sync_once() {
  local ready role metrics
  for ready in "$run_dir"/procs/*.ready; do
    [ -e "$ready" ] || continue
    role=$(basename "$ready" .ready)
    # The ready file is one line of JSON written by nlohmann::json; "metrics" is "host:port" or "".
    metrics=$(sed -n 's/.*"metrics":"\([^"]*\)".*/\1/p' "$ready")
    [ -n "$metrics" ] || continue
    write_if_changed "$targets_dir/$role.json" \
      "[{\"targets\": [\"$metrics\"], \"labels\": {\"role\": \"$role\", \"run\": \"$run_name\"}}]"
  done
  local target
  for target in "$targets_dir"/*.json; do
    [ -e "$target" ] || continue
    role=$(basename "$target" .json)
    [ -e "$run_dir/procs/$role.ready" ] || write_if_changed "$target" "[]"
  done
}

sync_once
if [ "$watch" = "--watch" ]; then
  while sleep 2; do sync_once; done
fi
