// Whole-model tests of the transformer on tiny random models of each family: finite-difference
// gradients of every parameter, recomputation, packing, gradient accumulation, save/load (f32, bf16,
// sharded), bad model directories, cached generation against the training forward, batching, stop
// conditions, a few AdamW steps, and the engine's `aha` commands.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "engine/commands.h"
#include "engine/cpu_backend.h"
#include "engine/generate.h"
#include "engine/optimizer.h"
#include "engine/safetensors.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/transformer.h"

namespace aha::engine {
namespace {

namespace fs = std::filesystem;

ModelConfig TinyConfig(Arch arch, bool tied) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 17;
  c.hidden_size = 8;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 12;
  c.max_position_embeddings = 64;
  c.tie_word_embeddings = tied;
  c.attention_bias = arch == Arch::kQwen2;
  c.qk_norm = arch == Arch::kQwen3;
  if (arch == Arch::kLlama) {
    c.rope.theta = 500000.0;
    c.rope.llama3 = true;
    c.rope.original_max_positions = 8;
  }
  c.eos_token_ids = {16};
  return c;
}

// Weights spread enough that attention and the softmax are far from uniform.
void Randomize(Transformer& m, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (const ParamInfo& p : m.param_table()) {
    float* w = m.param(p.name);
    const bool norm = p.name.ends_with("norm.weight");
    const float scale = p.name.find("embed") != std::string::npos ? 1.0f : 0.4f;
    for (size_t i = 0; i < p.numel(); ++i) w[i] = norm ? 1.0f + 0.2f * d(g) : scale * d(g);
  }
}

struct Batch {
  std::vector<int32_t> tokens = {1, 5, 9, 2, 2, 7, 3, 11, 0, 16, 4, 8};
  std::vector<int32_t> cu = {0, 4, 5, 12};  // lengths 4, 1, 7
  int S() const { return static_cast<int>(cu.size()) - 1; }
  int N() const { return static_cast<int>(tokens.size()); }
};

std::vector<float> Coeffs(int n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// sum a * logprobs + b * entropies, in f64.
double Loss(Transformer& m, const Batch& b, const std::vector<float>& a, const std::vector<float>& e, float T) {
  std::vector<float> lp(b.N()), ent(b.N());
  m.Forward(b.tokens.data(), b.cu.data(), b.S(), b.N(), T, lp.data(), ent.data());
  double s = 0;
  for (int i = 0; i < b.N(); ++i) s += static_cast<double>(a[i]) * lp[i] + static_cast<double>(e[i]) * ent[i];
  return s;
}

class ModelFamilies : public ::testing::TestWithParam<std::tuple<Arch, bool>> {};

TEST_P(ModelFamilies, EveryParameterGradientMatchesFiniteDifferences) {
  // f32 model, central differences with h = 3e-3 and the loss summed in f64: rounding contributes
  // ~1e-4 of the largest gradient and truncation less; a wrong backward term is O(1). We require
  // each tensor's worst error to stay under 2e-2 of max(its largest gradient, 0.05).
  const auto [arch, tied] = GetParam();
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(arch, tied), 1, &B);
  Randomize(*m, 2);
  Batch b;
  const float T = 0.8f;
  auto a = Coeffs(b.N(), 3), e = Coeffs(b.N(), 4);
  m->ZeroGrad();
  Loss(*m, b, a, e, T);
  m->Backward(a.data(), e.data());
  const float h = 3e-3f;
  for (const ParamInfo& p : m->param_table()) {
    float* w = m->param(p.name);
    const float* g = m->grad(p.name);
    double gmax = 0.05, worst = 0;
    for (size_t i = 0; i < p.numel(); ++i) gmax = std::max(gmax, std::abs(static_cast<double>(g[i])));
    for (size_t i = 0; i < p.numel(); ++i) {
      const float saved = w[i];
      w[i] = saved + h;
      const double fp = Loss(*m, b, a, e, T);
      w[i] = saved - h;
      const double fm = Loss(*m, b, a, e, T);
      w[i] = saved;
      worst = std::max(worst, std::abs((fp - fm) / (2 * h) - g[i]) / gmax);
    }
    EXPECT_LT(worst, 2e-2) << p.name;
  }
}

TEST_P(ModelFamilies, RecomputationAndForwardsOnlyGiveTheSameResults) {
  const auto [arch, tied] = GetParam();
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(arch, tied), 1, &B);
  Randomize(*m, 5);
  Batch b;
  auto a = Coeffs(b.N(), 6), e = Coeffs(b.N(), 7);
  m->ZeroGrad();
  const double loss = Loss(*m, b, a, e, 1.0f);
  m->Backward(a.data(), e.data());
  std::vector<float> saved(m->grads(), m->grads() + m->num_params());
  m->set_recompute(true);
  m->ZeroGrad();
  // The forward alone (as the trainer's frozen reference runs it) is the same ops on reused buffers.
  EXPECT_EQ(Loss(*m, b, a, e, 1.0f), loss);
  m->Backward(a.data(), e.data());
  for (size_t i = 0; i < m->num_params(); ++i) ASSERT_NEAR(m->grads()[i], saved[i], 1e-6 * (1 + std::abs(saved[i])));
  // As the trainer's frozen reference, forwards only (set_forward_only): the same loss, and a
  // Backward on it stops with a message (what it would read, a backend may not have written).
  m->set_forward_only(true);
  EXPECT_EQ(Loss(*m, b, a, e, 1.0f), loss);
  EXPECT_DEATH(m->Backward(a.data(), e.data()), "forwards only");
}

TEST_P(ModelFamilies, PackedBatchEqualsSequencesOneByOneAndGradientsAccumulate) {
  const auto [arch, tied] = GetParam();
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(arch, tied), 1, &B);
  Randomize(*m, 8);
  Batch b;
  auto a = Coeffs(b.N(), 9), e = Coeffs(b.N(), 10);
  std::vector<float> lp(b.N()), ent(b.N());
  m->ZeroGrad();
  m->Forward(b.tokens.data(), b.cu.data(), b.S(), b.N(), 1.0f, lp.data(), ent.data());
  m->Backward(a.data(), e.data());
  std::vector<float> packed_grads(m->grads(), m->grads() + m->num_params());
  m->ZeroGrad();
  for (int s = 0; s < b.S(); ++s) {
    const int n = b.cu[s + 1] - b.cu[s];
    std::vector<int32_t> cu1 = {0, n};
    std::vector<float> lp1(n), ent1(n);
    m->Forward(b.tokens.data() + b.cu[s], cu1.data(), 1, n, 1.0f, lp1.data(), ent1.data());
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR(lp1[i], lp[b.cu[s] + i], 1e-5);
      EXPECT_NEAR(ent1[i], ent[b.cu[s] + i], 1e-5);
    }
    m->Backward(a.data() + b.cu[s], e.data() + b.cu[s]);  // accumulates
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < m->num_params(); ++i) {
    num += std::pow(m->grads()[i] - packed_grads[i], 2);
    den += std::pow(packed_grads[i], 2);
  }
  EXPECT_LT(std::sqrt(num / den), 1e-5);
}

// score_from: only the rows predicting a scored token run the lm-head. The scored positions get
// the log-probs and entropies of the full forward, the others 0; the gradients equal the full
// backward's with the unscored positions' coefficients zeroed (their coefficients are ignored).
TEST_P(ModelFamilies, ScoredPositionsOnlyMatchTheFullForwardAndBackward) {
  const auto [arch, tied] = GetParam();
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(arch, tied), 1, &B);
  Randomize(*m, 21);
  Batch b;  // lengths 4, 1, 7
  const std::vector<int32_t> from = {2, 0, 5};  // sequence 1: 0 scores its (only) position, which has none
  auto a = Coeffs(b.N(), 22), e = Coeffs(b.N(), 23);
  std::vector<float> lp(b.N()), ent(b.N()), lp_s(b.N(), 7.0f), ent_s(b.N(), 7.0f);
  m->ZeroGrad();
  m->Forward(b.tokens.data(), b.cu.data(), b.S(), b.N(), 0.9f, lp.data(), ent.data());
  std::vector<float> a0 = a, e0 = e;
  int scored = 0;
  for (int s = 0; s < b.S(); ++s)
    for (int i = b.cu[s]; i < b.cu[s + 1]; ++i)
      if (i - b.cu[s] < std::max(from[s], 1)) a0[i] = e0[i] = 0.0f;
      else ++scored;
  ASSERT_EQ(scored, 2 + 2);
  m->Backward(a0.data(), e0.data());
  std::vector<float> full(m->grads(), m->grads() + m->num_params());
  m->ZeroGrad();
  m->Forward(b.tokens.data(), b.cu.data(), b.S(), b.N(), 0.9f, lp_s.data(), ent_s.data(), from.data());
  for (int s = 0; s < b.S(); ++s)
    for (int i = b.cu[s]; i < b.cu[s + 1]; ++i) {
      const bool on = i - b.cu[s] >= std::max(from[s], 1);
      EXPECT_EQ(lp_s[i], on ? lp[i] : 0.0f) << "position " << i;
      EXPECT_EQ(ent_s[i], on ? ent[i] : 0.0f) << "position " << i;
    }
  m->Backward(a.data(), e.data());  // the unscored coefficients are nonzero here, and must not count
  double num = 0, den = 0;
  for (size_t i = 0; i < m->num_params(); ++i) {
    num += std::pow(m->grads()[i] - full[i], 2);
    den += std::pow(full[i], 2);
  }
  ASSERT_GT(den, 0.0);
  EXPECT_LT(std::sqrt(num / den), 1e-6);
  // Nothing scored: no lm-head at all, every log-prob 0 and no gradient.
  const std::vector<int32_t> none = {4, 1, 7};
  m->ZeroGrad();
  m->Forward(b.tokens.data(), b.cu.data(), b.S(), b.N(), 1.0f, lp_s.data(), ent_s.data(), none.data());
  for (int i = 0; i < b.N(); ++i) EXPECT_EQ(lp_s[i], 0.0f);
  m->Backward(a.data(), e.data());
  for (size_t i = 0; i < m->num_params(); ++i) ASSERT_EQ(m->grads()[i], 0.0f) << i;
}

TEST_P(ModelFamilies, CachedSamplingLogprobsEqualTrainingForwardAtTemperature) {
  const auto [arch, tied] = GetParam();
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(arch, tied), 1, &B);
  Randomize(*m, 11);
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 5; ++i) {
    GenerationRequest r;
    for (int j = 0; j <= i * 2; ++j) r.prompt.push_back((3 * i + 5 * j) % 16);
    r.sampling = {0.8f, 0.95f, 0};
    r.seed = 100 + i;
    r.max_new_tokens = 6 + i;
    reqs.push_back(r);
  }
  Generator batched(m.get(), /*max_batch=*/2, /*max_len=*/32);
  auto out = batched.Generate(reqs);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& r = (*out)[i];
    ASSERT_EQ(r.tokens.size(), r.logprobs.size());
    // Same request alone (batch of one) gives the same tokens: per-request RNG, no cross-talk.
    Generator alone(m.get(), 1, 32);
    auto solo = alone.Generate({reqs[i]});
    ASSERT_TRUE(solo.ok());
    EXPECT_EQ((*solo)[0].tokens, r.tokens) << "request " << i;
    // Behaviour log-probs equal the learner's log-probs at the sampling temperature.
    std::vector<int32_t> seq = reqs[i].prompt;
    seq.insert(seq.end(), r.tokens.begin(), r.tokens.end());
    std::vector<int32_t> cu = {0, static_cast<int32_t>(seq.size())};
    std::vector<float> lp(seq.size());
    m->Forward(seq.data(), cu.data(), 1, static_cast<int>(seq.size()), 0.8f, lp.data(), nullptr);
    for (size_t t = 0; t < r.tokens.size(); ++t)
      EXPECT_NEAR(r.logprobs[t], lp[reqs[i].prompt.size() + t], 1e-4) << "request " << i << " token " << t;
    if (r.finish == FinishReason::kLength) {
      EXPECT_EQ(static_cast<int>(r.tokens.size()), reqs[i].max_new_tokens);
    }
  }
}

// A prompt's prefill (every sequence from position 0) runs the packed causal attention over its new
// rows; a later chunk (start > 0) attends through the cache. Both give the same last-row logits as
// one prefill of the whole prompt, and the pool the first path wrote serves the second.
TEST_P(ModelFamilies, PrefillInTwoChunksEqualsOnePrefill) {
  const auto [arch, tied] = GetParam();
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(arch, tied), 1, &B);
  Randomize(*m, 12);
  const int V = m->config().vocab_size;
  // Two sequences of 21 and 9 tokens.
  const std::vector<std::vector<int32_t>> prompts = {
      {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6}, {2, 7, 1, 8, 2, 8, 1, 8, 2}};
  const std::vector<int> split = {13, 4};  // the first chunk's length per sequence
  auto run = [&](KvCache& cache, const std::vector<std::vector<int32_t>>& chunks, const std::vector<int32_t>& start) {
    std::vector<int32_t> tokens, cu{0};
    for (const auto& c : chunks) {
      tokens.insert(tokens.end(), c.begin(), c.end());
      cu.push_back(static_cast<int32_t>(tokens.size()));
    }
    std::vector<int32_t> table(2 * cache.max_blocks);
    for (int b = 0; b < 2; ++b)
      for (int j = 0; j < cache.max_blocks; ++j) table[b * cache.max_blocks + j] = b * cache.max_blocks + j;
    std::vector<float> logits(2 * V);
    m->ForwardCached(tokens.data(), cu.data(), start.data(), table.data(), 2, &cache, logits.data());
    return logits;
  };
  KvCache whole = m->NewKvCache(2, 32, 8, 8);
  const std::vector<float> once = run(whole, prompts, {0, 0});
  KvCache parts = m->NewKvCache(2, 32, 8, 8);
  std::vector<std::vector<int32_t>> first, rest;
  for (int b = 0; b < 2; ++b) {
    first.emplace_back(prompts[b].begin(), prompts[b].begin() + split[b]);
    rest.emplace_back(prompts[b].begin() + split[b], prompts[b].end());
  }
  run(parts, first, {0, 0});
  const std::vector<float> twice = run(parts, rest, {split[0], split[1]});
  for (int i = 0; i < 2 * V; ++i) EXPECT_NEAR(twice[i], once[i], 1e-5f) << "logit " << i;
  // And a one-token decode step after each agrees too.
  const std::vector<std::vector<int32_t>> next = {{5}, {11}};
  const std::vector<int32_t> at = {static_cast<int32_t>(prompts[0].size()), static_cast<int32_t>(prompts[1].size())};
  const std::vector<float> a = run(whole, next, at), b = run(parts, next, at);
  for (int i = 0; i < 2 * V; ++i) EXPECT_NEAR(b[i], a[i], 1e-5f) << "decode logit " << i;
}

// aha bench gen --leave-out: a decode step skips the named ops; a prefill never does.
TEST(Generation, DecodeLeaveOutSkipsOpsOfDecodeStepsOnly) {
  EXPECT_EQ(*Transformer::ParseDecodeOps(""), 0u);
  EXPECT_EQ(*Transformer::ParseDecodeOps("qkv,lmhead"), Transformer::kDecodeQkv | Transformer::kDecodeLmHead);
  for (const char* bad : {"mlp", "qkv,", "o,,down"}) {
    auto r = Transformer::ParseDecodeOps(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("not one of"), std::string::npos) << r.status().message();
  }
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, true), 1, &B);
  Randomize(*m, 13);
  const int V = m->config().vocab_size;
  const std::vector<int32_t> table = {0, 1, 2, 3};
  auto step = [&](unsigned leave_out, float fill) {
    m->set_decode_leave_out(leave_out);
    KvCache cache = m->NewKvCache(1, 32, 4, 8);
    const std::vector<int32_t> prompt = {3, 1, 4, 1, 5}, cu = {0, 5}, start = {0};
    std::vector<float> prefill(V, fill), decode(V, fill);
    m->ForwardCached(prompt.data(), cu.data(), start.data(), table.data(), 1, &cache, prefill.data());
    const std::vector<int32_t> next = {9}, cu1 = {0, 1}, at = {5};
    m->ForwardCached(next.data(), cu1.data(), at.data(), table.data(), 1, &cache, decode.data());
    return std::make_pair(prefill, decode);
  };
  const auto [p0, d0] = step(0, 0.0f);
  const auto [p1, d1] = step(Transformer::kDecodeLmHead, 7.0f);
  EXPECT_EQ(p1, p0);  // the prefill ran whole
  EXPECT_EQ(d1, std::vector<float>(V, 7.0f));  // the decode step wrote no logits
  const auto [p2, d2] = step(Transformer::kDecodeDown, 0.0f);
  EXPECT_EQ(p2, p0);
  EXPECT_NE(d2, d0);  // the step's down products were skipped
  const auto [p3, d3] = step(0, 0.0f);
  EXPECT_EQ(d3, d0);
}

INSTANTIATE_TEST_SUITE_P(Families, ModelFamilies,
                         ::testing::Values(std::make_tuple(Arch::kQwen2, true), std::make_tuple(Arch::kQwen3, false),
                                           std::make_tuple(Arch::kLlama, false)));

TEST(Generation, StopsOnStopTokenAndStopString) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, true), 1, &B);
  Randomize(*m, 12);
  GenerationRequest r;
  r.prompt = {1, 2, 3};
  r.sampling.temperature = 0.0f;
  r.max_new_tokens = 10;
  Generator gen(m.get(), 1, 32);
  auto free_run = gen.Generate({r});
  ASSERT_TRUE(free_run.ok());
  ASSERT_EQ((*free_run)[0].tokens.size(), 10u);
  EXPECT_EQ((*free_run)[0].finish, FinishReason::kLength);
  const auto& toks = (*free_run)[0].tokens;
  r.stop_token_ids = {toks[3]};
  auto stopped = gen.Generate({r});
  ASSERT_TRUE(stopped.ok());
  const auto first = std::find(toks.begin(), toks.end(), toks[3]) - toks.begin();
  EXPECT_EQ((*stopped)[0].tokens, std::vector<int32_t>(toks.begin(), toks.begin() + first + 1));
  EXPECT_EQ((*stopped)[0].finish, FinishReason::kStop);
  // Stop string over a decoding where token t reads as the letter 'a' + t.
  r.stop_token_ids.clear();
  std::string text;
  for (int32_t t : toks) text.push_back(static_cast<char>('a' + t));
  r.stop_strings = {text.substr(2, 2)};
  auto by_string = gen.Generate({r}, [](const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t t : ids) s.push_back(static_cast<char>('a' + t));
    return s;
  });
  ASSERT_TRUE(by_string.ok());
  EXPECT_EQ((*by_string)[0].finish, FinishReason::kStop);
  EXPECT_LE((*by_string)[0].tokens.size(), 4u);
}

// Stop strings are looked for in the text of the last tokens only (the longest stop string's length
// plus a margin), not in the whole completion after every token. Against the whole-text rule, found
// by brute force on a free run: the same stopping token, with a plain one-character-per-token
// decoder and with a SentencePiece-like one (each token " name", the text's leading space dropped,
// so a window decodes its first token differently); and the decoder sees O(length) tokens in all.
TEST(Generation, StopStringsAreFoundInTheLastTokensText) {
  CpuBackend B;
  ModelConfig c = TinyConfig(Arch::kQwen2, true);
  c.max_position_embeddings = 512;
  auto m = Transformer::Init(c, 1, &B);
  Randomize(*m, 17);
  GenerationRequest r;
  r.prompt = {1, 2, 3};
  r.sampling = {1.0f, 1.0f, 0};
  r.seed = 5;
  r.max_new_tokens = 400;
  Generator gen(m.get(), 1, 410);
  auto free_run = gen.Generate({r});
  ASSERT_TRUE(free_run.ok());
  const std::vector<int32_t> toks = (*free_run)[0].tokens;
  ASSERT_EQ(toks.size(), 400u);
  int64_t decoded = 0;
  const Generator::Detokenize plain = [&](const std::vector<int32_t>& ids) {
    decoded += static_cast<int64_t>(ids.size());
    std::string s;
    for (int32_t t : ids) s.push_back(static_cast<char>('a' + t));
    return s;
  };
  const Generator::Detokenize spaced = [&](const std::vector<int32_t>& ids) {
    decoded += static_cast<int64_t>(ids.size());
    std::string s;
    for (int32_t t : ids) s += " " + std::string(1 + t % 3, static_cast<char>('a' + t));
    return s.empty() ? s : s.substr(1);
  };
  for (const auto* detok : {&plain, &spaced}) {
    // A stop string of the text of tokens 292..299 (as the whole text reads them).
    const std::string upto = (*detok)(std::vector<int32_t>(toks.begin(), toks.begin() + 300));
    const std::string stop = upto.substr(upto.size() - (*detok)(std::vector<int32_t>(toks.begin() + 292, toks.begin() + 300)).size());
    size_t want = toks.size();  // the first token after which the whole text holds the stop string
    for (size_t t = 1; t <= toks.size() && want == toks.size(); ++t)
      if ((*detok)(std::vector<int32_t>(toks.begin(), toks.begin() + t)).find(stop) != std::string::npos) want = t;
    ASSERT_LE(want, 300u) << stop;
    EXPECT_GT(want, 100u) << stop;  // late enough for the whole-text rule to cost what it did
    std::cout << "stop \"" << stop << "\" first whole after token " << want << "\n";
    r.stop_strings = {stop};
    decoded = 0;
    auto stopped = gen.Generate({r}, *detok);
    ASSERT_TRUE(stopped.ok());
    EXPECT_EQ((*stopped)[0].tokens, std::vector<int32_t>(toks.begin(), toks.begin() + want)) << "stop " << stop;
    EXPECT_EQ((*stopped)[0].finish, FinishReason::kStop);
    // Windows of at most stop length + 16 tokens, and one whole-text check of the hit: a few
    // thousand tokens decoded, where the whole text after every token is want^2 / 2 (~45,000).
    EXPECT_LE(decoded, static_cast<int64_t>(want * (stop.size() + 16) + want)) << "stop " << stop;
  }
}

// The in-flight update an actor does: the step hook runs before every forward pass (prefill and each
// decode step), swaps weights mid-completion, and each token records the version that drew it.
TEST(Generation, StepHookSwapsWeightsBetweenDecodeSteps) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, true), 1, &B);
  Randomize(*m, 12);
  auto other = Transformer::Init(TinyConfig(Arch::kQwen2, true), 2, &B);
  Randomize(*other, 13);
  std::vector<float> new_weights(other->num_params());
  other->CopyParamsToHost(new_weights.data());
  GenerationRequest r;
  r.prompt = {1, 2, 3};
  r.sampling.temperature = 0.0f;
  r.max_new_tokens = 8;
  Generator gen(m.get(), 2, 32);
  auto before = gen.Generate({r});
  ASSERT_TRUE(before.ok());
  EXPECT_EQ((*before)[0].versions, std::vector<uint64_t>(8, 0));  // no hook: version 0
  int calls = 0;
  gen.SetStepHook([&]() -> uint64_t {
    if (++calls == 4) m->SetParams(new_weights.data());
    return calls < 4 ? 1 : 2;
  });
  auto swapped = gen.Generate({r});
  ASSERT_TRUE(swapped.ok());
  const auto& out = (*swapped)[0];
  EXPECT_EQ(calls, 8);  // one prefill and seven decode steps
  EXPECT_EQ(out.versions, (std::vector<uint64_t>{1, 1, 1, 2, 2, 2, 2, 2}));
  // Tokens before the swap are the old model's; the first one after it is drawn from new weights.
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(out.tokens[t], (*before)[0].tokens[t]);
    EXPECT_EQ(out.logprobs[t], (*before)[0].logprobs[t]);
  }
  EXPECT_NE(out.logprobs[3], (*before)[0].logprobs[3]);
}

// A KV pool of 12 blocks of 4 tokens cannot hold four sequences of up to 30 tokens: decode steps
// run the pool dry and preempt the most recently admitted sequence, which later prefills its prompt
// and drawn tokens again and continues. Its RNG stream is per request (advanced once per drawn
// token), so every completion, log-prob and finish reason must equal the run with a pool that
// never preempts, and every block must be back in the free list at the end.
TEST(Generation, PreemptionUnderASmallKvPoolReproducesTheFullPoolsCompletions) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen3, false), 1, &B);
  Randomize(*m, 14);
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 7; ++i) {
    GenerationRequest r;
    for (int j = 0; j < 3 + (i * 5) % 8; ++j) r.prompt.push_back((7 * i + 3 * j) % 16);
    r.sampling = {0.9f, i % 2 ? 0.9f : 1.0f, i % 3 == 2 ? 5 : 0};
    r.seed = 500 + i;
    r.max_new_tokens = 14 + 3 * i % 7;
    if (i == 6) r.stop_token_ids = {16};  // the tiny model draws it often: one request stops early
    reqs.push_back(r);
  }
  Generator full(m.get(), /*max_batch=*/4, /*max_len=*/40, {.kv_cache_tokens = 0, .block_size = 4});
  Generator small(m.get(), /*max_batch=*/4, /*max_len=*/40, {.kv_cache_tokens = 48, .block_size = 4});
  EXPECT_EQ(full.num_blocks(), 40);
  EXPECT_EQ(small.num_blocks(), 12);
  auto want = full.Generate(reqs);
  auto got = small.Generate(reqs);
  ASSERT_TRUE(want.ok()) << want.status().ToString();
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(full.stats().preemptions, 0);
  EXPECT_GT(small.stats().preemptions, 0);
  EXPECT_GT(small.stats().recomputed_tokens, 0);
  EXPECT_LE(small.stats().peak_blocks_used, 12);
  std::cout << "small pool: " << small.stats().preemptions << " preemptions, " << small.stats().recomputed_tokens
            << " recomputed tokens, peak " << small.stats().peak_blocks_used << " blocks; lengths";
  for (const auto& r : *want) std::cout << " " << r.tokens.size();
  std::cout << "\n";
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ((*got)[i].tokens, (*want)[i].tokens) << "request " << i;
    EXPECT_EQ((*got)[i].logprobs, (*want)[i].logprobs) << "request " << i;
    EXPECT_EQ((*got)[i].finish, (*want)[i].finish) << "request " << i;
  }
  EXPECT_EQ(full.free_blocks(), full.num_blocks());
  EXPECT_EQ(small.free_blocks(), small.num_blocks());
  // A second call on the same generator starts from a clean pool and gives the same completions.
  auto again = small.Generate(reqs);
  ASSERT_TRUE(again.ok());
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ((*again)[i].tokens, (*want)[i].tokens) << "request " << i;
  EXPECT_EQ(small.free_blocks(), small.num_blocks());
}

// The device's control flow on the CPU engine (backend_sampling): step k + 1 is queued before step
// k's tokens are read, with step k's draws as its input tokens. Against the same flow one step at a
// time, over refills (7 requests, 4 rows), a pool that preempts, top-p / top-k rows, and stop tokens
// that end rows in the middle of a run-ahead chain (their draws from the step ahead are dropped):
// every completion, log-prob and finish reason is the same, each token records the version of the
// pass that drew it, and every block is back in the pool. With every request in the batch at once
// and a pool that never runs dry, nothing ends the chain: stops and caps only take rows out of it,
// so every decode step but the first is run ahead.
TEST(Generation, RunAheadGivesTheStepByStepCompletions) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, true), 1, &B);
  Randomize(*m, 21);
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 7; ++i) {
    GenerationRequest r;
    for (int j = 0; j < 2 + (i * 3) % 5; ++j) r.prompt.push_back((5 * i + 2 * j + 1) % 16);
    r.sampling = {1.0f, i % 3 == 1 ? 0.8f : 1.0f, i % 4 == 3 ? 6 : 0};
    r.seed = 900 + i;
    r.max_new_tokens = 9 + (5 * i) % 11;
    reqs.push_back(r);
  }
  // Stop tokens that end three rows mid-completion: the first token of a free run that its
  // completion draws at position 3 or later and not before.
  {
    Generator free_gen(m.get(), 4, 32, {.backend_sampling = true});
    auto free_run = free_gen.Generate(reqs);
    ASSERT_TRUE(free_run.ok());
    for (int i : {0, 2, 5}) {
      const auto& t = (*free_run)[i].tokens;
      for (size_t p = 3; p + 1 < t.size() && reqs[i].stop_token_ids.empty(); ++p)
        if (std::find(t.begin(), t.begin() + p, t[p]) == t.begin() + p) reqs[i].stop_token_ids = {t[p]};
      ASSERT_FALSE(reqs[i].stop_token_ids.empty()) << "request " << i;
    }
  }
  for (const auto& [rows, pool] : {std::pair{4, int64_t{0}}, std::pair{4, int64_t{40}}, std::pair{7, int64_t{0}}}) {
    GeneratorOptions step_by_step{.kv_cache_tokens = pool, .block_size = 4, .run_ahead = false, .backend_sampling = true};
    GeneratorOptions ahead = step_by_step;
    ahead.run_ahead = true;
    Generator want_gen(m.get(), rows, 32, step_by_step), got_gen(m.get(), rows, 32, ahead);
    uint64_t calls = 0;
    got_gen.SetStepHook([&]() { return ++calls; });
    auto want = want_gen.Generate(reqs);
    auto got = got_gen.Generate(reqs);
    ASSERT_TRUE(want.ok()) << want.status().ToString();
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    const GeneratorStats& s = got_gen.stats();
    std::cout << rows << " rows, pool " << got_gen.num_blocks() << " blocks: " << s.decode_steps << " decode steps, " << s.steps_ahead
              << " run ahead, " << s.rows_dropped_ahead << " rows dropped, " << s.preemptions << " preemptions\n";
    EXPECT_EQ(want_gen.stats().steps_ahead, 0);
    EXPECT_GT(s.steps_ahead, 0);
    EXPECT_GT(s.rows_dropped_ahead, 0);  // some row stopped while the step after it was queued
    if (pool > 0) {
      EXPECT_GT(s.preemptions, 0);
    }
    if (rows == 7) {
      EXPECT_EQ(s.steps_ahead, s.decode_steps - 1);
    }
    int stopped = 0;
    for (size_t i = 0; i < reqs.size(); ++i) {
      const auto& g = (*got)[i];
      EXPECT_EQ(g.tokens, (*want)[i].tokens) << "request " << i;
      EXPECT_EQ(g.logprobs, (*want)[i].logprobs) << "request " << i;
      EXPECT_EQ(g.finish, (*want)[i].finish) << "request " << i;
      stopped += g.finish == FinishReason::kStop;
      ASSERT_EQ(g.versions.size(), g.tokens.size());
      for (size_t t = 1; t < g.versions.size(); ++t)  // each token from a later pass than the one before
        EXPECT_LT(g.versions[t - 1], g.versions[t]) << "request " << i << " token " << t;
      EXPECT_LE(g.versions.back(), calls);
    }
    EXPECT_GT(stopped, 0);
    EXPECT_EQ(got_gen.free_blocks(), got_gen.num_blocks());
  }
}

// GeneratorStats counts the forward passes and times them: three requests admitted together are one
// prefill call over their prompt rows; each then draws its first token from that call and the other
// four from four decode steps of three rows.
TEST(Generation, StatsCountPrefillCallsAndDecodeSteps) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, true), 1, &B);
  Randomize(*m, 33);
  std::vector<GenerationRequest> reqs(3);
  for (int i = 0; i < 3; ++i) {
    reqs[i].prompt = std::vector<int32_t>(2 + 3 * i, 1 + i);
    reqs[i].sampling = {1.0f, 1.0f, 0};
    reqs[i].seed = 70 + i;
    reqs[i].max_new_tokens = 5;
  }
  Generator gen(m.get(), /*max_batch=*/4, /*max_len=*/16);
  auto out = gen.Generate(reqs);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  for (const auto& r : *out) EXPECT_EQ(r.tokens.size(), 5u);
  const GeneratorStats& s = gen.stats();
  EXPECT_EQ(s.prefill_calls, 1);
  EXPECT_EQ(s.prefill_rows, 2 + 5 + 8);
  EXPECT_EQ(s.decode_steps, 4);
  EXPECT_EQ(s.decode_rows, 12);
  EXPECT_GT(s.prefill_seconds, 0.0);
  EXPECT_GT(s.decode_seconds, 0.0);
  EXPECT_EQ(s.launch_gap_seconds, 0.0);  // the host engine has no device to leave idle
  // A second call starts the counts again.
  ASSERT_TRUE(gen.Generate({reqs[0]}).ok());
  EXPECT_EQ(gen.stats().prefill_calls, 1);
  EXPECT_EQ(gen.stats().decode_steps, 4);
  EXPECT_EQ(gen.stats().decode_rows, 4);
}

TEST(Generation, RejectsBadRequests) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, true), 1, &B);
  Generator gen(m.get(), 1, 8);
  GenerationRequest r;
  EXPECT_TRUE(IsInvalidArgument(gen.Generate({r}).status()));  // empty prompt
  r.prompt = {1, 99};
  EXPECT_TRUE(IsInvalidArgument(gen.Generate({r}).status()));  // out of vocabulary
  r.prompt = {1, 2, 3};
  r.max_new_tokens = 6;
  EXPECT_TRUE(IsInvalidArgument(gen.Generate({r}).status()));  // exceeds max_len 8
}

TEST(Training, AdamWStepsRaiseLogLikelihoodAndClipBoundsTheNorm) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen3, false), 3, &B);
  Randomize(*m, 13);
  Batch b;
  std::vector<float> ones(b.N(), 1.0f), lp(b.N());
  AdamW opt(m.get(), {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.01f, .decay_filter = nullptr});
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    m->ZeroGrad();
    m->Forward(b.tokens.data(), b.cu.data(), b.S(), b.N(), 1.0f, lp.data(), nullptr);
    double ll = 0;
    for (float x : lp) ll += x;
    if (step == 0) first = ll;
    last = ll;
    std::vector<float> neg(b.N(), -1.0f);  // minimise -sum logprob
    m->Backward(neg.data(), nullptr);
    const double norm = ClipGradNorm(&B, m->grads(), m->num_params(), 1.0);
    EXPECT_GT(norm, 0);
    EXPECT_LE(std::sqrt(B.SumSquares(m->grads(), m->num_params())), 1.0 + 1e-4);
    opt.Step();
  }
  EXPECT_GT(last, first + 1.0) << "log-likelihood " << first << " -> " << last;
}

// A batch a few rows larger than the last must not reallocate every activation: the learner's
// batches vary by a few rows, and growing to each new maximum exactly cost +50 ms per such step
// on an H200 (a free and an allocation of every activation). Capacity grows by at least a quarter.
TEST(Training, ActivationsGrowByAQuarterNotToEachNewMaximum) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, true), 5, &B);
  auto forward = [&](int n) {
    std::vector<int32_t> tokens(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) tokens[static_cast<size_t>(i)] = i % 7;
    std::vector<int32_t> cu = {0};  // sequences of at most 40 tokens (the config's 64 positions)
    while (cu.back() < n) cu.push_back(std::min(n, cu.back() + 40));
    std::vector<float> lp(static_cast<size_t>(n));
    m->Forward(tokens.data(), cu.data(), static_cast<int>(cu.size()) - 1, n, 1.0f, lp.data(), nullptr);
    for (float x : lp) EXPECT_TRUE(std::isfinite(x));
  };
  forward(1000);
  const int first = m->activation_rows();
  EXPECT_GE(first, 1000);
  forward(first + 1);  // one row more than it holds: grows by a quarter, not by one row
  const int grown = m->activation_rows();
  EXPECT_GE(grown, first + first / 4);
  for (int n = first + 2; n <= first + first / 4; n += 37) forward(n);
  EXPECT_EQ(m->activation_rows(), grown);
  forward(10);
  EXPECT_EQ(m->activation_rows(), grown);  // never shrinks
}

// ---- files ----------------------------------------------------------------------------------------

fs::path TempDir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("aha_engine_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

TEST(ParamTable, QkvAndGateUpAreAdjacentForTheirFusedProducts) {
  // One product reads [Wq; Wk; Wv] (and the biases [bq; bk; bv]) and one reads [Wg; Wu].
  for (Arch arch : {Arch::kQwen2, Arch::kQwen3, Arch::kLlama}) {
    const ModelConfig c = TinyConfig(arch, true);
    const auto table = ParamTable(c);
    auto at = [&](const std::string& name) -> const ParamInfo* {
      for (const auto& p : table)
        if (p.name == name) return &p;
      return nullptr;
    };
    for (int l = 0; l < c.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      for (const char* group : {"weight", "bias"}) {
        const ParamInfo* q = at(p + "self_attn.q_proj." + group);
        const ParamInfo* k = at(p + "self_attn.k_proj." + group);
        const ParamInfo* v = at(p + "self_attn.v_proj." + group);
        if (std::string(group) == "bias" && !c.attention_bias) {
          EXPECT_TRUE(!q && !k && !v);
          continue;
        }
        ASSERT_TRUE(q && k && v) << ArchName(arch) << " " << p << group;
        EXPECT_EQ(k->offset, q->offset + q->numel()) << ArchName(arch) << " " << p << group;
        EXPECT_EQ(v->offset, k->offset + k->numel()) << ArchName(arch) << " " << p << group;
      }
      const ParamInfo* g = at(p + "mlp.gate_proj.weight");
      const ParamInfo* u = at(p + "mlp.up_proj.weight");
      ASSERT_TRUE(g && u);
      EXPECT_EQ(u->offset, g->offset + g->numel()) << ArchName(arch) << " " << p;
    }
  }
}

TEST(ModelFiles, SaveLoadRoundTripF32ExactBf16Rounded) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kLlama, false), 7, &B);
  Randomize(*m, 14);
  const fs::path dir = TempDir("roundtrip");
  ASSERT_TRUE(m->Save((dir / "f32").string(), DType::kF32).ok());
  ASSERT_TRUE(m->Save((dir / "bf16").string(), DType::kBF16).ok());
  auto a = Transformer::Load((dir / "f32").string(), &B);
  auto b = Transformer::Load((dir / "bf16").string(), &B);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_TRUE((*a)->config().rope.llama3);
  for (size_t i = 0; i < m->num_params(); ++i) {
    ASSERT_EQ((*a)->params()[i], m->params()[i]);
    ASSERT_EQ((*b)->params()[i], BF16ToF32(F32ToBF16(m->params()[i])));
  }
  fs::remove_all(dir);
}

TEST(ModelFiles, ReadsShardedIndex) {
  CpuBackend B;
  auto m = Transformer::Init(TinyConfig(Arch::kQwen2, false), 8, &B);
  Randomize(*m, 15);
  const fs::path dir = TempDir("sharded");
  ASSERT_TRUE(m->Save(dir.string(), DType::kF32).ok());
  fs::remove(dir / "model.safetensors");
  std::vector<NamedTensor> s1, s2;
  nlohmann::json map;
  for (const ParamInfo& p : m->param_table()) {
    const bool first = p.name.find("layers.1") == std::string::npos;
    (first ? s1 : s2).push_back({p.name, DType::kF32, p.shape, m->param(p.name)});
    map[p.name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  ASSERT_TRUE(WriteSafetensors((dir / "model-00001-of-00002.safetensors").string(), s1).ok());
  ASSERT_TRUE(WriteSafetensors((dir / "model-00002-of-00002.safetensors").string(), s2).ok());
  std::ofstream(dir / "model.safetensors.index.json") << nlohmann::json{{"metadata", {}}, {"weight_map", map}}.dump();
  auto l = Transformer::Load(dir.string(), &B);
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  for (size_t i = 0; i < m->num_params(); ++i) ASSERT_EQ((*l)->params()[i], m->params()[i]);
  fs::remove_all(dir);
}

class BadModelDir : public ::testing::Test {
 protected:
  void SetUp() override {
    m_ = Transformer::Init(TinyConfig(Arch::kQwen2, true), 9, &B_);
    dir_ = TempDir("bad");
    ASSERT_TRUE(m_->Save(dir_.string(), DType::kF32).ok());
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Rewrites model.safetensors with `edit` applied to the tensor list.
  void Rewrite(const std::function<void(std::vector<NamedTensor>&)>& edit) {
    std::vector<NamedTensor> t;
    for (const ParamInfo& p : m_->param_table()) t.push_back({p.name, DType::kF32, p.shape, m_->param(p.name)});
    edit(t);
    ASSERT_TRUE(WriteSafetensors((dir_ / "model.safetensors").string(), t).ok());
  }
  std::string LoadError() {
    auto r = Transformer::Load(dir_.string(), &B_);
    EXPECT_FALSE(r.ok());
    return r.ok() ? "" : r.status().message();
  }
  CpuBackend B_;
  std::unique_ptr<Transformer> m_;
  fs::path dir_;
};

TEST_F(BadModelDir, MissingTensorNamesFileAndTensor) {
  Rewrite([](auto& t) { std::erase_if(t, [](auto& x) { return x.name == "model.layers.1.mlp.up_proj.weight"; }); });
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << e;
}

TEST_F(BadModelDir, ShapeDisagreeingWithConfigNamesTensor) {
  std::vector<float> wrong(8 * 13, 0.0f);
  Rewrite([&](auto& t) {
    for (auto& x : t)
      if (x.name == "model.layers.0.mlp.gate_proj.weight") x.shape = {13, 8}, x.data = wrong.data();
  });
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.layers.0.mlp.gate_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("[13, 8]"), std::string::npos) << e;
  EXPECT_NE(e.find("config.json"), std::string::npos) << e;
}

TEST_F(BadModelDir, UnexpectedTensorIsRefused) {
  std::vector<float> extra(8, 0.0f);
  Rewrite([&](auto& t) { t.push_back({"model.layers.0.self_attn.q_norm.weight", DType::kF32, {8}, extra.data()}); });
  EXPECT_NE(LoadError().find("model.layers.0.self_attn.q_norm.weight"), std::string::npos);
}

TEST_F(BadModelDir, IntegerWeightDtypeIsRefused) {
  std::vector<int32_t> ints(8, 1);
  Rewrite([&](auto& t) {
    for (auto& x : t)
      if (x.name == "model.norm.weight") x.dtype = DType::kI32, x.data = ints.data();
  });
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.norm.weight"), std::string::npos) << e;
}

TEST_F(BadModelDir, TruncatedFilesAreDataLossNamingTheFile) {
  const fs::path f = dir_ / "model.safetensors";
  const auto size = fs::file_size(f);
  fs::resize_file(f, size - 10);  // data cut short
  std::string e = LoadError();
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("tensor"), std::string::npos) << e;
  fs::resize_file(f, 20);  // header cut short
  e = LoadError();
  EXPECT_NE(e.find("truncated safetensors header"), std::string::npos) << e;
  fs::resize_file(f, 3);
  EXPECT_NE(LoadError().find("truncated"), std::string::npos);
  std::ofstream(f, std::ios::binary) << std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8);  // absurd length
  EXPECT_NE(LoadError().find("exceeds the limit"), std::string::npos);
}

TEST_F(BadModelDir, UnsupportedArchitectureAndRopeAreNamed) {
  auto cfg = nlohmann::json::parse(ModelConfigToJson(m_->config()));
  cfg["model_type"] = "gpt2";
  std::ofstream(dir_ / "config.json") << cfg.dump();
  std::string e = LoadError();
  EXPECT_NE(e.find("config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("gpt2"), std::string::npos) << e;
  cfg["model_type"] = "qwen2";
  cfg["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 10000.0}};
  std::ofstream(dir_ / "config.json") << cfg.dump();
  EXPECT_NE(LoadError().find("yarn"), std::string::npos);
}

// Builds safetensors bytes from a header JSON text and a data block.
std::vector<char> StBytes(const std::string& header, size_t data_bytes) {
  std::vector<char> b(8);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  b.insert(b.end(), header.begin(), header.end());
  b.resize(b.size() + data_bytes, 0);
  return b;
}

TEST(Safetensors, MalformedHeadersAreErrorsNamingFileAndTensor) {
  struct Case {
    std::string header;
    size_t data;
    std::string want;
  };
  const std::vector<Case> cases = {
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8, "outside the file"},
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", 16, "does not match"},
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,0]}})", 16, "data range"},
      {R"({"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8, "unsupported dtype C64"},
      {R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, "bad shape"},
      {R"({"w":{"dtype":"F32","shape":[4]}})", 16, "malformed header entry"},
      {R"({"w":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}})", 4, "too large"},
      {R"([1,2,3])", 0, "not a JSON object"},
      {R"({"w":)", 0, "not a JSON object"},
  };
  for (const Case& c : cases) {
    auto f = SafetensorsFile::FromBytes(StBytes(c.header, c.data), "m/x.safetensors");
    ASSERT_FALSE(f.ok()) << c.header;
    EXPECT_NE(f.status().message().find("m/x.safetensors"), std::string::npos) << f.status().message();
    EXPECT_NE(f.status().message().find(c.want), std::string::npos) << f.status().message();
    if (c.header.find("\"w\":{") != std::string::npos && c.want != "not a JSON object") {
      EXPECT_NE(f.status().message().find("tensor w"), std::string::npos) << f.status().message();
    }
  }
  auto ok = SafetensorsFile::FromBytes(StBytes(R"({"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})", 4), "ok");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->Read("w").value().ToVector(), (std::vector<float>{0.0f, 0.0f}));
  EXPECT_TRUE(IsNotFound(ok->Read("v").status()));
}

// aha init --preset P --tokenizer T: T's ids fit P's embedding -> P's shape (the Qwen3 tokenizer's
// 151,669 ids in Qwen2.5-0.5B's 151,936 rows); more -> padded to a multiple of 128 (an odd vocabulary
// misaligned every row of logits: the pipeline's lm-head and sampling ran on slow paths).
TEST(Config, PresetKeepsItsVocabularyOrPadsALargerTokenizers) {
  EXPECT_EQ(PresetConfig(Arch::kQwen3, "0.5b", 151669)->vocab_size, 151936);
  EXPECT_EQ(PresetConfig(Arch::kQwen2, "0.5b", 0)->vocab_size, 151936);
  EXPECT_EQ(PresetConfig(Arch::kQwen2, "tiny", 0)->vocab_size, 259);
  EXPECT_EQ(PresetConfig(Arch::kQwen2, "tiny", 259)->vocab_size, 259);
  EXPECT_EQ(PresetConfig(Arch::kQwen2, "tiny", 151669)->vocab_size, 151680);
  EXPECT_EQ(PresetConfig(Arch::kLlama, "tiny", 384)->vocab_size, 384);
  EXPECT_EQ(PresetConfig(Arch::kQwen2, "1.5b", 200000)->vocab_size, 200064);
}

// The 0.6b preset with the qwen3 family is Qwen3-0.6B's shape: 596M parameters with the tied
// embedding (0.44B without it), per-head q/k norms, no attention bias.
TEST(Config, Qwen3PresetHasQwen3SmallestShape) {
  const auto c = PresetConfig(Arch::kQwen3, "0.6b", 151669);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->vocab_size, 151936);
  EXPECT_EQ(c->num_heads * c->head_dim, 2048);
  EXPECT_EQ(c->NumParameters(), 596049920);
  EXPECT_FALSE(PresetConfig(Arch::kQwen3, "0.7b", 0).ok());
}

TEST(Config, ClassicAndNewRopeFormsAgree) {
  const std::string classic = R"({"model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
    "num_attention_heads":2,"num_key_value_heads":1,"intermediate_size":16,"rope_theta":500000.0,
    "rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
    "original_max_position_embeddings":8192}})";
  const std::string modern = R"({"model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
    "num_attention_heads":2,"num_key_value_heads":1,"intermediate_size":16,
    "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":32.0,"low_freq_factor":1.0,
    "high_freq_factor":4.0,"original_max_position_embeddings":8192}})";
  auto a = ParseModelConfig(classic, "a/config.json");
  auto b = ParseModelConfig(modern, "b/config.json");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  for (const ModelConfig* c : {&*a, &*b}) {
    EXPECT_TRUE(c->rope.llama3);
    EXPECT_EQ(c->rope.theta, 500000.0);
    EXPECT_EQ(c->rope.factor, 32.0);
    EXPECT_EQ(c->head_dim, 4);
  }
  auto bad = ParseModelConfig(R"({"model_type":"qwen2","vocab_size":10})", "c/config.json");
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("c/config.json"), std::string::npos);
}

// ---- commands -----------------------------------------------------------------------------------

int RunCommand(int (*run)(int, char**), std::vector<std::string> args, const std::string& in, std::string* out) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::istringstream input(in);
  std::ostringstream output;
  auto* old_in = std::cin.rdbuf(input.rdbuf());
  auto* old_out = std::cout.rdbuf(output.rdbuf());
  const int rc = run(static_cast<int>(argv.size()), argv.data());
  std::cin.rdbuf(old_in);
  std::cout.rdbuf(old_out);
  *out = output.str();
  return rc;
}

TEST(Commands, InitThenLogprobsThenGenerate) {
  const fs::path dir = TempDir("cmd");
  std::string out;
  ASSERT_EQ(RunCommand(RunInitCommand, {"aha init", "--arch", "qwen3", "--preset", "tiny", "--out", dir.string(), "--seed", "3"}, "", &out), 0);
  ASSERT_TRUE(fs::exists(dir / "config.json"));
  ASSERT_TRUE(fs::exists(dir / "model.safetensors"));
  auto tok = tokenizer::Tokenizer::Load(dir.string());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->vocab_size(), tokenizer::kByteVocabSize);
  EXPECT_EQ((*tok)->Encode("Hi"), (std::vector<int32_t>{72, 105}));

  ASSERT_EQ(RunCommand(RunLogprobsCommand, {"aha logprobs", "--model", dir.string()}, R"({"tokens": [[72, 105, 33], [5]]})", &out), 0);
  auto j = nlohmann::json::parse(out);
  ASSERT_EQ(j["logprobs"].size(), 2u);
  ASSERT_EQ(j["logprobs"][0].size(), 3u);
  EXPECT_TRUE(j["logprobs"][0][0].is_null());
  CpuBackend B;
  auto m = Transformer::Load(dir.string(), &B);
  ASSERT_TRUE(m.ok());
  std::vector<int32_t> t = {72, 105, 33}, cu = {0, 3};
  std::vector<float> lp(3);
  (*m)->Forward(t.data(), cu.data(), 1, 3, 1.0f, lp.data(), nullptr);
  EXPECT_NEAR(j["logprobs"][0][1].get<double>(), lp[1], 1e-6);
  EXPECT_NEAR(j["logprobs"][0][2].get<double>(), lp[2], 1e-6);
  EXPECT_LT(lp[1], 0.0f);
  EXPECT_EQ(j["logprobs"][1], nlohmann::json::array({nullptr}));

  EXPECT_NE(RunCommand(RunLogprobsCommand, {"aha logprobs", "--model", dir.string()}, R"({"tokens": [[1, 999]]})", &out), 0);

  ASSERT_EQ(RunCommand(RunGenerateCommand, {"aha generate", "--model", dir.string(), "--prompt", "Hello", "--samples", "3",
                                            "--max-new-tokens", "5", "--seed", "7", "--temperature", "0.9"}, "", &out), 0);
  auto g = nlohmann::json::parse(out);
  ASSERT_EQ(g["completions"].size(), 3u);
  for (const auto& c : g["completions"]) {
    EXPECT_LE(c["tokens"].size(), 5u);
    EXPECT_EQ(c["tokens"].size(), c["logprobs"].size());
    EXPECT_TRUE(c["text"].is_string());
  }
  std::string again;
  ASSERT_EQ(RunCommand(RunGenerateCommand, {"aha generate", "--model", dir.string(), "--prompt", "Hello", "--samples", "3",
                                            "--max-new-tokens", "5", "--seed", "7", "--temperature", "0.9"}, "", &again), 0);
  EXPECT_EQ(out, again) << "same seed, same completions";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace aha::engine
