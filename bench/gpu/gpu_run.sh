#!/usr/bin/env bash
# Runs on the GPU machine (the device tool), from a checkout with dist/ (scripts/bundle.sh) carried:
# the gpu-labelled tests and `aha bench gen|train` beside the PyTorch peer, same GPU, same run.
# Logs go to OUT_DIR; a short table is printed last. Prepare dist/ here with
#   ./scripts/bundle.sh build build/tests/engine_cuda_conformance_test \
#       build/tests/engine_attention_tc_test build/tests/engine_nccl_group_test \
#       build/tests/engine_nccl_publish_test
# then on the GPU machine (two GPUs for the NCCL test and `aha bench sync`):
#   bench/gpu/gpu_run.sh OUT_DIR [tests] [bench] [ab] [ab6] [s6] [s7] [s8] [s9] [s10] [s11] [s13] [s13w] [s14] [s15] [s15c] [s15g] [s17w] [s18] [s18b] [s18c] [s18d] [s18e] [s18f] [s19a] [s19b] [s19c] [s19d] [s20a] [s20b] [s20c] [s22] [s23] [s23b] [s24] [s24b] [s24c] [s24d] [s24e] [s25a] [s25d] [s25e] [s26a] [s26b] [s26c] [s26d] [s26e] [s27a] [s27b] [s27c] [s27d] [s28a] [s28b] [s28c] [s28d] [s28e] [s28f] [s28g] [s29a] [s29b] [s29c] [s29d] [s29e] [s29f] [s29g] [s29h] [s30a] [s30b] [s30c] [s30d] [s30e] [s30f] [s30g] [s30h] [s30i] [s31a] [s31b] [s31c] [s31d] [s31e] [s31f] [s32a] [s32b] [s32c] [s32d] [s33a] [s33b] [s33c] [s34a] [s34b] [s34c] [s35a] [s35b] [s35c] [s35d] [s35e] [s36a] [s37a] [s37b] [s37c] [s37d] [s38a] [gemm] [peer]
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export AHA_FIXTURES_DIR=$PWD/tests/fixtures
out=${1:?usage: gpu_run.sh OUT_DIR [tests] [bench]}
shift
what=${*:-tests bench gemm peer}
mkdir -p "$out"
# The 0.5B shape with random weights, made once (every bench below reads it).
model=/tmp/aha-0.5b
if [[ $what == *bench* || $what == *ab* || $what == *s6* || $what == *s7* || $what == *s8* || $what == *s9* || $what == *s10* || $what == *s11* || $what == *s13* || $what == *s14* || $what == *s15* || $what == *s17* || $what == *s18* || $what == *s19* || $what == *s20* || $what == *s22* || $what == *s23* || $what == *s24* || $what == *s25d* || $what == *s25e* || $what == *s26* || $what == *s27b* || $what == *s27c* || $what == *s27d* || $what == *s28* || $what == *s29* || $what == *s30* || $what == *s31* || $what == *s32* || $what == *s33* || $what == *s34* || $what == *s35* || $what == *s36* || $what == *s37* || $what == *s38* || $what == *peer* ]]; then
  [ -d $model ] || dist/bin/aha init --preset 0.5b --out $model > /dev/null
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee "$out/gpu.txt"
summary=()
# variant_runs TAG REPS PATTERN VARIANT... -- CMD...: CMD once per variant (default, or NAME=VALUE in
# its environment), the variants interleaved, REPS rounds; each log is $out/TAG_NAME_REP.log, and the
# line printed holds what PATTERN (grep -oE) finds in it.
variant_runs() {
  local tag=$1 reps=$2 pattern=$3 variants=()
  shift 3
  while [ "$1" != -- ]; do variants+=("$1"); shift; done
  shift
  for rep in $(seq "$reps"); do
    for v in "${variants[@]}"; do
      local f="$out/${tag}_${v//[= ]/_}_$rep.log"  # default, or the variable and its value
      env ${v/default/AHA_NONE=1} "$@" > "$f" 2>&1
      echo "$tag $v $rep: $(grep -oE "$pattern" "$f" | tr '\n' ' ')"
    done
  done
}
if [[ $what == *tests* ]]; then
  for t in dist/bin/*_test; do
    name=$(basename "$t")
    # The tensor-core attention's timing table is a disabled test: run it too.
    [ "$name" = engine_attention_tc_test ] && extra=(--gtest_also_run_disabled_tests) || extra=()
    timeout 300 "$t" "${extra[@]}" --gtest_color=no > "$out/$name.log" 2>&1
    rc=$?
    grep -E "nmse|chi2|model |actor vs|vs transformers|GPU:|Failure|FAILED|Expected|Which is" "$out/$name.log" | head -120
    summary+=("$name exit $rc: $(grep -E '^\[  (PASSED|FAILED)' "$out/$name.log" | tr '\n' ' ')")
  done
fi
if [[ $what == *bench* ]]; then
  timeout 120 dist/bin/aha bench gen --model $model > "$out/gen_aha.log" 2>&1
  # The f32 KV cache for comparison (bf16 is the default with bf16 products), and a KV pool of a
  # quarter of the default 256 x 640 tokens, which preempts (the recompute's cost).
  AHA_KV_CACHE=f32 timeout 120 dist/bin/aha bench gen --model $model > "$out/gen_aha_f32kv.log" 2>&1
  timeout 120 dist/bin/aha bench gen --model $model --kv-cache-tokens 40960 > "$out/gen_aha_smallpool.log" 2>&1
  # The earlier decode attention kernels (one block per row; GQA-grouped on the CUDA cores)
  # against the tensor-core default.
  AHA_DECODE_ATTENTION=rowwise timeout 120 dist/bin/aha bench gen --model $model > "$out/gen_aha_rowwise.log" 2>&1
  AHA_DECODE_ATTENTION=simt timeout 120 dist/bin/aha bench gen --model $model > "$out/gen_aha_simt.log" 2>&1
  timeout 120 dist/bin/aha bench train --model $model > "$out/train_aha.log" 2>&1
  # cuBLAS's GemmEx for comparison (cuBLASLt with tuned algorithms is the default), and where the
  # GPU time goes, per op (AHA_PROFILE=1; generation without graphs so that ops are visible: its
  # tokens/s is the no-graphs figure).
  AHA_GEMM=gemmex timeout 120 dist/bin/aha bench gen --model $model > "$out/gen_aha_gemmex.log" 2>&1
  AHA_GEMM=gemmex timeout 120 dist/bin/aha bench train --model $model > "$out/train_aha_gemmex.log" 2>&1
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --model $model > "$out/profile_train.txt" 2>&1
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench gen --no-graphs --model $model > "$out/profile_gen.txt" 2>&1
fi
if [[ " $what " == *" ab "* ]]; then
  # Session 5's fused q/k/v kernels against their switch (AHA_FUSED_QKV=0: the split, RoPE, pack and
  # KV-write ops they replace), in decode and in the learner step, each variant twice to see the spread.
  for rep in 1 2; do
    timeout 120 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_ab-fused-$rep.log" 2>&1
    AHA_FUSED_QKV=0 timeout 120 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_ab-unfused-$rep.log" 2>&1
    timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_ab-fused-$rep.log" 2>&1
    AHA_FUSED_QKV=0 timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_ab-unfused-$rep.log" 2>&1
  done
  # The decode-sized products in a graph of 24 (as a decode step runs them) and alone.
  timeout 120 dist/bin/aha bench gemm --tokens 256 --forms nt --libraries lt > "$out/gemm_256.txt" 2>&1
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_train.txt" 2>&1
  grep -E "^T " "$out/gemm_256.txt" | head -12
  head -24 "$out/profile_train.txt"
fi
if [[ $what == *ab6* || $what == *s6* ]]; then
  # Session 6's defaults (two learner benches, one generation bench, the learner's per-op profile);
  # with ab6 also each of its switches once: AHA_KEEP_BF16=0 (norm outputs, gu, h and dh in f32
  # again), AHA_ATTENTION_KV16=0 (the training attention stages f32 k/v tiles again),
  # AHA_KEEP_LOGITS_GB=0 (the lm-head backward recomputes the logits).
  for rep in 1 2; do
    timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s6-default-$rep.log" 2>&1
  done
  timeout 120 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_s6-default.log" 2>&1
  if [[ $what == *ab6* ]]; then
    for switch in AHA_KEEP_BF16=0 AHA_ATTENTION_KV16=0 AHA_KEEP_LOGITS_GB=0; do
      env "$switch" timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s6-${switch%%=*}.log" 2>&1
    done
  fi
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_train.txt" 2>&1
  head -24 "$out/profile_train.txt"
fi
if [[ $what == *s7* ]]; then
  # Session 7's switch against the default in the same call: AHA_DECODE_FUSED=0 (the decode step's
  # q/k/v kernel and attention as two kernels); generation twice each, the learner step once.
  for rep in 1 2; do
    timeout 120 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_s7-default-$rep.log" 2>&1
    AHA_DECODE_FUSED=0 timeout 120 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_s7-unfused-$rep.log" 2>&1
  done
  timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s7-default.log" 2>&1
fi
if [[ $what == *s8* ]]; then
  # Session 8: generation three times with the prefill / decode / launch-gap split of the best run,
  # then where a prefill of 256 x 128 goes, per op (no graphs; one new token, so the prefill dominates).
  for rep in 1 2 3; do
    timeout 120 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_s8-default-$rep.log" 2>&1
  done
  grep -H "of the best run" "$out"/gen_s8-*.log | sed 's|.*/||'
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench gen --no-graphs --new-tokens 1 --repeats 1 --model $model \
    > "$out/profile_prefill.txt" 2>&1
  grep -v '^{' "$out/profile_prefill.txt" | head -30
fi
if [[ $what == *s9* ]]; then
  # Session 9: decode steps run ahead of the host against one step at a time (--no-run-ahead), three
  # runs each way, alternating, with every row to 512 tokens and with caps spread from 64 to 512.
  for lengths in "" "--min-new-tokens 64"; do
    for rep in 1 2 3; do
      for ahead in "" --no-run-ahead; do
        tag=$(echo "s9 $lengths $ahead $rep" | tr -s ' -' '_')
        timeout 120 dist/bin/aha bench gen --repeats 5 --model $model $lengths $ahead > "$out/gen_$tag.log" 2>&1
        echo "$lengths ${ahead:-run-ahead} $rep: $(grep -oE 'new tokens: [0-9.]+ s|idle between passes [^;]*' "$out/gen_$tag.log" |
          sed 's/(host time from one pass.s tokens to the next launch) //' | tr '\n' ' ')"
      done
    done
  done
fi
if [[ $what == *s10* ]]; then
  # Session 10: a decode step's o and down products split along K into parts the norm adds
  # (CudaBackend::LinearAddRmsNorm; the default chooses 4 here) against the plain product
  # (AHA_SPLIT_K=1), three runs each way, interleaved.
  for rep in 1 2 3; do
    for split in 0 1; do
      AHA_SPLIT_K=$split timeout 150 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_s10_split${split}_$rep.log" 2>&1
      echo "gen split $split $rep: $(grep -oE 'new tokens: [0-9.]+ s|decode [0-9.]+ ms per step' "$out/gen_s10_split${split}_$rep.log" | tr '\n' ' ')"
    done
  done
fi
if [[ $what == *s11* ]]; then
  # Session 11: the decode step's gate/up product with SwiGLU in its epilogue (one wgmma kernel,
  # engine/cuda/mlp.cu; its blocks shared w by TMA multicast until session 12) against the product +
  # SwiGLU kernel (AHA_FUSED_MLP=0), and its weight copies started under the norm before it (PDL)
  # against an ordinary launch (AHA_MLP_EARLY=0): generation three runs each way, interleaved.
  variant_runs gen_s11 3 'new tokens: [0-9.]+ s|decode [0-9.]+ ms per step' default AHA_FUSED_MLP=0 AHA_MLP_EARLY=0 \
    -- timeout 150 dist/bin/aha bench gen --repeats 3 --model $model
fi
if [[ " $what " == *" s13 "* ]]; then
  # Session 13: the training attention kernels (2^x on the special-function unit alone, no mask on
  # the tiles a warp sees whole, the backward's Q/dO copies two tiles ahead): the timing table of
  # the attention test, the learner step and generation twice each, and the learner's per-op profile.
  timeout 120 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_filter='AttentionTcTiming.*' \
    --gtest_color=no > "$out/attn_timing.txt" 2>&1
  grep -E "forward|fwd kv16|backward" "$out/attn_timing.txt"
  for rep in 1 2; do
    timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s13_$rep.log" 2>&1
    timeout 150 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_s13_$rep.log" 2>&1
  done
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_train.txt" 2>&1
  grep -iE "attention" "$out/profile_train.txt" | head -6
fi
if [[ $what == *s13w* ]]; then
  # Session 14: the training attention's forward on wgmma (attention_wgmma.cu, the default at D = 64
  # on sm_90) against the mma.sync kernel (AHA_ATTENTION_WGMMA=0): the attention timing table, the
  # learner step and generation, each way, interleaved.
  for rep in 1 2; do
    for v in 1 0; do
      AHA_ATTENTION_WGMMA=$v timeout 60 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests \
        --gtest_filter='AttentionTcTiming.*' --gtest_color=no > "$out/attn_timing_wgmma$v-$rep.txt" 2>&1
      echo "AHA_ATTENTION_WGMMA=$v $rep: $(grep -E 'fwd kv16' "$out/attn_timing_wgmma$v-$rep.txt" | awk '{print $1, $3, $6}' | tr '\n' ' ')"
    done
  done
  for v in 1 0; do
    AHA_ATTENTION_WGMMA=$v timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s13w-$v.log" 2>&1
    AHA_ATTENTION_WGMMA=$v timeout 120 dist/bin/aha bench gen --repeats 2 --model $model > "$out/gen_s13w-$v.log" 2>&1
  done
fi
if [[ $what == *s14* ]]; then
  # Session 14: the training attention's backward on wgmma (attention_wgmma.cu; AHA_ATTENTION_WGMMA_BWD=0
  # goes back to mma.sync): the timing table (its "bwd mma" row is the mma.sync backward) twice, then
  # the learner step each way, interleaved, and the per-op profile.
  for rep in 1 2; do
    timeout 90 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests \
      --gtest_filter='AttentionTcTiming.*' --gtest_color=no > "$out/attn_timing_s14-$rep.txt" 2>&1
    grep -E 'fwd kv16|backward|bwd mma' "$out/attn_timing_s14-$rep.txt" | tr -s ' ' | cut -c1-90
  done
  for rep in 1 2; do
    for v in 1 0; do
      AHA_ATTENTION_WGMMA_BWD=$v timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s14-$v-$rep.log" 2>&1
      echo "train wgmma bwd=$v rep $rep: $(grep -oE 'median step [0-9.]+ s|MFU [0-9.]+%' "$out/train_s14-$v-$rep.log" | tr '\n' ' ')"
    done
  done
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_train.txt" 2>&1
  grep -iE "attention" "$out/profile_train.txt" | head -6
fi
if [[ " $what " == *" s17w "* ]]; then
  # Session 17: the fused gate/up + SwiGLU kernel's h stored 16 bytes a lane after a transpose within
  # each quad (default) against the fragments' 4-byte pairs (AHA_MLP_WIDE_STORES=0): its tests both
  # ways, the kernel in a graph of 24, and generation, interleaved.
  for v in default AHA_MLP_WIDE_STORES=0; do
    env ${v/default/AHA_NONE=1} timeout 300 dist/bin/engine_cuda_conformance_test \
      --gtest_filter='CudaOps.GateUpSwiGlu*:CudaModel.*' --gtest_color=no > "$out/conformance_s17w_${v%%=*}.log" 2>&1
    echo "conformance $v: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/conformance_s17w_${v%%=*}.log" | tr '\n' ' ')"
  done
  for rep in 1 2; do
    for v in default AHA_MLP_WIDE_STORES=0; do
      env ${v/default/AHA_NONE=1} timeout 100 dist/bin/aha bench gemm --tokens 256 --forms nt --libraries lt \
        > "$out/gemm_s17w_${v%%=*}_$rep.txt" 2>&1
      f="$out/gemm_s17w_${v%%=*}_$rep.txt"
      echo "gemm $v $rep: $(grep -E 'SwiGLU' "$f" | grep -v '^{' | grep -oE '[0-9.]+ (us per layer|ns per K step)' | tr '\n' ' ')"
    done
  done
  variant_runs gen_s17w 3 'new tokens: [0-9.]+ s|decode [0-9.]+ ms per step' default AHA_MLP_WIDE_STORES=0 \
    -- timeout 120 dist/bin/aha bench gen --repeats 3 --model $model
fi
if [[ " $what " == *" s18 "* ]]; then
  # Session 18, on branch exp/attention-fwd-pipe (not merged: slower): the training attention forward
  # with its two products of consecutive tiles overlapped (its default there) against the kernel
  # before (AHA_ATTENTION_FWD_PIPE=0, main's): the attention and conformance
  # tests (the QuadTranspose epilogues too), the kernels' timing table, the learner step and
  # generation, interleaved, and the per-op profile each way.
  timeout 300 dist/bin/engine_attention_tc_test --gtest_filter='AttentionTc.*' --gtest_color=no \
    > "$out/attention_tc_s18.log" 2>&1
  echo "attention tc: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/attention_tc_s18.log" | tr '\n' ' ')"
  timeout 300 dist/bin/engine_cuda_conformance_test --gtest_color=no \
    --gtest_filter='CudaOps.GateUpSwiGlu*:CudaModel.*:CudaOps.*Attention*' > "$out/conformance_s18.log" 2>&1
  echo "conformance: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/conformance_s18.log" | tr '\n' ' ')"
  for rep in 1 2; do
    for v in default AHA_ATTENTION_FWD_PIPE=0; do
      f="$out/timing_s18_${v%%=*}_$rep.log"
      env ${v/default/AHA_NONE=1} timeout 200 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests \
        --gtest_filter='AttentionTcTiming.*' --gtest_color=no > "$f" 2>&1
      echo "timing $v $rep: $(grep -E 'fwd kv16' "$f" | awk '{print $1, $(NF-1), "ms"}' | tr '\n' ' ')"
    done
  done
  variant_runs train_s18 3 'median step [0-9.]+ s|MFU [0-9.]+%' default AHA_ATTENTION_FWD_PIPE=0 \
    -- timeout 120 dist/bin/aha bench train --steps 5 --model $model
  for v in default AHA_ATTENTION_FWD_PIPE=0; do
    f="$out/profile_s18_${v%%=*}.txt"
    env ${v/default/AHA_NONE=1} AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$f" 2>&1
    echo "profile $v: $(grep -iE 'attention' "$f" | head -3 | tr -s ' ' | tr '\n' ';')"
  done
  variant_runs gen_s18 2 'new tokens: [0-9.]+ s|prefill [0-9.]+ s|decode [0-9.]+ ms per step' default \
    AHA_ATTENTION_FWD_PIPE=0 -- timeout 120 dist/bin/aha bench gen --repeats 3 --model $model
fi
if [[ " $what " == *" s18b "* ]]; then
  # Session 18, second call: the attention output kept in bf16 only (dist/) against the build before
  # it (dist-old/, carried beside it, with AHA_ATTENTION_FWD_PIPE=0: main's forward), and the
  # pipelined forward with Q in registers (AHA_ATTENTION_FWD_PIPE=2; both switches exist on branch
  # exp/attention-fwd-pipe only, where this call's dist/ was built). Tests, the kernels' timing,
  # the learner step interleaved, the per-op profile.
  timeout 300 dist/bin/engine_attention_tc_test --gtest_filter='AttentionTc.*' --gtest_color=no \
    > "$out/attention_tc_s18b.log" 2>&1
  echo "attention tc: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/attention_tc_s18b.log" | tr '\n' ' ')"
  grep -E "Failure|Expected|nmse" "$out/attention_tc_s18b.log" | head -10
  timeout 300 dist/bin/engine_cuda_conformance_test --gtest_color=no \
    --gtest_filter='CudaModel.*:CudaOps.*Attention*' > "$out/conformance_s18b.log" 2>&1
  echo "conformance: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/conformance_s18b.log" | tr '\n' ' ')"
  grep -E "Failure|Expected|model " "$out/conformance_s18b.log" | head -20
  for rep in 1 2; do
    for v in default AHA_ATTENTION_FWD_PIPE=2; do
      f="$out/timing_s18b_${v%%=*}_$rep.log"
      env ${v/default/AHA_NONE=1} timeout 200 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests \
        --gtest_filter='AttentionTcTiming.*' --gtest_color=no > "$f" 2>&1
      echo "timing $v $rep: $(grep -E 'fwd kv16' "$f" | awk '{print $1, $(NF-1), "ms"}' | tr '\n' ' ')"
    done
  done
  for rep in 1 2 3; do
    for v in old default AHA_ATTENTION_FWD_PIPE=2; do
      f="$out/train_s18b_${v%%=*}_$rep.log"
      if [ $v = old ]; then
        LD_LIBRARY_PATH=$PWD/dist-old/lib AHA_ATTENTION_FWD_PIPE=0 timeout 120 dist-old/bin/aha bench train --steps 5 \
          --model $model > "$f" 2>&1
      else
        env ${v/default/AHA_NONE=1} timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$f" 2>&1
      fi
      echo "train $v $rep: $(grep -oE 'median step [0-9.]+ s|MFU [0-9.]+%' "$f" | tr '\n' ' ')"
    done
  done
  LD_LIBRARY_PATH=$PWD/dist-old/lib AHA_ATTENTION_FWD_PIPE=0 AHA_PROFILE=1 timeout 120 dist-old/bin/aha bench train \
    --steps 3 --model $model > "$out/profile_s18b_old.txt" 2>&1
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_s18b_new.txt" 2>&1
  for f in "$out/profile_s18b_old.txt" "$out/profile_s18b_new.txt"; do
    echo "$(basename $f): $(grep -iE 'attention' "$f" | head -3 | tr -s ' ' | tr '\n' ';')"
  done
fi
if [[ " $what " == *" s18c "* ]]; then
  # Session 18: why the attention backward takes ~0.46 ms a call in the learner step (AHA_PROFILE)
  # but ~0.32 ms in the timing table: each kernel's time in both, from Nsight Systems (every launch
  # in place) or, without it, Nsight Compute (launches serialised, clocks left alone).
  nsys=$(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys 2>/dev/null | head -1)
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  echo "nsys: ${nsys:-none}; ncu: ${ncu:-none}"
  if [ -n "$nsys" ]; then
    timeout 200 "$nsys" profile -o "$out/train_s18c" --force-overwrite true -t cuda dist/bin/aha bench train \
      --steps 3 --model $model > "$out/nsys_train.log" 2>&1
    timeout 200 "$nsys" profile -o "$out/timing_s18c" --force-overwrite true -t cuda \
      dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_filter='AttentionTcTiming.*' \
      > "$out/nsys_timing.log" 2>&1
    for r in train_s18c timing_s18c; do
      "$nsys" stats --report cuda_gpu_kern_sum --format csv "$out/$r.nsys-rep" > "$out/$r.csv" 2> /dev/null
      echo "== $r (total ns, instances, avg ns, med ns, min ns, max ns, name)"
      grep -E "Attn|WgBwd|Prepass|memset|Rope|Pack" "$out/$r.csv" | cut -d, -f2-8 | head -12
    done
  elif [ -n "$ncu" ]; then
    for run in train timing; do
      if [ $run = train ]; then cmd=(dist/bin/aha bench train --steps 2 --model $model); skip=48
      else cmd=(dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_filter='AttentionTcTiming.*'); skip=8; fi
      timeout 300 "$ncu" --clock-control none -k "regex:AttnBwdWgmma|WgBwdPrepass" --launch-skip $skip --launch-count 4 \
        --metrics gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,dram__bytes.sum.per_second \
        "${cmd[@]}" > "$out/ncu_$run.txt" 2>&1
      echo "== $run"; grep -E "AttnBwd|WgBwd|duration|per_second" "$out/ncu_$run.txt" | head -24
    done
  fi
fi
# Session 18's A/B helpers: this build (dist/) against the one before it (dist-old/, carried beside it).
aha_of() {  # the aha command line of build old|mid|new (dist-old/, dist-mid/, dist/)
  if [ "$1" = new ]; then echo dist/bin/aha; else echo "env LD_LIBRARY_PATH=$PWD/dist-$1/lib dist-$1/bin/aha"; fi
}
train_ab() {  # train_ab TAG REPS [BUILDS]: each build's learner step, interleaved, with its peak device memory
  for rep in $(seq "$2"); do
    for v in ${3:-old new}; do
      local f="$out/train_$1_${v}_$rep.log" mem="$out/mem_$1_${v}_$rep.txt"
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" &
      local smi=$!
      timeout 120 $(aha_of $v) bench train --steps 5 --model $model > "$f" 2>&1
      kill $smi; wait $smi 2> /dev/null
      echo "train $v $rep: $(grep -oE 'median step [0-9.]+ s|[0-9.]+ tokens/s|MFU [0-9.]+%' "$f" | tr '\n' ' ')" \
        "peak $(sort -n "$mem" | tail -1) MiB"
    done
  done
}
attention_tests() {  # attention_tests TAG FILTER VARIANT...: the attention test, then the conformance test's
  # cases matching FILTER once per variant (default, or NAME=VALUE)
  local tag=$1 filter=$2
  shift 2
  timeout 300 dist/bin/engine_attention_tc_test --gtest_filter='AttentionTc.*' --gtest_color=no \
    > "$out/attention_tc_$tag.log" 2>&1
  echo "attention tc: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/attention_tc_$tag.log" | tr '\n' ' ')"
  grep -E "Failure|Expected|bwd from" "$out/attention_tc_$tag.log" | head -10
  for v in "$@"; do
    local f="$out/conformance_${tag}_${v%%=*}.log"
    env ${v/default/AHA_NONE=1} timeout 300 dist/bin/engine_cuda_conformance_test --gtest_color=no \
      --gtest_filter="$filter" > "$f" 2>&1
    echo "conformance $v: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$f" | tr '\n' ' ')"
    grep -E "Failure|Expected|bf16: worst|actor vs" "$f" | head -8
  done
}
# The peers' side-by-side figures, each printing its result line: HF generate, the torch.compile step.
# conformance_all TAG PATTERN [FILTER]: the conformance test (whole, or FILTER's tests), its summary,
# its lines matching PATTERN
conformance_all() {
  timeout 300 dist/bin/engine_cuda_conformance_test --gtest_color=no --gtest_filter="${3:-*}" \
    > "$out/conformance_$1.log" 2>&1
  echo "conformance (${3:-all}): exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/conformance_$1.log" | tr '\n' ' ')"
  grep -E "$2" "$out/conformance_$1.log" | head -20
}
attention_suite() {  # attention_suite TAG: the training attention's tests and its training-shape timings
  timeout 240 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests \
    --gtest_filter='AttentionTc.*:AttentionTcTiming.*' > "$out/attn_$1.log" 2>&1
  echo "attention tests: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/attn_$1.log" | tr '\n' ' ')"
  grep -E "Failure|Expected|Which is|largest error|^shape|x1024|nmse:" "$out/attn_$1.log" | head -30
}
init_model() {  # init_model DIR AHA_INIT_ARGS...: a random model, made once
  [ -d "$1" ] || dist/bin/aha init "${@:2}" --out "$1" > /dev/null
}
vocab_model() {  # vocab_model V: the bench's model with a vocabulary of V, made once as /tmp/aha-0.5b-vV
  python3 -c "import json; c = json.load(open('$model/config.json')); c['vocab_size'] = $1; \
json.dump(c, open('/tmp/v$1.json', 'w'))"
  init_model /tmp/aha-0.5b-v$1 --config /tmp/v$1.json
}
gen_pat='new tokens: [0-9.]+ s, [0-9.]+ new tokens/s|decode [0-9.]+ ms per step'  # variant_runs' pattern for gen
train_pat='median step [0-9.]+ s \(forward [0-9.]+, backward [0-9.]+|[0-9.]+ tokens/s|MFU [0-9.]+%'  # and for train
train_run() {  # train_run TAG AHA_BENCH_TRAIN_ARGS...: one `aha bench train` into $out/TAG.log, its figures printed
  timeout 200 dist/bin/aha bench train "${@:2}" > "$out/$1.log" 2>&1
  echo "$1: $(grep -oE "$train_pat" "$out/$1.log" | tr '\n' ' ')"
}
attn_tests() {  # attn_tests TAG FILTER [TIMING]: the attention tests and their timing test TIMING (default:
  # the forward's ways, DISABLED_WgmmaForwardStages), then the conformance test's FILTER (gtest), each into
  # $out/TAG_*.log with a summary printed
  timeout 300 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_color=no \
    --gtest_filter="AttentionTc.*:AttentionTcTiming.${3:-DISABLED_WgmmaForwardStages}" > "$out/$1_attn.log" 2>&1
  echo "attention tests: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$out/$1_attn.log" | tr '\n' ' ')"
  grep -E "Failure|Expected|largest error|FAILED  \]" "$out/$1_attn.log" | head -12
  grep -E "^shape|x1024 H|x8192 H" "$out/$1_attn.log"
  timeout 400 dist/bin/engine_cuda_conformance_test --gtest_color=no --gtest_filter="$2" \
    > "$out/$1_conformance.log" 2>&1
  echo "conformance exit $?: $(grep -E '^\[  (PASSED|FAILED)' "$out/$1_conformance.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED|Failure" "$out/$1_conformance.log" | head -6
}
around_peer() {  # around_peer TAG MODEL "SHAPE ARGS" [AHA ARGS...]: `aha bench train` twice around the compiled
  # peer's step on the same shape (--sequences, --seq-len, --prompt-len), logs $out/TAG_{1,2,peer}.log
  train_run "$1_1" --model "$2" $3 "${@:4}"
  timeout 400 python3 bench/gpu/peer_pytorch.py train --modes compile --model "$2" $3 > "$out/$1_peer.log" 2>&1
  echo "peer compile $3: $(tail -n 1 "$out/$1_peer.log")"
  train_run "$1_2" --model "$2" $3 "${@:4}"
}
peer_gen() {  # peer_gen [REPEATS]: HF generate after its warm-up run, the best of REPEATS runs (default 3)
  local r=${1:-3}
  timeout $((60 + 90 * (r + 1))) python3 bench/gpu/peer_pytorch.py gen --model $model --repeats "$r" \
    > "$out/gen_peer.log" 2>&1
  tail -n 1 "$out/gen_peer.log"
}
clocks_start() {  # clocks_start CSV: SM clock, power and temperature every 20 ms into CSV until `kill $smi`
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits -lms 20 > "$1" &
  smi=$!
}
clocks_summary() {  # clocks_summary CSV: the busy samples' (power above 200 W) SM clock and power, median and range
  for col in 1 2; do
    awk -F', ' -v c=$col '$2 > 200 {print $c}' "$1" | sort -n | awk -v c=$col '{v[NR]=$1}
      END {if (NR) printf "  %d busy samples, %s: median %s (%s-%s)\n", NR, c == 1 ? "SM MHz" : "W",
        v[int((NR+1)/2)], v[1], v[NR]}'
  done
}
peer_compile() {  # peer_compile [MODEL TAG]: the compiled peer's step (default: the bench's model)
  local f="$out/train_peer_compile${2:+_$2}.log"
  timeout 400 python3 bench/gpu/peer_pytorch.py train --modes compile --model "${1:-$model}" > "$f" 2>&1
  tail -n 1 "$f"
}
gen_runs() {  # gen_runs TAG REPS [BUILDS]: aha bench gen, the builds interleaved (default: this one)
  for rep in $(seq "$2"); do
    for v in ${3:-new}; do
      local f="$out/gen_$1_${v}_$rep.log"
      timeout 120 $(aha_of $v) bench gen --model $model > "$f" 2>&1
      echo "gen $v $rep: $(grep -oE 'new tokens: [0-9.]+ s, [0-9.]+ new tokens/s|prefill [0-9.]+ s|decode [0-9.]+ ms per step' \
        "$f" | tr '\n' ' ')"
    done
  done
}
if [[ " $what " == *" s18d "* ]]; then
  # Session 18: the attention output's gradient kept in bf16 too (dist/) against the build with the
  # output alone kept (dist-old/): tests (the conformance models also with the mma.sync backward,
  # AHA_ATTENTION_WGMMA_BWD=0, which widens the kept copies), the learner step interleaved, the
  # per-op profile; then the side-by-side figures: generation and HF generate, the learner step and
  # the torch.compile step.
  attention_tests s18d 'CudaModel.*:CudaOps.*Attention*' default AHA_ATTENTION_WGMMA_BWD=0
  train_ab s18d 3
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_train.txt" 2>&1
  grep -vE '^\{' "$out/profile_train.txt" | head -16
  gen_runs s18d 2
  peer_gen
  timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s18d_final.log" 2>&1
  echo "aha train: $(grep -oE 'median step [0-9.]+ s|[0-9.]+ tokens/s|MFU [0-9.]+%' "$out/train_s18d_final.log" | tr '\n' ' ')"
  peer_compile
fi
if [[ " $what " == *" s18e "* ]]; then
  # Session 18: q kept in bf16 too (dist/; QkvRope writes the backward's copy and the wgmma
  # forward's pre-scaled operand, no f32 q) against the build before (dist-old/): tests, with the
  # mma.sync backward (AHA_ATTENTION_WGMMA_BWD=0) and the mma.sync forward (AHA_ATTENTION_WGMMA=0)
  # too, the learner step interleaved, the per-op profile.
  attention_tests s18e 'CudaModel.*:CudaOps.*Attention*:CudaOps.*Qkv*' default AHA_ATTENTION_WGMMA_BWD=0 \
    AHA_ATTENTION_WGMMA=0
  train_ab s18e 3
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_train.txt" 2>&1
  grep -vE '^\{' "$out/profile_train.txt" | grep -E "attention|q/k/v" | head -6
  gen_runs s18e 1
fi
if [[ " $what " == *" s18f "* ]]; then
  # Session 18, the closing call on main: the frozen reference model's forward in one layer's
  # activation buffers (dist/) against every layer's (dist-old/), step time and peak device memory
  # (nvidia-smi sampled every 100 ms), interleaved; then the side-by-side figures: generation and HF
  # generate, the torch.compile step.
  train_ab s18f 2
  gen_runs s18f 2
  peer_gen
  peer_compile
fi
if [[ " $what " == *" s19a "* ]]; then
  # Session 19: kept activations' f32 storage only reserved (Tensor::Reserved: addresses, no memory;
  # dist/) against main (dist-old/): the whole conformance test, then its model and attention cases
  # with each fallback path (the mma.sync forward and backward, the unfused q/k/v ops, f32 k/v for
  # the attention), which must write a kept q or output to scratch and never touch the reserved
  # range; the learner step and its peak device memory, interleaved; generation once.
  conformance_all s19a_all "Failure|Expected|bf16: worst|actor vs|Kept"
  attention_tests s19a 'CudaModel.*:CudaOps.*Attention*:CudaOps.*Qkv*:CudaOps.Kept*' AHA_ATTENTION_WGMMA=0 \
    AHA_ATTENTION_WGMMA_BWD=0 AHA_FUSED_QKV=0 AHA_ATTENTION_KV16=0 AHA_ATTENTION=f32 AHA_KEEP_BF16=0
  train_ab s19a 2
  gen_runs s19a 1
fi
if [[ " $what " == *" s19b "* ]]; then
  # Session 19: the q/k/v kernels four values a thread with the row's rotations computed once
  # (dist/) against the build with kept activations only reserved (dist-mid/) and main (dist-old/):
  # the whole conformance test, its model cases with the f32 attention and without bf16-only
  # activations, the attention test; the learner step interleaved with peak memory, the per-op
  # profile of each; generation interleaved.
  conformance_all s19b_all "Failure|Expected|a value a thread"
  attention_tests s19b 'CudaModel.*:CudaOps.*Attention*:CudaOps.*Qkv*:CudaOps.Kept*' AHA_ATTENTION=f32 AHA_KEEP_BF16=0
  train_ab s19b 3 "old mid new"
  for v in old new; do
    AHA_PROFILE=1 timeout 120 $(aha_of $v) bench train --steps 3 --model $model > "$out/profile_train_$v.txt" 2>&1
    echo "profile $v:"; grep -vE '^\{' "$out/profile_train_$v.txt" | grep -iE "q/k/v|rope|total" | head -6
  done
  gen_runs s19b 2 "old new"
fi
if [[ " $what " == *" s19c "* ]]; then
  # Session 19: the packed q/k/v gradient kept in bf16 only (dist/) against the build before it
  # (dist-old/): the whole conformance test, its q/k/v and model cases with the unfused ops, without
  # bf16-only activations and with the f32 attention; the learner step interleaved; per-op profiles.
  conformance_all s19c_all "Failure|Expected|kept dqkv"
  attention_tests s19c 'CudaModel.*:CudaOps.*Qkv*:CudaOps.Kept*' AHA_FUSED_QKV=0 AHA_KEEP_BF16=0 AHA_ATTENTION=f32
  train_ab s19c 3 "old new"
  for v in old new; do
    AHA_PROFILE=1 timeout 120 $(aha_of $v) bench train --steps 3 --model $model > "$out/profile_train_$v.txt" 2>&1
    echo "profile $v:"; grep -vE '^\{' "$out/profile_train_$v.txt" | grep -iE "rope|linear backward|total" | head -6
  done
fi
if [[ " $what " == *" s19d "* ]]; then
  # Session 19, the closing call on main: the q/k/v tests and the models with the unfused ops
  # (AHA_FUSED_QKV=0); the learner step with its peak memory, generation, and beside them HF
  # generate and the torch.compile step.
  attention_tests s19d 'CudaOps.*Qkv*:CudaModel.*' default AHA_FUSED_QKV=0
  train_ab s19d 2 new
  gen_runs s19d 2
  peer_gen
  peer_compile
fi
if [[ " $what " == *" s20a "* ]]; then
  # Session 20, on branch exp/grad-overwrite (not merged: +5% data parallel): the first backward
  # after ZeroGrad writes the products' weight gradients (beta 0, no zeroing of them) against
  # AHA_GRAD_OVERWRITE=0 (all zeroed, every backward adds): the whole conformance test, the models
  # both ways, then the learner step interleaved.
  conformance_all s20a "worst gradient|Failure|FAILED"
  AHA_GRAD_OVERWRITE=0 timeout 300 dist/bin/engine_cuda_conformance_test --gtest_color=no --gtest_filter='CudaModel.*' \
    > "$out/conformance_s20a_old.log" 2>&1
  echo "conformance AHA_GRAD_OVERWRITE=0: exit $?" \
    "$(grep -E '^\[  (PASSED|FAILED)' "$out/conformance_s20a_old.log" | tr '\n' ' ')"
  variant_runs s20a 4 'median step [0-9.]+ s|[0-9.]+ tokens/s|MFU [0-9.]+%' default AHA_GRAD_OVERWRITE=0 -- \
    timeout 120 dist/bin/aha bench train --steps 5 --model $model
fi
if [[ " $what " == *" s20b "* ]]; then
  # Session 20: where the learner step's time outside the device's phases goes (the host's loss,
  # the rest of the step), three runs.
  variant_runs s20b 3 'median step [0-9.]+ s|forward [0-9.e-]+|loss on the host [0-9.e-]+|backward [0-9.e-]+|optimizer [0-9.e-]+|the rest of the last step [0-9.e-]+' \
    default -- timeout 120 dist/bin/aha bench train --steps 5 --model $model
fi
if [[ " $what " == *" s20c "* ]]; then
  # Session 20, the closing call: the learner step with its peak memory and generation, twice each,
  # beside HF generate and the torch.compile step.
  train_ab s20c 2 new
  gen_runs s20c 2
  peer_gen
  peer_compile
fi
if [[ " $what " == *" s22 "* ]]; then
  # Session 22: the lm-head product with the draw in its epilogue (LmHeadSample, the default since)
  # against AHA_FUSED_SAMPLE=0 (cuBLAS's product, then SampleRows): its tests with the model tests,
  # generation interleaved three times, Nsight Compute's kernel table of one decode step each way,
  # and HF generate.
  f="$out/conformance_s22.log"
  AHA_FUSED_SAMPLE=1 timeout 200 dist/bin/engine_cuda_conformance_test --gtest_color=no \
    --gtest_filter='CudaOps.LmHeadSample*:CudaOps.SampleRows*:CudaModel.*' > "$f" 2>&1
  echo "conformance: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$f" | tr '\n' ' ')"
  grep -E "lm-head \+ sample|Failure|Expected|actor vs|vs transformers" "$f" | head -14
  for rep in 1 2 3; do
    for v in off on; do
      [ $v = on ] && env=(AHA_FUSED_SAMPLE=1) || env=(AHA_FUSED_SAMPLE=0)
      env "${env[@]}" timeout 60 dist/bin/aha bench gen --model $model > "$out/gen.log" 2>&1
      echo "gen fused $v $rep: $(grep -oE 'new tokens: [0-9.]+ s, [0-9.]+ new tokens/s|decode [0-9.]+ ms per step' \
        "$out/gen.log" | tr '\n' ' ')"
    done
  done
  for v in off on; do
    [ $v = on ] && env=(AHA_FUSED_SAMPLE=1) || env=(AHA_FUSED_SAMPLE=0)
    env "${env[@]}" bench/gpu/decode_profile.sh "$out/ncu" > "$out/ncu.txt" 2>&1
    echo "== decode step kernels, fused $v"; grep -A7 "last decode step" "$out/ncu.txt"
  done
  peer_gen
fi
if [[ " $what " == *" s23 "* ]]; then
  # Session 23: the whole conformance test; generation with each kind of sampling (aha bench gen
  # --temperature, --top-p, --top-k): plain (the bench's default), greedy, top-p 0.95, top-k 50 and
  # both, each with the fused lm-head + draw (default) and with AHA_FUSED_SAMPLE=0; plain twice more;
  # the 0.5B shape with an odd vocabulary (151,669); HF generate.
  f="$out/conformance_s23.log"
  timeout 400 dist/bin/engine_cuda_conformance_test --gtest_color=no > "$f" 2>&1
  echo "conformance: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$f" | tr '\n' ' ')"
  grep -E "lm-head \+ sample|Failure|Expected|actor vs|vs transformers" "$f" | head -24
  pattern='new tokens: [0-9.]+ s, [0-9.]+ new tokens/s|decode [0-9.]+ ms per step'
  for v in "" "--temperature 0" "--top-p 0.95" "--top-k 50" "--top-p 0.95 --top-k 50"; do
    for fused in 1 0; do
      AHA_FUSED_SAMPLE=$fused timeout 90 dist/bin/aha bench gen --model $model $v > "$out/gen.log" 2>&1
      echo "gen [${v:-plain}] fused $fused: $(grep -oE "$pattern" "$out/gen.log" | tr '\n' ' ')"
    done
  done
  for rep in 2 3; do
    timeout 90 dist/bin/aha bench gen --model $model > "$out/gen.log" 2>&1
    echo "gen [plain] $rep: $(grep -oE "$pattern" "$out/gen.log" | tr '\n' ' ')"
  done
  odd=/tmp/aha-0.5b-odd
  python3 -c "import json; c = json.load(open('$model/config.json')); c['vocab_size'] = 151669; \
json.dump(c, open('/tmp/odd.json', 'w'))"
  [ -d $odd ] || dist/bin/aha init --config /tmp/odd.json --out $odd > /dev/null
  timeout 90 dist/bin/aha bench gen --model $odd > "$out/gen_odd.log" 2>&1
  echo "gen [vocabulary 151,669]: $(grep -oE "$pattern" "$out/gen_odd.log" | tr '\n' ' ')"
  peer_gen
fi
if [[ " $what " == *" s23b "* ]]; then
  # Session 23, last: top-p alone by rejection in SampleRows itself too (AHA_FUSED_SAMPLE=0): the
  # sampling and model tests, then generation at top-p 0.95 each way, twice.
  f="$out/conformance_s23b.log"
  timeout 300 dist/bin/engine_cuda_conformance_test --gtest_color=no \
    --gtest_filter='CudaOps.LmHeadSample*:CudaOps.SampleRows*:CudaModel.*' > "$f" 2>&1
  echo "conformance: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$f" | tr '\n' ' ')"
  grep -E "sample|Failure|Expected" "$f" | head -30
  for rep in 1 2; do
    for fused in 1 0; do
      AHA_FUSED_SAMPLE=$fused timeout 90 dist/bin/aha bench gen --model $model --top-p 0.95 > "$out/gen.log" 2>&1
      echo "gen [--top-p 0.95] fused $fused: $(grep -oE 'new tokens: [0-9.]+ s, [0-9.]+ new tokens/s|decode [0-9.]+ ms per step' \
        "$out/gen.log" | tr '\n' ' ')"
    done
  done
fi
if [[ " $what " == *" s24 "* ]]; then
  # Session 24, on branch exp/qkv-split (not merged: slower): the decode step's q/k/v product in K
  # parts that the fused attention adds as it loads (AHA_SPLIT_K_QKV=1: one part, as before; 2: two),
  # and the down product in 8 parts instead of 4 (AHA_SPLIT_K=0,8): the tests that cover them, the
  # variants interleaved three times, HF generate.
  conformance_all s24 "Failure|Expected|actor vs" \
    'CudaOps.QkvRope*:CudaOps.LinearForwardParts*:CudaOps.LinearAddRmsNorm*:CudaModel.*'
  variant_runs gen_s24 3 "$gen_pat" AHA_SPLIT_K_QKV=1 default AHA_SPLIT_K_QKV=2 "AHA_SPLIT_K=0,8" "AHA_SPLIT_K_QKV=1 AHA_SPLIT_K=0,8" -- \
    timeout 90 dist/bin/aha bench gen --model $model
  peer_gen
fi
# Session 24's models (random weights) and the tests its later calls ran.
q3=/tmp/aha-qwen3-0.6b q3s=/tmp/aha-qwen3-0.5b q15=/tmp/aha-1.5b
s24_tests='CudaOps.QkvRope*:CudaOps.QkvNorm*:CudaOps.RmsNorm*:CudaOps.AddRmsNorm*:CudaModel.*'
if [[ " $what " == *" s24b "* ]]; then
  # Session 24: Qwen3's per-head q/k norms inside the fused decode attention. The whole conformance
  # test; then generation of Qwen3-0.6B's shape and of Qwen2.5-0.5B's shape with Qwen3's norms
  # (random weights), the fused kernel against the ops it replaces (AHA_DECODE_FUSED=0), twice, the
  # bench's Qwen2.5 model once; HF generate on the Qwen3-0.6B shape.
  conformance_all s24b "Failure|Expected|Which is|FAILED  \]"
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q3s --arch qwen3 --preset 0.5b
  variant_runs gen_q3 2 "$gen_pat" default AHA_DECODE_FUSED=0 -- timeout 120 dist/bin/aha bench gen --model $q3
  variant_runs gen_q3s 2 "$gen_pat" default AHA_DECODE_FUSED=0 -- timeout 120 dist/bin/aha bench gen --model $q3s
  variant_runs gen_q2 1 "$gen_pat" default -- timeout 120 dist/bin/aha bench gen --model $model
  timeout 500 python3 bench/gpu/peer_pytorch.py gen --model $q3 > "$out/gen_peer_q3.log" 2>&1
  echo "HF generate, Qwen3-0.6B shape: $(tail -n 1 "$out/gen_peer_q3.log")"
fi
if [[ " $what " == *" s24c "* ]]; then
  # Session 24, after s24b (that build: the norms a runtime branch of the fused kernel, and a rule
  # that fused only when the (row, kv head) items fit one wave; AHA_DECODE_FUSED=1 fuses always, =0
  # never). Its tests; Qwen3-0.6B at 256 prompts (8 waves) and 32 (one), Qwen2.5-1.5B at 256 (2
  # waves) and 128 (one), each the rule against the other way; Qwen2.5-0.5B (one wave) against the
  # build before this session's changes (dist-old/).
  conformance_all s24c "Failure|Expected|Which is" "$s24_tests"
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs q3_256 2 "$gen_pat" default AHA_DECODE_FUSED=1 -- timeout 120 dist/bin/aha bench gen --model $q3
  variant_runs q3_32 2 "$gen_pat" default AHA_DECODE_FUSED=0 -- timeout 120 dist/bin/aha bench gen --model $q3 --prompts 32
  variant_runs q15_256 2 "$gen_pat" default AHA_DECODE_FUSED=1 -- timeout 120 dist/bin/aha bench gen --model $q15
  variant_runs q15_128 2 "$gen_pat" default AHA_DECODE_FUSED=0 -- timeout 120 dist/bin/aha bench gen --model $q15 --prompts 128
  gen_runs s24c 3 "new old"
fi
if [[ " $what " == *" s24d "* ]]; then
  # Session 24: the norms as a template variant of the fused kernel (Qwen2's kernel as before this
  # session), that build fusing at D = 64 always and at D = 128 only with norms in one wave. Its tests;
  # Qwen2.5-0.5B against the build before this session (dist-old/); fused (AHA_DECODE_FUSED=1)
  # against the ops (=0) for Qwen2.5-1.5B at 256 and 128 prompts and Qwen3-0.6B at 32; the
  # default for Qwen3-0.6B at 256 and for Qwen2.5-0.5B's shape with Qwen3's norms against the ops.
  conformance_all s24d "Failure|Expected|Which is" "$s24_tests"
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  init_model $q3s --arch qwen3 --preset 0.5b
  gen_runs s24d 3 "new old"
  variant_runs q15_256 2 "$gen_pat" AHA_DECODE_FUSED=1 AHA_DECODE_FUSED=0 -- timeout 120 dist/bin/aha bench gen --model $q15
  variant_runs q15_128 2 "$gen_pat" AHA_DECODE_FUSED=1 AHA_DECODE_FUSED=0 -- \
    timeout 120 dist/bin/aha bench gen --model $q15 --prompts 128
  variant_runs q3_32 2 "$gen_pat" AHA_DECODE_FUSED=1 AHA_DECODE_FUSED=0 -- \
    timeout 120 dist/bin/aha bench gen --model $q3 --prompts 32
  variant_runs q3_256 1 "$gen_pat" default -- timeout 120 dist/bin/aha bench gen --model $q3
  variant_runs q3s 1 "$gen_pat" default AHA_DECODE_FUSED=0 -- timeout 120 dist/bin/aha bench gen --model $q3s
fi
if [[ " $what " == *" s24e "* ]]; then
  # Session 24: Qwen3-0.6B at 256 prompts (8 waves of items) with the template norm kernel fused
  # (AHA_DECODE_FUSED=1, the default since) against its ops (=0; s24d's default), interleaved twice.
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs q3_256 2 "$gen_pat" AHA_DECODE_FUSED=1 AHA_DECODE_FUSED=0 -- \
    timeout 60 dist/bin/aha bench gen --model $q3
fi
if [[ " $what " == *" s25a "* ]]; then
  # Session 25: where the decode attention at D = 128 stands. The tensor-core decode kernel alone
  # (cold L2) at the D = 64 bench shape and at Qwen3-0.6B's and Qwen2.5-1.5B's heads; each decode op's
  # share of a step inside the graph (by subtraction) for Qwen3-0.6B and Qwen2.5-1.5B; Nsight
  # Compute's view of Qwen3-0.6B's fused decode attention.
  timeout 200 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests \
    --gtest_filter='CachedAttentionTiming.*' > "$out/attn_timing.log" 2>&1
  grep -E "^shape|bf16" "$out/attn_timing.log"
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  echo "== Qwen3-0.6B"; SUBTRACT=1 MODEL=$q3 bench/gpu/decode_profile.sh "$out/sub_q3" | tail -9
  echo "== Qwen2.5-1.5B"; SUBTRACT=1 MODEL=$q15 bench/gpu/decode_profile.sh "$out/sub_q15" | tail -9
  KERNEL=DecodeTcKernel SKIP=100 MODEL=$q3 bench/gpu/decode_profile.sh "$out/ncu_q3" | \
    grep -iE "Duration|DRAM Through|Memory Through|Achieved Occ|Theoretical Occ|Registers|Block Limit|Issued Ipc|No Eligible|Warp Cycles Per Issued|Stall" | head -30
fi
if [[ " $what " == *" s25d "* ]]; then
  # Session 25: the decode attention at D = 128 with 2 copy stages, three blocks a multiprocessor
  # (AHA_DECODE_STAGES=3: 3 stages, two blocks, as before). The decode tests; Qwen3-0.6B at 256 and 32
  # prompts and Qwen2.5-1.5B, both ways, interleaved; the bench's model (D = 64: unchanged) once.
  conformance_all s25d "Failure|Expected|Which is" \
    'CudaOps.QkvRope*:CudaOps.QkvNorm*:CudaOps.CachedAttention*:CudaOps.KvCache*:CudaModel.*'
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs q3 2 "$gen_pat" default AHA_DECODE_STAGES=3 -- timeout 60 dist/bin/aha bench gen --model $q3
  variant_runs q15 2 "$gen_pat" default AHA_DECODE_STAGES=3 -- timeout 60 dist/bin/aha bench gen --model $q15
  variant_runs q3_32 1 "$gen_pat" default AHA_DECODE_STAGES=3 -- timeout 60 dist/bin/aha bench gen --model $q3 --prompts 32
  variant_runs q05 1 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
fi
if [[ " $what " == *" s25e "* ]]; then
  # Session 25, the final build: 2 stages at D = 128 only from four waves of the 3-stage kernel's blocks.
  # The decode tests; the default for Qwen3-0.6B at 256 rows (2 stages) and 32 (3), Qwen2.5-1.5B (3) and
  # the bench's model.
  conformance_all s25e "Failure|Expected|Which is" \
    'CudaOps.QkvNorm*:CudaOps.CachedAttentionDecode*:CudaModel.*'
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs q3 1 "$gen_pat" default -- timeout 40 dist/bin/aha bench gen --model $q3
  variant_runs q3_32 1 "$gen_pat" default -- timeout 40 dist/bin/aha bench gen --model $q3 --prompts 32
  variant_runs q15 1 "$gen_pat" default -- timeout 40 dist/bin/aha bench gen --model $q15
  variant_runs q05 1 "$gen_pat" default -- timeout 40 dist/bin/aha bench gen --model $model
fi
if [[ " $what " == *" s26a "* ]]; then
  # Session 26: the fused gate/up kernel's tile chosen per shape (MlpTileFor; AHA_MLP_TILE=128x80 is
  # the one tile before). Its tests, and the fused decode test not yet run on a GPU; each tile's time
  # a layer in a graph of the model's layers (aha bench gemm) for the three models at 256 and 128
  # rows; generation with the rule against 128 x 80, interleaved.
  conformance_all s26a "Failure|Expected|Which is" \
    'CudaOps.GateUpSwiGlu*:CudaOps.QkvRopeCachedAttention*:CudaOps.LmHeadSampleAgrees*:CudaModel.*'
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  for m in $model $q15 $q3; do
    timeout 100 dist/bin/aha bench gemm --model $m --tokens 256,128 --forms nt --libraries lt \
      > "$out/gemm_$(basename $m).txt" 2>&1
    echo "== $(basename $m)"; grep -E "gate/up|MLP" "$out/gemm_$(basename $m).txt" | grep -v '^{'
  done
  variant_runs q15 2 "$gen_pat" default AHA_MLP_TILE=128x80 -- timeout 60 dist/bin/aha bench gen --model $q15
  variant_runs q3 2 "$gen_pat" default AHA_MLP_TILE=128x80 -- timeout 60 dist/bin/aha bench gen --model $q3
  variant_runs q05_128 2 "$gen_pat" default AHA_MLP_TILE=128x80 -- \
    timeout 60 dist/bin/aha bench gen --model $model --prompts 128
  variant_runs q05 1 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
fi
if [[ " $what " == *" s26b "* ]]; then
  # Session 26: the split rules at the other models, interleaved: the o and down products' K parts
  # (AHA_SPLIT_K=1|2 against the rule's 4) and the D = 128 decode attention's context splits and
  # stages (AHA_DECODE_SPLITS, AHA_DECODE_STAGES) for Qwen2.5-1.5B (512 items on 264 blocks) and
  # Qwen3-0.6B at 32 rows; the K parts for the bench and Qwen3-0.6B.
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs q15 2 "$gen_pat" default AHA_SPLIT_K=2 AHA_SPLIT_K=1 AHA_DECODE_SPLITS=2 \
    "AHA_DECODE_STAGES=2 AHA_DECODE_SPLITS=2" "AHA_DECODE_STAGES=2 AHA_DECODE_SPLITS=3" -- \
    timeout 60 dist/bin/aha bench gen --model $q15
  variant_runs q05 3 "$gen_pat" default AHA_SPLIT_K=2 -- timeout 60 dist/bin/aha bench gen --model $model
  variant_runs q3 2 "$gen_pat" default AHA_SPLIT_K=2 -- timeout 60 dist/bin/aha bench gen --model $q3
  variant_runs q3_32 2 "$gen_pat" default AHA_DECODE_SPLITS=2 -- \
    timeout 60 dist/bin/aha bench gen --model $q3 --prompts 32
fi
if [[ " $what " == *" s26c "* ]]; then
  # Session 26, after s26b (where Qwen2.5-1.5B ran 3.21 ms a step with the o and down products
  # whole, AHA_SPLIT_K=1, against 3.51 with the rule's 4 parts): the K parts at the bench, at
  # Qwen2.5-1.5B once more and at Qwen3-0.6B, interleaved.
  variant_runs q05 2 "$gen_pat" default AHA_SPLIT_K=1 AHA_SPLIT_K=2 -- \
    timeout 60 dist/bin/aha bench gen --model $model
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs q15 1 "$gen_pat" AHA_SPLIT_K=1 default -- timeout 60 dist/bin/aha bench gen --model $q15
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs q3 1 "$gen_pat" AHA_SPLIT_K=1 AHA_SPLIT_K=2 default -- timeout 60 dist/bin/aha bench gen --model $q3
fi
if [[ " $what " == *" s26d "* ]]; then
  # Session 26, the final build: the norm's float4 kernel for a split addend at rows wider than
  # 1,024 (s26b/c's cost of 4 parts at Qwen2.5-1.5B was the scalar kernel). The norm tests and the
  # models; Qwen2.5-1.5B with the rule's 4 parts against the products whole (AHA_SPLIT_K=1),
  # interleaved twice; the bench; HF generate beside it.
  conformance_all s26d "Failure|Expected|Which is" \
    'CudaOps.LinearAddRmsNorm*:CudaOps.AddRmsNorm*:CudaOps.EmbeddingRmsNorm*:CudaModel.*'
  variant_runs q05 1 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs q15 2 "$gen_pat" default AHA_SPLIT_K=1 -- timeout 60 dist/bin/aha bench gen --model $q15
  peer_gen
fi
if [[ " $what " == *" s26e "* ]]; then
  # Session 26: the norm backward's one-pass kernel for rows of 1,028-2,048 (AHA_NORM_BWD_WIDE=0: the
  # two kernels, as before). Its tests; the learner step of Qwen2.5-1.5B's shape both ways.
  conformance_all s26e "Failure|Expected|Which is" 'CudaOps.EmbeddingRmsNorm*:CudaModel.ForwardBackward*'
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs train_q15 1 'median step [0-9.]+ s|[0-9.]+ tokens/s|MFU [0-9.]+%' default AHA_NORM_BWD_WIDE=0 -- \
    timeout 100 dist/bin/aha bench train --steps 3 --model $q15
fi
if [[ " $what " == *" s27a "* ]]; then
  # Session 27: Qwen3's q/k/v step with its per-head norms in one kernel each way
  # (QkvNormRopeAttention, NormRopePackQkv; AHA_FUSED_QKV=0 runs the ops, as before, and also unfuses
  # the decode step, so only the prefill of the gen runs compares). The tests; Qwen3-0.6B's learner
  # step both ways, interleaved twice, and its per-op profile; gen both ways; the compiled peer's step.
  conformance_all s27a "Failure|Expected|Which is" \
    'CudaOps.QkvNormRope*:CudaOps.QkvRope*:CudaOps.QkvGradient*:CudaModel.*'
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs train_q3 2 'median step [0-9.]+ s \(forward [0-9.]+, backward [0-9.]+|[0-9.]+ tokens/s|MFU [0-9.]+%' \
    default AHA_FUSED_QKV=0 -- timeout 100 dist/bin/aha bench train --steps 3 --model $q3
  AHA_PROFILE=1 timeout 100 dist/bin/aha bench train --steps 3 --model $q3 > "$out/train_q3_profile.log" 2>&1
  grep -iE "rope|norm|qkv|attention|zero|pack" "$out/train_q3_profile.log" | head -16
  variant_runs gen_q3 1 "$gen_pat|prefill [0-9.]+ s" default AHA_FUSED_QKV=0 -- \
    timeout 60 dist/bin/aha bench gen --model $q3
  peer_compile $q3 q3
fi
if [[ " $what " == *" s27c "* ]]; then
  # Session 27: the training attention's backward on wgmma at D = 128 (two warpgroups, a half of D
  # each; AHA_ATTENTION_WGMMA_BWD=64 keeps D = 128 on mma.sync, as before). The attention tests with
  # the training-shape timings; the model tests (now also at head widths 64 and 128); the learner
  # step of Qwen3-0.6B (interleaved twice) and Qwen2.5-1.5B both ways, and the bench's (D = 64).
  attention_suite s27c
  conformance_all s27c "Failure|Expected|Which is|worst gradient" 'CudaOps.QkvNormRope*:CudaModel.ForwardBackward*'
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs train_q3 2 "$train_pat" default AHA_ATTENTION_WGMMA_BWD=64 -- \
    timeout 100 dist/bin/aha bench train --steps 3 --model $q3
  variant_runs train_q15 1 "$train_pat" default AHA_ATTENTION_WGMMA_BWD=64 -- \
    timeout 100 dist/bin/aha bench train --steps 3 --model $q15
  variant_runs train_q05 1 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 3 --model $model
fi
if [[ " $what " == *" s27d "* ]]; then
  # Session 27: the training attention's forward on wgmma at D = 128 too (AHA_ATTENTION_WGMMA=64 keeps
  # it on mma.sync, as before). The attention tests with the training-shape timings; the model and
  # q/k/v tests; Qwen3-0.6B's learner step both ways (interleaved twice), its generation (prefill) both
  # ways, Qwen2.5-1.5B's step both ways, the bench's; the compiled peer's Qwen3-0.6B step.
  attention_suite s27d
  conformance_all s27d "Failure|Expected|Which is|worst gradient" \
    'CudaOps.QkvNormRope*:CudaOps.QkvRope*:CudaModel.*'
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  variant_runs train_q3 2 "$train_pat" default AHA_ATTENTION_WGMMA=64 -- \
    timeout 100 dist/bin/aha bench train --steps 3 --model $q3
  variant_runs gen_q3 1 "$gen_pat|prefill [0-9.]+ s" default AHA_ATTENTION_WGMMA=64 -- \
    timeout 60 dist/bin/aha bench gen --model $q3
  variant_runs train_q15 1 "$train_pat" default AHA_ATTENTION_WGMMA=64 -- \
    timeout 100 dist/bin/aha bench train --steps 3 --model $q15
  variant_runs train_q05 1 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 3 --model $model
  peer_compile $q3 q3
fi
if [[ " $what " == *" s27b "* ]]; then
  # Session 27: where issue 7's targets stand on this build: the bench's learner step and generation,
  # then the peers in the same call (HF generate, the torch.compile step).
  variant_runs train 1 'median step [0-9.]+ s|[0-9.]+ tokens/s|MFU [0-9.]+%' default -- \
    timeout 100 dist/bin/aha bench train --steps 5 --model $model
  variant_runs gen 1 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
  peer_gen
  peer_compile
fi
if [[ " $what " == *" s28a "* ]]; then
  # Session 28: session 27's review mends (RowStats shared by the backward kernels, StageDq,
  # SplitNormRopeOps) on a GPU: the attention tests with the training-shape timings, the whole
  # conformance test; the per-op profiles of the bench's learner step and Qwen3-0.6B's; the bench's
  # learner step and generation.
  attention_suite s28a
  conformance_all s28a "Failure|Expected|Which is|worst gradient"
  init_model $q3 --arch qwen3 --preset 0.6b
  AHA_PROFILE=1 timeout 100 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_q05.txt" 2>&1
  grep -vE '^\{' "$out/profile_q05.txt" | head -32
  AHA_PROFILE=1 timeout 100 dist/bin/aha bench train --steps 3 --model $q3 > "$out/profile_q3.txt" 2>&1
  grep -vE '^\{' "$out/profile_q3.txt" | head -32
  variant_runs train 1 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 5 --model $model
  variant_runs gen 1 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
fi
if [[ " $what " == *" s28b "* ]]; then
  # Session 28: the reference model's forward without what only a backward reads (forward_only) and
  # Qwen3's q/k/v gradient kept in bf16 only (dist/) against the build before (dist-old/): the q/k/v
  # and model tests; Qwen3-0.6B's and the bench's learner steps, the builds interleaved twice (logs in
  # /tmp: few files come back); then Nsight Compute's stall profile of the D = 128 backward kernel.
  conformance_all s28b "Failure|Expected|Which is|worst gradient" \
    'CudaOps.QkvNormRope*:CudaOps.QkvRope*:CudaOps.QkvGradient*:CudaModel.*'
  init_model $q3 --arch qwen3 --preset 0.6b
  mkdir -p /tmp/s28
  for rep in 1 2; do
    for m in q3 q05; do
      for v in old new; do
        f=/tmp/s28/train_${m}_${v}_$rep.log
        [ $m = q3 ] && dir=$q3 || dir=$model
        timeout 100 $(aha_of $v) bench train --steps 3 --model $dir > "$f" 2>&1
        echo "train $m $v $rep: $(grep -oE "$train_pat" "$f" | tr '\n' ' ')"
      done
    done
  done
  SOURCE=1 SPECS="wbwd128 AttnBwdWgmma128Kernel 30" bash bench/gpu/attn_profile.sh "$out" 2>&1 |
    grep -v "^16x1024\|^4x4096\|nmse"
fi
# Session 28's A/Bs of the training attention's backward, bwd_ab TAG NAME=VALUE [FILTER]: the attention
# tests and training-shape timings by default and with NAME=VALUE (the earlier form); the conformance
# test's FILTER (all without one); Qwen3-0.6B's learner step both ways, interleaved twice.
bwd_ab() {
  local tag=$1 var=$2
  attention_suite "$tag"
  env "$var" timeout 240 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests \
    --gtest_filter='AttentionTc.*:AttentionTcTiming.*' > "/tmp/attn_${tag}_b.log" 2>&1
  echo "attention tests, $var: exit $? $(grep -E '^\[  (PASSED|FAILED)' "/tmp/attn_${tag}_b.log" | tr '\n' ' ')"
  grep -E "Failure|^shape|x1024" "/tmp/attn_${tag}_b.log" | head -20
  conformance_all "$tag" "Failure|Expected|Which is|worst gradient" "${3:-}"
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs train_q3 2 "$train_pat" default "$var" -- timeout 100 dist/bin/aha bench train --steps 3 --model $q3
}
attention_filter='CudaModel.ForwardBackward*:CudaOps.*Attention*'
if [[ " $what " == *" s28c "* ]]; then
  # The backward with Q and dO two tiles ahead (three stages) against one ahead; the bench's step too.
  bwd_ab s28c AHA_ATTENTION_BWD_STAGES=2 "$attention_filter"
  variant_runs train_q05 2 "$train_pat" default AHA_ATTENTION_BWD_STAGES=2 -- \
    timeout 100 dist/bin/aha bench train --steps 3 --model $model
fi
if [[ " $what " == *" s28d "* ]]; then
  # The D = 128 backward with each warpgroup finishing half of P^T and dS^T against both all of them.
  bwd_ab s28d AHA_ATTENTION_BWD_HALVES=0 "$attention_filter"
fi
if [[ " $what " == *" s28e "* ]]; then
  # The D = 128 backward with tile i's last products overlapping tile i + 1's first against not (s28d's
  # kernel); the whole conformance test.
  bwd_ab s28e AHA_ATTENTION_BWD_PIPE=0
fi
if [[ " $what " == *" s28f "* ]]; then
  # Session 28's final build, where issue 7's targets stand: the bench's learner step and generation,
  # the compiled peer's step; then Qwen3-0.6B's learner step and its compiled peer (HF generate not
  # run: generation did not change in this session).
  variant_runs train 1 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 5 --model $model
  variant_runs gen 1 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
  peer_compile
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs train_q3 1 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 5 --model $q3
  peer_compile $q3 q3
fi
if [[ " $what " == *" s28g "* ]]; then
  # Session 28's final build: generation beside HF generate in one call (the 50x ratio).
  variant_runs gen 1 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
  peer_gen
fi
if [[ " $what " == *" s29a "* ]]; then
  # Session 29, run from branch exp/reference-stream (not merged: no faster): the backward kernels'
  # P^T / dS^T element code in one helper (PdsElement, LoadNtStats; on main): the attention tests and
  # the whole conformance test; the learner's GPU tests (GrpoGpu.ReferenceOnItsOwnStreamMatchesTheSerialSteps:
  # the frozen reference on a backend and stream of its own); the bench's and Qwen3-0.6B's learner steps
  # with the reference on its own stream against AHA_REFERENCE_STREAM=0, interleaved (logs in /tmp).
  # (Its timing A/B of the attention builds printed the f32 kernels' column: s29b repeats it.)
  attention_suite s29a
  conformance_all s29a "Failure|Expected|Which is|worst gradient"
  timeout 300 dist/bin/learner_data_parallel_gpu_test --gtest_color=no > "$out/learner_gpu_s29a.log" 2>&1
  echo "learner GPU tests: exit $? $(grep -E '^\[  (PASSED|FAILED|SKIPPED)' "$out/learner_gpu_s29a.log" | tr '\n' ' ')"
  grep -E "^step|difference|Failure|Expected|Which is" "$out/learner_gpu_s29a.log" | head -16
  init_model $q3 --arch qwen3 --preset 0.6b
  mem_pat="$train_pat|memory in use [0-9.]+ GiB"
  out_saved=$out out=/tmp/s29a
  mkdir -p $out
  variant_runs train_q05 2 "$mem_pat" default AHA_REFERENCE_STREAM=0 -- \
    timeout 100 dist/bin/aha bench train --steps 5 --model $model
  variant_runs train_q3 2 "$mem_pat" default AHA_REFERENCE_STREAM=0 -- \
    timeout 100 dist/bin/aha bench train --steps 5 --model $q3
  out=$out_saved
fi
# attn_timings TAG REPS BINARY...: the training-shape timings (tensor-core TFLOP/s) of each attention test
# binary in dist/bin, interleaved REPS times (logs in /tmp).
attn_timings() {
  local tag=$1 reps=$2
  shift 2
  for rep in $(seq "$reps"); do
    for v in "$@"; do
      timeout 120 dist/bin/$v --gtest_also_run_disabled_tests --gtest_filter='AttentionTcTiming.*' \
        > "/tmp/attn_${tag}_${v}_$rep.log" 2>&1
      echo "$v $rep: $(grep -E '^16x1024.*(forward|backward|fwd kv16|bwd mma)' "/tmp/attn_${tag}_${v}_$rep.log" |
        awk '{printf "%s %s %s %s; ", $2, $3, $4 ($4 == "fwd" || $4 == "bwd" ? " " $5 : ""), $NF}')"
    done
  done
}
if [[ " $what " == *" s29b "* ]]; then
  # Session 29: the D = 64 backward with P^T and dS^T read from shared memory, three blocks a
  # multiprocessor, against AHA_ATTENTION_BWD_SS=0 (session 28's kernel): the attention tests both ways,
  # the training-shape timings interleaved; the P^T / dS^T helper (this build, AHA_ATTENTION_BWD_SS=0)
  # against the build before it (dist/bin/old_attn_tc_test); the conformance test's attention and model
  # cases; the bench's learner step both ways, interleaved.
  attention_suite s29b
  AHA_ATTENTION_BWD_SS=0 timeout 240 dist/bin/engine_attention_tc_test --gtest_filter='AttentionTc.*' \
    > /tmp/attn_s29b_rs.log 2>&1
  echo "attention tests, AHA_ATTENTION_BWD_SS=0: exit $?" \
    "$(grep -E '^\[  (PASSED|FAILED)' /tmp/attn_s29b_rs.log | tr '\n' ' ')"
  grep -E "Failure|Expected|Which is" /tmp/attn_s29b_rs.log | head
  out_saved=$out out=/tmp/s29b
  mkdir -p $out
  variant_runs attn 2 'D=64 +(backward|bwd mma) +[0-9. ]+' default AHA_ATTENTION_BWD_SS=0 -- \
    timeout 120 dist/bin/engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_filter='AttentionTcTiming.*'
  export AHA_ATTENTION_BWD_SS=0
  attn_timings s29b 2 old_attn_tc_test engine_attention_tc_test
  unset AHA_ATTENTION_BWD_SS
  out=$out_saved
  conformance_all s29b "Failure|Expected|Which is|worst gradient" "$attention_filter"
  out_saved=$out out=/tmp/s29b
  variant_runs train_q05 2 "$train_pat" default AHA_ATTENTION_BWD_SS=0 -- \
    timeout 100 dist/bin/aha bench train --steps 5 --model $model
  out=$out_saved
  ls -d /opt/nvidia/* /usr/local/cuda/bin/nsys* 2> /dev/null; command -v nsys
fi
if [[ " $what " == *" s29c "* ]]; then
  # Session 29: the training lm-head's products per 8,192-column chunk against one product over the
  # whole vocabulary, each form, at the bench's 12,288 completion rows (the layers' products too).
  timeout 300 dist/bin/aha bench gemm --tokens 12288 --forms nt,nn,tn --libraries lt > "$out/gemm_s29c.txt" 2>&1
  echo "gemm: exit $?"
  grep -E "^T " "$out/gemm_s29c.txt" | grep -v bf16 | cut -c1-150
fi
if [[ " $what " == *" s29d "* ]]; then
  # Session 29's final build, where issue 7's targets stand: the bench's learner step twice and its
  # per-op profile, generation twice, then the peers in the same call (the torch.compile step, HF
  # generate).
  variant_runs train 2 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 5 --model $model
  AHA_PROFILE=1 timeout 100 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_q05.txt" 2>&1
  grep -vE '^\{' "$out/profile_q05.txt" | head -24
  variant_runs gen 2 "$gen_pat" default -- timeout 60 dist/bin/aha bench gen --model $model
  peer_compile
  peer_gen
fi
if [[ " $what " == *" s29e "* ]]; then
  # Session 29's final build: the whole conformance test and the attention tests.
  conformance_all s29e "Failure|Expected|Which is|worst gradient|actor vs"
  attention_suite s29e
fi
if [[ " $what " == *" s29f "* ]]; then
  # Session 29: the norm backward loading dx with dout and x, its column sums in shared memory (dist/)
  # against the build before (dist-old/): the norm and model conformance tests; the bench's learner step
  # and its per-op profile, the builds interleaved.
  conformance_all s29f "Failure|Expected|Which is|rmsnorm bwd|worst gradient" \
    'CudaOps.EmbeddingRmsNormRopeSwiGluAdd:CudaOps.*Norm*:CudaModel.*'
  for rep in 1 2 3; do
    for v in old new; do
      f=/tmp/train_s29f_${v}_$rep.log
      timeout 100 $(aha_of $v) bench train --steps 5 --model $model > "$f" 2>&1
      echo "train $v $rep: $(grep -oE "$train_pat" "$f" | tr '\n' ' ')"
    done
  done
  for v in old new; do
    AHA_PROFILE=1 timeout 100 $(aha_of $v) bench train --steps 3 --model $model > /tmp/profile_s29f_$v.txt 2>&1
    echo "$v: $(grep -E '^rmsnorm backward' /tmp/profile_s29f_$v.txt)"
  done
fi
if [[ " $what " == *" s29g "* ]]; then
  # Session 29: SwiGLU's index in 32 bits and the sum of squares in four chains (dist/; the second not
  # kept: no gain) against the build before (dist-old/): their conformance tests; the per-op profiles of
  # the bench's learner step, the builds interleaved twice.
  conformance_all s29g "Failure|Expected|Which is|sum of squares|swiglu" \
    'CudaOps.EmbeddingRmsNormRopeSwiGluAdd:CudaOps.OptimizerOps:CudaOps.*SwiGlu*'
  for rep in 1 2; do
    for v in old new; do
      AHA_PROFILE=1 timeout 100 $(aha_of $v) bench train --steps 3 --model $model > /tmp/profile_s29g_$v.txt 2>&1
      echo "$v $rep: $(grep -E '^(swiglu |sum of squares)' /tmp/profile_s29g_$v.txt | tr -s ' ' | tr '\n' ';')" \
        "$(grep -oE 'median step [0-9.]+ s' /tmp/profile_s29g_$v.txt)"
    done
  done
fi
if [[ " $what " == *" s29h "* ]]; then
  # Session 29's last build (after s29f's and s29g's changes): the bench's learner step twice beside the
  # compiled peer.
  variant_runs train 2 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 5 --model $model
  peer_compile
fi
if [[ " $what " == *" s30a "* ]]; then
  # Session 30: the fused lm-head draw's epilogue over 4 (default) or 2 row slots at once against a row
  # at a time (AHA_LS_TOGETHER=0): the draw's tests (the three equal bit for bit), the kernel alone under
  # Nsight Compute each way, generation interleaved; then where a decode step's time goes (SUBTRACT).
  # AHA_LS_TOGETHER and the bit-for-bit test were in that session's build only (not kept: kernels.md 41);
  # on main every variant runs main's kernel.
  conformance_all s30a "Failure|Expected|Which is|lm-head" 'CudaOps.LmHeadSample*:CudaOps.SampleRows*'
  for v in 0 2 4; do
    AHA_LS_TOGETHER=$v KERNEL=LmHeadSampleKernel SKIP=5 bash bench/gpu/decode_profile.sh /tmp/s30a_ncu$v \
      > /tmp/s30a_ncu$v.txt 2>&1
    echo "ncu AHA_LS_TOGETHER=$v: $(grep -E '^ +(Duration|SM Frequency|Registers Per Thread)' \
      /tmp/s30a_ncu$v/ncu_kernel.txt | tr -s ' ' | tr '\n' ';')"
  done
  variant_runs ls 3 "$gen_pat" default AHA_LS_TOGETHER=2 AHA_LS_TOGETHER=0 -- \
    timeout 100 dist/bin/aha bench gen --model $model --repeats 2
  SUBTRACT=1 bash bench/gpu/decode_profile.sh /tmp/s30a_sub 2>&1 | tail -12
fi
if [[ " $what " == *" s30b "* ]]; then
  # Session 30: Qwen3-0.6B's decode attention (16 / 8 heads of 128) at 256 rows is 2,048 items over 396
  # resident blocks, 5.2 waves, the last a sixth full; each row's keys split 2 or 3 ways (and the
  # 3-stage kernel with them) against the rule's one split, generation interleaved.
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs q3sp 2 "$gen_pat" default AHA_DECODE_SPLITS=2 AHA_DECODE_SPLITS=3 \
    "AHA_DECODE_SPLITS=2 AHA_DECODE_STAGES=3" -- timeout 100 dist/bin/aha bench gen --model $q3 --repeats 2
  # The bench's model at 128 and 64 prompts (256 and 128 items: the rule already splits them).
  variant_runs q05sp 1 "$gen_pat" default AHA_DECODE_SPLITS=1 -- \
    timeout 100 dist/bin/aha bench gen --model $model --repeats 2 --prompts 128
fi
if [[ " $what " == *" s30c "* ]]; then
  # Session 30: the decode attention's split rule (DecodeSplitCount: the nearest whole number of
  # resident blocks per item) against fixed split counts, at batches below the bench's 256 rows, a long
  # context, and Qwen3-0.6B's heads of 128. One round each, best of 3 generations in a run.
  init_model $q3 --arch qwen3 --preset 0.6b
  g="timeout 100 dist/bin/aha bench gen --repeats 3"
  variant_runs sp128 1 "$gen_pat" default AHA_DECODE_SPLITS=1 -- $g --model $model --prompts 128
  variant_runs sp64 1 "$gen_pat" default AHA_DECODE_SPLITS=1 AHA_DECODE_SPLITS=2 -- $g --model $model --prompts 64
  variant_runs sp32 1 "$gen_pat" default AHA_DECODE_SPLITS=1 AHA_DECODE_SPLITS=2 AHA_DECODE_SPLITS=4 -- \
    $g --model $model --prompts 32
  variant_runs sp16 1 "$gen_pat" default AHA_DECODE_SPLITS=1 AHA_DECODE_SPLITS=4 -- $g --model $model --prompts 16
  variant_runs splong 1 "$gen_pat" default AHA_DECODE_SPLITS=1 AHA_DECODE_SPLITS=2 AHA_DECODE_SPLITS=4 -- \
    $g --model $model --prompts 64 --prompt-len 2048 --new-tokens 256
  variant_runs q3sp32 1 "$gen_pat" default AHA_DECODE_SPLITS=1 -- $g --model $q3 --prompts 32
  variant_runs q3sp8 1 "$gen_pat" default AHA_DECODE_SPLITS=1 AHA_DECODE_SPLITS=2 -- $g --model $q3 --prompts 8
fi
if [[ " $what " == *" s30d "* ]]; then
  # Session 30: the frozen reference's lm-head forward (logits as scratch) in chunks of 1,024-4,096
  # columns (AHA_LM_SCRATCH_CHUNK) instead of 8,192, so that a chunk's f32 logits (12,288 rows) might
  # stay in L2 between the product and the row pass: the lm-head test each way, then the step's per-op
  # profile each way. The switch was in that session's build only (slower, not kept: PERF.md version 30).
  for c in 0 1024 2048 4096; do
    AHA_LM_SCRATCH_CHUNK=$c timeout 200 dist/bin/engine_cuda_conformance_test --gtest_color=no \
      --gtest_filter='CudaOps.FusedLmHeadForwardBackward' > /tmp/s30d_test_$c.log 2>&1
    echo "lm-head test, chunk $c: exit $? $(grep -E '^\[  (PASSED|FAILED)' /tmp/s30d_test_$c.log | tr '\n' ' ')"
    grep -E "Failure|Expected|Which is|nmse" /tmp/s30d_test_$c.log | head -6
  done
  for c in 0 2048 1024 4096; do
    AHA_LM_SCRATCH_CHUNK=$c AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model \
      > /tmp/s30d_prof_$c.txt 2>&1
    echo "chunk $c: $(grep -E 'lm-head|median step' /tmp/s30d_prof_$c.txt | tr -s ' ' | tr '\n' ';')"
  done
fi
if [[ " $what " == *" s30e "* ]]; then
  # Session 30: a probe. The fused lm-head product with its per-tile draw (LmHeadSampleKernel, its grid
  # now row blocks fastest) at the learner's 12,288 completion rows against the training lm-head forward
  # (cuBLAS chunks + row passes): would a per-tile statistics epilogue beat the row passes? Then the
  # draw's tests and generation with the swapped grid. (The probe test and the turned grid were in that
  # session's build only: kernels.md 42.)
  timeout 200 dist/bin/engine_cuda_conformance_test --gtest_color=no --gtest_also_run_disabled_tests \
    --gtest_filter='CudaOps.DISABLED_LmHeadSampleAtTrainingRowsTiming' > /tmp/s30e_probe.log 2>&1
  echo "probe exit $?: $(grep -E 'lm-head at|Failure' /tmp/s30e_probe.log)"
  conformance_all s30e "Failure|Expected|Which is|lm-head" 'CudaOps.LmHeadSample*'
  variant_runs gen 2 "$gen_pat" default -- timeout 100 dist/bin/aha bench gen --model $model --repeats 2
fi
if [[ " $what " == *" s30f "* ]]; then
  # Session 30: where the learner step's time goes now (the per-op profile, whole table), and what the
  # D = 64 training attention kernels (wgmma, the bench's heads) wait on: Nsight Compute's pipes and
  # warp states for one forward and one backward at 16 x 1024.
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > /tmp/s30f_prof.txt 2>&1
  grep -vE '^\{' /tmp/s30f_prof.txt | head -48
  SPECS="wfwd AttnFwdWgmmaKernel 10;wbwd AttnBwdWgmmaKernel 10" bash bench/gpu/attn_profile.sh /tmp/s30f 2>&1 | tail -32
  for k in wfwd wbwd; do
    echo "== $k"
    grep -iE "pipe|tensor|xu|fma|alu|stall|eligible|issued|warp cycles|l2 cache throughput|dram throughput" \
      /tmp/s30f/ncu_$k.txt | grep -v '^    ---' | head -30
  done
fi
if [[ " $what " == *" s30g "* ]]; then
  # Session 30: every kernel of one learner step under Nsight Compute (each alone, caches warm from its
  # neighbours as ncu leaves them), grouped by kernel: what the per-op profile's "linear backward" and
  # "linear" are made of. The timed step is the kernels after the warm-up step's optimizer kernel.
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  timeout 500 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
    dist/bin/aha bench train --steps 1 --model $model > /tmp/s30g.csv 2> /tmp/s30g.err
  echo "ncu exit $? ($(wc -l < /tmp/s30g.csv) lines)"
  python3 - /tmp/s30g.csv "$out/s30g_kernels.tsv" <<'PY'
import sys
sys.path.insert(0, "bench/gpu")
from ncu_kernels import by_name, read
ks, _ = read(sys.argv[1])
with open(sys.argv[2], "w") as f:
    f.writelines(f"{d:.2f}\t{n[:160]}\n" for n, d in ks)
ad = [i for i, (n, _) in enumerate(ks) if "adam" in n.lower()]
start = ad[0] + 1 if ad else 0
while start < len(ks) and "adam" in ks[start][0].lower():
    start += 1
step = ks[start:]
print(f"kernels: {len(ks)} in all, {len(step)} in the timed step; sum {sum(d for _, d in step) / 1e3:.2f} ms")
for n, c, t in by_name(step, 110)[:45]:
    print(f"{t / 1e3:8.2f} ms {c:5d} x {t / c:8.1f} us  {n}")
PY
fi
# qkv_rows TAG FILTER: session 30's q/k/v step and RoPE backward at 8 rows a block (s30h: the rows in turn;
# s30i: the rows as the inner loop, each thread's 8 rows' loads together): the tests of FILTER, the step's
# per-op profile (against s30f's, the build before) and the step twice. Both kernels were in those builds
# only: slower, not kept (kernels.md 43).
qkv_rows() {
  conformance_all "$1" "Failure|Expected|Which is|worst gradient|actor vs" "$2"
  AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "/tmp/$1_prof.txt" 2>&1
  grep -E "q/k/v|rope|median step" "/tmp/$1_prof.txt" | head
  variant_runs train 2 "$train_pat" default -- timeout 100 dist/bin/aha bench train --steps 5 --model $model
}
[[ " $what " == *" s30h "* ]] && qkv_rows s30h 'CudaOps.*Qkv*:CudaOps.*Rope*:CudaModel.*'
[[ " $what " == *" s30i "* ]] &&
  qkv_rows s30i 'CudaOps.*Qkv*:CudaOps.*Rope*:CudaModel.ForwardBackward*:CudaModel.ActorVsLearner*'
if [[ " $what " == *" s31a "* ]]; then
  # Session 31: layer l + 1's cached keys and values prefetched into L2 during layer l of a decode step
  # (AHA_KV_PREFETCH=fraction,where,evict_last; where: a after the attention, g after gate/up, d after
  # the down product's norm), generation interleaved; the digest says the draws stayed the same. The
  # switch was in that session's build only (slower, not kept: kernels.md version 44).
  variant_runs pf 2 "$gen_pat|tokens digest [0-9a-f]+" default AHA_KV_PREFETCH=0.5,d,0 AHA_KV_PREFETCH=0.5,g,0 \
    AHA_KV_PREFETCH=0.5,a,0 AHA_KV_PREFETCH=0.5,g,1 AHA_KV_PREFETCH=0.25,d,0 AHA_KV_PREFETCH=0.75,d,0 \
    AHA_KV_PREFETCH=0.5,d,1 AHA_KV_PREFETCH=1,d,0 -- \
    timeout 100 dist/bin/aha bench gen --model $model --repeats 2
fi
if [[ " $what " == *" s31b "* ]]; then
  # Session 31: where the targets stand, both sides the best of 3 generations (the peer's single runs
  # ranged 30.8-50.6 s over the sessions), then the learner beside the compiled peer.
  variant_runs final 2 "$gen_pat" default -- timeout 100 dist/bin/aha bench gen --model $model --repeats 3
  echo "peer gen (best of 3): $(peer_gen 3)"
  variant_runs final 2 "$train_pat" default -- timeout 200 dist/bin/aha bench train --model $model
  echo "peer compile: $(peer_compile)"
fi
if [[ " $what " == *" s31c "* ]]; then
  # Session 31: HF generate after a full-length warm-up run (peer_pytorch.py's default now), the best of 3,
  # with the caching allocator's cudaMalloc calls of each run; aha beside it, the best of 3.
  variant_runs final 1 "$gen_pat" default -- timeout 100 dist/bin/aha bench gen --model $model --repeats 3
  echo "peer gen (warm-up, best of 3): $(peer_gen 3)"
  variant_runs after 1 "$gen_pat" default -- timeout 100 dist/bin/aha bench gen --model $model --repeats 3
fi
if [[ " $what " == *" s31d "* ]]; then
  # Session 31: what HF generate's first full-length call pays: the same peer with PyTorch's own choice
  # of attention kernel and with each backend alone, each its full-length warm-up and 2 timed runs.
  for b in auto flash cudnn efficient; do
    timeout 400 python3 bench/gpu/peer_pytorch.py gen --model $model --repeats 2 --sdpa-backend $b \
      > "$out/gen_peer_$b.log" 2>&1
    echo "peer $b: $(tail -n 1 "$out/gen_peer_$b.log")"
  done
fi
if [[ " $what " == *" s31e "* ]]; then
  # Session 31: Qwen3-0.6B's shape against the warmed-up peer (its row compared with a first call).
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs q3final 1 "$gen_pat" default -- timeout 100 dist/bin/aha bench gen --model $q3 --repeats 3
  timeout 500 python3 bench/gpu/peer_pytorch.py gen --model $q3 > "$out/gen_peer_q3.log" 2>&1
  echo "peer q3: $(tail -n 1 "$out/gen_peer_q3.log")"
fi
if [[ " $what " == *" s31f "* ]]; then
  # Session 31: the SM clock and power while each bench runs (nvidia-smi every 20 ms): what the step's
  # sustained load keeps, against Nsight Compute's per-kernel clocks (PERF.md, version 30).
  for b in train gen; do
    clocks_start "$out/clocks_$b.csv"
    timeout 200 dist/bin/aha bench $b --model $model $([ $b = train ] && echo --steps 8 || echo --repeats 3) \
      > "$out/clocks_$b.log" 2>&1
    kill $smi
    echo "$b: $(grep -oE "$train_pat|$gen_pat" "$out/clocks_$b.log" | tr '\n' ' ')"
    clocks_summary "$out/clocks_$b.csv"
  done
fi
if [[ " $what " == *" s32a "* ]]; then
  # Session 32: (1) the KV cache's block size (positions a pool block; the decode attention reads
  # each (row, kv head)'s keys as 128-byte rows of 2 x 64 heads, one block-table entry a block),
  # interleaved, two rounds; the digest must not change. (2) bf16 products held for minutes (cuBLASLt,
  # no L2 flush, 3,000 runs each) with the SM clock and power sampled: the rate the power cap allows.
  for rep in 1 2; do
    for bs in 16 32 64 128 256; do
      f="$out/s32a_bs${bs}_$rep.log"
      timeout 120 dist/bin/aha bench gen --model $model --repeats 3 --block-size $bs > "$f" 2>&1
      echo "s32a bs $bs $rep: $(grep -oE "$gen_pat|tokens digest [0-9a-f]+" "$f" | tr '\n' ' ')"
    done
  done
  clocks_start "$out/clocks_gemm.csv"
  timeout 200 dist/bin/aha bench gemm --tokens 16384 --forms nt,nn,tn --libraries lt --iters 3000 --warmup 20 \
    --no-flush > "$out/s32a_gemm.txt" 2>&1
  kill $smi
  grep -v '^{' "$out/s32a_gemm.txt" | tail -n 20
  clocks_summary "$out/clocks_gemm.csv"
fi
if [[ " $what " == *" s32b "* ]]; then
  # Session 32: the KV block size at other shapes before a default changes: Qwen3-0.6B's heads of 128,
  # Qwen2.5-1.5B's, long contexts, few rows; then the bench's own shape again. Two rounds, interleaved,
  # one log (the device returns few files).
  init_model $q3 --arch qwen3 --preset 0.6b
  init_model $q15 --preset 1.5b --dtype bf16
  for rep in 1 2; do
    for shape in "q3 $q3 --prompts 256" "q15 $q15 --prompts 256" "long $model --prompts 64 --prompt-len 2048 --new-tokens 256" \
        "few $model --prompts 16" "bench $model --prompts 256"; do
      set -- $shape
      for bs in 16 64 128; do
        echo "== $1 bs $bs $rep" >> "$out/s32b.log"
        timeout 150 dist/bin/aha bench gen --model $2 "${@:3}" --repeats 2 --block-size $bs >> "$out/s32b.log" 2>&1
        echo "s32b $1 bs $bs $rep: $(tail -n 4 "$out/s32b.log" | grep -oE "$gen_pat|tokens digest [0-9a-f]+" | tr '\n' ' ')"
      done
    done
  done
fi
if [[ " $what " == *" s32c "* ]]; then
  # Session 32, the final build (KV blocks of 64 by default): the generator's GPU tests, then
  # generation beside the warmed-up HF generate (best of 3), generation again.
  timeout 300 dist/bin/engine_cuda_conformance_test --gtest_color=no \
    --gtest_filter='CudaModel.*:CudaOps.*Cached*:CudaOps.*Decode*:CudaOps.*Kv*' > "$out/s32c_tests.log" 2>&1
  echo "tests exit $?: $(grep -E '^\[  (PASSED|FAILED)' "$out/s32c_tests.log" | tr '\n' ' ')"
  grep -E "actor vs learner|FAILED" "$out/s32c_tests.log" | head -8
  for run in 1 2; do
    timeout 120 dist/bin/aha bench gen --model $model --repeats 3 > "$out/s32c_gen_$run.log" 2>&1
    echo "aha gen $run: $(grep -oE "$gen_pat|blocks of [0-9]+|tokens digest [0-9a-f]+" "$out/s32c_gen_$run.log" | tr '\n' ' ')"
    [ $run = 1 ] && peer_gen 3
  done
fi
if [[ " $what " == *" s32d "* ]]; then
  # Session 32, the final build: the learner step beside torch.compile's, with the clock sampled.
  clocks_start "$out/clocks_s32d.csv"
  for run in 1 2; do
    timeout 200 dist/bin/aha bench train --model $model --steps 5 > "$out/s32d_train_$run.log" 2>&1
    echo "aha train $run: $(grep -oE "$train_pat" "$out/s32d_train_$run.log" | tr '\n' ' ')"
    [ $run = 1 ] && peer_compile
  done
  kill $smi
  clocks_summary "$out/clocks_s32d.csv"
fi
if [[ " $what " == *" s33a "* ]]; then
  # Session 33: every gpu-labelled test binary carried (the `tests` mode's loop, timing tables left
  # out), then models of the bench's shape at odd vocabularies (151,669: Qwen3's tokenizer ids;
  # 50,257: GPT-2's) against the padded sizes, generation and the learner step, interleaved.
  for t in dist/bin/*_test; do
    name=$(basename "$t")
    timeout 400 "$t" --gtest_color=no > "$out/s33a_$name.log" 2>&1
    echo "$name exit $?: $(grep -E '^\[  (PASSED|FAILED)|^\[  SKIPPED' "$out/s33a_$name.log" | tr '\n' ' ')"
    grep -E "^\[  FAILED|Failure" "$out/s33a_$name.log" | head -6
  done
  for v in 151669 50257 50304; do vocab_model $v; done
  for rep in 1 2; do
    for m in $model /tmp/aha-0.5b-v151669 /tmp/aha-0.5b-v50304 /tmp/aha-0.5b-v50257; do
      f="$out/s33a_gen_$(basename $m)_$rep.log"
      timeout 120 dist/bin/aha bench gen --model $m > "$f" 2>&1
      echo "gen $(basename $m) $rep: $(grep -oE "$gen_pat" "$f" | tr '\n' ' ')"
      train_run s33a_train_$(basename $m)_$rep --model $m --steps 3
    done
  done
fi
if [[ " $what " == *" s33b "* ]]; then
  # Session 33: the learner step at long sequences, 4 x 4,096 (16,384 tokens a step, as the bench's)
  # and 4 x 8,192 (a group of 4 is the bench's least batch), an eighth of each the prompt: aha twice
  # around the compiled peer, then aha's per-op profile at 4 x 8,192. S33B_SHAPES ("S L P;...") picks the shapes.
  IFS=';' read -ra shapes <<< "${S33B_SHAPES:-4 4096 512;4 8192 1024}"
  for shape in "${shapes[@]}"; do
    set -- $shape
    for run in 1 2; do
      f="$out/s33b_train_$2_$run.log"
      timeout 200 dist/bin/aha bench train --model $model --sequences $1 --seq-len $2 --prompt-len $3 > "$f" 2>&1
      echo "aha train $1 x $2 run $run: $(grep -oE "$train_pat" "$f" | tr '\n' ' ')"
      if [ $run = 1 ]; then
        f="$out/s33b_peer_$2.log"
        timeout 400 python3 bench/gpu/peer_pytorch.py train --modes compile --model $model --sequences $1 \
          --seq-len $2 --prompt-len $3 > "$f" 2>&1
        echo "peer compile $1 x $2: $(tail -n 1 "$f")"
      fi
    done
  done
  AHA_PROFILE=1 timeout 200 dist/bin/aha bench train --model $model --sequences 4 --seq-len 8192 --prompt-len 1024 \
    > "$out/s33b_profile_8192.txt" 2>&1
  grep -iE "attention|linear|lm-head|all" "$out/s33b_profile_8192.txt" | head -12
fi
if [[ " $what " == *" s33c "* ]]; then
  # Session 33: Qwen3-0.6B's shape (heads of 128) at long sequences, 4 x 4,096 and 4 x 8,192 (an eighth
  # of each the prompt): aha once beside the compiled peer, then aha's per-op profile at 4 x 8,192.
  init_model $q3 --arch qwen3 --preset 0.6b
  for shape in "4 4096 512" "4 8192 1024"; do
    set -- $shape
    f="$out/s33c_train_$2.log"
    timeout 200 dist/bin/aha bench train --model $q3 --sequences $1 --seq-len $2 --prompt-len $3 > "$f" 2>&1
    echo "aha train qwen3-0.6b $1 x $2: $(grep -oE "$train_pat" "$f" | tr '\n' ' ')"
    f="$out/s33c_peer_$2.log"
    timeout 300 python3 bench/gpu/peer_pytorch.py train --modes compile --model $q3 --sequences $1 \
      --seq-len $2 --prompt-len $3 > "$f" 2>&1
    echo "peer compile qwen3-0.6b $1 x $2: $(tail -n 1 "$f")"
  done
  AHA_PROFILE=1 timeout 100 dist/bin/aha bench train --model $q3 --sequences 4 --seq-len 8192 --prompt-len 1024 \
    > "$out/s33c_profile_8192.txt" 2>&1
  head -14 "$out/s33c_profile_8192.txt"
fi
if [[ " $what " == *" s34a "* ]]; then
  # Session 34: the lm-head's vocabulary chunks each a multiple of 8 columns (151,669 = 18 x 8,192 +
  # 4,208 + 5): the conformance test, then the learner step at 151,669 beside 151,936, interleaved, three
  # rounds.
  t=dist/bin/engine_cuda_conformance_test
  timeout 400 $t --gtest_color=no > "$out/s34a_conformance.log" 2>&1
  echo "conformance exit $?: $(grep -E '^\[  (PASSED|FAILED)' "$out/s34a_conformance.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED|Failure" "$out/s34a_conformance.log" | head -6
  vocab_model 151669
  for rep in 1 2 3; do
    for m in $model /tmp/aha-0.5b-v151669; do train_run s34a_train_$(basename $m)_$rep --model $m --steps 5; done
  done
fi
if [[ " $what " == *" s34b "* ]]; then
  # Session 34: one group of 2 at 2 x 8,192 (`--group-size 2`) twice around the compiled peer; then
  # Qwen3-0.6B's per-op profile at 4 x 8,192, which s33c's call ran out of time for.
  around_peer s34b_2x8192 $model "--sequences 2 --seq-len 8192 --prompt-len 1024" --group-size 2
  init_model $q3 --arch qwen3 --preset 0.6b
  AHA_PROFILE=1 timeout 150 dist/bin/aha bench train --model $q3 --sequences 4 --seq-len 8192 --prompt-len 1024 \
    > "$out/s34b_profile_q3_8192.txt" 2>&1
  head -16 "$out/s34b_profile_q3_8192.txt"
fi
if [[ " $what " == *" s34c "* ]]; then
  # Session 34: the training attention backward's variants (its A/B switches) at 4 x 8,192, where the
  # attention is 41-62% of the step: Qwen3-0.6B's heads of 128 and the bench's heads of 64, two rounds.
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs s34c_q3 2 "$train_pat" default AHA_ATTENTION_BWD_STAGES=2 AHA_ATTENTION_BWD_PIPE=0 \
    AHA_ATTENTION_BWD_HALVES=0 -- timeout 200 dist/bin/aha bench train --model $q3 --sequences 4 --seq-len 8192 \
    --prompt-len 1024 --steps 3
  variant_runs s34c_05b 2 "$train_pat" default AHA_ATTENTION_BWD_SS=0 -- timeout 200 dist/bin/aha bench train \
    --model $model --sequences 4 --seq-len 8192 --prompt-len 1024 --steps 3
fi
if [[ " $what " == *" s35a "* ]]; then
  # Session 35: the training forward's tiles copied by a warp of its own (the tensor memory accelerator,
  # 2 .. 4 stages) against the cp.async kernel (stages 0): the attention tests (each way bit for bit
  # the mma.sync kernel), the four ways timed alone, the model tests with the new default.
  attn_tests s35a 'CudaModel.*:CudaOps.*Attention*'
fi
if [[ " $what " == *" s35b "* ]]; then
  # Session 35: the learner step with the forward's copying warp (default) against the cp.async kernel
  # (AHA_ATTENTION_FWD_STAGES=0), interleaved: the bench (16 x 1,024, heads of 64) twice, Qwen3-0.6B at
  # 16 x 1,024 and 4 x 8,192 (heads of 128) twice.
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs s35b_05b 2 "$train_pat" default AHA_ATTENTION_FWD_STAGES=0 -- timeout 120 dist/bin/aha bench train \
    --model $model --steps 5
  variant_runs s35b_q3 2 "$train_pat" default AHA_ATTENTION_FWD_STAGES=0 -- timeout 120 dist/bin/aha bench train \
    --model $q3 --steps 5
  variant_runs s35b_q3_8192 2 "$train_pat" default AHA_ATTENTION_FWD_STAGES=0 -- timeout 200 dist/bin/aha bench \
    train --model $q3 --sequences 4 --seq-len 8192 --prompt-len 1024 --steps 3
fi
if [[ " $what " == *" s35c "* ]]; then
  # Session 35: the D = 128 forward's warpgroups taking turns (AHA_ATTENTION_FWD_PINGPONG; default on, 2
  # stages) against each when it is ready and against the cp.async kernel: the attention tests and
  # timings, the model tests, Qwen3-0.6B's learner step at 4 x 8,192 and 16 x 1,024, interleaved twice.
  # (The turns were in that call's build only: slower, not kept.)
  attn_tests s35c 'CudaModel.*:CudaOps.*Attention*'
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs s35c_q3_8192 2 "$train_pat" default AHA_ATTENTION_FWD_PINGPONG=0 AHA_ATTENTION_FWD_STAGES=0 -- \
    timeout 200 dist/bin/aha bench train --model $q3 --sequences 4 --seq-len 8192 --prompt-len 1024 --steps 3
  variant_runs s35c_q3 2 "$train_pat" default AHA_ATTENTION_FWD_PINGPONG=0 AHA_ATTENTION_FWD_STAGES=0 -- \
    timeout 120 dist/bin/aha bench train --model $q3 --steps 5
fi
if [[ " $what " == *" s35d "* ]]; then
  # Session 35's final build: the whole conformance test and the attention tests with their timings.
  attn_tests s35d '*'
fi
if [[ " $what " == *" s35e "* ]]; then
  # Session 35's final build: Qwen3-0.6B's learner step at 4 x 8,192 around the compiled peer; the
  # bench's model at 4 x 8,192 (heads of 64: the copying warp by the rule) against
  # AHA_ATTENTION_FWD_STAGES=0, interleaved twice.
  init_model $q3 --arch qwen3 --preset 0.6b
  around_peer s35e_q3_8192 $q3 "--sequences 4 --seq-len 8192 --prompt-len 1024" --steps 3
  variant_runs s35e_05b_8192 2 "$train_pat" default AHA_ATTENTION_FWD_STAGES=0 -- timeout 200 dist/bin/aha bench \
    train --model $model --sequences 4 --seq-len 8192 --prompt-len 1024 --steps 3
fi
if [[ " $what " == *" s36a "* ]]; then
  # Session 36: the D = 128 backward in FlashAttention-3's layout (AttnBwdWgmmaKeysKernel, written
  # without a GPU), on for everything here but the A/B's default: the attention tests (its own against
  # the two-warpgroup kernel first, the wgmma backward's against mma.sync with it), the backward's
  # timings (rows bwd halv / bwd keys), the model tests; then Qwen3-0.6B's step at 4 x 8,192 and
  # 16 x 1,024 with AHA_ATTENTION_BWD_KEYS=1 against the default, interleaved twice.
  AHA_ATTENTION_BWD_KEYS=1 attn_tests s36a 'CudaModel.*:CudaOps.*Attention*' DISABLED_TrainingShape
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs s36a_q3_8192 2 "$train_pat" default AHA_ATTENTION_BWD_KEYS=1 -- timeout 200 dist/bin/aha bench \
    train --model $q3 --sequences 4 --seq-len 8192 --prompt-len 1024 --steps 3
  variant_runs s36a_q3 2 "$train_pat" default AHA_ATTENTION_BWD_KEYS=1 -- timeout 120 dist/bin/aha bench train \
    --model $q3 --steps 5
fi
if [[ " $what " == *" s37a "* ]]; then
  # Session 37: AttnBwdWgmmaKeysKernel the default at D = 128. The attention tests and timings, the
  # whole conformance test, then Qwen3-0.6B's step at 4 x 8,192 around the compiled peer.
  attn_tests s37a '*' DISABLED_TrainingShape
  init_model $q3 --arch qwen3 --preset 0.6b
  around_peer s37a_q3_8192 $q3 "--sequences 4 --seq-len 8192 --prompt-len 1024" --steps 3
fi
if [[ " $what " == *" s37b "* ]]; then
  # Session 37: Qwen3-0.6B's and the bench's learner steps at 16 x 1,024 around the compiled peer.
  init_model $q3 --arch qwen3 --preset 0.6b
  around_peer s37b_q3 $q3 "" --steps 5
  around_peer s37b_05b $model ""
fi
if [[ " $what " == *" s37c "* ]]; then
  # Session 37 (run in session 38, which kept 3's form as the only one and removed the variable's 2
  # and 3): the keys kernel with its dK and dV added by tensor reductions (keys = 2,
  # kernels.md version 49) and with that and its copies started before K and V are in (keys = 3,
  # version 50), against per-lane atomics (the default, 1): the attention tests (2 and 3 against the
  # two-warpgroup kernel) and timings (rows bwd kred, bwd kearly), the model tests with 3 on; then
  # Qwen3-0.6B's step at 16 x 1,024 (two rounds) and 4 x 8,192 (one), the three interleaved.
  AHA_ATTENTION_BWD_KEYS=3 attn_tests s37c 'CudaModel.*:CudaOps.*Attention*' DISABLED_TrainingShape
  init_model $q3 --arch qwen3 --preset 0.6b
  variant_runs s37c_q3 2 "$train_pat" default AHA_ATTENTION_BWD_KEYS=2 AHA_ATTENTION_BWD_KEYS=3 -- timeout 60 \
    dist/bin/aha bench train --model $q3 --steps 5
  variant_runs s37c_q3_8192 1 "$train_pat" default AHA_ATTENTION_BWD_KEYS=2 AHA_ATTENTION_BWD_KEYS=3 -- timeout 100 \
    dist/bin/aha bench train --model $q3 --sequences 4 --seq-len 8192 --prompt-len 1024 --steps 3
fi
if [[ " $what " == *" s37d "* ]]; then
  # Session 37 (run in session 38; not kept, the variable is gone): the D = 64 backward with its dK and dV added by tensor reductions
  # (AHA_ATTENTION_BWD_KV_TMA=1, kernels.md version 51) against per-lane atomics (the default): the
  # attention tests and timings with it on (the wgmma backward against mma.sync; row 16x1024 H=14/2
  # D=64 backward), the model tests with it on; then the bench's step at 16 x 1,024, two rounds.
  AHA_ATTENTION_BWD_KV_TMA=1 attn_tests s37d 'CudaModel.*:CudaOps.*Attention*' DISABLED_TrainingShape
  variant_runs s37d_05b 2 "$train_pat" default AHA_ATTENTION_BWD_KV_TMA=1 -- timeout 60 dist/bin/aha bench train \
    --model $model
fi
if [[ " $what " == *" s38a "* ]]; then
  # Session 38: the keys kernel in version 50's form the only one: the attention tests and timings,
  # the whole conformance test, Qwen3-0.6B's step at 16 x 1,024 around the compiled peer's.
  attn_tests s38a '*' DISABLED_TrainingShape
  init_model $q3 --arch qwen3 --preset 0.6b
  around_peer s38a_q3 $q3 "" --steps 5
fi
if [[ $what == *gemm* ]]; then
  timeout 180 dist/bin/aha bench gemm > "$out/gemm.txt" 2>&1
  grep -v '^{' "$out/gemm.txt" | tail -n 60
fi
if [[ $what == *s15g* ]]; then
  # Session 15, on branch exp/small-products-pdl (not merged: slower): the decode step's products on
  # a wgmma kernel of ours (AHA_SMALL_PRODUCTS=0: cuBLAS) and dependent launches along the step
  # (AHA_PDL=0: ordinary launches), interleaved, three runs each.
  for rep in 1 2; do
    for v in "" "AHA_SMALL_PRODUCTS=0" "AHA_PDL=0" "AHA_SMALL_PRODUCTS=0 AHA_PDL=0"; do
      env $v timeout 120 dist/bin/aha bench gen --repeats 3 --model $model > "$out/gen_s15g-${v// /_}-$rep.log" 2>&1
      echo "gen [${v:-default}] rep $rep: $(grep -oE 'decode [0-9.]+ ms per step|[0-9.]+ s,|[0-9]+ new tokens/s' "$out/gen_s15g-${v// /_}-$rep.log" | head -3 | tr '\n' ' ')"
    done
  done
fi
if [[ $what == *s15* && $what != *s15g* ]]; then
  # Session 15: the lm-head on the completion rows alone (Transformer::Forward's score_from), and
  # the peer as TRL runs it (logits_to_keep) beside its earlier every-row form. s15c: aha and the
  # compiled peer in one call (compilation takes minutes).
  if [[ $what == *s15c* ]]; then
    timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s15c.log" 2>&1
    echo "aha train: $(grep -oE 'median step [0-9.]+ s|MFU [0-9.]+%' "$out/train_s15c.log" | tr '\n' ' ')"
    peer_compile
  else
    for rep in 1 2; do
      timeout 120 dist/bin/aha bench train --steps 5 --model $model > "$out/train_s15-$rep.log" 2>&1
      echo "aha train rep $rep: $(grep -oE 'median step [0-9.]+ s|MFU [0-9.]+%' "$out/train_s15-$rep.log" | tr '\n' ' ')"
    done
    AHA_PROFILE=1 timeout 120 dist/bin/aha bench train --steps 3 --model $model > "$out/profile_train.txt" 2>&1
    grep -vE '^\{' "$out/profile_train.txt" | head -40
    timeout 150 python3 bench/gpu/peer_pytorch.py train --modes eager --model $model > "$out/train_peer.log" 2>&1
    tail -n 1 "$out/train_peer.log"
    timeout 150 python3 bench/gpu/peer_pytorch.py train --modes eager --full-logits --model $model \
      > "$out/train_peer_full.log" 2>&1
    tail -n 1 "$out/train_peer_full.log"
  fi
fi
if [[ $what == *peer* ]]; then
  timeout 400 python3 bench/gpu/peer_pytorch.py gen --model $model > "$out/gen_peer.log" 2>&1
  timeout 120 python3 bench/gpu/peer_pytorch.py train --modes eager --model $model > "$out/train_peer.log" 2>&1
  timeout 300 python3 bench/gpu/peer_pytorch.py train --modes compile --model $model > "$out/train_peer_compile.log" 2>&1
  echo "peer train compile exit $?"
  # A peer run that printed no result line says why in the last lines of its log.
  for f in gen_peer train_peer train_peer_compile; do
    grep -q '^{' "$out/$f.log" || { echo "$f: no result; its log ends:"; tail -n 5 "$out/$f.log"; }
  done
fi
if [[ $what == *bench* || $what == *peer* || $what == *ab* || $what == *s6* || $what == *s7* || $what == *s8* || $what == *s10* || $what == *s11* || $what == *s13* ]]; then
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 120 dist/bin/aha bench sync --model $model > "$out/sync_aha.log" 2>&1
    cat "$out/sync_aha.log"
  fi
  python3 - "$out" <<'PY'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*_*.log")) + sorted(pathlib.Path(sys.argv[1]).glob("profile_*.txt")):
    for line in f.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if "bench" not in j or "seconds" not in j and j["bench"] != "sync":
                continue
            if j["bench"] == "sync":
                rows.append(f"sync   raw ncclBroadcast {j['raw_s'] * 1e3:.2f} ms, publish {j['publish_s'] * 1e3:.2f} ms ({j['ratio']:.2f}x), mismatches {j['mismatches']}")
                continue
            extra = f" mfu {100 * j['mfu']:.1f}%" if "mfu" in j else ""
            who = j.get("peer", "aha" + ("" if j.get("graphs", True) else " (no graphs)") + f" [{f.stem}]")
            rows.append(f"{j['bench']:6} {who:55.55} {j['seconds']:8.3f} s {j['tokens_per_s']:12.0f} tok/s{extra}")
print("\n".join(rows))
PY
fi
printf '%s\n' "${summary[@]}"
