// `aha bench gen|train`: the engine's generation throughput on one device and GRPO-learner-step
// throughput on one device or several (data parallel, --devices cuda:0,cuda:1),
// on a model directory (the Qwen2.5-0.5B shape from `aha init --preset 0.5b` for the issue's
// figures). bench/peer_pytorch.py runs the same two workloads in PyTorch + transformers, and
// bench/gpu_bench.sh prints both side by side. `aha bench sync` and `aha bench gemm` (weight
// publication over NCCL, the model's matrix products per GEMM library) live in engine/cuda/.
#pragma once

namespace aha {

int RunBenchCommand(int argc, char** argv);

}  // namespace aha
