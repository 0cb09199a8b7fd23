// Pre-tokenizers (internal): split a normalized section into the pieces BPE encodes one by one.
//
// Each pre-tokenizer maps one piece to zero or more pieces, as Hugging Face's do; a Sequence
// applies its members in order to every piece. Pieces are views into the section or into
// `arena` (pieces a pre-tokenizer rewrote, e.g. with a prefix space).
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace aha::tokenizer::internal {

enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Appends the pieces of `piece` to `out`.
  virtual void Split(std::string_view piece, std::vector<std::string_view>* out,
                     std::deque<std::string>* arena) const = 0;
};

// Split on a regex (Hugging Face / Oniguruma syntax, translated to PCRE2 with the reference's
// meaning of \s) or on a literal string.
Result<std::unique_ptr<PreTokenizer>> MakeRegexSplit(const std::string& pattern, SplitBehavior b,
                                                     bool invert);
std::unique_ptr<PreTokenizer> MakeStringSplit(const std::string& literal, SplitBehavior b,
                                              bool invert);
// Digits: numeric characters isolated one by one, or in runs.
std::unique_ptr<PreTokenizer> MakeDigits(bool individual_digits);
// The text side of ByteLevel (the byte mapping itself is done by the BPE model): an optional
// prefix space, then an optional GPT-2 regex split.
std::unique_ptr<PreTokenizer> MakeByteLevelSplit(bool add_prefix_space, bool use_regex);
std::unique_ptr<PreTokenizer> MakeSequence(std::vector<std::unique_ptr<PreTokenizer>> members);

// The pattern PCRE2 compiles for a Hugging Face pattern (exposed for tests).
std::string TranslatePattern(std::string_view pattern);

}  // namespace aha::tokenizer::internal
