// Programmatic dependent launch (sm_90): a kernel launched with LaunchAfterPrevious may start while
// the kernel before it in the stream is still finishing (once all of that kernel's blocks have exited
// or triggered), instead of after its completion. Such a kernel must call WaitForPreviousGrid()
// before it reads anything the previous kernel writes or writes anything it reads; what it does before
// that (index math, loads of data written by earlier launches, shared-memory setup) overlaps the
// previous kernel's tail and the launch latency. In a stream capture the attribute becomes a
// programmatic edge of the graph. Without the attribute (AHA_PDL=0, or an older GPU) the wait returns
// at once and the launch is ordinary.
//
// Safety rests on one rule kept by every kernel launched this way: nothing touches global memory
// that the previous kernel writes, or that it reads and this one writes, before the wait. Then the
// kernel before the previous one has completed too (the previous one was launched ordinarily, or
// waited itself before its own accesses), so everything older is visible.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <utility>

namespace aha::engine::cuda {

__device__ __forceinline__ void WaitForPreviousGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether launches may overlap the previous kernel's tail: AHA_PDL=0 turns it off (the A/B switch).
bool DependentLaunchEnabled();

template <typename... Params, typename... Args>
void LaunchAfterPrevious(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                         const char* what, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = DependentLaunchEnabled() ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha engine/cuda: %s launch: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

}  // namespace aha::engine::cuda
