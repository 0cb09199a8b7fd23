// aha-learner: pulls complete groups from aha-replay, runs GRPO steps (learner/trainer.h) and
// publishes every new policy version to the actors (CPU path: common/weight_sync.h over ZeroMQ).
// The NCCL path (GPU actors) comes with the CUDA engine (issue 7).
#pragma once

namespace aha {

// Runs aha-learner with its command line; returns the exit code.
int RunLearnerDaemon(int argc, char** argv);

}  // namespace aha
