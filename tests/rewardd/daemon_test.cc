// The rewardd data path end to end: a fake actor leases prompts from a real replay (ReplayStore on
// RocksDB behind its ReplayService), sends 10,000 trajectories over the reliable channel to the
// RewardService (the code aha-rewardd runs), which scores them and forwards them to replay. The
// actor's sender counts a trajectory acknowledged only after replay stored it durably.
#include <gtest/gtest.h>

#include <capnp/message.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "common/transport.h"
#include "replay/service.h"
#include "replay/store.h"
#include "rewardd/generators.h"
#include "rewardd/rewards.h"
#include "rewardd/service.h"

namespace aha::rewardd {
namespace {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "aha-rewardd-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string Sub(const std::string& n) const { return path_ + "/" + n; }

 private:
  std::string path_;
};

constexpr uint32_t kGroupSize = 8;
constexpr int kTasks = 1250;  // x 8 = 10,000 trajectories

struct Pipeline {
  TempDir dir;
  zmq::context_t ctx;
  std::unique_ptr<replay::ReplayStore> store;
  std::unique_ptr<replay::ReplayService> replay_service;
  std::unique_ptr<Scorer> scorer;
  std::unique_ptr<RewardService> rewardd;

  void Start(int tasks, size_t max_in_flight = 4096) {
    auto records = MakeCountdown(tasks, 42, {});
    ASSERT_TRUE(records.ok());
    std::string data = dir.Sub("countdown.jsonl");
    {
      std::ofstream out(data);
      for (const auto& r : *records) out << ToJsonLine(r) << "\n";
    }
    replay::ReplayOptions o;
    o.db_path = dir.Sub("db");
    o.group_size = kGroupSize;
    o.max_in_flight = 1u << 20;
    o.shuffle = false;
    auto store_or = replay::ReplayStore::Open(o);
    ASSERT_TRUE(store_or.ok()) << store_or.status().ToString();
    store = std::move(*store_or);
    ASSERT_TRUE(store->LoadDataset(data, false).ok());
    auto svc = replay::ReplayService::Create(ctx, store.get(), {});
    ASSERT_TRUE(svc.ok()) << svc.status().ToString();
    replay_service = std::move(*svc);

    auto sc = Scorer::Create(RewardConfig::Default(), nullptr);
    ASSERT_TRUE(sc.ok());
    scorer = std::move(*sc);
    RewardServiceOptions ro;
    ro.replay_endpoint = replay_service->ingest_endpoint();
    ro.workers = 2;
    ro.max_in_flight = max_in_flight;
    auto rw = RewardService::Create(ctx, scorer.get(), ro);
    ASSERT_TRUE(rw.ok()) << rw.status().ToString();
    rewardd = std::move(*rw);
  }

  ~Pipeline() {
    if (rewardd) rewardd->Close(Millis(2000));
    if (replay_service) replay_service->Close();
  }
};

// Sample i of a group: even ones answer with the dataset's solution, odd ones with a wrong one.
std::string CompletionFor(const proto::Task::Reader& task, uint32_t i) {
  if (i % 2 == 0) return "<think>let me try</think> <answer>" + std::string(task.getAnswer().cStr()) + "</answer>";
  return "<think>guess</think> <answer>1 + 1</answer>";
}

TEST(RewardDaemon, MovesTenThousandTrajectoriesFromActorToReplay) {
  Pipeline p;
  ASSERT_NO_FATAL_FAILURE(p.Start(kTasks));

  RpcClientOptions co;
  co.endpoint = p.replay_service->rpc_endpoint();
  co.name = "fake-actor";
  auto client = RpcClient::Create(p.ctx, co);
  ASSERT_TRUE(client.ok());
  ReliableSenderOptions so;
  so.endpoint = p.rewardd->listen_endpoint();
  so.name = "fake-actor";
  so.max_outbox = 2048;
  auto sender = ReliableSender::Create(p.ctx, so);
  ASSERT_TRUE(sender.ok());

  auto t0 = std::chrono::steady_clock::now();
  int sent = 0;
  uint64_t request_id = 0;
  // Until the dataset is handed out (replay reports `finished` only once the learner took it all).
  while (sent < kTasks * static_cast<int>(kGroupSize)) {
    capnp::MallocMessageBuilder req;
    auto lr = InitEnvelope(req, "fake-actor").getBody().initLeaseRequest();
    lr.setActorId("actor-0");
    lr.setMaxTasks(64);
    lr.setRequestId(++request_id);
    auto reply = (*client)->Call(req, Millis(5000));
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    auto lease = (*reply)->root().getBody().getPromptLease();
    if (lease.getTasks().size() == 0) {
      if (lease.getFinished()) break;
      std::this_thread::sleep_for(Millis(lease.getRetryAfterMs()));
      continue;
    }
    for (auto leased : lease.getTasks()) {
      ASSERT_EQ(leased.getGroupSize(), kGroupSize);
      for (uint32_t i = 0; i < kGroupSize; ++i) {
        capnp::MallocMessageBuilder msg;
        auto t = InitEnvelope(msg, "fake-actor").getBody().initTrajectory();
        t.setGroupId(leased.getGroupId());
        t.setSampleIndex(i);
        t.setGroupSize(kGroupSize);
        t.setLeaseId(lease.getLeaseId());
        t.setTask(leased.getTask());
        std::string text = CompletionFor(leased.getTask(), i);
        t.setCompletionText(text);
        auto toks = t.initCompletionTokens(static_cast<unsigned>(text.size() / 4));
        for (unsigned k = 0; k < toks.size(); ++k) toks.set(k, k);
        t.setFinishReason(proto::FinishReason::STOP);
        t.setActorId("actor-0");
        std::string key = std::string(leased.getGroupId().cStr()) + "/" + std::to_string(i);
        Status st = (*sender)->Send(key, msg, Clock::now() + Millis(30000));
        ASSERT_TRUE(st.ok()) << st.ToString();
        ++sent;
      }
    }
  }
  ASSERT_EQ(sent, kTasks * static_cast<int>(kGroupSize));
  Status flushed = (*sender)->Flush(Clock::now() + Millis(60000));
  ASSERT_TRUE(flushed.ok()) << flushed.ToString();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("moved %d trajectories actor -> rewardd -> replay in %.2f s (%.0f/s)\n", sent, secs, sent / secs);

  // The actor saw every trajectory acknowledged, none rejected; replay holds each exactly once.
  auto sc = (*sender)->counters();
  EXPECT_EQ(sc.acked, static_cast<uint64_t>(sent));
  EXPECT_EQ(sc.rejected, 0u);
  auto counts = p.store->Counts();
  EXPECT_EQ(counts.ingested, static_cast<uint64_t>(sent));
  EXPECT_EQ(counts.groups_complete, static_cast<uint64_t>(kTasks));
  auto rc = p.rewardd->counters();
  EXPECT_GE(rc.scored, static_cast<uint64_t>(sent));
  EXPECT_EQ(rc.acked_upstream, rc.received);
  EXPECT_EQ(p.rewardd->in_flight(), 0u);

  // What replay stored carries the total and every component.
  capnp::MallocMessageBuilder req, rep;
  auto br = req.initRoot<proto::BatchRequest>();
  br.setNumGroups(kTasks);
  br.setRequestId(1);
  auto batch = rep.initRoot<proto::Batch>();
  ASSERT_TRUE(p.store->ServeBatch(br.asReader(), batch).ok());
  ASSERT_EQ(batch.getGroups().size(), static_cast<unsigned>(kTasks));
  int checked = 0;
  for (auto g : batch.getGroups()) {
    ASSERT_EQ(g.getSamples().size(), kGroupSize);
    for (auto s : g.getSamples()) {
      bool right = s.getTrajectory().getSampleIndex() % 2 == 0;
      EXPECT_EQ(s.getCorrect(), right);
      ASSERT_EQ(s.getComponents().size(), 2u);
      EXPECT_EQ(std::string(s.getComponents()[0].getName().cStr()), "accuracy");
      EXPECT_FLOAT_EQ(s.getComponents()[0].getScore(), right ? 1.0f : 0.1f);
      EXPECT_FLOAT_EQ(s.getComponents()[1].getScore(), 1.0f);  // format
      EXPECT_FLOAT_EQ(s.getReward(), right ? 1.1f : 0.2f);
      ++checked;
    }
  }
  EXPECT_EQ(checked, sent);
}

TEST(RewardDaemon, ResentTrajectoriesAreStoredOnceAndAcknowledged) {
  Pipeline p;
  ASSERT_NO_FATAL_FAILURE(p.Start(4));
  RpcClientOptions co;
  co.endpoint = p.replay_service->rpc_endpoint();
  co.name = "fake-actor";
  auto client = RpcClient::Create(p.ctx, co);
  capnp::MallocMessageBuilder req;
  auto lr = InitEnvelope(req, "fake-actor").getBody().initLeaseRequest();
  lr.setActorId("a");
  lr.setMaxTasks(1);
  auto reply = (*client)->Call(req, Millis(5000));
  ASSERT_TRUE(reply.ok());
  auto leased = (*reply)->root().getBody().getPromptLease().getTasks()[0];
  // A sender that resends aggressively, so copies of the same key reach rewardd.
  ReliableSenderOptions so;
  so.endpoint = p.rewardd->listen_endpoint();
  so.resend_after = Millis(1);
  auto sender = ReliableSender::Create(p.ctx, so);
  for (int copy = 0; copy < 3; ++copy) {
    for (uint32_t i = 0; i < kGroupSize; ++i) {
      capnp::MallocMessageBuilder msg;
      auto t = InitEnvelope(msg, "a").getBody().initTrajectory();
      t.setGroupId(leased.getGroupId());
      t.setSampleIndex(i);
      t.setGroupSize(kGroupSize);
      t.setTask(leased.getTask());
      t.setCompletionText(CompletionFor(leased.getTask(), i));
      ASSERT_TRUE((*sender)->Send(std::string(leased.getGroupId().cStr()) + "/" + std::to_string(i), msg,
                                  Clock::now() + Millis(5000)).ok());
    }
  }
  ASSERT_TRUE((*sender)->Flush(Clock::now() + Millis(20000)).ok());
  EXPECT_EQ((*sender)->counters().rejected, 0u);
  EXPECT_EQ(p.store->Counts().ingested, kGroupSize);
  EXPECT_EQ(p.store->Counts().groups_complete, 1u);
}

TEST(RewardDaemon, ReplayRejectionsArePassedUpstream) {
  Pipeline p;
  ASSERT_NO_FATAL_FAILURE(p.Start(4));
  ReliableSenderOptions so;
  so.endpoint = p.rewardd->listen_endpoint();
  std::map<std::string, std::string> rejected;
  std::mutex mu;
  so.on_rejected = [&](const std::string& key, const std::string& reason) {
    std::lock_guard<std::mutex> lock(mu);
    rejected[key] = reason;
  };
  auto sender = ReliableSender::Create(p.ctx, so);
  capnp::MallocMessageBuilder msg;
  auto t = InitEnvelope(msg, "a").getBody().initTrajectory();
  t.setGroupId("no-such-group");
  t.setSampleIndex(0);
  t.setCompletionText("<answer>1</answer>");
  ASSERT_TRUE((*sender)->Send("no-such-group/0", msg, Clock::now() + Millis(5000)).ok());
  ASSERT_TRUE((*sender)->Flush(Clock::now() + Millis(20000)).ok());
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(rejected.size(), 1u);
  EXPECT_NE(rejected["no-such-group/0"].find("unknown_group"), std::string::npos) << rejected["no-such-group/0"];
  EXPECT_EQ(p.store->Counts().ingested, 0u);
}

}  // namespace
}  // namespace aha::rewardd
