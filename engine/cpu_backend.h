// CpuBackend: the f32 reference implementation of every op in backend.h. Readable loops over
// contiguous arrays (OpenMP across rows/heads), OpenBLAS sgemm for the matrix products. Every CUDA
// kernel is checked against this file.
#pragma once

#include "engine/backend.h"

namespace aha::engine {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::Cpu(); }

  void EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C) override;
  void EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C) override;
  void RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C,
                      float eps) override;
  void AddRmsNormForward(float* x, float* ln, float* rstd, const float* y, const float* w, int N, int C,
                         float eps) override;
  void RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                       const float* rstd, int N, int C) override;
  void RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H,
                   int D) override;
  void RopeBackward(float* dx, const int32_t* positions, const float* inv_freq, int N, int H,
                    int D) override;
  void LinearForward(float* out, const float* x, const float* w, const float* b, int N, int C,
                     int OC) override;
  void LinearBackward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w,
                      int N, int C, int OC, bool accumulate_dx) override;
  void SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD,
                int KD) override;
  void PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD, int KD) override;
  void SwiGluForward(float* h, const float* gu, int N, int I) override;
  void SwiGluBackward(float* dgu, const float* dh, const float* gu, int N, int I) override;
  void Add(float* out, const float* a, const float* b, size_t n) override;
  void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                        const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) override;
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                         const float* lse, const float* q, const float* k, const float* v,
                         const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) override;
  void KvCacheWrite(const PagedKv& cache, const float* k, const float* v, const int32_t* cu_q,
                    const int32_t* start, int B, int Nq, int Hkv, int D) override;
  void CachedAttentionForward(float* out, const float* q, const PagedKv& cache, const int32_t* cu_q,
                              const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) override;
  void LmHeadForward(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                     const int32_t* targets, int N, int C, int V, float temperature) override;
  void LmHeadBackward(float* dh, float* dw, const float* dlogprob, const float* dentropy, const float* h,
                      const float* w, const int32_t* targets, const float* lse, const float* entropy,
                      int N, int C, int V, float temperature) override;
  double SumSquares(const float* x, size_t n) override;
  void Scale(float* x, float s, size_t n) override;
  void AdamW(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
             float beta2, float eps, float weight_decay, int64_t t) override;

  // Vocabulary chunk and row block of the fused lm-head (workspace = rows * chunk floats). Small
  // values let tests exercise chunk boundaries on a tiny vocabulary.
  void SetLmHeadChunking(int vocab_chunk, int row_block) {
    vocab_chunk_ = vocab_chunk;
    row_block_ = row_block;
  }

 private:
  int vocab_chunk_ = 4096;
  int row_block_ = 128;
};

}  // namespace aha::engine
