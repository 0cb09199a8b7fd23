// The decode step's plain products on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a):
// out[part][M, N] = a[M, K] @ w[N, K]^T over part's share of K, f32 out, bf16 operands (kernels.h,
// SmallProduct). They stand for cuBLAS in a decode step's q/k/v, o and down products (a few hundred
// rows) for one reason: they take part in programmatic dependent launch (PDL). cuBLAS's kernels
// neither start early nor let the kernel after them start early, so every product broke the chain
// of early starts that the norms, the fused MLP kernel and the decode attention can form
// (docs/kernels.md "Version 16"). Here the weights' first stages are copied before
// griddepcontrol.wait (weights are never written during a step), and the kernel lets its dependent
// start as soon as its own wait returns.
//
// Tiling: a block computes 128 rows x 64 columns over its K range: two consumer warpgroups of 64
// rows (m64n64k16, 32 f32 accumulators a thread) and a producer warp that copies a's 128 x 64 and
// w's 64 x 64 box of each K step with the tensor memory accelerator (128-byte swizzle, the layout
// of the wgmma descriptors) through kStages stages, as in mlp.cu: a full barrier per stage counts
// the bytes, an empty barrier takes one arrival per consumer warpgroup, and step kt's products run
// while step kt - 1's stage is released. Grid: (N / 64, M / 128, parts); part p takes K steps
// [p KT / parts, (p + 1) KT / parts). Rows past M and columns past N or K read zeros (the copy
// engine fills them) and store nothing.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "engine/cuda/kernels.h"
#include "engine/cuda/tma.h"
#include "engine/cuda/wgmma.h"

namespace aha::engine::cuda {

namespace {

constexpr int kBM = 128, kBN = 64, kBK = 64, kStages = 4;
constexpr int kConsumers = 256, kThreads = kConsumers + 32;  // two warpgroups + the producer warp
constexpr int kABytes = kBM * kBK * 2;                       // 16 KiB
constexpr int kBBytes = kBN * kBK * 2;                       // 8 KiB
constexpr int kStageBytes = kABytes + kBBytes;
constexpr int kSmem = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // + barriers, alignment
static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "swizzle atoms stay 1024-byte aligned");

__global__ void __launch_bounds__(kThreads, 1)
    SmallProductKernel(float* __restrict__ out, const __grid_constant__ CUtensorMap map_a,
                       const __grid_constant__ CUtensorMap map_w, int M, int N, int K, int parts) {
#ifdef AHA_WGMMA
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t bars = base + kStages * kStageBytes;  // full[s] at bars + 8 s, empty[s] after them
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (kStages + s); };
  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM, part = blockIdx.z;
  const int KT = (K + kBK - 1) / kBK;
  const int kt0 = part * KT / parts, nk = (part + 1) * KT / parts - kt0;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarInit(full(s), 1);
      MbarInit(empty(s), 2);  // the 2 consumer warpgroups
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
  }
  __syncthreads();

  const bool producer = tid == kConsumers;
  auto load_w = [&](int i) {
    const int s = i % kStages;
    MbarExpectBytes(full(s), kStageBytes);  // this step's a and w
    TmaLoad(base + s * kStageBytes + kABytes, &map_w, (kt0 + i) * kBK, n0, full(s));
  };
  // The weights' first stages before the wait: the kernel before this one never writes them.
  const int early = nk < kStages ? nk : kStages;
  if (producer)
    for (int i = 0; i < early; ++i) load_w(i);
  WaitForPriorKernel();  // a's writer is complete
  LetDependentsStart();

  if (tid >= kConsumers) {
    if (producer) {
      for (int i = 0; i < nk; ++i) {
        const int s = i % kStages;
        if (i >= early) {
          MbarWait(empty(s), ((i / kStages) - 1) & 1);
          load_w(i);
        }
        TmaLoad(base + s * kStageBytes, &map_a, (kt0 + i) * kBK, m0, full(s));
      }
    }
    __syncwarp();
    return;
  }
  const int wg = tid >> 7;
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  for (int i = 0; i < nk; ++i) {
    const int s = i % kStages;
    MbarWait(full(s), (i / kStages) & 1);
    const uint32_t sa = base + s * kStageBytes + wg * 64 * 128, sb = base + s * kStageBytes + kABytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)
      WgmmaSs64x64<0, 0>(acc, SwizzledDesc(sa + kk * 32), SwizzledDesc(sb + kk * 32), 1);
    WgmmaCommit();
    WgmmaWait<1>();  // step i's products run on while step i - 1's stage is released
    if (i > 0 && (tid & 127) == 0) MbarArrive(empty((i - 1) % kStages));
  }
  WgmmaWait<0>();
  FenceAccumulators(acc);
  // acc[j][c] of warp v, lane l: row 16 v + l / 4 + 8 (c / 2), column 8 j + 2 (l % 4) + c % 2 of the
  // warpgroup's 64 x 64.
  const int v = (tid & 127) >> 5, l = tid & 31;
  float* o = out + static_cast<size_t>(part) * M * N;
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {
    const int col = n0 + j * 8 + 2 * (l & 3);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + wg * 64 + v * 16 + (l >> 2) + 8 * half;
      if (row < M && col < N)
        *reinterpret_cast<float2*>(o + static_cast<size_t>(row) * N + col) =
            make_float2(acc[j][2 * half], acc[j][2 * half + 1]);
    }
  }
#else
  __trap();  // built without sm_90a: SmallProductSupported() said no
#endif
}

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha engine/cuda: %s: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

}  // namespace

bool SmallProductSupported(int M, int N, int K, int parts) {
#ifndef AHA_SM90A
  (void)M, (void)N, (void)K, (void)parts;
  return false;  // no sm_90a machine code in this build
#else
  return CurrentDeviceIsSm90() && TensorMapEncoder() != nullptr && M > 0 && N > 0 && N % 8 == 0 && K > 0 &&
         K % 8 == 0 && parts >= 1 && parts <= (K + kBK - 1) / kBK;
#endif
}

void SmallProduct(float* out, const uint16_t* a16, const uint16_t* w16, int M, int N, int K, int parts,
                  bool dependent, cudaStream_t s) {
  if (!SmallProductSupported(M, N, K, parts)) {
    std::fprintf(stderr, "aha: SmallProduct: unsupported shape M %d N %d K %d parts %d (N, K %% 8, sm_90)\n", M, N,
                 K, parts);
    std::abort();
  }
  // Set on every launch (a host call, no stream work), so that it holds on whichever device is current.
  Check(cudaFuncSetAttribute(SmallProductKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
        "SmallProduct shared memory");
  const CUtensorMap map_a = SwizzledRowsMap(a16, M, K, kBM, "SmallProduct"),
                    map_w = SwizzledRowsMap(w16, N, K, kBN, "SmallProduct");
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM, parts);
  Check(LaunchMaybeDependent(dependent, SmallProductKernel, grid, dim3(kThreads), kSmem, s, out, map_a, map_w, M,
                             N, K, parts),
        "SmallProductKernel launch");
}

}  // namespace aha::engine::cuda
