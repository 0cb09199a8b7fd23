// What lmhead.cu (SampleRows) and lmhead_sample.cu (the lm-head product with the draw in its
// epilogue) share: the counter-based RNG, the online log-sum-exp and the weighted reservoir of size
// one with exponential jumps. The conventions are lmhead.cu's header comment's ("Sampling").
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
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

// z = l / T as every pass computes it (never contracted into an FMA, so all passes agree bit for bit).
__device__ __forceinline__ float Scaled(float l, float inv_t) { return __fmul_rn(l, inv_t); }

// (score, id) order: higher score first, then lower id.
__device__ __forceinline__ bool Better(float s, int i, float best_s, int best_i) {
  return s > best_s || (s == best_s && i < best_i);
}

// Online log-sum-exp state (m = max, s = sum exp(z - m)).
__device__ __forceinline__ void LseAdd(float& m, float& s, float z) {
  if (z > m) {
    s = s * expf(m - z) + 1.0f;  // first element: 0 * exp(-inf) + 1
    m = z;
  } else if (z > -INFINITY) {
    s += expf(z - m);
  }
}

__device__ __forceinline__ void LseMerge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float M = fmaxf(m, m2);
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

// One thread's weighted reservoir of size one over the elements it is given, weight exp(z):
// (m, s) is the online log-sum-exp state, so s exp(m) is the weight W seen so far, and `pick` holds
// element j with probability exp(z_j) / W. Exponential jumps: after a pick at total W the next
// element to replace it is the first whose running total reaches X = W / U, U uniform in (0, 1),
// because P(no replacement until total W') = prod (W_prev / W_i) = W / W' = P(X > W'). So a thread
// draws a uniform only at each pick (about log of its element count times), the draw for a pick at
// element i being Uniform(key, i). x holds X in the units of s (rescaled with s on a new max).
// zp is the pick's z (the fused lm-head's partial draws carry it: they keep no logits).
struct Reservoir {
  float m = -INFINITY, s = 0.0f, x = 0.0f, zp = 0.0f;
  int pick = INT_MAX;
};

__device__ __forceinline__ void ReservoirAdd(Reservoir& r, float z, int i, uint32_t key) {
  if (z > r.m) {
    const float c = expf(r.m - z);  // 0 on the first element
    r.s = r.s * c + 1.0f;
    r.x *= c;
    r.m = z;
  } else if (z > -INFINITY) {
    r.s += expf(z - r.m);
  } else {
    return;  // weight 0 (or NaN): never drawn
  }
  if (r.s >= r.x) {
    r.pick = i;
    r.zp = z;
    r.x = r.s / Uniform(key, i);
  }
}

// ReservoirAdd of z[0 .. N) (already scaled, NaN as -inf) at ids id[0 .. N), in that order, with one
// rescale per N: when the group's largest beats the running max, s and x move to it first (the same
// quantities in another scale), so each element then costs an FMA, one MUFU.EX2 (subnormal weights,
// below e^-87 of the max, flush to 0), an add and a compare instead of two branches and a
// full-precision exp; a replacement divides with the fast reciprocal. The draw and the weights are
// ReservoirAdd's; only rounding differs. While the max is not finite (no finite z yet, or +inf) the
// group takes ReservoirAdd itself.
template <int N>
__device__ __forceinline__ void ReservoirAddN(Reservoir& r, const float (&z)[N], const int (&id)[N], uint32_t key) {
  float g = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) g = fmaxf(g, z[j]);
  if (!(r.m > -INFINITY && r.m < INFINITY && g < INFINITY)) {
#pragma unroll
    for (int j = 0; j < N; ++j) ReservoirAdd(r, z[j], id[j], key);
    return;
  }
  if (g > r.m) {
    const float c = Exp2Ftz((r.m - g) * kLog2e);
    r.s *= c;
    r.x *= c;
    r.m = g;
  }
  const float ml = r.m * kLog2e;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float e = Exp2Ftz(fmaf(z[j], kLog2e, -ml));  // 0 for z = -inf (and below e^-87 of the max)
    r.s += e;
    if (r.s >= r.x && e > 0.0f) {  // the branch every other lane waits on: kept short
      r.pick = id[j];
      r.zp = z[j];
      r.x = __fdividef(r.s, Uniform(key, id[j]));  // u in (0, 1]: the fast division is exact enough
    }
  }
}

// ReservoirAddN of the four logits v (ids i .. i + 3) at 1 / T = inv_t.
__device__ __forceinline__ void ReservoirAdd4(Reservoir& r, float4 v, float inv_t, int i, uint32_t key) {
  const float z[4] = {fmaxf(Scaled(v.x, inv_t), -INFINITY), fmaxf(Scaled(v.y, inv_t), -INFINITY),
                      fmaxf(Scaled(v.z, inv_t), -INFINITY), fmaxf(Scaled(v.w, inv_t), -INFINITY)};
  const int id[4] = {i, i + 1, i + 2, i + 3};
  ReservoirAddN(r, z, id, key);
}

// One partial draw of a row (the fused lm-head's, per row and block): the log-sum-exp state (m, s) of
// z over the block's columns, the pick's competing score (sampling: log of its reservoir's total
// plus a Gumbel; greedy: the pick's logit) and its z. pick = INT_MAX when the block saw nothing.
struct Partial {
  float m, s, score, zp;
};

}  // namespace sample

// SampleRows (kernels.h) that takes each unfiltered row's draw from `parts` partial draws per row,
// part[b * parts + j] with its pick in pick[b * parts + j], merged by (score, lowest id): the
// logits are read only for the rows that filter (top-k or top-p), which the fused lm-head wrote.
void SampleRowsFromPartials(int32_t* tokens, float* logprobs, const float* logits, int B, int V,
                            const float* temperature, const int32_t* top_k, const float* top_p,
                            const uint64_t* seeds, const uint64_t* counters, const sample::Partial* part,
                            const int32_t* pick, int parts, cudaStream_t s);

}  // namespace aha::engine::cuda
