// NcclGroup: one NCCL communicator whose every call has a deadline (DESIGN.md §1, weight
// publication). The communicator is non-blocking (ncclConfig_t.blocking = 0): init and each
// collective return at once and are polled (ncclCommGetAsyncError, cudaStreamQuery) until done or
// the deadline; past it the communicator is aborted (ncclCommAbort) and the call returns Timeout,
// so a dead peer costs the survivors one deadline, never a hang. A group that has been aborted is
// spent: build a new one with the live ranks (a fresh id from NewId()).
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "common/status.h"

namespace aha::engine::cuda {

class NcclGroup {
 public:
  using Deadline = std::chrono::milliseconds;
  // A new ncclUniqueId, hex-encoded for control messages.
  static Result<std::string> NewId();
  // Joins the communicator `id` as `rank` of `nranks` on GPU `device`; collectives run on `stream`.
  static Result<std::unique_ptr<NcclGroup>> Join(const std::string& id, int nranks, int rank, int device,
                                                 cudaStream_t stream, Deadline deadline);
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  bool aborted() const { return aborted_; }

  // In place: `bytes` of buf on `root` reach buf on every rank. Waits until done here.
  Status Broadcast(void* buf, size_t bytes, int root, Deadline deadline);
  // Enqueues the broadcast and returns (the caller orders later work after it on the stream, and
  // calls Wait()). For pipelining chunks.
  Status BroadcastAsync(void* buf, size_t bytes, int root, Deadline deadline);
  // Sum of n floats across ranks, in place.
  Status AllReduceSum(float* buf, size_t n, Deadline deadline);
  // Waits for everything enqueued on the stream; Timeout (and abort) past the deadline.
  Status Wait(Deadline deadline);
  void Abort();

 private:
  NcclGroup() = default;
  Status Poll(const char* what, std::chrono::steady_clock::time_point until);

  struct Comm;
  std::unique_ptr<Comm> comm_;
  cudaStream_t stream_ = nullptr;
  int rank_ = 0, nranks_ = 0;
  bool aborted_ = false;
};

}  // namespace aha::engine::cuda
