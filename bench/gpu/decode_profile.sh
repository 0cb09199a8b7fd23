#!/usr/bin/env bash
# Runs on the GPU machine: Nsight Compute's duration of every kernel of one decode step of
# `aha bench gen` (256 rows by default; each kernel alone, as ncu serialises them), so that the sum
# of kernel times can be set against the step's wall time from the same binary's normal run.
#   bench/gpu/decode_profile.sh OUT_DIR [extra aha bench gen flags]
# With KERNEL=regex set: Nsight Compute's details (occupancy, memory, warp stall reasons) of one
# launch of the matching kernel late in the run (SKIP=n: after n of its launches; 150 by default),
# instead of the per-kernel table; with SOURCE=1 also that launch's SASS with stall samples per
# instruction (ncu_source.csv).
# MODEL=DIR profiles that model instead of a random Qwen2.5-0.5B.
# With SUBTRACT=1 instead: where a step's time goes inside its CUDA graph, by subtraction, without
# Nsight Compute. `aha bench gen --leave-out OP` replays the same graphs without one op (its output
# keeps stale values, so the tokens are meaningless); the step time it saves is that op's share of
# the step, boundaries and overlap included, which the one-kernel-at-a-time figures are not.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:?usage: decode_profile.sh OUT_DIR [flags]}
shift
mkdir -p "$out"
model=${MODEL:-/tmp/aha-0.5b}  # MODEL=DIR: another model (made beforehand)
[ -d $model ] || dist/bin/aha init --preset 0.5b --out $model > /dev/null
if [ -n "${SUBTRACT:-}" ]; then
  layers=$(python3 -c "import json; print(json.load(open('$model/config.json'))['num_hidden_layers'])")
  step_ms() {  # the decode ms per step of one run, its log in $out/$1.txt
    dist/bin/aha bench gen --model $model --repeats 2 "${@:2}" > "$out/$1.txt" 2>&1
    tail -1 "$out/$1.txt" | python3 -c "import json, sys; j = json.load(sys.stdin); print(1e3 * j['decode_s'] / j['decode_steps'])"
  }
  base1=$(step_ms base1 "$@")
  declare -A ms
  for op in qkv attention o gateup down lmhead; do ms[$op]=$(step_ms "$op" --leave-out $op "$@"); done
  all=$(step_ms all --leave-out qkv,attention,o,gateup,down,lmhead "$@")
  base2=$(step_ms base2 "$@")
  python3 - "$base1" "$base2" "$all" "$layers" ${ms[qkv]} ${ms[attention]} ${ms[o]} ${ms[gateup]} ${ms[down]} ${ms[lmhead]} <<'PY'
import sys
b1, b2, rest, L = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
base = (b1 + b2) / 2
ops = ["qkv", "attention", "o (+ add, norm)", "gate/up + SwiGLU", "down (+ add, norm)", "lm-head"]
print(f"decode step {b1:.3f} / {b2:.3f} ms; with every op below left out {rest:.3f} ms (embedding, sampling)")
print(f"{'op':22s} {'us a step':>10s} {'us a layer':>11s}")
total = 0.0
for name, v in zip(ops, sys.argv[5:]):
    us = (base - float(v)) * 1e3
    total += us
    per = f"{us / L:11.1f}" if name != "lm-head" else f"{'':11s}"
    print(f"{name:22s} {us:10.0f} {per}")
print(f"{'sum':22s} {total:10.0f}   (+ the rest {rest * 1e3:.0f} = {total + rest * 1e3:.0f} against {base * 1e3:.0f})")
PY
  exit 0
fi
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu"; exit 1; }
if [ -n "${KERNEL:-}" ]; then
  timeout 300 "$ncu" --clock-control none --graph-profiling node -k "regex:$KERNEL" --launch-skip "${SKIP:-150}" --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section SchedulerStats \
    --section WarpStateStats --section LaunchStats --section SourceCounters \
    dist/bin/aha bench gen --model $model --new-tokens 8 --repeats 1 "$@" > "$out/ncu_kernel.txt" 2> "$out/ncu_kernel.err"
  echo "ncu exit $?"
  grep -vE "^==PROF==|^aha bench|^\{" "$out/ncu_kernel.txt" | grep -E "[A-Za-z]" | head -120
  if [ -n "${SOURCE:-}" ]; then
    # SOURCE=1: the same launch's SASS with warp-state samples per instruction (ncu's source page).
    timeout 300 "$ncu" --clock-control none --graph-profiling node -k "regex:$KERNEL" --launch-skip "${SKIP:-150}" \
      --launch-count 1 --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
      dist/bin/aha bench gen --model $model --new-tokens 8 --repeats 1 "$@" > "$out/ncu_source.csv" 2> "$out/ncu_source.err"
    echo "ncu source exit $? ($(wc -l < "$out/ncu_source.csv") lines)"
  fi
  exit 0
fi
timeout 400 "$ncu" --clock-control none --graph-profiling node --metrics gpu__time_duration.sum --csv --page raw \
  dist/bin/aha bench gen --model $model --new-tokens 8 --repeats 1 "$@" > "$out/ncu_decode.csv" 2> "$out/ncu_decode.err"
echo "ncu exit $?"
python3 - "$out/ncu_decode.csv" <<'PY'
import sys
sys.path.insert(0, "bench/gpu")
from ncu_kernels import by_name, read
ks, unit = read(sys.argv[1])
samp = [i for i, (n, _) in enumerate(ks) if "SampleRows" in n]
print(f"{len(ks)} kernels profiled; sampling kernels at {samp[-4:]}")
a, b = samp[-2] + 1, samp[-1] + 1  # the last decode step: after one sampling, through the next
step = ks[a:b]
print(f"last decode step: {len(step)} kernels, sum of durations {sum(d for _, d in step):.1f} us (ncu unit row: {unit})")
for n, c, s in by_name(step, 60):
    print(f"{s:9.1f} us {c:4d} x {s / c:7.2f} us  {n}")
PY
