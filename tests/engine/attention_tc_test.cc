// Tensor-core training attention (engine/cuda/attention_tc.cu: AttentionForwardTC,
// AttentionBackwardTC) against the CPU reference (CpuBackend) on fresh random inputs. Each check
// prints "op  shape  nmse  limit"; nmse = ||gpu - cpu||^2 / ||cpu||^2. Every output is poisoned
// with NaN before the call, so an element the kernels never write fails the check.
//
// Limits: the products run on bf16 operands (8 bits of mantissa, ~2e-3 relative rounding per
// operand) with f32 accumulation: out 1e-4, lse 1e-5 (an average of scores), dq/dk/dv 1e-3 (dS is
// rounded once more before dQ and dK).
//
// Timing mode (not run by ctest): f32 vs tensor-core kernels at the training shape, CUDA events,
// median of 20 after warm-up:
//   engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_filter='AttentionTcTiming.*'
// and the row-wise vs decode (f32-math and tensor-core) cached-attention kernels at the decode bench shape:
//   engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_filter='CachedAttentionTiming.*'
//
// Label gpu. Without a CUDA device every test skips with the reason.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/cuda/kernels.h"
#include "engine/tensor.h"
#include "tests/engine/nmse_check.h"

namespace aha::engine {
namespace {

bool HaveGpu(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    *why = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(e);
    return false;
  }
  if (n == 0) {
    *why = "cudaGetDeviceCount returned 0 devices";
    return false;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
    std::cout << "GPU: " << prop.name << " (sm_" << prop.major << prop.minor << ")\n";
  }
  return true;
}

#define REQUIRE_GPU()                                          \
  do {                                                         \
    std::string why_no_gpu;                                    \
    if (!HaveGpu(&why_no_gpu)) {                               \
      std::cout << "skipping: no CUDA device: " << why_no_gpu << "\n"; \
      GTEST_SKIP() << "no CUDA device: " << why_no_gpu;        \
    }                                                          \
  } while (0)

void Ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "attention_tc_test: %s: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

// Device buffer of n elements (at least one allocated, so an empty tensor still has a pointer).
template <typename T>
class DevBuf {
 public:
  explicit DevBuf(size_t n) : n_(n) { Ck(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc"); }
  explicit DevBuf(const std::vector<T>& v) : DevBuf(v.size()) { Upload(v); }
  ~DevBuf() { cudaFree(p_); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;

  T* get() const { return p_; }
  void Upload(const std::vector<T>& v) {
    if (!v.empty()) Ck(cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<T> Download() const {
    std::vector<T> v(n_);
    if (n_ > 0) Ck(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return v;
  }
  void Poison() { Upload(std::vector<T>(n_, std::numeric_limits<T>::quiet_NaN())); }

 private:
  T* p_ = nullptr;
  size_t n_;
};

using test::Randn;

using test::ExpectNmse;
using test::Nmse;

struct AttnCase {
  int Hq, Hkv, D;
  std::vector<int> lens;
  float qscale = 1.0f;  // q ~ N(0, qscale^2): larger values make the softmax peakier
};

std::string ShapeOf(const AttnCase& c, int N) {
  std::string lens;
  for (size_t i = 0; i < c.lens.size() && i < 8; ++i) lens += (i ? "," : "") + std::to_string(c.lens[i]);
  if (c.lens.size() > 8) lens += ",...";
  return "N=" + std::to_string(N) + " [" + lens + "] H=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) +
         " D=" + std::to_string(c.D) + (c.qscale != 1.0f ? " q*" + std::to_string(static_cast<int>(c.qscale)) : "");
}

TEST(AttentionTc, MatchesCpuReference) {
  REQUIRE_GPU();
  CpuBackend cpu;
  const std::vector<AttnCase> cases = {
      // Length-1 sequences, sequences crossing 16/32/64/128-row tile boundaries, N not a multiple of 128.
      AttnCase{14, 2, 64, {1, 17, 64, 100, 300, 2, 1, 129}},
      AttnCase{4, 4, 128, {5, 129, 70, 1, 200}},
      // An empty sequence (repeated cu entry) and many short ones.
      AttnCase{4, 4, 64, {1, 1, 1, 33, 0, 128, 127, 3}},
      AttnCase{14, 2, 128, {257, 1, 64}},
      AttnCase{8, 2, 64, {77}},
      // Tiny N (one block, most warps without rows). Not N = 1: its lse is a single bf16-rounded
      // score, whose relative error can exceed 1e-5 when the score is near 0.
      AttnCase{4, 4, 128, {2, 1, 3, 20}},
      AttnCase{4, 2, 64, {40, 300, 9}, 3.0f},
      // Two full training-length sequences.
      AttnCase{14, 2, 64, {1024, 1024}},
      // D = 32: not a tensor-core width, must fall back to the f32 kernels.
      AttnCase{4, 1, 32, {1, 1, 2, 33}},
  };
  for (const AttnCase& c : cases) {
    std::vector<int32_t> cu{0};
    for (int l : c.lens) cu.push_back(cu.back() + l);
    const int S = static_cast<int>(c.lens.size()), N = cu.back();
    const std::string shape = ShapeOf(c, N);
    auto q = Randn(size_t(N) * c.Hq * c.D, c.qscale), k = Randn(size_t(N) * c.Hkv * c.D),
         v = Randn(size_t(N) * c.Hkv * c.D), dout = Randn(q.size());
    std::vector<float> out(q.size()), lse(size_t(N) * c.Hq), dq(q.size()), dk(k.size()), dv(v.size());
    cpu.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), S, N, c.Hq, c.Hkv, c.D);
    cpu.AttentionBackward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(), q.data(), k.data(),
                          v.data(), cu.data(), S, N, c.Hq, c.Hkv, c.D);

    DevBuf<float> d_q(q), d_k(k), d_v(v), d_dout(dout), d_out(out.size()), d_lse(lse.size()), d_dq(dq.size()),
        d_dk(dk.size()), d_dv(dv.size());
    DevBuf<int32_t> d_cu(cu);
    DevBuf<char> d_ws(cuda::AttentionBackwardTCWorkspace(N, c.Hq, c.D));
    d_out.Poison();
    d_lse.Poison();
    d_dq.Poison();
    d_dk.Poison();
    d_dv.Poison();

    cuda::AttentionForwardTC(d_out.get(), d_lse.get(), d_q.get(), d_k.get(), d_v.get(), d_cu.get(), S, N, c.Hq,
                             c.Hkv, c.D, nullptr);
    Ck(cudaGetLastError(), "AttentionForwardTC");
    // The backward gets the forward's own out and lse, as in training.
    cuda::AttentionBackwardTC(d_dq.get(), d_dk.get(), d_dv.get(), d_dout.get(), d_out.get(), d_lse.get(), d_q.get(),
                              d_k.get(), d_v.get(), d_cu.get(), S, N, c.Hq, c.Hkv, c.D, d_ws.get(), nullptr);
    Ck(cudaGetLastError(), "AttentionBackwardTC");
    Ck(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

    // The forward from bf16 copies of k and v (QkvRopeAttention's path): the f32 kernel rounds its
    // tiles to bf16 on the way into shared memory, so the two agree bit for bit. At D = 64 on sm_90
    // the call runs the wgmma kernel (attention_wgmma.cu), whose sums come out in mma.sync's order
    // on the H200: bit for bit as well. Against the CPU too.
    if (c.D == 64 || c.D == 128) {
      std::vector<uint16_t> k16(k.size()), v16(v.size());
      F32ToBF16(k.data(), k16.data(), k.size());
      F32ToBF16(v.data(), v16.data(), v.size());
      DevBuf<uint16_t> d_k16(k16), d_v16(v16);
      DevBuf<float> d_out16(out.size()), d_lse16(lse.size());
      d_out16.Poison();
      d_lse16.Poison();
      cuda::AttentionForwardTCBf16Kv(d_out16.get(), d_lse16.get(), d_q.get(), d_k16.get(), d_v16.get(), d_cu.get(), S,
                                     N, c.Hq, c.Hkv, c.D, nullptr);
      Ck(cudaDeviceSynchronize(), "AttentionForwardTCBf16Kv");
      const auto o32 = d_out.Download(), o16 = d_out16.Download(), l32 = d_lse.Download(), l16 = d_lse16.Download();
      const char* which = cuda::AttentionForwardWgmmaSupported(c.D) ? "wgmma" : "mma.sync";
      EXPECT_EQ(std::memcmp(o32.data(), o16.data(), o32.size() * sizeof(float)), 0) << "bf16 k/v out (" << which
                                                                                      << "), " << shape;
      EXPECT_EQ(std::memcmp(l32.data(), l16.data(), l32.size() * sizeof(float)), 0) << "bf16 k/v lse (" << which
                                                                                      << "), " << shape;
      ExpectNmse("attention bf16 k/v out", shape, o16, out, 1e-4);
      ExpectNmse("attention bf16 k/v lse", shape, l16, lse, 1e-5);
    }
    ExpectNmse("attention tc out", shape, d_out.Download(), out, 1e-4);
    ExpectNmse("attention tc lse", shape, d_lse.Download(), lse, 1e-5);
    ExpectNmse("attention tc dq", shape, d_dq.Download(), dq, 1e-3);
    ExpectNmse("attention tc dk", shape, d_dk.Download(), dk, 1e-3);
    ExpectNmse("attention tc dv", shape, d_dv.Download(), dv, 1e-3);
  }
}

// ---- timing mode ----------------------------------------------------------------------------------

// Median of `reps` timed runs of fn after `warmup` untimed ones (CUDA events on the default stream).
// `before` runs ahead of each timed run, outside the interval: the stream orders it before the first
// event (the decode timing flushes L2 there).
template <typename Fn, typename Before>
double MedianMs(Fn&& fn, Before&& before, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) fn();
  Ck(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t a, b;
  Ck(cudaEventCreate(&a), "cudaEventCreate");
  Ck(cudaEventCreate(&b), "cudaEventCreate");
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    before(i);
    Ck(cudaEventRecord(a, nullptr), "cudaEventRecord");
    fn();
    Ck(cudaEventRecord(b, nullptr), "cudaEventRecord");
    Ck(cudaEventSynchronize(b), "cudaEventSynchronize");
    Ck(cudaEventElapsedTime(&ms[i], a, b), "cudaEventElapsedTime");
  }
  Ck(cudaGetLastError(), "timed launches");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
}

template <typename Fn>
double MedianMs(Fn&& fn) {
  return MedianMs(fn, [](int) {}, 3, 20);
}

TEST(AttentionTcTiming, DISABLED_TrainingShape) {
  REQUIRE_GPU();
  struct Shape {
    int seqs, len, Hq, Hkv, D;
  };
  std::printf("%-28s %-9s %10s %10s %8s %12s %12s\n", "shape", "op", "f32 ms", "tc ms", "speedup", "f32 TFLOP/s",
              "tc TFLOP/s");
  for (const Shape& sh : {Shape{16, 1024, 14, 2, 64}, Shape{4, 4096, 14, 2, 64}, Shape{16, 1024, 14, 2, 128},
                          Shape{16, 1024, 16, 8, 128}, Shape{4, 8192, 16, 8, 128}}) {
    const int N = sh.seqs * sh.len, S = sh.seqs;
    std::vector<int32_t> cu(S + 1);
    for (int s = 0; s <= S; ++s) cu[s] = s * sh.len;
    const size_t nq = size_t(N) * sh.Hq * sh.D, nk = size_t(N) * sh.Hkv * sh.D;
    DevBuf<float> q(Randn(nq)), k(Randn(nk)), v(Randn(nk)), dout(Randn(nq));
    DevBuf<float> out32(nq), lse32(size_t(N) * sh.Hq), outtc(nq), lsetc(size_t(N) * sh.Hq);
    DevBuf<float> dq32(nq), dk32(nk), dv32(nk), dqtc(nq), dktc(nk), dvtc(nk);
    DevBuf<int32_t> d_cu(cu);
    DevBuf<char> ws(cuda::AttentionBackwardTCWorkspace(N, sh.Hq, sh.D));

    const double ms_f32_fwd = MedianMs([&] {
      cuda::AttentionForward(out32.get(), lse32.get(), q.get(), k.get(), v.get(), d_cu.get(), S, N, sh.Hq, sh.Hkv,
                             sh.D, nullptr);
    });
    const double ms_tc_fwd = MedianMs([&] {
      cuda::AttentionForwardTC(outtc.get(), lsetc.get(), q.get(), k.get(), v.get(), d_cu.get(), S, N, sh.Hq, sh.Hkv,
                               sh.D, nullptr);
    });
    std::vector<uint16_t> k16h(nk), v16h(nk);
    {
      const auto kh = k.Download(), vh = v.Download();
      F32ToBF16(kh.data(), k16h.data(), nk);
      F32ToBF16(vh.data(), v16h.data(), nk);
    }
    DevBuf<uint16_t> k16(k16h), v16(v16h);
    const double ms_tc16_fwd = MedianMs([&] {
      cuda::AttentionForwardTCBf16Kv(outtc.get(), lsetc.get(), q.get(), k16.get(), v16.get(), d_cu.get(), S, N, sh.Hq,
                                     sh.Hkv, sh.D, nullptr);
    });
    const double ms_f32_bwd = MedianMs([&] {
      cuda::AttentionBackward(dq32.get(), dk32.get(), dv32.get(), dout.get(), out32.get(), lse32.get(), q.get(),
                              k.get(), v.get(), d_cu.get(), S, N, sh.Hq, sh.Hkv, sh.D, ws.get(), nullptr);
    });
    const double ms_tc_bwd = MedianMs([&] {
      cuda::AttentionBackwardTC(dqtc.get(), dktc.get(), dvtc.get(), dout.get(), outtc.get(), lsetc.get(), q.get(),
                                k.get(), v.get(), d_cu.get(), S, N, sh.Hq, sh.Hkv, sh.D, ws.get(), nullptr);
    });
    // The mma.sync backward where the default is the wgmma one (D = 64 and 128 on sm_90).
    const bool wg_bwd = cuda::AttentionBackwardWgmmaSupported(sh.D);
    const double ms_mma_bwd = !wg_bwd ? ms_tc_bwd : MedianMs([&] {
      cuda::AttentionBackwardTC(dqtc.get(), dktc.get(), dvtc.get(), dout.get(), outtc.get(), lsetc.get(), q.get(),
                                k.get(), v.get(), d_cu.get(), S, N, sh.Hq, sh.Hkv, sh.D, ws.get(), nullptr, false);
    });
    // D = 128: the kernel in FlashAttention-3's layout (keys = 1) against the two warpgroups on halves of D.
    const bool keys_bwd = wg_bwd && sh.D == 128;
    auto wgmma_bwd = [&](int keys) {
      return MedianMs([&] {
        cuda::AttentionBackwardWgmma(dqtc.get(), dktc.get(), dvtc.get(), dout.get(), outtc.get(), lsetc.get(), q.get(),
                                     k.get(), v.get(), d_cu.get(), S, N, sh.Hq, sh.Hkv, sh.D, ws.get(), nullptr,
                                     nullptr, nullptr, nullptr, keys);
      });
    };
    const double ms_halves_bwd = keys_bwd ? wgmma_bwd(0) : 0.0, ms_keys_bwd = keys_bwd ? wgmma_bwd(1) : 0.0;
    Ck(cudaDeviceSynchronize(), "timing");

    // Useful FLOPs: 4 D (forward) and 10 D (backward) per visible (row, key) pair and query head.
    const double pairs = double(S) * sh.len * (sh.len + 1) / 2.0;
    const double fwd_flop = 4.0 * sh.D * pairs * sh.Hq, bwd_flop = 10.0 * sh.D * pairs * sh.Hq;
    const std::string name = std::to_string(sh.seqs) + "x" + std::to_string(sh.len) + " H=" + std::to_string(sh.Hq) +
                             "/" + std::to_string(sh.Hkv) + " D=" + std::to_string(sh.D);
    std::printf("%-28s %-9s %10.3f %10.3f %7.2fx %12.1f %12.1f\n", name.c_str(), "forward", ms_f32_fwd, ms_tc_fwd,
                ms_f32_fwd / ms_tc_fwd, fwd_flop / ms_f32_fwd * 1e-9, fwd_flop / ms_tc_fwd * 1e-9);
    std::printf("%-28s %-9s %10s %10.3f %8s %12s %12.1f\n", name.c_str(), "fwd kv16", "", ms_tc16_fwd, "", "",
                fwd_flop / ms_tc16_fwd * 1e-9);
    std::printf("%-28s %-9s %10.3f %10.3f %7.2fx %12.1f %12.1f\n", name.c_str(), "backward", ms_f32_bwd, ms_tc_bwd,
                ms_f32_bwd / ms_tc_bwd, bwd_flop / ms_f32_bwd * 1e-9, bwd_flop / ms_tc_bwd * 1e-9);
    if (wg_bwd) {
      std::printf("%-28s %-9s %10s %10.3f %8s %12s %12.1f\n", name.c_str(), "bwd mma", "", ms_mma_bwd, "", "",
                  bwd_flop / ms_mma_bwd * 1e-9);
    }
    if (keys_bwd) {
      std::printf("%-28s %-9s %10s %10.3f %8s %12s %12.1f\n", name.c_str(), "bwd halv", "", ms_halves_bwd, "", "",
                  bwd_flop / ms_halves_bwd * 1e-9);
      std::printf("%-28s %-9s %10s %10.3f %8s %12s %12.1f\n", name.c_str(), "bwd keys", "", ms_keys_bwd, "", "",
                  bwd_flop / ms_keys_bwd * 1e-9);
    }
    // Sanity: the tensor-core results against the f32 kernels' at this shape.
    std::printf("  tc vs f32 nmse: out %.3g lse %.3g dq %.3g dk %.3g dv %.3g\n", Nmse(outtc.Download(), out32.Download()),
                Nmse(lsetc.Download(), lse32.Download()), Nmse(dqtc.Download(), dq32.Download()),
                Nmse(dktc.Download(), dk32.Download()), Nmse(dvtc.Download(), dv32.Download()));
    std::fflush(stdout);
  }
}

// Median of 30 single launches, each after a write of `flush` (larger than L2).
template <typename Fn>
double ColdMedianMs(DevBuf<char>& flush, Fn&& launch, size_t flush_bytes = size_t(256) << 20) {
  auto wipe = [&](int i) { Ck(cudaMemsetAsync(flush.get(), i & 0xff, flush_bytes, nullptr), "flush L2"); };
  return MedianMs(launch, wipe, 3, 30);
}

// Cached attention at the decode bench shape (0.5B: Hq = 14, Hkv = 2, D = 64, block 16, one new row
// per sequence): the row-wise kernel (CachedAttentionRowwise, the only one before the decode kernels),
// the GQA-grouped f32-math decode kernel (CachedAttentionDecode, "simt") and the tensor-core one
// (CachedAttentionDecodeTC, "tc"; bf16 pools only), us per call, L2 flushed before each call (in the
// decode step the layer's GEMMs evict the cache between attention calls), CUDA events, median of 30
// after warm-up, the TB/s of K + V bytes each reaches, and the NMSE of simt and tc against row-wise
// (simt: f32 math on the same pool values; tc: q and P rounded to bf16, ~1e-6..1e-5 expected).
//   engine_attention_tc_test --gtest_also_run_disabled_tests --gtest_filter='CachedAttentionTiming.*'
TEST(CachedAttentionTiming, DISABLED_DecodeShape) {
  REQUIRE_GPU();
  struct Shape {
    int B, ctx_lo, ctx_hi;  // contexts uniform in [ctx_lo, ctx_hi] (fixed seed)
    int Hq, Hkv, D, block_size;
  };
  DevBuf<char> flush(size_t(256) << 20);  // larger than the H200's 50 MB L2
  std::printf("%-38s %-5s %8s %8s %8s %7s %7s %7s %9s %9s\n", "shape", "pool", "row us", "simt us", "tc us", "row",
              "simt", "tc TB/s", "simt nmse", "tc nmse");
  for (const Shape& sh : {Shape{256, 384, 384, 14, 2, 64, 16}, Shape{256, 128, 640, 14, 2, 64, 16},
                          Shape{256, 128, 128, 14, 2, 64, 16}, Shape{256, 640, 640, 14, 2, 64, 16},
                          Shape{256, 2048, 2048, 14, 2, 64, 16}, Shape{64, 384, 384, 14, 2, 64, 16},
                          Shape{8, 384, 384, 14, 2, 64, 16}, Shape{1, 2048, 2048, 14, 2, 64, 16},
                          Shape{64, 384, 384, 16, 8, 128, 16}, Shape{256, 384, 384, 16, 8, 128, 16},
                          Shape{256, 384, 384, 12, 2, 128, 16}, Shape{256, 2048, 2048, 16, 8, 128, 16}}) {
    for (bool bf16 : {true, false}) {
      std::mt19937_64 rng(1234);
      std::vector<int32_t> ctx(sh.B);
      for (auto& c : ctx) c = std::uniform_int_distribution<int>(sh.ctx_lo, sh.ctx_hi)(rng);
      const int bs = sh.block_size, max_blocks = (sh.ctx_hi + bs - 1) / bs;
      int needed = 0;
      for (int c : ctx) needed += (c + bs - 1) / bs;
      const int num_blocks = needed;
      std::vector<int32_t> order(num_blocks), table(size_t(sh.B) * max_blocks, 0);
      for (int i = 0; i < num_blocks; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), rng);
      int next = 0;
      for (int b = 0; b < sh.B; ++b)
        for (int j = 0; j < (ctx[b] + bs - 1) / bs; ++j) table[size_t(b) * max_blocks + j] = order[next++];
      const size_t pool = size_t(num_blocks) * bs * sh.Hkv * sh.D;
      const size_t elem = bf16 ? 2 : 4;
      DevBuf<float> kc(pool * elem / 4), vc(pool * elem / 4);  // pool is even (D is)
      for (float* dst : {kc.get(), vc.get()}) {
        const auto x = Randn(pool);
        if (bf16) {
          std::vector<uint16_t> h(pool);
          for (size_t i = 0; i < pool; ++i) h[i] = F32ToBF16(x[i]);
          Ck(cudaMemcpy(dst, h.data(), pool * 2, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
        } else {
          Ck(cudaMemcpy(dst, x.data(), pool * 4, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
        }
      }
      std::vector<int32_t> cu(sh.B + 1), start(sh.B);
      for (int b = 0; b <= sh.B; ++b) cu[b] = b;
      for (int b = 0; b < sh.B; ++b) start[b] = ctx[b] - 1;
      DevBuf<int32_t> d_table(table), d_cu(cu), d_start(start);
      const cuda::KvPages kv{kc.get(), vc.get(), bf16, num_blocks, bs, d_table.get(), max_blocks};
      const bool tc = cuda::CachedAttentionDecodeTcSupported(kv, sh.Hq, sh.Hkv, sh.D);
      const size_t nq = size_t(sh.B) * sh.Hq * sh.D;
      DevBuf<float> q(Randn(nq)), out_row(nq), out_dec(nq), out_tc(nq);
      DevBuf<char> ws(cuda::CachedAttentionDecodeWorkspace(kv, sh.B, sh.Hq, sh.Hkv, sh.D));
      DevBuf<char> ws_tc(tc ? cuda::CachedAttentionDecodeTcWorkspace(kv, sh.B, sh.Hq, sh.Hkv, sh.D) : 0);
      auto rowwise = [&] {
        cuda::CachedAttentionRowwise(out_row.get(), q.get(), kv, d_cu.get(), d_start.get(), sh.B, sh.B, sh.Hq, sh.Hkv,
                                     sh.D, nullptr);
      };
      auto decode = [&] {
        cuda::CachedAttentionDecode(out_dec.get(), q.get(), kv, d_cu.get(), d_start.get(), sh.B, sh.B, sh.Hq, sh.Hkv,
                                    sh.D, ws.get(), nullptr);
      };
      auto decode_tc = [&] {
        cuda::CachedAttentionDecodeTC(out_tc.get(), q.get(), kv, d_cu.get(), d_start.get(), sh.B, sh.B, sh.Hq,
                                      sh.Hkv, sh.D, ws_tc.get(), nullptr);
      };
      const double ms_row = ColdMedianMs(flush, rowwise);
      const double ms_dec = ColdMedianMs(flush, decode);
      const double ms_tc = tc ? ColdMedianMs(flush, decode_tc) : 0.0;
      Ck(cudaDeviceSynchronize(), "timing");
      double keys = 0;
      for (int c : ctx) keys += c;
      const double bytes = keys * 2.0 * sh.Hkv * sh.D * elem;  // K and V of every visible position, once
      auto tbs = [&](double ms) { return bytes / (ms * 1e-3) * 1e-12; };
      const std::string name = std::to_string(sh.B) + " x ctx " + std::to_string(sh.ctx_lo) +
                               (sh.ctx_hi != sh.ctx_lo ? ".." + std::to_string(sh.ctx_hi) : "") + " H=" +
                               std::to_string(sh.Hq) + "/" + std::to_string(sh.Hkv) + " D=" + std::to_string(sh.D);
      const auto ref = out_row.Download();
      std::printf("%-38s %-5s %8.1f %8.1f ", name.c_str(), bf16 ? "bf16" : "f32", ms_row * 1e3, ms_dec * 1e3);
      if (tc) {
        std::printf("%8.1f %7.2f %7.2f %7.2f %9.3g %9.3g\n", ms_tc * 1e3, tbs(ms_row), tbs(ms_dec), tbs(ms_tc),
                    Nmse(out_dec.Download(), ref), Nmse(out_tc.Download(), ref));
      } else {
        std::printf("%8s %7.2f %7.2f %7s %9.3g %9s\n", "-", tbs(ms_row), tbs(ms_dec), "-", Nmse(out_dec.Download(), ref),
                    "-");
      }
      std::fflush(stdout);
    }
  }

}

// The wgmma forward (attention_wgmma.cu) against the mma.sync kernel on the same bf16-rounded k/v,
// at head widths 64 and 128, one head, single sequences of 16 .. 256 rows (one to four key tiles a
// warpgroup; the second warpgroup of a block sees tiles whole, in part, or not at all) and 700 rows
// of packed ones, with each way of copying the tiles (cp.async; the copying warp's 2 .. 4 stages,
// whose warpgroups skip and release tiles on their own). With q = 0 every score is 0, so
// out is the mean of the visible v rows: P V and the accumulation across tiles alone; with random q
// the lse depends on S = Q K^T alone. The two must agree bit for bit; on a mismatch the largest
// error per 16-row group is printed (a wrong layout shows as whole groups, a wrong mask as one row).
TEST(AttentionTc, WgmmaForwardMatchesMmaSync) {
  REQUIRE_GPU();
  if (!cuda::AttentionForwardWgmmaSupported(64)) GTEST_SKIP() << "the wgmma forward needs an sm_90 device";
  for (int N : {16, 64, 65, 128, 192, 256, 700}) {
    for (auto [zero_q, D] : {std::pair{true, 64}, std::pair{false, 64}, std::pair{true, 128}, std::pair{false, 128}}) {
      if (!cuda::AttentionForwardWgmmaSupported(D)) continue;  // AHA_ATTENTION_WGMMA=64
      // One sequence, or at N = 700 packed ones: an empty one, sequences inside one 128-row block and
      // across blocks, starts off the 64-key tiles.
      const std::vector<int32_t> cu = N == 700 ? std::vector<int32_t>{0, 37, 37, 100, 130, 333, 600, 700}
                                               : std::vector<int32_t>{0, N};
      const int S = static_cast<int>(cu.size()) - 1;
      std::vector<float> q = zero_q ? std::vector<float>(size_t(N) * D, 0.0f) : Randn(size_t(N) * D);
      std::vector<float> k = Randn(size_t(N) * D), v = Randn(size_t(N) * D);
      std::vector<uint16_t> k16(k.size()), v16(v.size());
      F32ToBF16(k.data(), k16.data(), k.size());
      F32ToBF16(v.data(), v16.data(), v.size());
      DevBuf<float> d_q(q), d_k(k), d_v(v), o_tc(q.size()), l_tc(N), o_wg(q.size()), l_wg(N);
      DevBuf<uint16_t> d_k16(k16), d_v16(v16);
      DevBuf<int32_t> d_cu(cu);
      cuda::AttentionForwardTC(o_tc.get(), l_tc.get(), d_q.get(), d_k.get(), d_v.get(), d_cu.get(), S, N, 1, 1, D,
                               nullptr);
      const auto ot = o_tc.Download(), lt = l_tc.Download();
      // The cp.async kernel (stages 0) and the copying warp's (2 .. 4 stages).
      for (int stages : {0, 2, 3, 4}) {
        o_wg.Poison();
        l_wg.Poison();
        cuda::AttentionForwardWgmma(o_wg.get(), l_wg.get(), d_q.get(), d_k16.get(), d_v16.get(), d_cu.get(), S, N, 1,
                                    1, D, nullptr, nullptr, nullptr, stages);
        Ck(cudaDeviceSynchronize(), "wgmma forward");
        const auto ow = o_wg.Download(), lw = l_wg.Download();
        const std::string what = "N=" + std::to_string(N) + " D=" + std::to_string(D) +
                                 (zero_q ? " q=0" : " q=randn") + " stages=" + std::to_string(stages);
        const bool same = std::memcmp(ot.data(), ow.data(), ot.size() * sizeof(float)) == 0 &&
                          std::memcmp(lt.data(), lw.data(), lt.size() * sizeof(float)) == 0;
        if (!same) {
          std::string rows;
          for (int r0 = 0; r0 < N; r0 += 16) {
            double eo = 0, el = 0;
            for (int r = r0; r < std::min(N, r0 + 16); ++r) {
              el = std::max(el, std::fabs(double(lw[r]) - lt[r]));
              for (int d = 0; d < D; ++d) {
                eo = std::max(eo, std::fabs(double(ow[size_t(r) * D + d]) - ot[size_t(r) * D + d]));
              }
            }
            char buf[64];
            std::snprintf(buf, sizeof buf, " %d:%.1e/%.1e", r0, eo, el);
            rows += buf;
          }
          std::printf("  wgmma %s  largest error per 16 rows, out/lse:%s\n", what.c_str(), rows.c_str());
        }
        EXPECT_TRUE(same) << "wgmma forward differs from the mma.sync kernel, " << what;
      }
    }
  }
}

// The wgmma forward's ways of copying its tiles side by side (kernels.md, version 47): the cp.async
// kernel (stages 0) and the copying warp's 2 .. 4 stages, at the bench's heads (14 / 2 of 64) and
// Qwen3-0.6B's (16 / 8 of 128), 16 x 1,024 and 4 x 8,192 tokens; ms and useful TFLOP/s.
TEST(AttentionTcTiming, DISABLED_WgmmaForwardStages) {
  REQUIRE_GPU();
  if (!cuda::AttentionForwardWgmmaSupported(64)) GTEST_SKIP() << "the wgmma forward needs an sm_90 device";
  struct Shape {
    int seqs, len, Hq, Hkv, D;
  };
  std::printf("%-28s %8s %10s %10s\n", "shape", "stages", "ms", "TFLOP/s");
  for (const Shape& sh : {Shape{16, 1024, 14, 2, 64}, Shape{4, 8192, 14, 2, 64}, Shape{16, 1024, 16, 8, 128},
                          Shape{4, 8192, 16, 8, 128}}) {
    if (!cuda::AttentionForwardWgmmaSupported(sh.D)) continue;
    const int N = sh.seqs * sh.len, S = sh.seqs;
    std::vector<int32_t> cu(S + 1);
    for (int s = 0; s <= S; ++s) cu[s] = s * sh.len;
    const size_t nq = size_t(N) * sh.Hq * sh.D, nk = size_t(N) * sh.Hkv * sh.D;
    std::vector<uint16_t> k16h(nk), v16h(nk);
    {
      const auto kh = Randn(nk), vh = Randn(nk);
      F32ToBF16(kh.data(), k16h.data(), nk);
      F32ToBF16(vh.data(), v16h.data(), nk);
    }
    DevBuf<float> q(Randn(nq)), out(nq), lse(size_t(N) * sh.Hq);
    DevBuf<uint16_t> k16(k16h), v16(v16h);
    DevBuf<int32_t> d_cu(cu);
    const double pairs = double(S) * sh.len * (sh.len + 1) / 2.0, flop = 4.0 * sh.D * pairs * sh.Hq;
    const std::string name = std::to_string(sh.seqs) + "x" + std::to_string(sh.len) + " H=" + std::to_string(sh.Hq) +
                             "/" + std::to_string(sh.Hkv) + " D=" + std::to_string(sh.D);
    for (int stages : {0, 2, 3, 4}) {
      const double ms = MedianMs([&] {
        cuda::AttentionForwardWgmma(out.get(), lse.get(), q.get(), k16.get(), v16.get(), d_cu.get(), S, N, sh.Hq,
                                    sh.Hkv, sh.D, nullptr, nullptr, nullptr, stages);
      });
      Ck(cudaDeviceSynchronize(), "timing");
      std::printf("%-28s %8d %10.3f %10.1f\n", name.c_str(), stages, ms, flop / ms * 1e-9);
      std::fflush(stdout);
    }
  }
}

// The wgmma backward (attention_wgmma.cu) against the mma.sync one on the same inputs: packed
// sequences across 64-row tiles and 64-key blocks, an empty and many short ones, a peaky softmax, two
// training-length ones. The roundings are the same, but delta = dout . out is summed in another order
// (so dS's bf16 rounding flips now and then), dq sums over 64 keys a block instead of 128, and the
// atomics add in any order: within 1e-8 (measured up to 2e-10 with q * 3; a wrong layout or mask
// gives 1e-3 and more).
TEST(AttentionTc, WgmmaBackwardMatchesMmaSync) {
  REQUIRE_GPU();
  if (!cuda::AttentionBackwardWgmmaSupported(64)) GTEST_SKIP() << "the wgmma backward needs an sm_90 device";
  // D = 128 (two warpgroups, each a half of D; Qwen3-0.6B's 16 / 8 heads among them) the same way.
  const std::vector<AttnCase> cases = {AttnCase{14, 2, 64, {1, 17, 64, 100, 300, 2, 1, 129}},
                                       AttnCase{8, 2, 64, {77}}, AttnCase{4, 4, 64, {1, 1, 1, 33, 0, 128, 127, 3}},
                                       AttnCase{4, 2, 64, {40, 300, 9}, 3.0f}, AttnCase{14, 2, 64, {1024, 1024}},
                                       AttnCase{16, 8, 128, {1, 17, 64, 100, 300, 2, 1, 129}},
                                       AttnCase{12, 2, 128, {77}}, AttnCase{4, 4, 128, {1, 1, 1, 33, 0, 128, 127, 3}},
                                       AttnCase{4, 2, 128, {40, 300, 9}, 3.0f}, AttnCase{16, 8, 128, {1024, 1024}}};
  for (const AttnCase& c : cases) {
    if (!cuda::AttentionBackwardWgmmaSupported(c.D)) continue;  // AHA_ATTENTION_WGMMA_BWD=64
    std::vector<int32_t> cu{0};
    for (int l : c.lens) cu.push_back(cu.back() + l);
    const int S = static_cast<int>(c.lens.size()), N = cu.back();
    const std::string shape = ShapeOf(c, N);
    DevBuf<float> q(Randn(size_t(N) * c.Hq * c.D, c.qscale)), k(Randn(size_t(N) * c.Hkv * c.D)),
        v(Randn(size_t(N) * c.Hkv * c.D)), dout(Randn(size_t(N) * c.Hq * c.D)), out(size_t(N) * c.Hq * c.D),
        lse(size_t(N) * c.Hq);
    DevBuf<float> dq_w(size_t(N) * c.Hq * c.D), dk_w(size_t(N) * c.Hkv * c.D), dv_w(size_t(N) * c.Hkv * c.D);
    DevBuf<float> dq_m(size_t(N) * c.Hq * c.D), dk_m(size_t(N) * c.Hkv * c.D), dv_m(size_t(N) * c.Hkv * c.D);
    DevBuf<int32_t> d_cu(cu);
    DevBuf<char> ws(cuda::AttentionBackwardTCWorkspace(N, c.Hq, c.D));
    for (auto* b : {&dq_w, &dk_w, &dv_w, &dq_m, &dk_m, &dv_m}) b->Poison();
    cuda::AttentionForwardTC(out.get(), lse.get(), q.get(), k.get(), v.get(), d_cu.get(), S, N, c.Hq, c.Hkv, c.D,
                             nullptr);
    for (bool wg : {true, false}) {
      DevBuf<float>&dq = wg ? dq_w : dq_m, &dk = wg ? dk_w : dk_m, &dv = wg ? dv_w : dv_m;
      cuda::AttentionBackwardTC(dq.get(), dk.get(), dv.get(), dout.get(), out.get(), lse.get(), q.get(), k.get(),
                                v.get(), d_cu.get(), S, N, c.Hq, c.Hkv, c.D, ws.get(), nullptr, wg);
    }
    Ck(cudaDeviceSynchronize(), "backward");
    ExpectNmse("wgmma bwd dq vs mma.sync", shape, dq_w.Download(), dq_m.Download(), 1e-8);
    ExpectNmse("wgmma bwd dk vs mma.sync", shape, dk_w.Download(), dk_m.Download(), 1e-8);
    ExpectNmse("wgmma bwd dv vs mma.sync", shape, dv_w.Download(), dv_m.Download(), 1e-8);
  }
}

// Runs the wgmma backward as `reference` and as `variant` (each given fresh dq, dk, dv and the
// workspace) and expects the variant's gradients within NMSE 1e-12 of the reference's: the same
// sums, only dk's and dv's atomics in another order.
template <typename Reference, typename Variant>
void ExpectSameWgmmaBackward(const std::string& what, const AttnCase& c, int N, Reference&& reference,
                             Variant&& variant) {
  const size_t nq = size_t(N) * c.Hq * c.D, nk = size_t(N) * c.Hkv * c.D;
  DevBuf<float> dq_a(nq), dk_a(nk), dv_a(nk), dq_b(nq), dk_b(nk), dv_b(nk);
  DevBuf<char> ws(cuda::AttentionBackwardTCWorkspace(N, c.Hq, c.D));
  for (auto* x : {&dq_a, &dk_a, &dv_a, &dq_b, &dk_b, &dv_b}) x->Poison();
  reference(dq_a.get(), dk_a.get(), dv_a.get(), ws.get());
  variant(dq_b.get(), dk_b.get(), dv_b.get(), ws.get());
  Ck(cudaDeviceSynchronize(), "backward");
  const std::string shape = ShapeOf(c, N);
  ExpectNmse(what + ": dq", shape, dq_b.Download(), dq_a.Download(), 1e-12);
  ExpectNmse(what + ": dk", shape, dk_b.Download(), dk_a.Download(), 1e-12);
  ExpectNmse(what + ": dv", shape, dv_b.Download(), dv_a.Download(), 1e-12);
}

// The D = 128 backward in FlashAttention-3's layout (keys = 1: 128 keys a block, each warpgroup its
// own 64 with no exchange, a copying warpgroup) against the two warpgroups on halves of D (keys = 0).
// A consumer's 64 keys are the other kernel's block, its products the same sums in the same order
// (the extra tiles it runs are masked whole and add zeros), so only the order of the additions into
// dq, dk and dv differs (tensor reductions from shared memory against per-lane atomics): within
// 1e-12. Cases: packed
// sequences inside and across the 128-key blocks (an empty one, single rows, starts off the tiles),
// a peaky softmax, a partial last block, two training-length sequences.
TEST(AttentionTc, WgmmaBackwardKeysMatchesHalves) {
  REQUIRE_GPU();
  if (!cuda::AttentionBackwardWgmmaSupported(128)) GTEST_SKIP() << "the D = 128 wgmma backward needs an sm_90 device";
  const std::vector<AttnCase> cases = {AttnCase{16, 8, 128, {1, 17, 64, 100, 300, 2, 1, 129}},
                                       AttnCase{12, 2, 128, {77}}, AttnCase{4, 4, 128, {1, 1, 1, 33, 0, 128, 127, 3}},
                                       AttnCase{4, 2, 128, {40, 300, 9}, 3.0f}, AttnCase{8, 8, 128, {200, 56, 444}},
                                       AttnCase{16, 8, 128, {1024, 1024}}};
  for (const AttnCase& c : cases) {
    std::vector<int32_t> cu{0};
    for (int l : c.lens) cu.push_back(cu.back() + l);
    const int S = static_cast<int>(c.lens.size()), N = cu.back();
    const size_t nq = size_t(N) * c.Hq * c.D, nk = size_t(N) * c.Hkv * c.D;
    DevBuf<float> q(Randn(nq, c.qscale)), k(Randn(nk)), v(Randn(nk)), dout(Randn(nq)), out(nq), lse(size_t(N) * c.Hq);
    DevBuf<int32_t> d_cu(cu);
    cuda::AttentionForwardTC(out.get(), lse.get(), q.get(), k.get(), v.get(), d_cu.get(), S, N, c.Hq, c.Hkv, c.D,
                             nullptr);
    auto backward = [&](int keys) {
      return [&, keys](float* dq, float* dk, float* dv, void* ws) {
        cuda::AttentionBackwardWgmma(dq, dk, dv, dout.get(), out.get(), lse.get(), q.get(), k.get(), v.get(),
                                     d_cu.get(), S, N, c.Hq, c.Hkv, c.D, ws, nullptr, nullptr, nullptr, nullptr, keys);
      };
    };
    ExpectSameWgmmaBackward("bwd keys vs halves", c, N, backward(0), backward(1));
  }
}

// The attention output and its gradient kept in bf16 only (Backend::KeepAsBf16): the forward with
// out null writes the same bf16 output and lse as with out given, bit for bit, on both tensor-core
// forwards; and the wgmma backward reading that bf16 output (out16) and a bf16 dout (dout16) equals
// the backward given both widened to f32 (delta sums the same values, the products read the same
// bf16 dout; only the dk / dv atomics' order differs).
TEST(AttentionTc, Bf16OnlyOutputAndGradient) {
  REQUIRE_GPU();
  const AttnCase c{14, 2, 64, {1, 17, 64, 100, 300, 2, 1, 129}};
  std::vector<int32_t> cu{0};
  for (int l : c.lens) cu.push_back(cu.back() + l);
  const int S = static_cast<int>(c.lens.size()), N = cu.back();
  const size_t nq = size_t(N) * c.Hq * c.D, nk = size_t(N) * c.Hkv * c.D;
  const std::vector<float> kh = Randn(nk), vh = Randn(nk);
  std::vector<uint16_t> k16h(nk), v16h(nk);
  F32ToBF16(kh.data(), k16h.data(), nk);
  F32ToBF16(vh.data(), v16h.data(), nk);
  DevBuf<float> q(Randn(nq)), k(kh), v(vh), dout(Randn(nq)), out(nq), lse(size_t(N) * c.Hq), lse_only(size_t(N) * c.Hq);
  DevBuf<uint16_t> k16(k16h), v16(v16h), out16(nq), out16_only(nq);
  DevBuf<int32_t> d_cu(cu);
  for (bool bf16_kv : {false, true}) {
    out16_only.Poison();
    lse_only.Poison();
    if (bf16_kv) {
      cuda::AttentionForwardTCBf16Kv(out.get(), lse.get(), q.get(), k16.get(), v16.get(), d_cu.get(), S, N, c.Hq,
                                     c.Hkv, c.D, nullptr, out16.get());
      cuda::AttentionForwardTCBf16Kv(nullptr, lse_only.get(), q.get(), k16.get(), v16.get(), d_cu.get(), S, N, c.Hq,
                                     c.Hkv, c.D, nullptr, out16_only.get());
    } else {
      cuda::AttentionForwardTC(out.get(), lse.get(), q.get(), k.get(), v.get(), d_cu.get(), S, N, c.Hq, c.Hkv, c.D,
                               nullptr, out16.get());
      cuda::AttentionForwardTC(nullptr, lse_only.get(), q.get(), k.get(), v.get(), d_cu.get(), S, N, c.Hq, c.Hkv, c.D,
                               nullptr, out16_only.get());
    }
    Ck(cudaDeviceSynchronize(), "forward");
    const auto a = out16.Download(), b = out16_only.Download();
    const auto la = lse.Download(), lb = lse_only.Download();
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(uint16_t))) << "bf16 output, bf16 k/v " << bf16_kv;
    EXPECT_EQ(0, std::memcmp(la.data(), lb.data(), la.size() * sizeof(float))) << "lse, bf16 k/v " << bf16_kv;
  }
  if (!cuda::AttentionBackwardWgmmaSupported(64)) GTEST_SKIP() << "the wgmma backward needs an sm_90 device";
  // The reference: out and dout given in f32, holding exactly the bf16 values.
  const auto out16h = out16_only.Download();
  const auto douth = dout.Download();
  std::vector<uint16_t> dout16h(nq);
  F32ToBF16(douth.data(), dout16h.data(), nq);
  std::vector<float> out_wide(nq), dout_wide(nq);
  BF16ToF32(out16h.data(), out_wide.data(), nq);
  BF16ToF32(dout16h.data(), dout_wide.data(), nq);
  DevBuf<float> d_out_wide(out_wide), d_dout_wide(dout_wide);
  DevBuf<uint16_t> d_dout16(dout16h);
  ExpectSameWgmmaBackward(
      "bwd from bf16 out, dout vs widened", c, N,
      [&](float* dq, float* dk, float* dv, void* ws) {
        cuda::AttentionBackwardWgmma(dq, dk, dv, d_dout_wide.get(), d_out_wide.get(), lse_only.get(), q.get(), k.get(),
                                     v.get(), d_cu.get(), S, N, c.Hq, c.Hkv, c.D, ws, nullptr);
      },
      [&](float* dq, float* dk, float* dv, void* ws) {
        cuda::AttentionBackwardWgmma(dq, dk, dv, nullptr, nullptr, lse_only.get(), q.get(), k.get(), v.get(),
                                     d_cu.get(), S, N, c.Hq, c.Hkv, c.D, ws, nullptr, out16_only.get(), d_dout16.get());
      });
}

// q kept in bf16 only: QkvRope's two bf16 copies of the rotated q (q_bf16 unscaled, for the
// backward; q_bf16_scaled, the wgmma forward's own operand) are its f32 q rounded, and the wgmma
// forward and backward fed them equal the same ops fed the f32 q (the forward bit for bit, the
// backward but for dk's and dv's atomics order).
TEST(AttentionTc, QkvRopeBf16QFeedsForwardAndBackward) {
  REQUIRE_GPU();
  if (!cuda::AttentionBackwardWgmmaSupported(64)) GTEST_SKIP() << "the wgmma kernels need an sm_90 device";
  const AttnCase c{14, 2, 64, {1, 17, 64, 100, 300, 2, 1, 129}};
  std::vector<int32_t> cu{0}, pos;
  for (int l : c.lens) {
    for (int p = 0; p < l; ++p) pos.push_back(p);
    cu.push_back(cu.back() + l);
  }
  const int S = static_cast<int>(c.lens.size()), N = cu.back(), W = (c.Hq + 2 * c.Hkv) * c.D;
  const size_t nq = size_t(N) * c.Hq * c.D, nk = size_t(N) * c.Hkv * c.D;
  std::vector<float> inv_freq(c.D / 2);
  for (int j = 0; j < c.D / 2; ++j) inv_freq[j] = std::pow(1e6f, -2.0f * j / c.D);
  DevBuf<float> qkv(Randn(size_t(N) * W)), bias(Randn(W)), d_inv(inv_freq), q(nq), k(nk), v(nk), dout(Randn(nq));
  DevBuf<int32_t> d_pos(pos), d_cu(cu);
  DevBuf<uint16_t> k16(nk), v16(nk), q16(nq), q16s(nq), k16b(nk), v16b(nk);
  cuda::QkvRope(q.get(), k.get(), v.get(), qkv.get(), bias.get(), d_pos.get(), d_inv.get(), N, c.Hq, c.Hkv, c.D,
                nullptr, k16.get(), v16.get());
  cuda::QkvRope(nullptr, k.get(), v.get(), qkv.get(), bias.get(), d_pos.get(), d_inv.get(), N, c.Hq, c.Hkv, c.D,
                nullptr, k16b.get(), v16b.get(), q16.get(), q16s.get());
  Ck(cudaDeviceSynchronize(), "q/k/v + rope");
  {
    const auto qf = q.Download();
    const auto a = q16.Download();
    std::vector<uint16_t> want(nq);
    F32ToBF16(qf.data(), want.data(), nq);
    EXPECT_EQ(0, std::memcmp(a.data(), want.data(), nq * sizeof(uint16_t))) << "q_bf16 is not q rounded";
    const auto kb = k16.Download(), kb2 = k16b.Download();
    EXPECT_EQ(0, std::memcmp(kb.data(), kb2.data(), nk * sizeof(uint16_t))) << "k16 changed with the q copies";
  }
  DevBuf<float> out(nq), lse(size_t(N) * c.Hq), out2(nq), lse2(size_t(N) * c.Hq);
  out2.Poison();
  cuda::AttentionForwardTCBf16Kv(out.get(), lse.get(), q.get(), k16.get(), v16.get(), d_cu.get(), S, N, c.Hq, c.Hkv,
                                 c.D, nullptr);
  cuda::AttentionForwardTCBf16Kv(out2.get(), lse2.get(), nullptr, k16.get(), v16.get(), d_cu.get(), S, N, c.Hq, c.Hkv,
                                 c.D, nullptr, nullptr, q16s.get());
  Ck(cudaDeviceSynchronize(), "forward");
  const auto o1 = out.Download(), o2 = out2.Download(), l1 = lse.Download(), l2 = lse2.Download();
  EXPECT_EQ(0, std::memcmp(o1.data(), o2.data(), nq * sizeof(float))) << "forward from the pre-scaled bf16 q";
  EXPECT_EQ(0, std::memcmp(l1.data(), l2.data(), l1.size() * sizeof(float))) << "lse from the pre-scaled bf16 q";
  ExpectSameWgmmaBackward(
      "bwd from q_bf16 vs f32 q", c, N,
      [&](float* dq, float* dk, float* dv, void* ws) {
        cuda::AttentionBackwardWgmma(dq, dk, dv, dout.get(), out.get(), lse.get(), q.get(), k.get(), v.get(),
                                     d_cu.get(), S, N, c.Hq, c.Hkv, c.D, ws, nullptr);
      },
      [&](float* dq, float* dk, float* dv, void* ws) {
        cuda::AttentionBackwardWgmma(dq, dk, dv, dout.get(), out.get(), lse.get(), nullptr, k.get(), v.get(),
                                     d_cu.get(), S, N, c.Hq, c.Hkv, c.D, ws, nullptr, nullptr, nullptr, q16.get());
      });
}

// The wgmma forward's two products alone (AttentionWgmmaProbe), against exact f64 sums of the same
// bf16 operands: S_j = Q K_j^T and O_j = P V_j for the key tiles j = 0, 1 (shared-memory buffers 0
// and 1), with tile 1 copied before (late 0) or while (late 1) tile 0's products run. Prints, per
// product, the largest error per 16 rows x 8 columns, and for a few wrong entries where their value
// is found in the true result (the layout a wrong descriptor or fragment reads).
TEST(AttentionTc, WgmmaProbeProducts) {
  REQUIRE_GPU();
  if (!cuda::AttentionForwardWgmmaSupported(64)) GTEST_SKIP() << "the wgmma forward needs an sm_90 device";
  constexpr int R = 128, D = 64;
  std::vector<float> q = Randn(size_t(R) * D), k = Randn(size_t(R) * D), v = Randn(size_t(R) * D), p(size_t(R) * 64);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  for (float& x : p) x = uni(rng);
  std::vector<uint16_t> q16(q.size()), k16(k.size()), v16(v.size()), p16(p.size());
  F32ToBF16(q.data(), q16.data(), q.size());
  F32ToBF16(k.data(), k16.data(), k.size());
  F32ToBF16(v.data(), v16.data(), v.size());
  F32ToBF16(p.data(), p16.data(), p.size());
  auto f = [](uint16_t b) { return double(BF16ToF32(b)); };
  std::vector<double> st(2 * R * 64), ot(2 * R * 64);
  for (int j = 0; j < 2; ++j) {
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < 64; ++c) {
        double ss = 0, oo = 0;
        for (int d = 0; d < 64; ++d) ss += f(q16[r * D + d]) * f(k16[(64 * j + c) * D + d]);
        for (int n = 0; n < 64; ++n) oo += f(p16[r * 64 + n]) * f(v16[(64 * j + n) * D + c]);
        st[(size_t(j) * R + r) * 64 + c] = ss;
        ot[(size_t(j) * R + r) * 64 + c] = oo;
      }
    }
  }
  DevBuf<float> d_q(q), s_out(2 * R * 64), o_out(2 * R * 64);
  DevBuf<uint16_t> d_k(k16), d_v(v16), d_p(p16);
  for (int late : {0, 1}) {
    s_out.Poison();
    o_out.Poison();
    cuda::AttentionWgmmaProbe(s_out.get(), o_out.get(), d_q.get(), d_k.get(), d_v.get(), d_p.get(), late, nullptr);
    Ck(cudaDeviceSynchronize(), "probe");
    const auto sg = s_out.Download(), og = o_out.Download();
    for (int which = 0; which < 2; ++which) {
      const auto& got = which ? og : sg;
      const auto& want = which ? ot : st;
      for (int j = 0; j < 2; ++j) {
        double worst = 0;
        std::string map;
        int shown = 0;
        std::string finds;
        for (int rg = 0; rg < R; rg += 16) {
          map += " ";
          for (int cg = 0; cg < 64; cg += 8) {
            double e = 0;
            for (int r = rg; r < rg + 16; ++r) {
              for (int c = cg; c < cg + 8; ++c) {
                const size_t at = (size_t(j) * R + r) * 64 + c;
                const double d = std::isnan(got[at]) ? 1e9 : std::fabs(got[at] - want[at]);
                e = std::max(e, d);
                if (d > 1e-2 && shown < 6) {
                  ++shown;
                  std::string where = "?";
                  for (size_t x = 0; x < want.size(); ++x) {
                    if (std::fabs(want[x] - got[at]) < 1e-3) {
                      where = "t" + std::to_string(x / (R * 64)) + "(" + std::to_string((x / 64) % R) + "," +
                              std::to_string(x % 64) + ")";
                      break;
                    }
                  }
                  finds += " (" + std::to_string(r) + "," + std::to_string(c) + ")=" + where;
                }
              }
            }
            worst = std::max(worst, e);
            map += e > 1e-2 ? (e > 1e3 ? 'N' : 'X') : '.';
          }
        }
        std::printf("  probe late=%d %s tile %d: max err %.2e  map(16 rows x 8 cols):%s\n", late, which ? "O=PV" : "S=QK",
                    j, worst, map.c_str());
        if (!finds.empty()) std::printf("    wrong entries found at:%s\n", finds.c_str());
        EXPECT_LT(worst, 1e-2) << "late " << late << (which ? " P V" : " Q K^T") << " tile " << j;
      }
    }
  }
}

}  // namespace
}  // namespace aha::engine
