// `aha run` end to end (label e2e) and its bad-input contract (default run).
//
// The e2e job is a shortened tiny-cpu job: a random tiny model, arithmetic tasks, three GRPO steps
// through every process (replay, rewardd, learner, one actor). While it runs, the test scrapes each
// daemon's /metrics and asks `aha status`; afterwards it checks the run directory.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/shell.h"

#ifndef AHA_BIN_DIR
#error "AHA_BIN_DIR must name build/bin"
#endif

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

using aha::test::Output;
using aha::test::Sh;

std::string Aha() { return std::string(AHA_BIN_DIR) + "/aha"; }

struct Workdir {
  fs::path dir;
  Workdir() {
    dir = fs::temp_directory_path() / ("aha_run_test_" + std::to_string(getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    EXPECT_EQ(Sh(Aha() + " data make arith --n 40 --seed 1 --min-digits 1 --max-digits 1 --ops + --out " +
                 (dir / "train.jsonl").string()).code, 0);
    EXPECT_EQ(Sh(Aha() + " data make arith --n 6 --seed 2 --min-digits 1 --max-digits 1 --ops + --out " +
                 (dir / "eval.jsonl").string()).code, 0);
  }
  ~Workdir() { fs::remove_all(dir); }
  std::string Job(const std::string& extra = "") const {
    std::string text = "name: e2e\nseed: 3\nmodel:\n  init: {arch: qwen2, preset: tiny}\n"
                       "  prompt_template: \"{prompt}\\n\"\n"
                       "data: {train: " + (dir / "train.jsonl").string() + ", eval: " + (dir / "eval.jsonl").string() + "}\n"
                       "stages: [grpo]\n"
                       "grpo: {steps: 4, group_size: 4, prompts_per_step: 2, max_new_tokens: 12, lr: 0.001, max_staleness: 1}\n"
                       "checkpoint: {every: 1}\n"
                       "rewards: [{name: accuracy, weight: 1}, {name: format, weight: 0.1}]\n" + extra;
    fs::path p = dir / "job.yaml";
    std::ofstream(p) << text;
    return p.string();
  }
};

int CountAhaChildren() {
  // Processes whose command line is one of aha's daemons, started from this test's run dirs.
  // The bracket keeps pgrep from matching its own command line.
  Output o = Sh("pgrep -f 'aha_run_tes[t]_" + std::to_string(getpid()) + "' | wc -l");
  return std::atoi(o.out.c_str());
}

TEST(AhaRun, WrongJobFileIsOneLineAndExitCode2) {
  Workdir w;
  std::string job = w.Job("bogus_section: 1\n");
  Output o = Sh(Aha() + " run " + job + " --run-dir " + (w.dir / "r1").string());
  EXPECT_EQ(o.code, 2);
  EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err;
  EXPECT_NE(o.err.find("bogus_section: unknown key"), std::string::npos) << o.err;
  EXPECT_FALSE(fs::exists(w.dir / "r1")) << "nothing is started or written for a bad job";
}

TEST(AhaRun, MissingDatasetIsOneLineAndExitCode2) {
  Workdir w;
  std::string job = w.Job();
  Output o = Sh(Aha() + " run " + job + " --set data.train=/nonexistent.jsonl --run-dir " + (w.dir / "r2").string());
  EXPECT_EQ(o.code, 2);
  EXPECT_EQ(o.err, "aha run: error: " + job + ": data.train: /nonexistent.jsonl does not exist\n");
}

TEST(AhaRun, MissingModelIsOneLineAndExitCode2) {
  Workdir w;
  std::string job = w.Job();
  Output o = Sh(Aha() + " run " + job + " --set model.init.arch= --set model.path=/nonexistent-model --run-dir " +
                (w.dir / "r3").string());
  EXPECT_EQ(o.code, 2);
  EXPECT_NE(o.err.find("model.path: /nonexistent-model does not exist"), std::string::npos) << o.err;
}

// A GPU device the build or the machine cannot provide is refused before anything starts, in one
// line: "needs a build with the CUDA backend" without nvcc at configure time, else the CUDA error
// for the device (this machine has no GPU; cuda:7 is past any test machine's count).
TEST(AhaRun, UnavailableGpuDeviceIsOneLineAndStartsNothing) {
  Workdir w;
  std::string job = w.Job("topology: {actors: [{device: \"cuda:7\"}]}\n");
  Output o = Sh(Aha() + " run " + job + " --run-dir " + (w.dir / "r5").string());
  EXPECT_EQ(o.code, 2);
  EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err;
  EXPECT_EQ(o.err.rfind("aha run: error: " + job + ": topology.actors[0].device: ", 0), 0u) << o.err;
  EXPECT_FALSE(fs::exists(w.dir / "r5")) << "nothing is started or written";
}

TEST(AhaRun, PortInUseIsOneLineAndLeavesNoProcess) {
  Workdir w;
  // Hold a port, then ask the job to use it as its base.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  int port = ntohs(a.sin_port);
  std::string job = w.Job("ports: {base: " + std::to_string(port) + "}\n");
  Output o = Sh(Aha() + " run " + job + " --run-dir " + (w.dir / "r4").string());
  close(fd);
  EXPECT_NE(o.code, 0);
  EXPECT_NE(o.err.find("port " + std::to_string(port) + " on 127.0.0.1 is in use"), std::string::npos) << o.err;
  EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err;
  EXPECT_EQ(CountAhaChildren(), 0);
}

TEST(AhaSampleAndEval, WriteWhatTheyAreAskedFor) {
  Workdir w;
  std::string model = (w.dir / "model").string(), data = (w.dir / "eval.jsonl").string();
  ASSERT_EQ(Sh(Aha() + " init --arch qwen2 --preset tiny --out " + model + " --seed 1").code, 0);
  std::string out = (w.dir / "samples.jsonl").string();
  Output s = Sh(Aha() + " sample --model " + model + " --data " + data + " --samples 3 --keep all --max-new-tokens 8 --out " + out);
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_EQ(Sh("wc -l < " + out).out, "18\n");  // 6 prompts x 3 samples, all kept
  auto first = nlohmann::json::parse(Sh("head -1 " + out).out);
  for (const char* k : {"id", "prompt", "completion", "reward", "correct"}) EXPECT_TRUE(first.contains(k)) << k;
  Output e = Sh(Aha() + " eval --model " + model + " --data " + data + " --samples 2 --max-new-tokens 8 --json");
  ASSERT_EQ(e.code, 0) << e.err;
  auto j = nlohmann::json::parse(e.out);
  EXPECT_EQ(j["kinds"]["arith"]["prompts"].get<int>(), 6);
  EXPECT_TRUE(j["kinds"]["all"].contains("pass@1"));
  EXPECT_TRUE(j["kinds"]["all"].contains("cons@k"));
  Output bad = Sh(Aha() + " sample --model " + model + " --data " + data + " --keep some --out " + out);
  EXPECT_EQ(bad.code, 2);
  EXPECT_EQ(bad.err, "aha sample: error: --keep must be correct or all\n");
}

std::string Scrape(const std::string& hostport) { return Sh("curl -s --max-time 2 http://" + hostport + "/metrics").out; }

TEST(AhaRunE2E, ShortJobThroughEveryProcess) {
  Workdir w;
  // A tiny peak, so that the learner's MFU is reported (and nonzero) on this CPU.
  std::string job = w.Job("topology: {peak_tflops: 0.000001}\n");
  fs::path run = w.dir / "run";
  pid_t pid = fork();
  if (pid == 0) {
    std::string log = (w.dir / "aha-run.out").string();
    freopen(log.c_str(), "w", stdout);
    freopen(log.c_str(), "a", stderr);
    execl(Aha().c_str(), "aha", "run", job.c_str(), "--run-dir", run.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // While it runs: every daemon's metrics endpoint answers with its own metric names, and
  // `aha status` lists the processes.
  std::set<std::string> scraped;
  bool status_ok = false, control_ok = false;
  std::string control_log;
  int exit_code = -1;
  auto deadline = std::chrono::steady_clock::now() + 600s;
  while (std::chrono::steady_clock::now() < deadline) {
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      break;
    }
    if (fs::exists(run / "procs")) {
      for (const auto& e : fs::directory_iterator(run / "procs")) {
        if (e.path().extension() != ".ready" || scraped.count(e.path().stem().string())) continue;
        std::ifstream f(e.path());
        auto j = nlohmann::json::parse(f, nullptr, false);
        if (j.is_discarded() || !j.contains("metrics")) continue;
        std::string role = e.path().stem().string();
        std::string process = role.rfind("actor", 0) == 0 ? "actor" : role;
        if (Scrape(j["metrics"]).find("aha_" + process + "_uptime_seconds") != std::string::npos) scraped.insert(role);
      }
      if (!status_ok) {
        Output s = Sh(Aha() + " status --run-dir " + run.string());
        status_ok = s.code == 0 && s.out.find("learner") != std::string::npos && s.out.find("running") != std::string::npos;
        if (status_ok) {
          // Job control through the control sockets: pause, see it, resume, checkpoint.
          Output p = Sh(Aha() + " pause --run-dir " + run.string());
          Output sp = Sh(Aha() + " status --run-dir " + run.string());
          control_ok = p.code == 0 && sp.out.find("paused") != std::string::npos;
          Output r = Sh(Aha() + " resume --run-dir " + run.string());
          Output c = Sh(Aha() + " checkpoint --run-dir " + run.string());
          control_ok = control_ok && r.code == 0 && c.code == 0 &&
                       c.out.find("checkpoints/manual-") != std::string::npos;
          control_log = p.out + sp.out + r.out + c.out;
        }
      }
    }
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_EQ(exit_code, 0) << Sh("tail -30 " + (w.dir / "aha-run.out").string()).out;
  EXPECT_EQ(scraped, (std::set<std::string>{"replay", "rewardd", "learner", "actor-0"}));
  EXPECT_TRUE(status_ok) << "aha status never listed a running learner";
  EXPECT_TRUE(control_ok) << control_log;

  // Trajectories flowed and rewards arrived: one metrics line per step, each with rewards.
  std::ifstream m(run / "metrics" / "learner.jsonl");
  std::vector<nlohmann::json> steps;
  for (std::string line; std::getline(m, line);) steps.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(steps.size(), 4u);
  for (const auto& s : steps) {
    EXPECT_TRUE(s.contains("reward"));
    EXPECT_GT(s["tokens"].get<int>(), 0);
    EXPECT_GT(s["mfu"].get<double>(), 0.0) << "topology.peak_tflops reaches the learner";
  }
  // At least two weight versions were published and picked up by the actor (staleness 1 makes the
  // fourth step need samples of version 2 or newer).
  EXPECT_EQ(steps.back()["version"].get<int>(), 4);
  std::string actor_log = Sh("cat " + (run / "logs" / "actor-0.log").string()).out;
  std::set<int> swapped;
  std::regex swap_re("swapped in policy version ([0-9]+)");
  for (auto it = std::sregex_iterator(actor_log.begin(), actor_log.end(), swap_re); it != std::sregex_iterator(); ++it)
    swapped.insert(std::stoi((*it)[1]));
  EXPECT_GE(swapped.size(), 2u) << actor_log;
  for (const auto& s : steps) EXPECT_LE(s["staleness"].get<double>(), 1.0) << "replay enforces max_staleness";
  // The run directory is complete.
  for (const char* p : {"config.yaml", "logs/replay.log", "logs/rewardd.log", "logs/learner.log", "logs/actor-0.log",
                        "checkpoints/latest/model.safetensors", "checkpoints/latest/tokenizer.json", "eval/before.json",
                        "eval/after.json", "report/index.html", "report/summary.txt"})
    EXPECT_TRUE(fs::exists(run / p)) << p;
  EXPECT_EQ(CountAhaChildren(), 0) << "no process outlives aha run";
}

}  // namespace
