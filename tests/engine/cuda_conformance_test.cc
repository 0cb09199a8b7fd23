// CUDA conformance: every op of backend.h on the GPU against the CPU reference (CpuBackend) on fresh
// random inputs, then whole models: CUDA vs CPU, CUDA vs the transformers fixtures, and generation
// (llama.cpp's test-backend-ops is the model). Each check prints "op  shape  nmse  limit"; nmse is
// ||gpu - cpu||^2 / ||cpu||^2. Outputs the op overwrites are poisoned with NaN first, so an element
// the kernel never writes fails the check.
//
// Limits: ops computed in f32 on both sides 1e-9 (summation order and libm differences only);
// products through bf16 tensor cores (the default GEMM precision) 1e-4 (bf16 keeps 8 bits: ~4e-3
// relative per operand); whole-model log-probs in f32 within 1e-4 absolute.
//
// Label gpu. Without a CUDA device every test skips with the reason (CI compiles this, and runs it
// only on the GPU machine: scripts/gpu-check.sh).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/generate.h"
#include "engine/safetensors.h"
#include "engine/sampler.h"
#include "engine/transformer.h"
#include "tests/engine/nmse_check.h"

namespace aha::engine {
namespace {

using cuda::CudaBackend;
using cuda::GemmPrecision;

CudaBackend* Gpu(std::string* why = nullptr) {
  static std::string reason;
  static std::unique_ptr<CudaBackend> gpu = [] {
    auto b = CudaBackend::Create(0);
    if (!b.ok()) {
      reason = b.status().message();
      return std::unique_ptr<CudaBackend>();
    }
    std::cout << "GPU: " << (*b)->Describe() << "\n";
    return std::move(*b);
  }();
  if (why) *why = reason;
  return gpu.get();
}

#define REQUIRE_GPU()                                             \
  std::string why_no_gpu;                                         \
  CudaBackend* gpu = Gpu(&why_no_gpu);                            \
  if (!gpu) GTEST_SKIP() << "no CUDA device: " << why_no_gpu;     \
  gpu->gemm().set_precision(GemmPrecision::kBF16)

using test::Nmse;
using test::RandInt;
using test::Randn;

Tensor Up(const std::vector<float>& v) {
  return Tensor::FromVector(v, {static_cast<int64_t>(v.size())}).ToDevice(Gpu()->device());
}
Tensor Up(const std::vector<int32_t>& v) {
  return Tensor::FromVector(v, {static_cast<int64_t>(v.size())}).ToDevice(Gpu()->device());
}
Tensor Poisoned(size_t n) { return Up(std::vector<float>(n, std::numeric_limits<float>::quiet_NaN())); }
std::vector<float> Down(const Tensor& t) { return t.ToVector(); }

using test::ExpectNmse;

constexpr double kF32 = 1e-9, kBf16 = 1e-4;

// ---- elementwise and layers ----------------------------------------------------------------------

TEST(CudaOps, EmbeddingRmsNormRopeSwiGluAdd) {
  REQUIRE_GPU();
  CpuBackend cpu;
  const int N = 301, C = 896, V = 1000;
  {
    auto ids = RandInt(N, 0, V - 1);
    ids[5] = ids[7] = ids[100];  // repeated ids accumulate
    auto wte = Randn(size_t(V) * C), dout = Randn(size_t(N) * C), dwte0 = Randn(size_t(V) * C);
    std::vector<float> out(size_t(N) * C), dwte = dwte0;
    cpu.EmbeddingForward(out.data(), ids.data(), wte.data(), N, C);
    cpu.EmbeddingBackward(dwte.data(), dout.data(), ids.data(), N, C);
    Tensor d_ids = Up(ids), d_wte = Up(wte), d_out = Poisoned(out.size()), d_dout = Up(dout), d_dwte = Up(dwte0);
    gpu->EmbeddingForward(d_out.f32(), d_ids.i32(), d_wte.f32(), N, C);
    gpu->EmbeddingBackward(d_dwte.f32(), d_dout.f32(), d_ids.i32(), N, C);
    ExpectNmse("embedding", "[301,896] V=1000", Down(d_out), out, kF32);
    ExpectNmse("embedding backward", "[301,896] V=1000", Down(d_dwte), dwte, kF32);
  }
  for (auto [rows, width] : {std::pair{N, C}, std::pair{N * 14, 64}, std::pair{7, 33}}) {
    auto x = Randn(size_t(rows) * width, 2.0f), w = Randn(width), dout = Randn(size_t(rows) * width);
    auto dx0 = Randn(size_t(rows) * width), dw0 = Randn(width);
    std::vector<float> out(x.size()), rstd(rows), dx = dx0, dw = dw0;
    cpu.RmsNormForward(out.data(), rstd.data(), x.data(), w.data(), rows, width, 1e-6f);
    cpu.RmsNormBackward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), rows, width);
    Tensor d_x = Up(x), d_w = Up(w), d_out = Poisoned(out.size()), d_rstd = Poisoned(rows), d_dout = Up(dout),
           d_dx = Up(dx0), d_dw = Up(dw0);
    gpu->RmsNormForward(d_out.f32(), d_rstd.f32(), d_x.f32(), d_w.f32(), rows, width, 1e-6f);
    gpu->RmsNormBackward(d_dx.f32(), d_dw.f32(), d_dout.f32(), d_x.f32(), d_w.f32(), d_rstd.f32(), rows, width);
    const std::string shape = "[" + std::to_string(rows) + "," + std::to_string(width) + "]";
    ExpectNmse("rmsnorm", shape, Down(d_out), out, kF32);
    ExpectNmse("rmsnorm rstd", shape, Down(d_rstd), rstd, kF32);
    ExpectNmse("rmsnorm backward dx (+=)", shape, Down(d_dx), dx, kF32);
    ExpectNmse("rmsnorm backward dw (+=)", shape, Down(d_dw), dw, 1e-8);
  }
  for (int D : {64, 128, 16}) {
    const int H = 14;
    RopeSpec spec;
    spec.theta = 1e6;
    auto inv = RopeInverseFrequencies(spec, D);
    auto pos = RandInt(N, 0, 4000);
    auto x = Randn(size_t(N) * H * D);
    std::vector<float> y = x, back;
    cpu.RopeForward(y.data(), pos.data(), inv.data(), N, H, D);
    back = y;
    cpu.RopeBackward(back.data(), pos.data(), inv.data(), N, H, D);
    Tensor d_x = Up(x), d_pos = Up(pos), d_inv = Up(inv);
    gpu->RopeForward(d_x.f32(), d_pos.i32(), d_inv.f32(), N, H, D);
    ExpectNmse("rope", "[301,14," + std::to_string(D) + "]", Down(d_x), y, kF32);
    gpu->RopeBackward(d_x.f32(), d_pos.i32(), d_inv.f32(), N, H, D);
    ExpectNmse("rope backward", "[301,14," + std::to_string(D) + "]", Down(d_x), back, kF32);
  }
  {
    const int I = 4864;
    auto g = Randn(size_t(N) * I, 3.0f), u = Randn(size_t(N) * I), dh = Randn(size_t(N) * I);
    std::vector<float> h(g.size()), dg(g.size()), du(g.size()), sum(g.size());
    cpu.SwiGluForward(h.data(), g.data(), u.data(), N, I);
    cpu.SwiGluBackward(dg.data(), du.data(), dh.data(), g.data(), u.data(), N, I);
    cpu.Add(sum.data(), g.data(), u.data(), g.size());
    Tensor d_g = Up(g), d_u = Up(u), d_dh = Up(dh), d_h = Poisoned(h.size()), d_dg = Poisoned(h.size()),
           d_du = Poisoned(h.size()), d_sum = Poisoned(h.size());
    gpu->SwiGluForward(d_h.f32(), d_g.f32(), d_u.f32(), N, I);
    gpu->SwiGluBackward(d_dg.f32(), d_du.f32(), d_dh.f32(), d_g.f32(), d_u.f32(), N, I);
    gpu->Add(d_sum.f32(), d_g.f32(), d_u.f32(), g.size());
    ExpectNmse("swiglu", "[301,4864]", Down(d_h), h, kF32);
    ExpectNmse("swiglu backward dgate", "[301,4864]", Down(d_dg), dg, kF32);
    ExpectNmse("swiglu backward dup", "[301,4864]", Down(d_du), du, kF32);
    ExpectNmse("add", "[301,4864]", Down(d_sum), sum, kF32);
  }
}

TEST(CudaOps, OptimizerOps) {
  REQUIRE_GPU();
  CpuBackend cpu;
  const size_t n = 1'000'003;
  auto p = Randn(n), g = Randn(n, 0.1f), m = Randn(n, 0.01f), v = Randn(n, 0.01f);
  for (auto& x : v) x = x * x;
  auto pc = p, mc = m, vc = v;
  cpu.AdamW(pc.data(), g.data(), mc.data(), vc.data(), n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 3);
  Tensor d_p = Up(p), d_g = Up(g), d_m = Up(m), d_v = Up(v);
  gpu->AdamW(d_p.f32(), d_g.f32(), d_m.f32(), d_v.f32(), n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 3);
  ExpectNmse("adamw param", "[1000003]", Down(d_p), pc, kF32);
  ExpectNmse("adamw m", "[1000003]", Down(d_m), mc, kF32);
  ExpectNmse("adamw v", "[1000003]", Down(d_v), vc, kF32);
  const double ss_cpu = cpu.SumSquares(g.data(), n), ss_gpu = gpu->SumSquares(d_g.f32(), n);
  std::cout << "  sum of squares  cpu " << ss_cpu << " gpu " << ss_gpu << "\n";
  EXPECT_NEAR(ss_gpu, ss_cpu, 1e-9 * ss_cpu);
  auto gc = g;
  cpu.Scale(gc.data(), 0.37f, n);
  gpu->Scale(d_g.f32(), 0.37f, n);
  ExpectNmse("scale", "[1000003]", Down(d_g), gc, kF32);
}

TEST(CudaOps, LinearForwardBackwardF32AndBf16) {
  REQUIRE_GPU();
  CpuBackend cpu;
  for (auto [N, C, OC] : {std::tuple{37, 96, 130}, std::tuple{1024, 896, 4864}, std::tuple{3, 4864, 896}}) {
    for (GemmPrecision prec : {GemmPrecision::kF32, GemmPrecision::kBF16}) {
      gpu->gemm().set_precision(prec);
      const bool bf16 = prec == GemmPrecision::kBF16;
      auto x = Randn(size_t(N) * C), w = Randn(size_t(OC) * C, 0.05f), b = Randn(OC), dout = Randn(size_t(N) * OC);
      auto dx0 = Randn(size_t(N) * C), dw0 = Randn(size_t(OC) * C), db0 = Randn(OC);
      std::vector<float> out(size_t(N) * OC), dx = dx0, dw = dw0, db = db0;
      cpu.LinearForward(out.data(), x.data(), w.data(), b.data(), N, C, OC);
      cpu.LinearBackward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), N, C, OC, true);
      Tensor d_x = Up(x), d_w = Up(w), d_b = Up(b), d_dout = Up(dout), d_out = Poisoned(out.size()), d_dx = Up(dx0),
             d_dw = Up(dw0), d_db = Up(db0);
      // Registered like a model's weights: bf16 products read the cached copy.
      gpu->RegisterWeights(d_w.f32(), d_w.numel());
      gpu->WeightsChanged(d_w.f32());
      gpu->LinearForward(d_out.f32(), d_x.f32(), d_w.f32(), d_b.f32(), N, C, OC);
      gpu->LinearBackward(d_dx.f32(), d_dw.f32(), d_db.f32(), d_dout.f32(), d_x.f32(), d_w.f32(), N, C, OC, true);
      const std::string shape = "[" + std::to_string(N) + "," + std::to_string(C) + "]x[" + std::to_string(OC) + "]";
      const std::string tag = bf16 ? " bf16" : " f32";
      ExpectNmse("linear" + tag, shape, Down(d_out), out, bf16 ? kBf16 : 1e-10);
      ExpectNmse("linear backward dx (+=)" + tag, shape, Down(d_dx), dx, bf16 ? kBf16 : 1e-10);
      ExpectNmse("linear backward dw (+=)" + tag, shape, Down(d_dw), dw, bf16 ? kBf16 : 1e-10);
      ExpectNmse("linear backward db (+=)" + tag, shape, Down(d_db), db, 1e-10);
      // dx overwritten (accumulate_dx = false).
      std::vector<float> dx2(size_t(N) * C), dw2 = dw0;
      cpu.LinearBackward(dx2.data(), dw2.data(), nullptr, dout.data(), x.data(), w.data(), N, C, OC, false);
      Tensor d_dx2 = Poisoned(dx2.size()), d_dw2 = Up(dw0);
      gpu->LinearBackward(d_dx2.f32(), d_dw2.f32(), nullptr, d_dout.f32(), d_x.f32(), d_w.f32(), N, C, OC, false);
      ExpectNmse("linear backward dx (=)" + tag, shape, Down(d_dx2), dx2, bf16 ? kBf16 : 1e-10);
      gpu->UnregisterWeights(d_w.f32());
    }
  }
}

// ---- attention -------------------------------------------------------------------------------------

struct AttnCase {
  int Hq, Hkv, D;
  std::vector<int> lens;
};

TEST(CudaOps, PackedCausalAttentionForwardBackward) {
  REQUIRE_GPU();
  CpuBackend cpu;
  // kF32: the f32 kernels (attention.cu). kBF16, the default: the tensor-core kernels
  // (attention_tc.cu), bf16 products with f32 softmax and accumulation, so bf16 limits.
  for (GemmPrecision precision : {GemmPrecision::kF32, GemmPrecision::kBF16}) {
    for (const AttnCase& c : {AttnCase{14, 2, 64, {1, 17, 64, 100, 300, 2}}, AttnCase{4, 4, 128, {5, 129, 70}},
                              AttnCase{4, 1, 32, {1, 1, 2, 33}}, AttnCase{8, 2, 16, {200}},
                              AttnCase{14, 2, 64, {1024, 1024}}}) {
      std::vector<int32_t> cu{0};
      for (int l : c.lens) cu.push_back(cu.back() + l);
      const int S = static_cast<int>(c.lens.size()), N = cu.back();
      auto q = Randn(size_t(N) * c.Hq * c.D), k = Randn(size_t(N) * c.Hkv * c.D), v = Randn(size_t(N) * c.Hkv * c.D);
      auto dout = Randn(q.size());
      std::vector<float> out(q.size()), lse(size_t(N) * c.Hq), dq(q.size()), dk(k.size()), dv(v.size());
      cpu.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), S, N, c.Hq, c.Hkv, c.D);
      cpu.AttentionBackward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(), q.data(), k.data(),
                            v.data(), cu.data(), S, N, c.Hq, c.Hkv, c.D);
      gpu->gemm().set_precision(precision);
      const bool tc = precision == GemmPrecision::kBF16;
      Tensor d_q = Up(q), d_k = Up(k), d_v = Up(v), d_dout = Up(dout), d_cu = Up(cu), d_out = Poisoned(out.size()),
             d_lse = Poisoned(lse.size()), d_dq = Poisoned(dq.size()), d_dk = Poisoned(dk.size()),
             d_dv = Poisoned(dv.size());
      gpu->AttentionForward(d_out.f32(), d_lse.f32(), d_q.f32(), d_k.f32(), d_v.f32(), d_cu.i32(), S, N, c.Hq, c.Hkv,
                            c.D);
      gpu->AttentionBackward(d_dq.f32(), d_dk.f32(), d_dv.f32(), d_dout.f32(), d_out.f32(), d_lse.f32(), d_q.f32(),
                             d_k.f32(), d_v.f32(), d_cu.i32(), S, N, c.Hq, c.Hkv, c.D);
      const std::string shape = std::string(tc ? "tc " : "f32 ") + "N=" + std::to_string(N) +
                                " S=" + std::to_string(S) + " H=" + std::to_string(c.Hq) + "/" +
                                std::to_string(c.Hkv) + " D=" + std::to_string(c.D);
      ExpectNmse("attention out", shape, Down(d_out), out, tc ? kBf16 : kF32);
      ExpectNmse("attention lse", shape, Down(d_lse), lse, tc ? 1e-5 : kF32);
      ExpectNmse("attention backward dq", shape, Down(d_dq), dq, tc ? 1e-3 : 1e-8);
      ExpectNmse("attention backward dk", shape, Down(d_dk), dk, tc ? 1e-3 : 1e-8);
      ExpectNmse("attention backward dv", shape, Down(d_dv), dv, tc ? 1e-3 : 1e-8);
    }
  }
}

TEST(CudaOps, KvCacheAndCachedAttentionPrefillChunkAndDecode) {
  REQUIRE_GPU();
  CpuBackend cpu;
  for (const AttnCase& c : {AttnCase{14, 2, 64, {7, 1, 40, 129}}, AttnCase{4, 4, 128, {3, 65}},
                            AttnCase{4, 1, 32, {1, 2}}}) {
    const int B = static_cast<int>(c.lens.size()), max_len = 200, slots_n = B + 2;
    const size_t row = size_t(c.Hkv) * c.D;
    std::vector<float> kc(size_t(slots_n) * max_len * row, 0.0f), vc = kc;
    Tensor d_kc = Up(kc), d_vc = Up(vc);
    std::vector<int32_t> slots(B);
    for (int b = 0; b < B; ++b) slots[b] = slots_n - 1 - b;  // not the identity
    std::vector<int32_t> len(B, 0);
    // Three rounds: prefill (start 0, many rows), a chunk (start > 0, many rows), then decode (1 row).
    for (int round = 0; round < 3; ++round) {
      std::vector<int32_t> cu{0}, start(B);
      for (int b = 0; b < B; ++b) {
        const int rows = round == 2 ? 1 : (round == 0 ? c.lens[b] : 1 + c.lens[b] / 3);
        cu.push_back(cu.back() + rows);
        start[b] = len[b];
        len[b] += rows;
      }
      const int Nq = cu.back();
      auto q = Randn(size_t(Nq) * c.Hq * c.D), k = Randn(size_t(Nq) * row), v = Randn(size_t(Nq) * row);
      std::vector<float> out(q.size());
      cpu.KvCacheWrite(kc.data(), vc.data(), k.data(), v.data(), cu.data(), slots.data(), start.data(), B, Nq, max_len,
                       c.Hkv, c.D);
      cpu.CachedAttentionForward(out.data(), q.data(), kc.data(), vc.data(), cu.data(), slots.data(), start.data(), B,
                                 Nq, max_len, c.Hq, c.Hkv, c.D);
      Tensor d_q = Up(q), d_k = Up(k), d_v = Up(v), d_cu = Up(cu), d_slots = Up(slots), d_start = Up(start),
             d_out = Poisoned(out.size());
      gpu->KvCacheWrite(d_kc.f32(), d_vc.f32(), d_k.f32(), d_v.f32(), d_cu.i32(), d_slots.i32(), d_start.i32(), B, Nq,
                        max_len, c.Hkv, c.D);
      gpu->CachedAttentionForward(d_out.f32(), d_q.f32(), d_kc.f32(), d_vc.f32(), d_cu.i32(), d_slots.i32(),
                                  d_start.i32(), B, Nq, max_len, c.Hq, c.Hkv, c.D);
      const std::string shape = std::string(round == 0 ? "prefill" : round == 1 ? "chunk" : "decode") +
                                " Nq=" + std::to_string(Nq) + " H=" + std::to_string(c.Hq) + "/" +
                                std::to_string(c.Hkv) + " D=" + std::to_string(c.D);
      ExpectNmse("cached attention", shape, Down(d_out), out, kF32);
    }
    ExpectNmse("kv cache k", "after 3 rounds", Down(d_kc), kc, 0.0);
    ExpectNmse("kv cache v", "after 3 rounds", Down(d_vc), vc, 0.0);
  }
}

// ---- lm-head ---------------------------------------------------------------------------------------

TEST(CudaOps, FusedLmHeadForwardBackward) {
  REQUIRE_GPU();
  CpuBackend cpu;
  for (auto [N, C, V, T] : {std::tuple{50, 96, 20011, 0.7f}, std::tuple{3, 64, 259, 1.0f},
                            std::tuple{300, 896, 151936, 1.0f}}) {
    for (GemmPrecision prec : {GemmPrecision::kF32, GemmPrecision::kBF16}) {
      gpu->gemm().set_precision(prec);
      const bool bf16 = prec == GemmPrecision::kBF16;
      auto h = Randn(size_t(N) * C), w = Randn(size_t(V) * C, 0.2f), dlp = Randn(N), dent = Randn(N);
      auto targets = RandInt(N, 0, V - 1);
      targets[0] = -1;
      if (N > 2) targets[N - 1] = -1;
      auto dw0 = Randn(w.size(), 0.01f);
      std::vector<float> lp(N), ent(N), lse(N), dh(h.size()), dw = dw0;
      cpu.LmHeadForward(lp.data(), ent.data(), lse.data(), h.data(), w.data(), targets.data(), N, C, V, T);
      cpu.LmHeadBackward(dh.data(), dw.data(), dlp.data(), dent.data(), h.data(), w.data(), targets.data(), lse.data(),
                         ent.data(), N, C, V, T);
      Tensor d_h = Up(h), d_w = Up(w), d_t = Up(targets), d_dlp = Up(dlp), d_dent = Up(dent), d_lp = Poisoned(N),
             d_ent = Poisoned(N), d_lse = Poisoned(N), d_dh = Poisoned(h.size()), d_dw = Up(dw0);
      gpu->RegisterWeights(d_w.f32(), d_w.numel());
      gpu->WeightsChanged(d_w.f32());
      gpu->LmHeadForward(d_lp.f32(), d_ent.f32(), d_lse.f32(), d_h.f32(), d_w.f32(), d_t.i32(), N, C, V, T);
      gpu->LmHeadBackward(d_dh.f32(), d_dw.f32(), d_dlp.f32(), d_dent.f32(), d_h.f32(), d_w.f32(), d_t.i32(),
                          d_lse.f32(), d_ent.f32(), N, C, V, T);
      const std::string shape = "[" + std::to_string(N) + "," + std::to_string(C) + "] V=" + std::to_string(V);
      const std::string tag = bf16 ? " bf16" : " f32";
      const double lim = bf16 ? kBf16 : 1e-9;
      // Rows with target < 0 hold 0 log-prob and entropy on both sides.
      ExpectNmse("lm-head logprob" + tag, shape, Down(d_lp), lp, lim);
      ExpectNmse("lm-head entropy" + tag, shape, Down(d_ent), ent, lim);
      ExpectNmse("lm-head backward dh" + tag, shape, Down(d_dh), dh, bf16 ? 1e-3 : 1e-8);
      ExpectNmse("lm-head backward dw (+=)" + tag, shape, Down(d_dw), dw, bf16 ? 1e-3 : 1e-8);
      gpu->UnregisterWeights(d_w.f32());
    }
  }
}

// ---- sampling ----------------------------------------------------------------------------------------

double ChiSquareCritical(int k) {
  const double z = 3.09, a = 2.0 / (9.0 * k);
  return k * std::pow(1 - a + z * std::sqrt(a), 3);
}

TEST(CudaOps, SampleRowsMatchesTheFilteredDistribution) {
  REQUIRE_GPU();
  const int V = 20, B = 1000, rounds = 100;
  std::vector<float> row(V);
  for (int i = 0; i < V; ++i) row[i] = 2.0f * std::sin(1.3f * i) + 0.1f * i;
  std::vector<float> logits;
  for (int b = 0; b < B; ++b) logits.insert(logits.end(), row.begin(), row.end());
  Tensor d_logits = Up(logits);
  for (SamplingOptions o : {SamplingOptions{0.7f, 1.0f, 0}, SamplingOptions{1.0f, 1.0f, 5},
                            SamplingOptions{1.2f, 0.8f, 0}, SamplingOptions{0.9f, 0.9f, 8}}) {
    const auto p = FilteredDistribution(row.data(), V, o);
    std::vector<int> count(V, 0);
    Tensor d_T = Up(std::vector<float>(B, o.temperature)), d_k = Up(std::vector<int32_t>(B, o.top_k)),
           d_p = Up(std::vector<float>(B, o.top_p));
    Tensor seeds(DType::kF32, {2 * B}, gpu->device()), counters(DType::kF32, {2 * B}, gpu->device());
    std::vector<uint64_t> s(B, 1234), c(B);
    gpu->Upload(seeds.raw(), s.data(), B * 8);
    Tensor d_tok = Poisoned(B), d_lp = Poisoned(B);
    double worst_lp = 0;
    for (int r = 0; r < rounds; ++r) {
      for (int b = 0; b < B; ++b) c[b] = static_cast<uint64_t>(r) * B + b;
      gpu->Upload(counters.raw(), c.data(), B * 8);
      gpu->SampleRows(reinterpret_cast<int32_t*>(d_tok.raw()), d_lp.f32(), d_logits.f32(), B, V, d_T.f32(), d_k.i32(),
                      d_p.f32(), static_cast<const uint64_t*>(seeds.raw()), static_cast<const uint64_t*>(counters.raw()));
      std::vector<int32_t> tok(B);
      std::vector<float> lp(B);
      gpu->Download(tok.data(), d_tok.raw(), B * 4);
      gpu->Download(lp.data(), d_lp.raw(), B * 4);
      // Behaviour log-prob: full (unfiltered) log-softmax at T.
      double m = -1e30, se = 0;
      for (float z : row) m = std::max(m, double(z) / o.temperature);
      for (float z : row) se += std::exp(double(z) / o.temperature - m);
      for (int b = 0; b < B; ++b) {
        ASSERT_TRUE(tok[b] >= 0 && tok[b] < V) << tok[b];
        ++count[tok[b]];
        worst_lp = std::max(worst_lp, std::abs(lp[b] - (row[tok[b]] / o.temperature - m - std::log(se))));
      }
    }
    double chi2 = 0;
    int dof = -1;
    for (int v = 0; v < V; ++v) {
      if (p[v] == 0) {
        EXPECT_EQ(count[v], 0) << "token " << v << " is filtered out but was drawn";
        continue;
      }
      const double e = p[v] * B * rounds;
      chi2 += (count[v] - e) * (count[v] - e) / e;
      ++dof;
    }
    std::cout << "  sample T=" << o.temperature << " top_p=" << o.top_p << " top_k=" << o.top_k << "  chi2 " << chi2
              << " (critical " << ChiSquareCritical(dof) << "), max logprob error " << worst_lp << "\n";
    EXPECT_LT(chi2, ChiSquareCritical(dof));
    EXPECT_LT(worst_lp, 1e-5);
  }
}

TEST(CudaOps, SampleRowsGreedyAndLargeVocabularyTopP) {
  REQUIRE_GPU();
  const int V = 151936, B = 64;
  auto logits = Randn(size_t(B) * V, 3.0f);
  Tensor d_logits = Up(logits);
  for (SamplingOptions o : {SamplingOptions{0.0f, 1.0f, 0}, SamplingOptions{1.0f, 0.9f, 0},
                            SamplingOptions{0.8f, 1.0f, 50}, SamplingOptions{1.0f, 1.0f, 0}}) {
    Tensor d_T = Up(std::vector<float>(B, o.temperature)), d_k = Up(std::vector<int32_t>(B, o.top_k)),
           d_p = Up(std::vector<float>(B, o.top_p));
    Tensor seeds(DType::kF32, {2 * B}, gpu->device()), counters(DType::kF32, {2 * B}, gpu->device());
    std::vector<uint64_t> s(B), c(B, 0);
    for (int b = 0; b < B; ++b) s[b] = 77 + b;
    gpu->Upload(seeds.raw(), s.data(), B * 8);
    gpu->Upload(counters.raw(), c.data(), B * 8);
    Tensor d_tok = Poisoned(B), d_lp = Poisoned(B);
    gpu->SampleRows(reinterpret_cast<int32_t*>(d_tok.raw()), d_lp.f32(), d_logits.f32(), B, V, d_T.f32(), d_k.i32(),
                    d_p.f32(), static_cast<const uint64_t*>(seeds.raw()), static_cast<const uint64_t*>(counters.raw()));
    std::vector<int32_t> tok(B);
    gpu->Download(tok.data(), d_tok.raw(), B * 4);
    for (int b = 0; b < B; ++b) {
      const float* r = logits.data() + size_t(b) * V;
      ASSERT_TRUE(tok[b] >= 0 && tok[b] < V);
      if (o.temperature == 0) {
        EXPECT_EQ(tok[b], std::max_element(r, r + V) - r) << "greedy row " << b;
      } else {
        const auto p = FilteredDistribution(r, V, o);
        EXPECT_GT(p[tok[b]], 0.0) << "row " << b << " drew token " << tok[b] << " outside the kept set";
      }
    }
  }
}

// ---- whole models ------------------------------------------------------------------------------------

ModelConfig SmallConfig(Arch arch) {
  ModelConfig c = PresetConfig(arch, "tiny", 0).value();
  c.vocab_size = 3001;
  c.hidden_size = 256;
  c.num_layers = 3;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.intermediate_size = 512;
  return c;
}

void CompareModels(Arch arch, GemmPrecision prec, double lp_limit, double grad_limit) {
  CudaBackend* gpu = Gpu();
  gpu->gemm().set_precision(prec);
  CpuBackend cpu;
  const ModelConfig config = SmallConfig(arch);
  auto mc = Transformer::Init(config, 42, &cpu);
  auto mg = Transformer::Init(config, 42, gpu);
  std::vector<int32_t> cu{0, 1, 70, 200, 201, 457};
  const int S = 5, N = cu.back();
  auto tokens = RandInt(N, 0, config.vocab_size - 1);
  std::vector<float> lc(N), ec(N), lg(N), eg(N);
  mc->Forward(tokens.data(), cu.data(), S, N, 0.8f, lc.data(), ec.data());
  mg->Forward(tokens.data(), cu.data(), S, N, 0.8f, lg.data(), eg.data());
  double worst = 0;
  for (int i = 0; i < N; ++i) worst = std::max({worst, std::abs(double(lc[i]) - lg[i]), std::abs(double(ec[i]) - eg[i])});
  const std::string tag = std::string(ArchName(arch)) + (prec == GemmPrecision::kF32 ? " f32" : " bf16");
  std::cout << "  model " << tag << ": max |logprob or entropy difference| " << worst << "\n";
  EXPECT_LT(worst, lp_limit) << tag;
  auto dlp = Randn(N), dent = Randn(N, 0.1f);
  mc->ZeroGrad();
  mg->ZeroGrad();
  mc->Backward(dlp.data(), dent.data());
  mg->Backward(dlp.data(), dent.data());
  std::vector<float> gc(mc->num_params());
  std::copy(mc->grads(), mc->grads() + gc.size(), gc.begin());
  std::vector<float> gg(gc.size());
  gpu->Download(gg.data(), mg->grads(), gg.size() * 4);
  double worst_rel = 0;
  std::string worst_name;
  for (const ParamInfo& p : mc->param_table()) {
    std::vector<float> a(gc.begin() + p.offset, gc.begin() + p.offset + p.numel());
    std::vector<float> b(gg.begin() + p.offset, gg.begin() + p.offset + p.numel());
    const double e = Nmse(b, a);
    if (e > worst_rel) worst_rel = e, worst_name = p.name;
  }
  std::cout << "  model " << tag << ": worst gradient nmse " << worst_rel << " (" << worst_name << ")\n";
  EXPECT_LT(worst_rel, grad_limit) << tag << " " << worst_name;
}

TEST(CudaModel, ForwardBackwardMatchCpu) {
  REQUIRE_GPU();
  for (Arch a : {Arch::kQwen2, Arch::kQwen3, Arch::kLlama}) {
    CompareModels(a, GemmPrecision::kF32, 1e-4, 1e-8);
    CompareModels(a, GemmPrecision::kBF16, 5e-2, 1e-3);
  }
}

TEST(CudaModel, HfFixturesParity) {
  REQUIRE_GPU();
  gpu->gemm().set_precision(GemmPrecision::kF32);
  for (const std::string name : {"qwen2", "qwen3", "llama"}) {
    // The GPU machine runs this binary from another checkout path: AHA_FIXTURES_DIR overrides.
    const char* env = std::getenv("AHA_FIXTURES_DIR");
    const std::string dir = std::string(env ? env : AHA_FIXTURES_DIR) + "/hf/" + name;
    auto loaded = Transformer::Load(dir, gpu);
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    Transformer& model = **loaded;
    auto expected = SafetensorsFile::Open(dir + "/expected.safetensors");
    ASSERT_TRUE(expected.ok());
    auto tokens_t = expected->Read("tokens").value();
    auto cu_t = expected->Read("cu_seqlens").value();
    const int N = static_cast<int>(tokens_t.numel()), S = static_cast<int>(cu_t.numel()) - 1;
    std::vector<int32_t> tokens(tokens_t.i32(), tokens_t.i32() + N), cu(cu_t.i32(), cu_t.i32() + S + 1);
    std::vector<float> lp(N), ent(N);
    model.Forward(tokens.data(), cu.data(), S, N, 1.0f, lp.data(), ent.data());
    const auto lp_ref = expected->Read("logprobs").value().ToVector();
    const auto ent_ref = expected->Read("entropies").value().ToVector();
    double worst = 0;
    for (int i = 0; i < N; ++i)
      worst = std::max({worst, std::abs(double(lp[i]) - lp_ref[i]), std::abs(double(ent[i]) - ent_ref[i])});
    std::cout << "  " << name << " on CUDA vs transformers: max |logprob or entropy error| " << worst << "\n";
    EXPECT_LT(worst, 1e-4) << name;
    auto prompt_t = expected->Read("gen.prompt").value();
    auto want_t = expected->Read("gen.output").value();
    GenerationRequest req;
    req.prompt.assign(prompt_t.i32(), prompt_t.i32() + prompt_t.numel());
    req.sampling.temperature = 0.0f;
    req.max_new_tokens = static_cast<int>(want_t.numel());
    Generator gen(&model, 2, 64);
    auto out = gen.Generate({req});
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    std::vector<int32_t> want(want_t.i32(), want_t.i32() + want_t.numel());
    EXPECT_EQ((*out)[0].tokens, want) << name << ": greedy generation on CUDA";
  }
}

// The actor's behaviour log-probs (KV-cached generation) against the learner's log-probs (packed
// training forward) at equal weights on the GPU, in bf16: the gap that GRPO's importance ratio sees.
TEST(CudaModel, ActorVsLearnerLogprobGapInBf16) {
  REQUIRE_GPU();
  const ModelConfig config = SmallConfig(Arch::kQwen2);
  auto model = Transformer::Init(config, 7, gpu);
  std::vector<GenerationRequest> reqs(24);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = RandInt(5 + i * 3, 0, config.vocab_size - 1);
    reqs[i].sampling = {0.9f, 1.0f, 0};
    reqs[i].seed = i;
    reqs[i].max_new_tokens = 40;
  }
  Generator gen(model.get(), 8, 200);  // fewer slots than requests: continuous batching refills
  auto out = gen.Generate(reqs);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  std::vector<int32_t> tokens, cu{0};
  std::vector<float> behaviour;
  std::vector<int> is_completion;
  for (size_t i = 0; i < reqs.size(); ++i) {
    tokens.insert(tokens.end(), reqs[i].prompt.begin(), reqs[i].prompt.end());
    tokens.insert(tokens.end(), (*out)[i].tokens.begin(), (*out)[i].tokens.end());
    for (size_t j = 0; j < reqs[i].prompt.size(); ++j) behaviour.push_back(0), is_completion.push_back(0);
    for (float lp : (*out)[i].logprobs) behaviour.push_back(lp), is_completion.push_back(1);
    cu.push_back(static_cast<int32_t>(tokens.size()));
  }
  const int N = cu.back(), S = static_cast<int>(reqs.size());
  std::vector<float> lp(N);
  model->Forward(tokens.data(), cu.data(), S, N, 0.9f, lp.data(), nullptr);
  double sum = 0, worst = 0;
  int n = 0;
  for (int i = 0; i < N; ++i)
    if (is_completion[i]) {
      const double d = std::abs(double(lp[i]) - behaviour[i]);
      sum += d;
      worst = std::max(worst, d);
      ++n;
    }
  std::cout << "  actor vs learner log-probs (bf16, " << n << " tokens): mean |diff| " << sum / n << ", max " << worst
            << "\n";
  EXPECT_LT(worst, 5e-2);
  EXPECT_LT(sum / n, 5e-3);
}

}  // namespace
}  // namespace aha::engine
