// Sh(): runs a shell command in a test, returning its exit code, stdout and stderr. Shared by the
// tests that drive the real binaries (orchestrator, deploy, dashboards).
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace aha::test {

struct Output {
  int code = -1;  // exit status; -1 when killed by a signal
  std::string out, err;
};

inline Output Sh(const std::string& cmd) {
  static std::atomic<int> calls{0};
  const std::filesystem::path errfile = std::filesystem::temp_directory_path() /
      ("aha_sh_err_" + std::to_string(getpid()) + "_" + std::to_string(calls++));
  Output o;
  FILE* p = popen((cmd + " 2>" + errfile.string()).c_str(), "r");
  if (!p) return o;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) o.out.append(buf.data(), n);
  const int st = pclose(p);
  o.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  std::ifstream f(errfile);
  o.err.assign(std::istreambuf_iterator<char>(f), {});
  std::filesystem::remove(errfile);
  return o;
}

}  // namespace aha::test
