// GrpoTrainer on a tiny random model: exact resume, micro-batching, actor/learner log-prob
// agreement, and that GRPO moves probability toward rewarded completions.
#include "learner/trainer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "tests/learner/trainer_fixtures.h"

namespace aha {
namespace {

namespace fs = std::filesystem;
using namespace trainer_test;

TEST(GrpoTrainer, ResumeAfterStepThreeIsBitExact) {
  GrpoConfig g = Config();
  g.beta = 0.01;  // exercise the reference model through the checkpoint too
  g.lr_schedule = "cosine";
  g.warmup_steps = 2;
  g.steps = 6;
  std::vector<std::vector<TrainGroup>> batches;
  {
    auto source = NewTrainer(g);
    for (int i = 0; i < 6; ++i) batches.push_back(MakeBatch(source->model(), 100 + i, 2, 4, RewardEvenTokens));
  }
  auto straight = NewTrainer(g);
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(straight->Step(batches[i], i).ok());

  fs::path ckpt = fs::temp_directory_path() / ("aha_trainer_ckpt_" + std::to_string(::getpid()));
  {
    auto first = NewTrainer(g);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(first->Step(batches[i], i).ok());
    ASSERT_TRUE(first->Checkpoint(ckpt.string(), 3).ok());
  }
  auto resumed = NewTrainer(g);
  auto version = resumed->Restore(ckpt.string());
  ASSERT_TRUE(version.ok()) << version.status().ToString();
  EXPECT_EQ(*version, 3u);
  EXPECT_EQ(resumed->step(), 3);
  for (int i = 3; i < 6; ++i) ASSERT_TRUE(resumed->Step(batches[i], i).ok());
  size_t n = straight->model().num_params();
  EXPECT_EQ(std::memcmp(straight->model().params(), resumed->model().params(), n * sizeof(float)), 0)
      << "steps 4-6 after a resume must equal an uninterrupted run bit for bit";
  EXPECT_TRUE(fs::exists(ckpt / "config.json"));
  EXPECT_TRUE(fs::exists(ckpt / "model.safetensors"));
  fs::remove_all(ckpt);
}

TEST(GrpoTrainer, RestoreRefusesAnOptimizerStateInTheOldInterleavedQkvLayout) {
  // Version 01 of optimizer.bin stored a Qwen2 layer's moments as q_w, q_b, k_w, k_b, v_w, v_b; the
  // flat layout now keeps q/k/v weights adjacent, so such a file would resume with moments moved
  // onto the wrong parameters. The tiny model is a Qwen2 with attention biases.
  auto first = NewTrainer(Config());
  ASSERT_TRUE(first->model().config().attention_bias);
  fs::path ckpt = fs::temp_directory_path() / ("aha_trainer_ckpt_v1_" + std::to_string(::getpid()));
  ASSERT_TRUE(first->Checkpoint(ckpt.string(), 1).ok());
  auto resumed = NewTrainer(Config());
  ASSERT_TRUE(resumed->Restore(ckpt.string()).ok()) << "the current version resumes";
  {
    std::fstream f(ckpt / "optimizer.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.write("AHAOPT01", 8);
  }
  auto old = resumed->Restore(ckpt.string());
  ASSERT_FALSE(old.ok());
  EXPECT_NE(old.status().message().find("q/k/v"), std::string::npos) << old.status().ToString();
  fs::remove_all(ckpt);
}

TEST(GrpoTrainer, MicroBatchesGiveTheSameStepAsOneBatch) {
  GrpoConfig g = Config();
  auto whole = NewTrainer(g);
  auto batch = MakeBatch(whole->model(), 7, 4, 4, RewardEvenTokens);
  g.micro_batch_tokens = 24;  // about two sequences per micro-batch: 8 or more micro-batches
  auto split = NewTrainer(g);
  auto a = whole->Step(batch, 0);
  auto b = split->Step(batch, 0);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NEAR(a->loss, b->loss, 1e-6);
  EXPECT_NEAR(a->grad_norm, b->grad_norm, 1e-5 * a->grad_norm);
  size_t n = whole->model().num_params();
  double max_diff = 0;
  for (size_t i = 0; i < n; ++i)
    max_diff = std::max(max_diff, double(std::abs(whole->model().params()[i] - split->model().params()[i])));
  // Only the summation order differs. Adam's first step moves each parameter by about lr * sign(g),
  // so a bound relative to lr (1e-3) is the meaningful one: 2% of it.
  EXPECT_LT(max_diff, 0.02 * g.lr) << "summation order may differ, nothing else";
}

TEST(GrpoTrainer, ActorAndLearnerLogprobsAgreeAtEqualWeights) {
  auto t = NewTrainer(Config());
  engine::Transformer& m = t->model();
  engine::Generator gen(&m, 8, 40);
  std::vector<engine::GenerationRequest> reqs(6);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = {1, static_cast<int32_t>(i + 2), 5, 9};
    reqs[i].max_new_tokens = 12;
    reqs[i].seed = i;
    reqs[i].sampling.temperature = 0.7f;
  }
  auto res = gen.Generate(reqs);
  ASSERT_TRUE(res.ok());
  double max_diff = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::vector<int32_t> toks = reqs[i].prompt;
    toks.insert(toks.end(), (*res)[i].tokens.begin(), (*res)[i].tokens.end());
    int32_t cu[2] = {0, static_cast<int32_t>(toks.size())};
    std::vector<float> lp(toks.size()), ent(toks.size());
    m.Forward(toks.data(), cu, 1, static_cast<int>(toks.size()), 0.7f, lp.data(), ent.data());
    for (size_t j = 0; j < (*res)[i].tokens.size(); ++j)
      max_diff = std::max(max_diff, double(std::abs(lp[reqs[i].prompt.size() + j] - (*res)[i].logprobs[j])));
  }
  EXPECT_LE(max_diff, 1e-5);
  std::printf("actor vs learner max |logprob difference| (f32 CPU): %.3g\n", max_diff);
}

TEST(GrpoTrainer, RaisesTheRewardOfItsOwnSamples) {
  GrpoConfig g = Config();
  g.lr = 5e-3;
  auto t = NewTrainer(g);
  double first = 0, last = 0;
  for (int step = 0; step < 12; ++step) {
    auto batch = MakeBatch(t->model(), 1000 + step, 3, 8, RewardEvenTokens);
    auto st = t->Step(batch, step);
    ASSERT_TRUE(st.ok());
    if (step < 3) first += st->reward_mean / 3;
    if (step >= 9) last += st->reward_mean / 3;
  }
  EXPECT_GT(last, first + 0.15) << "mean reward of fresh samples: first 3 steps " << first << ", last 3 " << last;
}

TEST(GrpoTrainer, RejectsMalformedSamplesWithoutTouchingTheModel) {
  auto t = NewTrainer(Config());
  auto batch = MakeBatch(t->model(), 3, 1, 2, RewardEvenTokens);
  std::vector<float> before(t->model().params(), t->model().params() + t->model().num_params());
  auto bad = batch;
  bad[0].samples[1].behaviour_logprobs.pop_back();
  auto r = t->Step(bad, 0);
  EXPECT_TRUE(IsInvalidArgument(r.status()));
  EXPECT_NE(r.status().message().find("sample 1"), std::string::npos) << r.status().message();
  bad = batch;
  bad[0].samples[0].prompt[0] = 100000;
  EXPECT_NE(t->Step(bad, 0).status().message().find("outside the vocabulary"), std::string::npos);
  EXPECT_TRUE(IsInvalidArgument(t->Step({}, 0).status()));
  EXPECT_EQ(std::memcmp(before.data(), t->model().params(), before.size() * sizeof(float)), 0);
}

}  // namespace
}  // namespace aha
