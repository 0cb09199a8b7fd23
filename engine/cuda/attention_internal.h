// What attention.cu, attention_tc.cu and attention_wgmma.cu share (included by those .cu files only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "engine/cuda/bf16.h"

namespace aha::engine::cuda {

// A launcher's argument check or CUDA call failed: the op interface has no error path, so abort
// with the reason (a bad shape is a caller bug, not bad input).
[[noreturn]] inline void Fail(const char* what, long long value) {
  std::fprintf(stderr, "aha engine/cuda attention: %s (got %lld)\n", what, value);
  std::abort();
}

inline void CheckHeads(int Hq, int Hkv) {
  if (Hkv <= 0 || Hq <= 0 || Hq % Hkv != 0) Fail("Hq must be a positive multiple of Hkv; Hq", Hq);
}

inline void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha engine/cuda attention: %s: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

// Blocks along the packed axis, the y extent of the training attention kernels' grids (x is the
// query head): at most 65535, so N up to 8.3M rows at 128 rows a block.
inline unsigned GridRows(int N, int rows) {
  const int n = (N + rows - 1) / rows;
  if (n > 65535) Fail("attention (tensor cores): too many rows for the grid; N", N);
  return static_cast<unsigned>(n);
}

// Kernels whose dynamic shared memory exceeds the default 48 KB need the opt-in attribute. Set on
// every launch (a cheap host call, no stream work) so that it holds on whichever device is current.
template <typename Kernel>
void AllowSmem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
              "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

constexpr float kLog2e = 1.4426950408889634f;
// The factor the training forward's q is scaled by before its bf16 rounding (scale * log2 e): every
// launcher and QkvRope's pre-scaled copy take it from here, so they round the same products.
inline float AttentionQScale(int D) { return kLog2e / std::sqrt(static_cast<float>(D)); }
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float4 Ldg4(const float* __restrict__ p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 Zero4() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

// ---- cp.async (16-byte global -> shared copies, sm_80+) ---------------------------------------------
__device__ __forceinline__ unsigned SmemAddr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void CpAsync16(void* smem_dst, const void* gsrc, bool valid) {
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 destination bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem_dst)), "l"(gsrc), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWaitGroup() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() { CpAsyncWaitGroup<0>(); }

// ---- bf16 tensor cores: mma.sync m16n8k16 and its operands (attention_tc.cu, the TC decode kernel) --
// Fragment layouts of mma.m16n8k16 (PTX ISA), lane = 4 g + t (g = lane / 4, t = lane % 4); a
// register of a bf16 operand holds two elements, the lower index in the lower 16 bits:
//  - A (16 x 16, row major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//    a3 = A[g+8][2t+8, 2t+9].
//  - B (16 x 8, k x n): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g].
//  - C (16 x 8, f32): c0, c1 = C[g][2t, 2t+1]; c2, c3 = C[g+8][2t, 2t+1].
// So the C fragments of two adjacent n-tiles (columns 16 s .. 16 s + 15) are, repacked to bf16, the
// A fragment of k-step s. ldmatrix x4: lanes 8 i .. 8 i + 7 give the 8 row addresses of matrix i,
// and register i of a lane holds row g, columns 2t, 2t+1 of matrix i; with .trans it holds rows 2t,
// 2t+1 of column g instead.


// Four 8 x 8 bf16 matrices; this lane passes the address of row (lane % 8) of matrix lane / 8
// (16-byte aligned). The "memory" clobber keeps these reads ordered with plain shared-memory stores.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p))
               : "memory");
}
__device__ __forceinline__ void LdMatrixX4T(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p))
               : "memory");
}

// c += A (16 x 16) * B (16 x 8); bf16 operands, f32 accumulators.
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragments of k-steps 0 .. KK-1 of a 16-row tile whose rows g and g + 8 are the f32 rows xA and xB
// (nullptr: a zero row; 8-byte aligned), scaled by `scale` and rounded to bf16. t = lane % 4. The rows
// are in global memory (read through the read-only cache), or in shared memory with kShared.
template <int KK, bool kShared = false>
__device__ __forceinline__ void LoadAFragsF32(uint32_t (&a)[KK][4], const float* __restrict__ xA,
                                              const float* __restrict__ xB, int t, float scale) {
  auto ld2 = [](const float* p) {
    if constexpr (kShared) return *reinterpret_cast<const float2*>(p);
    else return __ldg(reinterpret_cast<const float2*>(p));
  };
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    const int c = kk * 16 + 2 * t;
    float2 x0 = make_float2(0.0f, 0.0f), x1 = x0, x2 = x0, x3 = x0;
    if (xA != nullptr) {
      x0 = ld2(xA + c);
      x2 = ld2(xA + c + 8);
    }
    if (xB != nullptr) {
      x1 = ld2(xB + c);
      x3 = ld2(xB + c + 8);
    }
    a[kk][0] = PackBf16(x0.x * scale, x0.y * scale);
    a[kk][1] = PackBf16(x1.x * scale, x1.y * scale);
    a[kk][2] = PackBf16(x2.x * scale, x2.y * scale);
    a[kk][3] = PackBf16(x3.x * scale, x3.y * scale);
  }
}

// 2^x on the special-function unit alone (ex2.approx.ftz): exp2f adds a range check and two
// multiplies per call so that results below 2^-126 keep their denormal bits; attention weights that
// small add nothing to a sum that holds 1 (its max term), so they are flushed to 0 here. 2^-inf = 0.
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One online-softmax step of a warp's 16-row tile on the C fragments s[NT][4] of its scores (log2
// domain, masked entries -inf): c = 0, 1 belong to row g, c = 2, 3 to row g + 8, and a row's scores
// live in the 4 lanes of a quad (2 xor-shuffles for the max). Updates the running maxima mA, mB (the
// same in the 4 lanes) and this lane's shares lA, lB of the row sums, rescales the output fragments
// o[DN][4], and replaces s by P = exp2(s - m) (0 where masked). A row with nothing visible yet uses 0
// as its max (its alpha is then 0: exp2(-inf)).
template <int NT, int DN>
__device__ __forceinline__ void OnlineSoftmaxStep(float (&s)[NT][4], float (&o)[DN][4], float& mA, float& mB,
                                                  float& lA, float& lB) {
  float mxA = -INFINITY, mxB = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    mxA = fmaxf(mxA, fmaxf(s[nt][0], s[nt][1]));
    mxB = fmaxf(mxB, fmaxf(s[nt][2], s[nt][3]));
  }
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {  // the 4 lanes of a quad hold one row pair
    mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, off));
    mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, off));
  }
  const float mA_new = fmaxf(mA, mxA), mB_new = fmaxf(mB, mxB);
  const float mA_use = mA_new == -INFINITY ? 0.0f : mA_new;  // a row with nothing visible yet
  const float mB_use = mB_new == -INFINITY ? 0.0f : mB_new;
  const float alphaA = Exp2Ftz(mA - mA_use), alphaB = Exp2Ftz(mB - mB_use);  // 0 when m = -inf
  mA = mA_new;
  mB = mB_new;
  float sumA = 0.0f, sumB = 0.0f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    s[nt][0] = Exp2Ftz(s[nt][0] - mA_use);  // 0 for masked keys
    s[nt][1] = Exp2Ftz(s[nt][1] - mA_use);
    s[nt][2] = Exp2Ftz(s[nt][2] - mB_use);
    s[nt][3] = Exp2Ftz(s[nt][3] - mB_use);
    sumA += s[nt][0] + s[nt][1];
    sumB += s[nt][2] + s[nt][3];
  }
  lA = lA * alphaA + sumA;  // this lane's share of the row sums
  lB = lB * alphaB + sumB;
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
    o[dn][0] *= alphaA;
    o[dn][1] *= alphaA;
    o[dn][2] *= alphaB;
    o[dn][3] *= alphaB;
  }
}

// The A fragment of the PV k-step over keys 16 s .. 16 s + 15 from the P fragments of n-tiles 2 s, 2 s + 1.
__device__ __forceinline__ void PackPFrag(uint32_t (&pa)[4], const float (&p0)[4], const float (&p1)[4]) {
  pa[0] = PackBf16(p0[0], p0[1]);
  pa[1] = PackBf16(p0[2], p0[3]);
  pa[2] = PackBf16(p1[0], p1[1]);
  pa[3] = PackBf16(p1[2], p1[3]);
}

// The end of a forward over a warp's 16 rows (rowA = g-th, rowB = rowA + 8; rows >= N skipped):
// the lanes of a quad add their shares of the row sums, then out[row, h] = o / l in f32 (when out is
// not null) and in bf16 (into out16 when not null) and lse[row, h] = (m + log2 l) ln 2. l >= 1 for a real row: it sees
// itself, and its max term is exp2(0). When the 8-column groups come in whole blocks of 4
// (D % 32 == 0), each block is transposed within the quad (QuadTranspose, bf16.h), so that lane t
// stores group 4 k + t as two float4 and one 16-byte bf16 piece, instead of four lanes storing a
// float2 and a 4-byte piece each (docs/kernels.md, version 18). Every lane of the warp must call it.
template <int D>
__device__ __forceinline__ void StoreForwardRows(float* __restrict__ out, uint16_t* __restrict__ out16,
                                                 float* __restrict__ lse, const float (&o)[D / 8][4], float mA,
                                                 float mB, float lA, float lB, int rowA, int rowB, int N, int Hq,
                                                 int h, int t) {
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, off);
    lB += __shfl_xor_sync(0xffffffffu, lB, off);
  }
  auto store = [&](int row, float l, float m, int c0) {
    const float inv = 1.0f / l;
    const size_t at = (static_cast<size_t>(row) * Hq + h) * D;
    const bool real = row < N;
    if constexpr (D % 32 == 0) {
#pragma unroll
      for (int k = 0; k < D / 32; ++k) {
        float x0[4], x1[4];  // each group's two columns of this lane: 8 j + 2 t and 8 j + 2 t + 1
#pragma unroll
        for (int j = 0; j < 4; ++j) x0[j] = o[4 * k + j][c0] * inv, x1[j] = o[4 * k + j][c0 + 1] * inv;
        QuadTranspose(x0, t);
        QuadTranspose(x1, t);
        const size_t c = at + 8 * (4 * k + t);
        if (real) {
          if (out) {
            *reinterpret_cast<float4*>(out + c) = make_float4(x0[0], x1[0], x0[1], x1[1]);
            *reinterpret_cast<float4*>(out + c + 4) = make_float4(x0[2], x1[2], x0[3], x1[3]);
          }
          if (out16)
            *reinterpret_cast<uint4*>(out16 + c) = make_uint4(PackBf16(x0[0], x1[0]), PackBf16(x0[1], x1[1]),
                                                              PackBf16(x0[2], x1[2]), PackBf16(x0[3], x1[3]));
        }
      }
    } else if (real) {
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const float x0 = o[dn][c0] * inv, x1 = o[dn][c0 + 1] * inv;
        if (out) *reinterpret_cast<float2*>(out + at + dn * 8 + 2 * t) = make_float2(x0, x1);
        if (out16) *reinterpret_cast<uint32_t*>(out16 + at + dn * 8 + 2 * t) = PackBf16(x0, x1);
      }
    }
    if (real && t == 0) lse[static_cast<size_t>(row) * Hq + h] = (m + log2f(l)) * kLn2;
  };
  store(rowA, lA, mA, 0);
  store(rowB, lB, mB, 2);
}

// Adds a * (C fragment c) of a 16 x 8 tile into x[row, head, col .. col + 7] of x[*, H, D] with one
// float4 atomic per lane: lanes t and t ^ 1 trade halves, so the even lane adds row rowA, columns
// col + 2t .. col + 2t + 3, and the odd lane row rowB, columns col + 2t - 2 .. col + 2t + 1. Rows
// >= limit are skipped. Every lane of the warp must call it (shuffles).
template <int D>
__device__ __forceinline__ void AtomicAddFrag(float* __restrict__ x, int H, int head, int rowA, int rowB, int col,
                                              const float (&c)[4], float a, int limit, int t) {
  const bool even = (t & 1) == 0;
  const float s0 = even ? c[2] : c[0], s1 = even ? c[3] : c[1];  // what the partner needs
  const float o0 = __shfl_xor_sync(0xffffffffu, s0, 1);
  const float o1 = __shfl_xor_sync(0xffffffffu, s1, 1);
  const int row = even ? rowA : rowB;
  const int c0 = col + (even ? 2 * t : 2 * t - 2);
  const float4 val =
      even ? make_float4(c[0] * a, c[1] * a, o0 * a, o1 * a) : make_float4(o0 * a, o1 * a, c[2] * a, c[3] * a);
  if (row < limit) {
    float* p = x + (static_cast<size_t>(row) * H + head) * D + c0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(p), val);
#else
    atomicAdd(p + 0, val.x);
    atomicAdd(p + 1, val.y);
    atomicAdd(p + 2, val.z);
    atomicAdd(p + 3, val.w);
#endif
  }
}

// Largest s in [0, S) with cu[s] <= r, for a nondecreasing cu[0..S] with cu[0] <= r. Empty sequences
// (cu[s] == cu[s + 1]) are stepped over, so cu[result] is the start of the sequence holding row r.
__device__ __forceinline__ int FindSeq(const int32_t* __restrict__ cu, int S, int r) {
  int lo = 0, hi = S - 1;  // the answer is in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(cu + mid) <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The training forward's prologue for the block of rows r0 .. r0 + rows - 1 (rows <= blockDim.x):
// thread tid < rows writes its row's sequence start into row_ss[tid] (INT_MAX past N), and the
// warp loads the Q fragments of its rows rowA, rowB (scaled by qscale, bf16), from q16s when it is
// not null: q already scaled and rounded (QkvRope's copy, the same bits). The caller's barrier
// publishes row_ss.
template <int D>
__device__ __forceinline__ void ForwardPrologue(int* row_ss, uint32_t (&qa)[D / 16][4], const float* __restrict__ q,
                                                const int32_t* __restrict__ cu, int S, int N, int Hq, int h, int r0,
                                                int rows, int tid, int rowA, int rowB, int t, float qscale,
                                                const uint16_t* __restrict__ q16s = nullptr) {
  if (tid < rows) {
    const int r = r0 + tid;
    row_ss[tid] = r < N ? __ldg(cu + FindSeq(cu, S, r)) : INT_MAX;
  }
  if (q16s) {
    auto ld = [&](int row, int c) {
      return row < N ? __ldg(reinterpret_cast<const unsigned*>(q16s + (static_cast<size_t>(row) * Hq + h) * D + c))
                     : 0u;
    };
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int c = kk * 16 + 2 * t;
      qa[kk][0] = ld(rowA, c);
      qa[kk][1] = ld(rowB, c);
      qa[kk][2] = ld(rowA, c + 8);
      qa[kk][3] = ld(rowB, c + 8);
    }
    return;
  }
  LoadAFragsF32<D / 16>(qa, rowA < N ? q + (static_cast<size_t>(rowA) * Hq + h) * D : nullptr,
                        rowB < N ? q + (static_cast<size_t>(rowB) * Hq + h) * D : nullptr, t, qscale);
}

// The causal mask on a warp's scores s[8][4] of the 64-key tile from kt: key kt + 8 nt + 2 t + (c & 1)
// stays visible to row rowA (c = 0, 1; sequence start ssA) or rowB (c = 2, 3; ssB) when it is in
// [start, row]; else -inf.
__device__ __forceinline__ void MaskScores(float (&s)[8][4], int kt, int ssA, int ssB, int rowA, int rowB, int t) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int key = kt + nt * 8 + 2 * t + (c & 1);
      const bool ok = c < 2 ? (key >= ssA && key <= rowA) : (key >= ssB && key <= rowB);
      if (!ok) s[nt][c] = -INFINITY;
    }
  }
}

// The backward kernels' per-row values of query row r (one thread a row, loaded one tile ahead and
// stored at the tile's end, their latency hidden behind the tile): lse log2 e, delta as the pre-pass
// gives it, the row's start; past N 0, 0 and INT_MAX (every key masked).
struct RowStats {
  float lse2 = 0.0f, dl = 0.0f;
  int ss = INT_MAX;
  __device__ __forceinline__ void Load(const float* __restrict__ lse, const float* __restrict__ delta,
                                       const int* __restrict__ row_start, int r, int N, int Hq, int h) {
    if (r < N) {
      lse2 = __ldg(lse + static_cast<size_t>(r) * Hq + h) * kLog2e;
      dl = __ldg(delta + static_cast<size_t>(r) * Hq + h);
      ss = __ldg(row_start + r);
    } else {
      lse2 = 0.0f;
      dl = 0.0f;
      ss = INT_MAX;  // masks every key
    }
  }
  __device__ __forceinline__ void Store(float* lse2s, float* dls, int* sss, int i) const {
    lse2s[i] = lse2;
    dls[i] = dl;
    sss[i] = ss;
  }
};

// Workspace of AttentionBackwardWorkspace(N, Hq): delta[N, Hq] (f32) | row_start[N] (i32).
constexpr size_t Align256(size_t n) { return (n + 255) / 256 * 256; }
inline float* BackwardDelta(void* workspace) { return static_cast<float*>(workspace); }
inline int* BackwardRowStart(void* workspace, int N, int Hq) {
  return reinterpret_cast<int*>(static_cast<char*>(workspace) + Align256(static_cast<size_t>(N) * Hq * sizeof(float)));
}

// The backward pre-pass (attention.cu): delta[n, h] = sum_d dout * out over rows of D floats, and
// row_start[n] = the first row of row n's sequence. D in {16, 32, 64, 128}.
void AttentionBackwardPrepass(float* delta, int* row_start, const float* dout, const float* out,
                              const int32_t* cu, int S, int N, int Hq, int D, cudaStream_t s);

}  // namespace aha::engine::cuda
