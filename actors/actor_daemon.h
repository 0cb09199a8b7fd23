// aha-actor: leases prompts from aha-replay, renders the job's prompt template, samples G
// completions per prompt with the engine and sends them as Trajectories to aha-rewardd over the
// reliable channel. A fetcher thread receives each new weights version from the learner into a
// staging copy while generation runs — on a GPU by the learner's NCCL broadcast when the learner
// offers one (engine/cuda/weight_broadcast.h), otherwise pulled over ZeroMQ — and the generator
// swaps it in between two decode steps (in-flight update); each token records the version that drew
// it. Runs on CPU or one GPU (--device).
#pragma once

namespace aha {

int RunActorDaemon(int argc, char** argv);

}  // namespace aha
