// cuBLAS products for row-major f32 buffers (gemm.h). cuBLAS is column-major: a row-major [R, C]
// buffer is the column-major [C, R] matrix, its transpose. So row-major out[M, N] = A' B' is computed
// as column-major out^T[N, M] = B'^T A'^T, i.e. cuBLAS gets the operands swapped:
//   NT: out^T = b (op T on b's buffer, ld K)  * a^T (op N on a's buffer, ld K)
//   NN: out^T = b^T (op N, ld N)              * a^T (op N, ld K)
//   TN: out^T = b^T (op N, ld N)              * a   (op T on a's buffer, ld M)
#include "engine/cuda/gemm.h"

#include <cublas_v2.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {

namespace {

// cuBLAS is opened on first use (dlopen), not linked: a process that never creates a CUDA backend
// (every CPU run, every CPU test) never maps its ~600 MB, and its 92 KB of static TLS, which glibc
// reserves in every thread's stack, stays out of processes that do not use it (with civetweb's
// 100 KB thread stacks that once broke the metrics endpoint; see common/metrics.h).
struct CublasApi {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasDestroy_v2) destroy;
  decltype(&cublasSetStream_v2) set_stream;
  decltype(&cublasSetWorkspace_v2) set_workspace;
  decltype(&cublasSetMathMode) set_math_mode;
  decltype(&cublasSgemm_v2) sgemm;
  // The C entry point (cublas_api.h also declares C++ overloads of the name).
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                            cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
  decltype(&cublasGetStatusString) status_string;
};

const CublasApi& Cublas() {
  static const CublasApi api = [] {
    const std::string name = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      std::fprintf(stderr, "aha: cannot load %s: %s\n", name.c_str(), dlerror());
      std::abort();
    }
    auto sym = [&](const char* n) {
      void* p = dlsym(lib, n);
      if (!p) {
        std::fprintf(stderr, "aha: %s has no %s\n", name.c_str(), n);
        std::abort();
      }
      return p;
    };
    CublasApi a;
    a.create = reinterpret_cast<decltype(a.create)>(sym("cublasCreate_v2"));
    a.destroy = reinterpret_cast<decltype(a.destroy)>(sym("cublasDestroy_v2"));
    a.set_stream = reinterpret_cast<decltype(a.set_stream)>(sym("cublasSetStream_v2"));
    a.set_workspace = reinterpret_cast<decltype(a.set_workspace)>(sym("cublasSetWorkspace_v2"));
    a.set_math_mode = reinterpret_cast<decltype(a.set_math_mode)>(sym("cublasSetMathMode"));
    a.sgemm = reinterpret_cast<decltype(a.sgemm)>(sym("cublasSgemm_v2"));
    a.gemm_ex = reinterpret_cast<decltype(a.gemm_ex)>(sym("cublasGemmEx"));
    a.status_string = reinterpret_cast<decltype(a.status_string)>(sym("cublasGetStatusString"));
    return a;
  }();
  return api;
}

void CheckCublas(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "aha: cuBLAS %s failed: %s\n", what, Cublas().status_string(st));
    std::abort();
  }
}

void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha: CUDA %s failed: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

// A device buffer that only grows.
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  uint64_t* generation = nullptr;
  void* Get(size_t need) {
    if (need > bytes) {
      // At least a quarter more: cast sizes follow the batch, which varies by a few rows per
      // step, and each growth is a device-wide cudaFree.
      need = std::max(need, bytes + bytes / 4);
      ++*generation;
      if (p) CheckCuda(cudaFree(p), "free scratch");
      CheckCuda(cudaMalloc(&p, need), "allocate gemm scratch");
      bytes = need;
    }
    return p;
  }
  ~Scratch() {
    if (p) cudaFree(p);
  }
};

struct WeightRange {
  const float* base = nullptr;
  size_t n = 0;
  uint16_t* bf16 = nullptr;
};

}  // namespace

struct Gemm::Impl {
  cudaStream_t stream;
  GemmPrecision precision;
  cublasHandle_t handle = nullptr;
  void* workspace = nullptr;
  uint64_t generation = 0;
  Scratch scratch_a{nullptr, 0, &generation}, scratch_b{nullptr, 0, &generation};
  // What each scratch holds: the bf16 cast of [p, p + count). A product whose operand is the
  // same range reuses it instead of casting again: q/k/v and gate/up read one normed input, and a
  // linear's backward reads dout twice (dx and dw). The owner calls ForgetCasts() whenever memory
  // may have changed outside these products (CudaBackend: after every other op).
  struct Held {
    const float* p = nullptr;
    size_t count = 0;
  } held_a, held_b;
  bool reuse = false;  // set_cast_reuse: only the owner knows no other kernel wrote in between
  std::vector<WeightRange> weights;

  // The bf16 operand for `p` (rows * cols elements): a registered weight's cached copy, the
  // scratch's cast when it already holds p, or a new cast into scratch.
  const uint16_t* Bf16(const float* p, size_t count, Scratch& scratch, Held& held) {
    for (const WeightRange& w : weights)
      if (p >= w.base && p + count <= w.base + w.n) return w.bf16 + (p - w.base);
    if (reuse && held.p == p && held.count == count && scratch.bytes >= count * sizeof(uint16_t))
      return static_cast<const uint16_t*>(scratch.p);
    auto* out = static_cast<uint16_t*>(scratch.Get(count * sizeof(uint16_t)));
    CastF32ToBF16(out, p, count, stream);
    held = {p, count};
    return out;
  }

  // A product that writes [out, out + n) makes a held cast of that range stale.
  static void Overwritten(Held& held, const float* out, size_t n) {
    if (held.p && out < held.p + held.count && held.p < out + n) held = {};
  }

  void Run(cublasOperation_t op_b, cublasOperation_t op_a, int m, int n, int k, const float* b, size_t b_count,
           int ldb, const float* a, size_t a_count, int lda, float* out, int ldo, float alpha, float beta) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      // A zero-length product: out = beta * out.
      if (beta == 0.0f) CheckCuda(cudaMemsetAsync(out, 0, sizeof(float) * m * static_cast<size_t>(n), stream), "memset");
      else if (beta != 1.0f) Scale(out, beta, static_cast<size_t>(m) * n, stream);
      Overwritten(held_a, out, static_cast<size_t>(m) * n);
      Overwritten(held_b, out, static_cast<size_t>(m) * n);
      return;
    }
    if (precision == GemmPrecision::kF32) {
      CheckCublas(Cublas().sgemm(handle, op_b, op_a, m, n, k, &alpha, b, ldb, a, lda, &beta, out, ldo), "sgemm");
      Overwritten(held_a, out, static_cast<size_t>(m) * n);
      Overwritten(held_b, out, static_cast<size_t>(m) * n);
      return;
    }
    const uint16_t* b16 = Bf16(b, b_count, scratch_b, held_b);
    const uint16_t* a16 = Bf16(a, a_count, scratch_a, held_a);
    CheckCublas(Cublas().gemm_ex(handle, op_b, op_a, m, n, k, &alpha, b16, CUDA_R_16BF, ldb, a16, CUDA_R_16BF, lda,
                             &beta, out, CUDA_R_32F, ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                "gemm bf16");
    Overwritten(held_a, out, static_cast<size_t>(m) * n);
    Overwritten(held_b, out, static_cast<size_t>(m) * n);
  }
};

Gemm::Gemm(cudaStream_t stream, GemmPrecision precision) : impl_(new Impl) {
  impl_->stream = stream;
  impl_->precision = precision;
  CheckCublas(Cublas().create(&impl_->handle), "create");
  CheckCublas(Cublas().set_stream(impl_->handle, stream), "set stream");
  // An explicit workspace keeps cuBLAS from allocating inside a captured CUDA graph.
  constexpr size_t kWorkspace = size_t{32} << 20;
  CheckCuda(cudaMalloc(&impl_->workspace, kWorkspace), "allocate cuBLAS workspace");
  CheckCublas(Cublas().set_workspace(impl_->handle, impl_->workspace, kWorkspace), "set workspace");
  // f32 products stay f32: no TF32 down-conversion.
  CheckCublas(Cublas().set_math_mode(impl_->handle, CUBLAS_PEDANTIC_MATH), "set math mode");
}

Gemm::~Gemm() {
  for (WeightRange& w : impl_->weights) cudaFree(w.bf16);
  Cublas().destroy(impl_->handle);
  cudaFree(impl_->workspace);
}

GemmPrecision Gemm::precision() const { return impl_->precision; }
void Gemm::set_precision(GemmPrecision p) {
  impl_->precision = p;
  ForgetCasts();
}
void Gemm::ForgetCasts() { impl_->held_a = impl_->held_b = {}; }
void Gemm::set_cast_reuse(bool on) { impl_->reuse = on; }

void Gemm::NT(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta) {
  impl_->Run(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, b, static_cast<size_t>(N) * K, K, a, static_cast<size_t>(M) * K, K,
             out, N, alpha, beta);
}

void Gemm::NN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta) {
  impl_->Run(CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, b, static_cast<size_t>(K) * N, N, a, static_cast<size_t>(M) * K, K,
             out, N, alpha, beta);
}

void Gemm::TN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta) {
  impl_->Run(CUBLAS_OP_N, CUBLAS_OP_T, N, M, K, b, static_cast<size_t>(K) * N, N, a, static_cast<size_t>(K) * M, M,
             out, N, alpha, beta);
}

void Gemm::RegisterWeights(const float* base, size_t n) {
  WeightRange w{base, n, nullptr};
  CheckCuda(cudaMalloc(&w.bf16, n * sizeof(uint16_t)), "allocate bf16 weights");
  impl_->weights.push_back(w);
}

void Gemm::UnregisterWeights(const float* base) {
  auto& ws = impl_->weights;
  for (size_t i = 0; i < ws.size(); ++i)
    if (ws[i].base == base) {
      CheckCuda(cudaStreamSynchronize(impl_->stream), "synchronize");
      cudaFree(ws[i].bf16);
      ws.erase(ws.begin() + static_cast<long>(i));
      return;
    }
}

void Gemm::WeightsChanged(const float* base) {
  for (WeightRange& w : impl_->weights)
    if (w.base == base) CastF32ToBF16(w.bf16, w.base, w.n, impl_->stream);
}

uint64_t Gemm::scratch_generation() const { return impl_->generation; }

uint16_t* Gemm::Bf16Copy(const float* base) {
  for (WeightRange& w : impl_->weights)
    if (w.base == base) return w.bf16;
  return nullptr;
}

}  // namespace aha::engine::cuda
