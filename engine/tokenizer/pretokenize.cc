// Pre-tokenizers: regex and literal Split, Digits, ByteLevel's split, Sequence.
//
// Split semantics follow Hugging Face's `NormalizedString::split`: the pattern yields matched and
// unmatched spans covering the piece; the behaviour decides how matches join their neighbours;
// empty spans are dropped. Regexes run on PCRE2 (UTF + UCP, JIT when available).
#include "engine/tokenizer/pretokenize.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <utility>

#include "engine/tokenizer/unicode.h"

namespace aha::tokenizer::internal {
namespace {

struct Span {
  size_t begin, end;
  bool match;
};

// Applies `behavior` (and `invert`) to spans that cover the piece, as Hugging Face does.
std::vector<Span> ApplyBehavior(std::vector<Span> spans, SplitBehavior behavior, bool invert) {
  if (invert) {
    for (auto& s : spans) s.match = !s.match;
  }
  std::vector<Span> out;
  out.reserve(spans.size());
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (auto& s : spans) out.push_back({s.begin, s.end, false});
      break;
    case SplitBehavior::kRemoved:
      for (auto& s : spans)
        if (!s.match) out.push_back(s);
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (auto& s : spans) {
        if (s.match && !previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.begin, s.end, false});
        }
        previous_match = s.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (size_t k = spans.size(); k-- > 0;) {
        const Span& s = spans[k];
        if (s.match && !previous_match && !out.empty()) {
          out.back().begin = s.begin;
        } else {
          out.push_back({s.begin, s.end, false});
        }
        previous_match = s.match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (auto& s : spans) {
        if (s.match == previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.begin, s.end, false});
        }
        previous_match = s.match;
      }
      break;
    }
  }
  return out;
}

// Turns the matches [begin, end) of a pattern into spans covering [0, n).
void AddMatch(size_t begin, size_t end, size_t* prev, std::vector<Span>* spans) {
  if (*prev < begin) spans->push_back({*prev, begin, false});
  spans->push_back({begin, end, true});
  *prev = end;
}

void EmitSpans(std::string_view piece, const std::vector<Span>& spans,
               std::vector<std::string_view>* out) {
  for (const Span& s : spans)
    if (s.end > s.begin) out->push_back(piece.substr(s.begin, s.end - s.begin));
}

// Per-thread PCRE2 scratch: the JIT stack grows to 8 MiB, enough for whitespace or letter runs of
// millions of characters (the patterns backtrack at most one character).
struct Pcre2Scratch {
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_match_data* data = nullptr;
  Pcre2Scratch() {
    stack = pcre2_jit_stack_create(64 << 10, 8 << 20, nullptr);
    context = pcre2_match_context_create(nullptr);
    if (stack && context) pcre2_jit_stack_assign(context, nullptr, stack);
    data = pcre2_match_data_create(1, nullptr);
  }
  ~Pcre2Scratch() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(context);
    if (stack) pcre2_jit_stack_free(stack);
  }
};

Pcre2Scratch& Scratch() {
  thread_local Pcre2Scratch scratch;
  return scratch;
}

class RegexSplit final : public PreTokenizer {
 public:
  RegexSplit(pcre2_code* code, SplitBehavior b, bool invert)
      : code_(code), behavior_(b), invert_(invert) {}
  ~RegexSplit() override { pcre2_code_free(code_); }

  void Split(std::string_view piece, std::vector<std::string_view>* out,
             std::deque<std::string>*) const override {
    if (piece.empty()) return;
    Pcre2Scratch& scratch = Scratch();
    std::vector<Span> spans;
    size_t prev = 0, start = 0;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
    while (start < piece.size()) {
      int rc = pcre2_match(code_, subject, piece.size(), start, PCRE2_NO_UTF_CHECK, scratch.data,
                           scratch.context);
      if (rc < 0) break;  // no match (or a resource limit): the rest is one unmatched span
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.data);
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // an empty match splits nothing; step over one character
        start = b + Utf8Length(static_cast<unsigned char>(piece[b]));
        continue;
      }
      AddMatch(b, e, &prev, &spans);
      start = e;
    }
    if (prev < piece.size()) spans.push_back({prev, piece.size(), false});
    if (behavior_ == SplitBehavior::kIsolated && !invert_) {
      EmitSpans(piece, spans, out);
      return;
    }
    EmitSpans(piece, ApplyBehavior(std::move(spans), behavior_, invert_), out);
  }

 private:
  pcre2_code* code_;
  SplitBehavior behavior_;
  bool invert_;
};

class StringSplit final : public PreTokenizer {
 public:
  StringSplit(std::string literal, SplitBehavior b, bool invert)
      : literal_(std::move(literal)), behavior_(b), invert_(invert) {}
  void Split(std::string_view piece, std::vector<std::string_view>* out,
             std::deque<std::string>*) const override {
    if (piece.empty()) return;
    std::vector<Span> spans;
    size_t prev = 0;
    if (!literal_.empty()) {
      for (size_t at = piece.find(literal_); at != std::string_view::npos;
           at = piece.find(literal_, at + literal_.size())) {
        AddMatch(at, at + literal_.size(), &prev, &spans);
      }
    }
    if (prev < piece.size()) spans.push_back({prev, piece.size(), false});
    EmitSpans(piece, ApplyBehavior(std::move(spans), behavior_, invert_), out);
  }

 private:
  std::string literal_;
  SplitBehavior behavior_;
  bool invert_;
};

class Digits final : public PreTokenizer {
 public:
  explicit Digits(bool individual) : individual_(individual) {}
  void Split(std::string_view piece, std::vector<std::string_view>* out,
             std::deque<std::string>*) const override {
    if (piece.empty()) return;
    std::vector<Span> spans;
    size_t prev = 0, pos = 0;
    while (pos < piece.size()) {
      size_t begin = pos;
      uint32_t cp = NextCodePoint(piece, &pos);
      if (IsNumeric(cp)) AddMatch(begin, pos, &prev, &spans);
    }
    if (prev < piece.size()) spans.push_back({prev, piece.size(), false});
    EmitSpans(piece,
              ApplyBehavior(std::move(spans),
                            individual_ ? SplitBehavior::kIsolated : SplitBehavior::kContiguous,
                            false),
              out);
  }

 private:
  bool individual_;
};

class PrefixSpace final : public PreTokenizer {
 public:
  void Split(std::string_view piece, std::vector<std::string_view>* out,
             std::deque<std::string>* arena) const override {
    if (piece.empty()) return;
    if (piece.front() == ' ') {
      out->push_back(piece);
      return;
    }
    arena->push_back(" " + std::string(piece));
    out->push_back(arena->back());
  }
};

class Sequence final : public PreTokenizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PreTokenizer>> members)
      : members_(std::move(members)) {}
  void Split(std::string_view piece, std::vector<std::string_view>* out,
             std::deque<std::string>* arena) const override {
    if (members_.empty()) {
      if (!piece.empty()) out->push_back(piece);
      return;
    }
    std::vector<std::string_view> current{piece}, next;
    for (size_t m = 0; m < members_.size(); ++m) {
      std::vector<std::string_view>* target = m + 1 == members_.size() ? out : &next;
      next.clear();
      for (std::string_view p : current) members_[m]->Split(p, target, arena);
      if (target == &next) std::swap(current, next);
    }
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> members_;
};

// JavaScript's \s, spelled for a PCRE2 character class.
constexpr std::string_view kJsSpaceClassItems =
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}\\x{FEFF}";

constexpr std::string_view kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

}  // namespace

std::string TranslatePattern(std::string_view pattern) {
  // The reference rewrites this one case-insensitive group (JavaScript has no inline flags) to
  // fold ASCII only; PCRE2 would also fold U+017F to 's'.
  static constexpr std::string_view kCaseless = "(?i:'s|'t|'re|'ve|'m|'ll|'d)";
  static constexpr std::string_view kAsciiCaseless =
      "(?:'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD]))";
  std::string p(pattern);
  for (size_t at = p.find(kCaseless); at != std::string::npos; at = p.find(kCaseless, at)) {
    p.replace(at, kCaseless.size(), kAsciiCaseless);
    at += kAsciiCaseless.size();
  }
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char e = p[i + 1];
      if (e == 's') {
        if (in_class) {
          out += kJsSpaceClassItems;
        } else {
          out += "[";
          out += kJsSpaceClassItems;
          out += "]";
        }
      } else if (e == 'S' && !in_class) {
        out += "[^";
        out += kJsSpaceClassItems;
        out += "]";
      } else {
        out += c;
        out += e;
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal member.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {
      size_t close = p.find(":]", i + 2);
      if (close != std::string::npos) {
        out.append(p, i, close + 2 - i);
        i = close + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

Result<std::unique_ptr<PreTokenizer>> MakeRegexSplit(const std::string& pattern, SplitBehavior b,
                                                     bool invert) {
  std::string translated = TranslatePattern(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()),
                                   translated.size(), PCRE2_UTF | PCRE2_UCP, &error, &offset,
                                   nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(error, buf, sizeof(buf));
    return InvalidArgument("regex does not compile at offset " + std::to_string(offset) + ": " +
                           reinterpret_cast<const char*>(buf));
  }
  // JIT is an optimisation: without it (unsupported CPU) pcre2_match interprets.
  (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return std::unique_ptr<PreTokenizer>(std::make_unique<RegexSplit>(code, b, invert));
}

std::unique_ptr<PreTokenizer> MakeStringSplit(const std::string& literal, SplitBehavior b,
                                              bool invert) {
  return std::make_unique<StringSplit>(literal, b, invert);
}

std::unique_ptr<PreTokenizer> MakeDigits(bool individual_digits) {
  return std::make_unique<Digits>(individual_digits);
}

std::unique_ptr<PreTokenizer> MakeByteLevelSplit(bool add_prefix_space, bool use_regex) {
  std::vector<std::unique_ptr<PreTokenizer>> steps;
  if (add_prefix_space) steps.push_back(std::make_unique<PrefixSpace>());
  if (use_regex) {
    auto split = MakeRegexSplit(std::string(kGpt2Pattern), SplitBehavior::kIsolated, false);
    AHA_CHECK(split.ok()) << split.status().ToString();
    steps.push_back(std::move(split).value());
  }
  return std::make_unique<Sequence>(std::move(steps));
}

std::unique_ptr<PreTokenizer> MakeSequence(std::vector<std::unique_ptr<PreTokenizer>> members) {
  return std::make_unique<Sequence>(std::move(members));
}

}  // namespace aha::tokenizer::internal
