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

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/kernels.h"
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
// Whether QkvRopeAttention / QkvNormRopeAttention run the fused q/k/v kernel (tc: the tensor-core
// attention is on): at D = 64 or 128, unless AHA_FUSED_QKV=0 or AHA_ATTENTION_KV16=0 sends them to the ops.
bool FusedQkvAttentionRuns(bool tc, int D) {
  for (const char* name : {"AHA_FUSED_QKV", "AHA_ATTENTION_KV16"}) {
    const char* e = std::getenv(name);
    if (e != nullptr && std::string(e) == "0") return false;
  }
  return tc && (D == 64 || D == 128);
}
bool AllNan(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float y) { return std::isnan(y); });
}
// RoPE inverse frequencies of head width D at theta 1e6.
std::vector<float> RopeInvFreq(int D) {
  std::vector<float> f(D / 2);
  for (int j = 0; j < D / 2; ++j) f[j] = std::pow(1e6f, -2.0f * j / D);
  return f;
}
// 0 .. n - 1 in a fresh random order: pool blocks handed out out of order.
std::vector<int32_t> ShuffledIds(int n) {
  std::vector<int32_t> ids(n);
  for (int i = 0; i < n; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(test::NextSeed()));
  return ids;
}
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
  // The backward's one-pass kernel (C % 4 == 0, 128..2048: 896, a training batch of 896, 128,
  // 1024; 1028, 1536 (12 float4 a lane), 1792 and 2048 (16)) and its two-kernel fallback (64, 33,
  // 2052).
  for (auto [rows, width] : {std::pair{N, C}, std::pair{16384, C}, std::pair{N, 128}, std::pair{33, 1024},
                             std::pair{N * 14, 64}, std::pair{7, 33}, std::pair{7, 1028}, std::pair{N, 1536},
                             std::pair{2048, 1792}, std::pair{33, 2048}, std::pair{7, 2052}}) {
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
  for (int I : {4864, 7}) {
    // gu[N, 2I] = gate | up per row; the gate half gets the wider spread (silu's curved part).
    const size_t NI = size_t(N) * I;
    std::vector<float> gu(2 * NI);
    {
      auto g = Randn(NI, 3.0f), u = Randn(NI);
      for (size_t n = 0; n < size_t(N); ++n)
        for (size_t i = 0; i < size_t(I); ++i) {
          gu[n * 2 * I + i] = g[n * I + i];
          gu[n * 2 * I + I + i] = u[n * I + i];
        }
    }
    auto dh = Randn(NI);
    std::vector<float> h(NI), dgu(2 * NI), sum(2 * NI);
    cpu.SwiGluForward(h.data(), gu.data(), N, I);
    cpu.SwiGluBackward(dgu.data(), dh.data(), gu.data(), N, I);
    cpu.Add(sum.data(), gu.data(), dgu.data(), gu.size());
    Tensor d_gu = Up(gu), d_dh = Up(dh), d_h = Poisoned(NI), d_dgu = Poisoned(2 * NI), d_sum = Poisoned(2 * NI);
    gpu->SwiGluForward(d_h.f32(), d_gu.f32(), N, I);
    gpu->SwiGluBackward(d_dgu.f32(), d_dh.f32(), d_gu.f32(), N, I);
    gpu->Add(d_sum.f32(), d_gu.f32(), d_dgu.f32(), gu.size());
    const std::string shape = "[301,2x" + std::to_string(I) + "]";
    ExpectNmse("swiglu (packed gate|up)", shape, Down(d_h), h, kF32);
    ExpectNmse("swiglu backward dgu", shape, Down(d_dgu), dgu, kF32);
    ExpectNmse("add", shape, Down(d_sum), sum, kF32);
  }
}

// The fused residual add + RMSNorm (and the RMSNorm kernel it shares) on every path of its launcher:
// a row per block of 224 threads (C = 896, one float4 each), several short rows per block (C = 64),
// 2, 4 and 8 float4 per thread (C = 1536, 4096, 8192), and the scalar kernel (odd C = 37, and
// C = 8200 past the register path), from one row to a training batch. x is updated in place; ln
// and rstd are poisoned first.
TEST(CudaOps, AddRmsNormMatchesCpu) {
  REQUIRE_GPU();
  CpuBackend cpu;
  std::vector<std::pair<int, int>> shapes;
  for (int N : {1, 7, 256, 16384})
    for (int C : {896, 37}) shapes.push_back({N, C});
  for (int C : {64, 1536, 4096, 8192, 8200}) shapes.push_back({7, C}), shapes.push_back({256, C});
  for (auto [N, C] : shapes) {
    auto x = Randn(size_t(N) * C, 2.0f), y = Randn(size_t(N) * C), w = Randn(C);
    std::vector<float> xs = x, ln(x.size()), rstd(N), ln_plain(x.size()), rstd_plain(N);
    cpu.AddRmsNormForward(xs.data(), ln.data(), rstd.data(), y.data(), w.data(), N, C, 1e-6f);
    cpu.RmsNormForward(ln_plain.data(), rstd_plain.data(), x.data(), w.data(), N, C, 1e-6f);
    Tensor d_x = Up(x), d_y = Up(y), d_w = Up(w), d_ln = Poisoned(ln.size()), d_rstd = Poisoned(N),
           d_ln_plain = Poisoned(ln.size()), d_rstd_plain = Poisoned(N);
    gpu->RmsNormForward(d_ln_plain.f32(), d_rstd_plain.f32(), d_x.f32(), d_w.f32(), N, C, 1e-6f);
    gpu->AddRmsNormForward(d_x.f32(), d_ln.f32(), d_rstd.f32(), d_y.f32(), d_w.f32(), N, C, 1e-6f);
    const std::string shape = "[" + std::to_string(N) + "," + std::to_string(C) + "]";
    ExpectNmse("add + rmsnorm x (+= y)", shape, Down(d_x), xs, 0.0);  // one f32 add: exact
    ExpectNmse("add + rmsnorm ln", shape, Down(d_ln), ln, kF32);
    ExpectNmse("add + rmsnorm rstd", shape, Down(d_rstd), rstd, kF32);
    ExpectNmse("rmsnorm", shape, Down(d_ln_plain), ln_plain, kF32);
    ExpectNmse("rmsnorm rstd", shape, Down(d_rstd_plain), rstd_plain, kF32);
  }
}

// Producers' bf16 copies (Gemm::AdoptCast): RMSNorm, add + RMSNorm and SwiGLU (and in the backward
// SwiGLU's backward and PackQkv) write their output in bf16 too, and the product right after reads
// that copy instead of casting. It must launch no cast and give bit for bit the output of the same
// product over a plain buffer with the same values (which casts: same rounding, to nearest even,
// and the same cuBLASLt plan, both operands being 256-byte aligned). And the copy must never be read once the f32 range has changed: after an Add
// into it, after a product that writes it, after a Copy over it, the product casts again and
// matches the new values.
// out[N, OC] = in[N, C] W^T with `in` read through a fresh buffer: a Copy (an op: every held cast
// is forgotten), then the product, which must cast.
std::vector<float> ProductOfPlainCopy(CudaBackend* gpu, const Tensor& in, const Tensor& W, int N, int C, int OC) {
  Tensor plain = Poisoned(in.numel()), out = Poisoned(size_t(N) * OC);
  gpu->Copy(plain.raw(), in.raw(), in.nbytes());
  const uint64_t casts = gpu->gemm().casts_launched();
  gpu->LinearForward(out.f32(), plain.f32(), W.f32(), nullptr, N, C, OC);
  EXPECT_EQ(gpu->gemm().casts_launched(), casts + 1) << "a plain buffer's product casts its input";
  return Down(out);
}

TEST(CudaOps, ProductsReadProducersBf16CopiesAndNeverStaleOnes) {
  REQUIRE_GPU();
  cuda::Gemm& g = gpu->gemm();
  auto bits_equal = [](const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (size_t i = 0; i < a.size(); ++i)
      ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(float)), 0) << what << ": element " << i << " " << a[i] << " vs " << b[i];
  };
  auto product_of_copy = [&](const Tensor& in, const Tensor& W, int N, int C, int OC) {
    return ProductOfPlainCopy(gpu, in, W, N, C, OC);
  };
  for (auto [N, C, OC, I] : {std::tuple{256, 896, 1152, 4864}, std::tuple{7, 37, 45, 13}, std::tuple{1, 64, 96, 40}}) {
    const std::string shape = "N=" + std::to_string(N) + " C=" + std::to_string(C);
    auto x = Randn(size_t(N) * C, 2.0f), y = Randn(size_t(N) * C), wn = Randn(C), delta = Randn(size_t(N) * C);
    auto W = Randn(size_t(OC) * C, 0.05f), Wd = Randn(size_t(C) * I, 0.05f), W2 = Randn(size_t(C) * C, 0.05f);
    auto gu = Randn(size_t(N) * 2 * I, 2.0f);  // gate | up per row
    Tensor d_x = Up(x), d_y = Up(y), d_wn = Up(wn), d_delta = Up(delta), d_W = Up(W), d_Wd = Up(Wd), d_W2 = Up(W2),
           d_gu = Up(gu), d_ln = Poisoned(x.size()), d_rstd = Poisoned(N), d_h = Poisoned(size_t(N) * I);
    for (const Tensor* t : {&d_W, &d_Wd, &d_W2}) {
      gpu->RegisterWeights(t->f32(), t->numel());
      gpu->WeightsChanged(t->f32());
    }
    Tensor out = Poisoned(size_t(N) * OC);
    // RMSNorm -> product (q/k/v); a second product over the same input (gate/up) reuses the copy too.
    gpu->RmsNormForward(d_ln.f32(), d_rstd.f32(), d_x.f32(), d_wn.f32(), N, C, 1e-6f);
    uint64_t casts = g.casts_launched();
    gpu->LinearForward(out.f32(), d_ln.f32(), d_W.f32(), nullptr, N, C, OC);
    EXPECT_EQ(g.casts_launched(), casts) << "rmsnorm's bf16 copy is the product's operand (" << shape << ")";
    Tensor out_again = Poisoned(size_t(N) * OC);
    gpu->LinearForward(out_again.f32(), d_ln.f32(), d_W.f32(), nullptr, N, C, OC);
    EXPECT_EQ(g.casts_launched(), casts) << "and the next product's over the same range (" << shape << ")";
    const std::vector<float> after_norm = Down(out);
    bits_equal(Down(out_again), after_norm, "the same product twice from rmsnorm's copy, " + shape);
    bits_equal(after_norm, product_of_copy(d_ln, d_W, N, C, OC), "product of rmsnorm's copy vs cast, " + shape);
    // Add + RMSNorm -> product.
    gpu->AddRmsNormForward(d_x.f32(), d_ln.f32(), d_rstd.f32(), d_y.f32(), d_wn.f32(), N, C, 1e-6f);
    casts = g.casts_launched();
    gpu->LinearForward(out.f32(), d_ln.f32(), d_W.f32(), nullptr, N, C, OC);
    EXPECT_EQ(g.casts_launched(), casts) << "add + rmsnorm's bf16 copy is the product's operand (" << shape << ")";
    bits_equal(Down(out), product_of_copy(d_ln, d_W, N, C, OC), "product of add + rmsnorm's copy vs cast, " + shape);
    // SwiGLU -> product (down).
    Tensor down = Poisoned(size_t(N) * C);
    gpu->SwiGluForward(d_h.f32(), d_gu.f32(), N, I);
    casts = g.casts_launched();
    gpu->LinearForward(down.f32(), d_h.f32(), d_Wd.f32(), nullptr, N, I, C);
    EXPECT_EQ(g.casts_launched(), casts) << "swiglu's bf16 copy is the product's operand (" << shape << ")";
    bits_equal(Down(down), product_of_copy(d_h, d_Wd, N, I, C), "product of swiglu's copy vs cast, " + shape);
    // Backward: SwiGLU's dgu and PackQkv's dqkv are the dout of a LinearBackward (NN for dx, TN for
    // dw, both reading dout). With the producer's copy only x is cast; from a plain buffer dout is
    // cast once (NN) and reused (TN), and x once: dx and dw bit for bit the same.
    auto backward = [&](const Tensor& dout, const Tensor& w, int cols, bool plain, int want_casts,
                        const std::string& what) {
      Tensor src = Poisoned(dout.numel()), dx = Poisoned(size_t(N) * C), dw = Up(std::vector<float>(w.numel(), 0.0f));
      const float* d = dout.f32();
      if (plain) {
        gpu->Copy(src.raw(), dout.raw(), dout.nbytes());
        d = src.f32();
      }
      const uint64_t before = g.casts_launched();
      gpu->LinearBackward(dx.f32(), dw.f32(), nullptr, d, d_y.f32(), w.f32(), N, C, cols, false);
      EXPECT_EQ(g.casts_launched(), before + want_casts) << what << " (" << shape << ")";
      return std::pair{Down(dx), Down(dw)};
    };
    Tensor d_dh = Up(Randn(size_t(N) * I)), d_dgu = Poisoned(size_t(N) * 2 * I), d_Wgu = Up(Randn(size_t(2 * I) * C, 0.05f));
    gpu->RegisterWeights(d_Wgu.f32(), d_Wgu.numel());
    gpu->WeightsChanged(d_Wgu.f32());
    gpu->SwiGluBackward(d_dgu.f32(), d_dh.f32(), d_gu.f32(), N, I);
    auto [dx1, dw1] = backward(d_dgu, d_Wgu, 2 * I, false, 1, "swiglu backward's copy: only x is cast");
    auto [dx2, dw2] = backward(d_dgu, d_Wgu, 2 * I, true, 2, "plain dgu: dout and x are cast");
    bits_equal(dx1, dx2, "dx from swiglu backward's copy vs cast, " + shape);
    bits_equal(dw1, dw2, "dw from swiglu backward's copy vs cast, " + shape);
    const int QD = 3 * C / 4 + 1, KD = C / 8 + 1, Wq = QD + 2 * KD;  // odd widths: no float4 anywhere
    Tensor d_dq = Up(Randn(size_t(N) * QD)), d_dk = Up(Randn(size_t(N) * KD)), d_dv = Up(Randn(size_t(N) * KD)),
           d_dqkv = Poisoned(size_t(N) * Wq), d_Wqkv = Up(Randn(size_t(Wq) * C, 0.05f));
    gpu->RegisterWeights(d_Wqkv.f32(), d_Wqkv.numel());
    gpu->WeightsChanged(d_Wqkv.f32());
    gpu->PackQkv(d_dqkv.f32(), d_dq.f32(), d_dk.f32(), d_dv.f32(), N, QD, KD);
    auto [dx3, dw3] = backward(d_dqkv, d_Wqkv, Wq, false, 1, "pack qkv's copy: only x is cast");
    auto [dx4, dw4] = backward(d_dqkv, d_Wqkv, Wq, true, 2, "plain dqkv: dout and x are cast");
    bits_equal(dx3, dx4, "dx from pack qkv's copy vs cast, " + shape);
    bits_equal(dw3, dw4, "dw from pack qkv's copy vs cast, " + shape);
    // RMSNorm backward's dx (the residual gradient) is the dout of the o and down backwards: the
    // one-pass kernel (C % 4 == 0, 128..1024) writes its copy.
    const bool one_pass = C % 4 == 0 && C >= 128 && C <= 1024;
    Tensor d_dres = Up(Randn(size_t(N) * C)), d_dwn = Up(std::vector<float>(C, 0.0f));
    gpu->RmsNormBackward(d_dres.f32(), d_dwn.f32(), d_delta.f32(), d_x.f32(), d_wn.f32(), d_rstd.f32(), N, C);
    auto [dx5, dw5] = backward(d_dres, d_W2, C, false, one_pass ? 1 : 2, "rmsnorm backward's dx: its copy if one pass");
    auto [dx6, dw6] = backward(d_dres, d_W2, C, true, 2, "plain dres: dout and x are cast");
    bits_equal(dx5, dx6, "dx from rmsnorm backward's copy vs cast, " + shape);
    bits_equal(dw5, dw6, "dw from rmsnorm backward's copy vs cast, " + shape);
    gpu->UnregisterWeights(d_Wgu.f32());
    gpu->UnregisterWeights(d_Wqkv.f32());

    // Stale: another op writes the normed range in place.
    gpu->RmsNormForward(d_ln.f32(), d_rstd.f32(), d_x.f32(), d_wn.f32(), N, C, 1e-6f);
    gpu->Add(d_ln.f32(), d_ln.f32(), d_delta.f32(), x.size());
    casts = g.casts_launched();
    gpu->LinearForward(out.f32(), d_ln.f32(), d_W.f32(), nullptr, N, C, OC);
    EXPECT_EQ(g.casts_launched(), casts + 1) << "after an add into the range the product casts (" << shape << ")";
    const std::vector<float> after_add = Down(out);
    bits_equal(after_add, product_of_copy(d_ln, d_W, N, C, OC), "product after an add into the range, " + shape);
    // Stale: a product writes the range (both under cast reuse, as q/k/v and gate/up are).
    gpu->RmsNormForward(d_ln.f32(), d_rstd.f32(), d_x.f32(), d_wn.f32(), N, C, 1e-6f);
    gpu->LinearForward(d_ln.f32(), d_y.f32(), d_W2.f32(), nullptr, N, C, C);
    casts = g.casts_launched();
    gpu->LinearForward(out.f32(), d_ln.f32(), d_W.f32(), nullptr, N, C, OC);
    EXPECT_EQ(g.casts_launched(), casts + 1) << "after a product into the range the product casts (" << shape << ")";
    bits_equal(Down(out), product_of_copy(d_ln, d_W, N, C, OC), "product after a product into the range, " + shape);
    // Stale: a copy over the range (the previous product's values, from elsewhere) is an op like
    // any other.
    Tensor saved = Poisoned(x.size());
    gpu->Copy(saved.raw(), d_ln.raw(), d_ln.nbytes());
    gpu->RmsNormForward(d_ln.f32(), d_rstd.f32(), d_x.f32(), d_wn.f32(), N, C, 1e-6f);
    gpu->Copy(d_ln.raw(), saved.raw(), d_ln.nbytes());
    casts = g.casts_launched();
    gpu->LinearForward(out.f32(), d_ln.f32(), d_W.f32(), nullptr, N, C, OC);
    EXPECT_EQ(g.casts_launched(), casts + 1) << "after a copy into the range the product casts (" << shape << ")";
    bits_equal(Down(out), product_of_copy(d_ln, d_W, N, C, OC), "product after a copy into the range, " + shape);
    // The changed inputs really changed the product: a stale copy would have given after_norm.
    EXPECT_NE(std::memcmp(after_add.data(), after_norm.data(), after_add.size() * sizeof(float)), 0) << shape;
    for (const Tensor* t : {&d_W, &d_Wd, &d_W2}) gpu->UnregisterWeights(t->f32());
  }
}

// The training forward's fused q/k/v step (QkvRope: split + bias + RoPE of q and k) and its
// backward (RopePackQkv: inverse RoPE of dq and dk + pack) against the ops they replace, on the GPU
// (bit for bit: the kernels repeat RopeKernel's arithmetic) and on the CPU (kF32). The packed rows
// are the q/k/v backward product's dout: its bf16 copy must be what the product reads (one cast, of
// x, where a plain buffer costs two) and give dx and dw bit for bit as the cast does.
TEST(CudaOps, QkvRopeAndRopePackQkvEqualTheirOps) {
  REQUIRE_GPU();
  CpuBackend cpu;
  cuda::Gemm& g = gpu->gemm();
  struct Case {
    int N, Hq, Hkv, D;
    bool bias;
  };
  for (const Case& c : {Case{301, 14, 2, 64, true}, Case{7, 4, 4, 128, false}, Case{33, 8, 2, 16, true}}) {
    const int QD = c.Hq * c.D, KD = c.Hkv * c.D, W = QD + 2 * KD, N = c.N, C = 96;
    const std::string shape = "N=" + std::to_string(N) + " H=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) +
                              " D=" + std::to_string(c.D) + (c.bias ? " bias" : "");
    auto qkv = Randn(size_t(N) * W), bias = Randn(W), dq = Randn(size_t(N) * QD), dk = Randn(size_t(N) * KD),
         dv = Randn(size_t(N) * KD);
    auto pos = RandInt(N, 0, 4000);
    const std::vector<float> inv_freq = RopeInvFreq(c.D);
    const float* b_cpu = c.bias ? bias.data() : nullptr;
    // CPU: the ops themselves (the defaults of QkvRope and RopePackQkv).
    std::vector<float> q(size_t(N) * QD), k(size_t(N) * KD), v(size_t(N) * KD), dqkv(size_t(N) * W);
    cpu.QkvRope(q.data(), k.data(), v.data(), qkv.data(), b_cpu, pos.data(), inv_freq.data(), N, c.Hq, c.Hkv, c.D);
    {
      auto dq_c = dq, dk_c = dk;
      cpu.RopePackQkv(dqkv.data(), dq_c.data(), dk_c.data(), dv.data(), pos.data(), inv_freq.data(), N, c.Hq, c.Hkv,
                      c.D);
    }
    Tensor d_qkv = Up(qkv), d_bias = Up(bias), d_pos = Up(pos), d_inv = Up(inv_freq), d_dv = Up(dv);
    const float* b = c.bias ? d_bias.f32() : nullptr;
    Tensor q1 = Poisoned(q.size()), k1 = Poisoned(k.size()), v1 = Poisoned(v.size());
    Tensor q2 = Poisoned(q.size()), k2 = Poisoned(k.size()), v2 = Poisoned(v.size());
    gpu->QkvRope(q1.f32(), k1.f32(), v1.f32(), d_qkv.f32(), b, d_pos.i32(), d_inv.f32(), N, c.Hq, c.Hkv, c.D);
    gpu->SplitQkv(q2.f32(), k2.f32(), v2.f32(), d_qkv.f32(), b, N, QD, KD);
    gpu->RopeForward(q2.f32(), d_pos.i32(), d_inv.f32(), N, c.Hq, c.D);
    gpu->RopeForward(k2.f32(), d_pos.i32(), d_inv.f32(), N, c.Hkv, c.D);
    ExpectNmse("qkv + rope q vs the ops", shape, Down(q1), Down(q2), 0.0);
    ExpectNmse("qkv + rope k vs the ops", shape, Down(k1), Down(k2), 0.0);
    ExpectNmse("qkv + rope v vs the ops", shape, Down(v1), Down(v2), 0.0);
    ExpectNmse("qkv + rope q vs cpu", shape, Down(q1), q, kF32);
    ExpectNmse("qkv + rope k vs cpu", shape, Down(k1), k, kF32);
    ExpectNmse("qkv + rope v vs cpu", shape, Down(v1), v, kF32);
    // The kernels' one-value form (rows one float past a 16-byte boundary: QkvWidth 1) gives the
    // four-value form's bits.
    auto shifted = [](std::vector<float> x) {
      x.insert(x.begin(), 0.0f);
      return Up(x);
    };
    auto past_first = [](const Tensor& t) {
      auto x = Down(t);
      x.erase(x.begin());
      return x;
    };
    {
      Tensor s_qkv = shifted(qkv), s_q = Poisoned(q.size() + 1), s_k = Poisoned(k.size() + 1);
      Tensor s_v = Poisoned(v.size() + 1);
      gpu->QkvRope(s_q.f32() + 1, s_k.f32() + 1, s_v.f32() + 1, s_qkv.f32() + 1, b, d_pos.i32(), d_inv.f32(), N, c.Hq,
                   c.Hkv, c.D);
      ExpectNmse("qkv + rope q, a value a thread vs four", shape, past_first(s_q), Down(q1), 0.0);
      ExpectNmse("qkv + rope k, a value a thread vs four", shape, past_first(s_k), Down(k1), 0.0);
      ExpectNmse("qkv + rope v, a value a thread vs four", shape, past_first(s_v), Down(v1), 0.0);
    }
    // QkvRopeAttention (the tensor-core attention reading the q/k/v kernel's bf16 k and v) against
    // QkvRope then AttentionForward: the same q, k, v, out and lse bit for bit. Packed sequences of
    // uneven lengths; the o product then reads the attention's bf16 copy.
    {
      std::vector<int32_t> cu{0};
      for (int len : {N / 3, 1, N - N / 3 - 1}) cu.push_back(cu.back() + len);
      const int S = static_cast<int>(cu.size()) - 1;
      Tensor d_cu = Up(cu);
      Tensor q3 = Poisoned(q.size()), k3 = Poisoned(k.size()), v3 = Poisoned(v.size());
      Tensor out1 = Poisoned(size_t(N) * QD), lse1 = Poisoned(size_t(N) * c.Hq);
      Tensor out2 = Poisoned(size_t(N) * QD), lse2 = Poisoned(size_t(N) * c.Hq);
      // The o weight first: its upload and registration are ops, which forget adopted copies.
      Tensor d_wo = Up(Randn(size_t(C) * QD, 0.05f)), o = Poisoned(size_t(N) * C);
      gpu->RegisterWeights(d_wo.f32(), d_wo.numel());
      gpu->WeightsChanged(d_wo.f32());
      gpu->AttentionForward(out2.f32(), lse2.f32(), q1.f32(), k1.f32(), v1.f32(), d_cu.i32(), S, N, c.Hq, c.Hkv, c.D);
      gpu->QkvRopeAttention(out1.f32(), lse1.f32(), q3.f32(), k3.f32(), v3.f32(), d_qkv.f32(), b, d_pos.i32(),
                            d_inv.f32(), d_cu.i32(), S, N, c.Hq, c.Hkv, c.D);
      const uint64_t before = g.casts_launched();
      gpu->LinearForward(o.f32(), out1.f32(), d_wo.f32(), nullptr, N, QD, C);
      if (gpu->UseTcAttention() && (c.D == 64 || c.D == 128)) {
        EXPECT_EQ(g.casts_launched(), before) << "the o product reads the attention's bf16 copy (" << shape << ")";
      }
      gpu->UnregisterWeights(d_wo.f32());
      ExpectNmse("qkv + rope + attention q vs the ops", shape, Down(q3), Down(q1), 0.0);
      ExpectNmse("qkv + rope + attention k vs the ops", shape, Down(k3), Down(k1), 0.0);
      ExpectNmse("qkv + rope + attention v vs the ops", shape, Down(v3), Down(v1), 0.0);
      ExpectNmse("qkv + rope + attention out vs the ops", shape, Down(out1), Down(out2), 0.0);
      ExpectNmse("qkv + rope + attention lse vs the ops", shape, Down(lse1), Down(lse2), 0.0);
      // A forward alone: the same out and lse; where the fused kernel takes the call, q, k and v unwritten.
      Tensor q4 = Poisoned(q.size()), k4 = Poisoned(k.size()), v4 = Poisoned(v.size());
      Tensor out4 = Poisoned(size_t(N) * QD), lse4 = Poisoned(size_t(N) * c.Hq);
      gpu->QkvRopeAttention(out4.f32(), lse4.f32(), q4.f32(), k4.f32(), v4.f32(), d_qkv.f32(), b, d_pos.i32(),
                            d_inv.f32(), d_cu.i32(), S, N, c.Hq, c.Hkv, c.D, /*forward_only=*/true);
      ExpectNmse("forward-only out vs the full forward", shape, Down(out4), Down(out1), 0.0);
      ExpectNmse("forward-only lse vs the full forward", shape, Down(lse4), Down(lse1), 0.0);
      if (FusedQkvAttentionRuns(gpu->UseTcAttention(), c.D)) {
        for (const Tensor* t : {&k4, &v4})
          EXPECT_TRUE(AllNan(Down(*t))) << "a forward alone wrote k or v (" << shape << ")";
      }
    }
    // Backward, then the q/k/v product's backward over the packed rows.
    Tensor dq1 = Up(dq), dk1 = Up(dk), dq2 = Up(dq), dk2 = Up(dk);
    Tensor dqkv1 = Poisoned(dqkv.size()), dqkv2 = Poisoned(dqkv.size());
    Tensor d_x = Up(Randn(size_t(N) * C)), d_w = Up(Randn(size_t(W) * C, 0.05f));
    gpu->RegisterWeights(d_w.f32(), d_w.numel());
    gpu->WeightsChanged(d_w.f32());
    auto product_backward = [&](const Tensor& dout, int want_casts, const std::string& what) {
      Tensor dx = Poisoned(size_t(N) * C), dw = Up(std::vector<float>(d_w.numel(), 0.0f));
      const uint64_t before = g.casts_launched();
      gpu->LinearBackward(dx.f32(), dw.f32(), nullptr, dout.f32(), d_x.f32(), d_w.f32(), N, C, W, false);
      EXPECT_EQ(g.casts_launched(), before + want_casts) << what << " (" << shape << ")";
      return std::pair{Down(dx), Down(dw)};
    };
    gpu->RopePackQkv(dqkv1.f32(), dq1.f32(), dk1.f32(), d_dv.f32(), d_pos.i32(), d_inv.f32(), N, c.Hq, c.Hkv, c.D);
    auto [dx1, dw1] = product_backward(dqkv1, 1, "rope + pack's bf16 copy: only x is cast");
    gpu->RopeBackward(dq2.f32(), d_pos.i32(), d_inv.f32(), N, c.Hq, c.D);
    gpu->RopeBackward(dk2.f32(), d_pos.i32(), d_inv.f32(), N, c.Hkv, c.D);
    gpu->PackQkv(dqkv2.f32(), dq2.f32(), dk2.f32(), d_dv.f32(), N, QD, KD);
    gpu->Copy(dqkv2.raw(), dqkv2.raw(), 0);  // an op in between: the product casts its dout itself
    auto [dx2, dw2] = product_backward(dqkv2, 2, "plain dqkv: dout and x are cast");
    gpu->UnregisterWeights(d_w.f32());
    ExpectNmse("rope + pack dqkv vs the ops", shape, Down(dqkv1), Down(dqkv2), 0.0);
    ExpectNmse("rope + pack dqkv vs cpu", shape, Down(dqkv1), dqkv, kF32);
    {
      Tensor s_dqkv = Poisoned(dqkv.size() + 1), s_dq = shifted(dq), s_dk = shifted(dk), s_dv = shifted(dv);
      gpu->RopePackQkv(s_dqkv.f32() + 1, s_dq.f32() + 1, s_dk.f32() + 1, s_dv.f32() + 1, d_pos.i32(), d_inv.f32(), N,
                       c.Hq, c.Hkv, c.D);
      ExpectNmse("rope + pack dqkv, a value a thread vs four", shape, past_first(s_dqkv), Down(dqkv1), 0.0);
    }
    ExpectNmse("dx from rope + pack's copy vs cast", shape, dx1, dx2, 0.0);
    ExpectNmse("dw from rope + pack's copy vs cast", shape, dw1, dw2, 0.0);
  }
}

// The gate/up backward from dh in one op (SwiGluLinearBackward: SwiGLU's backward writes only the
// bf16 dgu the two products read) against SwiGluBackward + LinearBackward: dx and dw bit for bit
// on the GPU (the same bf16 operands, the same products), within kBf16 of the CPU; with f32
// products the two ops run as they are (kF32 of the CPU). The f32 dgu buffer stays unwritten.
TEST(CudaOps, SwiGluLinearBackwardEqualsItsOps) {
  REQUIRE_GPU();
  CpuBackend cpu;
  for (auto [N, C, I] : {std::tuple{301, 96, 200}, std::tuple{33, 40, 7}}) {
    for (GemmPrecision prec : {GemmPrecision::kBF16, GemmPrecision::kF32}) {
      gpu->gemm().set_precision(prec);
      const bool bf16 = prec == GemmPrecision::kBF16;
      const std::string shape = std::string(bf16 ? "bf16 " : "f32 ") + "N=" + std::to_string(N) +
                                " C=" + std::to_string(C) + " I=" + std::to_string(I);
      auto gu = Randn(size_t(N) * 2 * I, 2.0f), dh = Randn(size_t(N) * I), x = Randn(size_t(N) * C);
      auto w = Randn(size_t(2 * I) * C, 0.05f), dw0 = Randn(w.size(), 0.01f);
      std::vector<float> dx(size_t(N) * C), dw = dw0, dgu(gu.size());
      cpu.SwiGluLinearBackward(dx.data(), dw.data(), dgu.data(), dh.data(), gu.data(), x.data(), w.data(), N, C, I);
      Tensor d_gu = Up(gu), d_dh = Up(dh), d_x = Up(x), d_w = Up(w);
      gpu->RegisterWeights(d_w.f32(), d_w.numel());
      gpu->WeightsChanged(d_w.f32());
      Tensor dx1 = Poisoned(dx.size()), dw1 = Up(dw0), dgu1 = Poisoned(gu.size());
      Tensor dx2 = Poisoned(dx.size()), dw2 = Up(dw0), dgu2 = Poisoned(gu.size());
      gpu->SwiGluLinearBackward(dx1.f32(), dw1.f32(), dgu1.f32(), d_dh.f32(), d_gu.f32(), d_x.f32(), d_w.f32(), N, C,
                                I);
      gpu->SwiGluBackward(dgu2.f32(), d_dh.f32(), d_gu.f32(), N, I);
      gpu->LinearBackward(dx2.f32(), dw2.f32(), nullptr, dgu2.f32(), d_x.f32(), d_w.f32(), N, C, 2 * I, false);
      gpu->UnregisterWeights(d_w.f32());
      ExpectNmse("swiglu + gate/up backward dx vs the ops", shape, Down(dx1), Down(dx2), 0.0);
      ExpectNmse("swiglu + gate/up backward dw vs the ops", shape, Down(dw1), Down(dw2), 0.0);
      ExpectNmse("swiglu + gate/up backward dx vs cpu", shape, Down(dx1), dx, bf16 ? kBf16 : kF32);
      ExpectNmse("swiglu + gate/up backward dw vs cpu", shape, Down(dw1), dw, bf16 ? kBf16 : kF32);
      if (bf16) {
        const auto untouched = Down(dgu1);
        EXPECT_TRUE(std::all_of(untouched.begin(), untouched.end(), [](float v) { return std::isnan(v); }))
            << "dgu's f32 buffer is scratch the bf16 path never writes (" << shape << ")";
      }
    }
  }
  gpu->gemm().set_precision(GemmPrecision::kBF16);
}

// An activation kept as bf16 (Backend::KeepAsBf16: SwiGLU's output h) is written by SwiGluForward
// in bf16 only, and the products that read h (the down product, its weight gradient) read that copy:
// no cast, the f32 buffer untouched, and outputs bit for bit those of the same SwiGLU into a plain
// buffer followed by cast products. With f32 products the f32 values are written as usual.
TEST(CudaOps, ActivationKeptAsBf16IsWhatTheProductsRead) {
  REQUIRE_GPU();
  cuda::Gemm& g = gpu->gemm();
  const int N = 301, I = 200, C = 96;
  auto gu = Randn(size_t(N) * 2 * I, 2.0f);
  Tensor d_gu = Up(gu), d_W = Up(Randn(size_t(C) * I, 0.05f)), d_dout = Up(Randn(size_t(N) * C));
  gpu->RegisterWeights(d_W.f32(), d_W.numel());
  gpu->WeightsChanged(d_W.f32());
  // Forward (down product) and weight gradient (TN over h) from h.
  auto run = [&](Tensor& h, int want_casts, const std::string& what) {
    Tensor out = Poisoned(size_t(N) * C), dx = Poisoned(size_t(N) * I), dw = Up(std::vector<float>(d_W.numel(), 0.0f));
    gpu->SwiGluForward(h.f32(), d_gu.f32(), N, I);
    gpu->Copy(dx.raw(), dx.raw(), 0);  // an op in between: no copy adopted from SwiGLU is left
    const uint64_t before = g.casts_launched();
    gpu->LinearForward(out.f32(), h.f32(), d_W.f32(), nullptr, N, I, C);
    gpu->LinearBackward(dx.f32(), dw.f32(), nullptr, d_dout.f32(), h.f32(), d_W.f32(), N, I, C, false);
    EXPECT_EQ(g.casts_launched(), before + want_casts) << what;
    return std::tuple{Down(out), Down(dx), Down(dw)};
  };
  Tensor kept = Poisoned(size_t(N) * I), plain = Poisoned(size_t(N) * I);
  gpu->KeepAsBf16(kept.f32(), kept.numel());
  // Kept: only dout is cast (once, for NN and TN); plain: h for the forward, then dout and h.
  auto [out1, dx1, dw1] = run(kept, 1, "kept h: products read its bf16 copy");
  auto [out2, dx2, dw2] = run(plain, 3, "plain h: each product casts");
  const auto untouched = Down(kept);
  EXPECT_TRUE(std::all_of(untouched.begin(), untouched.end(), [](float v) { return std::isnan(v); }))
      << "a kept activation's f32 buffer is not written with bf16 products";
  ExpectNmse("down product of kept h vs of a cast", "N=301 I=200", out1, out2, 0.0);
  ExpectNmse("dx with kept h vs plain", "N=301 I=200", dx1, dx2, 0.0);
  ExpectNmse("dw from kept h vs from a cast", "N=301 I=200", dw1, dw2, 0.0);
  // f32 products: the f32 values are there.
  gpu->gemm().set_precision(GemmPrecision::kF32);
  gpu->SwiGluForward(kept.f32(), d_gu.f32(), N, I);
  gpu->SwiGluForward(plain.f32(), d_gu.f32(), N, I);
  ExpectNmse("swiglu into a kept range with f32 products", "N=301 I=200", Down(kept), Down(plain), 0.0);
  gpu->gemm().set_precision(GemmPrecision::kBF16);
  gpu->ReleaseBf16(kept.f32());
  gpu->UnregisterWeights(d_W.f32());
}

// A kept activation whose f32 storage is only reserved (Tensor::Reserved, as the Transformer
// allocates kept tensors when the backend KeepsBf16): reserving takes no device memory, the ops that
// may touch a kept range run on it (any f32 access would fault), and their results equal those
// with real f32 storage behind the range.
TEST(CudaOps, KeptActivationNeedsNoF32Memory) {
  REQUIRE_GPU();
  if (!gpu->KeepsBf16()) GTEST_SKIP() << "AHA_KEEP_BF16=0: kept activations keep their f32 storage";
  {
    const size_t before = gpu->MemoryInUse();
    Tensor big = Tensor::Reserved(DType::kF32, {int64_t{1} << 30}, gpu->device());  // 4 GiB of addresses
    Tensor other = Tensor::Reserved(DType::kF32, {1000}, gpu->device());
    EXPECT_TRUE(big.reserved());
    EXPECT_NE(big.raw(), nullptr);
    EXPECT_NE(big.raw(), other.raw());
    EXPECT_LT(gpu->MemoryInUse(), before + (size_t{64} << 20)) << "reserving addresses took device memory";
  }
  const int N = 301, I = 200, C = 96;
  Tensor d_gu = Up(Randn(size_t(N) * 2 * I, 2.0f)), d_W = Up(Randn(size_t(C) * I, 0.05f));
  Tensor d_dout = Up(Randn(size_t(N) * C));
  gpu->RegisterWeights(d_W.f32(), d_W.numel());
  gpu->WeightsChanged(d_W.f32());
  auto run = [&](Tensor& h) {
    Tensor out = Poisoned(size_t(N) * C), dx = Poisoned(size_t(N) * I), dw = Up(std::vector<float>(d_W.numel(), 0.0f));
    gpu->KeepAsBf16(h.f32(), h.numel());
    gpu->SwiGluForward(h.f32(), d_gu.f32(), N, I);
    gpu->LinearForward(out.f32(), h.f32(), d_W.f32(), nullptr, N, I, C);
    gpu->LinearBackward(dx.f32(), dw.f32(), nullptr, d_dout.f32(), h.f32(), d_W.f32(), N, I, C, false);
    gpu->Synchronize();
    gpu->ReleaseBf16(h.f32());
    return std::tuple{Down(out), Down(dx), Down(dw)};
  };
  Tensor reserved = Tensor::Reserved(DType::kF32, {int64_t{N} * I}, gpu->device());
  Tensor real = Poisoned(size_t(N) * I);
  auto [out1, dx1, dw1] = run(reserved);
  auto [out2, dx2, dw2] = run(real);
  ExpectNmse("down product, h reserved vs allocated", "N=301 I=200", out1, out2, 0.0);
  ExpectNmse("dx, h reserved vs allocated", "N=301 I=200", dx1, dx2, 0.0);
  ExpectNmse("dw, h reserved vs allocated", "N=301 I=200", dw1, dw2, 0.0);
  gpu->UnregisterWeights(d_W.f32());
}

// The MLP with its tensors kept in bf16 (Backend::KeepAsBf16, as the Transformer keeps them): the
// norm's output ln2, gu (written by the gate/up product's epilogue), h, and dh (written by the down
// backward's epilogue). Each kept tensor's bf16 copy must hold the plain path's f32 values rounded to
// nearest even, the f32 buffers stay unwritten, and what follows from gu and dh must equal the plain
// ops run on those rounded values. Against the CPU the whole MLP stays within the bf16 limit.
std::vector<float> Rounded(std::vector<float> v) {
  for (float& x : v) x = BF16ToF32(F32ToBF16(x));
  return v;
}
std::vector<float> KeptValues(CudaBackend* gpu, const Tensor& t) {
  std::vector<uint16_t> b(t.numel());
  gpu->Download(b.data(), gpu->gemm().Bf16Copy(t.f32()), b.size() * sizeof(uint16_t));
  std::vector<float> f(b.size());
  BF16ToF32(b.data(), f.data(), b.size());
  return f;
}

// The packed q/k/v gradient kept in bf16 only (the Transformer's dqkv, only reserved): RopePackQkv
// writes its copy alone, the f32 result rounded bit for bit, and the q/k/v product's backward reads
// it: dx and dw equal those from an f32 dqkv (whose products read a cast of it, the same values),
// and the bias gradient is the column sums of the bf16 values. Fused and unfused (AHA_FUSED_QKV=0).
TEST(CudaOps, QkvGradientKeptAsBf16) {
  REQUIRE_GPU();
  if (!gpu->KeepsBf16()) GTEST_SKIP() << "AHA_KEEP_BF16=0: nothing is kept in bf16";
  const int N = 301, Hq = 14, Hkv = 2, D = 64, C = 96, W = (Hq + 2 * Hkv) * D;
  const std::string shape = "N=301 H=14/2 D=64";
  const auto dq = Randn(size_t(N) * Hq * D), dk = Randn(size_t(N) * Hkv * D);
  Tensor d_pos = Up(RandInt(N, 0, 4000)), d_inv = Up(RopeInvFreq(D)), d_dv = Up(Randn(size_t(N) * Hkv * D));
  Tensor d_x = Up(Randn(size_t(N) * C)), d_w = Up(Randn(size_t(W) * C, 0.05f));
  gpu->RegisterWeights(d_w.f32(), d_w.numel());
  gpu->WeightsChanged(d_w.f32());
  auto run = [&](Tensor& dqkv, bool keep) {
    Tensor dq1 = Up(dq), dk1 = Up(dk), dx = Poisoned(size_t(N) * C);
    Tensor dw = Up(std::vector<float>(d_w.numel(), 0.0f)), db = Up(std::vector<float>(W, 0.0f));
    if (keep) gpu->KeepAsBf16(dqkv.f32(), dqkv.numel());
    gpu->RopePackQkv(dqkv.f32(), dq1.f32(), dk1.f32(), d_dv.f32(), d_pos.i32(), d_inv.f32(), N, Hq, Hkv, D);
    const std::vector<float> packed = keep ? KeptValues(gpu, dqkv) : Down(dqkv);
    gpu->LinearBackward(dx.f32(), dw.f32(), db.f32(), dqkv.f32(), d_x.f32(), d_w.f32(), N, C, W, false);
    gpu->Synchronize();
    if (keep) gpu->ReleaseBf16(dqkv.f32());
    return std::tuple{packed, Down(dx), Down(dw), Down(db)};
  };
  Tensor kept = Tensor::Reserved(DType::kF32, {int64_t{N} * W}, gpu->device()), plain = Poisoned(size_t(N) * W);
  auto [p1, dx1, dw1, db1] = run(kept, true);
  auto [p2, dx2, dw2, db2] = run(plain, false);
  gpu->UnregisterWeights(d_w.f32());
  ExpectNmse("kept dqkv vs f32 dqkv rounded", shape, p1, Rounded(p2), 0.0);
  ExpectNmse("dx, kept dqkv vs f32", shape, dx1, dx2, 0.0);
  ExpectNmse("dw, kept dqkv vs f32", shape, dw1, dw2, 0.0);
  std::vector<double> sums(W, 0.0);
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < W; ++j) sums[j] += p1[size_t(n) * W + j];
  ExpectNmse("db, kept dqkv vs its bf16 values summed", shape, db1, std::vector<float>(sums.begin(), sums.end()),
             1e-12);
  ExpectNmse("db, kept dqkv vs f32", shape, db1, db2, 1e-5);
}


// Qwen3's q/k/v step with its per-head norms (QkvNormRopeAttention: one q/k/v kernel, then the
// attention) against its ops on the GPU (SplitQkv, RmsNormForward twice, RopeForward twice,
// AttentionForward): q_pre, k_pre, the rstds, q, k, v, out and lse bit for bit, and within kF32 of
// the CPU; the kernel's one-value form gives the four-value form's bits; a q kept in bf16 (as the
// Transformer keeps it) holds the ops' q rounded and gives the same out. The backward
// (NormRopePackQkv: one kernel) against its ops (RopeBackward, RmsNormBackward, PackQkv): dqkv and
// the norms' weight gradients within kF32 of the ops and of the CPU (its dx sums each head in
// another order, its dw comes from other atomics); a kept dqkv is the f32 one rounded. Head counts
// with Hq + Hkv odd at D = 64 leave half a warp idle in the backward's last slot.
TEST(CudaOps, QkvNormRopeAttentionAndItsBackwardEqualTheirOps) {
  REQUIRE_GPU();
  CpuBackend cpu;
  const float eps = 1e-6f;
  struct Case {
    int N, Hq, Hkv, D;
    bool bias;
  };
  for (const Case& c : {Case{301, 16, 8, 128, false}, Case{301, 14, 2, 64, true}, Case{33, 4, 4, 128, true},
                        Case{7, 6, 3, 64, false}}) {
    const int N = c.N, D = c.D, Hq = c.Hq, Hkv = c.Hkv, QD = Hq * D, KD = Hkv * D, W = QD + 2 * KD;
    const std::string shape = "N=" + std::to_string(N) + " H=" + std::to_string(Hq) + "/" + std::to_string(Hkv) +
                              " D=" + std::to_string(D) + (c.bias ? " bias" : "");
    const size_t nq = size_t(N) * QD, nk = size_t(N) * KD;
    const auto qkv = Randn(size_t(N) * W, 2.0f), bias = Randn(W);
    auto qw = Randn(D, 0.2f), kw = Randn(D, 0.2f);
    for (float& x : qw) x += 1.0f;
    for (float& x : kw) x += 1.0f;
    const auto pos = RandInt(N, 0, 4000);
    const std::vector<float> inv_freq = RopeInvFreq(D);
    const std::vector<int32_t> cu{0, N / 3, N / 3 + 1, N};
    const int S = 3;
    const float* b_cpu = c.bias ? bias.data() : nullptr;
    std::vector<float> q_pre(nq), k_pre(nk), q(nq), k(nk), v(nk), qr(size_t(N) * Hq), kr(size_t(N) * Hkv), out(nq),
        lse(size_t(N) * Hq);
    cpu.QkvNormRopeAttention(out.data(), lse.data(), q_pre.data(), k_pre.data(), q.data(), k.data(), v.data(),
                             qr.data(), kr.data(), qkv.data(), b_cpu, qw.data(), kw.data(), eps, pos.data(),
                             inv_freq.data(), cu.data(), S, N, Hq, Hkv, D);
    Tensor d_qkv = Up(qkv), d_bias = Up(bias), d_qw = Up(qw), d_kw = Up(kw), d_pos = Up(pos), d_inv = Up(inv_freq),
           d_cu = Up(cu);
    const float* b = c.bias ? d_bias.f32() : nullptr;
    struct Fwd {
      Tensor q_pre, k_pre, q, k, v, qr, kr, out, lse;
    };
    auto make = [&] {
      return Fwd{Poisoned(nq), Poisoned(nk), Poisoned(nq), Poisoned(nk), Poisoned(nk), Poisoned(size_t(N) * Hq),
                 Poisoned(size_t(N) * Hkv), Poisoned(nq), Poisoned(size_t(N) * Hq)};
    };
    Fwd ops = make(), op = make();
    gpu->SplitQkv(ops.q_pre.f32(), ops.k_pre.f32(), ops.v.f32(), d_qkv.f32(), b, N, QD, KD);
    gpu->RmsNormForward(ops.q.f32(), ops.qr.f32(), ops.q_pre.f32(), d_qw.f32(), N * Hq, D, eps);
    gpu->RmsNormForward(ops.k.f32(), ops.kr.f32(), ops.k_pre.f32(), d_kw.f32(), N * Hkv, D, eps);
    gpu->RopeForward(ops.q.f32(), d_pos.i32(), d_inv.f32(), N, Hq, D);
    gpu->RopeForward(ops.k.f32(), d_pos.i32(), d_inv.f32(), N, Hkv, D);
    gpu->AttentionForward(ops.out.f32(), ops.lse.f32(), ops.q.f32(), ops.k.f32(), ops.v.f32(), d_cu.i32(), S, N, Hq,
                          Hkv, D);
    gpu->QkvNormRopeAttention(op.out.f32(), op.lse.f32(), op.q_pre.f32(), op.k_pre.f32(), op.q.f32(), op.k.f32(),
                              op.v.f32(), op.qr.f32(), op.kr.f32(), d_qkv.f32(), b, d_qw.f32(), d_kw.f32(), eps,
                              d_pos.i32(), d_inv.f32(), d_cu.i32(), S, N, Hq, Hkv, D);
    const std::vector<std::tuple<const char*, const Tensor*, const Tensor*, const std::vector<float>*>> fwd = {
        {"q_pre", &op.q_pre, &ops.q_pre, &q_pre}, {"k_pre", &op.k_pre, &ops.k_pre, &k_pre},
        {"q rstd", &op.qr, &ops.qr, &qr},         {"k rstd", &op.kr, &ops.kr, &kr},
        {"q", &op.q, &ops.q, &q},                 {"k", &op.k, &ops.k, &k},
        {"v", &op.v, &ops.v, &v}};
    for (const auto& [what, a, o, cpu_v] : fwd) {
      ExpectNmse(std::string("qkv norm + rope ") + what + " vs the ops", shape, Down(*a), Down(*o), 0.0);
      ExpectNmse(std::string("qkv norm + rope ") + what + " vs cpu", shape, Down(*a), *cpu_v, kF32);
    }
    ExpectNmse("qkv norm + rope + attention out vs the ops", shape, Down(op.out), Down(ops.out), 0.0);
    ExpectNmse("qkv norm + rope + attention lse vs the ops", shape, Down(op.lse), Down(ops.lse), 0.0);
    // The kernel's one-value form (rows one float past a 16-byte boundary).
    {
      auto shifted = [](std::vector<float> x) {
        x.insert(x.begin(), 0.0f);
        return Up(x);
      };
      Tensor s_qkv = shifted(qkv), s_q = Poisoned(nq + 1), s_k = Poisoned(nk + 1), s_v = Poisoned(nk + 1);
      Tensor s_qp = Poisoned(nq + 1), s_kp = Poisoned(nk + 1), s_qr = Poisoned(size_t(N) * Hq),
             s_kr = Poisoned(size_t(N) * Hkv);
      const cuda::QkvNorm norm{s_qp.f32() + 1, s_kp.f32() + 1, s_qr.f32(), s_kr.f32(), d_qw.f32(), d_kw.f32(), eps};
      cuda::QkvRope(s_q.f32() + 1, s_k.f32() + 1, s_v.f32() + 1, s_qkv.f32() + 1, b, d_pos.i32(), d_inv.f32(), N, Hq,
                    Hkv, D, gpu->stream(), nullptr, nullptr, nullptr, nullptr, &norm);
      auto past_first = [](const Tensor& t) {
        auto x = Down(t);
        x.erase(x.begin());
        return x;
      };
      ExpectNmse("qkv norm + rope q, a value a thread vs four", shape, past_first(s_q), Down(op.q), 0.0);
      ExpectNmse("qkv norm + rope k, a value a thread vs four", shape, past_first(s_k), Down(op.k), 0.0);
      ExpectNmse("qkv norm + rope q_pre, a value a thread vs four", shape, past_first(s_qp), Down(op.q_pre), 0.0);
      ExpectNmse("qkv norm + rope k rstd, a value a thread vs four", shape, Down(s_kr), Down(op.kr), 0.0);
    }
    if (gpu->KeepsBf16()) {
      Fwd kept = make();
      Tensor kq = Tensor::Reserved(DType::kF32, {int64_t(nq)}, gpu->device());
      gpu->KeepAsBf16(kq.f32(), nq);
      gpu->QkvNormRopeAttention(kept.out.f32(), kept.lse.f32(), kept.q_pre.f32(), kept.k_pre.f32(), kq.f32(),
                                kept.k.f32(), kept.v.f32(), kept.qr.f32(), kept.kr.f32(), d_qkv.f32(), b, d_qw.f32(),
                                d_kw.f32(), eps, d_pos.i32(), d_inv.f32(), d_cu.i32(), S, N, Hq, Hkv, D);
      ExpectNmse("kept q vs the ops' q rounded", shape, KeptValues(gpu, kq), Rounded(Down(ops.q)), 0.0);
      ExpectNmse("out with q kept vs not", shape, Down(kept.out), Down(op.out), 0.0);
      // A forward alone (the reference model's): the same out and lse; where the fused kernel takes
      // the call, nothing of what only a backward reads is written (q's copy, q_pre, k_pre, the
      // rstds, k, v: still NaN).
      Fwd lean = make();
      const std::vector<float> copy_before = KeptValues(gpu, kq);
      gpu->QkvNormRopeAttention(lean.out.f32(), lean.lse.f32(), lean.q_pre.f32(), lean.k_pre.f32(), kq.f32(),
                                lean.k.f32(), lean.v.f32(), lean.qr.f32(), lean.kr.f32(), d_qkv.f32(), b, d_qw.f32(),
                                d_kw.f32(), eps, d_pos.i32(), d_inv.f32(), d_cu.i32(), S, N, Hq, Hkv, D,
                                /*forward_only=*/true);
      ExpectNmse("forward-only out vs the full forward", shape, Down(lean.out), Down(op.out), 0.0);
      ExpectNmse("forward-only lse vs the full forward", shape, Down(lean.lse), Down(op.lse), 0.0);
      if (FusedQkvAttentionRuns(gpu->UseTcAttention(), D)) {
        for (const Tensor* t : {&lean.q_pre, &lean.k_pre, &lean.qr, &lean.kr, &lean.k, &lean.v})
          EXPECT_TRUE(AllNan(Down(*t))) << "a forward alone wrote a tensor only a backward reads (" << shape << ")";
        const auto copy_after = KeptValues(gpu, kq);
        EXPECT_EQ(std::memcmp(copy_after.data(), copy_before.data(), copy_after.size() * sizeof(float)), 0)
            << "a forward alone rewrote q's kept copy (" << shape << ")";
      }
      gpu->ReleaseBf16(kq.f32());
    }

    // The backward from the fused forward's saved tensors (equal to the ops' above).
    const auto dq = Randn(nq), dk = Randn(nk), dv = Randn(nk), dqw0 = Randn(D), dkw0 = Randn(D);
    std::vector<float> dqkv(size_t(N) * W), dqw = dqw0, dkw = dkw0;
    {
      auto dq_c = dq, dk_c = dk;
      std::vector<float> sq(nq), sk(nk);
      cpu.NormRopePackQkv(dqkv.data(), dqw.data(), dkw.data(), sq.data(), sk.data(), dq_c.data(), dk_c.data(),
                          dv.data(), q_pre.data(), k_pre.data(), qw.data(), kw.data(), qr.data(), kr.data(), pos.data(),
                          inv_freq.data(), N, Hq, Hkv, D);
    }
    Tensor d_dv = Up(dv);
    Tensor dq2 = Up(dq), dk2 = Up(dk), dqp2 = Poisoned(nq), dkp2 = Poisoned(nk), dqkv2 = Poisoned(dqkv.size()),
           dqw2 = Up(dqw0), dkw2 = Up(dkw0);
    gpu->RopeBackward(dq2.f32(), d_pos.i32(), d_inv.f32(), N, Hq, D);
    gpu->RopeBackward(dk2.f32(), d_pos.i32(), d_inv.f32(), N, Hkv, D);
    gpu->Zero(dqp2.raw(), nq * sizeof(float));
    gpu->Zero(dkp2.raw(), nk * sizeof(float));
    gpu->RmsNormBackward(dqp2.f32(), dqw2.f32(), dq2.f32(), op.q_pre.f32(), d_qw.f32(), op.qr.f32(), N * Hq, D);
    gpu->RmsNormBackward(dkp2.f32(), dkw2.f32(), dk2.f32(), op.k_pre.f32(), d_kw.f32(), op.kr.f32(), N * Hkv, D);
    gpu->PackQkv(dqkv2.f32(), dqp2.f32(), dkp2.f32(), d_dv.f32(), N, QD, KD);
    auto backward = [&](Tensor& dqkv_t, Tensor& dqw_t, Tensor& dkw_t) {
      Tensor dq1 = Up(dq), dk1 = Up(dk), dqp1 = Poisoned(nq), dkp1 = Poisoned(nk);
      gpu->NormRopePackQkv(dqkv_t.f32(), dqw_t.f32(), dkw_t.f32(), dqp1.f32(), dkp1.f32(), dq1.f32(), dk1.f32(),
                           d_dv.f32(), op.q_pre.f32(), op.k_pre.f32(), d_qw.f32(), d_kw.f32(), op.qr.f32(),
                           op.kr.f32(), d_pos.i32(), d_inv.f32(), N, Hq, Hkv, D);
    };
    Tensor dqkv1 = Poisoned(dqkv.size()), dqw1 = Up(dqw0), dkw1 = Up(dkw0);
    backward(dqkv1, dqw1, dkw1);
    ExpectNmse("norm + rope backward + pack dqkv vs the ops", shape, Down(dqkv1), Down(dqkv2), kF32);
    ExpectNmse("norm + rope backward q_norm grad vs the ops", shape, Down(dqw1), Down(dqw2), kF32);
    ExpectNmse("norm + rope backward k_norm grad vs the ops", shape, Down(dkw1), Down(dkw2), kF32);
    ExpectNmse("norm + rope backward + pack dqkv vs cpu", shape, Down(dqkv1), dqkv, kF32);
    ExpectNmse("norm + rope backward q_norm grad vs cpu", shape, Down(dqw1), dqw, kF32);
    ExpectNmse("norm + rope backward k_norm grad vs cpu", shape, Down(dkw1), dkw, kF32);
    if (gpu->KeepsBf16()) {
      Tensor kept = Tensor::Reserved(DType::kF32, {int64_t(dqkv.size())}, gpu->device()), dqw3 = Up(dqw0),
             dkw3 = Up(dkw0);
      gpu->KeepAsBf16(kept.f32(), dqkv.size());
      backward(kept, dqw3, dkw3);
      ExpectNmse("kept dqkv vs f32 dqkv rounded", shape, KeptValues(gpu, kept), Rounded(Down(dqkv1)), 0.0);
      gpu->ReleaseBf16(kept.f32());
    }
  }
}

TEST(CudaOps, MlpTensorsKeptAsBf16AreTheirRoundedValues) {
  REQUIRE_GPU();
  CpuBackend cpu;
  const float eps = 1e-6f;
  for (auto [N, C, I] : {std::tuple{301, 96, 200}, std::tuple{33, 40, 7}}) {
    const std::string shape = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " I=" + std::to_string(I);
    const size_t nc = size_t(N) * C, ni = size_t(N) * I;
    auto x = Randn(nc), y = Randn(nc), nw = Randn(C, 0.5f), wgu = Randn(2 * I * size_t(C), 0.1f),
         wd = Randn(size_t(C) * I, 0.1f), dout = Randn(nc);
    Tensor d_wgu = Up(wgu), d_wd = Up(wd), d_y = Up(y), d_nw = Up(nw), d_dout = Up(dout);
    for (const Tensor* w : {&d_wgu, &d_wd}) {
      gpu->RegisterWeights(w->f32(), w->numel());
      gpu->WeightsChanged(w->f32());
    }
    struct Mlp {
      Tensor x, ln, rstd, gu, h, out, dh, dln, dgu, dwgu, dwd;
    };
    auto make = [&] {
      return Mlp{Up(x),         Poisoned(nc),     Poisoned(N),
                 Poisoned(2 * ni), Poisoned(ni),  Poisoned(nc),
                 Poisoned(ni),  Poisoned(nc),     Poisoned(2 * ni),
                 Up(std::vector<float>(wgu.size(), 0.0f)), Up(std::vector<float>(wd.size(), 0.0f))};
    };
    // The kept path, exactly as Transformer::LayerForward / LayerBackward run the MLP.
    Mlp k = make();
    for (const Tensor* t : {&k.ln, &k.gu, &k.h, &k.dh}) gpu->KeepAsBf16(t->f32(), t->numel());
    gpu->AddRmsNormForward(k.x.f32(), k.ln.f32(), k.rstd.f32(), d_y.f32(), d_nw.f32(), N, C, eps);
    gpu->LinearForward(k.gu.f32(), k.ln.f32(), d_wgu.f32(), nullptr, N, C, 2 * I);
    gpu->SwiGluForward(k.h.f32(), k.gu.f32(), N, I);
    gpu->LinearForward(k.out.f32(), k.h.f32(), d_wd.f32(), nullptr, N, I, C);
    gpu->LinearBackward(k.dh.f32(), k.dwd.f32(), nullptr, d_dout.f32(), k.h.f32(), d_wd.f32(), N, I, C, false);
    gpu->SwiGluLinearBackward(k.dln.f32(), k.dwgu.f32(), k.dgu.f32(), k.dh.f32(), k.gu.f32(), k.ln.f32(),
                              d_wgu.f32(), N, C, I);
    for (const Tensor* t : {&k.ln, &k.gu, &k.h, &k.dh})
      EXPECT_TRUE(AllNan(Down(*t))) << "a kept tensor's f32 buffer is never written (" << shape << ")";
    // The plain path, rounding gu and dh where the kept path stores them.
    Mlp p = make();
    gpu->AddRmsNormForward(p.x.f32(), p.ln.f32(), p.rstd.f32(), d_y.f32(), d_nw.f32(), N, C, eps);
    gpu->LinearForward(p.gu.f32(), p.ln.f32(), d_wgu.f32(), nullptr, N, C, 2 * I);
    const auto gu_plain = Down(p.gu);
    p.gu = Up(Rounded(gu_plain));
    gpu->SwiGluForward(p.h.f32(), p.gu.f32(), N, I);
    gpu->LinearForward(p.out.f32(), p.h.f32(), d_wd.f32(), nullptr, N, I, C);
    gpu->LinearBackward(p.dh.f32(), p.dwd.f32(), nullptr, d_dout.f32(), p.h.f32(), d_wd.f32(), N, I, C, false);
    const auto dh_plain = Down(p.dh);
    p.dh = Up(Rounded(dh_plain));
    gpu->SwiGluLinearBackward(p.dln.f32(), p.dwgu.f32(), p.dgu.f32(), p.dh.f32(), p.gu.f32(), p.ln.f32(),
                              d_wgu.f32(), N, C, I);
    ExpectNmse("kept ln = rounded ln", shape, KeptValues(gpu, k.ln), Rounded(Down(p.ln)), 0.0);
    // The epilogue rounds the same f32 sums unless cuBLASLt picked another algorithm for the bf16
    // output: then an element may round the other way (one bf16 step, ~4e-3 relative).
    ExpectNmse("kept gu = rounded gu", shape, KeptValues(gpu, k.gu), Rounded(gu_plain), 1e-6);
    ExpectNmse("kept h = rounded h", shape, KeptValues(gpu, k.h), Rounded(Down(p.h)), 1e-6);
    ExpectNmse("kept dh = rounded dh", shape, KeptValues(gpu, k.dh), Rounded(dh_plain), 1e-6);
    ExpectNmse("out from kept tensors", shape, Down(k.out), Down(p.out), 1e-6);
    ExpectNmse("dln from kept tensors", shape, Down(k.dln), Down(p.dln), 1e-6);
    ExpectNmse("dw gate/up from kept tensors", shape, Down(k.dwgu), Down(p.dwgu), 1e-6);
    ExpectNmse("dw down from kept tensors", shape, Down(k.dwd), Down(p.dwd), 1e-6);
    // Against the CPU's f32 MLP.
    std::vector<float> cx = x, cln(nc), crstd(N), cgu(2 * ni), ch(ni), cout(nc), cdh(ni), cdln(nc), cdgu(2 * ni),
                       cdwgu(wgu.size(), 0.0f), cdwd(wd.size(), 0.0f);
    cpu.AddRmsNormForward(cx.data(), cln.data(), crstd.data(), y.data(), nw.data(), N, C, eps);
    cpu.LinearForward(cgu.data(), cln.data(), wgu.data(), nullptr, N, C, 2 * I);
    cpu.SwiGluForward(ch.data(), cgu.data(), N, I);
    cpu.LinearForward(cout.data(), ch.data(), wd.data(), nullptr, N, I, C);
    cpu.LinearBackward(cdh.data(), cdwd.data(), nullptr, dout.data(), ch.data(), wd.data(), N, I, C, false);
    cpu.SwiGluLinearBackward(cdln.data(), cdwgu.data(), cdgu.data(), cdh.data(), cgu.data(), cln.data(), wgu.data(),
                             N, C, I);
    ExpectNmse("kept MLP out vs cpu", shape, Down(k.out), cout, kBf16);
    ExpectNmse("kept MLP dln vs cpu", shape, Down(k.dln), cdln, kBf16);
    ExpectNmse("kept MLP dw gate/up vs cpu", shape, Down(k.dwgu), cdwgu, kBf16);
    ExpectNmse("kept MLP dw down vs cpu", shape, Down(k.dwd), cdwd, kBf16);
    // f32 products ignore the keeping: the f32 values are written and read.
    gpu->gemm().set_precision(GemmPrecision::kF32);
    Tensor x32 = Up(x);
    gpu->AddRmsNormForward(x32.f32(), k.ln.f32(), k.rstd.f32(), d_y.f32(), d_nw.f32(), N, C, eps);
    gpu->LinearForward(k.gu.f32(), k.ln.f32(), d_wgu.f32(), nullptr, N, C, 2 * I);
    ExpectNmse("kept range with f32 products: gu vs cpu", shape, Down(k.gu), cgu, kF32);
    gpu->gemm().set_precision(GemmPrecision::kBF16);
    for (const Tensor* t : {&k.ln, &k.gu, &k.h, &k.dh}) gpu->ReleaseBf16(t->f32());
    for (const Tensor* w : {&d_wgu, &d_wd}) gpu->UnregisterWeights(w->f32());
  }
}

// The decode step's gate/up product with SwiGLU in its epilogue (CudaBackend::GateUpSwiGlu, one
// wgmma kernel): h equals the unfused kept path's (LinearForward into a kept gu, SwiGluForward into
// a kept h) up to the f32 summation order, which may flip a gu rounding, and the CPU's f32 MLP to
// the bf16 limit; shapes with partial row and column tiles, and the decode step's own.
// The tile rule (mlp.cu, MlpTileFor) on an H200's 132 multiprocessors: one wave, then the least
// work a block, then the fewest bytes.
TEST(CudaOps, GateUpSwiGluTileRule) {
  auto is = [](cuda::MlpTile t, int rows, int cols) { return t.rows == rows && t.cols == cols; };
  EXPECT_TRUE(is(cuda::MlpTileFor(256, 4864, 132), 128, 80)) << "Qwen2.5-0.5B's decode step: 122 blocks";
  EXPECT_TRUE(is(cuda::MlpTileFor(128, 4864, 132), 128, 40)) << "half its rows: 122 blocks, half the work";
  EXPECT_TRUE(is(cuda::MlpTileFor(256, 8960, 132), 256, 72)) << "Qwen2.5-1.5B: 125 blocks, not 224";
  EXPECT_TRUE(is(cuda::MlpTileFor(256, 3072, 132), 128, 48)) << "Qwen3-0.6B: 128 blocks, not 78";
  EXPECT_TRUE(is(cuda::MlpTileFor(1024, 4864, 132), 256, 80)) << "four waves of 256 x 80 (L2 bytes decide)";
  for (auto [M, I] : {std::pair{1, 8}, std::pair{7, 200}, std::pair{1024, 168}, std::pair{512, 18944}}) {
    const cuda::MlpTile t = cuda::MlpTileFor(M, I, 132);
    const auto tiles = cuda::GateUpSwiGluTiles();
    EXPECT_TRUE(std::any_of(tiles.begin(), tiles.end(), [&](cuda::MlpTile u) { return is(u, t.rows, t.cols); }))
        << M << " x " << I << ": " << t.rows << " x " << t.cols << " is not a built tile";
  }
}

TEST(CudaOps, GateUpSwiGluEqualsItsOps) {
  REQUIRE_GPU();
  if (!gpu->FusesMlp(256, 896, 4864)) GTEST_SKIP() << "no fused MLP kernel on this device or build";
  CpuBackend cpu;
  const float eps = 1e-6f;
  // The decode step's shape, partial row and column tiles, and the widths whose rule picks other
  // tiles (8960: 256 x 72; 3072: 128 x 48; 128 rows of 4864: 128 x 40).
  for (auto [N, C, I] : {std::tuple{256, 896, 4864}, std::tuple{7, 128, 200}, std::tuple{300, 192, 88},
                         std::tuple{1024, 64, 168}, std::tuple{256, 128, 8960}, std::tuple{256, 128, 3072},
                         std::tuple{128, 128, 4864}}) {
    const std::string shape = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " I=" + std::to_string(I);
    ASSERT_TRUE(gpu->FusesMlp(N, C, I)) << shape;
    const size_t nc = size_t(N) * C, ni = size_t(N) * I;
    auto x = Randn(nc), nw = Randn(C, 0.5f), wgu = Randn(size_t(2) * I * C, 0.1f);
    Tensor d_x = Up(x), d_nw = Up(nw), d_w = Up(wgu);
    gpu->RegisterWeights(d_w.f32(), d_w.numel());
    gpu->WeightsChanged(d_w.f32());
    Tensor ln = Poisoned(nc), rstd = Poisoned(N), gu = Poisoned(2 * ni), h = Poisoned(ni), gu2 = Poisoned(2 * ni),
           h2 = Poisoned(ni);
    for (const Tensor* t : {&ln, &gu, &h, &gu2, &h2}) gpu->KeepAsBf16(t->f32(), t->numel());
    gpu->RmsNormForward(ln.f32(), rstd.f32(), d_x.f32(), d_nw.f32(), N, C, eps);
    gpu->GateUpSwiGlu(h.f32(), gu.f32(), ln.f32(), d_w.f32(), N, C, I);
    const std::vector<float> fused = KeptValues(gpu, h);
    gpu->LinearForward(gu2.f32(), ln.f32(), d_w.f32(), nullptr, N, C, 2 * I);
    gpu->SwiGluForward(h2.f32(), gu2.f32(), N, I);
    ExpectNmse("fused gate/up + swiglu vs its ops", shape, fused, KeptValues(gpu, h2), 1e-5);
    EXPECT_TRUE(AllNan(Down(h))) << "h is kept: its f32 buffer is never written (" << shape << ")";
    std::vector<float> cln(nc), crstd(N), cgu(2 * ni), ch(ni);
    cpu.RmsNormForward(cln.data(), crstd.data(), x.data(), nw.data(), N, C, eps);
    cpu.LinearForward(cgu.data(), cln.data(), wgu.data(), nullptr, N, C, 2 * I);
    cpu.SwiGluForward(ch.data(), cgu.data(), N, I);
    ExpectNmse("fused gate/up + swiglu vs cpu", shape, fused, ch, kBf16);
    // Every tile the kernel is built for gives the rule's h bit for bit: an element sums its K steps
    // in the same order whatever the block's shape, and a partial tile's rows and columns past M,
    // I and 2I are the copy engine's zeros, never stored (h16 starts as bf16 NaNs).
    {
      const uint16_t* x16 = gpu->gemm().Bf16Copy(ln.f32());
      const uint16_t* w16 = gpu->gemm().Bf16CopyOf(d_w.f32(), size_t(2) * I * C);
      std::vector<uint16_t> want(ni), got(ni);
      gpu->Download(want.data(), gpu->gemm().Bf16Copy(h.f32()), ni * sizeof(uint16_t));
      uint16_t* h16 = nullptr;
      ASSERT_EQ(cudaMalloc(&h16, ni * sizeof(uint16_t)), cudaSuccess);
      for (const cuda::MlpTile& t : cuda::GateUpSwiGluTiles()) {
        ASSERT_EQ(cudaMemsetAsync(h16, 0xff, ni * sizeof(uint16_t), gpu->stream()), cudaSuccess);
        cuda::GateUpSwiGlu(h16, x16, w16, N, C, I, gpu->stream(), t);
        gpu->Download(got.data(), h16, ni * sizeof(uint16_t));
        size_t differ = 0;
        for (size_t i = 0; i < ni; ++i) differ += got[i] != want[i];
        EXPECT_EQ(differ, 0u) << shape << ": tile " << t.rows << " x " << t.cols << " differs from the rule's";
      }
      ASSERT_EQ(cudaFree(h16), cudaSuccess);
    }
    // As a decode graph holds it: the kernel launched dependent on the norm (a programmatic edge,
    // unless AHA_MLP_EARLY=0), copying weights before the norm is done; replayed on fresh x.
    if (N == 256) {
      gpu->gemm().ForgetCasts();
      ASSERT_EQ(cudaStreamBeginCapture(gpu->stream(), cudaStreamCaptureModeThreadLocal), cudaSuccess);
      gpu->RmsNormForward(ln.f32(), rstd.f32(), d_x.f32(), d_nw.f32(), N, C, eps);
      gpu->GateUpSwiGlu(h.f32(), gu.f32(), ln.f32(), d_w.f32(), N, C, I);
      cudaGraph_t graph = nullptr;
      ASSERT_EQ(cudaStreamEndCapture(gpu->stream(), &graph), cudaSuccess);
      size_t edges = 0;
      ASSERT_EQ(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &edges), cudaSuccess);
      std::vector<cudaGraphNode_t> from(edges), to(edges);
      std::vector<cudaGraphEdgeData> data(edges);
      ASSERT_EQ(cudaGraphGetEdges(graph, from.data(), to.data(), data.data(), &edges), cudaSuccess);
      int programmatic = 0;
      for (const cudaGraphEdgeData& e : data) programmatic += e.type == cudaGraphDependencyTypeProgrammatic;
      const char* early = std::getenv("AHA_MLP_EARLY");
      EXPECT_EQ(programmatic, early && early[0] == '0' ? 0 : 1) << "edges " << edges;
      cudaGraphExec_t exec = nullptr;
      ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
      cudaGraphDestroy(graph);
      const auto x2 = Randn(nc);
      gpu->Upload(d_x.f32(), x2.data(), nc * sizeof(float));
      gpu->RmsNormForward(ln.f32(), rstd.f32(), d_x.f32(), d_nw.f32(), N, C, eps);
      gpu->GateUpSwiGlu(h.f32(), gu.f32(), ln.f32(), d_w.f32(), N, C, I);
      const std::vector<float> direct = KeptValues(gpu, h);
      gpu->gemm().ForgetCasts();
      // h's kept copy poisoned (0xffff is a bf16 NaN), so the replay must write all of it.
      ASSERT_EQ(cudaMemsetAsync(gpu->gemm().Bf16Copy(h.f32()), 0xff, ni * sizeof(uint16_t), gpu->stream()),
                cudaSuccess);
      ASSERT_EQ(cudaGraphLaunch(exec, gpu->stream()), cudaSuccess);
      gpu->Synchronize();
      ExpectNmse("fused gate/up + swiglu, graph vs direct", shape, KeptValues(gpu, h), direct, 0.0);
      cudaGraphExecDestroy(exec);
      gpu->Upload(d_x.f32(), x.data(), nc * sizeof(float));  // ln as before, for the checks below
      gpu->RmsNormForward(ln.f32(), rstd.f32(), d_x.f32(), d_nw.f32(), N, C, eps);
    }
    // Off (AHA_FUSED_MLP=0): the two ops, which write gu's kept copy.
    gpu->set_fused_mlp(false);
    EXPECT_FALSE(gpu->FusesMlp(N, C, I));
    gpu->GateUpSwiGlu(h.f32(), gu.f32(), ln.f32(), d_w.f32(), N, C, I);
    ExpectNmse("unfused GateUpSwiGlu vs its ops", shape, KeptValues(gpu, h), KeptValues(gpu, h2), 0.0);
    gpu->set_fused_mlp(true);
    for (const Tensor* t : {&ln, &gu, &h, &gu2, &h2}) gpu->ReleaseBf16(t->f32());
    gpu->UnregisterWeights(d_w.f32());
  }
  EXPECT_FALSE(gpu->FusesMlp(CudaBackend::kFusedMlpRows + 1, 896, 4864)) << "prefill-sized rows take the two ops";
  EXPECT_FALSE(gpu->FusesMlp(256, 96, 4864)) << "C not a multiple of 64";
}

TEST(CudaOps, SplitAndPackQkv) {
  REQUIRE_GPU();
  CpuBackend cpu;
  // Qwen2.5-0.5B (14 + 2 x 2 heads of 64), Qwen3-like (16 + 2 x 8 of 128) and an odd shape.
  for (auto [N, QD, KD] : {std::tuple{301, 896, 128}, std::tuple{64, 2048, 1024}, std::tuple{7, 12, 5}}) {
    const int W = QD + 2 * KD;
    auto qkv = Randn(size_t(N) * W), bias = Randn(W);
    auto dq = Randn(size_t(N) * QD), dk = Randn(size_t(N) * KD), dv = Randn(size_t(N) * KD);
    const std::string shape =
        "[" + std::to_string(N) + "," + std::to_string(QD) + "+2x" + std::to_string(KD) + "]";
    Tensor d_qkv = Up(qkv), d_bias = Up(bias), d_dq = Up(dq), d_dk = Up(dk), d_dv = Up(dv);
    for (bool with_bias : {true, false}) {
      std::vector<float> q(size_t(N) * QD), k(size_t(N) * KD), v(size_t(N) * KD);
      cpu.SplitQkv(q.data(), k.data(), v.data(), qkv.data(), with_bias ? bias.data() : nullptr, N, QD, KD);
      Tensor d_q = Poisoned(q.size()), d_k = Poisoned(k.size()), d_v = Poisoned(v.size());
      gpu->SplitQkv(d_q.f32(), d_k.f32(), d_v.f32(), d_qkv.f32(), with_bias ? d_bias.f32() : nullptr, N, QD, KD);
      const std::string what = with_bias ? "split qkv + bias " : "split qkv ";
      ExpectNmse(what + "q", shape, Down(d_q), q, kF32);
      ExpectNmse(what + "k", shape, Down(d_k), k, kF32);
      ExpectNmse(what + "v", shape, Down(d_v), v, kF32);
    }
    std::vector<float> packed(size_t(N) * W);
    cpu.PackQkv(packed.data(), dq.data(), dk.data(), dv.data(), N, QD, KD);
    Tensor d_packed = Poisoned(packed.size());
    gpu->PackQkv(d_packed.f32(), d_dq.f32(), d_dk.f32(), d_dv.f32(), N, QD, KD);
    ExpectNmse("pack qkv", shape, Down(d_packed), packed, kF32);
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
  // The vectorised sum's tail and an unaligned start (the scalar loop).
  for (size_t off : {size_t{1}, size_t{3}}) {
    const size_t m_n = n - off - 2;
    const double c = cpu.SumSquares(g.data() + off, m_n), d = gpu->SumSquares(Up(g).f32() + off, m_n);
    EXPECT_NEAR(d, c, 1e-9 * c) << "offset " << off;
  }
  auto gc = g;
  cpu.Scale(gc.data(), 0.37f, n);
  gpu->Scale(d_g.f32(), 0.37f, n);
  ExpectNmse("scale", "[1000003]", Down(d_g), gc, kF32);
}

// AdamW on registered weights writes their bf16 copy in the same pass, and the WeightsChanged()
// after the steps skips its cast: products then read exactly the copy a cast of the new values gives.
// Steps that do not cover the range from its start leave the cast to WeightsChanged().
TEST(CudaOps, AdamWWritesTheWeightsBf16Copy) {
  REQUIRE_GPU();
  const int N = 64, C = 96, OC = 80;
  const size_t n = size_t(OC) * C, half = n / 2;
  auto w = Randn(n, 0.05f), g = Randn(n, 0.1f), x = Randn(size_t(N) * C);
  Tensor d_w = Up(w), d_g = Up(g), d_m = Up(std::vector<float>(n, 0.0f)), d_v = Up(std::vector<float>(n, 0.0f));
  Tensor d_x = Up(x);
  gpu->RegisterWeights(d_w.f32(), n);
  gpu->WeightsChanged(d_w.f32());
  // The product through a second registered buffer holding the same f32 values, cast afresh.
  auto reference = [&] {
    Tensor fresh = Poisoned(n), out = Poisoned(size_t(N) * OC);
    gpu->Copy(fresh.raw(), d_w.raw(), d_w.nbytes());
    gpu->RegisterWeights(fresh.f32(), n);
    gpu->WeightsChanged(fresh.f32());
    gpu->LinearForward(out.f32(), d_x.f32(), fresh.f32(), nullptr, N, C, OC);
    gpu->UnregisterWeights(fresh.f32());
    return Down(out);
  };
  auto product = [&] {
    Tensor out = Poisoned(size_t(N) * OC);
    gpu->LinearForward(out.f32(), d_x.f32(), d_w.f32(), nullptr, N, C, OC);
    return Down(out);
  };
  for (int step = 1; step <= 2; ++step) {  // two runs of the flat buffer, as AdamW::Step issues them
    gpu->AdamW(d_w.f32(), d_g.f32(), d_m.f32(), d_v.f32(), half, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
    gpu->AdamW(d_w.f32() + half, d_g.f32() + half, d_m.f32() + half, d_v.f32() + half, n - half, 1e-2f, 0.9f,
               0.999f, 1e-8f, 0.0f, step);
    gpu->WeightsChanged(d_w.f32());
    ExpectNmse("product after adamw (copy written by the step)", "step " + std::to_string(step), product(), reference(),
               0.0);
  }
  // Only the second half stepped, the first half changed by an upload: the cast must run.
  auto w2 = Randn(half, 0.05f);
  gpu->Upload(d_w.raw(), w2.data(), half * sizeof(float));
  gpu->AdamW(d_w.f32() + half, d_g.f32() + half, d_m.f32() + half, d_v.f32() + half, n - half, 1e-2f, 0.9f, 0.999f,
             1e-8f, 0.0f, 3);
  gpu->WeightsChanged(d_w.f32());
  ExpectNmse("product after an upload and a partial step", "cast", product(), reference(), 0.0);
  gpu->UnregisterWeights(d_w.f32());
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

// A decode step's output projections: y = a w^T split along K into S parts (one batched product,
// Gemm::NTSplitK) that the norm adds before adding y to x. Against the CPU's LinearForward +
// AddRmsNormForward (bf16 products), and against the same GPU op without the split (only the f32
// order of the parts' sums differs); each part against the CPU product over its K range.
TEST(CudaOps, LinearAddRmsNormSplitsKAndMatchesCpu) {
  REQUIRE_GPU();
  CpuBackend cpu;
  const float eps = 1e-6f;
  // (N, K, C, the parts expected on the H200's 132 multiprocessors)
  // Rows of 1,536 (Qwen2.5-1.5B: the norm's float4 kernel with two float4 a thread, 4 and 7 parts)
  // and 3,584 (four a thread; 2 parts, and 16 on the scalar kernel) too.
  for (auto [N, K, C, want] : {std::tuple{256, 4864, 896, 4}, std::tuple{256, 896, 896, 4},
                               std::tuple{7, 136, 96, 1}, std::tuple{37, 96, 130, 1}, std::tuple{2048, 896, 896, 1},
                               std::tuple{256, 1792, 1536, 4}, std::tuple{256, 2048, 3584, 2}}) {
    gpu->set_split_k(0);
    const int S = gpu->SplitParts(N, K, C);  // the chosen parts
    cudaDeviceProp prop{};
    ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
    if (prop.multiProcessorCount == 132) {
      EXPECT_EQ(S, want) << N << "x" << K << "x" << C;
    }
    auto x = Randn(size_t(N) * C, 2.0f), a = Randn(size_t(N) * K), w = Randn(size_t(C) * K, 0.05f), g = Randn(C);
    std::vector<float> cx = x, ln(x.size()), rstd(N), tmp(x.size());
    cpu.LinearAddRmsNorm(cx.data(), ln.data(), rstd.data(), tmp.data(), a.data(), w.data(), g.data(), N, K, C, eps);
    Tensor d_a = Up(a), d_w = Up(w), d_g = Up(g);
    gpu->RegisterWeights(d_w.f32(), d_w.numel());
    gpu->WeightsChanged(d_w.f32());
    std::vector<float> whole_x, whole_ln;
    for (int split : {1, 0, 7, 16}) {  // none, the chosen parts, 7 and 16 where K allows
      gpu->set_split_k(split);
      const int parts = gpu->SplitParts(N, K, C);
      Tensor d_x = Up(x), d_ln = Poisoned(ln.size()), d_rstd = Poisoned(N), d_tmp = Poisoned(tmp.size());
      gpu->LinearAddRmsNorm(d_x.f32(), d_ln.f32(), d_rstd.f32(), d_tmp.f32(), d_a.f32(), d_w.f32(), d_g.f32(), N, K,
                            C, eps);
      const std::string shape = "[" + std::to_string(N) + "x" + std::to_string(K) + "]x[" + std::to_string(C) +
                                "] parts " + std::to_string(parts);
      ExpectNmse("linear + add + rmsnorm x", shape, Down(d_x), cx, kBf16);
      ExpectNmse("linear + add + rmsnorm ln", shape, Down(d_ln), ln, kBf16);
      ExpectNmse("linear + add + rmsnorm rstd", shape, Down(d_rstd), rstd, kBf16);
      if (split == 1) {
        whole_x = Down(d_x), whole_ln = Down(d_ln);
      } else {
        ExpectNmse("parts vs whole x", shape, Down(d_x), whole_x, kF32);
        ExpectNmse("parts vs whole ln", shape, Down(d_ln), whole_ln, kF32);
      }
    }
    if (S > 1) {  // the parts themselves
      const int Ks = K / S;
      Tensor d_parts = Poisoned(size_t(S) * N * C);
      gpu->gemm().NTSplitK(d_parts.f32(), d_a.f32(), d_w.f32(), N, C, K, S);
      const std::vector<float> parts = Down(d_parts);
      for (int j = 0; j < S; j += S - 1) {
        std::vector<float> aj(size_t(N) * Ks), wj(size_t(C) * Ks), want_j(size_t(N) * C);
        for (int r = 0; r < N; ++r)
          std::copy_n(a.begin() + size_t(r) * K + size_t(j) * Ks, Ks, aj.begin() + size_t(r) * Ks);
        for (int r = 0; r < C; ++r)
          std::copy_n(w.begin() + size_t(r) * K + size_t(j) * Ks, Ks, wj.begin() + size_t(r) * Ks);
        cpu.LinearForward(want_j.data(), aj.data(), wj.data(), nullptr, N, Ks, C);
        ExpectNmse("K part " + std::to_string(j) + " of " + std::to_string(S), "",
                   std::vector<float>(parts.begin() + size_t(j) * N * C, parts.begin() + size_t(j + 1) * N * C),
                   want_j, kBf16);
      }
    }
    gpu->UnregisterWeights(d_w.f32());
  }
  gpu->set_split_k(0);
}

// Gemm directly, through each bf16 library: shapes no tile divides, operands whose addresses and
// leading dimensions are only 4 (f32) or 2 (bf16 weight copy) bytes aligned, beta 0 (out poisoned:
// C must not be read) and beta 1 (accumulating into random values: cuBLASLt times its candidates
// on first use, with beta != 0 into a scratch output, so out must still be accumulated into once),
// each problem run twice (tuned, then from the cache), two M in one tuning bucket (1900 reuses
// 2000's choice), and a new problem first seen inside a CUDA graph capture (no timing there).
TEST(CudaOps, GemmOddShapesUnalignedAccumulateAndCapture) {
  REQUIRE_GPU();
  cuda::Gemm& g = gpu->gemm();
  const cuda::GemmLibrary saved = g.library();
  const float alpha = 0.75f;
  const char* const kForms[] = {"NT", "NN", "TN"};
  // out[M, N] = alpha * A' B' + beta * out0 in f64; form 0 NT (a[M,K], b[N,K]), 1 NN (a[M,K],
  // b[K,N]), 2 TN (a[K,M], b[K,N]).
  auto reference = [&](int form, int M, int N, int K, const float* a, const float* b, const std::vector<float>& out0,
                       float beta) {
    std::vector<float> out(size_t(M) * N);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        double acc = 0;
        for (int k = 0; k < K; ++k) {
          const double x = form == 2 ? a[size_t(k) * M + i] : a[size_t(i) * K + k];
          const double y = form == 0 ? b[size_t(j) * K + k] : b[size_t(k) * N + j];
          acc += x * y;
        }
        out[size_t(i) * N + j] = static_cast<float>(alpha * acc + (beta != 0 ? beta * out0[size_t(i) * N + j] : 0.0));
      }
    return out;
  };
  auto run = [&](int form, float* out, const float* a, const float* b, int M, int N, int K, float beta) {
    if (form == 0) g.NT(out, a, b, M, N, K, alpha, beta);
    else if (form == 1) g.NN(out, a, b, M, N, K, alpha, beta);
    else g.TN(out, a, b, M, N, K, alpha, beta);
  };
  for (cuda::GemmLibrary lib : {cuda::GemmLibrary::kCublasLt, cuda::GemmLibrary::kCublasGemmEx}) {
    g.set_library(lib);
    for (auto [M, N, K] : {std::tuple{37, 45, 29}, std::tuple{1, 7, 3}, std::tuple{2000, 45, 29},
                           std::tuple{1900, 45, 29}, std::tuple{64, 128, 96}}) {
      for (int form = 0; form < 3; ++form)
        for (float beta : {0.0f, 1.0f})
          for (int offset : {0, 1}) {
            // Element `offset` of each buffer is where the operand starts; b is registered as a
            // weight, so with offset 1 its bf16 copy starts 2 bytes past an aligned address.
            const size_t na = size_t(M) * K, nb = size_t(K) * N, no = size_t(M) * N;
            auto a = Randn(na + offset), b = Randn(nb + offset, 0.2f), out0 = Randn(no + offset);
            const std::vector<float> o0(out0.begin() + offset, out0.end());
            const auto want = reference(form, M, N, K, a.data() + offset, b.data() + offset, o0, beta);
            Tensor d_a = Up(a), d_b = Up(b), d_out = beta != 0 ? Up(out0) : Poisoned(no + offset);
            gpu->RegisterWeights(d_b.f32(), d_b.numel());
            gpu->WeightsChanged(d_b.f32());
            run(form, d_out.f32() + offset, d_a.f32() + offset, d_b.f32() + offset, M, N, K, beta);
            std::vector<float> got = Down(d_out);
            got.erase(got.begin(), got.begin() + offset);
            const std::string what = std::string("gemm ") + cuda::GemmLibraryName(lib) + " " + kForms[form];
            const std::string shape = std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
                                      " beta " + std::to_string(int(beta)) + " offset " + std::to_string(offset);
            ExpectNmse(what, shape, got, want, kBf16);
            // Again from the cache (beta 1: on top of the first result).
            const auto want2 = beta != 0 ? reference(form, M, N, K, a.data() + offset, b.data() + offset, want, beta)
                                         : want;
            run(form, d_out.f32() + offset, d_a.f32() + offset, d_b.f32() + offset, M, N, K, beta);
            got = Down(d_out);
            got.erase(got.begin(), got.begin() + offset);
            ExpectNmse(what + " (cached)", shape, got, want2, kBf16);
            gpu->UnregisterWeights(d_b.f32());
          }
    }
    // A problem first seen while capturing: the heuristic's first choice, nothing timed.
    const int M = 53, N = 61, K = 47;
    auto a = Randn(size_t(M) * K), b = Randn(size_t(N) * K, 0.2f);
    const auto want = reference(0, M, N, K, a.data(), b.data(), {}, 0.0f);
    Tensor d_a = Up(a), d_b = Up(b), d_out = Poisoned(size_t(M) * N);
    // A registered weight, as in a decode graph; a's cast fits the scratch the cases above grew
    // (a scratch that grew inside the capture would be a cudaMalloc there).
    gpu->RegisterWeights(d_b.f32(), d_b.numel());
    gpu->WeightsChanged(d_b.f32());
    gpu->Synchronize();
    const int tuned = g.tuned_problems();
    ASSERT_TRUE(gpu->BeginCapture());
    g.NT(d_out.f32(), d_a.f32(), d_b.f32(), M, N, K, alpha, 0.0f);
    void* graph = gpu->EndCapture();
    ASSERT_NE(graph, nullptr);
    EXPECT_EQ(g.tuned_problems(), tuned) << "no candidate is timed while capturing";
    gpu->Replay(graph);
    ExpectNmse(std::string("gemm captured ") + cuda::GemmLibraryName(lib), "53x61x47", Down(d_out), want, kBf16);
    gpu->DestroyGraph(graph);
    gpu->UnregisterWeights(d_b.f32());
  }
  g.set_library(saved);
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

// Whether CudaBackend::CachedAttentionForward runs a call on the tensor-core decode kernel: one row
// per sequence, a pool and shape that cuda::CachedAttentionDecodeTcSupported accepts (bf16, Hq / Hkv
// <= 16, D 64 or 128), and AHA_DECODE_ATTENTION not forcing another kernel.
bool DecodeOnTensorCores(const PagedKv& cache, int B, int Nq, int Hq, int Hkv, int D) {
  const char* e = std::getenv("AHA_DECODE_ATTENTION");
  const std::string mode = e != nullptr ? e : "";
  if (Nq != B || mode == "rowwise" || mode == "simt") return false;
  cuda::KvPages kv;
  kv.bf16 = cache.dtype == DType::kBF16;
  return cuda::CachedAttentionDecodeTcSupported(kv, Hq, Hkv, D);
}

// Limit of the tensor-core decode kernel against the CPU (both over the exact and over the
// pre-rounded k/v): it rounds q (after scaling) and P to bf16, as the training TC attention does, so
// its limit is that of AttentionForwardTC's out (attention_tc_test and the AttentionForward check
// above): 1e-4. Expected: a bf16 rounding has relative rms error 2^-9 / sqrt(3) ~ 1.1e-3, i.e. NMSE
// ~1.3e-6 per rounded operand; the output inherits it once through the scores (q) and once through
// the weights (P), ~3e-6 against the CPU on the rounded k/v, plus the cache's own ~5e-6 against
// exact k/v (see below): ~1e-5 at most. A wrong fragment layout or mask gives NMSE ~1.
constexpr double kTcDecode = kBf16;

// The limit of a bf16 pool's output against the CPU attention over exact k/v (see below).
constexpr double kBf16Cache = 2e-5;

// One cached-attention result against the CPU's: `out` over exact k/v, `out_r` over k/v rounded to
// bf16 (bf16 pools only). The tensor-core decode kernel is held to kTcDecode against both; the other
// kernels to kF32 on the pool's own values and, for bf16 pools, kBf16Cache against exact k/v.
void ExpectCachedAttention(const std::string& what, const std::string& shape, const std::vector<float>& got,
                           const std::vector<float>& out, const std::vector<float>& out_r, bool tensor_cores,
                           bool bf16) {
  if (tensor_cores) {
    ExpectNmse(what + ", tensor cores (rounded kv)", shape, got, out_r, kTcDecode);
    ExpectNmse(what + ", tensor cores", shape, got, out, kTcDecode);
  } else if (bf16) {
    ExpectNmse(what + " (rounded kv)", shape, got, out_r, kF32);
    ExpectNmse(what, shape, got, out, kBf16Cache);
  } else {
    ExpectNmse(what, shape, got, out, kF32);
  }
}

// The paged cache through random, non-contiguous block tables (a shuffled pool, some blocks owned by
// no sequence), three rounds per case: prefill (start 0), a chunk (start > 0), decode (one row). The
// decode round (and a chunk round with one row per sequence) runs a decode kernel, the others the
// row-wise one (CachedAttentionForward dispatches on Nq == B; with a bf16 pool and D 64 or 128 the
// decode kernel is the tensor-core one, checked against both references within kTcDecode).
// f32 pools: the cache bit-exact against the CPU, the output within kF32. bf16 pools: the GPU rounds
// k/v to bf16 as it writes (round to nearest even, as F32ToBF16), so the pools must equal the CPU's
// pools filled with pre-rounded k/v bit for bit, and the output must match the CPU attention over
// those rounded k/v within kF32 (f32 math on the same values). Against the CPU attention over the
// exact k/v the limit is kBf16Cache: rounding a Gaussian vector to bf16 (8 significant bits,
// relative error up to 2^-9 each, uniform in the last bit) has NMSE ~2.4e-6; the output inherits it
// once through v and about once more through the scores (q . dk is as large relative to the score
// spread), so ~5e-6 expected and 2e-5 allowed.
TEST(CudaOps, KvCacheAndCachedAttentionPrefillChunkAndDecode) {
  REQUIRE_GPU();
  CpuBackend cpu;
  struct PagedCase {
    AttnCase a;
    int block_size;
  };
  for (const PagedCase& pc : {PagedCase{{14, 2, 64, {7, 1, 40, 129}}, 16}, PagedCase{{4, 4, 128, {3, 65}}, 8},
                              PagedCase{{4, 1, 32, {1, 2}}, 32}, PagedCase{{8, 2, 16, {5, 33}}, 4}}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      const AttnCase& c = pc.a;
      const bool bf16 = dtype == DType::kBF16;
      const int B = static_cast<int>(c.lens.size()), bs = pc.block_size, max_len = 200;
      const int max_blocks = (max_len + bs - 1) / bs;
      const size_t row = size_t(c.Hkv) * c.D;
      // Rows per round and sequence; the table holds exactly the blocks each sequence needs.
      std::vector<std::vector<int>> rounds(3, std::vector<int>(B));
      std::vector<int> total(B, 0);
      for (int b = 0; b < B; ++b) {
        rounds[0][b] = c.lens[b];
        rounds[1][b] = 1 + c.lens[b] / 3;
        rounds[2][b] = 1;
        total[b] = rounds[0][b] + rounds[1][b] + rounds[2][b];
      }
      int needed = 0;
      for (int b = 0; b < B; ++b) needed += (total[b] + bs - 1) / bs;
      const int num_blocks = needed + 7;
      const std::vector<int32_t> order = ShuffledIds(num_blocks);
      std::vector<int32_t> table(size_t(B) * max_blocks, -1);
      int next = 0;
      for (int b = 0; b < B; ++b)
        for (int j = 0; j < (total[b] + bs - 1) / bs; ++j) table[size_t(b) * max_blocks + j] = order[next++];
      // CPU pools: exact k/v (kc) and, for bf16, bf16-rounded k/v (kc_r).
      const size_t pool = size_t(num_blocks) * bs * row;
      std::vector<float> kc(pool, 0.0f), vc(pool, 0.0f), kc_r(pool, 0.0f), vc_r(pool, 0.0f);
      const PagedKv cpu_exact{kc.data(), vc.data(), DType::kF32, num_blocks, bs, table.data(), max_blocks};
      const PagedKv cpu_rounded{kc_r.data(), vc_r.data(), DType::kF32, num_blocks, bs, table.data(), max_blocks};
      const Shape pool_shape{num_blocks, bs, c.Hkv, c.D};
      Tensor d_kc = Tensor::Zeros(dtype, pool_shape, gpu->device()), d_vc = Tensor::Zeros(dtype, pool_shape, gpu->device());
      Tensor d_table = Up(table);
      const PagedKv gpu_cache{d_kc.raw(), d_vc.raw(), dtype, num_blocks, bs, d_table.i32(), max_blocks};
      auto rounded = [](std::vector<float> x) {
        for (float& e : x) e = BF16ToF32(F32ToBF16(e));
        return x;
      };
      std::vector<int32_t> len(B, 0);
      for (int round = 0; round < 3; ++round) {
        std::vector<int32_t> cu{0}, start(B);
        for (int b = 0; b < B; ++b) {
          cu.push_back(cu.back() + rounds[round][b]);
          start[b] = len[b];
          len[b] += rounds[round][b];
        }
        const int Nq = cu.back();
        auto q = Randn(size_t(Nq) * c.Hq * c.D), k = Randn(size_t(Nq) * row), v = Randn(size_t(Nq) * row);
        std::vector<float> out(q.size()), out_r(q.size());
        cpu.KvCacheWrite(cpu_exact, k.data(), v.data(), cu.data(), start.data(), B, Nq, c.Hkv, c.D);
        cpu.CachedAttentionForward(out.data(), q.data(), cpu_exact, cu.data(), start.data(), B, Nq, c.Hq, c.Hkv, c.D);
        if (bf16) {
          const auto kr = rounded(k), vr = rounded(v);
          cpu.KvCacheWrite(cpu_rounded, kr.data(), vr.data(), cu.data(), start.data(), B, Nq, c.Hkv, c.D);
          cpu.CachedAttentionForward(out_r.data(), q.data(), cpu_rounded, cu.data(), start.data(), B, Nq, c.Hq,
                                     c.Hkv, c.D);
        }
        Tensor d_q = Up(q), d_k = Up(k), d_v = Up(v), d_cu = Up(cu), d_start = Up(start), d_out = Poisoned(out.size());
        gpu->KvCacheWrite(gpu_cache, d_k.f32(), d_v.f32(), d_cu.i32(), d_start.i32(), B, Nq, c.Hkv, c.D);
        gpu->CachedAttentionForward(d_out.f32(), d_q.f32(), gpu_cache, d_cu.i32(), d_start.i32(), B, Nq, c.Hq, c.Hkv,
                                    c.D);
        const std::string shape = std::string(bf16 ? "bf16 " : "f32 ") +
                                  (round == 0 ? "prefill" : round == 1 ? "chunk" : "decode") + " Nq=" +
                                  std::to_string(Nq) + " H=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) +
                                  " D=" + std::to_string(c.D) + " bs=" + std::to_string(bs);
        const auto got = Down(d_out);
        ExpectCachedAttention("cached attention", shape, got, out, out_r,
                              DecodeOnTensorCores(gpu_cache, B, Nq, c.Hq, c.Hkv, c.D), bf16);
      }
      const std::string what = std::string(bf16 ? "bf16" : "f32") + " pool, after 3 rounds";
      ExpectNmse("kv cache k", what, Down(d_kc), bf16 ? kc_r : kc, 0.0);
      ExpectNmse("kv cache v", what, Down(d_vc), bf16 ? vc_r : vc, 0.0);
    }
  }
}

// The attention outputs feed the o product through their bf16 copies: the training forward on the
// tensor cores and the decode step's tensor-core kernel (one row per sequence, bf16 pool) write
// them, so the product launches no cast and equals the product over a cast of the same values bit
// for bit.
TEST(CudaOps, AttentionOutputsFeedTheOProductWithoutACast) {
  REQUIRE_GPU();
  cuda::Gemm& g = gpu->gemm();
  const int Hq = 14, Hkv = 2, D = 64, QD = Hq * D, C = 96;
  Tensor d_Wo = Up(Randn(size_t(C) * QD, 0.05f));
  gpu->RegisterWeights(d_Wo.f32(), d_Wo.numel());
  gpu->WeightsChanged(d_Wo.f32());
  auto o_product = [&](const Tensor& att, int N, const std::string& what) {
    Tensor out = Poisoned(size_t(N) * C);
    const uint64_t casts = g.casts_launched();
    gpu->LinearForward(out.f32(), att.f32(), d_Wo.f32(), nullptr, N, QD, C);
    EXPECT_EQ(g.casts_launched(), casts) << what << ": the o product reads the attention's bf16 copy";
    ExpectNmse(what + ": o product of the copy vs of a cast", "N=" + std::to_string(N), Down(out),
               ProductOfPlainCopy(gpu, att, d_Wo, N, QD, C), 0.0);
  };
  if (gpu->UseTcAttention()) {  // training forward, two packed sequences (AHA_ATTENTION=f32 writes no copy)
    const std::vector<int32_t> cu{0, 120, 301};
    const int N = cu.back();
    Tensor d_q = Up(Randn(size_t(N) * QD)), d_k = Up(Randn(size_t(N) * Hkv * D)), d_v = Up(Randn(size_t(N) * Hkv * D));
    Tensor d_cu = Up(cu), att = Poisoned(size_t(N) * QD), lse = Poisoned(size_t(N) * Hq);
    gpu->AttentionForward(att.f32(), lse.f32(), d_q.f32(), d_k.f32(), d_v.f32(), d_cu.i32(), 2, N, Hq, Hkv, D);
    o_product(att, N, "training attention");
  }
  {  // a decode step: 5 sequences of contexts 1..70 in a bf16 pool, one new row each
    const int B = 5, bs = 16, max_blocks = 5, num_blocks = B * max_blocks;
    std::vector<int32_t> table(size_t(B) * max_blocks), cu{0}, start;
    for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(table.size() - 1 - i);
    for (int b = 0; b < B; ++b) {
      start.push_back(1 + 17 * b);  // the new row's position; earlier positions hold random k/v
      cu.push_back(b + 1);
    }
    const int64_t pool = int64_t{num_blocks} * bs * Hkv * D;
    auto bf16_pool = [&] { return Tensor::FromVector(Randn(pool), {pool}).To(DType::kBF16).ToDevice(gpu->device()); };
    Tensor kc = bf16_pool(), vc = bf16_pool();
    Tensor d_table = Up(table), d_cu = Up(cu), d_start = Up(start), d_q = Up(Randn(size_t(B) * QD));
    const PagedKv cache{kc.raw(), vc.raw(), DType::kBF16, num_blocks, bs, d_table.i32(), max_blocks};
    Tensor att = Poisoned(size_t(B) * QD);
    gpu->CachedAttentionForward(att.f32(), d_q.f32(), cache, d_cu.i32(), d_start.i32(), B, B, Hq, Hkv, D);
    if (DecodeOnTensorCores(cache, B, B, Hq, Hkv, D)) o_product(att, B, "decode attention");
  }
  gpu->UnregisterWeights(d_Wo.f32());
}

// The fused q/k/v step of generation (QkvRopeKvWrite: split + bias, RoPE of q and k, pool write, one
// kernel) against the four ops it replaces, on the GPU and on the CPU, through a shuffled block
// table: decode (one row per sequence) and a chunk (several rows, start > 0), f32 and bf16 pools,
// with and without the bias. On the GPU it repeats their arithmetic, so q and the pools must equal
// the four ops' bit for bit (NMSE 0); against the CPU q is within kF32 (sincosf against the CPU's
// sin/cos) and the pools likewise (bf16 pools: within the rounding of one bf16 step, kBf16Cache).
TEST(CudaOps, QkvRopeKvWriteEqualsTheFourOps) {
  REQUIRE_GPU();
  CpuBackend cpu;
  struct Case {
    int Hq, Hkv, D;
    std::vector<int> rows;  // new rows per sequence
    bool bias;
  };
  for (const Case& c : {Case{14, 2, 64, std::vector<int>(256, 1), true}, Case{14, 2, 64, {3, 1, 9}, false},
                        Case{4, 4, 128, {1, 1, 1}, true}, Case{8, 2, 16, {5, 2}, true}}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      const int B = static_cast<int>(c.rows.size()), bs = 16, max_blocks = 8;
      const int QD = c.Hq * c.D, KD = c.Hkv * c.D, W = QD + 2 * KD;
      std::vector<int32_t> cu{0}, start(B), pos;
      for (int b = 0; b < B; ++b) {
        start[b] = RandInt(1, 0, 100)[0];
        for (int j = 0; j < c.rows[b]; ++j) pos.push_back(start[b] + j);
        cu.push_back(cu.back() + c.rows[b]);
      }
      const int Nq = cu.back(), num_blocks = B * max_blocks;
      const std::vector<int32_t> order = ShuffledIds(num_blocks);
      std::vector<int32_t> table(size_t(B) * max_blocks);
      for (size_t i = 0; i < table.size(); ++i) table[i] = order[i];
      const auto qkv = Randn(size_t(Nq) * W), bias = Randn(W);
      const std::vector<float> inv_freq = RopeInvFreq(c.D);
      const float* b_ptr = c.bias ? bias.data() : nullptr;
      // CPU: the four ops (the default QkvRopeKvWrite) into an f32 pool.
      const size_t pool = size_t(num_blocks) * bs * KD;
      std::vector<float> q(size_t(Nq) * QD), k(size_t(Nq) * KD), v(size_t(Nq) * KD), kc(pool, 0.0f), vc(pool, 0.0f);
      const PagedKv cpu_cache{kc.data(), vc.data(), DType::kF32, num_blocks, bs, table.data(), max_blocks};
      cpu.QkvRopeKvWrite(q.data(), k.data(), v.data(), qkv.data(), b_ptr, pos.data(), inv_freq.data(), cpu_cache,
                         cu.data(), start.data(), B, Nq, c.Hq, c.Hkv, c.D);
      // GPU: fused into one pool pair, the four ops into another.
      const Shape pool_shape{num_blocks, bs, c.Hkv, c.D};
      Tensor kf = Tensor::Zeros(dtype, pool_shape, gpu->device()), vf = Tensor::Zeros(dtype, pool_shape, gpu->device());
      Tensor ku = Tensor::Zeros(dtype, pool_shape, gpu->device()), vu = Tensor::Zeros(dtype, pool_shape, gpu->device());
      Tensor d_table = Up(table), d_cu = Up(cu), d_start = Up(start), d_pos = Up(pos), d_qkv = Up(qkv),
             d_bias = Up(bias), d_inv = Up(inv_freq);
      const float* d_b = c.bias ? d_bias.f32() : nullptr;
      const PagedKv fused{kf.raw(), vf.raw(), dtype, num_blocks, bs, d_table.i32(), max_blocks};
      const PagedKv unfused{ku.raw(), vu.raw(), dtype, num_blocks, bs, d_table.i32(), max_blocks};
      Tensor q1 = Poisoned(q.size()), q2 = Poisoned(q.size()), k2 = Poisoned(k.size()), v2 = Poisoned(v.size());
      Tensor k1 = Poisoned(k.size()), v1 = Poisoned(v.size());
      gpu->QkvRopeKvWrite(q1.f32(), k1.f32(), v1.f32(), d_qkv.f32(), d_b, d_pos.i32(), d_inv.f32(), fused, d_cu.i32(),
                          d_start.i32(), B, Nq, c.Hq, c.Hkv, c.D);
      gpu->SplitQkv(q2.f32(), k2.f32(), v2.f32(), d_qkv.f32(), d_b, Nq, QD, KD);
      gpu->RopeForward(q2.f32(), d_pos.i32(), d_inv.f32(), Nq, c.Hq, c.D);
      gpu->RopeForward(k2.f32(), d_pos.i32(), d_inv.f32(), Nq, c.Hkv, c.D);
      gpu->KvCacheWrite(unfused, k2.f32(), v2.f32(), d_cu.i32(), d_start.i32(), B, Nq, c.Hkv, c.D);
      const bool bf16 = dtype == DType::kBF16;
      const std::string shape = std::string(bf16 ? "bf16 " : "f32 ") + "Nq=" + std::to_string(Nq) +
                                " H=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " D=" +
                                std::to_string(c.D) + (c.bias ? " bias" : "");
      ExpectNmse("qkv+rope+kv write q vs the four ops", shape, Down(q1), Down(q2), 0.0);
      ExpectNmse("qkv+rope+kv write k pool vs the four ops", shape, Down(kf), Down(ku), 0.0);
      ExpectNmse("qkv+rope+kv write v pool vs the four ops", shape, Down(vf), Down(vu), 0.0);
      ExpectNmse("qkv+rope+kv write q vs cpu", shape, Down(q1), q, kF32);
      ExpectNmse("qkv+rope+kv write k pool vs cpu", shape, Down(kf), kc, bf16 ? kBf16Cache : kF32);
      ExpectNmse("qkv+rope+kv write v pool vs cpu", shape, Down(vf), vc, bf16 ? kBf16Cache : kF32);
    }
  }
}

// A decode step's paging for B sequences, one new row each at a random context in [ctx_lo, ctx_hi]:
// cu_q, start (the new tokens' positions; every earlier one is cached), a shuffled block table, and
// random bf16 contents of the pools, which Pools uploads into as many (k, v) pairs as a test compares.
struct RandomDecodeStep {
  int B, bs, Hkv, D, max_blocks, num_blocks;
  size_t pool;  // elements of one pool
  std::vector<int32_t> cu, start, table;
  std::vector<uint16_t> k16, v16;
  RandomDecodeStep(int B_, int ctx_lo, int ctx_hi, int bs_, int Hkv_, int D_)
      : B(B_), bs(bs_), Hkv(Hkv_), D(D_), max_blocks((ctx_hi + bs_ - 1) / bs_), num_blocks(B_ * max_blocks),
        pool(size_t(num_blocks) * bs_ * Hkv_ * D_), cu(B_ + 1), start(B_), table(size_t(B_) * max_blocks),
        k16(pool), v16(pool) {
    for (int b = 0; b <= B; ++b) cu[b] = b;
    const auto ctx = RandInt(B, ctx_lo, ctx_hi);
    for (int b = 0; b < B; ++b) start[b] = ctx[b] - 1;
    const std::vector<int32_t> order = ShuffledIds(num_blocks);
    for (size_t i = 0; i < table.size(); ++i) table[i] = order[i];
    const auto kf = Randn(pool), vf = Randn(pool);
    F32ToBF16(kf.data(), k16.data(), pool);
    F32ToBF16(vf.data(), v16.data(), pool);
  }
  // k0, v0, k1, v1, ...: `pairs` pool pairs on the device, each holding the same contents.
  std::vector<Tensor> Pools(int pairs) const {
    std::vector<Tensor> t;
    for (int p = 0; p < 2 * pairs; ++p) {
      t.push_back(Tensor::Zeros(DType::kBF16, {num_blocks, bs, Hkv, D}, Gpu()->device()));
      Gpu()->Upload(t.back().raw(), (p % 2 == 0 ? k16 : v16).data(), pool * 2);
    }
    return t;
  }
};

// A fused decode-step case: heads, head width, rows, contexts drawn from [ctx_lo, ctx_hi], block size, bias.
struct FusedDecodeCase {
  int Hq, Hkv, D, B, ctx_lo, ctx_hi, bs;
  bool bias;
};

// Whether the backend's decode-step ops (QkvRopeCachedAttention, QkvNormRopeCachedAttention: norms)
// run the fused kernel: at D = 64, or with norms; no switch sends them to their ops
// (AHA_DECODE_FUSED=0, AHA_FUSED_QKV=0, AHA_DECODE_ATTENTION), and AHA_DECODE_FUSED=1 fuses D = 128
// without norms too.
bool OpFusesDecodeStep(int D, bool norms) {
  auto env_is = [](const char* name, const char* value) {
    const char* e = std::getenv(name);
    return e != nullptr && std::string(e) == value;
  };
  const char* decode_kernel = std::getenv("AHA_DECODE_ATTENTION");
  if (env_is("AHA_DECODE_FUSED", "0") || env_is("AHA_FUSED_QKV", "0") ||
      (decode_kernel != nullptr && *decode_kernel != '\0'))
    return false;
  return env_is("AHA_DECODE_FUSED", "1") || D == 64 || norms;
}

// A decode layer's q/k/v step and attention fused into the tensor-core decode kernel
// (QkvRopeCachedAttention): each block rotates its query heads from the q/k/v product row and the
// block whose keys include the new position writes that key and value into the pool before reading
// it. Against the two ops it replaces (QkvRopeKvWrite, then CachedAttentionForward) on a bf16 pool
// already holding every earlier position: the kernel (cuda::QkvRopeCachedAttentionDecodeTC) and the
// backend op give the attention output and both pools bit for bit; the op leaves q unwritten (it ran
// the fused kernel) unless a switch sends it to the two ops (then q is theirs). Contexts 1 to 1500 (splits of the keys when B x Hkv is small: the
// writer is then one split of several), Hq / Hkv = 1, 7, 4, 16 and 2, D 64 and 128, blocks of 16 and 32,
// with and without bias, B = 256 with shuffled block tables (at 16 / 8 heads of 128: 2,048 items, the
// 2-stage kernels).
TEST(CudaOps, QkvRopeCachedAttentionEqualsItsOps) {
  REQUIRE_GPU();
  gpu->gemm().set_precision(GemmPrecision::kBF16);
  const std::vector<FusedDecodeCase> cases = {
      {14, 2, 64, 256, 1, 700, 16, true}, {14, 2, 64, 3, 1, 1500, 16, false}, {8, 2, 128, 5, 60, 900, 32, true},
      {16, 1, 64, 2, 1, 300, 16, true},   {4, 4, 128, 7, 1, 200, 16, false},   {16, 8, 128, 256, 1, 700, 16, true}};
  for (const FusedDecodeCase& c : cases) {
    const RandomDecodeStep step(c.B, c.ctx_lo, c.ctx_hi, c.bs, c.Hkv, c.D);
    const int B = c.B, bs = c.bs, QD = c.Hq * c.D, KD = c.Hkv * c.D, W = QD + 2 * KD;
    const int max_blocks = step.max_blocks, num_blocks = step.num_blocks;
    const size_t pool = step.pool;
    const auto qkv = Randn(size_t(B) * W), bias = Randn(W);
    const std::vector<float> inv_freq = RopeInvFreq(c.D);
    // Every pool pair starts from the same random bf16 contents (the cached positions).
    std::vector<Tensor> pools = step.Pools(3);
    Tensor &kf = pools[0], &vf = pools[1], &ku = pools[2], &vu = pools[3], &kb = pools[4], &vb = pools[5];
    Tensor d_table = Up(step.table), d_cu = Up(step.cu), d_start = Up(step.start), d_pos = Up(step.start),
           d_qkv = Up(qkv), d_bias = Up(bias), d_inv = Up(inv_freq);
    const float* d_b = c.bias ? d_bias.f32() : nullptr;
    const cuda::KvPages fused{kf.raw(), vf.raw(), true, num_blocks, bs, d_table.i32(), max_blocks};
    const bool op_fuses = OpFusesDecodeStep(c.D, false);
    const PagedKv unfused{ku.raw(), vu.raw(), DType::kBF16, num_blocks, bs, d_table.i32(), max_blocks};
    const PagedKv by_op{kb.raw(), vb.raw(), DType::kBF16, num_blocks, bs, d_table.i32(), max_blocks};
    Tensor out1 = Poisoned(size_t(B) * QD);
    Tensor out2 = Poisoned(size_t(B) * QD), q2 = Poisoned(size_t(B) * QD), k2 = Poisoned(size_t(B) * KD),
           v2 = Poisoned(size_t(B) * KD);
    Tensor out3 = Poisoned(size_t(B) * QD), q3 = Poisoned(size_t(B) * QD), k3 = Poisoned(size_t(B) * KD),
           v3 = Poisoned(size_t(B) * KD);
    const size_t ws_bytes = cuda::CachedAttentionDecodeTcWorkspace(fused, B, c.Hq, c.Hkv, c.D);
    Tensor ws(DType::kF32, {int64_t(ws_bytes / 4 + 1)}, gpu->device());  // the split partials (f32)
    cuda::QkvRopeCachedAttentionDecodeTC(out1.f32(), d_qkv.f32(), d_b, d_pos.i32(), d_inv.f32(), fused, d_cu.i32(),
                                         d_start.i32(), B, B, c.Hq, c.Hkv, c.D, ws.raw(), gpu->stream());
    gpu->QkvRopeCachedAttention(out3.f32(), q3.f32(), k3.f32(), v3.f32(), d_qkv.f32(), d_b, d_pos.i32(), d_inv.f32(),
                                by_op, d_cu.i32(), d_start.i32(), B, B, c.Hq, c.Hkv, c.D);
    gpu->QkvRopeKvWrite(q2.f32(), k2.f32(), v2.f32(), d_qkv.f32(), d_b, d_pos.i32(), d_inv.f32(), unfused, d_cu.i32(),
                        d_start.i32(), B, B, c.Hq, c.Hkv, c.D);
    gpu->CachedAttentionForward(out2.f32(), q2.f32(), unfused, d_cu.i32(), d_start.i32(), B, B, c.Hq, c.Hkv, c.D);
    const std::string shape = "B=" + std::to_string(B) + " H=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) +
                              " D=" + std::to_string(c.D) + " bs=" + std::to_string(bs) + (c.bias ? " bias" : "");
    const auto o1 = Down(out1), o2 = Down(out2), o3 = Down(out3);
    EXPECT_EQ(std::memcmp(o1.data(), o2.data(), o1.size() * 4), 0) << shape << ": kernel output differs from the two ops";
    EXPECT_EQ(std::memcmp(o3.data(), o2.data(), o3.size() * 4), 0) << shape << ": op output differs from the two ops";
    ExpectNmse("fused decode output vs qkv+rope+kv write, attention", shape, o1, o2, 0.0);
    std::vector<uint16_t> a(pool), b(pool);
    for (auto [x, y, what] : {std::tuple{&kf, &ku, "kernel's k pool"}, std::tuple{&vf, &vu, "kernel's v pool"},
                              std::tuple{&kb, &ku, "op's k pool"}, std::tuple{&vb, &vu, "op's v pool"}}) {
      gpu->Download(a.data(), x->raw(), pool * 2);
      gpu->Download(b.data(), y->raw(), pool * 2);
      EXPECT_EQ(std::memcmp(a.data(), b.data(), pool * 2), 0) << shape << ": " << what << " differs";
    }
    const auto q3h = Down(q3), q2h = Down(q2);
    if (op_fuses)
      EXPECT_TRUE(std::all_of(q3h.begin(), q3h.end(), [](float x) { return std::isnan(x); }))
          << shape << ": q written: the op did not run the fused kernel";
    else
      EXPECT_EQ(std::memcmp(q3h.data(), q2h.data(), q3h.size() * 4), 0) << shape << ": the op's q is not the two ops'";
  }
}

// The same fused decode kernel with Qwen3's per-head norms (QkvNormRopeCachedAttention): against the
// ops it replaces (SplitQkv, RmsNormForward of the q and k heads, RopeForward of both, KvCacheWrite,
// CachedAttentionForward) on a bf16 pool holding every earlier position: the kernel and the backend
// op give the attention output and both pools bit for bit (the norms' sums of squares are
// RmsNormVecKernel's: SumOfSquares4 and WarpSum), and the op leaves q unwritten when it fuses
// (OpFusesDecodeStep) and writes the ops' q when a switch sends it to them. Qwen3-0.6B's heads
// (16 / 8, D 128) at B = 256 and 32, and G = 7, 1 and 16 at D = 64, with and without a bias.
TEST(CudaOps, QkvNormRopeCachedAttentionEqualsItsOps) {
  REQUIRE_GPU();
  gpu->gemm().set_precision(GemmPrecision::kBF16);
  const float eps = 1e-6f;
  const std::vector<FusedDecodeCase> cases = {
      {16, 8, 128, 256, 1, 700, 16, false}, {16, 8, 128, 32, 1, 700, 16, true}, {14, 2, 64, 3, 1, 1500, 16, true},
      {4, 4, 64, 7, 1, 200, 32, false},     {16, 1, 64, 2, 1, 300, 16, true}};
  for (const FusedDecodeCase& c : cases) {
    const RandomDecodeStep step(c.B, c.ctx_lo, c.ctx_hi, c.bs, c.Hkv, c.D);
    const int B = c.B, bs = c.bs, QD = c.Hq * c.D, KD = c.Hkv * c.D, W = QD + 2 * KD;
    const int max_blocks = step.max_blocks, num_blocks = step.num_blocks;
    const size_t pool = step.pool;
    const auto qkv = Randn(size_t(B) * W, 3.0f), bias = Randn(W);
    auto qw = Randn(c.D, 0.2f), kw = Randn(c.D, 0.2f);
    for (float& x : qw) x += 1.0f;
    for (float& x : kw) x += 1.0f;
    const std::vector<float> inv_freq = RopeInvFreq(c.D);
    std::vector<Tensor> pools = step.Pools(3);
    Tensor d_table = Up(step.table), d_cu = Up(step.cu), d_start = Up(step.start), d_qkv = Up(qkv),
           d_bias = Up(bias), d_inv = Up(inv_freq), d_qw = Up(qw), d_kw = Up(kw);
    const float* d_b = c.bias ? d_bias.f32() : nullptr;
    const cuda::KvPages fused{pools[0].raw(), pools[1].raw(), true, num_blocks, bs, d_table.i32(), max_blocks};
    const bool op_fuses = OpFusesDecodeStep(c.D, true);
    const PagedKv by_op{pools[2].raw(), pools[3].raw(), DType::kBF16, num_blocks, bs, d_table.i32(), max_blocks};
    const PagedKv by_ops{pools[4].raw(), pools[5].raw(), DType::kBF16, num_blocks, bs, d_table.i32(), max_blocks};
    Tensor out1 = Poisoned(size_t(B) * QD), out2 = Poisoned(size_t(B) * QD), out3 = Poisoned(size_t(B) * QD);
    Tensor q2 = Poisoned(size_t(B) * QD), k2 = Poisoned(size_t(B) * KD), v2 = Poisoned(size_t(B) * KD);
    Tensor qn2 = Poisoned(size_t(B) * QD), kn2 = Poisoned(size_t(B) * KD), r2 = Poisoned(size_t(B) * c.Hq);
    Tensor q3 = Poisoned(size_t(B) * QD), k3 = Poisoned(size_t(B) * KD), v3 = Poisoned(size_t(B) * KD),
           r3 = Poisoned(size_t(B) * c.Hq);
    const size_t ws_bytes = cuda::CachedAttentionDecodeTcWorkspace(fused, B, c.Hq, c.Hkv, c.D);
    Tensor ws(DType::kF32, {int64_t(ws_bytes / 4 + 1)}, gpu->device());
    cuda::QkvRopeCachedAttentionDecodeTC(out1.f32(), d_qkv.f32(), d_b, d_start.i32(), d_inv.f32(), fused, d_cu.i32(),
                                         d_start.i32(), B, B, c.Hq, c.Hkv, c.D, ws.raw(), gpu->stream(), nullptr,
                                         d_qw.f32(), d_kw.f32(), eps);
    gpu->QkvNormRopeCachedAttention(out3.f32(), q3.f32(), k3.f32(), v3.f32(), r3.f32(), d_qkv.f32(), d_b,
                                    d_qw.f32(), d_kw.f32(), eps, d_start.i32(), d_inv.f32(), by_op, d_cu.i32(),
                                    d_start.i32(), B, B, c.Hq, c.Hkv, c.D);
    gpu->SplitQkv(q2.f32(), k2.f32(), v2.f32(), d_qkv.f32(), d_b, B, QD, KD);
    gpu->RmsNormForward(qn2.f32(), r2.f32(), q2.f32(), d_qw.f32(), B * c.Hq, c.D, eps);
    gpu->RmsNormForward(kn2.f32(), r2.f32(), k2.f32(), d_kw.f32(), B * c.Hkv, c.D, eps);
    gpu->RopeForward(qn2.f32(), d_start.i32(), d_inv.f32(), B, c.Hq, c.D);
    gpu->RopeForward(kn2.f32(), d_start.i32(), d_inv.f32(), B, c.Hkv, c.D);
    gpu->KvCacheWrite(by_ops, kn2.f32(), v2.f32(), d_cu.i32(), d_start.i32(), B, B, c.Hkv, c.D);
    gpu->CachedAttentionForward(out2.f32(), qn2.f32(), by_ops, d_cu.i32(), d_start.i32(), B, B, c.Hq, c.Hkv, c.D);
    const std::string shape = "B=" + std::to_string(B) + " H=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) +
                              " D=" + std::to_string(c.D) + " bs=" + std::to_string(bs) + (c.bias ? " bias" : "");
    const auto o1 = Down(out1), o2 = Down(out2), o3 = Down(out3);
    ASSERT_TRUE(std::none_of(o2.begin(), o2.end(), [](float x) { return std::isnan(x); })) << shape;
    EXPECT_EQ(std::memcmp(o1.data(), o2.data(), o1.size() * 4), 0) << shape << ": kernel output differs from the ops";
    EXPECT_EQ(std::memcmp(o3.data(), o2.data(), o3.size() * 4), 0) << shape << ": op output differs from the ops";
    ExpectNmse("fused decode with qk-norm vs its ops", shape, o1, o2, 0.0);
    std::vector<uint16_t> a(pool), b(pool);
    for (auto [x, y, what] : {std::tuple{0, 4, "kernel's k pool"}, std::tuple{1, 5, "kernel's v pool"},
                              std::tuple{2, 4, "op's k pool"}, std::tuple{3, 5, "op's v pool"}}) {
      gpu->Download(a.data(), pools[x].raw(), pool * 2);
      gpu->Download(b.data(), pools[y].raw(), pool * 2);
      EXPECT_EQ(std::memcmp(a.data(), b.data(), pool * 2), 0) << shape << ": " << what << " differs";
    }
    const auto q3h = Down(q3);
    if (op_fuses) {
      EXPECT_TRUE(std::all_of(q3h.begin(), q3h.end(), [](float x) { return std::isnan(x); }))
          << shape << ": q written: the op did not run the fused kernel";
    } else {
      EXPECT_EQ(std::memcmp(q3h.data(), Down(qn2).data(), q3h.size() * 4), 0) << shape << ": the op's q is not the ops'";
    }
  }
}

// The decode kernels (CachedAttentionForward picks them when every sequence has one new row, Nq ==
// B: cuda::CachedAttentionDecodeTC for bf16 pools with Hq / Hkv <= 16 and D 64 or 128,
// cuda::CachedAttentionDecode otherwise) on the shapes they must cover: contexts from 1 to 1500
// positions (so 1 to 24+ chunks, and splits of the context when B x Hkv is small: B = 1 and 3 here,
// none at B = 256), Hq / Hkv = 1, 2, 4, 7, 12 and 16 (one tensor-core tile; two head groups of the
// f32-math kernel) and 20 (past the tile: the f32-math kernel with bf16 pools too), D = 16, 32, 64,
// 128, block sizes 16 and 32, B = 1, 3 and 256 (with Qwen3-0.6B's 8 kv heads of 128 there: 2,048 items,
// the tensor-core kernel's 2-stage form), f32 and bf16 pools, shuffled block tables. Each case
// fills the cache with a prefill of context - 1 rows per sequence, then runs one decode round (write
// + attention) and checks it against the CPU as the paged test above does (same limits; kTcDecode
// for the tensor-core kernel).
TEST(CudaOps, CachedAttentionDecodeOneRowPerSequenceMatchesCpu) {
  REQUIRE_GPU();
  CpuBackend cpu;
  struct DecodeCase {
    int Hq, Hkv, D, block_size, B;
    std::vector<int> contexts;  // the first contexts; the rest drawn uniformly from [1, random_max]
    int random_max;
  };
  const std::vector<DecodeCase> cases = {
      {14, 2, 64, 16, 256, {1, 2, 15, 16, 17, 63, 64, 65, 129, 1100, 1031}, 400},  // the 0.5B bench shape
      {14, 2, 128, 32, 3, {1, 1200, 383}, 1},
      {4, 4, 128, 16, 1, {1500}, 1},
      {4, 4, 64, 32, 3, {1, 1025, 64}, 1},
      {8, 4, 64, 16, 3, {2, 1001, 33}, 1},
      {8, 4, 128, 32, 256, {1, 1100, 31, 32, 33}, 150},
      {14, 2, 64, 32, 1, {1}, 1},
      {12, 1, 64, 16, 3, {5, 700, 1030}, 1},
      {8, 2, 32, 16, 3, {1, 40, 1003}, 1},
      {4, 1, 16, 32, 1, {1024}, 1},
      {16, 1, 64, 16, 3, {1, 1500, 65}, 1},    // G = 16: a full tensor-core tile
      {32, 2, 128, 32, 1, {1030}, 1},          // G = 16, D = 128, many splits
      {16, 4, 128, 16, 256, {1, 2, 63, 64, 65, 640}, 300},  // G = 4, D = 128 at B = 256
      {16, 8, 128, 16, 256, {1, 2, 63, 64, 65, 640}, 300},  // Qwen3-0.6B's heads: 2,048 items, 2 stages
      {20, 1, 64, 16, 3, {3, 900, 64}, 1},     // G = 20 > 16: f32-math kernel for bf16 pools too
  };
  for (const DecodeCase& dc : cases) {
    std::mt19937_64 rng(test::NextSeed());
    std::vector<int> ctx(dc.B);
    for (int b = 0; b < dc.B; ++b) {
      ctx[b] = b < static_cast<int>(dc.contexts.size()) ? dc.contexts[b]
                                                        : std::uniform_int_distribution<int>(1, dc.random_max)(rng);
    }
    const int B = dc.B, bs = dc.block_size, Hq = dc.Hq, Hkv = dc.Hkv, D = dc.D;
    const int max_ctx = *std::max_element(ctx.begin(), ctx.end());
    const int max_blocks = (max_ctx + bs - 1) / bs + 1;  // one spare column: entries past a length are never read
    const size_t row = size_t(Hkv) * D;
    int needed = 0;
    for (int b = 0; b < B; ++b) needed += (ctx[b] + bs - 1) / bs;
    const int num_blocks = needed + 5;
    std::vector<int32_t> order(num_blocks);
    for (int i = 0; i < num_blocks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<int32_t> table(size_t(B) * max_blocks, -1);
    int next = 0;
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < (ctx[b] + bs - 1) / bs; ++j) table[size_t(b) * max_blocks + j] = order[next++];

    for (DType dtype : {DType::kF32, DType::kBF16}) {
      const bool bf16 = dtype == DType::kBF16;
      const size_t pool = size_t(num_blocks) * bs * row;
      std::vector<float> kc(pool, 0.0f), vc(pool, 0.0f), kc_r, vc_r;
      if (bf16) kc_r.assign(pool, 0.0f), vc_r.assign(pool, 0.0f);
      const PagedKv cpu_exact{kc.data(), vc.data(), DType::kF32, num_blocks, bs, table.data(), max_blocks};
      const PagedKv cpu_rounded{kc_r.data(), vc_r.data(), DType::kF32, num_blocks, bs, table.data(), max_blocks};
      const Shape pool_shape{num_blocks, bs, Hkv, D};
      Tensor d_kc = Tensor::Zeros(dtype, pool_shape, gpu->device()), d_vc = Tensor::Zeros(dtype, pool_shape, gpu->device());
      Tensor d_table = Up(table);
      const PagedKv gpu_cache{d_kc.raw(), d_vc.raw(), dtype, num_blocks, bs, d_table.i32(), max_blocks};
      auto rounded = [](std::vector<float> x) {
        for (float& e : x) e = BF16ToF32(F32ToBF16(e));
        return x;
      };
      // Round 0 fills positions 0 .. ctx - 2; round 1 is the decode step at position ctx - 1.
      for (int round = 0; round < 2; ++round) {
        std::vector<int32_t> cu{0}, start(B, 0);
        for (int b = 0; b < B; ++b) {
          cu.push_back(cu.back() + (round == 0 ? ctx[b] - 1 : 1));
          start[b] = round == 0 ? 0 : ctx[b] - 1;
        }
        const int Nq = cu.back();
        if (Nq == 0) continue;  // every context is 1: nothing to prefill
        auto k = Randn(size_t(Nq) * row), v = Randn(size_t(Nq) * row);
        Tensor d_k = Up(k), d_v = Up(v), d_cu = Up(cu), d_start = Up(start);
        cpu.KvCacheWrite(cpu_exact, k.data(), v.data(), cu.data(), start.data(), B, Nq, Hkv, D);
        if (bf16) {
          const auto kr = rounded(k), vr = rounded(v);
          cpu.KvCacheWrite(cpu_rounded, kr.data(), vr.data(), cu.data(), start.data(), B, Nq, Hkv, D);
        }
        gpu->KvCacheWrite(gpu_cache, d_k.f32(), d_v.f32(), d_cu.i32(), d_start.i32(), B, Nq, Hkv, D);
        if (round == 0) continue;
        auto q = Randn(size_t(Nq) * Hq * D);
        std::vector<float> out(q.size()), out_r(q.size());
        cpu.CachedAttentionForward(out.data(), q.data(), cpu_exact, cu.data(), start.data(), B, Nq, Hq, Hkv, D);
        if (bf16) {
          cpu.CachedAttentionForward(out_r.data(), q.data(), cpu_rounded, cu.data(), start.data(), B, Nq, Hq, Hkv, D);
        }
        Tensor d_q = Up(q), d_out = Poisoned(out.size());
        gpu->CachedAttentionForward(d_out.f32(), d_q.f32(), gpu_cache, d_cu.i32(), d_start.i32(), B, Nq, Hq, Hkv, D);
        const std::string shape = std::string(bf16 ? "bf16 " : "f32 ") + "decode B=" + std::to_string(B) +
                                  " ctx<=" + std::to_string(max_ctx) + " H=" + std::to_string(Hq) + "/" +
                                  std::to_string(Hkv) + " D=" + std::to_string(D) + " bs=" + std::to_string(bs);
        const auto got = Down(d_out);
        ExpectCachedAttention("decode attention", shape, got, out, out_r,
                              DecodeOnTensorCores(gpu_cache, B, Nq, Hq, Hkv, D), bf16);
      }
    }
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
      // With the logits kept from the forward (LmHeadForwardKeep / LmHeadBackwardKept): the same
      // products, the recompute skipped, so every output bit for bit the pair's above.
      Tensor k_lp = Poisoned(N), k_ent = Poisoned(N), k_lse = Poisoned(N), k_dh = Poisoned(h.size()), k_dw = Up(dw0),
             logits = Poisoned(size_t(N) * V);
      gpu->LmHeadForwardKeep(k_lp.f32(), k_ent.f32(), k_lse.f32(), d_h.f32(), d_w.f32(), d_t.i32(), N, C, V, T,
                             logits.f32());
      gpu->LmHeadBackwardKept(k_dh.f32(), k_dw.f32(), d_dlp.f32(), d_dent.f32(), d_h.f32(), d_w.f32(), d_t.i32(),
                              k_lse.f32(), k_ent.f32(), N, C, V, T, logits.f32());
      ExpectNmse("kept logits: logprob" + tag, shape, Down(k_lp), Down(d_lp), 0.0);
      ExpectNmse("kept logits: lse" + tag, shape, Down(k_lse), Down(d_lse), 0.0);
      ExpectNmse("kept logits: dh" + tag, shape, Down(k_dh), Down(d_dh), 0.0);
      ExpectNmse("kept logits: dw" + tag, shape, Down(k_dw), Down(d_dw), 0.0);
      gpu->UnregisterWeights(d_w.f32());
    }
  }
}

// ---- sampling ----------------------------------------------------------------------------------------

double ChiSquareCritical(int k) {
  const double z = 3.09, a = 2.0 / (9.0 * k);
  return k * std::pow(1 - a + z * std::sqrt(a), 3);
}

// One SampleRows call over d_logits [B, V], every row drawing with options o, row b keyed by
// (seeds[b], counters[b]); the drawn tokens and their log-probs come back (poisoned first).
void DrawRows(const Tensor& d_logits, int B, int V, const SamplingOptions& o, const std::vector<uint64_t>& seeds,
              const std::vector<uint64_t>& counters, std::vector<int32_t>& tok, std::vector<float>& lp) {
  CudaBackend* gpu = Gpu();
  Tensor d_T = Up(std::vector<float>(B, o.temperature)), d_k = Up(std::vector<int32_t>(B, o.top_k)),
         d_p = Up(std::vector<float>(B, o.top_p));
  Tensor d_seeds(DType::kF32, {2 * B}, gpu->device()), d_counters(DType::kF32, {2 * B}, gpu->device());
  gpu->Upload(d_seeds.raw(), seeds.data(), B * 8);
  gpu->Upload(d_counters.raw(), counters.data(), B * 8);
  Tensor d_tok = Poisoned(B), d_lp = Poisoned(B);
  gpu->SampleRows(reinterpret_cast<int32_t*>(d_tok.raw()), d_lp.f32(), d_logits.f32(), B, V, d_T.f32(), d_k.i32(),
                  d_p.f32(), static_cast<const uint64_t*>(d_seeds.raw()),
                  static_cast<const uint64_t*>(d_counters.raw()));
  tok.resize(B);
  lp.resize(B);
  gpu->Download(tok.data(), d_tok.raw(), B * 4);
  gpu->Download(lp.data(), d_lp.raw(), B * 4);
}

// log sum exp(z / t) over z[0, V), in f64: the behaviour log-prob of token j is z[j] / t minus this.
double LogSumExp(const float* z, int V, double t) {
  double m = -1e300, s = 0;
  for (int v = 0; v < V; ++v) m = std::max(m, double(z[v]) / t);
  for (int v = 0; v < V; ++v) s += std::exp(double(z[v]) / t - m);
  return m + std::log(s);
}

// A full-size row for the unfiltered draw: a few large logits far apart, the largest last (the
// running max moves late), the rest small or -inf (every third). Draws are counted by category:
// each large one, then "any other". The large logits are exact in bf16 (ExactLmHead keeps them).
struct FewLargeLogits {
  std::vector<float> row;
  std::vector<int> big;
  explicit FewLargeLogits(int V) : row(V), big{7, 60001, 100002, V - 1} {
    for (int i = 0; i < V; ++i) row[i] = i % 3 == 0 ? -INFINITY : -5.0f - 0.5f * std::sin(0.01f * i);
    const float big_logit[] = {5.0f, 4.625f, 4.25f, 5.375f};
    for (size_t j = 0; j < big.size(); ++j) row[big[j]] = big_logit[j];
  }
  size_t Category(int token) const { return std::find(big.begin(), big.end(), token) - big.begin(); }
  // Each category's probability under p (a distribution over the row).
  std::vector<double> Expected(const std::vector<double>& p) const {
    std::vector<double> e(big.size() + 1, 0.0);
    for (size_t v = 0; v < p.size(); ++v) e[Category(static_cast<int>(v))] += p[v];
    return e;
  }
};

// Pearson's chi-square of counts against probabilities over n draws.
double ChiSquare(const std::vector<long>& count, const std::vector<double>& p, long n) {
  double chi2 = 0;
  for (size_t j = 0; j < p.size(); ++j) {
    const double e = p[j] * n;
    chi2 += (count[j] - e) * (count[j] - e) / e;
  }
  return chi2;
}

// Pearson's chi-square of per-token counts against p over n draws, tokens expected fewer than 5
// times pooled into one more cell; *dof gets the degrees of freedom. A token of probability 0 must
// not have been drawn.
double PooledChiSquare(const std::vector<int>& count, const std::vector<double>& p, long n, int* dof) {
  double chi2 = 0, rest_e = 0;
  int cells = 0, rest = 0;
  for (size_t v = 0; v < p.size(); ++v) {
    if (p[v] == 0) {
      EXPECT_EQ(count[v], 0) << "token " << v << " has probability 0 but was drawn";
      continue;
    }
    const double e = p[v] * n;
    if (e < 5) {
      rest_e += e, rest += count[v];
      continue;
    }
    chi2 += (count[v] - e) * (count[v] - e) / e;
    ++cells;
  }
  if (rest_e > 0) chi2 += (rest - rest_e) * (rest - rest_e) / rest_e, ++cells;
  *dof = cells - 1;
  return chi2;
}

// ---- the lm-head product with the draw in its epilogue (LmHeadSample) ---------------------------------

float RoundToBf16(float x) {  // nearest even, as the device's casts (finite x)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isfinite(x)) u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

// Weights w[V, C] and rows x[B, C] whose product is exactly logits[v] = row[v] + 0.25 for every row
// b (row[] rounded to bf16 first): x = e_0 + e_130, w[v] = row[v] e_0 + 0.25 e_130 (C = 200: the
// second term lands in the third K step of 64; the fourth is partial). So the draw's distribution
// is known exactly, whatever the product's summation order.
struct ExactLmHead {
  int C = 200;
  std::vector<float> row, x, w;
  ExactLmHead(std::vector<float> r, int B) : row(std::move(r)) {
    const int V = static_cast<int>(row.size());
    for (float& z : row) z = RoundToBf16(z);
    w.assign(size_t(V) * C, 0.0f);
    for (int v = 0; v < V; ++v) {
      w[size_t(v) * C] = row[v];
      w[size_t(v) * C + 130] = 0.25f;
      row[v] += 0.25f;  // the logit (exact: -inf stays -inf)
    }
    x.assign(size_t(B) * C, 0.0f);
    for (int b = 0; b < B; ++b) x[size_t(b) * C] = x[size_t(b) * C + 130] = 1.0f;
  }
};

// One LmHeadSample call, row b with options opts[b % opts.size()] keyed by (seed, counter0 + b). The
// logits scratch comes back too (poisoned before: rows that do not filter must stay unwritten,
// which shows the fused kernel ran rather than LinearForward + SampleRows).
void FusedDraw(const Tensor& d_x, const Tensor& d_w, int B, int C, int V, const std::vector<SamplingOptions>& opts,
               uint64_t seed, uint64_t counter0, std::vector<int32_t>& tok, std::vector<float>& lp,
               Tensor* d_logits) {
  CudaBackend* gpu = Gpu();
  std::vector<float> T(B), P(B);
  std::vector<int32_t> K(B);
  std::vector<uint64_t> seeds(B, seed), counters(B);
  for (int b = 0; b < B; ++b) {
    const SamplingOptions& o = opts[b % opts.size()];
    T[b] = o.temperature, P[b] = o.top_p, K[b] = o.top_k, counters[b] = counter0 + b;
  }
  Tensor d_T = Up(T), d_k = Up(K), d_p = Up(P);
  Tensor d_seeds(DType::kF32, {2 * B}, gpu->device()), d_counters(DType::kF32, {2 * B}, gpu->device());
  gpu->Upload(d_seeds.raw(), seeds.data(), B * 8);
  gpu->Upload(d_counters.raw(), counters.data(), B * 8);
  Tensor d_tok = Poisoned(B), d_lp = Poisoned(B);
  const bool was_fused = gpu->fused_sample();
  gpu->set_fused_sample(true);
  gpu->Upload(d_logits->raw(), std::vector<float>(size_t(B) * V, std::numeric_limits<float>::quiet_NaN()).data(),
              size_t(B) * V * 4);
  gpu->LmHeadSample(reinterpret_cast<int32_t*>(d_tok.raw()), d_lp.f32(), d_logits->f32(), d_x.f32(), d_w.f32(), B, C,
                    V, d_T.f32(), d_k.i32(), d_p.f32(), static_cast<const uint64_t*>(d_seeds.raw()),
                    static_cast<const uint64_t*>(d_counters.raw()));
  gpu->set_fused_sample(was_fused);
  tok.resize(B);
  lp.resize(B);
  gpu->Download(tok.data(), d_tok.raw(), B * 4);
  gpu->Download(lp.data(), d_lp.raw(), B * 4);
}

// `rounds` FusedDraw calls of B rows that all draw with o (row b of round r keyed by (seed, r B + b))
// over lm's exact logits: each token drawn goes to `drawn` after the check that it is a token;
// *worst_lp gets the largest |log-prob - (z / T - log-sum-exp)|. Callers stop on a fatal failure.
void DrawRounds(const ExactLmHead& lm, const Tensor& d_x, const Tensor& d_w, int B, const SamplingOptions& o,
                uint64_t seed, int rounds, Tensor* d_logits, const std::function<void(int)>& drawn,
                double* worst_lp) {
  const int V = static_cast<int>(lm.row.size());
  const double lse = LogSumExp(lm.row.data(), V, o.temperature);
  std::vector<int32_t> tok;
  std::vector<float> lp;
  *worst_lp = 0;
  for (int round = 0; round < rounds; ++round) {
    FusedDraw(d_x, d_w, B, lm.C, V, {o}, seed, uint64_t(round) * B, tok, lp, d_logits);
    for (int b = 0; b < B; ++b) {
      ASSERT_TRUE(tok[b] >= 0 && tok[b] < V) << tok[b];
      drawn(tok[b]);
      *worst_lp = std::max(*worst_lp, std::abs(lp[b] - (lm.row[tok[b]] / o.temperature - lse)));
    }
  }
}

// Every kind of row in one batch of 301 (two row blocks of 256) over V = 300 (three vocabulary
// tiles of 128, the last partial): unfiltered at T = 0.7 and 1.3, greedy, top-k 5, top-p 0.8 and
// 0.05, top-k 10 with top-p 0.9. Draws
// against FilteredDistribution (chi-square), log-probs against the f64 log-softmax, greedy against
// the argmax; only the filtering rows' logits are written (equal to the exact logits).
TEST(CudaOps, LmHeadSampleMatchesTheDistributionForEveryKindOfRow) {
  REQUIRE_GPU();
  const int V = 300, B = 301, rounds = 200;
  std::vector<float> r(V);
  // All negative (a greedy row's max below 0), one -inf, and the second tile all -inf (nothing to
  // draw there: its partials must lose to every other tile's, greedy ones too).
  for (int i = 0; i < V; ++i) r[i] = std::sin(1.3f * i) + 0.002f * i - 3.0f;
  r[17] = -INFINITY;  // never drawn
  for (int i = 128; i < 256; ++i) r[i] = -INFINITY;
  const ExactLmHead lm(r, B);
  const int C = lm.C;
  Tensor d_x = Up(lm.x), d_w = Up(lm.w), d_logits = Poisoned(size_t(B) * V);
  gpu->RegisterWeights(d_w.f32(), d_w.numel());
  gpu->WeightsChanged(d_w.f32());
  // Top-p alone is drawn by rejection from the partial draws: at 0.8 in a round or two, at 0.05 in
  // many (or by the radix path after kRejectRounds); top-k with top-p by the radix path.
  const std::vector<SamplingOptions> opts = {{0.7f, 1.0f, 0}, {1.3f, 1.0f, 0}, {0.0f, 1.0f, 0}, {1.0f, 1.0f, 5},
                                             {0.9f, 0.8f, 0}, {1.0f, 0.05f, 0}, {1.1f, 0.9f, 10}};
  const int kinds = static_cast<int>(opts.size());
  std::vector<std::vector<int>> count(kinds, std::vector<int>(V, 0));
  double worst_lp = 0;
  const int greedy_id = static_cast<int>(std::max_element(lm.row.begin(), lm.row.end()) - lm.row.begin());
  std::vector<double> lse(kinds);  // at T, or 1 when greedy
  for (int k = 0; k < kinds; ++k)
    lse[k] = LogSumExp(lm.row.data(), V, opts[k].temperature > 0 ? opts[k].temperature : 1.0);
  std::vector<int32_t> tok;
  std::vector<float> lp;
  for (int round = 0; round < rounds; ++round) {
    FusedDraw(d_x, d_w, B, C, V, opts, 4321, uint64_t(round) * B, tok, lp, &d_logits);
    const std::vector<float> logits = Down(d_logits);
    for (int b = 0; b < B; ++b) {
      const SamplingOptions& o = opts[b % kinds];
      ASSERT_TRUE(tok[b] >= 0 && tok[b] < V) << "row " << b << " drew " << tok[b];
      ++count[b % kinds][tok[b]];
      const double t = o.temperature > 0 ? o.temperature : 1.0;
      worst_lp = std::max(worst_lp, std::abs(lp[b] - (lm.row[tok[b]] / t - lse[b % kinds])));
      if (o.temperature == 0) {
        ASSERT_EQ(tok[b], greedy_id) << "greedy row " << b;
      }
      const bool filters = o.temperature > 0 && (o.top_k > 0 || o.top_p < 1);
      for (int v = 0; v < V; v += 37) {
        const float z = logits[size_t(b) * V + v];
        if (filters) {
          ASSERT_EQ(z, lm.row[v]) << "row " << b << " (filtering) logit " << v;
        } else {
          ASSERT_TRUE(std::isnan(z)) << "row " << b << " (drawn in the product) had logit " << v << " written";
        }
      }
    }
  }
  for (int k = 0; k < kinds; ++k) {
    if (opts[k].temperature == 0) continue;
    const auto p = FilteredDistribution(lm.row.data(), V, opts[k]);
    int dof = 0;
    const double chi2 = PooledChiSquare(count[k], p, long(B / kinds) * rounds, &dof);
    std::cout << "  lm-head + sample T=" << opts[k].temperature << " top_p=" << opts[k].top_p
              << " top_k=" << opts[k].top_k << ": chi2 " << chi2 << " (critical " << ChiSquareCritical(dof) << ")\n";
    EXPECT_LT(chi2, ChiSquareCritical(dof));
  }
  std::cout << "  lm-head + sample: max logprob error " << worst_lp << "\n";
  EXPECT_LT(worst_lp, 1e-5);
  gpu->UnregisterWeights(d_w.f32());
}

// The decode step's shape, V = 151,936 and an odd 151,669 (the last tile partial): a few large
// logits far apart among small ones and -inf, so every block of the vocabulary holds part of the
// mass and the blocks' partial draws compete. Counts of each large one and of "any other".
TEST(CudaOps, LmHeadSampleLargeVocabularyMatchesTheDistribution) {
  REQUIRE_GPU();
  for (const int V : {151936, 151669}) {
    const int B = 256, rounds = 40;
    const FewLargeLogits few(V);
    const ExactLmHead lm(few.row, B);
    Tensor d_x = Up(lm.x), d_w = Up(lm.w), d_logits = Poisoned(size_t(B) * V);
    gpu->RegisterWeights(d_w.f32(), d_w.numel());
    gpu->WeightsChanged(d_w.f32());
    // Unfiltered; and top-p 0.95, which keeps the four large ones and about half the mass of the
    // others (so the rejection rounds meet tokens of both kinds).
    for (const SamplingOptions o : {SamplingOptions{0.8f, 1.0f, 0}, SamplingOptions{0.8f, 0.95f, 0}}) {
      const auto p = FilteredDistribution(lm.row.data(), V, o);
      const std::vector<double> expect = few.Expected(p);
      std::vector<long> count(expect.size(), 0);
      double worst_lp = 0;
      DrawRounds(
          lm, d_x, d_w, B, o, 99, rounds, &d_logits,
          [&](int t) {
            ASSERT_GT(p[t], 0.0) << "drew token " << t << ", outside the kept set";
            ++count[few.Category(t)];
          },
          &worst_lp);
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
      const float z = Down(d_logits)[12345];
      if (o.top_p < 1) {
        EXPECT_EQ(z, lm.row[12345]) << "a filtering row's logits must be written for the filtered path";
      } else {
        EXPECT_TRUE(std::isnan(z)) << "the logits were written: not the fused kernel";
      }
      const double chi2 = ChiSquare(count, expect, long(B) * rounds);
      const int dof = static_cast<int>(expect.size()) - 1;
      std::cout << "  lm-head + sample V=" << V << " top_p=" << o.top_p << ": chi2 " << chi2 << " (critical "
                << ChiSquareCritical(dof) << "), other tokens " << count.back() << " of " << B * rounds
                << " (expected " << expect.back() * B * rounds << "), max logprob error " << worst_lp << "\n";
      EXPECT_LT(chi2, ChiSquareCritical(dof)) << "V " << V << " top_p " << o.top_p;
      EXPECT_LT(worst_lp, 2e-5) << "V " << V;
    }
    gpu->UnregisterWeights(d_w.f32());
  }
}

// Top-k at the decode step's vocabulary, where the draw gathers the top-k candidates from the tiles'
// maxima (151 of them at K = 50, 302 at K = 200 with top-p 0.5, 1,371 at K = 1,000) or, with more
// than 2,048 (K = 1,500 exceeds the 1,187 tiles: every token would be one), takes the radix path.
// The row's logits are 1,000 levels in (-2, 0], bf16-rounded, so each level is shared by ~150 tokens
// and the cuts fall inside ties (broken by id, as engine/sampler.cc's strict order does).
TEST(CudaOps, LmHeadSampleTopKAtTheFullVocabularyMatchesTheDistribution) {
  REQUIRE_GPU();
  const int V = 151936, B = 256, rounds = 40;
  std::vector<float> r(V);
  for (int i = 0; i < V; ++i) r[i] = -2.0f * static_cast<float>((uint32_t(i) * 2654435761u) % 1000u) / 1000.0f;
  const ExactLmHead lm(r, B);
  Tensor d_x = Up(lm.x), d_w = Up(lm.w), d_logits = Poisoned(size_t(B) * V);
  gpu->RegisterWeights(d_w.f32(), d_w.numel());
  gpu->WeightsChanged(d_w.f32());
  for (const SamplingOptions o : {SamplingOptions{1.0f, 1.0f, 50}, SamplingOptions{0.7f, 0.5f, 200},
                                  SamplingOptions{1.0f, 1.0f, 1000}, SamplingOptions{1.0f, 1.0f, 1500}}) {
    const auto p = FilteredDistribution(lm.row.data(), V, o);
    std::vector<int> count(V, 0);
    double worst_lp = 0;
    DrawRounds(lm, d_x, d_w, B, o, 7, rounds, &d_logits, [&](int t) { ++count[t]; }, &worst_lp);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    int dof = 0;
    const double chi2 = PooledChiSquare(count, p, long(B) * rounds, &dof);
    std::cout << "  lm-head + sample V=" << V << " top_k=" << o.top_k << " top_p=" << o.top_p << ": chi2 " << chi2
              << " (critical " << ChiSquareCritical(dof) << "), max logprob error " << worst_lp << "\n";
    EXPECT_LT(chi2, ChiSquareCritical(dof)) << "top_k " << o.top_k;
    EXPECT_LT(worst_lp, 2e-5) << "top_k " << o.top_k;
  }
  gpu->UnregisterWeights(d_w.f32());
}

// Random bf16 rows and weights at the bench's shape (C = 896): the fused draw's log-prob against the
// log-softmax of cuBLAS's logits of the same operands (summation order apart, the same numbers),
// greedy rows' token against their argmax, filtered rows' token (top-k with top-p, top-p alone)
// inside the kept set.
TEST(CudaOps, LmHeadSampleAgreesWithTheProductOnRandomRows) {
  REQUIRE_GPU();
  const int B = 256, C = 896, V = 151936;
  std::vector<float> x = Randn(size_t(B) * C, 1.0f), w = Randn(size_t(V) * C, 0.1f);
  for (float& v : x) v = RoundToBf16(v);
  for (float& v : w) v = RoundToBf16(v);
  Tensor d_x = Up(x), d_w = Up(w), d_ref = Poisoned(size_t(B) * V), d_logits = Poisoned(size_t(B) * V);
  gpu->RegisterWeights(d_w.f32(), d_w.numel());
  gpu->WeightsChanged(d_w.f32());
  gpu->LinearForward(d_ref.f32(), d_x.f32(), d_w.f32(), nullptr, B, C, V);
  const std::vector<float> ref = Down(d_ref);
  const std::vector<SamplingOptions> opts = {{1.0f, 1.0f, 0}, {0.0f, 1.0f, 0}, {0.6f, 1.0f, 0}, {1.0f, 0.9f, 20},
                                             {0.8f, 0.9f, 0}};
  std::vector<int32_t> tok;
  std::vector<float> lp;
  FusedDraw(d_x, d_w, B, C, V, opts, 5, 0, tok, lp, &d_logits);
  double worst_lp = 0;
  for (int b = 0; b < B; ++b) {
    const SamplingOptions& o = opts[b % opts.size()];
    const float* z = ref.data() + size_t(b) * V;
    ASSERT_TRUE(tok[b] >= 0 && tok[b] < V) << tok[b];
    const double t = o.temperature > 0 ? o.temperature : 1.0;
    worst_lp = std::max(worst_lp, std::abs(lp[b] - (z[tok[b]] / t - LogSumExp(z, V, t))));
    if (o.temperature == 0) {
      EXPECT_EQ(tok[b], std::max_element(z, z + V) - z) << "greedy row " << b;
    }
    if (o.top_k > 0 || o.top_p < 1) {
      EXPECT_GT(FilteredDistribution(z, V, o)[tok[b]], 0.0) << "row " << b << " drew outside the set";
    }
  }
  std::cout << "  lm-head + sample against cuBLAS's logits: max logprob error " << worst_lp << "\n";
  EXPECT_LT(worst_lp, 2e-3);
  gpu->UnregisterWeights(d_w.f32());
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
    const std::vector<uint64_t> s(B, 1234);
    std::vector<uint64_t> c(B);
    std::vector<int32_t> tok;
    std::vector<float> lp;
    double worst_lp = 0;
    const double lse = LogSumExp(row.data(), V, o.temperature);  // behaviour log-prob: the full log-softmax at T
    for (int r = 0; r < rounds; ++r) {
      for (int b = 0; b < B; ++b) c[b] = static_cast<uint64_t>(r) * B + b;
      DrawRows(d_logits, B, V, o, s, c, tok, lp);
      for (int b = 0; b < B; ++b) {
        ASSERT_TRUE(tok[b] >= 0 && tok[b] < V) << tok[b];
        ++count[tok[b]];
        worst_lp = std::max(worst_lp, std::abs(lp[b] - (row[tok[b]] / o.temperature - lse)));
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
    std::vector<uint64_t> s(B);
    for (int b = 0; b < B; ++b) s[b] = 77 + b;
    std::vector<int32_t> tok;
    std::vector<float> lp;
    DrawRows(d_logits, B, V, o, s, std::vector<uint64_t>(B, 0), tok, lp);
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

// The unfiltered draw over a full-size row (the path of every plain sampling step, which takes four
// logits at a time): a few large logits far apart, the largest last (the running max moves late),
// the rest small or -inf. Counts of each large one and of "any other" against the distribution.
// V = 151,669 (an odd vocabulary: rows not 16-byte aligned) peels each row's ends before its float4s.
TEST(CudaOps, SampleRowsUnfilteredLargeVocabularyMatchesTheDistribution) {
  REQUIRE_GPU();
  for (const int V : {151936, 151669}) {
    const int B = 512, rounds = 40;
    const FewLargeLogits few(V);
    std::vector<float> logits;
    logits.reserve(size_t(B) * V);
    for (int b = 0; b < B; ++b) logits.insert(logits.end(), few.row.begin(), few.row.end());
    Tensor d_logits = Up(logits);
    const SamplingOptions o{0.8f, 1.0f, 0};
    const auto p = FilteredDistribution(few.row.data(), V, o);
    const std::vector<double> expect = few.Expected(p);
    const double lse = LogSumExp(few.row.data(), V, o.temperature);
    std::vector<long> count(expect.size(), 0);
    double worst_lp = 0;
    const std::vector<uint64_t> sd(B, 99);
    std::vector<uint64_t> c(B);
    std::vector<int32_t> tok;
    std::vector<float> lp;
    for (int r = 0; r < rounds; ++r) {
      for (int b = 0; b < B; ++b) c[b] = static_cast<uint64_t>(r) * B + b;
      DrawRows(d_logits, B, V, o, sd, c, tok, lp);
      for (int b = 0; b < B; ++b) {
        ASSERT_TRUE(tok[b] >= 0 && tok[b] < V) << tok[b];
        ASSERT_GT(p[tok[b]], 0.0) << "drew token " << tok[b] << ", whose logit is -inf";
        ++count[few.Category(tok[b])];
        worst_lp = std::max(worst_lp, std::abs(lp[b] - (few.row[tok[b]] / o.temperature - lse)));
      }
    }
    const double chi2 = ChiSquare(count, expect, long(B) * rounds);
    const int dof = static_cast<int>(expect.size()) - 1;
    std::cout << "  sample V=" << V << " T=" << o.temperature << " unfiltered: chi2 " << chi2 << " (critical "
              << ChiSquareCritical(dof) << "), other tokens " << count.back() << " of " << B * rounds << " (expected "
              << expect.back() * B * rounds << "), max logprob error " << worst_lp << "\n";
    EXPECT_LT(chi2, ChiSquareCritical(dof)) << "V " << V;
    EXPECT_LT(worst_lp, 2e-5) << "V " << V;
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

void CompareModels(Arch arch, GemmPrecision prec, double lp_limit, double grad_limit, int head_dim = 32) {
  CudaBackend* gpu = Gpu();
  gpu->gemm().set_precision(prec);
  CpuBackend cpu;
  ModelConfig config = SmallConfig(arch);
  config.head_dim = head_dim;
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
  const std::string tag = std::string(ArchName(arch)) + (prec == GemmPrecision::kF32 ? " f32" : " bf16") +
                          " D=" + std::to_string(head_dim);
  std::cout << "  model " << tag << ": max |logprob or entropy difference| " << worst << "\n";
  EXPECT_LT(worst, lp_limit) << tag;
  {  // The trainer's frozen reference: one layer's buffers, forwards only: the same figures bit for bit.
    auto mr = Transformer::Init(config, 42, gpu);
    mr->set_recompute(true);
    mr->set_forward_only(true);
    std::vector<float> lr(N), er(N);
    mr->Forward(tokens.data(), cu.data(), S, N, 0.8f, lr.data(), er.data());
    EXPECT_EQ(std::memcmp(lr.data(), lg.data(), N * sizeof(float)), 0) << tag << ": log-probs of a forward alone";
    EXPECT_EQ(std::memcmp(er.data(), eg.data(), N * sizeof(float)), 0) << tag << ": entropies of a forward alone";
  }
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
  // Now that the model has gradients its Forward keeps the logits for the Backward (no lm-head
  // recompute): the same log-probs bit for bit, and the same gradients up to the order of the
  // attention backward's and the norms' float atomics.
  std::vector<float> lg2(N), eg2(N), gg2(gg.size());
  mg->ZeroGrad();
  mg->Forward(tokens.data(), cu.data(), S, N, 0.8f, lg2.data(), eg2.data());
  mg->Backward(dlp.data(), dent.data());
  gpu->Download(gg2.data(), mg->grads(), gg2.size() * 4);
  EXPECT_EQ(std::memcmp(lg2.data(), lg.data(), N * sizeof(float)), 0) << tag << ": log-probs with kept logits";
  ExpectNmse("gradients with kept logits", tag, gg2, gg, prec == GemmPrecision::kF32 ? 1e-10 : 1e-5);
  // Completions only (score_from: the lm-head on the gathered rows of scored positions, its
  // gradients scattered back), on both backends: the CPU's figures within the same limits.
  const std::vector<int32_t> from{0, 30, 100, 1, 128};
  std::vector<float> lc3(N), ec3(N), lg3(N), eg3(N), gg3(gg.size());
  mc->ZeroGrad();
  mg->ZeroGrad();
  mc->Forward(tokens.data(), cu.data(), S, N, 0.8f, lc3.data(), ec3.data(), from.data());
  mg->Forward(tokens.data(), cu.data(), S, N, 0.8f, lg3.data(), eg3.data(), from.data());
  double worst3 = 0;
  int scored = 0;
  for (int i = 0; i < N; ++i) {
    worst3 = std::max({worst3, std::abs(double(lc3[i]) - lg3[i]), std::abs(double(ec3[i]) - eg3[i])});
    scored += lc3[i] != 0.0f;
  }
  EXPECT_LT(worst3, lp_limit) << tag << ": scored positions only";
  EXPECT_EQ(scored, (69 - 30) + (130 - 100) + (256 - 128)) << tag;  // sequences 0 and 3 have one token
  mc->Backward(dlp.data(), dent.data());
  mg->Backward(dlp.data(), dent.data());
  gpu->Download(gg3.data(), mg->grads(), gg3.size() * 4);
  std::vector<float> gc3(mc->grads(), mc->grads() + gc.size());
  ExpectNmse("gradients, scored positions only", tag, gg3, gc3, grad_limit);
}

// Head width 32 runs the f32 attention kernels; 64 and 128 (bf16 products) the tensor-core ones,
// with the fused q/k/v kernels (Qwen3's with its norms) and the wgmma backward, whose P and dS are
// rounded to bf16 as FlashAttention's: their gradients get 2e-3.
TEST(CudaModel, ForwardBackwardMatchCpu) {
  REQUIRE_GPU();
  for (Arch a : {Arch::kQwen2, Arch::kQwen3, Arch::kLlama}) {
    CompareModels(a, GemmPrecision::kF32, 1e-4, 1e-8);
    CompareModels(a, GemmPrecision::kBF16, 5e-2, 1e-3);
    for (int D : {64, 128}) CompareModels(a, GemmPrecision::kBF16, 5e-2, 2e-3, D);
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
  std::vector<int32_t> stops;  // 60 of the 3001 ids: about half of the requests that have them stop early
  for (int32_t t = 7; t < config.vocab_size && stops.size() < 60; t += 49) stops.push_back(t);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = RandInt(5 + i * 3, 0, config.vocab_size - 1);
    reqs[i].sampling = {0.9f, 1.0f, 0};
    reqs[i].seed = i;
    reqs[i].max_new_tokens = 40;
    if (i % 3 == 0) reqs[i].stop_token_ids = stops;  // rows that stop while the next step is queued
  }
  // Fewer rows than requests: continuous batching refills. Then a 512-token pool (8 sequences of up
  // to 114 tokens do not fit): decode steps preempt and re-admitted sequences prefill again.
  for (int64_t pool_tokens : {int64_t{0}, int64_t{512}}) {
    Generator gen(model.get(), 8, 200, {.kv_cache_tokens = pool_tokens});
    auto out = gen.Generate(reqs);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    if (pool_tokens > 0) {
      EXPECT_GT(gen.stats().preemptions, 0);
    }
    EXPECT_EQ(gen.free_blocks(), gen.num_blocks());
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
    std::cout << "  actor vs learner log-probs (bf16, " << DTypeName(gpu->kv_cache_dtype()) << " KV cache, pool "
              << gen.num_blocks() << " blocks, " << gen.stats().preemptions << " preemptions, "
              << gen.stats().steps_ahead << " of " << gen.stats().decode_steps << " steps run ahead, "
              << gen.stats().rows_dropped_ahead << " rows dropped, " << n << " tokens): mean |diff| " << sum / n
              << ", max " << worst << "\n";
    EXPECT_GT(gen.stats().steps_ahead, 0);
    EXPECT_LT(worst, 5e-2);
    EXPECT_LT(sum / n, 5e-3);
  }
}

// Decode step k + 1 queued before step k's tokens are read (GeneratorOptions::run_ahead, its input
// tokens taken from step k's draws on the device) against one step at a time: with every row running
// to the same cap the batches are the same, so the completions are the same bit for bit, and every
// step but the first and the last is run ahead.
TEST(CudaModel, RunAheadGivesTheStepByStepCompletions) {
  REQUIRE_GPU();
  const ModelConfig config = SmallConfig(Arch::kQwen2);
  auto model = Transformer::Init(config, 11, gpu);
  std::vector<GenerationRequest> reqs(12);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = RandInt(4 + i * 5, 0, config.vocab_size - 1);
    reqs[i].sampling = {1.0f, i % 4 == 1 ? 0.9f : 1.0f, i % 4 == 2 ? 40 : 0};
    reqs[i].seed = 300 + i;
    reqs[i].max_new_tokens = 30;
  }
  auto run = [&](bool ahead, GeneratorStats* stats) {
    Generator gen(model.get(), 12, 96, {.run_ahead = ahead});
    auto out = gen.Generate(reqs);
    EXPECT_TRUE(out.ok()) << out.status().ToString();
    EXPECT_EQ(gen.free_blocks(), gen.num_blocks());
    *stats = gen.stats();
    return *out;
  };
  GeneratorStats s0, s1, s2;
  run(false, &s0);  // products tuned and graphs captured before the two compared runs
  const auto want = run(false, &s1);
  const auto got = run(true, &s2);
  EXPECT_EQ(s1.steps_ahead, 0);
  EXPECT_EQ(s2.decode_steps, 29);
  EXPECT_EQ(s2.steps_ahead, 28);
  EXPECT_EQ(s2.rows_dropped_ahead, 0);
  std::cout << "  run ahead: " << s2.steps_ahead << " of " << s2.decode_steps << " steps; device idle between passes "
            << s2.launch_gap_seconds * 1e3 << " ms (one step at a time: " << s1.launch_gap_seconds * 1e3 << " ms)\n";
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << i;
    EXPECT_EQ(got[i].logprobs, want[i].logprobs) << "request " << i;
  }
}

}  // namespace
}  // namespace aha::engine
