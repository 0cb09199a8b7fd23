// `aha init`, `aha logprobs`, `aha generate` (see commands.h). Thin: parse flags, call the engine,
// print JSON. Text goes through the model directory's tokenizer.json (engine/tokenizer).
#include "engine/commands.h"

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/flags.h"
#include "engine/backends.h"
#include "engine/cpu_backend.h"
#include "engine/generate.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/transformer.h"

namespace aha {

using engine::CpuBackend;
using engine::Transformer;
using nlohmann::json;

namespace {

Result<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return NotFound(path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

int RunInitCommand(int argc, char** argv) {
  std::string arch_name = "qwen2", preset, config_path, out, tokenizer, dtype_name = "f32";
  int64_t seed = 0;
  FlagSet flags(argv[0], "write a randomly initialised model directory (config.json, model.safetensors, tokenizer.json)");
  flags.String("arch", &arch_name, "model family: qwen2, qwen3 or llama (with --preset)");
  flags.String("preset", &preset, "shape: tiny (byte vocab), 0.5b and 1.5b (Qwen2.5's), 0.6b (Qwen3's)");
  flags.String("config", &config_path, "a Hugging Face config.json instead of --arch/--preset");
  flags.String("out", &out, "output model directory (required)");
  flags.Int("seed", &seed, "initialisation seed");
  flags.String("tokenizer", &tokenizer,
               "tokenizer.json to copy (default: the byte tokenizer); with --preset the vocabulary stays the "
               "preset's when the tokenizer's ids fit in it, else it is their count padded to a multiple of 128");
  flags.String("dtype", &dtype_name, "weights dtype: f32 or bf16");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (out.empty()) return Fail(prog, "--out is required", 2);
  if (preset.empty() == config_path.empty()) return Fail(prog, "give exactly one of --preset or --config", 2);
  if (dtype_name != "f32" && dtype_name != "bf16") return Fail(prog, "--dtype must be f32 or bf16", 2);

  std::string tokenizer_json;
  std::unique_ptr<tokenizer::Tokenizer> tok;
  if (!tokenizer.empty()) {
    auto t = ReadFile(tokenizer);
    if (!t.ok()) return Fail(prog, t.status().message(), 2);
    tokenizer_json = *t;
    auto loaded = tokenizer::Tokenizer::FromJson(tokenizer_json);
    if (!loaded.ok()) return Fail(prog, tokenizer + ": " + loaded.status().message(), 2);
    tok = std::move(*loaded);
  }
  engine::ModelConfig config;
  if (!config_path.empty()) {
    auto c = engine::LoadModelConfig(config_path);
    if (!c.ok()) return Fail(prog, c.status().message(), 2);
    config = *c;
  } else {
    auto arch = engine::ParseArch(arch_name);
    if (!arch.ok()) return Fail(prog, arch.status().message(), 2);
    auto c = engine::PresetConfig(*arch, preset, tok ? tok->vocab_size() : 0);
    if (!c.ok()) return Fail(prog, c.status().message(), 2);
    config = *c;
    if (tok) {  // the preset's special ids belong to its own vocabulary: take the tokenizer's
      config.bos_token_id = tok->bos_id();
      config.eos_token_ids.clear();
      if (tok->eos_id() >= 0) config.eos_token_ids.push_back(tok->eos_id());
    }
  }
  const int tokenizer_vocab = tok ? tok->vocab_size() : tokenizer::kByteVocabSize;
  if (tokenizer_vocab > config.vocab_size)
    return Fail(prog, "the tokenizer has " + std::to_string(tokenizer_vocab) + " ids but the model's vocab_size is " +
                          std::to_string(config.vocab_size) + (tok ? "" : " (pass --tokenizer for a non-byte vocabulary)"), 2);
  CpuBackend backend;
  auto model = Transformer::Init(config, static_cast<uint64_t>(seed), &backend);
  Status s = model->Save(out, dtype_name == "bf16" ? engine::DType::kBF16 : engine::DType::kF32);
  if (!s.ok()) return Fail(prog, s.message());
  if (tok) {
    std::ofstream t(out + "/tokenizer.json", std::ios::binary);
    t << tokenizer_json;
    if (!t.flush()) return Fail(prog, out + "/tokenizer.json: write failed");
  } else if (Status w = tokenizer::WriteByteTokenizerFiles(out); !w.ok()) {
    return Fail(prog, w.message());
  }
  std::cout << "wrote " << out << " (" << engine::ArchName(config.arch) << ", " << config.NumParameters()
            << " parameters, " << dtype_name << ")\n";
  return 0;
}

int RunLogprobsCommand(int argc, char** argv) {
  std::string model_dir, device = "cpu";
  double temperature = 1.0;
  FlagSet flags(argv[0], "per-token log-probs of token sequences read as JSON on stdin");
  flags.String("model", &model_dir, "model directory (required)");
  flags.String("device", &device, "cpu, cuda or cuda:N");
  flags.Double("temperature", &temperature, "compute log-probs of logits / T");
  flags.Epilog("stdin: {\"tokens\": [[id, ...], ...]}\nstdout: {\"logprobs\": [[null, lp_1, ...], ...]}, lp_t = log p(token_t | tokens_<t)");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (model_dir.empty()) return Fail(prog, "--model is required", 2);
  if (!(temperature > 0)) return Fail(prog, "--temperature must be positive", 2);
  std::stringstream ss;
  ss << std::cin.rdbuf();
  json in = json::parse(ss.str(), nullptr, false);
  if (in.is_discarded() || !in.is_object() || !in.contains("tokens") || !in["tokens"].is_array())
    return Fail(prog, "stdin: expected a JSON object {\"tokens\": [[...], ...]}", 2);
  auto backend = engine::MakeBackend(device);
  if (!backend.ok()) return Fail(prog, backend.status().message(), 2);
  auto model = Transformer::Load(model_dir, backend->get());
  if (!model.ok()) return Fail(prog, model.status().message());
  const int V = (*model)->config().vocab_size;
  std::vector<int32_t> tokens, cu{0};
  for (size_t s = 0; s < in["tokens"].size(); ++s) {
    const json& seq = in["tokens"][s];
    if (!seq.is_array() || seq.empty()) return Fail(prog, "stdin: tokens[" + std::to_string(s) + "] must be a non-empty array", 2);
    for (const auto& t : seq) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= V)
        return Fail(prog, "stdin: tokens[" + std::to_string(s) + "] holds " + t.dump() + ", not a token id below " + std::to_string(V), 2);
      tokens.push_back(t.get<int32_t>());
    }
    cu.push_back(static_cast<int32_t>(tokens.size()));
  }
  const int S = static_cast<int>(cu.size()) - 1;
  const int N = static_cast<int>(tokens.size());
  std::vector<float> lp(N);
  if (N > 0) (*model)->Forward(tokens.data(), cu.data(), S, N, static_cast<float>(temperature), lp.data(), nullptr);
  json out = json::array();
  for (int s = 0; s < S; ++s) {
    json row = json::array({nullptr});
    for (int i = cu[s] + 1; i < cu[s + 1]; ++i) row.push_back(lp[i]);
    out.push_back(row);
  }
  std::cout << json{{"logprobs", out}}.dump() << "\n";
  return 0;
}

int RunGenerateCommand(int argc, char** argv) {
  std::string model_dir, prompt, prompt_tokens, device = "cpu";
  int64_t samples = 1, max_new = 64, top_k = 0, seed = 0;
  double temperature = 1.0, top_p = 1.0;
  std::vector<std::string> stops;
  FlagSet flags(argv[0], "sample completions of one prompt");
  flags.String("model", &model_dir, "model directory (required)");
  flags.String("prompt", &prompt, "prompt text, encoded with the model directory's tokenizer.json");
  flags.String("prompt-tokens", &prompt_tokens, "prompt as comma-separated token ids instead of --prompt");
  flags.Int("samples", &samples, "number of completions (sample i uses seed + i)");
  flags.Double("temperature", &temperature, "sampling temperature; 0 = greedy");
  flags.Double("top-p", &top_p, "nucleus sampling mass (1 = off)");
  flags.Int("top-k", &top_k, "keep the k most likely tokens (0 = off)");
  flags.Int("max-new-tokens", &max_new, "completion length cap");
  flags.Int("seed", &seed, "sampling seed");
  flags.StringList("stop", &stops, "stop string (repeatable)");
  flags.String("device", &device, "cpu, cuda or cuda:N");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (model_dir.empty()) return Fail(prog, "--model is required", 2);
  if (prompt.empty() == prompt_tokens.empty()) return Fail(prog, "give exactly one of --prompt or --prompt-tokens", 2);
  if (samples < 1 || samples > 4096) return Fail(prog, "--samples must be in 1..4096", 2);
  if (max_new < 1 || max_new > 1'000'000) return Fail(prog, "--max-new-tokens must be positive", 2);
  if (temperature < 0 || !(top_p > 0 && top_p <= 1) || top_k < 0)
    return Fail(prog, "need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0", 2);

  auto backend = engine::MakeBackend(device);
  if (!backend.ok()) return Fail(prog, backend.status().message(), 2);
  auto model = Transformer::Load(model_dir, backend->get());
  if (!model.ok()) return Fail(prog, model.status().message());
  const engine::ModelConfig& config = (*model)->config();
  std::unique_ptr<tokenizer::Tokenizer> tok;
  if (auto t = tokenizer::Tokenizer::Load(model_dir); t.ok()) {
    tok = std::move(*t);
  } else if (!prompt.empty() || !IsNotFound(t.status())) {
    return Fail(prog, t.status().message(), 2);
  }
  std::vector<int32_t> ids;
  if (!prompt.empty()) {
    ids = tok->Encode(prompt);
  } else {
    std::stringstream ss(prompt_tokens);
    std::string item;
    while (std::getline(ss, item, ',')) {
      try {
        size_t used = 0;
        long v = std::stol(item, &used);
        if (used != item.size()) throw std::invalid_argument(item);
        ids.push_back(static_cast<int32_t>(v));
      } catch (const std::exception&) {
        return Fail(prog, "--prompt-tokens: '" + item + "' is not an integer", 2);
      }
    }
  }
  std::vector<engine::GenerationRequest> requests(samples);
  for (int64_t i = 0; i < samples; ++i) {
    auto& r = requests[i];
    r.prompt = ids;
    r.sampling = {static_cast<float>(temperature), static_cast<float>(top_p), static_cast<int>(top_k)};
    r.seed = static_cast<uint64_t>(seed + i);
    r.max_new_tokens = static_cast<int>(max_new);
    r.stop_token_ids.assign(config.eos_token_ids.begin(), config.eos_token_ids.end());
    if (tok && tok->eos_id() >= 0) r.stop_token_ids.push_back(tok->eos_id());
    r.stop_strings = stops;
  }
  const int max_len = static_cast<int>(ids.size() + max_new);
  engine::Generator gen(model->get(), static_cast<int>(std::min<int64_t>(samples, 64)), max_len);
  engine::Generator::Detokenize detok = nullptr;
  if (tok) detok = [&tok](const std::vector<int32_t>& t) { return tok->Decode(t); };
  auto results = gen.Generate(requests, detok);
  if (!results.ok()) return Fail(prog, results.status().message(), 2);
  json out = json::array();
  for (const auto& r : *results) {
    json c = {{"tokens", r.tokens}, {"logprobs", r.logprobs}, {"finish_reason", engine::FinishReasonName(r.finish)}};
    // Decode repairs invalid UTF-8 (a byte model can emit any byte sequence).
    c["text"] = tok ? json(tok->Decode(r.tokens)) : json(nullptr);
    out.push_back(c);
  }
  std::cout << json{{"completions", out}}.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  return 0;
}

}  // namespace aha
