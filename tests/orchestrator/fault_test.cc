// `aha run` survives kill -9 of each process type in the middle of a run (label fault): replay,
// rewardd, the actor and the learner are each SIGKILLed once; the supervisor restarts them (the
// learner with --resume from its newest checkpoint) and the run still finishes every step. Replay
// then holds no duplicate sample and every closed group is whole.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#ifndef AHA_BIN_DIR
#error "AHA_BIN_DIR must name build/bin"
#endif

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string Sh(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  pclose(p);
  return out;
}

int Lines(const fs::path& p) {
  std::ifstream f(p);
  int n = 0;
  for (std::string l; std::getline(f, l);) n += !l.empty();
  return n;
}

pid_t ReadyPid(const fs::path& ready) {
  std::ifstream f(ready);
  auto j = nlohmann::json::parse(f, nullptr, false);
  return j.is_discarded() || !j.contains("pid") ? -1 : j["pid"].get<pid_t>();
}

TEST(AhaRunFault, KillNineOfEachProcessTypeAndTheRunStillFinishes) {
  fs::path dir = fs::temp_directory_path() / ("aha_fault_test_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::string aha = std::string(AHA_BIN_DIR) + "/aha";
  ASSERT_EQ(std::system((aha + " data make arith --n 80 --seed 5 --min-digits 1 --max-digits 1 --ops + --out " +
                         (dir / "train.jsonl").string() + " 2>/dev/null").c_str()), 0);
  const int kSteps = 10;
  std::ofstream(dir / "job.yaml")
      << "name: fault\nseed: 3\nmodel:\n  init: {arch: qwen2, preset: tiny}\n  prompt_template: \"{prompt}\\n\"\n"
      << "data: {train: " << (dir / "train.jsonl").string() << "}\n"
      << "stages: [grpo]\n"
      << "grpo: {steps: " << kSteps << ", group_size: 4, prompts_per_step: 2, max_new_tokens: 12, lr: 0.001}\n"
      << "checkpoint: {every: 1}\nreplay: {lease_timeout_s: 3}\n"
      << "rewards: [{name: accuracy, weight: 1}, {name: format, weight: 0.1}]\n";
  fs::path run = dir / "run";
  pid_t pid = fork();
  if (pid == 0) {
    std::string log = (dir / "aha-run.out").string();
    freopen(log.c_str(), "w", stdout);
    freopen(log.c_str(), "a", stderr);
    execl(aha.c_str(), "aha", "run", (dir / "job.yaml").c_str(), "--run-dir", run.c_str(), "--no-eval",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  fs::path metrics = run / "metrics" / "learner.jsonl";
  // Kill each role once the learner has taken this many steps.
  std::vector<std::pair<int, std::string>> plan = {{2, "replay"}, {4, "rewardd"}, {5, "actor-0"}, {7, "learner"}};
  std::vector<std::string> killed;
  int exit_code = -1;
  auto deadline = std::chrono::steady_clock::now() + 600s;
  while (std::chrono::steady_clock::now() < deadline) {
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      break;
    }
    if (killed.size() < plan.size() && Lines(metrics) >= plan[killed.size()].first) {
      const std::string& role = plan[killed.size()].second;
      pid_t victim = ReadyPid(run / "procs" / (role + ".ready"));
      if (victim > 0 && kill(victim, SIGKILL) == 0) killed.push_back(role);
    }
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_EQ(exit_code, 0) << Sh("tail -20 " + (dir / "aha-run.out").string() + " " + (run / "logs" / "aha.log").string());
  EXPECT_EQ(killed, (std::vector<std::string>{"replay", "rewardd", "actor-0", "learner"}));

  // Every step was taken, and the learner resumed from a checkpoint after its kill.
  std::ifstream m(metrics);
  int last_step = 0;
  for (std::string line; std::getline(m, line);)
    if (!line.empty()) last_step = nlohmann::json::parse(line)["step"].get<int>();
  EXPECT_EQ(last_step, kSteps);
  std::string learner_log = Sh("cat " + (run / "logs" / "learner.log").string());
  EXPECT_NE(learner_log.find("resumed from"), std::string::npos) << learner_log;
  std::string aha_log = Sh("cat " + (run / "logs" / "aha.log").string());
  for (const char* role : {"replay", "rewardd", "actor-0", "learner"})
    EXPECT_NE(aha_log.find(std::string(role) + " exited with code 137"), std::string::npos) << role << "\n" << aha_log;

  // Replay: no duplicate sample, every stored group whole.
  std::string exported = (dir / "export.jsonl").string();
  ASSERT_EQ(std::system((std::string(AHA_BIN_DIR) + "/aha-replay export --db " + (run / "replay").string() +
                         " --out " + exported + " --filter all 2>/dev/null").c_str()), 0);
  std::ifstream e(exported);
  std::set<std::pair<std::string, int>> samples;
  std::map<std::string, int> per_group;
  std::map<std::string, std::string> state;
  int lines = 0;
  for (std::string line; std::getline(e, line);) {
    auto j = nlohmann::json::parse(line);
    ++lines;
    std::string g = j["group_id"].get<std::string>();
    samples.insert({g, j["sample_index"].get<int>()});
    per_group[g]++;
    state[g] = j["state"].get<std::string>();
  }
  EXPECT_GT(lines, 0);
  EXPECT_EQ(samples.size(), static_cast<size_t>(lines)) << "a sample is stored twice";
  // A group still leased when the run stopped may hold part of its samples (the actor sends them one
  // by one, and it or rewardd was stopped, or killed, between them; a resumed run lets the lease
  // expire and requeues the prompt). Such groups are bounded by
  // the in-flight limit, (max_staleness + 1) x prompts_per_step = 4. Every closed group is whole, and
  // an expired group keeps no sample.
  int partial = 0;
  for (const auto& [g, n] : per_group) {
    EXPECT_NE(state[g], "expired") << "group " << g << " expired but kept " << n << " samples";
    EXPECT_LE(n, 4) << "group " << g;
    if (state[g] == "leased") partial += n < 4;
    else EXPECT_EQ(n, 4) << "group " << g << " (" << state[g] << ") is not whole";
  }
  EXPECT_LE(partial, 4) << "more groups in flight than the rate limit allows";
  std::printf("replay holds %zu groups, %d of them leased and partial at the end\n", per_group.size(), partial);
  EXPECT_EQ(Sh("pgrep -f 'aha_fault_tes[t]_" + std::to_string(getpid()) + "' | wc -l"), "0\n") << "no process outlives the run";
  fs::remove_all(dir);
}

}  // namespace
