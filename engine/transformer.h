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
// names and shapes; the optimizer and weight publication see them as one array. The gradient buffer
// exists from the first call that needs it (grads(), ZeroGrad(), Backward()). Gradients
// ACCUMULATE across Backward() calls until ZeroGrad() (gradient accumulation over micro-batches).
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

// Per-layer key/value cache for generation: k/v[slots, max_len, Hkv, D] per layer. A sequence owns a
// slot for its lifetime; positions 0..len-1 of its slot hold its keys and values.
struct KvCache {
  int slots = 0, max_len = 0;  // the tensors hold slots + 1 slots: the last pads graph batches
  std::vector<Tensor> k, v;  // one per layer
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
  // Decode steps (one new token per sequence) replay a captured graph per batch bucket (powers of
  // two up to the cache's slots) where the backend has graphs; on by default.
  void set_decode_graphs(bool on) { decode_graphs_ = on; }

  // Training forward over packed sequences. Writes logprobs[N] and entropies[N] aligned to tokens:
  // logprobs[t] = log p(tokens[t] | earlier tokens of its sequence) at `temperature` (logits / T),
  // entropies[t] = entropy of that next-token distribution; both 0 at each sequence's first token.
  void Forward(const int32_t* tokens, const int32_t* cu_seqlens, int S, int N, float temperature,
               float* logprobs, float* entropies);
  // Gradients of sum_t dlogprobs[t] * logprobs[t] + dentropies[t] * entropies[t] (same alignment;
  // either may be null) with respect to every parameter, ADDED into grads(). Needs the last Forward().
  // `ready`, when given, is called as the pass goes: ready(begin) says that grads()[begin, end) has
  // received its last contribution of this call, once the ops enqueued so far have run (on a device
  // backend the call comes at enqueue time, not completion). The backward visits the flat layout
  // from its end (final norm, untied lm-head, last layer) to its start (embedding), so `begin`
  // falls from call to call and the last call is ready(0). Data-parallel training uses it to start
  // reducing finished gradient buckets while the rest of the backward runs.
  using GradsReady = std::function<void(size_t begin)>;
  void Backward(const float* dlogprobs, const float* dentropies, const GradsReady& ready = nullptr);

  // Generation: runs Nq new tokens of B sequences (rows cu_q[b]..cu_q[b+1] belong to sequence b,
  // whose first new token sits at position start[b] in cache slot slots[b]) through the model,
  // writing their keys/values into `cache`, and returns the logits of each sequence's LAST new token
  // in last_logits[B, V] (unscaled, in the backend's device memory). Prefill and decode are the same
  // call. The integer arrays are host arrays; tokens, logprobs and entropies of Forward() too.
  void ForwardCached(const int32_t* tokens, const int32_t* cu_q, const int32_t* slots, const int32_t* start,
                     int B, KvCache* cache, float* last_logits);
  KvCache NewKvCache(int slots, int max_len) const;

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
    Tensor ln1, rstd1, q_pre, k_pre, q_rstd, k_rstd, q, k, v, att, lse, mid, ln2, rstd2, gate, up, h;
  };
  Weights Bind(float* base) const;
  void EnsureGrads();
  void EnsureCapacity(int N);
  void AllocLayerActs(LayerActs* a, int N) const;
  void LayerForward(int l, LayerActs& a, const float* x, float* out, const int32_t* pos,
                    const int32_t* cu_seqlens, int S, int N);
  void LayerBackward(int l, LayerActs& a, const float* x, float* dres, const int32_t* pos,
                     const int32_t* cu_seqlens, int S, int N);

  ModelConfig config_;
  Backend* backend_;
  std::vector<ParamInfo> table_;
  Tensor params_, grads_;
  Weights w_, g_;
  Tensor inv_freq_;
  bool recompute_ = false;

  // Saved by Forward() for Backward().
  int capacity_ = 0, N_ = 0, S_ = 0;
  float temperature_ = 1.0f;
  std::vector<int32_t> tokens_, cu_seqlens_, positions_, targets_;
  std::vector<Tensor> resid_;  // L + 1 layer inputs/outputs [N, C]
  std::vector<LayerActs> acts_;  // L layers, or 1 scratch layer with recompute
  Tensor lnf_, rstdf_, lm_lse_, row_lp_, row_ent_;
  // Device copies of the host integer arrays above, and the row gradients of Backward().
  Tensor tokens_d_, cu_seqlens_d_, positions_d_, targets_d_, drow_lp_d_, drow_ent_d_;
  std::vector<float> row_lp_host_, row_ent_host_;
  // ForwardCached() scratch, grown to the largest call (fixed addresses between calls).
  struct DecodeScratch {
    int capacity = 0, batch = 0;
    Tensor ints;  // tokens | cu_q | slots | start | positions
    Tensor x, ln, rstd, q, k, v, qn, kn, att, tmp, gate, up, last, lastn;
  } dec_;
  void EnsureDecodeScratch(int N, int B);
  void DecodeBody(int N, int Bn, KvCache* cache, float* last_logits, const int32_t* cu_q);
  struct DecodeGraph {
    int bucket = 0;
    const KvCache* cache = nullptr;
    const float* logits = nullptr;
    uint64_t epoch = 0;
    void* graph = nullptr;  // null: seen once, captured on the next call
  };
  std::vector<DecodeGraph> graphs_;
  bool decode_graphs_ = true;
  void ClearGraphs();
  // Backward scratch.
  Tensor dres_, dmid_, dln_, datt_, dq_, dk_, dv_, dq_pre_, dk_pre_, dgate_, dup_, dh_, tmp_;
};

}  // namespace aha::engine
