// Every binary answers --help and rejects an unknown flag with one line and exit code 2; every
// daemon starts, serves its control socket and metrics, and stops cleanly on a `stop` request
// and on SIGTERM.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/daemon.h"

#ifndef AHA_BIN_DIR
#error "AHA_BIN_DIR must name build/bin"
#endif

namespace aha {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

struct Output {
  int code = -1;
  std::string out, err;
};

Output RunCommand(const std::string& cmd) {
  std::string errfile = fs::temp_directory_path() / ("aha_bin_err_" + std::to_string(getpid()));
  Output o;
  FILE* p = popen((cmd + " 2>" + errfile).c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) o.out.append(buf.data(), n);
  int status = pclose(p);
  o.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream f(errfile);
  o.err.assign(std::istreambuf_iterator<char>(f), {});
  fs::remove(errfile);
  return o;
}

std::vector<std::string> Binaries() {
  std::vector<std::string> names;
  for (const char* b : {"aha", "aha-replay", "aha-rewardd", "aha-actor", "aha-learner"})
    if (fs::exists(fs::path(AHA_BIN_DIR) / b)) names.push_back(b);
  return names;
}

TEST(Binaries, AllFiveAreBuilt) { EXPECT_EQ(Binaries().size(), 5u); }

TEST(Binaries, AnswerHelpAndRejectUnknownFlagsWithOneLine) {
  for (const auto& b : Binaries()) {
    std::string path = std::string(AHA_BIN_DIR) + "/" + b;
    Output help = RunCommand(path + " --help");
    EXPECT_EQ(help.code, 0) << b;
    EXPECT_NE(help.out.find("usage:"), std::string::npos) << b << ": " << help.out;
    Output bad = RunCommand(path + " --definitely-not-a-flag");
    EXPECT_EQ(bad.code, 2) << b;
    EXPECT_EQ(bad.err.rfind(b + ": error: ", 0), 0u) << b << ": " << bad.err;
    EXPECT_EQ(std::count(bad.err.begin(), bad.err.end(), '\n'), 1) << b << ": " << bad.err;
  }
}

struct Daemon {
  pid_t pid = -1;
  nlohmann::json ready;
};

// Arguments each daemon needs to start without a job (see their --help).
std::vector<std::string> MinimalArgs(const std::string& binary, const fs::path& dir) {
  if (binary == "aha-replay") {
    std::ofstream(dir / "data.jsonl") << R"({"id": "t1", "prompt": "What is 1 + 1?", "answer": "2", "kind": "arith"})" << "\n";
    return {"--db", (dir / "replay-db").string(), "--data", (dir / "data.jsonl").string()};
  }
  if (binary == "aha-rewardd") return {"--replay", "tcp://127.0.0.1:9"};  // nobody there: it waits
  return {};
}

Daemon Start(const std::string& binary, const fs::path& dir) {
  fs::path ready = dir / (binary + ".ready");
  fs::remove(ready);
  std::string path = std::string(AHA_BIN_DIR) + "/" + binary, rf = ready.string(), log = (dir / (binary + ".log")).string();
  Daemon d;
  d.pid = fork();
  std::vector<std::string> args = {binary, "--ready-file", rf, "--log-file", log};
  for (auto& a : MinimalArgs(binary, dir)) args.push_back(a);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  if (d.pid == 0) {
    execv(path.c_str(), argv.data());
    _exit(127);
  }
  for (int i = 0; i < 1000 && !fs::exists(ready); ++i) std::this_thread::sleep_for(10ms);
  std::ifstream f(ready);
  if (f) d.ready = nlohmann::json::parse(f);
  return d;
}

int WaitExit(pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(10ms);
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return -1;
}

// Daemons that start without a job. aha-actor and aha-learner need a model, replay and a job file to
// start at all; the e2e test (tests/orchestrator) runs them.
class DaemonLifecycle : public ::testing::TestWithParam<std::string> {};

TEST_P(DaemonLifecycle, ServesControlAndMetricsAndStopsOnRequestAndOnSigterm) {
  const std::string binary = GetParam();
  fs::path dir = fs::temp_directory_path() / ("aha_daemon_" + binary + std::to_string(getpid()));
  fs::create_directories(dir);
  zmq::context_t ctx;

  Daemon d = Start(binary, dir);
  ASSERT_TRUE(d.ready.contains("control")) << binary << " did not write its ready file";
  EXPECT_EQ(d.ready["pid"].get<int>(), d.pid);
  auto reply = SendControl(ctx, d.ready["control"], proto::ControlCommand::STATUS, "", 3000ms);
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  auto st = (*reply)->root().getBody().getControlReply().getStatus();
  EXPECT_EQ(std::string(st.getProcess().cStr()), binary);
  EXPECT_EQ(st.getState(), proto::ProcessState::RUNNING);

  std::string metrics = d.ready["metrics"];
  Output scrape = RunCommand("curl -s http://" + metrics + "/metrics");
  std::string short_name = binary.substr(4);
  for (char& c : short_name) if (c == '-') c = '_';
  EXPECT_NE(scrape.out.find("aha_" + short_name + "_uptime_seconds"), std::string::npos) << scrape.out;
  EXPECT_NE(scrape.out.find("aha_" + short_name + "_build_info"), std::string::npos);
  EXPECT_NE(scrape.out.find("aha_malformed_messages_total"), std::string::npos);

  reply = SendControl(ctx, d.ready["control"], proto::ControlCommand::STOP, "", 3000ms);
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(WaitExit(d.pid, 5000ms), 0) << binary << " did not stop cleanly on request";

  d = Start(binary, dir);
  ASSERT_TRUE(d.ready.contains("control"));
  kill(d.pid, SIGTERM);
  EXPECT_EQ(WaitExit(d.pid, 5000ms), 0) << binary << " did not stop cleanly on SIGTERM";
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Daemons, DaemonLifecycle, ::testing::Values("aha-replay", "aha-rewardd"));

}  // namespace
}  // namespace aha
