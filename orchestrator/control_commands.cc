#include "orchestrator/control_commands.h"

#include <signal.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/daemon.h"
#include "common/flags.h"

namespace aha {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

struct Target {
  std::string role, control;
};

Result<std::vector<Target>> Targets(const std::string& run_dir) {
  fs::path procs = fs::path(run_dir) / "procs";
  if (!fs::is_directory(procs)) return NotFound(run_dir + " is not a run directory (no procs/)");
  std::vector<Target> out;
  for (const auto& e : fs::directory_iterator(procs)) {
    if (e.path().extension() != ".ready") continue;
    std::ifstream f(e.path());
    auto j = nlohmann::json::parse(f, nullptr, false);
    if (j.is_discarded() || !j.contains("control")) continue;
    out.push_back({e.path().stem().string(), j["control"].get<std::string>()});
  }
  std::sort(out.begin(), out.end(), [](const Target& a, const Target& b) { return a.role < b.role; });
  if (out.empty()) return NotFound("no process of " + run_dir + " is running");
  return out;
}

const char* StateName(proto::ProcessState s) {
  switch (s) {
    case proto::ProcessState::STARTING: return "starting";
    case proto::ProcessState::RUNNING: return "running";
    case proto::ProcessState::PAUSED: return "paused";
    case proto::ProcessState::STOPPING: return "stopping";
  }
  return "?";
}

std::string Detail(proto::ProcessStatus::Reader st) {
  char buf[256] = "";
  auto d = st.getDetail();
  switch (d.which()) {
    case proto::ProcessStatus::Detail::REPLAY: {
      auto r = d.getReplay();
      std::snprintf(buf, sizeof(buf), "queued %lu, leases %lu, incomplete %lu, complete %lu, served %lu, disk %.1f MB",
                    (unsigned long)r.getTasksQueued(), (unsigned long)r.getLeasesActive(), (unsigned long)r.getGroupsIncomplete(),
                    (unsigned long)r.getGroupsComplete(), (unsigned long)r.getGroupsServed(), r.getDiskBytes() / 1e6);
      break;
    }
    case proto::ProcessStatus::Detail::ACTOR: {
      auto a = d.getActor();
      std::snprintf(buf, sizeof(buf), "%.0f tok/s, %.1f samples/s, outbox %u", a.getTokensPerSecond(), a.getSamplesPerSecond(),
                    a.getOutboxDepth());
      break;
    }
    case proto::ProcessStatus::Detail::REWARDD: {
      auto r = d.getRewardd();
      std::snprintf(buf, sizeof(buf), "%.1f scored/s, in flight %u, workers %u, outbox %u", r.getScoredPerSecond(),
                    r.getInFlight(), r.getWorkers(), r.getOutboxDepth());
      break;
    }
    case proto::ProcessStatus::Detail::LEARNER: {
      auto l = d.getLearner();
      std::snprintf(buf, sizeof(buf), "step %lu/%lu, loss %.4f, reward %.3f, %.0f tok/s", (unsigned long)l.getStep(),
                    (unsigned long)l.getTotalSteps(), l.getLastLoss(), l.getLastReward(), l.getTokensPerSecond());
      break;
    }
    default: break;
  }
  return buf;
}

int Control(int argc, char** argv, proto::ControlCommand command, const char* what) {
  std::string run_dir = ".", argument;
  FlagSet flags(argv[0], std::string(what) + " every process of a run through its control socket.");
  flags.String("run-dir", &run_dir, "the run directory (default .)");
  if (command == proto::ControlCommand::CHECKPOINT) flags.String("dir", &argument, "target directory (learner; default its checkpoints/)");
  ParseOrExit(flags, argc, argv);
  auto targets = Targets(run_dir);
  if (!targets.ok()) return Fail(argv[0], targets.status().message());
  if (command == proto::ControlCommand::STOP) {
    // Stop `aha run` first, so its supervisor does not treat the stops as exits to act on.
    std::ifstream pidfile(fs::path(run_dir) / "procs" / "aha-run.pid");
    long pid = 0;
    if (pidfile >> pid && pid > 0 && kill(static_cast<pid_t>(pid), 0) == 0) {
      kill(static_cast<pid_t>(pid), SIGTERM);
      std::printf("%-10s stopping (pid %ld)\n", "aha-run", pid);
      return 0;
    }
  }
  zmq::context_t ctx;
  int failures = 0;
  if (command == proto::ControlCommand::STATUS)
    std::printf("%-10s %8s %-9s %8s %9s  %s\n", "role", "pid", "state", "version", "uptime", "detail");
  for (const auto& t : *targets) {
    auto reply = SendControl(ctx, t.control, command, argument, 3000ms);
    if (!reply.ok()) {
      std::printf("%-10s %s\n", t.role.c_str(), ("unreachable: " + reply.status().message()).c_str());
      ++failures;
      continue;
    }
    auto r = (*reply)->root().getBody().getControlReply();
    auto st = r.getStatus();
    if (command == proto::ControlCommand::STATUS) {
      std::printf("%-10s %8u %-9s %8lu %8.0fs  %s\n", t.role.c_str(), st.getPid(), StateName(st.getState()),
                  (unsigned long)st.getPolicyVersion(), st.getUptimeSeconds(), Detail(st).c_str());
    } else if (!r.getOk()) {
      // Processes without checkpoint state say so; that is not a failure of the command.
      std::printf("%-10s %s\n", t.role.c_str(), r.getError().cStr());
      if (command != proto::ControlCommand::CHECKPOINT) ++failures;
    } else {
      std::printf("%-10s %s%s%s\n", t.role.c_str(), StateName(st.getState()), r.getResult().size() ? " -> " : "",
                  r.getResult().cStr());
    }
  }
  return failures ? 1 : 0;
}

}  // namespace

int RunStatusCommand(int argc, char** argv) { return Control(argc, argv, proto::ControlCommand::STATUS, "Shows the state of"); }
int RunStopCommand(int argc, char** argv) { return Control(argc, argv, proto::ControlCommand::STOP, "Stops"); }
int RunPauseCommand(int argc, char** argv) { return Control(argc, argv, proto::ControlCommand::PAUSE, "Pauses"); }
int RunResumeCommand(int argc, char** argv) { return Control(argc, argv, proto::ControlCommand::RESUME, "Resumes"); }
int RunCheckpointCommand(int argc, char** argv) {
  return Control(argc, argv, proto::ControlCommand::CHECKPOINT, "Checkpoints");
}

}  // namespace aha
