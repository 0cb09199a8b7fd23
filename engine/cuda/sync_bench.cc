// aha bench sync: one process, two threads, two GPUs (rank 0 = learner on cuda:0, rank 1 = actor on
// cuda:1), a NcclGroup between them.
//
//   raw:     ncclBroadcast of B bytes (the bf16 weights) from rank 0 into rank 1's buffer.
//   publish: what a weight publication costs end to end: the learner casts its f32 master weights to
//            the bf16 staging buffer, broadcasts it, and the actor swaps it in (bf16 -> f32 params
//            plus its GEMMs' bf16 copy, SwapInBf16). The buffer goes in K chunks so that casting,
//            sending and swapping overlap: chunk c is cast on a side stream while chunk c-1 is on
//            the wire, and the actor swaps chunk c while chunk c+1 arrives.
// Each timing is from a common start (both threads released together) to the moment both ranks are
// done; the median of the repeats is reported, with the swapped weights checked against the
// learner's (bit-exact bf16 rounding) after the last repeat.
#include "engine/cuda/sync_bench.h"

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "common/flags.h"
#include "engine/config.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/nccl_group.h"
#include "engine/tensor.h"

namespace aha::engine::cuda {
namespace {

using Clock = std::chrono::steady_clock;

#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "aha bench sync: %s: %s\n", #x, cudaGetErrorString(e_));         \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

struct Rank {
  int device = 0;
  cudaStream_t comm = nullptr, side = nullptr;
  float* params = nullptr;
  uint16_t* staging = nullptr;
  uint16_t* shadow = nullptr;  // actor only
  std::unique_ptr<NcclGroup> group;
};

}  // namespace

int RunSyncBench(int argc, char** argv) {
  std::string model_dir;
  int64_t params_n = 0, repeats = 10, chunks = 8;
  FlagSet flags(argv[0], "weight publication over NCCL between two GPUs, beside raw ncclBroadcast");
  flags.String("model", &model_dir, "model directory whose size to publish (its config.json)");
  flags.Int("params", &params_n, "number of parameters instead of --model (Qwen2.5-0.5B: 494032768)");
  flags.Int("repeats", &repeats, "timed repeats of each (median reported)");
  flags.Int("chunks", &chunks, "pipeline chunks of the publication");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (!model_dir.empty()) {
    auto c = LoadModelConfig(model_dir + "/config.json");
    if (!c.ok()) return Fail(prog, c.status().message(), 2);
    params_n = c->NumParameters();
  }
  if (params_n <= 0) return Fail(prog, "give --model or --params", 2);
  if (chunks < 1 || repeats < 1) return Fail(prog, "--chunks and --repeats must be positive", 2);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 2)
    return Fail(prog, "needs two CUDA devices, found " + std::to_string(count), 2);
  const size_t n = static_cast<size_t>(params_n), bytes = n * 2;
  auto id = NcclGroup::NewId();
  if (!id.ok()) return Fail(prog, id.status().message());
  Rank ranks[2];
  for (int r = 0; r < 2; ++r) {
    Rank& k = ranks[r];
    k.device = r;
    CK(cudaSetDevice(r));
    CK(cudaStreamCreateWithFlags(&k.comm, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&k.side, cudaStreamNonBlocking));
    CK(cudaMalloc(&k.params, n * 4));
    CK(cudaMalloc(&k.staging, bytes));
    if (r == 1) CK(cudaMalloc(&k.shadow, bytes));
    // Learner weights: random (never time zeros); actor buffers poisoned with NaN bits.
    std::vector<float> host(1 << 24);
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (auto& v : host) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      v = r == 0 ? static_cast<float>(static_cast<int64_t>(x % 2000001) - 1000000) * 2e-8f : __builtin_nanf("");
    }
    for (size_t off = 0; off < n; off += host.size())
      CK(cudaMemcpy(k.params + off, host.data(), std::min(host.size(), n - off) * 4, cudaMemcpyHostToDevice));
  }
  const auto deadline = std::chrono::milliseconds(60000);
  std::vector<Status> join(2);
  {
    std::vector<std::thread> t;
    for (int r = 0; r < 2; ++r)
      t.emplace_back([&, r] {
        auto g = NcclGroup::Join(*id, 2, r, r, ranks[r].comm, deadline);
        if (g.ok()) ranks[r].group = std::move(*g);
        else join[r] = g.status();
      });
    for (auto& th : t) th.join();
  }
  for (auto& s : join)
    if (!s.ok()) return Fail(prog, s.message());

  std::vector<double> raw, publish;
  std::barrier sync(2);
  std::vector<Status> errors(2);
  const size_t chunk = (n + chunks - 1) / chunks;
  auto worker = [&](int r) {
    Rank& k = ranks[r];
    CK(cudaSetDevice(r));
    std::vector<cudaEvent_t> ev(chunks);
    for (auto& e : ev) CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    for (int64_t rep = 0; rep <= repeats; ++rep) {  // rep 0 warms up
      // Raw broadcast of the staging bytes.
      sync.arrive_and_wait();
      auto t0 = Clock::now();
      Status s = k.group->Broadcast(k.staging, bytes, 0, deadline);
      if (!s.ok()) errors[r] = s;
      sync.arrive_and_wait();
      if (r == 0 && rep > 0) raw.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      // Publication, chunked and overlapped.
      sync.arrive_and_wait();
      t0 = Clock::now();
      for (int64_t c = 0; c < chunks; ++c) {
        const size_t off = c * chunk, len = std::min(chunk, n - std::min(n, off));
        if (len == 0) break;
        if (r == 0) {
          CastF32ToBF16(k.staging + off, k.params + off, len, k.side);
          CK(cudaEventRecord(ev[c], k.side));
          CK(cudaStreamWaitEvent(k.comm, ev[c]));
          if (Status st = k.group->BroadcastAsync(k.staging + off, len * 2, 0, deadline); !st.ok()) errors[r] = st;
        } else {
          if (Status st = k.group->BroadcastAsync(k.staging + off, len * 2, 0, deadline); !st.ok()) errors[r] = st;
          CK(cudaEventRecord(ev[c], k.comm));
          CK(cudaStreamWaitEvent(k.side, ev[c]));
          SwapInBf16(k.params + off, k.shadow + off, k.staging + off, len, k.side);
        }
      }
      if (Status st = k.group->Wait(deadline); !st.ok()) errors[r] = st;
      CK(cudaStreamSynchronize(k.side));
      sync.arrive_and_wait();
      if (r == 0 && rep > 0) publish.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    for (auto& e : ev) cudaEventDestroy(e);
  };
  {
    std::thread a(worker, 0), b(worker, 1);
    a.join();
    b.join();
  }
  for (auto& s : errors)
    if (!s.ok()) return Fail(prog, s.message());
  // Check: the actor's f32 params equal the learner's rounded to bf16, on a sample of slices.
  size_t mismatches = 0, checked = 0;
  for (size_t off = 0; off < n; off += n / 7 + 1) {
    const size_t len = std::min<size_t>(1 << 20, n - off);
    std::vector<float> a(len), b(len);
    CK(cudaSetDevice(0));
    CK(cudaMemcpy(a.data(), ranks[0].params + off, len * 4, cudaMemcpyDeviceToHost));
    CK(cudaSetDevice(1));
    CK(cudaMemcpy(b.data(), ranks[1].params + off, len * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < len; ++i) mismatches += BF16ToF32(F32ToBF16(a[i])) != b[i];
    checked += len;
  }
  std::sort(raw.begin(), raw.end());
  std::sort(publish.begin(), publish.end());
  const double r_med = raw[raw.size() / 2], p_med = publish[publish.size() / 2];
  std::cout << "aha bench sync: " << n << " parameters, " << bytes / 1e9 << " GB of bf16, cuda:0 -> cuda:1\n"
            << "  raw ncclBroadcast        " << r_med * 1e3 << " ms  (" << bytes / r_med / 1e9 << " GB/s)\n"
            << "  publish (cast+bcast+swap, " << chunks << " chunks) " << p_med * 1e3 << " ms  ("
            << p_med / r_med << "x raw)\n"
            << "  check: " << mismatches << " of " << checked << " sampled parameters differ from the learner's bf16\n";
  nlohmann::json j = {{"bench", "sync"}, {"bytes", bytes}, {"raw_s", r_med}, {"publish_s", p_med},
                      {"ratio", p_med / r_med}, {"mismatches", mismatches}};
  std::cout << j.dump() << "\n";
  for (Rank& k : ranks) {
    k.group.reset();
    cudaFree(k.params);
    cudaFree(k.staging);
    if (k.shadow) cudaFree(k.shadow);
  }
  return mismatches == 0 ? 0 : 1;
}

}  // namespace aha::engine::cuda
