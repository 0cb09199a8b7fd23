// Elementwise, normalisation, rope, embedding and optimizer kernels (kernels.h). Each computes the
// function of the same-named CpuBackend op (engine/cpu_backend.cc); these are memory-bound, so each
// reads its inputs once and writes its outputs once, with consecutive threads on consecutive floats.
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>

#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {

namespace {

constexpr int kThreads = 256;

inline unsigned Blocks(size_t n, int threads = kThreads) {
  size_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535u * 32u ? (b == 0 ? 1 : b) : 65535u * 32u);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
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

// One warp per row: sum of squares in f32 lanes, reduced across the warp.
__global__ void RmsNormForwardKernel(float* out, float* rstd, const float* x, const float* w, int N, int C,
                                     float eps) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const float* xr = x + static_cast<size_t>(row) * C;
  float ss = 0.0f;
  for (int c = lane; c < C; c += 32) ss += xr[c] * xr[c];
  ss = WarpSum(ss);
  const float r = rsqrtf(ss / C + eps);
  if (lane == 0) rstd[row] = r;
  float* o = out + static_cast<size_t>(row) * C;
  for (int c = lane; c < C; c += 32) o[c] = (xr[c] * r) * w[c];
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

__global__ void BiasBackwardKernel(float* db, const float* dout, int N, int OC) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= OC) return;
  const int n0 = blockIdx.y * kRowsPerSlab, n1 = min(N, n0 + kRowsPerSlab);
  float acc = 0.0f;
  for (int n = n0; n < n1; ++n) acc += dout[static_cast<size_t>(n) * OC + o];
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

__global__ void PackQkvKernel(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD,
                              int KD) {
  const int W = QD + 2 * KD;
  const size_t total = static_cast<size_t>(N) * W;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / W;
    const int c = static_cast<int>(i - n * W);
    dqkv[i] = c < QD ? dq[n * QD + c] : c < QD + KD ? dk[n * KD + (c - QD)] : dv[n * KD + (c - QD - KD)];
  }
}

// gu rows are gate | up (2I wide); thread i handles h[i] = column j of row n.
__global__ void SwiGluForwardKernel(float* h, const float* gu, int N, int I) {
  const size_t total = static_cast<size_t>(N) * I;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / I, g_at = i + n * I;  // n * 2I + j
    const float g = gu[g_at];
    h[i] = g / (1.0f + expf(-g)) * gu[g_at + I];
  }
}

__global__ void SwiGluBackwardKernel(float* dgu, const float* dh, const float* gu, int N, int I) {
  const size_t total = static_cast<size_t>(N) * I;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / I, g_at = i + n * I;
    const float g = gu[g_at], u = gu[g_at + I], d = dh[i];
    const float s = 1.0f / (1.0f + expf(-g));
    dgu[g_at + I] = d * g * s;
    dgu[g_at] = d * u * s * (1.0f + g * (1.0f - s));
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
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    acc += static_cast<double>(x[i]) * x[i];
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

__global__ void AdamWKernel(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                            float beta2, float eps, float weight_decay, float step, float bc2_sqrt) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = grad[i];
    float p = param[i] * (1.0f - lr * weight_decay);
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = p - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
  }
}

__global__ void CastF32ToBF16Kernel(__nv_bfloat16* out, const float* in, size_t n) {
  // Four at a time where aligned (the common case: buffers from cudaMalloc, even offsets).
  const size_t n4 = (reinterpret_cast<uintptr_t>(in) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0) ? n / 4 : 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float4 f = reinterpret_cast<const float4*>(in)[i];
    __nv_bfloat162 a = __floats2bfloat162_rn(f.x, f.y), b = __floats2bfloat162_rn(f.z, f.w);
    reinterpret_cast<__nv_bfloat162*>(out)[2 * i] = a;
    reinterpret_cast<__nv_bfloat162*>(out)[2 * i + 1] = b;
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

void EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C, cudaStream_t s) {
  EmbeddingForwardKernel<<<Blocks(static_cast<size_t>(N) * C), kThreads, 0, s>>>(out, ids, wte, N, C);
}

void EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C, cudaStream_t s) {
  EmbeddingBackwardKernel<<<Blocks(static_cast<size_t>(N) * C), kThreads, 0, s>>>(dwte, dout, ids, N, C);
}

void RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C, float eps,
                    cudaStream_t s) {
  if (N == 0) return;
  const int rows_per_block = kThreads / 32;
  RmsNormForwardKernel<<<(N + rows_per_block - 1) / rows_per_block, kThreads, 0, s>>>(out, rstd, x, w, N, C, eps);
}

void RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                     int N, int C, cudaStream_t s) {
  if (N == 0) return;
  const int rows_per_block = kThreads / 32;
  RmsNormBackwardDxKernel<<<(N + rows_per_block - 1) / rows_per_block, kThreads, 0, s>>>(dx, dout, x, w, rstd, N, C);
  const dim3 grid((C + kThreads - 1) / kThreads, (N + kRowsPerSlab - 1) / kRowsPerSlab);
  RmsNormBackwardDwKernel<<<grid, kThreads, 0, s>>>(dw, dout, x, rstd, N, C);
}

void RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H, int D, bool inverse,
                 cudaStream_t s) {
  RopeKernel<<<Blocks(static_cast<size_t>(N) * H * (D / 2)), kThreads, 0, s>>>(x, positions, inv_freq, N, H, D,
                                                                               inverse ? -1.0f : 1.0f);
}

void AddBias(float* out, const float* b, int N, int OC, cudaStream_t s) {
  AddBiasKernel<<<Blocks(static_cast<size_t>(N) * OC), kThreads, 0, s>>>(out, b, N, OC);
}

void BiasBackward(float* db, const float* dout, int N, int OC, cudaStream_t s) {
  if (N == 0) return;
  const dim3 grid((OC + kThreads - 1) / kThreads, (N + kRowsPerSlab - 1) / kRowsPerSlab);
  BiasBackwardKernel<<<grid, kThreads, 0, s>>>(db, dout, N, OC);
}

void SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD, int KD,
              cudaStream_t s) {
  SplitQkvKernel<<<Blocks(static_cast<size_t>(N) * (QD + 2 * KD)), kThreads, 0, s>>>(q, k, v, qkv, bias, N, QD, KD);
}

void PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD, int KD, cudaStream_t s) {
  PackQkvKernel<<<Blocks(static_cast<size_t>(N) * (QD + 2 * KD)), kThreads, 0, s>>>(dqkv, dq, dk, dv, N, QD, KD);
}

void SwiGluForward(float* h, const float* gu, int N, int I, cudaStream_t s) {
  SwiGluForwardKernel<<<Blocks(static_cast<size_t>(N) * I), kThreads, 0, s>>>(h, gu, N, I);
}

void SwiGluBackward(float* dgu, const float* dh, const float* gu, int N, int I, cudaStream_t s) {
  SwiGluBackwardKernel<<<Blocks(static_cast<size_t>(N) * I), kThreads, 0, s>>>(dgu, dh, gu, N, I);
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
           float eps, float weight_decay, int64_t t, cudaStream_t s) {
  // Bias corrections on the host, exactly as the CPU reference computes them.
  const float bc1 = 1.0f - std::pow(beta1, static_cast<float>(t));
  const float bc2 = 1.0f - std::pow(beta2, static_cast<float>(t));
  AdamWKernel<<<Blocks(n), kThreads, 0, s>>>(param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, lr / bc1,
                                             std::sqrt(bc2));
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
