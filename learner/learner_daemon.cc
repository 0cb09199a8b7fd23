#include "learner/learner_daemon.h"

#include <spdlog/spdlog.h>

#include "common/daemon.h"
#include "common/flags.h"

namespace aha {

int RunLearnerDaemon(int argc, char** argv) {
  DaemonFlags daemon_flags;
  FlagSet flags("aha-learner", "The learner: pulls complete groups from aha-replay, runs GRPO and publishes new weights to\n"
      "the actors.");
  AddDaemonFlags(flags, &daemon_flags);
  flags.Epilog(
      "Status: this build serves only the control socket (status, pause, resume, stop) and\n"
      ""
      "Prometheus metrics; training is not implemented yet (issue 8, \"Actors and learner\").");
  ParseOrExit(flags, argc, argv);
  auto runtime = DaemonRuntime::Create("learner", daemon_flags);
  if (!runtime.ok()) return Fail("aha-learner", runtime.status().message());
  if (Status s = (*runtime)->Start(); !s.ok()) return Fail("aha-learner", s.message());
  (*runtime)->WaitForStop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace aha
