// `aha bench sync` (issue 8): publishing a model's weights from the learner's GPU to an actor's GPU
// through NCCL, beside a raw ncclBroadcast of the same bytes in the same run.
#pragma once

namespace aha::engine::cuda {

int RunSyncBench(int argc, char** argv);

}  // namespace aha::engine::cuda
