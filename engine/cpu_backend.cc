// CPU reference kernels for the ops of backend.h (f32, OpenMP over independent rows/heads, OpenBLAS
// sgemm for products). Shapes and accumulate/overwrite rules are documented in backend.h; comments
// here give the math of each backward pass.
#include "engine/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace aha::engine {

// Below this many elements of work a loop runs on one thread: waking OpenMP's team costs more than
// the loop (decode steps are full of such loops), and on a loaded machine idle spinning threads
// steal the cores that OpenBLAS needs.
constexpr size_t kParallelWork = size_t{1} << 16;

std::vector<float> RopeInverseFrequencies(const RopeSpec& spec, int head_dim) {
  // transformers computes these in f32: base ** (arange(0, D, 2) / D) then reciprocal.
  std::vector<float> inv(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(static_cast<float>(spec.theta), exponent);
  }
  if (!spec.llama3) return inv;
  // Llama 3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, the band between
  // interpolated (transformers' _compute_llama3_parameters).
  const double low_wavelen = spec.original_max_positions / spec.low_freq_factor;
  const double high_wavelen = spec.original_max_positions / spec.high_freq_factor;
  for (float& f : inv) {
    const double wavelen = 2.0 * M_PI / f;
    float scaled = wavelen > low_wavelen ? static_cast<float>(f / spec.factor) : f;
    if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
      const float smooth = static_cast<float>((spec.original_max_positions / wavelen - spec.low_freq_factor) /
                                              (spec.high_freq_factor - spec.low_freq_factor));
      scaled = (1 - smooth) * scaled / static_cast<float>(spec.factor) + smooth * scaled;
    }
    f = scaled;
  }
  return inv;
}

void CpuBackend::EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C) {
#pragma omp parallel for if (static_cast<size_t>(N) * C >= kParallelWork)
  for (int n = 0; n < N; ++n) std::copy(wte + static_cast<size_t>(ids[n]) * C, wte + static_cast<size_t>(ids[n] + 1) * C, out + static_cast<size_t>(n) * C);
}

void CpuBackend::EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C) {
  // Serial: two tokens with the same id write the same row.
  for (int n = 0; n < N; ++n) {
    float* row = dwte + static_cast<size_t>(ids[n]) * C;
    const float* g = dout + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) row[c] += g[c];
  }
}

void CpuBackend::RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C,
                                float eps) {
#pragma omp parallel for if (static_cast<size_t>(N) * C >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    const float* xr = x + static_cast<size_t>(n) * C;
    float* o = out + static_cast<size_t>(n) * C;
    double ss = 0;
    for (int c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / C + eps));
    rstd[n] = r;
    for (int c = 0; c < C; ++c) o[c] = (xr[c] * r) * w[c];
  }
}

void CpuBackend::AddRmsNormForward(float* x, float* ln, float* rstd, const float* y, const float* w, int N, int C,
                                   float eps) {
  // Row by row, the same f32 add and the same arithmetic as Add then RmsNormForward, so a model
  // that uses the fused op computes bit for bit what it computed with the two.
#pragma omp parallel for if (static_cast<size_t>(N) * C >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    float* xr = x + static_cast<size_t>(n) * C;
    const float* yr = y + static_cast<size_t>(n) * C;
    float* o = ln + static_cast<size_t>(n) * C;
    double ss = 0;
    for (int c = 0; c < C; ++c) {
      xr[c] = xr[c] + yr[c];
      ss += static_cast<double>(xr[c]) * xr[c];
    }
    const float r = static_cast<float>(1.0 / std::sqrt(ss / C + eps));
    rstd[n] = r;
    for (int c = 0; c < C; ++c) o[c] = (xr[c] * r) * w[c];
  }
}

void CpuBackend::RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                                 const float* rstd, int N, int C) {
  // y_c = x_c r w_c, r = (mean(x^2) + eps)^-1/2, dr/dx_c = -r^3 x_c / C, so
  // dx_c = r w_c g_c - x_c r^3 / C * sum_j g_j w_j x_j;   dw_c = sum_n g_c x_c r.
#pragma omp parallel for if (static_cast<size_t>(N) * C >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    const float* xr = x + static_cast<size_t>(n) * C;
    const float* g = dout + static_cast<size_t>(n) * C;
    float* d = dx + static_cast<size_t>(n) * C;
    const float r = rstd[n];
    double dot = 0;
    for (int c = 0; c < C; ++c) dot += static_cast<double>(g[c]) * w[c] * xr[c];
    const float k = static_cast<float>(dot) * r * r * r / C;
    for (int c = 0; c < C; ++c) d[c] += r * w[c] * g[c] - xr[c] * k;
  }
  for (int n = 0; n < N; ++n) {
    const float* xr = x + static_cast<size_t>(n) * C;
    const float* g = dout + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) dw[c] += g[c] * xr[c] * rstd[n];
  }
}

static void Rotate(float* x, const int32_t* positions, const float* inv_freq, int N, int H, int D,
                   float sign) {
  const int half = D / 2;
#pragma omp parallel for if (static_cast<size_t>(N) * H * D >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[n]) * inv_freq[i];
      const float c = std::cos(angle), s = sign * std::sin(angle);
      for (int h = 0; h < H; ++h) {
        float* p = x + (static_cast<size_t>(n) * H + h) * D;
        const float x1 = p[i], x2 = p[i + half];
        p[i] = x1 * c - x2 * s;
        p[i + half] = x2 * c + x1 * s;
      }
    }
  }
}

void CpuBackend::RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H,
                             int D) {
  Rotate(x, positions, inv_freq, N, H, D, 1.0f);
}

void CpuBackend::RopeBackward(float* dx, const int32_t* positions, const float* inv_freq, int N, int H,
                              int D) {
  // The rotation is orthogonal: its transpose is the rotation by -angle.
  Rotate(dx, positions, inv_freq, N, H, D, -1.0f);
}

void CpuBackend::LinearForward(float* out, const float* x, const float* w, const float* b, int N, int C,
                               int OC) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, x, C, w, C, 0.0f, out, OC);
  if (b) {
#pragma omp parallel for if (static_cast<size_t>(N) * OC >= kParallelWork)
    for (int n = 0; n < N; ++n)
      for (int o = 0; o < OC; ++o) out[static_cast<size_t>(n) * OC + o] += b[o];
  }
}

void CpuBackend::LinearBackward(float* dx, float* dw, float* db, const float* dout, const float* x,
                                const float* w, int N, int C, int OC, bool accumulate_dx) {
  if (dx) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, w, C,
                accumulate_dx ? 1.0f : 0.0f, dx, C);
  }
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, x, C, 1.0f, dw, C);
  if (db) {
    for (int n = 0; n < N; ++n)
      for (int o = 0; o < OC; ++o) db[o] += dout[static_cast<size_t>(n) * OC + o];
  }
}

void CpuBackend::SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD,
                          int KD) {
  const int W = QD + 2 * KD;
#pragma omp parallel for if (static_cast<size_t>(N) * W >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    const float* row = qkv + static_cast<size_t>(n) * W;
    float* out[3] = {q + static_cast<size_t>(n) * QD, k + static_cast<size_t>(n) * KD, v + static_cast<size_t>(n) * KD};
    const int begin[3] = {0, QD, QD + KD}, width[3] = {QD, KD, KD};
    for (int p = 0; p < 3; ++p)
      for (int c = 0; c < width[p]; ++c) {
        const int col = begin[p] + c;
        out[p][c] = bias ? row[col] + bias[col] : row[col];
      }
  }
}

void CpuBackend::PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD, int KD) {
  // SplitQkv copies each column once (plus a bias), so its adjoint copies the gradients back.
  const int W = QD + 2 * KD;
#pragma omp parallel for if (static_cast<size_t>(N) * W >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    float* row = dqkv + static_cast<size_t>(n) * W;
    std::copy(dq + static_cast<size_t>(n) * QD, dq + static_cast<size_t>(n + 1) * QD, row);
    std::copy(dk + static_cast<size_t>(n) * KD, dk + static_cast<size_t>(n + 1) * KD, row + QD);
    std::copy(dv + static_cast<size_t>(n) * KD, dv + static_cast<size_t>(n + 1) * KD, row + QD + KD);
  }
}

void CpuBackend::SwiGluForward(float* h, const float* gu, int N, int I) {
#pragma omp parallel for if (static_cast<size_t>(N) * I >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    const float* gate = gu + static_cast<size_t>(n) * 2 * I;
    const float* up = gate + I;
    float* hr = h + static_cast<size_t>(n) * I;
    for (int i = 0; i < I; ++i) {
      const float g = gate[i];
      hr[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }
}

void CpuBackend::SwiGluBackward(float* dgu, const float* dh, const float* gu, int N, int I) {
  // silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
#pragma omp parallel for if (static_cast<size_t>(N) * I >= kParallelWork)
  for (int n = 0; n < N; ++n) {
    const float* gate = gu + static_cast<size_t>(n) * 2 * I;
    const float* up = gate + I;
    const float* d = dh + static_cast<size_t>(n) * I;
    float* dgate = dgu + static_cast<size_t>(n) * 2 * I;
    float* dup = dgate + I;
    for (int i = 0; i < I; ++i) {
      const float g = gate[i];
      const float s = 1.0f / (1.0f + std::exp(-g));
      dup[i] = d[i] * g * s;
      dgate[i] = d[i] * up[i] * s * (1.0f + g * (1.0f - s));
    }
  }
}

void CpuBackend::Add(float* out, const float* a, const float* b, size_t n) {
#pragma omp parallel for if (n >= kParallelWork)
  for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

static float Dot(const float* a, const float* b, int D) {
  float s = 0;
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

void CpuBackend::AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                                  const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) {
  (void)N;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int group = Hq / Hkv;
  for (int s = 0; s < S; ++s) {
    const int start = cu_seqlens[s], end = cu_seqlens[s + 1];
    const size_t work = static_cast<size_t>(end - start) * (end - start) * Hq * D / 2;
#pragma omp parallel if (work >= kParallelWork)
    {
      std::vector<float> p(end - start);
#pragma omp for collapse(2) schedule(dynamic, 4)
      for (int i = start; i < end; ++i) {
        for (int h = 0; h < Hq; ++h) {
          const int kvh = h / group;
          const float* qi = q + (static_cast<size_t>(i) * Hq + h) * D;
          float m = -std::numeric_limits<float>::infinity();
          for (int j = start; j <= i; ++j) {
            p[j - start] = Dot(qi, k + (static_cast<size_t>(j) * Hkv + kvh) * D, D) * scale;
            m = std::max(m, p[j - start]);
          }
          float sum = 0;
          for (int j = start; j <= i; ++j) sum += (p[j - start] = std::exp(p[j - start] - m));
          float* o = out + (static_cast<size_t>(i) * Hq + h) * D;
          std::fill(o, o + D, 0.0f);
          const float inv = 1.0f / sum;
          for (int j = start; j <= i; ++j) {
            const float pj = p[j - start] * inv;
            const float* vj = v + (static_cast<size_t>(j) * Hkv + kvh) * D;
            for (int d = 0; d < D; ++d) o[d] += pj * vj[d];
          }
          lse[static_cast<size_t>(i) * Hq + h] = m + std::log(sum);
        }
      }
    }
  }
}

void CpuBackend::AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                                   const float* lse, const float* q, const float* k, const float* v,
                                   const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) {
  // With P_ij = exp(scale q_i.k_j - lse_i), out_i = sum_j P_ij v_j:
  //   dv_j += P_ij dout_i;  dP_ij = dout_i . v_j;  dS_ij = P_ij (dP_ij - dout_i . out_i);
  //   dq_i += scale dS_ij k_j;  dk_j += scale dS_ij q_i.
  // One task per (sequence, kv head) owns dk/dv of that head and dq of its query heads: no races.
  (void)N;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int group = Hq / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) if (static_cast<size_t>(N) * N / S * Hq * D >= kParallelWork)
  for (int s = 0; s < S; ++s) {
    for (int g = 0; g < Hkv; ++g) {
      const int start = cu_seqlens[s], end = cu_seqlens[s + 1];
      for (int j = start; j < end; ++j) {
        std::fill(dk + (static_cast<size_t>(j) * Hkv + g) * D, dk + (static_cast<size_t>(j) * Hkv + g + 1) * D, 0.0f);
        std::fill(dv + (static_cast<size_t>(j) * Hkv + g) * D, dv + (static_cast<size_t>(j) * Hkv + g + 1) * D, 0.0f);
      }
      for (int h = g * group; h < (g + 1) * group; ++h) {
        for (int i = start; i < end; ++i) {
          const size_t qi_off = (static_cast<size_t>(i) * Hq + h) * D;
          const float* qi = q + qi_off;
          const float* doi = dout + qi_off;
          float* dqi = dq + qi_off;
          std::fill(dqi, dqi + D, 0.0f);
          const float Di = Dot(doi, out + qi_off, D);
          const float l = lse[static_cast<size_t>(i) * Hq + h];
          for (int j = start; j <= i; ++j) {
            const size_t kj_off = (static_cast<size_t>(j) * Hkv + g) * D;
            const float* kj = k + kj_off;
            const float* vj = v + kj_off;
            const float p = std::exp(Dot(qi, kj, D) * scale - l);
            const float ds = p * (Dot(doi, vj, D) - Di) * scale;
            float* dkj = dk + kj_off;
            float* dvj = dv + kj_off;
            for (int d = 0; d < D; ++d) {
              dqi[d] += ds * kj[d];
              dkj[d] += ds * qi[d];
              dvj[d] += p * doi[d];
            }
          }
        }
      }
    }
  }
}

// The cache row of position `pos` of batch row b (block table lookup, bounds checked: a bad table
// is a bug of the caller's allocator).
static size_t PagedRow(const PagedKv& c, int b, int pos) {
  AHA_CHECK(pos >= 0 && pos < c.max_blocks * c.block_size) << "KV cache position " << pos << " outside the block table";
  const int block = c.block_table[static_cast<size_t>(b) * c.max_blocks + pos / c.block_size];
  AHA_CHECK(block >= 0 && block < c.num_blocks) << "KV block " << block << " of row " << b << " outside the pool";
  return static_cast<size_t>(block) * c.block_size + pos % c.block_size;
}

void CpuBackend::KvCacheWrite(const PagedKv& cache, const float* k, const float* v, const int32_t* cu_q,
                              const int32_t* start, int B, int Nq, int Hkv, int D) {
  AHA_CHECK_EQ(Nq, cu_q[B]);
  AHA_CHECK(cache.dtype == DType::kF32) << "CPU KV cache must be f32, got " << DTypeName(cache.dtype);
  const size_t row = static_cast<size_t>(Hkv) * D;
  float* k_cache = static_cast<float*>(cache.k);
  float* v_cache = static_cast<float*>(cache.v);
  for (int b = 0; b < B; ++b) {
    for (int i = cu_q[b]; i < cu_q[b + 1]; ++i) {
      const size_t dst = PagedRow(cache, b, start[b] + (i - cu_q[b])) * row;
      std::copy(k + i * row, k + (i + 1) * row, k_cache + dst);
      std::copy(v + i * row, v + (i + 1) * row, v_cache + dst);
    }
  }
}

void CpuBackend::CachedAttentionForward(float* out, const float* q, const PagedKv& cache, const int32_t* cu_q,
                                        const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) {
  AHA_CHECK_EQ(Nq, cu_q[B]);
  AHA_CHECK(cache.dtype == DType::kF32) << "CPU KV cache must be f32, got " << DTypeName(cache.dtype);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int group = Hq / Hkv;
  const float* k_cache = static_cast<const float*>(cache.k);
  const float* v_cache = static_cast<const float*>(cache.v);
  // Row -> sequence map so one flat parallel loop covers prefill and decode alike; the longest
  // context sizes the score buffer.
  std::vector<int> seq_of(Nq);
  int longest = 0;
  for (int b = 0; b < B; ++b) {
    for (int i = cu_q[b]; i < cu_q[b + 1]; ++i) seq_of[i] = b;
    longest = std::max(longest, start[b] + cu_q[b + 1] - cu_q[b]);
  }
  size_t work = 0;
  for (int b = 0; b < B; ++b) work += static_cast<size_t>(cu_q[b + 1] - cu_q[b]) * (start[b] + cu_q[b + 1] - cu_q[b]) * Hq * D;
#pragma omp parallel if (work >= kParallelWork)
  {
    std::vector<float> p(longest);
    std::vector<size_t> rows(longest);  // cache row of each key position
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int i = 0; i < Nq; ++i) {
      for (int h = 0; h < Hq; ++h) {
        const int b = seq_of[i];
        const int pos = start[b] + (i - cu_q[b]);
        const int kvh = h / group;
        for (int j = 0; j <= pos; ++j) rows[j] = (PagedRow(cache, b, j) * Hkv + kvh) * D;
        const float* qi = q + (static_cast<size_t>(i) * Hq + h) * D;
        float m = -std::numeric_limits<float>::infinity();
        for (int j = 0; j <= pos; ++j) {
          p[j] = Dot(qi, k_cache + rows[j], D) * scale;
          m = std::max(m, p[j]);
        }
        float sum = 0;
        for (int j = 0; j <= pos; ++j) sum += (p[j] = std::exp(p[j] - m));
        float* o = out + (static_cast<size_t>(i) * Hq + h) * D;
        std::fill(o, o + D, 0.0f);
        const float inv = 1.0f / sum;
        for (int j = 0; j <= pos; ++j) {
          const float pj = p[j] * inv;
          const float* vj = v_cache + rows[j];
          for (int d = 0; d < D; ++d) o[d] += pj * vj[d];
        }
      }
    }
  }
}

void CpuBackend::LmHeadForward(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                               const int32_t* targets, int N, int C, int V, float temperature) {
  // Online over vocabulary chunks, per row: m = running max of z, s = sum exp(z - m),
  // t = sum exp(z - m) z. Then lse = m + log s and entropy = lse - t / s (= -sum p log p).
  const int R = row_block_, VC = std::min(vocab_chunk_, V);
  std::vector<float> z(static_cast<size_t>(R) * VC);
  const float inv_t = 1.0f / temperature;
  for (int n0 = 0; n0 < N; n0 += R) {
    const int rows = std::min(R, N - n0);
    std::vector<double> m(rows, -std::numeric_limits<double>::infinity()), s(rows, 0.0), t(rows, 0.0);
    std::vector<float> ztarget(rows, 0.0f);
    for (int v0 = 0; v0 < V; v0 += VC) {
      const int cols = std::min(VC, V - v0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, C, inv_t, h + static_cast<size_t>(n0) * C, C,
                  w + static_cast<size_t>(v0) * C, C, 0.0f, z.data(), cols);
#pragma omp parallel for if (static_cast<size_t>(rows) * cols >= kParallelWork)
      for (int r = 0; r < rows; ++r) {
        const float* zr = z.data() + static_cast<size_t>(r) * cols;
        double cm = m[r];
        for (int c = 0; c < cols; ++c) cm = std::max(cm, static_cast<double>(zr[c]));
        const double rescale = std::exp(m[r] - cm);  // exp(-inf) = 0 on the first chunk
        double cs = s[r] * rescale, ct = t[r] * rescale;
        for (int c = 0; c < cols; ++c) {
          const double e = std::exp(zr[c] - cm);
          cs += e;
          ct += e * zr[c];
        }
        m[r] = cm;
        s[r] = cs;
        t[r] = ct;
        const int tgt = targets[n0 + r];
        if (tgt >= v0 && tgt < v0 + cols) ztarget[r] = zr[tgt - v0];
      }
    }
    for (int r = 0; r < rows; ++r) {
      const double l = m[r] + std::log(s[r]);
      lse[n0 + r] = static_cast<float>(l);
      const bool valid = targets[n0 + r] >= 0;
      logprob[n0 + r] = valid ? static_cast<float>(ztarget[r] - l) : 0.0f;
      entropy[n0 + r] = valid ? static_cast<float>(l - t[r] / s[r]) : 0.0f;
    }
  }
}

void CpuBackend::LmHeadBackward(float* dh, float* dw, const float* dlogprob, const float* dentropy,
                                const float* h, const float* w, const int32_t* targets, const float* lse,
                                const float* entropy, int N, int C, int V, float temperature) {
  // With p = softmax(z), z = logits / T:
  //   d logprob / dz_j = [j = target] - p_j;   d entropy / dz_j = -p_j (log p_j + H);
  //   d / dlogits = d / dz / T.  Then dh = dlogits @ w, dw += dlogits^T @ h, chunk by chunk.
  const int R = row_block_, VC = std::min(vocab_chunk_, V);
  std::vector<float> z(static_cast<size_t>(R) * VC);
  const float inv_t = 1.0f / temperature;
  std::fill(dh, dh + static_cast<size_t>(N) * C, 0.0f);
  for (int n0 = 0; n0 < N; n0 += R) {
    const int rows = std::min(R, N - n0);
    for (int v0 = 0; v0 < V; v0 += VC) {
      const int cols = std::min(VC, V - v0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, C, inv_t, h + static_cast<size_t>(n0) * C, C,
                  w + static_cast<size_t>(v0) * C, C, 0.0f, z.data(), cols);
#pragma omp parallel for if (static_cast<size_t>(rows) * cols >= kParallelWork)
      for (int r = 0; r < rows; ++r) {
        float* zr = z.data() + static_cast<size_t>(r) * cols;
        const int n = n0 + r;
        const int tgt = targets[n];
        const float glp = (tgt >= 0 && dlogprob) ? dlogprob[n] : 0.0f;
        const float gent = (tgt >= 0 && dentropy) ? dentropy[n] : 0.0f;
        for (int c = 0; c < cols; ++c) {
          const float logp = zr[c] - lse[n];
          const float p = std::exp(logp);
          float d = -glp * p - gent * p * (logp + entropy[n]);
          if (v0 + c == tgt) d += glp;
          zr[c] = d * inv_t;
        }
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, C, cols, 1.0f, z.data(), cols,
                  w + static_cast<size_t>(v0) * C, C, 1.0f, dh + static_cast<size_t>(n0) * C, C);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cols, C, rows, 1.0f, z.data(), cols,
                  h + static_cast<size_t>(n0) * C, C, 1.0f, dw + static_cast<size_t>(v0) * C, C);
    }
  }
}

double CpuBackend::SumSquares(const float* x, size_t n) {
  double s = 0;
#pragma omp parallel for reduction(+ : s) if (n >= kParallelWork)
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return s;
}

void CpuBackend::Scale(float* x, float s, size_t n) {
#pragma omp parallel for if (n >= kParallelWork)
  for (size_t i = 0; i < n; ++i) x[i] *= s;
}

void CpuBackend::AdamW(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                       float beta2, float eps, float weight_decay, int64_t t) {
  const float bc1 = 1.0f - std::pow(beta1, static_cast<float>(t));
  const float bc2 = 1.0f - std::pow(beta2, static_cast<float>(t));
  const float step = lr / bc1;
  const float bc2_sqrt = std::sqrt(bc2);
#pragma omp parallel for if (n >= kParallelWork)
  for (size_t i = 0; i < n; ++i) {
    param[i] *= 1.0f - lr * weight_decay;
    m[i] = beta1 * m[i] + (1.0f - beta1) * grad[i];
    v[i] = beta2 * v[i] + (1.0f - beta2) * grad[i] * grad[i];
    param[i] -= step * m[i] / (std::sqrt(v[i]) / bc2_sqrt + eps);
  }
}

}  // namespace aha::engine
