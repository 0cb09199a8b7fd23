#include "actors/actor_daemon.h"

#include <spdlog/spdlog.h>

#include "common/daemon.h"
#include "common/flags.h"

namespace aha {

int RunActorDaemon(int argc, char** argv) {
  DaemonFlags daemon_flags;
  FlagSet flags("aha-actor", "The rollout actor: leases prompts from aha-replay, samples G completions per prompt and sends\n"
      "them to aha-rewardd.");
  AddDaemonFlags(flags, &daemon_flags);
  flags.Epilog(
      "Status: this build serves only the control socket (status, pause, resume, stop) and\n"
      ""
      "Prometheus metrics; generation is not implemented yet (issue 8, \"Actors and learner\").");
  ParseOrExit(flags, argc, argv);
  auto runtime = DaemonRuntime::Create("actor", daemon_flags);
  if (!runtime.ok()) return Fail("aha-actor", runtime.status().message());
  if (Status s = (*runtime)->Start(); !s.ok()) return Fail("aha-actor", s.message());
  (*runtime)->WaitForStop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace aha
