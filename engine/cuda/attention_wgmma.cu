// The training attention's forward on warpgroup tensor-core instructions (wgmma, sm_90a), for head
// width 64 with bf16 k and v: the contract of AttentionForwardTCBf16Kv (kernels.h), which sends its
// D = 64 calls here when AttentionForwardWgmmaSupported(). The operands are rounded as in
// AttnFwdTcKernel (attention_tc.cu): q pre-scaled by scale * log2 e and rounded to bf16 in
// registers, k and v bf16, P rounded to bf16 before P V, f32 accumulators and softmax statistics.
//
// Block = 128 consecutive rows of the packed axis x one query head, two warpgroups of 64 rows; warp
// w owns rows 16 w .. 16 w + 15 (warpgroup w / 4). Per 64-key tile and warpgroup:
//   S = Q K^T: 4 x wgmma m64n64k16, A = the warp's Q fragments from registers (the mma.m16n8k16 A
//     layout, which is wgmma's register layout for A), B = the K tile from shared memory (K-major);
//   mask and online softmax on the accumulators, whose layout is that of eight mma.m16n8k16 C
//     fragments (attention_internal.h's OnlineSoftmaxStep, unchanged);
//   O += P V: 4 x wgmma m64n64k16, A = P repacked to bf16 in registers, B = the V tile read N-major
//     (imm-trans-b: the tile is [keys][d] with d contiguous).
// K and V tiles are copied with cp.async into the 128-byte swizzled layout the descriptors read
// (key r's 16-byte chunk c at r * 128 + (c ^ (r & 7)) * 16, 1024-byte aligned tiles), two buffers,
// one barrier per tile. A warpgroup skips a tile none of its rows sees and masks only a tile some of
// its rows see in part. Grid (Hq, row blocks), the row blocks from the last (heavy blocks first), as
// in AttnFwdTcKernel. The products' sums come out as mma.sync's: on the H200 the result equals
// AttnFwdTcKernel's bit for bit (AttentionTc.MatchesCpuReference checks it).
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "engine/cuda/attention_internal.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/wgmma.h"

namespace aha::engine::cuda {
namespace {

constexpr int kWgD = 64;
constexpr int kWgRows = 128;  // two warpgroups of 64 rows
constexpr int kWgKeys = 64;
constexpr int kWgThreads = 256;
constexpr int kWgTileBytes = kWgKeys * kWgD * 2;                          // [64 keys][64] bf16: 8 KiB
constexpr int kWgSmem = 4 * kWgTileBytes + kWgRows * sizeof(int) + 1024;  // 2 x (K, V), row starts, alignment


// The 64-key tile of k and v (rows row0 .. row0 + 63 of head kvh; rows >= N zero-filled) into the
// 128-byte swizzled layout at dst (K) and dst + kWgTileBytes (V): key r's 16-byte chunk c at
// r * 128 + (c ^ (r & 7)) * 16. 512 chunks each, two per thread of 256. Not committed.
__device__ __forceinline__ void CopyKvTile(unsigned char* dst, const uint16_t* __restrict__ k,
                                           const uint16_t* __restrict__ v, int row0, int N, int Hkv, int kvh,
                                           int tid) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int f = tid + it * kWgThreads;
    const int rr = f >> 3, c = f & 7;
    const int key = row0 + rr;
    const bool valid = key < N;
    const size_t src = (static_cast<size_t>(valid ? key : 0) * Hkv + kvh) * kWgD + c * 8;
    const int at = rr * 128 + ((c ^ (rr & 7)) << 4);
    CpAsync16(dst + at, k + src, valid);
    CpAsync16(dst + kWgTileBytes + at, v + src, valid);
  }
}

__global__ void __launch_bounds__(kWgThreads, 2)
    AttnFwdWgmmaKernel(float* __restrict__ out, uint16_t* __restrict__ out16, float* __restrict__ lse,
                       const float* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                       const int32_t* __restrict__ cu, int S, int N, int Hq, int Hkv, float qscale) {
#ifdef AHA_WGMMA
  constexpr int KK = kWgD / 16, DN = kWgD / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u);
  const uint32_t base = SmemAddr(smem);
  int* row_ss = reinterpret_cast<int*>(smem + 4 * kWgTileBytes);  // INT_MAX past N
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;
  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int r0 = (gridDim.y - 1 - blockIdx.y) * kWgRows;
  const int r_last = min(r0 + kWgRows, N) - 1;

  // The 64-key tile at row0 into buffer b (K, then V).
  auto issue = [&](int row0, int b) {
    CopyKvTile(smem + b * 2 * kWgTileBytes, k, v, row0, N, Hkv, kvh, tid);
    CpAsyncCommit();
  };
  // This thread's copies have landed; the tensor cores (the async proxy) read them after the barrier.
  auto landed = [] {
    CpAsyncWaitAll();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  };

  if (tid < kWgRows) {
    const int r = r0 + tid;
    row_ss[tid] = r < N ? __ldg(cu + FindSeq(cu, S, r)) : INT_MAX;
  }
  const int wr0 = r0 + warp * 16;
  const int rowA = wr0 + g, rowB = rowA + 8;
  uint32_t qa[KK][4];
  LoadAFragsF32<KK>(qa, rowA < N ? q + (static_cast<size_t>(rowA) * Hq + h) * kWgD : nullptr,
                    rowB < N ? q + (static_cast<size_t>(rowB) * Hq + h) * kWgD : nullptr, t, qscale);
  __syncthreads();  // row_ss

  // The warpgroup's rows r0 + 64 wg .. + 63: the smallest start among them (INT_MAX: none) and the last.
  const int g_ss0 = row_ss[64 * wg];
  const int g_last = min(r0 + 64 * wg + 63, N - 1);
  const int k_begin = (row_ss[0] / kWgKeys) * kWgKeys;  // row r0 < N, so row_ss[0] is a real start

  issue(k_begin, 0);
  landed();
  __syncthreads();

  float o[DN][4];
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
    for (int c = 0; c < 4; ++c) o[dn][c] = 0.0f;
  }
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;

  int buf = 0;
  for (int kt = k_begin; kt <= r_last; kt += kWgKeys, buf ^= 1) {
    const bool has_next = kt + kWgKeys <= r_last;
    if (has_next) issue(kt + kWgKeys, buf ^ 1);  // the other buffer: read by nobody since the last barrier
    const uint32_t kb = base + buf * 2 * kWgTileBytes, vb = kb + kWgTileBytes;

    // The warpgroup's products and softmax step on this tile, compiled once with the mask and once
    // without. Not one body with the mask in a branch: that version gave wrong rows on the H200 even
    // when every warp took the branch (a conditional block between the S product's wait and the P V
    // product's fence; the same with the branch warpgroup-uniform or followed by __syncwarp).
    auto tile = [&](auto masked) {
      float s[DN][4];
      WgmmaFence();
      WgmmaRs64x64First(s, qa[0], SwizzledDesc(kb));
#pragma unroll
      for (int kk = 1; kk < KK; ++kk) WgmmaRs64x64<0>(s, qa[kk], SwizzledDesc(kb + kk * 32), 1);
      WgmmaCommit();
      WgmmaWait<0>();
      FenceAccumulators(s);
      if constexpr (decltype(masked)::value) {
        const int ssA = row_ss[warp * 16 + g], ssB = row_ss[warp * 16 + g + 8];
#pragma unroll
        for (int nt = 0; nt < DN; ++nt) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int key = kt + nt * 8 + 2 * t + (c & 1);
            const bool ok = c < 2 ? (key >= ssA && key <= rowA) : (key >= ssB && key <= rowB);
            if (!ok) s[nt][c] = -INFINITY;
          }
        }
      }
      OnlineSoftmaxStep(s, o, mA, mB, lA, lB);

      uint32_t pa[KK][4];
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) PackPFrag(pa[kk], s[2 * kk], s[2 * kk + 1]);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) WgmmaRs64x64<1>(o, pa[kk], SwizzledDescMN(vb + kk * 2048, kWgTileBytes), 1);
      WgmmaCommit();
      WgmmaWait<0>();
      FenceAccumulators(o);
      // P's registers were read by the products in flight: kept live (not reused) until here.
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(pa[kk][i])::"memory");
      }
    };
    // Warpgroup-uniform: skip a tile none of the 64 rows sees; no mask on a tile all of them see
    // whole (row_ss is INT_MAX past N, so a warpgroup with such rows takes the mask).
    if (kt <= g_last && kt + kWgKeys - 1 >= g_ss0) {
      if (kt >= row_ss[64 * wg + 63] && kt + kWgKeys - 1 <= r0 + 64 * wg) tile(std::false_type{});
      else tile(std::true_type{});
    }

    if (has_next) landed();
    __syncthreads();  // the next tile is in; both warpgroups are done with this one
  }

  StoreForwardRows<kWgD>(out, out16, lse, o, mA, mB, lA, lB, rowA, rowB, N, Hq, h, t);
#else
  __trap();  // built without sm_90a: AttentionForwardWgmmaSupported() said no
#endif
}


// Test hook (AttentionWgmmaProbe): the two products of the kernel above on fixed operands, each
// result stored as it comes out of the accumulators. Rows 0 .. 127 of q (f32 [128][64], rounded to
// bf16 unscaled), the two 64-key tiles of k and v ([128][64] bf16, one head) and P (bf16 [128][64]):
// s_out[j] = Q K_j^T and o_out[j] = P V_j ([2][128][64] f32), tile j from buffer j. late: tile 1 is
// copied while tile 0's products run (as the kernel's loop), else both before.
__global__ void __launch_bounds__(kWgThreads) WgmmaProbeKernel(float* __restrict__ s_out, float* __restrict__ o_out,
                                                               const float* __restrict__ q,
                                                               const uint16_t* __restrict__ k,
                                                               const uint16_t* __restrict__ v,
                                                               const uint16_t* __restrict__ p, int late) {
#ifdef AHA_WGMMA
  constexpr int KK = kWgD / 16, DN = kWgD / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u);
  const uint32_t base = SmemAddr(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int rowA = warp * 16 + g, rowB = rowA + 8;
  uint32_t qa[KK][4], pa[KK][4];
  LoadAFragsF32<KK>(qa, q + rowA * kWgD, q + rowB * kWgD, t, 1.0f);
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    const int c = kk * 16 + 2 * t;
    pa[kk][0] = *reinterpret_cast<const uint32_t*>(p + rowA * kWgD + c);
    pa[kk][1] = *reinterpret_cast<const uint32_t*>(p + rowB * kWgD + c);
    pa[kk][2] = *reinterpret_cast<const uint32_t*>(p + rowA * kWgD + c + 8);
    pa[kk][3] = *reinterpret_cast<const uint32_t*>(p + rowB * kWgD + c + 8);
  }
  CopyKvTile(smem, k, v, 0, 128, 1, 0, tid);
  if (!late) CopyKvTile(smem + 2 * kWgTileBytes, k, v, 64, 128, 1, 0, tid);
  CpAsyncCommit();
  CpAsyncWaitAll();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  float s[DN][4] = {}, o[DN][4] = {};
  for (int j = 0; j < 2; ++j) {
    if (late && j == 0) {
      CopyKvTile(smem + 2 * kWgTileBytes, k, v, 64, 128, 1, 0, tid);
      CpAsyncCommit();
    }
    const uint32_t kb = base + j * 2 * kWgTileBytes, vb = kb + kWgTileBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) WgmmaRs64x64<0>(s, qa[kk], SwizzledDesc(kb + kk * 32), kk > 0);
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) WgmmaRs64x64<1>(o, pa[kk], SwizzledDescMN(vb + kk * 2048, kWgTileBytes), kk > 0);
    WgmmaCommit();
    WgmmaWait<0>();
    FenceAccumulators(s);
    FenceAccumulators(o);
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) {
      const int col = dn * 8 + 2 * t;
      const size_t a = (static_cast<size_t>(j) * 128 + rowA) * kWgD + col, b = a + 8 * kWgD;
      *reinterpret_cast<float2*>(s_out + a) = make_float2(s[dn][0], s[dn][1]);
      *reinterpret_cast<float2*>(s_out + b) = make_float2(s[dn][2], s[dn][3]);
      *reinterpret_cast<float2*>(o_out + a) = make_float2(o[dn][0], o[dn][1]);
      *reinterpret_cast<float2*>(o_out + b) = make_float2(o[dn][2], o[dn][3]);
    }
    if (late && j == 0) {
      CpAsyncWaitAll();
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();
  }
#else
  __trap();
#endif
}

}  // namespace

bool AttentionForwardWgmmaSupported(int D) {
#ifndef AHA_SM90A
  (void)D;
  return false;  // no sm_90a machine code in this build
#else
  static const bool on = [] {
    const char* e = std::getenv("AHA_ATTENTION_WGMMA");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on && D == kWgD && CurrentDeviceIsSm90();
#endif
}

void AttentionForwardWgmma(float* out, float* lse, const float* q, const uint16_t* k16, const uint16_t* v16,
                           const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, cudaStream_t s,
                           uint16_t* out_bf16) {
  if (N <= 0) return;
  if (S <= 0) Fail("AttentionForwardWgmma: S must be positive when N > 0; S", S);
  if (Hkv <= 0 || Hq <= 0 || Hq % Hkv != 0) Fail("AttentionForwardWgmma: Hq must be a positive multiple of Hkv; Hq", Hq);
  const dim3 grid(Hq, GridRows(N, kWgRows));
  const float qscale = kLog2e / std::sqrt(static_cast<float>(kWgD));
  AttnFwdWgmmaKernel<<<grid, kWgThreads, kWgSmem, s>>>(out, out_bf16, lse, q, k16, v16, cu_seqlens, S, N, Hq, Hkv,
                                                       qscale);
  CheckCuda(cudaGetLastError(), "AttnFwdWgmmaKernel launch");
}

}  // namespace aha::engine::cuda

namespace aha::engine::cuda {
void AttentionWgmmaProbe(float* s_out, float* o_out, const float* q, const uint16_t* k, const uint16_t* v,
                         const uint16_t* p, int late, cudaStream_t s) {
  WgmmaProbeKernel<<<1, kWgThreads, kWgSmem, s>>>(s_out, o_out, q, k, v, p, late);
  CheckCuda(cudaGetLastError(), "WgmmaProbeKernel launch");
}
}  // namespace aha::engine::cuda
