// Weight publication over NCCL (shared/DESIGN.md §1): the learner's WeightBroadcaster casts its f32
// master weights into one flat bf16 buffer of n values on its GPU and ncclBroadcasts it from rank 0;
// each GPU actor's WeightReceiver takes part into a bf16 staging buffer on its own GPU, and the
// actor's generator swaps a whole received version in between two decode steps (SwapInBf16: the
// f32 params become the bf16 values widened, and the GEMMs' bf16 copy is written directly).
// Who is in the communicator, epochs and the control messages: common/nccl_membership.h.
//
// Deadlines: every NCCL call runs under a deadline (NcclGroup) and is also cut short when the
// control plane shows the other side is gone (the learner: a member lost, NcclMembership::Doomed;
// an actor: the learner moved to another epoch or incarnation). On failure the communicator is
// aborted and its stream drained before reuse; the learner's publication returns the error and the
// next one forms a new communicator with the actors still there; an actor goes back to waiting and
// joins that next one.
//
// Streams: each side runs its NCCL work on a stream of its own created non-blocking, ordered after
// the model's stream by events (the learner casts only after the optimizer's writes; the actor
// overwrites staging only after the previous swap has read it), so that a collective stuck on a
// dead peer holds back neither the model's stream nor the legacy default stream before its abort.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "common/nccl_membership.h"
#include "common/status.h"
#include "engine/cuda/nccl_group.h"

namespace aha::engine::cuda {

// "host/PCI bus id" of GPU `device`: names a physical GPU across processes (NCCL needs one per
// rank), where "cuda:N" depends on each process's view.
Result<std::string> GpuIdentity(int device);

struct WeightBroadcasterOptions {
  int device = 0;                    // the learner's GPU (where the params live)
  size_t n = 0;                      // parameters
  Millis join_deadline{60000};       // forming: NCCL init and every member's report
  Millis broadcast_deadline{60000};  // one broadcast: members starting, the transfer, their reports
};

// The learner's side (rank 0). Used by one thread (the training loop).
class WeightBroadcaster {
 public:
  // `membership` (also serving the weights socket) must outlive the broadcaster; its `bytes` must
  // be 2 * n.
  static Result<std::unique_ptr<WeightBroadcaster>> Create(NcclMembership* membership,
                                                           WeightBroadcasterOptions options);
  ~WeightBroadcaster();
  WeightBroadcaster(const WeightBroadcaster&) = delete;
  WeightBroadcaster& operator=(const WeightBroadcaster&) = delete;

  // Sends `params` (n f32 on the device, final once the work queued so far on `producer` has run)
  // as `version` to every actor of the communicator, forming a new communicator first when
  // membership changed. Ok with nothing sent when no actor is registered. Returns when every member
  // has reported the version received, or with the error that aborted the communicator (Timeout at
  // a deadline, Cancelled when a member was lost, Unavailable for an NCCL error).
  Status Publish(const float* params, cudaStream_t producer, uint64_t version);

  int members() const { return membership_->members(); }
  uint64_t formed() const { return formed_; }      // communicators formed (the first included)
  uint64_t failures() const { return failures_; }  // formings and broadcasts that failed

 private:
  WeightBroadcaster() = default;
  Status Form();
  Status Broadcast(const float* params, cudaStream_t producer, uint64_t version);
  // Aborts the communicator, tells the membership, counts; returns `why`.
  Status Fail(Status why);
  // Waits until `done`, a lost member, or `until`.
  Status WaitForMembers(bool (NcclMembership::*done)() const, Clock::time_point until, const char* what);

  NcclMembership* membership_ = nullptr;
  WeightBroadcasterOptions options_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t produced_ = nullptr;
  uint16_t* staging_ = nullptr;
  std::unique_ptr<NcclGroup> group_;
  NcclGroup::GiveUp doomed_;
  uint64_t formed_ = 0, failures_ = 0;
  Status broken_;  // the stream did not drain after an abort: nothing more can be sent
};

struct WeightReceiverOptions {
  std::string endpoint;               // the learner's weights socket
  std::string actor_id;
  int device = 0;                     // the actor's GPU
  size_t n = 0;                       // parameters
  float* params = nullptr;            // n f32 on the device: the model's weights
  uint16_t* shadow = nullptr;         // their bf16 copy read by the GEMMs (null: none)
  cudaStream_t swap_stream = nullptr; // the model's stream: swaps are ordered with its work
  Millis poll_interval{2};            // how often the learner hears from an actor that waits: a
                                      // broadcast starts only when every actor has heard of it
  Millis call_timeout{2000};
  std::function<bool()> stopping;     // may be empty: true gives up Step()'s wait for the learner
  Millis join_deadline{60000};
  Millis broadcast_deadline{60000};
  WireStats* stats = nullptr;
};

// An actor's side. Step() and Leave() belong to one thread (the weight fetcher); SwapIn() to the
// generating thread; the two meet only under a mutex, around the staging buffer.
class WeightReceiver {
 public:
  static Result<std::unique_ptr<WeightReceiver>> Create(zmq::context_t& context, WeightReceiverOptions options);
  ~WeightReceiver();
  WeightReceiver(const WeightReceiver&) = delete;
  WeightReceiver& operator=(const WeightReceiver&) = delete;

  // One round: tells the learner where this actor stands and does what the answer says — nothing
  // (false: call again after poll_interval), or join a new communicator / receive a broadcast whole
  // into staging (true: call again at once, the learner waits for the report). Returns within
  // about one deadline. FailedPrecondition, for good — pull over ZeroMQ (WeightSubscriber)
  // instead: the learner does not broadcast, this actor's GPU is the learner's or another actor's,
  // or the learner's weights do not fit this model (the receiver has left). Other errors: the
  // learner did not answer, or a join or broadcast failed (aborted; later rounds rejoin).
  Result<bool> Step();
  // Enqueues the swap of a received version newer than `have` on swap_stream and returns that
  // version; nullopt when there is none; Internal for a CUDA error. Cheap: call it between decode
  // steps.
  Result<std::optional<uint64_t>> SwapIn(uint64_t have);
  // Newest version received whole (swapped in or not).
  uint64_t received_version() const { return received_version_.load(); }
  // Tells the learner this actor is going (best effort), so it does not wait out a deadline.
  void Leave();
  Millis poll_interval() const { return options_.poll_interval; }

 private:
  WeightReceiver() = default;
  Status JoinEpoch(const NcclAssignment& a);
  Status Receive(const NcclAssignment& a);
  // Aborts the communicator and waits for its stream (broken_ when it does not drain).
  void DropGroup();
  // Polls the learner (at most once per poll_interval) while a join or broadcast waits: true when
  // the learner has moved away from `epoch`.
  bool LearnerMovedOn(uint64_t epoch, Clock::time_point* last);

  WeightReceiverOptions options_;
  std::unique_ptr<NcclControlClient> control_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t swapped_ = nullptr;
  uint16_t* staging_ = nullptr;  // allocated on the first join
  std::unique_ptr<NcclGroup> group_;
  uint64_t learner_ = 0, epoch_ = 0, received_ = 0, failed_epoch_ = 0;
  Status broken_;
  std::atomic<uint64_t> received_version_{0};
  // Staging hand-over between Step() and SwapIn().
  std::mutex mu_;
  bool staged_ = false;        // staging holds a whole version not yet swapped in
  uint64_t staged_version_ = 0;
  bool swap_recorded_ = false; // swapped_ marks the last swap's read of staging
};

}  // namespace aha::engine::cuda
