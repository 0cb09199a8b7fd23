// Gemm: row-major matrix products on f32 device buffers through cuBLAS, f32 accumulation.
//
// Two precisions. kBF16 (the default on GPUs): both operands are rounded to bf16 and multiplied on
// the tensor cores (bf16 A/B, f32 C, CUBLAS_COMPUTE_32F), through one of two libraries:
//   kCublasLt (default): cublasLtMatmul with an algorithm chosen per problem: up to 8 candidates of
//     cublasLtMatmulAlgoGetHeuristic, each timed once on first use of the problem and the fastest
//     kept. A problem is (form, M, N, K rounded to 4 buckets per octave above 1024, beta != 0, the
//     operands' alignment); a new shape in a tuned bucket reuses its winner (checked with
//     cublasLtMatmulAlgoCheck). Products issued while the stream captures a CUDA graph are never
//     timed: they take a tuned winner if there is one, else the heuristic's first choice.
//   kCublasGemmEx: cublasGemmEx with cuBLAS's default algorithm (the path before version 5).
// The environment variable AHA_GEMM=gemmex selects kCublasGemmEx at construction (AHA_GEMM=lt or
// unset: kCublasLt); set_library() switches at any time. Weights registered with
// RegisterWeights() are read from a cached bf16 copy (refreshed by WeightsChanged()), so a weight is
// cast once per optimizer step or weight swap, not once per product; any other operand is cast into
// a grow-only scratch buffer first, unless the kernel that produced it also wrote its bf16 copy
// (AdoptCast). kF32: plain f32 products (no TF32), for parity tests.
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
enum class GemmLibrary { kCublasLt, kCublasGemmEx };

const char* GemmLibraryName(GemmLibrary library);

class Gemm {
 public:
  Gemm(cudaStream_t stream, GemmPrecision precision);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  GemmPrecision precision() const;
  void set_precision(GemmPrecision p);
  // Which library runs bf16 products (kF32 products always run cublasSgemm).
  GemmLibrary library() const;
  void set_library(GemmLibrary library);
  // cuBLASLt problems timed so far (each cost up to 16 extra products, once).
  int tuned_problems() const;

  // out[M, N] = alpha * a[M, K] @ b[N, K]^T + beta * out   (x @ w^T with w in (out, in) layout)
  void NT(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta);
  // out[M, N] = alpha * a[M, K] @ b[K, N] + beta * out      (dout @ w)
  void NN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta);
  // out[M, N] = alpha * a[K, M]^T @ b[K, N] + beta * out    (dout^T @ x)
  void TN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta);

  // NT with K split into S equal parts: parts[j][M, N] = a[M, j K/S .. (j + 1) K/S) @ b[N, same]^T
  // for j < S, one batched product (a decode step's output projections: 14 tiles of a 256 x 896
  // output fill a tenth of the device; S parts fill S times as much, and the caller adds them).
  void NTSplitK(float* parts, const float* a, const float* b, int M, int N, int K, int S);

  // NT and NN with the result rounded to bf16 (round to nearest even, in cuBLAS's epilogue) into
  // out16[M, N], which stands for the f32 range alias[M * N] (a held or adopted copy of that range
  // is stale afterwards). alpha 1, beta 0; bf16 products only (kF32 aborts).
  void NTBf16(uint16_t* out16, const float* alias, const float* a, const float* b, int M, int N, int K);
  void NNBf16(uint16_t* out16, const float* alias, const float* a, const float* b, int M, int N, int K);

  // A weight range [base, base + n) whose products read a cached bf16 copy. Call WeightsChanged()
  // after the f32 values change (optimizer step, load, swap). Unregister before freeing.
  void RegisterWeights(const float* base, size_t n);
  void UnregisterWeights(const float* base);
  void WeightsChanged(const float* base);
  // For a kernel that writes new f32 values of a registered range and their bf16 copy in one pass
  // (AdamW): the copy's location for [p, p + n) (null when no registered range holds it), and
  // CopyWritten(p, n) after that kernel. When such writes, in order from the range's start, have
  // covered the whole range, the next WeightsChanged() of it skips its cast (and every
  // WeightsChanged() starts the count again).
  uint16_t* Bf16CopyOf(const float* p, size_t n);
  void CopyWritten(const float* p, size_t n);
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
  // A bf16 copy of [f32, f32 + count) that the kernel which wrote the f32 values also wrote, each
  // element rounded to nearest even (as the cast kernel rounds), into memory the caller owns and
  // keeps until the copy is forgotten. A product whose operand is exactly that range reads it
  // instead of casting (RMSNorm's output feeds q/k/v and gate/up, SwiGLU's feeds down). It is
  // forgotten exactly like a held cast: by ForgetCasts() (CudaBackend: after every op that is not a
  // linear product, so adopt right after the producing op's own ForgetCasts) or a product that
  // writes an overlapping range, and it is used only while cast reuse is on. One at a time: a new
  // adoption replaces the previous one.
  void AdoptCast(const float* f32, size_t count, const uint16_t* bf16);
  // Casts of non-weight operands launched so far (held casts and adopted copies launch none).
  uint64_t casts_launched() const;
  // Products' operands read from an adopted copy so far (a caller whose operand exists only as that
  // copy checks that its products read it).
  uint64_t adopted_reads() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace aha::engine::cuda
