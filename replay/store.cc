#include "replay/store.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <fmt/format.h>
#include <kj/exception.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/utilities/checkpoint.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>

#include "common/hash.h"
#include "common/metrics.h"
#include "replay/dataset.h"

namespace aha::replay {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStateKey = "state";
constexpr const char* kDatasetKey = "dataset";
constexpr std::string_view kRequeuePrefix = "requeue/";
constexpr std::string_view kBatchPrefix = "batch/";
constexpr std::string_view kLeaseReqPrefix = "lease_req/";
// Group ids we hand out are 13 bytes; anything much longer is not ours.
constexpr size_t kMaxGroupIdBytes = 64;
constexpr uint32_t kMaxGroupsPerBatch = 4096;
constexpr uint32_t kMaxTasksPerLease = 4096;

const char* kRejectReasons[] = {"unknown_group", "bad_sample_index", "oversized",
                                "lease_expired", "group_closed",     "malformed"};

Status FromRocks(const rocksdb::Status& s, std::string_view what) {
  if (s.ok()) return OkStatus();
  if (s.IsCorruption()) return DataLoss(fmt::format("{}: {}", what, s.ToString()));
  return IoError(fmt::format("{}: {}", what, s.ToString()));
}

std::string Key(std::string_view prefix, std::string_view rest) {
  std::string k(prefix);
  k.append(rest);
  return k;
}

// The oldest policy version that produced any token of a sample; `fallback` (the learner version
// at dispatch) when the actor sent no spans.
uint64_t SampleMinVersion(proto::Trajectory::Reader t, uint64_t fallback) {
  auto spans = t.getVersionSpans();
  if (spans.size() == 0) return fallback;
  uint64_t v = UINT64_MAX;
  for (auto s : spans) v = std::min<uint64_t>(v, s.getVersion());
  return v;
}

bool AllEqual(const std::vector<float>& v) {
  for (float x : v)
    if (x != v.front()) return false;
  return true;
}

}  // namespace

Result<Durability> ParseDurability(const std::string& s) {
  if (s == "sync") return Durability::kSync;
  if (s == "buffered") return Durability::kBuffered;
  return InvalidArgument("durability must be sync or buffered, got '" + s + "'");
}

// ---------------------------------------------------------------------------------------------
// Metrics

struct ReplayStore::Metrics {
  explicit Metrics(prometheus::Registry& r) {
    auto gauge = [&](const char* name, const char* help) -> prometheus::Gauge& {
      return prometheus::BuildGauge().Name(std::string("aha_replay_") + name).Help(help).Register(r).Add({});
    };
    auto counter = [&](const char* name, const char* help) -> prometheus::Counter& {
      return prometheus::BuildCounter().Name(std::string("aha_replay_") + name).Help(help).Register(r).Add({});
    };
    tasks_queued = &gauge("tasks_queued", "Prompts left to hand out (requeued + dataset cursor)");
    leases_active = &gauge("leases_active", "Prompt leases not yet resolved");
    auto& groups = prometheus::BuildGauge().Name("aha_replay_groups").Help("Live groups by state").Register(r);
    groups_incomplete = &groups.Add({{"state", "incomplete"}});
    groups_complete = &groups.Add({{"state", "complete"}});
    in_flight = &gauge("in_flight_groups", "Leased plus complete-but-unserved groups (rate limited)");
    in_flight_limit = &gauge("in_flight_limit", "Rate limiter bound on in-flight groups");
    max_staleness = &gauge("max_staleness_steps", "Staleness bound: groups older than this are never served");
    learner_version = &gauge("learner_version", "Latest learner policy version seen");
    epoch = &gauge("epoch", "Dataset epoch of the dispatch cursor");
    disk_bytes = &gauge("disk_bytes", "Bytes of the RocksDB directory (SST, WAL, manifest)");
    paused = &gauge("paused", "1 while prompt dispatch is paused");
    leased_tasks = &counter("leased_tasks_total", "Prompts handed out in leases");
    stale_lease_refusals = &counter("stale_lease_refusals_total",
                                    "Lease requests refused: the actor's policy version was past the staleness bound");
    ingested = &counter("ingested_trajectories_total", "Scored trajectories stored");
    ingested_bytes = &counter("ingested_bytes_total", "Bytes of scored trajectories stored");
    duplicates = &counter("duplicate_trajectories_total", "Resent trajectories already stored");
    completed = &counter("completed_groups_total", "Groups whose G samples are all stored");
    served = &counter("served_groups_total", "Groups served to the learner");
    deleted = &counter("deleted_groups_total", "Consumed groups deleted by retention");
    auto& rejected_family = prometheus::BuildCounter()
                                .Name("aha_replay_rejected_trajectories_total")
                                .Help("Trajectories rejected and never stored, by reason")
                                .Register(r);
    for (const char* reason : kRejectReasons) rejected[reason] = &rejected_family.Add({{"reason", reason}});
    auto& dropped_family = prometheus::BuildCounter()
                               .Name("aha_replay_dropped_groups_total")
                               .Help("Groups never served, by reason")
                               .Register(r);
    dropped_expired = &dropped_family.Add({{"reason", "lease_expired"}});
    dropped_stale = &dropped_family.Add({{"reason", "stale"}});
    dropped_filtered = &dropped_family.Add({{"reason", "dynamic_sampling"}});
    staleness = &prometheus::BuildHistogram()
                     .Name("aha_replay_served_staleness_steps")
                     .Help("learner_version - min policy version of each served group")
                     .Register(r)
                     .Add({}, prometheus::Histogram::BucketBoundaries{0, 1, 2, 3, 4, 6, 8, 16});
  }
  prometheus::Gauge *tasks_queued, *leases_active, *groups_incomplete, *groups_complete, *in_flight,
      *in_flight_limit, *max_staleness, *learner_version, *epoch, *disk_bytes, *paused;
  prometheus::Counter *leased_tasks, *stale_lease_refusals, *ingested, *ingested_bytes, *duplicates, *completed, *served,
      *deleted, *dropped_expired, *dropped_stale, *dropped_filtered;
  std::map<std::string, prometheus::Counter*> rejected;
  prometheus::Histogram* staleness;
};

// ---------------------------------------------------------------------------------------------
// Open and recovery

ReplayStore::ReplayStore(ReplayOptions options)
    : options_(std::move(options)),
      limiter_(options_.max_in_flight
                   ? options_.max_in_flight
                   : InFlightLimiter::DefaultBound(options_.max_staleness, options_.groups_per_step)) {}

ReplayStore::~ReplayStore() {
  if (db_) {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
    db_->Close();
  }
}

Result<std::unique_ptr<ReplayStore>> ReplayStore::Open(ReplayOptions options) {
  if (options.db_path.empty()) return InvalidArgument("replay: --db is required");
  if (options.group_size == 0 || options.group_size > 65536)
    return InvalidArgument("replay: group_size must be in 1..65536");
  if (options.groups_per_step == 0) return InvalidArgument("replay: groups_per_step must be >= 1");
  if (options.lease_timeout_ms <= 0) return InvalidArgument("replay: lease_timeout must be > 0");
  if (!options.now_ms) {
    options.now_ms = [] {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
          .count();
    };
  }
  std::unique_ptr<ReplayStore> store(new ReplayStore(std::move(options)));
  RETURN_IF_ERROR(store->OpenDb());
  RETURN_IF_ERROR(store->Recover());
  return store;
}

Status ReplayStore::OpenDb() {
  std::error_code ec;
  if (!options_.restore_from.empty()) {
    if (fs::exists(options_.db_path, ec) && !fs::is_empty(options_.db_path, ec))
      return FailedPrecondition(fmt::format(
          "replay: cannot restore {} into {}: the directory exists and is not empty",
          options_.restore_from, options_.db_path));
    if (!fs::is_directory(options_.restore_from, ec))
      return NotFound("replay: checkpoint " + options_.restore_from + " is not a directory");
    fs::create_directories(options_.db_path, ec);
    fs::copy(options_.restore_from, options_.db_path, fs::copy_options::recursive, ec);
    if (ec) return IoError(fmt::format("replay: copying checkpoint {}: {}", options_.restore_from, ec.message()));
    spdlog::info("replay: restored checkpoint {} into {}", options_.restore_from, options_.db_path);
  }
  fs::create_directories(options_.db_path, ec);

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  // The WAL is the durability mechanism: never disabled, recovered up to the last whole record.
  db_options.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  db_options.max_background_jobs = 2;
  rocksdb::ColumnFamilyOptions cf_options;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (const char* name : {"default", "tasks", "leases", "trajectories", "groups", "meta"})
    cfs.emplace_back(name, cf_options);
  rocksdb::DB* db = nullptr;
  RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(db_options, options_.db_path, cfs, &handles_, &db),
                            "replay: opening " + options_.db_path));
  db_.reset(db);
  tasks_cf_ = handles_[1];
  leases_cf_ = handles_[2];
  traj_cf_ = handles_[3];
  groups_cf_ = handles_[4];
  meta_cf_ = handles_[5];
  if (options_.registry) {
    metrics_ = std::make_unique<Metrics>(*options_.registry);
    metrics_->in_flight_limit->Set(static_cast<double>(limiter_.bound()));
    metrics_->max_staleness->Set(static_cast<double>(options_.max_staleness));
  }
  return OkStatus();
}

Status ReplayStore::Recover() {
  std::lock_guard<std::mutex> lock(mu_);
  std::string value;
  rocksdb::ReadOptions ro;
  auto s = db_->Get(ro, meta_cf_, kStateKey, &value);
  if (s.ok()) {
    ASSIGN_OR_RETURN(state_, DecodeState(value));
  } else if (!s.IsNotFound()) {
    return FromRocks(s, "replay: reading state");
  }
  s = db_->Get(ro, meta_cf_, kDatasetKey, &value);
  if (s.ok()) {
    ASSIGN_OR_RETURN(dataset_, DecodeDataset(value));
    has_dataset_ = true;
    order_ = std::make_unique<DispatchOrder>(dataset_.size, options_.shuffle_seed, options_.shuffle,
                                             options_.epochs);
  } else if (!s.IsNotFound()) {
    return FromRocks(s, "replay: reading dataset info");
  }

  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, meta_cf_));
  for (it->Seek(std::string(kRequeuePrefix)); it->Valid() && it->key().starts_with(kRequeuePrefix); it->Next()) {
    ASSIGN_OR_RETURN(uint64_t seq, DecodeU64Key(it->key().ToStringView().substr(kRequeuePrefix.size())));
    ASSIGN_OR_RETURN(uint64_t task, DecodeU64Key(it->value().ToStringView()));
    requeue_[seq] = task;
  }
  for (it->Seek(std::string(kBatchPrefix)); it->Valid() && it->key().starts_with(kBatchPrefix); it->Next()) {
    ASSIGN_OR_RETURN(uint64_t id, DecodeU64Key(it->key().ToStringView().substr(kBatchPrefix.size())));
    remembered_requests_.push_back(id);
  }
  for (it->Seek(std::string(kLeaseReqPrefix)); it->Valid() && it->key().starts_with(kLeaseReqPrefix);
       it->Next()) {
    std::string actor(it->key().ToStringView().substr(kLeaseReqPrefix.size()));
    auto v = it->value().ToStringView();
    if (v.size() != 16) return DataLoss("replay: corrupt lease request record of " + actor);
    ASSIGN_OR_RETURN(uint64_t req, DecodeU64Key(v.substr(0, 8)));
    ASSIGN_OR_RETURN(uint64_t lease, DecodeU64Key(v.substr(8)));
    lease_requests_[actor] = {req, lease};
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "replay: scanning meta"));

  it.reset(db_->NewIterator(ro, leases_cf_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    ASSIGN_OR_RETURN(LeaseRecord l, DecodeLease(it->value().ToStringView()));
    leases_[l.id] = std::move(l);
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "replay: scanning leases"));

  it.reset(db_->NewIterator(ro, groups_cf_));
  std::unique_ptr<rocksdb::Iterator> samples(db_->NewIterator(ro, traj_cf_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    ASSIGN_OR_RETURN(GroupRecord g, DecodeGroup(it->key().ToStringView(), it->value().ToStringView()));
    switch (g.state) {
      case GroupState::kLeased: {
        LiveGroup live;
        live.have.assign(g.group_size, false);
        std::string prefix = TrajectoryPrefix(g.id);
        for (samples->Seek(prefix); samples->Valid() && samples->key().starts_with(prefix); samples->Next()) {
          auto key = samples->key().ToStringView();
          uint32_t idx = 0;
          for (char c : key.substr(prefix.size())) idx = (idx << 8) | static_cast<uint8_t>(c);
          if (idx >= g.group_size) return DataLoss("replay: sample index out of range in " + g.id);
          ASSIGN_OR_RETURN(auto msg, StoredMessage::Parse(samples->value().ToStringView()));
          auto st = msg->Root<proto::ScoredTrajectory>();
          live.have[idx] = true;
          ++live.stored;
          live.rewards.push_back(st.getReward());
          live.min_version =
              std::min(live.min_version, SampleMinVersion(st.getTrajectory(), g.dispatch_version));
        }
        live.record = g;
        ++leased_;
        live_.emplace(g.id, std::move(live));
        break;
      }
      case GroupState::kComplete: {
        complete_fifo_[g.complete_seq] = g.id;
        LiveGroup live;
        live.stored = g.group_size;
        live.min_version = g.min_version;
        live.record = g;
        live_.emplace(g.id, std::move(live));
        break;
      }
      default:
        ScheduleRetention(g.closed_version, g.id);
        break;
    }
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "replay: scanning groups"));
  counts_.learner_version = state_.learner_version;
  RefreshGaugesLocked();
  spdlog::info("replay: opened {}: dataset {} tasks, epoch {} position {}, {} leases, {} incomplete and "
               "{} complete groups, {} served, learner version {}",
               options_.db_path, dataset_.size, state_.epoch, state_.position, leases_.size(), leased_,
               complete_fifo_.size(), state_.served_total, state_.learner_version);
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Helpers

Status ReplayStore::Write(rocksdb::WriteBatch* batch) {
  rocksdb::WriteOptions wo;
  wo.sync = options_.durability == Durability::kSync;
  wo.disableWAL = false;
  return FromRocks(db_->Write(wo, batch), "replay: write");
}

void ReplayStore::ScheduleRetention(uint64_t closed_version, const std::string& group_id) {
  if (options_.retention_steps >= 0) retention_.emplace(closed_version, group_id);
}

bool ReplayStore::FinishedLocked() const {
  if (!has_dataset_) return false;
  DispatchCursor c{state_.epoch, state_.position};
  return order_->Exhausted(c) && requeue_.empty() && live_.empty();
}

Result<std::string> ReplayStore::GetTaskBytes(uint64_t task_index) {
  std::string v;
  RETURN_IF_ERROR(FromRocks(db_->Get(rocksdb::ReadOptions(), tasks_cf_, U64Key(task_index), &v),
                            fmt::format("replay: reading task {}", task_index)));
  return v;
}

void ReplayStore::CountReject(const std::string& reason) {
  ++counts_.rejected[reason];
  if (reason == "lease_expired") ++counts_.late_samples;
  if (metrics_) {
    auto it = metrics_->rejected.find(reason);
    if (it != metrics_->rejected.end()) it->second->Increment();
  }
}

void ReplayStore::RefreshGaugesLocked() {
  counts_.learner_version = state_.learner_version;
  if (!metrics_) return;
  DispatchCursor c{state_.epoch, state_.position};
  uint64_t remaining = order_ ? order_->Remaining(c) : 0;
  metrics_->tasks_queued->Set(static_cast<double>(std::min<uint64_t>(remaining, dataset_.size) + requeue_.size()));
  metrics_->leases_active->Set(static_cast<double>(leases_.size()));
  metrics_->groups_incomplete->Set(static_cast<double>(leased_));
  metrics_->groups_complete->Set(static_cast<double>(complete_fifo_.size()));
  metrics_->in_flight->Set(static_cast<double>(InFlightLocked()));
  metrics_->learner_version->Set(static_cast<double>(state_.learner_version));
  metrics_->epoch->Set(state_.epoch);
  metrics_->paused->Set(paused_ ? 1 : 0);
}

// ---------------------------------------------------------------------------------------------
// Dataset

bool ReplayStore::has_dataset() const {
  std::lock_guard<std::mutex> lock(mu_);
  return has_dataset_;
}

Result<ReplayStore::LoadReport> ReplayStore::LoadDataset(const std::string& path, bool skip_bad) {
  std::lock_guard<std::mutex> lock(mu_);
  LoadReport report;
  // Fingerprint first, so a DB that holds this file already is not rewritten.
  uint64_t fingerprint = Fnv1a64("");
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) return NotFound(path + ": cannot open dataset");
    char buf[1 << 16];
    while (in.read(buf, sizeof buf) || in.gcount() > 0)
      fingerprint = Fnv1a64(std::string_view(buf, static_cast<size_t>(in.gcount())), fingerprint);
  }
  if (has_dataset_) {
    if (dataset_.fingerprint != fingerprint)
      return FailedPrecondition(fmt::format(
          "replay: the db already holds dataset {} ({} tasks) and {} differs; use a fresh --db",
          dataset_.path, dataset_.size, path));
    report.already_loaded = true;
    report.tasks = dataset_.size;
    report.skipped = dataset_.skipped;
    return report;
  }
  // Tasks go in unsynced batches; the dataset record goes last in a synced one. A crash mid-load
  // leaves no dataset record, and the next start loads again over the same keys.
  rocksdb::WriteBatch batch;
  uint64_t index = 0;
  auto flush = [&]() -> Status {
    rocksdb::WriteOptions wo;
    RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "replay: loading dataset"));
    batch.Clear();
    return OkStatus();
  };
  DatasetReadReport read;
  RETURN_IF_ERROR(ReadDatasetJsonl(
      path, DatasetReadOptions{skip_bad},
      [&](uint64_t, proto::Task::Reader task) -> Status {
        capnp::MallocMessageBuilder message;
        message.setRoot(task);
        batch.Put(tasks_cf_, U64Key(index++), MessageBytes(message));
        if (batch.Count() >= 4096) RETURN_IF_ERROR(flush());
        return OkStatus();
      },
      &read));
  if (read.records == 0)
    return InvalidArgument(fmt::format("{}: no valid records ({} skipped{}{})", path, read.skipped,
                                       read.first_error.empty() ? "" : "; first: ", read.first_error));
  DatasetInfo info{read.records, read.skipped, fingerprint, path};
  batch.Put(meta_cf_, kDatasetKey, EncodeDataset(info));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "replay: loading dataset"));
  dataset_ = info;
  has_dataset_ = true;
  order_ = std::make_unique<DispatchOrder>(dataset_.size, options_.shuffle_seed, options_.shuffle,
                                           options_.epochs);
  report.tasks = read.records;
  report.skipped = read.skipped;
  report.first_error = read.first_error;
  if (read.skipped)
    spdlog::warn("replay: skipped {} malformed dataset lines; first: {}", read.skipped, read.first_error);
  spdlog::info("replay: loaded {} tasks from {}", read.records, path);
  RefreshGaugesLocked();
  return report;
}

// ---------------------------------------------------------------------------------------------
// Leases

Status ReplayStore::FillLeaseReply(const LeaseRecord& lease, proto::PromptLease::Builder reply) {
  reply.setLeaseId(lease.id);
  reply.setDeadlineUnixMs(lease.deadline_ms);
  reply.setPolicyVersion(lease.policy_version);
  auto tasks = reply.initTasks(static_cast<unsigned>(lease.group_ids.size()));
  for (size_t i = 0; i < lease.group_ids.size(); ++i) {
    uint64_t task_index = 0;
    uint32_t group_size = options_.group_size;
    auto live = live_.find(lease.group_ids[i]);
    if (live != live_.end()) {
      task_index = live->second.record.task_index;
      group_size = live->second.record.group_size;
    } else {
      std::string v;
      RETURN_IF_ERROR(FromRocks(db_->Get(rocksdb::ReadOptions(), groups_cf_, lease.group_ids[i], &v),
                                "replay: reading group " + lease.group_ids[i]));
      ASSIGN_OR_RETURN(GroupRecord g, DecodeGroup(lease.group_ids[i], v));
      task_index = g.task_index;
      group_size = g.group_size;
    }
    ASSIGN_OR_RETURN(std::string bytes, GetTaskBytes(task_index));
    ASSIGN_OR_RETURN(auto msg, StoredMessage::Parse(bytes));
    tasks[i].setGroupId(lease.group_ids[i]);
    tasks[i].setGroupSize(group_size);
    tasks[i].setTask(msg->Root<proto::Task>());
  }
  return OkStatus();
}

Status ReplayStore::Lease(proto::LeaseRequest::Reader request, proto::PromptLease::Builder reply) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = Now();
  RETURN_IF_ERROR(ExpireLocked(now));
  const std::string actor = request.getActorId();
  const uint64_t request_id = request.getRequestId();
  reply.setPolicyVersion(state_.learner_version);
  if (request_id != 0) {
    auto it = lease_requests_.find(actor);
    if (it != lease_requests_.end() && it->second.first == request_id) {
      auto lease = leases_.find(it->second.second);
      if (lease != leases_.end()) return FillLeaseReply(lease->second, reply);
      // The lease is resolved already (expired or complete): nothing more to hand out for it.
      reply.setRetryAfterMs(options_.poll_after_ms);
      return OkStatus();
    }
  }
  auto empty = [&]() {
    const bool finished = FinishedLocked();
    const bool idle = paused_ || !has_dataset_ || finished;
    reply.setRetryAfterMs(idle ? options_.retry_after_ms : options_.poll_after_ms);
    reply.setFinished(finished);
    return OkStatus();
  };
  if (paused_ || !has_dataset_) return empty();
  // Replay learns the learner's version from its batch requests, one step late: once a whole
  // step's groups have been served at version L, the learner is training and its next request
  // will say L + 1. Leases are judged against that.
  const uint64_t learner_version =
      state_.learner_version + (served_at_version_ >= std::max<uint64_t>(1, options_.groups_per_step) ? 1 : 0);
  // An actor whose weights are already past the staleness bound would generate samples that
  // ServeBatch must drop: it gets no prompts until it has swapped in newer weights (the reply's
  // policyVersion tells it which version replay expects).
  if (request.getPolicyVersion() + options_.max_staleness < learner_version) {
    ++counts_.stale_lease_refusals;
    if (metrics_) metrics_->stale_lease_refusals->Increment();
    return empty();
  }
  uint64_t want = std::min<uint64_t>(request.getMaxTasks(), kMaxTasksPerLease);
  const uint64_t in_flight = InFlightLocked();
  uint64_t grant = limiter_.Grant(want, in_flight);
  if (grant == 0) return empty();
  // The new groups are trained on after the ones already in flight, groups_per_step per learner
  // step, so the last of them by about learner version + (in_flight + grant - 1) / groups_per_step.
  // An actor behind the learner can only fill what its version carries within max_staleness; more
  // would be generated only to be dropped by ServeBatch (seen with three GPU actors at
  // max_staleness 1: a third of every step's groups thrown away). For an actor at the learner's
  // version this is the default in-flight bound itself; an explicit max_in_flight is the
  // operator's choice and is left alone.
  if (options_.max_in_flight == 0) {
    const uint64_t steps_left = request.getPolicyVersion() + options_.max_staleness + 1 - learner_version;
    const uint64_t carried = steps_left * std::max<uint64_t>(1, options_.groups_per_step);
    grant = std::min(grant, carried > in_flight ? carried - in_flight : 0);
  }
  if (grant == 0) {
    ++counts_.stale_lease_refusals;
    if (metrics_) metrics_->stale_lease_refusals->Increment();
    return empty();
  }

  ReplayState next = state_;
  std::vector<uint64_t> tasks;
  std::vector<uint64_t> requeue_used;
  for (auto it = requeue_.begin(); it != requeue_.end() && tasks.size() < grant; ++it) {
    tasks.push_back(it->second);
    requeue_used.push_back(it->first);
  }
  DispatchCursor cursor{next.epoch, next.position};
  while (tasks.size() < grant) {
    auto t = order_->Next(&cursor);
    if (!t) break;
    tasks.push_back(*t);
  }
  if (tasks.empty()) return empty();
  next.epoch = cursor.epoch;
  next.position = cursor.position;

  LeaseRecord lease;
  lease.id = next.next_lease_id++;
  lease.actor = actor;
  lease.request_id = request_id;
  lease.deadline_ms = now + options_.lease_timeout_ms;
  lease.policy_version = state_.learner_version;
  std::vector<GroupRecord> groups;
  rocksdb::WriteBatch batch;
  for (uint64_t task : tasks) {
    GroupRecord g;
    g.id = GroupId(next.next_group++);
    g.task_index = task;
    g.group_size = options_.group_size;
    g.state = GroupState::kLeased;
    g.lease_id = lease.id;
    g.deadline_ms = lease.deadline_ms;
    g.dispatch_version = state_.learner_version;
    batch.Put(groups_cf_, g.id, EncodeGroup(g));
    lease.group_ids.push_back(g.id);
    groups.push_back(std::move(g));
  }
  batch.Put(leases_cf_, U64Key(lease.id), EncodeLease(lease));
  for (uint64_t seq : requeue_used) batch.Delete(meta_cf_, Key(kRequeuePrefix, U64Key(seq)));
  if (request_id != 0)
    batch.Put(meta_cf_, Key(kLeaseReqPrefix, actor), U64Key(request_id) + U64Key(lease.id));
  batch.Put(meta_cf_, kStateKey, EncodeState(next));
  RETURN_IF_ERROR(Write(&batch));

  state_ = next;
  for (uint64_t seq : requeue_used) requeue_.erase(seq);
  for (auto& g : groups) {
    LiveGroup live;
    live.have.assign(g.group_size, false);
    live.record = g;
    live_.emplace(g.id, std::move(live));
    ++leased_;
  }
  if (request_id != 0) lease_requests_[actor] = {request_id, lease.id};
  if (metrics_) metrics_->leased_tasks->Increment(static_cast<double>(tasks.size()));
  auto [ins, _] = leases_.emplace(lease.id, std::move(lease));
  RefreshGaugesLocked();
  return FillLeaseReply(ins->second, reply);
}

Status ReplayStore::ExpireLeases() {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(ExpireLocked(Now()));
  if (metrics_) metrics_->disk_bytes->Set(static_cast<double>(DiskBytes()));
  return OkStatus();
}

Status ReplayStore::ExpireLocked(int64_t now) {
  std::vector<uint64_t> expired;
  for (const auto& [id, lease] : leases_)
    if (lease.deadline_ms <= now) expired.push_back(id);
  if (expired.empty()) return OkStatus();
  ReplayState next = state_;
  rocksdb::WriteBatch batch;
  std::vector<std::pair<uint64_t, uint64_t>> requeued;  // seq, task
  std::vector<std::string> closed;
  for (uint64_t id : expired) {
    for (const std::string& gid : leases_[id].group_ids) {
      auto it = live_.find(gid);
      if (it == live_.end() || it->second.record.state != GroupState::kLeased) continue;
      GroupRecord g = it->second.record;
      g.state = GroupState::kExpired;
      g.closed_version = state_.learner_version;
      batch.Put(groups_cf_, gid, EncodeGroup(g));
      for (uint32_t i = 0; i < g.group_size; ++i)
        if (it->second.have[i]) batch.Delete(traj_cf_, TrajectoryKey(gid, i));
      uint64_t seq = next.next_requeue_seq++;
      batch.Put(meta_cf_, Key(kRequeuePrefix, U64Key(seq)), U64Key(g.task_index));
      requeued.emplace_back(seq, g.task_index);
      closed.push_back(gid);
    }
    batch.Delete(leases_cf_, U64Key(id));
  }
  batch.Put(meta_cf_, kStateKey, EncodeState(next));
  RETURN_IF_ERROR(Write(&batch));
  state_ = next;
  for (const auto& gid : closed) {
    live_.erase(gid);
    --leased_;
    ScheduleRetention(state_.learner_version, gid);
  }
  for (auto [seq, task] : requeued) requeue_[seq] = task;
  for (uint64_t id : expired) leases_.erase(id);
  counts_.expired_groups += closed.size();
  if (metrics_) metrics_->dropped_expired->Increment(static_cast<double>(closed.size()));
  if (!closed.empty())
    spdlog::info("replay: {} leases expired; {} incomplete groups requeued", expired.size(), closed.size());
  RefreshGaugesLocked();
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Ingest

Result<std::vector<IngestResult>> ReplayStore::Ingest(
    const std::vector<proto::ScoredTrajectory::Reader>& items) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(ExpireLocked(Now()));
  std::vector<IngestResult> results(items.size());
  rocksdb::WriteBatch batch;
  struct Added {
    uint32_t index;
    float reward;
    uint64_t min_version;
  };
  std::unordered_map<std::string, std::vector<Added>> added;  // live group -> new samples
  uint64_t stored = 0, stored_bytes = 0, duplicates = 0;
  std::vector<std::string> rejects;

  for (size_t i = 0; i < items.size(); ++i) {
    auto reject = [&](const char* reason) {
      results[i] = {IngestOutcome::kRejected, reason};
      rejects.emplace_back(reason);
    };
    try {
      auto st = items[i];
      uint64_t bytes = st.totalSize().wordCount * sizeof(capnp::word);
      if (bytes > options_.max_trajectory_bytes) {
        reject("oversized");
        continue;
      }
      auto traj = st.getTrajectory();
      auto gid_text = traj.getGroupId();
      if (gid_text.size() > kMaxGroupIdBytes) {
        reject("unknown_group");
        continue;
      }
      std::string gid(gid_text.cStr(), gid_text.size());
      uint32_t index = traj.getSampleIndex();
      auto live = live_.find(gid);
      if (live == live_.end()) {
        // Not live: a closed group (served, expired, ...) or none of ours.
        std::string v;
        auto s = db_->Get(rocksdb::ReadOptions(), groups_cf_, gid, &v);
        if (s.IsNotFound()) {
          reject("unknown_group");
          continue;
        }
        RETURN_IF_ERROR(FromRocks(s, "replay: reading group " + gid));
        ASSIGN_OR_RETURN(GroupRecord g, DecodeGroup(gid, v));
        if (g.state == GroupState::kExpired) {
          reject("lease_expired");
        } else if (index >= g.group_size) {
          reject("bad_sample_index");
        } else {
          std::string ignored;
          auto e = db_->Get(rocksdb::ReadOptions(), traj_cf_, TrajectoryKey(gid, index), &ignored);
          if (e.ok()) {
            results[i] = {IngestOutcome::kDuplicate, ""};
            ++duplicates;
          } else if (e.IsNotFound()) {
            reject("group_closed");
          } else {
            return FromRocks(e, "replay: reading sample");
          }
        }
        continue;
      }
      LiveGroup& g = live->second;
      if (index >= g.record.group_size) {
        reject("bad_sample_index");
        continue;
      }
      bool dup = g.record.state != GroupState::kLeased || g.have[index];
      if (!dup) {
        auto a = added.find(gid);
        if (a != added.end())
          for (const auto& x : a->second) dup = dup || x.index == index;
      }
      if (dup) {
        results[i] = {IngestOutcome::kDuplicate, ""};
        ++duplicates;
        continue;
      }
      // One segment sized to fit, serialised straight into the write batch (no extra copy).
      capnp::MallocMessageBuilder copy(static_cast<unsigned>(bytes / sizeof(capnp::word) + 8));
      copy.setRoot(st);
      kj::Array<capnp::word> words = capnp::messageToFlatArray(copy);
      auto value = words.asBytes();
      stored_bytes += value.size();
      batch.Put(traj_cf_, TrajectoryKey(gid, index),
                rocksdb::Slice(reinterpret_cast<const char*>(value.begin()), value.size()));
      added[gid].push_back({index, st.getReward(), SampleMinVersion(traj, g.record.dispatch_version)});
      results[i] = {IngestOutcome::kStored, ""};
      ++stored;
    } catch (const kj::Exception& e) {
      // A message that passed envelope validation can still hold bad text (no NUL): it can never
      // be stored, so reject it for good rather than have its sender resend it forever.
      reject("malformed");
    }
  }

  // Completions: a group whose G samples are now all stored.
  ReplayState next = state_;
  struct Completion {
    std::string gid;
    GroupRecord record;
  };
  std::vector<Completion> completions;
  std::set<uint64_t> touched_leases;
  for (auto& [gid, news] : added) {
    LiveGroup& g = live_.at(gid);
    if (g.stored + news.size() < g.record.group_size) continue;
    GroupRecord r = g.record;
    uint64_t min_version = g.min_version;
    std::vector<float> rewards = g.rewards;
    for (const auto& x : news) {
      min_version = std::min(min_version, x.min_version);
      rewards.push_back(x.reward);
    }
    r.min_version = min_version;
    if (options_.dynamic_sampling && AllEqual(rewards)) {
      r.state = GroupState::kFiltered;
      r.closed_version = state_.learner_version;
    } else {
      r.state = GroupState::kComplete;
      r.complete_seq = next.next_complete_seq++;
    }
    batch.Put(groups_cf_, gid, EncodeGroup(r));
    touched_leases.insert(r.lease_id);
    completions.push_back({gid, r});
  }
  // A lease whose groups are all complete is resolved: drop it now rather than at its deadline.
  std::set<std::string> completing;
  for (const auto& c : completions) completing.insert(c.gid);
  std::vector<uint64_t> resolved_leases;
  for (uint64_t id : touched_leases) {
    auto l = leases_.find(id);
    if (l == leases_.end()) continue;
    bool open = false;
    for (const auto& gid : l->second.group_ids) {
      auto it = live_.find(gid);
      open = open || (it != live_.end() && it->second.record.state == GroupState::kLeased &&
                      !completing.count(gid));
    }
    if (!open) {
      batch.Delete(leases_cf_, U64Key(id));
      resolved_leases.push_back(id);
    }
  }
  if (batch.Count() > 0) {
    batch.Put(meta_cf_, kStateKey, EncodeState(next));
    RETURN_IF_ERROR(Write(&batch));
  }

  // Durable: apply to memory.
  state_ = next;
  for (auto& [gid, news] : added) {
    LiveGroup& g = live_.at(gid);
    for (const auto& x : news) {
      g.have[x.index] = true;
      ++g.stored;
      g.rewards.push_back(x.reward);
      g.min_version = std::min(g.min_version, x.min_version);
    }
  }
  for (auto& c : completions) {
    --leased_;
    if (c.record.state == GroupState::kFiltered) {
      live_.erase(c.gid);
      ScheduleRetention(c.record.closed_version, c.gid);
      ++counts_.filtered_groups;
      if (metrics_) metrics_->dropped_filtered->Increment();
    } else {
      LiveGroup& g = live_.at(c.gid);
      g.record = c.record;
      g.have.clear();
      g.rewards.clear();
      complete_fifo_[c.record.complete_seq] = c.gid;
    }
    if (metrics_) metrics_->completed->Increment();
  }
  for (uint64_t id : resolved_leases) leases_.erase(id);
  counts_.ingested += stored;
  counts_.duplicates += duplicates;
  for (const auto& r : rejects) CountReject(r);
  if (metrics_) {
    metrics_->ingested->Increment(static_cast<double>(stored));
    metrics_->ingested_bytes->Increment(static_cast<double>(stored_bytes));
    metrics_->duplicates->Increment(static_cast<double>(duplicates));
  }
  RefreshGaugesLocked();
  return results;
}

// ---------------------------------------------------------------------------------------------
// Serving

Status ReplayStore::FillBatchReply(uint64_t request_id, const std::vector<std::string>& group_ids,
                                   proto::Batch::Builder reply) {
  reply.setRequestId(request_id);
  auto groups = reply.initGroups(static_cast<unsigned>(group_ids.size()));
  rocksdb::ReadOptions ro;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, traj_cf_));
  for (size_t i = 0; i < group_ids.size(); ++i) {
    const std::string& gid = group_ids[i];
    std::string v;
    RETURN_IF_ERROR(FromRocks(db_->Get(ro, groups_cf_, gid, &v), "replay: reading group " + gid));
    ASSIGN_OR_RETURN(GroupRecord g, DecodeGroup(gid, v));
    std::vector<std::unique_ptr<StoredMessage>> samples;
    std::string prefix = TrajectoryPrefix(gid);
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
      ASSIGN_OR_RETURN(auto msg, StoredMessage::Parse(it->value().ToStringView()));
      samples.push_back(std::move(msg));
    }
    RETURN_IF_ERROR(FromRocks(it->status(), "replay: reading samples of " + gid));
    if (samples.size() != g.group_size)
      return DataLoss(fmt::format("replay: group {} has {} of {} samples", gid, samples.size(), g.group_size));
    groups[i].setGroupId(gid);
    groups[i].setMinVersion(g.min_version);
    auto list = groups[i].initSamples(static_cast<unsigned>(samples.size()));
    for (size_t j = 0; j < samples.size(); ++j)
      list.setWithCaveats(static_cast<unsigned>(j), samples[j]->Root<proto::ScoredTrajectory>());
  }
  return OkStatus();
}

void ReplayStore::RetainLocked(rocksdb::WriteBatch* batch, std::vector<std::string>* deleted) {
  if (options_.retention_steps < 0) return;
  for (const auto& [closed, gid] : retention_) {
    if (closed + static_cast<uint64_t>(options_.retention_steps) >= state_.learner_version) break;
    // Trajectory keys of a group are contiguous; point deletes keep reads free of range tombstones.
    std::string v;
    uint32_t group_size = options_.group_size;
    if (db_->Get(rocksdb::ReadOptions(), groups_cf_, gid, &v).ok()) {
      auto g = DecodeGroup(gid, v);
      if (g.ok()) group_size = g->group_size;
    }
    for (uint32_t i = 0; i < group_size; ++i) batch->Delete(traj_cf_, TrajectoryKey(gid, i));
    batch->Delete(groups_cf_, gid);
    deleted->push_back(gid);
  }
}

Status ReplayStore::ServeBatch(proto::BatchRequest::Reader request, proto::Batch::Builder reply) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(ExpireLocked(Now()));
  const uint64_t request_id = request.getRequestId();
  if (request_id != 0) {
    std::string v;
    auto s = db_->Get(rocksdb::ReadOptions(), meta_cf_, Key(kBatchPrefix, U64Key(request_id)), &v);
    if (s.ok()) {
      // A retry: the groups of this request were served already; send the same ones again.
      ASSIGN_OR_RETURN(std::vector<std::string> ids, DecodeStringList(v));
      return FillBatchReply(request_id, ids, reply);
    }
    if (!s.IsNotFound()) return FromRocks(s, "replay: reading batch request");
  }
  ReplayState next = state_;
  next.learner_version = std::max(state_.learner_version, request.getLearnerVersion());
  const uint64_t lv = next.learner_version;
  const uint32_t want = std::min(request.getNumGroups(), kMaxGroupsPerBatch);

  std::vector<std::pair<uint64_t, std::string>> taken, stale;  // (complete_seq, id)
  std::vector<uint64_t> staleness_of_taken;
  for (const auto& [seq, gid] : complete_fifo_) {
    if (taken.size() >= want) break;
    const LiveGroup& g = live_.at(gid);
    uint64_t staleness = lv > g.min_version ? lv - g.min_version : 0;
    if (staleness > options_.max_staleness) {
      stale.emplace_back(seq, gid);
    } else {
      taken.emplace_back(seq, gid);
      staleness_of_taken.push_back(staleness);
    }
  }

  rocksdb::WriteBatch batch;
  std::vector<std::string> taken_ids;
  for (const auto& [seq, gid] : taken) {
    GroupRecord r = live_.at(gid).record;
    r.state = GroupState::kServed;
    r.request_id = request_id;
    r.closed_version = lv;
    batch.Put(groups_cf_, gid, EncodeGroup(r));
    taken_ids.push_back(gid);
  }
  std::vector<std::pair<uint64_t, uint64_t>> requeued;
  for (const auto& [seq, gid] : stale) {
    GroupRecord r = live_.at(gid).record;
    r.state = GroupState::kStale;
    r.closed_version = lv;
    batch.Put(groups_cf_, gid, EncodeGroup(r));
    uint64_t rseq = next.next_requeue_seq++;
    batch.Put(meta_cf_, Key(kRequeuePrefix, U64Key(rseq)), U64Key(r.task_index));
    requeued.emplace_back(rseq, r.task_index);
  }
  next.served_total += taken.size();
  std::vector<uint64_t> forget;
  if (request_id != 0 && !taken.empty()) {
    batch.Put(meta_cf_, Key(kBatchPrefix, U64Key(request_id)), EncodeStringList(taken_ids));
    size_t keep = std::max<size_t>(options_.remembered_requests, 1);
    for (size_t i = 0; i + keep <= remembered_requests_.size(); ++i) {
      forget.push_back(remembered_requests_[i]);
      batch.Delete(meta_cf_, Key(kBatchPrefix, U64Key(remembered_requests_[i])));
    }
  }
  std::vector<std::string> deleted;
  {
    ReplayState saved = state_;
    state_.learner_version = lv;  // retention runs against the new learner version
    RetainLocked(&batch, &deleted);
    state_ = saved;
  }
  if (batch.Count() > 0 || next.learner_version != state_.learner_version) {
    batch.Put(meta_cf_, kStateKey, EncodeState(next));
    RETURN_IF_ERROR(Write(&batch));
  }

  if (next.learner_version != state_.learner_version) served_at_version_ = 0;
  served_at_version_ += taken.size();
  state_ = next;
  for (const auto& [seq, gid] : taken) {
    complete_fifo_.erase(seq);
    live_.erase(gid);
  }
  for (const auto& [seq, gid] : stale) {
    complete_fifo_.erase(seq);
    live_.erase(gid);
  }
  for (size_t i = 0; i < deleted.size(); ++i) retention_.erase(retention_.begin());
  for (const auto& [seq, gid] : taken) ScheduleRetention(lv, gid);
  for (const auto& [seq, gid] : stale) ScheduleRetention(lv, gid);
  for (auto [seq, task] : requeued) requeue_[seq] = task;
  for (size_t i = 0; i < forget.size(); ++i) remembered_requests_.pop_front();
  if (request_id != 0 && !taken.empty()) remembered_requests_.push_back(request_id);
  counts_.stale_groups += stale.size();
  counts_.deleted_groups += deleted.size();
  if (metrics_) {
    metrics_->served->Increment(static_cast<double>(taken.size()));
    metrics_->dropped_stale->Increment(static_cast<double>(stale.size()));
    metrics_->deleted->Increment(static_cast<double>(deleted.size()));
    for (uint64_t s : staleness_of_taken) metrics_->staleness->Observe(static_cast<double>(s));
  }
  if (!stale.empty())
    spdlog::info("replay: dropped {} groups older than max_staleness {} at learner version {}", stale.size(),
                 options_.max_staleness, lv);
  RefreshGaugesLocked();

  RETURN_IF_ERROR(FillBatchReply(request_id, taken_ids, reply));
  reply.setDroppedStale(stale_since_last_batch_ + static_cast<uint32_t>(stale.size()));
  stale_since_last_batch_ = 0;
  const bool finished = taken.empty() && FinishedLocked();
  if (taken.size() < want) reply.setRetryAfterMs(paused_ || finished ? options_.retry_after_ms : options_.poll_after_ms);
  reply.setFinished(finished);
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Control

Status ReplayStore::Checkpoint(const std::string& dir) {
  std::lock_guard<std::mutex> lock(mu_);
  std::error_code ec;
  if (fs::exists(dir, ec)) return AlreadyExists("replay: checkpoint directory " + dir + " exists");
  if (fs::path(dir).has_parent_path()) fs::create_directories(fs::path(dir).parent_path(), ec);
  rocksdb::Checkpoint* raw = nullptr;
  RETURN_IF_ERROR(FromRocks(rocksdb::Checkpoint::Create(db_.get(), &raw), "replay: checkpoint"));
  std::unique_ptr<rocksdb::Checkpoint> cp(raw);
  RETURN_IF_ERROR(FromRocks(cp->CreateCheckpoint(dir), "replay: checkpoint into " + dir));
  spdlog::info("replay: checkpoint written to {}", dir);
  return OkStatus();
}

void ReplayStore::SetPaused(bool paused) {
  std::lock_guard<std::mutex> lock(mu_);
  paused_ = paused;
  RefreshGaugesLocked();
}

uint64_t ReplayStore::DiskBytes() const {
  uint64_t total = 0;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(options_.db_path, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code ec2;
    if (it->is_regular_file(ec2)) total += it->file_size(ec2);
  }
  return total;
}

ReplayCounts ReplayStore::Counts() const {
  std::lock_guard<std::mutex> lock(mu_);
  ReplayCounts c = counts_;
  c.tasks_total = dataset_.size;
  DispatchCursor cursor{state_.epoch, state_.position};
  uint64_t remaining = order_ ? order_->Remaining(cursor) : 0;
  c.requeued = requeue_.size();
  c.tasks_queued = (remaining == UINT64_MAX ? dataset_.size : remaining) + requeue_.size();
  c.leases_active = leases_.size();
  c.groups_incomplete = leased_;
  c.groups_complete = complete_fifo_.size();
  c.groups_served = state_.served_total;
  c.learner_version = state_.learner_version;
  c.epoch = state_.epoch;
  c.paused = paused_;
  c.finished = FinishedLocked();
  return c;
}

void ReplayStore::FillStatus(proto::ReplayStatus::Builder out) const {
  ReplayCounts c = Counts();
  out.setTasksQueued(c.tasks_queued);
  out.setLeasesActive(c.leases_active);
  out.setGroupsIncomplete(c.groups_incomplete);
  out.setGroupsComplete(c.groups_complete);
  out.setGroupsServed(c.groups_served);
  out.setDiskBytes(DiskBytes());
  out.setLearnerVersion(c.learner_version);
  out.setEpoch(c.epoch);
}

}  // namespace aha::replay
