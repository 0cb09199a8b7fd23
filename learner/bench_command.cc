// aha bench gen|train|sync|gemm (see bench_command.h; sync and gemm live in engine/cuda/). Gen and
// train print one JSON line last (for scripts) after a human-readable summary; timings are
// wall-clock around fully synchronised work after a warm-up.
#include "learner/bench_command.h"

#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string_view>

#include "common/clock.h"
#include "common/flags.h"
#include "common/hash.h"
#include "engine/backends.h"
#include "engine/generate.h"
#include "engine/transformer.h"
#include "learner/data_parallel.h"
#include "learner/trainer.h"
#ifdef AHA_HAVE_CUDA
#include "engine/cuda/gemm_bench.h"
#endif
#ifdef AHA_HAVE_NCCL
#include "engine/cuda/sync_bench.h"
#endif

namespace aha {
namespace {

// A vector's bytes, for hashing.
template <typename T>
std::string_view AsBytes(const std::vector<T>& v) {
  return {reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)};
}

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, int n, int vocab) {
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

// Matrix-product FLOPs of one forward pass over S sequences of length L (every parameter in a
// product once per token; the tied lm-head counted, the embedding lookup not) plus causal attention.
// FLOPs of one forward over S sequences of L tokens whose last `scored` tokens are scored: the layers'
// products over every token, the lm-head over the rows that predict a scored token (the others skip
// it: Transformer::Forward's score_from), attention's QK^T + PV over the causal half.
double ForwardFlops(const engine::ModelConfig& c, int S, int L, int scored) {
  const double T = double(S) * L, lm_head = double(c.vocab_size) * c.hidden_size;
  // NumParameters counts the embedding and an untied lm-head each once; a tied one once in all.
  const double layer_params = double(c.NumParameters()) - lm_head * (c.tie_word_embeddings ? 1 : 2);
  const double attention = 2.0 * double(L) * L * c.head_dim * c.num_heads * S * c.num_layers;
  return 2.0 * layer_params * T + 2.0 * lm_head * double(S) * scored + attention;
}

int RunGen(int argc, char** argv) {
  std::string model_dir, device = "cuda";
  int64_t prompts = 256, prompt_len = 128, new_tokens = 512, min_new_tokens = 0, seed = 0, repeats = 1;
  FlagSet flags(argv[0], "generation throughput: P prompts of L random tokens, N sampled new tokens each (no early stop)");
  flags.String("model", &model_dir, "model directory (required; e.g. from aha init --preset 0.5b)");
  flags.String("device", &device, "cpu, cuda or cuda:N");
  flags.Int("prompts", &prompts, "prompts, all decoded together (default 256)");
  flags.Int("prompt-len", &prompt_len, "prompt tokens (default 128)");
  flags.Int("new-tokens", &new_tokens, "sampled tokens per prompt (default 512)");
  flags.Int("min-new-tokens", &min_new_tokens,
            "spread the prompts' token caps evenly from this to --new-tokens, so sequences finish at different "
            "steps as RL completions do (default 0: every prompt runs to --new-tokens)");
  flags.Int("repeats", &repeats, "timed runs after the warm-up; the best is reported");
  flags.Int("seed", &seed, "seed of prompts and sampling");
  bool no_graphs = false, no_run_ahead = false;
  flags.Bool("no-graphs", &no_graphs, "run decode steps as separate launches instead of replaying CUDA graphs");
  flags.Bool("no-run-ahead", &no_run_ahead, "read each decode step's tokens before queueing the next (the A/B of run-ahead)");
  std::string leave_out;
  flags.String("leave-out", &leave_out,
               "timing by subtraction: decode steps skip these ops (comma list of qkv, attention, o, gateup, down, "
               "lmhead), so the step time they save is their share in a graph; the tokens drawn are meaningless");
  double temperature = 1.0, top_p = 1.0;
  int64_t top_k = 0;
  flags.Double("temperature", &temperature, "sampling temperature of every prompt (0 = greedy; default 1)");
  flags.Double("top-p", &top_p, "nucleus sampling mass of every prompt (default 1 = off)");
  flags.Int("top-k", &top_k, "keep the k most likely tokens of every prompt (default 0 = off)");
  int64_t kv_cache_tokens = 0, block_size = engine::kKvBlockSize;
  flags.Int("block-size", &block_size,
            "positions per KV cache block (default " + std::to_string(engine::kKvBlockSize) + ")");
  flags.Int("kv-cache-tokens", &kv_cache_tokens,
            "KV pool size in tokens (default 0: prompts x (prompt-len + new-tokens), no preemption); smaller pools preempt and recompute");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (model_dir.empty()) return Fail(prog, "--model is required", 2);
  if (prompts < 1 || prompt_len < 1 || new_tokens < 1 || repeats < 1) return Fail(prog, "sizes must be positive", 2);
  if (min_new_tokens < 0 || min_new_tokens > new_tokens)
    return Fail(prog, "--min-new-tokens must be between 0 and --new-tokens", 2);
  if (temperature < 0 || !(top_p > 0 && top_p <= 1) || top_k < 0)
    return Fail(prog, "need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0", 2);
  if (block_size < 1 || block_size > 4096) return Fail(prog, "--block-size must be between 1 and 4096", 2);
  if (kv_cache_tokens != 0 && kv_cache_tokens < prompt_len + new_tokens)
    return Fail(prog, "--kv-cache-tokens must be 0 or at least prompt-len + new-tokens (one whole sequence)", 2);
  auto backend = engine::MakeBackend(device);
  if (!backend.ok()) return Fail(prog, backend.status().message(), 2);
  auto model = engine::Transformer::Load(model_dir, backend->get());
  if (!model.ok()) return Fail(prog, model.status().message());
  const int V = (*model)->config().vocab_size;
  (*model)->set_decode_graphs(!no_graphs);
  auto leave_mask = engine::Transformer::ParseDecodeOps(leave_out);
  if (!leave_mask.ok()) return Fail(prog, "--leave-out: " + leave_mask.status().message(), 2);
  (*model)->set_decode_leave_out(*leave_mask);
  std::mt19937_64 rng(seed);
  std::vector<engine::GenerationRequest> reqs(prompts);
  for (int64_t i = 0; i < prompts; ++i) {
    reqs[i].prompt = RandomTokens(rng, static_cast<int>(prompt_len), V);
    reqs[i].sampling = {static_cast<float>(temperature), static_cast<float>(top_p), static_cast<int>(top_k)};
    reqs[i].seed = static_cast<uint64_t>(seed * 1000003 + i);
    // No stop ids: every sequence runs to its cap (all new_tokens, or spread from min_new_tokens up).
    reqs[i].max_new_tokens = static_cast<int>(
        min_new_tokens > 0 && prompts > 1 ? min_new_tokens + (new_tokens - min_new_tokens) * i / (prompts - 1)
                                          : new_tokens);
  }
  engine::Generator gen(model->get(), static_cast<int>(prompts), static_cast<int>(prompt_len + new_tokens),
                        {.kv_cache_tokens = kv_cache_tokens, .block_size = static_cast<int>(block_size),
                         .run_ahead = !no_run_ahead});
  // Warm-up: a short run of the same batch (allocations, cuBLAS heuristics, module load).
  {
    auto warm = reqs;
    for (auto& r : warm) r.max_new_tokens = std::min<int>(8, static_cast<int>(new_tokens));
    if (auto w = gen.Generate(warm); !w.ok()) return Fail(prog, w.status().message());
    (*backend)->ResetProfile();  // AHA_PROFILE=1 reports the timed runs only
  }
  double best = 1e30;
  int64_t generated = 0;
  uint64_t digest = 0;
  engine::GeneratorStats stats;  // of the best run
  for (int64_t r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    auto out = gen.Generate(reqs);
    (*backend)->Synchronize();
    const double s = SecondsSince(t0);
    if (!out.ok()) return Fail(prog, out.status().message());
    generated = 0;
    digest = kFnv1a64Basis;  // every sequence's tokens, then its log-probs, in order
    for (const auto& o : *out) {
      generated += static_cast<int64_t>(o.tokens.size());
      digest = Fnv1a64(AsBytes(o.tokens), digest);
      digest = Fnv1a64(AsBytes(o.logprobs), digest);
    }
    if (s < best) stats = gen.stats();
    best = std::min(best, s);
  }
  const double tps = generated / best;
  // vLLM's benchmark_throughput reports this too ("total tokens/s"): every prompt token is a row of
  // the prefill, as every new token is a row of a decode step.
  const double total_tps = static_cast<double>(generated + prompts * prompt_len) / best;
  std::cout << "aha bench gen on " << engine::DescribeBackend(backend->get()) << ": " << prompts << " prompts x "
            << prompt_len << " + " << (min_new_tokens > 0 ? std::to_string(min_new_tokens) + ".." : std::string())
            << new_tokens << " new tokens: " << best << " s, " << tps << " new tokens/s (" << total_tps
            << " tokens/s with the prompts'); KV pool "
            << gen.num_blocks() << " blocks of " << block_size << " ("
            << engine::DTypeName((*backend)->kv_cache_dtype()) << "), "
            << stats.preemptions << " preemptions, " << stats.recomputed_tokens << " recomputed tokens\n"
            << "  of the best run: prefill " << stats.prefill_seconds << " s (" << stats.prefill_calls << " calls, "
            << stats.prefill_rows << " rows); decode "
            << (stats.decode_steps ? 1e3 * stats.decode_seconds / stats.decode_steps : 0.0) << " ms per step ("
            << stats.decode_steps << " steps, "
            << (stats.decode_steps ? static_cast<double>(stats.decode_rows) / stats.decode_steps : 0.0)
            << " rows each); between them " << std::max(0.0, best - stats.prefill_seconds - stats.decode_seconds)
            << " s; device idle between passes (host time from one pass's tokens to the next launch) "
            << stats.launch_gap_seconds << " s; " << stats.steps_ahead << " steps run ahead\n";
  // Equal digests: the same tokens and log-probs bit for bit (a kernel change that should not alter
  // the draws, checked on the bench's own workload).
  char digest_hex[17];
  std::snprintf(digest_hex, sizeof digest_hex, "%016llx", static_cast<unsigned long long>(digest));
  std::cout << "  tokens digest " << digest_hex << " (the last run's tokens and log-probs)\n";
  if (temperature != 1.0 || top_p != 1.0 || top_k != 0)
    std::cout << "  sampling: temperature " << temperature << ", top-p " << top_p << ", top-k " << top_k << "\n";
  if (*leave_mask) std::cout << "  decode steps left out: " << leave_out << " (timing only: the tokens are meaningless)\n";
  nlohmann::json j = {{"bench", "gen"},         {"device", engine::DescribeBackend(backend->get())},
                      {"graphs", !no_graphs},   {"leave_out", leave_out},
                      {"prompts", prompts},     {"prompt_len", prompt_len},
                      {"new_tokens", new_tokens}, {"min_new_tokens", min_new_tokens},
                      {"temperature", temperature}, {"top_p", top_p}, {"top_k", top_k}, {"seconds", best},
                      {"tokens_per_s", tps},
                      {"total_tokens_per_s", total_tps},
                      {"tokens_digest", digest_hex},
                      {"kv_cache_blocks", gen.num_blocks()},
                      {"block_size", block_size},
                      {"kv_cache_dtype", engine::DTypeName((*backend)->kv_cache_dtype())},
                      {"preemptions", stats.preemptions},
                      {"recomputed_tokens", stats.recomputed_tokens},
                      {"prefill_s", stats.prefill_seconds},
                      {"prefill_calls", stats.prefill_calls},
                      {"decode_s", stats.decode_seconds},
                      {"decode_steps", stats.decode_steps},
                      {"launch_gap_s", stats.launch_gap_seconds},
                      {"steps_ahead", stats.steps_ahead}};
  std::cout << j.dump() << "\n";
  return 0;
}

int RunTrain(int argc, char** argv) {
  std::string model_dir, devices = "cuda";
  int64_t sequences = 16, seq_len = 1024, prompt_len = 256, steps = 3, micro = 0, group_size = 4;
  double beta = 0.04, peak_tflops = 785.0;
  FlagSet flags(argv[0], "one GRPO learner step: policy forward + backward, frozen reference forward, k3 KL, clipped ratio, AdamW");
  flags.String("model", &model_dir, "model directory (required; e.g. from aha init --preset 0.5b)");
  flags.String("devices", &devices, "cpu, cuda, cuda:N, or a comma list to train data-parallel on the same global batch (cuda:0,cuda:1)");
  flags.String("device", &devices, "the same as --devices");
  flags.Int("sequences", &sequences, "sequences per step, the global batch (whole groups; default 16)");
  flags.Int("group-size", &group_size,
            "samples per group: one prompt each, rewards alternating 0 and 1 (default 4; at least 2)");
  flags.Int("seq-len", &seq_len, "tokens per sequence, prompt + completion (default 1024)");
  flags.Int("prompt-len", &prompt_len, "prompt tokens of each sequence (default 256)");
  flags.Int("steps", &steps, "timed steps after one warm-up step; the median is reported");
  flags.Int("micro-batch-tokens", &micro, "tokens per micro-batch (default: a device's whole share in one)");
  flags.Double("beta", &beta, "k3 KL coefficient (> 0 runs the reference forward)");
  flags.Double("peak-tflops", &peak_tflops, "one device's measured bf16 GEMM rate for MFU (H200: 785); MFU is against it x devices");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (model_dir.empty()) return Fail(prog, "--model is required", 2);
  if (group_size < 2) return Fail(prog, "--group-size must be at least 2 (a group of one has no advantage)", 2);
  if (sequences < group_size || sequences % group_size != 0)
    return Fail(prog, "--sequences must be a positive multiple of --group-size (" + std::to_string(group_size) + ")",
                2);
  if (prompt_len < 1 || seq_len <= prompt_len || steps < 1) return Fail(prog, "need 0 < --prompt-len < --seq-len, --steps >= 1", 2);
  auto backends = MakeLearnerBackends(SplitDeviceList(devices), "--devices");
  if (!backends.ok()) return Fail(prog, backends.status().message(), 2);
  const int replicas = static_cast<int>(backends->size());
  TrainerOptions opt;
  opt.model_dir = model_dir;
  opt.grpo.beta = beta;
  opt.grpo.lr = 1e-6;
  opt.grpo.micro_batch_tokens = micro > 0 ? micro : sequences * seq_len;
  opt.grpo.group_size = group_size;
  auto trainer = GrpoTrainer::Create(opt, BackendPointers(*backends));
  if (!trainer.ok()) return Fail(prog, trainer.status().message());
  const engine::ModelConfig& config = (*trainer)->model().config();
  std::mt19937_64 rng(1);
  std::normal_distribution<float> lp(-2.0f, 0.5f);
  std::vector<TrainGroup> groups(static_cast<size_t>(sequences / group_size));
  for (size_t g = 0; g < groups.size(); ++g) {
    groups[g].id = "bench-" + std::to_string(g);
    const auto prompt = RandomTokens(rng, static_cast<int>(prompt_len), config.vocab_size);
    for (int64_t i = 0; i < group_size; ++i) {
      TrainSample s;
      s.prompt = prompt;
      s.completion = RandomTokens(rng, static_cast<int>(seq_len - prompt_len), config.vocab_size);
      for (size_t t = 0; t < s.completion.size(); ++t) s.behaviour_logprobs.push_back(std::min(lp(rng), -0.01f));
      s.reward = static_cast<float>(i % 2);
      s.correct = i % 2 == 1;
      groups[g].samples.push_back(std::move(s));
    }
  }
  std::vector<double> times;
  StepStats last;
  double last_s = 0;
  for (int64_t i = 0; i <= steps; ++i) {
    const auto t0 = Clock::now();
    auto st = (*trainer)->Step(groups, 0);  // returns with every replica's device work finished
    const double s = SecondsSince(t0);
    if (!st.ok()) return Fail(prog, st.status().message());
    if (i > 0) times.push_back(s), last = *st, last_s = s;  // step 0 is the warm-up
    if (i == 0)  // AHA_PROFILE=1 reports the timed steps only
      for (engine::Backend* b : BackendPointers(*backends)) b->ResetProfile();
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  const double tokens = double(sequences) * seq_len;
  // Policy forward + backward (3x a forward) and the reference forward (1x when beta > 0), for the
  // whole global batch, against the peak of every device together.
  const double flops = ForwardFlops(config, static_cast<int>(sequences), static_cast<int>(seq_len),
                                    static_cast<int>(seq_len - prompt_len)) * (beta > 0 ? 4 : 3);
  const double mfu = flops / median / (peak_tflops * replicas * 1e12);
  std::string where = engine::DescribeBackend((*backends)[0].get());
  if (replicas > 1) where = std::to_string(replicas) + " x " + where + " (data parallel)";
  const double memory_gib = engine::DeviceMemoryGiB((*backends)[0].get());  // < 0: the backend does not say
  std::cout << "aha bench train on " << where << ": " << sequences << " x " << seq_len << " tokens (prompts of "
            << prompt_len << ", groups of " << group_size << "), beta " << beta
            << ": median step " << median << " s (forward " << last.forward_s << ", backward " << last.backward_s
            << ", loss on the host " << last.loss_s << ", reduce wait " << last.reduce_s << ", optimizer "
            << last.optimizer_s << ", the rest of the last step "
            << last_s - last.forward_s - last.loss_s - last.backward_s - last.reduce_s - last.optimizer_s << "), "
            << tokens / median
            << " tokens/s, " << flops / median / 1e12 << " TFLOP/s, MFU " << 100 * mfu << "% of " << replicas
            << " x " << peak_tflops;
  if (memory_gib >= 0) std::cout << "; device memory in use " << memory_gib << " GiB";
  std::cout << "\n";
  nlohmann::json j = {{"bench", "train"},         {"device", engine::DescribeBackend((*backends)[0].get())},
                      {"devices", replicas},      {"sequences", sequences},
                      {"seq_len", seq_len},       {"seconds", median},
                      {"tokens_per_s", tokens / median}, {"tflops", flops / median / 1e12},
                      {"mfu", mfu},               {"forward_s", last.forward_s},
                      {"device_memory_gib", memory_gib >= 0 ? nlohmann::json(memory_gib) : nlohmann::json()},
                      {"prompt_len", prompt_len}, {"group_size", group_size},
                      {"backward_s", last.backward_s}, {"reduce_s", last.reduce_s}, {"loss_s", last.loss_s},
                      {"optimizer_s", last.optimizer_s}};
  std::cout << j.dump() << "\n";
  return 0;
}

}  // namespace

int RunBenchCommand(int argc, char** argv) {
  const std::string usage =
      "usage: aha bench gen|train|sync|gemm [flags]   (aha bench <what> --help)\n"
      "  gen    generation throughput (new tokens/s) with continuous batching\n"
      "  train  one GRPO learner step: tokens/s and MFU\n"
      "  sync   weight publication over NCCL between two GPUs, beside raw ncclBroadcast\n"
      "  gemm   the model's matrix products through cublasGemmEx and cuBLASLt, beside their floors\n";
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cout << usage;
    return argc < 2 ? 2 : 0;
  }
  const std::string what = argv[1];
  std::string prog = std::string(argv[0]) + " " + what;
  argv[1] = prog.data();
  if (what == "gen") return RunGen(argc - 1, argv + 1);
  if (what == "train") return RunTrain(argc - 1, argv + 1);
#ifdef AHA_HAVE_NCCL
  if (what == "sync") return engine::cuda::RunSyncBench(argc - 1, argv + 1);
#else
  if (what == "sync") return Fail(argv[0], "bench sync needs a build with CUDA and NCCL", 2);
#endif
#ifdef AHA_HAVE_CUDA
  if (what == "gemm") return engine::cuda::RunGemmBench(argc - 1, argv + 1);
#else
  if (what == "gemm") return Fail(argv[0], "bench gemm needs a build with CUDA", 2);
#endif
  return Fail(argv[0], "unknown benchmark '" + what + "' (gen, train, sync, gemm)", 2);
}

}  // namespace aha
