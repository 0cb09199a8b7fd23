// What several kernels share (.cu files only): bf16 packing, SwiGLU's activation, the quad
// transpose that lets a kernel store its accumulator fragments 16 bytes a lane, and RMSNorm's sum
// of squares (the norm kernels and the fused decode attention's per-head norms). Round to nearest
// even, as CastF32ToBF16Kernel rounds, so a bf16 copy that a producer writes equals a cast of its
// output.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace aha::engine::cuda {

// Two floats rounded to bf16 in one register: `lo` in bits 0..15 (the lower address).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);  // .x = lo, .y = hi
  uint32_t u;
  memcpy(&u, &t, sizeof(u));
  return u;
}

// The sum of a float over the 32 lanes of a warp (an xor tree: every lane gets the same bits).
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// x.x^2 + x.y^2 + x.z^2 + x.w^2 with its roundings spelt out (no contraction left to the compiler),
// so that RmsNormVecKernel and the fused decode attention's per-head norms, which each take a lane's
// four values of a row this way and then WarpSum, compute the same bits.
__device__ __forceinline__ float SumOfSquares4(float4 x) {
  return __fmaf_rn(x.w, x.w, __fmaf_rn(x.z, x.z, __fmaf_rn(x.y, x.y, __fmul_rn(x.x, x.x))));
}

// Four consecutive floats as four bf16 (one 8-byte store).
__device__ __forceinline__ uint2 PackBf16x4(float4 x) { return make_uint2(PackBf16(x.x, x.y), PackBf16(x.z, x.w)); }

// Four consecutive bf16 (one 8-byte load) widened to floats: exact.
__device__ __forceinline__ float4 UnpackBf16x4(uint2 u) {
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                     __uint_as_float(u.y & 0xffff0000u));
}

// SwiGLU of one gate / up pair: silu(g) * u. The SwiGLU kernels and the fused gate/up product's
// epilogue (mlp.cu) both compute it here, so their h agree bit for bit.
__device__ __forceinline__ float Swish(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ uint32_t ShflXor(uint32_t v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ float ShflXor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }

// The mma.sync / wgmma accumulator layout gives lane t of a quad (lanes 4 g .. 4 g + 3) columns
// 8 j + 2 t, + 1 of every 8-column group j of its rows. For a block of 4 groups with x[j] this
// lane's value of group j (a bf16 pair, or one of the two f32 columns), afterwards x[j] is lane j's
// value of group t: the lane holds group t whole, in column order, and can store it at once
// instead of four lanes storing 4 or 8 bytes each into the same row. Two butterfly stages: lanes t
// and t ^ m trade the values whose bit m differs from their own. Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ void QuadTranspose(T (&x)[4], int t) {
#pragma unroll
  for (int m = 2; m >= 1; m >>= 1) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j & m) continue;
      const bool hi = t & m;
      const T send = hi ? x[j] : x[j | m];
      const T got = ShflXor(send, m);
      if (hi) x[j] = got;
      else x[j | m] = got;
    }
  }
}

}  // namespace aha::engine::cuda
