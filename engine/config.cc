// config.json parsing and writing (see config.h).
#include "engine/config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace aha::engine {

using nlohmann::json;

const char* ArchName(Arch a) {
  switch (a) {
    case Arch::kQwen2: return "qwen2";
    case Arch::kQwen3: return "qwen3";
    case Arch::kLlama: return "llama";
  }
  return "?";
}

Result<Arch> ParseArch(const std::string& name) {
  if (name == "qwen2") return Arch::kQwen2;
  if (name == "qwen3") return Arch::kQwen3;
  if (name == "llama") return Arch::kLlama;
  return InvalidArgument("unsupported architecture '" + name + "' (supported: qwen2, qwen3, llama)");
}

int64_t ModelConfig::NumParameters() const {
  const int64_t C = hidden_size, D = head_dim, I = intermediate_size;
  int64_t per_layer = 2 * C + C * num_heads * D * 2 + 2 * C * num_kv_heads * D + 3 * C * I;
  if (attention_bias) per_layer += (num_heads + 2 * num_kv_heads) * D;
  if (qk_norm) per_layer += 2 * D;
  int64_t total = per_layer * num_layers + C + static_cast<int64_t>(vocab_size) * C;
  if (!tie_word_embeddings) total += static_cast<int64_t>(vocab_size) * C;
  return total;
}

Status ModelConfig::Validate() const {
  auto positive = [](int v, const char* name) -> Status {
    if (v <= 0) return InvalidArgument(std::string(name) + " must be positive, got " + std::to_string(v));
    return OkStatus();
  };
  RETURN_IF_ERROR(positive(vocab_size, "vocab_size"));
  RETURN_IF_ERROR(positive(hidden_size, "hidden_size"));
  RETURN_IF_ERROR(positive(num_layers, "num_hidden_layers"));
  RETURN_IF_ERROR(positive(num_heads, "num_attention_heads"));
  RETURN_IF_ERROR(positive(num_kv_heads, "num_key_value_heads"));
  RETURN_IF_ERROR(positive(head_dim, "head_dim"));
  RETURN_IF_ERROR(positive(intermediate_size, "intermediate_size"));
  if (num_heads % num_kv_heads != 0)
    return InvalidArgument("num_attention_heads " + std::to_string(num_heads) +
                           " is not a multiple of num_key_value_heads " + std::to_string(num_kv_heads));
  if (head_dim % 2 != 0) return InvalidArgument("head_dim must be even for rope, got " + std::to_string(head_dim));
  if (rope.theta <= 0) return InvalidArgument("rope_theta must be positive");
  // Hostile-input guard: sizes that would overflow int32 indexing or allocate absurd memory.
  if (static_cast<int64_t>(vocab_size) * hidden_size > (int64_t{1} << 34) || hidden_size > 65536 ||
      intermediate_size > 262144 || num_layers > 1024 || num_heads > 1024)
    return InvalidArgument("model dimensions are implausibly large");
  return OkStatus();
}

namespace {

Result<int> GetInt(const json& j, const char* key, const std::string& src, int fallback, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return InvalidArgument(src + ": missing \"" + key + "\"");
    return fallback;
  }
  if (!it->is_number_integer()) return InvalidArgument(src + ": \"" + key + "\" must be an integer");
  int64_t v = it->get<int64_t>();
  if (v < INT32_MIN || v > INT32_MAX) return InvalidArgument(src + ": \"" + key + "\" out of range");
  return static_cast<int>(v);
}

Result<double> GetDouble(const json& j, const char* key, const std::string& src, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) return InvalidArgument(src + ": \"" + key + "\" must be a number");
  return it->get<double>();
}

// Reads rope settings from a "rope_parameters" or "rope_scaling" object into spec.
Status ParseRopeObject(const json& r, const std::string& src, RopeSpec* spec) {
  if (!r.is_object()) return InvalidArgument(src + ": rope settings must be an object");
  std::string type = "default";
  if (r.contains("rope_type") && r["rope_type"].is_string()) type = r["rope_type"];
  else if (r.contains("type") && r["type"].is_string()) type = r["type"];
  if (r.contains("rope_theta")) {
    ASSIGN_OR_RETURN(spec->theta, GetDouble(r, "rope_theta", src, spec->theta));
  }
  if (type == "default") {
    spec->llama3 = false;
    return OkStatus();
  }
  if (type != "llama3")
    return InvalidArgument(src + ": unsupported rope type '" + type + "' (supported: default, llama3)");
  spec->llama3 = true;
  ASSIGN_OR_RETURN(spec->factor, GetDouble(r, "factor", src, 8.0));
  ASSIGN_OR_RETURN(spec->low_freq_factor, GetDouble(r, "low_freq_factor", src, 1.0));
  ASSIGN_OR_RETURN(spec->high_freq_factor, GetDouble(r, "high_freq_factor", src, 4.0));
  ASSIGN_OR_RETURN(spec->original_max_positions, GetDouble(r, "original_max_position_embeddings", src, 8192));
  if (spec->factor <= 0 || spec->low_freq_factor <= 0 || spec->high_freq_factor <= spec->low_freq_factor)
    return InvalidArgument(src + ": llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0");
  return OkStatus();
}

}  // namespace

Result<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& src) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgument(src + ": not a JSON object");
  ModelConfig c;
  if (!j.contains("model_type") || !j["model_type"].is_string())
    return InvalidArgument(src + ": missing \"model_type\"");
  auto arch = ParseArch(j["model_type"].get<std::string>());
  if (!arch.ok()) return InvalidArgument(src + ": " + arch.status().message());
  c.arch = *arch;
  ASSIGN_OR_RETURN(c.vocab_size, GetInt(j, "vocab_size", src, 0, true));
  ASSIGN_OR_RETURN(c.hidden_size, GetInt(j, "hidden_size", src, 0, true));
  ASSIGN_OR_RETURN(c.num_layers, GetInt(j, "num_hidden_layers", src, 0, true));
  ASSIGN_OR_RETURN(c.num_heads, GetInt(j, "num_attention_heads", src, 0, true));
  ASSIGN_OR_RETURN(c.num_kv_heads, GetInt(j, "num_key_value_heads", src, c.num_heads, false));
  ASSIGN_OR_RETURN(c.intermediate_size, GetInt(j, "intermediate_size", src, 0, true));
  ASSIGN_OR_RETURN(c.max_position_embeddings, GetInt(j, "max_position_embeddings", src, 32768, false));
  int default_head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  ASSIGN_OR_RETURN(c.head_dim, GetInt(j, "head_dim", src, default_head_dim, false));
  double eps;
  ASSIGN_OR_RETURN(eps, GetDouble(j, "rms_norm_eps", src, 1e-6));
  c.rms_norm_eps = static_cast<float>(eps);
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    return InvalidArgument(src + ": unsupported hidden_act (only silu)");
  if (j.value("use_sliding_window", false) == true)
    return InvalidArgument(src + ": sliding-window attention is not supported");
  c.tie_word_embeddings = j.value("tie_word_embeddings", false);
  c.attention_bias = c.arch == Arch::kQwen2;  // Qwen2 always has q/k/v bias
  if (c.arch != Arch::kQwen2 && j.value("attention_bias", false) == true)
    return InvalidArgument(src + ": attention_bias is only supported for qwen2");
  if (j.value("mlp_bias", false) == true) return InvalidArgument(src + ": mlp_bias is not supported");
  c.qk_norm = c.arch == Arch::kQwen3;

  // Rope: classic top-level fields first, then the newer object, which wins where both appear.
  ASSIGN_OR_RETURN(c.rope.theta, GetDouble(j, "rope_theta", src, 10000.0));
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    RETURN_IF_ERROR(ParseRopeObject(j["rope_scaling"], src, &c.rope));
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null())
    RETURN_IF_ERROR(ParseRopeObject(j["rope_parameters"], src, &c.rope));

  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"];
  if (j.contains("eos_token_id")) {
    const json& e = j["eos_token_id"];
    if (e.is_number_integer()) c.eos_token_ids.push_back(e.get<int>());
    else if (e.is_array())
      for (const auto& x : e)
        if (x.is_number_integer()) c.eos_token_ids.push_back(x.get<int>());
  }
  Status s = c.Validate();
  if (!s.ok()) return InvalidArgument(src + ": " + s.message());
  return c;
}

Result<ModelConfig> LoadModelConfig(const std::string& path) {
  std::ifstream f(path);
  if (!f) return NotFound(path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ParseModelConfig(ss.str(), path);
}

std::string ModelConfigToJson(const ModelConfig& c) {
  json j;
  const char* cls = c.arch == Arch::kQwen2 ? "Qwen2ForCausalLM" : c.arch == Arch::kQwen3 ? "Qwen3ForCausalLM" : "LlamaForCausalLM";
  j["architectures"] = json::array({cls});
  j["model_type"] = ArchName(c.arch);
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["intermediate_size"] = c.intermediate_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_dropout"] = 0.0;
  j["use_cache"] = true;
  j["dtype"] = "float32";
  if (c.arch == Arch::kQwen2 || c.arch == Arch::kQwen3) j["use_sliding_window"] = false;
  if (c.arch != Arch::kQwen2) j["attention_bias"] = false;
  if (c.arch == Arch::kLlama) j["mlp_bias"] = false;
  json rope = {{"rope_theta", c.rope.theta}, {"rope_type", c.rope.llama3 ? "llama3" : "default"}};
  if (c.rope.llama3) {
    rope["factor"] = c.rope.factor;
    rope["low_freq_factor"] = c.rope.low_freq_factor;
    rope["high_freq_factor"] = c.rope.high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope.original_max_positions;
  }
  j["rope_parameters"] = rope;
  j["rope_theta"] = c.rope.theta;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty()) j["eos_token_id"] = c.eos_token_ids;
  return j.dump(2) + "\n";
}

Result<ModelConfig> PresetConfig(Arch arch, const std::string& preset, int vocab_size) {
  ModelConfig c;
  c.arch = arch;
  c.attention_bias = arch == Arch::kQwen2;
  c.qk_norm = arch == Arch::kQwen3;
  c.rope.theta = arch == Arch::kLlama ? 500000.0 : 1000000.0;
  // Each preset's shape: vocabulary, hidden, layers, heads, kv heads, head width, intermediate, positions,
  // bos, eos (every preset ties its embeddings).
  struct Shape {
    const char* name;
    int vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, positions, bos, eos;
  };
  static constexpr Shape kPresets[] = {
      // byte tokenizer: 256 bytes + <|bos|>, <|eos|>, <|pad|>
      {"tiny", 259, 128, 4, 4, 2, 32, 384, 2048, 256, 257},
      {"0.5b", 151936, 896, 24, 14, 2, 64, 4864, 32768, 151643, 151643},    // Qwen2.5-0.5B
      {"1.5b", 151936, 1536, 28, 12, 2, 128, 8960, 32768, 151643, 151643},  // Qwen2.5-1.5B
      // Qwen3-0.6B (with --arch qwen3; its q/k norms come with the family)
      {"0.6b", 151936, 1024, 28, 16, 8, 128, 3072, 40960, 151643, 151645},
  };
  const Shape* shape = nullptr;
  for (const Shape& p : kPresets)
    if (preset == p.name) shape = &p;
  if (shape == nullptr) return InvalidArgument("unknown preset '" + preset + "' (known: tiny, 0.5b, 0.6b, 1.5b)");
  c.vocab_size = shape->vocab;
  c.hidden_size = shape->hidden;
  c.num_layers = shape->layers;
  c.num_heads = shape->heads;
  c.num_kv_heads = shape->kv_heads;
  c.head_dim = shape->head_dim;
  c.intermediate_size = shape->intermediate;
  c.max_position_embeddings = shape->positions;
  c.tie_word_embeddings = true;
  c.bos_token_id = shape->bos;
  c.eos_token_ids = {shape->eos};
  // A tokenizer's vocabulary that the preset's embedding holds keeps the preset's shape (the Qwen3
  // tokenizer's 151,669 ids fit Qwen2.5's 151,936 rows, as in the released checkpoints); a larger
  // one is padded to a multiple of 128 rows, as those checkpoints pad theirs, so that the lm-head's
  // rows of logits stay 16-byte aligned for the products and the sampling kernel.
  if (vocab_size > c.vocab_size) c.vocab_size = (vocab_size + kVocabPadding - 1) / kVocabPadding * kVocabPadding;
  RETURN_IF_ERROR(c.Validate());
  return c;
}

}  // namespace aha::engine
