// aha bench gemm. For each token count T (--tokens) and each linear of the model shape
// (Qwen2.5-0.5B by default: hidden C = 896, q/k/v OC = (14 + 2 x 2) x 64 = 1152, o 896 <- 896,
// gate/up OC = 2 x 4864 = 9728, down 896 <- 4864, lm-head V = 151936):
//
//   NT  forward   out[T, OC] = x[T, IN] @ w[OC, IN]^T       beta 0 (LinearForward)
//   NN  dX        dx[T, IN]  = dout[T, OC] @ w[OC, IN]      beta 0 (LinearBackward, dx overwritten)
//   TN  dW        dw[OC, IN] += dout[T, OC]^T @ x[T, IN]    beta 1 (gradients accumulate)
//
// The full-vocabulary lm-head runs NT only at decode token counts (a decode step's logits) and all
// three forms from 1,024 tokens on (the training lm-head's backward as one NN and one TN over the
// whole vocabulary, against `lm_head_chunk`, the LmHeadChunk()-column product the training lm-head
// runs per chunk, in all three forms).
//
// Each product goes through Gemm (gemm.h) exactly as the engine calls it: w is a registered weight
// (read from its cached bf16 copy), the activations are f32 and cast to bf16 by Gemm. Cast reuse is
// on, so after the warm-up the casts are held and the timed product is the GEMM alone; the cast of
// the activation operand(s) is timed on its own and reported as cast_us. Each timed run follows an
// L2 flush (a memset of 256 MiB, not timed) and is bracketed by CUDA events; the median is reported.
// The first warm-up call of a cuBLASLt problem is where Gemm times its candidates.
//
// Then the kernels that produce the products' inputs (RMSNorm, residual add + RMSNorm, SwiGLU and
// its backward), timed the same way, each with a separate cast after it (version 4) and writing
// the bf16 copy itself (version 5), against their byte floors.
//
// Floors: FLOP floor 2 M N K / peak; byte floor (bf16 A and B read once, f32 out written, and read
// too when beta != 0) / bandwidth; the floor is the larger. The H200 figures are the measured
// ceilings (docs/kernels.md).
#include "engine/cuda/gemm_bench.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/flags.h"
#include "engine/config.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {
namespace {

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "aha bench gemm: %s: %s\n", #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

struct Linear {
  std::string name;
  int out, in;  // w is [out, in]
  bool nt_only;  // below 1,024 tokens
};

enum class Form { kNT, kNN, kTN };
const char* FormName(Form f) { return f == Form::kNT ? "NT" : f == Form::kNN ? "NN" : "TN"; }

// A device f32 buffer filled with N(0, scale^2) values: a host block of random values copied over it
// end to end (random enough for tensor-core timing, whose power draw depends on the bits).
float* RandomDevice(size_t n, float scale, const std::vector<float>& block) {
  float* d = nullptr;
  CK(cudaMalloc(&d, n * sizeof(float)));
  std::vector<float> scaled(block.size());
  for (size_t i = 0; i < block.size(); ++i) scaled[i] = block[i] * scale;
  for (size_t off = 0; off < n; off += scaled.size())
    CK(cudaMemcpy(d + off, scaled.data(), std::min(scaled.size(), n - off) * sizeof(float), cudaMemcpyHostToDevice));
  return d;
}

// `count` weight matrices of n f32 each, N(0, 1 / fan_in), registered with the gemm (so products
// read their bf16 copies); FreeWeights unregisters and frees them.
std::vector<float*> RegisteredWeights(Gemm& gemm, int count, size_t n, int fan_in, const std::vector<float>& block) {
  std::vector<float*> ws(count);
  for (float*& w : ws) {
    w = RandomDevice(n, 1.0f / std::sqrt(static_cast<float>(fan_in)), block);
    gemm.RegisterWeights(w, n);
    gemm.WeightsChanged(w);
  }
  return ws;
}
void FreeWeights(Gemm& gemm, const std::vector<float*>& ws) {
  for (float* w : ws) {
    gemm.UnregisterWeights(w);
    CK(cudaFree(w));
  }
}

struct Timer {
  cudaStream_t stream;
  void* flush;
  size_t flush_bytes;
  // Median over `iters` runs of fn(), each after an L2 flush, in microseconds.
  template <typename Fn>
  double Median(int iters, Fn fn) {
    std::vector<cudaEvent_t> ev(2 * iters);
    for (auto& e : ev) CK(cudaEventCreate(&e));
    for (int i = 0; i < iters; ++i) {
      if (flush) CK(cudaMemsetAsync(flush, i & 0xff, flush_bytes, stream));
      CK(cudaEventRecord(ev[2 * i], stream));
      fn();
      CK(cudaEventRecord(ev[2 * i + 1], stream));
    }
    CK(cudaStreamSynchronize(stream));
    std::vector<double> us(iters);
    for (int i = 0; i < iters; ++i) {
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
      us[i] = 1000.0 * ms;
    }
    for (auto& e : ev) CK(cudaEventDestroy(e));
    std::sort(us.begin(), us.end());
    return us[iters / 2];
  }
};

// `all` (the ops of `per` layers) captured as one CUDA graph after `warmup` direct runs; the median
// of `iters` replays, in microseconds per layer.
double GraphMedianUs(cudaStream_t stream, int warmup, int iters, int per, const std::function<void()>& all) {
  for (int i = 0; i < warmup; ++i) all();
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  all();
  CK(cudaStreamEndCapture(stream, &g));
  CK(cudaGraphInstantiate(&exec, g, 0));
  CK(cudaGraphLaunch(exec, stream));
  Timer plain{stream, nullptr, 0};
  const double us = plain.Median(iters, [&] { CK(cudaGraphLaunch(exec, stream)); }) / per;
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(g));
  return us;
}

}  // namespace

int RunGemmBench(int argc, char** argv) {
  std::string model_dir, tokens_list = "256,16384", forms_list = "nt,nn,tn", libs_list = "gemmex,lt";
  int64_t device = 0, iters = 20, warmup = 3;
  double peak_tflops = 785.0, peak_tbps = 4.24;
  bool no_flush = false;
  FlagSet flags(argv[0], "the model's matrix products (NT forward, NN dX, TN dW) through cublasGemmEx and cuBLASLt");
  flags.String("model", &model_dir, "model directory whose shape to use (default: Qwen2.5-0.5B)");
  flags.String("tokens", &tokens_list, "token counts M, comma-separated (default 256,16384: a decode step, a micro-batch)");
  flags.String("forms", &forms_list, "forms to run: nt, nn, tn (comma-separated)");
  flags.String("libraries", &libs_list, "GEMM libraries in order: gemmex, lt (comma-separated)");
  flags.Int("device", &device, "CUDA device index");
  flags.Int("iters", &iters, "timed runs per product (median reported)");
  flags.Int("warmup", &warmup, "untimed runs first (the first one tunes a cuBLASLt problem)");
  flags.Double("peak-tflops", &peak_tflops, "the device's bf16 GEMM ceiling for the FLOP floor (H200: 785)");
  flags.Double("peak-tbps", &peak_tbps, "the device's memory bandwidth for the byte floor, TB/s (H200: 4.24)");
  flags.Bool("no-flush", &no_flush, "do not flush L2 before each timed run");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (iters < 1 || warmup < 1) return Fail(prog, "--iters and --warmup must be positive", 2);

  auto config = model_dir.empty() ? PresetConfig(Arch::kQwen2, "0.5b", 0) : LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) return Fail(prog, config.status().message(), 2);
  const ModelConfig& c = *config;
  std::vector<int> tokens;
  for (const std::string& t : SplitComma(tokens_list)) {
    char* end = nullptr;
    const long v = std::strtol(t.c_str(), &end, 10);
    if (*end != '\0' || v < 1 || v > (1 << 20)) return Fail(prog, "--tokens: '" + t + "' is not a count in 1..2^20", 2);
    tokens.push_back(static_cast<int>(v));
  }
  std::vector<Form> forms;
  for (const std::string& f : SplitComma(forms_list)) {
    if (f == "nt") forms.push_back(Form::kNT);
    else if (f == "nn") forms.push_back(Form::kNN);
    else if (f == "tn") forms.push_back(Form::kTN);
    else return Fail(prog, "--forms: '" + f + "' is not nt, nn or tn", 2);
  }
  std::vector<GemmLibrary> libs;
  for (const std::string& l : SplitComma(libs_list)) {
    if (l == "gemmex") libs.push_back(GemmLibrary::kCublasGemmEx);
    else if (l == "lt") libs.push_back(GemmLibrary::kCublasLt);
    else return Fail(prog, "--libraries: '" + l + "' is not gemmex or lt", 2);
  }
  if (tokens.empty() || forms.empty() || libs.empty()) return Fail(prog, "nothing to run", 2);

  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count)
    return Fail(prog, "no CUDA device " + std::to_string(device) + " (found " + std::to_string(count) + ")", 2);
  CK(cudaSetDevice(static_cast<int>(device)));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, static_cast<int>(device)));
  cudaStream_t stream = nullptr;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto gemm_owner = std::make_unique<Gemm>(stream, GemmPrecision::kBF16);
  Gemm& gemm = *gemm_owner;
  Timer timer{stream, nullptr, no_flush ? 0 : size_t{256} << 20};
  if (!no_flush) CK(cudaMalloc(&timer.flush, timer.flush_bytes));

  const int C = c.hidden_size, QD = c.num_heads * c.head_dim, KD = c.num_kv_heads * c.head_dim;
  const std::vector<Linear> linears = {
      {"qkv", QD + 2 * KD, C, false},          {"o", C, QD, false},
      {"gate_up", 2 * c.intermediate_size, C, false}, {"down", C, c.intermediate_size, false},
      {"lm_head", c.vocab_size, C, true},      {"lm_head_chunk", std::min(c.vocab_size, LmHeadChunk()), C, false}};
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> block(size_t{1} << 22);
  for (float& v : block) v = normal(rng);

  std::cout << "aha bench gemm on " << prop.name << ": " << ArchName(c.arch) << " shape (C " << C << ", q/k/v "
            << QD + 2 * KD << ", gate/up " << 2 * c.intermediate_size << ", V " << c.vocab_size << "), median of "
            << iters << (no_flush ? "" : " L2-flushed") << " runs; floors at " << peak_tflops << " TFLOP/s and "
            << peak_tbps << " TB/s\n";
  std::map<std::pair<int, GemmLibrary>, double> totals;  // (T, library) -> sum of product times
  for (int T : tokens) {
    for (const Linear& lin : linears) {
      const size_t wn = static_cast<size_t>(lin.out) * lin.in;
      const std::vector<float*> one = RegisteredWeights(gemm, 1, wn, lin.in, block);
      float* w = one[0];
      for (Form form : forms) {
        if (lin.nt_only && T < 1024 && form != Form::kNT) continue;
        // The product's operands: a (activation, cast), b (the weight, or x for TN), out.
        int M = T, N = lin.out, K = lin.in;
        size_t a_n = static_cast<size_t>(T) * lin.in, b_n = 0;
        float beta = 0.0f;
        if (form == Form::kNN) {
          N = lin.in;
          K = lin.out;
          a_n = static_cast<size_t>(T) * lin.out;
        } else if (form == Form::kTN) {
          M = lin.out;
          N = lin.in;
          K = T;
          a_n = static_cast<size_t>(T) * lin.out;
          b_n = static_cast<size_t>(T) * lin.in;
          beta = 1.0f;
        }
        float* a = RandomDevice(a_n, 1.0f, block);
        float* b = form == Form::kTN ? RandomDevice(b_n, 1.0f, block) : w;
        float* out = nullptr;
        const size_t out_n = static_cast<size_t>(M) * N;
        CK(cudaMalloc(&out, out_n * sizeof(float)));
        CK(cudaMemset(out, 0, out_n * sizeof(float)));
        auto product = [&] {
          if (form == Form::kNT) gemm.NT(out, a, b, M, N, K, 1.0f, beta);
          else if (form == Form::kNN) gemm.NN(out, a, b, M, N, K, 1.0f, beta);
          else gemm.TN(out, a, b, M, N, K, 1.0f, beta);
        };
        // The activation cast(s) Gemm does before a product whose casts are not held.
        uint16_t* cast_buf = nullptr;
        CK(cudaMalloc(&cast_buf, std::max(a_n, b_n) * sizeof(uint16_t)));
        const double cast_us = timer.Median(static_cast<int>(iters), [&] {
          CastF32ToBF16(cast_buf, a, a_n, stream);
          if (b_n) CastF32ToBF16(cast_buf, b, b_n, stream);
        });
        const double flops = 2.0 * M * N * static_cast<double>(K);
        const double bytes = 2.0 * (static_cast<double>(M) * K + static_cast<double>(K) * N) +
                             (beta != 0.0f ? 8.0 : 4.0) * static_cast<double>(M) * N;
        const double flop_floor_us = flops / (peak_tflops * 1e12) * 1e6;
        const double byte_floor_us = bytes / (peak_tbps * 1e12) * 1e6;
        const double floor_us = std::max(flop_floor_us, byte_floor_us);
        std::vector<float> first;  // the first library's product, to compare the others with
        for (GemmLibrary lib : libs) {
          gemm.set_library(lib);
          gemm.ForgetCasts();
          gemm.set_cast_reuse(true);
          for (int i = 0; i < warmup; ++i) product();
          const double us = timer.Median(static_cast<int>(iters), product);
          // One product from zero for the comparison (beta * 0 leaves the product alone).
          double nmse = -1.0;
          if (out_n <= (size_t{1} << 26)) {
            CK(cudaMemsetAsync(out, 0, out_n * sizeof(float), stream));
            product();
            std::vector<float> got(out_n);
            CK(cudaMemcpyAsync(got.data(), out, out_n * sizeof(float), cudaMemcpyDeviceToHost, stream));
            CK(cudaStreamSynchronize(stream));
            if (first.empty()) {
              first = std::move(got);
            } else {
              double num = 0, den = 0;
              for (size_t i = 0; i < out_n; ++i) {
                const double d = double(got[i]) - first[i];
                num += d * d;
                den += double(first[i]) * first[i];
              }
              nmse = den > 0 ? num / den : num;
            }
          }
          gemm.set_cast_reuse(false);
          totals[{T, lib}] += us;
          const double tflops = flops / (us * 1e-6) / 1e12;
          std::cout << "T " << std::setw(6) << T << "  " << std::left << std::setw(14) << lin.name << std::right
                    << FormName(form) << "  " << std::setw(6) << M << " x " << std::setw(6) << N << " x "
                    << std::setw(6) << K << "  " << std::setw(8) << GemmLibraryName(lib) << std::fixed
                    << std::setprecision(1) << std::setw(10) << us << " us " << std::setw(7) << tflops
                    << " TFLOP/s  floor " << std::setw(8) << floor_us << " us ("
                    << (flop_floor_us >= byte_floor_us ? "flops" : "bytes") << ", " << std::setprecision(2)
                    << floor_us / us * 100 << "%)  cast " << std::setprecision(1) << cast_us << " us"
                    << std::defaultfloat << "\n";
          nlohmann::json j = {{"bench", "gemm"},     {"device", prop.name},
                              {"library", GemmLibraryName(lib)},
                              {"tokens", T},         {"name", lin.name},
                              {"form", FormName(form)},
                              {"M", M},              {"N", N},
                              {"K", K},              {"beta", beta},
                              {"us", us},            {"tflops", tflops},
                              {"flop_floor_us", flop_floor_us},
                              {"byte_floor_us", byte_floor_us},
                              {"floor_us", floor_us}, {"of_floor", floor_us / us},
                              {"cast_us", cast_us},  {"tuned_problems", gemm.tuned_problems()}};
          if (nmse >= 0) j["nmse_vs_first_library"] = nmse;
          std::cout << j.dump() << "\n";
        }
        if (form != Form::kTN) {
          // The same product with its result rounded to bf16 in the epilogue (a tensor kept in bf16:
          // CudaBackend::KeepAsBf16), on the last library.
          auto* out16 = reinterpret_cast<uint16_t*>(out);
          auto product16 = [&] {
            if (form == Form::kNT) gemm.NTBf16(out16, out, a, b, M, N, K);
            else gemm.NNBf16(out16, out, a, b, M, N, K);
          };
          gemm.ForgetCasts();
          gemm.set_cast_reuse(true);
          for (int i = 0; i < warmup; ++i) product16();
          const double us16 = timer.Median(static_cast<int>(iters), product16);
          gemm.set_cast_reuse(false);
          std::cout << "T " << std::setw(6) << T << "  " << std::left << std::setw(14) << lin.name << std::right
                    << FormName(form) << "  bf16 out  " << std::fixed << std::setprecision(1) << std::setw(10) << us16
                    << " us " << std::setw(7) << flops / (us16 * 1e-6) / 1e12 << " TFLOP/s" << std::defaultfloat
                    << "\n";
          std::cout << nlohmann::json{{"bench", "gemm"}, {"tokens", T}, {"name", lin.name}, {"form", FormName(form)},
                                      {"out", "bf16"},   {"us", us16}}.dump()
                    << "\n";
        }
        CK(cudaFree(cast_buf));
        CK(cudaFree(out));
        if (b != w) CK(cudaFree(b));
        CK(cudaFree(a));
      }
      FreeWeights(gemm, one);
    }
  }
  // Decode-sized forward products as a decode step runs them: in a CUDA graph, back to back, each
  // of the `layers` products reading its own weight (so the weights stream from HBM as the 24 layers'
  // do, not from L2) and the same held activation cast. A single product between two events (above)
  // also counts the launch's own latency, ~4 us at these sizes. Each also with K in 2, 4 and 8
  // parts (Gemm::NTSplitK, one batched product; the decode step's o and down products take 4, whose
  // sums the norm after them adds) where K allows.
  for (int T : tokens) {
    if (T > 1024) continue;
    const int layers = c.num_layers;
    for (const Linear& lin : linears) {
      if (lin.name == "lm_head") continue;
      const size_t wn = static_cast<size_t>(lin.out) * lin.in;
      const std::vector<float*> ws = RegisteredWeights(gemm, layers, wn, lin.in, block);
      float* a = RandomDevice(static_cast<size_t>(T) * lin.in, 1.0f, block);
      float* out = nullptr;
      CK(cudaMalloc(&out, 8 * static_cast<size_t>(T) * lin.out * sizeof(float)));
      for (GemmLibrary lib : libs)
        for (int parts : {1, 2, 4, 8}) {
          if (parts > 1 && (lin.in % parts != 0 || (lin.in / parts) % 8 != 0)) continue;
          gemm.set_library(lib);
          gemm.ForgetCasts();
          gemm.set_cast_reuse(true);
          auto all = [&] {
            for (float* w : ws) {
              if (parts == 1) gemm.NT(out, a, w, T, lin.out, lin.in, 1.0f, 0.0f);
              else gemm.NTSplitK(out, a, w, T, lin.out, lin.in, parts);
            }
          };
          const double us =
              GraphMedianUs(stream, static_cast<int>(warmup), static_cast<int>(iters), layers, all);
          gemm.set_cast_reuse(false);
          const double flops = 2.0 * T * lin.out * static_cast<double>(lin.in);
          const double bytes = 2.0 * (static_cast<double>(T) * lin.in + wn) + 4.0 * T * lin.out;
          const double floor_us = std::max(flops / (peak_tflops * 1e12), bytes / (peak_tbps * 1e12)) * 1e6;
          std::cout << "T " << std::setw(6) << T << "  " << std::left << std::setw(14) << lin.name << std::right
                    << "NT in a graph of " << layers << ", K in " << parts << "  " << std::setw(8)
                    << GemmLibraryName(lib) << std::fixed << std::setprecision(1) << std::setw(10) << us
                    << " us per product  floor " << floor_us << " us (" << std::setprecision(2) << floor_us / us * 100
                    << "%)" << std::defaultfloat << "\n";
          std::cout << nlohmann::json{{"bench", "gemm"}, {"in_graph", layers}, {"library", GemmLibraryName(lib)},
                                      {"tokens", T},     {"name", lin.name},    {"k_parts", parts},
                                      {"us", us},        {"floor_us", floor_us}}.dump()
                    << "\n";
        }
      CK(cudaFree(out));
      CK(cudaFree(a));
      FreeWeights(gemm, ws);
    }
  }
  // The decode MLP's first half as a decode step runs it, in a graph of `layers` (each its own
  // weights): the gate/up product into bf16 gu and the SwiGLU kernel (the kept path; the decode
  // step with AHA_FUSED_MLP=0) against the one kernel with SwiGLU in its epilogue (GateUpSwiGlu).
  for (int T : tokens) {
    const int I = c.intermediate_size, layers = c.num_layers;
    if (T > 1024 || !GateUpSwiGluSupported(T, C, I)) continue;
    const size_t wn = 2 * static_cast<size_t>(I) * C, tc = static_cast<size_t>(T) * C;
    const std::vector<float*> ws = RegisteredWeights(gemm, layers, wn, C, block);
    float* a = RandomDevice(tc, 1.0f, block);
    float* gu = nullptr;  // the f32 range gu16 stands for (never written)
    uint16_t *a16 = nullptr, *gu16 = nullptr, *h16 = nullptr;
    CK(cudaMalloc(&gu, 2 * static_cast<size_t>(T) * I * sizeof(float)));
    CK(cudaMalloc(&a16, tc * sizeof(uint16_t)));
    CK(cudaMalloc(&gu16, 2 * static_cast<size_t>(T) * I * sizeof(uint16_t)));
    CK(cudaMalloc(&h16, static_cast<size_t>(T) * I * sizeof(uint16_t)));
    CastF32ToBF16(a16, a, tc, stream);
    gemm.set_library(GemmLibrary::kCublasLt);
    double us_fused = 0.0;  // the one kernel at K = C with the rule's tile, for the steady state below
    // The two ops, then the one kernel with the rule's tile ({0, 0}), then with each tile it is built for.
    std::vector<std::pair<bool, MlpTile>> runs = {{false, {}}, {true, {}}};
    for (const MlpTile& t : GateUpSwiGluTiles()) runs.push_back({true, t});
    const MlpTile rule = MlpTileFor(T, I, prop.multiProcessorCount);
    for (const auto& [fused, tile] : runs) {
      gemm.ForgetCasts();
      gemm.set_cast_reuse(true);
      auto all = [&] {
        for (float* w : ws) {
          if (fused) {
            GateUpSwiGlu(h16, a16, gemm.Bf16CopyOf(w, wn), T, C, I, stream, tile.rows ? tile : rule);
          } else {
            gemm.NTBf16(gu16, gu, a, w, T, 2 * I, C);
            SwiGluForward(nullptr, gu, gu16, T, I, h16, stream);
          }
        }
      };
      const double us = GraphMedianUs(stream, static_cast<int>(warmup), static_cast<int>(iters), layers, all);
      if (fused && tile.rows == 0) us_fused = us;
      gemm.set_cast_reuse(false);
      const double flops = 2.0 * T * 2.0 * I * C;
      const double bytes = 2.0 * (tc + wn + static_cast<double>(T) * I);
      const double floor_us = std::max(flops / (peak_tflops * 1e12), bytes / (peak_tbps * 1e12)) * 1e6;
      const MlpTile shown = tile.rows ? tile : rule;
      const std::string name = !fused ? "gate/up product + SwiGLU kernel"
                                      : "gate/up + SwiGLU, " + std::to_string(shown.rows) + " x " +
                                            std::to_string(shown.cols) + (tile.rows ? " tile" : " (the rule's)");
      std::cout << "T " << std::setw(6) << T << "  " << std::left << std::setw(34) << name << std::right
                << " in a graph of " << layers << std::fixed << std::setprecision(1) << std::setw(10) << us
                << " us per layer  floor " << floor_us << " us (" << std::setprecision(2) << floor_us / us * 100
                << "%)" << std::defaultfloat << "\n";
      std::cout << nlohmann::json{{"bench", "gemm"},   {"in_graph", layers}, {"tokens", T},
                                  {"mlp_fused", fused}, {"tile_rows", fused ? shown.rows : 0},
                                  {"tile_cols", fused ? shown.cols : 0}, {"rule", fused && tile.rows == 0},
                                  {"us", us},           {"floor_us", floor_us}}.dump()
                << "\n";
    }
    // The fused kernel's steady state: the same blocks with K eight times as long (8x the K
    // steps), so (t(8K) - t(K)) / (7 K / 64) is one K step without the start and the epilogue
    // (tensor work per step: 128 x 160 x 64 per block, 640 cycles at the H200's rate).
    {
      const int K8 = 8 * C;
      const size_t wn8 = 2 * static_cast<size_t>(I) * K8, tc8 = static_cast<size_t>(T) * K8;
      const std::vector<float*> w8 = RegisteredWeights(gemm, layers, wn8, K8, block);
      float* a8 = RandomDevice(tc8, 1.0f, block);
      uint16_t* a8_16 = nullptr;
      CK(cudaMalloc(&a8_16, tc8 * sizeof(uint16_t)));
      CastF32ToBF16(a8_16, a8, tc8, stream);
      const double us = GraphMedianUs(stream, static_cast<int>(warmup), static_cast<int>(iters), layers, [&] {
        for (float* w : w8) GateUpSwiGlu(h16, a8_16, gemm.Bf16CopyOf(w, wn8), T, K8, I, stream);
      });
      const double step_ns = (us - us_fused) * 1e3 / (7.0 * C / 64.0);
      std::cout << "T " << std::setw(6) << T << "  gate/up + SwiGLU, one kernel, K " << K8 << " in a graph of "
                << layers << std::fixed << std::setprecision(1) << std::setw(10) << us << " us per layer (K " << C
                << ": " << us_fused << "): " << step_ns << " ns per K step" << std::defaultfloat << "\n";
      std::cout << nlohmann::json{{"bench", "gemm"}, {"in_graph", layers}, {"tokens", T}, {"mlp_fused", true},
                                  {"k", K8},         {"us", us},           {"us_k", us_fused}, {"step_ns", step_ns}}
                       .dump()
                << "\n";
      CK(cudaFree(a8_16));
      CK(cudaFree(a8));
      FreeWeights(gemm, w8);
    }
    for (void* p : {static_cast<void*>(gu), static_cast<void*>(a16), static_cast<void*>(gu16),
                    static_cast<void*>(h16), static_cast<void*>(a)})
      CK(cudaFree(p));
    FreeWeights(gemm, ws);
  }
  // The producers of the products' inputs (docs/kernels.md, version 5): each as it ran before
  // (f32 output, then a separate cast of it) and as it runs now (the bf16 copy written in the same
  // kernel, Gemm::AdoptCast); the residual add + norm also as two ops before.
  for (int T : tokens) {
    const int I = c.intermediate_size;
    const size_t tc = static_cast<size_t>(T) * C, ti = static_cast<size_t>(T) * I;
    float* x = RandomDevice(tc, 1.0f, block);
    float* y = RandomDevice(tc, 1.0f, block);
    float* nw = RandomDevice(C, 1.0f, block);
    float* gu = RandomDevice(2 * ti, 1.0f, block);
    float* dh = RandomDevice(ti, 1.0f, block);
    float *ln = nullptr, *rstd = nullptr, *h = nullptr, *dgu = nullptr;
    uint16_t *copy = nullptr, *gu16 = nullptr, *dh16 = nullptr;
    CK(cudaMalloc(&gu16, 2 * ti * sizeof(uint16_t)));
    CK(cudaMalloc(&dh16, ti * sizeof(uint16_t)));
    CastF32ToBF16(gu16, gu, 2 * ti, stream);
    CastF32ToBF16(dh16, dh, ti, stream);
    CK(cudaMalloc(&ln, tc * sizeof(float)));
    CK(cudaMalloc(&rstd, T * sizeof(float)));
    CK(cudaMalloc(&h, ti * sizeof(float)));
    CK(cudaMalloc(&dgu, 2 * ti * sizeof(float)));
    CK(cudaMalloc(&copy, 2 * ti * sizeof(uint16_t)));
    const float eps = static_cast<float>(c.rms_norm_eps);
    struct Variant {
      const char* name;
      double bytes;  // moved at least, for the floor
      std::function<void()> run;
    };
    const std::vector<Variant> variants = {
        {"add+rmsnorm+cast (v4)", 26.0 * tc,
         [&] {
           Add(x, x, y, tc, stream);
           RmsNormForward(ln, rstd, x, nw, T, C, eps, nullptr, stream);
           CastF32ToBF16(copy, ln, tc, stream);
         }},
        {"add_rmsnorm+copy (v5)", 18.0 * tc, [&] { AddRmsNormForward(x, ln, rstd, y, nw, T, C, eps, copy, stream); }},
        {"rmsnorm+cast (v4)", 14.0 * tc,
         [&] {
           RmsNormForward(ln, rstd, x, nw, T, C, eps, nullptr, stream);
           CastF32ToBF16(copy, ln, tc, stream);
         }},
        {"rmsnorm+copy (v5)", 10.0 * tc, [&] { RmsNormForward(ln, rstd, x, nw, T, C, eps, copy, stream); }},
        {"swiglu+cast (v4)", 18.0 * ti,
         [&] {
           SwiGluForward(h, gu, nullptr, T, I, nullptr, stream);
           CastF32ToBF16(copy, h, ti, stream);
         }},
        {"swiglu+copy (v5)", 14.0 * ti, [&] { SwiGluForward(h, gu, nullptr, T, I, copy, stream); }},
        {"swiglu_bwd+cast (v4)", 32.0 * ti,
         [&] {
           SwiGluBackward(dgu, dh, nullptr, gu, nullptr, T, I, nullptr, stream);
           CastF32ToBF16(copy, dgu, 2 * ti, stream);
         }},
        {"swiglu_bwd+copy (v5)", 24.0 * ti, [&] { SwiGluBackward(dgu, dh, nullptr, gu, nullptr, T, I, copy, stream); }},
        // Version 7: norm outputs, gu and dh kept in bf16 only (CudaBackend::KeepAsBf16).
        {"add_rmsnorm bf16 (v7)", 14.0 * tc, [&] { AddRmsNormForward(x, nullptr, rstd, y, nw, T, C, eps, copy, stream); }},
        {"swiglu gu16 (v7)", 6.0 * ti, [&] { SwiGluForward(nullptr, gu, gu16, T, I, copy, stream); }},
        {"swiglu_bwd gu16 dh16 (v7)", 10.0 * ti,
         [&] { SwiGluBackward(nullptr, dh, dh16, gu, gu16, T, I, copy, stream); }},
    };
    for (const Variant& v : variants) {
      for (int i = 0; i < warmup; ++i) v.run();
      const double us = timer.Median(static_cast<int>(iters), v.run);
      const double floor_us = v.bytes / (peak_tbps * 1e12) * 1e6;
      std::cout << "T " << std::setw(6) << T << "  " << std::left << std::setw(24) << v.name << std::right
                << std::fixed << std::setprecision(1) << std::setw(10) << us << " us  floor " << std::setw(8)
                << floor_us << " us" << std::defaultfloat << "\n";
      std::cout << nlohmann::json{{"bench", "gemm"}, {"producer", v.name}, {"tokens", T},
                                  {"us", us},        {"byte_floor_us", floor_us}}.dump()
                << "\n";
    }
    CK(cudaStreamSynchronize(stream));
    for (void* p : std::initializer_list<void*>{x, y, nw, gu, dh, ln, rstd, h, dgu, copy, gu16, dh16}) CK(cudaFree(p));
  }
  for (const auto& [key, us] : totals) {
    std::cout << "T " << key.first << " " << GemmLibraryName(key.second) << ": sum of product times " << us
              << " us\n";
    std::cout << nlohmann::json{{"bench", "gemm"}, {"summary", true}, {"tokens", key.first},
                                {"library", GemmLibraryName(key.second)}, {"sum_us", us}}.dump()
              << "\n";
  }
  if (timer.flush) CK(cudaFree(timer.flush));
  gemm_owner.reset();
  CK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace aha::engine::cuda
