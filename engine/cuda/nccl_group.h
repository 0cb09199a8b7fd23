// NcclGroup: one NCCL communicator whose every call has a deadline (DESIGN.md §1, weight
// publication). The communicator is non-blocking (ncclConfig_t.blocking = 0): init and each
// collective return at once and are polled (ncclCommGetAsyncError, cudaStreamQuery) until done or
// the deadline; past it the communicator is aborted (ncclCommAbort) and the call returns Timeout,
// so a dead peer costs the survivors one deadline, never a hang. A caller that learns sooner that a
// peer is gone (weight publication's membership, common/nccl_membership.h) passes `give_up`: it is
// asked about once a millisecond while a call waits, and true aborts the communicator at once
// (Cancelled). A group that has been aborted is spent: build a new one with the live ranks (a fresh
// id from NewId()).
//
// Put the collectives on a stream created with cudaStreamNonBlocking: a collective waiting for a
// dead peer must not hold back the legacy default stream (synchronous cudaMemcpy) until it is
// aborted. After Abort(), NCCL stops the collective's kernels; Drained() tells when the stream is
// free for reuse.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"

namespace aha::engine::cuda {

class NcclGroup {
 public:
  using Deadline = std::chrono::milliseconds;
  using GiveUp = std::function<bool()>;
  // A new ncclUniqueId, hex-encoded for control messages.
  static Result<std::string> NewId();
  // Joins the communicator `id` as `rank` of `nranks` on GPU `device`; collectives run on `stream`.
  static Result<std::unique_ptr<NcclGroup>> Join(const std::string& id, int nranks, int rank, int device,
                                                 cudaStream_t stream, Deadline deadline,
                                                 const GiveUp& give_up = nullptr);
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  bool aborted() const { return aborted_; }

  // In place: `bytes` of buf on `root` reach buf on every rank. Waits until done here.
  Status Broadcast(void* buf, size_t bytes, int root, Deadline deadline, const GiveUp& give_up = nullptr);
  // Enqueues the broadcast and returns (the caller orders later work after it on the stream, and
  // calls Wait()). For pipelining chunks.
  Status BroadcastAsync(void* buf, size_t bytes, int root, Deadline deadline, const GiveUp& give_up = nullptr);
  // Sum of n floats across ranks, in place.
  Status AllReduceSum(float* buf, size_t n, Deadline deadline);
  // Enqueues the sum and returns, as BroadcastAsync (the data-parallel learner's gradient buckets).
  Status AllReduceSumAsync(float* buf, size_t n, Deadline deadline);
  // Waits for everything enqueued on the stream; Timeout (and abort) past the deadline.
  Status Wait(Deadline deadline, const GiveUp& give_up = nullptr);
  void Abort();
  // Waits up to `deadline` for `stream` to finish its work (after an Abort, the aborted
  // collectives): ok, or Timeout while something still runs there, or the CUDA error.
  static Status Drained(cudaStream_t stream, Deadline deadline);

 private:
  NcclGroup() = default;
  Status Poll(const char* what, std::chrono::steady_clock::time_point until, const GiveUp& give_up = nullptr);
  // Asks give_up, at most once a millisecond (it may be an RPC or take a lock).
  bool GivingUp(const GiveUp& give_up, std::chrono::steady_clock::time_point* last_asked);

  struct Comm;
  std::unique_ptr<Comm> comm_;
  cudaStream_t stream_ = nullptr;
  int rank_ = 0, nranks_ = 0;
  bool aborted_ = false;
};

}  // namespace aha::engine::cuda
