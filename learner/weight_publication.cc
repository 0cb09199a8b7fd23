// WeightPublication (see weight_publication.h).
#include "learner/weight_publication.h"

#include <spdlog/spdlog.h>

#include <random>

#if AHA_HAVE_NCCL
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/weight_broadcast.h"
#endif

namespace aha {
namespace {

using Clock = std::chrono::steady_clock;

// The f32 flat weights with their tensor table, for the ZeroMQ path.
WeightsVersion Snapshot(engine::Transformer& model, uint64_t version) {
  WeightsVersion v;
  v.version = version;
  v.dtype = proto::DType::F32;
  auto bytes = std::make_shared<std::vector<uint8_t>>(model.num_params() * sizeof(float));
  model.CopyParamsToHost(reinterpret_cast<float*>(bytes->data()));
  v.bytes = std::move(bytes);
  for (const auto& info : model.param_table()) {
    WeightTensor t;
    t.name = info.name;
    for (auto d : info.shape) t.shape.push_back(static_cast<uint64_t>(d));
    t.offset = info.offset * sizeof(float);
    v.tensors.push_back(std::move(t));
  }
  return v;
}

}  // namespace

const char* WeightSyncName(WeightSync mode) { return mode == WeightSync::kNccl ? "nccl" : "zmq"; }

bool BuiltWithNccl() {
#if AHA_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

Result<WeightSync> ResolveWeightSync(const JobConfig& job, const engine::Device& learner, bool built_with_nccl) {
  const std::string& want = job.grpo.weight_sync;
  if (want == "zmq") return WeightSync::kZmq;
  const bool cuda_learner = learner.kind == engine::DeviceKind::kCuda;
  if (want == "nccl") {
    if (!built_with_nccl) return InvalidArgument("grpo.weight_sync: nccl, but this build has no NCCL");
    if (!cuda_learner)
      return InvalidArgument("grpo.weight_sync: nccl needs the learner on a CUDA device (it is on " +
                             learner.ToString() + ")");
    return WeightSync::kNccl;
  }
  bool all_cuda = built_with_nccl && cuda_learner;
  for (const auto& a : job.topology.actors) all_cuda = all_cuda && a.device.rfind("cuda", 0) == 0;
  return all_cuda ? WeightSync::kNccl : WeightSync::kZmq;
}

struct WeightPublication::NcclPath {
#if AHA_HAVE_NCCL
  std::unique_ptr<engine::cuda::WeightBroadcaster> broadcaster;
  cudaStream_t producer = nullptr;  // the model's stream: the optimizer's writes are queued there
#endif
  uint64_t formed = 0, failures = 0;  // as last seen, for the counters' increments
};

WeightPublication::~WeightPublication() = default;

Result<std::unique_ptr<WeightPublication>> WeightPublication::Create(zmq::context_t& context,
                                                                     engine::Transformer* model, uint64_t version,
                                                                     WeightPublicationOptions options) {
  std::unique_ptr<WeightPublication> p(new WeightPublication());
  p->options_ = options;
  p->model_ = model;
  p->version_ = version;
  if (options.registry) {
    auto& r = *options.registry;
    p->rebuilds_ = &prometheus::BuildCounter().Name("aha_learner_nccl_rebuilds_total")
                        .Help("NCCL weight-broadcast communicators formed (the first included)").Register(r).Add({});
    p->failures_ = &prometheus::BuildCounter().Name("aha_learner_nccl_failures_total")
                        .Help("NCCL formings and weight broadcasts that failed and were aborted").Register(r).Add({});
    p->members_ = &prometheus::BuildGauge().Name("aha_learner_nccl_members")
                       .Help("Actors in the NCCL weight-broadcast communicator").Register(r).Add({});
  }
  WeightPublisherOptions wo;
  wo.endpoint = options.endpoint;
  wo.stats = options.stats;
  if (options.mode == WeightSync::kNccl) {
#if AHA_HAVE_NCCL
    auto* cuda = dynamic_cast<engine::cuda::CudaBackend*>(model->backend());
    if (!cuda) return InvalidArgument("grpo.weight_sync: nccl needs the learner on a CUDA device");
    NcclMembershipOptions mo;
    mo.silence = options.nccl_silence;
    mo.bytes = model->num_params() * sizeof(uint16_t);
    ASSIGN_OR_RETURN(mo.learner_gpu, engine::cuda::GpuIdentity(cuda->device().index));
    std::random_device rd;
    const uint64_t incarnation = ((uint64_t{rd()} << 32) ^ rd()) | 1;  // never 0
    p->membership_ = std::make_unique<NcclMembership>(mo, incarnation);
    p->nccl_ = std::make_unique<NcclPath>();
    p->nccl_->producer = cuda->stream();
    engine::cuda::WeightBroadcasterOptions bo;
    bo.device = cuda->device().index;
    bo.n = model->num_params();
    bo.join_deadline = options.nccl_join_deadline;
    bo.broadcast_deadline = options.nccl_broadcast_deadline;
    ASSIGN_OR_RETURN(p->nccl_->broadcaster, engine::cuda::WeightBroadcaster::Create(p->membership_.get(), bo));
    wo.nccl = p->membership_.get();
#else
    return InvalidArgument("grpo.weight_sync: nccl, but this build has no NCCL");
#endif
  }
  ASSIGN_OR_RETURN(p->publisher_, WeightPublisher::Create(context, wo));
  p->publisher_->Publish(Snapshot(*model, version));
  return p;
}

uint64_t WeightPublication::Publish(uint64_t version) {
  version_ = version;
  uint64_t bytes = 0;
  const uint64_t announces = publisher_->announces_served();
  if (!nccl_ || announces != announces_seen_) {
    // Counted before the copy: a pull that sees the old version meanwhile asks for the next one.
    announces_seen_ = announces;
    auto snap = Snapshot(*model_, version);
    bytes += snap.bytes->size();
    publisher_->Publish(std::move(snap));
  }
  if (nccl_) bytes += Broadcast();
  return bytes;
}

void WeightPublication::ServeJoiners() {
  if (!nccl_) return;
  const auto now = Clock::now();
  if (last_failure_ && now - *last_failure_ < options_.nccl_retry_after) return;
  if (!membership_->HasWaiting(now)) return;
  const auto t0 = Clock::now();
  if (Broadcast() > 0)
    spdlog::info("weights: version {} to the actors that joined, {:.3f} s", version_,
                 std::chrono::duration<double>(Clock::now() - t0).count());
}

int WeightPublication::nccl_members() const { return membership_ ? membership_->members() : 0; }

uint64_t WeightPublication::Broadcast() {
#if AHA_HAVE_NCCL
  auto& b = *nccl_->broadcaster;
  Status s = b.Publish(model_->params(), nccl_->producer, version_);
  if (rebuilds_) rebuilds_->Increment(static_cast<double>(b.formed() - nccl_->formed));
  if (failures_) failures_->Increment(static_cast<double>(b.failures() - nccl_->failures));
  nccl_->formed = b.formed();
  nccl_->failures = b.failures();
  if (members_) members_->Set(b.members());
  if (!s.ok()) {
    last_failure_ = Clock::now();
    spdlog::warn("weights version {} over NCCL: {}; training goes on, the communicator is formed again with "
                 "the actors still there", version_, s.ToString());
    return 0;
  }
  return b.members() > 0 ? model_->num_params() * sizeof(uint16_t) : 0;
#else
  return 0;
#endif
}

}  // namespace aha
