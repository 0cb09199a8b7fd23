#!/usr/bin/env bash
# Issue 11 on the two-GPU machine (the device tool's nvidia-h200-x2), from a checkout with dist/
# carried (scripts/bundle.sh): runs configs/small-gpu.yaml end to end and prints its before/after
# table and wall time; the run directory (report, metrics, logs) goes to OUT_DIR/run.
#   bench/gpu/e2e_small.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:?usage: e2e_small.sh OUT_DIR}
mkdir -p "$out"
start=$(date +%s)
dist/bin/aha run configs/small-gpu.yaml --run-dir "$out/run" 2>&1 | tail -n 30
rc=${PIPESTATUS[0]}
echo "aha run exit $rc, wall $(( $(date +%s) - start )) s"
tail -n 5 "$out"/run/logs/learner.log "$out"/run/logs/actor-0.log 2>/dev/null
exit "$rc"
