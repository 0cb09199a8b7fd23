// The aha-replay binary end to end: leases, ingest with rejection reasons over the reliable
// channel, malformed frames, control (status, pause, resume, checkpoint, stop), metrics, restore
// from a checkpoint, and one-line errors for bad command lines and datasets.
#include <capnp/message.h>
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "common/daemon.h"
#include "common/transport.h"
#include "common/wire.h"
#include "tests/replay/process_util.h"
#include "tests/replay/test_util.h"

namespace aha::replay {
namespace {

using namespace aha::replay::testing;
const std::string kBinary = AHA_REPLAY_BIN;

struct Running {
  pid_t pid = -1;
  std::string control, rpc, ingest;
  int metrics_port = 0;
};

Running Start(const TempDir& dir, const std::string& name, std::vector<std::string> extra) {
  Running r;
  std::string ready = dir.Sub(name + ".ready"), endpoints = dir.Sub(name + ".endpoints");
  std::vector<std::string> args = {kBinary, "--ready-file", ready, "--endpoints-file", endpoints,
                                   "--metrics", "127.0.0.1:0", "--log-level", "warn"};
  args.insert(args.end(), extra.begin(), extra.end());
  r.pid = Spawn(args, dir.Sub(name + ".log"));
  EXPECT_TRUE(WaitForFile(ready, 30)) << ReadAll(dir.Sub(name + ".log"));
  auto j = nlohmann::json::parse(ReadAll(ready));
  r.control = j["control"];
  r.metrics_port = std::stoi(j["metrics"].get<std::string>().substr(10));
  auto e = nlohmann::json::parse(ReadAll(endpoints));
  r.rpc = e["rpc"];
  r.ingest = e["ingest"];
  return r;
}

proto::PromptLease::Reader Lease(RpcClient& client, capnp::MallocMessageBuilder& req,
                                 std::unique_ptr<DecodedEnvelope>& keep, uint32_t n) {
  auto lr = InitEnvelope(req, "test").getBody().initLeaseRequest();
  lr.setActorId("actor-0");
  lr.setMaxTasks(n);
  auto reply = client.Call(req, Millis(5000));
  EXPECT_TRUE(reply.ok()) << reply.status().ToString();
  keep = std::move(reply).value();
  return keep->root().getBody().getPromptLease();
}

proto::ProcessStatus::Reader Control(zmq::context_t& ctx, const std::string& endpoint, proto::ControlCommand cmd,
                                     std::unique_ptr<DecodedEnvelope>& keep, const std::string& arg = "") {
  auto reply = SendControl(ctx, endpoint, cmd, arg, Millis(5000));
  EXPECT_TRUE(reply.ok()) << reply.status().ToString();
  keep = std::move(reply).value();
  auto r = keep->root().getBody().getControlReply();
  EXPECT_TRUE(r.getOk()) << r.getError().cStr();
  return r.getStatus();
}

TEST(ReplayDaemon, ServesLeasesIngestControlAndRestoresFromACheckpoint) {
  TempDir dir;
  WriteDataset(dir.Sub("data.jsonl"), 20);
  Running r = Start(dir, "a", {"--db", dir.Sub("db"), "--data", dir.Sub("data.jsonl"), "--group-size", "2",
                               "--groups-per-step", "2", "--max-staleness", "0", "--shuffle=false"});
  zmq::context_t ctx;
  auto client = RpcClient::Create(ctx, RpcClientOptions{r.rpc, "test", {}, nullptr}).value();

  // Lease: the rate limiter allows (0 + 1) x 2 groups.
  capnp::MallocMessageBuilder lreq;
  std::unique_ptr<DecodedEnvelope> lkeep;
  auto lease = Lease(*client, lreq, lkeep, 5);
  ASSERT_EQ(lease.getTasks().size(), 2u);
  std::string gid = lease.getTasks()[0].getGroupId().cStr();
  EXPECT_EQ(std::string(lease.getTasks()[0].getTask().getId().cStr()), "t0");

  // Ingest: good samples are acknowledged, bad ones rejected for good with their reason.
  std::mutex mu;
  std::map<std::string, std::string> rejected;
  ReliableSenderOptions so;
  so.endpoint = r.ingest;
  so.on_rejected = [&](const std::string& key, const std::string& reason) {
    std::lock_guard<std::mutex> lock(mu);
    rejected[key] = reason;
  };
  auto sender = ReliableSender::Create(ctx, so).value();
  auto send = [&](const std::string& group, uint32_t index, float reward) {
    capnp::MallocMessageBuilder m;
    auto st = InitEnvelope(m, "test").getBody().initScoredTrajectory();
    st.setReward(reward);
    st.initTrajectory().setGroupId(group);
    st.getTrajectory().setSampleIndex(index);
    ASSERT_TRUE(sender->Send(group + "/" + std::to_string(index), m, Clock::now() + std::chrono::seconds(5)).ok());
  };
  send(gid, 0, 1);
  send(gid, 1, 0);
  send(gid, 1, 0);  // duplicate: acknowledged, stored once
  send("g-nope", 0, 1);
  send(gid, 9, 1);
  // Garbage on the ingest socket is counted and dropped; the daemon keeps going.
  zmq::socket_t raw(ctx, zmq::socket_type::dealer);
  raw.connect(r.ingest);
  raw.send(zmq::buffer(std::string("definitely not an envelope")), zmq::send_flags::none);
  ASSERT_TRUE(sender->Flush(Clock::now() + std::chrono::seconds(10)).ok());
  EXPECT_EQ(rejected["g-nope/0"], "unknown_group");
  EXPECT_EQ(rejected[gid + "/9"], "bad_sample_index");
  EXPECT_EQ(rejected.size(), 2u);

  std::unique_ptr<DecodedEnvelope> keep;
  auto st = Control(ctx, r.control, proto::ControlCommand::STATUS, keep);
  EXPECT_EQ(std::string(st.getProcess().cStr()), "aha-replay");
  ASSERT_TRUE(st.getDetail().isReplay());
  auto rs = st.getDetail().getReplay();
  EXPECT_EQ(rs.getGroupsComplete(), 1u);
  EXPECT_EQ(rs.getGroupsIncomplete(), 1u);
  EXPECT_EQ(rs.getTasksQueued(), 18u);
  EXPECT_GT(rs.getDiskBytes(), 0u);

  // Pause stops dispatch; resume restarts it.
  Control(ctx, r.control, proto::ControlCommand::PAUSE, keep);
  EXPECT_EQ(Control(ctx, r.control, proto::ControlCommand::STATUS, keep).getState(), proto::ProcessState::PAUSED);

  // Metrics: the names of DESIGN.md §7 with live values.
  std::string metrics = HttpGet(r.metrics_port, "/metrics");
  EXPECT_NE(metrics.find("aha_replay_ingested_trajectories_total 2"), std::string::npos) << metrics.substr(0, 2000);
  EXPECT_NE(metrics.find("aha_replay_rejected_trajectories_total{reason=\"unknown_group\"} 1"), std::string::npos);
  EXPECT_NE(metrics.find("aha_replay_duplicate_trajectories_total 1"), std::string::npos);
  EXPECT_NE(metrics.find("aha_malformed_messages_total"), std::string::npos);
  EXPECT_NE(metrics.find("aha_replay_paused 1"), std::string::npos);

  // Checkpoint, then stop gracefully.
  auto ck = SendControl(ctx, r.control, proto::ControlCommand::CHECKPOINT, dir.Sub("ckpt"), Millis(5000));
  ASSERT_TRUE(ck.ok());
  EXPECT_EQ(std::string((*ck)->root().getBody().getControlReply().getResult().cStr()), dir.Sub("ckpt"));
  EXPECT_TRUE(std::filesystem::exists(dir.Sub("ckpt") + "/CURRENT"));
  Control(ctx, r.control, proto::ControlCommand::STOP, keep);
  EXPECT_EQ(ExitCode(WaitPid(r.pid)), 0);

  // A new replay started from the checkpoint has the same state.
  Running b = Start(dir, "b", {"--db", dir.Sub("db2"), "--restore-from", dir.Sub("ckpt")});
  auto st2 = Control(ctx, b.control, proto::ControlCommand::STATUS, keep).getDetail().getReplay();
  EXPECT_EQ(st2.getGroupsComplete(), 1u);
  EXPECT_EQ(st2.getGroupsIncomplete(), 1u);
  auto client2 = RpcClient::Create(ctx, RpcClientOptions{b.rpc, "test", {}, nullptr}).value();
  capnp::MallocMessageBuilder breq;
  auto br = InitEnvelope(breq, "test").getBody().initBatchRequest();
  br.setNumGroups(4);
  br.setRequestId(1);
  auto batch = client2->Call(breq, Millis(5000));
  ASSERT_TRUE(batch.ok());
  auto groups = (*batch)->root().getBody().getBatch().getGroups();
  ASSERT_EQ(groups.size(), 1u);
  EXPECT_EQ(std::string(groups[0].getGroupId().cStr()), gid);
  EXPECT_EQ(groups[0].getSamples().size(), 2u);
  kill(b.pid, SIGTERM);
  EXPECT_EQ(ExitCode(WaitPid(b.pid)), 0);
}

// Runs the binary to completion; returns (exit code, output).
std::pair<int, std::string> RunBinary(const TempDir& dir, std::vector<std::string> args) {
  static int n = 0;
  std::string log = dir.Sub("run" + std::to_string(n++) + ".log");
  args.insert(args.begin(), kBinary);
  int code = ExitCode(WaitPid(Spawn(args, log)));
  return {code, ReadAll(log)};
}

TEST(ReplayDaemon, BadInputFailsWithOneLineAndNonZeroExit) {
  TempDir dir;
  auto [code, out] = RunBinary(dir, {"--data", "x.jsonl"});
  EXPECT_EQ(code, 2);
  EXPECT_EQ(out, "aha-replay: error: --db is required\n");

  std::tie(code, out) = RunBinary(dir, {"--db", dir.Sub("db"), "--durability", "fsync"});
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("durability must be sync or buffered"), std::string::npos) << out;

  WriteFile(dir.Sub("bad.jsonl"), "{\"id\":\"a\",\"prompt\":\"p\",\"answer\":\"1\",\"kind\":\"math\"}\n{\"id\":\"b\",\"kind\":\"math\"}\n");
  std::tie(code, out) = RunBinary(dir, {"--db", dir.Sub("db"), "--data", dir.Sub("bad.jsonl"), "--metrics="});
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("bad.jsonl:2: field 'prompt': missing"), std::string::npos) << out;

  std::tie(code, out) = RunBinary(dir, {"export", "--db", dir.Sub("db"), "--out", dir.Sub("o.jsonl"), "--filter", "good"});
  EXPECT_EQ(code, 2);
  EXPECT_EQ(out, "aha-replay export: error: --filter must be correct or all, got 'good'\n");

  std::tie(code, out) = RunBinary(dir, {"export", "--db", dir.Sub("missing"), "--out", dir.Sub("o.jsonl")});
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("is not a replay db directory"), std::string::npos) << out;
}

}  // namespace
}  // namespace aha::replay
