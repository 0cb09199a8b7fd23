// Deterministic mixed-script sample text for the tokenizer's parity test and benchmark.
//
// Strings are built from hand-written fragments (English with contractions, made-up words, CJK,
// Arabic, Hebrew, Cyrillic, Greek, Devanagari, Thai, emoji with ZWJ sequences, code, LaTeX,
// whitespace runs and tabs, digits, inline special tokens, combining marks, odd spaces) and from
// random code points
// of scripts assigned by Unicode 14, joined by random separators. Some strings carry invalid UTF-8
// bytes. The same seed gives the same strings on every machine (no std:: distributions).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace aha::tokenizer {

// Every fragment alone, then generated strings up to `n` in all.
std::vector<std::string> ParityCorpus(uint64_t seed, size_t n, bool with_invalid_utf8 = true);

// Documents (about 100 B to 4 KB each, valid UTF-8) totalling at least `total_bytes`; mostly
// prose and code, with the other scripts mixed in.
std::vector<std::string> MixedDocuments(uint64_t seed, size_t total_bytes);

}  // namespace aha::tokenizer
