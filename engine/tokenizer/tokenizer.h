// Tokenizer: Hugging Face `tokenizer.json` byte-level BPE, and a byte tokenizer for new models.
//
// Supported `tokenizer.json` (the kind Qwen2/Qwen2.5/Qwen3, Llama 3 and DeepSeek-V3 ship):
//   model          BPE: vocab, merges as "a b" strings or ["a", "b"] pairs, ignore_merges,
//                  unk_token (+ fuse_unk), byte_fallback. No dropout, no subword prefix/suffix.
//   normalizer     null, NFC, NFD, NFKC, NFKD, Sequence of those.
//   pre_tokenizer  null, Split (Regex or String pattern; Isolated, Removed, MergedWithPrevious,
//                  MergedWithNext, Contiguous; invert), Digits, ByteLevel (last; add_prefix_space,
//                  use_regex), Sequence of those.
//   post_processor null, ByteLevel, TemplateProcessing (single), Sequence of those.
//   decoder        null, ByteLevel.
//   added_tokens   special, normalized, lstrip, rstrip, single_word.
// Anything else fails to load with an error that lists what is supported; a missing or malformed
// field fails with the JSON path of that field ("model.merges[12]: ...").
//
// Encode pipeline (Hugging Face order): input that is not valid UTF-8 has each maximal invalid
// subsequence replaced by U+FFFD (the WHATWG decoder's rule, which the reference applies when it
// reads bytes); added tokens are split out first (leftmost-longest); each remaining section is
// normalized, pre-tokenized into pieces, and each piece is BPE-encoded. A byte-level tokenizer's
// pieces are merged as raw bytes, which is the same as merging their GPT-2 byte-to-unicode images.
//
// Reference semantics. Parity is measured against @lenml/tokenizers (a port of Hugging Face's
// tokenizers to JavaScript). Where regex dialects disagree we follow that reference: `\s` in a
// Split pattern means JavaScript's white space (U+FEFF yes, U+0085 and U+180E no; Rust's Oniguruma
// differs on exactly these three), and `(?i:'s|'t|...)` folds ASCII case only. Character classes
// (\p{L}, \p{N}) come from PCRE2's Unicode tables (Unicode 14 in Debian 12's PCRE2 10.42); letters
// assigned after Unicode 14 are not \p{L} here. Digits splits on Unicode numerics (Rust's
// char::is_numeric), as the Rust library does. Added tokens are matched on the raw text whatever
// their `normalized` flag (as the reference does). Decode never applies
// clean_up_tokenization_spaces: decode(encode(x)) is x for valid UTF-8 in the normalizer's form.
//
// Thread safety: a loaded Tokenizer is immutable apart from an internal, locked word cache;
// Encode and Decode may be called from many threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace aha::tokenizer {

// Limits that guard the loader against hostile files (each stops one way to exhaust memory or
// stack with a small input).
inline constexpr size_t kMaxTokenizerFileBytes = 512u << 20;  // a whole file is read into memory
inline constexpr int kMaxJsonDepth = 64;             // nesting bombs: "[[[[..." parsed recursively
inline constexpr int32_t kMaxTokenId = 4 << 20;  // ids size tables; they must also be dense
inline constexpr size_t kMaxTokenBytes = 1 << 16;    // one vocab entry or added token
inline constexpr size_t kMaxPatternBytes = 1 << 16;  // a Split regex

class TokenizerImpl;

class Tokenizer {
 public:
  // Loads `path`: a tokenizer.json file, or a model directory holding tokenizer.json and,
  // optionally, tokenizer_config.json (special tokens: bos_token, eos_token, pad_token, unk_token,
  // additional_special_tokens). A missing file is NotFound; a corrupt or unsupported one is
  // InvalidArgument naming the field.
  static Result<std::unique_ptr<Tokenizer>> Load(const std::string& path);

  // Same as Load, from the files' contents. `config_json` may be empty (no tokenizer_config.json).
  static Result<std::unique_ptr<Tokenizer>> FromJson(std::string_view tokenizer_json,
                                                     std::string_view config_json = {});

  // The byte tokenizer: ids 0..255 are the bytes, then kByteBos, kByteEos, kBytePad. Identical to
  // loading the files that WriteByteTokenizerFiles writes.
  static std::unique_ptr<Tokenizer> Bytes();

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text`. add_special applies the post-processor (e.g. Llama 3's BOS); without it
  // this equals Hugging Face's `encode(text, add_special_tokens=False)`. Special tokens written in
  // the text are recognised either way, as Hugging Face does. Cost: O(bytes) with a word cache.
  std::vector<int32_t> Encode(std::string_view text, bool add_special = false) const;
  // Appends to `out` instead of returning a new vector.
  void EncodeAppend(std::string_view text, bool add_special, std::vector<int32_t>* out) const;

  // Text of `ids`. skip_special drops special tokens. Ids outside the vocabulary are skipped;
  // byte sequences that are not valid UTF-8 become U+FFFD (as Hugging Face's decode does).
  std::string Decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The raw bytes one token stands for (for streaming detokenisation: concatenate, then repair
  // UTF-8 at the end). Empty for an unknown id.
  std::string_view TokenBytes(int32_t id) const;

  // One past the largest id (vocab and added tokens); a model's embedding may be larger.
  int32_t vocab_size() const;
  // -1 when the tokenizer has no such token. pad falls back to eos, as transformers does.
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t pad_id() const;
  // Id of a token by its vocab string (byte-level form, e.g. "Ġthe") or added-token content.
  std::optional<int32_t> TokenId(std::string_view token) const;
  bool IsSpecial(int32_t id) const;
  // Word-cache statistics (hits, lookups) since load, for benchmarks.
  std::pair<uint64_t, uint64_t> CacheStats() const;

 private:
  explicit Tokenizer(std::unique_ptr<TokenizerImpl> impl);
  std::unique_ptr<TokenizerImpl> impl_;
};

// Byte tokenizer ids.
inline constexpr int32_t kByteBos = 256;
inline constexpr int32_t kByteEos = 257;
inline constexpr int32_t kBytePad = 258;
inline constexpr int32_t kByteVocabSize = 259;

// The byte tokenizer as Hugging Face files: a BPE with the 256 byte-level symbols and no merges,
// ByteLevel pre-tokenizer and decoder, and the three specials (add_special prepends BOS).
std::string ByteTokenizerJson();
std::string ByteTokenizerConfigJson();
// Writes tokenizer.json and tokenizer_config.json of the byte tokenizer into `dir` (which must
// exist), so a model initialised from scratch is a loadable Hugging Face directory.
Status WriteByteTokenizerFiles(const std::string& dir);

// Replaces each maximal invalid UTF-8 subsequence with U+FFFD (WHATWG "replacement" decoding).
std::string RepairUtf8(std::string_view bytes);
bool IsValidUtf8(std::string_view bytes);

}  // namespace aha::tokenizer
