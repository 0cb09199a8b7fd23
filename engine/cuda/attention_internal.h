// What attention.cu and attention_tc.cu share (included by those two .cu files only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace aha::engine::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Largest s in [0, S) with cu[s] <= r, for a nondecreasing cu[0..S] with cu[0] <= r. Empty sequences
// (cu[s] == cu[s + 1]) are stepped over, so cu[result] is the start of the sequence holding row r.
__device__ __forceinline__ int FindSeq(const int32_t* __restrict__ cu, int S, int r) {
  int lo = 0, hi = S - 1;  // the answer is in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(cu + mid) <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Workspace of AttentionBackwardWorkspace(N, Hq): delta[N, Hq] (f32) | row_start[N] (i32).
constexpr size_t Align256(size_t n) { return (n + 255) / 256 * 256; }
inline float* BackwardDelta(void* workspace) { return static_cast<float*>(workspace); }
inline int* BackwardRowStart(void* workspace, int N, int Hq) {
  return reinterpret_cast<int*>(static_cast<char*>(workspace) + Align256(static_cast<size_t>(N) * Hq * sizeof(float)));
}

// The backward pre-pass (attention.cu): delta[n, h] = sum_d dout * out over rows of D floats, and
// row_start[n] = the first row of row n's sequence. D in {16, 32, 64, 128}.
void AttentionBackwardPrepass(float* delta, int* row_start, const float* dout, const float* out,
                              const int32_t* cu, int S, int N, int Hq, int D, cudaStream_t s);

}  // namespace aha::engine::cuda
