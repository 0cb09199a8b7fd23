// ReplayStore: the job's durable state on RocksDB (shared/DESIGN.md §1).
//
// It owns the prompt dataset and its dispatch cursor, the lease table, every stored sample, the
// group assembler and the learner version. Every mutation is one RocksDB WriteBatch (WAL on) that
// also rewrites the small ReplayState record, so a restart finds the cursor, counters and group
// states of the last acknowledged write and nothing of a write that was not acknowledged.
//
// Rules (each has a test in tests/replay/store_test.cc):
//   - Leases: Lease() hands out up to maxTasks prompts, one group of G samples each, with a
//     deadline. A lease whose deadline passes expires: its incomplete groups are closed, their
//     samples deleted and their prompts requeued (served again before the cursor moves on).
//     A retried LeaseRequest (same actorId and requestId) gets the same lease back.
//   - Rate limit: leased + complete-but-unserved groups <= max_in_flight
//     (default (max_staleness + 1) x groups_per_step). With the default, an actor at policy
//     version a is also granted only what fits in the steps up to learner version
//     a + max_staleness behind the groups already in flight (the rest would be dropped as
//     stale); an actor past the bound gets nothing. Refusals count as stale_lease_refusals.
//     Once a whole step's groups are served at version L, leases count the learner as at L + 1
//     (it is training; its next request will say so).
//   - Ingest: idempotent by (group id, sample index). Rejected with a counted reason, never
//     stored: unknown_group, bad_sample_index, oversized, lease_expired (late sample of an
//     expired lease), group_closed. A duplicate is acknowledged (it is durable already).
//     A group is complete when all G samples are stored; with dynamic sampling a complete group
//     whose rewards are all equal is set aside (filtered) and counted.
//   - Serving: FIFO by completion. Only groups with learner_version - min_version <= max_staleness
//     are served; staler ones are dropped (counted, prompt requeued). Each group is served exactly
//     once: its served state and the request id are written in the same batch, and a retried
//     BatchRequest with the same requestId gets the same groups again, also after a restart.
//   - Retention: served, filtered, stale and expired groups are deleted with their samples once
//     the learner is retention_steps versions past the version at which they were closed.
//
// Thread-safety: all public methods are thread-safe (one mutex; writes are serial anyway).
// Cost: Lease O(n log L), Ingest O(batch) plus one synced write, ServeBatch O(K x G) reads plus one
// synced write; Open scans the groups and leases (O(stored groups)).
#pragma once

#include <prometheus/registry.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "proto/batch.capnp.h"
#include "proto/control.capnp.h"
#include "proto/task.capnp.h"
#include "proto/trajectory.capnp.h"
#include "replay/dispatch_order.h"
#include "replay/records.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class WriteBatch;
}  // namespace rocksdb

namespace aha::replay {

enum class Durability {
  kSync,      // fsync the WAL before a write is acknowledged: survives power loss (default)
  kBuffered,  // WAL in the OS page cache: survives a process crash, not a machine crash
};
Result<Durability> ParseDurability(const std::string& s);

struct ReplayOptions {
  std::string db_path;
  // Open a copy of this RocksDB checkpoint when db_path does not exist yet.
  std::string restore_from;
  Durability durability = Durability::kSync;
  uint32_t group_size = 8;           // G: samples per prompt
  uint32_t groups_per_step = 8;      // prompts per learner step
  uint32_t max_staleness = 1;
  uint64_t max_in_flight = 0;        // 0 = (max_staleness + 1) x groups_per_step
  int64_t lease_timeout_ms = 600'000;
  int64_t retention_steps = -1;      // -1 keeps consumed groups forever
  bool dynamic_sampling = false;
  bool shuffle = true;
  uint64_t shuffle_seed = 0;
  uint32_t epochs = 1;               // 0 = cycle forever
  uint64_t max_trajectory_bytes = 8u << 20;
  // Suggested waits when nothing can be handed out. While the job is live, what is missing is on
  // its way (groups being generated or scored, the learner finishing a step), so clients ask
  // again soon: a long hint here is dead time in every step of the loop (measured on H200s: the
  // learner slept 200 ms of a 240 ms step waiting for a step's last groups). Paused, without a
  // dataset or finished, nothing will change soon.
  uint32_t poll_after_ms = 5;
  uint32_t retry_after_ms = 200;
  size_t remembered_requests = 64;   // batch request ids kept for retries
  std::function<int64_t()> now_ms;   // unix ms; defaults to the system clock (tests inject one)
  prometheus::Registry* registry = nullptr;  // aha_replay_* metrics when set
};

enum class IngestOutcome { kStored, kDuplicate, kRejected };
struct IngestResult {
  IngestOutcome outcome = IngestOutcome::kStored;
  std::string reason;  // kRejected: unknown_group|bad_sample_index|oversized|lease_expired|group_closed
};

struct ReplayCounts {
  uint64_t tasks_total = 0;        // dataset size
  uint64_t tasks_queued = 0;       // left to hand out this job (requeued + cursor), capped for epochs=0
  uint64_t requeued = 0;
  uint64_t leases_active = 0;
  uint64_t groups_incomplete = 0;  // leased
  uint64_t groups_complete = 0;    // complete, not served yet
  uint64_t groups_served = 0;      // over the job's life
  uint64_t learner_version = 0;
  uint64_t stale_lease_refusals = 0;  // lease requests from actors past the staleness bound
  uint32_t epoch = 0;
  bool paused = false;
  bool finished = false;           // nothing more will ever be served
  // Since this process started:
  uint64_t ingested = 0, duplicates = 0, expired_groups = 0, stale_groups = 0, filtered_groups = 0,
           late_samples = 0, deleted_groups = 0;
  std::map<std::string, uint64_t> rejected;  // by reason
};

class ReplayStore {
 public:
  static Result<std::unique_ptr<ReplayStore>> Open(ReplayOptions options);
  ~ReplayStore();
  ReplayStore(const ReplayStore&) = delete;
  ReplayStore& operator=(const ReplayStore&) = delete;

  // Loads the JSONL dataset into the tasks column family, once: a DB that holds this file's
  // dataset already is left alone; one that holds another file's is FailedPrecondition.
  // Malformed lines fail the load ("PATH:LINE: field 'x': why") unless skip_bad.
  struct LoadReport {
    bool already_loaded = false;
    uint64_t tasks = 0, skipped = 0;
    std::string first_error;
  };
  Result<LoadReport> LoadDataset(const std::string& path, bool skip_bad);
  bool has_dataset() const;

  // Fills `reply` (PromptLease). Never fails for a valid store: an empty lease carries
  // retryAfterMs, or finished when the job has nothing left to hand out.
  Status Lease(proto::LeaseRequest::Reader request, proto::PromptLease::Builder reply);

  // Stores a batch of scored samples in one write; one IngestResult per sample, in order. A
  // non-ok Status (I/O) means nothing of the batch is stored and nothing may be acknowledged.
  Result<std::vector<IngestResult>> Ingest(const std::vector<proto::ScoredTrajectory::Reader>& batch);

  // Fills `reply` (Batch) with up to numGroups complete groups, see the serving rules above.
  Status ServeBatch(proto::BatchRequest::Reader request, proto::Batch::Builder reply);

  // Expires leases whose deadline passed (the other calls do it too; the daemon ticks it).
  Status ExpireLeases();
  // Writes a RocksDB checkpoint (hard links where possible) into `dir`, which must not exist.
  Status Checkpoint(const std::string& dir);
  void SetPaused(bool paused);
  ReplayCounts Counts() const;
  void FillStatus(proto::ReplayStatus::Builder out) const;
  // Bytes under the DB directory (SST, WAL, manifest).
  uint64_t DiskBytes() const;
  const ReplayOptions& options() const { return options_; }

 private:
  struct LiveGroup {
    GroupRecord record;
    std::vector<bool> have;       // leased groups: which samples are stored
    uint32_t stored = 0;
    uint64_t min_version = UINT64_MAX;
    std::vector<float> rewards;   // one per stored sample, for dynamic sampling
  };
  struct Metrics;

  explicit ReplayStore(ReplayOptions options);
  Status OpenDb();
  Status Recover();
  Status Write(rocksdb::WriteBatch* batch);
  void PutState(rocksdb::WriteBatch* batch);
  Status ExpireLocked(int64_t now);
  uint64_t InFlightLocked() const { return leased_ + complete_fifo_.size(); }
  bool FinishedLocked() const;
  Result<std::string> GetTaskBytes(uint64_t task_index);
  Status FillLeaseReply(const LeaseRecord& lease, proto::PromptLease::Builder reply);
  Status FillBatchReply(uint64_t request_id, const std::vector<std::string>& group_ids,
                        proto::Batch::Builder reply);
  void ScheduleRetention(uint64_t closed_version, const std::string& group_id);
  void RetainLocked(rocksdb::WriteBatch* batch, std::vector<std::string>* deleted);
  void RefreshGaugesLocked();
  void CountReject(const std::string& reason);
  int64_t Now() const { return options_.now_ms(); }

  ReplayOptions options_;
  InFlightLimiter limiter_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  rocksdb::ColumnFamilyHandle *tasks_cf_ = nullptr, *leases_cf_ = nullptr, *groups_cf_ = nullptr,
                              *traj_cf_ = nullptr, *meta_cf_ = nullptr;

  mutable std::mutex mu_;
  ReplayState state_;
  DatasetInfo dataset_;
  bool has_dataset_ = false;
  std::unique_ptr<DispatchOrder> order_;
  std::map<uint64_t, uint64_t> requeue_;                 // requeue seq -> task index
  std::map<uint64_t, LeaseRecord> leases_;               // live leases by id
  std::unordered_map<std::string, LiveGroup> live_;      // leased and complete groups
  uint64_t leased_ = 0;                                  // live groups in state leased
  std::map<uint64_t, std::string> complete_fifo_;        // complete_seq -> group id
  std::multimap<uint64_t, std::string> retention_;       // closed_version -> group id
  std::deque<uint64_t> remembered_requests_;             // batch request ids, oldest first
  uint64_t served_at_version_ = 0;  // groups served at state_.learner_version (memory only)
  std::unordered_map<std::string, std::pair<uint64_t, uint64_t>> lease_requests_;  // actor -> (req, lease)
  uint32_t stale_since_last_batch_ = 0;
  bool paused_ = false;
  ReplayCounts counts_;  // the since-start counters
  std::unique_ptr<Metrics> metrics_;
};

}  // namespace aha::replay
