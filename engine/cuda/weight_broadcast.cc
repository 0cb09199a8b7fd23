// WeightBroadcaster and WeightReceiver (see weight_broadcast.h).
#include "engine/cuda/weight_broadcast.h"

#include <unistd.h>

#include <algorithm>
#include <thread>

#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {
namespace {

// How long an aborted communicator's stream may take to empty. NCCL's abort stops the kernels
// within milliseconds; a stream still busy after this is treated as lost for good.
constexpr Millis kDrain{10000};

Status CudaOk(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return OkStatus();
  return Internal(what + ": " + cudaGetErrorString(e));
}

Millis Left(Clock::time_point until) {
  return std::max(Millis(0), std::chrono::duration_cast<Millis>(until - Clock::now()));
}

// Makes `device` current and gives the calling thread its previous device back at the end: the
// learner publishes from its training thread, whose backend relies on the current device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&saved_) != cudaSuccess) saved_ = -1;
    status_ = CudaOk(cudaSetDevice(device), "cuda:" + std::to_string(device));
  }
  ~DeviceScope() {
    if (saved_ >= 0) cudaSetDevice(saved_);
  }
  const Status& status() const { return status_; }

 private:
  int saved_ = -1;
  Status status_;
};

std::string Bytes(uint64_t n) { return std::to_string(n) + " bytes"; }

}  // namespace

Result<std::string> GpuIdentity(int device) {
  char bus[64] = {};
  RETURN_IF_ERROR(CudaOk(cudaDeviceGetPCIBusId(bus, sizeof bus, device), "cuda:" + std::to_string(device)));
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) != 0) return Internal("gethostname failed");
  return std::string(host) + "/" + bus;
}

// ---------------------------------------------------------------------------------------------
// WeightBroadcaster

Result<std::unique_ptr<WeightBroadcaster>> WeightBroadcaster::Create(NcclMembership* membership,
                                                                     WeightBroadcasterOptions options) {
  if (!membership) return InvalidArgument("weight broadcaster: no membership");
  if (options.n == 0) return InvalidArgument("weight broadcaster: no parameters");
  DeviceScope scope(options.device);
  RETURN_IF_ERROR(scope.status());
  std::unique_ptr<WeightBroadcaster> b(new WeightBroadcaster());
  b->membership_ = membership;
  b->options_ = options;
  RETURN_IF_ERROR(CudaOk(cudaStreamCreateWithFlags(&b->stream_, cudaStreamNonBlocking), "creating the NCCL stream"));
  RETURN_IF_ERROR(CudaOk(cudaEventCreateWithFlags(&b->produced_, cudaEventDisableTiming), "creating an event"));
  const size_t bytes = options.n * sizeof(uint16_t);
  RETURN_IF_ERROR(CudaOk(cudaMalloc(&b->staging_, bytes), "allocating " + Bytes(bytes) + " of bf16 staging"));
  b->doomed_ = [membership] { return membership->Doomed(Clock::now()); };
  return b;
}

WeightBroadcaster::~WeightBroadcaster() {
  DeviceScope scope(options_.device);
  group_.reset();
  const bool drained = !stream_ || NcclGroup::Drained(stream_, kDrain).ok();
  if (stream_) cudaStreamDestroy(stream_);
  if (produced_) cudaEventDestroy(produced_);
  // cudaFree waits for the whole device: skip it when aborted NCCL kernels never finished.
  if (staging_ && drained) cudaFree(staging_);
}

Status WeightBroadcaster::Publish(const float* params, cudaStream_t producer, uint64_t version) {
  if (!broken_.ok()) return broken_;
  DeviceScope scope(options_.device);
  RETURN_IF_ERROR(scope.status());
  if (membership_->NeedsForming(Clock::now())) RETURN_IF_ERROR(Form());
  if (!group_) return OkStatus();  // no actor on a GPU is registered
  return Broadcast(params, producer, version);
}

Status WeightBroadcaster::Form() {
  if (group_) {
    group_.reset();  // aborts the old communicator; its members are told the new epoch
    if (Status d = NcclGroup::Drained(stream_, kDrain); !d.ok()) {
      broken_ = FailedPrecondition("weight broadcast: " + d.message());
      return broken_;
    }
  }
  ASSIGN_OR_RETURN(std::string id, NcclGroup::NewId());
  const auto now = Clock::now();
  auto plan = membership_->Form(id, now);
  if (!plan) return OkStatus();
  ++formed_;
  const std::string what = "forming NCCL epoch " + std::to_string(plan->epoch) + " with " +
                           std::to_string(plan->nranks - 1) + " actor(s)";
  auto g = NcclGroup::Join(id, plan->nranks, 0, options_.device, stream_, options_.join_deadline, doomed_);
  if (!g.ok()) return Fail(g.status().WithContext(what));
  group_ = std::move(g).value();
  if (Status s = WaitForMembers(&NcclMembership::AllJoined, now + options_.join_deadline, "members joining");
      !s.ok())
    return Fail(s.WithContext(what));
  membership_->Formed();
  return OkStatus();
}

Status WeightBroadcaster::Broadcast(const float* params, cudaStream_t producer, uint64_t version) {
  const auto until = Clock::now() + options_.broadcast_deadline;
  const size_t bytes = options_.n * sizeof(uint16_t);
  // The cast is queued before the broadcast is announced, so a CUDA error here leaves the
  // communicator as it was (no member waits for a broadcast that will not come).
  RETURN_IF_ERROR(CudaOk(cudaEventRecord(produced_, producer), "ordering the cast after the optimizer"));
  RETURN_IF_ERROR(CudaOk(cudaStreamWaitEvent(stream_, produced_, 0), "ordering the cast after the optimizer"));
  CastF32ToBF16(staging_, params, options_.n, stream_);
  RETURN_IF_ERROR(CudaOk(cudaGetLastError(), "launching the bf16 cast"));
  const uint64_t b = membership_->StartBroadcast(version);
  const std::string what = "NCCL broadcast " + std::to_string(b) + " (version " + std::to_string(version) +
                           ", " + Bytes(bytes) + ") to " + std::to_string(membership_->members()) + " actor(s)";
  Status s = group_->BroadcastAsync(staging_, bytes, 0, Left(until), doomed_);
  if (s.ok()) s = group_->Wait(Left(until), doomed_);
  if (s.ok()) s = WaitForMembers(&NcclMembership::AllReceived, until, "members reporting it received");
  if (!s.ok()) return Fail(s.WithContext(what));
  return OkStatus();
}

Status WeightBroadcaster::Fail(Status why) {
  if (group_) {
    group_->Abort();
    group_.reset();
  }
  membership_->Failed(Clock::now());
  ++failures_;
  if (Status d = NcclGroup::Drained(stream_, kDrain); !d.ok())
    broken_ = FailedPrecondition("weight broadcast: " + d.message());
  return why;
}

Status WeightBroadcaster::WaitForMembers(bool (NcclMembership::*done)() const, Clock::time_point until,
                                         const char* what) {
  for (;;) {
    if ((membership_->*done)()) return OkStatus();
    if (membership_->Doomed(Clock::now())) return Cancelled(std::string(what) + ": a member was lost");
    if (Clock::now() > until) return Timeout(std::string(what) + ": deadline passed");
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// ---------------------------------------------------------------------------------------------
// WeightReceiver

Result<std::unique_ptr<WeightReceiver>> WeightReceiver::Create(zmq::context_t& context,
                                                               WeightReceiverOptions options) {
  if (options.n == 0 || !options.params) return InvalidArgument("weight receiver: no parameters");
  DeviceScope scope(options.device);
  RETURN_IF_ERROR(scope.status());
  std::unique_ptr<WeightReceiver> r(new WeightReceiver());
  r->options_ = options;
  ASSIGN_OR_RETURN(std::string gpu, GpuIdentity(options.device));
  ASSIGN_OR_RETURN(r->control_, NcclControlClient::Create(context, options.endpoint, options.actor_id,
                                                          options.device, gpu, options.stats));
  RETURN_IF_ERROR(CudaOk(cudaStreamCreateWithFlags(&r->stream_, cudaStreamNonBlocking), "creating the NCCL stream"));
  RETURN_IF_ERROR(CudaOk(cudaEventCreateWithFlags(&r->swapped_, cudaEventDisableTiming), "creating an event"));
  return r;
}

WeightReceiver::~WeightReceiver() {
  DeviceScope scope(options_.device);
  if (control_) Leave();
  group_.reset();
  const bool drained = !stream_ || NcclGroup::Drained(stream_, kDrain).ok();
  if (stream_) cudaStreamDestroy(stream_);
  if (swapped_) cudaEventDestroy(swapped_);
  if (staging_ && drained) cudaFree(staging_);  // waits for a swap still reading it
}

void WeightReceiver::Leave() {
  (void)control_->Exchange(epoch_, received_, failed_epoch_, /*leave=*/true, std::min(options_.call_timeout, Millis(500)));
}

Result<bool> WeightReceiver::Step() {
  if (!broken_.ok()) return broken_;
  RETURN_IF_ERROR(CudaOk(cudaSetDevice(options_.device), "cuda:" + std::to_string(options_.device)));
  ASSIGN_OR_RETURN(NcclAssignment a,
                   control_->Exchange(epoch_, received_, failed_epoch_, /*leave=*/false, options_.call_timeout,
                                      options_.stopping));
  if (!a.enabled) return FailedPrecondition(a.reason.empty() ? "the learner does not broadcast weights" : a.reason);
  const uint64_t want = options_.n * sizeof(uint16_t);
  if (a.bytes != want || a.dtype != proto::DType::BF16) {
    Leave();
    broken_ = FailedPrecondition("the learner broadcasts " + Bytes(a.bytes) + " of weights; this model has " +
                                 std::to_string(options_.n) + " parameters (" + Bytes(want) + " of bf16)");
    return broken_;
  }
  if (a.learner != learner_) {
    // A learner process this actor has not seen: any communicator held went with the old one.
    if (group_) DropGroup();
    learner_ = a.learner;
    epoch_ = received_ = failed_epoch_ = 0;
  }
  if (a.epoch == 0) {
    if (group_) DropGroup();  // the learner ended the communicator
    return false;
  }
  if (a.epoch != epoch_) {
    RETURN_IF_ERROR(JoinEpoch(a));
    return true;
  }
  if (a.broadcast == received_ + 1) {
    RETURN_IF_ERROR(Receive(a));
    return true;
  }
  if (a.broadcast > received_ + 1) {
    // Cannot happen while the learner waits for every report; if it does, the ranks are out of
    // step and only a new communicator brings them back.
    const std::string why = "NCCL epoch " + std::to_string(epoch_) + " is at broadcast " +
                            std::to_string(a.broadcast) + " but this actor received " + std::to_string(received_);
    failed_epoch_ = epoch_;
    DropGroup();
    return Unavailable(why + "; leaving it");
  }
  return false;
}

bool WeightReceiver::LearnerMovedOn(uint64_t epoch, Clock::time_point* last) {
  if (Clock::now() - *last < options_.poll_interval) return false;
  *last = Clock::now();
  auto a = control_->Exchange(epoch_, received_, failed_epoch_, /*leave=*/false, options_.call_timeout,
                              options_.stopping);
  if (!a.ok()) return false;  // no answer: the deadline decides
  return !a->enabled || a->learner != learner_ || a->epoch != epoch;
}

Status WeightReceiver::JoinEpoch(const NcclAssignment& a) {
  if (group_) DropGroup();
  if (!broken_.ok()) return broken_;
  if (!staging_) {
    // Allocated on the first join, so that an actor whose learner publishes over ZeroMQ only never
    // holds a second copy of the weights on its GPU.
    const size_t bytes = options_.n * sizeof(uint16_t);
    if (Status s = CudaOk(cudaMalloc(&staging_, bytes), "allocating " + Bytes(bytes) + " of bf16 staging"); !s.ok()) {
      staging_ = nullptr;
      Leave();
      broken_ = FailedPrecondition(s.message());
      return broken_;
    }
  }
  const uint64_t target = a.epoch;
  Clock::time_point last = Clock::now();
  auto g = NcclGroup::Join(a.nccl_id, static_cast<int>(a.nranks), static_cast<int>(a.rank), options_.device, stream_,
                           options_.join_deadline, [&] { return LearnerMovedOn(target, &last); });
  if (!g.ok()) {
    failed_epoch_ = target;
    return g.status().WithContext("joining NCCL epoch " + std::to_string(target) + " as rank " +
                                  std::to_string(a.rank) + " of " + std::to_string(a.nranks));
  }
  group_ = std::move(g).value();
  epoch_ = target;
  received_ = 0;
  return OkStatus();
}

Status WeightReceiver::Receive(const NcclAssignment& a) {
  const std::string what = "receiving version " + std::to_string(a.version) + " (NCCL epoch " +
                           std::to_string(epoch_) + ", broadcast " + std::to_string(a.broadcast) + ")";
  Status s;
  {
    // Staging is about to be overwritten: withdraw what it holds, and let the broadcast start only
    // after the last swap has read it.
    std::lock_guard<std::mutex> lock(mu_);
    staged_ = false;
    if (swap_recorded_) s = CudaOk(cudaStreamWaitEvent(stream_, swapped_, 0), "ordering after the last swap");
  }
  const uint64_t epoch = epoch_;
  Clock::time_point last = Clock::now();
  auto moved_on = [&] { return LearnerMovedOn(epoch, &last); };
  const auto until = Clock::now() + options_.broadcast_deadline;
  if (s.ok()) s = group_->BroadcastAsync(staging_, a.bytes, 0, Left(until), moved_on);
  if (s.ok()) s = group_->Wait(Left(until), moved_on);
  if (!s.ok()) {
    failed_epoch_ = epoch_;
    DropGroup();
    return s.WithContext(what);
  }
  received_ = a.broadcast;
  {
    std::lock_guard<std::mutex> lock(mu_);
    staged_ = true;
    staged_version_ = a.version;
  }
  received_version_ = std::max(received_version_.load(), a.version);
  return OkStatus();
}

void WeightReceiver::DropGroup() {
  if (group_) {
    group_->Abort();
    group_.reset();
  }
  epoch_ = 0;
  received_ = 0;
  if (Status d = NcclGroup::Drained(stream_, kDrain); !d.ok()) {
    broken_ = FailedPrecondition("weight receiver: " + d.message());
    Leave();
  }
}

Result<std::optional<uint64_t>> WeightReceiver::SwapIn(uint64_t have) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!staged_ || staged_version_ <= have) return std::optional<uint64_t>();
  SwapInBf16(options_.params, options_.shadow, staging_, options_.n, options_.swap_stream);
  RETURN_IF_ERROR(CudaOk(cudaGetLastError(), "launching the weight swap"));
  staged_ = false;
  if (cudaEventRecord(swapped_, options_.swap_stream) == cudaSuccess) {
    swap_recorded_ = true;
  } else {
    // Without the event the next broadcast could overwrite staging under the swap: wait for it here.
    swap_recorded_ = false;
    RETURN_IF_ERROR(CudaOk(cudaStreamSynchronize(options_.swap_stream), "waiting for the weight swap"));
  }
  return std::optional<uint64_t>(staged_version_);
}

}  // namespace aha::engine::cuda
