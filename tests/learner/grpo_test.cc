// GRPO loss and gradient against an independent reference written from shared/GRPO.md alone:
// the reference computes the whole batch loss naively in double; gradients are checked against
// central finite differences of that reference (so neither side shares code with learner/grpo.cc).
#include "learner/grpo.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace aha {
namespace {

// ---- the reference (GRPO.md, transcribed)

struct RefSeq {
  std::vector<double> lp_new, lp_old, lp_ref;
  double adv;
  bool masked;
};

double ReferenceLoss(const std::vector<RefSeq>& batch, const std::string& agg, bool gspo, double eps_lo,
                     double eps_hi, double beta, int max_len) {
  double num_seq = static_cast<double>(batch.size());
  double num_tok = 0;
  for (const auto& s : batch)
    if (!s.masked) num_tok += static_cast<double>(s.lp_new.size());
  auto clip = [&](double r) { return std::min(std::max(r, 1 - eps_lo), 1 + eps_hi); };
  double total = 0;
  for (const auto& s : batch) {
    if (s.masked) continue;
    size_t T = s.lp_new.size();
    std::vector<double> per_token(T);
    for (size_t t = 0; t < T; ++t) {
      double kl = 0;
      if (beta > 0) {
        double d = s.lp_ref[t] - s.lp_new[t];
        kl = std::exp(d) - d - 1;
      }
      double pg = 0;
      if (!gspo) {
        double lr = std::min(std::max(s.lp_new[t] - s.lp_old[t], -20.0), 20.0);
        double rho = std::exp(lr);
        pg = -std::min(rho * s.adv, clip(rho) * s.adv);
      }
      per_token[t] = pg + beta * kl;
    }
    double sum = 0;
    for (double x : per_token) sum += x;
    if (gspo) {
      double ml = 0;
      for (size_t t = 0; t < T; ++t) ml += s.lp_new[t] - s.lp_old[t];
      double sr = std::exp(std::min(std::max(ml / T, -20.0), 20.0));
      total += (-std::min(sr * s.adv, clip(sr) * s.adv) + sum / T) / num_seq;
    } else if (agg == "token-mean") {
      total += sum / num_tok;
    } else if (agg == "seq-mean-token-mean") {
      total += sum / T / num_seq;
    } else {
      total += sum / (num_seq * max_len);
    }
  }
  return total;
}

// ---- fixtures

std::vector<RefSeq> RandomBatch(uint64_t seed, bool gspo) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-0.5, 0.5);
  std::vector<RefSeq> b;
  for (int i = 0; i < 8; ++i) {
    RefSeq s;
    s.adv = (i % 2 ? 1.0 : -1.0) * (0.3 + 0.1 * i);
    s.masked = (i == 5);
    int T = 3 + static_cast<int>(rng() % 6);
    // Push some sequence ratios past GSPO's tiny clips: up where A > 0, down where A < 0.
    double shift = !gspo ? 0 : i % 4 == 1 ? 8e-4 : i % 4 == 2 ? -8e-4 : 0;
    for (int t = 0; t < T; ++t) {
      double lp_old = -1.5 + u(rng);
      double d;
      for (;;) {  // keep away from the clip kinks, where finite differences are meaningless
        d = gspo ? shift + u(rng) * 1e-4 : u(rng) * 0.8;
        double r = std::exp(d);
        if (gspo || (std::abs(r - 0.8) > 2e-3 && std::abs(r - 1.28) > 2e-3)) break;
      }
      s.lp_old.push_back(lp_old);
      s.lp_new.push_back(lp_old + d);
      s.lp_ref.push_back(lp_old + u(rng) * 0.3);
    }
    b.push_back(s);
  }
  return b;
}

struct Prod {
  std::vector<std::vector<float>> n, o, r;
  std::vector<SequenceInput> in;
};

Prod ToInputs(const std::vector<RefSeq>& b, bool with_ref) {
  Prod p;
  for (const auto& s : b) {
    p.n.emplace_back(s.lp_new.begin(), s.lp_new.end());
    p.o.emplace_back(s.lp_old.begin(), s.lp_old.end());
    p.r.emplace_back(s.lp_ref.begin(), s.lp_ref.end());
  }
  for (size_t i = 0; i < b.size(); ++i) {
    SequenceInput x;
    x.new_logp = p.n[i];
    x.old_logp = p.o[i];
    if (with_ref) x.ref_logp = p.r[i];
    x.advantage = static_cast<float>(b[i].adv);
    x.masked = b[i].masked;
    p.in.push_back(x);
  }
  return p;
}

Normaliser BatchNormaliser(const std::vector<RefSeq>& b) {
  Normaliser n;
  n.total_sequences = static_cast<int64_t>(b.size());
  for (const auto& s : b)
    if (!s.masked) n.total_tokens += static_cast<int64_t>(s.lp_new.size());
  return n;
}

// The float inputs the production code sees, widened back: the reference must see the same values.
std::vector<RefSeq> Quantised(std::vector<RefSeq> b) {
  for (auto& s : b) {
    for (auto* v : {&s.lp_new, &s.lp_old, &s.lp_ref})
      for (auto& x : *v) x = static_cast<float>(x);
    s.adv = static_cast<float>(s.adv);
  }
  return b;
}

struct Case {
  std::string agg;
  double beta;
  bool gspo;
};

class GrpoLossVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(GrpoLossVsReference, LossAndGradientMatch) {
  const Case c = GetParam();
  auto batch = Quantised(RandomBatch(17, c.gspo));
  double eps_lo = c.gspo ? 3e-4 : 0.2, eps_hi = c.gspo ? 4e-4 : 0.28;
  GrpoLossOptions o;
  o.clip_low = eps_lo;
  o.clip_high = eps_hi;
  o.beta = c.beta;
  o.aggregation = *ParseLossAggregation(c.agg);
  o.ratio = c.gspo ? RatioLevel::kSequence : RatioLevel::kToken;
  o.max_len = 16;
  Prod p = ToInputs(batch, c.beta > 0);
  auto out = GrpoLoss(p.in, o, BatchNormaliser(batch));
  ASSERT_TRUE(out.ok()) << out.status().ToString();

  double ref = ReferenceLoss(batch, c.agg, c.gspo, eps_lo, eps_hi, c.beta, 16);
  EXPECT_NEAR(out->loss, ref, 1e-9 * std::max(1.0, std::abs(ref)));
  EXPECT_GT(out->clipped_low, 0) << "the low clip side must be exercised";
  EXPECT_GT(out->clipped_high, 0) << "the high clip side must be exercised";

  // Gradient vs central differences of the reference, in double. Step 1e-6: truncation error
  // ~h^2 * |f'''| ~ 1e-12 and rounding ~1e-16/h ~ 1e-10, so 1e-7 absolute is a safe bound on
  // values of order 1e-2; the production side accumulates in double and stores float (rel 1e-7).
  const double h = 1e-6;
  for (size_t i = 0; i < batch.size(); ++i) {
    for (size_t t = 0; t < batch[i].lp_new.size(); ++t) {
      auto plus = batch, minus = batch;
      plus[i].lp_new[t] += h;
      minus[i].lp_new[t] -= h;
      double fd = (ReferenceLoss(plus, c.agg, c.gspo, eps_lo, eps_hi, c.beta, 16) -
                   ReferenceLoss(minus, c.agg, c.gspo, eps_lo, eps_hi, c.beta, 16)) / (2 * h);
      EXPECT_NEAR(out->grad[i][t], fd, 1e-7 + 1e-6 * std::abs(fd)) << "sequence " << i << " token " << t;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllModes, GrpoLossVsReference,
    ::testing::Values(Case{"token-mean", 0.0, false}, Case{"token-mean", 0.04, false},
                      Case{"seq-mean-token-mean", 0.0, false}, Case{"seq-mean-token-mean", 0.04, false},
                      Case{"seq-mean-token-sum-norm", 0.0, false}, Case{"seq-mean-token-sum-norm", 0.04, false},
                      Case{"seq-mean-token-mean", 0.0, true}, Case{"seq-mean-token-mean", 0.04, true}));

TEST(GrpoLoss, FourMicroBatchesEqualOneBatch) {
  for (std::string agg : {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}) {
    auto batch = Quantised(RandomBatch(5, false));
    GrpoLossOptions o;
    o.beta = 0.01;
    o.aggregation = *ParseLossAggregation(agg);
    o.max_len = 16;
    Prod p = ToInputs(batch, true);
    Normaliser n = BatchNormaliser(batch);
    auto whole = GrpoLoss(p.in, o, n);
    ASSERT_TRUE(whole.ok());
    double sum = 0;
    for (size_t start = 0; start < p.in.size(); start += 2) {
      std::span<const SequenceInput> micro(p.in.data() + start, 2);
      auto part = GrpoLoss(micro, o, n);  // the normaliser of the whole batch
      ASSERT_TRUE(part.ok());
      sum += part->loss;
      for (size_t k = 0; k < 2; ++k) EXPECT_EQ(part->grad[k], whole->grad[start + k]) << agg;
    }
    EXPECT_NEAR(sum, whole->loss, 1e-12) << agg;
  }
}

TEST(GrpoLoss, MaskedSequenceHasNoLossOrGradient) {
  auto batch = Quantised(RandomBatch(3, false));
  for (auto& s : batch) s.masked = true;
  batch[0].masked = false;
  Prod p = ToInputs(batch, false);
  auto out = GrpoLoss(p.in, GrpoLossOptions{}, BatchNormaliser(batch));
  ASSERT_TRUE(out.ok());
  for (size_t i = 1; i < batch.size(); ++i)
    for (float g : out->grad[i]) EXPECT_EQ(g, 0.0f);
  EXPECT_EQ(out->tokens, static_cast<int64_t>(batch[0].lp_new.size()));
}

TEST(GrpoLoss, OnPolicyGradientIsMinusAdvantageOverTokens) {
  // rho = 1 everywhere: d loss / d new = -A / total_tokens (token-mean).
  std::vector<float> lp = {-1.f, -2.f, -0.5f};
  SequenceInput s{lp, lp, {}, 0.5f, false};
  auto out = GrpoLoss(std::span<const SequenceInput>(&s, 1), GrpoLossOptions{}, Normaliser{3, 1});
  ASSERT_TRUE(out.ok());
  for (float g : out->grad[0]) EXPECT_FLOAT_EQ(g, -0.5f / 3);
  EXPECT_NEAR(out->loss, -0.5, 1e-7);
  EXPECT_EQ(out->clipped_low + out->clipped_high, 0);
}

TEST(GrpoLoss, RejectsInconsistentInput) {
  std::vector<float> a = {-1.f, -2.f}, b = {-1.f};
  SequenceInput s{a, b, {}, 1.f, false};
  EXPECT_TRUE(IsInvalidArgument(GrpoLoss(std::span<const SequenceInput>(&s, 1), {}, {2, 1}).status()));
  SequenceInput k{a, a, {}, 1.f, false};
  GrpoLossOptions o;
  o.beta = 0.1;
  EXPECT_TRUE(IsInvalidArgument(GrpoLoss(std::span<const SequenceInput>(&k, 1), o, {2, 1}).status()));
  EXPECT_TRUE(IsInvalidArgument(GrpoLoss(std::span<const SequenceInput>(&k, 1), {}, {0, 1}).status()));
  GrpoLossOptions norm;
  norm.aggregation = LossAggregation::kSeqMeanTokenSumNorm;
  EXPECT_TRUE(IsInvalidArgument(GrpoLoss(std::span<const SequenceInput>(&k, 1), norm, {2, 1}).status()));
}

TEST(Advantages, GroupScaleUsesBesselCorrectedStd) {
  auto a = GroupAdvantages({{1, 0, 0, 1}, {2, 2, 2, 2}}, AdvantageScale::kGroup, 0.0);
  double expected = 0.5 / std::sqrt(1.0 / 3.0);  // std with n-1 of {1,0,0,1} is sqrt(1/3)
  EXPECT_NEAR(a[0][0], expected, 1e-6);
  EXPECT_NEAR(a[0][1], -expected, 1e-6);
  for (float x : a[1]) EXPECT_EQ(x, 0.0f);  // an all-equal group teaches nothing
}

TEST(Advantages, BatchAndNoneScales) {
  auto none = GroupAdvantages({{1, 0}, {3, 1}}, AdvantageScale::kNone, 1e-6);
  EXPECT_FLOAT_EQ(none[0][0], 0.5f);
  EXPECT_FLOAT_EQ(none[1][1], -1.0f);
  auto batch = GroupAdvantages({{1, 0}, {3, 1}}, AdvantageScale::kBatch, 0.0);
  double mean = 1.25, std = std::sqrt(((1 - mean) * (1 - mean) + mean * mean + (3 - mean) * (3 - mean) +
                                       (1 - mean) * (1 - mean)) / 3.0);
  EXPECT_NEAR(batch[1][0], 1.0 / std, 1e-6);  // centred per group, scaled by the batch std
}

}  // namespace
}  // namespace aha
