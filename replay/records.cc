#include "replay/records.h"

#include <fmt/format.h>
#include <kj/exception.h>

#include <cstring>
#include <nlohmann/json.hpp>

namespace aha::replay {

using nlohmann::json;

const char* GroupStateName(GroupState s) {
  switch (s) {
    case GroupState::kLeased: return "leased";
    case GroupState::kComplete: return "complete";
    case GroupState::kServed: return "served";
    case GroupState::kExpired: return "expired";
    case GroupState::kFiltered: return "filtered";
    case GroupState::kStale: return "stale";
  }
  return "unknown";
}

std::string U64Key(uint64_t v) {
  std::string k(8, '\0');
  for (int i = 7; i >= 0; --i) {
    k[i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
  return k;
}

Result<uint64_t> DecodeU64Key(std::string_view key) {
  if (key.size() != 8) return DataLoss("integer key of " + std::to_string(key.size()) + " bytes");
  uint64_t v = 0;
  for (char c : key) v = (v << 8) | static_cast<uint8_t>(c);
  return v;
}

std::string GroupId(uint64_t seq) { return fmt::format("g{:012}", seq); }

std::string TrajectoryPrefix(std::string_view group_id) {
  std::string k(group_id);
  k.push_back('/');
  return k;
}

std::string TrajectoryPrefixEnd(std::string_view group_id) {
  std::string k(group_id);
  k.push_back('/' + 1);
  return k;
}

std::string TrajectoryKey(std::string_view group_id, uint32_t sample_index) {
  std::string k = TrajectoryPrefix(group_id);
  for (int shift = 24; shift >= 0; shift -= 8) k.push_back(static_cast<char>((sample_index >> shift) & 0xff));
  return k;
}

namespace {

std::string ToBytes(const json& j) {
  std::vector<uint8_t> v = json::to_msgpack(j);
  return std::string(v.begin(), v.end());
}

Result<json> FromBytes(std::string_view bytes, const char* what) {
  json j = json::from_msgpack(bytes.begin(), bytes.end(), /*strict=*/true, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return DataLoss(std::string("corrupt ") + what + " record");
  return j;
}

// Reads a field of a stored record; a missing or mistyped field is corruption, not a bug.
template <typename T>
Status Get(const json& j, const char* key, T* out, const char* what) {
  auto it = j.find(key);
  if (it == j.end()) return DataLoss(fmt::format("{} record lacks '{}'", what, key));
  try {
    *out = it->template get<T>();
  } catch (const json::exception&) {
    return DataLoss(fmt::format("{} record has a bad '{}'", what, key));
  }
  return OkStatus();
}

}  // namespace

std::string EncodeGroup(const GroupRecord& g) {
  return ToBytes(json{{"t", g.task_index}, {"g", g.group_size}, {"s", static_cast<int>(g.state)},
                      {"l", g.lease_id}, {"d", g.deadline_ms}, {"dv", g.dispatch_version},
                      {"mv", g.min_version}, {"cs", g.complete_seq}, {"r", g.request_id},
                      {"cv", g.closed_version}});
}

Result<GroupRecord> DecodeGroup(std::string_view id, std::string_view bytes) {
  ASSIGN_OR_RETURN(json j, FromBytes(bytes, "group"));
  GroupRecord g;
  g.id = std::string(id);
  int state = 0;
  RETURN_IF_ERROR(Get(j, "t", &g.task_index, "group"));
  RETURN_IF_ERROR(Get(j, "g", &g.group_size, "group"));
  RETURN_IF_ERROR(Get(j, "s", &state, "group"));
  RETURN_IF_ERROR(Get(j, "l", &g.lease_id, "group"));
  RETURN_IF_ERROR(Get(j, "d", &g.deadline_ms, "group"));
  RETURN_IF_ERROR(Get(j, "dv", &g.dispatch_version, "group"));
  RETURN_IF_ERROR(Get(j, "mv", &g.min_version, "group"));
  RETURN_IF_ERROR(Get(j, "cs", &g.complete_seq, "group"));
  RETURN_IF_ERROR(Get(j, "r", &g.request_id, "group"));
  RETURN_IF_ERROR(Get(j, "cv", &g.closed_version, "group"));
  if (state < 0 || state > static_cast<int>(GroupState::kStale))
    return DataLoss("group record has state " + std::to_string(state));
  g.state = static_cast<GroupState>(state);
  return g;
}

std::string EncodeLease(const LeaseRecord& l) {
  return ToBytes(json{{"id", l.id}, {"a", l.actor}, {"r", l.request_id}, {"d", l.deadline_ms},
                      {"v", l.policy_version}, {"g", l.group_ids}});
}

Result<LeaseRecord> DecodeLease(std::string_view bytes) {
  ASSIGN_OR_RETURN(json j, FromBytes(bytes, "lease"));
  LeaseRecord l;
  RETURN_IF_ERROR(Get(j, "id", &l.id, "lease"));
  RETURN_IF_ERROR(Get(j, "a", &l.actor, "lease"));
  RETURN_IF_ERROR(Get(j, "r", &l.request_id, "lease"));
  RETURN_IF_ERROR(Get(j, "d", &l.deadline_ms, "lease"));
  RETURN_IF_ERROR(Get(j, "v", &l.policy_version, "lease"));
  RETURN_IF_ERROR(Get(j, "g", &l.group_ids, "lease"));
  return l;
}

std::string EncodeState(const ReplayState& s) {
  return ToBytes(json{{"e", s.epoch}, {"p", s.position}, {"nl", s.next_lease_id},
                      {"ng", s.next_group}, {"nc", s.next_complete_seq}, {"nr", s.next_requeue_seq},
                      {"lv", s.learner_version}, {"st", s.served_total}});
}

Result<ReplayState> DecodeState(std::string_view bytes) {
  ASSIGN_OR_RETURN(json j, FromBytes(bytes, "state"));
  ReplayState s;
  RETURN_IF_ERROR(Get(j, "e", &s.epoch, "state"));
  RETURN_IF_ERROR(Get(j, "p", &s.position, "state"));
  RETURN_IF_ERROR(Get(j, "nl", &s.next_lease_id, "state"));
  RETURN_IF_ERROR(Get(j, "ng", &s.next_group, "state"));
  RETURN_IF_ERROR(Get(j, "nc", &s.next_complete_seq, "state"));
  RETURN_IF_ERROR(Get(j, "nr", &s.next_requeue_seq, "state"));
  RETURN_IF_ERROR(Get(j, "lv", &s.learner_version, "state"));
  RETURN_IF_ERROR(Get(j, "st", &s.served_total, "state"));
  return s;
}

std::string EncodeDataset(const DatasetInfo& d) {
  return ToBytes(json{{"n", d.size}, {"sk", d.skipped}, {"f", d.fingerprint}, {"p", d.path}});
}

Result<DatasetInfo> DecodeDataset(std::string_view bytes) {
  ASSIGN_OR_RETURN(json j, FromBytes(bytes, "dataset"));
  DatasetInfo d;
  RETURN_IF_ERROR(Get(j, "n", &d.size, "dataset"));
  RETURN_IF_ERROR(Get(j, "sk", &d.skipped, "dataset"));
  RETURN_IF_ERROR(Get(j, "f", &d.fingerprint, "dataset"));
  RETURN_IF_ERROR(Get(j, "p", &d.path, "dataset"));
  return d;
}

std::string EncodeStringList(const std::vector<std::string>& v) { return ToBytes(json{{"v", v}}); }

Result<std::vector<std::string>> DecodeStringList(std::string_view bytes) {
  ASSIGN_OR_RETURN(json j, FromBytes(bytes, "list"));
  std::vector<std::string> v;
  RETURN_IF_ERROR(Get(j, "v", &v, "list"));
  return v;
}

std::string MessageBytes(capnp::MessageBuilder& message) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

Result<std::unique_ptr<StoredMessage>> StoredMessage::Parse(std::string_view bytes) {
  if (bytes.size() % sizeof(capnp::word) != 0 || bytes.empty())
    return DataLoss("stored message of " + std::to_string(bytes.size()) + " bytes is not whole words");
  auto m = std::unique_ptr<StoredMessage>(new StoredMessage());
  m->words_ = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(m->words_.begin(), bytes.data(), bytes.size());
  capnp::ReaderOptions options;
  // A stored record is at most a trajectory (8 MiB by default); 4x covers pointer re-reads.
  options.traversalLimitInWords = bytes.size() / sizeof(capnp::word) * 4 + 1024;
  options.nestingLimit = 16;
  kj::Maybe<kj::Exception> error = kj::runCatchingExceptions([&]() {
    m->reader_ = std::make_unique<capnp::FlatArrayMessageReader>(m->words_.asPtr(), options);
    m->reader_->getRoot<capnp::AnyStruct>();
  });
  KJ_IF_MAYBE(e, error) { return DataLoss(std::string("corrupt stored message: ") + e->getDescription().cStr()); }
  return m;
}

}  // namespace aha::replay
