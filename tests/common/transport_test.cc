// Reliable channel and request/reply over real ZeroMQ sockets on loopback.
#include "common/transport.h"

#include <gtest/gtest.h>

#include <random>
#include <set>
#include <thread>

#include "common/daemon.h"

namespace aha {
namespace {

using namespace std::chrono_literals;

Clock::time_point In(Millis d) { return Clock::now() + d; }

void BlobMessage(capnp::MallocMessageBuilder& m, const std::string& payload) {
  auto env = InitEnvelope(m, "test");
  env.getBody().setBlob(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(payload.data()), payload.size()));
}

// A receiver that records keys and, by policy, acks, drops or rejects each delivery.
struct Sink {
  std::mutex mu;
  std::multiset<std::string> seen;
  std::function<int(const std::string& key, int times_seen)> policy;  // 0 ack, 1 drop, 2 reject
  std::unique_ptr<ReliableReceiver> rx;

  Status Start(zmq::context_t& ctx, const std::string& endpoint, WireStats* stats = nullptr,
               WireLimits limits = {}) {
    ReliableReceiverOptions o;
    o.endpoint = endpoint;
    o.stats = stats;
    o.limits = limits;
    o.handler = [this](std::vector<Delivery>& batch) {
      for (auto& d : batch) {
        int times;
        {
          std::lock_guard<std::mutex> lock(mu);
          seen.insert(d.key);
          times = static_cast<int>(seen.count(d.key));
        }
        int action = policy ? policy(d.key, times) : 0;
        if (action == 0) rx->Ack(d.token);
        if (action == 2) rx->Ack(d.token, false, "no such group");
      }
    };
    ASSIGN_OR_RETURN(rx, ReliableReceiver::Create(ctx, o));
    return OkStatus();
  }
  size_t distinct() {
    std::lock_guard<std::mutex> lock(mu);
    return std::set<std::string>(seen.begin(), seen.end()).size();
  }
};

std::unique_ptr<ReliableSender> MakeSender(zmq::context_t& ctx, const std::string& endpoint,
                                           Millis resend = 200ms, size_t outbox = 4096) {
  ReliableSenderOptions o;
  o.endpoint = endpoint;
  o.resend_after = resend;
  o.max_outbox = outbox;
  auto s = ReliableSender::Create(ctx, o);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return std::move(s).value();
}

TEST(ReliableChannel, DeliversEveryMessageAndFlushes) {
  zmq::context_t ctx;
  Sink sink;
  ASSERT_TRUE(sink.Start(ctx, "tcp://127.0.0.1:0").ok());
  auto tx = MakeSender(ctx, sink.rx->bound_endpoint());
  for (int i = 0; i < 2000; ++i) {
    capnp::MallocMessageBuilder m;
    BlobMessage(m, "payload " + std::to_string(i));
    ASSERT_TRUE(tx->Send("k" + std::to_string(i), m, In(5s)).ok());
  }
  ASSERT_TRUE(tx->Flush(In(10s)).ok());
  EXPECT_EQ(sink.distinct(), 2000u);
  EXPECT_EQ(tx->counters().acked, 2000u);
  EXPECT_EQ(tx->outbox_size(), 0u);
}

TEST(ReliableChannel, ResendsUntilAcknowledgedAndKeysMakeItIdempotent) {
  zmq::context_t ctx;
  Sink sink;
  sink.policy = [](const std::string&, int times) { return times == 1 ? 1 : 0; };  // drop the first copy
  ASSERT_TRUE(sink.Start(ctx, "tcp://127.0.0.1:0").ok());
  auto tx = MakeSender(ctx, sink.rx->bound_endpoint(), 50ms);
  for (int i = 0; i < 100; ++i) {
    capnp::MallocMessageBuilder m;
    BlobMessage(m, "x");
    ASSERT_TRUE(tx->Send("g/" + std::to_string(i), m, In(5s)).ok());
  }
  ASSERT_TRUE(tx->Flush(In(10s)).ok());
  EXPECT_GE(tx->counters().resent, 100u);
  EXPECT_EQ(tx->counters().acked, 100u);
  EXPECT_EQ(sink.distinct(), 100u);          // each key stored once by key
  EXPECT_GE(sink.seen.size(), 200u);         // though delivered at least twice
}

TEST(ReliableChannel, RejectedMessagesAreReportedAndNotResent) {
  zmq::context_t ctx;
  Sink sink;
  sink.policy = [](const std::string& key, int) { return key == "bad" ? 2 : 0; };
  ASSERT_TRUE(sink.Start(ctx, "tcp://127.0.0.1:0").ok());
  ReliableSenderOptions o;
  o.endpoint = sink.rx->bound_endpoint();
  o.resend_after = 50ms;
  std::vector<std::string> rejected;
  std::mutex mu;
  o.on_rejected = [&](const std::string& key, const std::string& reason) {
    std::lock_guard<std::mutex> lock(mu);
    rejected.push_back(key + ":" + reason);
  };
  auto tx = std::move(ReliableSender::Create(ctx, o)).value();
  for (std::string key : {"a", "bad", "c"}) {
    capnp::MallocMessageBuilder m;
    BlobMessage(m, key);
    ASSERT_TRUE(tx->Send(key, m, In(1s)).ok());
  }
  ASSERT_TRUE(tx->Flush(In(5s)).ok());
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(tx->counters().rejected, 1u);
  EXPECT_EQ(tx->counters().resent, 0u);
  EXPECT_EQ(rejected, std::vector<std::string>{"bad:no such group"});
}

std::string FreeEndpoint(zmq::context_t& ctx) {
  zmq::socket_t s(ctx, zmq::socket_type::router);
  s.bind("tcp://127.0.0.1:0");
  return s.get(zmq::sockopt::last_endpoint);
}

TEST(ReliableChannel, FullOutboxBlocksSendUntilDeadlineThenDrainsWhenReceiverAppears) {
  zmq::context_t ctx;
  std::string endpoint = FreeEndpoint(ctx);
  auto tx = MakeSender(ctx, endpoint, 100ms, 4);
  for (int i = 0; i < 4; ++i) {
    capnp::MallocMessageBuilder m;
    BlobMessage(m, "x");
    ASSERT_TRUE(tx->Send(std::to_string(i), m, In(100ms)).ok());
  }
  capnp::MallocMessageBuilder m;
  BlobMessage(m, "x");
  auto t0 = Clock::now();
  Status s = tx->Send("4", m, In(150ms));
  EXPECT_TRUE(IsTimeout(s)) << s.ToString();
  EXPECT_GE(Clock::now() - t0, 140ms);
  EXPECT_TRUE(IsTimeout(tx->Flush(In(50ms))));

  Sink sink;  // the receiver comes up late: everything queued is delivered
  ASSERT_TRUE(sink.Start(ctx, endpoint).ok());
  ASSERT_TRUE(tx->Flush(In(10s)).ok());
  EXPECT_EQ(sink.distinct(), 4u);
}

TEST(ReliableChannel, MalformedFramesAreCountedDroppedAndDoNotStopTheReceiver) {
  zmq::context_t ctx;
  WireStats stats;
  Sink sink;
  WireLimits limits;
  limits.max_frame_bytes = 4096;
  ASSERT_TRUE(sink.Start(ctx, "tcp://127.0.0.1:0", &stats, limits).ok());
  zmq::socket_t raw(ctx, zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.connect(sink.rx->bound_endpoint());

  auto send_raw = [&](const std::string& b) { raw.send(zmq::buffer(b), zmq::send_flags::none); };
  std::mt19937 rng(1);
  std::string junk(64, 0);
  for (auto& c : junk) c = static_cast<char>(rng());
  send_raw(junk);                                  // random bytes (no plausible table: decode or truncated)
  send_raw("abc");                                 // truncated
  send_raw(std::string(8192, '\0'));               // oversized
  {
    capnp::MallocMessageBuilder m;
    auto env = InitEnvelope(m, "x");
    env.getBody().initBatch();                     // a body this receiver does not accept
    auto w = EncodeFrame(m);
    send_raw(std::string(reinterpret_cast<const char*>(w.begin()), w.size() * 8));
    env.getBody().setBlob(capnp::Data::Reader());
    env.setSchemaVersion(99);                      // wrong version
    w = EncodeFrame(m);
    send_raw(std::string(reinterpret_cast<const char*>(w.begin()), w.size() * 8));
  }
  raw.send(zmq::buffer(std::string("a")), zmq::send_flags::sndmore);  // two frames
  raw.send(zmq::buffer(std::string("b")), zmq::send_flags::none);

  auto tx = MakeSender(ctx, sink.rx->bound_endpoint());
  capnp::MallocMessageBuilder m;
  BlobMessage(m, "fine");
  ASSERT_TRUE(tx->Send("ok", m, In(1s)).ok());
  ASSERT_TRUE(tx->Flush(In(5s)).ok());
  EXPECT_EQ(sink.distinct(), 1u);
  EXPECT_EQ(stats.malformed(MalformedReason::kTruncated), 1u);
  EXPECT_EQ(stats.malformed(MalformedReason::kOversized), 1u);
  EXPECT_EQ(stats.malformed(MalformedReason::kSchema), 1u);
  EXPECT_EQ(stats.malformed(MalformedReason::kVersion), 1u);
  EXPECT_EQ(stats.malformed(MalformedReason::kDecode) + stats.malformed(MalformedReason::kMagic), 2u);
  EXPECT_EQ(stats.malformed_total(), 6u);
}

// --- request/reply

std::unique_ptr<RpcServer> EchoServer(zmq::context_t& ctx, std::atomic<int>* calls,
                                      Millis first_delay = 0ms) {
  RpcServerOptions o;
  o.endpoint = "tcp://127.0.0.1:0";
  o.accepts = BodyKinds{proto::Envelope::Body::BLOB};
  o.handler = [calls, first_delay](const proto::Envelope::Reader& req, proto::Envelope::Builder reply) {
    if ((*calls)++ == 0) std::this_thread::sleep_for(first_delay);
    auto in = req.getBody().getBlob();
    std::string s(reinterpret_cast<const char*>(in.begin()), in.size());
    if (s == "fail") return InvalidArgument("asked to fail");
    s = "echo:" + s;
    reply.getBody().setBlob(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(s.data()), s.size()));
    return OkStatus();
  };
  return std::move(RpcServer::Create(ctx, o)).value();
}

std::string CallBlob(RpcClient& c, const std::string& s, Millis timeout, Status* status) {
  capnp::MallocMessageBuilder m;
  BlobMessage(m, s);
  auto r = c.Call(m, timeout);
  *status = r.status();
  if (!r.ok()) return "";
  auto b = (*r)->root().getBody().getBlob();
  return std::string(reinterpret_cast<const char*>(b.begin()), b.size());
}

TEST(Rpc, RoundTripsAndReportsServerErrors) {
  zmq::context_t ctx;
  std::atomic<int> calls{0};
  auto server = EchoServer(ctx, &calls);
  RpcClientOptions o;
  o.endpoint = server->bound_endpoint();
  auto client = std::move(RpcClient::Create(ctx, o)).value();
  Status s;
  EXPECT_EQ(CallBlob(*client, "hi", 2000ms, &s), "echo:hi");
  EXPECT_TRUE(s.ok());
  CallBlob(*client, "fail", 2000ms, &s);
  EXPECT_TRUE(IsUnavailable(s));
  EXPECT_NE(s.message().find("asked to fail"), std::string::npos);
}

TEST(Rpc, DeadlineExpiresWhenNobodyAnswers) {
  zmq::context_t ctx;
  RpcClientOptions o;
  o.endpoint = FreeEndpoint(ctx);
  auto client = std::move(RpcClient::Create(ctx, o)).value();
  Status s;
  auto t0 = Clock::now();
  CallBlob(*client, "hi", 150ms, &s);
  EXPECT_TRUE(IsTimeout(s)) << s.ToString();
  EXPECT_GE(Clock::now() - t0, 140ms);
  EXPECT_LT(Clock::now() - t0, 2000ms);
}

// A stopping daemon gives up a call whose peer is gone or slow (the actor's weight fetcher at
// shutdown waited out a 2 s call to the learner that had stopped first).
TEST(Rpc, AnAbandonedCallGivesUpAndTheNextCallStillWorks) {
  zmq::context_t ctx;
  std::atomic<int> calls{0};
  auto server = EchoServer(ctx, &calls, 400ms);  // the first call is answered after 400 ms
  RpcClientOptions o;
  o.endpoint = server->bound_endpoint();
  auto client = std::move(RpcClient::Create(ctx, o)).value();
  std::atomic<bool> stop{false};
  std::thread flip([&] {
    std::this_thread::sleep_for(50ms);
    stop = true;
  });
  capnp::MallocMessageBuilder m;
  BlobMessage(m, "slow");
  auto r = client->Call(m, 30000ms, [&] { return stop.load(); });
  flip.join();
  EXPECT_TRUE(IsCancelled(r.status())) << r.status().ToString();
  // An abandon that never says yes changes nothing, and the first call's late answer is not
  // taken for this one.
  capnp::MallocMessageBuilder m2;
  BlobMessage(m2, "second");
  auto r2 = client->Call(m2, 3000ms, [] { return false; });
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  auto b = (*r2)->root().getBody().getBlob();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.begin()), b.size()), "echo:second");
  EXPECT_EQ(calls.load(), 2);
}

TEST(Rpc, ALateReplyIsNeverTakenForTheNextCall) {
  zmq::context_t ctx;
  std::atomic<int> calls{0};
  auto server = EchoServer(ctx, &calls, 400ms);
  RpcClientOptions o;
  o.endpoint = server->bound_endpoint();
  auto client = std::move(RpcClient::Create(ctx, o)).value();
  Status s;
  CallBlob(*client, "slow", 100ms, &s);
  EXPECT_TRUE(IsTimeout(s));
  EXPECT_EQ(CallBlob(*client, "second", 3000ms, &s), "echo:second");
  EXPECT_TRUE(s.ok());
}

// --- control plane

TEST(Control, StatusPauseResumeCheckpointAndStop) {
  DaemonFlags flags;
  flags.metrics = "127.0.0.1:0";
  auto rt = DaemonRuntime::Create("testd", flags);
  ASSERT_TRUE(rt.ok()) << rt.status().ToString();
  ControlHooks hooks;
  hooks.policy_version = [] { return uint64_t{42}; };
  int paused = 0;
  hooks.pause = [&] { paused++; return OkStatus(); };
  (*rt)->SetHooks(hooks);
  ASSERT_TRUE((*rt)->Start().ok());
  zmq::context_t ctx;
  std::string ep = (*rt)->control_endpoint();
  auto reply = SendControl(ctx, ep, proto::ControlCommand::STATUS, "", 2000ms);
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  auto r = (*reply)->root().getBody().getControlReply();
  EXPECT_TRUE(r.getOk());
  EXPECT_EQ(std::string(r.getStatus().getProcess().cStr()), "aha-testd");
  EXPECT_EQ(r.getStatus().getState(), proto::ProcessState::RUNNING);
  EXPECT_EQ(r.getStatus().getPolicyVersion(), 42u);

  reply = SendControl(ctx, ep, proto::ControlCommand::PAUSE, "", 2000ms);
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ((*reply)->root().getBody().getControlReply().getStatus().getState(), proto::ProcessState::PAUSED);
  EXPECT_EQ(paused, 1);
  EXPECT_TRUE((*rt)->paused());
  reply = SendControl(ctx, ep, proto::ControlCommand::RESUME, "", 2000ms);
  ASSERT_TRUE(reply.ok());
  EXPECT_FALSE((*rt)->paused());

  reply = SendControl(ctx, ep, proto::ControlCommand::CHECKPOINT, "/tmp/x", 2000ms);
  ASSERT_TRUE(reply.ok());
  auto cr = (*reply)->root().getBody().getControlReply();
  EXPECT_FALSE(cr.getOk());
  EXPECT_NE(std::string(cr.getError().cStr()).find("no state to checkpoint"), std::string::npos);

  EXPECT_FALSE((*rt)->stopping());
  reply = SendControl(ctx, ep, proto::ControlCommand::STOP, "", 2000ms);
  ASSERT_TRUE(reply.ok());
  EXPECT_TRUE((*rt)->WaitForStopFor(2000ms));
}

TEST(Control, MetricsPortInUseIsAnError) {
  DaemonFlags a;
  auto first = DaemonRuntime::Create("one", a);
  ASSERT_TRUE(first.ok());
  DaemonFlags b;
  b.metrics = "127.0.0.1:" + std::to_string((*first)->metrics().port());
  auto second = DaemonRuntime::Create("two", b);
  ASSERT_FALSE(second.ok());
  EXPECT_TRUE(IsUnavailable(second.status())) << second.status().ToString();
}

}  // namespace
}  // namespace aha
