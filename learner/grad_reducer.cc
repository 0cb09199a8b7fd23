// GradReducer: bucket bookkeeping, the host-side sum, and the NCCL all-reduce (see grad_reducer.h).
#include "learner/grad_reducer.h"

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>

#include "common/check.h"
#ifdef AHA_HAVE_NCCL
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/nccl_group.h"
#endif

namespace aha {

Status GradReducer::GradsReady(int rank, size_t begin) {
  size_t& next = next_[static_cast<size_t>(rank)];
  while (next < buckets()) {
    const size_t end = n_ - std::min(n_, next * bucket_floats_);
    const size_t start = n_ - std::min(n_, (next + 1) * bucket_floats_);
    if (start < begin) break;  // part of this bucket is still being computed
    RETURN_IF_ERROR(StartBucket(rank, start, end));
    ++next;
  }
  return OkStatus();
}

Status GradReducer::Finish(int rank) {
  Status s = GradsReady(rank, 0);
  if (s.ok()) s = WaitAll(rank);
  next_[static_cast<size_t>(rank)] = 0;
  return s;
}

namespace {

// CPU replicas: a rendezvous per bucket. Ranks arrive in any order; the last one adds the buffers
// in rank order, so the sum does not depend on thread timing.
class HostGradReducer final : public GradReducer {
 public:
  HostGradReducer(int ranks, size_t n, size_t bucket_floats)
      : GradReducer(ranks, n, bucket_floats), grads_(static_cast<size_t>(ranks), nullptr) {}

  Status Attach(int rank, float* grads) override {
    grads_[static_cast<size_t>(rank)] = grads;
    return OkStatus();
  }

 protected:
  Status StartBucket(int /*rank*/, size_t begin, size_t end) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (arrived_ == 0) bucket_begin_ = begin;
    AHA_CHECK_EQ(begin, bucket_begin_) << "ranks reduce buckets in the same order";
    const uint64_t generation = generation_;
    if (++arrived_ < ranks()) {
      cv_.wait(lock, [&] { return generation_ != generation; });
      return OkStatus();
    }
    for (float* g : grads_) AHA_CHECK(g != nullptr) << "every rank attaches before reducing";
    for (size_t i = begin; i < end; ++i) {
      float sum = grads_[0][i];
      for (size_t r = 1; r < grads_.size(); ++r) sum += grads_[r][i];
      for (float* g : grads_) g[i] = sum;
    }
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return OkStatus();
  }
  // StartBucket returns with the bucket summed: nothing is left in flight.
  Status WaitAll(int /*rank*/) override { return OkStatus(); }

 private:
  std::vector<float*> grads_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  size_t bucket_begin_ = 0;
  uint64_t generation_ = 0;
};

#ifdef AHA_HAVE_NCCL
using engine::cuda::CudaBackend;
using engine::cuda::NcclGroup;

Status CudaStatus(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return OkStatus();
  return Internal(what + ": " + cudaGetErrorString(e));
}

// CUDA replicas: one NCCL communicator over the learner's GPUs, a rank per replica. Each rank
// reduces on its own stream, which waits (event) for the compute stream to pass the point where
// the bucket's gradients were final, so reductions overlap the rest of the backward.
class NcclGradReducer final : public GradReducer {
 public:
  static Result<std::unique_ptr<GradReducer>> Make(const std::vector<engine::Backend*>& backends, size_t n,
                                                   size_t bucket_floats) {
    std::unique_ptr<NcclGradReducer> r(new NcclGradReducer(static_cast<int>(backends.size()), n, bucket_floats));
    ASSIGN_OR_RETURN(r->id_, NcclGroup::NewId());
    for (size_t i = 0; i < backends.size(); ++i) {
      auto* cuda = dynamic_cast<CudaBackend*>(backends[i]);
      if (!cuda) return InvalidArgument("replica " + std::to_string(i) + " is not on a CUDA backend");
      r->ranks_[i].device = cuda->device().index;
      r->ranks_[i].compute = cuda->stream();
      for (size_t j = 0; j < i; ++j)
        if (r->ranks_[j].device == r->ranks_[i].device)  // NCCL refuses a GPU twice in one communicator
          return InvalidArgument("replicas " + std::to_string(j) + " and " + std::to_string(i) + " are both on cuda:" +
                                 std::to_string(r->ranks_[i].device));
    }
    return std::unique_ptr<GradReducer>(std::move(r));
  }

  ~NcclGradReducer() override {
    for (Rank& r : ranks_) {
      // Streams and events belong to their device: release them with it current.
      if (!r.stream && !r.ready) continue;
      cudaSetDevice(r.device);
      r.group.reset();  // aborts the communicator (NcclGroup never blocks on peers)
      if (r.ready) cudaEventDestroy(r.ready);
      if (r.stream) cudaStreamDestroy(r.stream);
    }
  }

  Status Attach(int rank, float* grads) override {
    Rank& r = ranks_[static_cast<size_t>(rank)];
    const std::string where = "cuda:" + std::to_string(r.device) + ": ";
    r.grads = grads;
    // Non-blocking: Tensor's synchronous copies and memsets run on the legacy default stream, and
    // a blocking stream would make them wait for a collective that waits for a peer.
    RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking), where + "cudaStreamCreate"));
    RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&r.ready, cudaEventDisableTiming), where + "cudaEventCreate"));
    ASSIGN_OR_RETURN(r.group, NcclGroup::Join(id_, ranks(), rank, r.device, r.stream, kJoinDeadline));
    return OkStatus();
  }

 protected:
  Status StartBucket(int rank, size_t begin, size_t end) override {
    Rank& r = ranks_[static_cast<size_t>(rank)];
    if (!r.group) return FailedPrecondition("NCCL rank " + std::to_string(rank) + " has not joined");
    const std::string where = "cuda:" + std::to_string(r.device) + ": ";
    RETURN_IF_ERROR(CudaStatus(cudaEventRecord(r.ready, r.compute), where + "cudaEventRecord"));
    RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(r.stream, r.ready, 0), where + "cudaStreamWaitEvent"));
    return r.group->AllReduceSumAsync(r.grads + begin, end - begin, kDeadline);
  }

  Status WaitAll(int rank) override {
    Rank& r = ranks_[static_cast<size_t>(rank)];
    if (!r.group) return FailedPrecondition("NCCL rank " + std::to_string(rank) + " has not joined");
    return r.group->Wait(kDeadline);
  }

 private:
  // Joining waits for every replica thread to get there; they start together (ReplicaThreads::Run).
  static constexpr std::chrono::milliseconds kJoinDeadline{std::chrono::minutes(2)};

  struct Rank {
    int device = 0;
    cudaStream_t compute = nullptr;  // the backend's stream (not owned)
    cudaStream_t stream = nullptr;   // the reductions' stream
    cudaEvent_t ready = nullptr;
    float* grads = nullptr;
    std::unique_ptr<NcclGroup> group;
  };
  NcclGradReducer(int ranks, size_t n, size_t bucket_floats)
      : GradReducer(ranks, n, bucket_floats), ranks_(static_cast<size_t>(ranks)) {}

  std::string id_;
  std::vector<Rank> ranks_;
};
#endif

}  // namespace

Result<std::unique_ptr<GradReducer>> GradReducer::Create(const std::vector<engine::Backend*>& backends, size_t n,
                                                         size_t bucket_bytes) {
  if (backends.empty()) return InvalidArgument("data parallel: no replicas");
  const size_t bucket_floats = std::max<size_t>(1, bucket_bytes / sizeof(float));
  const bool cpu = backends[0]->device().is_cpu();
  for (auto* b : backends)
    if (b->device().is_cpu() != cpu) return InvalidArgument("data parallel: replicas mix cpu and cuda devices");
  if (cpu) return std::unique_ptr<GradReducer>(new HostGradReducer(static_cast<int>(backends.size()), n, bucket_floats));
#ifdef AHA_HAVE_NCCL
  return NcclGradReducer::Make(backends, n, bucket_floats);
#else
  return Unavailable("data parallel on GPUs needs a build of aha with NCCL");
#endif
}

}  // namespace aha
