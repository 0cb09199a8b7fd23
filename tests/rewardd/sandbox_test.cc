// Sandbox escape suite: every attempt is contained by its limit, reported with a reason, and no
// process of the run survives it. Runs real programs (python3, g++) under bwrap.
#include <gtest/gtest.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>

#include "rewardd/rewards.h"
#include "rewardd/sandbox.h"

namespace aha::rewardd {
namespace {

class SandboxTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    SandboxOptions o;
    o.max_parallel = 4;
    auto s = Sandbox::Create(o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    box_ = s->release();
  }
  static void TearDownTestSuite() {
    delete box_;
    box_ = nullptr;
  }

  // Runs `code` with python3; `marker` lands in argv so survivors can be found in /proc.
  SandboxResult Python(const std::string& code, SandboxLimits limits, const std::string& marker,
                       const std::string& stdin_data = "") {
    auto dir = box_->MakeWorkdir({{"main.py", code, false}});
    EXPECT_TRUE(dir.ok());
    SandboxRequest r;
    r.argv = {"python3", "-I", "main.py", marker};
    r.limits = limits;
    r.stdin_data = stdin_data;
    r.workdir = (*dir)->path();
    auto res = box_->Run(r);
    EXPECT_TRUE(res.ok()) << res.status().ToString();
    return res.ok() ? *res : SandboxResult{};
  }

  static SandboxLimits Tight() {
    SandboxLimits l;
    l.wall_seconds = 5;
    l.cpu_seconds = 2;
    l.memory_bytes = 512ull << 20;
    l.max_processes = 16;
    l.max_output_bytes = 1 << 20;
    return l;
  }

  // Processes whose command line contains `marker` (ours never has it: it is only in the child's
  // argv), after giving the kernel a moment to reap.
  static int Survivors(const std::string& marker) {
    int found = 0;
    for (int attempt = 0; attempt < 20; ++attempt) {
      found = 0;
      DIR* d = opendir("/proc");
      while (dirent* e = readdir(d)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        // Plain read(2): a process that exits while it is read gives ESRCH, which std::ifstream
        // turns into an exception (seen under the fork bomb); a vanished process is no survivor.
        std::string cmd;
        const int fd = open((std::string("/proc/") + e->d_name + "/cmdline").c_str(), O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
          char buf[4096];
          for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) cmd.append(buf, static_cast<size_t>(n));
          close(fd);
        }
        if (cmd.find(marker) != std::string::npos) ++found;
      }
      closedir(d);
      if (found == 0) return 0;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return found;
  }

  static Sandbox* box_;
};
Sandbox* SandboxTest::box_ = nullptr;

TEST_F(SandboxTest, RunsAProgramWithStdinAndStdout) {
  auto r = Python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n", Tight(),
                  "aha-m-basic", "1 2 3\n");
  EXPECT_EQ(r.outcome, SandboxOutcome::kExited) << r.reason << r.stderr_data;
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.stdout_data, "6\n");
}

TEST_F(SandboxTest, NetworkConnectFails) {
  auto r = Python(R"(
import socket
for host, port in [("1.1.1.1", 53), ("8.8.8.8", 443), ("127.0.0.1", 22)]:
    try:
        s = socket.create_connection((host, port), timeout=2)
        print("CONNECTED", host)
    except OSError as e:
        print("blocked", host, e.errno)
try:
    socket.getaddrinfo("example.com", 80)
    print("RESOLVED")
except OSError:
    print("no dns")
)",
                  Tight(), "aha-m-net");
  EXPECT_EQ(r.outcome, SandboxOutcome::kExited) << r.reason << r.stderr_data;
  EXPECT_EQ(r.stdout_data.find("CONNECTED"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("RESOLVED"), std::string::npos) << r.stdout_data;
  EXPECT_NE(r.stdout_data.find("blocked 1.1.1.1"), std::string::npos) << r.stdout_data;
}

TEST_F(SandboxTest, WritesOutsideItsDirectoriesFail) {
  std::string host_probe = "/tmp/aha-escape-probe-" + std::to_string(getpid());
  auto r = Python("import os\nfor p in ['/usr/aha-evil', '/etc/aha-evil', '/bin/aha-evil', '" +
                      host_probe + "', '/sandbox/aha-evil', '/proc/sys/kernel/hostname']:\n"
                      "    try:\n        open(p, 'w').write('x')\n        print('WROTE', p)\n"
                      "    except OSError as e:\n        print('denied', p)\n"
                      "open('/tmp/private', 'w').write('ok')\nprint('tmp ok')\n",
                  Tight(), "aha-m-write");
  EXPECT_EQ(r.outcome, SandboxOutcome::kExited) << r.reason << r.stderr_data;
  EXPECT_EQ(r.stdout_data.find("WROTE /usr"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("WROTE /etc"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("WROTE /bin"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("WROTE /sandbox"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("WROTE /proc"), std::string::npos) << r.stdout_data;
  EXPECT_NE(r.stdout_data.find("tmp ok"), std::string::npos);
  // Its /tmp is private: nothing reached the host's /tmp.
  EXPECT_NE(access(host_probe.c_str(), F_OK), 0);
  EXPECT_NE(access("/usr/aha-evil", F_OK), 0);
  EXPECT_NE(access("/etc/aha-evil", F_OK), 0);
}

TEST_F(SandboxTest, RootOnlyFilesAreUnreadable) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to create a root-only file the sandbox can see";
  auto dir = box_->MakeWorkdir({{"main.py",
                                 "for p in ['/sandbox/secret', '/etc/shadow', '/root/.bashrc']:\n"
                                 "    try:\n        print('READ', p, open(p).read())\n"
                                 "    except OSError as e:\n        print('denied', p)\n",
                                 false},
                                {"secret", "TOP-SECRET", false}});
  ASSERT_TRUE(dir.ok());
  std::string secret = (*dir)->path() + "/secret";
  ASSERT_EQ(chmod(secret.c_str(), 0600), 0);
  ASSERT_EQ(chown(secret.c_str(), 0, 0), 0);
  SandboxRequest req;
  req.argv = {"python3", "-I", "main.py"};
  req.limits = Tight();
  req.workdir = (*dir)->path();
  auto r = box_->Run(req);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->outcome, SandboxOutcome::kExited) << r->reason << r->stderr_data;
  EXPECT_EQ(r->stdout_data.find("TOP-SECRET"), std::string::npos) << r->stdout_data;
  EXPECT_EQ(r->stdout_data.find("READ"), std::string::npos) << r->stdout_data;
  EXPECT_NE(r->stdout_data.find("denied /sandbox/secret"), std::string::npos) << r->stdout_data;
}

TEST_F(SandboxTest, ForkBombIsContainedAndLeavesNothing) {
  auto t0 = std::chrono::steady_clock::now();
  auto r = Python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                  Tight(), "aha-m-forkbomb");
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.outcome, SandboxOutcome::kSandboxError) << r.reason;
  EXPECT_FALSE(r.ok());
  EXPECT_LT(secs, 15.0);
  EXPECT_EQ(Survivors("aha-m-forkbomb"), 0);
}

TEST_F(SandboxTest, MemoryBombHitsTheMemoryLimit) {
  auto r = Python("x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n", Tight(), "aha-m-mem");
  EXPECT_EQ(r.outcome, SandboxOutcome::kMemoryLimit) << r.reason << r.stderr_data;
  EXPECT_EQ(Survivors("aha-m-mem"), 0);
}

TEST_F(SandboxTest, InfiniteLoopHitsTheCpuLimit) {
  // A generous wall limit: on a loaded machine CPU time accrues slower than wall time.
  SandboxLimits l = Tight();
  l.cpu_seconds = 1;
  l.wall_seconds = 30;
  auto r = Python("while True:\n    pass\n", l, "aha-m-loop");
  EXPECT_EQ(r.outcome, SandboxOutcome::kCpuLimit) << r.reason;
  EXPECT_LT(r.wall_seconds, 30.0);
  EXPECT_EQ(Survivors("aha-m-loop"), 0);
}

TEST_F(SandboxTest, SleepingProgramHitsTheWallLimit) {
  SandboxLimits l = Tight();
  l.wall_seconds = 1.5;
  auto r = Python("import time\ntime.sleep(60)\n", l, "aha-m-sleep");
  EXPECT_EQ(r.outcome, SandboxOutcome::kWallTimeout) << r.reason;
  EXPECT_LT(r.wall_seconds, 3.0);
  EXPECT_EQ(Survivors("aha-m-sleep"), 0);
}

TEST_F(SandboxTest, GigabyteOfOutputIsCutAtTheOutputLimit) {
  auto t0 = std::chrono::steady_clock::now();
  auto r = Python("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n",
                  Tight(), "aha-m-output");
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.outcome, SandboxOutcome::kOutputLimit) << r.reason;
  EXPECT_LE(r.stdout_data.size() + r.stderr_data.size(), Tight().max_output_bytes);
  EXPECT_LT(secs, 5.0);
  EXPECT_EQ(Survivors("aha-m-output"), 0);
}

TEST_F(SandboxTest, SleepingChildLeftBehindIsKilled) {
  auto t0 = std::chrono::steady_clock::now();
  auto r = Python(R"(
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(1); os.close(2)
        time.sleep(300)
    os._exit(0)
print("parent done")
)",
                  Tight(), "aha-m-orphan");
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.outcome, SandboxOutcome::kExited) << r.reason << r.stderr_data;
  EXPECT_EQ(r.stdout_data, "parent done\n");
  EXPECT_LT(secs, 4.0) << "the run waited for the orphan instead of ending with its program";
  EXPECT_EQ(Survivors("aha-m-orphan"), 0);
}

TEST_F(SandboxTest, NewNamespacesAndPtraceAreRefused) {
  auto r = Python(R"(
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print("unshare", libc.unshare(0x10000000))   # CLONE_NEWUSER
print("ptrace", libc.ptrace(16, 1, 0, 0))     # PTRACE_ATTACH to init
)",
                  Tight(), "aha-m-seccomp");
  EXPECT_EQ(r.outcome, SandboxOutcome::kExited) << r.reason << r.stderr_data;
  EXPECT_NE(r.stdout_data.find("unshare -1"), std::string::npos) << r.stdout_data;
  EXPECT_NE(r.stdout_data.find("ptrace -1"), std::string::npos) << r.stdout_data;
}

TEST_F(SandboxTest, ParallelRunsDoNotInterfere) {
  std::vector<std::thread> threads;
  std::vector<std::string> outs(8);
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&, i] {
      outs[static_cast<size_t>(i)] =
          Python("import sys\nprint(int(sys.stdin.read()) * 2)\n", Tight(), "aha-m-par",
                 std::to_string(i))
              .stdout_data;
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < 8; ++i) EXPECT_EQ(outs[static_cast<size_t>(i)], std::to_string(2 * i) + "\n");
}

// ---- the code reward on top of the sandbox ----

TEST_F(SandboxTest, CodeRewardIsTheFractionOfPassedTests) {
  TaskSpec task;
  task.kind = "code";
  task.language = "python";
  task.tests = {{"1 2\n", "3\n"}, {"10 20\n", "30\n"}, {"2 2\n", "5\n"}};
  std::map<std::string, int> outcomes;
  CodeOptions options;
  auto v = ScoreCode(box_, options, task,
                     "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```", &outcomes);
  EXPECT_NEAR(v.score, 2.0 / 3.0, 1e-9) << v.note;
  EXPECT_EQ(outcomes["passed"], 2);
  EXPECT_EQ(outcomes["wrong_output"], 1);
  EXPECT_NE(v.note.find("test 3"), std::string::npos) << v.note;
}

TEST_F(SandboxTest, CodeRewardCompilesCppAndReportsCompileErrors) {
  TaskSpec task;
  task.kind = "code";
  task.language = "cpp";
  task.tests = {{"4\n", "16\n"}, {"  7 \n", "49\n"}};
  CodeOptions options;
  auto ok = ScoreCode(box_, options, task,
                      "```cpp\n#include <iostream>\nint main(){long long n; std::cin >> n; "
                      "std::cout << n*n << \"\\n\";}\n```",
                      nullptr);
  EXPECT_EQ(ok.score, 1.0) << ok.note;
  auto bad = ScoreCode(box_, options, task, "```cpp\nint main( { return 0 }\n```", nullptr);
  EXPECT_EQ(bad.score, 0.0);
  EXPECT_NE(bad.note.find("compile error"), std::string::npos) << bad.note;
}

TEST_F(SandboxTest, CodeRewardCountsALimitBreachAsAFailedTest) {
  TaskSpec task;
  task.kind = "code";
  task.tests = {{"", "1\n"}, {"", "1\n"}};
  CodeOptions options;
  options.run_limits = Tight();
  options.run_limits.cpu_seconds = 1;
  options.run_limits.wall_seconds = 30;  // the CPU limit must be what stops it, even under load
  std::map<std::string, int> outcomes;
  auto v = ScoreCode(box_, options, task,
                     "```python\nimport os\nif os.path.exists('/tmp/x'):\n    pass\nprint(1)\nwhile True: pass\n```",
                     &outcomes);
  EXPECT_EQ(v.score, 0.0);
  EXPECT_EQ(outcomes["cpu_limit"], 2);
  EXPECT_NE(v.note.find("cpu time"), std::string::npos) << v.note;
}

}  // namespace
}  // namespace aha::rewardd
