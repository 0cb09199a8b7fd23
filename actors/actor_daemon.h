// aha-actor: leases prompts from aha-replay, renders the job's prompt template, samples G
// completions per prompt with the engine and sends them as Trajectories to aha-rewardd over the
// reliable channel. New weights are pulled from the learner between generation rounds and swapped
// in place (CPU path; the NCCL in-flight swap between decode steps comes with issue 7).
#pragma once

namespace aha {

int RunActorDaemon(int argc, char** argv);

}  // namespace aha
