#include "learner/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

namespace aha {
namespace fs = std::filesystem;

namespace {

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

constexpr char kOptimizerMagic[8] = {'A', 'H', 'A', 'O', 'P', 'T', '0', '1'};

// One sequence of the batch, with where its completion sits in its micro-batch.
struct Packed {
  const TrainSample* sample;
  float advantage;
  bool masked;
};

}  // namespace

Result<std::unique_ptr<GrpoTrainer>> GrpoTrainer::Create(const TrainerOptions& options, engine::Backend* backend) {
  std::unique_ptr<GrpoTrainer> t(new GrpoTrainer());
  t->options_ = options;
  t->backend_ = backend;
  const GrpoConfig& g = options.grpo;
  ASSIGN_OR_RETURN(t->scale_, ParseAdvantageScale(g.advantage_scale));
  ASSIGN_OR_RETURN(t->loss_options_.aggregation, ParseLossAggregation(g.loss_aggregation));
  ASSIGN_OR_RETURN(t->loss_options_.ratio, ParseRatioLevel(g.ratio));
  t->loss_options_.clip_low = g.clip_low;
  t->loss_options_.clip_high = g.clip_high;
  t->loss_options_.beta = g.beta;
  t->loss_options_.max_len = g.max_new_tokens;
  ASSIGN_OR_RETURN(t->model_, engine::Transformer::Load(options.model_dir, backend));
  if (g.beta > 0) {
    // The frozen reference: a second copy, refreshed every ref_reset_every steps.
    ASSIGN_OR_RETURN(t->reference_, engine::Transformer::Load(options.model_dir, backend));
  }
  engine::AdamWOptions adam;
  adam.lr = static_cast<float>(g.lr);
  adam.beta1 = static_cast<float>(g.adam_beta1);
  adam.beta2 = static_cast<float>(g.adam_beta2);
  adam.eps = static_cast<float>(g.adam_eps);
  adam.weight_decay = static_cast<float>(g.weight_decay);
  t->optimizer_ = std::make_unique<engine::AdamW>(t->model_.get(), adam);
  return t;
}

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
  const int V = model_->config().vocab_size;
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

  std::vector<std::vector<float>> rewards;
  for (const auto& grp : groups) {
    rewards.emplace_back();
    for (const auto& s : grp.samples) rewards.back().push_back(s.reward);
  }
  auto adv = GroupAdvantages(rewards, scale_, g.std_eps);

  std::vector<Packed> seqs;
  Normaliser norm;
  double reward_sum = 0, correct = 0, length_sum = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    for (size_t si = 0; si < groups[gi].samples.size(); ++si) {
      const TrainSample& s = groups[gi].samples[si];
      bool masked = g.overlong_filter && s.truncated;
      seqs.push_back({&s, adv[gi][si], masked});
      norm.total_sequences++;
      if (!masked) norm.total_tokens += static_cast<int64_t>(s.completion.size());
      reward_sum += s.reward;
      correct += s.correct ? 1 : 0;
      length_sum += static_cast<double>(s.completion.size());
      st.max_staleness = std::max(st.max_staleness, static_cast<double>(learner_version) - static_cast<double>(s.min_version));
    }
  }
  const double n_seq = static_cast<double>(seqs.size());
  st.sequences = static_cast<int64_t>(seqs.size());
  st.reward_mean = reward_sum / n_seq;
  st.accuracy = correct / n_seq;
  st.length_mean = length_sum / n_seq;
  if (norm.total_tokens == 0) norm.total_tokens = 1;  // every sequence masked: zero loss, no division by 0

  int64_t clipped_low = 0, clipped_high = 0, clip_units = 0;
  double entropy_sum = 0;
  int64_t entropy_count = 0;
  std::vector<int32_t> tokens, cu;
  std::vector<float> logprobs, entropies, ref_logprobs, dlogprobs;
  size_t next = 0;
  while (next < seqs.size()) {
    // Pack sequences [next, end) into one micro-batch.
    size_t end = next;
    int64_t n_tokens = 0;
    while (end < seqs.size()) {
      int64_t len = static_cast<int64_t>(seqs[end].sample->prompt.size() + seqs[end].sample->completion.size());
      if (end > next && n_tokens + len > g.micro_batch_tokens) break;
      n_tokens += len;
      ++end;
    }
    tokens.clear();
    cu.assign(1, 0);
    for (size_t i = next; i < end; ++i) {
      const TrainSample& s = *seqs[i].sample;
      tokens.insert(tokens.end(), s.prompt.begin(), s.prompt.end());
      tokens.insert(tokens.end(), s.completion.begin(), s.completion.end());
      cu.push_back(static_cast<int32_t>(tokens.size()));
    }
    const int N = static_cast<int>(tokens.size()), S = static_cast<int>(end - next);
    logprobs.assign(N, 0.f);
    entropies.assign(N, 0.f);
    auto t0 = std::chrono::steady_clock::now();
    model_->Forward(tokens.data(), cu.data(), S, N, static_cast<float>(g.temperature), logprobs.data(), entropies.data());
    if (reference_) {
      ref_logprobs.assign(N, 0.f);
      std::vector<float> ref_entropy(N);
      reference_->Forward(tokens.data(), cu.data(), S, N, static_cast<float>(g.temperature), ref_logprobs.data(),
                          ref_entropy.data());
    }
    st.forward_s += Seconds(t0);

    std::vector<SequenceInput> inputs;
    for (size_t i = next; i < end; ++i) {
      const TrainSample& s = *seqs[i].sample;
      size_t first = static_cast<size_t>(cu[i - next]) + s.prompt.size();
      size_t C = s.completion.size();
      SequenceInput in;
      in.new_logp = std::span<const float>(logprobs.data() + first, C);
      in.old_logp = s.behaviour_logprobs;
      if (reference_) in.ref_logp = std::span<const float>(ref_logprobs.data() + first, C);
      in.advantage = seqs[i].advantage;
      in.masked = seqs[i].masked;
      inputs.push_back(in);
      for (size_t t = 0; t < C; ++t) entropy_sum += entropies[first + t];
      entropy_count += static_cast<int64_t>(C);
    }
    ASSIGN_OR_RETURN(GrpoLossOutput out, GrpoLoss(inputs, loss_options_, norm));
    st.loss += out.loss;
    st.pg_loss += out.pg_loss;
    st.kl += out.kl;
    clipped_low += out.clipped_low;
    clipped_high += out.clipped_high;
    clip_units += out.clip_units;

    dlogprobs.assign(N, 0.f);
    for (size_t i = next; i < end; ++i) {
      size_t first = static_cast<size_t>(cu[i - next]) + seqs[i].sample->prompt.size();
      const auto& grad = out.grad[i - next];
      std::copy(grad.begin(), grad.end(), dlogprobs.begin() + static_cast<std::ptrdiff_t>(first));
    }
    auto t1 = std::chrono::steady_clock::now();
    model_->Backward(dlogprobs.data(), nullptr);
    backend_->Synchronize();  // device ops are asynchronous: charge the backward to the backward
    st.backward_s += Seconds(t1);
    st.tokens += N;
    next = end;
  }
  for (const auto& p : seqs) st.completion_tokens += static_cast<int64_t>(p.sample->completion.size());
  st.entropy = entropy_count ? entropy_sum / static_cast<double>(entropy_count) : 0;
  st.clip_low = clip_units ? static_cast<double>(clipped_low) / static_cast<double>(clip_units) : 0;
  st.clip_high = clip_units ? static_cast<double>(clipped_high) / static_cast<double>(clip_units) : 0;

  auto t2 = std::chrono::steady_clock::now();
  st.grad_norm = engine::ClipGradNorm(backend_, model_->grads(), model_->num_params(), g.grad_clip);
  st.lr = LearningRate(optimizer_->step() + 1);
  optimizer_->Step(static_cast<float>(st.lr));
  model_->ZeroGrad();
  st.step = optimizer_->step();
  if (reference_ && g.ref_reset_every > 0 && st.step % g.ref_reset_every == 0) ResetReference();
  backend_->Synchronize();
  st.optimizer_s = Seconds(t2);
  return st;
}

void GrpoTrainer::ResetReference() {
  backend_->Copy(reference_->params(), model_->params(), model_->num_params() * sizeof(float));
  reference_->ParamsChanged();
}

Status GrpoTrainer::Checkpoint(const std::string& dir, uint64_t policy_version) const {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return IoError("cannot create checkpoint directory " + dir + ": " + ec.message());
  RETURN_IF_ERROR(model_->Save(dir, engine::DType::kF32));
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
    fs::path src = fs::path(options_.model_dir) / f;
    if (fs::exists(src)) fs::copy_file(src, fs::path(dir) / f, fs::copy_options::overwrite_existing, ec);
    if (ec) return IoError("cannot copy " + src.string() + " into " + dir + ": " + ec.message());
  }
  {
    std::ofstream f(fs::path(dir) / "optimizer.bin", std::ios::binary);
    uint64_t n = model_->num_params();
    int64_t step = optimizer_->step();
    f.write(kOptimizerMagic, 8);
    f.write(reinterpret_cast<const char*>(&n), 8);
    f.write(reinterpret_cast<const char*>(&step), 8);
    std::vector<float> host = optimizer_->m().ToVector();
    f.write(reinterpret_cast<const char*>(host.data()), static_cast<std::streamsize>(n * 4));
    host = optimizer_->v().ToVector();
    f.write(reinterpret_cast<const char*>(host.data()), static_cast<std::streamsize>(n * 4));
    if (reference_) {
      reference_->CopyParamsToHost(host.data());
      f.write(reinterpret_cast<const char*>(host.data()), static_cast<std::streamsize>(n * 4));
    }
    if (!f) return IoError("cannot write " + dir + "/optimizer.bin");
  }
  nlohmann::json j = {{"step", optimizer_->step()}, {"policy_version", policy_version},
                      {"has_reference", reference_ != nullptr}};
  std::ofstream(fs::path(dir) / "trainer.json") << j.dump(2) << "\n";
  return OkStatus();
}

Result<uint64_t> GrpoTrainer::Restore(const std::string& dir) {
  ASSIGN_OR_RETURN(auto loaded, engine::Transformer::Load(dir, backend_));
  if (loaded->num_params() != model_->num_params())
    return InvalidArgument(dir + ": checkpoint has " + std::to_string(loaded->num_params()) + " parameters, model has " +
                           std::to_string(model_->num_params()));
  backend_->Copy(model_->params(), loaded->params(), model_->num_params() * sizeof(float));
  model_->ParamsChanged();
  std::ifstream f(fs::path(dir) / "optimizer.bin", std::ios::binary);
  if (!f) return NotFound(dir + "/optimizer.bin: missing");
  char magic[8];
  uint64_t n = 0;
  int64_t step = 0;
  f.read(magic, 8);
  f.read(reinterpret_cast<char*>(&n), 8);
  f.read(reinterpret_cast<char*>(&step), 8);
  if (!f || std::memcmp(magic, kOptimizerMagic, 8) != 0) return DataLoss(dir + "/optimizer.bin: bad header");
  if (n != model_->num_params()) return DataLoss(dir + "/optimizer.bin: moment size disagrees with the model");
  std::vector<float> m(n), v(n), ref(reference_ ? n : 0);
  f.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(n * 4));
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * 4));
  if (reference_) f.read(reinterpret_cast<char*>(ref.data()), static_cast<std::streamsize>(n * 4));
  if (!f) return DataLoss(dir + "/optimizer.bin: truncated");
  backend_->Upload(optimizer_->m().raw(), m.data(), n * 4);
  backend_->Upload(optimizer_->v().raw(), v.data(), n * 4);
  if (reference_) reference_->SetParams(ref.data());
  optimizer_->set_step(step);
  std::ifstream tj(fs::path(dir) / "trainer.json");
  if (!tj) return NotFound(dir + "/trainer.json: missing");
  nlohmann::json j = nlohmann::json::parse(tj, nullptr, false);
  if (j.is_discarded() || !j.contains("policy_version")) return DataLoss(dir + "/trainer.json: malformed");
  return j["policy_version"].get<uint64_t>();
}

}  // namespace aha
