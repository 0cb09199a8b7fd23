// Supervisor: runs the job's daemons as local child processes and keeps them alive.
//
// Each process has a role name ("replay", "actor-0", ...), a command line, a log file (stdout and
// stderr appended) and a ready file. A process that exits with a non-zero code or dies by a signal
// is restarted after a back-off (0.5 s, 1 s, 2 s, ... capped at 8 s) with `--restarts N` appended,
// until it has been restarted `max_restarts` times; then Poll() reports the failure. A process
// that exits 0 is done and is not restarted. Stop() sends SIGTERM to every live process, waits up
// to `grace`, then SIGKILLs what is left, so no process outlives the supervisor.
// Not thread-safe: one thread drives it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"

namespace aha {

struct ProcessSpec {
  std::string role;               // unique: replay, rewardd, learner, actor-0, ...
  std::vector<std::string> argv;  // argv[0] is the binary path
  std::string log_file;
  std::string ready_file;         // the daemon's --ready-file (deleted before each start)
  // Extra arguments for a restart (e.g. the learner's --resume).
  std::vector<std::string> restart_args;
};

struct ProcessState {
  ProcessSpec spec;
  pid_t pid = -1;
  int restarts = 0;
  bool done = false;        // exited 0
  bool failed = false;      // gave up on it
  int last_exit = 0;        // exit code, or 128 + signal
  std::chrono::steady_clock::time_point restart_at{};
  bool waiting_restart = false;
};

class Supervisor {
 public:
  explicit Supervisor(int max_restarts = 5) : max_restarts_(max_restarts) {}
  ~Supervisor();
  // Starts the process; Unavailable when it cannot be spawned.
  Status Start(ProcessSpec spec);
  // Waits until the process's ready file exists (or it died); Timeout after `timeout`.
  Status WaitReady(const std::string& role, std::chrono::milliseconds timeout);
  // Reaps exits and performs due restarts. Returns a non-ok Status naming the role once a process
  // failed for good (the caller then stops the run).
  Status Poll();
  const ProcessState* Find(const std::string& role) const;
  const std::vector<ProcessState>& processes() const { return procs_; }
  // SIGTERM to every live process, SIGKILL after `grace`. Idempotent.
  void Stop(std::chrono::milliseconds grace = std::chrono::milliseconds(10000));
  // Sends a signal to one role (tests and fault injection).
  Status Kill(const std::string& role, int signal);
  // Called with (role, exit code) whenever a process exits.
  std::function<void(const std::string&, int)> on_exit;

 private:
  Status Spawn(ProcessState& p, bool restart);
  int max_restarts_;
  std::vector<ProcessState> procs_;
};

// The last `lines` lines of a file ("" when missing).
std::string TailFile(const std::string& path, int lines);

}  // namespace aha
