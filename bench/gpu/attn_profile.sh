#!/usr/bin/env bash
# Runs on the GPU machine: the training attention kernels at the learner's shape (16 x 1024 tokens,
# Hq / Hkv = 14 / 2, D = 64). Prints the timing table of engine_attention_tc_test (CUDA events,
# median of 20), then Nsight Compute's details of one launch of the forward with bf16 k/v (the
# learner's path) and of the backward: speed of light, occupancy, scheduler and warp-state stall
# reasons, and with SOURCE=1 the SASS with stall samples per instruction (ncu_*_source.csv).
#   bench/gpu/attn_profile.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:?usage: attn_profile.sh OUT_DIR}
mkdir -p "$out"
t=dist/bin/engine_attention_tc_test
args=(--gtest_also_run_disabled_tests --gtest_filter='AttentionTcTiming.*' --gtest_color=no)
timeout 120 "$t" "${args[@]}" > "$out/attn_timing.txt" 2>&1
echo "timing exit $?"
grep -E "shape|forward|fwd kv16|backward|nmse" "$out/attn_timing.txt"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu"; exit 1; }
# Launch order of the first shape: the f32-k/v tensor-core forward (23 launches: 3 warm-up + 20),
# then the bf16-k/v one; the backward kernel runs after the f32 backward.
# SPECS (";"-separated "name kernel-regex launch-skip") picks other kernels, e.g. the wgmma ones:
#   SPECS="wfwd AttnFwdWgmmaKernel 10;wbwd AttnBwdWgmmaKernel 10"
IFS=';' read -r -a specs <<< "${SPECS:-fwd AttnFwdTcKernel 33;bwd AttnBwdTcKernel 10}"
for spec in "${specs[@]}"; do
  read -r name kernel skip <<< "$spec"
  timeout 240 "$ncu" --clock-control none -k "regex:$kernel" --launch-skip "$skip" --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
    --section SchedulerStats --section WarpStateStats --section LaunchStats \
    "$t" "${args[@]}" > "$out/ncu_$name.txt" 2> "$out/ncu_$name.err"
  echo "ncu $name exit $?"
  grep -E "Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Issued Ipc|No Eligible|Warp Cycles Per Issued|Compute \(SM\) Throughput|Memory Throughput|Shared Memory Configuration Size|Block Limit" "$out/ncu_$name.txt" | head -20
  if [ -n "${SOURCE:-}" ]; then
    timeout 240 "$ncu" --clock-control none -k "regex:$kernel" --launch-skip "$skip" --launch-count 1 \
      --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
      "$t" "${args[@]}" > "$out/ncu_${name}_source.csv" 2> "$out/ncu_${name}_source.err"
    echo "ncu $name source exit $? ($(wc -l < "$out/ncu_${name}_source.csv") lines)"
  fi
done
