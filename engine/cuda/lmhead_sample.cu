// The decode step's lm-head product with the token draw in its epilogue (wgmma, sm_90a): for each row
// b of h16[M, C] the logits h w^T over the vocabulary w16[V, C] are computed tile by tile and consumed
// in registers, so the [M, V] f32 logits (155 MB a step at 256 x 151,936) are neither written by the
// product nor read back by the sampling kernel. Contract: kernels.h, LmHeadSample; the draw is
// SampleRows' (lmhead.cu, "Sampling"): the same z = logits / T, weights exp(z), reservoir with
// exponential jumps and Gumbel competition, so the token distribution and the log-prob are those of
// LinearForward + SampleRows, not the same draws (the reservoirs are cut differently).
//
// Tiling. A block computes 256 rows x 128 vocabulary columns at a time (a tile): two consumer
// warpgroups, each 128 rows as two m64n128k16 products with f32 accumulators (128 registers a
// thread), and a producer warp that copies the block's 256 x 64 slice of h and 128 x 64 slice of w
// per K step with the tensor memory accelerator (128-byte swizzle, 4 stages of 48 KiB, full and
// empty barriers as in mlp.cu). The blocks are persistent: one per multiprocessor, each owning a
// contiguous run of the vocabulary's 128-column tiles (1,187 at V = 151,936: 9 a block on 132), and
// the producer runs on into the next tile's stages while the consumers work through a tile's
// epilogue. Rows past 256 take more blocks along y.
//
// Epilogue, per row (each row of a tile lives in the 4 lanes of one quad, 32 columns a lane):
//  - sampling (T > 0, no top-k, no top-p): z = logits / T into the lane's reservoir for that row,
//    kept across the block's tiles (ReservoirAddN, 8 values per rescale);
//  - greedy (T <= 0): the running argmax (lowest id on ties) and log-sum-exp of the logits;
//  - filtered (top-k or top-p): the raw logits are stored to logits[b, :], and SampleRows' filtered
//    path draws from them afterwards.
// After the last tile the quad's four reservoirs merge (log-sum-exp; the draw by Gumbel-max on
// score = log W + Gumbel with uniform number V + 4 block + lane, so lane reservoirs of every block
// compete as SampleRows' threads do) and lane 0 writes the row's partial draw for this block.
// SampleRowsFromPartials then merges the blocks' partials per row (lmhead.cu).
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

using namespace sample;  // NOLINT: the RNG, log-sum-exp and reservoir of sample_internal.h

constexpr int kLsBM = 256, kLsBN = 128, kLsBK = 64, kLsStages = 4;
constexpr int kLsConsumers = 256, kLsThreads = kLsConsumers + 128;  // two warpgroups + the producer's
constexpr int kLsABytes = kLsBM * kLsBK * 2;                      // 32 KiB: 256 rows of h
constexpr int kLsBBytes = kLsBN * kLsBK * 2;                      // 16 KiB: 128 rows of w
constexpr int kLsStageBytes = kLsABytes + kLsBBytes;
constexpr int kLsSmem = kLsStages * kLsStageBytes + 2 * kLsStages * 8 + 1024;  // + barriers, alignment
static_assert(kLsABytes % 1024 == 0 && kLsBBytes % 1024 == 0, "swizzle atoms stay 1024-byte aligned");

enum RowMode : int { kDraw = 0, kGreedy = 1, kFiltered = 2, kAbsent = 3 };

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha engine/cuda: %s: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

__host__ __device__ __forceinline__ int VocabTiles(int V) { return (V + kLsBN - 1) / kLsBN; }
int Blocks(int V, int sms) { return std::max(1, std::min(sms, VocabTiles(V))); }
size_t PartialBytes(int M, int G) { return (static_cast<size_t>(M) * G * sizeof(Partial) + 255) / 256 * 256; }

#ifdef AHA_WGMMA
// d[64 x 128] (+)= A[64 x 16] B[128 x 16]^T, both from shared memory (descriptors), f32 accumulators
// in the m64nNk16 fragment layout; scale_d 0 overwrites d.
__device__ __forceinline__ void Wgmma64x128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
      "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
}

// The log-sum-exp state (m, s) of r with z[0 .. N) added (NaN as -inf), one rescale per N as
// ReservoirAddN; the scalar LseAdd while the max is not finite.
template <int N>
__device__ __forceinline__ void LseAddN(Reservoir& r, const float (&z)[N]) {
  float g = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) g = fmaxf(g, z[j]);
  if (!(r.m > -INFINITY && r.m < INFINITY && g < INFINITY)) {
#pragma unroll
    for (int j = 0; j < N; ++j) LseAdd(r.m, r.s, z[j]);
    return;
  }
  if (g > r.m) {
    r.s *= Exp2Ftz((r.m - g) * kLog2e);
    r.m = g;
  }
  const float ml = r.m * kLog2e;
#pragma unroll
  for (int j = 0; j < N; ++j) r.s += Exp2Ftz(fmaf(z[j], kLog2e, -ml));
}
#endif

__global__ void __launch_bounds__(kLsThreads, 1)
    LmHeadSampleKernel(Partial* __restrict__ part, int32_t* __restrict__ part_pick, float* __restrict__ logits,
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
  const int tid = threadIdx.x, G = gridDim.x;
  const int m0 = blockIdx.y * kLsBM, KT = (C + kLsBK - 1) / kLsBK;
  const int T = VocabTiles(V);
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
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");  // 128 accumulators + 4 rows' draws

  // Consumers. Fragment layout of an m64nN product: register 4 i + 2 half + e of warp v, lane l is
  // row 16 v + l / 4 + 8 half, column 8 i + 2 (l % 4) + e. This thread's rows: sub (which m64 of
  // the warpgroup's 128) and half, row slot ri = 2 sub + half.
  const int wg = tid >> 7, v = (tid & 127) >> 5, l = tid & 31, q = l & 3;
  auto row_of = [&](int ri) { return m0 + wg * 128 + (ri >> 1) * 64 + v * 16 + (l >> 2) + 8 * (ri & 1); };
  Reservoir r[4];
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
      if (greedy) r[ri].zp = -INFINITY;  // the greedy row's best logit so far (pick: its id)
    }
  }
  float acc[2][64];
  int g = 0;
  for (int lt = t0; lt < t1; ++lt) {
    for (int kt = 0; kt < KT; ++kt, ++g) {
      const int s = g % kLsStages;
      MbarWait(full(s), (g / kLsStages) & 1);
      const uint32_t stage = base + s * kLsStageBytes, sb = stage + kLsABytes;
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kLsBK / 16; ++kk) {
#pragma unroll
        for (int sub = 0; sub < 2; ++sub)  // rows past M are zeros (the copy engine's fill): no branch
          Wgmma64x128(acc[sub], SwizzledDesc(stage + (wg * 128 + sub * 64) * 128 + kk * 32),
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
    const int n0 = lt * kLsBN;
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
      const int sub = ri >> 1, half = ri & 1;
      if (mode[ri] == kDraw) {
#pragma unroll
        for (int grp = 0; grp < 4; ++grp) {
          float z[8];
          int id[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int i = 4 * grp + j / 2, e = j & 1, col = n0 + 8 * i + 2 * q + e;
            id[j] = col;
            z[j] = col < V ? fmaxf(Scaled(acc[sub][4 * i + 2 * half + e], inv_t[ri]), -INFINITY) : -INFINITY;
          }
          ReservoirAddN(r[ri], z, id, key[ri]);
        }
      } else if (mode[ri] == kGreedy) {
#pragma unroll
        for (int grp = 0; grp < 4; ++grp) {
          float z[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int i = 4 * grp + j / 2, e = j & 1, col = n0 + 8 * i + 2 * q + e;
            const float x = acc[sub][4 * i + 2 * half + e];
            z[j] = col < V ? fmaxf(x, -INFINITY) : -INFINITY;
            if (col < V && Better(x, col, r[ri].zp, r[ri].pick)) {
              r[ri].zp = x;
              r[ri].pick = col;
            }
          }
          LseAddN(r[ri], z);
        }
      } else if (mode[ri] == kFiltered) {
        float* out = logits + static_cast<size_t>(row_of(ri)) * V;
#pragma unroll
        for (int i = 0; i < kLsBN / 8; ++i) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n0 + 8 * i + 2 * q + e;
            if (col < V) out[col] = acc[sub][4 * i + 2 * half + e];
          }
        }
      }
    }
  }

  // The block's partial draw of each row: the quad's reservoirs merged, written by lane 0.
  const int uid = V + 4 * static_cast<int>(blockIdx.x) + q;
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    float m = r[ri].m, s = r[ri].s, score = -INFINITY, zp = r[ri].zp;
    int pick = r[ri].pick;
    if (mode[ri] == kDraw && r[ri].s > 0.0f) {
      score = m + logf(s) - logf(-logf(Uniform(key[ri], uid)));
    } else if (mode[ri] == kGreedy) {
      score = zp;
    } else {
      m = -INFINITY, s = 0.0f, pick = INT_MAX;
    }
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      const float sc2 = __shfl_xor_sync(0xffffffffu, score, o), zp2 = __shfl_xor_sync(0xffffffffu, zp, o);
      const int p2 = __shfl_xor_sync(0xffffffffu, pick, o);
      LseMerge(m, s, m2, s2);
      if (Better(sc2, p2, score, pick)) {
        score = sc2;
        pick = p2;
        zp = zp2;
      }
    }
    const int row = row_of(ri);
    if (q == 0 && row < M) {
      part[static_cast<size_t>(row) * G + blockIdx.x] = Partial{m, s, score, zp};
      part_pick[static_cast<size_t>(row) * G + blockIdx.x] = pick;
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

size_t LmHeadSampleWorkspace(int M, int V, int sms) {
  if (M <= 0 || V <= 0) return 0;
  const int G = Blocks(V, sms);
  return PartialBytes(M, G) + (static_cast<size_t>(M) * G * sizeof(int32_t) + 255) / 256 * 256;
}

void LmHeadSample(int32_t* tokens, float* logprobs, float* logits, const uint16_t* h16, const uint16_t* w16, int M,
                  int C, int V, const float* temperature, const int32_t* top_k, const float* top_p,
                  const uint64_t* seeds, const uint64_t* counters, void* workspace, int sms, cudaStream_t s) {
  if (M <= 0 || V <= 0) return;
  if (!LmHeadSampleSupported(M, C, V)) {
    std::fprintf(stderr, "aha: LmHeadSample: unsupported shape M %d C %d V %d (C %% 8, sm_90)\n", M, C, V);
    std::abort();
  }
  Check(cudaFuncSetAttribute(LmHeadSampleKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kLsSmem),
        "LmHeadSample shared memory");
  const int G = Blocks(V, sms);
  auto* part = static_cast<Partial*>(workspace);
  auto* pick = reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + PartialBytes(M, G));
  const CUtensorMap map_h = SwizzledRowsMap(h16, M, C, kLsBM, "LmHeadSample"),
                    map_w = SwizzledRowsMap(w16, V, C, kLsBN, "LmHeadSample");
  const dim3 grid(G, (M + kLsBM - 1) / kLsBM);
  Check(LaunchMaybeDependent(true, LmHeadSampleKernel, grid, dim3(kLsThreads), kLsSmem, s, part, pick, logits, map_h,
                             map_w, M, C, V, temperature, top_k, top_p, seeds, counters),
        "LmHeadSampleKernel launch");
  SampleRowsFromPartials(tokens, logprobs, logits, M, V, temperature, top_k, top_p, seeds, counters, part, pick, G,
                         s);
}

}  // namespace aha::engine::cuda
