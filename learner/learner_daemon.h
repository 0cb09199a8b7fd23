// aha-learner: pulls complete groups from aha-replay, runs GRPO steps (learner/trainer.h) and
// publishes every new policy version to the actors (CPU path: common/weight_sync.h over ZeroMQ).
// Trains on CPU or one GPU (--device); publication is over ZeroMQ on both (the NCCL broadcast is
// not wired in yet, issue 8).
#pragma once

namespace aha {

// Runs aha-learner with its command line; returns the exit code.
int RunLearnerDaemon(int argc, char** argv);

}  // namespace aha
