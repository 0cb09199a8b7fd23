#include "common/metrics.h"

#include <netdb.h>
#include <poll.h>
#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <thread>

#include "common/version.h"

namespace aha {
namespace {

// Computes uptime at scrape time, so there is no timer thread to keep alive.
class UptimeCollector : public prometheus::Collectable {
 public:
  explicit UptimeCollector(std::string name) : name_(std::move(name)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily family;
    family.name = name_;
    family.help = "Seconds since this process started";
    family.type = prometheus::MetricType::Gauge;
    prometheus::ClientMetric metric;
    metric.gauge.value =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    family.metric.push_back(metric);
    return {family};
  }

 private:
  std::string name_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace

// GET /metrics on one listening socket, served by one thread, one connection at a time (scrapes
// are seconds apart). Every other request gets 404; a client that sends nothing for 2 s is dropped.
struct MetricsServer::Http {
  int listen_fd = -1, stop_fd = -1, port = 0;
  std::thread thread;
  std::vector<std::shared_ptr<prometheus::Collectable>> sources;

  ~Http() {
    if (thread.joinable()) {
      uint64_t one = 1;
      (void)!write(stop_fd, &one, sizeof one);
      thread.join();
    }
    if (listen_fd >= 0) close(listen_fd);
    if (stop_fd >= 0) close(stop_fd);
  }

  static Result<std::unique_ptr<Http>> Bind(const std::string& bind) {
    const size_t colon = bind.rfind(':');
    if (colon == std::string::npos) return InvalidArgument("metrics address '" + bind + "': expected host:port");
    std::string host = bind.substr(0, colon), port = bind.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* res = nullptr;
    if (int e = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res); e != 0)
      return Unavailable("cannot serve metrics on " + bind + ": " + gai_strerror(e));
    auto h = std::make_unique<Http>();
    std::string error = "no address";
    for (addrinfo* a = res; a; a = a->ai_next) {
      int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      int yes = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
      if (bind_fd(fd, a) && listen(fd, 16) == 0) {
        h->listen_fd = fd;
        break;
      }
      error = std::strerror(errno);
      close(fd);
    }
    freeaddrinfo(res);
    if (h->listen_fd < 0) return Unavailable("cannot serve metrics on " + bind + ": " + error);
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    getsockname(h->listen_fd, reinterpret_cast<sockaddr*>(&ss), &len);
    h->port = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                       : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    h->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (h->stop_fd < 0) return Unavailable(std::string("metrics: eventfd: ") + std::strerror(errno));
    return h;
  }

  static bool bind_fd(int fd, const addrinfo* a) { return ::bind(fd, a->ai_addr, a->ai_addrlen) == 0; }

  void Start() {
    thread = std::thread([this] { Loop(); });
  }

  void Loop() {
    for (;;) {
      pollfd fds[2] = {{listen_fd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents) return;
      if (!(fds[0].revents & POLLIN)) continue;
      int c = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      Serve(c);
      close(c);
    }
  }

  void Serve(int c) {
    std::string req;
    char buf[2048];
    while (req.find("\r\n\r\n") == std::string::npos && req.size() < 16384) {
      pollfd p{c, POLLIN, 0};
      if (poll(&p, 1, 2000) <= 0) return;
      ssize_t n = read(c, buf, sizeof buf);
      if (n <= 0) return;
      req.append(buf, static_cast<size_t>(n));
    }
    std::string status = "200 OK", body;
    const bool metrics = req.rfind("GET /metrics ", 0) == 0 || req.rfind("GET /metrics?", 0) == 0;
    if (metrics) {
      std::vector<prometheus::MetricFamily> families;
      for (const auto& s : sources) {
        auto f = s->Collect();
        families.insert(families.end(), std::make_move_iterator(f.begin()), std::make_move_iterator(f.end()));
      }
      std::ostringstream out;
      prometheus::TextSerializer().Serialize(out, families);
      body = out.str();
    } else {
      status = "404 Not Found";
      body = "aha serves /metrics only\n";
    }
    std::string head = "HTTP/1.1 " + status + "\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" +
                       "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n";
    std::string all = head + body;
    size_t off = 0;
    while (off < all.size()) {
      ssize_t n = send(c, all.data() + off, all.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }
};

MetricsServer::MetricsServer(const MetricsOptions& options)
    : options_(options), registry_(std::make_shared<prometheus::Registry>()) {}

MetricsServer::~MetricsServer() = default;

Result<std::unique_ptr<MetricsServer>> MetricsServer::Create(const MetricsOptions& options) {
  if (options.process.empty()) return InvalidArgument("metrics: process name is empty");
  std::unique_ptr<MetricsServer> m(new MetricsServer(options));
  const std::string prefix = m->prefix();
  prometheus::BuildGauge()
      .Name(prefix + "build_info")
      .Help("Build version and git revision of this binary")
      .Register(*m->registry_)
      .Add({{"version", kAhaVersion}, {"revision", kAhaRevision},
            {"role", std::to_string(options.role_index)}})
      .Set(1);
  prometheus::BuildCounter()
      .Name(prefix + "restarts_total")
      .Help("Times the supervisor restarted this role")
      .Register(*m->registry_)
      .Add({})
      .Increment(static_cast<double>(options.restarts));
  m->uptime_ = std::make_shared<UptimeCollector>(prefix + "uptime_seconds");
  if (!options.bind.empty()) {
    ASSIGN_OR_RETURN(m->http_, Http::Bind(options.bind));
    m->http_->sources = {m->registry_, m->uptime_};
    m->http_->Start();
  }
  return m;
}

int MetricsServer::port() const { return http_ ? http_->port : 0; }

prometheus::Histogram::BucketBoundaries ExponentialBuckets(double start, double factor, int count) {
  prometheus::Histogram::BucketBoundaries b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

}  // namespace aha
