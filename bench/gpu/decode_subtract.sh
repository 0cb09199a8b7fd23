#!/usr/bin/env bash
# Runs on the GPU machine: where a decode step's time goes inside its CUDA graph, by subtraction.
# `aha bench gen --leave-out OP` replays the same graphs without one op (its output keeps stale
# values, so the tokens are meaningless); the step time it saves is that op's share of the step,
# boundaries and overlap included, which Nsight Compute's one-kernel-at-a-time figures are not.
#   bench/gpu/decode_subtract.sh OUT_DIR [extra aha bench gen flags]
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:?usage: decode_subtract.sh OUT_DIR [flags]}
shift
mkdir -p "$out"
model=/tmp/aha-0.5b
[ -d $model ] || dist/bin/aha init --preset 0.5b --out $model > /dev/null
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
