// The real binaries: a fake actor leases prompts from aha-replay and sends 10,000 trajectories to
// aha-rewardd, which scores them and forwards them to aha-replay. Then the same with aha-rewardd
// killed (SIGKILL) mid-stream and restarted on the same port: every trajectory is still stored
// exactly once, because the actor's sender resends whatever was not acknowledged.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <capnp/message.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common/daemon.h"
#include "common/transport.h"
#include "rewardd/generators.h"
#include "tests/replay/process_util.h"

namespace aha::rewardd {
namespace {

using namespace aha::replay::testing;
using nlohmann::json;

constexpr uint32_t kGroupSize = 8;
constexpr int kTasks = 1250;

class Binaries : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "aha-rewardd-bin-XXXXXX").string();
    dir_ = mkdtemp(tmpl.data());
    auto records = MakeCountdown(kTasks, 5, {});
    ASSERT_TRUE(records.ok());
    std::ofstream out(dir_ + "/data.jsonl");
    for (const auto& r : *records) out << ToJsonLine(r) << "\n";
  }
  void TearDown() override {
    for (pid_t p : {rewardd_, replay_})
      if (p > 0) {
        kill(p, SIGKILL);
        WaitPid(p);
      }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void StartReplay() {
    replay_ = Spawn({AHA_REPLAY_BIN, "--db", dir_ + "/db", "--data", dir_ + "/data.jsonl", "--group-size",
                     std::to_string(kGroupSize), "--max-in-flight", "100000", "--shuffle=false",
                     "--endpoints-file", dir_ + "/replay.json", "--ready-file", dir_ + "/replay.ready"},
                    dir_ + "/replay.log");
    ASSERT_TRUE(WaitForFile(dir_ + "/replay.ready", 20)) << ReadAll(dir_ + "/replay.log");
    auto e = json::parse(ReadAll(dir_ + "/replay.json"));
    replay_rpc_ = e["rpc"];
    replay_ingest_ = e["ingest"];
    replay_control_ = json::parse(ReadAll(dir_ + "/replay.ready"))["control"];
  }

  void StartRewardd() {
    std::filesystem::remove(dir_ + "/rewardd.ready");
    rewardd_ = Spawn({AHA_REWARDD_BIN, "--replay", replay_ingest_, "--listen", listen_, "--workers", "2",
                      "--ready-file", dir_ + "/rewardd.ready"},
                     dir_ + "/rewardd.log");
    ASSERT_TRUE(WaitForFile(dir_ + "/rewardd.ready", 20)) << ReadAll(dir_ + "/rewardd.log");
    rewardd_metrics_port_ = std::stoi(
        json::parse(ReadAll(dir_ + "/rewardd.ready"))["metrics"].get<std::string>().substr(10));
  }

  // Leases everything and sends kTasks x G trajectories; `after_each` runs after every send.
  void RunActor(const std::function<void(int sent)>& after_each) {
    RpcClientOptions co;
    co.endpoint = replay_rpc_;
    co.name = "fake-actor";
    auto client = RpcClient::Create(ctx_, co);
    ASSERT_TRUE(client.ok());
    ReliableSenderOptions so;
    so.endpoint = listen_;
    so.name = "fake-actor";
    so.max_outbox = 1024;
    so.resend_after = Millis(500);
    auto sender = ReliableSender::Create(ctx_, so);
    ASSERT_TRUE(sender.ok());
    int sent = 0;
    uint64_t request_id = 0;
    while (sent < kTasks * static_cast<int>(kGroupSize)) {
      capnp::MallocMessageBuilder req;
      auto lr = InitEnvelope(req, "fake-actor").getBody().initLeaseRequest();
      lr.setActorId("actor-0");
      lr.setMaxTasks(32);
      lr.setRequestId(++request_id);
      auto reply = (*client)->Call(req, Millis(5000));
      ASSERT_TRUE(reply.ok()) << reply.status().ToString();
      auto lease = (*reply)->root().getBody().getPromptLease();
      if (lease.getTasks().size() == 0) {
        std::this_thread::sleep_for(Millis(lease.getRetryAfterMs()));
        continue;
      }
      for (auto leased : lease.getTasks()) {
        for (uint32_t i = 0; i < kGroupSize; ++i) {
          capnp::MallocMessageBuilder msg;
          auto t = InitEnvelope(msg, "fake-actor").getBody().initTrajectory();
          t.setGroupId(leased.getGroupId());
          t.setSampleIndex(i);
          t.setGroupSize(kGroupSize);
          t.setLeaseId(lease.getLeaseId());
          t.setTask(leased.getTask());
          t.setCompletionText(i % 2 == 0 ? "<think>t</think> <answer>" +
                                               std::string(leased.getTask().getAnswer().cStr()) + "</answer>"
                                         : std::string("<think>t</think> <answer>1 + 1</answer>"));
          t.setActorId("actor-0");
          std::string key = std::string(leased.getGroupId().cStr()) + "/" + std::to_string(i);
          Status st = (*sender)->Send(key, msg, Clock::now() + Millis(60000));
          ASSERT_TRUE(st.ok()) << st.ToString();
          after_each(++sent);
        }
      }
    }
    Status flushed = (*sender)->Flush(Clock::now() + Millis(90000));
    ASSERT_TRUE(flushed.ok()) << flushed.ToString() << "\n" << ReadAll(dir_ + "/rewardd.log");
    EXPECT_EQ((*sender)->counters().acked, static_cast<uint64_t>(sent));
    EXPECT_EQ((*sender)->counters().rejected, 0u);
  }

  uint64_t ReplayGroupsComplete() {
    auto reply = SendControl(ctx_, replay_control_, proto::ControlCommand::STATUS, "", Millis(5000));
    EXPECT_TRUE(reply.ok()) << reply.status().ToString();
    if (!reply.ok()) return 0;
    return (*reply)->root().getBody().getControlReply().getStatus().getDetail().getReplay().getGroupsComplete();
  }

  double Metric(const std::string& name) {
    std::string body = HttpGet(rewardd_metrics_port_, "/metrics");
    size_t at = body.find("\n" + name + " ");
    if (at == std::string::npos) return -1;
    return std::stod(body.substr(at + name.size() + 2));
  }

  zmq::context_t ctx_;
  std::string dir_;
  std::string listen_ = "tcp://127.0.0.1:" + std::to_string(FreePort());
  std::string replay_rpc_, replay_ingest_, replay_control_;
  pid_t replay_ = -1, rewardd_ = -1;
  int rewardd_metrics_port_ = 0;
};

TEST_F(Binaries, TenThousandTrajectoriesFromActorThroughRewarddToReplay) {
  ASSERT_NO_FATAL_FAILURE(StartReplay());
  ASSERT_NO_FATAL_FAILURE(StartRewardd());
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_NO_FATAL_FAILURE(RunActor([](int) {}));
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("binaries: 10000 trajectories in %.2f s (%.0f/s)\n", secs, 10000 / secs);
  EXPECT_EQ(ReplayGroupsComplete(), static_cast<uint64_t>(kTasks));
  EXPECT_EQ(Metric("aha_rewardd_scored_total"), 10000.0);
  EXPECT_EQ(Metric("aha_rewardd_correct_total"), 5000.0);
  EXPECT_EQ(Metric("aha_rewardd_in_flight") >= 0, true);
  std::string body = HttpGet(rewardd_metrics_port_, "/metrics");
  EXPECT_NE(body.find("aha_rewardd_reward_bucket{component=\"accuracy\""), std::string::npos);
  EXPECT_NE(body.find("aha_rewardd_latency_seconds_count 10000"), std::string::npos);
  // Graceful stop.
  kill(rewardd_, SIGTERM);
  EXPECT_EQ(ExitCode(WaitPid(rewardd_)), 0) << ReadAll(dir_ + "/rewardd.log");
  rewardd_ = -1;
}

TEST_F(Binaries, RewarddKilledMidStreamLosesAndDuplicatesNothing) {
  ASSERT_NO_FATAL_FAILURE(StartReplay());
  ASSERT_NO_FATAL_FAILURE(StartRewardd());
  std::atomic<int> kills{0};
  ASSERT_NO_FATAL_FAILURE(RunActor([&](int sent) {
    if (sent == 3000 || sent == 7000) {
      kill(rewardd_, SIGKILL);
      WaitPid(rewardd_);
      ++kills;
      StartRewardd();
    }
  }));
  EXPECT_EQ(kills.load(), 2);
  EXPECT_EQ(ReplayGroupsComplete(), static_cast<uint64_t>(kTasks));
}

}  // namespace
}  // namespace aha::rewardd
