// Gemm: row-major matrix products on f32 device buffers through cuBLAS, f32 accumulation.
//
// Two precisions. kBF16 (the default on GPUs): both operands are rounded to bf16 and multiplied on
// the tensor cores (cublasGemmEx, bf16 A/B, f32 C, CUBLAS_COMPUTE_32F). Weights registered with
// RegisterWeights() are read from a cached bf16 copy (refreshed by WeightsChanged()), so a weight is
// cast once per optimizer step or weight swap, not once per product; any other operand is cast into
// a grow-only scratch buffer first. kF32: plain f32 products (no TF32), for parity tests.
//
// All three forms write out[M, N] = alpha * A' B' + beta * out with A' = a or a^T, B' = b or b^T as
// the name says (N = normal, T = transposed, for the row-major arrays as stored).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace aha::engine::cuda {

enum class GemmPrecision { kBF16, kF32 };

class Gemm {
 public:
  Gemm(cudaStream_t stream, GemmPrecision precision);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  GemmPrecision precision() const;
  void set_precision(GemmPrecision p);

  // out[M, N] = alpha * a[M, K] @ b[N, K]^T + beta * out   (x @ w^T with w in (out, in) layout)
  void NT(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta);
  // out[M, N] = alpha * a[M, K] @ b[K, N] + beta * out      (dout @ w)
  void NN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta);
  // out[M, N] = alpha * a[K, M]^T @ b[K, N] + beta * out    (dout^T @ x)
  void TN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta);

  // A weight range [base, base + n) whose products read a cached bf16 copy. Call WeightsChanged()
  // after the f32 values change (optimizer step, load, swap). Unregister before freeing.
  void RegisterWeights(const float* base, size_t n);
  void UnregisterWeights(const float* base);
  void WeightsChanged(const float* base);
  // The cached bf16 copy of the registered range starting at base (null if none): an actor that
  // receives bf16 weights writes it directly (SwapInBf16) instead of casting again.
  uint16_t* Bf16Copy(const float* base);
  // Counts reallocations of the cast scratch (CUDA graphs that captured it are then stale).
  uint64_t scratch_generation() const;
  // With cast reuse on, a product reuses the bf16 cast of an operand that an earlier product cast
  // from the same range (q/k/v and gate/up share their input; a linear's backward reads dout
  // twice), unless a product has written that range since. Off by default: only the caller knows
  // that no other kernel wrote the range in between. CudaBackend turns it on inside its linear
  // ops and calls ForgetCasts() after every other op.
  void set_cast_reuse(bool on);
  void ForgetCasts();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace aha::engine::cuda
