// Parity with Hugging Face transformers on the fixtures of tests/fixtures/make_hf_fixtures.py
// (tiny random Qwen2 with q/k/v bias and tied embeddings, Qwen3 with q/k norm, Llama 3 with llama3
// rope scaling; float32, CPU). The engine runs the fixture's three sequences PACKED in one pass,
// while transformers ran them one at a time, so this also checks that packing changes nothing.
//
// Tolerances (from the issue, confirmed against observed errors): log-probs and entropies within
// 1e-4 absolute; each parameter gradient within 1e-3 relative (||g - g_hf|| / ||g_hf||); greedy
// generation token for token (the fixture records the top-1 margin at each step; the smallest is
// 0.04 logits, far above f32 disagreement).
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "engine/cpu_backend.h"
#include "engine/generate.h"
#include "engine/safetensors.h"
#include "engine/transformer.h"

namespace aha::engine {
namespace {

class HfParity : public ::testing::TestWithParam<std::string> {};

TEST_P(HfParity, LogprobsEntropiesGradientsAndGreedyMatchTransformers) {
  const std::string dir = std::string(AHA_FIXTURES_DIR) + "/hf/" + GetParam();
  CpuBackend backend;
  auto loaded = Transformer::Load(dir, &backend);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  Transformer& model = **loaded;
  auto expected = SafetensorsFile::Open(dir + "/expected.safetensors");
  ASSERT_TRUE(expected.ok()) << expected.status().ToString();
  auto read = [&](const std::string& name) { return expected->Read(name).value().ToVector(); };
  auto tokens_t = expected->Read("tokens").value();
  auto cu_t = expected->Read("cu_seqlens").value();
  const int N = static_cast<int>(tokens_t.numel()), S = static_cast<int>(cu_t.numel()) - 1;
  std::vector<int32_t> tokens(tokens_t.i32(), tokens_t.i32() + N), cu(cu_t.i32(), cu_t.i32() + S + 1);

  std::vector<float> lp(N), ent(N);
  model.ZeroGrad();
  model.Forward(tokens.data(), cu.data(), S, N, 1.0f, lp.data(), ent.data());
  const auto lp_ref = read("logprobs"), ent_ref = read("entropies");
  double worst_lp = 0, worst_ent = 0;
  for (int i = 0; i < N; ++i) {
    worst_lp = std::max(worst_lp, std::abs(static_cast<double>(lp[i]) - lp_ref[i]));
    worst_ent = std::max(worst_ent, std::abs(static_cast<double>(ent[i]) - ent_ref[i]));
  }
  EXPECT_LT(worst_lp, 1e-4) << "max |logprob - transformers|";
  EXPECT_LT(worst_ent, 1e-4) << "max |entropy - transformers|";
  std::cout << GetParam() << ": max logprob error " << worst_lp << ", max entropy error " << worst_ent << "\n";

  // loss = sum coef_lp * logprobs + coef_ent * entropies: the upstream gradients are the coefficients.
  const auto c_lp = read("coef_lp"), c_ent = read("coef_ent");
  model.Backward(c_lp.data(), c_ent.data());
  int checked = 0;
  double worst_rel = 0;
  std::string worst_name;
  for (const ParamInfo& p : model.param_table()) {
    const std::string key = "grad." + p.name;
    ASSERT_TRUE(expected->Has(key)) << key;
    const auto ref = read(key);
    const float* g = model.grad(p.name);
    ASSERT_EQ(ref.size(), p.numel()) << key;
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num += (g[i] - ref[i]) * static_cast<double>(g[i] - ref[i]);
      den += static_cast<double>(ref[i]) * ref[i];
    }
    const double rel = std::sqrt(num / std::max(den, 1e-30));
    EXPECT_LT(rel, 1e-3) << p.name;
    if (rel > worst_rel) worst_rel = rel, worst_name = p.name;
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(model.param_table().size()));
  std::cout << GetParam() << ": worst gradient relative error " << worst_rel << " (" << worst_name << ")\n";

  // Greedy generation with the KV cache equals transformers' greedy full-recompute decoding.
  auto prompt_t = expected->Read("gen.prompt").value();
  auto want_t = expected->Read("gen.output").value();
  GenerationRequest req;
  req.prompt.assign(prompt_t.i32(), prompt_t.i32() + prompt_t.numel());
  req.sampling.temperature = 0.0f;
  req.max_new_tokens = static_cast<int>(want_t.numel());
  Generator gen(&model, 2, 64);
  auto out = gen.Generate({req});
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  std::vector<int32_t> want(want_t.i32(), want_t.i32() + want_t.numel());
  EXPECT_EQ((*out)[0].tokens, want);
}

INSTANTIATE_TEST_SUITE_P(Models, HfParity, ::testing::Values("qwen2", "qwen3", "llama"));

}  // namespace
}  // namespace aha::engine
