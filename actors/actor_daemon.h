// aha-actor: leases prompts from aha-replay, renders the job's prompt template, samples G
// completions per prompt with the engine and sends them as Trajectories to aha-rewardd over the
// reliable channel. A fetcher thread receives each new weights version from the learner into a
// staging copy while generation runs — on a GPU by the learner's NCCL broadcast when the learner
// offers one (engine/cuda/weight_broadcast.h), otherwise pulled over ZeroMQ — and the generator
// swaps it in between two decode steps (in-flight update); each token records the version that drew
// it. Runs on CPU or one GPU (--device).
#pragma once

#include <cstdint>

namespace aha {

int RunActorDaemon(int argc, char** argv);

// Sequences decoded together: --max-batch when given (> 0), else the job's
// topology.actors[i].max_batch (> 0), else 256 on a GPU and 32 on the CPU. A GPU decode step reads
// every weight once whatever the batch, so 32 rows leave an H200 mostly idle.
int64_t ActorBatchSize(int64_t flag, int64_t job_value, bool gpu);

// Prompts asked for per lease: as many groups as fit in the batch, but at most max_staleness
// optimizer steps' worth. A batch is generated with one policy version v; its groups for step
// v + k reach the learner k versions later, so past k = max_staleness replay would drop them (and
// it grants no more than that bound lets version v carry).
int64_t LeaseTasks(int64_t batch, int64_t group_size, int64_t prompts_per_step, int64_t max_staleness);

}  // namespace aha
