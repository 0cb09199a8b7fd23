// Crash test (label fault): the real aha-replay binary is SIGKILLed while a client sends 20,000
// scored trajectories (2,500 groups of 8) over the reliable channel, and once more while a learner
// client drains it. At the end every group is complete exactly once in the store (checked through
// `aha-replay export`) and the learner received each group exactly once, with all 8 samples.
//
// The binary's path comes from the AHA_REPLAY_BIN compile definition ($<TARGET_FILE:aha-replay>).
#include <capnp/message.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "common/transport.h"
#include "common/wire.h"
#include "tests/replay/process_util.h"
#include "tests/replay/test_util.h"

namespace aha::replay {
namespace {

const std::string g_binary = AHA_REPLAY_BIN;

constexpr int kGroups = 2500;
constexpr int kGroupSize = 8;
constexpr int kLeaseChunk = 50;

using testing::FreePort;
using testing::Spawn;
int Wait(pid_t pid) { return testing::WaitPid(pid); }

class ReplayProcess {
 public:
  ReplayProcess(std::vector<std::string> args, std::string log) : args_(std::move(args)), log_(std::move(log)) {
    pid_ = Spawn(args_, log_);
  }
  ~ReplayProcess() {
    std::lock_guard<std::mutex> lock(mu_);
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      Wait(pid_);
    }
  }
  void KillAndRestart() {
    std::lock_guard<std::mutex> lock(mu_);
    kill(pid_, SIGKILL);
    int status = Wait(pid_);
    EXPECT_TRUE(WIFSIGNALED(status)) << "aha-replay exited by itself before the kill; see " << log_;
    ++kills_;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    pid_ = Spawn(args_, log_);
  }
  int Stop() {  // graceful
    std::lock_guard<std::mutex> lock(mu_);
    kill(pid_, SIGTERM);
    int status = Wait(pid_);
    pid_ = -1;
    return status;
  }
  int kills() const { return kills_; }

 private:
  std::vector<std::string> args_;
  std::string log_;
  std::mutex mu_;
  pid_t pid_ = -1;
  int kills_ = 0;
};

// Calls until a reply comes back; replay may be down for a moment (killed and restarting).
std::unique_ptr<DecodedEnvelope> CallUntilAnswered(RpcClient& client, capnp::MessageBuilder& request) {
  for (int attempt = 0; attempt < 120; ++attempt) {
    auto reply = client.Call(request, Millis(1000));
    if (reply.ok()) return std::move(reply).value();
    EXPECT_TRUE(IsTimeout(reply.status())) << reply.status().ToString();
  }
  ADD_FAILURE() << "aha-replay did not answer for two minutes";
  return nullptr;
}

TEST(ReplayCrash, EveryGroupCompleteAndServedExactlyOnceDespiteSigkills) {
  testing::TempDir dir;
  testing::WriteDataset(dir.Sub("data.jsonl"), kGroups);
  const std::string ingest = "tcp://127.0.0.1:" + std::to_string(FreePort());
  const std::string rpc = "tcp://127.0.0.1:" + std::to_string(FreePort());
  const std::string db = dir.Sub("db");
  std::vector<std::string> args = {g_binary, "--db", db, "--data", dir.Sub("data.jsonl"), "--ingest", ingest,
                                   "--rpc", rpc, "--group-size", "8", "--max-in-flight", "100000",
                                   "--lease-timeout-ms", "600000", "--retention-steps", "-1", "--shuffle=false",
                                   "--metrics=", "--log-level", "warn", "--durability", "sync"};
  ReplayProcess replay(args, dir.Sub("replay.log"));

  std::mt19937_64 rng(std::random_device{}());
  std::vector<int> kill_at;  // after this many trajectories were queued
  for (int i = 0; i < 3; ++i) kill_at.push_back(1000 + static_cast<int>(rng() % 18000));
  std::sort(kill_at.begin(), kill_at.end());
  int kill_fetch_at = 200 + static_cast<int>(rng() % 2000);  // after this many groups were fetched
  std::atomic<int> progress{0};
  std::atomic<bool> fetch_phase{false}, done{false};
  std::thread killer([&] {
    for (int at : kill_at) {
      while (progress.load() < at && !done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      if (done) return;
      replay.KillAndRestart();
    }
    while ((!fetch_phase || progress.load() < kill_fetch_at) && !done)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (!done) replay.KillAndRestart();
  });

  zmq::context_t ctx;
  RpcClientOptions co;
  co.endpoint = rpc;
  co.name = "crash-test";
  auto client = RpcClient::Create(ctx, co).value();
  std::atomic<int> rejected{0};
  ReliableSenderOptions so;
  so.endpoint = ingest;
  so.name = "crash-test-rewardd";
  so.resend_after = Millis(500);
  so.on_rejected = [&](const std::string& key, const std::string& reason) {
    ADD_FAILURE() << key << " rejected: " << reason;
    ++rejected;
  };
  auto sender = ReliableSender::Create(ctx, so).value();

  // Actor side: lease 50 prompts at a time (retrying with the same request id), then send the
  // 8 scored samples of each as rewardd would.
  std::vector<std::string> leased;
  uint64_t lease_request = 0;
  while (static_cast<int>(leased.size()) < kGroups) {
    ++lease_request;
    capnp::MallocMessageBuilder req;
    auto lr = InitEnvelope(req, "crash-test").getBody().initLeaseRequest();
    lr.setActorId("actor-0");
    lr.setMaxTasks(kLeaseChunk);
    lr.setRequestId(lease_request);
    auto reply = CallUntilAnswered(*client, req);
    ASSERT_TRUE(reply);
    auto lease = reply->root().getBody().getPromptLease();
    ASSERT_GT(lease.getTasks().size(), 0u) << "replay handed out no prompts";
    for (auto t : lease.getTasks()) {
      std::string gid = t.getGroupId().cStr();
      leased.push_back(gid);
      for (uint32_t i = 0; i < kGroupSize; ++i) {
        capnp::MallocMessageBuilder m;
        auto st = InitEnvelope(m, "crash-test").getBody().initScoredTrajectory();
        auto traj = st.initTrajectory();
        traj.setGroupId(gid);
        traj.setSampleIndex(i);
        traj.setGroupSize(kGroupSize);
        traj.setLeaseId(lease.getLeaseId());
        traj.setCompletionText(gid + "#" + std::to_string(i));
        auto tokens = traj.initCompletionTokens(64);
        for (uint32_t k = 0; k < 64; ++k) tokens.set(k, k + i);
        st.setReward(static_cast<float>(i % 2));
        ASSERT_TRUE(sender->Send(gid + "/" + std::to_string(i), m, Clock::now() + std::chrono::seconds(120)).ok());
        ++progress;
      }
    }
  }
  ASSERT_EQ(leased.size(), static_cast<size_t>(kGroups));
  ASSERT_EQ(std::set<std::string>(leased.begin(), leased.end()).size(), leased.size()) << "a group was leased twice";
  Status flushed = sender->Flush(Clock::now() + std::chrono::seconds(120));
  ASSERT_TRUE(flushed.ok()) << flushed.ToString();
  EXPECT_EQ(rejected.load(), 0);

  // Learner side: fetch until replay says finished; one more kill lands in the middle.
  progress = 0;
  fetch_phase = true;
  std::map<std::string, int> served;
  uint64_t batch_request = 0;
  bool finished = false;
  for (int calls = 0; !finished && calls < 2000; ++calls) {
    ++batch_request;
    capnp::MallocMessageBuilder req;
    auto br = InitEnvelope(req, "crash-test").getBody().initBatchRequest();
    br.setNumGroups(64);
    br.setLearnerVersion(0);
    br.setRequestId(batch_request);
    auto reply = CallUntilAnswered(*client, req);
    ASSERT_TRUE(reply);
    auto batch = reply->root().getBody().getBatch();
    EXPECT_EQ(batch.getRequestId(), batch_request);
    for (auto g : batch.getGroups()) {
      std::string gid = g.getGroupId().cStr();
      ++served[gid];
      ASSERT_EQ(g.getSamples().size(), static_cast<unsigned>(kGroupSize)) << gid;
      for (uint32_t i = 0; i < kGroupSize; ++i) {
        auto t = g.getSamples()[i].getTrajectory();
        EXPECT_EQ(t.getSampleIndex(), i);
        EXPECT_EQ(std::string(t.getCompletionText().cStr()), gid + "#" + std::to_string(i));
      }
      ++progress;
    }
    finished = batch.getFinished();
    if (batch.getGroups().size() == 0 && !finished) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  done = true;
  killer.join();
  EXPECT_TRUE(finished);
  EXPECT_EQ(replay.kills(), 4);
  EXPECT_EQ(served.size(), static_cast<size_t>(kGroups));
  for (const auto& [gid, n] : served) EXPECT_EQ(n, 1) << gid << " served " << n << " times";
  for (const auto& gid : leased) EXPECT_EQ(served.count(gid), 1u) << gid << " never served";

  // The store itself: every group complete exactly once, no stray sample.
  int status = replay.Stop();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "graceful stop failed: " << status;
  pid_t exporter = Spawn({g_binary, "export", "--db", db, "--out", dir.Sub("all.jsonl")}, dir.Sub("export.log"));
  status = Wait(exporter);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::ifstream in(dir.Sub("all.jsonl"));
  std::map<std::string, std::set<int>> stored;
  int lines = 0;
  for (std::string line; std::getline(in, line); ++lines) {
    auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["state"], "served");
    stored[j["group_id"].get<std::string>()].insert(j["sample_index"].get<int>());
  }
  EXPECT_EQ(lines, kGroups * kGroupSize);
  EXPECT_EQ(stored.size(), static_cast<size_t>(kGroups));
  for (const auto& [gid, idx] : stored) EXPECT_EQ(idx.size(), static_cast<size_t>(kGroupSize)) << gid;
}

}  // namespace
}  // namespace aha::replay
