// The decode step's lm-head product with the token draw in its epilogue (wgmma, sm_90a): for each row
// b of h16[M, C] the logits h w^T over the vocabulary w16[V, C] are computed tile by tile and consumed
// in registers, so the [M, V] f32 logits (155 MB a step at 256 x 151,936) are neither written by the
// product nor read back by the sampling kernel. Contract: kernels.h, LmHeadSample. The draw has
// SampleRows' distribution and log-prob (lmhead.cu, "Sampling": z = logits / T, weights exp(z)), not
// its draws: it is cut by tile.
//
// Tiling. A block computes 256 rows x 128 vocabulary columns at a time (a tile): two consumer
// warpgroups, each 128 rows as two m64n128k16 products with f32 accumulators (128 registers a
// thread), and a producer warpgroup whose one thread copies the block's 256 x 64 slice of h and
// 128 x 64 slice of w per K step with the tensor memory accelerator (128-byte swizzle, 4 stages of
// 48 KiB, full and empty barriers as in mlp.cu). The blocks are persistent: one per multiprocessor,
// each owning a run of the vocabulary's 128-column tiles (1,187 at V = 151,936: 9 a block on 132),
// and the producer runs on into the next tile's stages while the consumers work through a tile's
// epilogue. Rows past 256 take more blocks along y.
//
// Epilogue: each row of a tile lives in the 4 lanes of one quad, 32 columns a lane. Per (row, tile):
//  - sampling (T > 0, no top-k, no top-p): the tile's max m and S = sum exp(z - m) over the quad,
//    and one column j drawn with probability exp(z_j - m) / S by inverse CDF (uniform number t of
//    the row, t the tile: the lanes' prefix sums over the quad locate u S in one lane, which finds
//    the group of 8 of its values whose running total passes it and scans those 8);
//  - greedy (T <= 0): m, S and the tile's argmax (lowest id on ties), at T = 1;
//  - filtered (top-k or top-p): the raw logits are stored to logits[b, :] for SampleRows' filtered
//    path, and the partial draw is made as for a sampling row (the filtered path starts from the
//    full distribution's log-sum-exp and a draw from it).
// Each (row, tile) becomes a partial draw (m, S, its column j and z_j); SampleRowsFromPartials gives
// it the score log S + m + a Gumbel (uniform number T + t) when sampling, z_j when greedy, takes
// each row's best score (Gumbel-max: tile t with probability S_t e^m_t / sum, so j with probability
// exp(z_j) / sum exp(z)) and the log-sum-exp of all (lmhead.cu). The first version kept a weighted
// reservoir per lane and row across tiles, as SampleRows' threads do: its replacements (about ln n
// per reservoir, but some lane of a warp meets one in almost every group) and their code (346 KB)
// made the epilogue 12 us a tile against 8 us of products (docs/kernels.md, version 22).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "engine/cuda/kernels.h"
#include "engine/cuda/sample_internal.h"
#include "engine/cuda/tma.h"
#include "engine/cuda/wgmma.h"

namespace aha::engine::cuda {

namespace {

using namespace sample;  // NOLINT: the RNG and log-sum-exp of sample_internal.h

constexpr int kLsBM = 256, kLsBN = kPartialColumns, kLsBK = 64, kLsStages = 4;
constexpr int kLsConsumers = 256, kLsThreads = kLsConsumers + 128;  // two warpgroups + the producer's
constexpr int kLsABytes = kLsBM * kLsBK * 2;                      // 32 KiB: 256 rows of h
constexpr int kLsBBytes = kLsBN * kLsBK * 2;                      // 16 KiB: 128 rows of w
constexpr int kLsStageBytes = kLsABytes + kLsBBytes;
constexpr int kLsSmem = kLsStages * kLsStageBytes + 2 * kLsStages * 8 + 1024;  // + barriers, alignment
constexpr int kLsLane = kLsBN / 4;                                // a lane's values of a row and tile
static_assert(kLsABytes % 1024 == 0 && kLsBBytes % 1024 == 0, "swizzle atoms stay 1024-byte aligned");

enum RowMode : int { kDraw = 0, kGreedy = 1, kFiltered = 2, kAbsent = 3 };

__host__ __device__ __forceinline__ int VocabTiles(int V) { return (V + kLsBN - 1) / kLsBN; }

#ifdef AHA_WGMMA
// Exp2Ftz that the compiler may not merge with an equal one computed earlier: the draw's second pass
// recomputes the weights rather than keeping 32 of them live from the first.
__device__ __forceinline__ float Exp2FtzAgain(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The float just below x > 0.
__device__ __forceinline__ float Below(float x) { return __uint_as_float(__float_as_uint(x) - 1u); }

// A filtering row's 32 logits of the tile stored for SampleRows' filtered path: value k of the lane
// (a[4 (k / 2) + 2 half + k % 2]) at column c0 + 8 (k / 2) + k % 2. Pairs of columns as 8-byte
// stores (a quad's 4 lanes fill 32 contiguous bytes) where the row's start keeps them aligned and
// the tile lies inside the vocabulary, else one by one.
__device__ __forceinline__ void StoreRow(float* out, const float* a, int half, int c0, int V, bool edge) {
  if (!edge && ((reinterpret_cast<uintptr_t>(out) + 4u * c0) & 7u) == 0) {
#pragma unroll
    for (int i = 0; i < kLsLane / 2; ++i)
      *reinterpret_cast<float2*>(out + c0 + 8 * i) = make_float2(a[4 * i + 2 * half], a[4 * i + 2 * half + 1]);
    return;
  }
#pragma unroll
  for (int k = 0; k < kLsLane; ++k) {
    const int col = c0 + 8 * (k >> 1) + (k & 1);
    if (col < V) out[col] = a[4 * (k >> 1) + 2 * half + (k & 1)];
  }
}
#endif

__global__ void __launch_bounds__(kLsThreads, 1)
    LmHeadSampleKernel(Partial* __restrict__ part, float* __restrict__ logits,
                       const __grid_constant__ CUtensorMap map_h, const __grid_constant__ CUtensorMap map_w, int M,
                       int C, int V, const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                       const float* __restrict__ top_p, const uint64_t* __restrict__ seeds,
                       const uint64_t* __restrict__ counters) {
#ifdef AHA_WGMMA
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t bars = base + kLsStages * kLsStageBytes;  // full[s] at bars + 8 s, empty[s] after them
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (kLsStages + s); };
  const int tid = threadIdx.x, G = gridDim.x, T = VocabTiles(V);
  const int m0 = blockIdx.y * kLsBM, KT = (C + kLsBK - 1) / kLsBK;
  const int t0 = static_cast<int>(static_cast<long long>(blockIdx.x) * T / G);
  const int t1 = static_cast<int>(static_cast<long long>(blockIdx.x + 1) * T / G);
  const int steps = (t1 - t0) * KT;  // K steps of all of this block's tiles, one pipeline
  if (tid == 0) {
    for (int s = 0; s < kLsStages; ++s) {
      MbarInit(full(s), 1);
      MbarInit(empty(s), 2);  // the 2 consumer warpgroups
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
  }
  __syncthreads();

  // w's first stages go out before the wait for the kernel before this one (the final norm, which
  // writes h and lets its dependents start): w is a weight no kernel of the step writes.
  const bool producer = tid == kLsConsumers;
  auto load_w = [&](int g) {
    const int s = g % kLsStages, n0 = (t0 + g / KT) * kLsBN, k0 = (g % KT) * kLsBK;
    MbarExpectBytes(full(s), kLsStageBytes);  // this step's h and w
    TmaLoad(base + s * kLsStageBytes + kLsABytes, &map_w, k0, n0, full(s));
  };
  const int early = steps < kLsStages ? steps : kLsStages;
  if (producer)
    for (int g = 0; g < early; ++g) load_w(g);
  WaitForPriorKernel();

  if (tid >= kLsConsumers) {  // the producer warpgroup: one thread issues every copy
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");  // registers to the consumers
    if (producer) {
      for (int g = 0; g < steps; ++g) {
        const int s = g % kLsStages;
        if (g >= early) {
          MbarWait(empty(s), ((g / kLsStages) - 1) & 1);
          load_w(g);
        }
        TmaLoad(base + s * kLsStageBytes, &map_h, (g % KT) * kLsBK, m0, full(s));
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");  // 128 accumulators and the epilogue

  // Consumers. Fragment layout of an m64nN product: register 4 i + 2 half + e of warp v, lane l is
  // row 16 v + l / 4 + 8 half, column 8 i + 2 (l % 4) + e. This thread's rows: sub (which m64 of
  // the warpgroup's 128) and half, row slot ri = 2 sub + half; its value k of a row is register
  // 4 (k / 2) + 2 half + k % 2 of sub, column 8 (k / 2) + 2 q + k % 2 of the tile.
  const int wg = tid >> 7, v = (tid & 127) >> 5, l = tid & 31, q = l & 3;
  auto row_of = [&](int ri) { return m0 + wg * 128 + (ri >> 1) * 64 + v * 16 + (l >> 2) + 8 * (ri & 1); };
  float inv_t[4];
  uint32_t key[4];
  int mode[4];
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    const int row = row_of(ri);
    inv_t[ri] = 1.0f;
    key[ri] = 0u;
    mode[ri] = kAbsent;
    if (row < M) {
      const float t = temperature[row];
      const bool greedy = !(t > 0.0f);  // T <= 0 is greedy, as in engine/sampler.cc
      const int k = top_k[row];
      const bool filtered = !greedy && ((k > 0 && k < V) || top_p[row] < 1.0f);
      mode[ri] = greedy ? kGreedy : (filtered ? kFiltered : kDraw);
      inv_t[ri] = greedy ? 1.0f : 1.0f / t;
      key[ri] = RowKey(seeds[row], counters[row]);
    }
  }
  const unsigned quad = 0xFu << (l & ~3);  // this lane's quad, for the shuffles within it

  float acc[2][64];
  int g = 0;
  for (int t = t0; t < t1; ++t) {
    for (int kt = 0; kt < KT; ++kt, ++g) {
      const int s = g % kLsStages;
      MbarWait(full(s), (g / kLsStages) & 1);
      const uint32_t stage = base + s * kLsStageBytes, sb = stage + kLsABytes;
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kLsBK / 16; ++kk) {
#pragma unroll
        for (int sub = 0; sub < 2; ++sub)  // rows past M are zeros (the copy engine's fill): no branch
          Wgmma64xN<128>(acc[sub], SwizzledDesc(stage + (wg * 128 + sub * 64) * 128 + kk * 32),
                         SwizzledDesc(sb + kk * 32), kt > 0 || kk > 0);
      }
      WgmmaCommit();
      // Step g's products run on while step g - 1's are waited for and its stage released.
      WgmmaWait<1>();
      if (kt > 0 && (tid & 127) == 0) MbarArrive(empty((g - 1) % kLsStages));
    }
    WgmmaWait<0>();
    FenceAccumulators(acc[0]);
    FenceAccumulators(acc[1]);
    if ((tid & 127) == 0) MbarArrive(empty((g - 1) % kLsStages));  // the tile's last stage
    const int c0 = t * kLsBN + 2 * q;  // this lane's first column
    const bool edge = (t + 1) * kLsBN > V;  // the tile holds columns past the vocabulary
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
      const int sub = ri >> 1, half = ri & 1, md = mode[ri];  // md is the same in the quad
      if (md == kAbsent) continue;
      // A filtering row's logits go out for the filtered path, and its partial draw is made as a
      // sampling row's: the full distribution's log-sum-exp and a draw from it, which the filtered
      // path starts from (SampleRowsFromPartials).
      if (md == kFiltered) StoreRow(logits + static_cast<size_t>(row_of(ri)) * V, acc[sub], half, c0, V, edge);
      // z (scaled, NaN as -inf, past the vocabulary -inf) in place and the quad's max. Four
      // independent chains wherever a lane runs over its 32 values (k % 4 for the max; the groups
      // of 8 consecutive values for the sums), so that they overlap.
      float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
      if (edge) {
#pragma unroll
        for (int k = 0; k < kLsLane; ++k) {
          float& a = acc[sub][4 * (k >> 1) + 2 * half + (k & 1)];
          const int col = c0 + 8 * (k >> 1) + (k & 1);
          a = col < V ? fminf(fmaxf(Scaled(a, inv_t[ri]), -INFINITY), kZCap) : -INFINITY;
          mx[k & 3] = fmaxf(mx[k & 3], a);
        }
      } else {
#pragma unroll
        for (int k = 0; k < kLsLane; ++k) {
          float& a = acc[sub][4 * (k >> 1) + 2 * half + (k & 1)];
          a = fminf(fmaxf(Scaled(a, inv_t[ri]), -INFINITY), kZCap);
          mx[k & 3] = fmaxf(mx[k & 3], a);
        }
      }
      float m = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
      m = fmaxf(m, __shfl_xor_sync(quad, m, 1, 4));
      m = fmaxf(m, __shfl_xor_sync(quad, m, 2, 4));
      const size_t at = static_cast<size_t>(row_of(ri)) * T + t;
      if (!(m > -INFINITY)) {  // nothing drawable in this tile
        if (q == 0) part[at] = Partial{-INFINITY, 0.0f, -INFINITY, INT_MAX};
        continue;
      }
      // S = sum exp(z - m): per lane the sums p[g] of its groups of 8, in order, and their running
      // totals c[g]; then the lanes' ranges [excl, incl) of the quad's running total, which tile
      // [0, S) exactly.
      const float ml = m * kLog2e;
      float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < kLsLane; ++k)
        p[k >> 3] += Exp2Ftz(fmaf(acc[sub][4 * (k >> 1) + 2 * half + (k & 1)], kLog2e, -ml));
      const float cg[4] = {p[0], p[0] + p[1], (p[0] + p[1]) + p[2], ((p[0] + p[1]) + p[2]) + p[3]};
      const float sum = cg[3];
      float incl = sum;
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float y = __shfl_up_sync(quad, incl, o, 4);
        if (q >= o) incl += y;
      }
      float excl = __shfl_up_sync(quad, incl, 1, 4);
      if (q == 0) excl = 0.0f;
      const float S = __shfl_sync(quad, incl, 3, 4);
      if (md == kGreedy) {  // the lowest column holding the max
        int j = INT_MAX;
#pragma unroll
        for (int k = kLsLane - 1; k >= 0; --k)
          if (acc[sub][4 * (k >> 1) + 2 * half + (k & 1)] == m) j = c0 + 8 * (k >> 1) + (k & 1);
        j = min(j, __shfl_xor_sync(quad, j, 1, 4));
        j = min(j, __shfl_xor_sync(quad, j, 2, 4));
        if (q == 0) part[at] = Partial{m, S, m, j};
        continue;
      }
      // The column: u S in [0, S) falls in one lane's range (which then has a positive sum); that
      // lane finds the group of 8 whose running total first passes it, then the value within the
      // group by the same sums again. Each target is kept below its total, so that value exists,
      // and the running total rose there: a positive weight.
      float target = Uniform(key[ri], t) * S;
      if (!(target < S)) target = Below(S);
      if (target >= excl && target < incl) {
        const float want = fminf(target - excl, Below(sum));
        const int g = (want < cg[0]) ? 0 : (want < cg[1]) ? 1 : (want < cg[2]) ? 2 : 3;
        float zj = 0.0f;
        int j = INT_MAX;
#pragma unroll
        for (int gi = 0; gi < 4; ++gi) {
          if (gi != g) continue;
          const float in = fminf(want - (gi > 0 ? cg[gi - 1] : 0.0f), Below(p[gi]));
          float run = 0.0f;
#pragma unroll
          for (int k = 8 * gi; k < 8 * gi + 8; ++k) {
            const float z = acc[sub][4 * (k >> 1) + 2 * half + (k & 1)];
            run += Exp2FtzAgain(fmaf(z, kLog2e, -ml));
            const bool hit = j == INT_MAX && run > in;
            j = hit ? c0 + 8 * (k >> 1) + (k & 1) : j;
            zj = hit ? z : zj;
          }
        }
        part[at] = Partial{m, S, zj, j};  // its Gumbel score is SampleRowsFromPartials' to add
      }
    }
  }
#else
  __trap();  // built without sm_90a: LmHeadSampleSupported() said no
#endif
}

}  // namespace

bool LmHeadSampleSupported(int M, int C, int V) {
#ifndef AHA_SM90A
  (void)M, (void)C, (void)V;
  return false;  // no sm_90a machine code in this build
#else
  return CurrentDeviceIsSm90() && TensorMapEncoder() != nullptr && M > 0 && C > 0 && C % 8 == 0 && V > 0;
#endif
}

size_t LmHeadSampleWorkspace(int M, int V) {
  if (M <= 0 || V <= 0) return 0;
  return static_cast<size_t>(M) * VocabTiles(V) * sizeof(Partial);
}

void LmHeadSample(int32_t* tokens, float* logprobs, float* logits, const uint16_t* h16, const uint16_t* w16, int M,
                  int C, int V, const float* temperature, const int32_t* top_k, const float* top_p,
                  const uint64_t* seeds, const uint64_t* counters, void* workspace, int sms, cudaStream_t s) {
  if (M <= 0 || V <= 0) return;
  if (!LmHeadSampleSupported(M, C, V)) {
    std::fprintf(stderr, "aha: LmHeadSample: unsupported shape M %d C %d V %d (C %% 8, sm_90)\n", M, C, V);
    std::abort();
  }
  // Set on every launch (a host call, no stream work), so that it holds on whichever device is current.
  CheckCall(cudaFuncSetAttribute(LmHeadSampleKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kLsSmem),
            "LmHeadSample shared memory");
  const int T = VocabTiles(V), G = std::max(1, std::min(sms, T));  // persistent: one block a multiprocessor
  auto* part = static_cast<Partial*>(workspace);
  const CUtensorMap map_h = SwizzledRowsMap(h16, M, C, kLsBM, "LmHeadSample"),
                    map_w = SwizzledRowsMap(w16, V, C, kLsBN, "LmHeadSample");
  // Launched dependent (PDL): w's first stages are copied under the norm before it.
  CheckCall(LaunchMaybeDependent(true, LmHeadSampleKernel, dim3(G, (M + kLsBM - 1) / kLsBM), dim3(kLsThreads),
                                 kLsSmem, s, part, logits, map_h, map_w, M, C, V, temperature, top_k, top_p, seeds,
                                 counters),
            "LmHeadSampleKernel launch");
  SampleRowsFromPartials(tokens, logprobs, logits, M, V, temperature, top_k, top_p, seeds, counters, part, T, s);
}

}  // namespace aha::engine::cuda
