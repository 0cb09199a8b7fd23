// aha-learner: pulls complete groups from aha-replay, runs GRPO steps (learner/trainer.h) and
// publishes every new policy version to the actors (learner/weight_publication.h: ZeroMQ pull, and
// with grpo.weight_sync = nccl a bf16 NCCL broadcast to the actors on GPUs).
// Trains on CPU or one GPU (--device).
#pragma once

namespace aha {

// Runs aha-learner with its command line; returns the exit code.
int RunLearnerDaemon(int argc, char** argv);

}  // namespace aha
