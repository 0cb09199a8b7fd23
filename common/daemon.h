// DaemonRuntime: what every aha daemon has in common (shared/DESIGN.md §1, §7).
//
//   - common flags (--config, --control, --metrics, --log-file, --log-level, --role-index,
//     --restarts, --ready-file),
//   - logging with process name and role,
//   - the Prometheus endpoint with the standard process metrics and the wire's malformed counter,
//   - the control socket (status with a typed body, pause, resume, stop, checkpoint),
//   - graceful shutdown on SIGTERM/SIGINT or a `stop` control request.
// Sockets bind to loopback unless an address is given explicitly.
//
// Usage in a main.cc (Create() first: it blocks SIGTERM/SIGINT before any thread exists):
//   ASSIGN runtime = DaemonRuntime::Create("replay", flags);
//   runtime->SetHooks({...});  RETURN_IF_ERROR(runtime->Start());
//   ... start the real work ...; runtime->WaitForStop(); ... tear down ...
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <zmq.hpp>

#include "common/flags.h"
#include "common/metrics.h"
#include "common/status.h"
#include "common/transport.h"
#include "common/wire.h"
#include "proto/control.capnp.h"

namespace aha {

struct DaemonFlags {
  std::string config;                          // resolved job file (YAML)
  std::string control = "tcp://127.0.0.1:0";   // control socket (port 0: any free port)
  std::string metrics = "127.0.0.1:0";         // Prometheus endpoint ("" = none)
  std::string log_file;
  std::string log_level = "info";
  int64_t role_index = 0;
  int64_t restarts = 0;
  std::string ready_file;  // written once listening: {"pid","control","metrics"} as JSON
};

void AddDaemonFlags(FlagSet& flags, DaemonFlags* out);

// What a daemon adds to the control plane. Every hook is optional; a missing checkpoint hook
// answers "not supported". Hooks run on the control thread.
struct ControlHooks {
  std::function<void(proto::ProcessStatus::Builder)> fill_status;  // the typed detail section
  std::function<uint64_t()> policy_version;
  std::function<Status()> pause;
  std::function<Status()> resume;
  std::function<Result<std::string>(const std::string& dir)> checkpoint;  // returns dir written
};

class DaemonRuntime {
 public:
  // `process` is the short name: "replay" -> binary aha-replay, metrics aha_replay_*.
  static Result<std::unique_ptr<DaemonRuntime>> Create(const std::string& process,
                                                       const DaemonFlags& flags);
  ~DaemonRuntime();

  void SetHooks(ControlHooks hooks) { hooks_ = std::move(hooks); }
  // Adds an entry (e.g. "weights" -> the bound endpoint) to the ready file; call before Start().
  void AddReadyField(const std::string& key, const std::string& value) { ready_extra_[key] = value; }
  // Binds the control socket, writes the ready file and marks the process running.
  Status Start();
  // Blocks until a stop was requested (signal or control).
  void WaitForStop();
  // Waits at most `timeout`; true when stopping.
  bool WaitForStopFor(std::chrono::milliseconds timeout);
  void RequestStop();
  bool stopping() const { return stopping_.load(); }
  bool paused() const { return paused_.load(); }

  zmq::context_t& zmq() { return zmq_; }
  MetricsServer& metrics() { return *metrics_; }
  WireStats& wire_stats() { return *wire_stats_; }
  const DaemonFlags& flags() const { return flags_; }
  std::string control_endpoint() const;
  std::string binary_name() const { return "aha-" + process_; }

 private:
  DaemonRuntime(std::string process, DaemonFlags flags);
  Status HandleControl(const proto::Envelope::Reader& request, proto::Envelope::Builder reply);

  std::string process_;
  DaemonFlags flags_;
  ControlHooks hooks_;
  std::map<std::string, std::string> ready_extra_;
  zmq::context_t zmq_;
  std::unique_ptr<MetricsServer> metrics_;
  std::unique_ptr<WireStats> wire_stats_;
  std::unique_ptr<RpcServer> control_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> paused_{false};
  std::atomic<bool> running_{false};
  std::mutex mu_;
  std::condition_variable stop_cv_;
  std::thread signal_thread_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

// Sends one control command and returns the reply (the `aha status|stop|...` client side).
Result<std::unique_ptr<DecodedEnvelope>> SendControl(zmq::context_t& context,
                                                     const std::string& endpoint,
                                                     proto::ControlCommand command,
                                                     const std::string& argument,
                                                     std::chrono::milliseconds timeout);

}  // namespace aha
