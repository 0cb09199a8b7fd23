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
// Data parallel: with several backends (the learner devices, learner/data_parallel.h) the trainer
// holds one replica per backend (policy, reference, AdamW moments), all from the same weights, each
// driven by its own thread. Each step splits the batch's groups across replicas balancing tokens;
// advantages and the loss normalisers come from the WHOLE batch, so each replica's gradient is its
// share of the single-device gradient. The replicas' gradients are then summed in buckets, started
// while the last micro-batch's backward is still running (learner/grad_reducer.h: host sum on cpu,
// NCCL all-reduce on cuda), and every replica runs the same clipping and AdamW on the same sum, so
// the weights stay identical. Replica 0 is the one model() returns, which publishes and checkpoints.
//
// Checkpoint(dir) writes a Hugging Face model directory (config.json, model.safetensors in f32, the
// tokenizer files copied from the starting model) plus optimizer.bin (AdamW moments and step) and
// trainer.json (step, policy version, reference version). Restore(dir) reads them back into every
// replica. optimizer.bin stores flat buffers in the model's ParamTable order; a file from before
// q/k/v weights were made adjacent (version 01) is refused for models with attention biases.
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
#include "learner/data_parallel.h"
#include "learner/grad_reducer.h"
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
  // Phase times; with several replicas, the slowest replica's. reduce_s is the wait for the gradient
  // sum after the replica's own backward (the part of the reduction that did not overlap it).
  // loss_s is the host's loss and its gradient between forward and backward (the device idles).
  double forward_s = 0, backward_s = 0, reduce_s = 0, optimizer_s = 0, loss_s = 0;
};

struct TrainerOptions {
  GrpoConfig grpo;
  std::string model_dir;   // starting weights (and tokenizer files to copy into checkpoints)
  // Gradient buckets of the data-parallel reduction: large enough that a collective runs near the
  // link's bandwidth, small enough that many finish while the backward still runs.
  size_t reduce_bucket_bytes = size_t{32} << 20;
};

class GrpoTrainer {
 public:
  // One replica per backend (all cpu or all cuda, see CheckLearnerDevices); the backends outlive the
  // trainer. With one backend there is no reduction.
  static Result<std::unique_ptr<GrpoTrainer>> Create(const TrainerOptions& options,
                                                     const std::vector<engine::Backend*>& backends);
  static Result<std::unique_ptr<GrpoTrainer>> Create(const TrainerOptions& options, engine::Backend* backend) {
    return Create(options, std::vector<engine::Backend*>{backend});
  }
  ~GrpoTrainer();
  // One optimizer step. InvalidArgument for an empty batch or a malformed sample (logprob count,
  // out-of-vocabulary token); the model is untouched then. Any other error also leaves the weights
  // and optimizer state as they were (the gradients are dropped).
  Result<StepStats> Step(const std::vector<TrainGroup>& groups, uint64_t learner_version);
  Status Checkpoint(const std::string& dir, uint64_t policy_version) const;
  // Restores model, optimizer and step into every replica; returns the policy version stored.
  Result<uint64_t> Restore(const std::string& dir);

  // Replica 0's policy: the weights to publish. On a GPU, use it from a thread whose current device
  // is its device (Create leaves the calling thread there).
  engine::Transformer& model() { return model(0); }
  engine::Transformer& model(int replica);
  int replicas() const { return static_cast<int>(replicas_.size()); }
  int64_t step() const;
  double LearningRate(int64_t step) const;  // for the 1-based step about to be taken

 private:
  struct Replica;
  struct Shard;
  GrpoTrainer() = default;
  Status Validate(const std::vector<TrainGroup>& groups) const;
  // Forward, loss and backward of one replica's share, then its part of the gradient sum.
  Status ForwardBackward(int rank, Shard& shard);
  void OptimizerStep(int rank, double lr, double* grad_norm, double* seconds);
  Status SaveReplica0(const std::string& dir, uint64_t policy_version) const;
  Status RestoreReplica(int rank, const std::string& dir);

  TrainerOptions options_;
  GrpoLossOptions loss_options_;
  AdvantageScale scale_ = AdvantageScale::kGroup;
  std::unique_ptr<ReplicaThreads> threads_;
  std::vector<std::unique_ptr<Replica>> replicas_;
  std::unique_ptr<GradReducer> reducer_;  // null with one replica
};

}  // namespace aha
