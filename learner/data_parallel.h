// Data-parallel plumbing of the learner (DESIGN.md §4): which devices it may train on, and the
// threads that drive one model replica per device.
//
// A learner trains R replicas of the policy, one per learner device, inside one process. Devices
// are either all `cpu` (one CPU replica per entry: the same host, listed again to run the
// data-parallel code path on a machine without GPUs, which the tests do) or distinct `cuda:N`.
// Every replica's work runs on its own ReplicaThreads worker, bound to that replica's device for
// the worker's whole life: CUDA launches go to the calling thread's current device, so a replica's
// ops, allocations and NCCL calls must all come from a thread whose current device is its own.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "engine/backend.h"

namespace aha {

// "cuda:0,cuda:1" -> {"cuda:0", "cuda:1"} (spaces around entries dropped, empty entries kept so
// that CheckLearnerDevices reports them).
std::vector<std::string> SplitDeviceList(const std::string& list);

// Ok when `devices` is a list the learner can train on: not empty, each cpu, cuda or cuda:N, and
// either all cpu or all cuda with no GPU twice ("cuda" is cuda:0). Otherwise InvalidArgument, one
// line that starts with `what` (the key or flag the list came from, e.g. topology.learner_devices).
Status CheckLearnerDevices(const std::vector<std::string>& devices, const std::string& what);

// CheckLearnerDevices, then one backend per device (MakeBackend), in list order.
Result<std::vector<std::unique_ptr<engine::Backend>>> MakeLearnerBackends(const std::vector<std::string>& devices,
                                                                          const std::string& what);
std::vector<engine::Backend*> BackendPointers(const std::vector<std::unique_ptr<engine::Backend>>& backends);

// Makes `device` the calling thread's current device (cudaSetDevice; nothing for cpu).
Status BindThreadToDevice(const engine::Device& device);

// Splits items (the batch's groups) of the given token counts into `parts` lists with balanced
// token sums: largest first, each to the part with the fewest tokens so far (ties: the lower part).
// Deterministic; each list in ascending index order; the heaviest part exceeds the lightest by at
// most the largest item. O(items * (log items + parts)).
std::vector<std::vector<size_t>> BalanceByTokens(const std::vector<int64_t>& tokens, int parts);

// One worker thread per replica. Run(fn) runs fn(rank) on every worker at once and returns when all
// are done; RunOn(rank, fn) runs fn on one. Thread-safe: concurrent calls are served one at a time.
// Cost: two thread hand-offs per call.
class ReplicaThreads {
 public:
  // Starts a worker per device and binds it to the device (cudaSetDevice for cuda:N); Unavailable
  // when a binding fails.
  static Result<std::unique_ptr<ReplicaThreads>> Start(const std::vector<engine::Device>& devices);
  ~ReplicaThreads();
  ReplicaThreads(const ReplicaThreads&) = delete;
  ReplicaThreads& operator=(const ReplicaThreads&) = delete;

  int size() const { return static_cast<int>(workers_.size()); }
  // Every rank's status is collected; the first failure by rank is returned.
  Status Run(const std::function<Status(int rank)>& fn);
  Status RunOn(int rank, const std::function<Status()>& fn);

 private:
  ReplicaThreads() = default;
  void Work(int rank);

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one Run at a time
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  const std::function<Status(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  std::vector<Status> results_;
};

}  // namespace aha
