// Sampling (see sampler.h).
#include "engine/sampler.h"

#include "engine/backend.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace aha::engine {

Rng::Rng(uint64_t seed) {
  uint64_t x = seed;
  for (auto& s : s_) {
    x += 0x9e3779b97f4a7c15ULL;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    s = z ^ (z >> 31);
  }
}

static inline uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t Rng::Next() {
  const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = Rotl(s_[3], 45);
  return result;
}

double Rng::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

namespace {

int Argmax(const float* x, int V) {
  int best = 0;
  for (int i = 1; i < V; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

double LogSumExp(const float* x, int V, double inv_t) {
  double m = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < V; ++i) m = std::max(m, x[i] * inv_t);
  double s = 0;
  for (int i = 0; i < V; ++i) s += std::exp(x[i] * inv_t - m);
  return m + std::log(s);
}

// The kept set in rank order with unnormalised weights exp(z - max z), and their sum. Sorting is
// partial: the top `c` ranks are ordered (c doubling from 64) until they hold the top-p mass, so a
// typical call costs O(V), not O(V log V), on a 150k vocabulary. Ranks order by logit, then by
// lower id, a strict order, so the result never depends on the sort's stability.
struct KeptSet {
  std::vector<int> ids;
  std::vector<double> weights;
  double total = 0;
};

KeptSet Kept(const float* logits, int V, const SamplingOptions& o) {
  KeptSet k;
  const double inv_t = 1.0 / o.temperature;
  double m = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < V; ++i) m = std::max(m, logits[i] * inv_t);
  auto weight = [&](int id) { return std::exp(logits[id] * inv_t - m); };
  const int K = o.top_k > 0 ? std::min(o.top_k, V) : V;
  auto before = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  thread_local std::vector<int> order;
  order.resize(V);
  std::iota(order.begin(), order.end(), 0);
  // Mass of the top-K set: everything when there is no top-k.
  double z = 0;
  if (K == V) {
    for (int i = 0; i < V; ++i) z += weight(i);
  } else {
    std::nth_element(order.begin(), order.begin() + K, order.end(), before);
    for (int r = 0; r < K; ++r) z += weight(order[r]);
  }
  int keep = K;
  int sorted = std::min(K, 64);
  while (true) {
    std::partial_sort(order.begin(), order.begin() + sorted, order.begin() + (K == V ? V : K), before);
    if (o.top_p >= 1.0f) {
      if (sorted == K) break;
      sorted = K;  // top-k alone: the whole kept set, order does not matter for drawing
      continue;
    }
    double cum = 0;
    int r = 0;
    for (; r < sorted; ++r) {
      cum += weight(order[r]) / z;
      if (cum >= o.top_p) break;
    }
    if (r < sorted) {
      keep = r + 1;
      break;
    }
    if (sorted == K) break;  // rounding: the whole set never quite reached top_p
    sorted = std::min(2 * sorted, K);
  }
  k.ids.assign(order.begin(), order.begin() + keep);
  for (int id : k.ids) {
    k.weights.push_back(weight(id));
    k.total += k.weights.back();
  }
  return k;
}

}  // namespace

std::vector<double> FilteredDistribution(const float* logits, int V, const SamplingOptions& o) {
  std::vector<double> p(V, 0.0);
  if (o.temperature <= 0) {
    p[Argmax(logits, V)] = 1.0;
    return p;
  }
  const KeptSet k = Kept(logits, V, o);
  for (size_t r = 0; r < k.ids.size(); ++r) p[k.ids[r]] = k.weights[r] / k.total;
  return p;
}

SampledToken SampleToken(const float* logits, int V, const SamplingOptions& o, Rng& rng,
                         std::vector<float>* scratch) {
  (void)scratch;
  SampledToken out;
  const double t = o.temperature > 0 ? o.temperature : 1.0;
  const double lse = LogSumExp(logits, V, 1.0 / t);
  if (o.temperature <= 0) {
    out.token = Argmax(logits, V);
  } else if (o.top_k <= 0 && o.top_p >= 1.0f) {
    // Plain softmax: one pass over the vocabulary, no sort.
    const double target = rng.Uniform();
    double cum = 0;
    out.token = V - 1;
    for (int i = 0; i < V; ++i) {
      cum += std::exp(logits[i] / t - lse);
      if (target < cum) {
        out.token = i;
        break;
      }
    }
  } else {
    const KeptSet k = Kept(logits, V, o);
    const double target = rng.Uniform() * k.total;
    double cum = 0;
    out.token = k.ids.back();  // target rounding past the final cumulative sum
    for (size_t r = 0; r < k.ids.size(); ++r) {
      cum += k.weights[r];
      if (target < cum) {
        out.token = k.ids[r];
        break;
      }
    }
  }
  out.logprob = static_cast<float>(logits[out.token] / t - lse);
  return out;
}

}  // namespace aha::engine

// Backend::SampleRows' host implementation (backend.h), here beside the sampler it wraps.
namespace aha::engine {

void Backend::SampleRows(int32_t* tokens, float* logprobs, const float* logits, int B, int V,
                         const float* temperature, const int32_t* top_k, const float* top_p,
                         const uint64_t* seeds, const uint64_t* counters) {
  std::vector<float> scratch;
  for (int b = 0; b < B; ++b) {
    Rng rng(seeds[b] ^ (counters[b] * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL));
    const SamplingOptions o{temperature[b], top_p[b], top_k[b]};
    const SampledToken t = SampleToken(logits + static_cast<size_t>(b) * V, V, o, rng, &scratch);
    tokens[b] = t.token;
    logprobs[b] = t.logprob;
  }
}

}  // namespace aha::engine
