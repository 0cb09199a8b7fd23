#include "orchestrator/supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <filesystem>
#include <fstream>
#include <thread>

#include <spdlog/spdlog.h>

namespace aha {
namespace fs = std::filesystem;
using namespace std::chrono_literals;

Supervisor::~Supervisor() { Stop(3000ms); }

Status Supervisor::Start(ProcessSpec spec) {
  for (const auto& p : procs_)
    if (p.spec.role == spec.role) return AlreadyExists("role " + spec.role + " is already supervised");
  procs_.push_back(ProcessState{});
  procs_.back().spec = std::move(spec);
  return Spawn(procs_.back(), false);
}

Status Supervisor::Spawn(ProcessState& p, bool restart) {
  std::vector<std::string> args = p.spec.argv;
  if (restart) {
    args.insert(args.end(), p.spec.restart_args.begin(), p.spec.restart_args.end());
    args.push_back("--restarts");
    args.push_back(std::to_string(p.restarts));
  }
  if (!p.spec.ready_file.empty()) fs::remove(p.spec.ready_file);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int fd = open(p.spec.log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return IoError("cannot open log file " + p.spec.log_file);
  pid_t pid = fork();
  if (pid < 0) {
    close(fd);
    return Unavailable("fork failed for " + p.spec.role);
  }
  if (pid == 0) {
    // Own process group, so a terminal's Ctrl-C reaches only `aha run`, which stops us in order.
    setpgid(0, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    execv(argv[0], argv.data());
    dprintf(2, "aha: cannot execute %s\n", argv[0]);
    _exit(127);
  }
  close(fd);
  p.pid = pid;
  p.waiting_restart = false;
  spdlog::debug("started {} (pid {})", p.spec.role, pid);
  return OkStatus();
}

Status Supervisor::WaitReady(const std::string& role, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const ProcessState* p = Find(role);
    if (!p) return NotFound("no role " + role);
    if (!p->spec.ready_file.empty() && fs::exists(p->spec.ready_file)) return OkStatus();
    RETURN_IF_ERROR(Poll());
    p = Find(role);
    if (p->done) return FailedPrecondition(role + " exited before it was ready");
    if (std::chrono::steady_clock::now() > deadline)
      return Timeout(role + " was not ready within " + std::to_string(timeout.count() / 1000) + " s");
    std::this_thread::sleep_for(20ms);
  }
}

Status Supervisor::Poll() {
  for (auto& p : procs_) {
    if (p.pid > 0) {
      int status = 0;
      pid_t r = waitpid(p.pid, &status, WNOHANG);
      if (r == p.pid) {
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        p.last_exit = code;
        p.pid = -1;
        if (on_exit) on_exit(p.spec.role, code);
        if (code == 0) {
          p.done = true;
        } else if (p.restarts >= max_restarts_) {
          p.failed = true;
          return Internal(p.spec.role + " failed " + std::to_string(p.restarts + 1) + " times (last exit code " +
                          std::to_string(code) + ")");
        } else {
          int backoff_ms = std::min(8000, 500 << std::min(p.restarts, 4));
          p.restart_at = std::chrono::steady_clock::now() + std::chrono::milliseconds(backoff_ms);
          p.waiting_restart = true;
          spdlog::warn("{} exited with code {}; restarting in {} ms", p.spec.role, code, backoff_ms);
        }
      }
    }
    if (p.waiting_restart && std::chrono::steady_clock::now() >= p.restart_at) {
      ++p.restarts;
      RETURN_IF_ERROR(Spawn(p, true));
    }
  }
  return OkStatus();
}

const ProcessState* Supervisor::Find(const std::string& role) const {
  for (const auto& p : procs_)
    if (p.spec.role == role) return &p;
  return nullptr;
}

Status Supervisor::Kill(const std::string& role, int signal) {
  for (auto& p : procs_)
    if (p.spec.role == role) {
      if (p.pid <= 0) return FailedPrecondition(role + " is not running");
      kill(p.pid, signal);
      return OkStatus();
    }
  return NotFound("no role " + role);
}

void Supervisor::Stop(std::chrono::milliseconds grace) {
  for (auto& p : procs_) {
    p.waiting_restart = false;
    if (p.pid > 0) kill(p.pid, SIGTERM);
  }
  auto deadline = std::chrono::steady_clock::now() + grace;
  for (;;) {
    bool alive = false;
    for (auto& p : procs_) {
      if (p.pid <= 0) continue;
      int status = 0;
      if (waitpid(p.pid, &status, WNOHANG) == p.pid) {
        p.last_exit = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        p.pid = -1;
      } else {
        alive = true;
      }
    }
    if (!alive) return;
    if (std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(20ms);
  }
  for (auto& p : procs_) {
    if (p.pid <= 0) continue;
    spdlog::warn("{} did not stop within the grace period: SIGKILL", p.spec.role);
    kill(p.pid, SIGKILL);
    waitpid(p.pid, nullptr, 0);
    p.pid = -1;
  }
}

std::string TailFile(const std::string& path, int lines) {
  std::ifstream f(path);
  if (!f) return "";
  std::deque<std::string> last;
  for (std::string line; std::getline(f, line);) {
    last.push_back(line);
    if (static_cast<int>(last.size()) > lines) last.pop_front();
  }
  std::string out;
  for (const auto& l : last) out += l + "\n";
  return out;
}

}  // namespace aha
