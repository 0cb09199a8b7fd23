// GradReducer: sums the data-parallel replicas' gradients in place, bucket by bucket, so that after
// Finish() every replica's flat gradient buffer holds the sum over all replicas (DESIGN.md §4).
//
// Every replica's buffer has the same layout (the model's param_table) and n floats. It is cut into
// buckets of bucket_floats from its END: bucket 0 is [n - B, n), bucket 1 [n - 2B, n - B), ..., the
// last one starts at 0. That is the order in which the backward pass finishes parameters (final
// norm and lm-head, last layer, ..., embedding; Transformer::Backward's `ready`), so a replica hands
// a bucket over as soon as its last micro-batch's backward is past it, and the reduction of the
// late layers runs while the early layers' backward still computes.
//
// Two implementations, chosen by Create() from the replicas' devices:
//   cpu  a host-side sum: each bucket is a rendezvous of all ranks; the last to arrive adds the R
//        buffers in rank order (deterministic) and writes the sum back into every one.
//   cuda NCCL all-reduce (sum, f32) on a per-rank stream that waits for the compute stream's
//        progress with an event; every call has a deadline (NcclGroup).
// Both give every rank the same bits, so replicas that then run the same clipping and AdamW keep
// identical weights.
//
// Threading: the per-rank calls (Attach, GradsReady, Finish) come from that rank's replica thread
// (ReplicaThreads); ranks run independently and reduce buckets in the same order. Attach must run
// on every rank at once (NCCL's communicator forms only when all ranks join).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <vector>

#include "common/status.h"
#include "engine/backend.h"

namespace aha {

class GradReducer {
 public:
  // How long a rank waits for its peers at one reduction: they are finishing their share of the
  // same step's backward, which the batch split keeps balanced, so minutes mean a hang.
  static constexpr std::chrono::milliseconds kDeadline{std::chrono::minutes(10)};

  // A reducer for replicas on `backends` (all cpu or all cuda; cuda needs a build with NCCL) whose
  // gradient buffers hold n floats, in buckets of about bucket_bytes (at least one float).
  static Result<std::unique_ptr<GradReducer>> Create(const std::vector<engine::Backend*>& backends, size_t n,
                                                     size_t bucket_bytes);
  virtual ~GradReducer() = default;

  int ranks() const { return static_cast<int>(next_.size()); }
  size_t buckets() const { return (n_ + bucket_floats_ - 1) / bucket_floats_; }
  // Binds `rank` to its gradient buffer (n floats on its device).
  virtual Status Attach(int rank, float* grads) = 0;
  // Rank's gradients [begin, n) are final (their ops enqueued on its backend): starts reducing every
  // bucket inside that has not started yet. The host reducer blocks until all ranks reach a bucket.
  Status GradsReady(int rank, size_t begin);
  // Starts the buckets left and returns once rank's buffer holds the sum; the next step starts
  // again at bucket 0. Each rank calls it once per step, also when its share of the batch is empty.
  Status Finish(int rank);

 protected:
  GradReducer(int ranks, size_t n, size_t bucket_floats) : n_(n), bucket_floats_(bucket_floats), next_(ranks, 0) {}
  // Starts the reduction of [begin, end) of every rank's buffer (rank's part of it).
  virtual Status StartBucket(int rank, size_t begin, size_t end) = 0;
  // Waits until every bucket rank started is reduced into its buffer.
  virtual Status WaitAll(int rank) = 0;

  const size_t n_, bucket_floats_;

 private:
  std::vector<size_t> next_;  // per rank: the next bucket to start (touched only by that rank's thread)
};

}  // namespace aha
