#include "learner/grpo.h"

#include <algorithm>
#include <cmath>

namespace aha {

Result<AdvantageScale> ParseAdvantageScale(const std::string& s) {
  if (s == "group") return AdvantageScale::kGroup;
  if (s == "batch") return AdvantageScale::kBatch;
  if (s == "none") return AdvantageScale::kNone;
  return InvalidArgument("advantage scale '" + s + "' is not one of group|batch|none");
}

Result<LossAggregation> ParseLossAggregation(const std::string& s) {
  if (s == "token-mean") return LossAggregation::kTokenMean;
  if (s == "seq-mean-token-mean") return LossAggregation::kSeqMeanTokenMean;
  if (s == "seq-mean-token-sum-norm") return LossAggregation::kSeqMeanTokenSumNorm;
  return InvalidArgument("loss aggregation '" + s + "' is not one of token-mean|seq-mean-token-mean|seq-mean-token-sum-norm");
}

Result<RatioLevel> ParseRatioLevel(const std::string& s) {
  if (s == "token") return RatioLevel::kToken;
  if (s == "sequence") return RatioLevel::kSequence;
  return InvalidArgument("ratio '" + s + "' is not one of token|sequence");
}

namespace {

// Bessel-corrected standard deviation (0 for fewer than two values).
double SampleStd(const std::vector<double>& v, double mean) {
  if (v.size() < 2) return 0;
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return std::sqrt(ss / static_cast<double>(v.size() - 1));
}

double Mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

}  // namespace

std::vector<std::vector<float>> GroupAdvantages(const std::vector<std::vector<float>>& rewards,
                                                AdvantageScale scale, double std_eps) {
  std::vector<double> all;
  for (const auto& g : rewards) all.insert(all.end(), g.begin(), g.end());
  double batch_std = SampleStd(all, Mean(all));
  std::vector<std::vector<float>> out;
  for (const auto& g : rewards) {
    std::vector<double> r(g.begin(), g.end());
    double mean = Mean(r);
    double denom = 1;
    if (scale == AdvantageScale::kGroup) denom = SampleStd(r, mean) + std_eps;
    if (scale == AdvantageScale::kBatch) denom = batch_std + std_eps;
    std::vector<float> a(r.size());
    // A zero std (all rewards equal, std_eps = 0) leaves the centred value, which is 0.
    for (size_t i = 0; i < r.size(); ++i) a[i] = static_cast<float>(denom > 0 ? (r[i] - mean) / denom : 0.0);
    out.push_back(std::move(a));
  }
  return out;
}

Result<GrpoLossOutput> GrpoLoss(std::span<const SequenceInput> sequences, const GrpoLossOptions& o,
                                const Normaliser& n) {
  const bool with_kl = o.beta > 0;
  const bool gspo = o.ratio == RatioLevel::kSequence;
  for (size_t i = 0; i < sequences.size(); ++i) {
    const auto& s = sequences[i];
    if (s.old_logp.size() != s.new_logp.size())
      return InvalidArgument("sequence " + std::to_string(i) + ": " + std::to_string(s.new_logp.size()) +
                             " new log-probs but " + std::to_string(s.old_logp.size()) + " behaviour log-probs");
    if (with_kl && s.ref_logp.size() != s.new_logp.size())
      return InvalidArgument("sequence " + std::to_string(i) + ": beta > 0 needs one reference log-prob per token");
  }
  // The normaliser of each mode, as a divisor of a per-sequence or per-token sum.
  double seq_divisor = 0, token_divisor = 0;
  if (gspo || o.aggregation != LossAggregation::kTokenMean) {
    if (n.total_sequences <= 0) return InvalidArgument("normaliser: total_sequences must be > 0");
    seq_divisor = static_cast<double>(n.total_sequences);
  }
  if (!gspo && o.aggregation == LossAggregation::kTokenMean) {
    if (n.total_tokens <= 0) return InvalidArgument("normaliser: total_tokens must be > 0");
    token_divisor = static_cast<double>(n.total_tokens);
  }
  if (!gspo && o.aggregation == LossAggregation::kSeqMeanTokenSumNorm) {
    if (o.max_len <= 0) return InvalidArgument("seq-mean-token-sum-norm needs max_len > 0");
    token_divisor = seq_divisor * static_cast<double>(o.max_len);
  }

  const double lo = 1.0 - o.clip_low, hi = 1.0 + o.clip_high;
  GrpoLossOutput out;
  out.grad.resize(sequences.size());
  for (size_t i = 0; i < sequences.size(); ++i) {
    const auto& s = sequences[i];
    const size_t T = s.new_logp.size();
    auto& g = out.grad[i];
    g.assign(T, 0.0f);
    if (s.masked || T == 0) continue;
    const double A = s.advantage;
    out.tokens += static_cast<int64_t>(T);

    // Per-token weight of this sequence's terms in the batch loss.
    double w;
    if (gspo || o.aggregation == LossAggregation::kSeqMeanTokenMean) w = 1.0 / (static_cast<double>(T) * seq_divisor);
    else w = 1.0 / token_divisor;

    // KL part (identical in every mode, up to the weight).
    if (with_kl) {
      for (size_t t = 0; t < T; ++t) {
        const double d = double(s.ref_logp[t]) - double(s.new_logp[t]), e = std::exp(d);
        const double kl = e - d - 1.0;
        out.kl += w * kl;
        out.loss += w * o.beta * kl;
        g[t] += static_cast<float>(w * o.beta * (1.0 - e));
      }
    }

    if (gspo) {
      double mean_log_rho = 0;
      for (size_t t = 0; t < T; ++t) mean_log_rho += double(s.new_logp[t]) - double(s.old_logp[t]);
      mean_log_rho /= static_cast<double>(T);
      bool clamped = mean_log_rho < -20 || mean_log_rho > 20;
      double sr = std::exp(std::clamp(mean_log_rho, -20.0, 20.0));
      double unclipped = sr * A, clipped = std::clamp(sr, lo, hi) * A;
      out.clip_units++;
      double pg;
      double dpg_ds = 0;
      if (clipped < unclipped) {
        pg = -clipped;
        if (sr > hi) out.clipped_high++;
        else out.clipped_low++;
      } else {
        pg = -unclipped;
        dpg_ds = -A;
      }
      double ws = 1.0 / seq_divisor;
      out.pg_loss += ws * pg;
      out.loss += ws * pg;
      if (!clamped && dpg_ds != 0)
        for (size_t t = 0; t < T; ++t) g[t] += static_cast<float>(ws * dpg_ds * sr / static_cast<double>(T));
      continue;
    }

    for (size_t t = 0; t < T; ++t) {
      double log_rho = double(s.new_logp[t]) - double(s.old_logp[t]);
      bool clamped = log_rho < -20 || log_rho > 20;
      double rho = std::exp(std::clamp(log_rho, -20.0, 20.0));
      double unclipped = rho * A, clipped = std::clamp(rho, lo, hi) * A;
      out.clip_units++;
      double pg;
      if (clipped < unclipped) {  // the clipped branch is the min: its gradient is zero
        pg = -clipped;
        if (rho > hi) out.clipped_high++;
        else out.clipped_low++;
      } else {
        pg = -unclipped;
        if (!clamped) g[t] += static_cast<float>(w * -A * rho);
      }
      out.pg_loss += w * pg;
      out.loss += w * pg;
    }
  }
  return out;
}

}  // namespace aha
