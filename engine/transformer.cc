// Transformer forward, backward, cached generation forward, and HF directory I/O (see transformer.h).
#include "engine/transformer.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "engine/safetensors.h"

namespace aha::engine {

std::vector<ParamInfo> ParamTable(const ModelConfig& c) {
  std::vector<ParamInfo> t;
  size_t offset = 0;
  auto add = [&](std::string name, Shape shape) {
    ParamInfo p{std::move(name), std::move(shape), offset};
    offset += p.numel();
    t.push_back(std::move(p));
  };
  const int64_t C = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const int64_t QD = c.num_heads * D, KD = c.num_kv_heads * D;
  add("model.embed_tokens.weight", {c.vocab_size, C});
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {C});
    // q/k/v weights adjacent, then their biases adjacent, and gate/up adjacent: each group is one
    // product (transformer.h). Persisted flat buffers (the learner's optimizer.bin) depend on this order.
    add(p + "self_attn.q_proj.weight", {QD, C});
    add(p + "self_attn.k_proj.weight", {KD, C});
    add(p + "self_attn.v_proj.weight", {KD, C});
    if (c.attention_bias) {
      add(p + "self_attn.q_proj.bias", {QD});
      add(p + "self_attn.k_proj.bias", {KD});
      add(p + "self_attn.v_proj.bias", {KD});
    }
    add(p + "self_attn.o_proj.weight", {C, QD});
    if (c.qk_norm) {
      add(p + "self_attn.q_norm.weight", {D});
      add(p + "self_attn.k_norm.weight", {D});
    }
    add(p + "post_attention_layernorm.weight", {C});
    add(p + "mlp.gate_proj.weight", {I, C});
    add(p + "mlp.up_proj.weight", {I, C});
    add(p + "mlp.down_proj.weight", {C, I});
  }
  add("model.norm.weight", {C});
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, C});
  return t;
}

Transformer::Transformer(const ModelConfig& config, Backend* backend)
    : config_(config), backend_(backend), table_(ParamTable(config)) {
  const size_t n = table_.back().offset + table_.back().numel();
  params_ = Tensor::Zeros(DType::kF32, {static_cast<int64_t>(n)}, backend->device());
  w_ = Bind(params_.f32());
  inv_freq_ = Tensor::FromVector(RopeInverseFrequencies(config.rope, config.head_dim), {config.head_dim / 2})
                  .ToDevice(backend->device());
  backend_->RegisterWeights(params_.f32(), n);
  backend_->WeightsChanged(params_.f32());
}

Transformer::~Transformer() {
  ClearGraphs();
  ReleaseKept(&kept_acts_);
  ReleaseKept(&kept_dec_);
  backend_->UnregisterWeights(params_.f32());
}

// Activations whose only readers are products, the SwiGLU ops and the attention backward may be
// stored in bf16 only (Backend::KeepAsBf16): the norms' outputs (read by the q/k/v and gate/up
// products and their weight gradients), gu (SwiGLU forward and backward), h (the down product), dh
// (SwiGLU backward), the attention output (the o product, and the backward's delta = dout . out),
// its gradient datt and the rotated q (the attention backward, whose products round them anyway).
void Transformer::Keep(const Tensor& t, std::vector<const float*>* kept) {
  if (t.numel() == 0) return;
  backend_->KeepAsBf16(t.f32(), static_cast<size_t>(t.numel()));
  kept->push_back(t.f32());
}
void Transformer::ReleaseKept(std::vector<const float*>* kept) {
  for (const float* p : *kept) backend_->ReleaseBf16(p);
  kept->clear();
}

void Transformer::ClearGraphs() {
  for (auto& g : graphs_)
    if (g.graph) backend_->DestroyGraph(g.graph);
  graphs_.clear();
}

void Transformer::SetParams(const float* host) {
  backend_->Upload(params_.raw(), host, params_.nbytes());
  backend_->WeightsChanged(params_.f32());
}

void Transformer::CopyParamsToHost(float* host) const { backend_->Download(host, params_.raw(), params_.nbytes()); }

Transformer::Weights Transformer::Bind(float* base) const {
  auto at = [&](const std::string& name) -> float* {
    for (const auto& p : table_)
      if (p.name == name) return base + p.offset;
    return nullptr;
  };
  Weights w;
  w.wte = at("model.embed_tokens.weight");
  w.final_norm = at("model.norm.weight");
  w.lm_head = config_.tie_word_embeddings ? w.wte : at("lm_head.weight");
  for (int l = 0; l < config_.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights lw;
    lw.in_norm = at(p + "input_layernorm.weight");
    lw.q_w = at(p + "self_attn.q_proj.weight");
    lw.q_b = at(p + "self_attn.q_proj.bias");
    lw.k_w = at(p + "self_attn.k_proj.weight");
    lw.k_b = at(p + "self_attn.k_proj.bias");
    lw.v_w = at(p + "self_attn.v_proj.weight");
    lw.v_b = at(p + "self_attn.v_proj.bias");
    lw.o_w = at(p + "self_attn.o_proj.weight");
    lw.q_norm = at(p + "self_attn.q_norm.weight");
    lw.k_norm = at(p + "self_attn.k_norm.weight");
    lw.post_norm = at(p + "post_attention_layernorm.weight");
    lw.gate_w = at(p + "mlp.gate_proj.weight");
    lw.up_w = at(p + "mlp.up_proj.weight");
    lw.down_w = at(p + "mlp.down_proj.weight");
    // The fused products read [Wq; Wk; Wv], [bq; bk; bv] and [Wg; Wu] as one array each.
    const size_t C = config_.hidden_size, I = config_.intermediate_size;
    const size_t QD = static_cast<size_t>(config_.num_heads) * config_.head_dim;
    const size_t KD = static_cast<size_t>(config_.num_kv_heads) * config_.head_dim;
    AHA_CHECK(lw.k_w == lw.q_w + QD * C && lw.v_w == lw.k_w + KD * C) << "q/k/v weights not adjacent";
    AHA_CHECK(!lw.q_b || (lw.k_b == lw.q_b + QD && lw.v_b == lw.k_b + KD)) << "q/k/v biases not adjacent";
    AHA_CHECK(lw.up_w == lw.gate_w + I * C) << "gate/up weights not adjacent";
    w.layers.push_back(lw);
  }
  return w;
}

void Transformer::EnsureGrads() {
  if (!grads_.empty()) return;
  grads_ = Tensor::Zeros(DType::kF32, {static_cast<int64_t>(num_params())}, backend_->device());
  g_ = Bind(grads_.f32());
}

float* Transformer::param(const std::string& name) {
  for (const auto& p : table_)
    if (p.name == name) return params_.f32() + p.offset;
  return nullptr;
}

float* Transformer::grad(const std::string& name) {
  EnsureGrads();
  for (const auto& p : table_)
    if (p.name == name) return grads_.f32() + p.offset;
  return nullptr;
}

// ---- load / init / save ------------------------------------------------------------------------

Result<std::unique_ptr<Transformer>> Transformer::Load(const std::string& dir, Backend* backend) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir + "/config.json"));
  ASSIGN_OR_RETURN(SafetensorsModel st, SafetensorsModel::Open(dir));
  std::unique_ptr<Transformer> m(new Transformer(config, backend));
  std::vector<float> host(m->num_params());
  for (const ParamInfo& p : m->table_) {
    std::string file = dir + "/model.safetensors";
    const SafetensorsEntry* e = st.Find(p.name, &file);
    if (!e) return NotFound(file + ": missing tensor " + p.name + " (config.json: " + ArchName(config.arch) + ")");
    if (e->shape != p.shape)
      return InvalidArgument(file + ": tensor " + p.name + ": shape " + ShapeString(e->shape) +
                             " but config.json implies " + ShapeString(p.shape));
    ASSIGN_OR_RETURN(Tensor t, st.Read(p.name));
    if (t.dtype() != DType::kF32)
      return InvalidArgument(file + ": tensor " + p.name + ": integer dtype " + e->dtype + " for a weight");
    std::memcpy(host.data() + p.offset, t.f32(), p.numel() * sizeof(float));
  }
  m->SetParams(host.data());
  // A tensor the architecture does not use means config.json and the weights disagree (a bias in a
  // Llama file, q_norm in a Qwen2 file): refuse rather than silently compute something else.
  for (const std::string& name : st.Names()) {
    bool known = false;
    for (const auto& p : m->table_) known = known || p.name == name;
    const bool ignorable = name.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && name == "lm_head.weight");
    if (!known && !ignorable) {
      std::string file;
      st.Find(name, &file);
      return InvalidArgument(file + ": tensor " + name + ": not part of a " + ArchName(config.arch) +
                             " model as config.json describes it");
    }
  }
  return m;
}

std::unique_ptr<Transformer> Transformer::Init(const ModelConfig& config, uint64_t seed, Backend* backend) {
  std::unique_ptr<Transformer> m(new Transformer(config, backend));
  std::vector<float> host(m->num_params());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (const ParamInfo& p : m->table_) {
    float* w = host.data() + p.offset;
    const bool is_norm = p.name.ends_with("norm.weight");
    const bool is_bias = p.name.ends_with(".bias");
    for (size_t i = 0; i < p.numel(); ++i) w[i] = is_norm ? 1.0f : is_bias ? 0.0f : normal(rng);
  }
  m->SetParams(host.data());
  return m;
}

Status Transformer::Save(const std::string& dir, DType dtype) const {
  if (dtype != DType::kF32 && dtype != DType::kBF16) return InvalidArgument("model dtype must be f32 or bf16");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return IoError(dir + ": cannot create directory: " + ec.message());
  {
    std::ofstream f(dir + "/config.json");
    if (!f) return IoError(dir + "/config.json: cannot write");
    std::string json = ModelConfigToJson(config_);
    if (dtype == DType::kBF16) json.replace(json.find("\"float32\""), 9, "\"bfloat16\"");
    f << json;
    if (!f.flush()) return IoError(dir + "/config.json: write failed");
  }
  std::vector<float> host(num_params());
  CopyParamsToHost(host.data());
  std::vector<uint16_t> bf16;
  if (dtype == DType::kBF16) {
    bf16.resize(num_params());
    F32ToBF16(host.data(), bf16.data(), num_params());
  }
  std::vector<NamedTensor> tensors;
  for (const ParamInfo& p : table_) {
    const void* data = dtype == DType::kF32 ? static_cast<const void*>(host.data() + p.offset)
                                            : static_cast<const void*>(bf16.data() + p.offset);
    tensors.push_back({p.name, dtype, p.shape, data});
  }
  return WriteSafetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
}

// ---- training forward / backward ---------------------------------------------------------------

void Transformer::AllocLayerActs(LayerActs* a, int N) const {
  const int64_t C = config_.hidden_size, I = config_.intermediate_size;
  const int64_t QD = config_.num_heads * config_.head_dim, KD = config_.num_kv_heads * config_.head_dim;
  const Device d = backend_->device();
  a->ln1 = KeptF32({N, C});
  a->rstd1 = Tensor(DType::kF32, {N}, d);
  if (config_.qk_norm) {
    a->q_pre = Tensor(DType::kF32, {N, QD}, d);
    a->k_pre = Tensor(DType::kF32, {N, KD}, d);
    a->q_rstd = Tensor(DType::kF32, {N, config_.num_heads}, d);
    a->k_rstd = Tensor(DType::kF32, {N, config_.num_kv_heads}, d);
  }
  a->q = KeptF32({N, QD});
  a->k = Tensor(DType::kF32, {N, KD}, d);
  a->v = Tensor(DType::kF32, {N, KD}, d);
  a->att = KeptF32({N, QD});
  a->lse = Tensor(DType::kF32, {N, config_.num_heads}, d);
  a->mid = Tensor(DType::kF32, {N, C}, d);
  a->ln2 = KeptF32({N, C});
  a->rstd2 = Tensor(DType::kF32, {N}, d);
  a->gu = KeptF32({N, 2 * I});
  a->h = KeptF32({N, I});
}

// The tensors Keep() hands to the backend: with a backend that keeps them in bf16 only, their f32
// storage is never touched, so it is only reserved (addresses, no memory).
Tensor Transformer::KeptF32(Shape shape) const {
  const Device d = backend_->device();
  return backend_->KeepsBf16() ? Tensor::Reserved(DType::kF32, std::move(shape), d)
                               : Tensor(DType::kF32, std::move(shape), d);
}

void Transformer::EnsureCapacity(int N) {
  if (N <= capacity_ && static_cast<int>(acts_.size()) == (recompute_ ? 1 : config_.num_layers)) return;
  // Grow by at least a quarter, in whole 256-row units: the learner's batches vary by a few rows
  // from step to step, and growing to each new maximum exactly cost a free + allocate of every
  // activation (+50 ms on a 70 ms H200 step, seen in the scaling runs) many steps in a row.
  if (N > capacity_) capacity_ = static_cast<int>((std::max<int64_t>(N, capacity_ + capacity_ / 4) + 255) / 256 * 256);
  N = capacity_;
  const int64_t C = config_.hidden_size, I = config_.intermediate_size;
  const int64_t QD = config_.num_heads * config_.head_dim, KD = config_.num_kv_heads * config_.head_dim;
  const Device d = backend_->device();
  resid_.clear();
  for (int l = 0; l <= config_.num_layers; ++l) resid_.emplace_back(DType::kF32, Shape{N, C}, d);
  ReleaseKept(&kept_acts_);
  acts_.clear();
  acts_.resize(recompute_ ? 1 : config_.num_layers);
  for (auto& a : acts_) {
    AllocLayerActs(&a, N);
    for (const Tensor* t : {&a.ln1, &a.ln2, &a.gu, &a.h, &a.att, &a.q}) Keep(*t, &kept_acts_);
  }
  lnf_ = Tensor(DType::kF32, {N, C}, d);
  rstdf_ = Tensor(DType::kF32, {N}, d);
  lm_lse_ = Tensor(DType::kF32, {N}, d);
  row_lp_ = Tensor(DType::kF32, {N}, d);
  row_ent_ = Tensor(DType::kF32, {N}, d);
  dres_ = Tensor(DType::kF32, {N, C}, d);
  dmid_ = Tensor(DType::kF32, {N, C}, d);
  dln_ = Tensor(DType::kF32, {N, C}, d);
  datt_ = KeptF32({N, QD});
  dq_ = Tensor(DType::kF32, {N, QD}, d);
  dk_ = Tensor(DType::kF32, {N, KD}, d);
  dv_ = Tensor(DType::kF32, {N, KD}, d);
  dq_pre_ = Tensor(DType::kF32, {N, QD}, d);
  dk_pre_ = Tensor(DType::kF32, {N, KD}, d);
  dgu_ = Tensor(DType::kF32, {N, 2 * I}, d);
  dh_ = KeptF32({N, I});
  Keep(dh_, &kept_acts_);
  Keep(datt_, &kept_acts_);
  qkv_ = Tensor(DType::kF32, {N, QD + 2 * KD}, d);
  if (KeepsQkvGradient()) {  // read only by the q/k/v product's backward
    dqkv_ = KeptF32({N, QD + 2 * KD});
    Keep(dqkv_, &kept_acts_);
  }
  tokens_d_ = Tensor(DType::kI32, {N}, d);
  cu_seqlens_d_ = Tensor(DType::kI32, {N + 1}, d);
  positions_d_ = Tensor(DType::kI32, {N}, d);
  targets_d_ = Tensor(DType::kI32, {N}, d);
  drow_lp_d_ = Tensor(DType::kF32, {N}, d);
  drow_ent_d_ = Tensor(DType::kF32, {N}, d);
  lm_rows_d_ = Tensor(DType::kI32, {N}, d);
  lnf_rows_ = Tensor(DType::kF32, {N, C}, d);
  dlnf_rows_ = Tensor(DType::kF32, {N, C}, d);
}

void Transformer::LayerForward(int l, LayerActs& a, const float* x, float* out, const int32_t* pos,
                               const int32_t* cu_seqlens, int S, int N, bool ln1_ready, const NextNorm& next) {
  Backend& B = *backend_;
  const LayerWeights& w = w_.layers[l];
  const int C = config_.hidden_size, I = config_.intermediate_size, D = config_.head_dim;
  const int Hq = config_.num_heads, Hkv = config_.num_kv_heads;
  if (!ln1_ready) B.RmsNormForward(a.ln1.f32(), a.rstd1.f32(), x, w.in_norm, N, C, config_.rms_norm_eps);
  // One product over [Wq; Wk; Wv], then the split adds the biases [bq; bk; bv] (and RoPE follows).
  B.LinearForward(qkv_.f32(), a.ln1.f32(), w.q_w, nullptr, N, C, (Hq + 2 * Hkv) * D);
  if (config_.qk_norm) {  // Qwen3: the per-head norms sit between the split and the rotation
    B.QkvNormRopeAttention(a.att.f32(), a.lse.f32(), a.q_pre.f32(), a.k_pre.f32(), a.q.f32(), a.k.f32(), a.v.f32(),
                           a.q_rstd.f32(), a.k_rstd.f32(), qkv_.f32(), w.q_b, w.q_norm, w.k_norm,
                           config_.rms_norm_eps, pos, inv_freq_.f32(), cu_seqlens, S, N, Hq, Hkv, D, forward_only_);
  } else {
    B.QkvRopeAttention(a.att.f32(), a.lse.f32(), a.q.f32(), a.k.f32(), a.v.f32(), qkv_.f32(), w.q_b, pos,
                       inv_freq_.f32(), cu_seqlens, S, N, Hq, Hkv, D, forward_only_);
  }
  // mid = o(att) + x: the product writes mid, the fused op adds x in place and norms the sum.
  B.LinearForward(a.mid.f32(), a.att.f32(), w.o_w, nullptr, N, Hq * D, C);
  B.AddRmsNormForward(a.mid.f32(), a.ln2.f32(), a.rstd2.f32(), x, w.post_norm, N, C, config_.rms_norm_eps);
  B.LinearForward(a.gu.f32(), a.ln2.f32(), w.gate_w, nullptr, N, C, 2 * I);  // [Wg; Wu]
  B.SwiGluForward(a.h.f32(), a.gu.f32(), N, I);
  // out = down(h) + mid, likewise, with the norm that reads out next.
  B.LinearForward(out, a.h.f32(), w.down_w, nullptr, N, I, C);
  if (next.w) B.AddRmsNormForward(out, next.ln, next.rstd, a.mid.f32(), next.w, N, C, config_.rms_norm_eps);
  else B.Add(out, out, a.mid.f32(), static_cast<size_t>(N) * C);
}

void Transformer::LayerBackward(int l, LayerActs& a, const float* x, float* dres, const int32_t* pos,
                                const int32_t* cu_seqlens, int S, int N) {
  // dres holds d loss / d (layer output) on entry and d loss / d (layer input x) on exit.
  Backend& B = *backend_;
  const LayerWeights& w = w_.layers[l];
  const LayerWeights& g = g_.layers[l];
  const int C = config_.hidden_size, I = config_.intermediate_size, D = config_.head_dim;
  const int Hq = config_.num_heads, Hkv = config_.num_kv_heads;
  // dres becomes d mid in place: the residual passes d out through, and the post-attention norm's
  // backward adds into it once the down product's backward has read it (ops run in order).
  // MLP branch: out = mid + down(swiglu(gu)), gu = ln2 [Wg; Wu]^T.
  B.LinearBackward(dh_.f32(), g.down_w, nullptr, dres, a.h.f32(), w.down_w, N, I, C, false);
  B.SwiGluLinearBackward(dln_.f32(), g.gate_w, dgu_.f32(), dh_.f32(), a.gu.f32(), a.ln2.f32(), w.gate_w, N, C, I);
  B.RmsNormBackward(dres, g.post_norm, dln_.f32(), a.mid.f32(), w.post_norm, a.rstd2.f32(), N, C);
  // Attention branch: mid = x + o(attn(rope(norm(q(ln1))), rope(norm(k(ln1))), v(ln1))); likewise
  // dres becomes d x when the input norm's backward adds into it at the end.
  B.LinearBackward(datt_.f32(), g.o_w, nullptr, dres, a.att.f32(), w.o_w, N, Hq * D, C, false);
  B.AttentionBackward(dq_.f32(), dk_.f32(), dv_.f32(), datt_.f32(), a.att.f32(), a.lse.f32(), a.q.f32(),
                      a.k.f32(), a.v.f32(), cu_seqlens, S, N, Hq, Hkv, D);
  // One product's backward over [Wq; Wk; Wv]; db = [dbq; dbk; dbv] from the packed rows.
  float* dqkv = KeepsQkvGradient() ? dqkv_.f32() : qkv_.f32();
  if (config_.qk_norm) {
    B.NormRopePackQkv(dqkv, g.q_norm, g.k_norm, dq_pre_.f32(), dk_pre_.f32(), dq_.f32(), dk_.f32(), dv_.f32(),
                      a.q_pre.f32(), a.k_pre.f32(), w.q_norm, w.k_norm, a.q_rstd.f32(), a.k_rstd.f32(), pos,
                      inv_freq_.f32(), N, Hq, Hkv, D);
  } else {
    B.RopePackQkv(dqkv, dq_.f32(), dk_.f32(), dv_.f32(), pos, inv_freq_.f32(), N, Hq, Hkv, D);
  }
  B.LinearBackward(dln_.f32(), g.q_w, g.q_b, dqkv, a.ln1.f32(), w.q_w, N, C, (Hq + 2 * Hkv) * D, false);
  B.RmsNormBackward(dres, g.in_norm, dln_.f32(), x, w.in_norm, a.rstd1.f32(), N, C);
}

void Transformer::Forward(const int32_t* tokens, const int32_t* cu_seqlens, int S, int N, float temperature,
                          float* logprobs, float* entropies, const int32_t* score_from) {
  AHA_CHECK_EQ(cu_seqlens[0], 0);
  AHA_CHECK_EQ(cu_seqlens[S], N);
  EnsureCapacity(N);
  N_ = N;
  S_ = S;
  temperature_ = temperature;
  tokens_.assign(tokens, tokens + N);
  cu_seqlens_.assign(cu_seqlens, cu_seqlens + S + 1);
  positions_.resize(N);
  lm_rows_.clear();
  lm_targets_.clear();
  for (int s = 0; s < S; ++s) {
    AHA_CHECK_LE(cu_seqlens[s], cu_seqlens[s + 1]);
    // Row i predicts token i + 1, scored when its position is score_from[s] or later.
    const int first_row = cu_seqlens[s] + (score_from ? std::max(score_from[s], 1) : 1) - 1;
    for (int i = cu_seqlens[s]; i < cu_seqlens[s + 1]; ++i) {
      AHA_CHECK(tokens[i] >= 0 && tokens[i] < config_.vocab_size) << "token id " << tokens[i] << " out of range";
      positions_[i] = i - cu_seqlens[s];
      if (i + 1 < cu_seqlens[s + 1] && i >= first_row) {
        lm_rows_.push_back(i);
        lm_targets_.push_back(tokens[i + 1]);
      }
    }
  }
  const int M = static_cast<int>(lm_rows_.size());
  Backend& B = *backend_;
  B.Upload(tokens_d_.raw(), tokens_.data(), N * sizeof(int32_t));
  B.Upload(cu_seqlens_d_.raw(), cu_seqlens_.data(), (S + 1) * sizeof(int32_t));
  B.Upload(positions_d_.raw(), positions_.data(), N * sizeof(int32_t));
  if (M > 0) {
    B.Upload(targets_d_.raw(), lm_targets_.data(), M * sizeof(int32_t));
    B.Upload(lm_rows_d_.raw(), lm_rows_.data(), M * sizeof(int32_t));
  }
  const int C = config_.hidden_size;
  B.EmbeddingForward(resid_[0].f32(), tokens_d_.i32(), w_.wte, N, C);
  const int L = config_.num_layers;
  // Each layer ends with the norm of its output: the next layer's input norm, the last one the final norm.
  for (int l = 0; l < L; ++l) {
    LayerActs& following = acts_[recompute_ || l + 1 == L ? 0 : l + 1];
    const NextNorm next = l + 1 < L ? NextNorm{w_.layers[l + 1].in_norm, following.ln1.f32(), following.rstd1.f32()}
                                    : NextNorm{w_.final_norm, lnf_.f32(), rstdf_.f32()};
    LayerForward(l, acts_[recompute_ ? 0 : l], resid_[l].f32(), resid_[l + 1].f32(), positions_d_.i32(),
                 cu_seqlens_d_.i32(), S, N, /*ln1_ready=*/l > 0, next);
  }
  if (L == 0) B.RmsNormForward(lnf_.f32(), rstdf_.f32(), resid_[0].f32(), w_.final_norm, N, C, config_.rms_norm_eps);
  // The lm-head runs on the M scored rows alone, gathered (the embedding lookup's kernel: row n of
  // lnf_rows_ is row lm_rows_[n] of lnf_).
  const size_t z_n = static_cast<size_t>(M) * config_.vocab_size;
  static const double keep_gb = [] {
    const char* e = std::getenv("AHA_KEEP_LOGITS_GB");
    return e ? std::atof(e) : 16.0;
  }();
  logits_kept_ = M > 0 && B.KeepsLogits() && !grads_.empty() && z_n * sizeof(float) <= keep_gb * (1 << 30);
  row_lp_host_.resize(M);
  row_ent_host_.resize(M);
  if (M > 0) {
    B.EmbeddingForward(lnf_rows_.f32(), lm_rows_d_.i32(), lnf_.f32(), M, C);
    if (logits_kept_) {
      if (lm_z_.numel() < static_cast<int64_t>(z_n)) {
        lm_z_ = Tensor();  // free the smaller buffer first
        lm_z_ = Tensor(DType::kF32, {static_cast<int64_t>(z_n)}, B.device());
      }
      B.LmHeadForwardKeep(row_lp_.f32(), row_ent_.f32(), lm_lse_.f32(), lnf_rows_.f32(), w_.lm_head,
                          targets_d_.i32(), M, C, config_.vocab_size, temperature, lm_z_.f32());
    } else {
      B.LmHeadForward(row_lp_.f32(), row_ent_.f32(), lm_lse_.f32(), lnf_rows_.f32(), w_.lm_head, targets_d_.i32(),
                      M, C, config_.vocab_size, temperature);
    }
    B.Download(row_lp_host_.data(), row_lp_.raw(), M * sizeof(float));
    if (entropies) B.Download(row_ent_host_.data(), row_ent_.raw(), M * sizeof(float));
  }
  // Scored row lm_rows_[n] predicts token lm_rows_[n] + 1: scatter into token alignment.
  std::fill(logprobs, logprobs + N, 0.0f);
  if (entropies) std::fill(entropies, entropies + N, 0.0f);
  for (int n = 0; n < M; ++n) {
    logprobs[lm_rows_[n] + 1] = row_lp_host_[n];
    if (entropies) entropies[lm_rows_[n] + 1] = row_ent_host_[n];
  }
}

void Transformer::Backward(const float* dlogprobs, const float* dentropies, const GradsReady& ready) {
  AHA_CHECK(!forward_only_) << "Backward on a model set to run forwards only (set_forward_only)";
  EnsureGrads();
  const int N = N_, C = config_.hidden_size, L = config_.num_layers;
  Backend& B = *backend_;
  const int M = static_cast<int>(lm_rows_.size());
  std::vector<float> drow_lp(M, 0.0f), drow_ent(M, 0.0f);
  for (int n = 0; n < M; ++n) {
    if (dlogprobs) drow_lp[n] = dlogprobs[lm_rows_[n] + 1];
    if (dentropies) drow_ent[n] = dentropies[lm_rows_[n] + 1];
  }
  dln_.SetZero();
  if (M > 0) {
    B.Upload(drow_lp_d_.raw(), drow_lp.data(), M * sizeof(float));
    B.Upload(drow_ent_d_.raw(), drow_ent.data(), M * sizeof(float));
    if (logits_kept_) {  // the Forward's logits, consumed here
      B.LmHeadBackwardKept(dlnf_rows_.f32(), g_.lm_head, drow_lp_d_.f32(), drow_ent_d_.f32(), lnf_rows_.f32(),
                           w_.lm_head, targets_d_.i32(), lm_lse_.f32(), row_ent_.f32(), M, C, config_.vocab_size,
                           temperature_, lm_z_.f32());
      logits_kept_ = false;
    } else {
      B.LmHeadBackward(dlnf_rows_.f32(), g_.lm_head, drow_lp_d_.f32(), drow_ent_d_.f32(), lnf_rows_.f32(),
                       w_.lm_head, targets_d_.i32(), lm_lse_.f32(), row_ent_.f32(), M, C, config_.vocab_size,
                       temperature_);
    }
    // Back to the rows they came from (the rows are distinct: the embedding backward's scatter-add
    // into zeros is a plain scatter).
    B.EmbeddingBackward(dln_.f32(), dlnf_rows_.f32(), lm_rows_d_.i32(), M, C);
  }
  dres_.SetZero();
  B.RmsNormBackward(dres_.f32(), g_.final_norm, dln_.f32(), resid_[L].f32(), w_.final_norm, rstdf_.f32(), N, C);
  // Offsets into the flat buffer (ParamTable order: embedding, layers, final norm, untied lm-head;
  // a layer starts with its input norm). A tied lm-head is the embedding, finished only at the end.
  auto offset = [&](const float* g) { return static_cast<size_t>(g - grads_.f32()); };
  if (ready) ready(offset(g_.final_norm));
  for (int l = L - 1; l >= 0; --l) {
    LayerActs& a = acts_[recompute_ ? 0 : l];
    if (recompute_) {
      // Rebuild this layer's activations from its saved input (its output goes to scratch).
      LayerForward(l, a, resid_[l].f32(), dmid_.f32(), positions_d_.i32(), cu_seqlens_d_.i32(), S_, N,
                   /*ln1_ready=*/false, NextNorm{});
    }
    LayerBackward(l, a, resid_[l].f32(), dres_.f32(), positions_d_.i32(), cu_seqlens_d_.i32(), S_, N);
    if (ready) ready(offset(g_.layers[l].in_norm));
  }
  B.EmbeddingBackward(g_.wte, dres_.f32(), tokens_d_.i32(), N, C);
  if (ready) ready(0);
}

// ---- generation forward ------------------------------------------------------------------------

KvCache Transformer::NewKvCache(int max_batch, int max_len, int num_blocks, int block_size) const {
  AHA_CHECK(max_batch > 0 && max_len > 0 && num_blocks > 0 && block_size > 0)
      << "NewKvCache: max_batch " << max_batch << ", max_len " << max_len << ", num_blocks " << num_blocks
      << ", block_size " << block_size;
  KvCache c;
  c.num_blocks = num_blocks;
  c.block_size = block_size;
  c.max_blocks = (max_len + block_size - 1) / block_size;
  c.max_batch = max_batch;
  c.dtype = backend_->kv_cache_dtype();
  static std::atomic<uint64_t> next_id{1};
  c.id = next_id++;
  for (int l = 0; l < config_.num_layers; ++l) {
    const Shape s{num_blocks + 1, block_size, config_.num_kv_heads, config_.head_dim};
    c.k.emplace_back(c.dtype, s, backend_->device());
    c.v.emplace_back(c.dtype, s, backend_->device());
  }
  return c;
}

void Transformer::EnsureDecodeScratch(int N, int Bn, int max_blocks) {
  if (N <= dec_.capacity && Bn <= dec_.batch && max_blocks <= dec_.max_blocks) return;
  ClearGraphs();  // they hold the old buffers
  ReleaseKept(&kept_dec_);
  const int64_t n = std::max(N, dec_.capacity), b = std::max(Bn, dec_.batch);
  const int64_t C = config_.hidden_size, I = config_.intermediate_size, D = config_.head_dim;
  const int64_t Hq = config_.num_heads, Hkv = config_.num_kv_heads;
  const Device d = backend_->device();
  dec_.capacity = static_cast<int>(n);
  dec_.batch = static_cast<int>(b);
  dec_.max_blocks = std::max(max_blocks, dec_.max_blocks);
  // tokens | cu_q | start | positions | block table, and a decode step's token rows (ForwardCached)
  dec_.ints = Tensor(DType::kI32, {2 * n + 3 * b + 1 + b * dec_.max_blocks}, d);
  dec_.x = Tensor(DType::kF32, {n, C}, d);
  dec_.ln = Tensor(DType::kF32, {n, C}, d);
  dec_.rstd = Tensor(DType::kF32, {std::max(n * (Hq + Hkv), b)}, d);  // a prefill's q and k norms
  dec_.q = Tensor(DType::kF32, {n, Hq * D}, d);
  dec_.k = Tensor(DType::kF32, {n, Hkv * D}, d);
  dec_.v = Tensor(DType::kF32, {n, Hkv * D}, d);
  if (config_.qk_norm) {
    dec_.qn = Tensor(DType::kF32, {n, Hq * D}, d);
    dec_.kn = Tensor(DType::kF32, {n, Hkv * D}, d);
  }
  dec_.att = Tensor(DType::kF32, {n, Hq * D}, d);
  dec_.lse = Tensor(DType::kF32, {n, Hq}, d);
  dec_.tmp = Tensor(DType::kF32, {n, C}, d);
  dec_.gu = Tensor(DType::kF32, {n, 2 * I}, d);
  dec_.qkv = Tensor(DType::kF32, {n, (Hq + 2 * Hkv) * D}, d);
  dec_.h = Tensor(DType::kF32, {n, I}, d);
  dec_.last = Tensor(DType::kF32, {b, C}, d);
  dec_.lastn = Tensor(DType::kF32, {b, C}, d);
  Keep(dec_.ln, &kept_dec_);  // read by the q/k/v and gate/up products only
  Keep(dec_.gu, &kept_dec_);  // as in training: the actor rounds gu as the learner does
  Keep(dec_.h, &kept_dec_);   // read by the down product only, as in training
  Keep(dec_.lastn, &kept_dec_);  // read by the lm-head product only (LinearForward or LmHeadSample)
}

void Transformer::ForwardCached(const int32_t* tokens, const int32_t* cu_q, const int32_t* start,
                                const int32_t* block_table, int Bn, KvCache* cache, float* last_logits,
                                const int32_t* device_tokens, const int32_t* token_rows, const Draw* draw) {
  Backend& B = *backend_;
  AHA_CHECK(Bn >= 1 && Bn <= cache->max_batch) << "ForwardCached: batch " << Bn << " outside 1.." << cache->max_batch;
  int N = cu_q[Bn];
  AHA_CHECK(!device_tokens || (N == Bn && token_rows))
      << "ForwardCached: device tokens need one new token per sequence (not " << N << " for " << Bn
      << ") and its row of the token array";
  const int MB = cache->max_blocks;
  // A decode step runs at a bucket size (a power of two, or the cache's max_batch) so that a few
  // captured graphs cover every batch: rows past Bn are padding (token 0 at position 0 of the
  // cache's pad block); their logits are computed and ignored.
  const bool decode = N == Bn && decode_graphs_ && !B.device().is_cpu();
  int rows = Bn;
  if (decode) {
    rows = 1;
    while (rows < Bn) rows *= 2;
    rows = std::min(rows, cache->max_batch);
  }
  EnsureDecodeScratch(std::max(N, rows), rows, MB);
  // One upload of every integer array: tokens[N] | cu_q[B + 1] | start[B] | positions[N] | table[B, MB].
  std::vector<int32_t> ints;
  if (decode) {
    ints.reserve(3 * rows + 1 + static_cast<size_t>(rows) * MB);
    if (device_tokens) ints.resize(Bn, 0);  // overwritten on the device below
    else ints.insert(ints.end(), tokens, tokens + Bn);
    ints.resize(rows, 0);
    for (int b = 0; b <= rows; ++b) ints.push_back(b);
    ints.insert(ints.end(), start, start + Bn);
    ints.resize(ints.size() + (rows - Bn), 0);
    ints.insert(ints.end(), start, start + Bn);  // positions: one new token at start[b]
    ints.resize(ints.size() + (rows - Bn), 0);
    ints.insert(ints.end(), block_table, block_table + static_cast<size_t>(Bn) * MB);
    ints.resize(ints.size() + static_cast<size_t>(rows - Bn) * MB, cache->pad_block());
    N = rows;
  } else {
    ints.reserve(2 * N + 2 * Bn + 1 + static_cast<size_t>(Bn) * MB);
    if (device_tokens) ints.resize(N, 0);
    else ints.insert(ints.end(), tokens, tokens + N);
    ints.insert(ints.end(), cu_q, cu_q + Bn + 1);
    ints.insert(ints.end(), start, start + Bn);
    for (int b = 0; b < Bn; ++b)
      for (int i = cu_q[b]; i < cu_q[b + 1]; ++i) ints.push_back(start[b] + (i - cu_q[b]));
    ints.insert(ints.end(), block_table, block_table + static_cast<size_t>(Bn) * MB);
    for (int b = 0; b < Bn; ++b) ints.push_back(cu_q[b + 1] - 1);  // each sequence's last row (DecodeBody)
  }
  // With device tokens, their rows go up with the rest (after it) and pick the tokens on the device.
  const size_t rows_at = ints.size();
  if (device_tokens) ints.insert(ints.end(), token_rows, token_rows + Bn);
  B.Upload(dec_.ints.raw(), ints.data(), ints.size() * sizeof(int32_t));
  if (device_tokens) B.GatherInt32(dec_.ints.i32(), device_tokens, dec_.ints.i32() + rows_at, Bn);
  if (!decode) {
    DecodeBody(N, Bn, cache, last_logits, draw, std::all_of(start, start + Bn, [](int32_t s) { return s == 0; }));
    return;
  }
  const uint64_t epoch = B.graph_epoch();
  // Graphs of an earlier cache hold its pools and its generator's logits buffer, which may be gone:
  // keep only the graphs of the cache in use.
  if (!graphs_.empty() && graphs_.front().cache_id != cache->id) ClearGraphs();
  DecodeGraph* g = nullptr;
  const Draw want = draw ? *draw : Draw{};
  for (auto& x : graphs_)
    if (x.bucket == rows && x.cache_id == cache->id && x.logits == last_logits && x.draw == want) g = &x;
  if (g && g->graph && g->epoch != epoch) {  // the backend moved a buffer the graph holds
    B.DestroyGraph(g->graph);
    g->graph = nullptr;
  }
  if (!g) {
    // First sight of this bucket: run directly (this also sizes every scratch buffer).
    graphs_.push_back({rows, cache->id, last_logits, want, epoch, nullptr});
    DecodeBody(N, N, cache, last_logits, draw);
    return;
  }
  if (!g->graph) {
    if (B.BeginCapture()) {
      DecodeBody(N, N, cache, last_logits, draw);
      g->graph = B.EndCapture();
      g->epoch = B.graph_epoch();
    }
    if (!g->graph) {  // capture failed (the backend said why): run directly from now on
      decode_graphs_ = false;
      DecodeBody(N, N, cache, last_logits, draw);
      return;
    }
  }
  B.Replay(g->graph);
}

Result<unsigned> Transformer::ParseDecodeOps(const std::string& list) {
  static const std::pair<const char*, unsigned> kOps[] = {{"qkv", kDecodeQkv}, {"attention", kDecodeAttention},
                                                          {"o", kDecodeO},     {"gateup", kDecodeGateUp},
                                                          {"down", kDecodeDown}, {"lmhead", kDecodeLmHead}};
  unsigned mask = 0;
  if (list.empty()) return mask;
  for (size_t at = 0; at <= list.size();) {
    const size_t end = std::min(list.find(',', at), list.size());
    const std::string op = list.substr(at, end - at);
    unsigned bit = 0;
    for (const auto& [name, b] : kOps)
      if (op == name) bit = b;
    if (!bit) {
      std::string known;
      for (const auto& [name, b] : kOps) known += std::string(known.empty() ? "" : ", ") + name;
      return InvalidArgument("decode op '" + op + "': not one of " + known);
    }
    mask |= bit;
    at = end + 1;
  }
  return mask;
}

void Transformer::DecodeBody(int N, int Bn, KvCache* cache, float* last_logits, const Draw* draw, bool fresh) {
  Backend& B = *backend_;
  // A decode step may leave ops out for timing (set_decode_leave_out); a prefill never does.
  const unsigned skip = N == Bn && !fresh ? decode_leave_out_ : 0;
  const int C = config_.hidden_size, D = config_.head_dim;
  const int Hq = config_.num_heads, Hkv = config_.num_kv_heads;
  const int32_t* d_tokens = dec_.ints.i32();
  const int32_t* d_cu = d_tokens + N;
  const int32_t* d_start = d_cu + Bn + 1;
  const int32_t* d_pos = d_start + Bn;
  const int32_t* d_table = d_pos + N;
  float* x = dec_.x.f32();
  float* ln = dec_.ln.f32();
  float* rstd = dec_.rstd.f32();
  float* tmp = dec_.tmp.f32();
  const int L = config_.num_layers;
  B.EmbeddingForward(x, d_tokens, w_.wte, N, C);
  // Every later norm is fused with the residual add before it (AddRmsNormForward).
  if (L > 0) B.RmsNormForward(ln, rstd, x, w_.layers[0].in_norm, N, C, config_.rms_norm_eps);
  for (int l = 0; l < L; ++l) {
    const LayerWeights& w = w_.layers[l];
    const int I = config_.intermediate_size;
    if (!(skip & kDecodeQkv))
      B.LinearForward(dec_.qkv.f32(), ln, w.q_w, nullptr, N, C, (Hq + 2 * Hkv) * D);  // [Wq; Wk; Wv]
    const PagedKv kv = cache->Layer(l, d_table);
    float* qf = dec_.q.f32();
    if (config_.qk_norm && fresh) {  // Qwen3: the per-head norms sit between the split and the rotation
      B.QkvNormRopeAttention(dec_.att.f32(), dec_.lse.f32(), qf, dec_.k.f32(), dec_.qn.f32(), dec_.kn.f32(),
                             dec_.v.f32(), rstd, rstd + static_cast<size_t>(N) * Hq, dec_.qkv.f32(), w.q_b, w.q_norm,
                             w.k_norm, config_.rms_norm_eps, d_pos, inv_freq_.f32(), d_cu, Bn, N, Hq, Hkv, D);
      B.KvCacheWrite(kv, dec_.kn.f32(), dec_.v.f32(), d_cu, d_start, Bn, N, Hkv, D);
    } else if (config_.qk_norm) {
      if (!(skip & kDecodeAttention))
        B.QkvNormRopeCachedAttention(dec_.att.f32(), qf, dec_.k.f32(), dec_.v.f32(), rstd, dec_.qkv.f32(), w.q_b,
                                     w.q_norm, w.k_norm, config_.rms_norm_eps, d_pos, inv_freq_.f32(), kv, d_cu,
                                     d_start, Bn, N, Hq, Hkv, D);
    } else if (fresh) {  // the training forward's q/k/v step and attention, then the pool write
      B.QkvRopeAttention(dec_.att.f32(), dec_.lse.f32(), qf, dec_.k.f32(), dec_.v.f32(), dec_.qkv.f32(), w.q_b, d_pos,
                         inv_freq_.f32(), d_cu, Bn, N, Hq, Hkv, D);
      B.KvCacheWrite(kv, dec_.k.f32(), dec_.v.f32(), d_cu, d_start, Bn, N, Hkv, D);
    } else if (!(skip & kDecodeAttention)) {
      B.QkvRopeCachedAttention(dec_.att.f32(), qf, dec_.k.f32(), dec_.v.f32(), dec_.qkv.f32(), w.q_b, d_pos,
                               inv_freq_.f32(), kv, d_cu, d_start, Bn, N, Hq, Hkv, D);
    }
    if (!(skip & kDecodeO))
      B.LinearAddRmsNorm(x, ln, rstd, tmp, dec_.att.f32(), w.o_w, w.post_norm, N, Hq * D, C, config_.rms_norm_eps);
    if (!(skip & kDecodeGateUp))
      B.GateUpSwiGlu(dec_.h.f32(), dec_.gu.f32(), ln, w.gate_w, N, C, I);  // [Wg; Wu], then SwiGLU
    // x += down(h) with the norm that reads x next: the next layer's input norm, or after the last
    // layer the final norm when every row is a sequence's last (decode; prefill gathers first).
    const float eps = config_.rms_norm_eps;
    if (skip & kDecodeDown) continue;
    if (l + 1 < L) {
      B.LinearAddRmsNorm(x, ln, rstd, tmp, dec_.h.f32(), w.down_w, w_.layers[l + 1].in_norm, N, I, C, eps);
    } else if (N == Bn) {
      B.LinearAddRmsNorm(x, dec_.lastn.f32(), rstd, tmp, dec_.h.f32(), w.down_w, w_.final_norm, N, I, C, eps);
    } else {
      B.LinearForward(tmp, dec_.h.f32(), w.down_w, nullptr, N, I, C);
      B.Add(x, x, tmp, static_cast<size_t>(N) * C);
    }
  }
  // Only each sequence's last row needs logits. Decode (one row per sequence) needs no gather; else
  // one gather of the rows whose indices ForwardCached put after the block table.
  if (N != Bn) {
    B.EmbeddingForward(dec_.last.f32(), d_table + static_cast<size_t>(Bn) * cache->max_blocks, x, Bn, C);
    B.RmsNormForward(dec_.lastn.f32(), rstd, dec_.last.f32(), w_.final_norm, Bn, C, config_.rms_norm_eps);
  } else if (L == 0) {
    B.RmsNormForward(dec_.lastn.f32(), rstd, x, w_.final_norm, Bn, C, config_.rms_norm_eps);
  }
  const int V = config_.vocab_size;
  if (!draw) {
    if (!(skip & kDecodeLmHead)) B.LinearForward(last_logits, dec_.lastn.f32(), w_.lm_head, nullptr, Bn, C, V);
  } else if (skip & kDecodeLmHead) {  // timing only: the draw alone, from stale logits
    B.SampleRows(draw->tokens, draw->logprobs, last_logits, Bn, V, draw->temperature, draw->top_k, draw->top_p,
                 draw->seeds, draw->counters);
  } else {
    B.LmHeadSample(draw->tokens, draw->logprobs, last_logits, dec_.lastn.f32(), w_.lm_head, Bn, C, V,
                   draw->temperature, draw->top_k, draw->top_p, draw->seeds, draw->counters);
  }
}

}  // namespace aha::engine
