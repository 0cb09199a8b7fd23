// Op conformance for the CPU backend: forward against naive references, backward against central
// finite differences of a random linear functional L = sum_i r_i * out_i (accumulated in f64).
//
// Tolerances: the ops run in f32, so a central difference with step h = 1e-2 on O(1) inputs carries
// rounding error ~ 1e-7 * |L| / h plus truncation ~ h^2 * |f'''|; we observed relative errors of
// 1e-4..2e-3 between analytic and numeric gradients, and use 1e-2 of the gradient's max magnitude
// (kGradTol) as the bar: a wrong term in a backward pass produces O(1) relative error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/sampler.h"

namespace aha::engine {
namespace {

constexpr double kGradTol = 1e-2;

std::vector<float> Randn(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Compares analytic gradient `grad` of f with respect to `x` against central differences.
void ExpectGradMatches(std::vector<float>& x, const std::vector<float>& grad, const std::function<double()>& f,
                       const char* what, float h = 1e-2f) {
  ASSERT_EQ(x.size(), grad.size()) << what;
  double max_abs = 1e-6;
  for (float g : grad) max_abs = std::max(max_abs, std::abs(static_cast<double>(g)));
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float saved = x[i];
    x[i] = saved + h;
    const double fp = f();
    x[i] = saved - h;
    const double fm = f();
    x[i] = saved;
    const double num = (fp - fm) / (2.0 * h);
    worst = std::max(worst, std::abs(num - grad[i]) / max_abs);
  }
  EXPECT_LT(worst, kGradTol) << what << ": worst |numeric - analytic| / max|grad| = " << worst;
}

TEST(Ops, RmsNormForwardAndBackward) {
  CpuBackend B;
  const int N = 5, C = 12;
  auto x = Randn(N * C, 1), w = Randn(C, 2), r = Randn(N * C, 3);
  for (auto& v : w) v += 1.0f;
  std::vector<float> out(N * C), rstd(N);
  B.RmsNormForward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f);
  for (int n = 0; n < N; ++n) {
    double ss = 0;
    for (int c = 0; c < C; ++c) ss += x[n * C + c] * x[n * C + c];
    for (int c = 0; c < C; ++c)
      EXPECT_NEAR(out[n * C + c], x[n * C + c] / std::sqrt(ss / C + 1e-6) * w[c], 1e-5);
  }
  std::vector<float> dx(N * C, 0.0f), dw(C, 0.0f);
  B.RmsNormBackward(dx.data(), dw.data(), r.data(), x.data(), w.data(), rstd.data(), N, C);
  auto f = [&] {
    B.RmsNormForward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f);
    return Dot(out, r);
  };
  ExpectGradMatches(x, dx, f, "rmsnorm dx");
  ExpectGradMatches(w, dw, f, "rmsnorm dw");
}

TEST(Ops, RmsNormBackwardAccumulatesIntoDx) {
  CpuBackend B;
  const int N = 2, C = 4;
  auto x = Randn(N * C, 4), w = Randn(C, 5), g = Randn(N * C, 6);
  std::vector<float> out(N * C), rstd(N), dx1(N * C, 0.0f), dx2(N * C, 1.0f), dw(C, 0.0f);
  B.RmsNormForward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f);
  B.RmsNormBackward(dx1.data(), dw.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
  B.RmsNormBackward(dx2.data(), dw.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
  for (int i = 0; i < N * C; ++i) EXPECT_FLOAT_EQ(dx2[i], dx1[i] + 1.0f);
}

// The fused op must compute exactly what the two ops it replaces compute (the transformer switched
// to it, and the CPU model tests compare against fixtures made with the unfused ops): bit for bit,
// on odd widths, and with y aliasing x.
TEST(Ops, AddRmsNormEqualsAddThenRmsNormBitForBit) {
  CpuBackend B;
  for (auto [N, C] : {std::pair{5, 12}, std::pair{3, 37}, std::pair{64, 896}}) {
    auto x = Randn(size_t(N) * C, 30, 2.0f), y = Randn(size_t(N) * C, 31), w = Randn(C, 32);
    std::vector<float> sum(x.size()), ln(x.size()), rstd(N);
    B.Add(sum.data(), x.data(), y.data(), x.size());
    B.RmsNormForward(ln.data(), rstd.data(), sum.data(), w.data(), N, C, 1e-6f);
    std::vector<float> xf = x, lnf(x.size(), std::nanf("")), rstdf(N, std::nanf(""));
    B.AddRmsNormForward(xf.data(), lnf.data(), rstdf.data(), y.data(), w.data(), N, C, 1e-6f);
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(xf[i], sum[i]) << "x += y at " << i << " [" << N << "," << C << "]";
      ASSERT_EQ(lnf[i], ln[i]) << "ln at " << i << " [" << N << "," << C << "]";
    }
    for (int n = 0; n < N; ++n) ASSERT_EQ(rstdf[n], rstd[n]) << "rstd row " << n;
    // y = x: the residual doubles in place.
    std::vector<float> xx = x, twice(x.size());
    B.Add(twice.data(), x.data(), x.data(), x.size());
    B.RmsNormForward(ln.data(), rstd.data(), twice.data(), w.data(), N, C, 1e-6f);
    B.AddRmsNormForward(xx.data(), lnf.data(), rstdf.data(), xx.data(), w.data(), N, C, 1e-6f);
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(xx[i], twice[i]) << "x += x at " << i;
      ASSERT_EQ(lnf[i], ln[i]) << "ln of 2x at " << i;
    }
  }
}

TEST(Ops, RopeMatchesRotateHalfAndBackwardIsInverse) {
  CpuBackend B;
  const int N = 4, H = 3, D = 8;
  auto x = Randn(N * H * D, 7), r = Randn(N * H * D, 8);
  std::vector<int32_t> pos = {0, 1, 5, 17};
  RopeSpec spec;
  auto inv = RopeInverseFrequencies(spec, D);
  std::vector<float> y = x;
  B.RopeForward(y.data(), pos.data(), inv.data(), N, H, D);
  for (int n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < D / 2; ++i) {
        const float* p = x.data() + (n * H + h) * D;
        const double a = pos[n] * std::pow(10000.0, -2.0 * i / D);
        EXPECT_NEAR(y[(n * H + h) * D + i], p[i] * std::cos(a) - p[i + D / 2] * std::sin(a), 1e-4);
        EXPECT_NEAR(y[(n * H + h) * D + i + D / 2], p[i + D / 2] * std::cos(a) + p[i] * std::sin(a), 1e-4);
      }
  std::vector<float> dx = r;
  B.RopeBackward(dx.data(), pos.data(), inv.data(), N, H, D);
  auto f = [&] {
    y = x;
    B.RopeForward(y.data(), pos.data(), inv.data(), N, H, D);
    return Dot(y, r);
  };
  ExpectGradMatches(x, dx, f, "rope dx");
}

TEST(Ops, Llama3RopeScalingKeepsHighSlowsLowInterpolatesMiddle) {
  RopeSpec spec;
  spec.theta = 500000.0;
  spec.llama3 = true;
  spec.factor = 8.0;
  spec.low_freq_factor = 1.0;
  spec.high_freq_factor = 4.0;
  spec.original_max_positions = 64;
  const int D = 16;
  auto scaled = RopeInverseFrequencies(spec, D);
  spec.llama3 = false;
  auto plain = RopeInverseFrequencies(spec, D);
  // wavelength 2*pi/f: < 16 unchanged, > 64 divided by 8, between: smooth blend.
  for (int i = 0; i < D / 2; ++i) {
    const double wl = 2 * M_PI / plain[i];
    if (wl < 16) EXPECT_FLOAT_EQ(scaled[i], plain[i]);
    else if (wl > 64) EXPECT_FLOAT_EQ(scaled[i], plain[i] / 8.0f);
    else {
      const double s = (64 / wl - 1.0) / 3.0;
      EXPECT_NEAR(scaled[i], (1 - s) * plain[i] / 8 + s * plain[i], 1e-6 * plain[i]);
    }
  }
}

TEST(Ops, LinearWithBiasBackward) {
  CpuBackend B;
  const int N = 3, C = 5, OC = 4;
  auto x = Randn(N * C, 9), w = Randn(OC * C, 10), b = Randn(OC, 11), r = Randn(N * OC, 12);
  std::vector<float> out(N * OC);
  B.LinearForward(out.data(), x.data(), w.data(), b.data(), N, C, OC);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OC; ++o) {
      double s = b[o];
      for (int c = 0; c < C; ++c) s += x[n * C + c] * w[o * C + c];
      EXPECT_NEAR(out[n * OC + o], s, 1e-5);
    }
  std::vector<float> dx(N * C, 0.0f), dw(OC * C, 0.0f), db(OC, 0.0f);
  B.LinearBackward(dx.data(), dw.data(), db.data(), r.data(), x.data(), w.data(), N, C, OC, false);
  auto f = [&] {
    B.LinearForward(out.data(), x.data(), w.data(), b.data(), N, C, OC);
    return Dot(out, r);
  };
  ExpectGradMatches(x, dx, f, "linear dx");
  ExpectGradMatches(w, dw, f, "linear dw");
  ExpectGradMatches(b, db, f, "linear db");
}

TEST(Ops, PackedSwiGluForwardAndBackward) {
  CpuBackend B;
  const int N = 3, I = 7;
  // gu rows are gate | up; the gates get a wider spread so silu's curved part is exercised.
  std::vector<float> gu(N * 2 * I);
  auto gate = Randn(N * I, 13, 2.0f), up = Randn(N * I, 14), r = Randn(N * I, 15);
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < I; ++i) {
      gu[n * 2 * I + i] = gate[n * I + i];
      gu[n * 2 * I + I + i] = up[n * I + i];
    }
  std::vector<float> h(N * I), dgu(N * 2 * I, std::nanf(""));
  B.SwiGluForward(h.data(), gu.data(), N, I);
  for (int i = 0; i < N * I; ++i) EXPECT_NEAR(h[i], gate[i] / (1 + std::exp(-gate[i])) * up[i], 1e-5);
  B.SwiGluBackward(dgu.data(), r.data(), gu.data(), N, I);
  auto f = [&] {
    B.SwiGluForward(h.data(), gu.data(), N, I);
    return Dot(h, r);
  };
  ExpectGradMatches(gu, dgu, f, "swiglu dgu");
}

TEST(Ops, FusedQkvProductAndSplitEqualThreeLinears) {
  // One product over [Wq; Wk; Wv] and the split with [bq; bk; bv] equal three biased products.
  CpuBackend B;
  const int N = 5, C = 6, QD = 8, KD = 4, W = QD + 2 * KD;
  auto x = Randn(N * C, 20), w = Randn(W * C, 21), b = Randn(W, 22);
  std::vector<float> qkv(N * W), q(N * QD), k(N * KD), v(N * KD);
  B.LinearForward(qkv.data(), x.data(), w.data(), nullptr, N, C, W);
  B.SplitQkv(q.data(), k.data(), v.data(), qkv.data(), b.data(), N, QD, KD);
  std::vector<float> q1(N * QD), k1(N * KD), v1(N * KD);
  B.LinearForward(q1.data(), x.data(), w.data(), b.data(), N, C, QD);
  B.LinearForward(k1.data(), x.data(), w.data() + QD * C, b.data() + QD, N, C, KD);
  B.LinearForward(v1.data(), x.data(), w.data() + (QD + KD) * C, b.data() + QD + KD, N, C, KD);
  for (int i = 0; i < N * QD; ++i) EXPECT_NEAR(q[i], q1[i], 1e-5) << "q " << i;
  for (int i = 0; i < N * KD; ++i) EXPECT_NEAR(k[i], k1[i], 1e-5) << "k " << i;
  for (int i = 0; i < N * KD; ++i) EXPECT_NEAR(v[i], v1[i], 1e-5) << "v " << i;
  // Without a bias the split is a copy.
  B.SplitQkv(q.data(), k.data(), v.data(), qkv.data(), nullptr, N, QD, KD);
  for (int n = 0; n < N; ++n) {
    for (int c = 0; c < QD; ++c) EXPECT_EQ(q[n * QD + c], qkv[n * W + c]);
    for (int c = 0; c < KD; ++c) EXPECT_EQ(k[n * KD + c], qkv[n * W + QD + c]);
    for (int c = 0; c < KD; ++c) EXPECT_EQ(v[n * KD + c], qkv[n * W + QD + KD + c]);
  }
}

TEST(Ops, PackQkvIsTheBackwardOfSplitQkv) {
  // L = rq.q + rk.k + rv.v after the split: dL/dqkv = PackQkv(rq, rk, rv), dL/dbias = its column
  // sums (LinearBackward's db of the fused product), checked by finite differences.
  CpuBackend B;
  const int N = 4, QD = 6, KD = 2, W = QD + 2 * KD;
  auto qkv = Randn(N * W, 30), b = Randn(W, 31);
  auto rq = Randn(N * QD, 32), rk = Randn(N * KD, 33), rv = Randn(N * KD, 34);
  std::vector<float> q(N * QD), k(N * KD), v(N * KD), dqkv(N * W, std::nanf("")), db(W, 0.0f);
  B.PackQkv(dqkv.data(), rq.data(), rk.data(), rv.data(), N, QD, KD);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < W; ++c) db[c] += dqkv[n * W + c];
  auto f = [&] {
    B.SplitQkv(q.data(), k.data(), v.data(), qkv.data(), b.data(), N, QD, KD);
    return Dot(q, rq) + Dot(k, rk) + Dot(v, rv);
  };
  ExpectGradMatches(qkv, dqkv, f, "split dqkv");
  ExpectGradMatches(b, db, f, "split dbias");
}

TEST(Ops, EmbeddingBackwardAccumulatesRepeatedIds) {
  CpuBackend B;
  const int V = 5, C = 3, N = 4;
  auto wte = Randn(V * C, 16), g = Randn(N * C, 17);
  std::vector<int32_t> ids = {2, 0, 2, 4};
  std::vector<float> out(N * C), dwte(V * C, 0.0f);
  B.EmbeddingForward(out.data(), ids.data(), wte.data(), N, C);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) EXPECT_EQ(out[n * C + c], wte[ids[n] * C + c]);
  B.EmbeddingBackward(dwte.data(), g.data(), ids.data(), N, C);
  for (int c = 0; c < C; ++c) {
    EXPECT_FLOAT_EQ(dwte[2 * C + c], g[0 * C + c] + g[2 * C + c]);
    EXPECT_FLOAT_EQ(dwte[1 * C + c], 0.0f);
  }
}

// Naive attention of one sequence, for reference: full score matrix, causal mask.
std::vector<float> NaiveAttention(const float* q, const float* k, const float* v, int T, int Hq, int Hkv, int D) {
  std::vector<float> out(T * Hq * D, 0.0f);
  for (int h = 0; h < Hq; ++h) {
    const int g = h / (Hq / Hkv);
    for (int i = 0; i < T; ++i) {
      std::vector<double> s(i + 1);
      double m = -1e300, sum = 0;
      for (int j = 0; j <= i; ++j) {
        double d = 0;
        for (int c = 0; c < D; ++c) d += q[(i * Hq + h) * D + c] * k[(j * Hkv + g) * D + c];
        s[j] = d / std::sqrt(D);
        m = std::max(m, s[j]);
      }
      for (int j = 0; j <= i; ++j) sum += (s[j] = std::exp(s[j] - m));
      for (int j = 0; j <= i; ++j)
        for (int c = 0; c < D; ++c) out[(i * Hq + h) * D + c] += s[j] / sum * v[(j * Hkv + g) * D + c];
    }
  }
  return out;
}

TEST(Ops, PackedAttentionEqualsSequencesOneByOne) {
  CpuBackend B;
  const int Hq = 4, Hkv = 2, D = 8;
  std::vector<int32_t> cu = {0, 3, 4, 11};
  const int S = 3, N = 11;
  auto q = Randn(N * Hq * D, 18, 1.5f), k = Randn(N * Hkv * D, 19, 1.5f), v = Randn(N * Hkv * D, 20);
  std::vector<float> out(N * Hq * D), lse(N * Hq);
  B.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), S, N, Hq, Hkv, D);
  for (int s = 0; s < S; ++s) {
    const int T = cu[s + 1] - cu[s];
    auto ref = NaiveAttention(q.data() + cu[s] * Hq * D, k.data() + cu[s] * Hkv * D, v.data() + cu[s] * Hkv * D, T, Hq, Hkv, D);
    for (int i = 0; i < T * Hq * D; ++i) EXPECT_NEAR(out[cu[s] * Hq * D + i], ref[i], 1e-5) << "seq " << s;
  }
}

TEST(Ops, PackedAttentionBackward) {
  CpuBackend B;
  const int Hq = 4, Hkv = 2, D = 4;
  std::vector<int32_t> cu = {0, 3, 7};
  const int S = 2, N = 7;
  auto q = Randn(N * Hq * D, 21), k = Randn(N * Hkv * D, 22), v = Randn(N * Hkv * D, 23), r = Randn(N * Hq * D, 24);
  std::vector<float> out(N * Hq * D), lse(N * Hq), dq(N * Hq * D), dk(N * Hkv * D), dv(N * Hkv * D);
  B.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), S, N, Hq, Hkv, D);
  B.AttentionBackward(dq.data(), dk.data(), dv.data(), r.data(), out.data(), lse.data(), q.data(), k.data(),
                      v.data(), cu.data(), S, N, Hq, Hkv, D);
  auto f = [&] {
    B.AttentionForward(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), S, N, Hq, Hkv, D);
    return Dot(out, r);
  };
  ExpectGradMatches(q, dq, f, "attention dq");
  ExpectGradMatches(k, dk, f, "attention dk");
  ExpectGradMatches(v, dv, f, "attention dv");
}

// The paged cache through a shuffled, non-contiguous block table: each sequence is written and
// attended in three rounds (prefill of a first chunk, a second chunk at start > 0 that may be empty,
// then a one-token decode), and every round's output must equal the packed causal attention of the
// whole sequences at those rows. The pool starts as NaN, so a read of any row the table does not
// lead to poisons the output, and the blocks no sequence owns must still be NaN at the end.
TEST(Ops, PagedCachedAttentionThroughShuffledBlocksMatchesPackedAttention) {
  CpuBackend B;
  const int Hq = 4, Hkv = 2, D = 8, bs = 4, row = Hkv * D;
  const std::vector<int> len = {6, 13, 2, 9}, first = {2, 5, 1, 4};  // first chunk; the last token decodes
  const int S = static_cast<int>(len.size());
  std::vector<int32_t> cu = {0};
  for (int l : len) cu.push_back(cu.back() + l);
  const int N = cu[S];
  auto q = Randn(N * Hq * D, 25), k = Randn(N * row, 26), v = Randn(N * row, 27);
  std::vector<float> ref(N * Hq * D), lse(N * Hq);
  B.AttentionForward(ref.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), S, N, Hq, Hkv, D);

  const int max_blocks = (*std::max_element(len.begin(), len.end()) + bs - 1) / bs;
  const int num_blocks = 16;  // 4 + 1 + 4 + 3 = 12 owned, 4 never handed out
  std::vector<int32_t> order(num_blocks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  std::vector<int32_t> table(S * max_blocks, -1);
  std::vector<bool> owned(num_blocks, false);
  int next = 0;
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < (len[s] + bs - 1) / bs; ++j) owned[table[s * max_blocks + j] = order[next++]] = true;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> kc(static_cast<size_t>(num_blocks) * bs * row, nan), vc = kc;
  const PagedKv cache{kc.data(), vc.data(), DType::kF32, num_blocks, bs, table.data(), max_blocks};

  std::vector<int> done(S, 0);
  for (int round = 0; round < 3; ++round) {
    std::vector<int32_t> cu_r = {0}, start(S);
    std::vector<float> qr, kr, vr;
    std::vector<int> ref_rows;
    for (int s = 0; s < S; ++s) {
      const int rows = round == 0 ? first[s] : round == 1 ? len[s] - first[s] - 1 : 1;
      start[s] = done[s];
      for (int p = done[s]; p < done[s] + rows; ++p) {
        const int i = cu[s] + p;
        qr.insert(qr.end(), q.begin() + i * Hq * D, q.begin() + (i + 1) * Hq * D);
        kr.insert(kr.end(), k.begin() + i * row, k.begin() + (i + 1) * row);
        vr.insert(vr.end(), v.begin() + i * row, v.begin() + (i + 1) * row);
        ref_rows.push_back(i);
      }
      done[s] += rows;
      cu_r.push_back(cu_r.back() + rows);
    }
    const int Nq = cu_r[S];
    std::vector<float> out(qr.size());
    B.KvCacheWrite(cache, kr.data(), vr.data(), cu_r.data(), start.data(), S, Nq, Hkv, D);
    B.CachedAttentionForward(out.data(), qr.data(), cache, cu_r.data(), start.data(), S, Nq, Hq, Hkv, D);
    for (int r = 0; r < Nq; ++r)
      for (int c = 0; c < Hq * D; ++c)
        ASSERT_NEAR(out[r * Hq * D + c], ref[ref_rows[r] * Hq * D + c], 1e-5) << "round " << round << " row " << r;
  }
  for (int s = 0; s < S; ++s) ASSERT_EQ(done[s], len[s]);
  for (int blk = 0; blk < num_blocks; ++blk) {
    if (owned[blk]) continue;
    for (int e = 0; e < bs * row; ++e) {
      ASSERT_TRUE(std::isnan(kc[blk * bs * row + e]) && std::isnan(vc[blk * bs * row + e])) << "block " << blk << " written";
    }
  }
}

TEST(Ops, FusedLmHeadMatchesFullSoftmaxAcrossChunkBoundaries) {
  CpuBackend B;
  B.SetLmHeadChunking(/*vocab_chunk=*/7, /*row_block=*/3);  // 23 = 7 + 7 + 7 + 2; 5 rows = 3 + 2
  const int N = 5, C = 6, V = 23;
  const float T = 0.7f;
  auto h = Randn(N * C, 28), w = Randn(V * C, 29);
  std::vector<int32_t> tgt = {3, 22, -1, 0, 14};
  std::vector<float> lp(N), ent(N), lse(N);
  B.LmHeadForward(lp.data(), ent.data(), lse.data(), h.data(), w.data(), tgt.data(), N, C, V, T);
  for (int n = 0; n < N; ++n) {
    std::vector<double> z(V);
    double m = -1e300, s = 0;
    for (int v = 0; v < V; ++v) {
      double d = 0;
      for (int c = 0; c < C; ++c) d += h[n * C + c] * w[v * C + c];
      z[v] = d / T;
      m = std::max(m, z[v]);
    }
    for (int v = 0; v < V; ++v) s += std::exp(z[v] - m);
    const double l = m + std::log(s);
    double H = 0;
    for (int v = 0; v < V; ++v) H -= std::exp(z[v] - l) * (z[v] - l);
    if (tgt[n] < 0) {
      EXPECT_EQ(lp[n], 0.0f);
      EXPECT_EQ(ent[n], 0.0f);
    } else {
      EXPECT_NEAR(lp[n], z[tgt[n]] - l, 1e-5);
      EXPECT_NEAR(ent[n], H, 1e-5);
    }
  }
  auto a = Randn(N, 30), e = Randn(N, 31);
  std::vector<float> dh(N * C), dw(V * C, 0.0f);
  B.LmHeadBackward(dh.data(), dw.data(), a.data(), e.data(), h.data(), w.data(), tgt.data(), lse.data(), ent.data(),
                   N, C, V, T);
  auto f = [&] {
    B.LmHeadForward(lp.data(), ent.data(), lse.data(), h.data(), w.data(), tgt.data(), N, C, V, T);
    return Dot(lp, a) + Dot(ent, e);
  };
  ExpectGradMatches(h, dh, f, "lmhead dh");
  ExpectGradMatches(w, dw, f, "lmhead dw");
}

TEST(Ops, AdamWMatchesTorchFormula) {
  CpuBackend B;
  std::vector<float> p = {1.0f, -2.0f, 0.5f}, m(3, 0.0f), v(3, 0.0f);
  std::vector<std::vector<float>> grads = {{0.1f, -0.3f, 2.0f}, {-0.2f, 0.1f, 1.0f}};
  const float lr = 0.01f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
  std::vector<double> rp = {1.0, -2.0, 0.5}, rm(3, 0.0), rv(3, 0.0);
  for (int t = 1; t <= 2; ++t) {
    B.AdamW(p.data(), grads[t - 1].data(), m.data(), v.data(), 3, lr, b1, b2, eps, wd, t);
    for (int i = 0; i < 3; ++i) {
      const double g = grads[t - 1][i];
      rp[i] *= 1 - lr * wd;
      rm[i] = b1 * rm[i] + (1 - b1) * g;
      rv[i] = b2 * rv[i] + (1 - b2) * g * g;
      const double mh = rm[i] / (1 - std::pow(b1, t)), vh = rv[i] / (1 - std::pow(b2, t));
      rp[i] -= lr * mh / (std::sqrt(vh) + eps);
    }
  }
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(p[i], rp[i], 1e-6);
}

TEST(Ops, Bf16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBF16(1.0f), 0x3f80);
  EXPECT_EQ(BF16ToF32(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(F32ToBF16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
  EXPECT_EQ(F32ToBF16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(BF16ToF32(F32ToBF16(std::nanf("")))));
  for (float x : {-3.140625f, 65280.0f, 1e-30f}) EXPECT_NEAR(BF16ToF32(F32ToBF16(x)), x, std::abs(x) * 4e-3);
}

}  // namespace
}  // namespace aha::engine
