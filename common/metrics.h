// Metrics: a prometheus-cpp registry served over HTTP, with aha's standard process metrics.
//
// Names follow shared/DESIGN.md §7: `aha_<process>_<what>[_<unit>]`, units in the name (_seconds,
// _bytes, _total). Every process exports
//   aha_<process>_build_info{version,revision,role}   1
//   aha_<process>_uptime_seconds                      refreshed on every scrape
//   aha_<process>_restarts_total                      restarts of this role seen by the supervisor
// and the transport adds aha_malformed_messages_total{reason}.
// Thread-safety: prometheus-cpp metrics are safe to update from any thread.
//
// The HTTP endpoint is aha's own (one thread, GET /metrics in the text exposition format), not
// prometheus-cpp's civetweb exposer: civetweb runs its workers on fixed 100 KB stacks, glibc carves
// every thread's static TLS out of that stack, and in a process that also loads the CUDA runtime
// and OpenBLAS the rest was too small: the first scrape overflowed it (SIGSEGV in vsnprintf).
#pragma once

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <chrono>
#include <memory>
#include <string>

#include "common/status.h"

namespace aha {

struct MetricsOptions {
  std::string process;      // "replay" for aha-replay: the name part of aha_<process>_...
  int role_index = 0;
  std::string bind;         // "127.0.0.1:9100"; "" = registry only, no HTTP endpoint
  int64_t restarts = 0;     // the supervisor passes how often this role has been restarted
};

class MetricsServer {
 public:
  // Fails (Unavailable) when the HTTP endpoint cannot be bound, e.g. the port is in use.
  static Result<std::unique_ptr<MetricsServer>> Create(const MetricsOptions& options);
  ~MetricsServer();

  prometheus::Registry& registry() { return *registry_; }
  std::shared_ptr<prometheus::Registry> shared_registry() { return registry_; }
  // "aha_replay_" for process "replay".
  std::string prefix() const { return "aha_" + options_.process + "_"; }
  // The port actually bound (useful with port 0); 0 without an endpoint.
  int port() const;

 private:
  explicit MetricsServer(const MetricsOptions& options);
  MetricsOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> uptime_;
  struct Http;
  std::unique_ptr<Http> http_;
};

// Exponential histogram buckets: start, start*factor, ... (count of them).
prometheus::Histogram::BucketBoundaries ExponentialBuckets(double start, double factor, int count);

}  // namespace aha
