// Sampling: the empirical distribution of 100,000 draws matches the filtered softmax (chi-square
// test), a seed reproduces its tokens, and behaviour log-probs follow the sampling temperature.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/sampler.h"

namespace aha::engine {
namespace {

// Upper 0.999 quantile of chi-square with k degrees of freedom (Wilson-Hilferty approximation).
double ChiSquareCritical(int k) {
  const double z = 3.09;  // one-sided 0.999 normal quantile
  const double a = 2.0 / (9.0 * k);
  return k * std::pow(1 - a + z * std::sqrt(a), 3);
}

std::vector<float> TestLogits() {
  // 20 tokens with a spread of probabilities, including near-ties and a long tail.
  std::vector<float> l(20);
  for (int i = 0; i < 20; ++i) l[i] = 2.0f * std::sin(1.3f * i) + 0.1f * i;
  return l;
}

void CheckChiSquare(const SamplingOptions& o, uint64_t seed) {
  const auto logits = TestLogits();
  const int V = static_cast<int>(logits.size());
  const auto p = FilteredDistribution(logits.data(), V, o);
  const int draws = 100000;
  std::vector<int> count(V, 0);
  Rng rng(seed);
  for (int i = 0; i < draws; ++i) ++count[SampleToken(logits.data(), V, o, rng).token];
  double chi2 = 0;
  int dof = -1;
  for (int v = 0; v < V; ++v) {
    if (p[v] == 0) {
      EXPECT_EQ(count[v], 0) << "token " << v << " is filtered out but was drawn";
      continue;
    }
    const double e = p[v] * draws;
    chi2 += (count[v] - e) * (count[v] - e) / e;
    ++dof;
  }
  ASSERT_GT(dof, 0);
  EXPECT_LT(chi2, ChiSquareCritical(dof)) << "T=" << o.temperature << " top_p=" << o.top_p << " top_k=" << o.top_k;
}

TEST(Sampler, FrequenciesMatchSoftmaxAtTemperature) { CheckChiSquare({0.7f, 1.0f, 0}, 1); }
TEST(Sampler, FrequenciesMatchTopKFilteredSoftmax) { CheckChiSquare({1.0f, 1.0f, 5}, 2); }
TEST(Sampler, FrequenciesMatchTopPFilteredSoftmax) { CheckChiSquare({1.2f, 0.8f, 0}, 3); }
TEST(Sampler, FrequenciesMatchTopKAndTopP) { CheckChiSquare({0.9f, 0.9f, 8}, 4); }

TEST(Sampler, TopPKeepsSmallestPrefixReachingMass) {
  std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  auto p = FilteredDistribution(logits.data(), 4, {1.0f, 0.75f, 0});  // 0.5 < 0.75 <= 0.8
  EXPECT_NEAR(p[0], 0.625, 1e-6);  // 0.5 / 0.8
  EXPECT_NEAR(p[1], 0.375, 1e-6);
  EXPECT_EQ(p[2], 0.0);
  EXPECT_EQ(p[3], 0.0);
}

TEST(Sampler, TopKKeepsTheKLargest) {
  std::vector<float> logits = {1.0f, 4.0f, 3.0f, 2.0f};
  auto p = FilteredDistribution(logits.data(), 4, {1.0f, 1.0f, 2});
  EXPECT_EQ(p[0], 0.0);
  EXPECT_EQ(p[3], 0.0);
  EXPECT_NEAR(p[1], 1.0 / (1.0 + std::exp(-1.0)), 1e-9);
  EXPECT_NEAR(p[2], 1.0 - p[1], 1e-9);
}

TEST(Sampler, TopPOnLargeVocabularyEqualsFullSortReference) {
  // 151,936 logits (Qwen's vocabulary) with a heavy head: the nucleus needs hundreds of tokens, so
  // the partial sort must grow several times; compare with a plain full sort.
  const int V = 151936;
  std::vector<float> logits(V);
  Rng rng(9);
  for (auto& l : logits) l = static_cast<float>(8.0 * std::pow(rng.Uniform(), 6.0));
  for (float top_p : {0.5f, 0.9f, 0.99f}) {
    for (int top_k : {0, 1000}) {
      const SamplingOptions o{0.8f, top_p, top_k};
      const auto p = FilteredDistribution(logits.data(), V, o);
      std::vector<int> order(V);
      for (int i = 0; i < V; ++i) order[i] = i;
      std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
      const int K = top_k > 0 ? top_k : V;
      double z = 0;
      for (int r = 0; r < K; ++r) z += std::exp(logits[order[r]] / 0.8);
      double cum = 0;
      int keep = 0;
      while (keep < K) {
        cum += std::exp(logits[order[keep]] / 0.8) / z;
        ++keep;
        if (cum >= top_p) break;
      }
      int kept = 0;
      for (int i = 0; i < V; ++i) kept += p[i] > 0;
      EXPECT_EQ(kept, keep) << "top_p " << top_p << " top_k " << top_k;
      for (int r = 0; r < keep; ++r) EXPECT_GT(p[order[r]], 0.0) << "rank " << r;
      EXPECT_GT(keep, 64) << "the test should force the partial sort to grow";
    }
  }
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferentTokens) {
  const auto logits = TestLogits();
  auto run = [&](uint64_t seed) {
    Rng rng(seed);
    std::vector<int> t;
    for (int i = 0; i < 200; ++i) t.push_back(SampleToken(logits.data(), 20, {1.0f, 0.95f, 0}, rng).token);
    return t;
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
}

TEST(Sampler, BehaviourLogprobIsFullSoftmaxAtSamplingTemperature) {
  const auto logits = TestLogits();
  Rng rng(5);
  const float T = 0.6f;
  for (int i = 0; i < 50; ++i) {
    SampledToken t = SampleToken(logits.data(), 20, {T, 0.5f, 3}, rng);
    double m = -1e300, s = 0;
    for (float l : logits) m = std::max(m, static_cast<double>(l) / T);
    for (float l : logits) s += std::exp(l / T - m);
    EXPECT_NEAR(t.logprob, logits[t.token] / T - (m + std::log(s)), 1e-5);
  }
}

TEST(Sampler, GreedyTakesArgmax) {
  std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
  Rng rng(0);
  EXPECT_EQ(SampleToken(logits.data(), 4, {0.0f, 1.0f, 0}, rng).token, 1);
}

}  // namespace
}  // namespace aha::engine
