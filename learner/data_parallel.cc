// Learner devices and replica threads (see data_parallel.h).
#include "learner/data_parallel.h"

#include <algorithm>
#include <set>

#include "engine/backends.h"
#ifdef AHA_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace aha {

Status BindThreadToDevice(const engine::Device& device) {
  if (device.is_cpu()) return OkStatus();
#ifdef AHA_HAVE_CUDA
  if (cudaError_t e = cudaSetDevice(device.index); e != cudaSuccess)
    return Unavailable(device.ToString() + ": cannot bind a replica thread: " + cudaGetErrorString(e));
  return OkStatus();
#else
  return Unavailable(device.ToString() + ": this build of aha has no CUDA backend");
#endif
}

namespace {

std::string Trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

}  // namespace

std::vector<std::string> SplitDeviceList(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t comma = list.find(',', start);
    out.push_back(Trim(list.substr(start, comma == std::string::npos ? std::string::npos : comma - start)));
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

Status CheckLearnerDevices(const std::vector<std::string>& devices, const std::string& what) {
  if (devices.empty()) return InvalidArgument(what + ": at least one device is needed");
  size_t cpus = 0;
  std::set<std::string> gpus;
  for (const std::string& d : devices) {
    if (d == "cpu") {
      ++cpus;
      continue;
    }
    const bool cuda = d == "cuda" || (d.starts_with("cuda:") && d.size() > 5 &&
                                      d.find_first_not_of("0123456789", 5) == std::string::npos);
    if (!cuda) return InvalidArgument(what + ": '" + d + "' is not cpu, cuda or cuda:N");
    const std::string canonical = d == "cuda" ? "cuda:0" : d;
    if (!gpus.insert(canonical).second)
      return InvalidArgument(what + ": " + canonical + " is listed twice (one replica per GPU)");
  }
  if (cpus > 0 && !gpus.empty())
    return InvalidArgument(what + ": mixes cpu and cuda devices (replicas must be all cpu or all cuda)");
  return OkStatus();
}

Result<std::vector<std::unique_ptr<engine::Backend>>> MakeLearnerBackends(const std::vector<std::string>& devices,
                                                                          const std::string& what) {
  RETURN_IF_ERROR(CheckLearnerDevices(devices, what));
  std::vector<std::unique_ptr<engine::Backend>> out;
  for (const std::string& d : devices) {
    ASSIGN_OR_RETURN(auto b, engine::MakeBackend(d));
    out.push_back(std::move(b));
  }
  return out;
}

std::vector<engine::Backend*> BackendPointers(const std::vector<std::unique_ptr<engine::Backend>>& backends) {
  std::vector<engine::Backend*> out;
  for (const auto& b : backends) out.push_back(b.get());
  return out;
}

std::vector<std::vector<size_t>> BalanceByTokens(const std::vector<int64_t>& tokens, int parts) {
  std::vector<size_t> order(tokens.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tokens[a] > tokens[b]; });
  std::vector<std::vector<size_t>> out(static_cast<size_t>(std::max(parts, 1)));
  std::vector<int64_t> load(out.size(), 0);
  for (size_t i : order) {
    const size_t p = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    out[p].push_back(i);
    load[p] += tokens[i];
  }
  for (auto& part : out) std::sort(part.begin(), part.end());
  return out;
}

Result<std::unique_ptr<ReplicaThreads>> ReplicaThreads::Start(const std::vector<engine::Device>& devices) {
  std::unique_ptr<ReplicaThreads> t(new ReplicaThreads);
  t->results_.resize(devices.size());
  for (size_t r = 0; r < devices.size(); ++r) t->workers_.emplace_back([p = t.get(), r] { p->Work(static_cast<int>(r)); });
  RETURN_IF_ERROR(t->Run([&](int r) { return BindThreadToDevice(devices[static_cast<size_t>(r)]); }));
  return t;
}

ReplicaThreads::~ReplicaThreads() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ReplicaThreads::Work(int rank) {
  uint64_t seen = 0;
  for (;;) {
    const std::function<Status(int)>* job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
    }
    Status s = (*job)(rank);
    std::lock_guard<std::mutex> lock(mu_);
    results_[static_cast<size_t>(rank)] = std::move(s);
    if (--pending_ == 0) done_cv_.notify_all();
  }
}

Status ReplicaThreads::Run(const std::function<Status(int rank)>& fn) {
  std::lock_guard<std::mutex> run(run_mu_);
  std::unique_lock<std::mutex> lock(mu_);
  job_ = &fn;
  pending_ = size();
  ++generation_;
  work_cv_.notify_all();
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  job_ = nullptr;
  for (const Status& s : results_)
    if (!s.ok()) return s;
  return OkStatus();
}

Status ReplicaThreads::RunOn(int rank, const std::function<Status()>& fn) {
  return Run([&](int r) { return r == rank ? fn() : OkStatus(); });
}

}  // namespace aha
