#!/usr/bin/env bash
# Regenerates configs/data/ for configs/tiny-cpu.yaml with `aha data` (deterministic seeds):
#   arith-eval.jsonl   200 held-out questions
#   arith-train.jsonl  GRPO prompts, none of them in the eval set
#   arith-sft.jsonl    cold-start solutions in the R1-Zero format, 30% from a "weak teacher"
#                      (plausible wrong results), none of them on an eval question
#   arith-sft-weak.jsonl the same questions from a weaker teacher (60% wrong), for
#                      configs/small-gpu.yaml: the 76M model imitates the 30% teacher so well (84%
#                      pass@1) that GRPO has little left to fix
set -euo pipefail
cd "$(dirname "$0")"
aha=${AHA:-../build/bin/aha}
mkdir -p data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(--min-digits 1 --max-digits 2 --ops + --no-instructions)
$aha data make arith --n 200 --seed 101 "${common[@]}" --out data/arith-eval.jsonl
# Drop every task whose question is also an eval question: the eval set stays held out.
grep -o '"prompt":"[^"]*"' data/arith-eval.jsonl > "$tmp/eval-prompts"
$aha data make arith --n 3000 --seed 102 "${common[@]}" --out "$tmp/train.jsonl"
grep -v -F -f "$tmp/eval-prompts" "$tmp/train.jsonl" > data/arith-train.jsonl
$aha data make arith --n 8000 --seed 103 "${common[@]}" --out "$tmp/sft-tasks.jsonl"
grep -v -F -f "$tmp/eval-prompts" "$tmp/sft-tasks.jsonl" > "$tmp/sft-tasks-heldout.jsonl"
$aha data solve --tasks "$tmp/sft-tasks-heldout.jsonl" --wrong-fraction 0.3 --seed 104 --out data/arith-sft.jsonl
$aha data solve --tasks "$tmp/sft-tasks-heldout.jsonl" --wrong-fraction 0.6 --seed 105 --out data/arith-sft-weak.jsonl
wc -l data/*.jsonl
