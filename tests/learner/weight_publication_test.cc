// The learner's publication choices: grpo.weight_sync resolved against the devices and the build,
// and WeightPublication's ZeroMQ path on the CPU serving every version and telling GPU actors that
// this learner does not broadcast. (The NCCL path: tests/engine/nccl_publish_test.cc, label gpu.)
#include "learner/weight_publication.h"

#include <gtest/gtest.h>

#include <cstring>

#include "engine/cpu_backend.h"

namespace aha {
namespace {

using namespace std::chrono_literals;

JobConfig Job(const std::string& weight_sync, std::vector<std::string> actor_devices) {
  JobConfig job;
  job.grpo.weight_sync = weight_sync;
  job.topology.actors.clear();
  for (auto& d : actor_devices) job.topology.actors.push_back(ActorSpec{d});
  return job;
}

const engine::Device kCuda0{engine::DeviceKind::kCuda, 0};
const engine::Device kCpu = engine::Device::Cpu();

TEST(ResolveWeightSync, AutoIsNcclOnlyWhenEverythingIsOnCudaAndTheBuildHasNccl) {
  auto all_gpu = Job("auto", {"cuda:1", "cuda:2"});
  EXPECT_EQ(*ResolveWeightSync(all_gpu, kCuda0, true), WeightSync::kNccl);
  EXPECT_EQ(*ResolveWeightSync(all_gpu, kCuda0, false), WeightSync::kZmq) << "no NCCL in the build";
  EXPECT_EQ(*ResolveWeightSync(all_gpu, kCpu, true), WeightSync::kZmq) << "learner on the CPU";
  EXPECT_EQ(*ResolveWeightSync(Job("auto", {"cuda:1", "cpu"}), kCuda0, true), WeightSync::kZmq)
      << "one actor on the CPU";
  EXPECT_EQ(*ResolveWeightSync(Job("zmq", {"cuda:1"}), kCuda0, true), WeightSync::kZmq);
  EXPECT_EQ(*ResolveWeightSync(Job("nccl", {"cuda:1", "cpu"}), kCuda0, true), WeightSync::kNccl)
      << "asked for: GPU actors take the broadcast, the CPU one pulls";
}

TEST(ResolveWeightSync, NcclThatCannotBeHadIsAnErrorNamingTheKey) {
  auto on_cpu = ResolveWeightSync(Job("nccl", {"cuda:1"}), kCpu, true);
  ASSERT_TRUE(IsInvalidArgument(on_cpu.status()));
  EXPECT_EQ(on_cpu.status().message(), "grpo.weight_sync: nccl needs the learner on a CUDA device (it is on cpu)");
  auto no_nccl = ResolveWeightSync(Job("nccl", {"cuda:1"}), kCuda0, false);
  ASSERT_TRUE(IsInvalidArgument(no_nccl.status()));
  EXPECT_EQ(no_nccl.status().message(), "grpo.weight_sync: nccl, but this build has no NCCL");
}

TEST(WeightPublication, ZmqPathServesEveryVersionAndTellsGpuActorsToPull) {
  engine::CpuBackend backend;
  auto cfg = engine::PresetConfig(engine::Arch::kQwen2, "tiny", 64);
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  auto model = engine::Transformer::Init(*cfg, 3, &backend);
  zmq::context_t ctx;
  auto publication = WeightPublication::Create(ctx, model.get(), 4, WeightPublicationOptions{});
  ASSERT_TRUE(publication.ok()) << publication.status().ToString();
  EXPECT_EQ((*publication)->mode(), WeightSync::kZmq);
  auto sub = std::move(WeightSubscriber::Create(ctx, (*publication)->bound_endpoint())).value();
  auto first = sub->FetchIfNewer(0, 2000ms);
  ASSERT_TRUE(first.ok() && first->has_value()) << first.status().ToString();
  EXPECT_EQ((*first)->version, 4u) << "the version it starts from is served at once";
  EXPECT_EQ((*first)->bytes->size(), model->num_params() * sizeof(float));

  model->params()[0] += 1.0f;  // on the CPU backend params() is host memory
  EXPECT_EQ((*publication)->Publish(5), model->num_params() * sizeof(float));
  auto next = sub->FetchIfNewer(4, 2000ms);
  ASSERT_TRUE(next.ok() && next->has_value()) << next.status().ToString();
  EXPECT_EQ((*next)->version, 5u);
  EXPECT_EQ(std::memcmp((*next)->bytes->data(), model->params(), model->num_params() * sizeof(float)), 0);
  (*publication)->ServeJoiners();  // nothing to do without NCCL

  auto nccl = std::move(NcclControlClient::Create(ctx, (*publication)->bound_endpoint(), "actor-0", 0)).value();
  auto a = nccl->Exchange(0, 0, 0, false, 2000ms);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_FALSE(a->enabled);
}

}  // namespace
}  // namespace aha
