// Small synthetic tokenizer.json files for tests: a byte-level BPE whose merges are learned (by
// plain greedy BPE training) from a sample text, wrapped in a caller-chosen normalizer,
// pre-tokenizer, post-processor and added tokens, so each model family's pipeline can be tested
// without its multi-megabyte vocabulary.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/tokenizer/unicode.h"

namespace aha::tokenizer::testing {

using json = nlohmann::json;

struct SyntheticSpec {
  json normalizer = nullptr;
  json pre_tokenizer = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", true}};
  json post_processor = nullptr;
  json added_tokens = json::array();
  bool ignore_merges = false;
  bool merges_as_pairs = true;  // ["a", "b"] (tokenizers >= 0.20) or "a b"
  int num_merges = 300;
  std::string training_text =
      "the quick brown fox jumps over the lazy dog. The answer is 42, and 1234 is bigger. "
      "I'm sure they'll say it's fine; we've seen that. def function(x): return x + 1\n"
      "in the end the theory of the thing is that there are three other things. 日本語 日本 中文 "
      "hello hello hello world world words wordy anything something nothing 100 200 300 12345 ";
};

// GPT-2 byte-level image of `bytes`.
inline std::string ByteLevelImage(std::string_view bytes) { return internal::BytesToByteLevel(bytes); }

inline json SyntheticTokenizer(const SyntheticSpec& spec) {
  // Vocab: the 256 byte symbols, then one token per learned merge.
  json vocab = json::object();
  std::vector<std::string> id_to_token;
  for (int b = 0; b < 256; ++b) {
    std::string t = ByteLevelImage(std::string(1, static_cast<char>(b)));
    vocab[t] = b;
    id_to_token.push_back(t);
  }
  // Words: the training text split before each space, as byte-level symbol sequences.
  std::map<std::vector<std::string>, int> words;
  std::string current;
  auto flush = [&] {
    if (current.empty()) return;
    std::vector<std::string> symbols;
    for (unsigned char c : current) symbols.push_back(ByteLevelImage(std::string(1, static_cast<char>(c))));
    words[symbols]++;
    current.clear();
  };
  for (char c : spec.training_text) {
    if (c == ' ') flush();
    current.push_back(c);
  }
  flush();
  json merges = json::array();
  for (int m = 0; m < spec.num_merges; ++m) {
    std::map<std::pair<std::string, std::string>, int> counts;
    for (const auto& [w, n] : words)
      for (size_t i = 0; i + 1 < w.size(); ++i) counts[{w[i], w[i + 1]}] += n;
    if (counts.empty()) break;
    auto best = counts.begin();
    for (auto it = counts.begin(); it != counts.end(); ++it)
      if (it->second > best->second) best = it;
    if (best->second < 2) break;
    auto [a, b] = best->first;
    std::string ab = a + b;
    if (!vocab.contains(ab)) {
      vocab[ab] = static_cast<int>(id_to_token.size());
      id_to_token.push_back(ab);
    }
    if (spec.merges_as_pairs) {
      merges.push_back(json::array({a, b}));
    } else {
      merges.push_back(a + " " + b);
    }
    std::map<std::vector<std::string>, int> next;
    for (const auto& [w, n] : words) {
      std::vector<std::string> out;
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == a && w[i + 1] == b) {
          out.push_back(ab);
          ++i;
        } else {
          out.push_back(w[i]);
        }
      }
      next[out] += n;
    }
    words = std::move(next);
  }
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", spec.added_tokens},
      {"normalizer", spec.normalizer},
      {"pre_tokenizer", spec.pre_tokenizer},
      {"post_processor", spec.post_processor},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
        {"ignore_merges", spec.ignore_merges}, {"vocab", vocab}, {"merges", merges}}},
  };
}

inline json AddedToken(int id, const std::string& content, bool special = true, bool lstrip = false,
                       bool rstrip = false, bool single_word = false) {
  return {{"id", id}, {"content", content}, {"single_word", single_word}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", false}, {"special", special}};
}

inline json SplitRegex(const std::string& regex, const std::string& behavior = "Isolated", bool invert = false) {
  return {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", behavior}, {"invert", invert}};
}

inline json ByteLevelPre(bool add_prefix_space = false, bool use_regex = false) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}, {"trim_offsets", false}, {"use_regex", use_regex}};
}

// The pre-tokenizer regexes of the model families, as their tokenizer.json files spell them.
inline const std::string kQwen2Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
inline const std::string kLlama3Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
inline const std::string kDeepSeekV3Digits = "\\p{N}{1,3}";
inline const std::string kDeepSeekV3Cjk = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+";
inline const std::string kDeepSeekV3Main =
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";

}  // namespace aha::tokenizer::testing
