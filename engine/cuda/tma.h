// The tensor memory accelerator (TMA) and shared-memory barriers (mbarrier) as the sm_90a product
// kernels use them (mlp.cu): a producer thread copies 2-D boxes of a row-major bf16
// matrix into 128-byte-swizzled shared memory, each stage's full barrier counting the bytes, and
// the consumers release a stage through its empty barrier. The device parts exist only when the
// compiler targets sm_90a (AHA_WGMMA, wgmma.h).
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (the encoder comes from the runtime's entry point)
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "engine/cuda/wgmma.h"

namespace aha::engine::cuda {

#ifdef AHA_WGMMA
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void MbarExpectBytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// One arrival, at the default release at block scope: the stage's readers are the tensor cores,
// done once wgmma.wait_group returns.
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// The box at (x inner, y rows) of the tensor map into this block's shared memory at dst.
__device__ __forceinline__ void TmaLoad(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
// The box at (x inner, y rows) of the tensor map += the tile at src in this block's shared memory
// (laid out as the map's swizzle says), element by element, done by the tensor memory accelerator
// at L2: one request for the whole tile instead of a thread's atomic per 16 bytes; elements past the
// tensor's bounds are left alone. Completion is tracked per thread in bulk groups: BulkCommit
// closes the thread's current group; BulkWaitRead<0> returns once every committed group has read
// its source (the shared memory may then be written again), BulkWait<0> once they have completed.
__device__ __forceinline__ void TmaReduceAdd(const CUtensorMap* map, int x, int y, uint32_t src) {
  asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(x), "r"(y), "r"(src)
               : "memory");
}
__device__ __forceinline__ void BulkCommit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void BulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void BulkWait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// Programmatic dependent launch (PDL). Wait: until the kernel before this one (launched with
// LaunchDependent) has completed and its writes are visible; a no-op after an ordinary launch.
// LetDependentsStart: the kernel after this one may start now (it waits in its turn before reading
// what this one writes).
__device__ __forceinline__ void WaitForPriorKernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void LetDependentsStart() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A launcher's CUDA call failed: the op interface has no error path, so abort with the reason.
inline void CheckCall(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha engine/cuda: %s: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

// An A/B switch of the launchers: true when the environment sets `name` to 0 (the earlier form).
inline bool EnvOff(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] == '0';
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda); null
// when the driver has none.
inline EncodeTiled TensorMapEncoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// A row-major bf16 matrix [rows, cols] read in boxes of box_rows x 64 columns (one 128-byte swizzle
// atom wide), 128-byte swizzled; boxes past the matrix are zero-filled by the copy engine.
inline CUtensorMap SwizzledRowsMap(const uint16_t* p, int rows, int cols, int box_rows, const char* who) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t steps[2] = {1, 1};
  const CUresult r = TensorMapEncoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<uint16_t*>(p), dims,
                                        strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "aha engine/cuda: %s: cuTensorMapEncodeTiled failed (%d) for [%d, %d]\n", who,
                 static_cast<int>(r), rows, cols);
    std::abort();
  }
  return map;
}

// A row-major f32 matrix [rows, cols] in boxes of box_rows x 32 columns (one 128-byte swizzle atom
// wide), 128-byte swizzled; for stores and reductions, which leave elements past the matrix alone.
inline CUtensorMap SwizzledRowsMapF32(float* p, int rows, int cols, int box_rows, const char* who) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 4};
  const cuuint32_t box[2] = {32, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t steps[2] = {1, 1};
  const CUresult r = TensorMapEncoder()(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, p, dims, strides, box, steps,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "aha engine/cuda: %s: cuTensorMapEncodeTiled failed (%d) for f32 [%d, %d]\n", who,
                 static_cast<int>(r), rows, cols);
    std::abort();
  }
  return map;
}

// Launches kernel<<<grid, threads, smem, s>>>(args...) as a programmatic dependent of the kernel
// before it in the stream (dependent = true; it may then start early and must WaitForPriorKernel()
// before reading that kernel's output), or as an ordinary launch.
template <typename... Params, typename... Args>
cudaError_t LaunchMaybeDependent(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 threads, size_t smem,
                                 cudaStream_t s, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = threads;
  config.dynamicSmemBytes = smem;
  config.stream = s;
  config.attrs = attr;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace aha::engine::cuda
