// aha-learner: the daemon's entry point. Its real work (shared/DESIGN.md §1, §4) arrives with
// issue 8 ("Actors and learner"); until then it serves only its control socket and metrics.
#pragma once

namespace aha {

// Runs aha-learner with its command line; returns the exit code.
int RunLearnerDaemon(int argc, char** argv);

}  // namespace aha
