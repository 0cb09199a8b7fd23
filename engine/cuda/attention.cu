// Attention kernels of the CUDA backend: causal GQA over packed variable-length sequences
// (forward and backward, flash-attention 2 style) and attention against the paged KV cache for
// generation (a row-wise kernel for prefill and chunks; for decode steps kernels that serve all query
// heads of a kv head and split long contexts across blocks: with bf16 pools on the tensor cores,
// DecodeTcKernel, else on the CUDA cores). f32 storage (the cache also bf16), f32 math on the CUDA
// cores except in DecodeTcKernel (bf16 mma.sync, f32 accumulation). The math is that of the
// same-named ops in engine/cpu_backend.cc; the design and the cost model are in docs/kernels.md
// ("Attention").
//
// Conventions shared by the kernels below:
//  - Scores are kept in the log2 domain: q is pre-multiplied by scale * log2(e), so that
//    softmax weights are exp2(s - m). lse is stored in natural-log units: lse = (m + log2 l) ln 2.
//  - A query row r of the packed axis may see key j iff seqstart(r) <= j <= r. Tiles of the packed
//    axis may span several sequences; every (row, key) pair inside a tile is masked by that rule,
//    so no tile boundary needs to line up with a sequence boundary.
//  - Rows or keys past N are zero-filled in shared memory and masked; nothing past N is written.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "engine/cuda/attention_internal.h"
#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {
namespace {

// ---- device helpers ---------------------------------------------------------------------------------

__device__ __forceinline__ float4 Ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void St4(float* p, float4 x) { *reinterpret_cast<float4*>(p) = x; }
__device__ __forceinline__ float4 Mul4(float4 x, float a) { return make_float4(x.x * a, x.y * a, x.z * a, x.w * a); }
__device__ __forceinline__ float Dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}
__device__ __forceinline__ float Get(float4 x, int e) { return e == 0 ? x.x : e == 1 ? x.y : e == 2 ? x.z : x.w; }

// W consecutive floats (W in {1, 2, 4}; p aligned to 4 W bytes) to and from registers.
template <int W>
__device__ __forceinline__ void LdVec(float* x, const float* p) {
  if constexpr (W == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    x[0] = t.x, x[1] = t.y, x[2] = t.z, x[3] = t.w;
  } else if constexpr (W == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    x[0] = t.x, x[1] = t.y;
  } else {
    static_assert(W == 1);
    x[0] = *p;
  }
}
template <int W>
__device__ __forceinline__ void StVec(float* p, const float* x, float a) {
  if constexpr (W == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0] * a, x[1] * a, x[2] * a, x[3] * a);
  } else if constexpr (W == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(x[0] * a, x[1] * a);
  } else {
    static_assert(W == 1);
    *p = x[0] * a;
  }
}
// p[0..W) += a * x[0..W) with one vector atomic where the hardware has it (sm_90: float2/float4).
template <int W>
__device__ __forceinline__ void AtomicAddVec(float* p, const float* x, float a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (W == 4) {
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(x[0] * a, x[1] * a, x[2] * a, x[3] * a));
  } else if constexpr (W == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(x[0] * a, x[1] * a));
  } else {
    atomicAdd(p, x[0] * a);
  }
#else
#pragma unroll
  for (int e = 0; e < W; ++e) atomicAdd(p + e, x[e] * a);
#endif
}

// Tiling constants of the training kernels (forward and backward). A block is 256 threads seen as a
// 16 x 16 grid (ty = tid / 16, tx = tid % 16); the 16 threads of one ty are one half-warp.
//  - Score tiles [64 x 64]: thread (ty, tx) owns rows ty*4 + i (i < 4) and columns tx + 16 j (j < 4).
//  - Output tiles [64 x D]: thread (ty, tx) owns rows ty*4 + i and TD = D / 16 columns, in NC chunks
//    of VW consecutive columns: column (c, e) = c*16*VW + tx*VW + e. For D = 64 that is one float4.
// Shared-memory rows of D floats are padded to LD = D + 4 floats: LD / 4 is odd for every D here, so
// the 16 different rows that a half-warp reads at one float4 column fall two to a bank quad, the
// minimum for 256 bytes (2 wavefronts), instead of all into one.
constexpr int kTile = 64;       // query rows per tile and keys per tile
constexpr int kThreads = 256;   // 16 x 16
constexpr int kLP = kTile + 4;  // padded row of a [64 x 64] score tile in shared memory

template <int D>
struct TileCfg {
  static_assert(D == 16 || D == 32 || D == 64 || D == 128, "head width");
  static constexpr int D4 = D / 4;
  static constexpr int LD = D + 4;
  static constexpr int TD = D / 16;
  static constexpr int VW = TD < 4 ? TD : 4;
  static constexpr int NC = TD / VW;
  static __device__ __forceinline__ int Col(int c, int tx) { return c * 16 * VW + tx * VW; }
};

// Copies rows [row0, row0 + 64) of head `head` of x[N, H, D] into dst[64][LD] (zeros past N),
// optionally scaled. 256 threads, float4 per access, consecutive threads on consecutive float4 of a row.
template <int D>
__device__ __forceinline__ void LoadTile(float* dst, const float* __restrict__ x, int row0, int N, int H, int head,
                                         float scale) {
  using C = TileCfg<D>;
  constexpr int kIters = kTile * C::D4 / kThreads;  // 1, 2, 4 or 8
  static_assert(kIters * kThreads == kTile * C::D4);
  float4 t[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int f = threadIdx.x + it * kThreads;
    const int rr = f / C::D4, d4 = f % C::D4;
    const int r = row0 + rr;
    t[it] = r < N ? Ldg4(x + (static_cast<size_t>(r) * H + head) * D + d4 * 4) : Zero4();
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int f = threadIdx.x + it * kThreads;
    const int rr = f / C::D4, d4 = f % C::D4;
    St4(dst + rr * C::LD + d4 * 4, Mul4(t[it], scale));
  }
}

// ---- forward --------------------------------------------------------------------------------------
// Grid (ceil(N / 64), Hq), 256 threads. Block = 64 consecutive rows of the packed axis x one query
// head. Keys run over 64-aligned tiles from the tile holding the first row's sequence start to the
// last row; K/V tiles are double-buffered (cp.async streams tile t+1 while tile t is computed).
// Shared: Qs[64][LD] (q * scale * log2e), 2 x (Ks, Vs [64][LD]), Ps[64][68], row starts.
template <int D>
constexpr size_t FwdSmemBytes() {
  return (5 * kTile * TileCfg<D>::LD + kTile * kLP) * sizeof(float) + kTile * sizeof(int);
}

// Starts copying rows [row0, row0 + 64) of head `head` of x[N, H, D] into dst[64][LD] with cp.async
// (zero-fill past N); the caller commits and waits.
template <int D>
__device__ __forceinline__ void IssueTile(float* dst, const float* __restrict__ x, int row0, int N, int H, int head) {
  using C = TileCfg<D>;
  constexpr int kIters = kTile * C::D4 / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int f = threadIdx.x + it * kThreads;
    const int rr = f / C::D4, d4 = f % C::D4;
    const int r = row0 + rr;
    const bool valid = r < N;
    CpAsync16(dst + rr * C::LD + d4 * 4, x + (static_cast<size_t>(valid ? r : 0) * H + head) * D + d4 * 4, valid);
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 2 : 1)
    AttnFwdKernel(float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
                  const float* __restrict__ k, const float* __restrict__ v, const int32_t* __restrict__ cu, int S,
                  int N, int Hq, int Hkv, float qscale) {
  using C = TileCfg<D>;
  constexpr int LD = C::LD, TD = C::TD, VW = C::VW, NC = C::NC;
  extern __shared__ __align__(16) float smem[];
  float* Qs = smem;
  float* KV = Qs + kTile * LD;                              // buffer b: Ks = KV + 2*b*64*LD, Vs = Ks + 64*LD
  float* Ps = KV + 4 * kTile * LD;                          // [row][key], row stride kLP
  int* row_ss = reinterpret_cast<int*>(Ps + kTile * kLP);  // sequence start per row (INT_MAX past N)

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int h = blockIdx.y, kvh = h / (Hq / Hkv);
  const int r0 = blockIdx.x * kTile;
  const int r_last = min(r0 + kTile, N) - 1;

  if (tid < kTile) {
    const int r = r0 + tid;
    row_ss[tid] = r < N ? __ldg(cu + FindSeq(cu, S, r)) : INT_MAX;
  }
  LoadTile<D>(Qs, q, r0, N, Hq, h, qscale);
  __syncthreads();

  int row[4], ss[4];
  float m[4], l[4], acc[4][TD];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    row[i] = r0 + ty * 4 + i;
    ss[i] = row_ss[ty * 4 + i];
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < TD; ++c) acc[i][c] = 0.0f;
  }
  const int k_begin = (row_ss[0] / kTile) * kTile;  // row r0 < N, so row_ss[0] is a real start

  IssueTile<D>(KV, k, k_begin, N, Hkv, kvh);
  IssueTile<D>(KV + kTile * LD, v, k_begin, N, Hkv, kvh);
  CpAsyncCommit();

  int buf = 0;
  for (int kt = k_begin; kt <= r_last; kt += kTile, buf ^= 1) {
    CpAsyncWaitAll();  // this thread's copies of tile kt have landed
    __syncthreads();   // everyone's have; the previous tile's readers of buffer buf ^ 1 and Ps are done
    if (kt + kTile <= r_last) {
      float* next = KV + 2 * (buf ^ 1) * kTile * LD;
      IssueTile<D>(next, k, kt + kTile, N, Hkv, kvh);
      IssueTile<D>(next + kTile * LD, v, kt + kTile, N, Hkv, kvh);
      CpAsyncCommit();
    }
    const float* Ks = KV + 2 * buf * kTile * LD;
    const float* Vs = Ks + kTile * LD;

    // s[i][j] = q(row ty*4+i) . k(key kt + tx + 16 j), log2 domain.
    float s[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
#pragma unroll 4
    for (int d4 = 0; d4 < C::D4; ++d4) {
      float4 qa[4], kb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qa[i] = Ld4(Qs + (ty * 4 + i) * LD + d4 * 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) kb[j] = Ld4(Ks + (tx + 16 * j) * LD + d4 * 4);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = Dot4(qa[i], kb[j], s[i][j]);
    }

    // Mask, online softmax (a row's 64 scores live in the 16 threads of one half-warp), P to smem.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = kt + tx + 16 * j;
        if (!(key >= ss[i] && key <= row[i])) s[i][j] = -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m[i], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
      const float alpha = exp2f(m[i] - m_use);                // 0 when m[i] = -inf
      m[i] = m_new;
      float psum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = exp2f(s[i][j] - m_use);  // 0 for masked keys
        Ps[(ty * 4 + i) * kLP + tx + 16 * j] = p;
        psum += p;
      }
      l[i] = l[i] * alpha + psum;  // this thread's share of the row sum
#pragma unroll
      for (int c = 0; c < TD; ++c) acc[i][c] *= alpha;
    }
    __syncthreads();

    // acc[i][:] += sum_j P[row i][j] V[j][:]
#pragma unroll 2
    for (int j4 = 0; j4 < kTile / 4; ++j4) {
      float4 pa[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[i] = Ld4(Ps + (ty * 4 + i) * kLP + j4 * 4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float vb[TD];
#pragma unroll
        for (int c = 0; c < NC; ++c) LdVec<VW>(vb + c * VW, Vs + (j4 * 4 + e) * LD + C::Col(c, tx));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float p = Get(pa[i], e);
#pragma unroll
          for (int c = 0; c < TD; ++c) acc[i][c] = fmaf(p, vb[c], acc[i][c]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float lt = l[i];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) lt += __shfl_xor_sync(0xffffffffu, lt, off);
    if (row[i] < N) {  // lt >= 1: the row sees itself, and its max term is exp2(0)
      const float inv = 1.0f / lt;
      float* o = out + (static_cast<size_t>(row[i]) * Hq + h) * D;
#pragma unroll
      for (int c = 0; c < NC; ++c) StVec<VW>(o + C::Col(c, tx), acc[i] + c * VW, inv);
      if (tx == 0) lse[static_cast<size_t>(row[i]) * Hq + h] = (m[i] + log2f(lt)) * kLn2;
    }
  }
}

// ---- backward -------------------------------------------------------------------------------------
// Pre-pass: delta[n, h] = sum_d dout * out (one row of D floats per D/4 threads) and the sequence
// start of every row.
template <int D>
__global__ void AttnBwdDeltaKernel(float* __restrict__ delta, const float* __restrict__ dout,
                                   const float* __restrict__ out, int rows) {
  constexpr int TPR = D / 4;  // 4..32 threads per row; divides 32, so a row stays in one warp
  const int gt = blockIdx.x * blockDim.x + threadIdx.x;
  const int r = gt / TPR, part = gt % TPR;
  float s = 0.0f;
  if (r < rows) {
    const size_t off = static_cast<size_t>(r) * D + part * 4;
    s = Dot4(Ldg4(dout + off), Ldg4(out + off), 0.0f);
  }
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (r < rows && part == 0) delta[r] = s;
}

__global__ void RowStartKernel(int* __restrict__ row_start, const int32_t* __restrict__ cu, int S, int N) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r < N) row_start[r] = __ldg(cu + FindSeq(cu, S, r));
}

// Main backward: grid (ceil(N / 64), Hq), 256 threads. Block = 64 consecutive keys of the packed
// axis x one QUERY head h (so the 7 query heads of a GQA group are 7 blocks; their dk/dv partials
// meet through atomics). Loops over the 64-row query tiles that can see its keys, rows
// [k0, end of the last key's sequence). Per query tile, with keys in the tile's rows (i) and query
// rows in its columns (j):
//   S^T = K Q^T, P^T = exp(S^T scale - lse) (masked), dP^T = V dO^T, dS^T = P^T (dP^T - delta);
//   dV += P^T dO, dK += dS^T Q (registers, whole loop); dQ += dS K (registers, per tile, then
//   float4 atomics into dq). Shared: Ks, Vs (once), Qs, dOs [64][LD] and Ps, dSs [64 keys][68]
//   per query tile, plus lse, delta and row starts of the tile's rows.
template <int D>
constexpr size_t BwdSmemBytes() {
  return (4 * kTile * TileCfg<D>::LD + 2 * kTile * kLP + 2 * kTile) * sizeof(float) + (kTile + 1) * sizeof(int);
}

template <int D>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 2 : 1)
    AttnBwdKernel(float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                  const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                  const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                  const int* __restrict__ row_start, const int32_t* __restrict__ cu, int S, int N, int Hq, int Hkv,
                  float scale) {
  using C = TileCfg<D>;
  constexpr int LD = C::LD, TD = C::TD, VW = C::VW, NC = C::NC;
  extern __shared__ __align__(16) float smem[];
  float* Ks = smem;
  float* Vs = Ks + kTile * LD;
  float* Qs = Vs + kTile * LD;
  float* dOs = Qs + kTile * LD;
  float* Ps = dOs + kTile * LD;   // [key][row], row stride kLP
  float* dSs = Ps + kTile * kLP;  // [key][row]
  float* lse2s = dSs + kTile * kLP;
  float* dls = lse2s + kTile;
  int* sss = reinterpret_cast<int*>(dls + kTile);
  int* r_stop_s = sss + kTile;

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int h = blockIdx.y, kvh = h / (Hq / Hkv);
  const int k0 = blockIdx.x * kTile;
  const int k_last = min(k0 + kTile, N) - 1;
  const float scale_log2 = scale * kLog2e;

  LoadTile<D>(Ks, k, k0, N, Hkv, kvh, 1.0f);
  LoadTile<D>(Vs, v, k0, N, Hkv, kvh, 1.0f);
  if (tid == 0) *r_stop_s = __ldg(cu + FindSeq(cu, S, k_last) + 1);  // end of the last key's sequence
  __syncthreads();
  const int r_stop = *r_stop_s;  // rows >= r_stop belong to later sequences and see none of the keys

  int key[4];
  float dK[4][TD], dV[4][TD];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    key[i] = k0 + ty * 4 + i;
#pragma unroll
    for (int c = 0; c < TD; ++c) dK[i][c] = dV[i][c] = 0.0f;
  }

  for (int rt = k0; rt < r_stop; rt += kTile) {  // rt = k0 is 64-aligned: rows < k0 see nothing
    __syncthreads();  // the previous tile's readers of Qs, dOs, Ps, dSs are done
    LoadTile<D>(Qs, q, rt, N, Hq, h, 1.0f);
    LoadTile<D>(dOs, dout, rt, N, Hq, h, 1.0f);
    if (tid < kTile) {
      const int r = rt + tid;
      const bool ok = r < N;
      lse2s[tid] = ok ? __ldg(lse + static_cast<size_t>(r) * Hq + h) * kLog2e : 0.0f;
      dls[tid] = ok ? __ldg(delta + static_cast<size_t>(r) * Hq + h) : 0.0f;
      sss[tid] = ok ? __ldg(row_start + r) : INT_MAX;
    }
    __syncthreads();

    // st[i][j] = k(key ty*4+i) . q(row rt + tx + 16 j)
    float p[4][4];
    {
      float st[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) st[i][j] = 0.0f;
#pragma unroll 4
      for (int d4 = 0; d4 < C::D4; ++d4) {
        float4 ka[4], qb[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ka[i] = Ld4(Ks + (ty * 4 + i) * LD + d4 * 4);
#pragma unroll
        for (int j = 0; j < 4; ++j) qb[j] = Ld4(Qs + (tx + 16 * j) * LD + d4 * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) st[i][j] = Dot4(ka[i], qb[j], st[i][j]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int jj = tx + 16 * j, r = rt + jj;
        const float l2 = lse2s[jj];
        const int ssr = sss[jj];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool ok = key[i] >= ssr && key[i] <= r;  // ssr = INT_MAX past N
          p[i][j] = ok ? exp2f(fmaf(st[i][j], scale_log2, -l2)) : 0.0f;
        }
      }
    }
    // dp[i][j] = v(key ty*4+i) . dout(row rt + tx + 16 j); ds = p (dp - delta)
    {
      float dp[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) dp[i][j] = 0.0f;
#pragma unroll 4
      for (int d4 = 0; d4 < C::D4; ++d4) {
        float4 va[4], ob[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) va[i] = Ld4(Vs + (ty * 4 + i) * LD + d4 * 4);
#pragma unroll
        for (int j = 0; j < 4; ++j) ob[j] = Ld4(dOs + (tx + 16 * j) * LD + d4 * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) dp[i][j] = Dot4(va[i], ob[j], dp[i][j]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int jj = tx + 16 * j;
        const float dl = dls[jj];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          Ps[(ty * 4 + i) * kLP + jj] = p[i][j];
          dSs[(ty * 4 + i) * kLP + jj] = p[i][j] * (dp[i][j] - dl);
        }
      }
    }
    __syncthreads();

    // dV[key i][:] += sum_r P^T[i][r] dO[r][:];  dK[key i][:] += sum_r dS^T[i][r] Q[r][:]
#pragma unroll 2
    for (int r4 = 0; r4 < kTile / 4; ++r4) {
      float4 pa[4], sa[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pa[i] = Ld4(Ps + (ty * 4 + i) * kLP + r4 * 4);
        sa[i] = Ld4(dSs + (ty * 4 + i) * kLP + r4 * 4);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float ob[TD], qv[TD];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          LdVec<VW>(ob + c * VW, dOs + (r4 * 4 + e) * LD + C::Col(c, tx));
          LdVec<VW>(qv + c * VW, Qs + (r4 * 4 + e) * LD + C::Col(c, tx));
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float pe = Get(pa[i], e), se = Get(sa[i], e);
#pragma unroll
          for (int c = 0; c < TD; ++c) {
            dV[i][c] = fmaf(pe, ob[c], dV[i][c]);
            dK[i][c] = fmaf(se, qv[c], dK[i][c]);
          }
        }
      }
    }

    // dQ[row ty*4+i][:] = scale * sum_k dS^T[k][row] K[k][:], added into dq.
    {
      float dQ[4][TD];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < TD; ++c) dQ[i][c] = 0.0f;
#pragma unroll 4
      for (int kk = 0; kk < kTile; ++kk) {
        const float4 sb = Ld4(dSs + kk * kLP + ty * 4);  // rows ty*4 .. ty*4+3
        float kv[TD];
#pragma unroll
        for (int c = 0; c < NC; ++c) LdVec<VW>(kv + c * VW, Ks + kk * LD + C::Col(c, tx));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float se = Get(sb, i);
#pragma unroll
          for (int c = 0; c < TD; ++c) dQ[i][c] = fmaf(se, kv[c], dQ[i][c]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = rt + ty * 4 + i;
        // Rows < k0 or >= r_stop (r_stop <= N) got exact zeros from this key tile: skip them.
        if (r >= k0 && r < r_stop) {
          float* g = dq + (static_cast<size_t>(r) * Hq + h) * D;
#pragma unroll
          for (int c = 0; c < NC; ++c) AtomicAddVec<VW>(g + C::Col(c, tx), dQ[i] + c * VW, scale);
        }
      }
    }
  }

  // This block's share of dk, dv (the other query heads of the group add theirs).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (key[i] < N) {
      const size_t off = (static_cast<size_t>(key[i]) * Hkv + kvh) * D;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        AtomicAddVec<VW>(dk + off + C::Col(c, tx), dK[i] + c * VW, scale);
        AtomicAddVec<VW>(dv + off + C::Col(c, tx), dV[i] + c * VW, 1.0f);
      }
    }
  }
}

// ---- KV cache ---------------------------------------------------------------------------------------
// Pools hold f32 (float) or bf16 (uint16_t bits, rounded to nearest even as engine/tensor.h's
// F32ToBF16). Position p of batch row b sits at pool row table[b * max_blocks + p / block_size] *
// block_size + p % block_size.
struct Paging {
  const int32_t* table;
  int max_blocks, block_size, num_blocks;
};

// Pool row of position `pos` of batch row b, or -1 when the position is outside the table or its
// block outside the pool (a kernel cannot abort: such positions are skipped on write and read as
// zeros; the CPU backend aborts on them).
__device__ __forceinline__ long long PagedRow(const Paging& pg, int b, int pos) {
  if (pos < 0 || pos >= pg.max_blocks * pg.block_size) return -1;
  const int block = __ldg(pg.table + static_cast<size_t>(b) * pg.max_blocks + pos / pg.block_size);
  if (block < 0 || block >= pg.num_blocks) return -1;
  return static_cast<long long>(block) * pg.block_size + pos % pg.block_size;
}

// Two bf16 of one 32-bit word (lower address in the low half) widened to f32 (exact).
__device__ __forceinline__ float Bf16Lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float4 Bf16x4(uint32_t a, uint32_t b) {
  return make_float4(Bf16Lo(a), Bf16Hi(a), Bf16Lo(b), Bf16Hi(b));
}

// 4 consecutive cache elements (16-byte aligned for f32, 8-byte for bf16) to and from f32.
__device__ __forceinline__ float4 LdCache4(const float* p) { return Ld4(p); }
__device__ __forceinline__ float4 LdCache4(const uint16_t* p) {
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  return Bf16x4(w.x, w.y);
}
__device__ __forceinline__ void StCache4(float* p, float4 x) { St4(p, x); }
__device__ __forceinline__ void StCache4(uint16_t* p, float4 x) {
  *reinterpret_cast<uint2*>(p) = PackBf16x4(x);
}
__device__ __forceinline__ void StCache1(float* p, float x) { *p = x; }
__device__ __forceinline__ void StCache1(uint16_t* p, float x) { *p = __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// One thread per float4 (or float, when Hkv*D is not a multiple of 4) of a new row's k and v.
template <int W, typename Elem>
__global__ void KvCacheWriteKernel(Elem* __restrict__ k_cache, Elem* __restrict__ v_cache,
                                   const float* __restrict__ k, const float* __restrict__ v,
                                   const int32_t* __restrict__ cu_q, const int32_t* __restrict__ start, Paging pg,
                                   int B, int Nq, int row) {
  const int per_row = row / W;
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long long>(Nq) * per_row) return;
  const int i = static_cast<int>(idx / per_row), c = static_cast<int>(idx % per_row);
  const int b = FindSeq(cu_q, B, i);
  const int q0 = __ldg(cu_q + b);
  if (i < q0 || i >= __ldg(cu_q + b + 1)) return;  // row of no sequence (malformed cu_q)
  const long long r = PagedRow(pg, b, __ldg(start + b) + (i - q0));
  if (r < 0) return;  // outside the table or pool: the CPU backend aborts; here nothing is written
  const size_t src = static_cast<size_t>(i) * row + static_cast<size_t>(c) * W;
  const size_t dst = static_cast<size_t>(r) * row + static_cast<size_t>(c) * W;
  if constexpr (W == 4) {
    StCache4(k_cache + dst, Ldg4(k + src));
    StCache4(v_cache + dst, Ldg4(v + src));
  } else {
    StCache1(k_cache + dst, __ldg(k + src));
    StCache1(v_cache + dst, __ldg(v + src));
  }
}

// RoPE of one pair (x1, x2) = (x[j], x[j + D/2]) with RopeKernel's instructions, given the cos and
// sin of its angle (position x inv_freq[j]) or the angle. The q/k/v kernels and the fused decode
// attention share it, so their results agree bit for bit.
__device__ __forceinline__ void RotateWith(float x1, float x2, float cs, float sn, float& y1, float& y2) {
  y1 = x1 * cs - x2 * sn;
  y2 = x2 * cs + x1 * sn;
}
__device__ __forceinline__ void RotatePair(float x1, float x2, float angle, float& y1, float& y2) {
  float sn, cs;
  sincosf(angle, &sn, &cs);
  RotateWith(x1, x2, cs, sn, y1, y2);
}

// V consecutive values (V = 4: one 16-byte load or store, 8 bytes in bf16; V = 1: one value).
template <int V>
__device__ __forceinline__ void LoadV(const float* p, float (&x)[V]) {
  if constexpr (V == 4) {
    const float4 t = Ldg4(p);
    x[0] = t.x, x[1] = t.y, x[2] = t.z, x[3] = t.w;
  } else {
    x[0] = __ldg(p);
  }
}
template <int V>
__device__ __forceinline__ void StoreV(float* p, const float (&x)[V]) {
  if constexpr (V == 4) St4(p, make_float4(x[0], x[1], x[2], x[3]));
  else p[0] = x[0];
}
template <int V>
__device__ __forceinline__ void StoreV(uint16_t* p, const float (&x)[V]) {  // rounded to bf16
  if constexpr (V == 4) *reinterpret_cast<uint2*>(p) = PackBf16x4(make_float4(x[0], x[1], x[2], x[3]));
  else p[0] = __bfloat16_as_ushort(__float2bfloat16_rn(x[0]));
}
template <int V>
__device__ __forceinline__ void StoreV(__nv_bfloat16* p, const float (&x)[V]) {
  StoreV<V>(reinterpret_cast<uint16_t*>(p), x);
}

// The row's rotations, (cos, sin x sign) of position x inv_freq[j] for j < D / 2, into rot[]: every
// head of the row uses the same D / 2 angles, so each sincosf runs once a row, not once a head.
__device__ __forceinline__ void RowRotations(float2* rot, float pos, const float* __restrict__ inv_freq, int half,
                                             float sign) {
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    float sn, cs;
    sincosf(pos * __ldg(inv_freq + j), &sn, &cs);
    rot[j] = make_float2(cs, sn * sign);
  }
}

// Qwen3's per-head norm of one head row x[0, D) (+ bias[0, D) when not null), D <= 128: its rstd with
// RmsNormVecKernel's arithmetic for a row of D (one warp a row: lane l's four values 4 l .. 4 l + 3,
// SumOfSquares4, WarpSum; lanes past D / 4 add 0), so RmsNormForward's bits. kVec: 16-byte loads (x,
// bias 16-byte aligned), else four scalar loads of the same values.
template <bool kVec>
__device__ __forceinline__ float HeadRstd(const float* x, const float* bias, int D, float eps, int lane) {
  float ss = 0.0f;
  if (4 * lane < D) {
    float4 a, b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if constexpr (kVec) {
      a = *reinterpret_cast<const float4*>(x + 4 * lane);
      if (bias) b = __ldg(reinterpret_cast<const float4*>(bias) + lane);
    } else {
      a = make_float4(x[4 * lane], x[4 * lane + 1], x[4 * lane + 2], x[4 * lane + 3]);
      if (bias)
        b = make_float4(__ldg(bias + 4 * lane), __ldg(bias + 4 * lane + 1), __ldg(bias + 4 * lane + 2),
                        __ldg(bias + 4 * lane + 3));
    }
    if (bias) a = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
    ss = SumOfSquares4(a);
  }
  ss = WarpSum(ss);
  return rsqrtf(ss / static_cast<float>(D) + eps);
}

// QkvRope / QkvRopeKvWrite: block = one row i. Threads walk the row's rotation pairs (j, j + D/2)
// of the Hq query heads, then of the Hkv key heads, then the value elements, V pairs (values) a
// thread: V consecutive j of one head, so every load and store is V wide (V = 4 when D is a multiple
// of 8 and the pointers are aligned). q goes to q[i]; k and v to row i of k_out / v_out (f32 [N, Hkv
// D], kPaged false) or to the row's pool row through the block table (kPaged, rounded to the pool's
// Elem as KvCacheWrite rounds). The rotation repeats RopeKernel's arithmetic (elementwise.cu), so
// the results are the unfused ops' bit for bit. kNorm (training only): Qwen3's per-head norms between
// the split and the rotation, RmsNormForward's arithmetic (HeadRstd, then (x r) w); the split rows
// go to nq.q_pre / k_pre and each head's rstd to nq.q_rstd / k_rstd, as the ops write them. Dynamic
// shared memory: D / 2 float2 (RowRotations), and with kNorm Hq + Hkv floats (QkvShared).
template <typename Elem, bool kPaged, int V, bool kNorm = false>
__global__ void QkvRopeKernel(float* __restrict__ q, Elem* __restrict__ k_out, Elem* __restrict__ v_out,
                              const float* __restrict__ qkv, const float* __restrict__ bias,
                              const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                              const int32_t* __restrict__ cu_q, const int32_t* __restrict__ start, Paging pg, int B,
                              int Hq, int Hkv, int D, __nv_bfloat16* __restrict__ k16 = nullptr,
                              __nv_bfloat16* __restrict__ v16 = nullptr, __nv_bfloat16* __restrict__ q16 = nullptr,
                              __nv_bfloat16* __restrict__ q16s = nullptr, float qscale = 0.0f, QkvNorm nq = {}) {
  static_assert(!(kPaged && kNorm), "the cached forward's norms run in the fused decode attention");
  extern __shared__ float2 rot[];
  const int i = blockIdx.x;
  const int half = D / 2, QD = Hq * D, KD = Hkv * D, W = QD + 2 * KD;
  const float* row = qkv + static_cast<size_t>(i) * W;
  RowRotations(rot, static_cast<float>(__ldg(positions + i)), inv_freq, half, 1.0f);
  float* head_r = reinterpret_cast<float*>(rot + half);  // kNorm: [Hq + Hkv]
  if constexpr (kNorm) {
    const int lane = threadIdx.x % 32;
    for (int h = threadIdx.x / 32; h < Hq + Hkv; h += blockDim.x / 32) {
      const float r = HeadRstd<V == 4>(row + h * D, bias ? bias + h * D : nullptr, D, nq.eps, lane);
      if (lane == 0) {
        head_r[h] = r;
        if (nq.q_rstd && h < Hq) nq.q_rstd[static_cast<size_t>(i) * Hq + h] = r;
        else if (nq.q_rstd) nq.k_rstd[static_cast<size_t>(i) * Hkv + (h - Hq)] = r;
      }
    }
  }
  long long r = i;
  if constexpr (kPaged) {
    // A row of no sequence (malformed cu_q) or outside the table or pool writes no cache row.
    r = -1;
    if (B > 0) {
      const int b = FindSeq(cu_q, B, i);
      const int q0 = __ldg(cu_q + b);
      if (i >= q0 && i < __ldg(cu_q + b + 1)) r = PagedRow(pg, b, __ldg(start + b) + (i - q0));
    }
  }
  __syncthreads();
  const int per_head = half / V, pairs = (Hq + Hkv) * per_head;
  for (int t = threadIdx.x; t < pairs + KD / V; t += blockDim.x) {
    if (t < pairs) {
      const int h = t / per_head, j = (t - h * per_head) * V;  // head h of q (h < Hq) or of k
      const int c = h * D + j;
      float x1[V], x2[V], y1[V], y2[V];
      LoadV(row + c, x1);
      LoadV(row + c + half, x2);
      if (bias) {
        float b1[V], b2[V];
        LoadV(bias + c, b1);
        LoadV(bias + c + half, b2);
#pragma unroll
        for (int u = 0; u < V; ++u) x1[u] += b1[u], x2[u] += b2[u];
      }
      if constexpr (kNorm) {  // SplitQkv's row kept for the backward, then RmsNormVecKernel's (x r) w
        if (nq.q_pre) {
          float* pre = h < Hq ? nq.q_pre + static_cast<size_t>(i) * QD + c
                              : nq.k_pre + static_cast<size_t>(i) * KD + (c - QD);
          StoreV(pre, x1);
          StoreV(pre + half, x2);
        }
        const float* wn = (h < Hq ? nq.q_norm : nq.k_norm) + j;
        float w1[V], w2[V];
        LoadV(wn, w1);
        LoadV(wn + half, w2);
        const float r = head_r[h];
#pragma unroll
        for (int u = 0; u < V; ++u) x1[u] = (x1[u] * r) * w1[u], x2[u] = (x2[u] * r) * w2[u];
      }
#pragma unroll
      for (int u = 0; u < V; ++u) RotateWith(x1[u], x2[u], rot[j + u].x, rot[j + u].y, y1[u], y2[u]);
      if (h < Hq) {
        const size_t o = static_cast<size_t>(i) * QD + c;
        if (q) StoreV(q + o, y1), StoreV(q + o + half, y2);
        if (!kPaged && q16) {  // the training attention's copies (QkvRopeAttention): for its backward
          StoreV(q16 + o, y1);
          StoreV(q16 + o + half, y2);
        }
        if (!kPaged && q16s) {  // and its forward, scaled as the forward scales q before rounding it
#pragma unroll
          for (int u = 0; u < V; ++u) y1[u] *= qscale, y2[u] *= qscale;
          StoreV(q16s + o, y1);
          StoreV(q16s + o + half, y2);
        }
      } else if (r >= 0) {
        const size_t o = static_cast<size_t>(r) * KD + (c - QD);
        if (kPaged || k_out) {  // (training: null when only the bf16 copies are read)
          StoreV(k_out + o, y1);
          StoreV(k_out + o + half, y2);
        }
        if (!kPaged && k16) {  // the training attention's bf16 copy (QkvRopeAttention)
          StoreV(k16 + o, y1);
          StoreV(k16 + o + half, y2);
        }
      }
    } else if (r >= 0) {
      const int c = (t - pairs) * V;  // elements of v
      float x[V];
      LoadV(row + QD + KD + c, x);
      if (bias) {
        float b[V];
        LoadV(bias + QD + KD + c, b);
#pragma unroll
        for (int u = 0; u < V; ++u) x[u] += b[u];
      }
      if (kPaged || v_out) StoreV(v_out + static_cast<size_t>(r) * KD + c, x);
      if (!kPaged && v16) StoreV(v16 + static_cast<size_t>(r) * KD + c, x);
    }
  }
}

// RopePackQkv: block = one row i; dq and dk rotated back (RopeKernel with sign -1) as they are packed
// into dqkv's row beside dv (when not null) and into dqkv16 in bf16 (when not null); V as in
// QkvRopeKernel.
template <int V>
__global__ void RopePackQkvKernel(float* __restrict__ dqkv, __nv_bfloat16* __restrict__ dqkv16,
                                  const float* __restrict__ dq, const float* __restrict__ dk,
                                  const float* __restrict__ dv, const int32_t* __restrict__ positions,
                                  const float* __restrict__ inv_freq, int Hq, int Hkv, int D, float sign) {
  extern __shared__ float2 rot[];
  const int i = blockIdx.x;
  const int half = D / 2, QD = Hq * D, KD = Hkv * D, W = QD + 2 * KD;
  const size_t base = static_cast<size_t>(i) * W;
  // sign is -1 at run time, as RopeKernel's inverse: the same instructions, the same bits
  RowRotations(rot, static_cast<float>(__ldg(positions + i)), inv_freq, half, sign);
  __syncthreads();
  const int per_head = half / V, pairs = (Hq + Hkv) * per_head;
  for (int t = threadIdx.x; t < pairs + KD / V; t += blockDim.x) {
    if (t < pairs) {
      const int h = t / per_head, j = (t - h * per_head) * V;
      const int c = h * D + j;
      const float* src = h < Hq ? dq + static_cast<size_t>(i) * QD + c : dk + static_cast<size_t>(i) * KD + (c - QD);
      float x1[V], x2[V], y1[V], y2[V];
      LoadV(src, x1);
      LoadV(src + half, x2);
#pragma unroll
      for (int u = 0; u < V; ++u) RotateWith(x1[u], x2[u], rot[j + u].x, rot[j + u].y, y1[u], y2[u]);
      if (dqkv) {
        StoreV(dqkv + base + c, y1);
        StoreV(dqkv + base + c + half, y2);
      }
      if (dqkv16) {
        StoreV(dqkv16 + base + c, y1);
        StoreV(dqkv16 + base + c + half, y2);
      }
    } else {
      const int c = (t - pairs) * V;
      float x[V];
      LoadV(dv + static_cast<size_t>(i) * KD + c, x);
      if (dqkv) StoreV(dqkv + base + QD + KD + c, x);
      if (dqkv16) StoreV(dqkv16 + base + QD + KD + c, x);
    }
  }
}

// NormRopePackQkv (Backend::NormRopePackQkv's ops in one pass; D = 64 or 128): block = kNrpRows rows,
// their rotations back (RowRotations' (cos, -sin)) in shared memory. Warps take (row, head) items, a head
// on LPH = D / 4 lanes (two heads a warp at D = 64), lane l holding the head's four values 4 (l % LPH)
// .. + 3 of dq (or dk), q_pre (or k_pre) and the norm's weights: RopeKernel's inverse rotation, with the
// other half of each pair from lane l ^ LPH / 2; then the norm's backward, dot = sum of g w x over the
// head (a segmented xor sum), dx = r w g - x (dot r^3 / D), as RmsNormBackward's kernels compute dx;
// dx goes to the row's q or k columns of dqkv (f32 and/or bf16) and dv to its v columns. The norms'
// weight gradients: each lane sums g x r of its four columns over its items, the block's lanes add theirs
// through shared memory, one atomic a column and block (RmsNormBackward adds dw likewise).
constexpr int kNrpRows = 32, kNrpThreads = 256;
template <int D>
__global__ void __launch_bounds__(kNrpThreads)
    NormRopePackQkvKernel(float* __restrict__ dqkv, __nv_bfloat16* __restrict__ dqkv16, float* __restrict__ dq_norm,
                          float* __restrict__ dk_norm, const float* __restrict__ dq, const float* __restrict__ dk,
                          const float* __restrict__ dv, const float* __restrict__ q_pre,
                          const float* __restrict__ k_pre, const float* __restrict__ q_norm,
                          const float* __restrict__ k_norm, const float* __restrict__ q_rstd,
                          const float* __restrict__ k_rstd, const int32_t* __restrict__ positions,
                          const float* __restrict__ inv_freq, int N, int Hq, int Hkv) {
  constexpr int half = D / 2, LPH = D / 4, HPW = 32 / LPH, WARPS = kNrpThreads / 32;
  static_assert(LPH >= 2 && LPH <= 32 && 32 % LPH == 0, "a head on a power-of-two share of a warp");
  __shared__ float2 rot[kNrpRows][half];
  __shared__ float4 dw_part[2][WARPS * HPW][LPH];  // [q_norm | k_norm][lane group][column quad]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sub = lane / LPH, l4 = lane % LPH;
  const int row0 = blockIdx.x * kNrpRows, rows = min(kNrpRows, N - row0);
  const int QD = Hq * D, KD = Hkv * D, W = QD + 2 * KD, H = Hq + Hkv, slots = (H + HPW - 1) / HPW;
  for (int f = threadIdx.x; f < rows * half; f += kNrpThreads) {
    const int r = f / half, j = f - r * half;
    float sn, cs;
    sincosf(static_cast<float>(__ldg(positions + row0 + r)) * __ldg(inv_freq + j), &sn, &cs);
    rot[r][j] = make_float2(cs, sn * -1.0f);
  }
  __syncthreads();
  const int c = 4 * l4;  // the lane's first column of its head
  const bool first = c < half;
  const int jr = first ? c : c - half;  // its rotation index
  float4 accq = make_float4(0.0f, 0.0f, 0.0f, 0.0f), acck = accq;
  for (int it = warp; it < rows * slots; it += WARPS) {
    const int rr = it / slots, h = (it - rr * slots) * HPW + sub;
    const size_t i = static_cast<size_t>(row0 + rr);
    const bool live = h < H, isq = h < Hq;
    float4 g = make_float4(0.0f, 0.0f, 0.0f, 0.0f), x = g, w = g;
    float r = 0.0f;
    if (live) {
      const size_t hq = isq ? (i * Hq + h) : (i * Hkv + (h - Hq));
      g = Ldg4((isq ? dq : dk) + hq * D + c);
      x = Ldg4((isq ? q_pre : k_pre) + hq * D + c);
      w = Ldg4((isq ? q_norm : k_norm) + c);
      r = __ldg((isq ? q_rstd : k_rstd) + hq);
    }
    float4 p;  // the pair partners' gradients
    p.x = __shfl_xor_sync(0xffffffffu, g.x, LPH / 2);
    p.y = __shfl_xor_sync(0xffffffffu, g.y, LPH / 2);
    p.z = __shfl_xor_sync(0xffffffffu, g.z, LPH / 2);
    p.w = __shfl_xor_sync(0xffffffffu, g.w, LPH / 2);
    // RopeKernel's p[j] = x1 c - x2 s, p[j + half] = x2 c + x1 s with s = -sin
    const float gv[4] = {g.x, g.y, g.z, g.w}, pv[4] = {p.x, p.y, p.z, p.w};
    float y[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float2 cs = rot[rr][jr + u];
      y[u] = first ? gv[u] * cs.x - pv[u] * cs.y : gv[u] * cs.x + pv[u] * cs.y;
    }
    float dot = y[0] * w.x * x.x + y[1] * w.y * x.y + y[2] * w.z * x.z + y[3] * w.w * x.w;
#pragma unroll
    for (int o = LPH / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (!live) continue;
    const float k = dot * r * r * r / D;
    const float4 d = make_float4(r * w.x * y[0] - x.x * k, r * w.y * y[1] - x.y * k, r * w.z * y[2] - x.z * k,
                                 r * w.w * y[3] - x.w * k);
    const size_t o = i * W + (isq ? h * D : QD + (h - Hq) * D) + c;
    if (dqkv) St4(dqkv + o, d);
    if (dqkv16) *reinterpret_cast<uint2*>(dqkv16 + o) = PackBf16x4(d);
    const float4 e = make_float4(y[0] * x.x * r, y[1] * x.y * r, y[2] * x.z * r, y[3] * x.w * r);
    if (isq) accq = make_float4(accq.x + e.x, accq.y + e.y, accq.z + e.z, accq.w + e.w);
    else acck = make_float4(acck.x + e.x, acck.y + e.y, acck.z + e.z, acck.w + e.w);
  }
  // dv into the rows' v columns
  for (int f = threadIdx.x; f < rows * (KD / 4); f += kNrpThreads) {
    const int rr = f / (KD / 4), c4 = f - rr * (KD / 4);
    const size_t i = static_cast<size_t>(row0 + rr);
    const float4 x = Ldg4(dv + i * KD + 4 * c4);
    const size_t o = i * W + QD + KD + 4 * c4;
    if (dqkv) St4(dqkv + o, x);
    if (dqkv16) *reinterpret_cast<uint2*>(dqkv16 + o) = PackBf16x4(x);
  }
  dw_part[0][warp * HPW + sub][l4] = accq;
  dw_part[1][warp * HPW + sub][l4] = acck;
  __syncthreads();
  if (threadIdx.x < 2 * LPH) {
    const int which = threadIdx.x / LPH, q4 = threadIdx.x % LPH;
    float4 sum = dw_part[which][0][q4];
    for (int gq = 1; gq < WARPS * HPW; ++gq) {
      const float4 a = dw_part[which][gq][q4];
      sum.x += a.x, sum.y += a.y, sum.z += a.z, sum.w += a.w;
    }
    float* dw = (which ? dk_norm : dq_norm) + 4 * q4;
    atomicAdd(dw, sum.x);
    atomicAdd(dw + 1, sum.y);
    atomicAdd(dw + 2, sum.z);
    atomicAdd(dw + 3, sum.w);
  }
}

// Cached attention: grid (Nq, Hkv, ceil(G / 8)), 128 threads; G = Hq / Hkv. Block = one new query
// row x one kv head x up to 8 query heads of its group, so each K/V row of the cache is read once for
// all of those heads. Keys 0 .. L-1 (L = position + 1, read from the device arrays) run in chunks of
// 32 through a 3-stage cp.async pipeline (two chunks stream in while one is computed; 16-byte copies
// of E = 4 f32 or 8 bf16 elements, each key's pool row found through the block table, zero-fill past
// L). Per chunk: scores of 32 keys x 8 heads (thread = key x quarter of D, partials summed in the
// softmax step); per-head online softmax (one warp per head, lane = key); PV with thread = (key group,
// 4 elements of D) over all 8 heads, partial sums per key group in registers across the whole loop,
// reduced across key groups through shared memory at the end. bf16 elements are widened to f32 as
// they leave shared memory; every product and sum is f32.
// K rows sit unpadded in shared memory with their 16-byte units XOR-swizzled by the key index
// (unit du of key kk at du ^ (kk & SW)), so the keys that a warp reads at one unit hit distinct banks.
constexpr int kDecThreads = 128, kDecKC = 32, kDecHB = 8, kDecStages = 3;
constexpr int kDecParts = kDecThreads / kDecKC;  // 4 partial-score slices of D

template <int D, typename Elem>
struct DecCfg {
  static constexpr int D4 = D / 4;
  static constexpr int E = 16 / static_cast<int>(sizeof(Elem));  // elements per 16-byte unit: 4 or 8
  static constexpr int DU = D / E;                                // units per K/V row
  static constexpr int SW = (DU < 8 ? DU : 8) - 1;                // swizzle mask of K's units
  static constexpr int UPP = (DU + kDecParts - 1) / kDecParts;    // units per partial-score slice
  static constexpr int NKG = kDecThreads / D4;          // key groups in the PV phase: 32, 16, 8, 4
  static constexpr int KPG = kDecKC / NKG;              // keys per group: 1, 2, 4, 8
  static constexpr int PW = KPG < 4 ? KPG : 4;          // vector width of probability reads
  static constexpr int NU = kDecKC * DU;                // 16-byte copies per tensor per chunk
  static constexpr int NL = (NU + kDecThreads - 1) / kDecThreads;  // of them per thread
  static constexpr int STAGE_BYTES = 2 * kDecKC * D * static_cast<int>(sizeof(Elem));  // Ks[KC][D] (swizzled), Vs[KC][D]
  static constexpr int RED_BYTES = NKG * kDecHB * D * 4;
  static constexpr int REGION_BYTES =
      kDecStages * STAGE_BYTES > RED_BYTES ? kDecStages * STAGE_BYTES : RED_BYTES;
  // Qs[8][D] f32 | 3 K/V stages (later: red[NKG][8][D] f32) | Sp[4][8][32] | m, l, alpha [8]
  static constexpr size_t kSmemBytes =
      kDecHB * D * 4 + REGION_BYTES + (kDecParts * kDecHB * kDecKC + 3 * kDecHB) * 4;
  static_assert(DU >= 1 && DU * E == D && KPG >= 1 && KPG % PW == 0 && REGION_BYTES % 16 == 0);
};


template <int D, typename Elem>
__global__ void __launch_bounds__(kDecThreads, D <= 64 ? 4 : 2)
    CachedAttnKernel(float* __restrict__ out, const float* __restrict__ q, const Elem* __restrict__ k_cache,
                     const Elem* __restrict__ v_cache, const int32_t* __restrict__ cu_q,
                     const int32_t* __restrict__ start, Paging pg, int B, int Hq, int Hkv, float qscale) {
  using C = DecCfg<D, Elem>;
  constexpr int D4 = C::D4, E = C::E, DU = C::DU, SW = C::SW, UPP = C::UPP, KC = kDecKC, HB = kDecHB;
  constexpr int T = kDecThreads, P = kDecParts, NKG = C::NKG, KPG = C::KPG, PW = C::PW, NL = C::NL;
  extern __shared__ __align__(16) float smem[];
  float* Qs = smem;  // [HB][D], q * scale * log2e (zeros for heads >= nh)
  unsigned char* KV = reinterpret_cast<unsigned char*>(Qs + HB * D);  // stage s: Ks at s * STAGE_BYTES, Vs after
  float* red = reinterpret_cast<float*>(KV);                          // [NKG][HB][D], after the key loop
  float* Sp = reinterpret_cast<float*>(KV + C::REGION_BYTES);  // [P][HB][KC]: partial scores; then P in slice 0
  float* m_s = Sp + P * HB * KC;
  float* l_s = m_s + HB;
  float* a_s = l_s + HB;
  auto stage_k = [&](int st) { return reinterpret_cast<Elem*>(KV + st * C::STAGE_BYTES); };

  const int tid = threadIdx.x;
  const int i = blockIdx.x, g = blockIdx.y;
  const int G = Hq / Hkv;
  const int hfirst = g * G + blockIdx.z * HB;
  const int nh = min(HB, G - static_cast<int>(blockIdx.z) * HB);

  for (int f = tid; f < HB * D4; f += T) {
    const int u = f / D4, d4 = f % D4;
    float4 x = Zero4();
    if (u < nh) x = Mul4(Ldg4(q + (static_cast<size_t>(i) * Hq + hfirst + u) * D + d4 * 4), qscale);
    St4(Qs + u * D + d4 * 4, x);
  }
  if (tid < HB) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
    a_s[tid] = 1.0f;
  }

  const int b = FindSeq(cu_q, B, i);
  const int pos = __ldg(start + b) + (i - __ldg(cu_q + b));
  const int L = min(pos + 1, pg.max_blocks * pg.block_size);  // keys 0 .. L-1 (a bad position reads no foreign memory)
  const size_t krow = static_cast<size_t>(Hkv) * D;
  const Elem* kbase = k_cache + static_cast<size_t>(g) * D;  // key in pool row r, this kv head: kbase + r * krow
  const Elem* vbase = v_cache + static_cast<size_t>(g) * D;

  // Copies chunk [c0, c0 + KC) into stage st and commits one group (an empty group past L, so that
  // every thread always has exactly one group per chunk index).
  auto issue = [&](int c0, int st) {
    if (c0 < L) {
      Elem* Kb = stage_k(st);
      Elem* Vb = Kb + KC * D;
#pragma unroll
      for (int it = 0; it < NL; ++it) {
        const int f = tid + it * T;
        if (C::NU % T == 0 || f < C::NU) {
          const int kk = f / DU, du = f % DU;
          const int j = c0 + kk;
          const long long r = j < L ? PagedRow(pg, b, j) : -1;
          const size_t off = static_cast<size_t>(r < 0 ? 0 : r) * krow + du * E;  // pool row 0 always exists
          CpAsync16(Kb + kk * D + (du ^ (kk & SW)) * E, kbase + off, r >= 0);
          CpAsync16(Vb + kk * D + du * E, vbase + off, r >= 0);
        }
      }
    }
    CpAsyncCommit();
  };
  issue(0, 0);
  issue(KC, 1);

  const int ks = tid % KC, part = tid / KC;  // scores: key, slice of D
  const int pd4 = tid % D4, kg = tid / D4;   // PV: 4-element column, key group
  const int warp = tid / 32, lane = tid % 32;
  float acc[HB][4];
#pragma unroll
  for (int u = 0; u < HB; ++u) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.0f;

  int st = 0;  // stage of chunk c0
  for (int c0 = 0; c0 < L; c0 += KC) {  // L is uniform over the block
    CpAsyncWaitGroup<1>();  // groups are chunks c0/KC and c0/KC + 1: this thread's copies of c0 have landed
    __syncthreads();        // everyone's have; everyone is done with the previous chunk (its stage, Sp)
    issue(c0 + 2 * KC, st == 0 ? 2 : st - 1);  // into the previous chunk's stage
    const Elem* Ks = stage_k(st);
    const Elem* Vs = Ks + KC * D;

    // Partial scores over slice `part` of D: Sp[part][u][ks] = sum_{d in slice} q[u][d] k[ks][d].
    {
      float s[HB];
#pragma unroll
      for (int u = 0; u < HB; ++u) s[u] = 0.0f;
      const int du_end = min(DU, (part + 1) * UPP);
#pragma unroll 1
      for (int du = part * UPP; du < du_end; ++du) {
        const Elem* kp = Ks + ks * D + (du ^ (ks & SW)) * E;
        if constexpr (E == 4) {
          const float4 kv = LdCache4(kp);
#pragma unroll
          for (int u = 0; u < HB; ++u) s[u] = Dot4(Ld4(Qs + u * D + du * 4), kv, s[u]);  // rows >= nh are 0
        } else {
          const uint4 w = *reinterpret_cast<const uint4*>(kp);
          const float4 k0 = Bf16x4(w.x, w.y), k1 = Bf16x4(w.z, w.w);
#pragma unroll
          for (int u = 0; u < HB; ++u) {
            s[u] = Dot4(Ld4(Qs + u * D + du * 8), k0, s[u]);
            s[u] = Dot4(Ld4(Qs + u * D + du * 8 + 4), k1, s[u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < HB; ++u) Sp[(part * HB + u) * KC + ks] = s[u];
    }
    __syncthreads();

    // Online softmax: warp w owns heads w, w + 4; lane = key of the chunk.
    for (int u = warp; u < nh; u += T / 32) {
      float s = 0.0f;
#pragma unroll
      for (int pp = 0; pp < P; ++pp) s += Sp[(pp * HB + u) * KC + lane];
      if (c0 + lane >= L) s = -INFINITY;
      float mx = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_s[u];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float p = exp2f(s - m_use);
      Sp[u * KC + lane] = p;
      float sum = p;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      const float alpha = exp2f(m_old - m_use);
      __syncwarp();  // every lane has read m_s[u] before lane 0 replaces it
      if (lane == 0) {
        m_s[u] = m_new;
        l_s[u] = l_s[u] * alpha + sum;
        a_s[u] = alpha;
      }
    }
    __syncthreads();

    // PV over this thread's KPG keys of the chunk, all heads.
#pragma unroll
    for (int u = 0; u < HB; ++u) {
      if (u < nh) {
        const float a = a_s[u];
        acc[u][0] *= a, acc[u][1] *= a, acc[u][2] *= a, acc[u][3] *= a;
      }
    }
#pragma unroll
    for (int e0 = 0; e0 < KPG; e0 += PW) {
      float4 vv[PW];
#pragma unroll
      for (int e = 0; e < PW; ++e) vv[e] = LdCache4(Vs + (kg * KPG + e0 + e) * D + pd4 * 4);
#pragma unroll
      for (int u = 0; u < HB; ++u) {
        if (u < nh) {
          float pv[PW];
          LdVec<PW>(pv, Sp + u * KC + kg * KPG + e0);
#pragma unroll
          for (int e = 0; e < PW; ++e) {
            acc[u][0] = fmaf(pv[e], vv[e].x, acc[u][0]);
            acc[u][1] = fmaf(pv[e], vv[e].y, acc[u][1]);
            acc[u][2] = fmaf(pv[e], vv[e].z, acc[u][2]);
            acc[u][3] = fmaf(pv[e], vv[e].w, acc[u][3]);
          }
        }
      }
    }
    st = st == 2 ? 0 : st + 1;
  }
  CpAsyncWaitAll();  // only empty groups can be left, but make the K/V region quiet before reuse
  __syncthreads();   // done with the K/V stages: they become red

#pragma unroll
  for (int u = 0; u < HB; ++u) St4(red + (kg * HB + u) * D + pd4 * 4, make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]));
  __syncthreads();
  for (int f = tid; f < nh * D; f += T) {
    const int u = f / D, d = f % D;
    float sum = 0.0f;
#pragma unroll 4
    for (int gg = 0; gg < NKG; ++gg) sum += red[(gg * HB + u) * D + d];
    out[(static_cast<size_t>(i) * Hq + hfirst + u) * D + d] = sum / l_s[u];  // l >= 1 (key `pos` is visible)
  }
}

// ---- decode attention, GQA-grouped, split over the context ------------------------------------------
// DecodeAttnKernel: grid (Nq, Hkv, HG * splits), 128 threads; HG = ceil(G / 8) head groups of the
// G = Hq / Hkv query heads of a kv head. Block = one query row x one kv head x up to 8 query heads x
// one split of the row's keys, so each K/V row is read once from HBM for all heads of the group (all
// 7 at the 0.5B shape). The launch shape depends only on host values (Nq, heads, splits); the row's
// sequence, position and block-table row come from device arrays, so the launch can be captured in
// a CUDA graph and replayed with other contexts. Designed for decode (one new row per sequence: Nq ==
// B, and then row i is sequence i, checked with two loads before falling back to a binary search),
// correct for any layout.
//
// The L = position + 1 keys of a row are cut into `splits` ranges of whole chunks (splits > 1 only when
// Nq x Hkv x HG blocks would leave multiprocessors idle); each block streams its range in chunks of KC
// keys (64, or 32 when a chunk of 64 would exceed 16 KB) through a 3-stage cp.async pipeline (16-byte
// copies, each key's pool row looked up in the block table). Per chunk, two barriers:
//   S1; PV of the previous chunk; scores of this chunk (thread = key x HPT heads, full D, q broadcast
//   from shared memory, K units XOR-swizzled by key), masked, per-warp maxima to shared memory;
//   S2; next chunk's copies into the stage just freed; every thread merges the warp maxima into the
//   running max of all 8 heads (identical in every thread), rescales its PV accumulators, and the
//   score threads write P = exp2(s - m) and add it to their own share of the row sum l.
// PV: thread = (key group of KPG keys, one 16-byte unit of D), all 8 heads in registers; the partial
// sums of the key groups and the shares of l meet in shared memory at the end. With one split the
// block writes out = acc / l; otherwise it writes acc, m and l of its split to the workspace and
// DecodeCombineKernel merges the splits. bf16 is widened to f32 as it leaves shared memory (exact);
// every product and sum is f32.
constexpr int kDecodeThreads = 128, kDecodeHB = 8, kDecodeStages = 3, kDecodeMaxSplits = 64;

template <int D, typename Elem>
struct DecodeCfg {
  static constexpr int SZ = static_cast<int>(sizeof(Elem));
  static constexpr int E = 16 / SZ;   // elements per 16-byte unit: 4 (f32) or 8 (bf16)
  static constexpr int DU = D / E;    // units per K/V row
  static constexpr int KC = 2 * 64 * D * SZ <= 16384 ? 64 : 32;  // keys per chunk (K + V of a chunk <= 16 KB)
  static constexpr int PARTS = kDecodeThreads / KC;  // score threads per key: 2 or 4
  static constexpr int HPT = kDecodeHB / PARTS;      // heads per score thread: 4 or 2
  static constexpr int WPP = KC / 32;                // warps per part: 2 or 1
  static constexpr int SW = (DU < 8 ? DU : 8) - 1;   // swizzle mask of K's units
  static constexpr int NKG = kDecodeThreads / DU;    // PV key groups
  static constexpr int KPG = KC / NKG;               // keys per PV group (= copies per thread per tensor)
  static constexpr int PW = KPG < 16 / E ? KPG : 16 / E;  // keys per PV step: at most 16 widened values
  static constexpr int STAGE_BYTES = 2 * KC * D * SZ;      // Ks[KC][D] (swizzled) | Vs[KC][D]
  static constexpr int RED_BYTES = NKG * kDecodeHB * D * 4;
  static constexpr int REGION_BYTES =
      kDecodeStages * STAGE_BYTES > RED_BYTES ? kDecodeStages * STAGE_BYTES : RED_BYTES;
  // region (stages; after the loop red[NKG][HB][D]) | Qs[HB][D] | Ps[HB][KC] | wmax[4][HPT] | mfin[HB]
  static constexpr int FLOATS = kDecodeHB * D + kDecodeHB * KC + 4 * HPT + kDecodeHB;
  static constexpr size_t kSmemBytes = static_cast<size_t>(REGION_BYTES) + FLOATS * 4;
  static_assert(DU >= 2 && DU * E == D && kDecodeThreads % DU == 0, "head width");
  static_assert(KPG >= 1 && KPG * NKG == KC && KPG % PW == 0 && WPP * PARTS == kDecodeThreads / 32);
  static_assert(REGION_BYTES % 16 == 0 && (kDecodeHB * D + kDecodeHB * KC) % 4 == 0);
};

// One 16-byte unit of the cache (4 f32 or 8 bf16) as f32.
__device__ __forceinline__ void LdUnit(float* x, const float* p) {
  const float4 t = Ld4(p);
  x[0] = t.x, x[1] = t.y, x[2] = t.z, x[3] = t.w;
}
__device__ __forceinline__ void LdUnit(float* x, const uint16_t* p) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  x[0] = Bf16Lo(w.x), x[1] = Bf16Hi(w.x), x[2] = Bf16Lo(w.y), x[3] = Bf16Hi(w.y);
  x[4] = Bf16Lo(w.z), x[5] = Bf16Hi(w.z), x[6] = Bf16Lo(w.w), x[7] = Bf16Hi(w.w);
}

// The keys of one decode block: the row's sequence b and this split's range [k0, k1) of the row's
// L = position + 1 keys (capped at the table's reach, so a bad position reads no foreign memory), cut
// into `splits` ranges of ceil(L / splits) keys rounded up to whole chunks of KC (trailing splits may
// be empty: nchunks = 0). Decode: sequence i holds exactly row i (two independent loads); anything
// else: binary search.
struct DecodeRange {
  int b, pos, k0, k1, nchunks;  // pos: the row's (new) position; keys 0 .. pos, this split's k0 .. k1 - 1
};
template <int KC>
__device__ __forceinline__ DecodeRange DecodeRangeOf(const int32_t* __restrict__ cu_q, const int32_t* __restrict__ start,
                                                     const Paging& pg, int B, int i, int split, int splits) {
  DecodeRange r;
  // A decode step's row i is sequence i (one row each): start[i] is loaded beside cu_q's two entries,
  // not after them, so the position comes back in one round trip.
  const bool own = i < B;
  const int ci = own ? __ldg(cu_q + i) : -1, ci1 = own ? __ldg(cu_q + i + 1) : -1, si = own ? __ldg(start + i) : 0;
  if (ci == i && ci1 == i + 1) {
    r.b = i;
    r.pos = si;
  } else {
    r.b = FindSeq(cu_q, B, i);
    r.pos = __ldg(start + r.b) + (i - __ldg(cu_q + r.b));
  }
  const int L = min(r.pos + 1, pg.max_blocks * pg.block_size);
  const int per = ((max(L, 0) + splits - 1) / splits + KC - 1) / KC * KC;
  r.k0 = split * per;
  r.k1 = min(L, r.k0 + per);
  r.nchunks = r.k1 > r.k0 ? (r.k1 - r.k0 + KC - 1) / KC : 0;  // uniform over the block
  return r;
}

// Pool row of key j of a row whose block-table row is trow (shifts when block_size = 2^bs_shift, else
// bs_shift < 0), or -1 for j >= k1 or a block outside the pool: such keys are zero-filled (the first
// are masked; the second read as zeros, as documented).
__device__ __forceinline__ long long DecodePoolRow(const Paging& pg, const int32_t* __restrict__ trow, int j, int k1,
                                                   int bs_shift) {
  if (j >= k1) return -1;
  const int blk = __ldg(trow + (bs_shift >= 0 ? j >> bs_shift : j / pg.block_size));
  const int within = bs_shift >= 0 ? (j & (pg.block_size - 1)) : j % pg.block_size;
  return blk >= 0 && blk < pg.num_blocks ? static_cast<long long>(blk) * pg.block_size + within : -1;
}

// Element d of output row r = (row, query head) of out[Nq, Hq, D] from the block's unnormalised sum,
// running max m and row sum l: out = sum / l with one split (l >= 1 whenever the row sees a key; 0
// otherwise), else the split's partials for DecodeCombineKernel. out16, when not null, gets the
// output in bf16 too (the o product's operand: Gemm::AdoptCast).
__device__ __forceinline__ void StoreDecodeOut(float* __restrict__ out, uint16_t* __restrict__ out16,
                                               float* __restrict__ o_part, float* __restrict__ ml_part, size_t r,
                                               int d, int D, int split, int splits, float sum, float m, float l) {
  if (splits == 1) {
    const float x = l > 0.0f ? sum / l : 0.0f;
    out[r * D + d] = x;
    if (out16) out16[r * D + d] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else {
    o_part[(r * splits + split) * D + d] = sum;
    if (d == 0) {
      ml_part[(r * splits + split) * 2] = m;
      ml_part[(r * splits + split) * 2 + 1] = l;
    }
  }
}

template <int D, typename Elem>
__global__ void __launch_bounds__(kDecodeThreads, 4)
    DecodeAttnKernel(float* __restrict__ out, float* __restrict__ o_part, float* __restrict__ ml_part,
                     const float* __restrict__ q, const Elem* __restrict__ k_cache, const Elem* __restrict__ v_cache,
                     const int32_t* __restrict__ cu_q, const int32_t* __restrict__ start, Paging pg, int bs_shift,
                     int B, int Hq, int Hkv, int HG, int splits, float qscale) {
  using C = DecodeCfg<D, Elem>;
  constexpr int T = kDecodeThreads, HB = kDecodeHB, NS = kDecodeStages;
  constexpr int E = C::E, DU = C::DU, KC = C::KC, HPT = C::HPT, WPP = C::WPP, SW = C::SW;
  constexpr int NKG = C::NKG, KPG = C::KPG, PW = C::PW;
  extern __shared__ __align__(16) float smem[];
  unsigned char* region = reinterpret_cast<unsigned char*>(smem);
  float* Qs = reinterpret_cast<float*>(region + C::REGION_BYTES);  // [HB][D], q * scale * log2e, 0 past nh
  float* Ps = Qs + HB * D;                                         // [HB][KC], P of the current chunk
  float* wmax = Ps + HB * KC;                                      // [4 warps][HPT]; at the end shares of l
  float* mfin = wmax + 4 * HPT;                                    // [HB], final running max
  auto stage_k = [&](int c) { return reinterpret_cast<Elem*>(region + (c % NS) * C::STAGE_BYTES); };

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int i = blockIdx.x, g = blockIdx.y;
  const int hgrp = static_cast<int>(blockIdx.z) % HG, split = static_cast<int>(blockIdx.z) / HG;
  const int G = Hq / Hkv;
  const int hfirst = g * G + hgrp * HB;
  const int nh = min(HB, G - hgrp * HB);

  for (int f = tid; f < HB * D / 4; f += T) {
    const int u = f / (D / 4), d4 = f % (D / 4);
    float4 x = Zero4();
    if (u < nh) x = Mul4(Ldg4(q + (static_cast<size_t>(i) * Hq + hfirst + u) * D + d4 * 4), qscale);
    St4(Qs + u * D + d4 * 4, x);
  }

  const DecodeRange rg = DecodeRangeOf<KC>(cu_q, start, pg, B, i, split, splits);
  const int k0 = rg.k0, k1 = rg.k1, nchunks = rg.nchunks;

  const size_t krow = static_cast<size_t>(Hkv) * D;
  const Elem* kbase = k_cache + static_cast<size_t>(g) * D;  // key in pool row r, this kv head: kbase + r * krow
  const Elem* vbase = v_cache + static_cast<size_t>(g) * D;
  const int32_t* trow = pg.table + static_cast<size_t>(rg.b) * pg.max_blocks;

  // Copies chunk c of the split into its stage and commits one group (an empty group past the last
  // chunk, so that every thread always has one group per chunk index).
  auto issue = [&](int c) {
    if (c < nchunks) {
      Elem* Kb = stage_k(c);
      Elem* Vb = Kb + KC * D;
      const int c0 = k0 + c * KC;
#pragma unroll
      for (int it = 0; it < KPG; ++it) {  // KC * DU = KPG * T copies per tensor
        const int f = tid + it * T;
        const int kk = f / DU, du = f % DU;
        const long long r = DecodePoolRow(pg, trow, c0 + kk, k1, bs_shift);
        const size_t off = static_cast<size_t>(r < 0 ? 0 : r) * krow + du * E;  // pool row 0 always exists
        CpAsync16(Kb + kk * D + (du ^ (kk & SW)) * E, kbase + off, r >= 0);
        CpAsync16(Vb + kk * D + du * E, vbase + off, r >= 0);
      }
    }
    CpAsyncCommit();
  };
#pragma unroll
  for (int c = 0; c < NS - 1; ++c) issue(c);

  const int ks = tid % KC, part = tid / KC;  // scores: key of the chunk, heads part * HPT ..; part is warp-uniform
  const int pu = tid % DU, kg = tid / DU;    // PV: unit of D, key group (keys kg * KPG ..)
  float acc[HB][E];
  float m_run[HB];
  float l_part[HPT], s[HPT];
#pragma unroll
  for (int h = 0; h < HB; ++h) {
    m_run[h] = -INFINITY;
#pragma unroll
    for (int x = 0; x < E; ++x) acc[h][x] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < HPT; ++j) l_part[j] = s[j] = 0.0f;

  // acc += P V over chunk c: this thread's KPG keys, its unit of D, all heads.
  auto pv = [&](int c) {
    const Elem* Vs = stage_k(c) + KC * D;
#pragma unroll
    for (int e0 = 0; e0 < KPG; e0 += PW) {
      float vv[PW][E];
#pragma unroll
      for (int e = 0; e < PW; ++e) LdUnit(vv[e], Vs + (kg * KPG + e0 + e) * D + pu * E);
#pragma unroll
      for (int h = 0; h < HB; ++h) {
        if (h < nh) {
          float p[PW];
          LdVec<PW>(p, Ps + h * KC + kg * KPG + e0);
#pragma unroll
          for (int e = 0; e < PW; ++e)
#pragma unroll
            for (int x = 0; x < E; ++x) acc[h][x] = fmaf(p[e], vv[e][x], acc[h][x]);
        }
      }
    }
  };

  for (int c = 0; c < nchunks; ++c) {
    CpAsyncWaitGroup<NS - 2>();  // groups up to chunk c + NS - 2 are committed: chunk c's copies have landed
    __syncthreads();             // S1: everyone's have; P of chunk c - 1 is complete
    if (c > 0) pv(c - 1);

    // Scores of key ks for heads part * HPT + j (log2 domain), masked past k1; warp maxima.
    {
      const Elem* Ks = stage_k(c);
      float sc[2][HPT];  // even and odd units: two chains of D / 2 FMAs per head instead of one of D
#pragma unroll
      for (int j = 0; j < HPT; ++j) sc[0][j] = sc[1][j] = 0.0f;
#pragma unroll 2
      for (int du = 0; du < DU; ++du) {
        float kx[E];
        LdUnit(kx, Ks + ks * D + (du ^ (ks & SW)) * E);
#pragma unroll
        for (int j = 0; j < HPT; ++j) {
          if (part * HPT + j < nh) {  // warp-uniform; skips the padding heads of a group of 7
            const float* qp = Qs + (part * HPT + j) * D + du * E;  // the same address in the whole warp
#pragma unroll
            for (int x4 = 0; x4 < E / 4; ++x4)
              sc[du & 1][j] = Dot4(Ld4(qp + 4 * x4),
                                   make_float4(kx[4 * x4], kx[4 * x4 + 1], kx[4 * x4 + 2], kx[4 * x4 + 3]),
                                   sc[du & 1][j]);
          }
        }
      }
      const bool valid = k0 + c * KC + ks < k1;
#pragma unroll
      for (int j = 0; j < HPT; ++j) {
        s[j] = valid ? sc[0][j] + sc[1][j] : -INFINITY;
        float mx = s[j];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        if (lane == 0) wmax[warp * HPT + j] = mx;
      }
    }
    __syncthreads();  // S2: warp maxima visible; everyone is done with chunk c - 1 (its stage, P)
    issue(c + NS - 1);  // into chunk c - 1's stage

    // Online softmax. Every thread merges the maxima into the running max of all heads (the same
    // values in every thread) and rescales its accumulators; the score threads write P.
#pragma unroll
    for (int h = 0; h < HB; ++h) {
      const int pp = h / HPT, j = h % HPT;  // compile-time after unrolling
      float cm = wmax[(pp * WPP) * HPT + j];
#pragma unroll
      for (int w = 1; w < WPP; ++w) cm = fmaxf(cm, wmax[(pp * WPP + w) * HPT + j]);
      const float m_new = fmaxf(m_run[h], cm);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet
      const float alpha = exp2f(m_run[h] - m_use);            // 0 when m_run = -inf
      m_run[h] = m_new;
      if (alpha != 1.0f) {  // uniform: every thread holds the same m_run
#pragma unroll
        for (int x = 0; x < E; ++x) acc[h][x] *= alpha;
      }
      if (pp == part) {  // warp-uniform
        const float p = exp2f(s[j] - m_use);  // 0 for masked keys
        Ps[h * KC + ks] = p;
        l_part[j] = l_part[j] * alpha + p;
      }
    }
  }
  if (nchunks > 0) {
    __syncthreads();  // P of the last chunk is complete
    pv(nchunks - 1);
  }
  CpAsyncWaitAll();  // only empty groups can be left, but make the region quiet before reuse
  __syncthreads();   // done with the stages and with wmax: they become red and the shares of l

  float* red = reinterpret_cast<float*>(region);  // [NKG][HB][D]
#pragma unroll
  for (int h = 0; h < HB; ++h)
#pragma unroll
    for (int x4 = 0; x4 < E / 4; ++x4)
      St4(red + (kg * HB + h) * D + pu * E + 4 * x4,
          make_float4(acc[h][4 * x4], acc[h][4 * x4 + 1], acc[h][4 * x4 + 2], acc[h][4 * x4 + 3]));
#pragma unroll
  for (int j = 0; j < HPT; ++j) {
    float t = l_part[j];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
    if (lane == 0) wmax[warp * HPT + j] = t;
  }
  if (tid == 0) {
#pragma unroll
    for (int h = 0; h < HB; ++h) mfin[h] = m_run[h];
  }
  __syncthreads();

  for (int f = tid; f < nh * D; f += T) {
    const int h = f / D, d = f % D;
    const int pp = h / HPT, j = h % HPT;
    float l = 0.0f;
#pragma unroll
    for (int w = 0; w < WPP; ++w) l += wmax[(pp * WPP + w) * HPT + j];
    float sum = 0.0f;
#pragma unroll 4
    for (int gg = 0; gg < NKG; ++gg) sum += red[(gg * HB + h) * D + d];
    StoreDecodeOut(out, nullptr, o_part, ml_part, static_cast<size_t>(i) * Hq + hfirst + h, d, D, split, splits,
                   sum, mfin[h], l);
  }
}

// out[r, d] = sum_s 2^(m_s - M) o_s[d] / sum_s 2^(m_s - M) l_s over the splits of row r = (i, h).
__global__ void DecodeCombineKernel(float* __restrict__ out, uint16_t* __restrict__ out16,
                                    const float* __restrict__ o_part, const float* __restrict__ ml_part, int rows,
                                    int D, int splits) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long long>(rows) * D) return;
  const long long r = idx / D;
  const int d = static_cast<int>(idx % D);
  const float* ml = ml_part + r * splits * 2;
  float M = -INFINITY;
  for (int sp = 0; sp < splits; ++sp) M = fmaxf(M, __ldg(ml + 2 * sp));
  float num = 0.0f, den = 0.0f;
  if (M != -INFINITY) {
    for (int sp = 0; sp < splits; ++sp) {
      const float w = exp2f(__ldg(ml + 2 * sp) - M);  // 0 for an empty split (m = -inf)
      num = fmaf(w, __ldg(o_part + (r * splits + sp) * D + d), num);
      den = fmaf(w, __ldg(ml + 2 * sp + 1), den);
    }
  }
  const float x = den > 0.0f ? num / den : 0.0f;
  out[idx] = x;
  if (out16) out16[idx] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// ---- decode attention on tensor cores (bf16 pools) --------------------------------------------------
// DecodeTcKernel<D, kFused, kNorm, NS>: grid (Nq, Hkv, splits), 128 threads = 4 warps. Block = one query
// row x one kv head x one split of the row's keys (the split logic, workspace and combine of
// DecodeAttnKernel). The G = Hq / Hkv <= 16 query heads of the kv head are the rows of one 16-row A tile
// (q pre-scaled by scale * log2 e, rounded to bf16, rows >= G zero), whose D/16 A fragments every warp
// holds in registers for the whole loop. Keys run in chunks of 64 through an NS-stage cp.async pipeline
// (3, or 2 at D = 128 with many items: DecodeTcStages) shared by the block (16-byte copies of 8 bf16,
// each key's pool row from the block table): Ks, Vs [64][D] bf16 per stage, unpadded, 16-byte unit u
// of key r stored at unit u ^ (r & 7), so the 8 rows of every ldmatrix phase and the 8 copies of a key
// row land in 8 different bank groups. One barrier per chunk. Warp w owns keys 16 w .. 16 w + 15 of
// every chunk, with its own online softmax state:
//   S = Q K^T (16 heads x 16 keys: 2 n-tiles x D/16 k-steps; B fragments of K by ldmatrix), keys past
//   the split's end masked, row max over the lane quad, P = exp2(S - m) (f32 row sums), P repacked to
//   bf16 as the A fragment of one k-step, O += P V (16 x D f32 accumulators; B fragments of V by
//   ldmatrix.trans). A warp whose 16 keys all lie past the split's end skips the chunk.
// At the end the 4 warps' (m, l, O) meet in shared memory (the stage region) and every (head, d) is
// merged: out = O / l with one split, else the split's o, m, l for DecodeCombineKernel.
constexpr int kDecTcThreads = 128, kDecTcWarps = 4, kDecTcKC = 64, kDecTcMaxG = 16;

// NS stages of the copy pipeline: 3 at D = 64 (four blocks a multiprocessor, 48.5 KiB each). At D = 128
// 3 stages are 96.5 KiB, two blocks a multiprocessor by shared memory (the registers allow three);
// 2 stages fit three (DecodeTcStages).
template <int D, int NS = 3>
struct DecodeTcCfg {
  static_assert(D == 64 || D == 128, "tensor-core decode attention: head width 64 or 128");
  static constexpr int DU = D / 8;                            // 16-byte units per K/V row
  static constexpr int KK = D / 16;                           // k-steps of the score product
  static constexpr int DN = D / 8;                            // n-tiles of the PV product
  static constexpr int KW = kDecTcKC / kDecTcWarps;           // keys per warp per chunk: one PV k-step
  static constexpr int NCP = kDecTcKC * DU / kDecTcThreads;   // copies per thread per tensor and chunk: 4, 8
  static constexpr int STAGE_ELEMS = 2 * kDecTcKC * D;        // Ks | Vs
  static constexpr int LDO = D + 8;                           // f32 row stride of a warp's O when merging
  static constexpr int MERGE_BYTES = kDecTcWarps * 16 * LDO * 4;
  static constexpr int REGION_BYTES = NS * STAGE_ELEMS * 2 > MERGE_BYTES ? NS * STAGE_ELEMS * 2 : MERGE_BYTES;
  // region (stages; after the loop O[warp][16][LDO] f32) | m[warp][16] | l[warp][16], and with per-head
  // norms | their rstd [kDecTcMaxG + 1] (the query heads', then the new key's)
  static constexpr size_t kSmemBytes = static_cast<size_t>(REGION_BYTES) + 2 * kDecTcWarps * 16 * sizeof(float);
  static constexpr size_t kSmemBytesNorm = kSmemBytes + (kDecTcMaxG + 1) * sizeof(float);
  static_assert(KW == 16 && NCP * kDecTcThreads == kDecTcKC * DU && DU >= 8 && NS >= 2, "tiling");
};

// The fused decode step's input (DecodeTcKernel<D, true>, Backend::QkvRopeCachedAttention): the q/k/v
// product rows qkv[Nq, (Hq + 2 Hkv) D] before bias and RoPE, the bias (or null), positions[Nq] and
// inv_freq[D / 2].
struct DecodeQkvIn {
  const float* qkv = nullptr;
  const float* bias = nullptr;
  const int32_t* positions = nullptr;
  const float* inv_freq = nullptr;
  // Qwen3's per-head RMSNorms between the split and the rotation (weights [D] each), or null.
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  float eps = 0.0f;
};

// kFused: q is not read; the block rotates its G query heads from the q/k/v product row (QkvRopeKernel's
// instructions: the same bits) into the stage region and takes their A fragments from there, and the
// block whose key range holds the row's new position first writes that key (rotated) and value of its
// kv head into the pool, as QkvRopeKernel would have (so no separate q/k/v kernel runs before it).
// kNorm (with kFused): Qwen3's per-head RMSNorms of the queries and the new key before the rotation.
template <int D, bool kFused, bool kNorm = false, int NS = 3>
__global__ void __launch_bounds__(kDecTcThreads, D <= 64 ? 4 : NS == 2 ? 3 : 2)
    DecodeTcKernel(float* __restrict__ out, uint16_t* __restrict__ out16, float* __restrict__ o_part,
                   float* __restrict__ ml_part,
                   const float* __restrict__ q, uint16_t* __restrict__ k_cache,
                   uint16_t* __restrict__ v_cache, const int32_t* __restrict__ cu_q,
                   const int32_t* __restrict__ start, Paging pg, int bs_shift, int B, int Hq, int Hkv, int splits,
                   float qscale, DecodeQkvIn qi) {
  using C = DecodeTcCfg<D, NS>;
  constexpr int KC = kDecTcKC, T = kDecTcThreads, W = kDecTcWarps;
  constexpr int DU = C::DU, KK = C::KK, DN = C::DN, KW = C::KW, LDO = C::LDO, SE = C::STAGE_ELEMS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* stages = reinterpret_cast<uint16_t*>(smem_raw);           // stage s: Ks at s * SE, Vs at + KC * D
  float* m_w = reinterpret_cast<float*>(smem_raw + C::REGION_BYTES);  // [W][16], after the loop
  float* l_w = m_w + W * 16;                                          // [W][16]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int i = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int G = Hq / Hkv, hfirst = kvh * G;

  // kFused: the loads of this thread's query rotation pairs and of the new key and value go out
  // first. They depend on nothing the block computes, and the row's range below is a load round
  // trip of its own: the two overlap.
  constexpr int half = D / 2, QP = (kDecTcMaxG * half + T - 1) / T;  // pairs per thread, at most
  static_assert(D <= T, "one new-key pair and one value element per thread");
  float qx1[QP], qx2[QP], qfreq[QP], qw1[QP], qw2[QP];  // qw: the pair's q_norm weights
  float kx1 = 0.0f, kx2 = 0.0f, kfreq = 0.0f, vx = 0.0f;  // the new key's pair tid, value element tid
  float kw1 = 0.0f, kw2 = 0.0f;                            // and its k_norm weights
  float pos_f = 0.0f;
  const int QD = Hq * D, KD = Hkv * D;
  const float* row = kFused ? qi.qkv + static_cast<size_t>(i) * (QD + 2 * KD) : nullptr;
  if constexpr (kFused) {
    pos_f = static_cast<float>(__ldg(qi.positions + i));
#pragma unroll
    for (int p = 0; p < QP; ++p) {
      const int f = tid + p * T;
      if (f < G * half) {
        const int h = f / half, j = f - h * half, c = (hfirst + h) * D + j;
        qx1[p] = row[c];
        qx2[p] = row[c + half];
        if (qi.bias) qx1[p] += __ldg(qi.bias + c), qx2[p] += __ldg(qi.bias + c + half);
        qfreq[p] = __ldg(qi.inv_freq + j);
        if constexpr (kNorm) qw1[p] = __ldg(qi.q_norm + j), qw2[p] = __ldg(qi.q_norm + j + half);
      }
    }
    // The new key and value, which the block holding the row's new position writes below (D <= T:
    // one pair or element a thread).
    if (tid < half) {
      const int c = QD + kvh * D + tid;
      kx1 = row[c];
      kx2 = row[c + half];
      if (qi.bias) kx1 += __ldg(qi.bias + c), kx2 += __ldg(qi.bias + c + half);
      kfreq = __ldg(qi.inv_freq + tid);
      if constexpr (kNorm) kw1 = __ldg(qi.k_norm + tid), kw2 = __ldg(qi.k_norm + tid + half);
    }
    if (tid < D) {
      const int c = QD + KD + kvh * D + tid;
      vx = qi.bias ? row[c] + __ldg(qi.bias + c) : row[c];
    }
  }

  const DecodeRange rg = DecodeRangeOf<KC>(cu_q, start, pg, B, i, split, splits);
  const size_t krow = static_cast<size_t>(Hkv) * D;
  const uint16_t* kbase = k_cache + static_cast<size_t>(kvh) * D;  // key in pool row r: kbase + r * krow
  const uint16_t* vbase = v_cache + static_cast<size_t>(kvh) * D;
  const int32_t* trow = pg.table + static_cast<size_t>(rg.b) * pg.max_blocks;

  // Copies chunk c of the split into stage c % NS and commits one group (an empty group past the
  // last chunk, so that every thread always has one group per chunk index). Thread f of a copy round
  // takes key f / DU, unit f % DU: consecutive threads on consecutive units of a key row.
  auto issue = [&](int c) {
    if (c < rg.nchunks) {
      uint16_t* Kb = stages + (c % NS) * SE;
      uint16_t* Vb = Kb + KC * D;
      const int c0 = rg.k0 + c * KC;
#pragma unroll
      for (int it = 0; it < C::NCP; ++it) {
        const int f = tid + it * T;
        const int kk = f / DU, du = f % DU;
        const long long r = DecodePoolRow(pg, trow, c0 + kk, rg.k1, bs_shift);
        const size_t off = static_cast<size_t>(r < 0 ? 0 : r) * krow + du * 8;  // pool row 0 always exists
        const int dst = kk * D + ((du ^ (kk & 7)) << 3);
        CpAsync16(Kb + dst, kbase + off, r >= 0);
        CpAsync16(Vb + dst, vbase + off, r >= 0);
      }
    }
    CpAsyncCommit();
  };
  // kFused: first the pool row the new key and value go to (in the block holding the row's new
  // position; else -1): its block-table load goes out here, not after RoPE, where it was the
  // prologue's longest stall. Then the chunks whose keys all lie before the new position (earlier
  // steps' keys, which this kernel does not write): their copies go out before the query prologue,
  // the rest after it (the new key's chunk once the block has written that key). The queries' loads
  // are already back or in flight ahead of these copies, not queued behind them.
  long long new_row = -1;
  int pre = 0;
  if constexpr (kFused) {
    if (rg.pos >= rg.k0 && rg.pos < rg.k1) new_row = PagedRow(pg, rg.b, rg.pos);
    while (pre < NS - 1 && pre < rg.nchunks && rg.k0 + (pre + 1) * KC <= rg.pos) issue(pre++);
  }

  // kFused with per-head norms (Qwen3): each head's rstd, as RmsNormForward computes it over the split
  // q (or k) row of D values (HeadRstd). Warp w takes item w, w + W, ...: query heads hfirst ..
  // hfirst + G - 1, then item G, the new key.
  float* head_r = l_w + W * 16;  // [kDecTcMaxG + 1], kNorm only (kSmemBytesNorm)
  if constexpr (kFused && kNorm) {
    for (int it = warp; it <= G; it += W) {
      const int c0 = it < G ? (hfirst + it) * D : QD + kvh * D;
      const float r = HeadRstd<true>(row + c0, qi.bias ? qi.bias + c0 : nullptr, D, qi.eps, lane);
      if (lane == 0) head_r[it] = r;
    }
    __syncthreads();
  }

  // A fragments of Q: rows g, g + 8 = query heads hfirst + g, hfirst + g + 8 (zero rows past G).
  uint32_t qa[KK][4];
  if constexpr (kFused) {
    float* qs = reinterpret_cast<float*>(stages + (NS - 1) * SE);  // [G][D] f32 in the last stage, unused yet
#pragma unroll
    for (int p = 0; p < QP; ++p) {
      const int f = tid + p * T;
      if (f < G * half) {  // QkvRopeKernel's arithmetic on the values loaded above: the same bits
        const int h = f / half, j = f - h * half;
        float x1 = qx1[p], x2 = qx2[p];
        if constexpr (kNorm) {  // RmsNormVecKernel's (x r) w
          const float r = head_r[h];
          x1 = (x1 * r) * qw1[p];
          x2 = (x2 * r) * qw2[p];
        }
        RotatePair(x1, x2, pos_f * qfreq[p], qs[h * D + j], qs[h * D + j + half]);
      }
    }
    // The new key and value: written by the one block whose keys include the new position, before
    // its own copies read them (fence + barrier). A position outside the table or pool writes nothing.
    if (new_row >= 0) {
      uint16_t* kd = k_cache + static_cast<size_t>(new_row) * krow + kvh * D;
      uint16_t* vd = v_cache + static_cast<size_t>(new_row) * krow + kvh * D;
      if (tid < half) {
        float y1, y2, x1 = kx1, x2 = kx2;
        if constexpr (kNorm) {
          const float r = head_r[G];
          x1 = (x1 * r) * kw1;
          x2 = (x2 * r) * kw2;
        }
        RotatePair(x1, x2, pos_f * kfreq, y1, y2);
        StCache1(kd + tid, y1);
        StCache1(kd + tid + half, y2);
      }
      if (tid < D) StCache1(vd + tid, vx);
      __threadfence_block();
    }
    __syncthreads();
    // qs sits in the last stage: the loop first copies into it after its own first barrier, which
    // every thread reaches only past these reads.
    LoadAFragsF32<KK, true>(qa, g < G ? qs + g * D : nullptr, g + 8 < G ? qs + (g + 8) * D : nullptr, t, qscale);
  } else {
    const float* qrow = q + (static_cast<size_t>(i) * Hq + hfirst) * D;
    LoadAFragsF32<KK>(qa, g < G ? qrow + g * D : nullptr, g + 8 < G ? qrow + (g + 8) * D : nullptr, t, qscale);
  }
  for (int c = pre; c < NS - 1; ++c) issue(c);

  float o[DN][4];
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;  // rows g, g + 8; l: this lane's share
  // Every ldmatrix row address of this lane is a key row r = (multiple of 8) + lane % 8: its units sit
  // at u ^ sw.
  const int sw = lane & 7;

  for (int c = 0; c < rg.nchunks; ++c) {
    CpAsyncWaitGroup<NS - 2>();  // groups up to chunk c + NS - 2 are committed: chunk c's copies have landed
    __syncthreads();             // everyone's have; everyone is done with chunk c - 1 (its stage)
    issue(c + NS - 1);           // into chunk c - 1's stage

    const int kw0 = rg.k0 + c * KC + warp * KW;  // this warp's first key
    if (kw0 < rg.k1) {                           // warp-uniform
      const uint16_t* Ks = stages + (c % NS) * SE + warp * KW * D;  // the warp's 16 key rows
      const uint16_t* Vs = Ks + KC * D;

      // S = Q K^T: s[nt] holds keys kw0 + nt * 8 .. + 7 (log2 domain). Matrix j of an ldmatrix: keys
      // nt * 8 .. + 7, unit kk2 * 4 + j (columns kk2 * 32 + 8 j .. + 7) -> b0, b1 of k-step 2 kk2,
      // then of 2 kk2 + 1.
      float s[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk2 = 0; kk2 < KK / 2; ++kk2) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          uint32_t b[4];
          LdMatrixX4(b, Ks + (nt * 8 + (lane & 7)) * D + (((kk2 * 4 + (lane >> 3)) ^ sw) << 3));
          Mma(s[nt], qa[2 * kk2], b[0], b[1]);
          Mma(s[nt], qa[2 * kk2 + 1], b[2], b[3]);
        }
      }
      const int nvalid = rg.k1 - kw0;
      if (nvalid < KW) {  // warp-uniform: the split's last keys; c & 1 selects key 2t or 2t + 1
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int cc = 0; cc < 4; ++cc) {
            if (nt * 8 + 2 * t + (cc & 1) >= nvalid) s[nt][cc] = -INFINITY;
          }
        }
      }
      OnlineSoftmaxStep(s, o, mA, mB, lA, lB);

      // O += P V over the warp's 16 keys. Matrix j: keys 8 (j & 1) .. + 7, unit 2 dn2 + j / 2, transposed
      // -> b0, b1 of n-tile 2 dn2, then of 2 dn2 + 1.
      uint32_t pa[4];
      PackPFrag(pa, s[0], s[1]);
#pragma unroll
      for (int dn2 = 0; dn2 < DN / 2; ++dn2) {
        uint32_t b[4];
        LdMatrixX4T(b, Vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * D + (((2 * dn2 + (lane >> 4)) ^ sw) << 3));
        Mma(o[2 * dn2], pa, b[0], b[1]);
        Mma(o[2 * dn2 + 1], pa, b[2], b[3]);
      }
    }
  }
  CpAsyncWaitAll();  // only empty groups can be left, but make the region quiet before reuse
  __syncthreads();   // everyone is done with the stages: they become the merge buffer

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, off);
    lB += __shfl_xor_sync(0xffffffffu, lB, off);
  }
  float* Ow = reinterpret_cast<float*>(smem_raw) + warp * 16 * LDO;  // [16][LDO]: this warp's O
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
    *reinterpret_cast<float2*>(Ow + g * LDO + dn * 8 + 2 * t) = make_float2(o[dn][0], o[dn][1]);
    *reinterpret_cast<float2*>(Ow + (g + 8) * LDO + dn * 8 + 2 * t) = make_float2(o[dn][2], o[dn][3]);
  }
  if (t == 0) {
    m_w[warp * 16 + g] = mA;
    m_w[warp * 16 + g + 8] = mB;
    l_w[warp * 16 + g] = lA;
    l_w[warp * 16 + g + 8] = lB;
  }
  __syncthreads();

  // Merge the warps: weights 2^(m_w - M) (0 for a warp that saw no key: m_w = -inf).
  const float* O = reinterpret_cast<const float*>(smem_raw);
  for (int f = tid; f < G * D; f += T) {
    const int h = f / D, d = f % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) M = fmaxf(M, m_w[w * 16 + h]);
    float sum = 0.0f, l = 0.0f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float wt = exp2f(m_w[w * 16 + h] - M);
        sum = fmaf(wt, O[(w * 16 + h) * LDO + d], sum);
        l = fmaf(wt, l_w[w * 16 + h], l);
      }
    }
    StoreDecodeOut(out, out16, o_part, ml_part, static_cast<size_t>(i) * Hq + hfirst + h, d, D, split, splits, sum, M,
                   l);
  }
}

template <int D>
void LaunchForward(float* out, float* lse, const float* q, const float* k, const float* v, const int32_t* cu, int S,
                   int N, int Hq, int Hkv, cudaStream_t s) {
  const size_t smem = FwdSmemBytes<D>();
  AllowSmem(AttnFwdKernel<D>, smem);
  const dim3 grid((N + kTile - 1) / kTile, Hq);
  const float qscale = kLog2e / std::sqrt(static_cast<float>(D));
  AttnFwdKernel<D><<<grid, kThreads, smem, s>>>(out, lse, q, k, v, cu, S, N, Hq, Hkv, qscale);
  CheckCuda(cudaGetLastError(), "AttnFwdKernel launch");
}

template <int D>
void LaunchBackward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                    const float* q, const float* k, const float* v, const int32_t* cu, int S, int N, int Hq, int Hkv,
                    float* delta, int* row_start, cudaStream_t s) {
  AttentionBackwardPrepass(delta, row_start, dout, out, cu, S, N, Hq, D, s);
  const size_t smem = BwdSmemBytes<D>();
  AllowSmem(AttnBwdKernel<D>, smem);
  const dim3 grid((N + kTile - 1) / kTile, Hq);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  AttnBwdKernel<D><<<grid, kThreads, smem, s>>>(dq, dk, dv, dout, q, k, v, lse, delta, row_start, cu, S, N, Hq, Hkv,
                                                scale);
  CheckCuda(cudaGetLastError(), "AttnBwdKernel launch");
}

// Shared-memory opt-in and carveout of a cached-attention kernel (cheap host calls; set before every launch so
// that they hold on whichever device is current). Streaming reads bypass L1 (cp.async.cg): shared
// memory gets the whole carveout.
template <typename Kernel>
void PrepareDecodeKernel(Kernel kernel, size_t smem) {
  AllowSmem(kernel, smem);
  CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared),
            "cudaFuncSetAttribute(PreferredSharedMemoryCarveout)");
}

template <int D, typename Elem>
void LaunchCached(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start, int B,
                  int Nq, int Hq, int Hkv, cudaStream_t s) {
  const size_t smem = DecCfg<D, Elem>::kSmemBytes;
  // The whole carveout to shared memory: four 55 KB blocks (f32 cache; 30 KB with bf16) per
  // multiprocessor at D = 64.
  PrepareDecodeKernel(CachedAttnKernel<D, Elem>, smem);
  const int G = Hq / Hkv;
  const dim3 grid(Nq, Hkv, (G + kDecHB - 1) / kDecHB);
  const float qscale = kLog2e / std::sqrt(static_cast<float>(D));
  const Paging pg{kv.block_table, kv.max_blocks, kv.block_size, kv.num_blocks};
  CachedAttnKernel<D, Elem><<<grid, kDecThreads, smem, s>>>(out, q, static_cast<const Elem*>(kv.k),
                                                             static_cast<const Elem*>(kv.v), cu_q, start, pg, B, Hq,
                                                             Hkv, qscale);
  CheckCuda(cudaGetLastError(), "CachedAttnKernel launch");
}

template <int D>
void LaunchCached(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start, int B,
                  int Nq, int Hq, int Hkv, cudaStream_t s) {
  if (kv.bf16) LaunchCached<D, uint16_t>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, s);
  else LaunchCached<D, float>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, s);
}

// Blocks of a decode kernel resident on the whole device at once. The callers ask once per kernel
// instantiation (a static: a process drives one kind of GPU), so the split count below is a pure
// function of the call's host values: the same launch shape on every graph replay.
template <typename Kernel>
int ResidentBlocks(Kernel kernel, int threads, size_t smem) {
  PrepareDecodeKernel(kernel, smem);
  int dev = 0, sms = 0, per_sm = 0;
  CheckCuda(cudaGetDevice(&dev), "cudaGetDevice");
  CheckCuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  CheckCuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem),
            "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return std::max(1, sms * per_sm);
}

template <int D, typename Elem>
int DecodeSlots() {
  static const int slots =
      ResidentBlocks(DecodeAttnKernel<D, Elem>, kDecodeThreads, DecodeCfg<D, Elem>::kSmemBytes);
  return slots;
}
template <int D, int NS>
int DecodeTcSlots() {
  static const int slots =
      ResidentBlocks(DecodeTcKernel<D, false, false, NS>, kDecTcThreads, DecodeTcCfg<D, NS>::kSmemBytes);
  return slots;
}
// The decode kernel's copy stages (DecodeTcCfg) for `items` (row, kv head) pairs: 3 at D = 64. At D = 128
// 2 stages (three blocks a multiprocessor, one chunk in flight each) when the items are at least four
// waves of the 3-stage kernel's blocks (two a multiprocessor, two chunks in flight each), else 3.
// Measured on the H200 (docs/kernels.md, version 26), decode ms a step, 2 stages against 3: Qwen3-0.6B
// at 256 rows (2,048 items, 7.8 waves) 5.06 against 5.48; Qwen2.5-1.5B at 256 (512 items, 1.9
// waves) 4.04-4.07 against 3.81-3.84; Qwen3-0.6B at 32 rows (256 items, which 2 stages' slots split
// in two) 1.98 against 1.83. The four-wave line lies between those points, not on a measured one.
// AHA_DECODE_STAGES=2 or 3 sets the count at D = 128 whatever the items.
template <int D>
int DecodeTcStages(long long items) {
  if constexpr (D != 128) {
    return 3;
  } else {
    static const int forced = [] {
      const char* e = std::getenv("AHA_DECODE_STAGES");
      const int n = e != nullptr ? std::atoi(e) : 0;
      return n == 2 || n == 3 ? n : 0;
    }();
    if (forced != 0) return forced;
    return items >= 4LL * DecodeTcSlots<D, 3>() ? 2 : 3;
  }
}
template <int D>
int DecodeTcSlots(long long items) {
  if constexpr (D == 128) {
    if (DecodeTcStages<D>(items) == 2) return DecodeTcSlots<D, 2>();
  }
  return DecodeTcSlots<D, 3>();
}

// Splits of each row's context: the nearest whole number of resident blocks per block-sized item
// (row, kv head, head group), at least 1 (B = 256, Hkv = 2 on 132 x 4 slots: 1), at most one per
// chunk of KC keys of the longest possible context and kDecodeMaxSplits.
// AHA_DECODE_SPLITS=n (n >= 1) asks for n splits instead (capped the same way), for measuring the
// split count's trade-off.
int DecodeSplitCount(const KvPages& kv, long long items, int KC, long long slots) {
  static const long long forced = [] {
    const char* e = std::getenv("AHA_DECODE_SPLITS");
    return e ? std::max(0LL, std::atoll(e)) : 0LL;
  }();
  const long long max_ctx = static_cast<long long>(kv.max_blocks) * kv.block_size;
  const long long cap = std::min<long long>((max_ctx + KC - 1) / KC, kDecodeMaxSplits);
  const long long want = forced > 0 ? forced : (slots + items / 2) / items;
  return static_cast<int>(std::max<long long>(1, std::min(want, cap)));
}
template <int D, typename Elem>
int DecodeSplits(const KvPages& kv, int Nq, int Hq, int Hkv) {
  const long long HG = (Hq / Hkv + kDecodeHB - 1) / kDecodeHB;
  return DecodeSplitCount(kv, static_cast<long long>(Nq) * Hkv * HG, DecodeCfg<D, Elem>::KC, DecodeSlots<D, Elem>());
}
template <int D>
int DecodeTcSplits(const KvPages& kv, int Nq, int Hkv) {
  const long long items = static_cast<long long>(Nq) * Hkv;
  return DecodeSplitCount(kv, items, kDecTcKC, DecodeTcSlots<D>(items));
}

// Workspace of the split partials: o[Nq, Hq, splits, D] | (m, l)[Nq, Hq, splits] (f32); none with one split.
size_t DecodePartialBytes(int Nq, int Hq, int D, int splits) {
  if (splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(Nq) * Hq * splits;
  return Align256(rows * D * sizeof(float)) + Align256(rows * 2 * sizeof(float));
}

// The split partials inside the workspace (null with one split) and, after the main kernel, their merge.
struct DecodePartials {
  float* o = nullptr;
  float* ml = nullptr;
};
DecodePartials DecodePartialsIn(void* workspace, int Nq, int Hq, int D, int splits, const char* op) {
  DecodePartials p;
  if (splits > 1) {
    if (workspace == nullptr) {
      std::fprintf(stderr, "aha engine/cuda attention: %s: null workspace; bytes needed %zu\n", op,
                   DecodePartialBytes(Nq, Hq, D, splits));
      std::abort();
    }
    p.o = static_cast<float*>(workspace);
    p.ml = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                    Align256(static_cast<size_t>(Nq) * Hq * splits * D * sizeof(float)));
  }
  return p;
}
void CombineDecodeSplits(float* out, uint16_t* out16, const DecodePartials& p, int Nq, int Hq, int D, int splits,
                         cudaStream_t s) {
  if (splits <= 1) return;
  const long long n = static_cast<long long>(Nq) * Hq * D;
  DecodeCombineKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(out, out16, p.o, p.ml, Nq * Hq, D,
                                                                               splits);
  CheckCuda(cudaGetLastError(), "DecodeCombineKernel launch");
}

// block_size = 2^shift: shifts instead of divisions in the table lookups; -1 otherwise.
int BlockShift(int bs) {
  if ((bs & (bs - 1)) != 0) return -1;
  int shift = 0;
  while ((1 << shift) < bs) ++shift;
  return shift;
}

template <int D, typename Elem>
size_t DecodeWorkspace(const KvPages& kv, int Nq, int Hq, int Hkv) {
  return DecodePartialBytes(Nq, Hq, D, DecodeSplits<D, Elem>(kv, Nq, Hq, Hkv));
}

template <int D, typename Elem>
void LaunchDecode(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start, int B,
                  int Nq, int Hq, int Hkv, void* workspace, cudaStream_t s) {
  using C = DecodeCfg<D, Elem>;
  PrepareDecodeKernel(DecodeAttnKernel<D, Elem>, C::kSmemBytes);
  const int HG = (Hq / Hkv + kDecodeHB - 1) / kDecodeHB;
  const int splits = DecodeSplits<D, Elem>(kv, Nq, Hq, Hkv);
  const DecodePartials parts = DecodePartialsIn(workspace, Nq, Hq, D, splits, "CachedAttentionDecode");
  const dim3 grid(Nq, Hkv, HG * splits);
  const float qscale = kLog2e / std::sqrt(static_cast<float>(D));
  const Paging pg{kv.block_table, kv.max_blocks, kv.block_size, kv.num_blocks};
  DecodeAttnKernel<D, Elem><<<grid, kDecodeThreads, C::kSmemBytes, s>>>(
      out, parts.o, parts.ml, q, static_cast<const Elem*>(kv.k), static_cast<const Elem*>(kv.v), cu_q, start, pg,
      BlockShift(kv.block_size), B, Hq, Hkv, HG, splits, qscale);
  CheckCuda(cudaGetLastError(), "DecodeAttnKernel launch");
  CombineDecodeSplits(out, nullptr, parts, Nq, Hq, D, splits, s);
}

template <int D>
void LaunchDecode(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start, int B,
                  int Nq, int Hq, int Hkv, void* workspace, cudaStream_t s) {
  if (kv.bf16) LaunchDecode<D, uint16_t>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
  else LaunchDecode<D, float>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
}

template <int D>
size_t DecodeWorkspace(const KvPages& kv, int Nq, int Hq, int Hkv) {
  return kv.bf16 ? DecodeWorkspace<D, uint16_t>(kv, Nq, Hq, Hkv) : DecodeWorkspace<D, float>(kv, Nq, Hq, Hkv);
}

template <int D>
size_t DecodeTcWorkspace(const KvPages& kv, int Nq, int Hq, int Hkv) {
  return DecodePartialBytes(Nq, Hq, D, DecodeTcSplits<D>(kv, Nq, Hkv));
}

// qi.qkv null: q holds the rotated queries (the plain kernel); else the fused kernel reads qi.
template <int D, int NS>
void LaunchDecodeTc(float* out, uint16_t* out16, const float* q, const DecodeQkvIn& qi, const KvPages& kv,
                    const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv, void* workspace,
                    cudaStream_t s) {
  using C = DecodeTcCfg<D, NS>;
  const bool fused = qi.qkv != nullptr, norm = fused && qi.q_norm != nullptr;
  if (norm) PrepareDecodeKernel(DecodeTcKernel<D, true, true, NS>, C::kSmemBytesNorm);
  else
    PrepareDecodeKernel(fused ? DecodeTcKernel<D, true, false, NS> : DecodeTcKernel<D, false, false, NS>,
                        C::kSmemBytes);
  const int splits = DecodeTcSplits<D>(kv, Nq, Hkv);
  const DecodePartials parts = DecodePartialsIn(workspace, Nq, Hq, D, splits, "CachedAttentionDecodeTC");
  const dim3 grid(Nq, Hkv, splits);
  const float qscale = kLog2e / std::sqrt(static_cast<float>(D));
  const Paging pg{kv.block_table, kv.max_blocks, kv.block_size, kv.num_blocks};
  auto* kc = static_cast<uint16_t*>(kv.k);
  auto* vc = static_cast<uint16_t*>(kv.v);
  if (norm)
    DecodeTcKernel<D, true, true, NS><<<grid, kDecTcThreads, C::kSmemBytesNorm, s>>>(
        out, out16, parts.o, parts.ml, nullptr, kc, vc, cu_q, start, pg, BlockShift(kv.block_size), B, Hq, Hkv, splits,
        qscale, qi);
  else if (fused)
    DecodeTcKernel<D, true, false, NS><<<grid, kDecTcThreads, C::kSmemBytes, s>>>(
        out, out16, parts.o, parts.ml, nullptr, kc, vc, cu_q, start, pg, BlockShift(kv.block_size), B, Hq, Hkv, splits,
        qscale, qi);
  else
    DecodeTcKernel<D, false, false, NS><<<grid, kDecTcThreads, C::kSmemBytes, s>>>(
        out, out16, parts.o, parts.ml, q, kc, vc, cu_q, start, pg, BlockShift(kv.block_size), B, Hq, Hkv, splits,
        qscale, qi);
  CheckCuda(cudaGetLastError(), "DecodeTcKernel launch");
  CombineDecodeSplits(out, out16, parts, Nq, Hq, D, splits, s);
}

template <int D>
void LaunchDecodeTc(float* out, uint16_t* out16, const float* q, const DecodeQkvIn& qi, const KvPages& kv,
                    const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv, void* workspace,
                    cudaStream_t s) {
  if constexpr (D == 128) {
    if (DecodeTcStages<D>(static_cast<long long>(Nq) * Hkv) == 2)
      return LaunchDecodeTc<D, 2>(out, out16, q, qi, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
  }
  LaunchDecodeTc<D, 3>(out, out16, q, qi, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
}

template <int D>
void LaunchPrepass(float* delta, int* row_start, const float* dout, const float* out, const int32_t* cu, int S, int N,
                   int Hq, cudaStream_t s) {
  const int rows = N * Hq;
  constexpr int kPreThreads = 256;
  const long long pre_threads = static_cast<long long>(rows) * (D / 4);
  AttnBwdDeltaKernel<D><<<static_cast<unsigned>((pre_threads + kPreThreads - 1) / kPreThreads), kPreThreads, 0, s>>>(
      delta, dout, out, rows);
  CheckCuda(cudaGetLastError(), "AttnBwdDeltaKernel launch");
  RowStartKernel<<<(N + 255) / 256, 256, 0, s>>>(row_start, cu, S, N);
  CheckCuda(cudaGetLastError(), "RowStartKernel launch");
}

}  // namespace

void AttentionBackwardPrepass(float* delta, int* row_start, const float* dout, const float* out, const int32_t* cu,
                              int S, int N, int Hq, int D, cudaStream_t s) {
  switch (D) {
    case 16: return LaunchPrepass<16>(delta, row_start, dout, out, cu, S, N, Hq, s);
    case 32: return LaunchPrepass<32>(delta, row_start, dout, out, cu, S, N, Hq, s);
    case 64: return LaunchPrepass<64>(delta, row_start, dout, out, cu, S, N, Hq, s);
    case 128: return LaunchPrepass<128>(delta, row_start, dout, out, cu, S, N, Hq, s);
    default: Fail("AttentionBackwardPrepass: head width D must be 16, 32, 64 or 128; D", D);
  }
}

void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                      const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s) {
  if (N <= 0) return;
  if (S <= 0) Fail("AttentionForward: S must be positive when N > 0; S", S);
  CheckHeads(Hq, Hkv);
  switch (D) {
    case 16: return LaunchForward<16>(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, s);
    case 32: return LaunchForward<32>(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, s);
    case 64: return LaunchForward<64>(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, s);
    case 128: return LaunchForward<128>(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, s);
    default: Fail("AttentionForward: head width D must be 16, 32, 64 or 128; D", D);
  }
}

size_t AttentionBackwardWorkspace(int N, int Hq) {
  // delta[N, Hq] (f32) | row_start[N] (i32)
  return Align256(static_cast<size_t>(N) * Hq * sizeof(float)) + Align256(static_cast<size_t>(N) * sizeof(int));
}

void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                       const float* q, const float* k, const float* v, const int32_t* cu_seqlens, int S, int N,
                       int Hq, int Hkv, int D, void* workspace, cudaStream_t s) {
  if (N <= 0) return;
  if (S <= 0) Fail("AttentionBackward: S must be positive when N > 0; S", S);
  CheckHeads(Hq, Hkv);
  if (D != 16 && D != 32 && D != 64 && D != 128) Fail("AttentionBackward: head width D must be 16, 32, 64 or 128; D", D);
  // dq, dk, dv are accumulated with atomics: zero them first ("overwrite" semantics of the op).
  CheckCuda(cudaMemsetAsync(dq, 0, static_cast<size_t>(N) * Hq * D * sizeof(float), s), "cudaMemsetAsync(dq)");
  CheckCuda(cudaMemsetAsync(dk, 0, static_cast<size_t>(N) * Hkv * D * sizeof(float), s), "cudaMemsetAsync(dk)");
  CheckCuda(cudaMemsetAsync(dv, 0, static_cast<size_t>(N) * Hkv * D * sizeof(float), s), "cudaMemsetAsync(dv)");
  float* delta = BackwardDelta(workspace);
  int* row_start = BackwardRowStart(workspace, N, Hq);
  switch (D) {
    case 16: return LaunchBackward<16>(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, delta, row_start, s);
    case 32: return LaunchBackward<32>(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, delta, row_start, s);
    case 64: return LaunchBackward<64>(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, delta, row_start, s);
    case 128: return LaunchBackward<128>(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, delta, row_start, s);
    default: break;
  }
}

static void CheckPaging(const KvPages& kv, const char* op) {
  if (kv.block_size <= 0 || kv.max_blocks <= 0 || kv.num_blocks <= 0 ||
      static_cast<long long>(kv.max_blocks) * kv.block_size > INT_MAX) {
    std::fprintf(stderr, "aha engine/cuda attention: %s: bad paging (block_size %d, max_blocks %d, num_blocks %d)\n", op,
                 kv.block_size, kv.max_blocks, kv.num_blocks);
    std::abort();
  }
}

void KvCacheWrite(const KvPages& kv, const float* k, const float* v, const int32_t* cu_q, const int32_t* start, int B,
                  int Nq, int Hkv, int D, cudaStream_t s) {
  if (Nq <= 0 || B <= 0) return;
  CheckPaging(kv, "KvCacheWrite");
  const int row = Hkv * D;
  const Paging pg{kv.block_table, kv.max_blocks, kv.block_size, kv.num_blocks};
  constexpr int kT = 256;
  const int W = row % 4 == 0 ? 4 : 1;
  const long long n = static_cast<long long>(Nq) * (row / W);
  const unsigned grid = static_cast<unsigned>((n + kT - 1) / kT);
  if (kv.bf16) {
    uint16_t* kc = static_cast<uint16_t*>(kv.k);
    uint16_t* vc = static_cast<uint16_t*>(kv.v);
    if (W == 4) KvCacheWriteKernel<4><<<grid, kT, 0, s>>>(kc, vc, k, v, cu_q, start, pg, B, Nq, row);
    else KvCacheWriteKernel<1><<<grid, kT, 0, s>>>(kc, vc, k, v, cu_q, start, pg, B, Nq, row);
  } else {
    float* kc = static_cast<float*>(kv.k);
    float* vc = static_cast<float*>(kv.v);
    if (W == 4) KvCacheWriteKernel<4><<<grid, kT, 0, s>>>(kc, vc, k, v, cu_q, start, pg, B, Nq, row);
    else KvCacheWriteKernel<1><<<grid, kT, 0, s>>>(kc, vc, k, v, cu_q, start, pg, B, Nq, row);
  }
  CheckCuda(cudaGetLastError(), "KvCacheWriteKernel launch");
}

// The q/k/v kernels' width: V = 4 when D / 2 is a multiple of 4 and every pointer they access 4
// wide is aligned (16 bytes for f32, 8 for bf16; null pointers count as aligned), else 1.
int QkvWidth(int D, std::initializer_list<const void*> f32, std::initializer_list<const void*> bf16) {
  if (D % 8 != 0) return 1;
  for (const void* p : f32)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  for (const void* p : bf16)
    if (reinterpret_cast<uintptr_t>(p) % 8 != 0) return 1;
  return 4;
}
// Threads per block of the q/k/v kernels: the row's pairs and values, V a thread, in one pass up to 256.
int QkvThreads(int Hq, int Hkv, int D, int V) {
  const int work = ((Hq + Hkv) * (D / 2) + Hkv * D) / V;
  return std::min(256, (work + 31) / 32 * 32);
}
size_t QkvShared(int D, int heads = 0) { return static_cast<size_t>(D / 2) * sizeof(float2) + heads * sizeof(float); }

template <typename Elem>
void LaunchQkvRopeKvWrite(float* q, Elem* kc, Elem* vc, const float* qkv, const float* bias, const int32_t* positions,
                          const float* inv_freq, const int32_t* cu_q, const int32_t* start, const Paging& pg, int B,
                          int Nq, int Hq, int Hkv, int D, cudaStream_t s) {
  const bool bf16 = std::is_same_v<Elem, uint16_t>;
  const void* f32_pool = bf16 ? nullptr : kc;
  const void* bf16_pool = bf16 ? kc : nullptr;
  const int V = QkvWidth(D, {q, qkv, bias, f32_pool, bf16 ? nullptr : vc}, {bf16_pool, bf16 ? vc : nullptr});
  if (V == 4)
    QkvRopeKernel<Elem, true, 4><<<Nq, QkvThreads(Hq, Hkv, D, 4), QkvShared(D), s>>>(
        q, kc, vc, qkv, bias, positions, inv_freq, cu_q, start, pg, B, Hq, Hkv, D);
  else
    QkvRopeKernel<Elem, true, 1><<<Nq, QkvThreads(Hq, Hkv, D, 1), QkvShared(D), s>>>(
        q, kc, vc, qkv, bias, positions, inv_freq, cu_q, start, pg, B, Hq, Hkv, D);
  CheckCuda(cudaGetLastError(), "QkvRopeKernel launch");
}

void QkvRopeKvWrite(float* q, const float* qkv, const float* bias, const int32_t* positions, const float* inv_freq,
                    const KvPages& kv, const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv, int D,
                    cudaStream_t s) {
  if (Nq <= 0) return;
  if (B > 0) CheckPaging(kv, "QkvRopeKvWrite");
  const Paging pg{kv.block_table, kv.max_blocks, kv.block_size, kv.num_blocks};
  if (kv.bf16)
    LaunchQkvRopeKvWrite(q, static_cast<uint16_t*>(kv.k), static_cast<uint16_t*>(kv.v), qkv, bias, positions, inv_freq,
                         cu_q, start, pg, B, Nq, Hq, Hkv, D, s);
  else
    LaunchQkvRopeKvWrite(q, static_cast<float*>(kv.k), static_cast<float*>(kv.v), qkv, bias, positions, inv_freq, cu_q,
                         start, pg, B, Nq, Hq, Hkv, D, s);
}

void QkvRope(float* q, float* k, float* v, const float* qkv, const float* bias, const int32_t* positions,
             const float* inv_freq, int N, int Hq, int Hkv, int D, cudaStream_t s, uint16_t* k_bf16,
             uint16_t* v_bf16, uint16_t* q_bf16, uint16_t* q_bf16_scaled, const QkvNorm* norm) {
  if (N <= 0) return;
  auto* k16 = reinterpret_cast<__nv_bfloat16*>(k_bf16);
  auto* v16 = reinterpret_cast<__nv_bfloat16*>(v_bf16);
  auto* q16 = reinterpret_cast<__nv_bfloat16*>(q_bf16);
  auto* q16s = reinterpret_cast<__nv_bfloat16*>(q_bf16_scaled);
  const float qscale = AttentionQScale(D);
  if (norm) {
    if (!QkvNormSupported(D)) {
      std::fprintf(stderr, "aha cuda::QkvRope: per-head norms need D <= 128, a multiple of 4 (D = %d)\n", D);
      std::abort();
    }
    const QkvNorm& n = *norm;
    const size_t smem = QkvShared(D, Hq + Hkv);
    if (QkvWidth(D, {q, k, v, qkv, bias, n.q_pre, n.k_pre, n.q_norm, n.k_norm}, {k16, v16, q16, q16s}) == 4)
      QkvRopeKernel<float, false, 4, true><<<N, QkvThreads(Hq, Hkv, D, 4), smem, s>>>(
          q, k, v, qkv, bias, positions, inv_freq, nullptr, nullptr, Paging{}, 0, Hq, Hkv, D, k16, v16, q16, q16s,
          qscale, n);
    else
      QkvRopeKernel<float, false, 1, true><<<N, QkvThreads(Hq, Hkv, D, 1), smem, s>>>(
          q, k, v, qkv, bias, positions, inv_freq, nullptr, nullptr, Paging{}, 0, Hq, Hkv, D, k16, v16, q16, q16s,
          qscale, n);
    return CheckCuda(cudaGetLastError(), "QkvRopeKernel launch");
  }
  if (QkvWidth(D, {q, k, v, qkv, bias}, {k16, v16, q16, q16s}) == 4)
    QkvRopeKernel<float, false, 4><<<N, QkvThreads(Hq, Hkv, D, 4), QkvShared(D), s>>>(
        q, k, v, qkv, bias, positions, inv_freq, nullptr, nullptr, Paging{}, 0, Hq, Hkv, D, k16, v16, q16, q16s,
        qscale);
  else
    QkvRopeKernel<float, false, 1><<<N, QkvThreads(Hq, Hkv, D, 1), QkvShared(D), s>>>(
        q, k, v, qkv, bias, positions, inv_freq, nullptr, nullptr, Paging{}, 0, Hq, Hkv, D, k16, v16, q16, q16s,
        qscale);
  CheckCuda(cudaGetLastError(), "QkvRopeKernel launch");
}

void RopePackQkv(float* dqkv, uint16_t* dqkv_bf16, const float* dq, const float* dk, const float* dv,
                 const int32_t* positions, const float* inv_freq, int N, int Hq, int Hkv, int D, cudaStream_t s) {
  if (N <= 0) return;
  auto* d16 = reinterpret_cast<__nv_bfloat16*>(dqkv_bf16);
  if (QkvWidth(D, {dqkv, dq, dk, dv}, {d16}) == 4)
    RopePackQkvKernel<4><<<N, QkvThreads(Hq, Hkv, D, 4), QkvShared(D), s>>>(dqkv, d16, dq, dk, dv, positions, inv_freq,
                                                                           Hq, Hkv, D, -1.0f);
  else
    RopePackQkvKernel<1><<<N, QkvThreads(Hq, Hkv, D, 1), QkvShared(D), s>>>(dqkv, d16, dq, dk, dv, positions, inv_freq,
                                                                           Hq, Hkv, D, -1.0f);
  CheckCuda(cudaGetLastError(), "RopePackQkvKernel launch");
}

bool NormRopePackQkvSupported(int D, std::initializer_list<const void*> f32) {
  if (D != 64 && D != 128) return false;
  for (const void* p : f32)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void NormRopePackQkv(float* dqkv, uint16_t* dqkv_bf16, float* dq_norm, float* dk_norm, const float* dq,
                     const float* dk, const float* dv, const float* q_pre, const float* k_pre, const float* q_norm,
                     const float* k_norm, const float* q_rstd, const float* k_rstd, const int32_t* positions,
                     const float* inv_freq, int N, int Hq, int Hkv, int D, cudaStream_t s) {
  if (N <= 0) return;
  if (!NormRopePackQkvSupported(D, {dqkv, dq, dk, dv, q_pre, k_pre, q_norm, k_norm}) ||
      reinterpret_cast<uintptr_t>(dqkv_bf16) % 8 != 0) {
    std::fprintf(stderr, "aha cuda::NormRopePackQkv: needs D 64 or 128 and 16-byte aligned rows (D = %d)\n", D);
    std::abort();
  }
  auto* d16 = reinterpret_cast<__nv_bfloat16*>(dqkv_bf16);
  const unsigned blocks = static_cast<unsigned>((N + kNrpRows - 1) / kNrpRows);
  if (D == 64)
    NormRopePackQkvKernel<64><<<blocks, kNrpThreads, 0, s>>>(dqkv, d16, dq_norm, dk_norm, dq, dk, dv, q_pre, k_pre,
                                                            q_norm, k_norm, q_rstd, k_rstd, positions, inv_freq, N,
                                                            Hq, Hkv);
  else
    NormRopePackQkvKernel<128><<<blocks, kNrpThreads, 0, s>>>(dqkv, d16, dq_norm, dk_norm, dq, dk, dv, q_pre, k_pre,
                                                             q_norm, k_norm, q_rstd, k_rstd, positions, inv_freq, N,
                                                             Hq, Hkv);
  CheckCuda(cudaGetLastError(), "NormRopePackQkvKernel launch");
}

void CachedAttentionRowwise(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                            int B, int Nq, int Hq, int Hkv, int D, cudaStream_t s) {
  if (Nq <= 0 || B <= 0) return;
  CheckHeads(Hq, Hkv);
  CheckPaging(kv, "CachedAttentionRowwise");
  switch (D) {
    case 16: return LaunchCached<16>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, s);
    case 32: return LaunchCached<32>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, s);
    case 64: return LaunchCached<64>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, s);
    case 128: return LaunchCached<128>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, s);
    default: Fail("CachedAttentionRowwise: head width D must be 16, 32, 64 or 128; D", D);
  }
}

size_t CachedAttentionDecodeWorkspace(const KvPages& kv, int Nq, int Hq, int Hkv, int D) {
  if (Nq <= 0) return 0;
  CheckHeads(Hq, Hkv);
  CheckPaging(kv, "CachedAttentionDecodeWorkspace");
  switch (D) {
    case 16: return DecodeWorkspace<16>(kv, Nq, Hq, Hkv);
    case 32: return DecodeWorkspace<32>(kv, Nq, Hq, Hkv);
    case 64: return DecodeWorkspace<64>(kv, Nq, Hq, Hkv);
    case 128: return DecodeWorkspace<128>(kv, Nq, Hq, Hkv);
    default: Fail("CachedAttentionDecodeWorkspace: head width D must be 16, 32, 64 or 128; D", D);
  }
}

void CachedAttentionDecode(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                           int B, int Nq, int Hq, int Hkv, int D, void* workspace, cudaStream_t s) {
  if (Nq <= 0 || B <= 0) return;
  CheckHeads(Hq, Hkv);
  CheckPaging(kv, "CachedAttentionDecode");
  switch (D) {
    case 16: return LaunchDecode<16>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
    case 32: return LaunchDecode<32>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
    case 64: return LaunchDecode<64>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
    case 128: return LaunchDecode<128>(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
    default: Fail("CachedAttentionDecode: head width D must be 16, 32, 64 or 128; D", D);
  }
}

bool CachedAttentionDecodeTcSupported(const KvPages& kv, int Hq, int Hkv, int D) {
  return kv.bf16 && Hkv > 0 && Hq > 0 && Hq % Hkv == 0 && Hq / Hkv <= kDecTcMaxG && (D == 64 || D == 128);
}

static void CheckDecodeTc(const KvPages& kv, int Hq, int Hkv, int D, const char* op) {
  CheckHeads(Hq, Hkv);
  CheckPaging(kv, op);
  if (!CachedAttentionDecodeTcSupported(kv, Hq, Hkv, D)) {
    std::fprintf(stderr,
                 "aha engine/cuda attention: %s: needs a bf16 pool, Hq / Hkv <= %d and D in {64, 128} "
                 "(bf16 %d, Hq %d, Hkv %d, D %d)\n",
                 op, kDecTcMaxG, kv.bf16 ? 1 : 0, Hq, Hkv, D);
    std::abort();
  }
}

size_t CachedAttentionDecodeTcWorkspace(const KvPages& kv, int Nq, int Hq, int Hkv, int D) {
  if (Nq <= 0) return 0;
  CheckDecodeTc(kv, Hq, Hkv, D, "CachedAttentionDecodeTcWorkspace");
  return D == 64 ? DecodeTcWorkspace<64>(kv, Nq, Hq, Hkv) : DecodeTcWorkspace<128>(kv, Nq, Hq, Hkv);
}

void CachedAttentionDecodeTC(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                             int B, int Nq, int Hq, int Hkv, int D, void* workspace, cudaStream_t s, uint16_t* out_bf16) {
  if (Nq <= 0 || B <= 0) return;
  CheckDecodeTc(kv, Hq, Hkv, D, "CachedAttentionDecodeTC");
  const DecodeQkvIn none;
  if (D == 64) return LaunchDecodeTc<64>(out, out_bf16, q, none, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
  return LaunchDecodeTc<128>(out, out_bf16, q, none, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
}

void QkvRopeCachedAttentionDecodeTC(float* out, const float* qkv, const float* bias, const int32_t* positions,
                                    const float* inv_freq, const KvPages& kv, const int32_t* cu_q,
                                    const int32_t* start, int B, int Nq, int Hq, int Hkv, int D, void* workspace,
                                    cudaStream_t s, uint16_t* out_bf16, const float* q_norm, const float* k_norm,
                                    float eps) {
  if (Nq <= 0 || B <= 0) return;
  CheckDecodeTc(kv, Hq, Hkv, D, "QkvRopeCachedAttentionDecodeTC");
  if (Nq != B) Fail("QkvRopeCachedAttentionDecodeTC: one new row per sequence (Nq == B); Nq", Nq);
  if ((q_norm == nullptr) != (k_norm == nullptr)) Fail("QkvRopeCachedAttentionDecodeTC: q_norm without k_norm", 0);
  const DecodeQkvIn qi{qkv, bias, positions, inv_freq, q_norm, k_norm, eps};
  if (D == 64) return LaunchDecodeTc<64>(out, out_bf16, nullptr, qi, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
  return LaunchDecodeTc<128>(out, out_bf16, nullptr, qi, kv, cu_q, start, B, Nq, Hq, Hkv, workspace, s);
}

size_t CachedAttentionWorkspace(const KvPages& kv, int B, int Nq, int Hq, int Hkv, int D) {
  if (Nq != B) return 0;
  if (CachedAttentionDecodeTcSupported(kv, Hq, Hkv, D)) return CachedAttentionDecodeTcWorkspace(kv, Nq, Hq, Hkv, D);
  return CachedAttentionDecodeWorkspace(kv, Nq, Hq, Hkv, D);
}

bool CachedAttentionForward(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                            int B, int Nq, int Hq, int Hkv, int D, void* workspace, cudaStream_t s, uint16_t* out_bf16) {
  if (Nq != B) {
    CachedAttentionRowwise(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, D, s);
    return false;
  }
  if (CachedAttentionDecodeTcSupported(kv, Hq, Hkv, D)) {
    CachedAttentionDecodeTC(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, D, workspace, s, out_bf16);
    return out_bf16 != nullptr && Nq > 0;
  }
  CachedAttentionDecode(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, D, workspace, s);
  return false;
}

}  // namespace aha::engine::cuda
