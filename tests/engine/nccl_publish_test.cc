// Weight publication over NCCL between two processes on two GPUs (label gpu; skips with the reason
// on a machine with fewer). This process is the learner: a WeightBroadcaster on cuda:0 whose
// NcclMembership serves a real ZeroMQ weights socket (WeightPublisher). The actor is a child
// process on cuda:1 (this binary re-run as NcclPublishChild.Actor, driven by environment
// variables), because an actor that dies must be a process of its own.
//   (a) Version 1 reaches the actor's WeightReceiver and is swapped in bit-exact: its f32 params and
//       its GEMM copy equal the learner's params rounded to bf16, every one of them.
//   (b) An actor killed mid-broadcast (it joins, enqueues its part of the broadcast and SIGKILLs
//       itself before reporting): the learner's publication returns failed and counted, long
//       before its deadline; the same actor restarted (same id, new process) joins a new
//       communicator and the next publication reaches it bit-exact.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/weight_sync.h"
#include "engine/cuda/weight_broadcast.h"
#include "engine/tensor.h"
#include "tests/spawn_self.h"

namespace aha::engine::cuda {
namespace {

using namespace std::chrono_literals;

constexpr size_t kParams = size_t{64} << 20;  // 256 MiB of f32 on the learner, 128 MiB broadcast
constexpr const char* kActorId = "actor-0";

// The learner's weights of `version`, a function of the index so the actor can check every one.
float Param(size_t i, uint64_t version) {
  uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ (version * 0xbf58476d1ce4e5b9ull);
  x ^= x >> 31;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 29;
  return static_cast<float>(static_cast<int64_t>(x % 2000001) - 1000000) * 3e-7f;
}

int GpuCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

pid_t SpawnActor(const std::string& endpoint, const std::string& mode, uint64_t version) {
  return test::SpawnSelf("NcclPublishChild.Actor", {"AHA_PUBLISH_ENDPOINT=" + endpoint, "AHA_PUBLISH_MODE=" + mode,
                                                    "AHA_PUBLISH_VERSION=" + std::to_string(version)});
}

// ---- the actor (child process) ------------------------------------------------------------------

// "live": the production WeightReceiver loop until `version` is swapped in, then every parameter
// and its bf16 copy are checked. "die": joins by hand, enqueues its part of the first broadcast
// and SIGKILLs itself without reporting.
TEST(NcclPublishChild, Actor) {
  const char* endpoint = std::getenv("AHA_PUBLISH_ENDPOINT");
  const char* mode = std::getenv("AHA_PUBLISH_MODE");
  const char* version_s = std::getenv("AHA_PUBLISH_VERSION");
  if (!endpoint || !mode || !version_s) GTEST_SKIP() << "runs only as the actor process of NcclPublish.*";
  const uint64_t version = std::stoull(version_s);
  zmq::context_t ctx;
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  if (std::string(mode) == "die") {
    auto client = NcclControlClient::Create(ctx, endpoint, kActorId, 1);
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    cudaStream_t stream;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    void* staging = nullptr;
    ASSERT_EQ(cudaMalloc(&staging, kParams * 2), cudaSuccess);
    std::unique_ptr<NcclGroup> group;
    uint64_t epoch = 0;
    const auto until = std::chrono::steady_clock::now() + 120s;
    while (std::chrono::steady_clock::now() < until) {
      auto a = (*client)->Exchange(epoch, 0, 0, false, 2000ms);
      ASSERT_TRUE(a.ok()) << a.status().ToString();
      if (epoch == 0 && a->epoch != 0) {
        // Keeps reporting while NCCL initialises, as the real receiver does (it must not go silent).
        auto keep_polling = [&, last = std::chrono::steady_clock::now()]() mutable {
          if (std::chrono::steady_clock::now() - last > 10ms) {
            last = std::chrono::steady_clock::now();
            (void)(*client)->Exchange(0, 0, 0, false, 2000ms);
          }
          return false;
        };
        auto g = NcclGroup::Join(a->nccl_id, static_cast<int>(a->nranks), static_cast<int>(a->rank), 1, stream,
                                 60s, keep_polling);
        ASSERT_TRUE(g.ok()) << g.status().ToString();
        group = std::move(g).value();
        epoch = a->epoch;
        continue;
      }
      if (epoch != 0 && a->broadcast == 1) {
        ASSERT_TRUE(group->BroadcastAsync(staging, a->bytes, 0, 60s).ok());
        raise(SIGKILL);
      }
      std::this_thread::sleep_for(5ms);
    }
    FAIL() << "never asked to take part in a broadcast";
  }

  float* params = nullptr;
  uint16_t* shadow = nullptr;
  cudaStream_t model_stream;
  ASSERT_EQ(cudaMalloc(&params, kParams * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&shadow, kParams * 2), cudaSuccess);
  ASSERT_EQ(cudaMemset(params, 0xff, kParams * 4), cudaSuccess);  // NaN until swapped
  ASSERT_EQ(cudaStreamCreate(&model_stream), cudaSuccess);
  WeightReceiverOptions o;
  o.endpoint = endpoint;
  o.actor_id = kActorId;
  o.device = 1;
  o.n = kParams;
  o.params = params;
  o.shadow = shadow;
  o.swap_stream = model_stream;
  auto receiver = WeightReceiver::Create(ctx, o);
  ASSERT_TRUE(receiver.ok()) << receiver.status().ToString();
  uint64_t have = 0;
  const auto until = std::chrono::steady_clock::now() + 180s;
  for (;;) {
    ASSERT_LT(std::chrono::steady_clock::now(), until) << "version " << version << " never arrived";
    auto step = (*receiver)->Step();
    ASSERT_FALSE(!step.ok() && IsFailedPrecondition(step.status())) << step.status().ToString();
    if (!step.ok()) std::cout << "actor: " << step.status().ToString() << "\n";
    // The generator's part, between two decode steps.
    auto swapped = (*receiver)->SwapIn(have);
    ASSERT_TRUE(swapped.ok()) << swapped.status().ToString();
    if (swapped->has_value()) have = **swapped;
    // Done once the version is in and an idle round has told the learner it was received.
    if (step.ok() && !*step && have == version) break;
    if (!step.ok() || !*step) std::this_thread::sleep_for(10ms);
  }
  ASSERT_EQ(have, version);
  ASSERT_EQ(cudaStreamSynchronize(model_stream), cudaSuccess);
  std::vector<float> got(kParams);
  std::vector<uint16_t> got_bf16(kParams);
  ASSERT_EQ(cudaMemcpy(got.data(), params, kParams * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got_bf16.data(), shadow, kParams * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  size_t bad = 0, bad_bf16 = 0;
  for (size_t i = 0; i < kParams; ++i) {
    const uint16_t want = F32ToBF16(Param(i, version));
    const float want_f32 = BF16ToF32(want);
    bad += std::memcmp(&got[i], &want_f32, 4) != 0;
    bad_bf16 += got_bf16[i] != want;
  }
  EXPECT_EQ(bad, 0u) << "params that differ from the learner's rounded to bf16";
  EXPECT_EQ(bad_bf16, 0u) << "GEMM copies that differ from the learner's bf16";
  receiver->reset();  // leaves: the learner need not wait for this actor
  cudaFree(params);
  cudaFree(shadow);
}

// ---- the learner (this process) -----------------------------------------------------------------

class Learner {
 public:
  explicit Learner(zmq::context_t& ctx) {
    NcclMembershipOptions mo;
    mo.silence = 10s;  // the killed actor is noticed after this
    mo.bytes = kParams * 2;
    mo.learner_gpu = GpuIdentity(0).value();
    membership_ = std::make_unique<NcclMembership>(mo, 0x1ea2e2);
    WeightPublisherOptions wo;
    wo.nccl = membership_.get();
    publisher_ = std::move(WeightPublisher::Create(ctx, wo)).value();
    WeightBroadcasterOptions bo;
    bo.device = 0;
    bo.n = kParams;
    bo.join_deadline = 60s;
    bo.broadcast_deadline = kBroadcastDeadline;
    auto b = WeightBroadcaster::Create(membership_.get(), bo);
    if (!b.ok()) {
      error_ = b.status().ToString();
      return;
    }
    broadcaster_ = std::move(b).value();
    if (cudaSetDevice(0) != cudaSuccess || cudaStreamCreate(&stream_) != cudaSuccess ||
        cudaMalloc(&params_, kParams * 4) != cudaSuccess)
      error_ = "cuda:0: cannot set up the learner's weights";
  }
  ~Learner() {
    broadcaster_.reset();
    if (params_) cudaFree(params_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  static constexpr std::chrono::seconds kBroadcastDeadline{60};
  const std::string& error() const { return error_; }  // empty when set up

  std::string endpoint() const { return publisher_->bound_endpoint(); }
  NcclMembership& membership() { return *membership_; }
  WeightBroadcaster& broadcaster() { return *broadcaster_; }

  // Waits until an actor has registered and waits to join (it has started and polled).
  bool WaitForJoiner() {
    const auto until = std::chrono::steady_clock::now() + 180s;
    while (std::chrono::steady_clock::now() < until) {
      if (membership_->HasWaiting(std::chrono::steady_clock::now())) return true;
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }

  Status Publish(uint64_t version) {
    std::vector<float> host(kParams);
    for (size_t i = 0; i < kParams; ++i) host[i] = Param(i, version);
    if (cudaMemcpy(params_, host.data(), kParams * 4, cudaMemcpyHostToDevice) != cudaSuccess)
      return Internal("upload");
    return broadcaster_->Publish(params_, stream_, version);
  }

 private:
  std::unique_ptr<NcclMembership> membership_;
  std::unique_ptr<WeightPublisher> publisher_;
  std::unique_ptr<WeightBroadcaster> broadcaster_;
  cudaStream_t stream_ = nullptr;
  float* params_ = nullptr;
  std::string error_;
};

TEST(NcclPublish, VersionArrivesBitExactThenAKilledActorCostsOneFailureAndRejoins) {
  if (std::getenv("AHA_PUBLISH_ENDPOINT")) GTEST_SKIP() << "actor process";
  if (GpuCount() < 2) GTEST_SKIP() << "needs two CUDA devices, found " << GpuCount();
  zmq::context_t ctx;
  Learner learner(ctx);
  ASSERT_EQ(learner.error(), "");

  // Nobody registered: a publication sends nothing and succeeds.
  ASSERT_TRUE(learner.Publish(0).ok());
  EXPECT_EQ(learner.broadcaster().formed(), 0u);

  // (a) A live actor joins; version 1 reaches it and is swapped in bit-exact (checked there).
  pid_t actor = SpawnActor(learner.endpoint(), "live", 1);
  ASSERT_GT(actor, 0);
  ASSERT_TRUE(learner.WaitForJoiner()) << "the actor never registered";
  Status s = learner.Publish(1);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(learner.broadcaster().formed(), 1u);
  EXPECT_EQ(learner.broadcaster().failures(), 0u);
  EXPECT_EQ(learner.broadcaster().members(), 1);
  EXPECT_EQ(test::WaitExit(actor), 0) << "the actor failed (see its output above)";

  // (b) The actor dies in the middle of the broadcast of version 2.
  actor = SpawnActor(learner.endpoint(), "die", 2);
  ASSERT_GT(actor, 0);
  ASSERT_TRUE(learner.WaitForJoiner()) << "the dying actor never registered";
  const auto t0 = std::chrono::steady_clock::now();
  s = learner.Publish(2);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "publication to an actor killed mid-broadcast: " << s.ToString() << " after " << took << " s\n";
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(learner.broadcaster().failures(), 1u);
  EXPECT_EQ(learner.membership().epoch(), 0u) << "the communicator should be gone";
  EXPECT_LT(took, static_cast<double>(Learner::kBroadcastDeadline.count()));
  EXPECT_EQ(test::WaitExit(actor), 128 + SIGKILL);

  // The actor comes back under the same id: a new communicator, and version 3 arrives whole.
  actor = SpawnActor(learner.endpoint(), "live", 3);
  ASSERT_GT(actor, 0);
  ASSERT_TRUE(learner.WaitForJoiner()) << "the restarted actor never registered";
  s = learner.Publish(3);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(learner.broadcaster().formed(), 3u);
  EXPECT_EQ(learner.broadcaster().failures(), 1u);
  EXPECT_EQ(test::WaitExit(actor), 0) << "the restarted actor failed (see its output above)";
}

}  // namespace
}  // namespace aha::engine::cuda
