// Launchers of the CUDA kernels behind CudaBackend (cuda_backend.h). Every pointer is a device
// pointer; shapes, layouts and accumulate/overwrite rules are exactly those of the same-named op in
// engine/backend.h, and engine/cpu_backend.cc is the reference each kernel is checked against
// (tests/engine/cuda_conformance_test.cc). Launchers enqueue on `stream` and return: no host
// synchronisation, no allocation (scratch comes in through `workspace` arguments), no host reads of
// device data, so that the decode step can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "engine/cuda/gemm.h"

namespace aha::engine::cuda {

// ---- elementwise and layers (elementwise.cu) ------------------------------------------------------
void EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C, cudaStream_t s);
void GatherInt32(int32_t* dst, const int32_t* src, const int32_t* index, int n, cudaStream_t s);  // dst[i] = src[index[i]]
void EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C, cudaStream_t s);
// out_bf16 / ln_bf16 / h_bf16 (and dqkv_bf16 / dgu_bf16 below), when not null, receive the f32 output rounded to bf16 (nearest even,
// as CastF32ToBF16) in the same pass: the next product's operand (Gemm::AdoptCast). out / ln may
// be null when only the bf16 copy is wanted.
void RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C, float eps,
                    uint16_t* out_bf16, cudaStream_t s);
// x[N, C] += y (in place), then ln = RMSNorm(x) * w and rstd as RmsNormForward. ln must not overlap x or y.
void AddRmsNormForward(float* x, float* ln, float* rstd, const float* y, const float* w, int N, int C, float eps,
                       uint16_t* ln_bf16, cudaStream_t s);
// The same with y[parts][N, C], partial sums of the addend (Gemm::NTSplitK) added in order j = 0,
// 1, ... and then to x.
void AddPartsRmsNormForward(float* x, float* ln, float* rstd, const float* y, int parts, const float* w, int N, int C,
                            float eps, uint16_t* ln_bf16, cudaStream_t s);
// dx_bf16, when not null, may receive the final dx rounded to bf16 (the next product's dout): the
// one-pass kernel (C % 4 == 0, 128 <= C <= 1024, aligned) writes it and returns true; otherwise
// (two kernels) it is not written and the result is false.
bool RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                     const float* rstd, int N, int C, uint16_t* dx_bf16, cudaStream_t s);
void RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H, int D, bool inverse,
                 cudaStream_t s);
void AddBias(float* out, const float* b, int N, int OC, cudaStream_t s);
// db += column sums of dout, read from dout_bf16 instead when not null (a gradient kept in bf16 only).
void BiasBackward(float* db, const float* dout, const uint16_t* dout_bf16, int N, int OC, cudaStream_t s);
void SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD, int KD,
              cudaStream_t s);
void PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD, int KD,
             uint16_t* dqkv_bf16, cudaStream_t s);
// h may be null when only h_bf16 is wanted (and the reverse); likewise dgu and dgu_bf16. An input
// given in bf16 (gu_bf16, dh_bf16 not null: a tensor kept in bf16 only) is read from there instead.
void SwiGluForward(float* h, const float* gu, const uint16_t* gu_bf16, int N, int I, uint16_t* h_bf16,
                   cudaStream_t s);
// h16[M, I] = bf16(silu(g) * u) with g, u the bf16-rounded columns j and I + j of a16[M, K] @
// w16[2I, K]^T, in one kernel (mlp.cu; wgmma, so sm_90 only): the kept-bf16 gate/up product and
// SwiGluForward without gu. Supported: a compute capability 9 device, K % 64 == 0, I % 8 == 0.
// It is launched dependent (PDL) and copies w before the kernel enqueued just before it has
// finished (a norm, in a decode step, that lets it start early): that kernel must not write w.
// The block tile (rows x columns of h) is MlpTileFor's unless one of GateUpSwiGluTiles() is given
// (or AHA_MLP_TILE=RxC names one).
struct MlpTile {
  int rows = 0, cols = 0;
};
bool GateUpSwiGluSupported(int M, int K, int I);
void GateUpSwiGlu(uint16_t* h16, const uint16_t* a16, const uint16_t* w16, int M, int K, int I, cudaStream_t s,
                  MlpTile tile = {});
std::vector<MlpTile> GateUpSwiGluTiles();
// The tile for M x I on a device of that many multiprocessors: the fewest waves of blocks times a
// block's work, then the fewest bytes read (mlp.cu).
MlpTile MlpTileFor(int M, int I, int multiprocessors);
void SwiGluBackward(float* dgu, const float* dh, const uint16_t* dh_bf16, const float* gu, const uint16_t* gu_bf16,
                    int N, int I, uint16_t* dgu_bf16, cudaStream_t s);
void Add(float* out, const float* a, const float* b, size_t n, cudaStream_t s);
void Scale(float* x, float a, size_t n, cudaStream_t s);
// out[n] (f64, device) = sum of squares of x; workspace holds at least SumSquaresWorkspace() bytes.
void SumSquares(double* out, const float* x, size_t n, void* workspace, cudaStream_t s);
size_t SumSquaresWorkspace();
// param_bf16, when not null, receives the updated param rounded to bf16 (nearest even) too.
void AdamW(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
           float eps, float weight_decay, int64_t t, uint16_t* param_bf16, cudaStream_t s);
void CastF32ToBF16(uint16_t* out, const float* in, size_t n, cudaStream_t s);
void CastBF16ToF32(float* out, const uint16_t* in, size_t n, cudaStream_t s);
// An actor swapping in published bf16 weights: params[i] = staged[i] widened to f32 and, when
// shadow is not null, shadow[i] = staged[i] (the GEMMs' bf16 copy, so no second cast is needed).
void SwapInBf16(float* params, uint16_t* shadow, const uint16_t* staged, size_t n, cudaStream_t s);
// out[r, :] = x[rows[r], :] for r < R.
void GatherRows(float* out, const float* x, const int32_t* rows, int R, int C, cudaStream_t s);

// ---- attention (attention.cu) ---------------------------------------------------------------------
// Causal GQA over packed variable-length sequences; see Backend::AttentionForward. Flash-attention
// style: tiled, online softmax, no [T, T] score matrix in global memory. cu_seqlens is a device array
// of S + 1 entries.
void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                      const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s);
// Overwrites dq, dk, dv. workspace: at least AttentionBackwardWorkspace(N, Hq) bytes.
void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                       const float* q, const float* k, const float* v, const int32_t* cu_seqlens, int S, int N,
                       int Hq, int Hkv, int D, void* workspace, cudaStream_t s);
size_t AttentionBackwardWorkspace(int N, int Hq);
// One layer of a paged KV cache: Backend's PagedKv (backend.h) with the element type as a flag
// (bf16: the pools hold bf16 bits; else f32).
struct KvPages {
  void* k = nullptr;
  void* v = nullptr;
  bool bf16 = false;
  int num_blocks = 0, block_size = 0;
  const int32_t* block_table = nullptr;  // [B, max_blocks], device
  int max_blocks = 0;
};
// See Backend::KvCacheWrite / CachedAttentionForward. cu_q[B + 1], start[B] and the block table are
// device arrays; the grid depends only on (B, Nq, heads) so the launch can be graph-captured and
// replayed with new array contents. Nq = cu_q[B] is passed from the host.
void KvCacheWrite(const KvPages& kv, const float* k, const float* v, const int32_t* cu_q, const int32_t* start, int B,
                  int Nq, int Hkv, int D, cudaStream_t s);
// Backend::QkvRopeKvWrite in one launch (one block per new row): q = rotated q part of qkv + bias,
// and the k (rotated) and v parts + bias written straight into the pools. The rotation is
// RopeForward's arithmetic and the rounding KvCacheWrite's, so the result is the four ops' bit for
// bit. D even.
void QkvRopeKvWrite(float* q, const float* qkv, const float* bias, const int32_t* positions, const float* inv_freq,
                    const KvPages& kv, const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv, int D,
                    cudaStream_t s);
// Backend::QkvRope and RopePackQkv, one launch each (one block per row), with RopeForward's
// arithmetic, so bit for bit the unfused ops. dqkv_bf16, when not null, gets dqkv rounded to bf16
// (Gemm::AdoptCast); k_bf16 / v_bf16, when not null, get k and v rounded to bf16 too (the training
// attention's operands: AttentionForwardTCBf16Kv). D even.
// q_bf16 gets q rounded to bf16 and q_bf16_scaled q times AttentionQScale(D) rounded (the training
// forward's operand, the same bits as its own rounding) when not null; q may then be null.
// norm, when not null: Qwen3's per-head norms between the split and the rotation
// (Backend::QkvNormRopeAttention's q/k/v step; QkvNormSupported(D)), RmsNormForward's arithmetic, so
// the ops' bits: the split rows (bias added) go to q_pre[N, Hq D] and k_pre[N, Hkv D], each head's
// rstd to q_rstd[N Hq] and k_rstd[N Hkv], and q and k are normed by q_norm / k_norm[D] before RoPE.
// A forward that no backward follows passes q_pre, k_pre and the rstds null (all four), and k and v
// null when k_bf16 and v_bf16 are given: none of them is written then.
struct QkvNorm {
  float* q_pre = nullptr;
  float* k_pre = nullptr;
  float* q_rstd = nullptr;
  float* k_rstd = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  float eps = 0.0f;
};
inline bool QkvNormSupported(int D) { return D > 0 && D <= 128 && D % 4 == 0; }
void QkvRope(float* q, float* k, float* v, const float* qkv, const float* bias, const int32_t* positions,
             const float* inv_freq, int N, int Hq, int Hkv, int D, cudaStream_t s, uint16_t* k_bf16 = nullptr,
             uint16_t* v_bf16 = nullptr, uint16_t* q_bf16 = nullptr, uint16_t* q_bf16_scaled = nullptr,
             const QkvNorm* norm = nullptr);
// RopePackQkv: dqkv may be null when dqkv_bf16 is not (a gradient kept in bf16 only).
void RopePackQkv(float* dqkv, uint16_t* dqkv_bf16, const float* dq, const float* dk, const float* dv,
                 const int32_t* positions, const float* inv_freq, int N, int Hq, int Hkv, int D, cudaStream_t s);
// Backend::NormRopePackQkv in one launch (32 rows a block): the rotation back, the per-head norms'
// backward (dq_norm and dk_norm added to, by atomics; dx as RmsNormBackward computes it, summed in
// another order) and the pack into dqkv (f32 and/or its bf16 copy; either may be null), leaving dq and
// dk as they were. D 64 or 128 with 16-byte aligned rows (NormRopePackQkvSupported).
bool NormRopePackQkvSupported(int D, std::initializer_list<const void*> f32);
void NormRopePackQkv(float* dqkv, uint16_t* dqkv_bf16, float* dq_norm, float* dk_norm, const float* dq,
                     const float* dk, const float* dv, const float* q_pre, const float* k_pre, const float* q_norm,
                     const float* k_norm, const float* q_rstd, const float* k_rstd, const int32_t* positions,
                     const float* inv_freq, int N, int Hq, int Hkv, int D, cudaStream_t s);
// Dispatches: one row per sequence (Nq == B, the decode step) to CachedAttentionDecodeTC when
// CachedAttentionDecodeTcSupported (bf16 pool, Hq / Hkv <= 16, D in {64, 128}), else to
// CachedAttentionDecode; anything else to CachedAttentionRowwise. workspace: at least
// CachedAttentionWorkspace(...) bytes (0 for most shapes; null is then fine).
size_t CachedAttentionWorkspace(const KvPages& kv, int B, int Nq, int Hq, int Hkv, int D);
// out_bf16, when not null, may get out rounded to bf16 too (Gemm::AdoptCast): true when it did (the
// tensor-core decode kernel writes it; the others do not).
bool CachedAttentionForward(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                            int B, int Nq, int Hq, int Hkv, int D, void* workspace, cudaStream_t s,
                            uint16_t* out_bf16 = nullptr);
// The two kernels behind it (public for tests and timing). Rowwise: one block per new row, for prefill
// and chunks. Decode: one block per (row, kv head, split of the context) for all query heads of the
// group; correct for any layout, sized for one row per sequence; the split count, and so the launch
// shape and workspace (CachedAttentionDecodeWorkspace), depends only on (Nq, Hq, Hkv, D, dtype,
// max_blocks * block_size) and the device.
void CachedAttentionRowwise(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                            int B, int Nq, int Hq, int Hkv, int D, cudaStream_t s);
size_t CachedAttentionDecodeWorkspace(const KvPages& kv, int Nq, int Hq, int Hkv, int D);
void CachedAttentionDecode(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                           int B, int Nq, int Hq, int Hkv, int D, void* workspace, cudaStream_t s);
// Decode on the tensor cores: the contract, launch shape rule and split workspace of
// CachedAttentionDecode (CachedAttentionDecodeTcWorkspace), for bf16 pools with G = Hq / Hkv <= 16 and
// D in {64, 128} only (aborts otherwise). The G query heads of a kv head are the rows of one bf16
// mma.sync A tile: q is rounded to bf16 after scaling and P to bf16 before the PV product (as in
// AttentionForwardTC); accumulation and softmax statistics are f32.
bool CachedAttentionDecodeTcSupported(const KvPages& kv, int Hq, int Hkv, int D);
size_t CachedAttentionDecodeTcWorkspace(const KvPages& kv, int Nq, int Hq, int Hkv, int D);
void CachedAttentionDecodeTC(float* out, const float* q, const KvPages& kv, const int32_t* cu_q, const int32_t* start,
                             int B, int Nq, int Hq, int Hkv, int D, void* workspace, cudaStream_t s,
                             uint16_t* out_bf16 = nullptr);
// CachedAttentionDecodeTC with the q/k/v step of the layer in it (Backend::QkvRopeCachedAttention;
// Nq == B): reads the q/k/v product rows qkv[Nq, (Hq + 2 Hkv) D] (+ bias, may be null) instead of
// rotated queries, rotates each block's query heads at positions[i] as QkvRopeKvWrite does, and
// writes each row's new key (rotated) and value into the pool before reading it. Outputs and pool
// equal QkvRopeKvWrite + CachedAttentionDecodeTC bit for bit; same workspace. With q_norm and
// k_norm ([D] each; Qwen3) each query head and the new key are RMS-normalised (eps) before the
// rotation, bit for bit as SplitQkv, RmsNormForward of the q and k heads, RopeForward of both,
// KvCacheWrite and CachedAttentionDecodeTC.
void QkvRopeCachedAttentionDecodeTC(float* out, const float* qkv, const float* bias, const int32_t* positions,
                                    const float* inv_freq, const KvPages& kv, const int32_t* cu_q,
                                    const int32_t* start, int B, int Nq, int Hq, int Hkv, int D, void* workspace,
                                    cudaStream_t s, uint16_t* out_bf16 = nullptr, const float* q_norm = nullptr,
                                    const float* k_norm = nullptr, float eps = 0.0f);
// Tensor-core variants (attention_tc.cu): same signatures, semantics and workspace
// (AttentionBackwardWorkspace) as AttentionForward / AttentionBackward, with the products on bf16
// mma.sync (operands rounded to bf16, f32 accumulation and softmax statistics). D in {64, 128};
// any other D is passed to the f32 launchers above. The forward writes out rounded to bf16 into
// out_bf16 too when it is not null and returns whether it did (not for the f32 launchers). At D 64
// or 128, out may be null when out_bf16 is not: only the bf16 output is written.
bool AttentionForwardTC(float* out, float* lse, const float* q, const float* k, const float* v,
                        const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s,
                        uint16_t* out_bf16 = nullptr);
// The forward with k and v given in bf16 (k16, v16 [N, Hkv, D]): the kernel copies their tiles
// into shared memory as they are. D in {64, 128} only. Since AttentionForwardTC rounds f32 tiles to
// bf16 on the way in, the result equals AttentionForwardTC's on the f32 values bit for bit. When
// AttentionForwardWgmmaSupported(D) the call goes to AttentionForwardWgmma (the same roundings; on
// the H200 the same bits). q_scaled16 (wgmma only): q already scaled and rounded, as QkvRope's
// q_bf16_scaled; q is then not read.
void AttentionForwardTCBf16Kv(float* out, float* lse, const float* q, const uint16_t* k16, const uint16_t* v16,
                              const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s,
                              uint16_t* out_bf16 = nullptr, const uint16_t* q_scaled16 = nullptr);
// The same forward on warpgroup tensor-core instructions (attention_wgmma.cu, sm_90a; D = 64 or 128;
// out_bf16 as above). Supported when this build has sm_90a code, the device has compute capability 9
// and AHA_ATTENTION_WGMMA is not 0 (the A/B switch; 64: D = 128 stays on mma.sync).
bool AttentionForwardWgmmaSupported(int D);
// Test hook (attention_wgmma.cu): the wgmma forward's two products on fixed operands, tile j of
// k / v ([128][64] bf16) from shared-memory buffer j: s_out[j] = Q K_j^T, o_out[j] = P V_j.
void AttentionWgmmaProbe(float* s_out, float* o_out, const float* q, const uint16_t* k, const uint16_t* v,
                         const uint16_t* p, int late, cudaStream_t s);
// stages: how the K and V tiles are copied. 0: every thread with cp.async into two buffers; 2 .. 4:
// a warp of its own with the tensor memory accelerator into that many (the same result bit for bit;
// 0 whatever is asked when the driver has no tensor-map encoder); else the default: AHA_ATTENTION_FWD_STAGES when it says 0 .. 4, else 2 at D = 128, and at D = 64 2
// when the sequences average at least 8,192 rows, else 0.
void AttentionForwardWgmma(float* out, float* lse, const float* q, const uint16_t* k16, const uint16_t* v16,
                           const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s,
                           uint16_t* out_bf16 = nullptr, const uint16_t* q_scaled16 = nullptr, int stages = -1);
// The backward: workspace of at least AttentionBackwardTCWorkspace(N, Hq, D) bytes (AttentionBackward's
// and bf16 copies of q and dout). With AttentionBackwardWgmmaSupported(D) (and wgmma true) the call
// goes to AttentionBackwardWgmma: the same roundings, sums in another order.
void AttentionBackwardTC(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                         const float* q, const float* k, const float* v, const int32_t* cu_seqlens, int S, int N,
                         int Hq, int Hkv, int D, void* workspace, cudaStream_t s, bool wgmma = true);
size_t AttentionBackwardTCWorkspace(int N, int Hq, int D);
// The backward on wgmma (attention_wgmma.cu, sm_90a, D = 64 or 128): as AttentionBackwardTC
// (overwrites dq, dk, dv). Supported when the D = 64 forward is (the device and build have wgmma)
// and AHA_ATTENTION_WGMMA_BWD is not 0 (64: D = 64 only). With out16 (the forward's output in bf16,
// [N, Hq, D]) out is not read: delta = dout . out16 widened; with dout16 (dout in bf16) dout is not
// read: delta takes it widened, the products read it as it is; with q16 (q rounded to bf16,
// unscaled) q is not read. keys (D = 128): 1 runs the kernel in FlashAttention-3's layout (128 keys a
// block, a warpgroup's 64 keys each, a copying warpgroup), 0 the two warpgroups on halves of D, -1 as
// AHA_ATTENTION_BWD_KEYS says (unset: 1; 0: the halves). Both agree up to the order of their additions
// into dq, dk and dv.
bool AttentionBackwardWgmmaSupported(int D);
void AttentionBackwardWgmma(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                            const float* q, const float* k, const float* v, const int32_t* cu_seqlens, int S, int N,
                            int Hq, int Hkv, int D, void* workspace, cudaStream_t s, const uint16_t* out16 = nullptr,
                            const uint16_t* dout16 = nullptr, const uint16_t* q16 = nullptr, int keys = -1);

// ---- fused lm-head and sampling (lmhead.cu) -------------------------------------------------------
// See Backend::LmHeadForward / LmHeadBackward. Vocabulary chunks of up to LmHeadChunk() columns (each a
// multiple of 8 but a last one of under 8: lmhead.cu's ChunkAt); logits of
// a chunk come from gemm.NT into `workspace` (at least LmHeadWorkspace(N, V) bytes) and never exist
// for the whole vocabulary at once, unless `logits` is given (Backend::LmHeadForwardKeep): then the
// forward writes chunk c's logits at logits + N * v0 (chunk after chunk, N * V floats in all) and
// the backward reads them there instead of recomputing them.
int LmHeadChunk();
size_t LmHeadWorkspace(int N, int V);
void LmHeadForward(Gemm& gemm, float* logprob, float* entropy, float* lse, const float* h, const float* w,
                   const int32_t* targets, int N, int C, int V, float temperature, void* workspace,
                   cudaStream_t s, float* logits = nullptr);
void LmHeadBackward(Gemm& gemm, float* dh, float* dw, const float* dlogprob, const float* dentropy,
                    const float* h, const float* w, const int32_t* targets, const float* lse,
                    const float* entropy, int N, int C, int V, float temperature, void* workspace,
                    cudaStream_t s, float* logits = nullptr);

// Samples one token per row of logits[B, V] (unscaled). Per row b: temperature[b] == 0 is greedy
// (argmax, lowest id on ties); else z = logits / T, restricted to the top_k[b] largest (0 = off)
// and then to the smallest most-likely set reaching top_p[b] (1 = off), renormalised, drawn with a
// counter-based RNG keyed by (seeds[b], counters[b]) so a row's draw depends on nothing else in the
// batch. logprobs[b] = log softmax(logits[b] / T)[token] over the FULL vocabulary (T = 1 when
// greedy), the convention of engine/sampler.h. workspace: at least SampleWorkspace(B, V) bytes.
void SampleRows(int32_t* tokens, float* logprobs, const float* logits, int B, int V, const float* temperature,
                const int32_t* top_k, const float* top_p, const uint64_t* seeds, const uint64_t* counters,
                void* workspace, cudaStream_t s);
size_t SampleWorkspace(int B, int V);

// The lm-head product and SampleRows in one (lmhead_sample.cu; wgmma, so sm_90 only): tokens and
// logprobs as SampleRows(logits = h16 w16^T) would give them, for h16[M, C] and w16[V, C] in bf16
// (f32 accumulation), with the same distribution and log-prob but other draws. The logits are
// written to logits[M, V] only for the rows that filter (top_k or top_p), which SampleRows' filtered
// path then reads; the others never exist. workspace: LmHeadSampleWorkspace(M, V) bytes; sms (the
// device's multiprocessors) sizes the persistent grid. Launched dependent (PDL): w16's first tiles
// are copied before the kernel enqueued just before it has finished, which must not write w16.
// Supported: a compute capability 9 device, C % 8 == 0.
bool LmHeadSampleSupported(int M, int C, int V);
size_t LmHeadSampleWorkspace(int M, int V);
void LmHeadSample(int32_t* tokens, float* logprobs, float* logits, const uint16_t* h16, const uint16_t* w16, int M,
                  int C, int V, const float* temperature, const int32_t* top_k, const float* top_p,
                  const uint64_t* seeds, const uint64_t* counters, void* workspace, int sms, cudaStream_t s);

}  // namespace aha::engine::cuda
