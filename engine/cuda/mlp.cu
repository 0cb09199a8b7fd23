// The gate/up product with SwiGLU in its epilogue, on Hopper's warpgroup tensor-core instructions
// (wgmma, sm_90a): h[M, I] = bf16(silu(bf16(g)) * bf16(u)) with [g | u] = a[M, K] @ w[2I, K]^T, so the
// product's [M, 2I] output never goes through device memory and the SwiGLU kernel is gone
// (kernels.h, GateUpSwiGlu). The roundings are those of the unfused kept path (the product's
// epilogue rounds gu to bf16, SwiGLU computes in f32 and rounds h), so only the f32 summation
// order differs from it.
//
// Tiling: a block computes BM rows x BN columns of h, i.e. BN gate rows and the BN matching up rows
// of w as one 2 BN-row B tile. Two consumer warpgroups each own BM / 2 rows as BM / 128 tiles of
// m64n(2 BN)k16 with f32 accumulators (BN registers a thread each), so a thread holds gate column c
// and up column c (registers r and r + BN / 2) together. The tile is chosen per shape (MlpTileFor):
// the fewest waves of blocks over the H200's 132 multiprocessors times a block's work, then the
// fewest bytes read. A decode step of Qwen2.5-0.5B (256 x 896 x 9728) gets 128 x 80: 61 x 2 = 122
// blocks in one wave (128 x 128 tiles of the plain product are 152: two waves); I = 8960
// (Qwen2.5-1.5B) 256 x 72, 125 blocks (128 x 80 gave 224: 1.7 waves); I = 3072 (Qwen3-0.6B) 128 x 48,
// 128 blocks (128 x 80 gave 78); 0.5B at 128 rows or fewer 128 x 40, 122 blocks (128 x 80 gave 61).
//
// A producer warp (a warpgroup with 256-row tiles) loads the block's BM rows of a and its B tile
// (the gate rows, then the up rows) with the tensor memory accelerator. K runs in steps of 64 (one
// 128-byte row, the swizzle atom) through up to 5 stages (as many as fit in shared memory). Each
// stage has a full barrier (the producer's expected bytes) and an empty barrier (one arrival from
// each consumer warpgroup). A consumer leaves step kt's products
// running while it waits for step kt - 1's and releases that stage: docs/kernels.md "Version 12"
// measured a drain per step as what made the first versions slower than cuBLAS + SwiGLU. Blocks
// work alone: clusters sharing w (1 x 2) or w and a (2 x 2) by multicast cut the L2 reads from
// 63 to 45 or 31 MB, but were no faster (1 x 2: 15.0 against 14.3 us) or much slower (2 x 2:
// 26 us), as every stage then waits for the slowest block of its cluster ("Version 13"). The
// copies use the 128-byte swizzle, the layout the wgmma descriptors read; rows past M, I or 2I
// are zero-filled by the copy engine. The kernel is launched dependent (PDL): the first stages'
// weight copies go out before griddepcontrol.wait, while the norm before it (which lets dependents start) still runs.
// The epilogue trades h's bf16 pairs within each lane quad so that every lane stores 16 bytes (8
// columns) at once: the fragments' own 4-byte pairs made each warp store touch 8 rows for 128
// bytes, and cost 1.5 us of the kernel's 14 (docs/kernels.md, version 18).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "engine/cuda/bf16.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/tma.h"
#include "engine/cuda/wgmma.h"

namespace aha::engine::cuda {

namespace {

constexpr int kMlpBK = 64, kMlpMaxStages = 5, kMlpMaxSmem = 227 * 1024;
constexpr int kMlpConsumers = 256;  // two warpgroups, then the producer

// A block of kTM x 128 rows (each warpgroup kTM tiles of 64) and kBN columns of h.
template <int kTM, int kBN>
struct MlpCfg {
  static constexpr int kBM = 128 * kTM;
  // The producer is one warp, or with two tiles a warpgroup that gives its registers to the
  // consumers (setmaxnreg: 2 x 128 x 232 + 128 x 40 <= 64K): their 2 kBN accumulators and the rest
  // pass the 168 a thread of three warpgroups.
  static constexpr int kThreads = kMlpConsumers + (kTM == 2 ? 128 : 32);
  static constexpr int kGroups = kBN / 8;                     // groups of 8 h columns in a block's tile
  static constexpr int kGroupsPadded = (kGroups + 3) / 4 * 4;  // to whole blocks of 4 (the quad transpose)
  static constexpr int kABytes = kBM * kMlpBK * 2;
  static constexpr int kBHalfBytes = kBN * kMlpBK * 2;  // kBN rows of w
  static constexpr int kStageBytes = kABytes + 2 * kBHalfBytes;
  static constexpr int kStages = (kMlpMaxSmem - 2048) / kStageBytes < kMlpMaxStages
                                     ? (kMlpMaxSmem - 2048) / kStageBytes
                                     : kMlpMaxStages;
  static constexpr int kSmem = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // + barriers, alignment
  static_assert(kBN % 8 == 0 && 2 * kBN <= 256 && (kTM == 1 || kTM == 2), "a wgmma n of 16 .. 256");
  static_assert(kABytes % 1024 == 0 && kBHalfBytes % 1024 == 0, "swizzle atoms stay 1024-byte aligned");
  static_assert(kStages >= 3 && kSmem <= kMlpMaxSmem, "at least three stages fit");
};

__device__ __forceinline__ float RoundBf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

template <int kTM, int kBN>
__global__ void __launch_bounds__(MlpCfg<kTM, kBN>::kThreads, 1)
    GateUpSwiGluKernel(__nv_bfloat16* __restrict__ h, const __grid_constant__ CUtensorMap map_a,
                       const __grid_constant__ CUtensorMap map_w, int M, int I, int K, bool wide_stores) {
#ifdef AHA_WGMMA
  using Cfg = MlpCfg<kTM, kBN>;
  constexpr int kStages = Cfg::kStages, kStageBytes = Cfg::kStageBytes, kABytes = Cfg::kABytes;
  constexpr int kGroups = Cfg::kGroups, kGroupsPadded = Cfg::kGroupsPadded;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t bars = base + kStages * kStageBytes;  // full[s] at bars + 8 s, empty[s] after them
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (kStages + s); };
  const int tid = threadIdx.x;
  const int m0 = blockIdx.y * Cfg::kBM, j0 = blockIdx.x * kBN, KT = K / kMlpBK;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarInit(full(s), 1);
      MbarInit(empty(s), 2);  // the 2 consumer warpgroups
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
  }
  __syncthreads();

  // The weights' first stages before the wait for the kernel before this one: launched dependent
  // (PDL) after a norm that lets its dependents start, the copies run under the norm. Only w is
  // read here, which the kernel before may not write (GateUpSwiGlu's contract, kernels.h).
  const bool producer = tid == kMlpConsumers;
  auto load_w = [&](int kt) {
    const int s = kt % kStages;
    MbarExpectBytes(full(s), kStageBytes);  // this step's a and both halves of w
    const uint32_t sb = base + s * kStageBytes + kABytes;
    TmaLoad(sb, &map_w, kt * kMlpBK, j0, full(s));                            // gate rows j0 ..
    TmaLoad(sb + Cfg::kBHalfBytes, &map_w, kt * kMlpBK, I + j0, full(s));  // up rows I + j0 ..
  };
  const int early = KT < kStages ? KT : kStages;
  if (producer)
    for (int kt = 0; kt < early; ++kt) load_w(kt);
  WaitForPriorKernel();  // the kernel before (a's writer) is complete
  LetDependentsStart();  // the down product after this one may copy its weights now

  if (tid >= kMlpConsumers) {  // the producer: one thread issues every copy
    if constexpr (kTM == 2) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (producer) {
      for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % kStages;
        if (kt >= early) {
          MbarWait(empty(s), ((kt / kStages) - 1) & 1);
          load_w(kt);
        }
        TmaLoad(base + s * kStageBytes, &map_a, kt * kMlpBK, m0, full(s));
      }
    }
    __syncwarp();
  } else {
    if constexpr (kTM == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int wg = tid >> 7;
    float acc[kTM][kBN];
#pragma unroll
    for (int t = 0; t < kTM; ++t)
#pragma unroll
      for (int i = 0; i < kBN; ++i) acc[t][i] = 0.0f;
    for (int kt = 0; kt < KT; ++kt) {
      const int s = kt % kStages;
      MbarWait(full(s), (kt / kStages) & 1);
      const uint32_t stage = base + s * kStageBytes;
      const uint32_t sa = stage + wg * kTM * 64 * 128, sb = stage + kABytes;
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kMlpBK / 16; ++kk)
#pragma unroll
        for (int t = 0; t < kTM; ++t)
          Wgmma64xN<2 * kBN>(acc[t], SwizzledDesc(sa + t * 64 * 128 + kk * 32), SwizzledDesc(sb + kk * 32), 1);
      WgmmaCommit();
      // Step kt's products run on while step kt - 1's are waited for and its stage released (the
      // last step's stage is never waited for).
      WgmmaWait<1>();
      if (kt > 0 && (tid & 127) == 0) MbarArrive(empty((kt - 1) % kStages));
    }
    WgmmaWait<0>();
#pragma unroll
    for (int t = 0; t < kTM; ++t) FenceAccumulators(acc[t]);
    // Fragment layout: register 4 i + 2 half + e of warp v, lane l is row 16 v + l / 4 + 8 half,
    // column 8 i + 2 (l % 4) + e of a 64 x 2 BN tile; columns BN.. are the up half. So the 4 lanes
    // of a quad hold the 8 columns of group i of a row, a bf16 pair each.
    const int v = (tid & 127) >> 5, l = tid & 31, q = l & 3;
#pragma unroll
    for (int t = 0; t < kTM; ++t) {
      uint32_t hp[2][kGroupsPadded / 4][4];  // h as bf16 pairs: [half][group / 4][group % 4]
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int i = 0; i < kGroups; ++i) {
          const int gr = 4 * i + 2 * half, ur = gr + 4 * kGroups;
          const float g0 = RoundBf16(acc[t][gr]), g1 = RoundBf16(acc[t][gr + 1]);
          const float u0 = RoundBf16(acc[t][ur]), u1 = RoundBf16(acc[t][ur + 1]);
          const __nv_bfloat162 p = __floats2bfloat162_rn(Swish(g0, u0), Swish(g1, u1));
          hp[half][i / 4][i % 4] = *reinterpret_cast<const uint32_t*>(&p);
        }
#pragma unroll
        for (int i = kGroups; i < kGroupsPadded; ++i) hp[half][i / 4][i % 4] = 0;
      }
      const int row0 = m0 + (wg * kTM + t) * 64 + v * 16 + (l >> 2);
      if (wide_stores) {
        // Each block of 4 groups transposed within the quad (QuadTranspose): lane q holds group 4 k
        // + q whole, 8 columns, one 16-byte store instead of four 4-byte ones from four lanes (a
        // warp's store then writes 64 contiguous bytes of each of its 8 rows, not 16).
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row0 + 8 * half;
#pragma unroll
          for (int k = 0; k < kGroupsPadded / 4; ++k) {
            uint32_t(&x)[4] = hp[half][k];
            QuadTranspose(x, q);
            const int col = j0 + 8 * (4 * k + q);
            if (row < M && 4 * k + q < kGroups && col < I)
              *reinterpret_cast<uint4*>(h + static_cast<size_t>(row) * I + col) = make_uint4(x[0], x[1], x[2], x[3]);
          }
        }
      } else {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row0 + 8 * half;
#pragma unroll
          for (int i = 0; i < kGroups; ++i) {
            const int col = j0 + i * 8 + 2 * q;
            if (row < M && col < I)
              *reinterpret_cast<uint32_t*>(h + static_cast<size_t>(row) * I + col) = hp[half][i / 4][i % 4];
          }
        }
      }
    }
  }
#else
  __trap();  // built without sm_90a: GateUpSwiGluSupported() said no
#endif
}

// The tiles the kernel is built for (MlpTileFor chooses among them).
constexpr MlpTile kMlpTiles[] = {{128, 40},  {128, 48}, {128, 56}, {128, 64}, {128, 72}, {128, 80},
                                 {128, 96},  {128, 112}, {128, 128}, {256, 72}, {256, 80}};

template <int kTM, int kBN>
void LaunchGateUpSwiGlu(bool early, bool wide, uint16_t* h16, const uint16_t* a16, const uint16_t* w16, int M,
                        int K, int I, cudaStream_t s) {
  using Cfg = MlpCfg<kTM, kBN>;
  // Set on every launch (a host call, no stream work), so that it holds on whichever device is current.
  CheckCall(cudaFuncSetAttribute(GateUpSwiGluKernel<kTM, kBN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 Cfg::kSmem),
            "GateUpSwiGlu shared memory");
  const CUtensorMap map_a = SwizzledRowsMap(a16, M, K, Cfg::kBM, "GateUpSwiGlu"),
                    map_w = SwizzledRowsMap(w16, 2 * I, K, kBN, "GateUpSwiGlu");
  const dim3 grid((I + kBN - 1) / kBN, (M + Cfg::kBM - 1) / Cfg::kBM);
  CheckCall(LaunchMaybeDependent(early, GateUpSwiGluKernel<kTM, kBN>, grid, dim3(Cfg::kThreads), Cfg::kSmem, s,
                                 reinterpret_cast<__nv_bfloat16*>(h16), map_a, map_w, M, I, K, wide),
            "GateUpSwiGluKernel launch");
}

}  // namespace

std::vector<MlpTile> GateUpSwiGluTiles() { return {std::begin(kMlpTiles), std::end(kMlpTiles)}; }

MlpTile MlpTileFor(int M, int I, int multiprocessors) {
  MlpTile best{};
  int64_t best_work = 0, best_bytes = 0;
  for (const MlpTile& t : kMlpTiles) {
    const int64_t blocks = int64_t{(I + t.cols - 1) / t.cols} * ((M + t.rows - 1) / t.rows);
    const int64_t waves = (blocks + multiprocessors - 1) / multiprocessors;
    const int64_t work = waves * t.rows * t.cols;          // a multiprocessor's share, in h elements
    const int64_t bytes = blocks * (t.rows + 2 * t.cols);  // rows of a and w read a K step, all blocks
    if (best.rows == 0 || work < best_work || (work == best_work && bytes < best_bytes))
      best = t, best_work = work, best_bytes = bytes;
  }
  return best;
}

bool GateUpSwiGluSupported(int M, int K, int I) {
#ifndef AHA_SM90A
  (void)M, (void)K, (void)I;
  return false;  // no sm_90a machine code in this build
#else
  return CurrentDeviceIsSm90() && TensorMapEncoder() != nullptr && M > 0 && K > 0 && K % kMlpBK == 0 && I > 0 &&
         I % 8 == 0;
#endif
}

void GateUpSwiGlu(uint16_t* h16, const uint16_t* a16, const uint16_t* w16, int M, int K, int I, cudaStream_t s,
                  MlpTile tile) {
  if (!GateUpSwiGluSupported(M, K, I)) {
    std::fprintf(stderr, "aha: GateUpSwiGlu: unsupported shape M %d K %d I %d (K %% 64, I %% 8, sm_90)\n", M, K, I);
    std::abort();
  }
  // AHA_MLP_TILE=RxC forces a tile the kernel is built for in place of the rule's (the A/B); anything
  // else is ignored with a line.
  static const MlpTile forced = [] {
    const char* e = std::getenv("AHA_MLP_TILE");
    if (!e || !*e) return MlpTile{};
    for (const MlpTile& t : kMlpTiles)
      if (std::to_string(t.rows) + "x" + std::to_string(t.cols) == e) return t;
    std::fprintf(stderr, "aha: AHA_MLP_TILE=%s is not a tile GateUpSwiGlu is built for; using its rule\n", e);
    return MlpTile{};
  }();
  if (tile.rows == 0) tile = forced;
  if (tile.rows == 0) {
    static const int multiprocessors = [] {
      int dev = 0, n = 0;
      CheckCall(cudaGetDevice(&dev), "GateUpSwiGlu device");
      CheckCall(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "GateUpSwiGlu multiprocessors");
      return n;
    }();
    tile = MlpTileFor(M, I, multiprocessors);
  }
  // Launched dependent (PDL): the kernel may start while the one before it runs, copying weights
  // until its griddepcontrol.wait (AHA_MLP_EARLY=0: an ordinary launch, the A/B).
  static const bool early = !EnvOff("AHA_MLP_EARLY");
  // h stored 16 bytes a lane after a transpose within each quad (AHA_MLP_WIDE_STORES=0: the
  // fragments' 4-byte pairs as they lie, the A/B).
  static const bool wide = !EnvOff("AHA_MLP_WIDE_STORES");
  auto is = [&](int rows, int cols) { return tile.rows == rows && tile.cols == cols; };
#define AHA_MLP_TILE_CASE(R, C) \
  if (is(R, C)) return LaunchGateUpSwiGlu<(R) / 128, C>(early, wide, h16, a16, w16, M, K, I, s);
  AHA_MLP_TILE_CASE(128, 40)
  AHA_MLP_TILE_CASE(128, 48)
  AHA_MLP_TILE_CASE(128, 56)
  AHA_MLP_TILE_CASE(128, 64)
  AHA_MLP_TILE_CASE(128, 72)
  AHA_MLP_TILE_CASE(128, 80)
  AHA_MLP_TILE_CASE(128, 96)
  AHA_MLP_TILE_CASE(128, 112)
  AHA_MLP_TILE_CASE(128, 128)
  AHA_MLP_TILE_CASE(256, 72)
  AHA_MLP_TILE_CASE(256, 80)
#undef AHA_MLP_TILE_CASE
  std::fprintf(stderr, "aha: GateUpSwiGlu: no kernel for a %d x %d tile\n", tile.rows, tile.cols);
  std::abort();
}

}  // namespace aha::engine::cuda
