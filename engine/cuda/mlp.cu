// The gate/up product with SwiGLU in its epilogue, on Hopper's warpgroup tensor-core instructions
// (wgmma, sm_90a): h[M, I] = bf16(silu(bf16(g)) * bf16(u)) with [g | u] = a[M, K] @ w[2I, K]^T, so the
// product's [M, 2I] output never goes through device memory and the SwiGLU kernel is gone
// (kernels.h, GateUpSwiGlu). The roundings are those of the unfused kept path (the product's
// epilogue rounds gu to bf16, SwiGLU computes in f32 and rounds h), so only the f32 summation
// order differs from it.
//
// Tiling, for a decode step's 256 x 896 x 9728: a block computes 128 rows x 80 columns of h, i.e.
// 80 gate rows and the 80 matching up rows of w as one 160-row B tile, so 61 x 2 = 122 blocks fill
// the H200's 132 multiprocessors in one wave (128 x 128 tiles of the plain product are 152: two
// waves). Two consumer warpgroups each own 64 rows: m64n160k16 with f32 accumulators (80 registers
// a thread), so a thread holds gate column c and up column c (registers r and r + 40) together.
//
// A producer warp loads the block's 128 rows of a and its B tile (the gate rows, then the up rows)
// with the tensor memory accelerator. K runs in steps of 64 (one 128-byte row, the swizzle atom)
// through kMlpStages stages. Each stage has a full barrier (the producer's expected bytes) and an
// empty barrier (one arrival from each consumer warpgroup). A consumer leaves step kt's products
// running while it waits for step kt - 1's and releases that stage: docs/kernels.md "Version 12"
// measured a drain per step as what made the first versions slower than cuBLAS + SwiGLU. Blocks
// work alone: clusters sharing w (1 x 2) or w and a (2 x 2) by multicast cut the L2 reads from
// 63 to 45 or 31 MB, but were no faster (1 x 2: 15.0 against 14.3 us) or much slower (2 x 2:
// 26 us), as every stage then waits for the slowest block of its cluster ("Version 13"). The
// copies use the 128-byte swizzle, the layout the wgmma descriptors read; rows past M, I or 2I
// are zero-filled by the copy engine. The kernel is launched dependent (PDL): the first stages' weight copies go out
// before griddepcontrol.wait, while the norm before it (which lets dependents start) still runs.
// The epilogue trades h's bf16 pairs within each lane quad so that every lane stores 16 bytes (8
// columns) at once: the fragments' own 4-byte pairs made each warp store touch 8 rows for 128
// bytes, and cost 1.5 us of the kernel's 14 (docs/kernels.md, version 18).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "engine/cuda/bf16.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/tma.h"
#include "engine/cuda/wgmma.h"

namespace aha::engine::cuda {

namespace {

constexpr int kMlpBM = 128, kMlpBN = 80, kMlpBK = 64, kMlpStages = 5;
constexpr int kMlpGroups = kMlpBN / 8;              // groups of 8 h columns in a block's tile
constexpr int kMlpGroupsPadded = (kMlpGroups + 3) / 4 * 4;  // to whole blocks of 4 (the quad transpose)
constexpr int kMlpConsumers = 256, kMlpThreads = kMlpConsumers + 32;  // two warpgroups + the producer warp
constexpr int kMlpABytes = kMlpBM * kMlpBK * 2;                       // 16 KiB
constexpr int kMlpBHalfBytes = kMlpBN * kMlpBK * 2;                   // 10 KiB: 80 rows of w
constexpr int kMlpStageBytes = kMlpABytes + 2 * kMlpBHalfBytes;       // a multiple of 1024
constexpr int kMlpSmem = kMlpStages * kMlpStageBytes + 2 * kMlpStages * 8 + 1024;  // + barriers, alignment
static_assert(kMlpABytes % 1024 == 0 && kMlpBHalfBytes % 1024 == 0, "swizzle atoms stay 1024-byte aligned");

__device__ __forceinline__ float RoundBf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

__global__ void __launch_bounds__(kMlpThreads, 1)
    GateUpSwiGluKernel(__nv_bfloat16* __restrict__ h, const __grid_constant__ CUtensorMap map_a,
                       const __grid_constant__ CUtensorMap map_w, int M, int I, int K, bool wide_stores) {
#ifdef AHA_WGMMA
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t bars = base + kMlpStages * kMlpStageBytes;  // full[s] at bars + 8 s, empty[s] after them
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (kMlpStages + s); };
  const int tid = threadIdx.x;
  const int m0 = blockIdx.y * kMlpBM, j0 = blockIdx.x * kMlpBN, KT = K / kMlpBK;
  if (tid == 0) {
    for (int s = 0; s < kMlpStages; ++s) {
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
    const int s = kt % kMlpStages;
    MbarExpectBytes(full(s), kMlpStageBytes);  // this step's a and both halves of w
    const uint32_t sb = base + s * kMlpStageBytes + kMlpABytes;
    TmaLoad(sb, &map_w, kt * kMlpBK, j0, full(s));                       // gate rows j0 ..
    TmaLoad(sb + kMlpBHalfBytes, &map_w, kt * kMlpBK, I + j0, full(s));  // up rows I + j0 ..
  };
  const int early = KT < kMlpStages ? KT : kMlpStages;
  if (producer)
    for (int kt = 0; kt < early; ++kt) load_w(kt);
  WaitForPriorKernel();  // the kernel before (a's writer) is complete
  LetDependentsStart();  // the down product after this one may copy its weights now

  if (tid >= kMlpConsumers) {  // the producer warp: one thread issues every copy
    if (producer) {
      for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % kMlpStages;
        if (kt >= early) {
          MbarWait(empty(s), ((kt / kMlpStages) - 1) & 1);
          load_w(kt);
        }
        TmaLoad(base + s * kMlpStageBytes, &map_a, kt * kMlpBK, m0, full(s));
      }
    }
    __syncwarp();
  } else {
    const int wg = tid >> 7;
    float acc[80];
#pragma unroll
    for (int i = 0; i < 80; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < KT; ++kt) {
      const int s = kt % kMlpStages;
      MbarWait(full(s), (kt / kMlpStages) & 1);
      const uint32_t stage = base + s * kMlpStageBytes;
      const uint32_t sa = stage + wg * 64 * 128, sb = stage + kMlpABytes;
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kMlpBK / 16; ++kk)
        Wgmma64x160(acc, SwizzledDesc(sa + kk * 32), SwizzledDesc(sb + kk * 32), 1);
      WgmmaCommit();
      // Step kt's products run on while step kt - 1's are waited for and its stage released (the
      // last step's stage is never waited for).
      WgmmaWait<1>();
      if (kt > 0 && (tid & 127) == 0) MbarArrive(empty((kt - 1) % kMlpStages));
    }
    WgmmaWait<0>();
    FenceAccumulators(acc);
    // Fragment layout: register 4 i + 2 half + e of warp v, lane l is row 16 v + l / 4 + 8 half,
    // column 8 i + 2 (l % 4) + e of the warpgroup's 64 x 160; columns 80.. are the up half. So the
    // 4 lanes of a quad hold the 8 columns of group i of a row, a bf16 pair each.
    const int v = (tid & 127) >> 5, l = tid & 31, q = l & 3;
    uint32_t hp[2][kMlpGroupsPadded / 4][4];  // h as bf16 pairs: [half][group / 4][group % 4]
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int i = 0; i < kMlpGroups; ++i) {
        const int gr = 4 * i + 2 * half, ur = gr + 4 * kMlpGroups;
        const float g0 = RoundBf16(acc[gr]), g1 = RoundBf16(acc[gr + 1]);
        const float u0 = RoundBf16(acc[ur]), u1 = RoundBf16(acc[ur + 1]);
        const __nv_bfloat162 p = __floats2bfloat162_rn(Swish(g0, u0), Swish(g1, u1));
        hp[half][i / 4][i % 4] = *reinterpret_cast<const uint32_t*>(&p);
      }
#pragma unroll
      for (int i = kMlpGroups; i < kMlpGroupsPadded; ++i) hp[half][i / 4][i % 4] = 0;
    }
    if (wide_stores) {
      // Each block of 4 groups transposed within the quad (QuadTranspose): lane q holds group 4 k + q
      // whole, 8 columns, one 16-byte store instead of four 4-byte ones from four lanes (a warp's
      // store then writes 64 contiguous bytes of each of its 8 rows, not 16).
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + wg * 64 + v * 16 + (l >> 2) + 8 * half;
#pragma unroll
        for (int k = 0; k < kMlpGroupsPadded / 4; ++k) {
          uint32_t(&x)[4] = hp[half][k];
          QuadTranspose(x, q);
          const int col = j0 + 8 * (4 * k + q);
          if (row < M && 4 * k + q < kMlpGroups && col < I)
            *reinterpret_cast<uint4*>(h + static_cast<size_t>(row) * I + col) = make_uint4(x[0], x[1], x[2], x[3]);
        }
      }
    } else {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + wg * 64 + v * 16 + (l >> 2) + 8 * half;
#pragma unroll
        for (int i = 0; i < kMlpGroups; ++i) {
          const int col = j0 + i * 8 + 2 * q;
          if (row < M && col < I)
            *reinterpret_cast<uint32_t*>(h + static_cast<size_t>(row) * I + col) = hp[half][i / 4][i % 4];
        }
      }
    }
  }
#else
  __trap();  // built without sm_90a: GateUpSwiGluSupported() said no
#endif
}

}  // namespace

bool GateUpSwiGluSupported(int M, int K, int I) {
#ifndef AHA_SM90A
  (void)M, (void)K, (void)I;
  return false;  // no sm_90a machine code in this build
#else
  return CurrentDeviceIsSm90() && TensorMapEncoder() != nullptr && M > 0 && K > 0 && K % kMlpBK == 0 && I > 0 &&
         I % 8 == 0;
#endif
}

void GateUpSwiGlu(uint16_t* h16, const uint16_t* a16, const uint16_t* w16, int M, int K, int I, cudaStream_t s) {
  if (!GateUpSwiGluSupported(M, K, I)) {
    std::fprintf(stderr, "aha: GateUpSwiGlu: unsupported shape M %d K %d I %d (K %% 64, I %% 8, sm_90)\n", M, K, I);
    std::abort();
  }
  // Set on every launch (a host call, no stream work), so that it holds on whichever device is current.
  CheckCall(cudaFuncSetAttribute(GateUpSwiGluKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMlpSmem),
            "GateUpSwiGlu shared memory");
  const CUtensorMap map_a = SwizzledRowsMap(a16, M, K, kMlpBM, "GateUpSwiGlu"),
                    map_w = SwizzledRowsMap(w16, 2 * I, K, kMlpBN, "GateUpSwiGlu");
  const int row_blocks = (M + kMlpBM - 1) / kMlpBM;
  const dim3 grid((I + kMlpBN - 1) / kMlpBN, row_blocks);
  // Launched dependent (PDL): the kernel may start while the one before it runs, copying weights
  // until its griddepcontrol.wait (AHA_MLP_EARLY=0: an ordinary launch, the A/B).
  static const bool early = [] {
    const char* e = std::getenv("AHA_MLP_EARLY");
    return !(e && e[0] == '0');
  }();
  // h stored 16 bytes a lane after a transpose within each quad (AHA_MLP_WIDE_STORES=0: the
  // fragments' 4-byte pairs as they lie, the A/B).
  static const bool wide = [] {
    const char* e = std::getenv("AHA_MLP_WIDE_STORES");
    return !(e && e[0] == '0');
  }();
  CheckCall(LaunchMaybeDependent(early, GateUpSwiGluKernel, grid, dim3(kMlpThreads), kMlpSmem, s,
                                 reinterpret_cast<__nv_bfloat16*>(h16), map_a, map_w, M, I, K, wide),
            "GateUpSwiGluKernel launch");
}

}  // namespace aha::engine::cuda
