// The learner's weight publication (shared/DESIGN.md §1 "Weight publication"). Every new policy
// version goes out
//  - over ZeroMQ: a WeightPublisher on the weights socket serves f32 versions that actors pull
//    (common/weight_sync.h); always, as the path of CPU actors;
//  - with grpo.weight_sync = nccl: as one bf16 ncclBroadcast to the actors on GPUs
//    (engine/cuda/weight_broadcast.h), whose control messages the same socket carries
//    (common/nccl_membership.h).
// With NCCL the ZeroMQ copy is taken only when someone pulls it (an actor on a CPU, a tool): a copy
// costs a device-to-host transfer of the f32 weights and a checksum pass over them on the training
// thread, which actors fed by the broadcast do not need.
//
// A failed broadcast does not stop training: it is logged and counted, and the communicator is
// formed again with the actors still there. The version that failed reaches them when the learner
// next waits for data (ServeJoiners, at most once per `nccl_retry_after`) or with the next step's
// publication, whichever comes first.
//
// Metrics (in the given registry): aha_learner_nccl_rebuilds_total (communicators formed, the first
// included), aha_learner_nccl_failures_total (formings and broadcasts that failed and were
// aborted), aha_learner_nccl_members (actors in the current communicator).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "common/config.h"
#include "common/status.h"
#include "common/weight_sync.h"
#include "engine/transformer.h"

namespace aha {

enum class WeightSync { kZmq, kNccl };
const char* WeightSyncName(WeightSync mode);  // "zmq", "nccl"

// grpo.weight_sync resolved for a learner on `learner`: auto is nccl when the learner and every
// actor of the topology are on CUDA devices and the build has NCCL, zmq otherwise. InvalidArgument
// naming the key when nccl is asked for and cannot be had.
Result<WeightSync> ResolveWeightSync(const JobConfig& job, const engine::Device& learner, bool built_with_nccl);
// Whether this build can broadcast over NCCL.
bool BuiltWithNccl();

struct WeightPublicationOptions {
  std::string endpoint = "tcp://127.0.0.1:0";  // the weights socket's bind address
  WeightSync mode = WeightSync::kZmq;
  WireStats* stats = nullptr;
  prometheus::Registry* registry = nullptr;  // where the NCCL metrics go (optional)
  std::chrono::milliseconds nccl_join_deadline{60000};
  std::chrono::milliseconds nccl_broadcast_deadline{60000};
  std::chrono::milliseconds nccl_silence{5000};      // an actor not heard from this long is lost
  std::chrono::milliseconds nccl_retry_after{5000};  // ServeJoiners rests this long after a failure
};

// Used by the training thread alone.
class WeightPublication {
 public:
  // Publishes `version` (the model's weights now) at once. `model` is the replica that publishes;
  // it must outlive this object and, with NCCL, live on a CUDA device.
  static Result<std::unique_ptr<WeightPublication>> Create(zmq::context_t& context, engine::Transformer* model,
                                                           uint64_t version, WeightPublicationOptions options);
  ~WeightPublication();

  // After an optimizer step: publishes the model's weights as `version`. Returns the bytes put out
  // (a ZeroMQ copy taken, a broadcast sent). A failed broadcast is logged and counted, not returned.
  uint64_t Publish(uint64_t version);
  // While the learner waits for data: actors waiting to join the NCCL communicator (started, came
  // back, or survived a failure) get the current version now rather than after the next step.
  void ServeJoiners();

  std::string bound_endpoint() const { return publisher_->bound_endpoint(); }
  WeightSync mode() const { return options_.mode; }
  int nccl_members() const;

 private:
  struct NcclPath;
  WeightPublication() = default;
  uint64_t Broadcast();

  WeightPublicationOptions options_;
  engine::Transformer* model_ = nullptr;
  uint64_t version_ = 0;
  uint64_t announces_seen_ = 0;
  // Declared before the publisher, whose I/O thread serves NCCL requests from it: destroyed after.
  std::unique_ptr<NcclMembership> membership_;
  std::unique_ptr<WeightPublisher> publisher_;
  std::unique_ptr<NcclPath> nccl_;
  std::optional<std::chrono::steady_clock::time_point> last_failure_;
  prometheus::Counter *rebuilds_ = nullptr, *failures_ = nullptr;
  prometheus::Gauge* members_ = nullptr;
};

}  // namespace aha
