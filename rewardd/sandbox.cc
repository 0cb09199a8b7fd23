#include "rewardd/sandbox.h"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

namespace aha::rewardd {
namespace {

namespace fs = std::filesystem;

// The inherited seccomp program lives at this fd in the child, so bwrap's argv is fixed before
// fork (nothing but async-signal-safe calls may run between fork and exec).
constexpr int kSeccompChildFd = 100;

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// BPF program: allow by default, refuse the syscalls that reach the kernel's attack surface or
// other processes. Network needs no rule: the net namespace has no interface but loopback.
Result<int> BuildSeccompMemfd() {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (ctx == nullptr) return Internal("seccomp_init failed");
  const char* denied[] = {
      "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
      "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
      "userfaultfd", "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module",
      "delete_module", "swapon", "swapoff", "acct", "open_by_handle_at", "name_to_handle_at",
      "iopl", "ioperm", "syslog", "fanotify_init", "mount_setattr", "move_mount", "fsopen",
      "fsmount", "open_tree", "quotactl", "lookup_dcookie", "vhangup"};
  int rc = 0;
  for (const char* name : denied) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not on this architecture
    rc |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0);
  }
  // No new user namespaces (the usual first step of kernel exploits); clone3 reports ENOSYS so
  // the C library falls back to clone(), whose flags seccomp can inspect.
  rc |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                         SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER));
  rc |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
  if (rc != 0) {
    seccomp_release(ctx);
    return Internal("seccomp_rule_add failed");
  }
  int fd = static_cast<int>(syscall(SYS_memfd_create, "aha-seccomp", 0));
  if (fd < 0) {
    seccomp_release(ctx);
    return Internal(std::string("memfd_create: ") + std::strerror(errno));
  }
  rc = seccomp_export_bpf(ctx, fd);
  seccomp_release(ctx);
  if (rc != 0) {
    close(fd);
    return Internal("seccomp_export_bpf failed");
  }
  fcntl(fd, F_SETFD, FD_CLOEXEC);  // children reopen it through /proc/self/fd
  return fd;
}

bool StderrSaysOutOfMemory(const std::string& err) {
  return err.find("MemoryError") != std::string::npos ||
         err.find("std::bad_alloc") != std::string::npos ||
         err.find("Cannot allocate memory") != std::string::npos ||
         err.find("out of memory") != std::string::npos;
}

// Threads (RLIMIT_NPROC counts threads) of the real uid `uid`, from /proc.
rlim_t CountThreadsOf(uid_t uid) {
  rlim_t n = 0;
  DIR* d = opendir("/proc");
  if (d == nullptr) return 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream f(std::string("/proc/") + e->d_name + "/status");
    std::string line;
    bool mine = false;
    while (std::getline(f, line)) {
      if (line.rfind("Uid:", 0) == 0) mine = std::strtoul(line.c_str() + 4, nullptr, 10) == uid;
      if (line.rfind("Threads:", 0) == 0 && mine) n += std::strtoul(line.c_str() + 8, nullptr, 10);
    }
  }
  closedir(d);
  return n;
}

// Kills every process of `uid` that is still alive (belt and braces after the pid namespace).
int KillStragglers(uid_t uid) {
  int killed = 0;
  DIR* d = opendir("/proc");
  if (d == nullptr) return 0;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    struct stat st;
    std::string path = std::string("/proc/") + e->d_name;
    if (stat(path.c_str(), &st) == 0 && st.st_uid == uid) {
      kill(static_cast<pid_t>(pid), SIGKILL);
      ++killed;
    }
  }
  closedir(d);
  return killed;
}

constexpr char kSetupFailed[] = "aha-sandbox: setup failed\n";

// In the forked child: report on stderr (async-signal-safe) and exit.
[[noreturn]] void SetupFailed() {
  ssize_t ignored = write(2, kSetupFailed, sizeof(kSetupFailed) - 1);
  (void)ignored;
  _exit(125);
}

}  // namespace

const char* SandboxOutcomeName(SandboxOutcome o) {
  switch (o) {
    case SandboxOutcome::kExited: return "exited";
    case SandboxOutcome::kSignaled: return "signal";
    case SandboxOutcome::kWallTimeout: return "wall_timeout";
    case SandboxOutcome::kCpuLimit: return "cpu_limit";
    case SandboxOutcome::kMemoryLimit: return "memory";
    case SandboxOutcome::kOutputLimit: return "output_limit";
    case SandboxOutcome::kSandboxError: return "sandbox_error";
  }
  return "unknown";
}

Sandbox::Sandbox(const SandboxOptions& options)
    : options_(options), busy_(static_cast<size_t>(std::max(1, options.max_parallel)), false) {}

Sandbox::~Sandbox() {
  if (seccomp_fd_ >= 0) close(seccomp_fd_);
  std::error_code ec;  // the per-process parent of the work dirs, once they are all gone
  fs::remove(options_.scratch_root + "/aha-sandbox-" + std::to_string(getpid()), ec);
}

Result<std::unique_ptr<Sandbox>> Sandbox::Create(const SandboxOptions& options) {
  if (access(options.bwrap_path.c_str(), X_OK) != 0)
    return FailedPrecondition("sandbox: " + options.bwrap_path +
                              " not found: install Debian's bubblewrap");
  std::unique_ptr<Sandbox> box(new Sandbox(options));
  box->is_root_ = geteuid() == 0;
  if (options.seccomp) {
    ASSIGN_OR_RETURN(box->seccomp_fd_, BuildSeccompMemfd());
  }
  std::error_code ec;
  fs::create_directories(options.scratch_root, ec);
  // Probe once so a host without user namespaces fails at startup, not per completion.
  SandboxRequest probe;
  probe.argv = {"/bin/true"};
  probe.limits.wall_seconds = 10;
  ASSIGN_OR_RETURN(SandboxResult r, box->Run(probe));
  if (!r.ok())
    return FailedPrecondition("sandbox: bwrap cannot create its namespaces here (" + r.reason +
                              "; stderr: " + r.stderr_data.substr(0, 200) +
                              "): enable unprivileged user namespaces "
                              "(sysctl kernel.unprivileged_userns_clone=1)");
  return box;
}

Sandbox::Workdir::~Workdir() {
  std::error_code ec;
  if (!path_.empty()) fs::remove_all(path_, ec);
}

Result<std::unique_ptr<Sandbox::Workdir>> Sandbox::MakeWorkdir(
    const std::vector<SandboxFile>& files) {
  uint64_t n;
  {
    std::lock_guard<std::mutex> lock(mu_);
    n = next_dir_++;
  }
  static std::atomic<uint64_t> salt{std::random_device{}()};
  // Parent 0711: the sandbox uids may traverse but not list it; names are unguessable.
  std::string parent = options_.scratch_root + "/aha-sandbox-" + std::to_string(getpid());
  std::error_code ec;
  fs::create_directories(parent, ec);
  chmod(parent.c_str(), 0711);
  auto dir = std::make_unique<Workdir>();
  dir->path_ = parent + "/" + std::to_string(n) + "-" + std::to_string(salt.fetch_add(0x9E3779B9));
  if (!fs::create_directory(dir->path_, ec) || ec)
    return IoError("sandbox: cannot create " + dir->path_ + ": " + ec.message());
  chmod(dir->path_.c_str(), 0777);
  for (const auto& f : files) {
    if (f.name.empty() || f.name[0] == '/' || f.name.find("..") != std::string::npos)
      return InvalidArgument("sandbox: bad file name '" + f.name + "'");
    std::string path = dir->path_ + "/" + f.name;
    std::ofstream out(path, std::ios::binary);
    out << f.content;
    if (!out) return IoError("sandbox: cannot write " + path);
    out.close();
    chmod(path.c_str(), f.executable ? 0755 : 0644);
  }
  return dir;
}

int Sandbox::AcquireSlot() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    for (size_t i = 0; i < busy_.size(); ++i) {
      if (!busy_[i]) {
        busy_[i] = true;
        return static_cast<int>(i);
      }
    }
    cv_.wait(lock);
  }
}

void Sandbox::ReleaseSlot(int slot) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    busy_[static_cast<size_t>(slot)] = false;
  }
  cv_.notify_one();
}

Result<SandboxResult> Sandbox::Run(const SandboxRequest& request) {
  if (request.argv.empty()) return InvalidArgument("sandbox: empty argv");
  std::unique_ptr<Workdir> fresh;
  std::string workdir = request.workdir;
  if (workdir.empty()) {
    ASSIGN_OR_RETURN(fresh, MakeWorkdir({}));
    workdir = fresh->path();
  }
  int slot = AcquireSlot();
  // The uid is claimed host-wide (a lock file per uid), not per process: two sandboxes on one
  // host (two aha-rewardd, or a test beside a daemon) must never share a uid, because the
  // straggler sweep after a run kills every process of its uid.
  int lock_fd = -1;
  uid_t uid = getuid();
  if (is_root_) {
    std::string lock_dir = options_.scratch_root + "/aha-sandbox-uids";
    mkdir(lock_dir.c_str(), 0700);
    for (int attempt = 0; lock_fd < 0; ++attempt) {
      for (uid_t k = 0; k < 1024 && lock_fd < 0; ++k) {
        uid_t candidate = options_.uid_base + static_cast<uid_t>((static_cast<unsigned>(slot) + k) % 1024);
        std::string path = lock_dir + "/" + std::to_string(candidate) + ".lock";
        int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) continue;
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
          lock_fd = fd;
          uid = candidate;
        } else {
          close(fd);
        }
      }
      if (lock_fd < 0) std::this_thread::sleep_for(std::chrono::milliseconds(attempt < 100 ? 10 : 100));
    }
  }
  SandboxResult r = RunInSlot(request, workdir, uid);
  if (lock_fd >= 0) close(lock_fd);  // releases the flock
  ReleaseSlot(slot);
  return r;
}

SandboxResult Sandbox::RunInSlot(const SandboxRequest& req, const std::string& workdir, uid_t uid) {
  SandboxResult result;
  const SandboxLimits& lim = req.limits;
  auto t0 = std::chrono::steady_clock::now();

  // Everything the child needs is built before fork.
  std::vector<std::string> args = {
      options_.bwrap_path, "--unshare-all", "--die-with-parent", "--new-session",
      "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
      "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
      "--ro-bind-try", "/etc/alternatives", "/etc/alternatives",
      "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
      "--dev", "/dev", "--proc", "/proc",
      "--size", std::to_string(lim.tmpfs_bytes), "--tmpfs", "/tmp",
      lim.writable_workdir ? "--bind" : "--ro-bind", workdir, "/sandbox",
      "--remount-ro", "/",  // the sandbox's own root too: only /tmp and a compile's /sandbox are writable
      "--chdir", "/sandbox", "--hostname", "sandbox", "--clearenv",
      "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
      "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
      "--cap-drop", "ALL"};
  if (seccomp_fd_ >= 0) {
    args.push_back("--seccomp");
    args.push_back(std::to_string(kSeccompChildFd));
  }
  args.push_back("--");
  for (const auto& a : req.argv) args.push_back(a);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  char envp0[] = "PATH=/usr/bin:/bin";
  char* envp[] = {envp0, nullptr};
  std::string seccomp_path = "/proc/self/fd/" + std::to_string(seccomp_fd_);

  // stdin from a file: no pipe to keep fed, no deadlock when the program never reads.
  std::string stdin_path = workdir + "/.stdin-" + std::to_string(uid);
  {
    std::ofstream in(stdin_path, std::ios::binary);
    in << req.stdin_data;
  }
  int stdin_fd = open(stdin_path.c_str(), O_RDONLY | O_CLOEXEC);
  unlink(stdin_path.c_str());
  int out_pipe[2], err_pipe[2];
  if (stdin_fd < 0 || pipe2(out_pipe, O_CLOEXEC) != 0) {
    if (stdin_fd >= 0) close(stdin_fd);
    result.reason = std::string("pipe/open: ") + std::strerror(errno);
    return result;
  }
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    close(stdin_fd);
    close(out_pipe[0]);
    close(out_pipe[1]);
    result.reason = std::string("pipe: ") + std::strerror(errno);
    return result;
  }
  bool drop = is_root_;
  // RLIMIT_NPROC counts every thread of the real uid. As root each run has a uid of its own; as a
  // plain user the budget sits on top of what the user already runs (approximate under races).
  rlim_t nproc = static_cast<rlim_t>(lim.max_processes) + 2;  // bwrap itself takes 2
  if (!drop) nproc += CountThreadsOf(getuid());
  int seccomp_fd = seccomp_fd_;

  pid_t pid = fork();
  if (pid == 0) {
    // Child: async-signal-safe calls only.
    setsid();
    dup2(stdin_fd, 0);
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    if (seccomp_fd >= 0) {
      int f = open(seccomp_path.c_str(), O_RDONLY);
      if (f < 0 || dup2(f, kSeccompChildFd) < 0) SetupFailed();
    }
    syscall(SYS_close_range, 3, kSeccompChildFd - 1, 0);
    syscall(SYS_close_range, kSeccompChildFd + 1, ~0U, 0);
    if (drop) {
      if (setgroups(0, nullptr) != 0 || setresgid(uid, uid, uid) != 0 ||
          setresuid(uid, uid, uid) != 0)
        SetupFailed();
    }
    auto set = [](int what, rlim_t soft, rlim_t hard) {
      struct rlimit rl = {soft, hard};
      setrlimit(what, &rl);
    };
    set(RLIMIT_CPU, static_cast<rlim_t>(lim.cpu_seconds), static_cast<rlim_t>(lim.cpu_seconds) + 1);
    set(RLIMIT_AS, lim.memory_bytes, lim.memory_bytes);
    set(RLIMIT_NPROC, nproc, nproc);
    set(RLIMIT_FSIZE, lim.max_file_bytes, lim.max_file_bytes);
    set(RLIMIT_NOFILE, 256, 256);
    set(RLIMIT_CORE, 0, 0);
    execve(argv[0], argv.data(), envp);
    SetupFailed();
  }
  close(stdin_fd);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (pid < 0) {
    close(out_pipe[0]);
    close(err_pipe[0]);
    result.reason = std::string("fork: ") + std::strerror(errno);
    return result;
  }

  bool wall_breach = false, output_breach = false;
  uint64_t total = 0;
  struct pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.stdout_data, &result.stderr_data};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0) {
    double left = lim.wall_seconds - SecondsSince(t0);
    if (left <= 0) {
      wall_breach = true;
      break;
    }
    int rc = poll(fds, 2, static_cast<int>(std::min(left, 1.0) * 1000) + 1);
    if (rc < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = read(fds[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
        continue;
      }
      total += static_cast<uint64_t>(n);
      uint64_t room = lim.max_output_bytes - std::min<uint64_t>(lim.max_output_bytes,
                                                                total - static_cast<uint64_t>(n));
      sinks[i]->append(buf, static_cast<size_t>(std::min<uint64_t>(room, static_cast<uint64_t>(n))));
      if (total > lim.max_output_bytes) output_breach = true;
    }
    if (output_breach) break;
  }
  if (wall_breach || output_breach) kill(-pid, SIGKILL);
  for (auto& f : fds)
    if (f.fd >= 0) close(f.fd);
  // Once the pipes are closed the program may still run (it closed its stdout): keep the wall
  // deadline while waiting for it.
  int status = 0;
  struct rusage usage = {};
  while (true) {
    pid_t w = wait4(pid, &status, WNOHANG, &usage);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    if (SecondsSince(t0) > lim.wall_seconds && !wall_breach && !output_breach) {
      wall_breach = true;
      kill(-pid, SIGKILL);
    }
    usleep(2000);
  }
  if (drop) KillStragglers(uid);
  result.wall_seconds = SecondsSince(t0);
  // wait4 reports bwrap plus its waited-for descendants: the program's CPU time.
  double cpu_seconds = static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                       1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);

  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  // bwrap reports a program killed by signal s as exit code 128 + s.
  int sig = code > 128 && code < 128 + 65 ? code - 128 : 0;
  if (output_breach) {
    result.outcome = SandboxOutcome::kOutputLimit;
    result.reason = "output over " + std::to_string(lim.max_output_bytes) + " bytes";
  } else if (wall_breach) {
    result.outcome = SandboxOutcome::kWallTimeout;
    result.reason = "wall time over " + std::to_string(lim.wall_seconds) + " s";
  } else if (result.stderr_data.rfind("aha-sandbox:", 0) == 0 ||
             (code == 1 && result.stderr_data.rfind("bwrap: ", 0) == 0)) {
    result.outcome = SandboxOutcome::kSandboxError;
    result.reason = "sandbox setup failed: " + result.stderr_data.substr(0, 160);
    while (!result.reason.empty() && result.reason.back() == '\n') result.reason.pop_back();
  } else if (sig == SIGXCPU || (sig == SIGKILL && cpu_seconds >= lim.cpu_seconds)) {
    result.outcome = SandboxOutcome::kCpuLimit;
    result.signal = sig;
    result.reason = "cpu time over " + std::to_string(lim.cpu_seconds) + " s";
  } else if (sig != 0) {
    result.outcome = StderrSaysOutOfMemory(result.stderr_data) ? SandboxOutcome::kMemoryLimit
                                                               : SandboxOutcome::kSignaled;
    result.signal = sig;
    result.exit_code = code;
    result.reason = result.outcome == SandboxOutcome::kMemoryLimit
                        ? "memory limit"
                        : std::string("killed by signal ") + strsignal(sig);
  } else {
    result.exit_code = code;
    if (code != 0 && StderrSaysOutOfMemory(result.stderr_data)) {
      result.outcome = SandboxOutcome::kMemoryLimit;
      result.reason = "memory limit";
    } else {
      result.outcome = SandboxOutcome::kExited;
      result.reason = code == 0 ? "ok" : "exit code " + std::to_string(code);
    }
  }
  return result;
}

}  // namespace aha::rewardd
