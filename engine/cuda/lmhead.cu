// Fused lm-head (chunked logits, online log-sum-exp, entropy and their backward) and token sampling.
// Contracts: engine/cuda/kernels.h, engine/backend.h; references: CpuBackend::LmHeadForward/Backward
// (engine/cpu_backend.cc) and SampleToken/FilteredDistribution (engine/sampler.cc). Design and costs:
// docs/kernels.md, "LM head and sampling".
//
// LM head. The vocabulary is cut into chunks of kChunk columns. For each chunk one gemm.NT writes the
// scaled logits z = h @ w_chunk^T / T of all N rows into the workspace ([N, cols] f32, row stride
// cols), then one block per row reduces them:
//  - forward: chunk max cm, cs = sum exp(z - cm), ct = sum exp(z - cm) (z - cm) in one read of the row
//    (kept in registers), merged in f64 into the row's running (m, s, t) with t relative to m:
//    t = sum exp(z - m) (z - m), so entropy = lse - E[z] = log s - t / s without cancellation.
//    The last chunk writes lse = m + log s, logprob = z_target - lse, entropy (0 for target < 0).
//  - backward: dz = (dlogprob (onehot - p) - dentropy p (log p + H)) / T, with p = exp(z - lse) and
//    H the saved entropy (d H / d z_j = -p_j (log p_j + H)), written in bf16 beside z with bf16
//    products (the operand both products read, adopted by the gemm: no f32 dz, no cast pass) or in
//    place with f32 ones; then dh (=, then +=) dz @ w_chunk (gemm.NN) and dw_chunk += dz^T @ h
//    (gemm.TN).
//  The 1/T of d z / d logits is folded into dz, so the products run with alpha = 1.
//  The gemm object is assumed to enqueue on the same stream `s` as these kernels.
//
// Sampling. One block per row (512 threads). z = logits / T (T = 1 when greedy).
//  - Pass 1 always: online (max, sum exp) of z for the full-vocabulary log-sum-exp; greedy takes the
//    argmax of the logits (lowest id on ties); unfiltered sampling (no top-k, no top-p) draws in the
//    same pass.
//  - The draw: each thread runs a weighted reservoir of size one over its elements (weight exp(z))
//    with exponential jumps (see Reservoir), which needs a random number only at each replacement
//    (about log of the ~300 elements a thread sees), not per element; then the threads compete by
//    Gumbel-max on their totals (score = log W_t + Gumbel), so token j wins with probability
//    exp(z_j) / sum exp(z). Exact up to f32 rounding.
//  - Filtered sampling: the kept set is a prefix of the strict order (logit descending, id
//    ascending) of engine/sampler.cc, i.e. {key > cut_key} + {key == cut_key, id <= cut_id} with key
//    the order-preserving u32 of the logit. The cut is found by an MSB-first radix descent (4 levels
//    of 8 bits, one pass of the row each, a 256-bin shared-memory histogram, warp-aggregated on the
//    first level; integer sums only, so the result is deterministic): top-k counts elements
//    (target K); top-p, within the top-k set,
//    sums fixed-point weights exp(z - max z) * 2^40 in u64 (target ceil(top_p * total)). Ties at the
//    cut key are cut by id with one ordered scan. Then the draw above, restricted to the kept set,
//    which samples the renormalised kept distribution.
//  - RNG (counter-based, reproducible, independent of the rest of the batch): k64 =
//    mix64(seed + mix64(counter ^ 0xD1B54A32D192ED03)) (mix64 = SplitMix64's finaliser), folded to
//    the 32-bit row key = lo(k64) ^ hi(k64); uniform number i of the row is
//    u_i = (2 (r_i >> 9) + 1) 2^-24 with r_i = lowbias32(row_key + (i + 1) 0x9E3779B9) (lowbias32:
//    Wellons' 32-bit integer hash, a bijection, so distinct i give distinct r_i); u_i is uniform on
//    2^23 points in (0, 1) and exact in f32. Numbers 0 .. V - 1 belong to the tokens (a replacement
//    at token i draws u_i), V + t to thread t's Gumbel. The hash is 32-bit because a replacement
//    stalls the warp's other lanes while it runs (about a third of a row's elements meet one in
//    some lane), and a 64-bit SplitMix64 step made that wait long (docs/kernels.md, version 10).
//  - Top-p alone takes rejection sampling from the full distribution (TopPByRejection), whose first
//    proposal is pass 1's unfiltered draw: a token is kept iff the weight before it in the strict
//    order is below top_p of the total, and a rejected one bounds the set, so the next proposal
//    comes from the tokens before it. One pass a round (the restricted reservoir gives that weight
//    too), about 1 / top_p rounds when the set is large, fewer than the radix descent's 4 + 1
//    passes; after kRejectRounds the radix path.
//  - With the fused lm-head's partial draws (SampleRowsFromPartials) pass 1 is their merge, for
//    every row, and top-k rows take their candidates from the tiles' maxima (TopKFromCandidates);
//    past its limits, the radix path.
//  - logprob = z_token - lse over the full vocabulary (the behaviour log-prob of engine/sampler.h).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "engine/cuda/bf16.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/sample_internal.h"

namespace aha::engine::cuda {
namespace {

using namespace sample;  // NOLINT: the RNG of sample_internal.h

// ---- shared helpers -------------------------------------------------------------------------------

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Block-wide reductions; every thread gets the result. `scratch` holds >= 32 entries; the leading
// __syncthreads makes back-to-back calls on the same scratch safe.
template <int kThreads>
__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024);
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return WarpMax(lane < kWarps ? scratch[lane] : -INFINITY);
}

template <int kThreads>
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024);
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return WarpSum(lane < kWarps ? scratch[lane] : 0.0f);
}

// ---- lm-head --------------------------------------------------------------------------------------

constexpr int kChunk = 8192;                          // vocabulary columns per chunk
constexpr int kRowThreads = 256;                      // threads per row in the lm-head kernels
constexpr int kPerThread = kChunk / kRowThreads;      // chunk values a thread holds in registers
static_assert(kChunk % (4 * kRowThreads) == 0, "the vector path holds whole float4s per thread");

// Running statistics of one row across chunks (workspace, after the chunk logits).
struct RowStats {
  double s;   // sum exp(z - m)
  double t;   // sum exp(z - m) (z - m)
  float m;    // running max of z
  float zt;   // z[target] once seen (0 until then, as the CPU reference)
};

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }
int ChunkCols(int V) { return std::min(V, kChunk); }
// The columns of the chunk that starts at v0: kChunk, then what is left, split so that every chunk but a
// last one of under 8 columns is a multiple of 8. Every row of a chunk then starts 16-byte aligned, for
// the row kernels' float4 path and for the products' bf16 copies (an odd width drops cuBLASLt to slower
// kernels): 151,669 = 18 x 8,192 + 4,208 + 5, not ... + 4,213.
int ChunkAt(int V, int v0) {
  const int left = V - v0;
  if (left > kChunk) return kChunk;
  return left > 8 && left % 8 != 0 ? left - left % 8 : left;
}
size_t LogitsBytes(int N, int V) {
  return AlignUp(static_cast<size_t>(N) * static_cast<size_t>(ChunkCols(V)) * sizeof(float), 256);
}

// One block per row n of the chunk logits z[N, cols] (columns v0 .. v0 + cols of the vocabulary).
// kVec: cols % 4 == 0, so every row starts 16-byte aligned and is read as float4.
template <bool kVec>
__global__ void __launch_bounds__(kRowThreads) LmHeadForwardRows(const float* __restrict__ z,
                                                                 RowStats* __restrict__ stats,
                                                                 const int32_t* __restrict__ targets,
                                                                 float* __restrict__ logprob,
                                                                 float* __restrict__ entropy,
                                                                 float* __restrict__ lse, int cols, int v0,
                                                                 int first, int last) {
  __shared__ float scratch[32];
  const int n = blockIdx.x;
  const float* row = z + static_cast<size_t>(n) * cols;

  // Load this thread's part of the row (padding = -inf, which adds exp(-inf) = 0 below).
  float x[kPerThread];
  if constexpr (kVec) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int n4 = cols / 4;
#pragma unroll
    for (int k = 0; k < kPerThread / 4; ++k) {
      const int j = threadIdx.x + k * kRowThreads;
      const float4 q = j < n4 ? __ldg(row4 + j) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      x[4 * k + 0] = q.x;
      x[4 * k + 1] = q.y;
      x[4 * k + 2] = q.z;
      x[4 * k + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int j = threadIdx.x + k * kRowThreads;
      x[k] = j < cols ? __ldg(row + j) : -INFINITY;
    }
  }

  float local_max = -INFINITY;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) local_max = fmaxf(local_max, x[k]);
  const float cm = BlockMax<kRowThreads>(local_max, scratch);

  float ls = 0.0f, lt = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const float d = x[k] - cm;
    const float e = expf(d);
    ls += e;
    if (e > 0.0f) lt += e * d;  // e == 0 (padding, -inf, underflow) adds 0; avoids 0 * -inf
  }
  const float cs = BlockSum<kRowThreads>(ls, scratch);
  const float ct = BlockSum<kRowThreads>(lt, scratch);

  if (threadIdx.x != 0) return;
  float m;
  double s, t;
  float zt = 0.0f;
  if (first) {
    m = cm;
    s = cs;
    t = ct;
  } else {
    const RowStats st = stats[n];
    m = fmaxf(st.m, cm);
    const double dm_old = static_cast<double>(st.m) - m, dm_new = static_cast<double>(cm) - m;  // <= 0
    const double a = exp(dm_old), b = exp(dm_new);
    s = a * st.s + b * cs;
    // sum exp(z - m)(z - m) = a (t_old + (m_old - m) s_old) over the old part, likewise the chunk's.
    t = a * (st.t + dm_old * st.s) + b * (static_cast<double>(ct) + dm_new * cs);
    zt = st.zt;
  }
  const int tgt = targets[n];
  if (tgt >= v0 && tgt < v0 + cols) zt = row[tgt - v0];
  if (!last) {
    stats[n] = RowStats{s, t, m, zt};
    return;
  }
  const double log_s = log(s);
  const double l = static_cast<double>(m) + log_s;
  lse[n] = static_cast<float>(l);
  const bool valid = tgt >= 0;
  logprob[n] = valid ? static_cast<float>(static_cast<double>(zt) - l) : 0.0f;
  entropy[n] = valid ? static_cast<float>(log_s - t / s) : 0.0f;
}

// The chunk logits z[N, cols] -> dz = d loss / d logits (the 1/T included), exactly the expression of
// CpuBackend::LmHeadBackward: in place (dz16 null), or rounded to bf16 into dz16[N, cols] only, the
// operand both products read (z is then left as it was).
__device__ __forceinline__ void StoreDz(float* __restrict__ z, uint16_t* __restrict__ dz16, size_t i, float4 d) {
  if (dz16) {
    *reinterpret_cast<uint2*>(dz16 + i) = PackBf16x4(d);
  } else {
    *reinterpret_cast<float4*>(z + i) = d;
  }
}
__device__ __forceinline__ void StoreDz(float* __restrict__ z, uint16_t* __restrict__ dz16, size_t i, float d) {
  if (dz16) dz16[i] = __bfloat16_as_ushort(__float2bfloat16_rn(d));
  else z[i] = d;
}

template <bool kVec>
__global__ void __launch_bounds__(kRowThreads) LmHeadBackwardRows(float* __restrict__ z, uint16_t* __restrict__ dz16,
                                                                  const int32_t* __restrict__ targets,
                                                                  const float* __restrict__ lse,
                                                                  const float* __restrict__ entropy,
                                                                  const float* __restrict__ dlogprob,
                                                                  const float* __restrict__ dentropy, int cols,
                                                                  int v0, float inv_t) {
  const int n = blockIdx.x;
  const size_t base = static_cast<size_t>(n) * cols;
  const float* row = z + base;
  const int tgt = targets[n];
  const float glp = (tgt >= 0 && dlogprob != nullptr) ? dlogprob[n] : 0.0f;
  const float gent = (tgt >= 0 && dentropy != nullptr) ? dentropy[n] : 0.0f;
  const int tcol = tgt - v0;  // target's column in this chunk (may be outside [0, cols))

  if (glp == 0.0f && gent == 0.0f) {  // no gradient flows through this row (e.g. target < 0)
    if constexpr (kVec) {
      for (int j = threadIdx.x; j < cols / 4; j += kRowThreads)
        StoreDz(z, dz16, base + 4 * j, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
    } else {
      for (int j = threadIdx.x; j < cols; j += kRowThreads) StoreDz(z, dz16, base + j, 0.0f);
    }
    return;
  }
  const float l = lse[n], H = entropy[n];
  auto grad = [&](float zc, int c) {
    const float logp = zc - l;
    const float p = expf(logp);
    float d = -glp * p - gent * p * (logp + H);
    if (c == tcol) d += glp;
    return d * inv_t;
  };
  if constexpr (kVec) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    for (int j = threadIdx.x; j < cols / 4; j += kRowThreads) {
      float4 q = row4[j];
      const int c = 4 * j;
      q.x = grad(q.x, c);
      q.y = grad(q.y, c + 1);
      q.z = grad(q.z, c + 2);
      q.w = grad(q.w, c + 3);
      StoreDz(z, dz16, base + c, q);
    }
  } else {
    for (int j = threadIdx.x; j < cols; j += kRowThreads) StoreDz(z, dz16, base + j, grad(row[j], j));
  }
}

// ---- sampling -------------------------------------------------------------------------------------

constexpr int kSampleThreads = 512;
constexpr int kSampleWarps = kSampleThreads / 32;
constexpr float kWeightScale = 1099511627776.0f;  // 2^40: fixed point of the top-p weights
// Radix levels whose histograms use HistAdd (see Descend). Measured on an H200 (B = 256,
// V = 151936): 1 beats 4 (top-p 0.72 ms against 0.93 ms, top-k 0.37 ms against 0.40 ms).
constexpr int kAggregatedLevels = 1;
// Rounds of rejection sampling a top-p row (with partial draws) takes before the radix path.
constexpr int kRejectRounds = 8;

// The row key of rejection round r (and, at r = kRejectRounds, of the radix path's draw after them):
// a stream of uniform numbers independent of the row key's.
__device__ __forceinline__ uint32_t RoundKey(uint32_t key, int r) {
  return LowBias32(key ^ LowBias32(0x5BD1E995u + static_cast<uint32_t>(r) * kGamma32));
}

// Order-preserving u32 of a float: a < b (as floats) <=> Key(a) < Key(b); -0 maps to +0's key so
// that equal logits are equal keys (the CPU compares floats). NaN is not expected.
__device__ __forceinline__ uint32_t OrderKey(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float whose OrderKey is k (NaN keys aside).
__device__ __forceinline__ float KeyValue(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Top-p weight exp(z - max z) in [0, 1] as fixed point (<= 2^40).
__device__ __forceinline__ unsigned long long Weight(float l, float inv_t, float zmax) {
  const float w = expf(Scaled(l, inv_t) - zmax);
  return __float2ull_rz(w * kWeightScale);
}

// (score, id) order: higher score first, then lower id.
__device__ __forceinline__ bool Better(float s, int i, float best_s, int best_i) {
  return s > best_s || (s == best_s && i < best_i);
}

// Calls f4(v, i) for every float4 v = row[i .. i + 3] this thread owns and f1(value, index) for
// every single element it owns, in a fixed order. A row whose start is not 16-byte aligned (every
// row but the first of an odd vocabulary) gives its elements before the first 16-byte boundary to
// threads 0..2 one by one, and any elements after the last whole float4 the same way; the rest go
// as float4, the thread's own in increasing index order. Two float4 per step, and the next step's
// two are loaded before this step's calls run, so four loads are in flight while they compute (with
// the loads issued only at the top of each step, a 151936-wide row waited one memory latency per
// step). Rows taken element by element ran the scalar ReservoirAdd, one load in flight, on every
// element: ~0.1 ms more a decode step at 256 x 151,669 (docs/PERF.md, version 16).
template <class F4, class F1>
__device__ __forceinline__ void ForEach4(const float* __restrict__ row, int V, F4&& f4, F1&& f1) {
  constexpr int T = kSampleThreads;
  const int head = min(V, static_cast<int>(((16u - (reinterpret_cast<uintptr_t>(row) & 15u)) & 15u) / 4u));
  if (static_cast<int>(threadIdx.x) < head) f1(__ldg(row + threadIdx.x), static_cast<int>(threadIdx.x));
  const float4* row4 = reinterpret_cast<const float4*>(row + head);
  const int n4 = (V - head) / 4;
  int j = threadIdx.x;
  bool have = j + T < n4;
  float4 a, b;
  if (have) a = __ldg(row4 + j), b = __ldg(row4 + j + T);
  while (have) {
    const int jn = j + 2 * T;
    const bool next = jn + T < n4;
    float4 an = a, bn = b;
    if (next) an = __ldg(row4 + jn), bn = __ldg(row4 + jn + T);
    f4(a, head + 4 * j);
    f4(b, head + 4 * (j + T));
    j = jn;
    a = an;
    b = bn;
    have = next;
  }
  if (j < n4) f4(__ldg(row4 + j), head + 4 * j);
  const int tail = head + 4 * n4 + static_cast<int>(threadIdx.x);
  if (tail < V) f1(__ldg(row + tail), tail);
}

// Calls f(value, index) for every element of row[0, V) this thread owns, in ForEach4's order.
template <class F>
__device__ __forceinline__ void ForEach(const float* __restrict__ row, int V, F&& f) {
  ForEach4(
      row, V,
      [&](float4 v, int i) {
        f(v.x, i);
        f(v.y, i + 1);
        f(v.z, i + 2);
        f(v.w, i + 3);
      },
      f);
}

__device__ __forceinline__ bool VectorRow(const float* row, int V) {
  return (V & 3) == 0 && (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
}

// Like ForEach, but all 32 lanes of a warp make the same number of calls f(value, index, valid), in
// step, so f may use warp-collective intrinsics; lanes past the end pass valid = false. (Rows of an
// odd vocabulary go element by element here: top-k / top-p sampling only.)
template <class F>
__device__ __forceinline__ void ForEachConverged(const float* __restrict__ row, int V, F&& f) {
  const int lane = threadIdx.x & 31, warp_first = static_cast<int>(threadIdx.x) - lane;
  if (VectorRow(row, V)) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int n4 = V / 4;
    for (int j0 = warp_first; j0 < n4; j0 += 2 * kSampleThreads) {  // j0 is uniform in the warp
      const int ja = j0 + lane, jb = ja + kSampleThreads;
      const bool oka = ja < n4, okb = jb < n4;
      const float4 a = oka ? __ldg(row4 + ja) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float4 b = okb ? __ldg(row4 + jb) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      f(a.x, 4 * ja, oka);
      f(a.y, 4 * ja + 1, oka);
      f(a.z, 4 * ja + 2, oka);
      f(a.w, 4 * ja + 3, oka);
      f(b.x, 4 * jb, okb);
      f(b.y, 4 * jb + 1, okb);
      f(b.z, 4 * jb + 2, okb);
      f(b.w, 4 * jb + 3, okb);
    }
  } else {
    for (int i0 = warp_first; i0 < V; i0 += kSampleThreads) {
      const int i = i0 + lane;
      const bool ok = i < V;
      f(ok ? __ldg(row + i) : 0.0f, i, ok);
    }
  }
}

// Top-k's candidates (TopKFromCandidates): at most this many tiles' maxima and candidate tokens.
constexpr int kCandidates = 2048;

struct SampleShared {
  unsigned int cnt[256];                         // radix histogram: element counts
  unsigned long long mass[256];                  // radix histogram: fixed-point weights (block totals)
  union {
    unsigned long long wmass[kSampleWarps][256];  // the same per warp (no atomics: see HistAdd)
    struct {                                      // TopKFromCandidates (no HistAdd meanwhile)
      unsigned long long key[kCandidates];        // a candidate: OrderKey(logit) << 32 | ~id
      float cum[kCandidates];                     // running weights of the sorted candidates
      float tmax[kCandidates];                    // the tiles' max z
    } c;
  };
  unsigned int ncand;
  float f0[32], f1[32];                          // reduction scratch
  int i0[32];
  unsigned int d_prefix;                         // descent results, thread 0 -> all
  unsigned long long d_above, d_target, d_mass;
  unsigned int d_cnt;
  int found;
  float zpick;                                   // the winning partial draw's z (SampleRowsFromPartials)
};

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
struct Reservoir {
  float m = -INFINITY, s = 0.0f, x = 0.0f;
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
    r.x = r.s / Uniform(key, i);
  }
}

// ReservoirAdd of z[0..3] = z(v) at ids i .. i + 3, in that order, with one rescale per four: when the
// four's largest beats the running max, s and x move to it first (the same quantities in another
// scale), so each element then costs a scale, an FMA, one MUFU.EX2 (subnormal weights, below e^-87 of
// the max, flush to 0), an add and a compare instead of two branches and a full-precision exp; a
// replacement divides with the fast reciprocal. The draw and the weights are ReservoirAdd's; only
// rounding differs. NaN weighs 0 (fmaxf keeps -inf); while the max is not finite (no finite z yet, or
// +inf) the four take ReservoirAdd itself.
__device__ __forceinline__ void ReservoirAdd4(Reservoir& r, float4 v, float inv_t, int i, uint32_t key) {
  const float z[4] = {fmaxf(Scaled(v.x, inv_t), -INFINITY), fmaxf(Scaled(v.y, inv_t), -INFINITY),
                      fmaxf(Scaled(v.z, inv_t), -INFINITY), fmaxf(Scaled(v.w, inv_t), -INFINITY)};
  const float g = fmaxf(fmaxf(z[0], z[1]), fmaxf(z[2], z[3]));
  if (!(r.m > -INFINITY && r.m < INFINITY && g < INFINITY)) {
#pragma unroll
    for (int j = 0; j < 4; ++j) ReservoirAdd(r, z[j], i + j, key);
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
  for (int j = 0; j < 4; ++j) {
    const float e = Exp2Ftz(fmaf(z[j], kLog2e, -ml));  // 0 for z = -inf (and below e^-87 of the max)
    r.s += e;
    if (r.s >= r.x && e > 0.0f) {  // the branch every other lane waits on: kept short
      r.pick = i + j;
      r.x = __fdividef(r.s, Uniform(key, i + j));  // u in (0, 1]: the fast division is exact enough
    }
  }
}

// The thread's entry in the block-level draw: the threads' totals W_t compete by Gumbel-max,
// score = log W_t + g_t, so thread t wins with probability W_t / sum W; its pick then has probability
// exp(z_j) / W_t, together exp(z_j) / sum W. g_t uses uniform number V + t of the row (token draws use
// numbers 0 .. V - 1).
__device__ __forceinline__ float ReservoirScore(const Reservoir& r, uint32_t key, int V) {
  if (!(r.s > 0.0f)) return -INFINITY;
  const float u = Uniform(key, V + static_cast<int>(threadIdx.x));
  return r.m + logf(r.s) - logf(-logf(u));
}

// Block-wide (m, s) merge; every thread gets the result.
__device__ __forceinline__ void BlockLse(float& m, float& s, SampleShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o), s2 = __shfl_xor_sync(kFull, s, o);
    LseMerge(m, s, m2, s2);
  }
  __syncthreads();
  if (lane == 0) {
    sh.f0[warp] = m;
    sh.f1[warp] = s;
  }
  __syncthreads();
  m = lane < kSampleWarps ? sh.f0[lane] : -INFINITY;
  s = lane < kSampleWarps ? sh.f1[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o), s2 = __shfl_xor_sync(kFull, s, o);
    LseMerge(m, s, m2, s2);
  }
}

// Block-wide argmax under Better(); every thread gets the result.
__device__ __forceinline__ void BlockArgmax(float& best, int& best_i, SampleShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float b2 = __shfl_xor_sync(kFull, best, o);
    const int i2 = __shfl_xor_sync(kFull, best_i, o);
    if (Better(b2, i2, best, best_i)) {
      best = b2;
      best_i = i2;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sh.f0[warp] = best;
    sh.i0[warp] = best_i;
  }
  __syncthreads();
  best = lane < kSampleWarps ? sh.f0[lane] : -INFINITY;
  best_i = lane < kSampleWarps ? sh.i0[lane] : INT_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float b2 = __shfl_xor_sync(kFull, best, o);
    const int i2 = __shfl_xor_sync(kFull, best_i, o);
    if (Better(b2, i2, best, best_i)) {
      best = b2;
      best_i = i2;
    }
  }
}

// A prefix of the strict order: element (key k, id i) is kept iff k > key || (k == key && i <= id).
// {0, INT_MAX} keeps everything.
struct Cut {
  uint32_t key;
  int id;
};
__device__ __forceinline__ bool Kept(uint32_t k, int i, Cut c) { return k > c.key || (k == c.key && i <= c.id); }

struct Descent {
  uint32_t key;                // the key at which the running total first reaches the target
  unsigned long long above;    // total of the restricted elements with a larger key (< target)
  unsigned long long target;   // the target actually used
  unsigned long long mass;     // total of the restricted elements with exactly this key (> 0)
  uint32_t cnt;                // how many restricted elements have exactly this key (>= 1)
};

// Histogram update, called by all 32 lanes in step. The lanes with in = true that share a bin form
// a group (__match_any_sync); the group's weights are summed by redux.sync over the group's own mask
// (as cooperative_groups::labeled_partition + reduce do), and its lowest lane adds the group's count
// (a u32 shared atomic) and weight to its warp's private row of wmass (a plain add: within the warp,
// groups have distinct bins, and __syncwarp orders it before the next call's writer). Weights are
// <= 2^40, so the 24-bit low and 17-bit high parts of 32 of them sum in u32 without overflow.
__device__ __forceinline__ void HistAdd(SampleShared& sh, bool in, uint32_t bin, unsigned long long wgt,
                                        bool use_mass) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned int group = __match_any_sync(kFull, in ? bin : 0xFFFFFFFFu);  // bins are < 256
  if (in) {
    const bool leader = lane == __ffs(group) - 1;
    if (use_mass) {
      const unsigned int lo = __reduce_add_sync(group, static_cast<unsigned int>(wgt & 0xFFFFFFull));
      const unsigned int hi = __reduce_add_sync(group, static_cast<unsigned int>(wgt >> 24));
      if (leader) sh.wmass[warp][bin] += (static_cast<unsigned long long>(hi) << 24) + lo;
    }
    if (leader) atomicAdd(&sh.cnt[bin], static_cast<unsigned int>(__popc(group)));
  }
  __syncwarp();
}

// MSB-first radix descent over the elements kept by `keep`, visiting keys from the largest down,
// each element weighing 1 (use_mass false) or Weight() (use_mass true). Finds the key at which the
// running total first reaches the target: `target_count` when use_mass is false, else
// ceil(frac * total weight) clamped to [1, total]. Invariant: above < target <= above + (total of
// the current digit prefix), so a bin is always found and its total is > 0.
// `each(f)` calls f(value, index, valid) for every element as ForEachConverged does (a row of logits,
// or an array in shared memory).
template <class Each>
__device__ Descent Descend(Each&& each, bool use_mass, float inv_t, float zmax, Cut keep, float frac,
                           unsigned long long target_count, SampleShared& sh) {
  uint32_t prefix = 0;
  unsigned long long above = 0, target = target_count;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    const uint32_t hi_mask = level == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));  // digits already fixed
    // Level 0 sees every element, and similar logits share their top digit: warp-aggregated adds.
    // Deeper levels see only the prefix's elements, spread over many bins: plain atomics.
    const bool aggregate = level < kAggregatedLevels;
    for (int b = threadIdx.x; b < 256; b += kSampleThreads) {
      sh.cnt[b] = 0u;
      sh.mass[b] = 0ull;
    }
    if (use_mass && aggregate)
      for (int b = threadIdx.x; b < kSampleWarps * 256; b += kSampleThreads) (&sh.wmass[0][0])[b] = 0ull;
    __syncthreads();
    each([&](float l, int i, bool ok) {
      const uint32_t k = OrderKey(l);
      const bool in = ok && (k & hi_mask) == prefix && Kept(k, i, keep);
      const uint32_t bin = (k >> shift) & 255u;
      if (aggregate) {  // uniform in the block
        if (!__any_sync(kFull, in)) return;  // uniform in the warp
        const unsigned long long wgt = (in && use_mass) ? Weight(l, inv_t, zmax) : 0ull;
        HistAdd(sh, in, bin, wgt, use_mass);
      } else if (in) {
        atomicAdd(&sh.cnt[bin], 1u);
        if (use_mass) atomicAdd(&sh.mass[bin], Weight(l, inv_t, zmax));
      }
    });
    __syncthreads();
    if (use_mass && aggregate) {
      for (int b = threadIdx.x; b < 256; b += kSampleThreads) {
        unsigned long long t = 0;
        for (int w = 0; w < kSampleWarps; ++w) t += sh.wmass[w][b];
        sh.mass[b] = t;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (level == 0 && use_mass) {
        unsigned long long total = 0;
        for (int b = 0; b < 256; ++b) total += sh.mass[b];
        const double t = ceil(static_cast<double>(frac) * static_cast<double>(total));
        target = t <= 1.0 ? 1ull : (t >= static_cast<double>(total) ? total : static_cast<unsigned long long>(t));
      }
      int sel = 0;
      for (int b = 255; b > 0; --b) {
        const unsigned long long mb = use_mass ? sh.mass[b] : sh.cnt[b];
        if (above + mb >= target) {
          sel = b;
          break;
        }
        above += mb;
      }
      sh.d_prefix = prefix | (static_cast<uint32_t>(sel) << shift);
      sh.d_above = above;
      sh.d_target = target;
      sh.d_cnt = sh.cnt[sel];
      sh.d_mass = use_mass ? sh.mass[sel] : sh.cnt[sel];
    }
    __syncthreads();
    prefix = sh.d_prefix;
    above = sh.d_above;
    target = sh.d_target;
  }
  Descent d{prefix, above, target, sh.d_mass, sh.d_cnt};
  __syncthreads();  // everyone has read the results before sh is reused
  return d;
}

// The id of the j-th (1-based) element with key `key`, in increasing id order; j >= 1 and at least
// j such elements exist. One ordered scan of the row, stopping at the tile that holds it.
__device__ int NthTieId(const float* __restrict__ row, int V, uint32_t key, unsigned int j, SampleShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) sh.found = INT_MAX;
  unsigned int running = 0;  // ties before this tile; identical in every thread
  for (int t0 = 0; t0 < V; t0 += kSampleThreads) {
    const int i = t0 + static_cast<int>(threadIdx.x);
    const bool tie = i < V && OrderKey(__ldg(row + i)) == key;
    const unsigned int ballot = __ballot_sync(kFull, tie);
    __syncthreads();  // previous tile's reads of sh.i0 are done
    if (lane == 0) sh.i0[warp] = __popc(ballot);
    __syncthreads();
    unsigned int before = 0, total = 0;
    for (int w = 0; w < kSampleWarps; ++w) {
      const unsigned int c = static_cast<unsigned int>(sh.i0[w]);
      if (w < warp) before += c;
      total += c;
    }
    const unsigned int rank = running + before + __popc(ballot & ((1u << lane) - 1u)) + 1u;
    if (tie && rank == j) sh.found = i;
    running += total;
    if (running >= j) break;  // uniform: the tile that holds the j-th tie
  }
  __syncthreads();
  const int id = sh.found;
  __syncthreads();
  return id;
}

// Top-p alone by rejection sampling from the full distribution, of which x is a draw (the row's
// z = logits / T has log-sum-exp state (m, s)). The kept set is the smallest prefix of the strict
// order whose weight reaches P of the total, so a token x is in it iff the weight of the tokens
// before x is below P s (weights exp(z - m)). A token outside it shows the set to lie before it: the
// next proposal is drawn from the tokens before x (a reservoir over them, whose (m, s) is also
// their weight, the next round's test). Each proposal's distribution is the full one restricted to
// a superset of the kept set, so the accepted token has the kept set's renormalised distribution.
// One pass a round, with its own random numbers (RoundKey); at P = 0.95 about one row in twenty
// needs a second. Returns false after kRejectRounds (the radix path decides); true with `token`.
__device__ bool TopPByRejection(const float* __restrict__ row, int V, int x, float m, float s, float P, float inv_t,
                                uint32_t key, SampleShared& sh, int& token) {
  const float target = P * s;
  for (int round = 0; round < kRejectRounds; ++round) {
    const uint32_t rkey = RoundKey(key, round);
    const float lx = __ldg(row + x);
    auto before = [&](float l, int i) { return l > lx || (l == lx && i < x); };
    Reservoir q;
    ForEach4(
        row, V,
        [&](float4 v, int i) {
          const float4 u = make_float4(before(v.x, i) ? v.x : -INFINITY, before(v.y, i + 1) ? v.y : -INFINITY,
                                       before(v.z, i + 2) ? v.z : -INFINITY, before(v.w, i + 3) ? v.w : -INFINITY);
          ReservoirAdd4(q, u, inv_t, i, rkey);
        },
        [&](float l, int i) {
          if (before(l, i)) ReservoirAdd(q, Scaled(l, inv_t), i, rkey);
        });
    float qm = q.m, qs = q.s;
    BlockLse(qm, qs, sh);
    const float mass = qs > 0.0f ? qs * expf(qm - m) : 0.0f;  // weight of the tokens before x
    if (mass < target) {
      token = x;
      return true;
    }
    float score = ReservoirScore(q, rkey, V);
    int pick = q.pick;
    BlockArgmax(score, pick, sh);
    if (!(pick >= 0 && pick < V)) return false;  // nothing before x to draw (rounding)
    x = pick;
  }
  return false;
}

// Warp 0's lanes: the first index j < n whose cum[j] passes `t` (cum[j] >= t when at_least, else
// cum[j] > t), or n - 1 if none does (rounding). cum is non-decreasing.
__device__ __forceinline__ int FirstPassing(const float* cum, int n, float t, bool at_least) {
  const int lane = threadIdx.x & 31;
  for (int j0 = 0; j0 < n; j0 += 32) {
    const int j = j0 + lane;
    const bool pass = j < n && (at_least ? cum[j] >= t : cum[j] > t);
    const unsigned int ballot = __ballot_sync(kFull, pass);
    if (ballot) return j0 + __ffs(ballot) - 1;
  }
  return n - 1;
}

// A top-k row (K < V; top-p too or not) from the fused lm-head's partial draws, without a pass over
// the row. Each tile t of kPartialColumns has its max z m_t in part[t].m. The K tiles with the largest
// maxima hold K tokens with z >= tau, tau the K-th largest maximum, so the K-th token of the strict
// order has z >= tau too (z is monotone in the logit), and every token of the top-K set lies in a
// tile with m_t >= tau. Those tiles' tokens with z >= tau (usually a few times K) are gathered,
// sorted by the strict order (bitonic, in shared memory), and the set is cut there: the first K,
// then top-p's smallest prefix whose weight exp(z - zmax) reaches P of theirs. The draw is the
// inverse CDF of those running weights at a uniform number of its own stream, as engine/sampler.cc
// draws. Returns false (the radix path decides) when more than kCandidates tiles or candidates
// would be needed; `token` is then untouched.
static_assert(kPartialColumns == 4 * 32, "TopKFromCandidates reads a part with a warp, 4 columns a lane");
__device__ bool TopKFromCandidates(const float* __restrict__ row, int V, const Partial* __restrict__ part, int parts,
                                   int K, bool use_p, float P, float inv_t, float zmax, uint32_t key,
                                   SampleShared& sh, int& token) {
  if (parts > kCandidates) return false;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t = threadIdx.x; t < parts; t += kSampleThreads) sh.c.tmax[t] = part[t].m;
  if (threadIdx.x == 0) sh.ncand = 0;
  __syncthreads();
  float tau = -INFINITY;
  if (parts > K) {
    auto maxima = [&](auto&& f) {
      for (int j0 = static_cast<int>(threadIdx.x) - lane; j0 < parts; j0 += kSampleThreads) {
        const int j = j0 + lane;
        f(j < parts ? sh.c.tmax[j] : 0.0f, j, j < parts);
      }
    };
    const Descent d =
        Descend(maxima, false, 1.0f, 0.0f, Cut{0u, INT_MAX}, 0.0f, static_cast<unsigned long long>(K), sh);
    tau = KeyValue(d.key);
  }
  // The candidates: a warp per tile whose max reaches tau, 4 columns a lane, appended by the warp.
  for (int t = warp; t < parts; t += kSampleWarps) {
    if (!(sh.c.tmax[t] >= tau) || sh.c.tmax[t] == -INFINITY) continue;  // warp-uniform
    float l[4];
    bool in[4];
    int n = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = t * kPartialColumns + lane * 4 + e;
      l[e] = col < V ? __ldg(row + col) : -INFINITY;
      const float z = fminf(fmaxf(Scaled(l[e], inv_t), -INFINITY), kZCap);
      in[e] = z >= tau && z > -INFINITY;
      n += in[e];
    }
    int before = n;  // inclusive scan of the lanes' counts
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFull, before, o);
      if (lane >= o) before += y;
    }
    const int total = __shfl_sync(kFull, before, 31);
    unsigned int base = 0;
    if (lane == 0 && total > 0) base = atomicAdd(&sh.ncand, static_cast<unsigned int>(total));
    base = __shfl_sync(kFull, base, 0) + static_cast<unsigned int>(before - n);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (in[e] && base < static_cast<unsigned int>(kCandidates)) {
        const uint32_t col = static_cast<uint32_t>(t * kPartialColumns + lane * 4 + e);
        sh.c.key[base] = (static_cast<unsigned long long>(OrderKey(l[e])) << 32) | ~col;
      }
      base += in[e];
    }
  }
  __syncthreads();
  const int n = static_cast<int>(sh.ncand);
  if (n == 0 || n > kCandidates) return false;  // uniform: the radix path (sh is free after this sync)
  // Sort the candidates by the strict order (key descending), padded with 0 keys to a power of two.
  int np = 32;
  while (np < n) np <<= 1;
  for (int j = n + static_cast<int>(threadIdx.x); j < np; j += kSampleThreads) sh.c.key[j] = 0ull;
  __syncthreads();
  for (int k = 2; k <= np; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < np; i += kSampleThreads) {
        const int x = i ^ j;
        if (x > i) {
          const unsigned long long a = sh.c.key[i], b = sh.c.key[x];
          if (((i & k) == 0) ? a < b : a > b) {
            sh.c.key[i] = b;
            sh.c.key[x] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  // Warp 0: running weights of the first K, the top-p cut and the draw.
  if (warp == 0) {
    const int kept_k = min(K, n);
    auto logit_of = [&](int j) { return KeyValue(static_cast<uint32_t>(sh.c.key[j] >> 32)); };
    float run = 0.0f;
    for (int j0 = 0; j0 < kept_k; j0 += 32) {
      const int j = j0 + lane;
      float w = j < kept_k ? expf(fminf(Scaled(logit_of(j), inv_t), kZCap) - zmax) : 0.0f;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(kFull, w, o);
        if (lane >= o) w += y;
      }
      if (j < kept_k) sh.c.cum[j] = run + w;
      run += __shfl_sync(kFull, w, 31);
    }
    __syncwarp();
    const int kept = use_p ? FirstPassing(sh.c.cum, kept_k, P * run, true) + 1 : kept_k;
    const float u = Uniform(RoundKey(key, kRejectRounds + 1), 0);
    const int j = FirstPassing(sh.c.cum, kept, u * sh.c.cum[kept - 1], false);
    if (lane == 0) sh.found = static_cast<int>(~static_cast<uint32_t>(sh.c.key[j]));  // the token's id
  }
  __syncthreads();
  token = sh.found;
  __syncthreads();
  return true;
}

__global__ void __launch_bounds__(kSampleThreads, 2)
    SampleRowsKernel(int32_t* __restrict__ tokens, float* __restrict__ logprobs, const float* __restrict__ logits,
                     int V, const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                     const float* __restrict__ top_p, const uint64_t* __restrict__ seeds,
                     const uint64_t* __restrict__ counters, const Partial* __restrict__ part, int parts) {
  __shared__ SampleShared sh;
  const int b = blockIdx.x;
  const float* row = logits + static_cast<size_t>(b) * V;
  const float T = temperature[b];
  const bool greedy = !(T > 0.0f);  // T <= 0 is greedy, as in engine/sampler.cc
  const float inv_t = greedy ? 1.0f : 1.0f / T;
  const int k_opt = top_k[b];
  const int K = (k_opt > 0 && k_opt < V) ? k_opt : V;  // K == V: no top-k
  const float P = top_p[b];
  const bool use_p = P < 1.0f;
  const bool filtered = !greedy && (K < V || use_p);
  const uint32_t key = RowKey(seeds[b], counters[b]);

  // Pass 1: log-sum-exp of z over the full row (the reservoir's (m, s) when sampling unfiltered);
  // greedy argmax; the unfiltered draw, also for top-p alone (TopPByRejection's first proposal).
  // From the fused lm-head's partial draws instead when it made them (every row's, filtering ones
  // too).
  const bool top_p_only = K == V && use_p;
  Reservoir r;
  float best = -INFINITY;
  int best_i = INT_MAX;
  if (part) {
    float m = -INFINITY, s = 0.0f, zp = 0.0f;
    for (int j = threadIdx.x; j < parts; j += kSampleThreads) {
      const Partial p = part[static_cast<size_t>(b) * parts + j];
      LseMerge(m, s, p.m, p.s);
      // Greedy: the part's max. Sampling: part j drew its pick with probability exp(z - p.m) / p.s;
      // Gumbel-max over the parts' totals p.s e^p.m (uniform number parts + j) chooses among them.
      const float score = greedy ? p.zp : (p.s > 0.0f ? p.m + logf(p.s) - logf(-logf(Uniform(key, parts + j)))
                                                       : -INFINITY);
      if (Better(score, p.pick, best, best_i)) {
        best = score;
        best_i = p.pick;
        zp = p.zp;
      }
    }
    const float mine = best;
    const int mine_i = best_i;
    BlockLse(m, s, sh);
    BlockArgmax(best, best_i, sh);
    if (!filtered) {
      const bool valid = best_i >= 0 && best_i < V;
      if (valid && mine == best && mine_i == best_i) sh.zpick = zp;  // picks of distinct parts differ
      __syncthreads();
      if (threadIdx.x == 0) {
        tokens[b] = valid ? best_i : 0;  // only rows without finite logits fall back
        logprobs[b] = valid ? sh.zpick - (m + logf(s)) : NAN;
      }
      return;
    }
    r.m = m;
    r.s = s;
  } else if (!greedy && (!filtered || top_p_only)) {  // the common case: one draw from the full distribution
    ForEach4(
        row, V, [&](float4 v, int i) { ReservoirAdd4(r, v, inv_t, i, key); },
        [&](float l, int i) { ReservoirAdd(r, Scaled(l, inv_t), i, key); });
    best = ReservoirScore(r, key, V);
    best_i = r.pick;
    if (filtered) BlockArgmax(best, best_i, sh);  // the first proposal, in every thread
  } else {
    ForEach(row, V, [&](float l, int i) {
      LseAdd(r.m, r.s, Scaled(l, inv_t));
      if (greedy && Better(l, i, best, best_i)) {
        best = l;
        best_i = i;
      }
    });
  }
  float m = r.m, s = r.s;
  if (!part) BlockLse(m, s, sh);
  const float zmax = m;

  if (filtered) {
    // Top-p alone: rejection sampling from the first draw. Top-k (with top-p or not) with partial
    // draws: the candidates of the tiles' maxima. Else, or past their limits, the radix path.
    const bool drawn = best_i >= 0 && best_i < V;  // a block-wide draw from the full distribution
    int tok = -1;
    bool done = false;
    if (top_p_only && drawn) {
      done = TopPByRejection(row, V, best_i, m, s, P, inv_t, key, sh, tok);
    } else if (part && K < V && drawn) {
      done = TopKFromCandidates(row, V, part + static_cast<size_t>(b) * parts, parts, K, use_p, P, inv_t, m, key, sh,
                                tok);
    }
    if (done) {
      if (threadIdx.x == 0) {
        tokens[b] = tok;
        logprobs[b] = Scaled(__ldg(row + tok), inv_t) - (m + logf(s));
      }
      return;
    }
    auto all = [&](auto&& f) { ForEachConverged(row, V, f); };
    // Top-k cut: the K-th element of the strict order.
    Cut cut{0u, INT_MAX};
    unsigned int cnt_at_k_key = 0;  // all elements with the top-k cut key
    if (K < V) {
      const Descent d = Descend(all, false, inv_t, zmax, cut, 0.0f, static_cast<unsigned long long>(K), sh);
      const unsigned int j = static_cast<unsigned int>(d.target - d.above);  // ties to keep, 1..cnt
      cut.key = d.key;
      cnt_at_k_key = d.cnt;
      cut.id = j < d.cnt ? NthTieId(row, V, d.key, j, sh) : INT_MAX;
    }
    // Top-p cut within the top-k set: the smallest prefix whose weight reaches top_p of the set's.
    if (use_p) {
      const Descent d = Descend(all, true, inv_t, zmax, cut, P, 0ull, sh);
      const unsigned long long unit = d.mass / d.cnt;  // all elements with one key weigh the same
      unsigned long long jj = (d.target - d.above + unit - 1ull) / unit;
      jj = jj < 1ull ? 1ull : (jj > d.cnt ? d.cnt : jj);
      const unsigned int j = static_cast<unsigned int>(jj);
      const unsigned int cnt_all = (K < V && d.key == cut.key) ? cnt_at_k_key : d.cnt;
      cut.key = d.key;
      cut.id = j < cnt_all ? NthTieId(row, V, d.key, j, sh) : INT_MAX;
    }
    // The draw over the kept set (after a first draw, random numbers of their own: that draw and
    // any rejection rounds used the row key's).
    const uint32_t dkey = drawn ? RoundKey(key, kRejectRounds) : key;
    Reservoir q;
    ForEach(row, V, [&](float l, int i) {
      if (Kept(OrderKey(l), i, cut)) ReservoirAdd(q, Scaled(l, inv_t), i, dkey);
    });
    best = ReservoirScore(q, dkey, V);
    best_i = q.pick;
  }
  BlockArgmax(best, best_i, sh);

  if (threadIdx.x == 0) {
    const int tok = (best_i >= 0 && best_i < V) ? best_i : 0;  // only rows without finite logits fall back
    tokens[b] = tok;
    logprobs[b] = Scaled(row[tok], inv_t) - (zmax + logf(s));
  }
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------------

int LmHeadChunk() { return kChunk; }

// z (f32 chunk logits) | the forward's row statistics, or the backward's bf16 dz of a chunk.
size_t LmHeadWorkspace(int N, int V) {
  if (N <= 0 || V <= 0) return 0;
  return LogitsBytes(N, V) + std::max(static_cast<size_t>(N) * sizeof(RowStats), LogitsBytes(N, V) / 2);
}

void LmHeadForward(Gemm& gemm, float* logprob, float* entropy, float* lse, const float* h, const float* w,
                   const int32_t* targets, int N, int C, int V, float temperature, void* workspace,
                   cudaStream_t s, float* logits) {
  if (N <= 0 || V <= 0) return;
  float* const zw = static_cast<float*>(workspace);
  RowStats* stats = reinterpret_cast<RowStats*>(static_cast<char*>(workspace) + LogitsBytes(N, V));
  const float inv_t = 1.0f / temperature;
  // h is cast to bf16 once for all chunks: the row kernel writes only z and the statistics, and the
  // products write only z, so the held cast of h stays valid (Gemm::set_cast_reuse).
  gemm.set_cast_reuse(true);
  for (int v0 = 0, cols = 0; v0 < V; v0 += cols) {
    cols = ChunkAt(V, v0);
    float* z = logits ? logits + static_cast<size_t>(N) * v0 : zw;  // kept for the backward, or scratch
    gemm.NT(z, h, w + static_cast<size_t>(v0) * C, N, cols, C, inv_t, 0.0f);
    const int first = v0 == 0, last = v0 + cols >= V;
    if (cols % 4 == 0)
      LmHeadForwardRows<true><<<N, kRowThreads, 0, s>>>(z, stats, targets, logprob, entropy, lse, cols, v0, first, last);
    else
      LmHeadForwardRows<false><<<N, kRowThreads, 0, s>>>(z, stats, targets, logprob, entropy, lse, cols, v0, first, last);
  }
  gemm.set_cast_reuse(false);
}

void LmHeadBackward(Gemm& gemm, float* dh, float* dw, const float* dlogprob, const float* dentropy,
                    const float* h, const float* w, const int32_t* targets, const float* lse,
                    const float* entropy, int N, int C, int V, float temperature, void* workspace,
                    cudaStream_t s, float* logits) {
  if (N <= 0 || C <= 0) return;
  if (V <= 0 || (dlogprob == nullptr && dentropy == nullptr)) {  // zero gradient: dh = 0, dw += 0
    cudaMemsetAsync(dh, 0, static_cast<size_t>(N) * C * sizeof(float), s);
    return;
  }
  float* const zw = static_cast<float*>(workspace);
  // With bf16 products the row kernel writes dz in bf16 only, beside z, and both products read that
  // copy (Gemm::AdoptCast; z keeps the logits, which nothing reads again): per logit 4 B written
  // and 4 + 2 B of a cast pass fewer than dz in f32 plus its cast. With f32 products dz replaces z.
  uint16_t* dz16 = gemm.precision() == GemmPrecision::kBF16
                       ? reinterpret_cast<uint16_t*>(static_cast<char*>(workspace) + LogitsBytes(N, V))
                       : nullptr;
  const float inv_t = 1.0f / temperature;
  // TN's h reuses the b slot's cast from the chunk before (nothing but dh, dw and z is written in
  // between; NT's output z drops any held or adopted copy of z: Gemm::set_cast_reuse). With the
  // forward's logits kept, the chunk's z is read from there and the NT is skipped.
  gemm.set_cast_reuse(true);
  for (int v0 = 0, cols = 0; v0 < V; v0 += cols) {
    cols = ChunkAt(V, v0);
    const float* wc = w + static_cast<size_t>(v0) * C;
    float* z = logits ? logits + static_cast<size_t>(N) * v0 : zw;
    if (!logits) gemm.NT(z, h, wc, N, cols, C, inv_t, 0.0f);  // the forward's z, recomputed
    if (cols % 4 == 0)
      LmHeadBackwardRows<true><<<N, kRowThreads, 0, s>>>(z, dz16, targets, lse, entropy, dlogprob, dentropy, cols, v0,
                                                         inv_t);
    else
      LmHeadBackwardRows<false><<<N, kRowThreads, 0, s>>>(z, dz16, targets, lse, entropy, dlogprob, dentropy, cols, v0,
                                                          inv_t);
    const uint64_t reads = gemm.adopted_reads();
    if (dz16) gemm.AdoptCast(z, static_cast<size_t>(N) * cols, dz16);
    gemm.NN(dh, z, wc, N, C, cols, 1.0f, v0 == 0 ? 0.0f : 1.0f);            // dh (=, +=) dz @ w_chunk
    gemm.TN(dw + static_cast<size_t>(v0) * C, z, h, cols, C, N, 1.0f, 1.0f);  // dw_chunk += dz^T @ h
    // dz in bf16 exists only as the adopted copy: a product that cast z would have read logits.
    if (dz16 && gemm.adopted_reads() != reads + 2) {
      std::fprintf(stderr, "aha lm-head backward: a product cast z instead of reading dz's bf16 copy\n");
      std::abort();
    }
  }
  gemm.set_cast_reuse(false);
}

size_t SampleWorkspace(int B, int V) {
  (void)B;
  (void)V;
  return 256;  // unused (everything lives in shared memory); nonzero so no caller allocates 0 bytes
}

void SampleRows(int32_t* tokens, float* logprobs, const float* logits, int B, int V, const float* temperature,
                const int32_t* top_k, const float* top_p, const uint64_t* seeds, const uint64_t* counters,
                void* workspace, cudaStream_t s) {
  (void)workspace;
  if (B <= 0 || V <= 0) return;
  SampleRowsKernel<<<B, kSampleThreads, 0, s>>>(tokens, logprobs, logits, V, temperature, top_k, top_p, seeds,
                                                counters, nullptr, 0);
}

void SampleRowsFromPartials(int32_t* tokens, float* logprobs, const float* logits, int B, int V,
                            const float* temperature, const int32_t* top_k, const float* top_p,
                            const uint64_t* seeds, const uint64_t* counters, const Partial* part, int parts,
                            cudaStream_t s) {
  if (B <= 0 || V <= 0) return;
  SampleRowsKernel<<<B, kSampleThreads, 0, s>>>(tokens, logprobs, logits, V, temperature, top_k, top_p, seeds,
                                                counters, part, parts);
}

}  // namespace aha::engine::cuda
