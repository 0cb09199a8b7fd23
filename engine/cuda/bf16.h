// What several kernels share (.cu files only): bf16 packing, and SwiGLU's activation. Round to
// nearest even, as CastF32ToBF16Kernel rounds, so a bf16 copy that a producer writes equals a cast
// of its output.
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

// Four consecutive floats as four bf16 (one 8-byte store).
__device__ __forceinline__ uint2 PackBf16x4(float4 x) { return make_uint2(PackBf16(x.x, x.y), PackBf16(x.z, x.w)); }

// SwiGLU of one gate / up pair: silu(g) * u. The SwiGLU kernels and the fused gate/up product's
// epilogue (mlp.cu) both compute it here, so their h agree bit for bit.
__device__ __forceinline__ float Swish(float g, float u) { return g / (1.0f + expf(-g)) * u; }

}  // namespace aha::engine::cuda
