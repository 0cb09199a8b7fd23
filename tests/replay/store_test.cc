// ReplayStore: one test per rule of replay/store.h (leases, rate limit, ingest, serving,
// exactly-once across restarts, retention, checkpoint, export).
#include "replay/store.h"

#include <capnp/message.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <atomic>
#include <mutex>

#include "replay/export.h"
#include "tests/replay/test_util.h"

namespace aha::replay {
namespace {

using testing::Samples;
using testing::TempDir;
using testing::WriteDataset;

struct LeaseOut {
  uint64_t lease_id = 0;
  std::vector<std::string> groups;
  std::vector<std::string> task_ids;
  int64_t deadline = 0;
  uint32_t retry_after = 0;
  bool finished = false;
};

struct BatchOut {
  std::vector<std::string> groups;
  std::vector<uint32_t> sizes;
  uint32_t dropped_stale = 0;
  uint32_t retry_after = 0;
  bool finished = false;
};

class StoreTest : public ::testing::Test {
 protected:
  ReplayOptions Options() {
    ReplayOptions o;
    o.db_path = dir_.Sub("db");
    o.group_size = 2;
    o.groups_per_step = 2;
    o.max_staleness = 1;  // in-flight bound (1 + 1) x 2 = 4
    o.shuffle = false;
    o.lease_timeout_ms = 1000;
    o.now_ms = [this] { return now_; };
    return o;
  }
  std::unique_ptr<ReplayStore> Open(ReplayOptions o) {
    auto r = ReplayStore::Open(std::move(o));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return std::move(r).value();
  }
  std::unique_ptr<ReplayStore> OpenWithData(int tasks, ReplayOptions o) {
    auto s = Open(std::move(o));
    auto loaded = s->LoadDataset(WriteDataset(dir_.Sub("data.jsonl"), tasks), false);
    EXPECT_TRUE(loaded.ok()) << loaded.status().ToString();
    return s;
  }
  LeaseOut Lease(ReplayStore& s, uint32_t n, const std::string& actor = "actor-0", uint64_t request_id = 0) {
    capnp::MallocMessageBuilder req, rep;
    auto r = req.initRoot<proto::LeaseRequest>();
    r.setActorId(actor);
    r.setMaxTasks(n);
    r.setRequestId(request_id);
    r.setPolicyVersion(s.Counts().learner_version);  // an actor that keeps up with the learner
    auto out = rep.initRoot<proto::PromptLease>();
    Status st = s.Lease(r.asReader(), out);
    EXPECT_TRUE(st.ok()) << st.ToString();
    LeaseOut l;
    l.lease_id = out.getLeaseId();
    for (auto t : out.getTasks()) {
      l.groups.push_back(t.getGroupId().cStr());
      l.task_ids.push_back(t.getTask().getId().cStr());
      EXPECT_EQ(t.getGroupSize(), s.options().group_size);
    }
    l.deadline = out.getDeadlineUnixMs();
    l.retry_after = out.getRetryAfterMs();
    l.finished = out.getFinished();
    return l;
  }
  BatchOut Serve(ReplayStore& s, uint32_t n, uint64_t version, uint64_t request_id = 0) {
    capnp::MallocMessageBuilder req, rep;
    auto r = req.initRoot<proto::BatchRequest>();
    r.setNumGroups(n);
    r.setLearnerVersion(version);
    r.setRequestId(request_id);
    auto out = rep.initRoot<proto::Batch>();
    Status st = s.ServeBatch(r.asReader(), out);
    EXPECT_TRUE(st.ok()) << st.ToString();
    BatchOut b;
    for (auto g : out.getGroups()) {
      b.groups.push_back(g.getGroupId().cStr());
      b.sizes.push_back(g.getSamples().size());
    }
    b.dropped_stale = out.getDroppedStale();
    b.retry_after = out.getRetryAfterMs();
    b.finished = out.getFinished();
    return b;
  }
  std::vector<IngestResult> Ingest(ReplayStore& s, const std::vector<proto::ScoredTrajectory::Reader>& items) {
    auto r = s.Ingest(items);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? r.value() : std::vector<IngestResult>{};
  }
  // Stores all G samples of `group`, with `reward` (+ index when `vary`).
  void Complete(ReplayStore& s, const std::string& group, uint64_t version = 0, float reward = 0, bool vary = true) {
    std::vector<proto::ScoredTrajectory::Reader> items;
    for (uint32_t i = 0; i < s.options().group_size; ++i)
      items.push_back(samples_.Add(group, i, reward + (vary ? float(i) : 0.f), version, reward + i > 0));
    for (const auto& r : Ingest(s, items)) EXPECT_EQ(r.outcome, IngestOutcome::kStored) << r.reason;
  }

  TempDir dir_;
  int64_t now_ = 1'000'000;
  Samples samples_;
};

TEST_F(StoreTest, LoadsTheDatasetOnceAndRefusesAnotherFile) {
  auto s = Open(Options());
  auto first = s->LoadDataset(WriteDataset(dir_.Sub("a.jsonl"), 5), false);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->tasks, 5u);
  EXPECT_FALSE(first->already_loaded);
  auto again = s->LoadDataset(dir_.Sub("a.jsonl"), false);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->already_loaded);
  auto other = s->LoadDataset(WriteDataset(dir_.Sub("b.jsonl"), 6), false);
  EXPECT_TRUE(IsFailedPrecondition(other.status())) << other.status().ToString();
  s.reset();
  auto reopened = Open(Options());
  EXPECT_TRUE(reopened->has_dataset());
  EXPECT_EQ(reopened->Counts().tasks_total, 5u);
}

TEST_F(StoreTest, MalformedDatasetFailsWithLineOrSkipsWhenAsked) {
  testing::WriteFile(dir_.Sub("bad.jsonl"),
                     "{\"id\":\"a\",\"prompt\":\"p\",\"answer\":\"1\",\"kind\":\"math\"}\n{\"id\":\"b\"}\n");
  auto s = Open(Options());
  auto r = s->LoadDataset(dir_.Sub("bad.jsonl"), false);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("bad.jsonl:2: field 'prompt': missing"), std::string::npos);
  EXPECT_FALSE(s->has_dataset());
  auto skipped = s->LoadDataset(dir_.Sub("bad.jsonl"), true);
  ASSERT_TRUE(skipped.ok());
  EXPECT_EQ(skipped->tasks, 1u);
  EXPECT_EQ(skipped->skipped, 1u);
}

TEST_F(StoreTest, LeaseHandsOutPromptsWithDeadlineInDatasetOrder) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 3);
  EXPECT_EQ(l.task_ids, (std::vector<std::string>{"t0", "t1", "t2"}));
  EXPECT_EQ(l.deadline, now_ + 1000);
  EXPECT_EQ(l.groups.size(), 3u);
  EXPECT_EQ(s->Counts().leases_active, 1u);
  EXPECT_EQ(s->Counts().groups_incomplete, 3u);
}

TEST_F(StoreTest, RateLimiterBoundsInFlightGroups) {
  auto s = OpenWithData(100, Options());  // bound (1 + 1) x 2 = 4
  LeaseOut a = Lease(*s, 3);
  LeaseOut b = Lease(*s, 3);
  EXPECT_EQ(a.groups.size(), 3u);
  EXPECT_EQ(b.groups.size(), 1u);
  LeaseOut c = Lease(*s, 3);
  EXPECT_TRUE(c.groups.empty());
  EXPECT_EQ(c.retry_after, s->options().poll_after_ms);  // live: a slot frees within a step
  EXPECT_FALSE(c.finished);
  // Completing a group does not free a slot: it is in flight until the learner consumes it.
  Complete(*s, a.groups[0]);
  EXPECT_TRUE(Lease(*s, 3).groups.empty());
  EXPECT_EQ(Serve(*s, 2, 0).groups.size(), 1u);
  EXPECT_EQ(Lease(*s, 3).groups.size(), 1u);
}

TEST_F(StoreTest, MaxInFlightOverridesTheDefaultBound) {
  auto o = Options();
  o.max_in_flight = 7;
  auto s = OpenWithData(100, o);
  EXPECT_EQ(Lease(*s, 100).groups.size(), 7u);
}

TEST_F(StoreTest, RetriedLeaseRequestGetsTheSameLease) {
  auto s = OpenWithData(10, Options());
  LeaseOut first = Lease(*s, 2, "actor-1", 77);
  LeaseOut retry = Lease(*s, 2, "actor-1", 77);
  EXPECT_EQ(first.lease_id, retry.lease_id);
  EXPECT_EQ(first.groups, retry.groups);
  s.reset();
  s = Open(Options());
  LeaseOut after_restart = Lease(*s, 2, "actor-1", 77);
  EXPECT_EQ(after_restart.groups, first.groups);
  LeaseOut next = Lease(*s, 2, "actor-1", 78);
  EXPECT_EQ(next.task_ids, (std::vector<std::string>{"t2", "t3"}));
}

TEST_F(StoreTest, CursorAndEpochsResumeAfterRestart) {
  auto o = Options();
  o.epochs = 2;
  o.shuffle = true;
  o.shuffle_seed = 5;
  o.max_in_flight = 1000;
  std::vector<std::string> order;
  {
    auto s = OpenWithData(6, o);
    for (auto& id : Lease(*s, 4).task_ids) order.push_back(id);
  }
  {
    auto s = Open(o);
    for (auto& id : Lease(*s, 100).task_ids) order.push_back(id);
    EXPECT_TRUE(Lease(*s, 1).groups.empty());
    EXPECT_EQ(s->Counts().epoch, 2u);
  }
  ASSERT_EQ(order.size(), 12u);
  std::multiset<std::string> counts(order.begin(), order.end());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(counts.count("t" + std::to_string(i)), 2u);
  // Both epochs are each a permutation of the dataset.
  EXPECT_EQ(std::set<std::string>(order.begin(), order.begin() + 6).size(), 6u);
  EXPECT_EQ(std::set<std::string>(order.begin() + 6, order.end()).size(), 6u);
}

TEST_F(StoreTest, IngestIsIdempotentBySampleKey) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 1);
  auto r = Ingest(*s, {samples_.Add(l.groups[0], 0, 1), samples_.Add(l.groups[0], 0, 1)});
  EXPECT_EQ(r[0].outcome, IngestOutcome::kStored);
  EXPECT_EQ(r[1].outcome, IngestOutcome::kDuplicate);  // twice in one batch
  r = Ingest(*s, {samples_.Add(l.groups[0], 0, 1)});
  EXPECT_EQ(r[0].outcome, IngestOutcome::kDuplicate);  // resent later
  EXPECT_EQ(s->Counts().ingested, 1u);
  EXPECT_EQ(s->Counts().duplicates, 2u);
  EXPECT_EQ(s->Counts().groups_complete, 0u);
  r = Ingest(*s, {samples_.Add(l.groups[0], 1, 0)});
  EXPECT_EQ(r[0].outcome, IngestOutcome::kStored);
  EXPECT_EQ(s->Counts().groups_complete, 1u);  // complete when all G are stored
  EXPECT_EQ(s->Counts().leases_active, 0u);    // its lease is resolved
  r = Ingest(*s, {samples_.Add(l.groups[0], 1, 0)});
  EXPECT_EQ(r[0].outcome, IngestOutcome::kDuplicate);  // a resend after completion
}

TEST_F(StoreTest, RejectsUnknownGroupBadIndexAndOversizedWithReasons) {
  auto o = Options();
  o.max_trajectory_bytes = 4096;
  auto s = OpenWithData(10, o);
  LeaseOut l = Lease(*s, 1);
  auto r = Ingest(*s, {samples_.Add("g999999999999", 0, 1), samples_.Add(l.groups[0], 2, 1),
                       samples_.Add(l.groups[0], 0, 1, 0, false, "x", /*pad_tokens=*/4096),
                       samples_.Add(std::string(100, 'g'), 0, 1)});
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].reason, "unknown_group");
  EXPECT_EQ(r[1].reason, "bad_sample_index");
  EXPECT_EQ(r[2].reason, "oversized");
  EXPECT_EQ(r[3].reason, "unknown_group");
  for (const auto& x : r) EXPECT_EQ(x.outcome, IngestOutcome::kRejected);
  auto c = s->Counts();
  EXPECT_EQ(c.ingested, 0u);
  EXPECT_EQ(c.rejected["unknown_group"], 2u);
  EXPECT_EQ(c.rejected["bad_sample_index"], 1u);
  EXPECT_EQ(c.rejected["oversized"], 1u);
}

TEST_F(StoreTest, ExpiredLeaseRequeuesItsPromptsAndDropsLateSamples) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 2);
  Complete(*s, l.groups[1]);                       // one group made it in time
  Ingest(*s, {samples_.Add(l.groups[0], 0, 1)});   // the other is half done
  now_ += 1001;
  ASSERT_TRUE(s->ExpireLeases().ok());
  auto c = s->Counts();
  EXPECT_EQ(c.expired_groups, 1u);
  EXPECT_EQ(c.groups_complete, 1u);
  EXPECT_EQ(c.requeued, 1u);
  auto late = Ingest(*s, {samples_.Add(l.groups[0], 1, 1)});
  EXPECT_EQ(late[0].outcome, IngestOutcome::kRejected);
  EXPECT_EQ(late[0].reason, "lease_expired");
  EXPECT_EQ(s->Counts().late_samples, 1u);
  // The requeued prompt goes out first, in a new group.
  LeaseOut again = Lease(*s, 2);
  ASSERT_EQ(again.task_ids.size(), 2u);
  EXPECT_EQ(again.task_ids[0], "t0");
  EXPECT_EQ(again.task_ids[1], "t2");
  EXPECT_NE(again.groups[0], l.groups[0]);
  // Survives a restart: the expired group stays expired.
  s.reset();
  s = Open(Options());
  EXPECT_EQ(Ingest(*s, {samples_.Add(l.groups[0], 1, 1)})[0].reason, "lease_expired");
}

TEST_F(StoreTest, ServesFifoByCompletionWithFullGroups) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 3);
  Complete(*s, l.groups[2]);
  Complete(*s, l.groups[0]);
  BatchOut b = Serve(*s, 5, 0);
  EXPECT_EQ(b.groups, (std::vector<std::string>{l.groups[2], l.groups[0]}));
  EXPECT_EQ(b.sizes, (std::vector<uint32_t>{2, 2}));
  EXPECT_TRUE(Serve(*s, 5, 0).groups.empty());
}

TEST_F(StoreTest, ServesOnlyGroupsWithinMaxStalenessAndRequeuesStaleOnes) {
  auto o = Options();
  o.max_in_flight = 100;
  auto s = OpenWithData(10, o);
  LeaseOut l = Lease(*s, 3);
  Complete(*s, l.groups[0], /*version=*/3);
  Complete(*s, l.groups[1], /*version=*/4);
  Complete(*s, l.groups[2], /*version=*/5);
  BatchOut b = Serve(*s, 5, /*learner_version=*/5);  // max_staleness 1: versions 4 and 5 only
  EXPECT_EQ(b.groups, (std::vector<std::string>{l.groups[1], l.groups[2]}));
  EXPECT_EQ(b.dropped_stale, 1u);
  EXPECT_EQ(s->Counts().stale_groups, 1u);
  EXPECT_EQ(s->Counts().requeued, 1u);
  EXPECT_EQ(Lease(*s, 1).task_ids, (std::vector<std::string>{"t0"}));
}

// An actor whose weights are past the staleness bound gets no prompts until it catches up.
TEST_F(StoreTest, LeasesRefuseActorsPastTheStalenessBound) {
  auto o = Options();
  o.max_in_flight = 100;
  auto s = OpenWithData(10, o);
  Serve(*s, 1, /*learner_version=*/5);  // the learner reports version 5; max_staleness is 1
  auto lease = [&](uint64_t actor_version) {
    capnp::MallocMessageBuilder req, rep;
    auto r = req.initRoot<proto::LeaseRequest>();
    r.setActorId("actor-0");
    r.setMaxTasks(2);
    r.setPolicyVersion(actor_version);
    auto out = rep.initRoot<proto::PromptLease>();
    EXPECT_TRUE(s->Lease(r.asReader(), out).ok());
    EXPECT_EQ(out.getPolicyVersion(), 5u);
    return out.getTasks().size();
  };
  EXPECT_EQ(lease(3), 0u);
  EXPECT_EQ(s->Counts().stale_lease_refusals, 1u);
  EXPECT_EQ(lease(4), 2u);  // 5 - 4 <= 1
  EXPECT_EQ(lease(5), 2u);
  EXPECT_EQ(s->Counts().stale_lease_refusals, 1u);
}

// A lease is trained on after the groups already in flight, groups_per_step (2) per learner step:
// an actor one version behind can only fill the learner's current step, and only what is not
// already queued for it. (Three GPU actors at max_staleness 1 had a third of every step dropped as
// stale before this.)
TEST_F(StoreTest, LeasesGrantOnlyWhatTheActorsVersionCanCarry) {
  auto s = OpenWithData(20, Options());  // the default in-flight bound: (1 + 1) x 2 = 4
  Serve(*s, 1, /*learner_version=*/5);
  auto lease = [&](uint64_t actor_version, uint32_t n) {
    capnp::MallocMessageBuilder req, rep;
    auto r = req.initRoot<proto::LeaseRequest>();
    r.setActorId("actor-" + std::to_string(actor_version));
    r.setMaxTasks(n);
    r.setPolicyVersion(actor_version);
    auto out = rep.initRoot<proto::PromptLease>();
    EXPECT_TRUE(s->Lease(r.asReader(), out).ok());
    return out.getTasks().size();
  };
  EXPECT_EQ(lease(5, 2), 2u);  // up to date: step 5
  EXPECT_EQ(lease(4, 2), 0u);  // one behind: only step 5 is within reach, and it is full
  EXPECT_EQ(s->Counts().stale_lease_refusals, 1u);
  EXPECT_EQ(lease(5, 8), 2u);  // up to date: step 6
  EXPECT_EQ(lease(5, 2), 0u);  // the in-flight bound
}

// Replay hears of the learner's new version only with its next batch request. Once a whole step
// has been served at version 0 the learner is training toward 1, so groups a version-0 actor
// would make now could only be trained on at version 2: refused (they were made and then dropped,
// about a third of all groups in the tiny CPU job).
TEST_F(StoreTest, LeasesCountTheStepTheLearnerIsTraining) {
  auto s = OpenWithData(20, Options());  // groups_per_step 2, max_staleness 1, bound 4
  auto lease = [&](uint64_t actor_version, uint32_t n) {
    capnp::MallocMessageBuilder req, rep;
    auto r = req.initRoot<proto::LeaseRequest>();
    r.setActorId("actor-0");
    r.setMaxTasks(n);
    r.setPolicyVersion(actor_version);
    auto out = rep.initRoot<proto::PromptLease>();
    EXPECT_TRUE(s->Lease(r.asReader(), out).ok());
    std::vector<std::string> ids;
    for (auto t : out.getTasks()) ids.push_back(t.getGroupId().cStr());
    return ids;
  };
  auto first = lease(0, 2);
  ASSERT_EQ(first.size(), 2u);
  for (const auto& g : first) Complete(*s, g, /*version=*/0);
  ASSERT_EQ(lease(0, 2).size(), 2u);  // steps 0 and 1 fill the bound
  ASSERT_EQ(Serve(*s, 2, /*learner_version=*/0).groups.size(), 2u);  // step 0 served: training toward 1
  EXPECT_TRUE(lease(0, 2).empty());  // version 0 could only reach step 2: too late
  EXPECT_EQ(s->Counts().stale_lease_refusals, 1u);
  EXPECT_EQ(lease(1, 2).size(), 2u);  // version 1 reaches step 2 within the bound
}

TEST_F(StoreTest, PerTokenVersionsUseTheOldest) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 1);
  capnp::MallocMessageBuilder m0, m1;
  for (auto* m : {&m0, &m1}) {
    auto st = m->initRoot<proto::ScoredTrajectory>();
    auto t = st.initTrajectory();
    t.setGroupId(l.groups[0]);
    t.setSampleIndex(m == &m0 ? 0 : 1);
    st.setReward(m == &m0 ? 1.f : 0.f);
    auto spans = t.initVersionSpans(2);
    spans[0].setVersion(2);  // weights changed mid-sequence from 2 to 3
    spans[1].setStartToken(5);
    spans[1].setVersion(3);
  }
  Ingest(*s, {m0.getRoot<proto::ScoredTrajectory>().asReader(), m1.getRoot<proto::ScoredTrajectory>().asReader()});
  EXPECT_TRUE(Serve(*s, 1, 4).groups.empty());  // 4 - 2 > 1
  EXPECT_EQ(s->Counts().stale_groups, 1u);
}

TEST_F(StoreTest, DynamicSamplingSetsAsideGroupsWithEqualRewards) {
  auto o = Options();
  o.dynamic_sampling = true;
  auto s = OpenWithData(10, o);
  LeaseOut l = Lease(*s, 2);
  Complete(*s, l.groups[0], 0, /*reward=*/1, /*vary=*/false);  // all correct: no signal
  Complete(*s, l.groups[1], 0, /*reward=*/0, /*vary=*/true);
  EXPECT_EQ(s->Counts().filtered_groups, 1u);
  EXPECT_EQ(Serve(*s, 5, 0).groups, (std::vector<std::string>{l.groups[1]}));
  // A filtered group frees its in-flight slot.
  EXPECT_EQ(Lease(*s, 10).groups.size(), 4u);
}

TEST_F(StoreTest, GroupIsServedExactlyOnceAndRetriesGetTheSameGroupsAcrossRestarts) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 4);
  for (const auto& g : l.groups) Complete(*s, g);
  BatchOut first = Serve(*s, 2, 0, /*request_id=*/11);
  ASSERT_EQ(first.groups.size(), 2u);
  EXPECT_EQ(Serve(*s, 2, 0, 11).groups, first.groups);  // the reply was lost: same groups again
  s.reset();
  s = Open(Options());
  EXPECT_EQ(Serve(*s, 2, 0, 11).groups, first.groups);  // also after a restart
  BatchOut second = Serve(*s, 2, 0, 12);
  EXPECT_EQ(second.groups, (std::vector<std::string>{l.groups[2], l.groups[3]}));
  EXPECT_TRUE(Serve(*s, 2, 0, 13).groups.empty());
  EXPECT_EQ(s->Counts().groups_served, 4u);
}

TEST_F(StoreTest, FinishedOnceEverythingIsConsumed) {
  auto s = OpenWithData(2, Options());
  LeaseOut l = Lease(*s, 2);
  EXPECT_FALSE(Serve(*s, 2, 0).finished);
  for (const auto& g : l.groups) Complete(*s, g);
  EXPECT_TRUE(Lease(*s, 1).groups.empty());
  EXPECT_FALSE(Lease(*s, 1).finished);  // groups complete but not consumed
  EXPECT_EQ(Serve(*s, 2, 0).groups.size(), 2u);
  EXPECT_TRUE(Serve(*s, 2, 0).finished);
  EXPECT_TRUE(Lease(*s, 1).finished);
}

TEST_F(StoreTest, RetentionDeletesConsumedGroupsAfterNSteps) {
  auto o = Options();
  o.retention_steps = 2;
  auto s = OpenWithData(10, o);
  LeaseOut l = Lease(*s, 1);
  Complete(*s, l.groups[0]);
  ASSERT_EQ(Serve(*s, 1, /*version=*/1).groups.size(), 1u);
  Serve(*s, 1, 3);
  EXPECT_EQ(s->Counts().deleted_groups, 0u);  // 1 + 2 is not yet behind 3
  // A late resend is still recognised as a duplicate while the group is retained.
  EXPECT_EQ(Ingest(*s, {samples_.Add(l.groups[0], 0, 0)})[0].outcome, IngestOutcome::kDuplicate);
  Serve(*s, 1, 4);
  EXPECT_EQ(s->Counts().deleted_groups, 1u);
  EXPECT_EQ(Ingest(*s, {samples_.Add(l.groups[0], 0, 0)})[0].reason, "unknown_group");
  // Deleted groups stay deleted after a restart, and nothing is left of their samples.
  s.reset();
  ExportOptions e;
  e.db_path = o.db_path;
  e.out_path = dir_.Sub("out.jsonl");
  auto report = ExportJsonl(e);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_EQ(report->scanned, 0u);
}

TEST_F(StoreTest, CheckpointRestoresIntoAFreshDirectory) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 2);
  Complete(*s, l.groups[0]);
  ASSERT_TRUE(s->Checkpoint(dir_.Sub("ckpt")).ok());
  EXPECT_TRUE(IsAlreadyExists(s->Checkpoint(dir_.Sub("ckpt"))));
  Complete(*s, l.groups[1]);  // after the checkpoint: not in it
  auto o = Options();
  o.db_path = dir_.Sub("restored");
  o.restore_from = dir_.Sub("ckpt");
  auto r = Open(o);
  auto c = r->Counts();
  EXPECT_EQ(c.groups_complete, 1u);
  EXPECT_EQ(c.groups_incomplete, 1u);
  EXPECT_EQ(Serve(*r, 5, 0).groups, (std::vector<std::string>{l.groups[0]}));
  // Restoring over a non-empty directory is refused.
  auto again = ReplayStore::Open(o);
  EXPECT_TRUE(IsFailedPrecondition(again.status()));
}

TEST_F(StoreTest, PausedStoreHandsOutNoPrompts) {
  auto s = OpenWithData(10, Options());
  s->SetPaused(true);
  EXPECT_TRUE(Lease(*s, 2).groups.empty());
  s->SetPaused(false);
  EXPECT_EQ(Lease(*s, 2).groups.size(), 2u);
}

TEST_F(StoreTest, ExportWritesPromptCompletionRewardAndFilters) {
  auto o = Options();
  auto s = OpenWithData(10, o);
  LeaseOut l = Lease(*s, 1);
  Ingest(*s, {samples_.Add(l.groups[0], 0, 1.0f, 0, true, "the answer is 0"),
              samples_.Add(l.groups[0], 1, 0.2f, 0, false, "no idea")});
  s.reset();
  auto run = [&](bool correct, bool has_min, double min) {
    ExportOptions e{o.db_path, dir_.Sub("out.jsonl"), correct, has_min, min};
    auto r = ExportJsonl(e);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    std::ifstream in(e.out_path);
    std::vector<nlohmann::json> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
    return lines;
  };
  auto all = run(false, false, 0);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0]["id"], "t0");
  EXPECT_EQ(all[0]["prompt"], "what is 0?");
  EXPECT_EQ(all[0]["completion"], "the answer is 0");
  EXPECT_EQ(all[0]["answer"], "0");
  EXPECT_EQ(all[0]["correct"], true);
  EXPECT_DOUBLE_EQ(all[0]["reward"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(all[0]["components"]["accuracy"].get<double>(), 1.0);
  auto correct = run(true, false, 0);
  ASSERT_EQ(correct.size(), 1u);
  EXPECT_EQ(correct[0]["completion"], "the answer is 0");
  EXPECT_EQ(run(false, true, 0.1).size(), 2u);
  EXPECT_EQ(run(false, true, 0.5).size(), 1u);
  ExportOptions missing{dir_.Sub("nope"), dir_.Sub("o.jsonl"), false, false, 0};
  EXPECT_TRUE(IsNotFound(ExportJsonl(missing).status()));
}

TEST_F(StoreTest, BufferedDurabilityStoresTheSame) {
  auto o = Options();
  o.durability = Durability::kBuffered;
  auto s = OpenWithData(4, o);
  LeaseOut l = Lease(*s, 1);
  Complete(*s, l.groups[0]);
  s.reset();
  s = Open(o);
  EXPECT_EQ(s->Counts().groups_complete, 1u);
  EXPECT_TRUE(IsInvalidArgument(ParseDurability("fsync").status()));
}

TEST_F(StoreTest, MetricsAreExported) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto o = Options();
  o.registry = registry.get();
  auto s = OpenWithData(4, o);
  LeaseOut l = Lease(*s, 1);
  Complete(*s, l.groups[0]);
  Ingest(*s, {samples_.Add("nope", 0, 0)});
  std::set<std::string> names;
  double ingested = 0, rejected_unknown = 0;
  for (const auto& f : registry->Collect()) {
    names.insert(f.name);
    if (f.name == "aha_replay_ingested_trajectories_total") ingested = f.metric[0].counter.value;
    if (f.name == "aha_replay_rejected_trajectories_total")
      for (const auto& m : f.metric)
        if (m.label[0].value == "unknown_group") rejected_unknown = m.counter.value;
  }
  EXPECT_EQ(ingested, 2);
  EXPECT_EQ(rejected_unknown, 1);
  for (const char* n : {"aha_replay_tasks_queued", "aha_replay_leases_active", "aha_replay_groups",
                        "aha_replay_served_staleness_steps", "aha_replay_dropped_groups_total",
                        "aha_replay_disk_bytes", "aha_replay_served_groups_total"})
    EXPECT_TRUE(names.count(n)) << n;
}

TEST_F(StoreTest, PartlyFilledGroupIsRebuiltAfterRestart) {
  auto s = OpenWithData(10, Options());
  LeaseOut l = Lease(*s, 1);
  Ingest(*s, {samples_.Add(l.groups[0], 1, 0.5f)});
  s.reset();
  s = Open(Options());
  EXPECT_EQ(Ingest(*s, {samples_.Add(l.groups[0], 1, 0.5f)})[0].outcome, IngestOutcome::kDuplicate);
  EXPECT_EQ(s->Counts().groups_complete, 0u);
  EXPECT_EQ(Ingest(*s, {samples_.Add(l.groups[0], 0, 1)})[0].outcome, IngestOutcome::kStored);
  EXPECT_EQ(s->Counts().groups_complete, 1u);
  BatchOut b = Serve(*s, 1, 0);
  ASSERT_EQ(b.groups.size(), 1u);
  EXPECT_EQ(b.sizes[0], 2u);
}

TEST_F(StoreTest, ConcurrentIngestLeaseAndServeKeepEveryGroupOnce) {
  auto o = Options();
  o.group_size = 4;
  o.max_in_flight = 64;
  auto s = OpenWithData(400, o);
  std::mutex mu;
  std::vector<std::string> leased;
  std::thread actor([&] {
    Samples local;
    auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < give_up) {
      LeaseOut l = Lease(*s, 8);
      if (l.finished) break;
      std::vector<proto::ScoredTrajectory::Reader> items;
      for (const auto& g : l.groups)
        for (uint32_t i = 0; i < 4; ++i) items.push_back(local.Add(g, i, float(i)));
      // Two overlapping ingest calls per lease: every sample is sent twice.
      auto r1 = s->Ingest(items);
      auto r2 = s->Ingest(items);
      ASSERT_TRUE(r1.ok() && r2.ok());
      std::lock_guard<std::mutex> lock(mu);
      leased.insert(leased.end(), l.groups.begin(), l.groups.end());
      if (l.groups.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  std::multiset<std::string> served;
  for (int i = 0; i < 100000; ++i) {
    BatchOut b = Serve(*s, 8, 0, static_cast<uint64_t>(i + 1));
    served.insert(b.groups.begin(), b.groups.end());
    if (b.finished) break;
    if (b.groups.empty()) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  actor.join();
  EXPECT_EQ(served.size(), 400u);
  EXPECT_EQ(std::set<std::string>(served.begin(), served.end()).size(), 400u);
  EXPECT_EQ(leased.size(), 400u);
}

TEST(Records, CorruptRecordsAreDataLossNotCrashes) {
  EXPECT_TRUE(IsDataLoss(DecodeGroup("g1", "not msgpack").status()));
  EXPECT_TRUE(IsDataLoss(DecodeLease(std::string("\x81\xa1x\x01", 4)).status()));  // {"x":1}
  EXPECT_TRUE(IsDataLoss(DecodeState("").status()));
  EXPECT_TRUE(IsDataLoss(StoredMessage::Parse("1234567").status()));
  std::string words(64, '\xff');
  EXPECT_TRUE(IsDataLoss(StoredMessage::Parse(words).status()));
  GroupRecord g;
  g.task_index = 7;
  g.state = GroupState::kServed;
  g.request_id = 9;
  auto back = DecodeGroup("g7", EncodeGroup(g));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->task_index, 7u);
  EXPECT_EQ(back->state, GroupState::kServed);
  EXPECT_EQ(back->request_id, 9u);
}


// The retry hint is short while the job is live (what is missing is being generated: a long sleep
// is dead time in every step) and long when nothing can change soon.
TEST_F(StoreTest, RetryHintIsShortWhileLiveAndLongWhenPaused) {
  ReplayOptions o = Options();
  o.poll_after_ms = 3;
  o.retry_after_ms = 250;
  auto s = OpenWithData(100, o);
  LeaseOut a = Lease(*s, 2);
  ASSERT_EQ(a.groups.size(), 2u);
  Complete(*s, a.groups[0]);
  BatchOut part = Serve(*s, 2, 0);  // one of two groups ready: the other one is on its way
  EXPECT_EQ(part.groups.size(), 1u);
  EXPECT_EQ(part.retry_after, 3u);
  BatchOut none = Serve(*s, 1, 0);
  EXPECT_TRUE(none.groups.empty());
  EXPECT_EQ(none.retry_after, 3u);
  s->SetPaused(true);
  EXPECT_EQ(Lease(*s, 2).retry_after, 250u);
  EXPECT_EQ(Serve(*s, 1, 0).retry_after, 250u);
  s->SetPaused(false);
  EXPECT_EQ(Serve(*s, 1, 0).retry_after, 3u);
}

}  // namespace
}  // namespace aha::replay
