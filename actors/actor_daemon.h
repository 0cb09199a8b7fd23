// aha-actor: leases prompts from aha-replay, renders the job's prompt template, samples G
// completions per prompt with the engine and sends them as Trajectories to aha-rewardd over the
// reliable channel. A fetcher thread pulls each new weights version from the learner (ZeroMQ) into
// a staging copy while generation runs, and the generator swaps it in between two decode steps
// (in-flight update); each token records the version that drew it. Runs on CPU or one GPU
// (--device). The NCCL broadcast path (engine/cuda/nccl_group.h) is not wired in yet (issue 8).
#pragma once

namespace aha {

int RunActorDaemon(int argc, char** argv);

}  // namespace aha
