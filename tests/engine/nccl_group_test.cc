// NcclGroup on two GPUs (label gpu; skips with the reason on a machine with fewer): a broadcast
// reaches the other rank intact; when the peer dies (SIGKILL) the learner's broadcast returns at its
// deadline with the communicator aborted instead of hanging; a new group with a peer that comes
// back works again. The peer is this same binary started as a child process (NcclChild.Rank1,
// driven by environment variables), because a rank that dies must be a process.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/cuda/nccl_group.h"
#include "tests/spawn_self.h"

namespace aha::engine::cuda {
namespace {

constexpr size_t kBytes = size_t{256} << 20;

uint8_t Pattern(size_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 13); }

int GpuCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

pid_t SpawnPeer(const std::string& id, const std::string& mode) {
  return test::SpawnSelf("NcclChild.Rank1", {"AHA_NCCL_ID=" + id, "AHA_NCCL_MODE=" + mode});
}

// The peer: rank 1 on cuda:1. "die": joins, then SIGKILLs itself before the broadcast it owes.
// "live": joins, receives the broadcast and checks every byte.
TEST(NcclChild, Rank1) {
  const char* id = std::getenv("AHA_NCCL_ID");
  const char* mode = std::getenv("AHA_NCCL_MODE");
  if (!id || !mode) GTEST_SKIP() << "runs only as the peer process of NcclGroup.* tests";
  cudaStream_t stream;
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  auto g = NcclGroup::Join(id, 2, 1, 1, stream, std::chrono::seconds(60));
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  if (std::string(mode) == "die") raise(SIGKILL);
  void* buf = nullptr;
  ASSERT_EQ(cudaMalloc(&buf, kBytes), cudaSuccess);
  ASSERT_EQ(cudaMemset(buf, 0, kBytes), cudaSuccess);
  Status s = (*g)->Broadcast(buf, kBytes, 0, std::chrono::seconds(60));
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<uint8_t> host(kBytes);
  ASSERT_EQ(cudaMemcpy(host.data(), buf, kBytes, cudaMemcpyDeviceToHost), cudaSuccess);
  size_t bad = 0;
  for (size_t i = 0; i < kBytes; ++i) bad += host[i] != Pattern(i);
  EXPECT_EQ(bad, 0u);
}

TEST(NcclGroup, DeadPeerCostsOneDeadlineThenANewGroupWorks) {
  if (std::getenv("AHA_NCCL_ID")) GTEST_SKIP() << "peer process";
  if (GpuCount() < 2) GTEST_SKIP() << "needs two CUDA devices, found " << GpuCount();
  std::vector<uint8_t> host(kBytes);
  for (size_t i = 0; i < kBytes; ++i) host[i] = Pattern(i);
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  void* buf = nullptr;
  ASSERT_EQ(cudaMalloc(&buf, kBytes), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(buf, host.data(), kBytes, cudaMemcpyHostToDevice), cudaSuccess);

  // 1. The peer dies after joining: the broadcast gives up at its deadline, aborted.
  {
    auto id = NcclGroup::NewId();
    ASSERT_TRUE(id.ok());
    pid_t peer = SpawnPeer(*id, "die");
    ASSERT_GT(peer, 0);
    auto g = NcclGroup::Join(*id, 2, 0, 0, stream, std::chrono::seconds(60));
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(test::WaitExit(peer), 128 + SIGKILL);
    const auto t0 = std::chrono::steady_clock::now();
    Status s = (*g)->Broadcast(buf, kBytes, 0, std::chrono::seconds(3));
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << "broadcast to a dead peer: " << s.ToString() << " after " << waited << " s\n";
    EXPECT_FALSE(s.ok());
    EXPECT_TRUE((*g)->aborted());
    EXPECT_LT(waited, 10.0);
  }
  // 2. A peer that comes back joins a new group; the broadcast arrives intact.
  {
    ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    auto id = NcclGroup::NewId();
    ASSERT_TRUE(id.ok());
    pid_t peer = SpawnPeer(*id, "live");
    ASSERT_GT(peer, 0);
    auto g = NcclGroup::Join(*id, 2, 0, 0, stream, std::chrono::seconds(60));
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    Status s = (*g)->Broadcast(buf, kBytes, 0, std::chrono::seconds(60));
    EXPECT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(test::WaitExit(peer), 0) << "the peer saw a wrong byte or failed";
  }
  cudaFree(buf);
}

}  // namespace
}  // namespace aha::engine::cuda
