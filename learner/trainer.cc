#include "learner/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "common/check.h"
#include "common/clock.h"
#include "engine/cpu_backend.h"

namespace aha {
namespace fs = std::filesystem;

namespace {

// optimizer.bin holds flat buffers in the model's ParamTable order. Version 02: each layer's q/k/v
// weights are adjacent, then their biases. Version 01 interleaved q_w, q_b, k_w, k_b, v_w, v_b: the
// same layout for models without attention biases (Qwen3, Llama), a different one for Qwen2.
constexpr char kOptimizerMagic[8] = {'A', 'H', 'A', 'O', 'P', 'T', '0', '2'};
constexpr char kOptimizerMagicV1[8] = {'A', 'H', 'A', 'O', 'P', 'T', '0', '1'};

// One sequence of the batch, with its advantage and whether overlong filtering masks it.
struct Packed {
  const TrainSample* sample;
  float advantage;
  bool masked;
};

}  // namespace

struct GrpoTrainer::Replica {
  engine::Backend* backend = nullptr;
  std::unique_ptr<engine::Transformer> model, reference;
  std::unique_ptr<engine::AdamW> optimizer;
  // Micro-batch buffers, reused from step to step.
  std::vector<int32_t> tokens, cu, score_from;
  std::vector<float> logprobs, entropies, ref_logprobs, ref_entropies, dlogprobs;
};

// One replica's share of a step: its sequences in, its part of the statistics out.
struct GrpoTrainer::Shard {
  std::vector<Packed> seqs;
  const Normaliser* norm = nullptr;  // the whole batch's
  double loss = 0, pg_loss = 0, kl = 0, entropy_sum = 0;
  int64_t entropy_count = 0, clipped_low = 0, clipped_high = 0, clip_units = 0, tokens = 0;
  double forward_s = 0, backward_s = 0, reduce_s = 0, loss_s = 0;
};

Result<std::unique_ptr<GrpoTrainer>> GrpoTrainer::Create(const TrainerOptions& options,
                                                         const std::vector<engine::Backend*>& backends) {
  if (backends.empty()) return InvalidArgument("the trainer needs at least one backend");
  // A backend takes ops from one thread at a time (backend.h), and each replica has its own thread.
  if (std::set<engine::Backend*>(backends.begin(), backends.end()).size() != backends.size())
    return InvalidArgument("two replicas share a backend: give each its own");
  std::unique_ptr<GrpoTrainer> t(new GrpoTrainer());
  t->options_ = options;
  const GrpoConfig& g = options.grpo;
  ASSIGN_OR_RETURN(t->scale_, ParseAdvantageScale(g.advantage_scale));
  ASSIGN_OR_RETURN(t->loss_options_.aggregation, ParseLossAggregation(g.loss_aggregation));
  ASSIGN_OR_RETURN(t->loss_options_.ratio, ParseRatioLevel(g.ratio));
  t->loss_options_.clip_low = g.clip_low;
  t->loss_options_.clip_high = g.clip_high;
  t->loss_options_.beta = g.beta;
  t->loss_options_.max_len = g.max_new_tokens;
  engine::AdamWOptions adam;
  adam.lr = static_cast<float>(g.lr);
  adam.beta1 = static_cast<float>(g.adam_beta1);
  adam.beta2 = static_cast<float>(g.adam_beta2);
  adam.eps = static_cast<float>(g.adam_eps);
  adam.weight_decay = static_cast<float>(g.weight_decay);

  std::vector<engine::Device> devices;
  for (auto* b : backends) devices.push_back(b->device());
  ASSIGN_OR_RETURN(t->threads_, ReplicaThreads::Start(devices));
  t->replicas_.resize(backends.size());
  // Every replica loads the same file the same way: identical starting weights on every device.
  RETURN_IF_ERROR(t->threads_->Run([&](int r) -> Status {
    auto rep = std::make_unique<Replica>();
    rep->backend = backends[static_cast<size_t>(r)];
    ASSIGN_OR_RETURN(rep->model, engine::Transformer::Load(options.model_dir, rep->backend));
    if (g.beta > 0) {
      // The frozen reference: a second copy, refreshed every ref_reset_every steps. It only runs
      // forwards, so one layer's activation buffers serve all layers (the recompute layout; the
      // same ops, the same results) instead of every layer's, which only a backward reads; and its
      // forward skips what only a backward reads (Transformer::set_forward_only).
      ASSIGN_OR_RETURN(rep->reference, engine::Transformer::Load(options.model_dir, rep->backend));
      rep->reference->set_recompute(true);
      rep->reference->set_forward_only(true);
    }
    rep->optimizer = std::make_unique<engine::AdamW>(rep->model.get(), adam);
    rep->model->ZeroGrad();  // allocates the gradient buffer the reducer binds to
    t->replicas_[static_cast<size_t>(r)] = std::move(rep);
    return OkStatus();
  }));
  if (backends.size() > 1) {
    ASSIGN_OR_RETURN(t->reducer_, GradReducer::Create(backends, t->model().num_params(), options.reduce_bucket_bytes));
    RETURN_IF_ERROR(t->threads_->Run([&](int r) { return t->reducer_->Attach(r, t->model(r).grads()); }));
  }
  // The caller reads replica 0 (publication, tests) from its own thread.
  RETURN_IF_ERROR(BindThreadToDevice(devices[0]));
  return t;
}

GrpoTrainer::~GrpoTrainer() {
  // Device buffers are released on the thread bound to their device.
  if (threads_) {
    Status s = threads_->Run([this](int r) {
      if (static_cast<size_t>(r) < replicas_.size()) replicas_[static_cast<size_t>(r)].reset();
      return OkStatus();
    });
    AHA_CHECK(s.ok()) << s.ToString();
  }
  reducer_.reset();
}

engine::Transformer& GrpoTrainer::model(int replica) { return *replicas_.at(static_cast<size_t>(replica))->model; }

int64_t GrpoTrainer::step() const { return replicas_[0]->optimizer->step(); }

double GrpoTrainer::LearningRate(int64_t step) const {
  const GrpoConfig& g = options_.grpo;
  double s = static_cast<double>(step), w = static_cast<double>(g.warmup_steps);
  if (g.lr_schedule == "constant") return g.lr;
  if (w > 0 && s <= w) return g.lr * s / w;
  if (g.lr_schedule == "warmup") return g.lr;
  double span = std::max(1.0, static_cast<double>(g.steps) - w);
  double progress = std::clamp((s - w) / span, 0.0, 1.0);
  return g.lr * (g.min_lr_ratio + (1 - g.min_lr_ratio) * 0.5 * (1 + std::cos(M_PI * progress)));
}

Status GrpoTrainer::Validate(const std::vector<TrainGroup>& groups) const {
  if (groups.empty()) return InvalidArgument("empty batch");
  const int V = replicas_[0]->model->config().vocab_size;
  for (const auto& g : groups) {
    if (g.samples.empty()) return InvalidArgument("group " + g.id + " has no samples");
    for (size_t i = 0; i < g.samples.size(); ++i) {
      const auto& s = g.samples[i];
      std::string where = "group " + g.id + " sample " + std::to_string(i);
      if (s.prompt.empty()) return InvalidArgument(where + ": empty prompt");
      if (s.behaviour_logprobs.size() != s.completion.size())
        return InvalidArgument(where + ": " + std::to_string(s.completion.size()) + " completion tokens but " +
                               std::to_string(s.behaviour_logprobs.size()) + " behaviour log-probs");
      for (const auto* v : {&s.prompt, &s.completion})
        for (int32_t tok : *v)
          if (tok < 0 || tok >= V) return InvalidArgument(where + ": token " + std::to_string(tok) + " is outside the vocabulary");
    }
  }
  return OkStatus();
}

Result<StepStats> GrpoTrainer::Step(const std::vector<TrainGroup>& groups, uint64_t learner_version) {
  RETURN_IF_ERROR(Validate(groups));
  const GrpoConfig& g = options_.grpo;
  StepStats st;

  // Advantages, normalisers and sample statistics are over the whole batch, before it is split.
  std::vector<std::vector<float>> rewards;
  std::vector<int64_t> group_tokens;
  for (const auto& grp : groups) {
    rewards.emplace_back();
    group_tokens.push_back(0);
    for (const auto& s : grp.samples) {
      rewards.back().push_back(s.reward);
      group_tokens.back() += static_cast<int64_t>(s.prompt.size() + s.completion.size());
    }
  }
  auto adv = GroupAdvantages(rewards, scale_, g.std_eps);
  Normaliser norm;
  double reward_sum = 0, correct = 0, length_sum = 0;
  for (const auto& grp : groups) {
    for (const TrainSample& s : grp.samples) {
      norm.total_sequences++;
      if (!(g.overlong_filter && s.truncated)) norm.total_tokens += static_cast<int64_t>(s.completion.size());
      reward_sum += s.reward;
      correct += s.correct ? 1 : 0;
      length_sum += static_cast<double>(s.completion.size());
      st.completion_tokens += static_cast<int64_t>(s.completion.size());
      st.max_staleness = std::max(st.max_staleness, static_cast<double>(learner_version) - static_cast<double>(s.min_version));
    }
  }
  const double n_seq = static_cast<double>(norm.total_sequences);
  st.sequences = norm.total_sequences;
  st.reward_mean = reward_sum / n_seq;
  st.accuracy = correct / n_seq;
  st.length_mean = length_sum / n_seq;
  if (norm.total_tokens == 0) norm.total_tokens = 1;  // every sequence masked: zero loss, no division by 0

  const auto parts = BalanceByTokens(group_tokens, replicas());
  std::vector<Shard> shards(parts.size());
  for (size_t r = 0; r < parts.size(); ++r) {
    shards[r].norm = &norm;
    for (size_t gi : parts[r])
      for (size_t si = 0; si < groups[gi].samples.size(); ++si) {
        const TrainSample& s = groups[gi].samples[si];
        shards[r].seqs.push_back({&s, adv[gi][si], g.overlong_filter && s.truncated});
      }
  }
  Status pass = threads_->Run([&](int r) { return ForwardBackward(r, shards[static_cast<size_t>(r)]); });
  if (!pass.ok()) {
    // Drop the partial gradients: the next step must start from zero.
    Status zero = threads_->Run([&](int r) {
      model(r).ZeroGrad();
      return OkStatus();
    });
    AHA_CHECK(zero.ok()) << zero.ToString();
    return pass;
  }

  // Sums of the replicas' parts (each already normalised by the whole batch's counts), and ratios
  // of summed counts: exactly what one replica over the whole batch reports.
  int64_t clipped_low = 0, clipped_high = 0, clip_units = 0, entropy_count = 0;
  double entropy_sum = 0;
  for (const Shard& sh : shards) {
    st.loss += sh.loss;
    st.pg_loss += sh.pg_loss;
    st.kl += sh.kl;
    st.tokens += sh.tokens;
    entropy_sum += sh.entropy_sum;
    entropy_count += sh.entropy_count;
    clipped_low += sh.clipped_low;
    clipped_high += sh.clipped_high;
    clip_units += sh.clip_units;
    st.forward_s = std::max(st.forward_s, sh.forward_s);
    st.backward_s = std::max(st.backward_s, sh.backward_s);
    st.reduce_s = std::max(st.reduce_s, sh.reduce_s);
    st.loss_s = std::max(st.loss_s, sh.loss_s);
  }
  st.entropy = entropy_count ? entropy_sum / static_cast<double>(entropy_count) : 0;
  st.clip_low = clip_units ? static_cast<double>(clipped_low) / static_cast<double>(clip_units) : 0;
  st.clip_high = clip_units ? static_cast<double>(clipped_high) / static_cast<double>(clip_units) : 0;

  st.lr = LearningRate(step() + 1);
  std::vector<double> norms(shards.size()), seconds(shards.size());
  Status opt = threads_->Run([&](int r) {
    OptimizerStep(r, st.lr, &norms[static_cast<size_t>(r)], &seconds[static_cast<size_t>(r)]);
    return OkStatus();
  });
  AHA_CHECK(opt.ok()) << opt.ToString();
  // Every replica clipped the same summed gradient: a different norm means the replicas diverged.
  for (double n : norms) AHA_CHECK_EQ(n, norms[0]) << "data-parallel replicas disagree on the gradient";
  st.grad_norm = norms[0];
  st.optimizer_s = *std::max_element(seconds.begin(), seconds.end());
  st.step = step();
  return st;
}

Status GrpoTrainer::ForwardBackward(int rank, Shard& sh) {
  Replica& rep = *replicas_[static_cast<size_t>(rank)];
  const GrpoConfig& g = options_.grpo;
  const float temperature = static_cast<float>(g.temperature);
  Status status;
  size_t next = 0;
  while (status.ok() && next < sh.seqs.size()) {
    // Pack sequences [next, end) into one micro-batch.
    size_t end = next;
    int64_t n_tokens = 0;
    while (end < sh.seqs.size()) {
      int64_t len = static_cast<int64_t>(sh.seqs[end].sample->prompt.size() + sh.seqs[end].sample->completion.size());
      if (end > next && n_tokens + len > g.micro_batch_tokens) break;
      n_tokens += len;
      ++end;
    }
    rep.tokens.clear();
    rep.cu.assign(1, 0);
    rep.score_from.clear();  // the loss reads completions alone: prompt rows skip the lm-head
    for (size_t i = next; i < end; ++i) {
      const TrainSample& s = *sh.seqs[i].sample;
      rep.score_from.push_back(static_cast<int32_t>(s.prompt.size()));
      rep.tokens.insert(rep.tokens.end(), s.prompt.begin(), s.prompt.end());
      rep.tokens.insert(rep.tokens.end(), s.completion.begin(), s.completion.end());
      rep.cu.push_back(static_cast<int32_t>(rep.tokens.size()));
    }
    const int N = static_cast<int>(rep.tokens.size()), S = static_cast<int>(end - next);
    rep.logprobs.assign(N, 0.f);
    rep.entropies.assign(N, 0.f);
    auto t0 = std::chrono::steady_clock::now();
    rep.model->Forward(rep.tokens.data(), rep.cu.data(), S, N, temperature, rep.logprobs.data(), rep.entropies.data(),
                       rep.score_from.data());
    if (rep.reference) {
      rep.ref_logprobs.assign(N, 0.f);
      rep.ref_entropies.assign(N, 0.f);
      rep.reference->Forward(rep.tokens.data(), rep.cu.data(), S, N, temperature, rep.ref_logprobs.data(),
                             rep.ref_entropies.data(), rep.score_from.data());
    }
    sh.forward_s += SecondsSince(t0);
    const auto t_loss = std::chrono::steady_clock::now();

    std::vector<SequenceInput> inputs;
    for (size_t i = next; i < end; ++i) {
      const TrainSample& s = *sh.seqs[i].sample;
      size_t first = static_cast<size_t>(rep.cu[i - next]) + s.prompt.size();
      size_t C = s.completion.size();
      SequenceInput in;
      in.new_logp = std::span<const float>(rep.logprobs.data() + first, C);
      in.old_logp = s.behaviour_logprobs;
      if (rep.reference) in.ref_logp = std::span<const float>(rep.ref_logprobs.data() + first, C);
      in.advantage = sh.seqs[i].advantage;
      in.masked = sh.seqs[i].masked;
      inputs.push_back(in);
      for (size_t t = 0; t < C; ++t) sh.entropy_sum += rep.entropies[first + t];
      sh.entropy_count += static_cast<int64_t>(C);
    }
    auto out = GrpoLoss(inputs, loss_options_, *sh.norm);
    if (!out.ok()) {
      status = out.status();
      break;
    }
    sh.loss += out->loss;
    sh.pg_loss += out->pg_loss;
    sh.kl += out->kl;
    sh.clipped_low += out->clipped_low;
    sh.clipped_high += out->clipped_high;
    sh.clip_units += out->clip_units;

    rep.dlogprobs.assign(N, 0.f);
    for (size_t i = next; i < end; ++i) {
      size_t first = static_cast<size_t>(rep.cu[i - next]) + sh.seqs[i].sample->prompt.size();
      const auto& grad = out->grad[i - next];
      std::copy(grad.begin(), grad.end(), rep.dlogprobs.begin() + static_cast<std::ptrdiff_t>(first));
    }
    // The last micro-batch's backward finishes the gradients: hand buckets to the reduction as
    // the backward passes them.
    engine::Transformer::GradsReady ready;
    if (reducer_ && end == sh.seqs.size())
      ready = [&](size_t begin) {
        if (status.ok()) status = reducer_->GradsReady(rank, begin);
      };
    sh.loss_s += SecondsSince(t_loss);
    auto t1 = std::chrono::steady_clock::now();
    rep.model->Backward(rep.dlogprobs.data(), nullptr, ready);
    rep.backend->Synchronize();  // device ops are asynchronous: charge the backward to the backward
    sh.backward_s += SecondsSince(t1);
    sh.tokens += N;
    next = end;
  }
  if (reducer_) {
    // Also after a failure or with no sequences at all: the other ranks wait for this one's buckets.
    auto t2 = std::chrono::steady_clock::now();
    Status reduced = reducer_->Finish(rank);
    sh.reduce_s = SecondsSince(t2);
    if (status.ok()) status = reduced;
  }
  return status;
}

void GrpoTrainer::OptimizerStep(int rank, double lr, double* grad_norm, double* seconds) {
  Replica& rep = *replicas_[static_cast<size_t>(rank)];
  const GrpoConfig& g = options_.grpo;
  auto t = std::chrono::steady_clock::now();
  *grad_norm = engine::ClipGradNorm(rep.backend, rep.model->grads(), rep.model->num_params(), g.grad_clip);
  rep.optimizer->Step(static_cast<float>(lr));
  rep.model->ZeroGrad();
  if (rep.reference && g.ref_reset_every > 0 && rep.optimizer->step() % g.ref_reset_every == 0) {
    rep.backend->Copy(rep.reference->params(), rep.model->params(), rep.model->num_params() * sizeof(float));
    rep.reference->ParamsChanged();
  }
  rep.backend->Synchronize();
  *seconds = SecondsSince(t);
}

Status GrpoTrainer::Checkpoint(const std::string& dir, uint64_t policy_version) const {
  // Replicas hold the same weights and moments: replica 0's are the checkpoint.
  return threads_->RunOn(0, [&] { return SaveReplica0(dir, policy_version); });
}

Status GrpoTrainer::SaveReplica0(const std::string& dir, uint64_t policy_version) const {
  const Replica& rep = *replicas_[0];
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return IoError("cannot create checkpoint directory " + dir + ": " + ec.message());
  RETURN_IF_ERROR(rep.model->Save(dir, engine::DType::kF32));
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
    fs::path src = fs::path(options_.model_dir) / f;
    if (fs::exists(src)) fs::copy_file(src, fs::path(dir) / f, fs::copy_options::overwrite_existing, ec);
    if (ec) return IoError("cannot copy " + src.string() + " into " + dir + ": " + ec.message());
  }
  {
    std::ofstream f(fs::path(dir) / "optimizer.bin", std::ios::binary);
    uint64_t n = rep.model->num_params();
    int64_t step = rep.optimizer->step();
    f.write(kOptimizerMagic, 8);
    f.write(reinterpret_cast<const char*>(&n), 8);
    f.write(reinterpret_cast<const char*>(&step), 8);
    std::vector<float> host = rep.optimizer->m().ToVector();
    f.write(reinterpret_cast<const char*>(host.data()), static_cast<std::streamsize>(n * 4));
    host = rep.optimizer->v().ToVector();
    f.write(reinterpret_cast<const char*>(host.data()), static_cast<std::streamsize>(n * 4));
    if (rep.reference) {
      rep.reference->CopyParamsToHost(host.data());
      f.write(reinterpret_cast<const char*>(host.data()), static_cast<std::streamsize>(n * 4));
    }
    if (!f) return IoError("cannot write " + dir + "/optimizer.bin");
  }
  nlohmann::json j = {{"step", rep.optimizer->step()}, {"policy_version", policy_version},
                      {"has_reference", rep.reference != nullptr}};
  std::ofstream(fs::path(dir) / "trainer.json") << j.dump(2) << "\n";
  return OkStatus();
}

Result<uint64_t> GrpoTrainer::Restore(const std::string& dir) {
  // Everything is read and checked on the host first, once for all replicas, so that a bad
  // checkpoint leaves the trainer as it was.
  engine::CpuBackend host;
  ASSIGN_OR_RETURN(auto loaded, engine::Transformer::Load(dir, &host));
  const size_t params = model().num_params();
  const bool has_reference = replicas_[0]->reference != nullptr;
  if (loaded->num_params() != params)
    return InvalidArgument(dir + ": checkpoint has " + std::to_string(loaded->num_params()) + " parameters, model has " +
                           std::to_string(params));
  std::ifstream f(fs::path(dir) / "optimizer.bin", std::ios::binary);
  if (!f) return NotFound(dir + "/optimizer.bin: missing");
  char magic[8];
  uint64_t n = 0;
  int64_t step = 0;
  f.read(magic, 8);
  f.read(reinterpret_cast<char*>(&n), 8);
  f.read(reinterpret_cast<char*>(&step), 8);
  if (f && std::memcmp(magic, kOptimizerMagicV1, 8) == 0 && model().config().attention_bias)
    return DataLoss(dir + "/optimizer.bin: written by an older aha whose flat layout interleaves the q/k/v "
                          "weights and biases; this model has attention biases, so it cannot resume from it");
  if (!f || (std::memcmp(magic, kOptimizerMagic, 8) != 0 && std::memcmp(magic, kOptimizerMagicV1, 8) != 0))
    return DataLoss(dir + "/optimizer.bin: bad header");
  if (n != params) return DataLoss(dir + "/optimizer.bin: moment size disagrees with the model");
  std::vector<float> m(n), v(n), ref(has_reference ? n : 0);
  f.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(n * 4));
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * 4));
  if (has_reference) f.read(reinterpret_cast<char*>(ref.data()), static_cast<std::streamsize>(n * 4));
  if (!f) return DataLoss(dir + "/optimizer.bin: truncated");
  std::ifstream tj(fs::path(dir) / "trainer.json");
  if (!tj) return NotFound(dir + "/trainer.json: missing");
  nlohmann::json j = nlohmann::json::parse(tj, nullptr, false);
  if (j.is_discarded() || !j.contains("policy_version") || !j["policy_version"].is_number_unsigned())
    return DataLoss(dir + "/trainer.json: malformed");
  RETURN_IF_ERROR(threads_->Run([&](int r) {
    Replica& rep = *replicas_[static_cast<size_t>(r)];
    rep.model->SetParams(loaded->params());
    rep.backend->Upload(rep.optimizer->m().raw(), m.data(), n * 4);
    rep.backend->Upload(rep.optimizer->v().raw(), v.data(), n * 4);
    if (rep.reference) rep.reference->SetParams(ref.data());
    rep.optimizer->set_step(step);
    rep.backend->Synchronize();  // the host buffers above go away when Restore returns
    return OkStatus();
  }));
  return j["policy_version"].get<uint64_t>();
}

}  // namespace aha
