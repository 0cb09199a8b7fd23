// Sandbox: runs an untrusted program (a completion's code) with no network, the host read-only,
// a private temporary directory and hard limits, and always leaves nothing running behind.
//
// Mechanism (checked on Debian 12/13 in a container where we are root, and as a plain user):
//   fork -> child: new session; when running as root, drop to an unprivileged uid/gid of its own
//   (options.uid_base + slot, so that RLIMIT_NPROC counts only this run's processes and root-only
//   files stay unreadable; as a plain user the process budget is added to the user's current
//   thread count, and the host files the user can read stay readable); setrlimit CPU, AS (memory), NPROC, FSIZE, NOFILE, CORE=0; exec
//   bubblewrap (`bwrap`, unprivileged mode via a user namespace) with
//     --unshare-all (user, pid, net, ipc, uts, cgroup): no network, only loopback, no peers
//     --ro-bind /usr /usr (+ /bin /lib* /etc symlinks and /etc files programs need): host read-only
//     --tmpfs /tmp (size-capped), --bind <private dir> /sandbox: the only writable places
//     --die-with-parent, --new-session, --cap-drop ALL, --seccomp <bpf> (libseccomp: ptrace,
//     mount, keyctl, bpf, perf_event_open, unshare/setns, ... fail with EPERM)
//   parent: feeds stdin from a file, drains stdout/stderr with poll() and kills the whole process
//   group on wall-time or output-size breach. The program runs as pid 2 of a fresh pid namespace
//   whose init is bwrap: when bwrap dies (killed, or the program exits) the kernel kills every
//   process in the namespace, so a double-forked sleeper cannot survive.
// Memory is limited by RLIMIT_AS (address space, not RSS): language runtimes reserve address
// space, so the limit is set generously (default 1 GiB) and a MemoryError / bad_alloc /
// mmap-failure in stderr is reported as "memory".
//
// Thread-safety: Run() is safe to call from many threads at once; each call takes a free slot
// (own uid, own directory) and blocks while all `max_parallel` slots are busy.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace aha::rewardd {

struct SandboxLimits {
  double wall_seconds = 10.0;
  int cpu_seconds = 5;
  uint64_t memory_bytes = 1ull << 30;     // RLIMIT_AS
  int max_processes = 64;                 // RLIMIT_NPROC for the run's own uid
  uint64_t max_output_bytes = 1ull << 20; // stdout + stderr captured; more is a breach
  uint64_t max_file_bytes = 16ull << 20;  // RLIMIT_FSIZE: largest file it may write
  uint64_t tmpfs_bytes = 64ull << 20;     // size of its private /tmp
  bool writable_workdir = false;          // compile steps write the binary into /sandbox
};

enum class SandboxOutcome {
  kExited,       // exited by itself (see exit_code)
  kSignaled,     // killed by a signal it caused (segfault, abort)
  kWallTimeout,  // wall-time limit: the whole group was killed
  kCpuLimit,     // RLIMIT_CPU (SIGXCPU / SIGKILL from the kernel)
  kMemoryLimit,  // allocation failed under RLIMIT_AS
  kOutputLimit,  // stdout + stderr exceeded max_output_bytes: killed
  kSandboxError, // the sandbox itself could not run it
};
const char* SandboxOutcomeName(SandboxOutcome o);

struct SandboxFile {
  std::string name;  // relative path inside /sandbox, no "..", no leading '/'
  std::string content;
  bool executable = false;
};

struct SandboxRequest {
  std::vector<std::string> argv;  // argv[0] resolved inside the sandbox (PATH=/usr/bin:/bin)
  std::string stdin_data;
  SandboxLimits limits;
  std::string workdir;  // an existing directory from MakeWorkdir(); "" = a fresh empty one
};

struct SandboxResult {
  SandboxOutcome outcome = SandboxOutcome::kSandboxError;
  int exit_code = -1;
  int signal = 0;
  std::string stdout_data;
  std::string stderr_data;
  double wall_seconds = 0;
  std::string reason;  // one line for notes and logs
  bool ok() const { return outcome == SandboxOutcome::kExited && exit_code == 0; }
};

struct SandboxOptions {
  std::string bwrap_path = "/usr/bin/bwrap";
  std::string scratch_root = "/tmp";  // private dirs are created below it
  uid_t uid_base = 61000;             // root only: runs use uids uid_base .. uid_base + 1023, each
                                      // claimed host-wide by a lock file while a run uses it
  int max_parallel = 8;
  bool seccomp = true;
};

class Sandbox {
 public:
  // Fails (FailedPrecondition) when bwrap is missing or cannot create its namespaces here; the
  // message says what to install or enable.
  static Result<std::unique_ptr<Sandbox>> Create(const SandboxOptions& options);
  ~Sandbox();

  // A private directory holding `files`, owned by the sandbox user; removed by ~Workdir.
  class Workdir {
   public:
    ~Workdir();
    const std::string& path() const { return path_; }

   private:
    friend class Sandbox;
    std::string path_;
  };
  Result<std::unique_ptr<Workdir>> MakeWorkdir(const std::vector<SandboxFile>& files);

  // Runs one program. Errors are only for requests that make no sense (empty argv); everything
  // the program does, including breaking limits, is a SandboxResult.
  Result<SandboxResult> Run(const SandboxRequest& request);

  const SandboxOptions& options() const { return options_; }

 private:
  explicit Sandbox(const SandboxOptions& options);
  int AcquireSlot();
  void ReleaseSlot(int slot);
  SandboxResult RunInSlot(const SandboxRequest& request, const std::string& workdir, uid_t uid);

  SandboxOptions options_;
  bool is_root_ = false;
  int seccomp_fd_ = -1;  // memfd holding the BPF program, inherited by bwrap
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<bool> busy_;
  uint64_t next_dir_ = 0;
};

}  // namespace aha::rewardd
