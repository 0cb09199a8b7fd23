#include "common/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

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
    try {
      m->exposer_ = std::make_unique<prometheus::Exposer>(options.bind, 2);
    } catch (const std::exception& e) {
      return Unavailable("cannot serve metrics on " + options.bind + ": " + e.what());
    }
    m->exposer_->RegisterCollectable(m->registry_);
    m->exposer_->RegisterCollectable(m->uptime_);
  }
  return m;
}

int MetricsServer::port() const {
  if (!exposer_) return 0;
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

prometheus::Histogram::BucketBoundaries ExponentialBuckets(double start, double factor, int count) {
  prometheus::Histogram::BucketBoundaries b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

}  // namespace aha
