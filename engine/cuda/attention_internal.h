// What attention.cu and attention_tc.cu share (included by those two .cu files only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace aha::engine::cuda {

// A launcher's argument check or CUDA call failed: the op interface has no error path, so abort
// with the reason (a bad shape is a caller bug, not bad input).
[[noreturn]] inline void Fail(const char* what, long long value) {
  std::fprintf(stderr, "aha engine/cuda attention: %s (got %lld)\n", what, value);
  std::abort();
}

inline void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha engine/cuda attention: %s: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

// Kernels whose dynamic shared memory exceeds the default 48 KB need the opt-in attribute. Set on
// every launch (a cheap host call, no stream work) so that it holds on whichever device is current.
template <typename Kernel>
void AllowSmem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
              "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float4 Ldg4(const float* __restrict__ p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 Zero4() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

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
