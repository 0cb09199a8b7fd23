// Weight publication over NCCL, the control plane (shared/DESIGN.md §1 "Weight publication"): who
// is in the learner's broadcast communicator, and the messages that tell each actor when to (re)join
// it and when to take part in a broadcast. Bookkeeping only, no NCCL: the learner's
// WeightBroadcaster and the actors' WeightReceiver (engine/cuda/weight_broadcast.h) drive NCCL from
// it, so CPU tests cover all of it.
//
// Exchange (NcclRequest / NcclReply in proto/weights.capnp, on the learner's weights socket). An
// actor on a GPU sends its whole state every poll interval; the request is at once its join
// request and its sign of life. The reply says where the actor should be:
//   epoch 0                      registered, in no communicator yet: drop any, keep polling
//   epoch E != the actor's       join communicator E (ncclId, rank, nranks), leaving any older one
//   broadcast b = received + 1   take part in broadcast b of E (version, bytes) into staging
// The learner is rank 0 of every communicator; actors take ranks 1..N in actor-id order. Epochs
// count up within one learner incarnation (a restarted learner has another `learner` number, which
// tells actors that every communicator they hold is gone). Broadcasts count from 1 within an epoch
// and the learner starts broadcast b + 1 only after every member reported b, so an actor is never
// more than one broadcast behind.
//
// The learner (NcclMembership) forms a new communicator at a publication when membership changed:
// actors are waiting to join, or a member was lost — it left, restarted (new incarnation), went
// silent for `silence`, reported the communicator failed on its side, or stopped reporting the
// epoch it had joined. Forming succeeds when the learner's NCCL init does and every member has
// reported the epoch; a broadcast succeeds when the learner's send completes and every member has
// reported it received. Either fails when a member is lost meanwhile (Doomed(): the caller aborts
// at once instead of waiting for its deadline) or at the caller's deadline. After a failure there
// is no communicator: every member is back to waiting, and those that had not completed their part
// are left out of later formings until they are heard from after the failure — a dead actor never
// is, a live one polls again within milliseconds and is taken back.
//
// NCCL wants one GPU per rank: an actor whose GPU (host and PCI bus id) is the learner's, or that
// of another live actor, is not registered but told `enabled = false` with the reason, and pulls
// over ZeroMQ instead (a one-GPU machine running learner and actor on cuda:0, say).
//
// Hostile input: actor ids and GPU names are at most 256 bytes and at most `max_actors` actors are
// registered at once (a peer inventing ids cannot grow the learner's memory without bound).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/transport.h"
#include "proto/weights.capnp.h"

namespace aha {

// What an actor says (NcclRequest).
struct NcclActorState {
  std::string actor_id;
  uint64_t incarnation = 0;   // random per process, never 0
  uint64_t sequence = 0;      // from 1, increasing per request
  int32_t device = 0;
  uint64_t epoch = 0;         // joined communicator, 0 = none
  uint64_t received = 0;      // last broadcast of `epoch` received whole
  uint64_t failed_epoch = 0;  // last epoch whose join or broadcast failed on the actor's side
  bool leave = false;
  std::string gpu;            // "host/PCI bus id"; empty = unknown
};

// What the learner answers (NcclReply).
struct NcclAssignment {
  bool enabled = false;
  std::string reason;  // why not, when !enabled
  uint64_t learner = 0;
  uint64_t epoch = 0;
  std::string nccl_id;
  uint32_t rank = 0, nranks = 0;
  uint64_t broadcast = 0, version = 0, bytes = 0;
  proto::DType dtype = proto::DType::BF16;
};

// Wire conversion. The readers treat the message as untrusted: InvalidArgument names the field.
Result<NcclActorState> ReadNcclRequest(proto::NcclRequest::Reader r);
void WriteNcclRequest(const NcclActorState& s, proto::NcclRequest::Builder b);
Result<NcclAssignment> ReadNcclReply(proto::NcclReply::Reader r);
void WriteNcclReply(const NcclAssignment& a, proto::NcclReply::Builder b);

struct NcclMembershipOptions {
  Millis silence{5000};       // a member not heard from for this long is lost
  size_t max_actors = 4096;   // registered at once; more are refused
  uint64_t bytes = 0;         // size of every broadcast (the flat bf16 buffer)
  std::string learner_gpu;    // "host/PCI bus id" of the learner's GPU
};

class NcclMembership {
 public:
  NcclMembership(NcclMembershipOptions options, uint64_t learner_incarnation);

  // An actor's request, on the weights socket's I/O thread. A request older than one already
  // served for the same incarnation changes nothing. ResourceExhausted past max_actors.
  Result<NcclAssignment> Serve(const NcclActorState& actor, Clock::time_point now);

  // ---- publication, on the learner's training thread -----------------------------------------
  // Whether the next publication must form a new communicator first: actors wait to join, or the
  // current communicator lost a member.
  bool NeedsForming(Clock::time_point now) const;
  // Whether live actors wait to join (they have no communicator, hence no new version).
  bool HasWaiting(Clock::time_point now) const;

  struct Plan {
    uint64_t epoch = 0;
    int nranks = 0;                  // actors + 1
    std::vector<std::string> ranks;  // ranks[i] holds rank i + 1
  };
  // Ends the current communicator and starts the next epoch with `nccl_id` and every live actor
  // that is not left out after a failure. nullopt, and no communicator, when there is none.
  std::optional<Plan> Form(const std::string& nccl_id, Clock::time_point now);
  // Every member still in the communicator has reported the forming epoch (a member lost meanwhile
  // no longer counts; it makes the next publication form again).
  bool AllJoined() const;
  // The learner's init succeeded and AllJoined(): broadcasts may start.
  void Formed();
  // Announces the next broadcast of the current communicator; returns its number.
  uint64_t StartBroadcast(uint64_t version);
  // Every member still in the communicator has reported the current broadcast received (one that
  // left after receiving it, say, no longer counts).
  bool AllReceived() const;
  // A member of the communicator being formed or used was lost: what is under way cannot finish.
  bool Doomed(Clock::time_point now) const;
  // The forming or broadcast under way failed and the learner aborted its communicator.
  void Failed(Clock::time_point now);

  uint64_t epoch() const;     // current communicator, 0 = none
  int members() const;        // actors in the formed communicator, 0 without one
  size_t registered() const;  // actors known (in a communicator or waiting)

 private:
  struct Member {
    uint64_t incarnation = 0, sequence = 0;
    int32_t device = 0;
    std::string gpu;
    Clock::time_point last_seen;
    bool in_epoch = false;   // a rank of the current communicator
    bool joined = false;     // has reported the current epoch
    uint64_t received = 0;   // last broadcast of the current epoch it reported
    uint32_t rank = 0;
    std::optional<Clock::time_point> left_out_at;  // failed to complete its part then
  };
  bool Live(const Member& m, Clock::time_point now) const;
  bool Admitted(const Member& m, Clock::time_point now) const;
  void Lose(Member& m, Clock::time_point now);
  NcclAssignment AssignmentFor(const Member& m) const;

  const NcclMembershipOptions options_;
  const uint64_t learner_;
  mutable std::mutex mu_;
  std::map<std::string, Member> members_;  // by actor id: rank order
  uint64_t last_epoch_ = 0;
  uint64_t epoch_ = 0;       // 0: no communicator
  std::string id_;
  int nranks_ = 0;
  bool formed_ = false;
  bool lost_member_ = false;  // the current communicator lost a member
  uint64_t broadcast_ = 0, version_ = 0;
};

// The actor's side of the exchange: one RPC client to the learner's weights socket. Keeps the
// actor's identity (id, a random incarnation, device) and numbers the requests. Not thread-safe:
// one thread (the actor's weight fetcher) uses it.
class NcclControlClient {
 public:
  static Result<std::unique_ptr<NcclControlClient>> Create(zmq::context_t& context, const std::string& endpoint,
                                                           const std::string& actor_id, int32_t device,
                                                           const std::string& gpu = "", WireStats* stats = nullptr);
  // Reports epoch / received / failed_epoch (and leave) and returns the learner's answer. Timeout
  // when the learner does not answer in `timeout`; InvalidArgument for a malformed answer;
  // Cancelled when `abandon` says so meanwhile (RpcClient::Call).
  Result<NcclAssignment> Exchange(uint64_t epoch, uint64_t received, uint64_t failed_epoch, bool leave,
                                  Millis timeout, const std::function<bool()>& abandon = {});
  uint64_t incarnation() const { return state_.incarnation; }

 private:
  NcclActorState state_;
  std::unique_ptr<RpcClient> client_;
};

}  // namespace aha
