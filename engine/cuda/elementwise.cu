// Elementwise, normalisation, rope, embedding and optimizer kernels (kernels.h). Each computes the
// function of the same-named CpuBackend op (engine/cpu_backend.cc); these are memory-bound, so each
// reads its inputs once and writes its outputs once, with consecutive threads on consecutive floats.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "engine/cuda/bf16.h"
#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {

namespace {

constexpr int kThreads = 256;

inline unsigned Blocks(size_t n, int threads = kThreads) {
  size_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535u * 32u ? (b == 0 ? 1 : b) : 65535u * 32u);
}

__device__ __forceinline__ double WarpSumD(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void EmbeddingForwardKernel(float* out, const int32_t* ids, const float* wte, int N, int C) {
  const size_t total = static_cast<size_t>(N) * C;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / C, c = i % C;
    out[i] = wte[static_cast<size_t>(ids[n]) * C + c];
  }
}

__global__ void EmbeddingBackwardKernel(float* dwte, const float* dout, const int32_t* ids, int N, int C) {
  const size_t total = static_cast<size_t>(N) * C;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / C, c = i % C;
    atomicAdd(dwte + static_cast<size_t>(ids[n]) * C + c, dout[i]);
  }
}

// RMSNorm forward, optionally fused with the residual add before it (kAdd: xs = x + y, written
// back, then normalised), optionally also writing the output rounded to bf16 (out16, the next
// product's operand: Gemm::AdoptCast). T threads per row (a multiple of 32, at most kThreads),
// kThreads / T rows per block. One warp per row, as before version 5, gave a decode step (N = 256,
// C = 896) 32 blocks on 132 SMs, each lane walking 28 floats of its row twice (~14 us a call in
// the profile); a row of 896 now has 224 threads holding one float4 each in registers, 256 blocks,
// the sum read once from memory and every thread's 16-byte loads in flight at once.
//
// Sum over the T threads of this thread's row: warp shuffles, then the row's warps through shared
// memory. Every thread of the block must call it (it synchronises the block).
__device__ __forceinline__ float RowSum(float v, int T) {
  __shared__ float warp_sums[kThreads / 32];
  v = WarpSum(v);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  const int first = static_cast<int>(threadIdx.x) / T * (T / 32);
  float s = 0.0f;
  for (int i = 0; i < T / 32; ++i) s += warp_sums[first + i];
  return s;
}

// Lets a kernel launched after this one with programmatic dependent launch (PDL) start now: it
// may only read, before its griddepcontrol.wait, memory this kernel does not write (the fused
// MLP kernel after a norm copies its weights early, mlp.cu). No effect on ordinary launches.
__device__ __forceinline__ void LetDependentsStart() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// C % 4 == 0, 16-byte aligned rows: each thread keeps kItems float4 of its row in registers.
// With kAdd, y holds `parts` (<= kParts) partial sums of the addend, N * C floats apart, added in
// order (a product split along K: Gemm::NTSplitK); parts = 1 is a plain x + y. The parts' loads
// are all issued before the first add (kParts is a compile-time bound, so they unroll): one round
// trip, not `parts` of them.
template <bool kAdd, int kItems, int kParts = 1>
__global__ void RmsNormVecKernel(float* out, __nv_bfloat16* out16, float* rstd, float* xs, const float* x,
                                 const float* y, int parts, const float* w, int N, int C, int T, float eps) {
  LetDependentsStart();
  const int row = blockIdx.x * (blockDim.x / T) + threadIdx.x / T;
  const int t = threadIdx.x % T;
  const bool live = row < N;
  const int C4 = C / 4;
  const size_t base = static_cast<size_t>(live ? row : 0) * C;
  float4 v[kItems], g[kItems];
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = t + i * T;
    v[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (live && c < C4) {
      g[i] = reinterpret_cast<const float4*>(w)[c];  // in flight with x: one load latency, not two
      float4 a = reinterpret_cast<const float4*>(x + base)[c];
      if constexpr (kAdd) {
        float4 e[kParts];
#pragma unroll
        for (int j = 0; j < kParts; ++j)
          if (j < parts) e[j] = reinterpret_cast<const float4*>(y + static_cast<size_t>(j) * N * C + base)[c];
        float4 b = e[0];
#pragma unroll
        for (int j = 1; j < kParts; ++j)
          if (j < parts) {
            b.x += e[j].x;
            b.y += e[j].y;
            b.z += e[j].z;
            b.w += e[j].w;
          }
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
        reinterpret_cast<float4*>(xs + base)[c] = a;
      }
      v[i] = a;
      ss += SumOfSquares4(a);
    }
  }
  const float r = rsqrtf(RowSum(ss, T) / C + eps);
  if (!live) return;
  if (t == 0) rstd[row] = r;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = t + i * T;
    if (c >= C4) continue;
    const float4 o =
        make_float4((v[i].x * r) * g[i].x, (v[i].y * r) * g[i].y, (v[i].z * r) * g[i].z, (v[i].w * r) * g[i].w);
    if (out) reinterpret_cast<float4*>(out + base)[c] = o;
    if (out16) {
      reinterpret_cast<uint2*>(out16 + base)[c] = PackBf16x4(o);  // the adopted copy equals a cast
    }
  }
}

// Any C and alignment: scalar loads, the sum read back from memory (this thread's own writes).
template <bool kAdd>
__global__ void RmsNormScalarKernel(float* out, __nv_bfloat16* out16, float* rstd, float* xs, const float* x,
                                    const float* y, int parts, const float* w, int N, int C, int T, float eps) {
  LetDependentsStart();
  const int row = blockIdx.x * (blockDim.x / T) + threadIdx.x / T;
  const int t = threadIdx.x % T;
  const bool live = row < N;
  const size_t base = static_cast<size_t>(live ? row : 0) * C;
  float ss = 0.0f;
  if (live)
    for (int c = t; c < C; c += T) {
      float a = x[base + c];
      if constexpr (kAdd) {
        float b = y[base + c];
        for (int j = 1; j < parts; ++j) b += y[static_cast<size_t>(j) * N * C + base + c];
        a += b;
        xs[base + c] = a;
      }
      ss += a * a;
    }
  const float r = rsqrtf(RowSum(ss, T) / C + eps);
  if (!live) return;
  if (t == 0) rstd[row] = r;
  const float* src = kAdd ? xs : x;
  for (int c = t; c < C; c += T) {
    const float o = (src[base + c] * r) * w[c];
    if (out) out[base + c] = o;
    if (out16) out16[base + c] = __float2bfloat16_rn(o);
  }
}

// dx_c += r w_c g_c - x_c r^3 / C * sum_j g_j w_j x_j   (one warp per row)
__global__ void RmsNormBackwardDxKernel(float* dx, const float* dout, const float* x, const float* w,
                                        const float* rstd, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const size_t base = static_cast<size_t>(row) * C;
  float dot = 0.0f;
  for (int c = lane; c < C; c += 32) dot += dout[base + c] * w[c] * x[base + c];
  dot = WarpSum(dot);
  const float r = rstd[row];
  const float k = dot * r * r * r / C;
  for (int c = lane; c < C; c += 32) dx[base + c] += r * w[c] * dout[base + c] - x[base + c] * k;
}

// dw_c += sum_n g[n, c] x[n, c] r[n]: a thread per column and a block per slab of rows, one atomic
// per (column, slab).
constexpr int kRowsPerSlab = 128;
__global__ void RmsNormBackwardDwKernel(float* dw, const float* dout, const float* x, const float* rstd, int N,
                                        int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int n0 = blockIdx.y * kRowsPerSlab, n1 = min(N, n0 + kRowsPerSlab);
  float acc = 0.0f;
  for (int n = n0; n < n1; ++n) acc += dout[static_cast<size_t>(n) * C + c] * x[static_cast<size_t>(n) * C + c] * rstd[n];
  atomicAdd(dw + c, acc);
}

// The whole backward in one pass over dout and x (C % 4 == 0, aligned rows, C <= 2048): a block
// takes a slab of kFusedSlab rows, each warp a row at a time with its kItems float4 of dout, x and
// dx per lane in registers, all three loaded before the row's sum (w is read from shared memory,
// which keeps the kernel at two blocks per SM): dot, then dx (+=) and, when dx16 is not null, dx
// rounded to bf16 (the next product's dout: Gemm::AdoptCast); each lane sums g x r of its columns
// over the warp's rows in the warp's row of shared memory, and the block's warps add theirs into one
// atomic per column. Rows of more than 1,024 (12 or 16 float4 a lane: three arrays of them in
// registers) run one block a multiprocessor.
constexpr int kFusedSlab = 32;
template <int kItems>
__global__ void __launch_bounds__(kThreads, kItems <= 8 ? 2 : 1) RmsNormBackwardFusedKernel(float* dx, __nv_bfloat16* dx16, float* dw,
                                                                          const float* dout, const float* x,
                                                                          const float* w, const float* rstd, int N,
                                                                          int C) {
  extern __shared__ float smem[];  // w [C] | per-warp dw sums [kThreads / 32][C]
  float* ws = smem;
  float* dw_part = smem + C;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, C4 = C / 4;
  for (int c = threadIdx.x; c < C4; c += kThreads) reinterpret_cast<float4*>(ws)[c] = reinterpret_cast<const float4*>(w)[c];
  __syncthreads();
  const float4* w4 = reinterpret_cast<const float4*>(ws);
  // Each warp sums g x r of its rows into its own row of dw_part (a lane's columns are its own: no
  // conflicts), which leaves the registers to dout, x and dx of the row.
  float4* acc = reinterpret_cast<float4*>(dw_part + warp * C);
  for (int c = lane; c < C4; c += 32) acc[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const int n1 = min(N, (blockIdx.x + 1) * kFusedSlab);
  for (int row = blockIdx.x * kFusedSlab + warp; row < n1; row += kThreads / 32) {
    const size_t base = static_cast<size_t>(row) * C4;
    // dx (added into) is loaded with dout and x, not after the row's sum: one round of loads a row.
    float4 g[kItems], xv[kItems], dv[kItems];
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int c = lane + 32 * i;
      g[i] = xv[i] = dv[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (c < C4) {
        g[i] = reinterpret_cast<const float4*>(dout)[base + c];
        xv[i] = reinterpret_cast<const float4*>(x)[base + c];
        dv[i] = reinterpret_cast<const float4*>(dx)[base + c];
        const float4 wv = w4[c];
        dot += g[i].x * wv.x * xv[i].x + g[i].y * wv.y * xv[i].y + g[i].z * wv.z * xv[i].z + g[i].w * wv.w * xv[i].w;
      }
    }
    dot = WarpSum(dot);
    const float r = rstd[row];
    const float k = dot * r * r * r / C;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int c = lane + 32 * i;
      if (c >= C4) continue;
      const float4 wv = w4[c];
      float4 d = dv[i];
      d.x += r * wv.x * g[i].x - xv[i].x * k;
      d.y += r * wv.y * g[i].y - xv[i].y * k;
      d.z += r * wv.z * g[i].z - xv[i].z * k;
      d.w += r * wv.w * g[i].w - xv[i].w * k;
      reinterpret_cast<float4*>(dx)[base + c] = d;
      if (dx16) reinterpret_cast<uint2*>(dx16)[base + c] = PackBf16x4(d);
      float4 a = acc[c];
      a.x += g[i].x * xv[i].x * r;
      a.y += g[i].y * xv[i].y * r;
      a.z += g[i].z * xv[i].z * r;
      a.w += g[i].w * xv[i].w * r;
      acc[c] = a;
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kThreads) {
    float sum = 0.0f;
    for (int j = 0; j < kThreads / 32; ++j) sum += dw_part[j * C + c];
    atomicAdd(dw + c, sum);
  }
}

__global__ void RopeKernel(float* x, const int32_t* positions, const float* inv_freq, int N, int H, int D,
                           float sign) {
  const int half = D / 2;
  const size_t total = static_cast<size_t>(N) * H * half;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i % half);
    const size_t nh = i / half;
    const size_t n = nh / H;
    const float angle = static_cast<float>(positions[n]) * inv_freq[j];
    float s, c;
    sincosf(angle, &s, &c);
    s *= sign;
    float* p = x + nh * D;
    const float x1 = p[j], x2 = p[j + half];
    p[j] = x1 * c - x2 * s;
    p[j + half] = x2 * c + x1 * s;
  }
}

__global__ void AddBiasKernel(float* out, const float* b, int N, int OC) {
  const size_t total = static_cast<size_t>(N) * OC;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] += b[i % OC];
}

__device__ __forceinline__ float Load1(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float Load1(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }

template <typename T>
__global__ void BiasBackwardKernel(float* db, const T* dout, int N, int OC) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= OC) return;
  const int n0 = blockIdx.y * kRowsPerSlab, n1 = min(N, n0 + kRowsPerSlab);
  float acc = 0.0f;
  for (int n = n0; n < n1; ++n) acc += Load1(dout, static_cast<size_t>(n) * OC + o);
  atomicAdd(db + o, acc);
}

// One thread per element of the packed row, so the reads of qkv (and the writes of dqkv) are
// coalesced; q, k and v are each written contiguously within a row.
__global__ void SplitQkvKernel(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD,
                               int KD) {
  const int W = QD + 2 * KD;
  const size_t total = static_cast<size_t>(N) * W;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / W;
    const int c = static_cast<int>(i - n * W);
    const float x = bias ? qkv[i] + bias[c] : qkv[i];
    if (c < QD) q[n * QD + c] = x;
    else if (c < QD + KD) k[n * KD + (c - QD)] = x;
    else v[n * KD + (c - QD - KD)] = x;
  }
}

// dqkv16, when not null, gets the packed rows in bf16 too (the product's operand: Gemm::AdoptCast).
__global__ void PackQkvKernel(float* dqkv, __nv_bfloat16* dqkv16, const float* dq, const float* dk, const float* dv,
                              int N, int QD, int KD) {
  const int W = QD + 2 * KD;
  const size_t total = static_cast<size_t>(N) * W;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / W;
    const int c = static_cast<int>(i - n * W);
    const float x = c < QD ? dq[n * QD + c] : c < QD + KD ? dk[n * KD + (c - QD)] : dv[n * KD + (c - QD - KD)];
    dqkv[i] = x;
    if (dqkv16) dqkv16[i] = __float2bfloat16_rn(x);
  }
}

// Inputs of the SwiGLU kernels are f32, or bf16 where a backend keeps the tensor in bf16 only
// (CudaBackend::KeepAsBf16: gu written by its product's epilogue, dh by the down backward's).
// Four consecutive elements starting at 4 i (16 bytes of f32, 8 of bf16).
__device__ __forceinline__ float4 Load4(const float* p, size_t i) { return reinterpret_cast<const float4*>(p)[i]; }
__device__ __forceinline__ float4 Load4(const __nv_bfloat16* p, size_t i) {
  const uint2 u = reinterpret_cast<const uint2*>(p)[i];
  // bf16 -> f32 is a 16-bit shift into the high half.
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                     __uint_as_float(u.y & 0xffff0000u));
}

// gu rows are gate | up (2I wide); thread i handles h[i] = column j of row n. h16, when not null,
// gets h rounded to bf16 (the down product's operand: Gemm::AdoptCast). Swish: bf16.h.

template <typename Gu>
__global__ void SwiGluForwardKernel(float* h, __nv_bfloat16* h16, const Gu* gu, int N, int I) {
  const size_t total = static_cast<size_t>(N) * I;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / I, g_at = i + n * I;  // n * 2I + j
    const float o = Swish(Load1(gu, g_at), Load1(gu, g_at + I));
    if (h) h[i] = o;
    if (h16) h16[i] = __float2bfloat16_rn(o);
  }
}

// I % 4 == 0 and aligned rows: four columns per thread, 16-byte f32 (8-byte bf16) loads and stores.
template <typename Gu>
__global__ void SwiGluForwardVecKernel(float* h, __nv_bfloat16* h16, const Gu* gu, int N, int I) {
  const size_t I4 = I / 4, total = static_cast<size_t>(N) * I4;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / I4, g_at = i + n * I4;  // in 4-element units: n * 2 I4 + j
    const float4 g = Load4(gu, g_at), u = Load4(gu, g_at + I4);
    const float4 o = make_float4(Swish(g.x, u.x), Swish(g.y, u.y), Swish(g.z, u.z), Swish(g.w, u.w));
    if (h) reinterpret_cast<float4*>(h)[i] = o;
    if (h16) reinterpret_cast<uint2*>(h16)[i] = PackBf16x4(o);
  }
}

// bf16 gu with I % 8 == 0 and 16-byte aligned rows: eight columns per thread, 16-byte loads of gate
// and up, one 16-byte store of h16 (h, when not null, as two float4).
__device__ __forceinline__ void Unpack8(uint4 u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(w[j] << 16);
    f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
// Index: uint32_t where every index fits (the row's division in 32 bits, not 64), else size_t.
template <typename Index>
__global__ void SwiGluForwardBf16x8Kernel(float* h, __nv_bfloat16* h16, const __nv_bfloat16* gu, int N, int I) {
  const Index I8 = I / 8, total = static_cast<Index>(N) * I8;
  for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index n = i / I8, g_at = i + n * I8;  // in 8-element units: n * 2 I8 + j
    float g[8], u[8];
    Unpack8(reinterpret_cast<const uint4*>(gu)[g_at], g);
    Unpack8(reinterpret_cast<const uint4*>(gu)[g_at + I8], u);
    const float4 lo = make_float4(Swish(g[0], u[0]), Swish(g[1], u[1]), Swish(g[2], u[2]), Swish(g[3], u[3]));
    const float4 hi = make_float4(Swish(g[4], u[4]), Swish(g[5], u[5]), Swish(g[6], u[6]), Swish(g[7], u[7]));
    if (h) {
      reinterpret_cast<float4*>(h)[2 * i] = lo;
      reinterpret_cast<float4*>(h)[2 * i + 1] = hi;
    }
    if (h16) {
      const uint2 a = PackBf16x4(lo), b = PackBf16x4(hi);
      reinterpret_cast<uint4*>(h16)[i] = make_uint4(a.x, a.y, b.x, b.y);
    }
  }
}

// dgu16, when not null, gets dgu in bf16 too: the gate/up backward product's dout (both its NN and
// TN read it; Gemm::AdoptCast), which otherwise is the largest cast of the backward (N x 2I).
__device__ __forceinline__ void SwiGluGrad(float d, float g, float u, float& dgate, float& dup) {
  const float s = 1.0f / (1.0f + expf(-g));
  dup = d * g * s;
  dgate = d * u * s * (1.0f + g * (1.0f - s));
}
template <typename Dh, typename Gu>
__global__ void SwiGluBackwardKernel(float* dgu, __nv_bfloat16* dgu16, const Dh* dh, const Gu* gu, int N, int I) {
  const size_t total = static_cast<size_t>(N) * I;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / I, g_at = i + n * I;
    float dgate, dup;
    SwiGluGrad(Load1(dh, i), Load1(gu, g_at), Load1(gu, g_at + I), dgate, dup);
    if (dgu) {
      dgu[g_at + I] = dup;
      dgu[g_at] = dgate;
    }
    if (dgu16) {
      dgu16[g_at + I] = __float2bfloat16_rn(dup);
      dgu16[g_at] = __float2bfloat16_rn(dgate);
    }
  }
}

// I % 4 == 0 and aligned rows: four columns per thread, the scalar kernel's arithmetic per element.
// dgu may be null (only the bf16 copy wanted).
template <typename Dh, typename Gu>
__global__ void SwiGluBackwardVecKernel(float* dgu, __nv_bfloat16* dgu16, const Dh* dh, const Gu* gu, int N, int I) {
  const size_t I4 = I / 4, total = static_cast<size_t>(N) * I4;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / I4, g_at = i + n * I4;  // in 4-element units: n * 2 I4 + j
    const float4 g = Load4(gu, g_at), u = Load4(gu, g_at + I4), d = Load4(dh, i);
    float4 dg, du;
    SwiGluGrad(d.x, g.x, u.x, dg.x, du.x);
    SwiGluGrad(d.y, g.y, u.y, dg.y, du.y);
    SwiGluGrad(d.z, g.z, u.z, dg.z, du.z);
    SwiGluGrad(d.w, g.w, u.w, dg.w, du.w);
    if (dgu) {
      reinterpret_cast<float4*>(dgu)[g_at] = dg;
      reinterpret_cast<float4*>(dgu)[g_at + I4] = du;
    }
    if (dgu16) {
      reinterpret_cast<uint2*>(dgu16)[g_at] = PackBf16x4(dg);
      reinterpret_cast<uint2*>(dgu16)[g_at + I4] = PackBf16x4(du);
    }
  }
}

__global__ void AddKernel(float* out, const float* a, const float* b, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

__global__ void ScaleKernel(float* x, float a, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] *= a;
}

// Two passes, deterministic: kSumBlocks partial sums in f64, then one block sums them.
constexpr int kSumBlocks = 1024;
__global__ void SumSquaresPartialKernel(double* partial, const float* x, size_t n) {
  __shared__ double warp_sums[kThreads / 32];
  double acc = 0.0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t first = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  size_t scalar_from = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    // 16-byte loads, four in flight per thread (each term still squared and summed in f64).
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const size_t n4 = n / 4;
    for (size_t i = first; i < n4; i += 4 * stride) {
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = i + u * stride < n4 ? x4[i + u * stride] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int u = 0; u < 4; ++u)
        acc += static_cast<double>(v[u].x) * v[u].x + static_cast<double>(v[u].y) * v[u].y +
               static_cast<double>(v[u].z) * v[u].z + static_cast<double>(v[u].w) * v[u].w;
    }
    scalar_from = 4 * n4;
  }
  for (size_t i = scalar_from + first; i < n; i += stride) acc += static_cast<double>(x[i]) * x[i];
  acc = WarpSumD(acc);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    double v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
    v = WarpSumD(v);
    if (threadIdx.x == 0) partial[blockIdx.x] = v;
  }
}

__global__ void SumPartialsKernel(double* out, const double* partial, int count) {
  __shared__ double warp_sums[kThreads / 32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = WarpSumD(acc);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    double v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
    v = WarpSumD(v);
    if (threadIdx.x == 0) *out = v;
  }
}

// param16, when not null, gets the new param rounded to bf16 (the products' cached weight copy:
// Gemm::Bf16CopyOf), which saves the cast pass after the step.
__global__ void AdamWKernel(float* param, __nv_bfloat16* param16, const float* grad, float* m, float* v, size_t n,
                            float lr, float beta1, float beta2, float eps, float weight_decay, float step,
                            float bc2_sqrt) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = grad[i];
    float p = param[i] * (1.0f - lr * weight_decay);
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    p = p - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
    param[i] = p;
    if (param16) param16[i] = __float2bfloat16_rn(p);
  }
}

__global__ void CastF32ToBF16Kernel(__nv_bfloat16* out, const float* in, size_t n) {
  // Four at a time where aligned (the common case: buffers from cudaMalloc, even offsets).
  const size_t n4 = (reinterpret_cast<uintptr_t>(in) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0) ? n / 4 : 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    reinterpret_cast<uint2*>(out)[i] = PackBf16x4(reinterpret_cast<const float4*>(in)[i]);
  }
  for (size_t i = n4 * 4 + blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

__global__ void CastBF16ToF32Kernel(float* out, const __nv_bfloat16* in, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

__global__ void SwapInBf16Kernel(float* params, __nv_bfloat16* shadow, const __nv_bfloat16* staged, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 b = staged[i];
    params[i] = __bfloat162float(b);
    if (shadow) shadow[i] = b;
  }
}

__global__ void GatherRowsKernel(float* out, const float* x, const int32_t* rows, int R, int C) {
  const size_t total = static_cast<size_t>(R) * C;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = x[static_cast<size_t>(rows[i / C]) * C + i % C];
}

}  // namespace

namespace {
__global__ void GatherInt32Kernel(int32_t* dst, const int32_t* src, const int32_t* index, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = src[index[i]];
}
}  // namespace

void GatherInt32(int32_t* dst, const int32_t* src, const int32_t* index, int n, cudaStream_t s) {
  if (n <= 0) return;
  GatherInt32Kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, s>>>(dst, src, index, n);
}

void EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C, cudaStream_t s) {
  EmbeddingForwardKernel<<<Blocks(static_cast<size_t>(N) * C), kThreads, 0, s>>>(out, ids, wte, N, C);
}

void EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C, cudaStream_t s) {
  EmbeddingBackwardKernel<<<Blocks(static_cast<size_t>(N) * C), kThreads, 0, s>>>(dwte, dout, ids, N, C);
}

namespace {

bool Aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Threads per row T: rows of C % 4 == 0 floats on 16-byte boundaries are held in registers, kItems
// float4 per thread with kItems the smallest of 1, 2, 4, 8 that covers the row with at most kThreads
// threads (C <= 8192); other rows take the scalar kernel. Short rows (qk-norm's head width) share a
// block, kThreads / T rows each.
template <bool kAdd>
void LaunchRmsNorm(float* out, uint16_t* out_bf16, float* rstd, float* xs, const float* x, const float* y, int parts,
                   const float* w, int N, int C, float eps, cudaStream_t s) {
  if (N <= 0 || C <= 0) return;
  const int C4 = C / 4;
  int items = 0;
  if (C % 4 == 0 && Aligned(out, 16) && Aligned(x, 16) && (!kAdd || Aligned(y, 16)) && Aligned(w, 16) &&
      Aligned(out_bf16, 8))
    for (int k : {1, 2, 4, 8})
      if (C4 <= k * kThreads) {
        items = k;
        break;
      }
  const int work = items ? (C4 + items - 1) / items : C;
  const int T = std::min(kThreads, (work + 31) / 32 * 32);
  const int rows = kThreads / T;
  const unsigned blocks = static_cast<unsigned>((N + rows - 1) / rows);
  auto* o16 = reinterpret_cast<__nv_bfloat16*>(out_bf16);
  const dim3 grid(blocks), block(rows * T);
  if (parts > 1) {
    // The addend in parts (a split product, decode-sized rows): the float4 kernel while a thread's
    // items times the parts' bound stay at most 32 float4 loads; anything else takes the scalar
    // kernel. Rows wider than 4 x kThreads (items 2, 4, 8: Qwen2.5-1.5B's 1,536 and up) took the
    // scalar kernel until session 26, which cost 1.5B's decode step 0.3 ms (docs/kernels.md, 28).
    auto* kernel = RmsNormScalarKernel<kAdd>;
    if (parts <= 4) {
      if (items == 1) kernel = RmsNormVecKernel<kAdd, 1, 4>;
      else if (items == 2) kernel = RmsNormVecKernel<kAdd, 2, 4>;
      else if (items == 4) kernel = RmsNormVecKernel<kAdd, 4, 4>;
      else if (items == 8) kernel = RmsNormVecKernel<kAdd, 8, 4>;
    } else if (parts <= 8) {
      if (items == 1) kernel = RmsNormVecKernel<kAdd, 1, 8>;
      else if (items == 2) kernel = RmsNormVecKernel<kAdd, 2, 8>;
      else if (items == 4) kernel = RmsNormVecKernel<kAdd, 4, 8>;
    } else if (parts <= 16) {
      if (items == 1) kernel = RmsNormVecKernel<kAdd, 1, 16>;
      else if (items == 2) kernel = RmsNormVecKernel<kAdd, 2, 16>;
    }
    kernel<<<grid, block, 0, s>>>(out, o16, rstd, xs, x, y, parts, w, N, C, T, eps);
    return;
  }
  switch (items) {
    case 1: RmsNormVecKernel<kAdd, 1><<<grid, block, 0, s>>>(out, o16, rstd, xs, x, y, parts, w, N, C, T, eps); break;
    case 2: RmsNormVecKernel<kAdd, 2><<<grid, block, 0, s>>>(out, o16, rstd, xs, x, y, parts, w, N, C, T, eps); break;
    case 4: RmsNormVecKernel<kAdd, 4><<<grid, block, 0, s>>>(out, o16, rstd, xs, x, y, parts, w, N, C, T, eps); break;
    case 8: RmsNormVecKernel<kAdd, 8><<<grid, block, 0, s>>>(out, o16, rstd, xs, x, y, parts, w, N, C, T, eps); break;
    default: RmsNormScalarKernel<kAdd><<<grid, block, 0, s>>>(out, o16, rstd, xs, x, y, parts, w, N, C, T, eps);
  }
}

}  // namespace

void RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C, float eps,
                    uint16_t* out_bf16, cudaStream_t s) {
  LaunchRmsNorm<false>(out, out_bf16, rstd, nullptr, x, nullptr, 1, w, N, C, eps, s);
}

void AddRmsNormForward(float* x, float* ln, float* rstd, const float* y, const float* w, int N, int C, float eps,
                       uint16_t* ln_bf16, cudaStream_t s) {
  LaunchRmsNorm<true>(ln, ln_bf16, rstd, x, x, y, 1, w, N, C, eps, s);
}

void AddPartsRmsNormForward(float* x, float* ln, float* rstd, const float* y, int parts, const float* w, int N, int C,
                            float eps, uint16_t* ln_bf16, cudaStream_t s) {
  LaunchRmsNorm<true>(ln, ln_bf16, rstd, x, x, y, parts, w, N, C, eps, s);
}

bool RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                     int N, int C, uint16_t* dx_bf16, cudaStream_t s) {
  if (N == 0) return false;
  // Rows of 1,028 to 2,048 (Qwen2.5-1.5B's 1,536, Qwen3-1.7B's 2,048) take the one-pass kernel too;
  // AHA_NORM_BWD_WIDE=0 sends them to the two kernels below, as before session 26 (the A/B).
  static const bool wide = [] {
    const char* e = std::getenv("AHA_NORM_BWD_WIDE");
    return !(e && e[0] == '0');
  }();
  const int C4 = C / 4, fit = (C4 + 31) / 32, items = fit <= 8 ? fit : fit <= 12 ? 12 : 16;
  if (C % 4 == 0 && C >= 128 && (fit <= 8 || (wide && fit <= 16)) && Aligned(dx, 16) && Aligned(dout, 16) &&
      Aligned(x, 16) && Aligned(w, 16) && Aligned(dx_bf16, 8)) {
    const unsigned blocks = static_cast<unsigned>((N + kFusedSlab - 1) / kFusedSlab);
    const size_t smem = static_cast<size_t>(kThreads / 32 + 1) * C * sizeof(float);  // 72 KiB at 2,048
    auto* d16 = reinterpret_cast<__nv_bfloat16*>(dx_bf16);
    switch (items) {
#define AHA_NORM_BWD(K)                                                                                \
  case K:                                                                                              \
    if (smem > 48 * 1024)                                                                              \
      cudaFuncSetAttribute(RmsNormBackwardFusedKernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                           static_cast<int>(smem));                                                    \
    RmsNormBackwardFusedKernel<K><<<blocks, kThreads, smem, s>>>(dx, d16, dw, dout, x, w, rstd, N, C); \
    return dx_bf16 != nullptr;
      AHA_NORM_BWD(1)
      AHA_NORM_BWD(2)
      AHA_NORM_BWD(3)
      AHA_NORM_BWD(4)
      AHA_NORM_BWD(5)
      AHA_NORM_BWD(6)
      AHA_NORM_BWD(7)
      AHA_NORM_BWD(8)
      AHA_NORM_BWD(12)
      AHA_NORM_BWD(16)
#undef AHA_NORM_BWD
    }
  }
  const int rows_per_block = kThreads / 32;
  RmsNormBackwardDxKernel<<<(N + rows_per_block - 1) / rows_per_block, kThreads, 0, s>>>(dx, dout, x, w, rstd, N, C);
  const dim3 grid((C + kThreads - 1) / kThreads, (N + kRowsPerSlab - 1) / kRowsPerSlab);
  RmsNormBackwardDwKernel<<<grid, kThreads, 0, s>>>(dw, dout, x, rstd, N, C);
  return false;  // no bf16 copy on this path
}

void RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H, int D, bool inverse,
                 cudaStream_t s) {
  RopeKernel<<<Blocks(static_cast<size_t>(N) * H * (D / 2)), kThreads, 0, s>>>(x, positions, inv_freq, N, H, D,
                                                                               inverse ? -1.0f : 1.0f);
}

void AddBias(float* out, const float* b, int N, int OC, cudaStream_t s) {
  AddBiasKernel<<<Blocks(static_cast<size_t>(N) * OC), kThreads, 0, s>>>(out, b, N, OC);
}

void BiasBackward(float* db, const float* dout, const uint16_t* dout_bf16, int N, int OC, cudaStream_t s) {
  if (N == 0) return;
  const dim3 grid((OC + kThreads - 1) / kThreads, (N + kRowsPerSlab - 1) / kRowsPerSlab);
  if (dout_bf16)
    BiasBackwardKernel<<<grid, kThreads, 0, s>>>(db, reinterpret_cast<const __nv_bfloat16*>(dout_bf16), N, OC);
  else
    BiasBackwardKernel<<<grid, kThreads, 0, s>>>(db, dout, N, OC);
}

void SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD, int KD,
              cudaStream_t s) {
  SplitQkvKernel<<<Blocks(static_cast<size_t>(N) * (QD + 2 * KD)), kThreads, 0, s>>>(q, k, v, qkv, bias, N, QD, KD);
}

void PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD, int KD,
             uint16_t* dqkv_bf16, cudaStream_t s) {
  PackQkvKernel<<<Blocks(static_cast<size_t>(N) * (QD + 2 * KD)), kThreads, 0, s>>>(
      dqkv, reinterpret_cast<__nv_bfloat16*>(dqkv_bf16), dq, dk, dv, N, QD, KD);
}

namespace {
template <typename Gu>
void LaunchSwiGluForward(float* h, __nv_bfloat16* h16, const Gu* gu, int N, int I, cudaStream_t s) {
  if constexpr (sizeof(Gu) == 2) {
    if (I % 8 == 0 && Aligned(h, 16) && Aligned(gu, 16) && Aligned(h16, 16)) {
      const size_t n8 = static_cast<size_t>(N) * (I / 8);
      // 2 n8 (h's float4 index) and n8 + the grid's threads stay below 2^32.
      if (n8 < (size_t{1} << 30))
        SwiGluForwardBf16x8Kernel<uint32_t><<<Blocks(n8), kThreads, 0, s>>>(h, h16, gu, N, I);
      else
        SwiGluForwardBf16x8Kernel<size_t><<<Blocks(n8), kThreads, 0, s>>>(h, h16, gu, N, I);
      return;
    }
  }
  if (I % 4 == 0 && Aligned(h, 16) && Aligned(gu, 4 * sizeof(Gu)) && Aligned(h16, 8))
    SwiGluForwardVecKernel<<<Blocks(static_cast<size_t>(N) * (I / 4)), kThreads, 0, s>>>(h, h16, gu, N, I);
  else
    SwiGluForwardKernel<<<Blocks(static_cast<size_t>(N) * I), kThreads, 0, s>>>(h, h16, gu, N, I);
}
template <typename Dh, typename Gu>
void LaunchSwiGluBackward(float* dgu, __nv_bfloat16* dgu16, const Dh* dh, const Gu* gu, int N, int I,
                          cudaStream_t s) {
  if (I % 4 == 0 && Aligned(dgu, 16) && Aligned(dh, 4 * sizeof(Dh)) && Aligned(gu, 4 * sizeof(Gu)) &&
      Aligned(dgu16, 8))
    SwiGluBackwardVecKernel<<<Blocks(static_cast<size_t>(N) * (I / 4)), kThreads, 0, s>>>(dgu, dgu16, dh, gu, N, I);
  else
    SwiGluBackwardKernel<<<Blocks(static_cast<size_t>(N) * I), kThreads, 0, s>>>(dgu, dgu16, dh, gu, N, I);
}
}  // namespace

void SwiGluForward(float* h, const float* gu, const uint16_t* gu_bf16, int N, int I, uint16_t* h_bf16,
                   cudaStream_t s) {
  auto* h16 = reinterpret_cast<__nv_bfloat16*>(h_bf16);
  if (gu_bf16) LaunchSwiGluForward(h, h16, reinterpret_cast<const __nv_bfloat16*>(gu_bf16), N, I, s);
  else LaunchSwiGluForward(h, h16, gu, N, I, s);
}

void SwiGluBackward(float* dgu, const float* dh, const uint16_t* dh_bf16, const float* gu, const uint16_t* gu_bf16,
                    int N, int I, uint16_t* dgu_bf16, cudaStream_t s) {
  auto* dgu16 = reinterpret_cast<__nv_bfloat16*>(dgu_bf16);
  auto* dh16 = reinterpret_cast<const __nv_bfloat16*>(dh_bf16);
  auto* gu16 = reinterpret_cast<const __nv_bfloat16*>(gu_bf16);
  if (dh16 && gu16) LaunchSwiGluBackward(dgu, dgu16, dh16, gu16, N, I, s);
  else if (dh16) LaunchSwiGluBackward(dgu, dgu16, dh16, gu, N, I, s);
  else if (gu16) LaunchSwiGluBackward(dgu, dgu16, dh, gu16, N, I, s);
  else LaunchSwiGluBackward(dgu, dgu16, dh, gu, N, I, s);
}

void Add(float* out, const float* a, const float* b, size_t n, cudaStream_t s) {
  AddKernel<<<Blocks(n), kThreads, 0, s>>>(out, a, b, n);
}

void Scale(float* x, float a, size_t n, cudaStream_t s) { ScaleKernel<<<Blocks(n), kThreads, 0, s>>>(x, a, n); }

size_t SumSquaresWorkspace() { return kSumBlocks * sizeof(double); }

void SumSquares(double* out, const float* x, size_t n, void* workspace, cudaStream_t s) {
  double* partial = static_cast<double*>(workspace);
  SumSquaresPartialKernel<<<kSumBlocks, kThreads, 0, s>>>(partial, x, n);
  SumPartialsKernel<<<1, kThreads, 0, s>>>(out, partial, kSumBlocks);
}

void AdamW(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
           float eps, float weight_decay, int64_t t, uint16_t* param_bf16, cudaStream_t s) {
  // Bias corrections on the host, exactly as the CPU reference computes them.
  const float bc1 = 1.0f - std::pow(beta1, static_cast<float>(t));
  const float bc2 = 1.0f - std::pow(beta2, static_cast<float>(t));
  AdamWKernel<<<Blocks(n), kThreads, 0, s>>>(param, reinterpret_cast<__nv_bfloat16*>(param_bf16), grad, m, v, n,
                                             lr, beta1, beta2, eps, weight_decay, lr / bc1, std::sqrt(bc2));
}

void CastF32ToBF16(uint16_t* out, const float* in, size_t n, cudaStream_t s) {
  CastF32ToBF16Kernel<<<Blocks(n / 4 + 1), kThreads, 0, s>>>(reinterpret_cast<__nv_bfloat16*>(out), in, n);
}

void CastBF16ToF32(float* out, const uint16_t* in, size_t n, cudaStream_t s) {
  CastBF16ToF32Kernel<<<Blocks(n), kThreads, 0, s>>>(out, reinterpret_cast<const __nv_bfloat16*>(in), n);
}

void SwapInBf16(float* params, uint16_t* shadow, const uint16_t* staged, size_t n, cudaStream_t s) {
  SwapInBf16Kernel<<<Blocks(n), kThreads, 0, s>>>(params, reinterpret_cast<__nv_bfloat16*>(shadow),
                                                  reinterpret_cast<const __nv_bfloat16*>(staged), n);
}

void GatherRows(float* out, const float* x, const int32_t* rows, int R, int C, cudaStream_t s) {
  GatherRowsKernel<<<Blocks(static_cast<size_t>(R) * C), kThreads, 0, s>>>(out, x, rows, R, C);
}

}  // namespace aha::engine::cuda
