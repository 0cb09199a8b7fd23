#include "orchestrator/run_command.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/config.h"
#include "common/flags.h"
#include "common/log.h"
#include "engine/backends.h"
#include "orchestrator/progress.h"
#include "orchestrator/supervisor.h"

namespace aha {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

volatile sig_atomic_t g_interrupted = 0;
void OnSignal(int) { g_interrupted = 1; }

std::string SelfDir() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? "." : p.parent_path().string();
}

// A free TCP port on `host`, or an error naming the port when a fixed one is taken.
Result<int> ReservePort(const std::string& host, int fixed) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return Unavailable("socket() failed");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(fixed));
  if (inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1) {
    close(fd);
    return InvalidArgument("topology.host '" + host + "' is not an IPv4 address");
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return Unavailable("port " + std::to_string(fixed) + " on " + host + " is in use");
  }
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return static_cast<int>(ntohs(a.sin_port));
}

// Runs `aha <args>` to completion with output into `log`; returns its exit code.
int RunStageCommand(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> full = {SelfDir() + "/aha"};
  full.insert(full.end(), args.begin(), args.end());
  std::ofstream(log, std::ios::app) << "$ aha";
  {
    std::ofstream l(log, std::ios::app);
    for (const auto& a : args) l << " " << a;
    l << "\n";
  }
  Supervisor one(0);
  ProcessSpec spec;
  spec.role = "stage";
  spec.argv = full;
  spec.log_file = log;
  if (!one.Start(spec).ok()) return 127;
  for (;;) {
    if (g_interrupted) {
      one.Stop(5000ms);
      return 130;
    }
    Status s = one.Poll();
    const ProcessState* p = one.Find("stage");
    if (!s.ok()) return p->last_exit ? p->last_exit : 1;
    if (p->done) return 0;
    std::this_thread::sleep_for(50ms);
  }
}

Status CheckInputs(const JobConfig& job, const std::string& origin) {
  auto need = [&](const std::string& path, const std::string& key) -> Status {
    if (!path.empty() && !fs::exists(path)) return NotFound(origin + ": " + key + ": " + path + " does not exist");
    return OkStatus();
  };
  RETURN_IF_ERROR(need(job.model.path, "model.path"));
  if (!job.model.path.empty() && !fs::exists(fs::path(job.model.path) / "config.json"))
    return NotFound(origin + ": model.path: " + job.model.path + " has no config.json");
  RETURN_IF_ERROR(need(job.data.train, "data.train"));
  RETURN_IF_ERROR(need(job.data.eval, "data.eval"));
  RETURN_IF_ERROR(need(job.sft.data, "sft.data"));
  RETURN_IF_ERROR(need(job.model.init.config, "model.init.config"));
  if (job.model.tokenizer != "byte") RETURN_IF_ERROR(need(job.model.tokenizer, "model.tokenizer"));
  // GPU devices: every stage and daemon picks its device from the topology (actors[i].device, the
  // learner, SFT and evaluation on learner_devices[0]). Refuse them up front where this build or
  // machine cannot honour them, rather than fail later inside a child.
  std::vector<std::pair<std::string, std::string>> devices;
  for (size_t i = 0; i < job.topology.actors.size(); ++i)
    devices.emplace_back("topology.actors[" + std::to_string(i) + "].device", job.topology.actors[i].device);
  for (const auto& d : job.topology.learner_devices) devices.emplace_back("topology.learner_devices", d);
  for (const auto& [key, d] : devices) {
    if (d == "cpu") continue;
    if (!engine::BuiltWithCuda())
      return Unimplemented(origin + ": " + key + ": " + d + " needs a build with the CUDA backend (nvcc at configure time)");
    if (Status s = engine::CheckDevice(d); !s.ok()) return Unavailable(origin + ": " + key + ": " + s.message());
  }
  return OkStatus();
}


}  // namespace

int RunRunCommand(int argc, char** argv) {
  std::string job_path, run_dir;
  std::vector<std::string> sets;
  bool no_eval = false;
  FlagSet flags("aha run", "Runs a job (sft, sample and grpo stages) on this machine, supervising every process.");
  flags.Positional("JOB.yaml", &job_path, "the job file", true);
  flags.String("run-dir", &run_dir, "run directory (default runs/<name>-<time>)");
  flags.StringList("set", &sets, "override a job-file key (a.b=c), repeatable");
  flags.Bool("no-eval", &no_eval, "skip the before/after evaluation on data.eval");
  ParseOrExit(flags, argc, argv);
  const std::string prog = "aha run";

  auto job_or = LoadJobConfig(job_path, sets);
  if (!job_or.ok()) return Fail(prog, job_or.status().message(), 2);
  JobConfig job = *job_or;
  // Relative paths in a job file are relative to the job file's folder, so a job and its data
  // can move together (configs/tiny-cpu.yaml names configs/data/...).
  const fs::path job_dir = fs::absolute(job_path).parent_path();
  for (std::string* p : {&job.model.path, &job.model.init.config, &job.data.train, &job.data.eval, &job.sft.data,
                         &job.sample.out})
    if (!p->empty() && fs::path(*p).is_relative()) *p = (job_dir / *p).lexically_normal().string();
  if (job.model.tokenizer != "byte" && fs::path(job.model.tokenizer).is_relative())
    job.model.tokenizer = (job_dir / job.model.tokenizer).lexically_normal().string();
  if (Status s = CheckInputs(job, job_path); !s.ok()) return Fail(prog, s.message(), 2);
  const int port_count = 4 + static_cast<int>(job.topology.actors.size());
  if (job.ports.base > 0)  // fixed ports: refuse before anything starts, not halfway through
    for (int i = 0; i < port_count; ++i)
      if (auto p = ReservePort(job.topology.host, static_cast<int>(job.ports.base) + i); !p.ok())
        return Fail(prog, p.status().message(), 2);
  if (run_dir.empty()) {
    char stamp[32];
    std::time_t now = std::time(nullptr);
    std::strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", std::localtime(&now));
    run_dir = "runs/" + job.name + "-" + stamp;
  }
  fs::path run = fs::absolute(run_dir);
  for (const char* sub : {"logs", "procs", "metrics", "models", "checkpoints", "eval", "report"})
    fs::create_directories(run / sub);
  std::string resolved = (run / "config.yaml").string();
  std::ofstream(resolved) << ToYaml(job);

  LogOptions lo;
  lo.process = "aha";
  lo.file = (run / "logs" / "aha.log").string();
  lo.to_stderr = false;  // the terminal gets the progress display and one-line errors only
  if (Status s = InitLogging(lo); !s.ok()) return Fail(prog, s.message());
  signal(SIGINT, OnSignal);
  signal(SIGTERM, OnSignal);
  // Every process of a local run shares this machine's cores: one compute thread each, unless the
  // user says otherwise. Spinning OpenMP/OpenBLAS workers of several processes steal the cores from
  // each other (docs/PERF.md, engine section: 20-50x slower decode with 2+2 threads on 2 cores).
  setenv("OMP_NUM_THREADS", "1", 0);
  setenv("OPENBLAS_NUM_THREADS", "1", 0);
  std::ofstream(run / "procs" / "aha-run.pid") << getpid() << "\n";
  spdlog::info("run directory {}", run.string());
  std::printf("run directory %s\n", run.string().c_str());

  auto abs = [](const std::string& p) { return p.empty() ? p : fs::absolute(p).string(); };
  std::string model = abs(job.model.path);
  if (model.empty()) {
    model = (run / "models" / "init").string();
    std::vector<std::string> args = {"init", "--arch", job.model.init.arch, "--out", model, "--seed", std::to_string(job.seed)};
    if (!job.model.init.preset.empty()) args.insert(args.end(), {"--preset", job.model.init.preset});
    if (!job.model.init.config.empty()) args.insert(args.end(), {"--config", abs(job.model.init.config)});
    if (job.model.tokenizer != "byte") args.insert(args.end(), {"--tokenizer", abs(job.model.tokenizer)});
    spdlog::info("stage init: {} model into {}", job.model.init.arch, model);
    if (int rc = RunStageCommand(args, (run / "logs" / "init.log").string()); rc != 0)
      return Fail(prog, "aha init failed (exit " + std::to_string(rc) + "): " + TailFile((run / "logs" / "init.log").string(), 1));
  }

  Progress progress(isatty(1));
  std::string eval_data = abs(job.data.eval);
  auto run_eval = [&](const std::string& which, const std::string& model_dir) -> int {
    if (no_eval || eval_data.empty()) return 0;
    std::string out = (run / "eval" / (which + ".json")).string();
    std::vector<std::string> args = {"eval", "--model", model_dir, "--data", eval_data, "--config", resolved,
                                     "--json-out", out};
    progress.Line("eval (" + which + ") on " + eval_data);
    return RunStageCommand(args, (run / "logs" / ("eval-" + which + ".log")).string());
  };

  for (const std::string& stage : job.stages) {
    if (g_interrupted) break;
    std::string log = (run / "logs" / (stage + ".log")).string();
    if (stage == "sft") {
      std::string out = (run / "models" / "sft").string();
      progress.Line("stage sft: " + job.sft.data);
      int rc = RunStageCommand({"sft", "--model", model, "--data", abs(job.sft.data), "--out", out, "--config", resolved}, log);
      if (rc != 0) return Fail(prog, "stage sft failed (exit " + std::to_string(rc) + "): " + TailFile(log, 1));
      model = out;
    } else if (stage == "sample") {
      progress.Line("stage sample: " + job.data.train + " -> " + job.sample.out);
      int rc = RunStageCommand({"sample", "--model", model, "--data", abs(job.data.train), "--samples",
                                std::to_string(job.sample.samples), "--keep", job.sample.keep, "--out",
                                abs(job.sample.out), "--config", resolved}, log);
      if (rc != 0) return Fail(prog, "stage sample failed (exit " + std::to_string(rc) + "): " + TailFile(log, 1));
    } else if (stage == "grpo") {
      if (int rc = run_eval("before", model); rc != 0)
        return Fail(prog, "evaluation before grpo failed (exit " + std::to_string(rc) + ")");
      const std::string host = job.topology.host;
      int base = static_cast<int>(job.ports.base);
      auto port = [&](int offset) -> Result<int> { return ReservePort(host, base ? base + offset : 0); };
      auto ep = [&](int p) { return "tcp://" + host + ":" + std::to_string(p); };
      std::vector<int> ports;
      for (int i = 0; i < port_count; ++i) {
        auto p = port(i);
        if (!p.ok()) return Fail(prog, p.status().message(), 2);
        ports.push_back(*p);
      }
      std::string replay_rpc = ep(ports[0]), replay_ingest = ep(ports[1]), rewardd_listen = ep(ports[2]),
                  weights = ep(ports[3]);
      Supervisor sup(5);
      auto proc = [&](const std::string& role, const std::string& binary, std::vector<std::string> args) {
        ProcessSpec s;
        s.role = role;
        s.argv = {SelfDir() + "/" + binary, "--config", resolved, "--ready-file",
                  (run / "procs" / (role + ".ready")).string(), "--control", ep(0)};
        s.argv.insert(s.argv.end(), args.begin(), args.end());
        s.log_file = (run / "logs" / (role + ".log")).string();
        s.ready_file = (run / "procs" / (role + ".ready")).string();
        return s;
      };
      std::vector<std::string> replay_args = {"--db", (run / "replay").string(), "--data", abs(job.data.train), "--rpc",
                                              replay_rpc, "--ingest", replay_ingest};
      Status s = sup.Start(proc("replay", "aha-replay", replay_args));
      if (s.ok()) s = sup.WaitReady("replay", 60s);
      if (s.ok()) s = sup.Start(proc("rewardd", "aha-rewardd", {"--listen", rewardd_listen, "--replay", replay_ingest}));
      if (s.ok()) s = sup.WaitReady("rewardd", 60s);
      ProcessSpec learner = proc("learner", "aha-learner", {"--model", model, "--replay", replay_rpc, "--weights", weights,
                                                            "--run-dir", run.string()});
      learner.restart_args = {"--resume"};
      if (s.ok()) s = sup.Start(learner);
      if (s.ok()) s = sup.WaitReady("learner", 120s);
      for (size_t a = 0; s.ok() && a < job.topology.actors.size(); ++a) {
        std::string role = "actor-" + std::to_string(a);
        s = sup.Start(proc(role, "aha-actor", {"--model", model, "--replay", replay_rpc, "--rewardd", rewardd_listen,
                                               "--weights", weights, "--role-index", std::to_string(a)}));
      }
      if (!s.ok()) {
        sup.Stop();
        return Fail(prog, "starting the grpo stage: " + s.message());
      }
      progress.Line("stage grpo: " + std::to_string(job.grpo.steps) + " steps, " + std::to_string(job.topology.actors.size()) +
                    " actor(s); logs in " + (run / "logs").string());
      std::string metrics_path = (run / "metrics" / "learner.jsonl").string();
      auto started = std::chrono::steady_clock::now();
      std::string failure;
      while (!g_interrupted) {
        Status ps = sup.Poll();
        if (!ps.ok()) {
          std::string role = ps.message().substr(0, ps.message().find(' '));
          failure = ps.message() + " (log: " + (run / "logs" / (role + ".log")).string() + ")";
          std::fprintf(stderr, "%s", TailFile((run / "logs" / (role + ".log")).string(), 8).c_str());
          break;
        }
        progress.Update(metrics_path, job.grpo.steps, started);
        const ProcessState* l = sup.Find("learner");
        if (l && l->done) break;
        std::this_thread::sleep_for(200ms);
      }
      progress.Update(metrics_path, job.grpo.steps, started);
      progress.Finish();
      // Actors first (they wait on the others), then rewardd and replay.
      for (const auto& p : sup.processes())
        if (p.spec.role.rfind("actor-", 0) == 0 && p.pid > 0) (void)sup.Kill(p.spec.role, SIGTERM);
      sup.Stop();
      if (g_interrupted) return Fail(prog, "interrupted; every process was stopped", 130);
      if (!failure.empty()) return Fail(prog, failure);
      if (fs::exists(run / "checkpoints" / "latest")) model = fs::canonical(run / "checkpoints" / "latest").string();
      if (int rc = run_eval("after", model); rc != 0)
        return Fail(prog, "evaluation after grpo failed (exit " + std::to_string(rc) + ")");
    }
  }
  if (g_interrupted) return Fail(prog, "interrupted", 130);
  std::ofstream(run / "final_model.txt") << model << "\n";
  int rc = RunStageCommand({"report", run.string()}, (run / "logs" / "report.log").string());
  std::printf("%s", TailFile((run / "report" / "summary.txt").string(), 40).c_str());
  std::printf("run directory: %s\n", run.string().c_str());
  return rc == 0 ? 0 : 1;
}

}  // namespace aha
