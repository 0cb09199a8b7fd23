#!/usr/bin/env bash
# Checks a run directory of the shortened tiny job (checkpoint.every=3) after STEPS GRPO steps, as
# `aha run` leaves it: every stage's output and log, STEPS lines of learner metrics, pass@1 after,
# final_model.txt naming the newest checkpoint, weights gone from the learner to the actor, and the
# learner stopped at its last step. Used by slurm_test.sh and image_test.sh (inside the image).
#   check_run_dir.sh RUN STEPS
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 RUN STEPS" >&2; exit 2; }
RUN=$1
STEPS=$2
say() { echo "check_run_dir: $*"; }
missing=0
for f in config.yaml final_model.txt metrics/learner.jsonl \
         logs/init.log logs/sft.log logs/eval-before.log logs/replay.log logs/rewardd.log logs/learner.log \
         logs/actor-0.log logs/eval-after.log logs/report.log \
         models/init/config.json models/sft/model.safetensors checkpoints/latest/model.safetensors \
         checkpoints/latest/tokenizer.json checkpoints/step-000003/model.safetensors \
         eval/before.json eval/after.json report/index.html report/summary.txt; do
  [ -e "$RUN/$f" ] || { say "missing $f"; missing=1; }
done
[ "$missing" -eq 0 ] || exit 1
steps=$(wc -l < "$RUN/metrics/learner.jsonl")
[ "$steps" -eq "$STEPS" ] || { say "metrics/learner.jsonl has $steps lines, want $STEPS"; exit 1; }
grep -q '"pass@1"' "$RUN/eval/after.json" || { say "eval/after.json has no pass@1"; exit 1; }
[ "$(cat "$RUN/final_model.txt")" = "$(readlink -f "$RUN/checkpoints/latest")" ] ||
  { say "final_model.txt is not the newest checkpoint"; exit 1; }
# Weights went from the learner to the actor over the learner's address, and every process was
# stopped with SIGTERM (the learner's last checkpoint is its final step's).
grep -q "swapped in policy version" "$RUN/logs/actor-0.log" || { say "the actor never loaded new weights"; exit 1; }
grep -q "stopped at step $STEPS" "$RUN/logs/learner.log" || { say "the learner did not finish its $STEPS steps"; exit 1; }
say "$RUN: complete, $STEPS steps"
