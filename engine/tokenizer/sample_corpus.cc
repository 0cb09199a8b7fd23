// Sample text: fragment pools and a seeded generator.
#include "engine/tokenizer/sample_corpus.h"

#include <string_view>

namespace aha::tokenizer {
namespace {

constexpr std::string_view kEnglish[] = {
    "Hello, my dog is cute.", "I'm sure they'll say it's fine, but we'd better check.",
    "DON'T SHOUT! WE'RE LISTENING.", "She's got 3 apples; he's got 12.", "You've been warned: it'LL break.",
    "The quick brown fox jumps over the lazy dog.", "Natalie and Raymond's wedding was on May 5th, 2018.",
    "What's 7 + 8? Let's think step by step.", "  leading spaces and trailing   ", "y'all 'tis o'clock rock'n'roll",
    "e.g., i.e., etc. -- Mr. O'Neil's \"quoted\" text...", "A conversation between User and Assistant.",
    "The answer is \\boxed{42}.", "state-of-the-art, well-known, 50/50", "CAPS lock OFF, camelCase, snake_case_name",
    "naïve café résumé coöperate façade", "Ünïcödé Wörds and straße", "Hello\nWorld\n\nNew paragraph.\r\nWindows line",
};
constexpr std::string_view kOtherScripts[] = {
    "日本語のテキストです。漢字とひらがなとカタカナ。", "我们今天去北京大学学习人工智能。", "中文，标点符号！还有“引号”。",
    "한국어 텍스트입니다. 안녕하세요!", "مرحبا بالعالم، هذا نص عربي.", "שלום עולם, זה טקסט בעברית.",
    "Привет, мир! Это русский текст.", "Україна — це держава. Ґанок їжак.", "Γειά σου Κόσμε! Ελληνικά γράμματα.",
    "नमस्ते दुनिया, यह हिंदी है।", "สวัสดีชาวโลก ภาษาไทย", "Tiếng Việt có dấu: Chào thế giới", "ქართული ენა",
    "Ελληνικά: αβγδε ΑΒΓΔΕ", "ꦗꦮ Ꭰ Ꮳ ᠮᠣᠩᠭᠣᠯ", "Ὀδυσσεύς ᾧ ῷ",
};
constexpr std::string_view kEmoji[] = {
    "👨‍👩‍👧‍👦 family", "👩🏽‍💻 coder", "🏳️‍🌈 flag", "🇯🇵🇺🇸🇩🇪", "1️⃣ 2️⃣ #️⃣", "❤️‍🔥 ok 👍🏿👍",
    "🙂🙃😀😂🤣", "🧑‍🤝‍🧑", "✌️✍🏻", "☕️🍵🫖", "🐈‍⬛ cat",
};
constexpr std::string_view kCode[] = {
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "{\"key\": [1, 2.5, null, true], \"s\": \"\\u00e9\"}", "if x != None and y >= 3: print(f\"{x=}\")",
    "$ ls -la | grep '\\.cc$' > out.txt 2>&1", "<div class=\"a\">&lt;tag&gt; &amp;</div>",
    "std::vector<std::unique_ptr<Foo>> v;", "SELECT * FROM t WHERE id = 42;", "    \n        indented\n\t\tmixed\t tabs",
    "x=a&&b||!c; y=~z^0xFF; z <<= 2;", "#include <stdio.h>\nint main(){return 0;}",
};
constexpr std::string_view kLatex[] = {
    "$\\frac{a}{b} + \\sqrt{x^2 + y^2}$", "\\begin{align} E &= mc^2 \\\\ F &= ma \\end{align}",
    "$$\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}$$", "\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}",
    "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ ≤ ∏ⱼ bⱼ", "α+β=γ; Δt→0; ∞ ≠ ∅",
};
constexpr std::string_view kWhitespace[] = {
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\t \t", "    \n", " \u00a0 ",
    "\u3000", "\u2028", "\u0085", "\u180e", "\ufeff", "\u200b", "\u2003\u2009", "\v\f",
};
constexpr std::string_view kDigits[] = {
    "0", "7", "42", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "-273.15", "2024-01-31",
    "0x1F", "1e-9", "٣٤٥ ١٢", "१२३", "①②③", "½ ¾", "Ⅻ", "１２３",
};
constexpr std::string_view kSpecials[] = {
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<|im_start|>user\nHi<|im_end|>", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|fim_prefix|>",
    "< |im_end| >", "<|im_end", "<<|im_end|>>", "<|vision_pad|><|image_pad|>",
};
constexpr std::string_view kCombining[] = {
    "e\u0301", "A\u030a", "\u1100\u1161\u11a8", "o\u0308\u0304", "\u0915\u094d\u0937", "Z\u0351\u0337\u0322",
    "\u00c5 vs A\u030a", "ﬁ ﬂ", "Ⅸ", "ｶﾀｶﾅ",
};
constexpr std::string_view kInvalid[] = {
    "\xff", "\xc3", "\xe2\x82", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xc0\xaf", "\x80\x80", "abc\xfe" "def",
    "\xe6\x97", "\xf0\x9f\x98",
};
constexpr std::string_view kSeparators[] = {"", " ", " ", " ", "\n", "\t", "  ", ", ", ". ", "\n\n", "'"};

// Unicode 14 ranges for random code points.
struct Range {
  uint32_t lo, hi;
};
constexpr Range kRanges[] = {
    {0x20, 0x7E},       {0xA0, 0x17F},     {0x370, 0x3FF},   {0x400, 0x4FF},   {0x5D0, 0x5EA},
    {0x620, 0x64A},     {0x660, 0x669},    {0x900, 0x97F},   {0xE01, 0xE3A},   {0x1100, 0x1112},
    {0x2000, 0x206F},   {0x2190, 0x21FF},  {0x2200, 0x22FF}, {0x3040, 0x309F}, {0x30A0, 0x30FF},
    {0x4E00, 0x9FFF},   {0xAC00, 0xD7A3},  {0xFF01, 0xFF5E}, {0x1F300, 0x1F64F}, {0x1F900, 0x1F9FF},
    {0x1D400, 0x1D4FF}, {0x20000, 0x2A6DF},
};

class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ULL + 1) {}
  uint64_t Next() {  // splitmix64
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  size_t Below(size_t n) { return static_cast<size_t>(Next() % n); }

 private:
  uint64_t s_;
};

template <size_t N>
std::string_view Pick(Rng& rng, const std::string_view (&pool)[N]) {
  return pool[rng.Below(N)];
}

void AppendCodePoint(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

void RandomCodePoints(Rng& rng, size_t count, std::string* out) {
  const Range& r = kRanges[rng.Below(std::size(kRanges))];
  for (size_t i = 0; i < count; ++i) {
    // Mostly one script per run, as real text is; sometimes switch.
    const Range& q = rng.Below(5) == 0 ? kRanges[rng.Below(std::size(kRanges))] : r;
    AppendCodePoint(q.lo + static_cast<uint32_t>(rng.Below(q.hi - q.lo + 1)), out);
  }
}

// A sentence of pronounceable made-up words: unlike the fixed fragments, these keep producing
// words the word cache has not seen (a long tail, as real text has).
void AppendPseudoSentence(Rng& rng, std::string* out) {
  static constexpr std::string_view kOnsets[] = {"b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu",
                                                 "r", "s", "t", "v", "w", "z", "br", "cr", "dr", "fl", "gr", "pl",
                                                 "pr", "sh", "st", "th", "tr", "ch", ""};
  static constexpr std::string_view kVowels[] = {"a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y", "ee"};
  static constexpr std::string_view kCodas[] = {"", "", "", "n", "r", "s", "t", "ng", "ck", "ll", "nd", "rm"};
  size_t words = 3 + rng.Below(13);
  for (size_t w = 0; w < words; ++w) {
    if (w) *out += rng.Below(12) == 0 ? ", " : " ";
    std::string word;
    size_t syllables = 1 + rng.Below(4);
    for (size_t k = 0; k < syllables; ++k) {
      word += Pick(rng, kOnsets);
      word += Pick(rng, kVowels);
      word += Pick(rng, kCodas);
    }
    size_t style = rng.Below(30);
    if (style < 3 || w == 0) word[0] = static_cast<char>(word[0] - 'a' + 'A');
    if (style == 3)
      for (char& c : word) c = static_cast<char>(c - 'a' + 'A');
    *out += word;
  }
  *out += ".?!;"[rng.Below(4)];
}

// One fragment from a category chosen by `weights` (per mille, in the order below).
void AppendFragment(Rng& rng, bool invalid, const int (&weights)[10], std::string* out) {
  int total = 0;
  for (int w : weights) total += w;
  int pick = static_cast<int>(rng.Below(static_cast<size_t>(total)));
  int k = 0;
  while (pick >= weights[k]) pick -= weights[k++];
  switch (k) {
    case 0:
      if (rng.Below(2) == 0) {
        *out += Pick(rng, kEnglish);
      } else {
        AppendPseudoSentence(rng, out);
      }
      break;
    case 1: *out += Pick(rng, kOtherScripts); break;
    case 2: *out += Pick(rng, kEmoji); break;
    case 3: *out += Pick(rng, kCode); break;
    case 4: *out += Pick(rng, kLatex); break;
    case 5: *out += Pick(rng, kWhitespace); break;
    case 6: *out += Pick(rng, kDigits); break;
    case 7: *out += Pick(rng, kSpecials); break;
    case 8: *out += Pick(rng, kCombining); break;
    default:
      if (invalid && rng.Below(3) == 0) {
        *out += Pick(rng, kInvalid);
      } else {
        RandomCodePoints(rng, 1 + rng.Below(12), out);
      }
  }
}

template <size_t N>
void AddAll(const std::string_view (&pool)[N], std::vector<std::string>* out) {
  for (std::string_view s : pool) out->emplace_back(s);
}

}  // namespace

std::vector<std::string> ParityCorpus(uint64_t seed, size_t n, bool with_invalid_utf8) {
  std::vector<std::string> out;
  AddAll(kEnglish, &out);
  AddAll(kOtherScripts, &out);
  AddAll(kEmoji, &out);
  AddAll(kCode, &out);
  AddAll(kLatex, &out);
  AddAll(kWhitespace, &out);
  AddAll(kDigits, &out);
  AddAll(kSpecials, &out);
  AddAll(kCombining, &out);
  if (with_invalid_utf8) AddAll(kInvalid, &out);
  Rng rng(seed);
  static constexpr int kEven[10] = {15, 12, 8, 10, 6, 12, 10, 7, 6, 14};
  while (out.size() < n) {
    std::string s;
    size_t parts = 1 + rng.Below(6);
    for (size_t p = 0; p < parts; ++p) {
      if (p) s += Pick(rng, kSeparators);
      AppendFragment(rng, with_invalid_utf8, kEven, &s);
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::string> MixedDocuments(uint64_t seed, size_t total_bytes) {
  std::vector<std::string> out;
  Rng rng(seed);
  static constexpr int kProse[10] = {50, 12, 3, 18, 3, 4, 5, 1, 1, 3};
  size_t bytes = 0;
  while (bytes < total_bytes) {
    std::string doc;
    size_t target = 100 + rng.Below(4000);
    while (doc.size() < target) {
      if (!doc.empty()) doc += Pick(rng, kSeparators);
      AppendFragment(rng, false, kProse, &doc);
    }
    bytes += doc.size();
    out.push_back(std::move(doc));
  }
  return out;
}

}  // namespace aha::tokenizer
