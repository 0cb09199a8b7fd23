// Backend: the one op interface that the CPU reference (cpu_backend.cc) and the CUDA backend
// (cuda/cuda_backend.h) implement. The transformer (transformer.cc), the generator and the optimizer call only
// these ops, so swapping the backend moves a whole model to another device.
//
// Conventions (llm.c style), for every op:
//  - All pointers are device pointers of the backend; all floats are f32 (the CUDA backend may keep
//    weights and activations in bf16 behind the same signatures in a later issue), except the KV
//    cache pools, whose element type is the backend's kv_cache_dtype().
//  - Shapes: N tokens (all sequences packed end to end, no padding), C model width, Hq query heads,
//    Hkv key/value heads (Hq % Hkv == 0, query head h reads kv head h / (Hq / Hkv)), D head width,
//    I MLP width, V vocabulary, S sequences. cu_seqlens[S + 1] holds sequence starts: sequence s is
//    tokens [cu_seqlens[s], cu_seqlens[s + 1]); cu_seqlens[0] = 0, cu_seqlens[S] = N.
//  - Backward ops ACCUMULATE (+=) into parameter gradients (dw, db, dwte) and into activation
//    gradients marked "+=" below; they OVERWRITE activation gradients marked "=". Residual streams
//    are the reason for "+=": a stream's gradient arrives from two places.
//  - Ops do not allocate per call except where noted (the lm-head's vocabulary-chunk workspace).
//  - Thread-safety: a backend may run each op on many threads internally; ops must not be called on
//    one backend from several threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "engine/tensor.h"

namespace aha::engine {

// Llama-3 style rope scaling, or none. Inverse frequencies for head width D are computed once by
// RopeInverseFrequencies() and passed to the rope ops.
struct RopeSpec {
  double theta = 10000.0;
  bool llama3 = false;  // "rope_type": "llama3"
  double factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  double original_max_positions = 8192;
};
// inv_freq[D / 2], exactly as transformers' _compute_default/_compute_llama3_parameters compute them.
std::vector<float> RopeInverseFrequencies(const RopeSpec& spec, int head_dim);

// One layer of a paged KV cache as the cache ops see it (see Backend::KvCacheWrite).
struct PagedKv {
  void* k = nullptr;  // [num_blocks, block_size, Hkv, D] of dtype
  void* v = nullptr;
  DType dtype = DType::kF32;
  int num_blocks = 0, block_size = 0;
  const int32_t* block_table = nullptr;  // [B, max_blocks], device memory
  int max_blocks = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;

  // ---- memory -------------------------------------------------------------------------------------
  // Pointers given to the ops below live in device() memory. Copy moves bytes within it; Upload and
  // Download move them from and to host memory. All three are ordered with the ops; Download returns
  // once the bytes are on the host. On the CPU they are memcpy.
  virtual void Copy(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
  // dst's bytes set to zero, ordered with the ops.
  virtual void Zero(void* dst, size_t bytes) { std::memset(dst, 0, bytes); }
  virtual void Upload(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
  virtual void Download(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
  // A download that does not wait: enqueues the copy (ordered with the ops) and returns a ticket;
  // AwaitDownload(ticket) waits for that copy and leaves the bytes at dst, which must stay valid
  // until then. At most kAsyncDownloads tickets may be outstanding. So the host can queue more work
  // (the next decode step) before it reads the results of the last. On the CPU: Download at once.
  static constexpr int kAsyncDownloads = 4;
  virtual uint64_t DownloadAsync(void* dst, const void* src, size_t bytes) {
    Download(dst, src, bytes);
    return 0;
  }
  virtual void AwaitDownload(uint64_t ticket) { (void)ticket; }
  // dst[i] = src[index[i]] for i < n: int32 arrays in device() memory (a decode step's input tokens
  // picked from the previous step's draws while some of its rows have stopped).
  virtual void GatherInt32(int32_t* dst, const int32_t* src, const int32_t* index, int n) {
    for (int i = 0; i < n; ++i) dst[i] = src[index[i]];
  }
  // Waits until every op enqueued so far has finished (ops may run asynchronously on a device).
  virtual void Synchronize() {}
  // Drops what a per-op profile (AHA_PROFILE=1 on the CUDA backend) has summed so far, so that a
  // benchmark's report leaves out its warm-up (where products are tuned and buffers allocated).
  virtual void ResetProfile() {}
  // A model's flat weight buffer. A backend may keep a converted copy of registered weights for its
  // products (the CUDA backend keeps bf16); WeightsChanged() must follow every change of the f32
  // values (load, optimizer step, weight swap), and UnregisterWeights() the buffer's release. The
  // CUDA backend's AdamW writes the copy of what it updates itself, so the WeightsChanged() after an
  // optimizer step costs no cast: call it after the step's AdamW calls, before any other change.
  virtual void RegisterWeights(const float* /*base*/, size_t /*n*/) {}
  virtual void UnregisterWeights(const float* /*base*/) {}
  virtual void WeightsChanged(const float* /*base*/) {}
  // An activation buffer [base, base + n) that a backend may store in bf16 only (the CUDA backend
  // does with bf16 products): its writer rounds to bf16 and writes only that copy, its readers read
  // it, and its f32 values are never written. Only these ops may touch it: LinearForward (x; or out
  // without bias), LinearBackward (x; or dx without accumulate_dx), RmsNormForward and
  // AddRmsNormForward (out / ln), SwiGluForward (h, gu), SwiGluBackward and SwiGluLinearBackward
  // (gu, dh), AttentionForward, QkvRopeAttention and QkvNormRopeAttention (out; and q, which QkvRope
  // may also write), AttentionBackward (out, dout, q), RopePackQkv and NormRopePackQkv (dqkv). The
  // Transformer keeps the norms' outputs, gu, h, dh, the attention output and its gradient, q, and
  // the packed q/k/v gradient of models without a q/k/v bias or per-head norms. Rounding
  // gu and dh changes the numbers (by bf16's ~2e-3 relative step, as bf16 autocast does in
  // PyTorch), and so does the attention backward's delta = dout . out from the rounded out and dout
  // (FlashAttention's, whose output and its gradient are bf16); the other kept tensors are read only
  // by products, which round them anyway. Release it before freeing the buffer.
  virtual void KeepAsBf16(const float* /*base*/, size_t /*n*/) {}
  // Whether KeepAsBf16 keeps (so a kept buffer's f32 values are never touched and need no memory:
  // Tensor::Reserved).
  virtual bool KeepsBf16() const { return false; }
  virtual void ReleaseBf16(const float* /*base*/) {}

  // ---- graphs -------------------------------------------------------------------------------------
  // Records the ops enqueued between BeginCapture() and EndCapture() as one replayable graph (CUDA
  // graphs: one launch replaces hundreds). Buffers and sizes are baked in: replay only with the same
  // buffers, new contents. graph_epoch() changes whenever the backend reallocates an internal buffer
  // (workspace, cast scratch) that a graph may hold, so callers re-capture then. A backend without
  // graphs returns false from BeginCapture() and the caller runs the ops directly.
  virtual bool BeginCapture() { return false; }
  virtual void* EndCapture() { return nullptr; }  // null when capture failed (run the ops directly)
  virtual void Replay(void* /*graph*/) {}
  virtual void DestroyGraph(void* /*graph*/) {}
  virtual uint64_t graph_epoch() const { return 0; }

  // ---- elementwise and layers -------------------------------------------------------------------
  // out[N, C] = wte[ids[n], :]
  virtual void EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C) = 0;
  // dwte[ids[n], :] += dout[n, :]
  virtual void EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C) = 0;

  // out[N, C] = x * rstd * w with rstd[n] = 1 / sqrt(mean(x[n]^2) + eps); rstd is saved for backward.
  // Used for the model's norms (C = width) and for Qwen3's per-head q/k norms (N = tokens * heads,
  // C = head width).
  virtual void RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C,
                              float eps) = 0;
  // The residual add and the norm after it, as one op: x[N, C] += y (in place, the residual stream
  // the backward reads), then exactly RmsNormForward(ln, rstd, x, w, N, C, eps) on the sum. y may
  // equal x; ln must not overlap either. The backward is RmsNormBackward's (the add's gradient is
  // the identity the caller already routes).
  virtual void AddRmsNormForward(float* x, float* ln, float* rstd, const float* y, const float* w, int N, int C,
                                 float eps) = 0;
  // dx[N, C] += d/dx, dw[C] += d/dw.
  virtual void RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                               const float* rstd, int N, int C) = 0;

  // In place on x[N, H, D]: rotate pairs (i, i + D/2) of every head by angle positions[n] * inv_freq[i]
  // (transformers' rotate_half convention). Backward is the inverse rotation, also in place on dx.
  virtual void RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H,
                           int D) = 0;
  virtual void RopeBackward(float* dx, const int32_t* positions, const float* inv_freq, int N, int H,
                            int D) = 0;

  // out[N, OC] = x[N, C] @ w[OC, C]^T (+ b[OC] when b is not null). w in HF (out, in) layout.
  virtual void LinearForward(float* out, const float* x, const float* w, const float* b, int N, int C,
                             int OC) = 0;
  // A residual branch's output projection and the norm after it, as one op: y = a[N, K] @ w[C, K]^T,
  // then AddRmsNormForward(x, ln, rstd, y, norm_w, N, C, eps). tmp[N, C] is scratch (this default
  // puts y there). The CUDA backend's decode step splits K (one batched product of S parts, which
  // the norm adds: Gemm::NTSplitK).
  virtual void LinearAddRmsNorm(float* x, float* ln, float* rstd, float* tmp, const float* a, const float* w,
                                const float* norm_w, int N, int K, int C, float eps) {
    LinearForward(tmp, a, w, nullptr, N, K, C);
    AddRmsNormForward(x, ln, rstd, tmp, norm_w, N, C, eps);
  }
  // dx[N, C] (= or += per accumulate_dx) dout @ w; dw += dout^T @ x; db += column sums of dout
  // (db may be null). dx may be null when the input needs no gradient.
  virtual void LinearBackward(float* dx, float* dw, float* db, const float* dout, const float* x,
                              const float* w, int N, int C, int OC, bool accumulate_dx) = 0;

  // The fused q/k/v product (one LinearForward over the adjacent q_proj, k_proj, v_proj weights)
  // qkv[N, QD + 2 KD], each row q | k | v, split into q[N, QD], k[N, KD], v[N, KD], adding
  // bias[QD + 2 KD] (the three biases end to end) when bias is not null. Overwrites q, k, v.
  virtual void SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD,
                        int KD) = 0;
  // Its backward: dqkv[N, QD + 2 KD] = dq | dk | dv per row (overwritten). The bias gradient is
  // dqkv's column sums, which LinearBackward's db gives.
  virtual void PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD,
                       int KD) = 0;

  // The training forward's q/k/v step in one op: SplitQkv(q, k, v, qkv, bias, N, Hq D, Hkv D), then
  // RopeForward of q and of k at `positions` (the cached forward has QkvRopeKvWrite). Its backward,
  // RopePackQkv: RopeBackward of dq and of dk, then PackQkv(dqkv, dq, dk, dv); dq and dk are scratch
  // afterwards (this default rotates them in place, the CUDA backend leaves them as they were).
  // These defaults run the ops they stand for; the CUDA backend runs one kernel each.
  virtual void QkvRope(float* q, float* k, float* v, const float* qkv, const float* bias, const int32_t* positions,
                       const float* inv_freq, int N, int Hq, int Hkv, int D) {
    SplitQkv(q, k, v, qkv, bias, N, Hq * D, Hkv * D);
    RopeForward(q, positions, inv_freq, N, Hq, D);
    RopeForward(k, positions, inv_freq, N, Hkv, D);
  }
  // QkvRope, then AttentionForward(out, lse, q, k, v, ...) on its result: q, k, v are written as
  // QkvRope writes them (the backward reads them). The CUDA backend's tensor-core attention reads
  // k and v from bf16 copies the q/k/v kernel writes beside them (half the bytes per key tile, no
  // conversion in the attention kernel). This default runs the two ops. forward_only: no backward
  // follows and only out and lse are read afterwards (the frozen reference model's forward), so q, k
  // and v are scratch, which a backend may leave unwritten (the CUDA one writes only the bf16
  // operands its attention reads).
  virtual void QkvRopeAttention(float* out, float* lse, float* q, float* k, float* v, const float* qkv,
                                const float* bias, const int32_t* positions, const float* inv_freq,
                                const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D,
                                bool forward_only = false) {
    (void)forward_only;
    QkvRope(q, k, v, qkv, bias, positions, inv_freq, N, Hq, Hkv, D);
    AttentionForward(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D);
  }
  virtual void RopePackQkv(float* dqkv, float* dq, float* dk, const float* dv, const int32_t* positions,
                           const float* inv_freq, int N, int Hq, int Hkv, int D) {
    RopeBackward(dq, positions, inv_freq, N, Hq, D);
    RopeBackward(dk, positions, inv_freq, N, Hkv, D);
    PackQkv(dqkv, dq, dk, dv, N, Hq * D, Hkv * D);
  }

  // The same step with Qwen3's per-head RMSNorms between the split and the rotation:
  // SplitQkv(q_pre, k_pre, v, qkv, bias, ...), RmsNormForward(q, q_rstd, q_pre, q_norm, N Hq, D, eps)
  // and likewise k from k_pre (k_rstd[N Hkv]), RopeForward of q and of k, then AttentionForward(out,
  // lse, q, k, v, ...). q_pre, k_pre, the rstds, q, k and v are what the backward reads. Its
  // backward, NormRopePackQkv: RopeBackward of dq and of dk, dq_pre = dk_pre = 0, RmsNormBackward of
  // each (dq_pre, dq_norm += from dq, q_pre, q_norm, q_rstd; likewise k), then PackQkv(dqkv, dq_pre,
  // dk_pre, dv); dq, dk, dq_pre and dk_pre are scratch afterwards. These defaults run the ops; the
  // CUDA backend runs one q/k/v kernel each way (the attention stays its own kernel). forward_only
  // as in QkvRopeAttention: q_pre, k_pre, the rstds, q, k and v are scratch then.
  virtual void QkvNormRopeAttention(float* out, float* lse, float* q_pre, float* k_pre, float* q, float* k, float* v,
                                    float* q_rstd, float* k_rstd, const float* qkv, const float* bias,
                                    const float* q_norm, const float* k_norm, float eps, const int32_t* positions,
                                    const float* inv_freq, const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv,
                                    int D, bool forward_only = false) {
    (void)forward_only;
    SplitNormRopeOps(q_pre, k_pre, q, k, v, q_rstd, k_rstd, qkv, bias, q_norm, k_norm, eps, positions, inv_freq, N,
                     Hq, Hkv, D);
    AttentionForward(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D);
  }
  virtual void NormRopePackQkv(float* dqkv, float* dq_norm, float* dk_norm, float* dq_pre, float* dk_pre, float* dq,
                               float* dk, const float* dv, const float* q_pre, const float* k_pre, const float* q_norm,
                               const float* k_norm, const float* q_rstd, const float* k_rstd,
                               const int32_t* positions, const float* inv_freq, int N, int Hq, int Hkv, int D) {
    RopeBackward(dq, positions, inv_freq, N, Hq, D);
    RopeBackward(dk, positions, inv_freq, N, Hkv, D);
    Zero(dq_pre, static_cast<size_t>(N) * Hq * D * sizeof(float));
    Zero(dk_pre, static_cast<size_t>(N) * Hkv * D * sizeof(float));
    RmsNormBackward(dq_pre, dq_norm, dq, q_pre, q_norm, q_rstd, N * Hq, D);
    RmsNormBackward(dk_pre, dk_norm, dk, k_pre, k_norm, k_rstd, N * Hkv, D);
    PackQkv(dqkv, dq_pre, dk_pre, dv, N, Hq * D, Hkv * D);
  }

  // gu[N, 2I] is the fused gate/up product (one LinearForward over the adjacent gate_proj and
  // up_proj weights): gate = gu[:, :I], up = gu[:, I:]. h[N, I] = silu(gate) * up,
  // silu(x) = x * sigmoid(x). h must not overlap gu. Backward overwrites dgu[N, 2I].
  virtual void SwiGluForward(float* h, const float* gu, int N, int I) = 0;
  virtual void SwiGluBackward(float* dgu, const float* dh, const float* gu, int N, int I) = 0;

  // The MLP's forward up to the down product in one op: LinearForward(gu, x, w, nullptr, N, C, 2I)
  // with w = [Wg; Wu] (2I x C), then SwiGluForward(h, gu, N, I). gu[N, 2I] is scratch whose
  // contents afterwards are unspecified: the CUDA backend's decode step computes h in the product's
  // epilogue and never writes gu. This default runs the two ops.
  virtual void GateUpSwiGlu(float* h, float* gu, const float* x, const float* w, int N, int C, int I) {
    LinearForward(gu, x, w, nullptr, N, C, 2 * I);
    SwiGluForward(h, gu, N, I);
  }

  // The MLP's gate/up backward from dh in one op: SwiGluBackward(dgu, dh, gu, N, I), then
  // LinearBackward(dx, dw, nullptr, dgu, x, w, N, C, 2I, false). dgu[N, 2I] is scratch: the CUDA
  // backend with bf16 products writes only its bf16 copy, which both products read, and leaves the
  // f32 buffer unwritten. This default runs the two ops.
  virtual void SwiGluLinearBackward(float* dx, float* dw, float* dgu, const float* dh, const float* gu, const float* x,
                                    const float* w, int N, int C, int I) {
    SwiGluBackward(dgu, dh, gu, N, I);
    LinearBackward(dx, dw, nullptr, dgu, x, w, N, C, 2 * I, false);
  }

  // out[n] = a[n] + b[n]; out may alias a or b.
  virtual void Add(float* out, const float* a, const float* b, size_t n) = 0;

  // ---- attention ---------------------------------------------------------------------------------
  // Causal GQA over packed variable-length sequences: token i of sequence s attends to tokens
  // cu_seqlens[s]..i of the same sequence. q[N, Hq, D], k/v[N, Hkv, D], out[N, Hq, D]; scale is
  // 1/sqrt(D). lse[N, Hq] saves each row's log-sum-exp of scaled scores for the backward pass, which
  // recomputes the probabilities from it (flash-attention style, no [T, T] matrix is kept).
  virtual void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                                const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) = 0;
  // Overwrites dq[N, Hq, D], dk and dv[N, Hkv, D].
  virtual void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                                 const float* lse, const float* q, const float* k, const float* v,
                                 const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) = 0;

  // Paged KV cache for generation (vLLM style; Transformer's KvCache holds the pools, Generator's
  // block allocator hands out blocks). One layer is a PagedKv: pools k/v[num_blocks, block_size, Hkv,
  // D] of element type `dtype` (kv_cache_dtype() when allocated: f32, or bf16 on the CUDA backend
  // with bf16 products), and a block table [B, max_blocks] in device() memory: position p of batch
  // row b lives in block block_table[b * max_blocks + p / block_size], row p % block_size. A row's
  // blocks need not be contiguous or ordered; entries past its length are never read. A position
  // past max_blocks * block_size or a block outside [0, num_blocks) is a caller bug: the CPU backend
  // aborts; a device backend skips such writes and reads zeros.
  virtual DType kv_cache_dtype() const { return DType::kF32; }
  // Writes k/v[Nq, Hkv, D] (f32) of packed new tokens (sequence b: rows cu_q[b]..cu_q[b+1], at
  // positions start[b]...) into the pools, rounding to the pool's dtype. Nq = cu_q[B], the number of
  // new rows, is passed too so that a device backend can size its launch without reading cu_q back.
  virtual void KvCacheWrite(const PagedKv& cache, const float* k, const float* v, const int32_t* cu_q,
                            const int32_t* start, int B, int Nq, int Hkv, int D) = 0;
  // Attention of packed new queries against the cache (prefill when start = 0 and many rows, chunked
  // prefill when start > 0, decode when one row per sequence): query row i of sequence b sits at
  // position start[b] + (i - cu_q[b]) and attends to cache positions 0..that position. q/out[Nq, Hq, D]
  // in f32; products and softmax accumulate in f32 whatever the pool's dtype.
  virtual void CachedAttentionForward(float* out, const float* q, const PagedKv& cache, const int32_t* cu_q,
                                      const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) = 0;
  // A cached layer's q/k/v step and attention in one op: QkvRopeKvWrite(q, k, v, qkv, ...) then
  // CachedAttentionForward(out, q, cache, ...). q, k and v are scratch that a backend may leave
  // unwritten (the CUDA backend's decode step does both in its tensor-core decode kernel: each block
  // rotates its query heads and writes its row's new key and value itself). This default runs the
  // two ops.
  virtual void QkvRopeCachedAttention(float* out, float* q, float* k, float* v, const float* qkv, const float* bias,
                                      const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                                      const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv,
                                      int D) {
    QkvRopeKvWrite(q, k, v, qkv, bias, positions, inv_freq, cache, cu_q, start, B, Nq, Hq, Hkv, D);
    CachedAttentionForward(out, q, cache, cu_q, start, B, Nq, Hq, Hkv, D);
  }
  // The same with Qwen3's per-head RMSNorms (weights q_norm, k_norm [D]; eps) between the split and
  // the rotation: SplitQkv, RmsNormForward of q's Nq Hq heads and of k's Nq Hkv heads (in place),
  // RopeForward of both, KvCacheWrite, CachedAttentionForward. q, k, v and rstd ([Nq Hq]) are scratch
  // that a backend may leave unwritten (the CUDA decode step does it all in its tensor-core decode
  // kernel, as QkvRopeCachedAttention). This default runs those ops.
  virtual void QkvNormRopeCachedAttention(float* out, float* q, float* k, float* v, float* rstd, const float* qkv,
                                          const float* bias, const float* q_norm, const float* k_norm, float eps,
                                          const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                                          const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv,
                                          int D) {
    SplitNormRopeOps(q, k, q, k, v, rstd, rstd, qkv, bias, q_norm, k_norm, eps, positions, inv_freq, Nq, Hq, Hkv, D);
    KvCacheWrite(cache, k, v, cu_q, start, B, Nq, Hkv, D);
    CachedAttentionForward(out, q, cache, cu_q, start, B, Nq, Hq, Hkv, D);
  }
  // The q/k/v step of a cached forward in one op: SplitQkv(q, k, v, qkv, bias, Nq, Hq D, Hkv D), then
  // RopeForward of q and of k at `positions`, then KvCacheWrite(cache, k, v, cu_q, start, B, Nq, Hkv,
  // D). q[Nq, Hq, D] ends rotated, ready for CachedAttentionForward; k and v[Nq, Hkv, D] are scratch
  // that a backend may leave unwritten (the CUDA backend does it in one kernel that writes only q and
  // the pools). This default runs the four ops.
  virtual void QkvRopeKvWrite(float* q, float* k, float* v, const float* qkv, const float* bias,
                              const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                              const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) {
    SplitQkv(q, k, v, qkv, bias, Nq, Hq * D, Hkv * D);
    RopeForward(q, positions, inv_freq, Nq, Hq, D);
    RopeForward(k, positions, inv_freq, Nq, Hkv, D);
    KvCacheWrite(cache, k, v, cu_q, start, B, Nq, Hkv, D);
  }

  // ---- fused lm-head ------------------------------------------------------------------------------
  // For each row n with targets[n] >= 0: z = (h[n] @ w^T) / temperature over the vocabulary,
  // logprob[n] = z[target] - logsumexp(z), entropy[n] = -sum_v p_v log p_v; rows with target < 0
  // get 0. The logits are computed in vocabulary chunks with an online log-sum-exp; no [N, V] tensor
  // is ever allocated. lse[N] is saved for the backward pass. h[N, C], w[V, C].
  virtual void LmHeadForward(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                             const int32_t* targets, int N, int C, int V, float temperature) = 0;
  // Given dlogprob[N] and dentropy[N] (either may be null = zero): overwrites dh[N, C] and
  // accumulates dw[V, C] +=. Recomputes each chunk's logits; needs the forward's lse and entropy.
  virtual void LmHeadBackward(float* dh, float* dw, const float* dlogprob, const float* dentropy,
                              const float* h, const float* w, const int32_t* targets,
                              const float* lse, const float* entropy, int N, int C, int V,
                              float temperature) = 0;

  // The same two ops with the logits kept in between: LmHeadForwardKeep also leaves each chunk's
  // logits z (h w^T / temperature, f32) in logits[N * V], and LmHeadBackwardKept reads them there
  // instead of recomputing them (one N x V x C product fewer), consuming the buffer (it may write
  // into it). Valid only for the backward of that forward: same h, w, targets, N, V and
  // temperature, nothing written in between. KeepsLogits() says whether a backend uses the buffer
  // (the CUDA backend does); these defaults ignore it and run the plain ops.
  virtual bool KeepsLogits() const { return false; }
  virtual void LmHeadForwardKeep(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                                 const int32_t* targets, int N, int C, int V, float temperature, float* /*logits*/) {
    LmHeadForward(logprob, entropy, lse, h, w, targets, N, C, V, temperature);
  }
  virtual void LmHeadBackwardKept(float* dh, float* dw, const float* dlogprob, const float* dentropy, const float* h,
                                  const float* w, const int32_t* targets, const float* lse, const float* entropy,
                                  int N, int C, int V, float temperature, float* /*logits*/) {
    LmHeadBackward(dh, dw, dlogprob, dentropy, h, w, targets, lse, entropy, N, C, V, temperature);
  }

  // ---- optimizer ----------------------------------------------------------------------------------
  // sum of squares of x[n], accumulated in f64.
  virtual double SumSquares(const float* x, size_t n) = 0;
  virtual void Scale(float* x, float s, size_t n) = 0;
  // torch.optim.AdamW (decoupled weight decay) with bias correction at 1-based step t.
  virtual void AdamW(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int64_t t) = 0;

  // ---- sampling -----------------------------------------------------------------------------------
  // One token per row of logits[B, V] (unscaled), with engine/sampler.h's semantics and behaviour
  // log-prob convention; row b uses temperature[b], top_k[b], top_p[b] and a random stream keyed by
  // (seeds[b], counters[b]) alone, so a draw does not depend on the rest of the batch. Every pointer
  // is in device() memory. This default runs on the host (CPU backend): SampleToken with an Rng
  // seeded from the pair. The CUDA backend draws on the GPU with its own counter-based generator
  // (same distribution, different stream).
  virtual void SampleRows(int32_t* tokens, float* logprobs, const float* logits, int B, int V,
                          const float* temperature, const int32_t* top_k, const float* top_p,
                          const uint64_t* seeds, const uint64_t* counters);
  // The lm-head product and the draw of a decode step in one op: SampleRows over the logits
  // x[B, C] w[V, C]^T. logits[B, V] is scratch: this default writes every row there (LinearForward)
  // and draws from it; a device may compute the product and the draw together and write only the rows
  // that filter (top-k or top-p), with the same distribution and log-prob but other draws.
  virtual void LmHeadSample(int32_t* tokens, float* logprobs, float* logits, const float* x, const float* w, int B,
                            int C, int V, const float* temperature, const int32_t* top_k, const float* top_p,
                            const uint64_t* seeds, const uint64_t* counters) {
    LinearForward(logits, x, w, nullptr, B, C, V);
    SampleRows(tokens, logprobs, logits, B, V, temperature, top_k, top_p, seeds, counters);
  }

 protected:
  // Qwen3's q/k/v step as ops, what QkvNormRopeAttention and QkvNormRopeCachedAttention stand for:
  // SplitQkv into q_pre, k_pre, v, then RmsNormForward of each head of q_pre into q and of k_pre into
  // k, then RopeForward of q and k. q_pre and k_pre may be q and k (normed in place), and k_rstd may
  // be q_rstd when no one reads the rstds.
  void SplitNormRopeOps(float* q_pre, float* k_pre, float* q, float* k, float* v, float* q_rstd, float* k_rstd,
                        const float* qkv, const float* bias, const float* q_norm, const float* k_norm, float eps,
                        const int32_t* positions, const float* inv_freq, int N, int Hq, int Hkv, int D) {
    SplitQkv(q_pre, k_pre, v, qkv, bias, N, Hq * D, Hkv * D);
    RmsNormForward(q, q_rstd, q_pre, q_norm, N * Hq, D, eps);
    RmsNormForward(k, k_rstd, k_pre, k_norm, N * Hkv, D, eps);
    RopeForward(q, positions, inv_freq, N, Hq, D);
    RopeForward(k, positions, inv_freq, N, Hkv, D);
  }
};

}  // namespace aha::engine
