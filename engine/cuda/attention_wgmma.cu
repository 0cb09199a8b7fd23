// The training attention's forward on warpgroup tensor-core instructions (wgmma, sm_90a), for head
// widths 64 and 128 with bf16 k and v: the contract of AttentionForwardTCBf16Kv (kernels.h), which
// sends its calls here when AttentionForwardWgmmaSupported(D). At D = 128 each [64][64] tile below is
// two, one a half of D (the S product takes 8 k-steps, P V two m64n64 products a k-step). The
// operands are rounded as in AttnFwdTcKernel (attention_tc.cu): q pre-scaled by scale * log2 e and
// rounded to bf16 in registers, k and v bf16, P rounded to bf16 before P V, f32 accumulators and
// softmax statistics.
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
#include "engine/cuda/tma.h"
#include "engine/cuda/wgmma.h"

namespace aha::engine::cuda {
namespace {

constexpr int kWgD = 64;
constexpr int kWgRows = 128;  // two warpgroups of 64 rows
constexpr int kWgKeys = 64;
constexpr int kWgThreads = 256;
constexpr int kWgTileBytes = kWgKeys * kWgD * 2;                          // [64 keys][64] bf16: 8 KiB
constexpr int kWgSmem = 4 * kWgTileBytes + kWgRows * sizeof(int) + 1024;  // 2 x (K, V), row starts, alignment

// 64 rows of x[*, H, D] (bf16) at head `head`, columns 64 half .. 64 half + 63 (D = 128: a half of
// the row), rows row0 .. row0 + 63 (rows >= N zero-filled), into the 128-byte swizzled layout at dst:
// row r's 16-byte chunk c at r * 128 + (c ^ (r & 7)) * 16 (dst 1024-byte aligned). 512 chunks,
// spread over kThreads threads. Not committed.
template <int kThreads, int D = 64>
__device__ __forceinline__ void CopyTile64(unsigned char* dst, const uint16_t* __restrict__ x, int row0, int N, int H,
                                           int head, int tid, int half = 0) {
#pragma unroll
  for (int it = 0; it < 512 / kThreads; ++it) {
    const int f = tid + it * kThreads;
    const int rr = f >> 3, c = f & 7;
    const int row = row0 + rr;
    const bool valid = row < N;
    const size_t src = (static_cast<size_t>(valid ? row : 0) * H + head) * D + half * 64 + c * 8;
    CpAsync16(dst + Swizzled128(rr, c), x + src, valid);
  }
}

// The 64-key tile of k and v into dst (K) and dst + kWgTileBytes (V).
__device__ __forceinline__ void CopyKvTile(unsigned char* dst, const uint16_t* __restrict__ k,
                                           const uint16_t* __restrict__ v, int row0, int N, int Hkv, int kvh,
                                           int tid) {
  CopyTile64<kWgThreads>(dst, k, row0, N, Hkv, kvh, tid);
  CopyTile64<kWgThreads>(dst + kWgTileBytes, v, row0, N, Hkv, kvh, tid);
}

// The same at head width D: K's D / 64 half tiles at dst, then V's.
template <int D>
__device__ __forceinline__ void CopyKvTiles(unsigned char* dst, const uint16_t* __restrict__ k,
                                            const uint16_t* __restrict__ v, int row0, int N, int Hkv, int kvh,
                                            int tid) {
#pragma unroll
  for (int hv = 0; hv < D / 64; ++hv) {
    CopyTile64<kWgThreads, D>(dst + hv * kWgTileBytes, k, row0, N, Hkv, kvh, tid, hv);
    CopyTile64<kWgThreads, D>(dst + (D / 64 + hv) * kWgTileBytes, v, row0, N, Hkv, kvh, tid, hv);
  }
}
// Shared memory of the forward at head width D: 2 x (K, V) tiles, row starts, alignment.
template <int D>
constexpr int WgFwdSmem() {
  return 4 * (D / 64) * kWgTileBytes + kWgRows * sizeof(int) + 1024;
}

// This thread's copies have landed; the tensor cores (the async proxy) read them after a barrier.
__device__ __forceinline__ void CopiesLanded() {
  CpAsyncWaitAll();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The start of a warp's online softmax over its two rows: O = 0, maxima -inf, sums 0.
template <int DN>
__device__ __forceinline__ void FwdStart(float (&o)[DN][4], float& mA, float& mB, float& lA, float& lB) {
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
    for (int c = 0; c < 4; ++c) o[dn][c] = 0.0f;
  }
  mA = mB = -INFINITY;
  lA = lB = 0.0f;
}

// One 64-key tile of a warpgroup's 64 rows (the forward kernels below): S = Q K^T from the K halves
// at kb (qa: the warp's Q fragments), the causal mask when kMasked (ss: the sequence starts of the
// warp's rows, ss[0] of rowA and ss[8] of rowB), the online softmax step, O += P V from the V halves
// after K's. Compiled once with the mask and once without. Not one body with the mask in a branch:
// that version gave wrong rows on the H200 even when every warp took the branch (a conditional
// block between the S product's wait and the P V product's fence; the same with the branch
// warpgroup-uniform or followed by __syncwarp). Both products are waited for: kb's tiles may be
// written over once every warp of the warpgroup has returned.
#ifdef AHA_WGMMA
template <int D, bool kMasked>
__device__ __forceinline__ void FwdTile(float (&o)[D / 8][4], float& mA, float& mB, float& lA, float& lB,
                                        const uint32_t (&qa)[D / 16][4], uint32_t kb, int kt, const int* ss,
                                        int rowA, int rowB, int t) {
  constexpr int KK = D / 16, NH = D / 64, KP = kWgKeys / 16, T = kWgTileBytes;
  const uint32_t vb = kb + NH * T;
  float s[kWgKeys / 8][4];
  WgmmaFence();
  WgmmaRs64x64First(s, qa[0], SwizzledDesc(kb));
#pragma unroll
  for (int kk = 1; kk < KK; ++kk) WgmmaRs64x64<0>(s, qa[kk], SwizzledDesc(kb + (kk >> 2) * T + (kk & 3) * 32), 1);
  WgmmaCommit();
  WgmmaWait<0>();
  FenceAccumulators(s);
  if constexpr (kMasked) MaskScores(s, kt, ss[0], ss[8], rowA, rowB, t);
  OnlineSoftmaxStep(s, o, mA, mB, lA, lB);

  uint32_t pa[KP][4];
#pragma unroll
  for (int kk = 0; kk < KP; ++kk) PackPFrag(pa[kk], s[2 * kk], s[2 * kk + 1]);
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < KP; ++kk) {
    if constexpr (NH == 1) {
      WgmmaRs64x64<1>(o, pa[kk], SwizzledDescMN(vb + kk * 2048, T), 1);
    } else {
      WgmmaRs64x64Half<1, 0>(o, pa[kk], SwizzledDescMN(vb + kk * 2048, T), 1);
      WgmmaRs64x64Half<1, 1>(o, pa[kk], SwizzledDescMN(vb + T + kk * 2048, T), 1);
    }
  }
  WgmmaCommit();
  WgmmaWait<0>();
  FenceAccumulators(o);
  KeepLive(pa);  // read by the products in flight until the wait
}
#endif

// D = 128 (Qwen3, Qwen2.5-1.5B and up): K and V tiles in two 64-wide halves each, S over the 8 k-steps
// of both, P V as two m64n64 products into the halves of O; one block a multiprocessor (q's 32 A
// fragments and O's 64 accumulators a thread).
template <int D>
__global__ void __launch_bounds__(kWgThreads, D == 64 ? 2 : 1)
    AttnFwdWgmmaKernel(float* __restrict__ out, uint16_t* __restrict__ out16, float* __restrict__ lse,
                       const float* __restrict__ q, const uint16_t* __restrict__ q16s, const uint16_t* __restrict__ k,
                       const uint16_t* __restrict__ v, const int32_t* __restrict__ cu, int S, int N, int Hq, int Hkv,
                       float qscale) {
#ifdef AHA_WGMMA
  constexpr int DN = D / 8, kBuf = 2 * (D / 64) * kWgTileBytes;  // one buffer: K's halves, then V's
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = AlignSmem1024(smem_raw);
  const uint32_t base = SmemAddr(smem);
  int* row_ss = reinterpret_cast<int*>(smem + 2 * kBuf);  // INT_MAX past N
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;
  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int r0 = (gridDim.y - 1 - blockIdx.y) * kWgRows;
  const int r_last = min(r0 + kWgRows, N) - 1;

  // The 64-key tile at row0 into buffer b (K, then V).
  auto issue = [&](int row0, int b) {
    CopyKvTiles<D>(smem + b * kBuf, k, v, row0, N, Hkv, kvh, tid);
    CpAsyncCommit();
  };

  const int wr0 = r0 + warp * 16;
  const int rowA = wr0 + g, rowB = rowA + 8;
  uint32_t qa[D / 16][4];
  ForwardPrologue<D>(row_ss, qa, q, cu, S, N, Hq, h, r0, kWgRows, tid, rowA, rowB, t, qscale, q16s);
  __syncthreads();  // row_ss

  // The warpgroup's rows r0 + 64 wg .. + 63: the smallest start among them (INT_MAX: none) and the last.
  const int g_ss0 = row_ss[64 * wg];
  const int g_last = min(r0 + 64 * wg + 63, N - 1);
  const int k_begin = (row_ss[0] / kWgKeys) * kWgKeys;  // row r0 < N, so row_ss[0] is a real start

  issue(k_begin, 0);
  CopiesLanded();
  __syncthreads();

  float o[DN][4], mA, mB, lA, lB;
  FwdStart(o, mA, mB, lA, lB);

  int buf = 0;
  for (int kt = k_begin; kt <= r_last; kt += kWgKeys, buf ^= 1) {
    const bool has_next = kt + kWgKeys <= r_last;
    if (has_next) issue(kt + kWgKeys, buf ^ 1);  // the other buffer: read by nobody since the last barrier
    const uint32_t kb = base + buf * kBuf;

    // Warpgroup-uniform: skip a tile none of the 64 rows sees; no mask on a tile all of them see
    // whole (row_ss is INT_MAX past N, so a warpgroup with such rows takes the mask).
    if (kt <= g_last && kt + kWgKeys - 1 >= g_ss0) {
      if (kt >= row_ss[64 * wg + 63] && kt + kWgKeys - 1 <= r0 + 64 * wg) {
        FwdTile<D, false>(o, mA, mB, lA, lB, qa, kb, kt, row_ss + warp * 16 + g, rowA, rowB, t);
      } else {
        FwdTile<D, true>(o, mA, mB, lA, lB, qa, kb, kt, row_ss + warp * 16 + g, rowA, rowB, t);
      }
    }

    if (has_next) CopiesLanded();
    __syncthreads();  // the next tile is in; both warpgroups are done with this one
  }

  StoreForwardRows<D>(out, out16, lse, o, mA, mB, lA, lB, rowA, rowB, N, Hq, h, t);
#else
  __trap();  // built without sm_90a: AttentionForwardWgmmaSupported() said no
#endif
}

// The same forward with the copies taken off the warpgroups (kernels.md, version 47): one more
// warp's one thread copies each 64-key tile's K and V halves with the tensor memory accelerator into
// kStages buffers, each with a full barrier (the bytes) and an empty one (one arrival a warpgroup once
// its products on the tile are done). The warpgroups no longer meet at a block barrier every tile, so
// one's softmax may run while another's products do. kWgs warpgroups of 64 rows a block, one block a
// multiprocessor: 2 at D = 128 (as AttnFwdWgmmaKernel), 3 at D = 64 (AttnFwdWgmmaKernel runs two
// blocks of 2; ptxas counts whole warpgroups, so 4 and the copying warp would get 96 registers a
// thread and spill, 3 and the warp get 128; each tile is copied once for 192 rows). The same tiles
// in the same order through the same FwdTile: the result is AttnFwdWgmmaKernel's bit for bit.
template <int D>
constexpr int WgFwdTmaWgs() {
  return D == 64 ? 3 : 2;
}
template <int D>
constexpr int WgFwdTmaThreads() {
  return 128 * WgFwdTmaWgs<D>() + 32;
}
template <int D, int kStages>
constexpr int WgFwdTmaSmem() {
  return kStages * 2 * (D / 64) * kWgTileBytes + 64 * WgFwdTmaWgs<D>() * sizeof(int) + 2 * kStages * 8 + 1024;
}
template <int D, int kStages>
__global__ void __launch_bounds__(WgFwdTmaThreads<D>(), 1)
    AttnFwdWgmmaTmaKernel(float* __restrict__ out, uint16_t* __restrict__ out16, float* __restrict__ lse,
                          const float* __restrict__ q, const uint16_t* __restrict__ q16s,
                          const int32_t* __restrict__ cu, int S, int N, int Hq, int Hkv, float qscale,
                          const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v) {
#ifdef AHA_WGMMA
  constexpr int kWgs = WgFwdTmaWgs<D>(), kRows = 64 * kWgs, kCopier = 128 * kWgs;
  constexpr int NH = D / 64, DN = D / 8, T = kWgTileBytes, kBuf = 2 * NH * T;  // a buffer: K's halves, V's
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = AlignSmem1024(smem_raw);
  const uint32_t base = SmemAddr(smem);
  int* row_ss = reinterpret_cast<int*>(smem + kStages * kBuf);  // INT_MAX past N
  const uint32_t bars = base + kStages * kBuf + kRows * sizeof(int);
  auto full = [&](int b) { return bars + 8u * b; };
  auto empty = [&](int b) { return bars + 8u * (kStages + b); };
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;  // kWgs: the copying warp
  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int r0 = (gridDim.y - 1 - blockIdx.y) * kRows;
  const int r_last = min(r0 + kRows, N) - 1;
  if (tid == kCopier) {
    for (int b = 0; b < kStages; ++b) {
      MbarInit(full(b), 1);
      MbarInit(empty(b), kWgs);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
  }
  const int rowA = r0 + warp * 16 + g, rowB = rowA + 8;
  uint32_t qa[D / 16][4];
  if (wg < kWgs) ForwardPrologue<D>(row_ss, qa, q, cu, S, N, Hq, h, r0, kRows, tid, rowA, rowB, t, qscale, q16s);
  __syncthreads();  // row_ss, the barriers
  const int k_begin = (row_ss[0] / kWgKeys) * kWgKeys;  // row r0 < N, so row_ss[0] is a real start
  const int tiles = (r_last - k_begin) / kWgKeys + 1;

  if (wg == kWgs) {
    if (lane == 0) {
      for (int i = 0; i < tiles; ++i) {
        const int b = i % kStages, kt = k_begin + i * kWgKeys;
        if (i >= kStages) MbarWait(empty(b), ((i / kStages) - 1) & 1);
        MbarExpectBytes(full(b), kBuf);
        const uint32_t kb = base + b * kBuf;
#pragma unroll
        for (int hv = 0; hv < NH; ++hv) {
          TmaLoad(kb + hv * T, &map_k, kvh * D + hv * 64, kt, full(b));
          TmaLoad(kb + (NH + hv) * T, &map_v, kvh * D + hv * 64, kt, full(b));
        }
      }
    }
    return;
  }

  // The warpgroup's rows r0 + 64 wg .. + 63: the smallest start among them (INT_MAX: none) and the last.
  const int g_ss0 = row_ss[64 * wg];
  const int g_last = min(r0 + 64 * wg + 63, N - 1);
  float o[DN][4], mA, mB, lA, lB;
  FwdStart(o, mA, mB, lA, lB);
  for (int i = 0; i < tiles; ++i) {
    const int b = i % kStages, kt = k_begin + i * kWgKeys;
    // Every tile is waited for, a skipped one too: a warpgroup that released a tile unseen could
    // otherwise wait on a later fill of its buffer while the barrier still stands at this one, in the
    // phase of the same parity. Warpgroup-uniform, as in AttnFwdWgmmaKernel: skip a tile none of the
    // 64 rows sees, no mask on a tile all of them see whole.
    MbarWait(full(b), (i / kStages) & 1);
    if (kt <= g_last && kt + kWgKeys - 1 >= g_ss0) {
      const uint32_t kb = base + b * kBuf;
      if (kt >= row_ss[64 * wg + 63] && kt + kWgKeys - 1 <= r0 + 64 * wg) {
        FwdTile<D, false>(o, mA, mB, lA, lB, qa, kb, kt, row_ss + warp * 16 + g, rowA, rowB, t);
      } else {
        FwdTile<D, true>(o, mA, mB, lA, lB, qa, kb, kt, row_ss + warp * 16 + g, rowA, rowB, t);
      }
    }
    if ((tid & 127) == 0) MbarArrive(empty(b));
  }
  StoreForwardRows<D>(out, out16, lse, o, mA, mB, lA, lB, rowA, rowB, N, Hq, h, t);
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
  unsigned char* smem = AlignSmem1024(smem_raw);
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
  CopiesLanded();
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
    if (late && j == 0) CopiesLanded();
    __syncthreads();
  }
#else
  __trap();
#endif
}

// ---- backward ---------------------------------------------------------------------------------------
// The contract of AttentionBackwardTC at D = 64 (kernels.h), which sends its calls here when
// AttentionBackwardWgmmaSupported(). The operands are rounded as in AttnBwdTcKernel (attention_tc.cu):
// q, k, v, dout in bf16, P and dS rounded to bf16 before their products, f32 accumulators.
//
// Block = 64 consecutive keys of the packed axis x one query head (one warpgroup, 128 threads; warp w
// owns keys k0 + 16 w .. + 15); 214 registers, 91 KB of shared memory (three stages), 2 blocks a
// multiprocessor (at 3, the 168-register cap spills and the kernel is 14% slower). kSs (the default;
// kernels.md, version 37): P^T and dS^T go to shared memory and all three products read them there,
// so no packed operand stays live in registers (167), and with two stages and dQ's boxes staged over
// P^T and dS^T (66.5 KB) three blocks fit a multiprocessor. The block loops over query
// tiles of 64 rows from k0 to the end of its last key's sequence (r_stop). Per tile, all on wgmma
// m64n64k16:
//   S^T = K Q^T and dP^T = V dO^T (A and B from shared memory, both K-major: 8 products);
//   P^T = exp2(S^T scale log2 e - lse log2 e), masked, and dS^T = P^T (dP^T - delta) on the
//     accumulators (keys on the rows, the tile's query rows on the columns), times scale: V is
//     rounded to bf16 times scale and delta comes times scale, so dP^T and dS^T come out scaled.
//     scale = 1/8 (D = 64) is a power of two, so every rounding is the same as unscaled;
//   dV += P^T dO and dK += dS^T Q (A = P^T, dS^T packed to bf16 in registers, B = the dO / Q tile
//     read N-major: 8 products, left running while dS^T goes to shared memory);
//   dQ = dS K (A = dS^T from shared memory, M-major; B = the K tile, N-major: 4 products), staged
//     in shared memory (two 64 x 32 boxes, 128-byte swizzled) and added into dq by the tensor
//     memory accelerator, two reductions a tile. Per-lane float4 atomics took 26-32% of the kernel
//     (an ablation without them: 0.424 -> 0.312 ms at 16 x 1024), and a bulk reduction per row,
//     64 a tile, was slower still (kernels.md, version 18).
// At the end dK (scaled through dS) and dV go into dk, dv with atomics (the G query heads of a kv
// head meet there). Q and dO come as bf16 copies (WgBwdPrepassKernel writes them into the workspace)
// and are copied with cp.async into the 128-byte swizzled layout, kStages tiles in flight (three: tile
// i + 2's issued during tile i; kernels.md, version 34); K and V are rounded from f32 once. As in the
// forward, the tile's body is compiled twice, with and without the mask, chosen for the whole block (a
// branch around the mask inside one body miscompiles: kernels.md "Version 15").
constexpr int kWbThreads = 128;
constexpr int kWbRows = 64;  // keys per block = query rows per tile = 64
constexpr int kWbTile = 64 * 64 * 2;
constexpr int kWbDqBox = 64 * 128;  // dQ's staging: columns 0-31, then 32-63, 64 rows of 128 bytes each
// K, V | kStages x (Q, dO) | dS^T | dQ (two boxes) | 2 x (lse log2 e, delta, row start)[64] | r_stop |
// alignment. kStages query tiles' Q and dO in flight: 2 (the tile after this one) or 3 (two ahead).
template <int kStages>
constexpr int WbSmem() {
  return (3 + 2 * kStages) * kWbTile + 2 * kWbDqBox + 2 * 3 * kWbRows * 4 + 16 + 1024;
}
// kSs (two stages): K, V | 2 x (Q, dO) | P^T | dS^T, where dQ's two boxes are staged once the tile's
// products have read P^T and dS^T | the statistics | r_stop | alignment: 66.5 KB, three blocks a
// multiprocessor.
constexpr int WbSmemSs() { return 8 * kWbTile + 2 * 3 * kWbRows * 4 + 16 + 1024; }
static_assert(2 * kWbDqBox == 2 * kWbTile, "dQ's boxes fill P^T's and dS^T's tiles");
// The newest `ahead` commit groups may stay in flight (0 or 1); the rest of this thread's copies have
// landed, and the tensor cores (the async proxy) read them after a barrier.
__device__ __forceinline__ void CopiesLandedBut(int ahead) {
  if (ahead > 0) CpAsyncWaitGroup<1>();
  else CpAsyncWaitAll();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The backward's pre-pass: per (row, head), D / 4 threads of 4 columns: delta = scale * (dout . out)
// (out from its bf16 copy out16 when that is given: the attention output kept in bf16 only; dout
// likewise from dout16_in, which the kernel then reads as it is), bf16 copies of q (unless q16_in,
// q's kept copy, is given: the kernel reads that) and dout, dq zeroed (the kernel adds into it),
// and row_start[r] = the first row of row r's sequence (head 0).
template <int D>
__global__ void __launch_bounds__(256)
    WgBwdPrepassKernel(float* __restrict__ delta, int* __restrict__ row_start, uint16_t* __restrict__ q16,
                       uint16_t* __restrict__ dout16, float* __restrict__ dq, const float* __restrict__ q,
                       const uint16_t* __restrict__ q16_in, const float* __restrict__ dout,
                       const uint16_t* __restrict__ dout16_in, const float* __restrict__ out,
                       const uint16_t* __restrict__ out16, const int32_t* __restrict__ cu, int S, int N, int Hq,
                       float scale) {
  constexpr int LPR = D / 4;  // threads a (row, head): 16 or 32
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;  // float4 index
  const long long rh = i / LPR;                                                         // row * Hq + head
  const bool in = rh < static_cast<long long>(N) * Hq;
  float dot = 0.0f;
  if (in) {
    const size_t at = static_cast<size_t>(i) * 4;
    const float4 d4 =
        dout16_in ? UnpackBf16x4(__ldg(reinterpret_cast<const uint2*>(dout16_in + at))) : Ldg4(dout + at);
    const float4 o4 = out16 ? UnpackBf16x4(__ldg(reinterpret_cast<const uint2*>(out16 + at))) : Ldg4(out + at);
    dot = d4.x * o4.x + d4.y * o4.y + d4.z * o4.z + d4.w * o4.w;
    if (!dout16_in) *reinterpret_cast<uint2*>(dout16 + at) = PackBf16x4(d4);
    if (!q16_in) *reinterpret_cast<uint2*>(q16 + at) = PackBf16x4(Ldg4(q + at));
    *reinterpret_cast<float4*>(dq + at) = Zero4();
  }
#pragma unroll
  for (int off = 1; off < LPR; off <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (in && i % LPR == 0) {
    delta[rh] = dot * scale;
    const int r = static_cast<int>(rh / Hq);
    if (rh % Hq == 0) row_start[r] = __ldg(cu + FindSeq(cu, S, r));
  }
}

// A warpgroup's dQ tile (n-tiles from .. from + 7 of dQ), times a (1: exact), into its two 64-row x
// 32-column staging boxes at dq_s, 128-byte swizzled as the tensor map reads them: row ra's columns
// 8 dn + 2 t, +1 in box dn / 4, 16-byte chunk 2 (dn % 4) + t / 2 at its swizzled place; row ra + 8
// eight rows further.
template <int kN>
__device__ __forceinline__ void StageDq(unsigned char* dq_s, const float (&dQ)[kN][4], int ra, int t, float a,
                                        int from = 0) {
#pragma unroll
  for (int dn = 0; dn < 8; ++dn) {
    const int at = (dn >> 2) * kWbDqBox + ra * 128 + (((2 * (dn & 3) + (t >> 1)) ^ (ra & 7)) << 4) + 8 * (t & 1);
    *reinterpret_cast<float2*>(dq_s + at) = make_float2(dQ[from + dn][0] * a, dQ[from + dn][1] * a);
    *reinterpret_cast<float2*>(dq_s + at + 8 * 128) = make_float2(dQ[from + dn][2] * a, dQ[from + dn][3] * a);
  }
}

// kBoxes staging boxes of 64 rows x 32 f32 columns at sb (StageDq's layout, each kWbDqBox bytes after
// the one before) added by tensor reductions into the map's rows row .. row + 63, columns col ..
// col + 32 kBoxes - 1, as one bulk group (one thread; BulkWaitRead / BulkWait track it).
#ifdef AHA_WGMMA
template <int kBoxes>
__device__ __forceinline__ void ReduceBoxes(const CUtensorMap* map, int col, int row, uint32_t sb) {
#pragma unroll
  for (int x = 0; x < kBoxes; ++x) TmaReduceAdd(map, col + 32 * x, row, sb + x * kWbDqBox);
  BulkCommit();
}
#endif

// The three products of a backward tile with P^T and dS^T in shared memory (one commit group, not
// waited for): dV += P^T dO and dK += dS^T Q (A K-major from the P^T / dS^T tiles at psb, dsb; B the
// dO / Q tile read N-major), dQ = dS K (A = dS^T read M-major, B the K tile read N-major). dob, qb and
// kb address the 64 columns of D the accumulators hold.
__device__ __forceinline__ void IssueBackwardProducts(float (&dV)[8][4], float (&dK)[8][4], float (&dQ)[8][4],
                                                      uint32_t psb, uint32_t dsb, uint32_t dob, uint32_t qb,
                                                      uint32_t kb) {
#ifdef AHA_WGMMA
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    WgmmaSs64x64<0, 1>(dV, SwizzledDesc(psb + kk * 32), SwizzledDescMN(dob + kk * 2048, kWbTile), 1);
  }
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    WgmmaSs64x64<0, 1>(dK, SwizzledDesc(dsb + kk * 32), SwizzledDescMN(qb + kk * 2048, kWbTile), 1);
  }
  WgmmaSs64x64First<1, 1>(dQ, SwizzledDescMN(dsb, kWbTile), SwizzledDescMN(kb, kWbTile));
#pragma unroll
  for (int kk = 1; kk < 4; ++kk) {
    WgmmaSs64x64<1, 1>(dQ, SwizzledDescMN(dsb + kk * 2048, kWbTile), SwizzledDescMN(kb + kk * 2048, kWbTile), 1);
  }
  WgmmaCommit();
#endif
}

// One n-tile's row statistics for the P^T / dS^T elements of a thread (AttnBwd kernels): rows
// 8 nt + 2 t and + 1 of the tile's [lse log2 e | delta | start] buffer; the starts only when masked.
struct NtStats {
  float2 l2, dl;
  int2 start;
};
template <bool kMasked>
__device__ __forceinline__ NtStats LoadNtStats(const float* l2, const float* dl, const int* ssr, int nt, int t) {
  NtStats n;
  n.l2 = *reinterpret_cast<const float2*>(l2 + nt * 8 + 2 * t);
  n.dl = *reinterpret_cast<const float2*>(dl + nt * 8 + 2 * t);
  n.start = make_int2(0, 0);
  if constexpr (kMasked) n.start = *reinterpret_cast<const int2*>(ssr + nt * 8 + 2 * t);
  return n;
}
// P^T and dS^T of accumulator element c of an n-tile (key keyA for c < 2, else keyB; tile row
// 8 nt + 2 t + (c & 1), query row `row`): p = 2^(s scale log2 e - lse log2 e), 0 where masked (the key
// before the row's sequence start or after the row), and ds = p (dp - delta).
template <bool kMasked>
__device__ __forceinline__ float2 PdsElement(float s, float dp, const NtStats& n, int c, int key, int row,
                                             float scale_log2) {
  float x = fmaf(s, scale_log2, -((c & 1) ? n.l2.y : n.l2.x));
  if constexpr (kMasked) {
    const bool ok = key >= ((c & 1) ? n.start.y : n.start.x) && key <= row;  // start INT_MAX past N
    x = ok ? x : -INFINITY;
  }
  const float p = Exp2Ftz(x);
  return make_float2(p, p * (dp - ((c & 1) ? n.dl.y : n.dl.x)));
}

// A backward tile's P^T and dS^T from its S^T and dP^T accumulators (PdsElement on each element:
// (nt, c) is key keyA (c < 2) or keyB x tile row rt + 8 nt + 2 t + (c & 1), the statistics from the
// tile's [lse log2 e | delta | start] buffers l2, dl, ssr), packed to bf16 A fragments: pa = P^T,
// sa = dS^T, k-step kk from n-tiles 2 kk and 2 kk + 1.
template <bool kMasked>
__device__ __forceinline__ void PackPds(uint32_t (&pa)[4][4], uint32_t (&sa)[4][4], float (&sT)[8][4],
                                        float (&dpT)[8][4], const float* l2, const float* dl, const int* ssr,
                                        int rt, int keyA, int keyB, int t, float scale_log2) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const NtStats n = LoadNtStats<kMasked>(l2, dl, ssr, nt, t);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int row = rt + (nt * 8 + 2 * t + (c & 1));
      const float2 pds = PdsElement<kMasked>(sT[nt][c], dpT[nt][c], n, c, c < 2 ? keyA : keyB, row, scale_log2);
      sT[nt][c] = pds.x;
      dpT[nt][c] = pds.y;
    }
  }
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    PackPFrag(pa[kk], sT[2 * kk], sT[2 * kk + 1]);
    PackPFrag(sa[kk], dpT[2 * kk], dpT[2 * kk + 1]);
  }
}
// A warp's rows of dS^T (keys rA = 16 warp + g and rA + 8, from the packed sa) into the [64 keys][64
// rows] bf16 tile at ds_s, 128-byte swizzled: key r's rows 8 c .. 8 c + 7 in chunk c ^ (r & 7).
__device__ __forceinline__ void StoreDsT(unsigned char* ds_s, const uint32_t (&sa)[4][4], int rA, int t) {
  const int rB = rA + 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int c0 = 2 * kk, c1 = 2 * kk + 1;
    *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rA, c0) + 4 * t) = sa[kk][0];
    *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rB, c0) + 4 * t) = sa[kk][1];
    *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rA, c1) + 4 * t) = sa[kk][2];
    *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rB, c1) + 4 * t) = sa[kk][3];
  }
}

template <int kStages, bool kSs>
__global__ void __launch_bounds__(kWbThreads, kSs ? 3 : 2)
    AttnBwdWgmmaKernel(float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                       const uint16_t* __restrict__ dout16, const uint16_t* __restrict__ q16,
                       const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,
                       const float* __restrict__ delta, const int* __restrict__ row_start,
                       const int32_t* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                       const __grid_constant__ CUtensorMap map_dq) {
#ifdef AHA_WGMMA
  constexpr int KK = 4, DN = 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = AlignSmem1024(smem_raw);
  const uint32_t base = SmemAddr(smem);
  static_assert(!kSs || kStages == 2, "the P^T tile takes the third stage's place");
  // dS^T's tile; with kSs P^T's tile before it, and dQ's boxes over both.
  constexpr int kDs = 2 + 2 * kStages + (kSs ? 1 : 0);
  const uint32_t kb = base, vb = base + kWbTile, qo_b = base + 2 * kWbTile, dsb = base + kDs * kWbTile;
  const uint32_t psb = dsb - kWbTile;
  unsigned char* ds_s = smem + kDs * kWbTile;
  unsigned char* ps_s = ds_s - kWbTile;
  constexpr int kDq = kSs ? kDs - 1 : kDs + 1;
  unsigned char* dq_s = smem + kDq * kWbTile;  // 1024-byte aligned, as the swizzle needs
  const uint32_t dq_sb = base + kDq * kWbTile;
  // buffer b: lse2, delta, start at 3 b * 64
  float* stats = reinterpret_cast<float*>(smem + (kSs ? kDs + 1 : kDq) * kWbTile + (kSs ? 0 : 2 * kWbDqBox));
  int* r_stop_s = reinterpret_cast<int*>(stats + 6 * kWbRows);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int k0 = blockIdx.y * kWbRows;
  const int k_last = min(k0 + kWbRows, N) - 1;
  const int keyA = k0 + warp * 16 + g, keyB = keyA + 8;
  const float scale_log2 = scale * kLog2e;

  // Row statistics (RowStats) into buffer b of stats: [lse log2 e | delta | start][64] at 3 b * 64.
  RowStats st;
  auto load_stats = [&](int r) { st.Load(lse, delta, row_start, r, N, Hq, h); };
  auto store_stats = [&](int b) {
    float* at = stats + 3 * b * kWbRows;
    st.Store(at, at + kWbRows, reinterpret_cast<int*>(at + 2 * kWbRows), tid);
  };
  auto issue = [&](int rt, int b) {
    unsigned char* dst = smem + (2 + 2 * b) * kWbTile;
    CopyTile64<kWbThreads>(dst, q16, rt, N, Hq, h, tid);
    CopyTile64<kWbThreads>(dst + kWbTile, dout16, rt, N, Hq, h, tid);
    CpAsyncCommit();
  };

  // The first query tile starts at k0 (earlier rows see none of the keys); with three stages the
  // next one goes out too (rows past the block's last sequence are copied and never read).
  issue(k0, 0);
  if (kStages == 3) issue(k0 + kWbRows, 1);
  if (tid < kWbRows) load_stats(k0 + tid);
  // K and V of the block's keys, rounded to bf16, swizzled (zeros past N): 8 float4 each a thread.
#pragma unroll
  for (int it = 0; it < 8; ++it) {
    const int f = tid + it * kWbThreads;  // 1024 float4 of a 64 x 64 tile
    const int rr = f >> 4, d4 = f & 15;
    const int key = k0 + rr;
    float4 kx = Zero4(), vx = Zero4();
    if (key < N) {
      const size_t off = (static_cast<size_t>(key) * Hkv + kvh) * 64 + d4 * 4;
      kx = Ldg4(k + off);
      vx = Ldg4(v + off);
    }
    const int at = Swizzled128(rr, d4 >> 1) + (d4 & 1) * 8;
    *reinterpret_cast<uint2*>(smem + at) = PackBf16x4(kx);
    *reinterpret_cast<uint2*>(smem + kWbTile + at) =
        PackBf16x4(make_float4(vx.x * scale, vx.y * scale, vx.z * scale, vx.w * scale));
  }
  if (tid == 0) *r_stop_s = __ldg(cu + FindSeq(cu, S, k_last) + 1);  // the end of the last key's sequence
  if (tid < kWbRows) store_stats(0);
  CopiesLandedBut(kStages == 3 ? 1 : 0);  // the first tile; also orders this thread's K / V stores before
  __syncthreads();                        // the tensor cores read them
  const int r_stop = *r_stop_s;  // rows >= r_stop belong to later sequences; r_stop <= N

  float dK[DN][4], dV[DN][4];
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
    for (int c = 0; c < 4; ++c) dK[dn][c] = dV[dn][c] = 0.0f;
  }

  int buf = 0, qbuf = 0;  // the row statistics' buffer, Q and dO's stage
  for (int rt = k0; rt < r_stop; rt += kWbRows, buf ^= 1, qbuf = qbuf + 1 == kStages ? 0 : qbuf + 1) {
    const bool has_next = rt + kWbRows < r_stop;
    // Q and dO kStages - 1 tiles ahead, into the stage last read before the previous barrier.
    const bool issues = rt + (kStages - 1) * kWbRows < r_stop;
    if (issues) issue(rt + (kStages - 1) * kWbRows, qbuf == 0 ? kStages - 1 : qbuf - 1);
    if (has_next && tid < kWbRows) load_stats(rt + kWbRows + tid);
    const uint32_t qb = qo_b + qbuf * 2 * kWbTile, dob = qb + kWbTile;
    const float* l2 = stats + 3 * buf * kWbRows;
    const float* dl = l2 + kWbRows;
    const int* ssr = reinterpret_cast<const int*>(l2 + 2 * kWbRows);

    auto tile = [&](auto masked) {
      float sT[DN][4], dpT[DN][4];
      WgmmaFence();
      WgmmaSs64x64First<0, 0>(sT, SwizzledDesc(kb), SwizzledDesc(qb));
#pragma unroll
      for (int kk = 1; kk < KK; ++kk) WgmmaSs64x64<0, 0>(sT, SwizzledDesc(kb + kk * 32), SwizzledDesc(qb + kk * 32), 1);
      WgmmaSs64x64First<0, 0>(dpT, SwizzledDesc(vb), SwizzledDesc(dob));
#pragma unroll
      for (int kk = 1; kk < KK; ++kk) {
        WgmmaSs64x64<0, 0>(dpT, SwizzledDesc(vb + kk * 32), SwizzledDesc(dob + kk * 32), 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceAccumulators(sT);
      FenceAccumulators(dpT);
      uint32_t pa[KK][4], sa[KK][4];
      PackPds<decltype(masked)::value>(pa, sa, sT, dpT, l2, dl, ssr, rt, keyA, keyB, t, scale_log2);
      float dQ[DN][4];
      if constexpr (kSs) {
        // P^T and dS^T into their tiles (dQ's boxes of the last tile have been read: the end-of-tile
        // barrier), then the three products read them from there.
        const int rA = warp * 16 + g, rB = rA + 8;
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          const int at[4] = {Swizzled128(rA, 2 * kk) + 4 * t, Swizzled128(rB, 2 * kk) + 4 * t,
                             Swizzled128(rA, 2 * kk + 1) + 4 * t, Swizzled128(rB, 2 * kk + 1) + 4 * t};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            *reinterpret_cast<uint32_t*>(ps_s + at[e]) = pa[kk][e];
            *reinterpret_cast<uint32_t*>(ds_s + at[e]) = sa[kk][e];
          }
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();  // P^T and dS^T complete
        IssueBackwardProducts(dV, dK, dQ, psb, dsb, dob, qb, kb);
        WgmmaWait<0>();
        FenceAccumulators(dV);
        FenceAccumulators(dK);
        FenceAccumulators(dQ);
        __syncthreads();  // every warp's products have read P^T and dS^T: dQ's boxes go over them
      } else {
      // dV += P^T dO, dK += dS^T Q: left running while dS^T goes to shared memory.
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) WgmmaRs64x64<1>(dV, pa[kk], SwizzledDescMN(dob + kk * 2048, kWbTile), 1);
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) WgmmaRs64x64<1>(dK, sa[kk], SwizzledDescMN(qb + kk * 2048, kWbTile), 1);
      WgmmaCommit();
      StoreDsT(ds_s, sa, warp * 16 + g, t);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if (tid == 0) BulkWaitRead<0>();  // the last tile's dQ boxes have been read: writable after the barrier
      __syncthreads();  // dS^T complete
      // dQ = dS K: A = dS (rows x keys) read M-major from dS^T, B = K (keys x d) read N-major.
      WgmmaFence();
      WgmmaSs64x64First<1, 1>(dQ, SwizzledDescMN(dsb, kWbTile), SwizzledDescMN(kb, kWbTile));
#pragma unroll
      for (int kk = 1; kk < KK; ++kk) {
        WgmmaSs64x64<1, 1>(dQ, SwizzledDescMN(dsb + kk * 2048, kWbTile), SwizzledDescMN(kb + kk * 2048, kWbTile), 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceAccumulators(dV);
      FenceAccumulators(dK);
      FenceAccumulators(dQ);
      KeepLive(pa);  // read by the products in flight until the wait
      KeepLive(sa);
      }
      // dQ into its staging boxes, then one thread has both added into dq. Rows >= r_stop see none
      // of the keys (their dS is 0, so they add zeros); rows past N are outside the map.
      StageDq(dq_s, dQ, warp * 16 + g, t, 1.0f);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to the copy engine
      __syncthreads();
      if (tid == 0) ReduceBoxes<2>(&map_dq, h * 64, rt, dq_sb);
    };
    // Block-uniform: some row of the tile sees some key (the rows start at rt >= k0, so each sees k0
    // unless its sequence starts later; starts do not decrease), and all rows see all keys whole.
    if (ssr[0] <= k_last) {
      if (k0 + kWbRows - 1 <= rt && ssr[kWbRows - 1] <= k0) tile(std::false_type{});
      else tile(std::true_type{});
    }

    if (has_next) {
      CopiesLandedBut(kStages == 3 && issues ? 1 : 0);  // the next tile's; the one after may be in flight
      if (tid < kWbRows) store_stats(buf ^ 1);
    }
    if (kSs && tid == 0) BulkWaitRead<0>();  // dQ's boxes read: P^T and dS^T may be written over them
    __syncthreads();  // the next tile is in; everyone is done with this one and with dS^T
  }
  if (kStages == 3) CpAsyncWaitAll();  // a second tile copied ahead that no row of the block reads

  // This block's share of dk, dv (the other query heads of the group add theirs). Adding them by
  // tensor reductions through dQ's boxes instead ran 1.3% faster alone, 0.12 ms of the bench's step,
  // under its spread (kernels.md, version 51; not kept).
  if (tid == 0) BulkWait<0>();  // the dQ reductions done before the block exits
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
    AtomicAddFrag<64>(dk, Hkv, kvh, keyA, keyB, dn * 8, dK[dn], 1.0f, N, t);
    AtomicAddFrag<64>(dv, Hkv, kvh, keyA, keyB, dn * 8, dV[dn], 1.0f, N, t);
  }
#else
  __trap();  // built without sm_90a: AttentionBackwardWgmmaSupported() said no
#endif
}


// The backward at D = 128 (Qwen3, Qwen2.5-1.5B and up, Llama): the D = 64 kernel's tile on two
// warpgroups, each owning one 64-wide half of D. Block = 64 keys x one query head, 256 threads; every
// [64][64] bf16 tile of the D = 64 kernel is here two tiles, one a half of D. Per query tile:
//   warpgroup 0 computes S^T = K Q^T and warpgroup 1 dP^T = V dO^T, each over the whole of D (8
//     products: the two halves' 4 k-steps); each writes its accumulators to shared memory in their
//     register order and reads the other's, so both hold S^T and dP^T;
//   both compute P^T and dS^T = P^T (dP^T - delta) (unscaled, as AttnBwdTcKernel: scale = 1/sqrt(128)
//     is not a power of two, so V is not pre-scaled and delta comes unscaled) and pack them;
//   warpgroup w: dV_w += P^T dO_w, dK_w += dS^T Q_w (its half of D), dS^T to shared memory (each
//     warpgroup writes half of it), then dQ_w = dS K_w, scaled, staged and added into dq by the
//     tensor memory accelerator (its two 32-column boxes);
// at the end scale dK_w and dV_w go into dk, dv with atomics. 254 registers, one block a
// multiprocessor (8 warps, as two blocks of the D = 64 kernel).
// kHalves (the default; kernels.md, version 35): instead of both finishing all of P^T and dS^T, each
// warpgroup passes the other only the half of its accumulators that one needs, finishes rows 32 w ..
// 32 w + 31 of the tile and writes them packed into shared memory; the three products then read P^T
// and dS^T from there (202 registers). kPipe (with kHalves and three stages; version 36): tile i's
// three products run on while the block passes its end barrier and issues tile i + 1's S^T / dP^T,
// and dQ_i is staged after that (183 registers).
constexpr int kWb2Threads = 256;
// K0, K1, V0, V1 | kStages x (Q0, Q1, dO0, dO1) | dS^T | P^T | dQ (two warpgroups x two boxes) | S^T,
// dP^T (f32) | 2 x (lse log2 e, delta, row start)[64] | r_stop | alignment
template <int kStages>
constexpr int Wb2Tiles() {
  return 6 + 4 * kStages;
}
template <int kStages>
constexpr int Wb2Smem() {
  return Wb2Tiles<kStages>() * kWbTile + 4 * kWbDqBox + 2 * 64 * 64 * 4 + 2 * 3 * kWbRows * 4 + 16 + 1024;
}

__device__ __forceinline__ void NamedBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <int kStages, bool kHalves, bool kPipe>
__global__ void __launch_bounds__(kWb2Threads, 1)
    AttnBwdWgmma128Kernel(float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                          const uint16_t* __restrict__ dout16, const uint16_t* __restrict__ q16,
                          const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,
                          const float* __restrict__ delta, const int* __restrict__ row_start,
                          const int32_t* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                          const __grid_constant__ CUtensorMap map_dq) {
#ifdef AHA_WGMMA
  constexpr int KK = 4, DN = 8, T = kWbTile;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = AlignSmem1024(smem_raw);
  const uint32_t base = SmemAddr(smem);
  const int tid = threadIdx.x, wg = tid >> 7, wt = tid & 127, warp = wt >> 5, lane = tid & 31, g = lane >> 2,
            t = lane & 3;
  // Tiles: K half j at j T, V half j at (2 + j) T, stage b's Q half j at (4 + 4 b + j) T and dO half j
  // at (6 + 4 b + j) T, then dS^T and P^T.
  constexpr int kTiles = Wb2Tiles<kStages>(), kDs = kTiles - 2;
  const uint32_t kb = base, vb = base + 2 * T, dsb = base + kDs * T, psb = dsb + T;
  unsigned char* ds_s = smem + kDs * T;
  unsigned char* ps_s = ds_s + T;
  unsigned char* dq_s = smem + kTiles * T + wg * 2 * kWbDqBox;  // this warpgroup's two boxes
  const uint32_t dq_sb = base + kTiles * T + wg * 2 * kWbDqBox;
  float4* xch = reinterpret_cast<float4*>(smem + kTiles * T + 4 * kWbDqBox);  // [2][8][128] float4
  float* stats = reinterpret_cast<float*>(xch + 2 * 8 * 128);
  int* r_stop_s = reinterpret_cast<int*>(stats + 6 * kWbRows);

  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int k0 = blockIdx.y * kWbRows;
  const int k_last = min(k0 + kWbRows, N) - 1;
  const int keyA = k0 + warp * 16 + g, keyB = keyA + 8;
  const float scale_log2 = scale * kLog2e;

  // Row statistics (RowStats) into buffer b of stats: [lse log2 e | delta | start][64] at 3 b * 64.
  RowStats st;
  auto load_stats = [&](int r) { st.Load(lse, delta, row_start, r, N, Hq, h); };
  auto store_stats = [&](int b) {
    float* at = stats + 3 * b * kWbRows;
    st.Store(at, at + kWbRows, reinterpret_cast<int*>(at + 2 * kWbRows), tid);
  };
  auto issue = [&](int rt, int b) {
    unsigned char* dst = smem + (4 + 4 * b) * T;
    CopyTile64<kWb2Threads, 128>(dst, q16, rt, N, Hq, h, tid, 0);
    CopyTile64<kWb2Threads, 128>(dst + T, q16, rt, N, Hq, h, tid, 1);
    CopyTile64<kWb2Threads, 128>(dst + 2 * T, dout16, rt, N, Hq, h, tid, 0);
    CopyTile64<kWb2Threads, 128>(dst + 3 * T, dout16, rt, N, Hq, h, tid, 1);
    CpAsyncCommit();
  };

  issue(k0, 0);
  if (kStages == 3) issue(k0 + kWbRows, 1);  // (rows past the block's last sequence: never read)
  if (tid < kWbRows) load_stats(k0 + tid);
  // K and V of the block's keys, rounded to bf16 (V unscaled), each half of D swizzled in its tile.
#pragma unroll
  for (int it = 0; it < 8; ++it) {
    const int f = tid + it * kWb2Threads;  // 2048 float4 of a 64 x 128 tile
    const int rr = f >> 5, d4 = f & 31, half = d4 >> 4, dh = d4 & 15;
    const int key = k0 + rr;
    float4 kx = Zero4(), vx = Zero4();
    if (key < N) {
      const size_t off = (static_cast<size_t>(key) * Hkv + kvh) * 128 + d4 * 4;
      kx = Ldg4(k + off);
      vx = Ldg4(v + off);
    }
    const int at = half * T + Swizzled128(rr, dh >> 1) + (dh & 1) * 8;
    *reinterpret_cast<uint2*>(smem + at) = PackBf16x4(kx);
    *reinterpret_cast<uint2*>(smem + 2 * T + at) = PackBf16x4(vx);
  }
  if (tid == 0) *r_stop_s = __ldg(cu + FindSeq(cu, S, k_last) + 1);
  if (tid < kWbRows) store_stats(0);
  CopiesLandedBut(kStages == 3 ? 1 : 0);
  __syncthreads();
  const int r_stop = *r_stop_s;

  float dK[DN][4], dV[DN][4];
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
    for (int c = 0; c < 4; ++c) dK[dn][c] = dV[dn][c] = 0.0f;
  }

  // Per query tile: the S^T or dP^T product (warpgroup 0 or 1; one commit group into s_dp).
  auto s_dp_issue = [&](float (&s_dp)[DN][4], uint32_t qb, uint32_t dob) {
    const uint32_t a0 = wg == 0 ? kb : vb, b0 = wg == 0 ? qb : dob;
    WgmmaFence();
    WgmmaSs64x64First<0, 0>(s_dp, SwizzledDesc(a0), SwizzledDesc(b0));
#pragma unroll
    for (int kk = 1; kk < 2 * KK; ++kk) {
      const uint32_t at = (kk >> 2) * T + (kk & 3) * 32;
      WgmmaSs64x64<0, 0>(s_dp, SwizzledDesc(a0 + at), SwizzledDesc(b0 + at), 1);
    }
    WgmmaCommit();
  };
  // kHalves: warpgroup w finishes n-tiles 4 w .. 4 w + 3 (the tile's rows 32 w .. 32 w + 31) of P^T and
  // dS^T. It passes the other the n-tiles that one finishes (warpgroup 0 its S^T of n-tiles 4-7,
  // warpgroup 1 its dP^T of 0-3; thread wt of both holds the same elements), then writes both into
  // shared memory ([64 keys][64 rows] bf16, swizzled: key r's rows 8 c .. 8 c + 7 in chunk c ^ (r & 7);
  // warpgroup w writes chunks 4 w .. 4 w + 3 of each), from where the three products read them whole.
  // Ends with the barrier after which they are complete.
  auto finish_halves = [&](auto masked, const float (&mine)[DN][4], int rt, const float* l2, const float* dl,
                           const int* ssr) {
    constexpr int H = DN / 2;
#pragma unroll
    for (int j = 0; j < H; ++j) {  // chosen by value: a row index known only at run time spills
      float4 x;
      x.x = wg == 0 ? mine[H + j][0] : mine[j][0];
      x.y = wg == 0 ? mine[H + j][1] : mine[j][1];
      x.z = wg == 0 ? mine[H + j][2] : mine[j][2];
      x.w = wg == 0 ? mine[H + j][3] : mine[j][3];
      xch[(wg * H + j) * 128 + wt] = x;
    }
    __syncthreads();
    float pv[H][4], sv[H][4];
#pragma unroll
    for (int j = 0; j < H; ++j) {
      const float4 o = xch[((1 - wg) * H + j) * 128 + wt];
      const float of[4] = {o.x, o.y, o.z, o.w};
      const int nt = wg * H + j;
      constexpr bool kMasked = decltype(masked)::value;
      const NtStats n = LoadNtStats<kMasked>(l2, dl, ssr, nt, t);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = rt + (nt * 8 + 2 * t + (c & 1));
        const float s_v = wg == 0 ? mine[j][c] : of[c], dp_v = wg == 0 ? of[c] : mine[H + j][c];
        const float2 pds = PdsElement<kMasked>(s_v, dp_v, n, c, c < 2 ? keyA : keyB, row, scale_log2);
        pv[j][c] = pds.x;
        sv[j][c] = pds.y;
      }
    }
    const int rA = warp * 16 + g, rB = rA + 8;
#pragma unroll
    for (int kk2 = 0; kk2 < H / 2; ++kk2) {
      uint32_t pa[4], sa[4];
      PackPFrag(pa, pv[2 * kk2], pv[2 * kk2 + 1]);
      PackPFrag(sa, sv[2 * kk2], sv[2 * kk2 + 1]);
      const int c0 = 2 * (wg * (H / 2) + kk2), c1 = c0 + 1;
      const int at[4] = {Swizzled128(rA, c0) + 4 * t, Swizzled128(rB, c0) + 4 * t, Swizzled128(rA, c1) + 4 * t,
                         Swizzled128(rB, c1) + 4 * t};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        *reinterpret_cast<uint32_t*>(ps_s + at[e]) = pa[e];
        *reinterpret_cast<uint32_t*>(ds_s + at[e]) = sa[e];
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    if (!kPipe && wt == 0) BulkWaitRead<0>();  // this warpgroup's last dQ boxes have been read
    __syncthreads();  // P^T and dS^T complete; the exchange area free again
  };
  // kHalves: dV_w += P^T dO_w, dK_w += dS^T Q_w (A K-major from the tiles above), dQ_w = dS K_w; one
  // commit group.
  auto products_issue = [&](float (&dQ)[DN][4], uint32_t qb, uint32_t dob) {
    IssueBackwardProducts(dV, dK, dQ, psb, dsb, dob + wg * T, qb + wg * T, kb + wg * T);
  };
  // dQ_w, scaled, into this warpgroup's boxes, then added into dq by the tensor memory accelerator.
  auto dq_out = [&](const float (&dQ)[DN][4], int rt) {
    StageDq(dq_s, dQ, warp * 16 + g, t, scale);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    NamedBarrier(1 + wg, 128);  // this warpgroup's boxes are written
    if (wt == 0) ReduceBoxes<2>(&map_dq, h * 128 + wg * 64, rt, dq_sb);
  };
  // Whether a tile needs no mask: its rows see all of the block's keys whole.
  auto whole = [&](int rt, const int* ssr) { return k0 + kWbRows - 1 <= rt && ssr[kWbRows - 1] <= k0; };

  int buf = 0, qbuf = 0;  // as in AttnBwdWgmmaKernel
  if constexpr (kPipe) {
    // Tile i's three products run while the block passes its end-of-tile barrier and issues tile
    // i + 1's S^T / dP^T; dQ_i leaves after that (wgmma.wait_group 1), and the dQ boxes' previous
    // reduction is awaited before the barrier. Every tile below r_stop is computed (its rows are in
    // the keys' sequences, so sees() holds).
    float mine[DN][4], dQ[DN][4];
    s_dp_issue(mine, base + 4 * T, base + 6 * T);
    for (int rt = k0; rt < r_stop; rt += kWbRows, buf ^= 1, qbuf = qbuf + 1 == kStages ? 0 : qbuf + 1) {
      const bool has_next = rt + kWbRows < r_stop;
      const bool issues = rt + (kStages - 1) * kWbRows < r_stop;
      if (has_next && tid < kWbRows) load_stats(rt + kWbRows + tid);
      const uint32_t qb = base + (4 + 4 * qbuf) * T, dob = qb + 2 * T;
      const float* l2 = stats + 3 * buf * kWbRows;
      const int* ssr = reinterpret_cast<const int*>(l2 + 2 * kWbRows);
      WgmmaWait<0>();
      FenceAccumulators(mine);
      if (whole(rt, ssr)) finish_halves(std::false_type{}, mine, rt, l2, l2 + kWbRows, ssr);
      else finish_halves(std::true_type{}, mine, rt, l2, l2 + kWbRows, ssr);
      // Tile i + 2's Q and dO into the stage tile i - 1's products read: after the barrier above, which
      // every thread passes only once its warpgroup's products of tile i - 1 are done.
      if (issues) issue(rt + (kStages - 1) * kWbRows, qbuf == 0 ? kStages - 1 : qbuf - 1);
      products_issue(dQ, qb, dob);
      if (has_next) {
        CopiesLandedBut(issues ? 1 : 0);
        if (tid < kWbRows) store_stats(buf ^ 1);
      }
      if (wt == 0) BulkWaitRead<0>();  // this warpgroup's last dQ boxes have been read
      __syncthreads();  // the next tile is in; everyone is done with this one's exchange
      if (has_next) {
        const int nq = qbuf + 1 == kStages ? 0 : qbuf + 1;
        s_dp_issue(mine, base + (4 + 4 * nq) * T, base + (6 + 4 * nq) * T);
        WgmmaWait<1>();
      } else {
        WgmmaWait<0>();
      }
      FenceAccumulators(dV);
      FenceAccumulators(dK);
      FenceAccumulators(dQ);
      dq_out(dQ, rt);
    }
  } else {
  for (int rt = k0; rt < r_stop; rt += kWbRows, buf ^= 1, qbuf = qbuf + 1 == kStages ? 0 : qbuf + 1) {
    const bool has_next = rt + kWbRows < r_stop;
    const bool issues = rt + (kStages - 1) * kWbRows < r_stop;
    if (issues) issue(rt + (kStages - 1) * kWbRows, qbuf == 0 ? kStages - 1 : qbuf - 1);
    if (has_next && tid < kWbRows) load_stats(rt + kWbRows + tid);
    const uint32_t qb = base + (4 + 4 * qbuf) * T, dob = qb + 2 * T;
    const float* l2 = stats + 3 * buf * kWbRows;
    const float* dl = l2 + kWbRows;
    const int* ssr = reinterpret_cast<const int*>(l2 + 2 * kWbRows);

    auto tile = [&](auto masked) {
      // Warpgroup 0: S^T = K Q^T; warpgroup 1: dP^T = V dO^T; over both halves of D.
      float mine[DN][4], dQ[DN][4];
      s_dp_issue(mine, qb, dob);
      WgmmaWait<0>();
      FenceAccumulators(mine);
      if constexpr (kHalves) {
        finish_halves(masked, mine, rt, l2, dl, ssr);
        products_issue(dQ, qb, dob);
        WgmmaWait<0>();
        FenceAccumulators(dV);
        FenceAccumulators(dK);
        FenceAccumulators(dQ);
      } else {
      float other[DN][4];
      const uint32_t dob_w = dob + wg * T, qb_w = qb + wg * T, kb_w = kb + wg * T;
      // Exchange: the same fragment layout on both warpgroups, so thread wt of one holds the
      // elements thread wt of the other needs.
#pragma unroll
      for (int j = 0; j < DN; ++j) {
        xch[(wg * DN + j) * 128 + wt] = make_float4(mine[j][0], mine[j][1], mine[j][2], mine[j][3]);
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < DN; ++j) {
        const float4 o = xch[((1 - wg) * DN + j) * 128 + wt];
        other[j][0] = o.x, other[j][1] = o.y, other[j][2] = o.z, other[j][3] = o.w;
      }
      // P^T into mine, dS^T into other: element (nt, c) is key keyA (c < 2) or keyB x tile row 8 nt +
      // 2 t + (c & 1).
#pragma unroll
      for (int nt = 0; nt < DN; ++nt) {
        constexpr bool kMasked = decltype(masked)::value;
        const NtStats n = LoadNtStats<kMasked>(l2, dl, ssr, nt, t);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int row = rt + (nt * 8 + 2 * t + (c & 1));
          const float a = mine[nt][c], b = other[nt][c];
          const float2 pds = PdsElement<kMasked>(wg == 0 ? a : b, wg == 0 ? b : a, n, c, c < 2 ? keyA : keyB, row,
                                                 scale_log2);
          mine[nt][c] = pds.x;   // P^T
          other[nt][c] = pds.y;  // dS^T
        }
      }
      uint32_t pa[KK][4], sa[KK][4];
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
        PackPFrag(pa[kk], mine[2 * kk], mine[2 * kk + 1]);
        PackPFrag(sa[kk], other[2 * kk], other[2 * kk + 1]);
      }
      // dV_w += P^T dO_w, dK_w += dS^T Q_w: left running while dS^T goes to shared memory.
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) WgmmaRs64x64<1>(dV, pa[kk], SwizzledDescMN(dob_w + kk * 2048, kWbTile), 1);
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) WgmmaRs64x64<1>(dK, sa[kk], SwizzledDescMN(qb_w + kk * 2048, kWbTile), 1);
      WgmmaCommit();
      // dS^T [64 keys][64 rows] bf16, swizzled; warpgroup w writes row chunks 4 w .. 4 w + 3.
      {
        const int rA = warp * 16 + g, rB = rA + 8;
#pragma unroll
        for (int kk2 = 0; kk2 < KK / 2; ++kk2) {
          const int kk = wg * (KK / 2) + kk2;
          const int c0 = 2 * kk, c1 = 2 * kk + 1;
          uint32_t x[4];  // sa[kk] chosen by value: an index known only at run time would put sa in memory
#pragma unroll
          for (int e = 0; e < 4; ++e) x[e] = wg == 0 ? sa[kk2][e] : sa[KK / 2 + kk2][e];
          *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rA, c0) + 4 * t) = x[0];
          *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rB, c0) + 4 * t) = x[1];
          *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rA, c1) + 4 * t) = x[2];
          *reinterpret_cast<uint32_t*>(ds_s + Swizzled128(rB, c1) + 4 * t) = x[3];
        }
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if (wt == 0) BulkWaitRead<0>();  // this warpgroup's last dQ boxes have been read
      __syncthreads();                 // dS^T complete; the exchange area free again
      WgmmaFence();
      WgmmaSs64x64First<1, 1>(dQ, SwizzledDescMN(dsb, kWbTile), SwizzledDescMN(kb_w, kWbTile));
#pragma unroll
      for (int kk = 1; kk < KK; ++kk) {
        WgmmaSs64x64<1, 1>(dQ, SwizzledDescMN(dsb + kk * 2048, kWbTile), SwizzledDescMN(kb_w + kk * 2048, kWbTile),
                           1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceAccumulators(dV);
      FenceAccumulators(dK);
      FenceAccumulators(dQ);
      KeepLive(pa);
      KeepLive(sa);
      }
      dq_out(dQ, rt);
    };
    if (ssr[0] <= k_last) {
      if (k0 + kWbRows - 1 <= rt && ssr[kWbRows - 1] <= k0) tile(std::false_type{});
      else tile(std::true_type{});
    }

    if (has_next) {
      CopiesLandedBut(kStages == 3 && issues ? 1 : 0);
      if (tid < kWbRows) store_stats(buf ^ 1);
    }
    __syncthreads();
  }
  }
  if (kStages == 3) CpAsyncWaitAll();

  if (wt == 0) BulkWait<0>();
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
    AtomicAddFrag<128>(dk, Hkv, kvh, keyA, keyB, wg * 64 + dn * 8, dK[dn], scale, N, t);
    AtomicAddFrag<128>(dv, Hkv, kvh, keyA, keyB, wg * 64 + dn * 8, dV[dn], 1.0f, N, t);
  }
#else
  __trap();  // built without sm_90a: AttentionBackwardWgmmaSupported() said no
#endif
}

// The backward at D = 128 in FlashAttention-3's layout (kernels.md, version 48): no exchange between
// the warpgroups. Block = 128 keys x one query head, 384 threads: warpgroups 0 and 1 (the consumers)
// each own 64 keys, k0 + 64 w .. + 63, and run the D = 64 kernel's tile on them at D = 128; warpgroup
// 2 (the producer) copies each query tile's Q and dO halves with the tensor memory accelerator and
// the rows' statistics into kStages stages, and gives its registers to the consumers (setmaxnreg:
// 2 x 128 x 232 + 128 x 40 <= 64K, as mlp.cu). Per query tile of 64 rows and consumer w, all on m64n64k16:
//   S^T = K_w Q^T and dP^T = V_w dO^T over both halves of D (A and B K-major from shared memory:
//     16 products, one commit group);
//   P^T and dS^T = P^T (dP^T - delta) on the accumulators (unscaled, as AttnBwdWgmma128Kernel), packed;
//   dV_w += P^T dO and dK_w += dS^T Q, each half of D its own m64n64 product (A from registers, B
//     read N-major: 16 products), left running while dS^T goes to the warpgroup's own tile;
//   dQ_w = dS K_w (A = dS^T read M-major, B = K_w's halves read N-major: 8 products), both halves
//     scaled, staged and added into dq by the tensor memory accelerator (4 boxes of 32 columns): the
//     two consumers' shares of the tile's dQ add there.
// Each consumer computes every tile from k0 to the end of its keys' last sequence; a tile whose rows
// see none of its keys is masked whole (the mask zeroes P^T and dS^T): a per-warpgroup skip made
// ptxas serialize the kernel's wgmma (C7520). The mask is chosen for the whole block. The sums of
// a consumer's dK_w, dV_w and of each tile's dQ_w are those of AttnBwdWgmma128Kernel's block on the
// same 64 keys (its extra tiles add zeros), so the two agree up to the order of the atomics.
constexpr int kWkKeys = 128;
constexpr int kWkThreads = 384;
constexpr int kWkStages = 2;
// Tiles: K_w half j at (2 w + j) T, V_w half j at (4 + 2 w + j) T, stage b's Q half j at (8 + 4 b + j) T
// and dO half j at (10 + 4 b + j) T, dS^T of consumer w at (8 + 4 kStages + w) T | consumer w's four dQ
// boxes | kStages x (lse log2 e, delta, row start)[64] | 2 kStages barriers | alignment.
constexpr int WkTiles() { return 8 + 4 * kWkStages + 2; }
constexpr int WkSmem() {
  return WkTiles() * kWbTile + 2 * 4 * kWbDqBox + kWkStages * 3 * kWbRows * 4 + 2 * kWkStages * 8 + 1024;
}

// The copying warp starts as soon as the barriers exist, while each consumer loads its own K_w and
// V_w and waits for its own warps only (kernels.md, version 50); at the end a consumer's dK_w and
// dV_w leave through its dQ boxes by tensor reductions (map_dk, map_dv: dk, dv as [N, Hkv * 128];
// version 49). Against per-lane atomics after a whole-block start (version 48) the two took the
// kernel from 0.882 to 0.837 ms at 16 x 1,024 (16 / 8 heads) and left 4 x 8,192 as it was.
__global__ void __launch_bounds__(kWkThreads, 1)
    AttnBwdWgmmaKeysKernel(float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                           const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,
                           const float* __restrict__ delta, const int* __restrict__ row_start,
                           const int32_t* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                           const __grid_constant__ CUtensorMap map_dq, const __grid_constant__ CUtensorMap map_q,
                           const __grid_constant__ CUtensorMap map_do, const __grid_constant__ CUtensorMap map_dk,
                           const __grid_constant__ CUtensorMap map_dv) {
#ifdef AHA_WGMMA
  constexpr int KK = 4, DN = 8, T = kWbTile, kStages = kWkStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = AlignSmem1024(smem_raw);
  const uint32_t base = SmemAddr(smem);
  const int tid = threadIdx.x, wg = tid >> 7, wt = tid & 127, warp = wt >> 5, lane = tid & 31, g = lane >> 2,
            t = lane & 3;
  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int k0 = blockIdx.y * kWkKeys;
  const int k_last = min(k0 + kWkKeys, N) - 1;
  constexpr int kDs = 8 + 4 * kStages;
  unsigned char* dq_all = smem + WkTiles() * T;
  float* stats = reinterpret_cast<float*>(dq_all + 2 * 4 * kWbDqBox);  // stage b's at 3 b * 64
  const uint32_t bars = SmemAddr(stats + kStages * 3 * kWbRows);
  auto full = [&](int b) { return bars + 8u * b; };
  auto empty = [&](int b) { return bars + 8u * (kStages + b); };

  if (tid == 256) {
    for (int b = 0; b < kStages; ++b) {
      MbarInit(full(b), 32 + 1);  // the producer's statistics warp, and the copies' bytes
      MbarInit(empty(b), 2);      // one arrival a consumer
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
  }
  __syncthreads();  // the barriers
  // r_stop: the end of the last key's sequence; rows >= r_stop belong to later sequences; r_stop <= N.
  const int r_stop = __ldg(cu + FindSeq(cu, S, k_last) + 1);
  const int tiles = (r_stop - k0 + kWbRows - 1) / kWbRows;

  if (wg == 2) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp != 0) return;
    for (int i = 0; i < tiles; ++i) {
      const int b = i % kStages, rt = k0 + i * kWbRows;
      if (i >= kStages) MbarWait(empty(b), ((i / kStages) - 1) & 1);  // both consumers are done with it
      if (lane == 0) {
        MbarExpectBytes(full(b), 4 * T);
        const uint32_t qb = base + (8 + 4 * b) * T;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          TmaLoad(qb + j * T, &map_q, h * 128 + j * 64, rt, full(b));
          TmaLoad(qb + (2 + j) * T, &map_do, h * 128 + j * 64, rt, full(b));
        }
      }
      float* at = stats + 3 * b * kWbRows;
      RowStats st;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        st.Load(lse, delta, row_start, rt + lane + 32 * e, N, Hq, h);
        st.Store(at, at + kWbRows, reinterpret_cast<int*>(at + 2 * kWbRows), lane + 32 * e);
      }
      MbarArrive(full(b));  // release: the statistics are visible to the consumers' wait
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  // K_w and V_w rounded to bf16 (V unscaled), each half of D swizzled in its tile (zeros past N); read
  // by this consumer's products only.
#pragma unroll 4
  for (int it = 0; it < 16; ++it) {
    const int f = wt + it * 128;  // 2048 float4 of a 64 x 128 tile
    const int rr = f >> 5, d4 = f & 31, half = d4 >> 4, dh = d4 & 15;
    const int key = k0 + 64 * wg + rr;
    float4 kx = Zero4(), vx = Zero4();
    if (key < N) {
      const size_t off = (static_cast<size_t>(key) * Hkv + kvh) * 128 + d4 * 4;
      kx = Ldg4(k + off);
      vx = Ldg4(v + off);
    }
    const int at = (2 * wg + half) * T + Swizzled128(rr, dh >> 1) + (dh & 1) * 8;
    *reinterpret_cast<uint2*>(smem + at) = PackBf16x4(kx);
    *reinterpret_cast<uint2*>(smem + 4 * T + at) = PackBf16x4(vx);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // read by the tensor cores
  NamedBarrier(1 + wg, 128);  // this consumer's K_w and V_w

  const int kw0 = k0 + 64 * wg;
  const int keyA = kw0 + warp * 16 + g, keyB = keyA + 8;
  const float scale_log2 = scale * kLog2e;
  const uint32_t kb = base + 2 * wg * T, vb = base + (4 + 2 * wg) * T, dsb = base + (kDs + wg) * T;
  unsigned char* ds_s = smem + (kDs + wg) * T;
  unsigned char* dq_s = dq_all + wg * 4 * kWbDqBox;  // this consumer's four boxes
  const uint32_t dq_sb = SmemAddr(dq_s);
  float dK[2 * DN][4], dV[2 * DN][4];
#pragma unroll
  for (int dn = 0; dn < 2 * DN; ++dn) {
#pragma unroll
    for (int c = 0; c < 4; ++c) dK[dn][c] = dV[dn][c] = 0.0f;
  }

  for (int i = 0; i < tiles; ++i) {
    const int b = i % kStages, rt = k0 + i * kWbRows;
    const uint32_t qb = base + (8 + 4 * b) * T, dob = qb + 2 * T;
    const float* l2 = stats + 3 * b * kWbRows;
    const float* dl = l2 + kWbRows;
    const int* ssr = reinterpret_cast<const int*>(l2 + 2 * kWbRows);
    MbarWait(full(b), (i / kStages) & 1);

    auto tile = [&](auto masked) {
      float sT[DN][4], dpT[DN][4];
      WgmmaFence();
      WgmmaSs64x64First<0, 0>(sT, SwizzledDesc(kb), SwizzledDesc(qb));
#pragma unroll
      for (int kk = 1; kk < 2 * KK; ++kk) {
        const uint32_t at = (kk >> 2) * T + (kk & 3) * 32;
        WgmmaSs64x64<0, 0>(sT, SwizzledDesc(kb + at), SwizzledDesc(qb + at), 1);
      }
      WgmmaSs64x64First<0, 0>(dpT, SwizzledDesc(vb), SwizzledDesc(dob));
#pragma unroll
      for (int kk = 1; kk < 2 * KK; ++kk) {
        const uint32_t at = (kk >> 2) * T + (kk & 3) * 32;
        WgmmaSs64x64<0, 0>(dpT, SwizzledDesc(vb + at), SwizzledDesc(dob + at), 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceAccumulators(sT);
      FenceAccumulators(dpT);
      uint32_t pa[KK][4], sa[KK][4];
      PackPds<decltype(masked)::value>(pa, sa, sT, dpT, l2, dl, ssr, rt, keyA, keyB, t, scale_log2);
      // dV_w += P^T dO, dK_w += dS^T Q, a half of D each m64n64: left running while dS^T is stored.
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
        WgmmaRs64x64Half<1, 0>(dV, pa[kk], SwizzledDescMN(dob + kk * 2048, T), 1);
        WgmmaRs64x64Half<1, 1>(dV, pa[kk], SwizzledDescMN(dob + T + kk * 2048, T), 1);
      }
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
        WgmmaRs64x64Half<1, 0>(dK, sa[kk], SwizzledDescMN(qb + kk * 2048, T), 1);
        WgmmaRs64x64Half<1, 1>(dK, sa[kk], SwizzledDescMN(qb + T + kk * 2048, T), 1);
      }
      WgmmaCommit();
      StoreDsT(ds_s, sa, warp * 16 + g, t);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if (wt == 0) BulkWaitRead<0>();  // the last tile's dQ boxes have been read: writable after the barrier
      NamedBarrier(1 + wg, 128);       // dS^T complete
      WgmmaWait<0>();  // dV and dK done: P^T's and dS^T's registers free for dQ's accumulators
      FenceAccumulators(dV);
      FenceAccumulators(dK);
      KeepLive(pa);
      KeepLive(sa);
      // dQ_w = dS K_w: A = dS (rows x keys) read M-major from dS^T, B = K_w's halves read N-major.
      float dQ0[DN][4], dQ1[DN][4];
      WgmmaFence();
      WgmmaSs64x64First<1, 1>(dQ0, SwizzledDescMN(dsb, T), SwizzledDescMN(kb, T));
      WgmmaSs64x64First<1, 1>(dQ1, SwizzledDescMN(dsb, T), SwizzledDescMN(kb + T, T));
#pragma unroll
      for (int kk = 1; kk < KK; ++kk) {
        WgmmaSs64x64<1, 1>(dQ0, SwizzledDescMN(dsb + kk * 2048, T), SwizzledDescMN(kb + kk * 2048, T), 1);
        WgmmaSs64x64<1, 1>(dQ1, SwizzledDescMN(dsb + kk * 2048, T), SwizzledDescMN(kb + T + kk * 2048, T), 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceAccumulators(dQ0);
      FenceAccumulators(dQ1);
      // Scaled into the four boxes, then one thread has them added into dq. Rows past N are outside
      // the map; rows that see none of the keys add zeros.
      StageDq(dq_s, dQ0, warp * 16 + g, t, scale);
      StageDq(dq_s + 2 * kWbDqBox, dQ1, warp * 16 + g, t, scale);
    };
    // Block-uniform: no mask when every row of the tile sees all 128 keys whole.
    if (k0 + kWkKeys - 1 <= rt && ssr[kWbRows - 1] <= k0) tile(std::false_type{});
    else tile(std::true_type{});

    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the boxes, visible to the copy engine
    NamedBarrier(1 + wg, 128);  // the boxes are written; every warp is done with stage b
    if (wt == 0) {
      MbarArrive(empty(b));
      ReduceBoxes<4>(&map_dq, h * 128, rt, dq_sb);
    }
  }

  // This consumer's share of dk (scaled) and dv (the other query heads of the group add theirs), each
  // through the four dQ boxes once the last tile's have been read, added by four tensor reductions
  // (keys past N are outside the maps); the boxes are read before dV goes over them.
  const int ra = warp * 16 + g;
  auto reduce = [&](const CUtensorMap* map, const float (&x)[2 * DN][4], float a) {
    if (wt == 0) BulkWaitRead<0>();
    NamedBarrier(1 + wg, 128);  // the boxes are free
    StageDq(dq_s, x, ra, t, a, 0);
    StageDq(dq_s + 2 * kWbDqBox, x, ra, t, a, DN);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to the copy engine
    NamedBarrier(1 + wg, 128);
    if (wt == 0) ReduceBoxes<4>(map, kvh * 128, kw0, dq_sb);
  };
  if (kw0 < N) {  // uniform in the warpgroup
    reduce(&map_dk, dK, scale);
    reduce(&map_dv, dV, 1.0f);
  }
  if (wt == 0) BulkWait<0>();  // every reduction done before the block exits
#else
  __trap();  // built without sm_90a: AttentionBackwardWgmmaSupported() said no
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
  static const bool d128 = [] {  // AHA_ATTENTION_WGMMA=64: D = 128 on mma.sync (the A/B)
    const char* e = std::getenv("AHA_ATTENTION_WGMMA");
    return e == nullptr || std::strcmp(e, "64") != 0;
  }();
  return on && (D == 64 || (D == 128 && d128)) && CurrentDeviceIsSm90();
#endif
}

// D = 64 with the wgmma forward (the same switch), D = 128 on any device that has it (there the
// forward stays on mma.sync); AHA_ATTENTION_WGMMA_BWD=0 turns both off, AHA_ATTENTION_WGMMA_BWD=64
// keeps D = 128 on mma.sync (the A/B).
bool AttentionBackwardWgmmaSupported(int D) {
  static const char* const e = std::getenv("AHA_ATTENTION_WGMMA_BWD");
  static const bool on = e == nullptr || std::strcmp(e, "0") != 0;
  static const bool d128 = e == nullptr || std::strcmp(e, "64") != 0;
  // The dQ reductions go through a tensor map, encoded through the driver's entry point.
  return on && (D == 64 || (D == 128 && d128)) && AttentionForwardWgmmaSupported(64) &&
         TensorMapEncoder() != nullptr;
}

size_t AttentionBackwardTCWorkspace(int N, int Hq, int D) {
  // AttentionBackwardWorkspace's delta | row_start, then bf16 copies of q and dout for the wgmma kernel.
  return AttentionBackwardWorkspace(N, Hq) + 2 * Align256(static_cast<size_t>(N) * Hq * D * sizeof(uint16_t));
}

void AttentionBackwardWgmma(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                            const float* q, const float* k, const float* v, const int32_t* cu_seqlens, int S, int N,
                            int Hq, int Hkv, int D, void* workspace, cudaStream_t s, const uint16_t* out16,
                            const uint16_t* dout16_in, const uint16_t* q16_in, int keys) {
  if (N <= 0) return;
  if (S <= 0) Fail("AttentionBackwardWgmma: S must be positive when N > 0; S", S);
  if (D != 64 && D != 128) Fail("AttentionBackwardWgmma: head width 64 or 128, not", D);
  CheckHeads(Hq, Hkv);
  float* delta = BackwardDelta(workspace);
  int* row_start = BackwardRowStart(workspace, N, Hq);
  const size_t n = static_cast<size_t>(N) * Hq * D;
  auto* q16_ws = reinterpret_cast<uint16_t*>(static_cast<char*>(workspace) + AttentionBackwardWorkspace(N, Hq));
  const uint16_t* q16 = q16_in ? q16_in : q16_ws;
  auto* dout16_ws = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(q16_ws) + Align256(n * sizeof(uint16_t)));
  const uint16_t* dout16 = dout16_in ? dout16_in : dout16_ws;
  // D = 64: 1/8, a power of two (the kernel scales V and delta by it); D = 128: delta unscaled.
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  CheckCuda(cudaMemsetAsync(dk, 0, static_cast<size_t>(N) * Hkv * D * sizeof(float), s), "cudaMemsetAsync(dk)");
  CheckCuda(cudaMemsetAsync(dv, 0, static_cast<size_t>(N) * Hkv * D * sizeof(float), s), "cudaMemsetAsync(dv)");
  const long long threads = static_cast<long long>(n) / 4;
  const unsigned pre_blocks = static_cast<unsigned>((threads + 255) / 256);
  if (D == 64)
    WgBwdPrepassKernel<64><<<pre_blocks, 256, 0, s>>>(delta, row_start, q16_ws, dout16_ws, dq, q, q16_in, dout,
                                                      dout16_in, out, out16, cu_seqlens, S, N, Hq, scale);
  else
    WgBwdPrepassKernel<128><<<pre_blocks, 256, 0, s>>>(delta, row_start, q16_ws, dout16_ws, dq, q, q16_in, dout,
                                                       dout16_in, out, out16, cu_seqlens, S, N, Hq, 1.0f);
  CheckCuda(cudaGetLastError(), "WgBwdPrepassKernel launch");
  const dim3 grid(Hq, GridRows(N, kWbRows));
  // dq as [N, Hq * D] f32, reduced into in boxes of 64 rows x 32 columns.
  const CUtensorMap map_dq = SwizzledRowsMapF32(dq, N, Hq * D, kWbRows, "AttentionBackwardWgmma dq");
  // Q and dO two tiles ahead (three stages) unless AHA_ATTENTION_BWD_STAGES=2 (one ahead; the A/B).
  static const int stages = [] {
    const char* e = std::getenv("AHA_ATTENTION_BWD_STAGES");
    return e != nullptr && std::strcmp(e, "2") == 0 ? 2 : 3;
  }();
  // D = 128: each warpgroup finishes half of P^T and dS^T unless AHA_ATTENTION_BWD_HALVES=0 (both
  // finish all of them; the A/B).
  static const bool halves = !EnvOff("AHA_ATTENTION_BWD_HALVES");
  // With both (D = 128): tile i's last products overlap tile i + 1's first (AHA_ATTENTION_BWD_PIPE=0: not).
  static const bool pipe = !EnvOff("AHA_ATTENTION_BWD_PIPE");
  // D = 64: P^T and dS^T through shared memory, three blocks a multiprocessor, unless
  // AHA_ATTENTION_BWD_SS=0 (from registers, two blocks; the A/B).
  static const bool ss = !EnvOff("AHA_ATTENTION_BWD_SS");
  // D = 128 in FlashAttention-3's layout (AttnBwdWgmmaKeysKernel) unless `keys` is 0, or -1 and
  // AHA_ATTENTION_BWD_KEYS=0 (the two-warpgroup kernel below, the A/B). On the H200 (kernels.md,
  // versions 48-50), ms a call at 16 / 8 heads: 0.837 against 1.031 at 16 x 1,024, 6.94-7.11 against
  // 11.20 at 4 x 8,192.
  static const bool keys_env = !EnvOff("AHA_ATTENTION_BWD_KEYS");
  if (D == 128 && (keys < 0 ? keys_env : keys != 0)) {
    const CUtensorMap map_q = SwizzledRowsMap(q16, N, Hq * D, kWbRows, "AttentionBackwardWgmma q");
    const CUtensorMap map_do = SwizzledRowsMap(dout16, N, Hq * D, kWbRows, "AttentionBackwardWgmma dout");
    const CUtensorMap map_dk = SwizzledRowsMapF32(dk, N, Hkv * D, kWbRows, "AttentionBackwardWgmma dk");
    const CUtensorMap map_dv = SwizzledRowsMapF32(dv, N, Hkv * D, kWbRows, "AttentionBackwardWgmma dv");
    AllowSmem(AttnBwdWgmmaKeysKernel, WkSmem());
    AttnBwdWgmmaKeysKernel<<<dim3(Hq, GridRows(N, kWkKeys)), kWkThreads, WkSmem(), s>>>(
        dq, dk, dv, k, v, lse, delta, row_start, cu_seqlens, S, N, Hq, Hkv, scale, map_dq, map_q, map_do, map_dk,
        map_dv);
    CheckCuda(cudaGetLastError(), "AttnBwdWgmmaKeysKernel launch");
    return;
  }
  auto launch = [&](auto kernel, int threads, int smem) {
    AllowSmem(kernel, smem);
    kernel<<<grid, threads, smem, s>>>(dq, dk, dv, dout16, q16, k, v, lse, delta, row_start, cu_seqlens, S, N, Hq,
                                       Hkv, scale, map_dq);
  };
  if (D == 64 && ss) launch(AttnBwdWgmmaKernel<2, true>, kWbThreads, WbSmemSs());
  else if (D == 64 && stages == 3) launch(AttnBwdWgmmaKernel<3, false>, kWbThreads, WbSmem<3>());
  else if (D == 64) launch(AttnBwdWgmmaKernel<2, false>, kWbThreads, WbSmem<2>());
  else if (stages == 3 && halves && pipe) launch(AttnBwdWgmma128Kernel<3, true, true>, kWb2Threads, Wb2Smem<3>());
  else if (stages == 3 && halves) launch(AttnBwdWgmma128Kernel<3, true, false>, kWb2Threads, Wb2Smem<3>());
  else if (stages == 3) launch(AttnBwdWgmma128Kernel<3, false, false>, kWb2Threads, Wb2Smem<3>());
  else if (halves) launch(AttnBwdWgmma128Kernel<2, true, false>, kWb2Threads, Wb2Smem<2>());
  else launch(AttnBwdWgmma128Kernel<2, false, false>, kWb2Threads, Wb2Smem<2>());
  CheckCuda(cudaGetLastError(), "AttnBwdWgmmaKernel launch");
}

// The forward's copy stages: 0 when the driver has no tensor-map encoder; else `stages` when it is 0
// (AttnFwdWgmmaKernel: every thread copies with cp.async, two buffers) or 2 .. 4
// (AttnFwdWgmmaTmaKernel), else AHA_ATTENTION_FWD_STAGES when it says 0 .. 4 (the A/B switch), else 2
// at D = 128; at D = 64 2 when the S sequences of the N rows average at least 8,192, else 0. Measured
// on the H200 (kernels.md, version 47), ms a call of stages 0 / 2 / 3 / 4: at 16 / 8 heads of 128,
// 16 x 1,024 tokens 0.282 / 0.236 / 0.238 / 0.234 and 4 x 8,192 2.893 / 2.189 / 2.448 / 2.337; at
// 14 / 2 heads of 64 (three warpgroups a block against two blocks of two) 0.128 / 0.135 / 0.136 /
// 0.134 and 1.218 / 1.145 / 1.164 / 1.155.
int WgFwdStages(int stages, int D, int N, int S) {
  static const int from_env = [] {
    const char* e = std::getenv("AHA_ATTENTION_FWD_STAGES");
    const int n = e != nullptr && e[0] != '\0' ? std::atoi(e) : -1;
    return n == 0 || (n >= 2 && n <= 4) ? n : -1;
  }();
  if (TensorMapEncoder() == nullptr) return 0;  // no tensor maps: only the cp.async kernel can run
  if (stages == 0 || (stages >= 2 && stages <= 4)) return stages;
  if (from_env >= 0) return from_env;
  return D == 128 || static_cast<long long>(N) >= 8192LL * S ? 2 : 0;
}

template <int D>
void LaunchForwardWgmma(float* out, uint16_t* out16, float* lse, const float* q, const uint16_t* q16s,
                        const uint16_t* k16, const uint16_t* v16, const int32_t* cu, int S, int N, int Hq, int Hkv,
                        int stages, cudaStream_t s) {
  const float qscale = AttentionQScale(D);
  if (stages == 0) {
    const dim3 grid(Hq, GridRows(N, kWgRows));
    AllowSmem(AttnFwdWgmmaKernel<D>, WgFwdSmem<D>());
    AttnFwdWgmmaKernel<D><<<grid, kWgThreads, WgFwdSmem<D>(), s>>>(out, out16, lse, q, q16s, k16, v16, cu, S, N, Hq,
                                                                   Hkv, qscale);
    CheckCuda(cudaGetLastError(), "AttnFwdWgmmaKernel launch");
    return;
  }
  const CUtensorMap map_k = SwizzledRowsMap(k16, N, Hkv * D, kWgKeys, "AttentionForwardWgmma k"),
                    map_v = SwizzledRowsMap(v16, N, Hkv * D, kWgKeys, "AttentionForwardWgmma v");
  const dim3 grid(Hq, GridRows(N, 64 * WgFwdTmaWgs<D>()));
  auto launch = [&](auto kernel, int smem) {
    AllowSmem(kernel, smem);
    kernel<<<grid, WgFwdTmaThreads<D>(), smem, s>>>(out, out16, lse, q, q16s, cu, S, N, Hq, Hkv, qscale, map_k,
                                                    map_v);
  };
  if (stages == 2) launch(AttnFwdWgmmaTmaKernel<D, 2>, WgFwdTmaSmem<D, 2>());
  else if (stages == 3) launch(AttnFwdWgmmaTmaKernel<D, 3>, WgFwdTmaSmem<D, 3>());
  else launch(AttnFwdWgmmaTmaKernel<D, 4>, WgFwdTmaSmem<D, 4>());
  CheckCuda(cudaGetLastError(), "AttnFwdWgmmaTmaKernel launch");
}

void AttentionForwardWgmma(float* out, float* lse, const float* q, const uint16_t* k16, const uint16_t* v16,
                           const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s,
                           uint16_t* out_bf16, const uint16_t* q_scaled16, int stages) {
  if (N <= 0) return;
  if (S <= 0) Fail("AttentionForwardWgmma: S must be positive when N > 0; S", S);
  if (D != 64 && D != 128) Fail("AttentionForwardWgmma: head width 64 or 128, not", D);
  CheckHeads(Hq, Hkv);
  const int ns = WgFwdStages(stages, D, N, S);
  if (D == 64) {
    LaunchForwardWgmma<64>(out, out_bf16, lse, q, q_scaled16, k16, v16, cu_seqlens, S, N, Hq, Hkv, ns, s);
  } else {
    LaunchForwardWgmma<128>(out, out_bf16, lse, q, q_scaled16, k16, v16, cu_seqlens, S, N, Hq, Hkv, ns, s);
  }
}

}  // namespace aha::engine::cuda

namespace aha::engine::cuda {
void AttentionWgmmaProbe(float* s_out, float* o_out, const float* q, const uint16_t* k, const uint16_t* v,
                         const uint16_t* p, int late, cudaStream_t s) {
  WgmmaProbeKernel<<<1, kWgThreads, kWgSmem, s>>>(s_out, o_out, q, k, v, p, late);
  CheckCuda(cudaGetLastError(), "WgmmaProbeKernel launch");
}
}  // namespace aha::engine::cuda
