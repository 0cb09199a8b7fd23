// Weight publication over ZeroMQ: versions arrive whole and checked, in chunks.
#include "common/weight_sync.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace aha
