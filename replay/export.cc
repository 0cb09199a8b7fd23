#include "replay/export.h"

#include <fmt/format.h>
#include <rocksdb/db.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "proto/trajectory.capnp.h"
#include "replay/records.h"

namespace aha::replay {
namespace {

const char* KindName(proto::TaskKind k) {
  switch (k) {
    case proto::TaskKind::MATH: return "math";
    case proto::TaskKind::COUNTDOWN: return "countdown";
    case proto::TaskKind::ARITH: return "arith";
    case proto::TaskKind::CODE: return "code";
    case proto::TaskKind::OTHER: return "other";
  }
  return "other";
}

const char* FinishName(proto::FinishReason r) {
  switch (r) {
    case proto::FinishReason::STOP: return "stop";
    case proto::FinishReason::LENGTH: return "length";
    case proto::FinishReason::ABORT: return "abort";
  }
  return "stop";
}

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return OkStatus();
  return IoError(what + ": " + s.ToString());
}

}  // namespace

Result<ExportReport> ExportJsonl(const ExportOptions& options) {
  std::error_code ec;
  if (!std::filesystem::is_directory(options.db_path, ec))
    return NotFound("export: " + options.db_path + " is not a replay db directory");
  rocksdb::DBOptions db_options;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (const char* name : {"default", "tasks", "leases", "trajectories", "groups", "meta"})
    cfs.emplace_back(name, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(FromRocks(rocksdb::DB::OpenForReadOnly(db_options, options.db_path, cfs, &handles, &raw),
                            "export: opening " + options.db_path));
  std::unique_ptr<rocksdb::DB> db(raw);
  struct Handles {
    rocksdb::DB* db;
    std::vector<rocksdb::ColumnFamilyHandle*>* h;
    ~Handles() {
      for (auto* x : *h) db->DestroyColumnFamilyHandle(x);
    }
  } guard{db.get(), &handles};
  auto* tasks_cf = handles[1];
  auto* traj_cf = handles[3];
  auto* groups_cf = handles[4];

  std::ofstream out(options.out_path, std::ios::binary | std::ios::trunc);
  if (!out) return IoError("export: cannot write " + options.out_path);

  ExportReport report;
  rocksdb::ReadOptions ro;
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro, traj_cf));
  std::string current_gid;
  GroupRecord group;
  std::unique_ptr<StoredMessage> task_msg;
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    auto key = it->key().ToStringView();
    auto slash = key.rfind('/');
    if (slash == std::string_view::npos || key.size() != slash + 5)
      return DataLoss("export: malformed trajectory key");
    std::string gid(key.substr(0, slash));
    if (gid != current_gid) {
      std::string v;
      RETURN_IF_ERROR(FromRocks(db->Get(ro, groups_cf, gid, &v), "export: reading group " + gid));
      ASSIGN_OR_RETURN(group, DecodeGroup(gid, v));
      RETURN_IF_ERROR(FromRocks(db->Get(ro, tasks_cf, U64Key(group.task_index), &v), "export: reading task"));
      ASSIGN_OR_RETURN(task_msg, StoredMessage::Parse(v));
      current_gid = gid;
    }
    ++report.scanned;
    ASSIGN_OR_RETURN(auto msg, StoredMessage::Parse(it->value().ToStringView()));
    auto st = msg->Root<proto::ScoredTrajectory>();
    if (options.only_correct && !st.getCorrect()) continue;
    if (options.has_min_reward && st.getReward() < options.min_reward) continue;
    auto task = task_msg->Root<proto::Task>();
    auto traj = st.getTrajectory();
    nlohmann::json components = nlohmann::json::object();
    for (auto c : st.getComponents()) components[std::string(c.getName().cStr())] = c.getScore();
    nlohmann::json line = {
        {"id", std::string(task.getId().cStr())},
        {"group_id", gid},
        {"sample_index", traj.getSampleIndex()},
        {"kind", KindName(task.getKind())},
        {"prompt", std::string(task.getPrompt().cStr())},
        {"completion", std::string(traj.getCompletionText().cStr())},
        {"answer", std::string(task.getAnswer().cStr())},
        {"reward", st.getReward()},
        {"correct", st.getCorrect()},
        {"components", components},
        {"finish_reason", FinishName(traj.getFinishReason())},
        {"state", GroupStateName(group.state)},
    };
    // Invalid UTF-8 in a completion is replaced, not fatal: export must not stop at one bad sample.
    out << line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    ++report.written;
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "export: scanning samples"));
  out.flush();
  if (!out) return IoError("export: writing " + options.out_path + " failed");
  return report;
}

}  // namespace aha::replay
