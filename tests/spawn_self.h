// SpawnSelf(): re-runs the current test binary as a child process limited to one test, with extra
// environment variables — for tests whose peer must be a process of its own (one that is killed,
// or that holds a GPU rank). WaitExit() reaps it.
#pragma once

#include <spawn.h>
#include <sys/wait.h>

#include <string>
#include <vector>

extern char** environ;

namespace aha::test {

// The child runs this binary with --gtest_filter=`test` and `env` ("NAME=value") added to ours.
// Returns its pid, or -1 when it could not be started.
inline pid_t SpawnSelf(const std::string& test, const std::vector<std::string>& env) {
  std::string self = "/proc/self/exe", filter = "--gtest_filter=" + test;
  std::vector<std::string> env_s = env;
  for (char** e = environ; *e; ++e) env_s.push_back(*e);
  std::vector<char*> envp;
  for (auto& s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);
  char* argv[] = {self.data(), filter.data(), nullptr};
  pid_t pid = 0;
  if (posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv, envp.data()) != 0) return -1;
  return pid;
}

// Waits for `pid`: its exit code, or 128 + the signal that ended it.
inline int WaitExit(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace aha::test
