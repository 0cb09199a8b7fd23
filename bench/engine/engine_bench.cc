// engine_bench: CPU throughput of the transformer.
//   train:  tokens/s of Forward + Backward over packed sequences (batch x seq tokens per step)
//   decode: tokens/s of batched KV-cached sampling (decode-batch sequences, decode-tokens each)
// Presets: "tiny" (aha init's tiny shape) and "0.5b" (Qwen2.5-0.5B's shape; --layers cuts its depth
// so it fits a laptop-sized run). Weights are random; speed does not depend on their values.
//   engine_bench --preset tiny
//   engine_bench --preset 0.5b --layers 2 --batch 1 --seq 256 --decode-batch 4 --decode-tokens 16
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>

#include "common/flags.h"
#include "engine/cpu_backend.h"
#include "engine/generate.h"
#include "engine/transformer.h"

using namespace aha;
using namespace aha::engine;

int main(int argc, char** argv) {
  std::string preset = "tiny";
  int64_t layers = 0, batch = 8, seq = 256, steps = 3, decode_batch = 16, decode_tokens = 64, prompt = 32;
  FlagSet flags("engine_bench", "CPU forward+backward and decode throughput of the transformer");
  flags.String("preset", &preset, "tiny or 0.5b");
  flags.Int("layers", &layers, "override the number of layers (0 = preset's)");
  flags.Int("batch", &batch, "sequences per training step");
  flags.Int("seq", &seq, "tokens per training sequence");
  flags.Int("steps", &steps, "timed training steps (after one warm-up)");
  flags.Int("decode-batch", &decode_batch, "sequences decoded together");
  flags.Int("decode-tokens", &decode_tokens, "new tokens per sequence");
  flags.Int("prompt", &prompt, "prompt tokens per decoded sequence");
  ParseOrExit(flags, argc, argv);
  auto config = PresetConfig(Arch::kQwen2, preset, 0);
  if (!config.ok()) return Fail("engine_bench", config.status().message(), 2);
  if (layers > 0) config->num_layers = static_cast<int>(layers);
  CpuBackend backend;
  auto model = Transformer::Init(*config, 1, &backend);
  std::mt19937 rng(1);
  using clock = std::chrono::steady_clock;

  // Training step: Forward + Backward with a GRPO-like upstream gradient on every token.
  const int N = static_cast<int>(batch * seq);
  std::vector<int32_t> tokens(N), cu;
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % config->vocab_size);
  for (int s = 0; s <= batch; ++s) cu.push_back(static_cast<int32_t>(s * seq));
  std::vector<float> lp(N), ent(N), dlp(N, -1.0f / N);
  double train_s = 0;
  for (int step = 0; step <= steps; ++step) {
    auto t0 = clock::now();
    model->Forward(tokens.data(), cu.data(), static_cast<int>(batch), N, 1.0f, lp.data(), ent.data());
    model->Backward(dlp.data(), nullptr);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    if (step > 0) train_s += dt;
  }
  const double train_tps = N * steps / train_s;

  // Decode: prefill prompts, then decode_tokens steps for all sequences together.
  std::vector<GenerationRequest> reqs(decode_batch);
  for (int i = 0; i < decode_batch; ++i) {
    for (int j = 0; j < prompt; ++j) reqs[i].prompt.push_back(static_cast<int32_t>(rng() % config->vocab_size));
    reqs[i].sampling = {1.0f, 1.0f, 0};
    reqs[i].seed = i;
    reqs[i].max_new_tokens = static_cast<int>(decode_tokens);
  }
  Generator gen(model.get(), static_cast<int>(decode_batch), static_cast<int>(prompt + decode_tokens));
  auto t0 = clock::now();
  auto out = gen.Generate(reqs);
  const double gen_s = std::chrono::duration<double>(clock::now() - t0).count();
  if (!out.ok()) return Fail("engine_bench", out.status().message());
  int64_t generated = 0;
  for (const auto& r : *out) generated += static_cast<int64_t>(r.tokens.size());

  std::printf("%-6s %6s %12s %8s %14s %12s %12s %14s\n", "preset", "layers", "params", "threads", "train tokens",
              "train tok/s", "decode seqs", "decode tok/s");
  std::printf("%-6s %6d %12lld %8u %14d %12.0f %12lld %14.1f\n", preset.c_str(), config->num_layers,
              static_cast<long long>(config->NumParameters()), std::thread::hardware_concurrency(), N, train_tps,
              static_cast<long long>(decode_batch), generated / gen_s);
  std::printf("(decode time includes the prefill of %lld x %lld prompt tokens)\n", static_cast<long long>(decode_batch),
              static_cast<long long>(prompt));
  return 0;
}
