// ModelConfig: the architecture of a decoder-only transformer, read from and written as a Hugging
// Face config.json.
//
// Supported: "model_type" qwen2 (q/k/v bias), qwen3 (per-head q/k RMSNorm, explicit head_dim) and
// llama (Llama 3, optional llama3 rope scaling). Rope settings are accepted in both forms that
// transformers has used: top-level "rope_theta" + "rope_scaling", and the newer "rope_parameters"
// object (transformers >= 5). Anything else that would change the computation (sliding-window
// attention, an unknown rope type, a non-SiLU activation, biases the family does not have) is an
// error, never silently ignored.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "engine/backend.h"

namespace aha::engine {

enum class Arch { kQwen2, kQwen3, kLlama };
const char* ArchName(Arch a);  // "qwen2", "qwen3", "llama" (the HF model_type)

struct ModelConfig {
  Arch arch = Arch::kQwen2;
  int vocab_size = 0;
  int hidden_size = 0;         // C
  int num_layers = 0;          // L
  int num_heads = 0;           // Hq
  int num_kv_heads = 0;        // Hkv
  int head_dim = 0;            // D
  int intermediate_size = 0;   // I
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  RopeSpec rope;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry a bias (Qwen2)
  bool qk_norm = false;         // per-head RMSNorm of q and k before rope (Qwen3)
  int bos_token_id = -1;
  std::vector<int> eos_token_ids;

  // Parameter count (tied embeddings counted once).
  int64_t NumParameters() const;
  Status Validate() const;  // InvalidArgument naming the offending field
};

// `source` names the file in error messages ("models/x/config.json: ...").
Result<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source);
Result<ModelConfig> LoadModelConfig(const std::string& path);
// config.json text that transformers loads (rope in the "rope_parameters" form plus the classic
// top-level rope_theta, which older transformers versions read).
std::string ModelConfigToJson(const ModelConfig& c);

// Named shapes for `aha init --preset`: "tiny" (a few hundred thousand parameters, byte vocab),
// "0.5b" (Qwen2.5-0.5B's shape), "1.5b" (Qwen2.5-1.5B), each for the family `arch`. vocab_size is
// the tokenizer's id count (0: none): the preset's own vocabulary when it holds that many, else
// vocab_size rounded up to a multiple of kVocabPadding.
constexpr int kVocabPadding = 128;
Result<ModelConfig> PresetConfig(Arch arch, const std::string& preset, int vocab_size);
Result<Arch> ParseArch(const std::string& name);

}  // namespace aha::engine
