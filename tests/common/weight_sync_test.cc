// Weight publication over ZeroMQ: versions arrive whole and checked, in chunks.
#include "common/weight_sync.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

namespace aha {
namespace {

using namespace std::chrono_literals;

WeightsVersion MakeVersion(uint64_t version, size_t bytes, uint64_t seed) {
  WeightsVersion v;
  v.version = version;
  auto b = std::make_shared<std::vector<uint8_t>>(bytes);
  std::mt19937_64 rng(seed);
  for (auto& x : *b) x = static_cast<uint8_t>(rng());
  v.bytes = b;
  v.tensors = {{"model.embed_tokens.weight", {256, 64}, 0}, {"lm_head.weight", {256, 64}, 65536}};
  return v;
}

TEST(WeightSync, FetchesNewerVersionsWholeInChunks) {
  zmq::context_t ctx;
  WeightPublisherOptions po;
  po.chunk_bytes = 100000;  // not a divisor of the size: the last chunk is short
  auto pub = std::move(WeightPublisher::Create(ctx, po)).value();
  auto sub = std::move(WeightSubscriber::Create(ctx, pub->bound_endpoint())).value();

  auto none = sub->FetchIfNewer(0, 2000ms);
  EXPECT_TRUE(IsUnavailable(none.status())) << "nothing published yet: " << none.status().ToString();

  pub->Publish(MakeVersion(1, 1234567, 1));
  auto got = sub->FetchIfNewer(0, 2000ms);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->version, 1u);
  EXPECT_EQ(*(*got)->bytes, *MakeVersion(1, 1234567, 1).bytes);
  ASSERT_EQ((*got)->tensors.size(), 2u);
  EXPECT_EQ((*got)->tensors[1].name, "lm_head.weight");
  EXPECT_EQ((*got)->tensors[1].offset, 65536u);

  auto same = sub->FetchIfNewer(1, 2000ms);
  ASSERT_TRUE(same.ok());
  EXPECT_FALSE(same->has_value());

  pub->Publish(MakeVersion(2, 1000, 2));
  pub->Publish(MakeVersion(3, 1000, 3));
  auto newest = sub->FetchIfNewer(1, 2000ms);
  ASSERT_TRUE(newest.ok());
  EXPECT_EQ((*newest)->version, 3u);
  EXPECT_EQ(pub->latest_version(), 3u);
}

TEST(WeightSync, CorruptedBytesFailTheChecksum) {
  zmq::context_t ctx;
  auto pub = std::move(WeightPublisher::Create(ctx, {})).value();
  auto v = MakeVersion(1, 5000, 9);
  auto bytes = v.bytes;
  pub->Publish(v);
  const_cast<std::vector<uint8_t>&>(*bytes)[17] ^= 1;  // after the checksum was taken
  auto sub = std::move(WeightSubscriber::Create(ctx, pub->bound_endpoint())).value();
  auto got = sub->FetchIfNewer(0, 2000ms);
  EXPECT_TRUE(IsDataLoss(got.status())) << got.status().ToString();
}

TEST(WeightSync, NcclControlSaysDisabledWhenTheLearnerDoesNotBroadcast) {
  zmq::context_t ctx;
  auto pub = std::move(WeightPublisher::Create(ctx, {})).value();
  auto client = std::move(NcclControlClient::Create(ctx, pub->bound_endpoint(), "actor-0", 0)).value();
  auto a = client->Exchange(0, 0, 0, false, 2000ms);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_FALSE(a->enabled) << "the actor should pull over ZeroMQ";
  EXPECT_EQ(a->reason, "the learner publishes weights over ZeroMQ only");
}

// The NCCL control exchange over a real weights socket, with the ZeroMQ pull path beside it.
TEST(WeightSync, NcclControlJoinsBroadcastsAndNoticesARestartOverTheWeightsSocket) {
  zmq::context_t ctx;
  NcclMembershipOptions mo;
  mo.bytes = 2048;
  NcclMembership membership(mo, /*learner_incarnation=*/5);
  WeightPublisherOptions po;
  po.nccl = &membership;
  auto pub = std::move(WeightPublisher::Create(ctx, po)).value();
  pub->Publish(MakeVersion(1, 1000, 1));
  auto a = std::move(NcclControlClient::Create(ctx, pub->bound_endpoint(), "actor-a", 0)).value();
  auto b = std::move(NcclControlClient::Create(ctx, pub->bound_endpoint(), "actor-b", 1)).value();
  EXPECT_NE(a->incarnation(), b->incarnation());

  auto ra = a->Exchange(0, 0, 0, false, 2000ms);
  ASSERT_TRUE(ra.ok()) << ra.status().ToString();
  EXPECT_TRUE(ra->enabled);
  EXPECT_EQ(ra->learner, 5u);
  EXPECT_EQ(ra->epoch, 0u);
  EXPECT_EQ(ra->bytes, 2048u);
  EXPECT_EQ(ra->dtype, proto::DType::BF16);
  ASSERT_TRUE(b->Exchange(0, 0, 0, false, 2000ms).ok());
  EXPECT_TRUE(membership.HasWaiting(Clock::now()));

  const std::string id(256, 'e');
  auto plan = membership.Form(id, Clock::now());
  ASSERT_TRUE(plan.has_value());
  ra = a->Exchange(0, 0, 0, false, 2000ms);
  auto rb = b->Exchange(0, 0, 0, false, 2000ms);
  ASSERT_TRUE(ra.ok() && rb.ok());
  EXPECT_EQ(ra->epoch, plan->epoch);
  EXPECT_EQ(ra->nccl_id, id);
  EXPECT_EQ(ra->rank, 1u);
  EXPECT_EQ(rb->rank, 2u);
  EXPECT_EQ(rb->nranks, 3u);
  ASSERT_TRUE(a->Exchange(plan->epoch, 0, 0, false, 2000ms).ok());
  ASSERT_TRUE(b->Exchange(plan->epoch, 0, 0, false, 2000ms).ok());
  EXPECT_TRUE(membership.AllJoined());
  membership.Formed();
  EXPECT_EQ(membership.members(), 2);

  EXPECT_EQ(membership.StartBroadcast(7), 1u);
  ra = a->Exchange(plan->epoch, 0, 0, false, 2000ms);
  ASSERT_TRUE(ra.ok());
  EXPECT_EQ(ra->broadcast, 1u);
  EXPECT_EQ(ra->version, 7u);
  ASSERT_TRUE(a->Exchange(plan->epoch, 1, 0, false, 2000ms).ok());
  EXPECT_FALSE(membership.AllReceived());
  ASSERT_TRUE(b->Exchange(plan->epoch, 1, 0, false, 2000ms).ok());
  EXPECT_TRUE(membership.AllReceived());

  // actor-b's process restarts: same id, new incarnation. It starts as a joiner, and the
  // communicator it held is lost.
  auto b2 = std::move(NcclControlClient::Create(ctx, pub->bound_endpoint(), "actor-b", 1)).value();
  auto r2 = b2->Exchange(0, 0, 0, false, 2000ms);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->epoch, 0u);
  EXPECT_TRUE(membership.Doomed(Clock::now()));
  EXPECT_TRUE(membership.NeedsForming(Clock::now()));

  // A leaving actor is dropped at once.
  ASSERT_TRUE(a->Exchange(plan->epoch, 1, 0, /*leave=*/true, 2000ms).ok());
  EXPECT_EQ(membership.registered(), 1u);

  // The pull path on the same socket is unaffected.
  auto sub = std::move(WeightSubscriber::Create(ctx, pub->bound_endpoint())).value();
  auto got = sub->FetchIfNewer(0, 2000ms);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->version, 1u);
}

TEST(WeightSync, MalformedNcclRequestIsRefusedAndRegistersNobody) {
  zmq::context_t ctx;
  NcclMembership membership(NcclMembershipOptions{}, 5);
  WeightPublisherOptions po;
  po.nccl = &membership;
  auto pub = std::move(WeightPublisher::Create(ctx, po)).value();
  RpcClientOptions co;
  co.endpoint = pub->bound_endpoint();
  auto client = std::move(RpcClient::Create(ctx, co)).value();
  capnp::MallocMessageBuilder m;
  auto r = InitEnvelope(m, "hostile").getBody().initNcclRequest();
  r.setIncarnation(1);
  r.setSequence(1);  // no actor id
  auto reply = client->Call(m, 2000ms);
  EXPECT_TRUE(IsUnavailable(reply.status())) << reply.status().ToString();
  EXPECT_NE(reply.status().message().find("actorId"), std::string::npos) << reply.status().ToString();
  EXPECT_EQ(membership.registered(), 0u);
}

TEST(WeightSync, DeadLearnerIsATimeoutNotAHang) {
  zmq::context_t ctx;
  std::string endpoint;
  {
    zmq::socket_t s(ctx, zmq::socket_type::router);
    s.bind("tcp://127.0.0.1:0");
    endpoint = s.get(zmq::sockopt::last_endpoint);
  }
  auto sub = std::move(WeightSubscriber::Create(ctx, endpoint)).value();
  EXPECT_TRUE(IsTimeout(sub->FetchIfNewer(0, 200ms).status()));
}


// The checksum sees one flipped bit anywhere: in a 32-byte lane group, in the byte tail of a block,
// in the last, short block, and in blocks hashed on other threads (the buffer spans 40 blocks of
// 1 MiB, enough for several threads); the same bytes give the same sum every time.
TEST(WeightSync, ChecksumSeesAnyFlippedBitAndIsDeterministic) {
  std::vector<uint8_t> buf((size_t{40} << 20) + 13);
  uint64_t x = 12345;
  for (auto& b : buf) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    b = static_cast<uint8_t>(x >> 56);
  }
  const uint64_t sum = WeightsChecksum(buf.data(), buf.size());
  EXPECT_EQ(WeightsChecksum(buf.data(), buf.size()), sum);
  for (size_t at : {size_t{0}, size_t{31}, size_t{1} << 20, (size_t{7} << 20) + 5, (size_t{33} << 20) + 777,
                    buf.size() - 1}) {
    for (int bit : {0, 7}) {
      buf[at] ^= static_cast<uint8_t>(1 << bit);
      EXPECT_NE(WeightsChecksum(buf.data(), buf.size()), sum) << "byte " << at << " bit " << bit;
      buf[at] ^= static_cast<uint8_t>(1 << bit);
    }
  }
  // Two swapped blocks, and one byte less, are other buffers too.
  std::swap_ranges(buf.begin(), buf.begin() + (1 << 20), buf.begin() + (1 << 20));
  EXPECT_NE(WeightsChecksum(buf.data(), buf.size()), sum);
  std::swap_ranges(buf.begin(), buf.begin() + (1 << 20), buf.begin() + (1 << 20));
  EXPECT_EQ(WeightsChecksum(buf.data(), buf.size()), sum);
  EXPECT_NE(WeightsChecksum(buf.data(), buf.size() - 1), sum);
}

}  // namespace
}  // namespace aha
