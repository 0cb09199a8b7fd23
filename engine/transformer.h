// Transformer: a Qwen2 / Qwen3 / Llama 3 decoder with explicit forward and backward passes (llm.c
// style, no autograd), its weights in one flat f32 buffer, and Hugging Face directory load/save.
//
// Shapes: N packed tokens of S sequences (cu_seqlens[S + 1], see backend.h), C width, L layers,
// Hq/Hkv heads of width D, I MLP width, V vocabulary. One layer (pre-norm):
//   a = RMSNorm(x) ; q,k,v = a Wq^T (+bq), a Wk^T (+bk), a Wv^T (+bv)
//   [Qwen3: q,k = per-head RMSNorm] ; q,k = RoPE(q,k) ; x += Attn(q,k,v) Wo^T
//   b = RMSNorm(x) ; x += (silu(b Wg^T) * b Wu^T) Wd^T
// then z = RMSNorm(x) and the fused lm-head gives per-token log-probs and entropies.
//
// Parameters and their gradients live in two flat buffers with one layout (param_table()), in HF
// names and shapes; the optimizer and weight publication see them as one array. Within a layer the
// q_proj, k_proj and v_proj weights are adjacent (then their biases, also adjacent), and so are
// gate_proj and up_proj, so that each group is one product: qkv = a [Wq; Wk; Wv]^T, gu = b [Wg; Wu]^T.
// The gradient buffer exists from the first call that needs it (grads(), ZeroGrad(), Backward()).
// Gradients ACCUMULATE across Backward() calls until ZeroGrad() (gradient accumulation over micro-batches).
// Forward() saves the activations Backward() needs; with recompute on, only each layer's input is
// kept and the rest is recomputed layer by layer during Backward() (less memory, one more forward).
// Not thread-safe: one Transformer is driven by one thread (its backend parallelises inside ops).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/backend.h"
#include "engine/config.h"
#include "engine/tensor.h"

namespace aha::engine {

struct ParamInfo {
  std::string name;  // Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
  Shape shape;
  size_t offset = 0;  // in floats, into params() and grads()
  size_t numel() const { return static_cast<size_t>(NumElements(shape)); }
};

// The HF tensor names and shapes that `config` implies, in the flat-buffer order.
std::vector<ParamInfo> ParamTable(const ModelConfig& config);

// Positions per KV block by default. 64 rather than vLLM's 16: the decode attention reads a 64-key
// chunk from one block instead of four, 1-2% faster a decode step at 256 rows on an H200 and never
// slower in the shapes measured (docs/kernels.md, version 45); a sequence wastes at most 63 positions.
inline constexpr int kKvBlockSize = 64;

// Paged key/value cache for generation (vLLM style): per layer, pools k/v[num_blocks + 1, block_size,
// Hkv, D] of the backend's kv_cache_dtype(). A sequence holds a list of blocks (its block-table row,
// at most max_blocks = ceil(max_len / block_size) long); position p sits in its block p / block_size
// at row p % block_size. Block num_blocks (the extra one) is never handed out: the padding rows of a
// graph-captured decode batch write and read it. Blocks are allocated by the caller (Generator).
struct KvCache {
  int num_blocks = 0, block_size = kKvBlockSize, max_blocks = 0;
  int max_batch = 0;  // most sequences in one ForwardCached call (caps the decode graph buckets)
  DType dtype = DType::kF32;
  uint64_t id = 0;  // unique per NewKvCache(): decode graphs hold the pools of one cache
  std::vector<Tensor> k, v;  // one per layer
  int pad_block() const { return num_blocks; }
  // Layer l as the cache ops see it, with a device block table.
  PagedKv Layer(int l, const int32_t* block_table) {
    return {k[l].raw(), v[l].raw(), dtype, num_blocks + 1, block_size, block_table, max_blocks};
  }
};

class Transformer {
 public:
  // Reads DIR/config.json and DIR/model.safetensors (or its sharded index). Errors name the file and
  // tensor: a missing tensor, a shape that disagrees with config.json, an unexpected tensor, an
  // unsupported architecture or dtype, a truncated file.
  static Result<std::unique_ptr<Transformer>> Load(const std::string& dir, Backend* backend);
  // Random init as transformers does: N(0, 0.02) for matrices and embeddings, ones for norms, zero
  // biases; deterministic in `seed`.
  static std::unique_ptr<Transformer> Init(const ModelConfig& config, uint64_t seed, Backend* backend);
  // Writes DIR/config.json and DIR/model.safetensors in `dtype` (f32 or bf16), loadable by transformers.
  Status Save(const std::string& dir, DType dtype) const;

  ~Transformer();

  const ModelConfig& config() const { return config_; }
  Backend* backend() const { return backend_; }
  const std::vector<ParamInfo>& param_table() const { return table_; }
  size_t num_params() const { return params_.numel(); }
  // Rows the training activations are allocated for (grown by at least a quarter when a batch is larger).
  int activation_rows() const { return capacity_; }
  // params(), grads(), param() and grad() point into the backend's device memory: host code reads and
  // writes the weights through CopyParamsToHost / SetParams. After changing params() in place on the
  // device (optimizer), call ParamsChanged() so the backend refreshes its copies (backend.h).
  float* params() { return params_.f32(); }
  const float* params() const { return params_.f32(); }
  void SetParams(const float* host);
  void CopyParamsToHost(float* host) const;
  void ParamsChanged() { backend_->WeightsChanged(params_.f32()); }
  // Gradients are allocated on first use, so inference-only models (actors, `aha generate`) do not
  // pay for a second copy of the weights.
  float* grads() { EnsureGrads(); return grads_.f32(); }
  // Parameter / gradient by HF name, or nullptr.
  float* param(const std::string& name);
  float* grad(const std::string& name);
  void ZeroGrad() { EnsureGrads(); grads_.SetZero(); }
  void set_recompute(bool on) { recompute_ = on; }
  // A model that only runs forwards (the trainer's frozen reference): the forward skips what only a
  // backward reads (Backend::QkvRopeAttention's forward_only), and Backward() is refused.
  void set_forward_only(bool on) { forward_only_ = on; }
  // Decode steps (one new token per sequence) replay a captured graph per batch bucket (powers of
  // two up to the cache's max_batch) where the backend has graphs; on by default.
  void set_decode_graphs(bool on) { decode_graphs_ = on; }
  // Timing by subtraction (aha bench gen --leave-out): decode steps (not prefills) skip the ops in
  // `mask` (DecodeOp bits), so each op's share of a step in a graph is the step time it saves. The
  // skipped op's output keeps stale values: the tokens drawn are meaningless. Clears the graphs.
  enum DecodeOp : unsigned {
    kDecodeQkv = 1,        // the q/k/v product
    kDecodeAttention = 2,  // RoPE, the pool write and the attention
    kDecodeO = 4,          // the o product with its residual add and the norm after it
    kDecodeGateUp = 8,     // the gate/up product with SwiGLU
    kDecodeDown = 16,      // the down product with its residual add and the norm after it
    kDecodeLmHead = 32,    // the lm-head product
  };
  // "qkv,attention,o,gateup,down,lmhead" (any subset, comma-separated) to a mask; InvalidArgument
  // naming an unknown op.
  static Result<unsigned> ParseDecodeOps(const std::string& list);
  void set_decode_leave_out(unsigned mask) {
    ClearGraphs();
    decode_leave_out_ = mask;
  }

  // Training forward over packed sequences. Writes logprobs[N] and entropies[N] aligned to tokens:
  // logprobs[t] = log p(tokens[t] | earlier tokens of its sequence) at `temperature` (logits / T),
  // entropies[t] = entropy of that next-token distribution; both 0 at each sequence's first token.
  // score_from (optional, [S]): sequence s wants log-probs only from its position score_from[s] on
  // (a prompt's length: RL and SFT losses read completions alone); earlier positions get 0 and
  // their rows skip the lm-head, the largest product of a small model (TRL's logits_to_keep).
  // Only the rows that predict a scored token run the lm-head, here and in Backward().
  void Forward(const int32_t* tokens, const int32_t* cu_seqlens, int S, int N, float temperature,
               float* logprobs, float* entropies, const int32_t* score_from = nullptr);
  // Gradients of sum_t dlogprobs[t] * logprobs[t] + dentropies[t] * entropies[t] (same alignment;
  // either may be null) with respect to every parameter, ADDED into grads(). Needs the last Forward();
  // positions that Forward() did not score (score_from) contribute nothing, whatever their dlogprobs.
  // `ready`, when given, is called as the pass goes: ready(begin) says that grads()[begin, end) has
  // received its last contribution of this call, once the ops enqueued so far have run (on a device
  // backend the call comes at enqueue time, not completion). The backward visits the flat layout
  // from its end (final norm, untied lm-head, last layer) to its start (embedding), so `begin`
  // falls from call to call and the last call is ready(0). Data-parallel training uses it to start
  // reducing finished gradient buckets while the rest of the backward runs.
  using GradsReady = std::function<void(size_t begin)>;
  void Backward(const float* dlogprobs, const float* dentropies, const GradsReady& ready = nullptr);

  // Generation: runs Nq new tokens of B sequences (rows cu_q[b]..cu_q[b+1] belong to sequence b,
  // whose first new token sits at position start[b]) through the model, writing their keys/values
  // into `cache` through the block table block_table[B, cache->max_blocks] (sequence b's blocks in
  // position order; entries past its length are ignored), and returns the logits of each sequence's
  // LAST new token in last_logits[B, V] (unscaled, in the backend's device memory). Prefill, chunked
  // prefill and decode are the same call. The integer arrays are host arrays; tokens, logprobs and
  // entropies of Forward() too. B <= cache->max_batch. With device_tokens (a decode step: one new
  // token per sequence) sequence b's token is device_tokens[token_rows[b]], device_tokens in the
  // backend's memory (say, the previous step's draws, not yet on the host) and token_rows[B] a host
  // array; `tokens` is ignored.
  //
  // With `draw`, each sequence's next token is also drawn (Backend::LmHeadSample, SampleRows'
  // semantics, row b with the options and keys at index b of draw's arrays, all in the backend's
  // memory and at least as long as the decode bucket: a power of two or the cache's max_batch)
  // into draw->tokens[b] and draw->logprobs[b], inside the step's graph; last_logits is then
  // scratch, written only for rows that filter (top-k or top-p).
  struct Draw {
    int32_t* tokens = nullptr;
    float* logprobs = nullptr;
    const float* temperature = nullptr;
    const int32_t* top_k = nullptr;
    const float* top_p = nullptr;
    const uint64_t* seeds = nullptr;
    const uint64_t* counters = nullptr;
    bool operator==(const Draw&) const = default;
  };
  void ForwardCached(const int32_t* tokens, const int32_t* cu_q, const int32_t* start, const int32_t* block_table,
                     int B, KvCache* cache, float* last_logits, const int32_t* device_tokens = nullptr,
                     const int32_t* token_rows = nullptr, const Draw* draw = nullptr);
  // A pool of num_blocks blocks of block_size positions, for up to max_batch sequences of up to
  // max_len positions each.
  KvCache NewKvCache(int max_batch, int max_len, int num_blocks, int block_size = kKvBlockSize) const;

 private:
  Transformer(const ModelConfig& config, Backend* backend);
  struct LayerWeights {
    float *in_norm, *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *o_w, *q_norm, *k_norm, *post_norm, *gate_w,
        *up_w, *down_w;
  };
  struct Weights {
    float *wte, *final_norm, *lm_head;
    std::vector<LayerWeights> layers;
  };
  // Activations of one layer for N tokens.
  struct LayerActs {
    Tensor ln1, rstd1, q_pre, k_pre, q_rstd, k_rstd, q, k, v, att, lse, mid, ln2, rstd2, h;
    Tensor gu;  // [N, 2I]: gate | up per row, the fused product
  };
  Weights Bind(float* base) const;
  void EnsureGrads();
  void EnsureCapacity(int N);
  void AllocLayerActs(LayerActs* a, int N) const;
  Tensor KeptF32(Shape shape) const;  // an f32 tensor for Keep(): only reserved when the backend KeepsBf16
  // Backend::KeepAsBf16 of t, remembered in *kept; ReleaseKept releases them all.
  void Keep(const Tensor& t, std::vector<const float*>* kept);
  void ReleaseKept(std::vector<const float*>* kept);
  std::vector<const float*> kept_acts_, kept_dec_;  // training activations; ForwardCached scratch
  // The norm that reads a layer's output (the next layer's input norm, or the final norm): the
  // residual add that ends the layer and that norm are one op (Backend::AddRmsNormForward).
  struct NextNorm {
    const float* w = nullptr;  // null: a plain add (the backward's recompute needs no norm)
    float* ln = nullptr;
    float* rstd = nullptr;
  };
  // ln1_ready: a.ln1 and a.rstd1 already hold this layer's input norm (the previous layer's NextNorm).
  void LayerForward(int l, LayerActs& a, const float* x, float* out, const int32_t* pos,
                    const int32_t* cu_seqlens, int S, int N, bool ln1_ready, const NextNorm& next);
  void LayerBackward(int l, LayerActs& a, const float* x, float* dres, const int32_t* pos,
                     const int32_t* cu_seqlens, int S, int N);

  ModelConfig config_;
  Backend* backend_;
  std::vector<ParamInfo> table_;
  Tensor params_, grads_;
  Weights w_, g_;
  Tensor inv_freq_;
  bool recompute_ = false, forward_only_ = false;
  // The backward packs the q/k/v gradient into dqkv_, kept in bf16 only (read by the product's
  // backward alone; RopePackQkv or NormRopePackQkv writes only the copy), when no bias gradient is
  // summed from it: summed from bf16 values, k_proj.bias's gradient (nearly all cancellation: a bias
  // shared by every key moves no softmax, but for RoPE) came within 7e-4 of the conformance test's
  // 1e-3 NMSE limit. Else qkv_.
  bool KeepsQkvGradient() const { return !config_.attention_bias; }

  // Saved by Forward() for Backward().
  int capacity_ = 0, N_ = 0, S_ = 0;
  float temperature_ = 1.0f;
  std::vector<int32_t> tokens_, cu_seqlens_, positions_;
  // The rows that run the lm-head (those predicting a scored token), M = lm_rows_.size() of N: the
  // lm-head reads their final-norm rows gathered into lnf_rows_ and writes dlnf_rows_.
  std::vector<int32_t> lm_rows_, lm_targets_;
  std::vector<Tensor> resid_;  // L + 1 layer inputs/outputs [N, C]
  std::vector<LayerActs> acts_;  // L layers, or 1 scratch layer with recompute
  Tensor lnf_, rstdf_, lm_lse_, row_lp_, row_ent_;
  // The last Forward's logits [N * V] for the Backward after it (Backend::LmHeadForwardKeep): kept
  // when the backend uses them, the model has gradients (it is being trained) and they fit in
  // AHA_KEEP_LOGITS_GB (default 16; 0 turns it off). logits_kept_: lm_z_ holds them now.
  Tensor lm_z_;
  bool logits_kept_ = false;
  // Device copies of the host integer arrays above, and the row gradients of Backward().
  Tensor tokens_d_, cu_seqlens_d_, positions_d_, targets_d_, drow_lp_d_, drow_ent_d_, lm_rows_d_;
  Tensor lnf_rows_, dlnf_rows_;
  std::vector<float> row_lp_host_, row_ent_host_;
  // ForwardCached() scratch, grown to the largest call (fixed addresses between calls).
  struct DecodeScratch {
    int capacity = 0, batch = 0;
    int max_blocks = 0;  // block-table row length the ints were sized for
    Tensor ints;  // tokens[N] | cu_q[B + 1] | start[B] | positions[N] | block table[B, max_blocks]
    Tensor x, ln, rstd, q, k, v, qn, kn, att, tmp, gu, last, lastn;
    Tensor lse;  // [n, Hq]: the packed attention's log-sum-exp in a fresh prefill (unread)
    Tensor qkv;  // [n, QD + 2 KD]: the fused q/k/v product
    Tensor h;    // [n, I]: the SwiGLU output (kept in bf16: the f32 buffer stays unwritten)
  } dec_;
  void EnsureDecodeScratch(int N, int B, int max_blocks);
  // fresh: every sequence starts at position 0 (a prompt's prefill), so its attention is the packed
  // causal attention of the training forward over the new rows alone, not a read of the cache.
  void DecodeBody(int N, int Bn, KvCache* cache, float* last_logits, const Draw* draw, bool fresh = false);
  struct DecodeGraph {
    int bucket = 0;
    uint64_t cache_id = 0;  // KvCache::id: an address could be reused by a later cache
    const float* logits = nullptr;
    Draw draw;  // all null: the graph ends at the logits
    uint64_t epoch = 0;
    void* graph = nullptr;  // null: seen once, captured on the next call
  };
  std::vector<DecodeGraph> graphs_;
  bool decode_graphs_ = true;
  unsigned decode_leave_out_ = 0;  // DecodeOp bits (set_decode_leave_out)
  void ClearGraphs();
  // Backward scratch.
  Tensor dres_, dmid_, dln_, datt_, dq_, dk_, dv_, dq_pre_, dk_pre_, dgu_, dh_;
  // [N, QD + 2 KD]: the fused q/k/v product before SplitQkv in the forward; the packed dq | dk | dv
  // in the backward, in dqkv_ or qkv_ (KeepsQkvGradient; never needed across ops: one scratch for
  // all layers).
  Tensor qkv_, dqkv_;
};

}  // namespace aha::engine
