// GrpoTrainer: one GRPO optimizer step over a batch of complete groups (shared/GRPO.md, DESIGN.md §4).
//
// A step: advantages per group -> micro-batches of packed sequences (prompt + completion, at most
// micro_batch_tokens each, at least one sequence) -> for each micro-batch: forward at the sampling
// temperature (the engine's fused lm-head gives log p(token_t | tokens_<t) per token), the
// reference forward when beta > 0, the GRPO loss and d loss / d logprob of completion tokens
// (normalised by counts over the WHOLE batch, learner/grpo.h), backward (gradients accumulate) ->
// global grad-norm clipping -> AdamW with the scheduled learning rate. Deterministic on CPU: the
// same model, optimizer state and batch give the same bits, which makes resume exact.
//
// Checkpoint(dir) writes a Hugging Face model directory (config.json, model.safetensors in f32, the
// tokenizer files copied from the starting model) plus optimizer.bin (AdamW moments and step) and
// trainer.json (step, policy version, reference version). Restore(dir) reads them back.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/status.h"
#include "engine/backend.h"
#include "engine/optimizer.h"
#include "engine/transformer.h"
#include "learner/grpo.h"

namespace aha {

struct TrainSample {
  std::vector<int32_t> prompt;
  std::vector<int32_t> completion;
  std::vector<float> behaviour_logprobs;  // one per completion token
  float reward = 0;
  bool correct = false;
  bool truncated = false;  // finished by the length cap
  uint64_t min_version = 0;  // oldest policy version among its tokens
};

struct TrainGroup {
  std::string id;
  std::vector<TrainSample> samples;
};

struct StepStats {
  int64_t step = 0;        // after this step
  double lr = 0;
  double loss = 0, pg_loss = 0, kl = 0, entropy = 0;
  double clip_low = 0, clip_high = 0;  // fractions
  double grad_norm = 0;
  double reward_mean = 0, accuracy = 0, length_mean = 0;
  int64_t tokens = 0;       // prompt + completion tokens processed
  int64_t completion_tokens = 0;
  int64_t sequences = 0;
  double max_staleness = 0;  // learner version - oldest sample version
  double forward_s = 0, backward_s = 0, optimizer_s = 0;
};

struct TrainerOptions {
  GrpoConfig grpo;
  std::string model_dir;   // starting weights (and tokenizer files to copy into checkpoints)
};

class GrpoTrainer {
 public:
  static Result<std::unique_ptr<GrpoTrainer>> Create(const TrainerOptions& options, engine::Backend* backend);
  // One optimizer step. InvalidArgument for an empty batch or a malformed sample (logprob count,
  // out-of-vocabulary token); the model is untouched then.
  Result<StepStats> Step(const std::vector<TrainGroup>& groups, uint64_t learner_version);
  Status Checkpoint(const std::string& dir, uint64_t policy_version) const;
  // Restores model, optimizer and step; returns the policy version stored.
  Result<uint64_t> Restore(const std::string& dir);

  engine::Transformer& model() { return *model_; }
  int64_t step() const { return optimizer_->step(); }
  double LearningRate(int64_t step) const;  // for the 1-based step about to be taken

 private:
  GrpoTrainer() = default;
  Status Validate(const std::vector<TrainGroup>& groups) const;
  void ResetReference();

  TrainerOptions options_;
  GrpoLossOptions loss_options_;
  AdvantageScale scale_ = AdvantageScale::kGroup;
  engine::Backend* backend_ = nullptr;
  std::unique_ptr<engine::Transformer> model_, reference_;
  std::unique_ptr<engine::AdamW> optimizer_;
};

}  // namespace aha
