// NcclMembership and the NCCL control messages (see nccl_membership.h).
#include "common/nccl_membership.h"

#include <algorithm>
#include <random>

namespace aha {
namespace {

constexpr size_t kMaxActorId = 256;
constexpr size_t kMaxGpu = 256;
constexpr size_t kMaxReason = 1024;
// An ncclUniqueId is 128 bytes (256 hex digits); the bound leaves room for a larger one.
constexpr size_t kMaxNcclId = 1024;
// Same bound as the ZeroMQ path's announce: an actor allocates its staging buffer from `bytes`.
constexpr uint64_t kMaxBytes = 64ull << 30;

}  // namespace

Result<NcclActorState> ReadNcclRequest(proto::NcclRequest::Reader r) {
  NcclActorState s;
  auto id = r.getActorId();
  if (id.size() == 0 || id.size() > kMaxActorId)
    return InvalidArgument("NcclRequest.actorId: must be 1.." + std::to_string(kMaxActorId) + " bytes");
  s.actor_id = id.cStr();
  s.incarnation = r.getIncarnation();
  if (s.incarnation == 0) return InvalidArgument("NcclRequest.incarnation: must not be 0");
  s.sequence = r.getSequence();
  if (s.sequence == 0) return InvalidArgument("NcclRequest.sequence: must not be 0");
  s.device = r.getDevice();
  s.epoch = r.getEpoch();
  s.received = r.getReceived();
  s.failed_epoch = r.getFailedEpoch();
  s.leave = r.getLeave();
  auto gpu = r.getGpu();
  if (gpu.size() > kMaxGpu) return InvalidArgument("NcclRequest.gpu: longer than " + std::to_string(kMaxGpu) + " bytes");
  s.gpu = gpu.cStr();
  return s;
}

void WriteNcclRequest(const NcclActorState& s, proto::NcclRequest::Builder b) {
  b.setActorId(s.actor_id);
  b.setIncarnation(s.incarnation);
  b.setSequence(s.sequence);
  b.setDevice(s.device);
  b.setEpoch(s.epoch);
  b.setReceived(s.received);
  b.setFailedEpoch(s.failed_epoch);
  b.setLeave(s.leave);
  b.setGpu(s.gpu);
}

Result<NcclAssignment> ReadNcclReply(proto::NcclReply::Reader r) {
  NcclAssignment a;
  a.enabled = r.getEnabled();
  if (!a.enabled) {
    auto reason = r.getReason();
    if (reason.size() > kMaxReason) return InvalidArgument("NcclReply.reason: too long");
    a.reason = reason.cStr();
    return a;
  }
  a.learner = r.getLearner();
  a.epoch = r.getEpoch();
  a.bytes = r.getBytes();
  a.dtype = r.getDtype();
  if (a.bytes > kMaxBytes) return InvalidArgument("NcclReply.bytes: " + std::to_string(a.bytes) + " is too large");
  if (a.epoch == 0) return a;
  auto id = r.getNcclId();
  if (id.size() == 0 || id.size() > kMaxNcclId) return InvalidArgument("NcclReply.ncclId: bad length");
  a.nccl_id = id.cStr();
  a.rank = r.getRank();
  a.nranks = r.getNranks();
  if (a.nranks < 2 || a.rank == 0 || a.rank >= a.nranks)
    return InvalidArgument("NcclReply: rank " + std::to_string(a.rank) + " of " + std::to_string(a.nranks) +
                           " (actors hold ranks 1..nranks-1)");
  a.broadcast = r.getBroadcast();
  a.version = r.getVersion();
  return a;
}

void WriteNcclReply(const NcclAssignment& a, proto::NcclReply::Builder b) {
  b.setEnabled(a.enabled);
  b.setLearner(a.learner);
  b.setEpoch(a.epoch);
  b.setNcclId(a.nccl_id);
  b.setRank(a.rank);
  b.setNranks(a.nranks);
  b.setBroadcast(a.broadcast);
  b.setVersion(a.version);
  b.setBytes(a.bytes);
  b.setDtype(a.dtype);
  b.setReason(a.reason);
}

// ---------------------------------------------------------------------------------------------
// NcclMembership

NcclMembership::NcclMembership(NcclMembershipOptions options, uint64_t learner_incarnation)
    : options_(options), learner_(learner_incarnation) {}

bool NcclMembership::Live(const Member& m, Clock::time_point now) const {
  return now - m.last_seen <= options_.silence;
}

bool NcclMembership::Admitted(const Member& m, Clock::time_point now) const {
  return Live(m, now) && (!m.left_out_at || m.last_seen > *m.left_out_at);
}

void NcclMembership::Lose(Member& m, Clock::time_point now) {
  m.in_epoch = false;
  m.joined = false;
  m.received = 0;
  m.left_out_at = now;
  lost_member_ = true;
}

NcclAssignment NcclMembership::AssignmentFor(const Member& m) const {
  NcclAssignment a;
  a.enabled = true;
  a.learner = learner_;
  a.bytes = options_.bytes;
  a.dtype = proto::DType::BF16;
  if (epoch_ == 0 || !m.in_epoch) return a;
  a.epoch = epoch_;
  a.nccl_id = id_;
  a.rank = m.rank;
  a.nranks = static_cast<uint32_t>(nranks_);
  a.broadcast = broadcast_;
  a.version = version_;
  return a;
}

Result<NcclAssignment> NcclMembership::Serve(const NcclActorState& actor, Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!actor.gpu.empty()) {
    NcclAssignment refused;
    refused.learner = learner_;
    if (actor.gpu == options_.learner_gpu)
      refused.reason = actor.actor_id + " runs on the learner's GPU (" + actor.gpu + "); NCCL needs a GPU per rank";
    for (const auto& [id, m] : members_)
      if (id != actor.actor_id && m.gpu == actor.gpu && Live(m, now))
        refused.reason = actor.actor_id + " shares its GPU (" + actor.gpu + ") with " + id + "; NCCL needs a GPU per rank";
    if (!refused.reason.empty()) return refused;
  }
  auto it = members_.find(actor.actor_id);
  if (it == members_.end()) {
    if (members_.size() >= options_.max_actors) {
      // Make room from actors long gone before refusing a new one.
      for (auto i = members_.begin(); i != members_.end();)
        i = !i->second.in_epoch && !Live(i->second, now) ? members_.erase(i) : std::next(i);
      if (members_.size() >= options_.max_actors)
        return ResourceExhausted("NCCL membership: " + std::to_string(members_.size()) + " actors registered already");
    }
    it = members_.emplace(actor.actor_id, Member{}).first;
    it->second.incarnation = actor.incarnation;
  }
  Member& m = it->second;
  if (m.incarnation != actor.incarnation) {
    // The process that held this actor's rank is gone; the new one starts as a joiner.
    if (m.in_epoch) lost_member_ = true;
    m = Member{};
    m.incarnation = actor.incarnation;
  }
  if (actor.sequence <= m.sequence) return AssignmentFor(m);  // overtaken by a newer request
  m.sequence = actor.sequence;
  m.last_seen = now;
  m.device = actor.device;
  m.gpu = actor.gpu;
  if (actor.leave) {
    if (m.in_epoch) lost_member_ = true;
    members_.erase(it);
    NcclAssignment a;
    a.enabled = true;
    a.learner = learner_;
    a.bytes = options_.bytes;
    return a;
  }
  if (m.in_epoch && epoch_ != 0) {
    if (actor.failed_epoch == epoch_) {
      Lose(m, now);
    } else if (actor.epoch == epoch_) {
      m.joined = true;
      m.received = std::max(m.received, actor.received);
    } else if (m.joined) {
      Lose(m, now);  // it held the communicator and no longer does
    }
  }
  return AssignmentFor(m);
}

bool NcclMembership::NeedsForming(Clock::time_point now) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [id, m] : members_) {
    if (m.in_epoch && epoch_ != 0 && !Live(m, now)) return true;
    if (!m.in_epoch && Admitted(m, now)) return true;
  }
  return epoch_ != 0 && lost_member_;
}

bool NcclMembership::HasWaiting(Clock::time_point now) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [id, m] : members_)
    if (!m.in_epoch && Admitted(m, now)) return true;
  return false;
}

std::optional<NcclMembership::Plan> NcclMembership::Form(const std::string& nccl_id, Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mu_);
  Plan plan;
  plan.epoch = ++last_epoch_;
  for (auto it = members_.begin(); it != members_.end();) {
    Member& m = it->second;
    if (!Live(m, now)) {
      it = members_.erase(it);  // silent: gone, or it will register again when it speaks
      continue;
    }
    m.in_epoch = Admitted(m, now);
    m.joined = false;
    m.received = 0;
    m.rank = 0;
    if (m.in_epoch) {
      plan.ranks.push_back(it->first);
      m.rank = static_cast<uint32_t>(plan.ranks.size());
    }
    ++it;
  }
  formed_ = false;
  lost_member_ = false;
  broadcast_ = 0;
  version_ = 0;
  if (plan.ranks.empty()) {
    epoch_ = 0;
    id_.clear();
    nranks_ = 0;
    return std::nullopt;
  }
  epoch_ = plan.epoch;
  id_ = nccl_id;
  nranks_ = static_cast<int>(plan.ranks.size()) + 1;
  plan.nranks = nranks_;
  return plan;
}

bool NcclMembership::AllJoined() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (epoch_ == 0) return false;
  for (const auto& [id, m] : members_)
    if (m.in_epoch && !m.joined) return false;
  return true;
}

void NcclMembership::Formed() {
  std::lock_guard<std::mutex> lock(mu_);
  formed_ = epoch_ != 0;
}

uint64_t NcclMembership::StartBroadcast(uint64_t version) {
  std::lock_guard<std::mutex> lock(mu_);
  version_ = version;
  return ++broadcast_;
}

bool NcclMembership::AllReceived() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (epoch_ == 0) return false;
  for (const auto& [id, m] : members_)
    if (m.in_epoch && m.received < broadcast_) return false;
  return true;
}

bool NcclMembership::Doomed(Clock::time_point now) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (epoch_ == 0) return true;  // nothing left to wait for
  if (lost_member_) return true;
  for (const auto& [id, m] : members_)
    if (m.in_epoch && !Live(m, now)) return true;
  return false;
}

void NcclMembership::Failed(Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, m] : members_) {
    if (!m.in_epoch) continue;
    const bool completed = formed_ ? m.received >= broadcast_ : m.joined;
    if (!completed) m.left_out_at = now;
    m.in_epoch = false;
    m.joined = false;
    m.received = 0;
  }
  epoch_ = 0;
  id_.clear();
  nranks_ = 0;
  formed_ = false;
  lost_member_ = false;
  broadcast_ = 0;
  version_ = 0;
}

uint64_t NcclMembership::epoch() const {
  std::lock_guard<std::mutex> lock(mu_);
  return epoch_;
}

int NcclMembership::members() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!formed_) return 0;
  int n = 0;
  for (const auto& [id, m] : members_) n += m.in_epoch;
  return n;
}

size_t NcclMembership::registered() const {
  std::lock_guard<std::mutex> lock(mu_);
  return members_.size();
}

// ---------------------------------------------------------------------------------------------
// NcclControlClient

Result<std::unique_ptr<NcclControlClient>> NcclControlClient::Create(zmq::context_t& context,
                                                                     const std::string& endpoint,
                                                                     const std::string& actor_id, int32_t device,
                                                                     const std::string& gpu, WireStats* stats) {
  if (actor_id.empty() || actor_id.size() > kMaxActorId)
    return InvalidArgument("actor id must be 1.." + std::to_string(kMaxActorId) + " bytes");
  std::unique_ptr<NcclControlClient> c(new NcclControlClient());
  c->state_.actor_id = actor_id;
  c->state_.device = device;
  c->state_.gpu = gpu;
  std::random_device rd;
  while (c->state_.incarnation == 0) c->state_.incarnation = (uint64_t{rd()} << 32) ^ rd();
  RpcClientOptions o;
  o.endpoint = endpoint;
  o.name = actor_id;
  o.stats = stats;
  ASSIGN_OR_RETURN(c->client_, RpcClient::Create(context, o));
  return c;
}

Result<NcclAssignment> NcclControlClient::Exchange(uint64_t epoch, uint64_t received, uint64_t failed_epoch,
                                                   bool leave, Millis timeout,
                                                   const std::function<bool()>& abandon) {
  state_.epoch = epoch;
  state_.received = received;
  state_.failed_epoch = failed_epoch;
  state_.leave = leave;
  ++state_.sequence;
  capnp::MallocMessageBuilder m;
  WriteNcclRequest(state_, InitEnvelope(m, state_.actor_id).getBody().initNcclRequest());
  ASSIGN_OR_RETURN(auto reply, client_->Call(m, timeout, abandon));
  if (reply->which() != proto::Envelope::Body::NCCL_REPLY)
    return InvalidArgument("the weights socket answered an NcclRequest with something else");
  try {
    return ReadNcclReply(reply->root().getBody().getNcclReply());
  } catch (const kj::Exception& e) {
    return InvalidArgument(std::string("malformed NcclReply: ") + e.getDescription().cStr());
  }
}

}  // namespace aha
