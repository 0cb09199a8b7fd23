// Shared by the learner's trainer tests: a tiny random model saved to a temporary directory (one per
// test binary), the trainer settings they start from, and batches of on-policy samples from it.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/generate.h"
#include "learner/trainer.h"

namespace aha::trainer_test {

namespace fs = std::filesystem;

struct TinyModel {
  fs::path dir;
  engine::CpuBackend backend;
  explicit TinyModel(bool tie_word_embeddings = true) {
    dir = fs::temp_directory_path() /
          ("aha_trainer_model_" + std::string(tie_word_embeddings ? "" : "untied_") + std::to_string(::getpid()));
    auto cfg = engine::PresetConfig(engine::Arch::kQwen2, "tiny", 64);
    EXPECT_TRUE(cfg.ok()) << cfg.status().ToString();
    cfg->tie_word_embeddings = tie_word_embeddings;
    auto m = engine::Transformer::Init(*cfg, 7, &backend);
    EXPECT_TRUE(m->Save(dir.string(), engine::DType::kF32).ok());
  }
  ~TinyModel() { fs::remove_all(dir); }
};

inline TinyModel& Model() {
  static TinyModel m;
  return m;
}

// The same shape with its own lm-head, which sits at the END of the flat parameter buffer.
inline TinyModel& UntiedModel() {
  static TinyModel m(false);
  return m;
}

inline GrpoConfig Config() {
  GrpoConfig g;
  g.lr = 1e-3;
  g.temperature = 1.0;
  g.max_new_tokens = 8;
  g.grad_clip = 1.0;
  g.micro_batch_tokens = 1 << 20;
  return g;
}

// Groups of G samples with on-policy behaviour log-probs from `model`, rewards from `reward`.
inline std::vector<TrainGroup> MakeBatch(engine::Transformer& model, uint64_t seed, int groups, int G,
                                  const std::function<float(const std::vector<int32_t>&)>& reward) {
  engine::Generator gen(&model, 16, 32);
  std::vector<engine::GenerationRequest> reqs;
  std::mt19937_64 rng(seed);
  for (int g = 0; g < groups; ++g) {
    std::vector<int32_t> prompt;
    for (int i = 0; i < 4; ++i) prompt.push_back(static_cast<int32_t>(rng() % 64));
    for (int s = 0; s < G; ++s) {
      engine::GenerationRequest r;
      r.prompt = prompt;
      r.max_new_tokens = 6;
      r.seed = rng();
      reqs.push_back(r);
    }
  }
  auto results = gen.Generate(reqs);
  EXPECT_TRUE(results.ok()) << results.status().ToString();
  std::vector<TrainGroup> batch(groups);
  for (int g = 0; g < groups; ++g) {
    batch[g].id = "g" + std::to_string(seed) + "-" + std::to_string(g);
    for (int s = 0; s < G; ++s) {
      const auto& res = (*results)[g * G + s];
      TrainSample t;
      t.prompt = reqs[g * G + s].prompt;
      t.completion = res.tokens;
      t.behaviour_logprobs = res.logprobs;
      t.reward = reward(res.tokens);
      t.correct = t.reward > 0.5f;
      t.truncated = res.finish == engine::FinishReason::kLength;
      batch[g].samples.push_back(t);
    }
  }
  return batch;
}

inline float RewardEvenTokens(const std::vector<int32_t>& c) {
  float n = 0;
  for (int32_t t : c) n += (t % 2 == 0);
  return c.empty() ? 0 : n / static_cast<float>(c.size());
}

inline std::unique_ptr<GrpoTrainer> NewTrainer(GrpoConfig g) {
  TrainerOptions o;
  o.grpo = g;
  o.model_dir = Model().dir.string();
  auto t = GrpoTrainer::Create(o, &Model().backend);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return std::move(t).value();
}

// Cuts completions to different lengths (a prefix keeps its on-policy log-probs), so that groups
// differ in tokens and a data-parallel split cannot be even.
inline std::vector<TrainGroup> Ragged(std::vector<TrainGroup> batch) {
  for (size_t g = 0; g < batch.size(); ++g)
    for (size_t s = 0; s < batch[g].samples.size(); ++s) {
      TrainSample& t = batch[g].samples[s];
      const size_t keep = 1 + (g * 5 + s * 3) % t.completion.size();
      t.truncated = t.truncated && keep == t.completion.size();
      t.completion.resize(keep);
      t.behaviour_logprobs.resize(keep);
    }
  return batch;
}

// max |a - b| over two weight vectors, relative to the largest change `a` made from `start`.
inline double RelativeWeightDiff(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& start) {
  double diff = 0, moved = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, double(std::abs(a[i] - b[i])));
    moved = std::max(moved, double(std::abs(a[i] - start[i])));
  }
  return diff / moved;
}

// The statistics of a data-parallel step against the same step on one replica: sums and ratios
// within `rel` (relative, at least absolute), the gradient norm within `norm_rel`, counts exact.
inline void ExpectSameStats(const StepStats& one, const StepStats& dp, double rel, double norm_rel) {
  auto near = [&](double a, double b) { return std::abs(a - b) <= rel * std::max(1.0, std::abs(a)); };
  EXPECT_TRUE(near(one.loss, dp.loss)) << one.loss << " vs " << dp.loss;
  EXPECT_TRUE(near(one.pg_loss, dp.pg_loss)) << one.pg_loss << " vs " << dp.pg_loss;
  EXPECT_TRUE(near(one.kl, dp.kl)) << one.kl << " vs " << dp.kl;
  EXPECT_TRUE(near(one.entropy, dp.entropy)) << one.entropy << " vs " << dp.entropy;
  EXPECT_TRUE(near(one.clip_low, dp.clip_low)) << one.clip_low << " vs " << dp.clip_low;
  EXPECT_TRUE(near(one.clip_high, dp.clip_high)) << one.clip_high << " vs " << dp.clip_high;
  EXPECT_NEAR(one.grad_norm, dp.grad_norm, norm_rel * one.grad_norm);
  EXPECT_DOUBLE_EQ(one.reward_mean, dp.reward_mean);
  EXPECT_DOUBLE_EQ(one.accuracy, dp.accuracy);
  EXPECT_DOUBLE_EQ(one.length_mean, dp.length_mean);
  EXPECT_EQ(one.tokens, dp.tokens);
  EXPECT_EQ(one.completion_tokens, dp.completion_tokens);
  EXPECT_EQ(one.sequences, dp.sequences);
  EXPECT_EQ(one.step, dp.step);
  EXPECT_DOUBLE_EQ(one.lr, dp.lr);
}

}  // namespace aha::trainer_test
