// aha-rewardd: scores trajectories with the job's rule rewards (rewardd/rewards.h), runs code in
// the sandbox (rewardd/sandbox.h), forwards ScoredTrajectory to aha-replay (rewardd/service.h).
//
//   aha-rewardd --replay tcp://HOST:PORT [--listen tcp://127.0.0.1:0] [--config JOB.yaml]
//               [--rewards accuracy=1,format=0.1] [--workers N] [daemon flags]
// Settings come from the job file (--config: `rewards`, `topology.reward_workers`); a flag given
// explicitly wins over it.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>

#include "common/config.h"
#include "common/daemon.h"
#include "common/flags.h"
#include "rewardd/rewards.h"
#include "rewardd/sandbox.h"
#include "rewardd/service.h"

namespace aha::rewardd {
namespace {

int Run(int argc, char** argv) {
  FlagSet flags("aha-rewardd",
                "Scores trajectories from actors with rule-based rewards (and sandboxed code tests)\n"
                "and forwards them to aha-replay; acknowledges actors only after replay did.");
  DaemonFlags daemon_flags;
  AddDaemonFlags(flags, &daemon_flags);
  std::string listen = "tcp://127.0.0.1:0", replay, rewards, endpoints_file;
  int64_t workers = 2, max_in_flight = 4096, sandbox_parallel = 0;
  bool require_sandbox = false;
  flags.String("listen", &listen, "bind address for Trajectory from actors (reliable channel)");
  flags.String("replay", &replay, "aha-replay's ingest endpoint (required)");
  flags.String("rewards", &rewards, "functions and weights, e.g. accuracy=1,format=0.1 (default; or from --config)");
  flags.Int("workers", &workers, "scoring threads (default 2, or topology.reward_workers)");
  flags.Int("max-in-flight", &max_in_flight, "trajectories held before actors are slowed down");
  flags.Int("sandbox-parallel", &sandbox_parallel, "concurrent sandboxed programs (default = workers)");
  flags.Bool("require-sandbox", &require_sandbox, "fail at startup when the code sandbox cannot run here");
  flags.String("endpoints-file", &endpoints_file, "write {\"listen\"} bound endpoint as JSON here");
  ParseOrExit(flags, argc, argv);
  const std::string prog = flags.program();

  RewardConfig config = RewardConfig::Default();
  if (!daemon_flags.config.empty()) {
    auto job = LoadJobConfig(daemon_flags.config);
    if (!job.ok()) return Fail(prog, job.status().message(), 2);
    if (!flags.was_set("workers")) workers = job->topology.reward_workers;
    if (!job->rewards.empty()) {
      config.terms.clear();
      for (const auto& r : job->rewards) config.terms.push_back({r.name, r.weight, r.params});
    }
  }
  if (!rewards.empty()) {
    auto c = RewardConfig::Parse(rewards);
    if (!c.ok()) return Fail(prog, c.status().message(), 2);
    config = *c;
  }
  if (replay.empty()) return Fail(prog, "--replay is required", 2);
  if (workers < 1 || workers > 4096) return Fail(prog, "--workers must be in [1, 4096]", 2);
  if (max_in_flight < 1) return Fail(prog, "--max-in-flight must be positive", 2);

  auto runtime_or = DaemonRuntime::Create("rewardd", daemon_flags);
  if (!runtime_or.ok()) return Fail(prog, runtime_or.status().message());
  auto runtime = std::move(runtime_or).value();

  SandboxOptions sandbox_options;
  sandbox_options.max_parallel = static_cast<int>(sandbox_parallel > 0 ? sandbox_parallel : workers);
  std::unique_ptr<Sandbox> sandbox;
  auto sandbox_or = Sandbox::Create(sandbox_options);
  if (sandbox_or.ok()) {
    sandbox = std::move(*sandbox_or);
  } else if (require_sandbox) {
    return Fail(prog, sandbox_or.status().message());
  } else {
    spdlog::error("aha-rewardd: code tasks will score 0: {}", sandbox_or.status().message());
  }
  auto scorer_or = Scorer::Create(config, sandbox.get());
  if (!scorer_or.ok()) return Fail(prog, scorer_or.status().message(), 2);
  auto scorer = std::move(scorer_or).value();

  RewardServiceOptions so;
  so.listen_endpoint = listen;
  so.replay_endpoint = replay;
  so.name = runtime->binary_name() + ":" + std::to_string(daemon_flags.role_index);
  so.workers = static_cast<int>(workers);
  so.max_in_flight = static_cast<size_t>(max_in_flight);
  so.stats = &runtime->wire_stats();
  so.registry = &runtime->metrics().registry();
  auto service_or = RewardService::Create(runtime->zmq(), scorer.get(), so);
  if (!service_or.ok()) return Fail(prog, service_or.status().message());
  auto service = std::move(service_or).value();
  RewardService* s = service.get();

  ControlHooks hooks;
  hooks.fill_status = [s](proto::ProcessStatus::Builder st) {
    auto d = st.getDetail().initRewardd();
    d.setScoredPerSecond(s->scored_per_second());
    d.setInFlight(static_cast<uint32_t>(s->in_flight()));
    d.setWorkers(static_cast<uint32_t>(s->workers()));
    d.setOutboxDepth(static_cast<uint32_t>(s->outbox_depth()));
  };
  hooks.pause = [s] {
    s->SetPaused(true);
    return OkStatus();
  };
  hooks.resume = [s] {
    s->SetPaused(false);
    return OkStatus();
  };
  runtime->SetHooks(std::move(hooks));

  if (!endpoints_file.empty()) {
    std::string tmp = endpoints_file + ".tmp";
    std::ofstream(tmp) << nlohmann::json{{"listen", service->listen_endpoint()}}.dump() << "\n";
    std::filesystem::rename(tmp, endpoints_file);
  }
  if (Status st = runtime->Start(); !st.ok()) return Fail(prog, st.message());
  std::string names;
  for (const auto& t : config.terms) names += (names.empty() ? "" : ",") + t.name + "=" + std::to_string(t.weight);
  spdlog::info("aha-rewardd: listening {} -> replay {}, {} workers, rewards {}, sandbox {}",
               service->listen_endpoint(), replay, workers, names, sandbox ? "bwrap" : "unavailable");
  runtime->WaitForStop();
  service->Close(std::chrono::milliseconds(10000));
  auto c = service->counters();
  spdlog::info("aha-rewardd: stopped: {} received, {} scored, {} acknowledged, {} rejected", c.received,
               c.scored, c.acked_upstream, c.rejected);
  return 0;
}

}  // namespace
}  // namespace aha::rewardd

int main(int argc, char** argv) { return aha::rewardd::Run(argc, argv); }
