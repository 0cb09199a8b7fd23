// `aha bench gemm`: the matrix products one model shape runs (fused q/k/v, o, fused gate/up, down,
// lm-head), at a decode step's and a training micro-batch's token count, in the three forms
// (NT forward, NN dX, TN dW), through each GEMM library of engine/cuda/gemm.h, beside the FLOP and
// byte floors of the device.
#pragma once

namespace aha::engine::cuda {

int RunGemmBench(int argc, char** argv);

}  // namespace aha::engine::cuda
