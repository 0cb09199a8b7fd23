// The NCCL weight publication's control plane without NCCL: who joins which communicator, when a
// member counts as lost, who is left out after a failure and how it comes back; and the wire
// readers on malformed messages. Time is injected, so silence is exact.
#include "common/nccl_membership.h"

#include <gtest/gtest.h>

namespace aha {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kLearner = 77;
constexpr uint64_t kBytes = 4096;

class Membership : public ::testing::Test {
 protected:
  Membership() : m_(Options(), kLearner) {}
  static NcclMembershipOptions Options() {
    NcclMembershipOptions o;
    o.silence = 5s;
    o.max_actors = 3;
    o.bytes = kBytes;
    o.learner_gpu = "node1/0000:19:00.0";
    return o;
  }
  // An actor's request: its incarnation is `incarnation`; each call numbers itself.
  NcclAssignment Ask(const std::string& id, uint64_t epoch, uint64_t received = 0, uint64_t failed = 0,
                     uint64_t incarnation = 1, bool leave = false) {
    NcclActorState s;
    s.actor_id = id;
    s.incarnation = incarnation;
    s.sequence = ++sequence_[id + std::to_string(incarnation)];
    s.epoch = epoch;
    s.received = received;
    s.failed_epoch = failed;
    s.leave = leave;
    auto a = m_.Serve(s, now_);
    EXPECT_TRUE(a.ok()) << a.status().ToString();
    return a.ok() ? *a : NcclAssignment{};
  }
  // Forms a communicator of `a` and `b` (both joined) and returns its epoch.
  uint64_t FormAB() {
    Ask("a", 0);
    Ask("b", 0);
    auto plan = m_.Form("id", now_);
    EXPECT_TRUE(plan.has_value());
    Ask("a", plan->epoch);
    Ask("b", plan->epoch);
    EXPECT_TRUE(m_.AllJoined());
    m_.Formed();
    return plan->epoch;
  }
  NcclMembership m_;
  Clock::time_point now_ = Clock::time_point() + 1000s;
  std::map<std::string, uint64_t> sequence_;
};

TEST_F(Membership, JoinersFormAnEpochRankedByActorId) {
  EXPECT_FALSE(m_.NeedsForming(now_));
  NcclAssignment a = Ask("b", 0);
  EXPECT_TRUE(a.enabled);
  EXPECT_EQ(a.learner, kLearner);
  EXPECT_EQ(a.epoch, 0u) << "registered, no communicator yet";
  EXPECT_EQ(a.bytes, kBytes);
  Ask("a", 0);
  EXPECT_TRUE(m_.NeedsForming(now_));
  EXPECT_TRUE(m_.HasWaiting(now_));

  auto plan = m_.Form("cafe", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->epoch, 1u);
  EXPECT_EQ(plan->nranks, 3);
  EXPECT_EQ(plan->ranks, (std::vector<std::string>{"a", "b"}));
  NcclAssignment for_a = Ask("a", 0), for_b = Ask("b", 0);
  EXPECT_EQ(for_a.epoch, 1u);
  EXPECT_EQ(for_a.nccl_id, "cafe");
  EXPECT_EQ(for_a.rank, 1u);
  EXPECT_EQ(for_b.rank, 2u);
  EXPECT_EQ(for_b.nranks, 3u);
  EXPECT_FALSE(m_.AllJoined()) << "nobody has reported epoch 1 yet";
  EXPECT_EQ(m_.members(), 0) << "not formed yet";

  Ask("a", 1);
  EXPECT_FALSE(m_.AllJoined());
  Ask("b", 1);
  EXPECT_TRUE(m_.AllJoined());
  m_.Formed();
  EXPECT_EQ(m_.members(), 2);
  EXPECT_FALSE(m_.NeedsForming(now_));
  EXPECT_FALSE(m_.Doomed(now_));
}

TEST_F(Membership, BroadcastCompletesWhenEveryMemberReportsIt) {
  const uint64_t e = FormAB();
  EXPECT_EQ(m_.StartBroadcast(42), 1u);
  NcclAssignment a = Ask("a", e);
  EXPECT_EQ(a.broadcast, 1u);
  EXPECT_EQ(a.version, 42u);
  EXPECT_FALSE(m_.AllReceived());
  Ask("a", e, 1);
  EXPECT_FALSE(m_.AllReceived());
  Ask("b", e, 1);
  EXPECT_TRUE(m_.AllReceived());
  EXPECT_EQ(m_.StartBroadcast(43), 2u);
  EXPECT_FALSE(m_.AllReceived());
}

TEST_F(Membership, ANewActorMakesTheNextPublicationFormAgain) {
  const uint64_t e = FormAB();
  Ask("c", 0);
  EXPECT_TRUE(m_.NeedsForming(now_));
  EXPECT_FALSE(m_.Doomed(now_)) << "a joiner does not disturb the communicator in use";
  auto plan = m_.Form("beef", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->epoch, e + 1);
  EXPECT_EQ(plan->nranks, 4);
  EXPECT_EQ(Ask("a", e).epoch, e + 1) << "members of the old epoch are told the new one";
}

TEST_F(Membership, SilentMemberDoomsTheBroadcastAndIsLeftOutAfterTheFailure) {
  const uint64_t e = FormAB();
  m_.StartBroadcast(5);
  now_ += 3s;
  Ask("a", e, 1);  // a received it; b says nothing from now on
  EXPECT_FALSE(m_.Doomed(now_));
  now_ += 2s + 1ms;  // b's last word is now more than 5 s old
  EXPECT_TRUE(m_.Doomed(now_));
  EXPECT_TRUE(m_.NeedsForming(now_));
  m_.Failed(now_);
  EXPECT_EQ(m_.epoch(), 0u);
  EXPECT_EQ(m_.members(), 0);
  EXPECT_EQ(Ask("a", e).epoch, 0u) << "the survivor is told to drop the communicator";
  auto plan = m_.Form("f00d", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->ranks, std::vector<std::string>{"a"});
}

TEST_F(Membership, MemberThatDidNotCompleteComesBackOnlyWhenHeardFromAgain) {
  const uint64_t e = FormAB();
  m_.StartBroadcast(5);
  Ask("a", e, 1);
  now_ += 1s;
  m_.Failed(now_);  // the deadline passed; b, still "live", had not reported
  auto plan = m_.Form("1234", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->ranks, std::vector<std::string>{"a"}) << "b did not complete: left out";
  m_.Formed();
  EXPECT_FALSE(m_.NeedsForming(now_));

  now_ += 10ms;
  EXPECT_EQ(Ask("b", 0).epoch, 0u);  // alive after all: it asks again
  EXPECT_TRUE(m_.NeedsForming(now_));
  plan = m_.Form("5678", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->ranks, (std::vector<std::string>{"a", "b"}));
}

TEST_F(Membership, FailedFormingKeepsTheMembersThatJoined) {
  Ask("a", 0);
  Ask("b", 0);
  auto plan = m_.Form("id", now_);
  ASSERT_TRUE(plan.has_value());
  Ask("a", plan->epoch);
  now_ += 1s;
  m_.Failed(now_);
  plan = m_.Form("id2", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->ranks, std::vector<std::string>{"a"});
}

TEST_F(Membership, RestartedActorIsANewMemberAndDoomsItsOldEpoch) {
  const uint64_t e = FormAB();
  NcclAssignment a = Ask("b", 0, 0, 0, /*incarnation=*/2);
  EXPECT_EQ(a.epoch, 0u) << "the new process starts as a joiner";
  EXPECT_TRUE(m_.Doomed(now_));
  EXPECT_TRUE(m_.NeedsForming(now_));
  EXPECT_EQ(m_.members(), 1);
  auto plan = m_.Form("id", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->epoch, e + 1);
  EXPECT_EQ(plan->nranks, 3) << "the restarted b rejoins";
}

TEST_F(Membership, MemberThatLosesItsCommunicatorIsLost) {
  FormAB();
  EXPECT_EQ(Ask("a", 0).epoch, 0u) << "a aborted its side: it is told to wait";
  EXPECT_TRUE(m_.Doomed(now_));
}

TEST_F(Membership, ReportedFailureDoomsTheEpochAtOnce) {
  const uint64_t e = FormAB();
  m_.StartBroadcast(1);
  Ask("a", e, 0, /*failed=*/e);
  EXPECT_TRUE(m_.Doomed(now_));
}

TEST_F(Membership, FailureReportsOfOlderEpochsAreIgnored) {
  const uint64_t e = FormAB();
  Ask("a", 0, 0, /*failed=*/e);
  m_.Failed(now_);
  now_ += 1ms;  // heard from after the failure
  Ask("a", 0, 0, e);
  Ask("b", 0, 0, e);
  auto plan = m_.Form("id", now_);
  ASSERT_TRUE(plan.has_value());
  Ask("a", plan->epoch, 0, e);
  Ask("b", plan->epoch, 0, e);
  EXPECT_TRUE(m_.AllJoined());
  EXPECT_FALSE(m_.Doomed(now_));
}

TEST_F(Membership, LeavingEndsTheMembershipAtOnce) {
  FormAB();
  Ask("b", 0, 0, 0, 1, /*leave=*/true);
  EXPECT_TRUE(m_.Doomed(now_));
  EXPECT_EQ(m_.registered(), 1u);
  auto plan = m_.Form("id", now_);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->ranks, std::vector<std::string>{"a"});
}

TEST_F(Membership, MemberLeavingAfterItReceivedDoesNotFailTheBroadcast) {
  const uint64_t e = FormAB();
  m_.StartBroadcast(9);
  Ask("a", e, 1);
  Ask("b", e, 1);
  Ask("b", e, 1, 0, 1, /*leave=*/true);
  EXPECT_TRUE(m_.AllReceived()) << "everyone still there has it";
  EXPECT_TRUE(m_.NeedsForming(now_)) << "the next publication forms without b";
}

TEST_F(Membership, LastMemberGoneEndsTheCommunicator) {
  const uint64_t e = FormAB();
  Ask("a", e, 0, 0, 1, true);
  Ask("b", e, 0, 0, 1, true);
  EXPECT_TRUE(m_.NeedsForming(now_));
  EXPECT_FALSE(m_.Form("id", now_).has_value());
  EXPECT_EQ(m_.epoch(), 0u);
  EXPECT_EQ(m_.members(), 0);
  EXPECT_FALSE(m_.NeedsForming(now_));
}

TEST_F(Membership, OlderRequestsChangeNothing) {
  const uint64_t e = FormAB();
  NcclActorState stale;
  stale.actor_id = "a";
  stale.incarnation = 1;
  stale.sequence = 1;  // long overtaken
  stale.epoch = 0;     // would mean "a lost its communicator"
  auto r = m_.Serve(stale, now_);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->epoch, e);
  EXPECT_FALSE(m_.Doomed(now_));
}

TEST_F(Membership, RefusesActorsBeyondTheBoundButMakesRoomFromSilentOnes) {
  Ask("a", 0);
  Ask("b", 0);
  Ask("c", 0);
  NcclActorState d;
  d.actor_id = "d";
  d.incarnation = 1;
  d.sequence = 1;
  EXPECT_TRUE(IsResourceExhausted(m_.Serve(d, now_).status()));
  now_ += 6s;  // a, b and c are silent now
  EXPECT_TRUE(m_.Serve(d, now_).ok());
  EXPECT_EQ(m_.registered(), 1u);
}

TEST_F(Membership, ActorOnTheLearnersGpuOrOnAnotherActorsIsToldToPull) {
  auto ask = [&](const std::string& id, const std::string& gpu) {
    NcclActorState s;
    s.actor_id = id;
    s.incarnation = 1;
    s.sequence = ++sequence_[id];
    s.gpu = gpu;
    return m_.Serve(s, now_).value();
  };
  NcclAssignment a = ask("a", "node1/0000:19:00.0");
  EXPECT_FALSE(a.enabled);
  EXPECT_EQ(a.reason, "a runs on the learner's GPU (node1/0000:19:00.0); NCCL needs a GPU per rank");
  EXPECT_EQ(m_.registered(), 0u);
  EXPECT_TRUE(ask("b", "node1/0000:2a:00.0").enabled);
  NcclAssignment c = ask("c", "node1/0000:2a:00.0");
  EXPECT_FALSE(c.enabled);
  EXPECT_EQ(c.reason, "c shares its GPU (node1/0000:2a:00.0) with b; NCCL needs a GPU per rank");
  EXPECT_TRUE(ask("b", "node1/0000:2a:00.0").enabled) << "b keeps its place";
  EXPECT_TRUE(ask("d", "node2/0000:2a:00.0").enabled) << "the same bus on another host is another GPU";
  now_ += 6s;  // b went silent: its GPU is free for c
  EXPECT_TRUE(ask("c", "node1/0000:2a:00.0").enabled);
}

TEST(NcclWire, RequestReaderRejectsMalformedFields) {
  capnp::MallocMessageBuilder m;
  auto r = m.initRoot<proto::NcclRequest>();
  EXPECT_TRUE(IsInvalidArgument(ReadNcclRequest(r.asReader()).status())) << "empty actor id";
  r.setActorId(std::string(300, 'x'));
  r.setIncarnation(1);
  r.setSequence(1);
  EXPECT_TRUE(IsInvalidArgument(ReadNcclRequest(r.asReader()).status())) << "actor id too long";
  r.setActorId("a");
  r.setIncarnation(0);
  EXPECT_TRUE(IsInvalidArgument(ReadNcclRequest(r.asReader()).status())) << "incarnation 0";
  r.setIncarnation(9);
  r.setSequence(0);
  EXPECT_TRUE(IsInvalidArgument(ReadNcclRequest(r.asReader()).status())) << "sequence 0";
  r.setSequence(3);
  r.setGpu(std::string(300, 'g'));
  EXPECT_TRUE(IsInvalidArgument(ReadNcclRequest(r.asReader()).status())) << "gpu name too long";
  r.setGpu("node1/0000:19:00.0");
  r.setEpoch(4);
  auto ok = ReadNcclRequest(r.asReader());
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->actor_id, "a");
  EXPECT_EQ(ok->epoch, 4u);
}

TEST(NcclWire, ReplyReaderRejectsImpossibleRanksAndSizes) {
  NcclAssignment a;
  a.enabled = true;
  a.learner = 1;
  a.epoch = 2;
  a.nccl_id = "00ff";
  a.rank = 1;
  a.nranks = 2;
  a.bytes = 8;
  capnp::MallocMessageBuilder m;
  auto b = m.initRoot<proto::NcclReply>();
  WriteNcclReply(a, b);
  auto back = ReadNcclReply(b.asReader());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->nccl_id, "00ff");
  b.setRank(0);
  EXPECT_TRUE(IsInvalidArgument(ReadNcclReply(b.asReader()).status())) << "rank 0 is the learner's";
  b.setRank(2);
  EXPECT_TRUE(IsInvalidArgument(ReadNcclReply(b.asReader()).status())) << "rank past nranks";
  b.setRank(1);
  b.setNcclId("");
  EXPECT_TRUE(IsInvalidArgument(ReadNcclReply(b.asReader()).status())) << "no id";
  b.setNcclId("00ff");
  b.setBytes(uint64_t{1} << 40);
  EXPECT_TRUE(IsInvalidArgument(ReadNcclReply(b.asReader()).status())) << "an impossible buffer";
}

}  // namespace
}  // namespace aha
