#!/usr/bin/env bash
# Issue 11 on the two-GPU machine (the device tool's nvidia-h200-x2), from a checkout with dist/
# carried (scripts/bundle.sh): runs configs/small-gpu.yaml end to end and prints its before/after
# table and wall time. The run directory lives in /tmp (models, checkpoints and the replay
# database are large); its logs, metrics, evaluations and report go to OUT_DIR/run.tgz.
#   bench/gpu/e2e_small.sh OUT_DIR [JOB_FILE] [TIME_LIMIT_S]
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:?usage: e2e_small.sh OUT_DIR [JOB_FILE] [TIME_LIMIT_S]}
job=${2:-configs/small-gpu.yaml}
limit=${3:-900}
run=/tmp/aha-e2e-$(basename "$job" .yaml)
rm -rf "$run"
mkdir -p "$out"
start=$(date +%s)
timeout -s INT "$limit" dist/bin/aha run "$job" --run-dir "$run" 2>&1 | tail -n 30
rc=${PIPESTATUS[0]}
echo "aha run exit $rc, wall $(( $(date +%s) - start )) s"
keep=()
for d in logs metrics eval report config.yaml final_model.txt; do [ -e "$run/$d" ] && keep+=("$d"); done
tar -czf "$out/run.tgz" -C "$run" "${keep[@]}"
tail -n 5 "$run"/logs/learner.log "$run"/logs/actor-0.log 2>/dev/null
exit "$rc"
