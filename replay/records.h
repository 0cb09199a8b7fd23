// Records and keys of aha-replay's RocksDB store.
//
// Column families and their keys (all integers big-endian so that byte order = numeric order):
//   tasks         u64 task index                 -> Task (Cap'n Proto message), immutable once loaded
//   leases        u64 lease id                   -> LeaseRecord   (msgpack)
//   groups        group id "g%012u"              -> GroupRecord   (msgpack)
//   trajectories  group id '/' u32 sample index  -> ScoredTrajectory (Cap'n Proto message)
//   meta          "state"                        -> ReplayState   (msgpack), rewritten by every batch
//                 "dataset"                      -> DatasetInfo   (msgpack), written once
//                 "requeue/" u64 seq             -> u64 task index of a prompt that goes back out
//                 "batch/" u64 request id        -> the group ids served for that request
//                 "lease_req/" actor id          -> {request id, lease id} of the actor's last lease
// Group ids sort in creation order; trajectory keys of one group are contiguous, so a group's
// samples are one prefix scan and one DeleteRange.
//
// Records are written by this process only, but a disk can corrupt them: every decoder returns
// DataLoss instead of trusting the bytes.
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace aha::replay {

// The lifecycle of a group (one leased prompt, G samples):
//   leased --all G samples stored--> complete --served to the learner--> served
//   leased --lease deadline passed--> expired (samples deleted, prompt requeued)
//   complete --all rewards equal and dynamic sampling on--> filtered (never served)
//   complete --older than max_staleness at serve time--> stale (never served, prompt requeued)
enum class GroupState : uint8_t { kLeased = 0, kComplete, kServed, kExpired, kFiltered, kStale };
const char* GroupStateName(GroupState s);

struct GroupRecord {
  std::string id;
  uint64_t task_index = 0;
  uint32_t group_size = 0;
  GroupState state = GroupState::kLeased;
  uint64_t lease_id = 0;
  int64_t deadline_ms = 0;        // unix ms; the lease's deadline
  uint64_t dispatch_version = 0;  // learner version known at dispatch
  uint64_t min_version = 0;       // set on completion: oldest policy version of any token
  uint64_t complete_seq = 0;      // set on completion: FIFO serving order
  uint64_t request_id = 0;        // set when served
  uint64_t closed_version = 0;    // learner version when it left the live set (retention clock)
};

struct LeaseRecord {
  uint64_t id = 0;
  std::string actor;
  uint64_t request_id = 0;
  int64_t deadline_ms = 0;
  uint64_t policy_version = 0;
  std::vector<std::string> group_ids;
};

// Small, rewritten with every mutation (they are serialised under one mutex).
struct ReplayState {
  uint32_t epoch = 0;          // dispatch cursor: epoch and position inside its order
  uint64_t position = 0;
  uint64_t next_lease_id = 1;
  uint64_t next_group = 1;
  uint64_t next_complete_seq = 1;
  uint64_t next_requeue_seq = 1;
  uint64_t learner_version = 0;
  uint64_t served_total = 0;   // groups served, over the job's whole life
};

struct DatasetInfo {
  uint64_t size = 0;           // tasks stored
  uint64_t skipped = 0;        // malformed lines skipped with --skip-bad
  uint64_t fingerprint = 0;    // FNV-1a of the file's bytes
  std::string path;
};

std::string U64Key(uint64_t v);
Result<uint64_t> DecodeU64Key(std::string_view key);
std::string GroupId(uint64_t seq);
std::string TrajectoryKey(std::string_view group_id, uint32_t sample_index);
// [begin, end) of every trajectory key of a group.
std::string TrajectoryPrefix(std::string_view group_id);
std::string TrajectoryPrefixEnd(std::string_view group_id);

std::string EncodeGroup(const GroupRecord& g);
Result<GroupRecord> DecodeGroup(std::string_view id, std::string_view bytes);
std::string EncodeLease(const LeaseRecord& l);
Result<LeaseRecord> DecodeLease(std::string_view bytes);
std::string EncodeState(const ReplayState& s);
Result<ReplayState> DecodeState(std::string_view bytes);
std::string EncodeDataset(const DatasetInfo& d);
Result<DatasetInfo> DecodeDataset(std::string_view bytes);
std::string EncodeStringList(const std::vector<std::string>& v);
Result<std::vector<std::string>> DecodeStringList(std::string_view bytes);

// A Cap'n Proto message as stored bytes.
std::string MessageBytes(capnp::MessageBuilder& message);

// A Cap'n Proto message read back from stored bytes (copied into aligned words first: RocksDB
// gives no alignment guarantee). Traversal is bounded so a corrupt record cannot loop.
class StoredMessage {
 public:
  static Result<std::unique_ptr<StoredMessage>> Parse(std::string_view bytes);
  template <typename T>
  typename T::Reader Root() {
    return reader_->getRoot<T>();
  }

 private:
  kj::Array<capnp::word> words_;
  std::unique_ptr<capnp::FlatArrayMessageReader> reader_;
};

}  // namespace aha::replay
