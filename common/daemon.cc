#include "common/daemon.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <fstream>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/log.h"
#include "common/version.h"

namespace aha {

void AddDaemonFlags(FlagSet& flags, DaemonFlags* out) {
  flags.String("config", &out->config, "job file (YAML)");
  flags.String("control", &out->control, "control socket to bind (default tcp://127.0.0.1:0)");
  flags.String("metrics", &out->metrics, "Prometheus endpoint host:port (default 127.0.0.1:0; '' = off)");
  flags.String("log-file", &out->log_file, "also log to this file");
  flags.String("log-level", &out->log_level, "trace|debug|info|warn|error (default info)");
  flags.Int("role-index", &out->role_index, "index of this process within its role (actor 0, 1, ...)");
  flags.Int("restarts", &out->restarts, "times the supervisor restarted this role (for metrics)");
  flags.String("ready-file", &out->ready_file, "write {pid, control, metrics} as JSON here once listening");
}

DaemonRuntime::DaemonRuntime(std::string process, DaemonFlags flags)
    : process_(std::move(process)), flags_(std::move(flags)) {}

Result<std::unique_ptr<DaemonRuntime>> DaemonRuntime::Create(const std::string& process,
                                                             const DaemonFlags& flags) {
  // Signals go to the signal thread only: block them before any other thread exists.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  LogOptions log;
  log.process = "aha-" + process;
  log.role_index = static_cast<int>(flags.role_index);
  log.file = flags.log_file;
  log.level = flags.log_level;
  RETURN_IF_ERROR(InitLogging(log));

  std::unique_ptr<DaemonRuntime> rt(new DaemonRuntime(process, flags));
  MetricsOptions m;
  m.process = process;
  m.role_index = static_cast<int>(flags.role_index);
  m.bind = flags.metrics;
  m.restarts = flags.restarts;
  ASSIGN_OR_RETURN(rt->metrics_, MetricsServer::Create(m));
  rt->wire_stats_ = std::make_unique<WireStats>(&rt->metrics_->registry());

  rt->signal_thread_ = std::thread([p = rt.get(), set] {
    while (!p->stopping_) {
      timespec ts{0, 200 * 1000 * 1000};
      int sig = sigtimedwait(&set, nullptr, &ts);
      if (sig == SIGTERM || sig == SIGINT) {
        spdlog::info("received {}, shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        p->RequestStop();
      }
    }
  });
  return rt;
}

DaemonRuntime::~DaemonRuntime() {
  RequestStop();
  if (control_) control_->Close();
  if (signal_thread_.joinable()) signal_thread_.join();
}

Status DaemonRuntime::Start() {
  RpcServerOptions o;
  o.endpoint = flags_.control;
  o.name = binary_name();
  o.accepts = BodyKinds{proto::Envelope::Body::CONTROL_REQUEST};
  o.stats = wire_stats_.get();
  o.handler = [this](const proto::Envelope::Reader& req, proto::Envelope::Builder reply) {
    return HandleControl(req, reply);
  };
  ASSIGN_OR_RETURN(control_, RpcServer::Create(zmq_, std::move(o)));
  running_ = true;
  if (!flags_.ready_file.empty()) {
    nlohmann::json j = {{"pid", getpid()},
                        {"control", control_->bound_endpoint()},
                        {"metrics", metrics_->port() ? "127.0.0.1:" + std::to_string(metrics_->port()) : ""}};
    for (const auto& [k, v] : ready_extra_) j[k] = v;
    std::string tmp = flags_.ready_file + ".tmp";
    {
      std::ofstream f(tmp);
      if (!f) return IoError("cannot write ready file " + flags_.ready_file);
      f << j.dump() << "\n";
    }
    if (std::rename(tmp.c_str(), flags_.ready_file.c_str()) != 0)
      return IoError("cannot write ready file " + flags_.ready_file);
  }
  spdlog::info("{} {} ({}) control {} metrics :{}", binary_name(), kAhaVersion, kAhaRevision,
               control_->bound_endpoint(), metrics_->port());
  return OkStatus();
}

std::string DaemonRuntime::control_endpoint() const {
  return control_ ? control_->bound_endpoint() : "";
}

void DaemonRuntime::RequestStop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
}

void DaemonRuntime::WaitForStop() {
  std::unique_lock<std::mutex> lock(mu_);
  stop_cv_.wait(lock, [&] { return stopping_.load(); });
}

bool DaemonRuntime::WaitForStopFor(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return stop_cv_.wait_for(lock, timeout, [&] { return stopping_.load(); });
}

Status DaemonRuntime::HandleControl(const proto::Envelope::Reader& request,
                                    proto::Envelope::Builder reply) {
  auto req = request.getBody().getControlRequest();
  auto out = reply.getBody().initControlReply();
  out.setOk(true);
  Status s;
  switch (req.getCommand()) {
    case proto::ControlCommand::STATUS:
      break;
    case proto::ControlCommand::PAUSE:
      if (hooks_.pause) s = hooks_.pause();
      if (s.ok()) paused_ = true;
      break;
    case proto::ControlCommand::RESUME:
      if (hooks_.resume) s = hooks_.resume();
      if (s.ok()) paused_ = false;
      break;
    case proto::ControlCommand::STOP:
      spdlog::info("stop requested over the control socket");
      RequestStop();
      break;
    case proto::ControlCommand::CHECKPOINT:
      if (!hooks_.checkpoint) {
        s = Unimplemented(binary_name() + " has no state to checkpoint");
      } else {
        auto dir = hooks_.checkpoint(req.getArgument());
        if (dir.ok()) out.setResult(*dir);
        else s = dir.status();
      }
      break;
  }
  if (!s.ok()) {
    out.setOk(false);
    out.setError(s.ToString());
  }
  auto st = out.initStatus();
  st.setProcess(binary_name());
  st.setRoleIndex(static_cast<uint32_t>(flags_.role_index));
  st.setPid(static_cast<uint32_t>(getpid()));
  st.setState(stopping_   ? proto::ProcessState::STOPPING
              : paused_   ? proto::ProcessState::PAUSED
              : running_  ? proto::ProcessState::RUNNING
                          : proto::ProcessState::STARTING);
  st.setUptimeSeconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  st.setVersion(std::string(kAhaVersion) + " (" + kAhaRevision + ")");
  if (hooks_.policy_version) st.setPolicyVersion(hooks_.policy_version());
  st.getDetail().setNone();
  if (hooks_.fill_status) hooks_.fill_status(st);
  return OkStatus();
}

Result<std::unique_ptr<DecodedEnvelope>> SendControl(zmq::context_t& context,
                                                     const std::string& endpoint,
                                                     proto::ControlCommand command,
                                                     const std::string& argument,
                                                     std::chrono::milliseconds timeout) {
  RpcClientOptions o;
  o.endpoint = endpoint;
  o.name = "aha";
  ASSIGN_OR_RETURN(auto client, RpcClient::Create(context, o));
  capnp::MallocMessageBuilder message;
  auto env = InitEnvelope(message, "aha");
  auto req = env.getBody().initControlRequest();
  req.setCommand(command);
  req.setArgument(argument);
  ASSIGN_OR_RETURN(auto reply, client->Call(message, timeout));
  if (reply->which() != proto::Envelope::Body::CONTROL_REPLY)
    return InvalidArgument(endpoint + " answered with something other than a control reply");
  return reply;
}

}  // namespace aha
