// GRPO: advantages and the per-token policy loss with its gradient (shared/GRPO.md).
//
// Inputs are per-token log-probs of the completion tokens only (prompt tokens carry no loss):
//   new_logp[t]  log pi_theta(o_t | q, o_<t) at the sampling temperature (the learner's forward)
//   old_logp[t]  the behaviour log-prob the actor recorded when it sampled o_t
//   ref_logp[t]  log pi_ref(o_t | ...), only when beta > 0
// The output is the loss of one micro-batch *already divided by the normaliser of the whole
// optimizer batch* (Normaliser), and d loss / d new_logp[t] for every token, which the engine's
// backward pass pushes through the lm-head. Summing the losses and gradients of the micro-batches
// (and data-parallel ranks) of one optimizer batch gives exactly the loss and gradient of the batch
// computed at once; tests/learner/grpo_test.cc checks this.
//
// Formulas (GRPO.md):
//   A_i = (r_i - mean_g r) / (std_g r + std_eps)  std is Bessel-corrected (n-1), as torch.std in
//         TRL and veRL; `batch` scale divides by the std over the whole batch; `none` only centres.
//   log_rho = clamp(new - old, -20, 20), rho = exp(log_rho)
//   pg_t    = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
//   kl_t    = exp(d) - d - 1, d = ref - new      (k3, added to the loss with weight beta)
//   token-mean              L = sum_i sum_t m (pg + beta kl) / total_tokens
//   seq-mean-token-mean     L = sum_i [sum_t m (pg + beta kl) / sum_t m] / total_sequences
//   seq-mean-token-sum-norm L = sum_i sum_t m (pg + beta kl) / (total_sequences * max_len)
//   GSPO (ratio = sequence): s_i = exp(clamp(mean_t log_rho, -20, 20)),
//         L = sum_i [-min(s_i A_i, clip(s_i) A_i) + beta mean_t kl] / total_sequences
// Clip fraction counts tokens (sequences for GSPO) where the clipped branch is strictly smaller:
// `high` where rho > 1 + eps_high with A > 0, `low` where rho < 1 - eps_low with A < 0.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace aha {

enum class AdvantageScale { kGroup, kBatch, kNone };
enum class LossAggregation { kTokenMean, kSeqMeanTokenMean, kSeqMeanTokenSumNorm };
enum class RatioLevel { kToken, kSequence };

Result<AdvantageScale> ParseAdvantageScale(const std::string& s);
Result<LossAggregation> ParseLossAggregation(const std::string& s);
Result<RatioLevel> ParseRatioLevel(const std::string& s);

// Advantages of a batch of groups: `rewards[g]` holds the G rewards of group g.
std::vector<std::vector<float>> GroupAdvantages(const std::vector<std::vector<float>>& rewards,
                                                AdvantageScale scale, double std_eps);

struct GrpoLossOptions {
  double clip_low = 0.2;
  double clip_high = 0.28;
  double beta = 0.0;
  LossAggregation aggregation = LossAggregation::kTokenMean;
  RatioLevel ratio = RatioLevel::kToken;
  int64_t max_len = 0;  // L_max of seq-mean-token-sum-norm (the generation cap)
};

// Counts over the whole optimizer batch (all micro-batches, all data-parallel ranks).
struct Normaliser {
  int64_t total_tokens = 0;     // completion tokens with mask 1
  int64_t total_sequences = 0;  // sequences (including fully masked ones)
};

struct SequenceInput {
  std::span<const float> new_logp;
  std::span<const float> old_logp;
  std::span<const float> ref_logp;  // empty when beta == 0
  float advantage = 0;
  bool masked = false;  // overlong filtering: the whole sequence carries no loss
};

struct GrpoLossOutput {
  double loss = 0;      // this micro-batch's share of the batch loss
  double pg_loss = 0;   // its policy-gradient part
  double kl = 0;        // its KL part (before beta), normalised like the loss
  int64_t tokens = 0;   // masked-in tokens seen
  int64_t clipped_low = 0, clipped_high = 0;  // tokens (or sequences for GSPO)
  int64_t clip_units = 0;                      // tokens (or sequences) the fractions divide by
  std::vector<std::vector<float>> grad;        // d loss / d new_logp, per sequence and token
};

// The loss of one micro-batch and its gradient. InvalidArgument when the spans disagree in length,
// when beta > 0 without reference log-probs, or when a normaliser the mode needs is zero.
Result<GrpoLossOutput> GrpoLoss(std::span<const SequenceInput> sequences, const GrpoLossOptions& options,
                                const Normaliser& normaliser);

}  // namespace aha
