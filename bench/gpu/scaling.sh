#!/usr/bin/env bash
# Issue 11's scaling runs on the four-GPU machine (the device tool's nvidia-h200-x4), from a
# checkout with dist/ carried (BUNDLE_PACK=1 scripts/bundle.sh, with the Qwen3 tokenizer in
# dist/share). Each part is one `aha run` through every daemon; figures come from the learner's
# metrics/learner.jsonl and are printed as a table at the end.
#   bench/gpu/scaling.sh OUT_DIR [actors] [dp] [pipeline]
#   actors:   configs/small-gpu.yaml's GRPO stage from a fresh model (every completion runs to
#             max_new_tokens, so the work per step is fixed), learner on cuda:0, 1, 2, 3 actors on
#             cuda:1..3: generated tokens per second taken in by the learner, steps 6..6+ACTOR_STEPS
#             (default 20), at grpo.max_staleness ACTOR_STALENESS (default 1; with 1 every actor
#             generates for the same next version, so more actors cannot overlap steps), and the
#             actors' own summed rates; bench/gpu/actor_scaling.py prints the table against 1 actor.
#   poll:     replay.poll_ms 200 (the old fixed hint) vs 5 with one actor, same job as actors.
#   dp:       `aha bench train` on the 0.5B shape, 64 x 1024 tokens in micro-batches of 32k,
#             on cuda:0 vs cuda:0,cuda:1.
#   pipeline: the Qwen2.5-0.5B shape (random weights, the Qwen3 tokenizer) through the whole
#             pipeline at 8 groups x 16 samples x 512 new tokens, PIPELINE_ACTORS actors (default
#             3) on cuda:1..: the step-time split, at grpo.max_staleness PIPELINE_STALENESS
#             (default 1; at 2 an actor leases two steps' prompts and decodes them as one batch).
#             PIPELINE_STEPS (default 8) optimizer steps, timed from step 2.
# Derived job files are written beside the originals (configs/.scale-*.yaml, removed at exit): the
# paths inside a job file are relative to it.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:?usage: scaling.sh OUT_DIR [actors] [poll] [dp] [pipeline]}
shift
what=${*:-actors dp pipeline}
mkdir -p "$out"
aha=dist/bin/aha
trap 'rm -f configs/.scale-*.yaml' EXIT

# job_with_actors IN OUT N: IN with its actors on cuda:1..N.
job_with_actors() {
  local list="" i
  for ((i = 1; i <= $3; ++i)); do list+="${list:+, }{device: \"cuda:$i\"}"; done
  sed "s/^  actors: .*/  actors: [$list]/" "$1" > "$2"
}

# summarise NAME RUN_DIR FIRST_STEP: one JSON line from the run's learner.jsonl.
summarise() {
  python3 - "$1" "$2/metrics/learner.jsonl" "$3" <<'PY' | tee -a "$out/summary.jsonl"
import json, sys
name, path, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(path)]
use = [r for r in rows if r["step"] > first]
t0 = next(r["time"] for r in rows if r["step"] == first)
wall = use[-1]["time"] - t0
gen = sum(r["length"] for r in use)  # mean completion length per step; x samples below
mean = lambda k: sum(r[k] for r in use) / len(use)  # noqa: E731
print(json.dumps({"run": name, "steps": len(use), "wall_s": round(wall, 3), "step_s": round(wall / len(use), 4),
                  "trained_tokens_per_s": round(sum(r["tokens"] for r in use) / wall),
                  "mean_length": round(gen / len(use), 1),
                  "split_s": {k: round(mean(k), 4) for k in ("wait_s", "forward_s", "backward_s", "optimizer_s", "publish_s")},
                  "staleness_max": max(r["staleness"] for r in use), "staleness_mean": round(mean("staleness"), 3),
                  "mfu": round(mean("mfu"), 4)}))
PY
}

if [[ $what == *actors* ]]; then
  rm -f "$out/actors.jsonl"
  for n in 1 2 3; do
    job=configs/.scale-actors-$n.yaml
    job_with_actors configs/small-gpu.yaml "$job" "$n"
    sed -i 's/^stages: .*/stages: [grpo]/' "$job"
    run=/tmp/aha-scale-actors-$n
    rm -rf "$run"
    timeout 150 $aha run "$job" --run-dir "$run" --no-eval --set grpo.steps="$((6 + ${ACTOR_STEPS:-20}))" \
      --set grpo.max_staleness="${ACTOR_STALENESS:-1}" --set checkpoint.every=0 > "$out/actors-$n.log" 2>&1
    echo "actors $n: exit $?"
    # samples per step x mean length: generated tokens the learner took in per second; and the
    # actors' own rates (each logs them when it stops): what they generated, consumed or not.
    summarise "actors-$n-staleness-${ACTOR_STALENESS:-1}" "$run" 6 > "$out/actors-$n.json"
    rates=$(grep -ho '([0-9]* tokens/s generating, [0-9]* tokens/s overall)' "$run"/logs/actor-*.log |
      awk '{gen += substr($1, 2); all += $4} END {printf "%.0f %.0f", gen, all}')
    python3 bench/gpu/actor_scaling.py row "$n" "$out/actors-$n.json" $rates >> "$out/actors.jsonl" &&
      tail -n 1 "$out/actors.jsonl"
    tar -czf "$out/actors-$n.tgz" -C "$run" metrics logs 2>/dev/null
  done
  python3 bench/gpu/actor_scaling.py table "$out/actors.jsonl"
fi

if [[ $what == *poll* ]]; then
  # The replay's retry hint (replay.poll_ms) A/B: one actor on cuda:POLL_ACTOR_DEVICE (default 1;
  # 0 on a one-GPU machine, where it shares the learner's GPU and pulls over ZeroMQ).
  for p in 200 5; do
    job=configs/.scale-poll-$p.yaml
    sed "s/^  actors: .*/  actors: [{device: \"cuda:${POLL_ACTOR_DEVICE:-1}\"}]/; s/^stages: .*/stages: [grpo]/" \
      configs/small-gpu.yaml > "$job"
    run=/tmp/aha-scale-poll-$p
    rm -rf "$run"
    timeout 150 $aha run "$job" --run-dir "$run" --no-eval --set grpo.steps=26 --set replay.poll_ms=$p \
      --set checkpoint.every=0 > "$out/poll-$p.log" 2>&1
    echo "poll $p ms: exit $?"
    summarise "poll-$p-ms" "$run" 6
    tar -czf "$out/poll-$p.tgz" -C "$run" metrics logs 2>/dev/null
  done
fi

if [[ $what == *dp* ]]; then
  model=/tmp/aha-0.5b
  [ -d $model ] || $aha init --preset 0.5b --out $model > /dev/null
  timeout 120 $aha bench train --model $model --devices cuda:0 --sequences 64 --micro-batch-tokens 32768 > "$out/dp-1.log" 2>&1
  timeout 150 $aha bench train --model $model --devices cuda:0,cuda:1 --sequences 64 --micro-batch-tokens 32768 > "$out/dp-2.log" 2>&1
  grep -h '^{' "$out"/dp-1.log "$out"/dp-2.log | tee -a "$out/summary.jsonl"
fi

if [[ $what == *pipeline* ]]; then
  model=/tmp/aha-0.5b-qwen3tok
  [ -d $model ] || $aha init --preset 0.5b --tokenizer dist/share/qwen3-tokenizer.json --out $model > /dev/null
  job=configs/.scale-pipeline-0.5b.yaml
  job_with_actors configs/qwen2.5-0.5b-gpu.yaml "$job" "${PIPELINE_ACTORS:-3}"
  run=/tmp/aha-pipeline-0.5b
  rm -rf "$run"
  st=${PIPELINE_STALENESS:-1}
  timeout 240 $aha run "$job" --run-dir "$run" --no-eval --set model.path=$model \
    --set model.tokenizer=$model/tokenizer.json --set grpo.steps="${PIPELINE_STEPS:-8}" --set checkpoint.every=0 \
    --set grpo.max_staleness="$st" > "$out/pipeline-staleness-$st.log" 2>&1
  echo "pipeline: exit $?"
  summarise "pipeline-0.5b-staleness-$st" "$run" 2
  tar -czf "$out/pipeline-staleness-$st.tgz" -C "$run" metrics logs 2>/dev/null
fi
echo "== summary"
cat "$out/summary.jsonl"
