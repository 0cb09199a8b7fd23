// Token sampling from one row of logits: temperature, top-k, top-p, per-sequence seeded RNG.
//
// Order (as transformers' and vLLM's samplers): z = logits / T, keep the k largest (top_k > 0), then
// the smallest set of most-likely tokens whose probability reaches top_p (top_p < 1; always at least
// one), renormalise, draw. temperature == 0 means greedy (argmax; ties go to the lowest id).
//
// The behaviour log-prob returned with each token is log softmax(logits / T)[token] over the FULL
// vocabulary (unfiltered), at the sampling temperature (T = 1 for greedy): the same quantity the
// learner computes with Transformer::Forward(temperature = T), so the importance ratio of GRPO.md is
// exactly 1 at equal weights. Top-k/top-p change which tokens can be drawn, not this convention.
#pragma once

#include <cstdint>
#include <vector>

namespace aha::engine {

// xoshiro256** seeded through splitmix64: a fixed, platform-independent stream per seed (unlike
// std:: distributions, whose outputs differ between standard libraries).
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t Next();
  double Uniform();  // [0, 1) with 53 random bits

 private:
  uint64_t s_[4];
};

struct SamplingOptions {
  float temperature = 1.0f;
  float top_p = 1.0f;
  int top_k = 0;  // 0 = off
};

struct SampledToken {
  int32_t token = 0;
  float logprob = 0.0f;  // behaviour log-prob (see above)
};

// Draws one token from logits[V]. `scratch` is reused between calls to avoid allocation.
SampledToken SampleToken(const float* logits, int V, const SamplingOptions& options, Rng& rng,
                         std::vector<float>* scratch = nullptr);

// The distribution SampleToken draws from (probabilities over V, zeros outside the kept set); used
// by the sampler's statistical test and by anyone who needs the filtered distribution itself.
std::vector<double> FilteredDistribution(const float* logits, int V, const SamplingOptions& options);

}  // namespace aha::engine
