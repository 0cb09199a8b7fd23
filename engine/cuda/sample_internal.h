// What lmhead.cu (SampleRows) and lmhead_sample.cu (the lm-head product with the draw in its
// epilogue) share: the counter-based RNG and the partial draws of the fused kernel. The conventions
// are lmhead.cu's header comment's ("Sampling").
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace aha::engine::cuda {
namespace sample {

constexpr uint32_t kGamma32 = 0x9E3779B9u;  // 2^32 / golden ratio, odd
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint64_t Mix64(uint64_t z) {  // SplitMix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ uint32_t RowKey(uint64_t seed, uint64_t counter) {
  const uint64_t k = Mix64(seed + Mix64(counter ^ 0xD1B54A32D192ED03ull));
  return static_cast<uint32_t>(k) ^ static_cast<uint32_t>(k >> 32);
}

__device__ __forceinline__ uint32_t LowBias32(uint32_t x) {  // Wellons' lowbias32
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// Uniform number i (>= 0) of the row keyed by row_key: u = (2k + 1) 2^-24 with k the top 23
// bits of lowbias32(row_key + (i + 1) gamma32); exact in f32 and in (0, 1).
__device__ __forceinline__ float Uniform(uint32_t row_key, int i) {
  const uint32_t k = LowBias32(row_key + (static_cast<uint32_t>(i) + 1u) * kGamma32) >> 9;
  return static_cast<float>(2u * k + 1u) * 5.9604644775390625e-8f;
}

// 2^x with subnormal results flushed to 0 (one MUFU.EX2; exp2f and __expf also scale around it).
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The largest z the fused lm-head's partial draws hold: +inf logits (a model that overflowed) count
// as this, so no exp of inf - inf.
constexpr float kZCap = 1e30f;

// z = l / T as every pass computes it (never contracted into an FMA, so all passes agree bit for bit).
__device__ __forceinline__ float Scaled(float l, float inv_t) { return __fmul_rn(l, inv_t); }

// One partial draw of a row (the fused lm-head's, per row and vocabulary tile): the log-sum-exp state
// (m, s) of z over the tile's columns, its pick (drawn with probability exp(z - m) / s when
// sampling; the lowest-id max when greedy) and the pick's z. s = 0 and pick = INT_MAX when the tile
// held nothing drawable. 16 bytes: one store.
struct Partial {
  float m, s, zp;
  int pick;
};
// The vocabulary columns of one partial draw (the fused lm-head's tile): part t of a row covers
// columns t kPartialColumns ..; a warp's 32 lanes take 4 of them each.
constexpr int kPartialColumns = 128;

}  // namespace sample

// SampleRows (kernels.h) that takes each unfiltered row's draw from `parts` partial draws per row,
// part[b * parts + j]: greedy rows take the best (max, lowest
// id), sampling rows the part that wins a Gumbel-max over the parts' totals (uniform number parts + j
// of the row), and the log-prob uses the log-sum-exp of all parts. The rows that filter (top-k or
// top-p) start from the same merge (their log-sum-exp, and for top-p alone the first proposal of
// rejection sampling) and read the logits the fused lm-head wrote for them.
void SampleRowsFromPartials(int32_t* tokens, float* logprobs, const float* logits, int B, int V,
                            const float* temperature, const int32_t* top_k, const float* top_p,
                            const uint64_t* seeds, const uint64_t* counters, const sample::Partial* part,
                            int parts, cudaStream_t s);

}  // namespace aha::engine::cuda
