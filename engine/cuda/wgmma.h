// Warpgroup tensor-core instructions (wgmma, sm_90a) shared by the kernels built for that target
// (mlp.cu, attention_wgmma.cu, lmhead_sample.cu). Everything here exists only when the compiler
// targets sm_90a (AHA_WGMMA); the kernels that use it trap otherwise, and their launchers'
// "supported" checks say no.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AHA_WGMMA 1
#endif

namespace aha::engine::cuda {

// True when the current device has compute capability 9 (the sm_90a code runs there), asked once.
inline bool CurrentDeviceIsSm90() {
  static const int major = [] {
    int dev = 0, mj = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&mj, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                  cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return mj;
  }();
  return major == 9;
}

// The dynamic shared memory rounded up to 1024 bytes (the swizzle atom's alignment; launches ask
// for 1024 bytes more).
__device__ __forceinline__ unsigned char* AlignSmem1024(unsigned char* raw) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(raw));
  return raw + ((1024u - (addr & 1023u)) & 1023u);
}

// Byte offset of row r's 16-byte chunk c in a 128-byte swizzled tile of 128-byte rows (1024-byte
// aligned): the layout the descriptors below read, K-major and MN-major alike.
__device__ __forceinline__ int Swizzled128(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

#ifdef AHA_WGMMA
// Shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle layout: start address,
// leading offset unused (one swizzle atom spans the 16 k of an instruction), 1024 bytes between
// groups of 8 rows. The k-step of 16 bf16 inside a 128-byte row is a start 32 bytes further.
__device__ __forceinline__ uint64_t SwizzledDesc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// The same for an MN-major tile (read with imm-trans-b = 1): rows of 128 bytes hold 64 values of N
// and follow each other along K, 128-byte swizzled, 1024 bytes between groups of 8 rows (stride
// offset); the leading offset (between 64-wide blocks of N) is the tile's size, unused at N = 64.
// The k-step of 16 rows is a start 2048 bytes further.
__device__ __forceinline__ uint64_t SwizzledDescMN(uint32_t addr, uint32_t tile_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(tile_bytes >> 4) << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Until at most N committed groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// The accumulators may not be read or moved across this point (the wgmma writes them asynchronously).
template <int R>
__device__ __forceinline__ void FenceAccumulators(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The 32 f32 accumulators of an m64n64 product, d[8][4], as asm operands %0 .. %31 with constraint C.
#define AHA_WG_D64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define AHA_WG_D64_OPS(C)                                                                                  \
  C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), C(d[2][0]), \
      C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), C(d[4][0]),         \
      C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), C(d[6][0]),         \
      C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3])

// d[64 x 64] (+)= A[64 x 16] B[64 x 16]^T, bf16 operands, f32 accumulators. In the m64nNk16
// accumulator layout d[i][c] is the mma.m16n8k16 C fragment of columns 8 i .. 8 i + 7 of the warp's
// 16 rows (warp w % 4 of the warpgroup: rows 16 (w % 4) ..). scale_d 0 overwrites d; the *First
// forms overwrite it with d as outputs only (nothing read, nothing to keep live).
//   Rs: A in registers, each warp its 16 rows as an mma.m16n8k16 A fragment; B from shared memory
//     (descriptor; kTransB = 1: B is N-major).
//   Ss: A from shared memory too (kTransA = 1: A is M-major).
template <int kTransB>
__device__ __forceinline__ void WgmmaRs64x64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " AHA_WG_D64
      ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
      : AHA_WG_D64_OPS("+f")
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(kTransB));
}
__device__ __forceinline__ void WgmmaRs64x64First(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " AHA_WG_D64 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : AHA_WG_D64_OPS("=f")
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
// WgmmaRs64x64 into the 64-column half kHalf of an m64n128 accumulator d[16][4] (n-tiles 8 kHalf ..
// 8 kHalf + 7): a product over D = 128 as two m64n64 ones, B's halves in tiles of their own.
template <int kTransB, int kHalf>
__device__ __forceinline__ void WgmmaRs64x64Half(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db,
                                                 int scale_d) {
  WgmmaRs64x64<kTransB>(*reinterpret_cast<float(*)[8][4]>(&d[8 * kHalf][0]), a, db, scale_d);
}
template <int kTransA, int kTransB>
__device__ __forceinline__ void WgmmaSs64x64(float (&d)[8][4], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " AHA_WG_D64 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
      : AHA_WG_D64_OPS("+f")
      : "l"(da), "l"(db), "r"(scale_d), "n"(kTransA), "n"(kTransB));
}
template <int kTransA, int kTransB>
__device__ __forceinline__ void WgmmaSs64x64First(float (&d)[8][4], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " AHA_WG_D64 ", %32, %33, p, 1, 1, %34, %35;\n}\n"
      : AHA_WG_D64_OPS("=f")
      : "l"(da), "l"(db), "n"(kTransA), "n"(kTransB));
}
#undef AHA_WG_D64_OPS
#undef AHA_WG_D64
// Eight f32 accumulators d[i .. i + 7] as read-write asm operands (the wide products below).
#define AHA_WG_F8(i)                                                                                    \
  "+f"(d[(i)]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]), \
      "+f"(d[(i) + 6]), "+f"(d[(i) + 7])

// d[64 x N] (+)= A[64 x 16] B[N x 16]^T, both from shared memory (descriptors), f32 accumulators
// in the m64nNk16 fragment layout (N / 2 a thread); scale_d 0 overwrites d. Defined for the N below.
template <int N>
__device__ __forceinline__ void Wgmma64xN(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d);
// The accumulators' operand numbers and operands, 8 g of them (AHA_WG_Lg, AHA_WG_Og), then one
// specialisation per N: REGS the accumulators' numbers, AB the two descriptors', P the scale's.
#define AHA_WG_L1 "%0, %1, %2, %3, %4, %5, %6, %7"
#define AHA_WG_L2 AHA_WG_L1 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define AHA_WG_L3 AHA_WG_L2 ", %16, %17, %18, %19, %20, %21, %22, %23"
#define AHA_WG_L4 AHA_WG_L3 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define AHA_WG_L5 AHA_WG_L4 ", %32, %33, %34, %35, %36, %37, %38, %39"
#define AHA_WG_L6 AHA_WG_L5 ", %40, %41, %42, %43, %44, %45, %46, %47"
#define AHA_WG_L7 AHA_WG_L6 ", %48, %49, %50, %51, %52, %53, %54, %55"
#define AHA_WG_L8 AHA_WG_L7 ", %56, %57, %58, %59, %60, %61, %62, %63"
#define AHA_WG_L9 AHA_WG_L8 ", %64, %65, %66, %67, %68, %69, %70, %71"
#define AHA_WG_L10 AHA_WG_L9 ", %72, %73, %74, %75, %76, %77, %78, %79"
#define AHA_WG_L11 AHA_WG_L10 ", %80, %81, %82, %83, %84, %85, %86, %87"
#define AHA_WG_L12 AHA_WG_L11 ", %88, %89, %90, %91, %92, %93, %94, %95"
#define AHA_WG_L13 AHA_WG_L12 ", %96, %97, %98, %99, %100, %101, %102, %103"
#define AHA_WG_L14 AHA_WG_L13 ", %104, %105, %106, %107, %108, %109, %110, %111"
#define AHA_WG_L15 AHA_WG_L14 ", %112, %113, %114, %115, %116, %117, %118, %119"
#define AHA_WG_L16 AHA_WG_L15 ", %120, %121, %122, %123, %124, %125, %126, %127"
#define AHA_WG_O1 AHA_WG_F8(0)
#define AHA_WG_O2 AHA_WG_O1, AHA_WG_F8(8)
#define AHA_WG_O3 AHA_WG_O2, AHA_WG_F8(16)
#define AHA_WG_O4 AHA_WG_O3, AHA_WG_F8(24)
#define AHA_WG_O5 AHA_WG_O4, AHA_WG_F8(32)
#define AHA_WG_O6 AHA_WG_O5, AHA_WG_F8(40)
#define AHA_WG_O7 AHA_WG_O6, AHA_WG_F8(48)
#define AHA_WG_O8 AHA_WG_O7, AHA_WG_F8(56)
#define AHA_WG_O9 AHA_WG_O8, AHA_WG_F8(64)
#define AHA_WG_O10 AHA_WG_O9, AHA_WG_F8(72)
#define AHA_WG_O11 AHA_WG_O10, AHA_WG_F8(80)
#define AHA_WG_O12 AHA_WG_O11, AHA_WG_F8(88)
#define AHA_WG_O13 AHA_WG_O12, AHA_WG_F8(96)
#define AHA_WG_O14 AHA_WG_O13, AHA_WG_F8(104)
#define AHA_WG_O15 AHA_WG_O14, AHA_WG_F8(112)
#define AHA_WG_O16 AHA_WG_O15, AHA_WG_F8(120)
#define AHA_WG_SS(N, REGS, AB, P, ...)                                                                     \
  template <>                                                                                              \
  __device__ __forceinline__ void Wgmma64xN<N>(float(&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 "                               \
                 "{" REGS "}, " AB ", p, 1, 1, 0, 0;\n}\n"                                                 \
                 : __VA_ARGS__                                                                             \
                 : "l"(da), "l"(db), "r"(scale_d));                                                        \
  }
AHA_WG_SS(80, AHA_WG_L5, "%40, %41", "%42", AHA_WG_O5)
AHA_WG_SS(96, AHA_WG_L6, "%48, %49", "%50", AHA_WG_O6)
AHA_WG_SS(112, AHA_WG_L7, "%56, %57", "%58", AHA_WG_O7)
AHA_WG_SS(128, AHA_WG_L8, "%64, %65", "%66", AHA_WG_O8)
AHA_WG_SS(144, AHA_WG_L9, "%72, %73", "%74", AHA_WG_O9)
AHA_WG_SS(160, AHA_WG_L10, "%80, %81", "%82", AHA_WG_O10)
AHA_WG_SS(192, AHA_WG_L12, "%96, %97", "%98", AHA_WG_O12)
AHA_WG_SS(224, AHA_WG_L14, "%112, %113", "%114", AHA_WG_O14)
AHA_WG_SS(256, AHA_WG_L16, "%128, %129", "%130", AHA_WG_O16)
#undef AHA_WG_SS
#undef AHA_WG_L1
#undef AHA_WG_O1
#undef AHA_WG_L2
#undef AHA_WG_O2
#undef AHA_WG_L3
#undef AHA_WG_O3
#undef AHA_WG_L4
#undef AHA_WG_O4
#undef AHA_WG_L5
#undef AHA_WG_O5
#undef AHA_WG_L6
#undef AHA_WG_O6
#undef AHA_WG_L7
#undef AHA_WG_O7
#undef AHA_WG_L8
#undef AHA_WG_O8
#undef AHA_WG_L9
#undef AHA_WG_O9
#undef AHA_WG_L10
#undef AHA_WG_O10
#undef AHA_WG_L11
#undef AHA_WG_O11
#undef AHA_WG_L12
#undef AHA_WG_O12
#undef AHA_WG_L13
#undef AHA_WG_O13
#undef AHA_WG_L14
#undef AHA_WG_O14
#undef AHA_WG_L15
#undef AHA_WG_O15
#undef AHA_WG_L16
#undef AHA_WG_O16
#undef AHA_WG_F8
// Registers that products in flight read (A fragments): kept live, not reused, until this point.
template <int R, int C>
__device__ __forceinline__ void KeepLive(uint32_t (&a)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) asm volatile("" : "+r"(a[i][c])::"memory");
  }
}
template <int R, int C>
__device__ __forceinline__ void FenceAccumulators(float (&d)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) asm volatile("" : "+f"(d[i][c])::"memory");
  }
}
#endif

}  // namespace aha::engine::cuda
