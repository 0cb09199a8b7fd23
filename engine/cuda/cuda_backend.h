// CudaBackend: every op of backend.h on one NVIDIA GPU, on one CUDA stream.
//
// Storage is f32 (the op interface's type): activations, gradients, fp32 master weights and Adam
// moments. Matrix products run on the tensor cores in bf16 with f32 accumulation (Gemm, gemm.h):
// registered weights keep a bf16 copy refreshed by WeightsChanged(), activations are rounded to bf16
// on the way into each product: by the op that produced them (the norms and SwiGLU write a bf16 copy
// of their output in the same kernel, Gemm::AdoptCast), else by a cast kernel. GemmPrecision::kF32
// switches the products to plain f32 (parity tests).
// The generation KV cache pools hold bf16 with bf16 products (half the bytes of decode attention,
// which widens them to f32 and accumulates in f32), f32 with kF32 (kv_cache_dtype()).
// Ops are asynchronous on the backend's stream; Download(), SumSquares() and Synchronize() wait.
// Creating a CudaBackend registers the device allocator that Tensor uses for cuda:N tensors.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/backend.h"
#include "engine/cuda/gemm.h"

namespace aha::engine::cuda {

struct QkvNorm;  // kernels.h

class CudaBackend final : public Backend {
 public:
  // Unavailable with the CUDA error when there is no usable device `index`.
  static Result<std::unique_ptr<CudaBackend>> Create(int index, GemmPrecision precision = GemmPrecision::kBF16);
  // Whether device `index` exists (Create's checks, without a context or cuBLAS).
  static Status Probe(int index);
  ~CudaBackend() override;

  Device device() const override { return {DeviceKind::kCuda, index_}; }
  cudaStream_t stream() const { return stream_; }
  Gemm& gemm() { return *gemm_; }
  // "NVIDIA H200, 132 SMs, 139.8 GiB, driver 13.0"
  std::string Describe() const;
  // Bytes of the device's memory in use by every process (cudaMemGetInfo: total - free).
  size_t MemoryInUse() const;
  bool KeepsBf16() const override;
  // Training attention: the tensor-core kernels (attention_tc.cu, bf16 products, f32 softmax and
  // accumulation; 4-5x the f32 kernels on the H200, docs/kernels.md) with bf16 products, unless
  // AHA_ATTENTION=f32. The pedantic kF32 precision keeps the f32 kernels, as it does for GEMMs.
  bool UseTcAttention() const { return tc_attention_ && gemm_->precision() == GemmPrecision::kBF16; }

  void Copy(void* dst, const void* src, size_t bytes) override;
  void Zero(void* dst, size_t bytes) override;
  // Uploads of up to kStageBytes go through page-locked staging (copied there, then an async DMA), so
  // they never wait for the stream: a pageable source may make the driver sync the stream first,
  // which would stall a host that runs ahead of the GPU.
  void Upload(void* dst, const void* src, size_t bytes) override;
  void Download(void* dst, const void* src, size_t bytes) override;
  uint64_t DownloadAsync(void* dst, const void* src, size_t bytes) override;
  void AwaitDownload(uint64_t ticket) override;
  void GatherInt32(int32_t* dst, const int32_t* src, const int32_t* index, int n) override;
  void ResetProfile() override;
  void Synchronize() override;
  void RegisterWeights(const float* base, size_t n) override;
  void UnregisterWeights(const float* base) override;
  void KeepAsBf16(const float* base, size_t n) override;
  void ReleaseBf16(const float* base) override;
  void WeightsChanged(const float* base) override;
  bool BeginCapture() override;
  void* EndCapture() override;
  void Replay(void* graph) override;
  void DestroyGraph(void* graph) override;
  uint64_t graph_epoch() const override {
    return workspace_generation_ + gemm_->scratch_generation() + cast_copy_generation_;
  }

  void EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C) override;
  void EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C) override;
  void RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C,
                      float eps) override;
  void AddRmsNormForward(float* x, float* ln, float* rstd, const float* y, const float* w, int N, int C,
                         float eps) override;
  void RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                       const float* rstd, int N, int C) override;
  void RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H, int D) override;
  void RopeBackward(float* dx, const int32_t* positions, const float* inv_freq, int N, int H, int D) override;
  void LinearForward(float* out, const float* x, const float* w, const float* b, int N, int C, int OC) override;
  void LinearAddRmsNorm(float* x, float* ln, float* rstd, float* tmp, const float* a, const float* w,
                        const float* norm_w, int N, int K, int C, float eps) override;
  // How many parts LinearAddRmsNorm splits K into for this shape (1: none), and the override
  // (AHA_SPLIT_K at construction: 0 chooses, 1 never splits, S always S where K allows).
  int SplitParts(int N, int K, int C) const;
  void set_split_k(int parts) { split_k_ = parts; }
  // Whether LmHeadSample runs the product and the draw as one kernel (the default; AHA_FUSED_SAMPLE=0
  // at construction turns it off) or as LinearForward + SampleRows.
  void set_fused_sample(bool on) { fused_sample_ = on; }
  bool fused_sample() const { return fused_sample_; }
  void LinearBackward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, int N,
                      int C, int OC, bool accumulate_dx) override;
  void SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD, int KD) override;
  void PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD, int KD) override;
  void SwiGluForward(float* h, const float* gu, int N, int I) override;
  // Rows up to kFusedMlpRows (a decode step) with x and h kept in bf16 and bf16 products: one kernel
  // (cuda::GateUpSwiGlu, wgmma) that never writes gu; else the default's two ops. The kernel copies
  // w before the op enqueued just before it has finished (PDL; a norm in the decode step): that op
  // must not write w.
  void GateUpSwiGlu(float* h, float* gu, const float* x, const float* w, int N, int C, int I) override;
  // Whether GateUpSwiGlu runs the fused kernel for this shape, given kept x and h (AHA_FUSED_MLP=0 at
  // construction turns it off: the A/B).
  bool FusesMlp(int N, int C, int I) const;
  void set_fused_mlp(bool on) { fused_mlp_ = on; }
  static constexpr int kFusedMlpRows = 1024;
  void SwiGluBackward(float* dgu, const float* dh, const float* gu, int N, int I) override;
  void Add(float* out, const float* a, const float* b, size_t n) override;
  void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                        const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) override;
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                         const float* q, const float* k, const float* v, const int32_t* cu_seqlens, int S, int N,
                         int Hq, int Hkv, int D) override;
  // bf16 pools with bf16 products (kBF16), unless AHA_KV_CACHE=f32; f32 pools with kF32 products.
  DType kv_cache_dtype() const override;
  void KvCacheWrite(const PagedKv& cache, const float* k, const float* v, const int32_t* cu_q, const int32_t* start,
                    int B, int Nq, int Hkv, int D) override;
  void SwiGluLinearBackward(float* dx, float* dw, float* dgu, const float* dh, const float* gu, const float* x,
                            const float* w, int N, int C, int I) override;
  void QkvRope(float* q, float* k, float* v, const float* qkv, const float* bias, const int32_t* positions,
               const float* inv_freq, int N, int Hq, int Hkv, int D) override;
  void QkvRopeAttention(float* out, float* lse, float* q, float* k, float* v, const float* qkv, const float* bias,
                        const int32_t* positions, const float* inv_freq, const int32_t* cu_seqlens, int S, int N,
                        int Hq, int Hkv, int D, bool forward_only = false) override;
  void RopePackQkv(float* dqkv, float* dq, float* dk, const float* dv, const int32_t* positions,
                   const float* inv_freq, int N, int Hq, int Hkv, int D) override;
  // Qwen3's q/k/v step with its per-head norms: one q/k/v kernel (cuda::QkvRope with its norm) and
  // the attention as QkvRopeAttention runs it; the backward in one kernel (cuda::NormRopePackQkv).
  // AHA_FUSED_QKV=0, or shapes the kernels do not take, run the ops.
  void QkvNormRopeAttention(float* out, float* lse, float* q_pre, float* k_pre, float* q, float* k, float* v,
                            float* q_rstd, float* k_rstd, const float* qkv, const float* bias, const float* q_norm,
                            const float* k_norm, float eps, const int32_t* positions, const float* inv_freq,
                            const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D,
                            bool forward_only = false) override;
  void NormRopePackQkv(float* dqkv, float* dq_norm, float* dk_norm, float* dq_pre, float* dk_pre, float* dq,
                       float* dk, const float* dv, const float* q_pre, const float* k_pre, const float* q_norm,
                       const float* k_norm, const float* q_rstd, const float* k_rstd, const int32_t* positions,
                       const float* inv_freq, int N, int Hq, int Hkv, int D) override;
  void QkvRopeKvWrite(float* q, float* k, float* v, const float* qkv, const float* bias, const int32_t* positions,
                      const float* inv_freq, const PagedKv& cache, const int32_t* cu_q, const int32_t* start, int B,
                      int Nq, int Hq, int Hkv, int D) override;
  void CachedAttentionForward(float* out, const float* q, const PagedKv& cache, const int32_t* cu_q,
                              const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) override;
  // Decode steps (Nq == B) on the tensor-core decode kernel at D = 64 run fused
  // (QkvRopeCachedAttentionDecodeTC) unless AHA_DECODE_FUSED=0 or AHA_FUSED_QKV=0 or a decode-kernel
  // switch is set (AHA_DECODE_FUSED=1: at D = 128 too); else the two ops.
  void QkvRopeCachedAttention(float* out, float* q, float* k, float* v, const float* qkv, const float* bias,
                              const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                              const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv,
                              int D) override;
  // Likewise with the per-head norms in the same kernel (Qwen3's decode step, at D = 64 and 128),
  // else the default's ops.
  void QkvNormRopeCachedAttention(float* out, float* q, float* k, float* v, float* rstd, const float* qkv,
                                  const float* bias, const float* q_norm, const float* k_norm, float eps,
                                  const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                                  const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv,
                                  int D) override;
  void LmHeadForward(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                     const int32_t* targets, int N, int C, int V, float temperature) override;
  void LmHeadBackward(float* dh, float* dw, const float* dlogprob, const float* dentropy, const float* h,
                      const float* w, const int32_t* targets, const float* lse, const float* entropy, int N, int C,
                      int V, float temperature) override;
  bool KeepsLogits() const override { return true; }
  void LmHeadForwardKeep(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                         const int32_t* targets, int N, int C, int V, float temperature, float* logits) override;
  void LmHeadBackwardKept(float* dh, float* dw, const float* dlogprob, const float* dentropy, const float* h,
                          const float* w, const int32_t* targets, const float* lse, const float* entropy, int N,
                          int C, int V, float temperature, float* logits) override;
  double SumSquares(const float* x, size_t n) override;
  void Scale(float* x, float s, size_t n) override;
  void AdamW(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
             float eps, float weight_decay, int64_t t) override;
  void SampleRows(int32_t* tokens, float* logprobs, const float* logits, int B, int V, const float* temperature,
                  const int32_t* top_k, const float* top_p, const uint64_t* seeds, const uint64_t* counters) override;
  void LmHeadSample(int32_t* tokens, float* logprobs, float* logits, const float* x, const float* w, int B, int C,
                    int V, const float* temperature, const int32_t* top_k, const float* top_p, const uint64_t* seeds,
                    const uint64_t* counters) override;

 private:
  // QkvRopeAttention's fused form, with Qwen3's norms when norm is not null (QkvNormRopeAttention).
  // forward_only: q's kept copy, q, k and v in f32 and norm's q_pre, k_pre and rstds are not written.
  void FusedQkvAttention(const QkvNorm* norm, float* out, float* lse, float* q, float* k, float* v,
                         const float* qkv, const float* bias, const int32_t* positions, const float* inv_freq,
                         const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, bool forward_only);
  CudaBackend(int index, cudaStream_t stream, GemmPrecision precision);
  void* Workspace(size_t bytes);
  // Where a producer kernel (RMSNorm, add + RMSNorm, SwiGLU, and in the backward SwiGLU's and
  // PackQkv, whose outputs are products' dout) writes the bf16 copy of its
  // output for the next product (Gemm::AdoptCast), count elements; null with f32 products, or when
  // the buffer would have to grow while a graph is being captured (then the product casts).
  uint16_t* CastCopy(size_t count);
  // After the producer's Check(): the next products read the copy instead of casting.
  void AdoptCastCopy(const float* f32, size_t count, const uint16_t* bf16);
  // Aborts on a failed launch of `op`; marks it for AHA_PROFILE; forgets the GEMMs' held input
  // casts unless op is a linear product (see LinearForward).
  void Check(const char* op, bool forget_casts = true);
  // AHA_PROFILE=1: where the GPU time goes, per op. An event is recorded after every op; ops run in
  // order on the one stream, so an op's time is the gap since the event before it (its launch
  // latency included when the GPU was waiting on the host). Sums per op name are printed to stderr
  // when the backend is destroyed. Off by default; nothing is recorded inside graph capture.
  struct Profile;
  void Mark(const char* op);
  void ResolveProfile();
  void PrintProfile() const;

  int index_;
  cudaStream_t stream_;
  std::unique_ptr<Gemm> gemm_;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  uint64_t workspace_generation_ = 0;
  double* sum_out_ = nullptr;  // device double for SumSquares
  // One buffer serves every producer: a copy is read only by the products right after its producer,
  // and the next producer runs after them on the same stream. Grow-only, by at least a quarter.
  uint16_t* cast_copy_ = nullptr;
  size_t cast_copy_count_ = 0;
  uint64_t cast_copy_generation_ = 0;
  bool tc_attention_ = true;  // UseTcAttention()
  bool bf16_kv_cache_ = true;  // AHA_KV_CACHE=f32 turns it off (kv_cache_dtype())
  bool keep_bf16_ = true;      // AHA_KEEP_BF16=0 ignores KeepAsBf16 (every activation f32: the A/B)
  // LinearAddRmsNorm's K parts: 0 chooses (SplitParts), 1 never splits, S > 1 always S where K
  // allows (AHA_SPLIT_K, the A/B).
  int split_k_ = 0;
  // QkvRopeCachedAttention's and QkvNormRopeCachedAttention's tensor-core decode kernel (norms null: none).
  void FusedDecodeAttention(float* out, const float* qkv, const float* bias, const float* q_norm, const float* k_norm,
                            float eps, const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                            const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv, int D);
  bool fused_sample_ = true;  // LmHeadSample's kernel (set_fused_sample)
  bool fused_mlp_ = true;  // GateUpSwiGlu's kernel (AHA_FUSED_MLP=0: the two ops)
  int sms_ = 132;
  // AddRmsNormForward with the addend in `parts` partial sums, N * C floats apart (1: a plain y).
  void AddPartsRmsNorm(float* x, float* ln, float* rstd, const float* y, int parts, const float* w, int N, int C,
                       float eps);
  // KeepAsBf16 ranges: registered with the gemm like weights (their bf16 copy is what products
  // read), written by the products (NTBf16, NNBf16), the norms and SwiGluForward.
  struct Kept {
    const float* base;
    size_t n;
  };
  std::vector<Kept> kept_;
  // The bf16 copy that stands for [p, p + n) when that lies in a kept range and products are bf16;
  // null otherwise (the f32 values are the tensor).
  uint16_t* KeptCopy(const float* p, size_t n);
  std::unique_ptr<Profile> profile_;
  bool capturing_ = false;
  // Page-locked host buffers, each with the event of the copy that last used it: a ring of upload
  // stages (a stage is refilled once its last DMA has run) and the async download slots.
  struct HostSlot {
    void* host = nullptr;
    size_t bytes = 0;
    cudaEvent_t done = nullptr;
    void* dst = nullptr;  // downloads: where AwaitDownload puts the bytes, how many, and whether
    size_t count = 0;     // the slot holds a ticket not yet awaited
    bool busy = false;
  };
  static constexpr size_t kStageBytes = size_t{1} << 20;
  static constexpr int kStages = 4;
  HostSlot stages_[kStages];
  HostSlot downloads_[kAsyncDownloads];
  uint64_t next_stage_ = 0, next_download_ = 0;
  void EnsureHost(HostSlot& slot, size_t bytes, const char* what);
};

}  // namespace aha::engine::cuda
