#include "rewardd/rewards.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <set>
#include <sstream>
#include <unordered_set>

#include "rewardd/countdown.h"
#include "rewardd/math_answer.h"

namespace aha::rewardd {
namespace {

std::string Trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

std::string Clip(std::string_view s, size_t n = 40) {
  std::string out(s.substr(0, n));
  for (char& c : out)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  if (s.size() > n) out += "...";
  return out;
}

std::string Fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.4g", v);
  return buf;
}

size_t CountOf(std::string_view s, std::string_view needle) {
  size_t n = 0;
  for (size_t i = s.find(needle); i != std::string_view::npos; i = s.find(needle, i + 1)) ++n;
  return n;
}

// ---- scripts for the language reward ----

enum class Script { kLatin, kCjk, kCyrillic, kArabic, kDevanagari, kGreek, kOther, kNone };

// Decodes one UTF-8 code point at s[i] (advancing i); invalid bytes decode as U+FFFD.
uint32_t NextCodePoint(std::string_view s, size_t* i) {
  unsigned char c = static_cast<unsigned char>(s[*i]);
  int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || *i + static_cast<size_t>(len) > s.size()) {
    ++*i;
    return 0xFFFD;
  }
  uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k < len; ++k) {
    unsigned char d = static_cast<unsigned char>(s[*i + static_cast<size_t>(k)]);
    if ((d >> 6) != 2) {
      ++*i;
      return 0xFFFD;
    }
    cp = (cp << 6) | (d & 0x3F);
  }
  *i += static_cast<size_t>(len);
  return cp;
}

Script ScriptOf(uint32_t cp) {
  if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return Script::kLatin;
  if (cp < 0x80) return Script::kNone;  // digits, punctuation, space
  if ((cp >= 0xC0 && cp <= 0x24F && cp != 0xD7 && cp != 0xF7) || (cp >= 0x1E00 && cp <= 0x1EFF))
    return Script::kLatin;
  if (cp >= 0x370 && cp <= 0x3FF) return Script::kGreek;
  if (cp >= 0x400 && cp <= 0x52F) return Script::kCyrillic;
  if (cp >= 0x600 && cp <= 0x6FF) return Script::kArabic;
  if (cp >= 0x900 && cp <= 0x97F) return Script::kDevanagari;
  if ((cp >= 0x3040 && cp <= 0x30FF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
      (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0xAC00 && cp <= 0xD7AF) ||
      (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x20000 && cp <= 0x2FA1F))
    return Script::kCjk;
  if ((cp >= 0x2000 && cp <= 0x2BFF) || (cp >= 0x3000 && cp <= 0x303F) ||
      (cp >= 0xFF00 && cp <= 0xFF0F) || cp == 0xFFFD)
    return Script::kNone;  // punctuation, symbols, arrows, math operators
  return Script::kOther;
}

Result<Script> ParseScript(std::string_view name) {
  if (name == "latin" || name == "en") return Script::kLatin;
  if (name == "cjk" || name == "zh" || name == "ja" || name == "ko") return Script::kCjk;
  if (name == "cyrillic" || name == "ru") return Script::kCyrillic;
  if (name == "arabic" || name == "ar") return Script::kArabic;
  if (name == "devanagari" || name == "hi") return Script::kDevanagari;
  if (name == "greek" || name == "el") return Script::kGreek;
  return InvalidArgument("language: unknown script '" + std::string(name) +
                         "' (latin|cjk|cyrillic|arabic|devanagari|greek)");
}

std::string_view Reasoning(std::string_view completion) {
  size_t open = completion.find("<think>");
  size_t close = completion.find("</think>");
  if (close != std::string_view::npos) {
    size_t b = (open != std::string_view::npos && open < close) ? open + 7 : 0;
    return completion.substr(b, close - b);
  }
  size_t ans = completion.find("<answer>");
  size_t b = open != std::string_view::npos ? open + 7 : 0;
  if (ans != std::string_view::npos && ans >= b) return completion.substr(b, ans - b);
  return completion.substr(b);
}

// Answer text for the exact verifiers: tag, else last \boxed.
std::optional<std::string> ExtractFinal(std::string_view completion) {
  if (completion.size() > (64u << 20)) return std::nullopt;
  return ExtractMathAnswer(completion);
}

std::string ParamOr(const RewardTerm& t, const std::string& key, const std::string& def) {
  auto it = t.params.find(key);
  return it == t.params.end() ? def : it->second;
}

Result<bool> BoolParam(const RewardTerm& t, const std::string& key, bool def) {
  std::string v = ParamOr(t, key, def ? "true" : "false");
  if (v == "true" || v == "1" || v == "yes") return true;
  if (v == "false" || v == "0" || v == "no") return false;
  return InvalidArgument("rewards." + t.name + "." + key + ": expected true or false, got '" + v + "'");
}

Result<int64_t> IntParam(const RewardTerm& t, const std::string& key, int64_t def) {
  std::string v = ParamOr(t, key, std::to_string(def));
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < 0)
    return InvalidArgument("rewards." + t.name + "." + key + ": expected a non-negative integer, got '" + v + "'");
  return static_cast<int64_t>(x);
}

Status CheckParams(const RewardTerm& t, std::initializer_list<const char*> allowed) {
  for (const auto& [k, v] : t.params) {
    bool ok = false;
    for (const char* a : allowed) ok |= k == a;
    if (!ok) return InvalidArgument("rewards." + t.name + ": unknown parameter '" + k + "'");
  }
  return OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Verifiers.

Verdict ScoreFormat(std::string_view completion, bool graded, bool think_prefilled) {
  std::string buf;
  if (think_prefilled) {
    buf = "<think>" + std::string(completion);
    completion = buf;
  }
  const std::string_view tags[4] = {"<think>", "</think>", "<answer>", "</answer>"};
  size_t pos[4];
  size_t count[4];
  for (int i = 0; i < 4; ++i) {
    count[i] = CountOf(completion, tags[i]);
    pos[i] = completion.find(tags[i]);
  }
  // A tag is well placed when it occurs once and after the previous well-placed tag.
  int placed = 0;
  size_t last = 0;
  bool first = true;
  for (int i = 0; i < 4; ++i) {
    if (count[i] == 1 && (first || pos[i] > last)) {
      ++placed;
      last = pos[i];
      first = false;
    }
  }
  bool strict = placed == 4 && Trim(completion.substr(0, pos[0])).empty() &&
                Trim(completion.substr(pos[1] + tags[1].size(), pos[2] - pos[1] - tags[1].size())).empty() &&
                Trim(completion.substr(pos[3] + tags[3].size())).empty();
  if (graded) {
    return {0.25 * placed, std::to_string(placed) + "/4 tags well placed", ""};
  }
  if (strict) return {1.0, "template ok", ""};
  std::string why = placed < 4 ? std::to_string(placed) + "/4 tags well placed"
                               : "text outside the template";
  return {0.0, why, ""};
}

Verdict ScoreMath(std::string_view gold, std::string_view completion, bool dapo) {
  double wrong = dapo ? -1.0 : 0.0;
  auto answer = ExtractFinal(completion);
  if (!answer) return {wrong, "no <answer> or \\boxed{}", ""};
  if (answer->size() > kMaxAnswerChars) return {wrong, "answer longer than 4096 chars", Clip(*answer)};
  Equivalence eq = MathEquivalent(gold, *answer);
  std::string extracted = Trim(*answer);
  if (eq.equal) return {1.0, "correct (" + eq.how + ")", extracted};
  return {wrong, Clip(extracted) + " != " + Clip(gold) + " (" + eq.how + ")", extracted};
}

Verdict ScoreCountdown(const std::vector<int64_t>& numbers, int64_t target,
                       std::string_view completion) {
  auto answer = ExtractFinal(completion);
  if (!answer) return {0.0, "no <answer>", ""};
  std::string expr = Trim(*answer);
  CountdownParse p = ParseCountdown(expr);
  if (!p.well_formed) return {0.0, "malformed expression: " + p.error, Clip(expr, 200)};
  std::vector<int64_t> used = p.numbers, given = numbers;
  std::sort(used.begin(), used.end());
  std::sort(given.begin(), given.end());
  if (used != given) return {0.1, "must use each given number exactly once", expr};
  if (!p.evaluated) return {0.1, p.error, expr};
  if (!(p.value == Rational{target, 1}))
    return {0.1, "evaluates to " + p.value.ToString() + " != " + std::to_string(target), expr};
  return {1.0, "correct", expr};
}

Verdict ScoreArith(std::string_view gold, std::string_view completion) {
  auto answer = ExtractFinal(completion);
  if (!answer) return {0.0, "no <answer> or \\boxed{}", ""};
  auto canon = [](std::string_view s, std::string* out) {
    std::string t;
    for (char c : s)
      if (!std::isspace(static_cast<unsigned char>(c)) && c != ',' && c != '$') t.push_back(c);
    while (!t.empty() && t.back() == '.') t.pop_back();
    bool neg = false;
    size_t i = 0;
    if (i < t.size() && (t[i] == '-' || t[i] == '+')) neg = t[i++] == '-';
    if (i == t.size()) return false;
    for (size_t k = i; k < t.size(); ++k)
      if (!std::isdigit(static_cast<unsigned char>(t[k]))) return false;
    size_t nz = t.find_first_not_of('0', i);
    std::string digits = nz == std::string::npos ? "0" : t.substr(nz);
    *out = (neg && digits != "0" ? "-" : "") + digits;
    return true;
  };
  std::string g, p;
  std::string extracted = Trim(*answer);
  if (!canon(gold, &g)) return {0.0, "gold '" + Clip(gold) + "' is not an integer", extracted};
  if (!canon(extracted, &p)) return {0.0, "'" + Clip(extracted) + "' is not an integer", extracted};
  if (g == p) return {1.0, "correct", extracted};
  return {0.0, Clip(p) + " != " + Clip(g), extracted};
}

Verdict ScoreLanguage(std::string_view completion, std::string_view script_name) {
  auto target = ParseScript(script_name);
  if (!target.ok()) return {0.0, target.status().message(), ""};
  std::string_view text = Reasoning(completion);
  size_t words = 0, in_target = 0;
  Script current = Script::kNone;
  size_t i = 0;
  while (i < text.size()) {
    Script s = ScriptOf(NextCodePoint(text, &i));
    if (s == Script::kCjk) {  // every CJK character is a word
      ++words;
      in_target += *target == Script::kCjk;
      current = Script::kNone;
      continue;
    }
    if (s == Script::kNone) {
      current = Script::kNone;
      continue;
    }
    if (s != current) {
      ++words;
      in_target += s == *target;
      current = s;
    }
  }
  if (words == 0) return {0.0, "no words in the reasoning", ""};
  double share = static_cast<double>(in_target) / static_cast<double>(words);
  return {share, std::to_string(in_target) + "/" + std::to_string(words) + " words in " +
                     std::string(script_name), ""};
}

Verdict ScoreOverlong(int64_t tokens, int64_t max_tokens, int64_t cache_tokens) {
  int64_t free_len = max_tokens - cache_tokens;
  if (tokens <= free_len) return {0.0, "within " + std::to_string(free_len) + " tokens", ""};
  if (tokens > max_tokens) return {-1.0, std::to_string(tokens) + " > " + std::to_string(max_tokens) + " tokens", ""};
  double s = static_cast<double>(free_len - tokens) / static_cast<double>(std::max<int64_t>(1, cache_tokens));
  return {s, std::to_string(tokens) + " tokens in the overlong buffer", ""};
}

Verdict ScoreLength(int64_t tokens, int64_t target_tokens, int64_t max_tokens) {
  if (tokens <= target_tokens) return {0.0, "within target length", ""};
  double span = static_cast<double>(std::max<int64_t>(1, max_tokens - target_tokens));
  double s = -std::min(1.0, static_cast<double>(tokens - target_tokens) / span);
  return {s, std::to_string(tokens) + " tokens > target " + std::to_string(target_tokens), ""};
}

Verdict ScoreRepetition(std::string_view completion, int ngram) {
  std::vector<std::string_view> words;
  size_t i = 0;
  while (i < completion.size()) {
    while (i < completion.size() && std::isspace(static_cast<unsigned char>(completion[i]))) ++i;
    size_t b = i;
    while (i < completion.size() && !std::isspace(static_cast<unsigned char>(completion[i]))) ++i;
    if (i > b) words.push_back(completion.substr(b, i - b));
  }
  size_t n = static_cast<size_t>(std::max(1, ngram));
  if (words.size() < n) return {0.0, "too short for " + std::to_string(n) + "-grams", ""};
  std::unordered_set<std::string> seen;
  size_t total = words.size() - n + 1;
  for (size_t k = 0; k < total; ++k) {
    std::string key;
    for (size_t j = 0; j < n; ++j) {
      key.append(words[k + j]);
      key.push_back('\x1f');
    }
    seen.insert(std::move(key));
  }
  double distinct = static_cast<double>(seen.size()) / static_cast<double>(total);
  return {-(1.0 - distinct), Fmt(100 * (1 - distinct)) + "% repeated " + std::to_string(n) + "-grams", ""};
}

std::optional<std::string> ExtractCodeBlock(std::string_view text, std::string_view language) {
  std::set<std::string> tags;
  if (language == "python") tags = {"python", "py", "python3", "Python"};
  else if (language == "cpp") tags = {"cpp", "c++", "cc", "cxx", "C++"};
  else tags = {std::string(language)};
  std::optional<std::string> tagged, untagged;
  size_t i = 0;
  while (true) {
    size_t open = text.find("```", i);
    if (open == std::string_view::npos) break;
    size_t eol = text.find('\n', open);
    if (eol == std::string_view::npos) break;
    std::string tag = Trim(text.substr(open + 3, eol - open - 3));
    size_t close = text.find("```", eol + 1);
    if (close == std::string_view::npos) break;
    std::string body(text.substr(eol + 1, close - eol - 1));
    if (tags.count(tag)) tagged = body;
    else if (tag.empty()) untagged = body;
    i = close + 3;
  }
  if (tagged) return tagged;
  return untagged;
}

CodeOptions::CodeOptions() {
  run_limits.wall_seconds = 10;
  run_limits.cpu_seconds = 5;
  compile_limits.wall_seconds = 60;
  compile_limits.cpu_seconds = 60;
  compile_limits.memory_bytes = 2ull << 30;
  compile_limits.max_output_bytes = 64 << 10;
  compile_limits.writable_workdir = true;
}

namespace {

// Compares line by line after trimming each line and dropping trailing empty lines.
bool OutputMatches(std::string_view got, std::string_view want) {
  auto lines = [](std::string_view s) {
    std::vector<std::string> out;
    size_t i = 0;
    while (i <= s.size()) {
      size_t e = s.find('\n', i);
      if (e == std::string_view::npos) e = s.size();
      out.push_back(Trim(s.substr(i, e - i)));
      i = e + 1;
    }
    while (!out.empty() && out.back().empty()) out.pop_back();
    return out;
  };
  return lines(got) == lines(want);
}

}  // namespace

Verdict ScoreCode(Sandbox* sandbox, const CodeOptions& options, const TaskSpec& task,
                  std::string_view completion, std::map<std::string, int>* outcomes) {
  if (task.language != "python" && task.language != "cpp")
    return {0.0, "unsupported language '" + Clip(task.language) + "'", ""};
  auto code = ExtractCodeBlock(completion, task.language);
  if (!code) return {0.0, "no ```" + task.language + " block", ""};
  if (task.tests.empty()) return {0.0, "task has no tests", *code};
  if (sandbox == nullptr) return {0.0, "no sandbox", *code};
  bool cpp = task.language == "cpp";
  auto dir = sandbox->MakeWorkdir({{cpp ? "main.cc" : "main.py", *code, false}});
  if (!dir.ok()) return {0.0, "sandbox: " + dir.status().message(), *code};
  auto count = [&](const std::string& reason) {
    if (outcomes) ++(*outcomes)[reason];
  };
  std::vector<std::string> argv = {"python3", "-I", "main.py"};
  if (cpp) {
    SandboxRequest compile;
    compile.argv = {"g++", "-std=c++17", "-O1", "-o", "prog", "main.cc"};
    compile.limits = options.compile_limits;
    compile.workdir = (*dir)->path();
    auto r = sandbox->Run(compile);
    if (!r.ok() || !r->ok()) {
      count("compile_error");
      std::string why = !r.ok() ? r.status().message() : r->reason;
      std::string err = r.ok() ? r->stderr_data : "";
      size_t e = err.find("error:");
      return {0.0, "compile error: " + (e != std::string::npos ? Clip(err.substr(e), 80) : why),
              *code};
    }
    argv = {"./prog"};
  }
  int passed = 0;
  std::string first_failure;
  for (size_t i = 0; i < task.tests.size(); ++i) {
    SandboxRequest run;
    run.argv = argv;
    run.stdin_data = task.tests[i].stdin_data;
    run.limits = options.run_limits;
    run.workdir = (*dir)->path();
    auto r = sandbox->Run(run);
    std::string why;
    if (!r.ok()) {
      why = "sandbox: " + r.status().message();
      count("sandbox_error");
    } else if (r->ok() && OutputMatches(r->stdout_data, task.tests[i].expected_stdout)) {
      ++passed;
      count("passed");
      continue;
    } else if (r->ok()) {
      why = "wrong output";
      count("wrong_output");
    } else {
      why = r->reason;
      count(r->outcome == SandboxOutcome::kExited ? "runtime_error" : SandboxOutcomeName(r->outcome));
    }
    if (first_failure.empty()) first_failure = "test " + std::to_string(i + 1) + ": " + why;
  }
  double frac = static_cast<double>(passed) / static_cast<double>(task.tests.size());
  std::string note = std::to_string(passed) + "/" + std::to_string(task.tests.size()) + " tests passed";
  if (!first_failure.empty()) note += "; " + first_failure;
  return {frac, note, *code};
}

// ---------------------------------------------------------------------------------------------
// Functions of a job and the Scorer.

class Scorer::Function {
 public:
  virtual ~Function() = default;
  virtual Verdict Evaluate(const TaskSpec& task, const Completion& c,
                           std::map<std::string, int>* outcomes) const = 0;
  // Whether this function's verdict decides `correct`.
  virtual bool is_verifier() const { return false; }
};

namespace {

int64_t TokensOf(const Completion& c) {
  return c.tokens >= 0 ? c.tokens : static_cast<int64_t>(c.text.size() / 4);
}

class FormatFn : public Scorer::Function {
 public:
  FormatFn(bool graded, bool prefilled) : graded_(graded), prefilled_(prefilled) {}
  Verdict Evaluate(const TaskSpec&, const Completion& c, std::map<std::string, int>*) const override {
    return ScoreFormat(c.text, graded_, prefilled_);
  }

 private:
  bool graded_, prefilled_;
};

// accuracy / math / countdown / arith / code.
class VerifierFn : public Scorer::Function {
 public:
  VerifierFn(std::string only_kind, bool dapo, Sandbox* sandbox, CodeOptions code, bool binary)
      : only_kind_(std::move(only_kind)), dapo_(dapo), sandbox_(sandbox), code_(code), binary_(binary) {}
  bool is_verifier() const override { return true; }
  Verdict Evaluate(const TaskSpec& task, const Completion& c,
                   std::map<std::string, int>* outcomes) const override {
    if (!only_kind_.empty() && task.kind != only_kind_)
      return {0.0, "not a " + only_kind_ + " task", ""};
    Verdict v;
    if (task.kind == "countdown") {
      v = ScoreCountdown(task.numbers, task.target, c.text);
    } else if (task.kind == "arith") {
      v = ScoreArith(task.answer, c.text);
    } else if (task.kind == "code") {
      v = ScoreCode(sandbox_, code_, task, c.text, outcomes);
      if (binary_) v.score = v.score > 0.99 ? 1.0 : 0.0;
    } else {
      return ScoreMath(task.answer, c.text, dapo_);
    }
    if (dapo_ && v.score < 0.99) v.score = -1.0;
    return v;
  }

 private:
  std::string only_kind_;
  bool dapo_;
  Sandbox* sandbox_;
  CodeOptions code_;
  bool binary_;
};

class LanguageFn : public Scorer::Function {
 public:
  explicit LanguageFn(std::string script) : script_(std::move(script)) {}
  Verdict Evaluate(const TaskSpec&, const Completion& c, std::map<std::string, int>*) const override {
    return ScoreLanguage(c.text, script_);
  }

 private:
  std::string script_;
};

class OverlongFn : public Scorer::Function {
 public:
  OverlongFn(int64_t max, int64_t cache) : max_(max), cache_(cache) {}
  Verdict Evaluate(const TaskSpec&, const Completion& c, std::map<std::string, int>*) const override {
    return ScoreOverlong(TokensOf(c), max_, cache_);
  }

 private:
  int64_t max_, cache_;
};

class LengthFn : public Scorer::Function {
 public:
  LengthFn(int64_t target, int64_t max) : target_(target), max_(max) {}
  Verdict Evaluate(const TaskSpec&, const Completion& c, std::map<std::string, int>*) const override {
    return ScoreLength(TokensOf(c), target_, max_);
  }

 private:
  int64_t target_, max_;
};

class RepetitionFn : public Scorer::Function {
 public:
  explicit RepetitionFn(int n) : n_(n) {}
  Verdict Evaluate(const TaskSpec&, const Completion& c, std::map<std::string, int>*) const override {
    return ScoreRepetition(c.text, n_);
  }

 private:
  int n_;
};

Result<std::unique_ptr<Scorer::Function>> MakeFunction(const RewardTerm& t, Sandbox* sandbox,
                                                        const CodeOptions& code) {
  const std::string& n = t.name;
  if (n == "format" || n == "format_graded") {
    RETURN_IF_ERROR(CheckParams(t, {"graded", "think_prefilled"}));
    ASSIGN_OR_RETURN(bool graded, BoolParam(t, "graded", n == "format_graded"));
    ASSIGN_OR_RETURN(bool pre, BoolParam(t, "think_prefilled", false));
    return std::unique_ptr<Scorer::Function>(new FormatFn(graded, pre));
  }
  if (n == "accuracy" || n == "math" || n == "countdown" || n == "arith" || n == "code") {
    RETURN_IF_ERROR(CheckParams(t, {"dapo", "binary"}));
    ASSIGN_OR_RETURN(bool dapo, BoolParam(t, "dapo", false));
    ASSIGN_OR_RETURN(bool binary, BoolParam(t, "binary", false));
    return std::unique_ptr<Scorer::Function>(
        new VerifierFn(n == "accuracy" ? "" : n, dapo, sandbox, code, binary));
  }
  if (n == "language") {
    RETURN_IF_ERROR(CheckParams(t, {"script"}));
    std::string script = ParamOr(t, "script", "latin");
    RETURN_IF_ERROR(ParseScript(script).status());
    return std::unique_ptr<Scorer::Function>(new LanguageFn(script));
  }
  if (n == "overlong") {
    RETURN_IF_ERROR(CheckParams(t, {"max_tokens", "cache_tokens"}));
    ASSIGN_OR_RETURN(int64_t max, IntParam(t, "max_tokens", 4096));
    ASSIGN_OR_RETURN(int64_t cache, IntParam(t, "cache_tokens", 512));
    if (cache > max) return InvalidArgument("rewards.overlong: cache_tokens > max_tokens");
    return std::unique_ptr<Scorer::Function>(new OverlongFn(max, cache));
  }
  if (n == "length") {
    RETURN_IF_ERROR(CheckParams(t, {"target_tokens", "max_tokens"}));
    ASSIGN_OR_RETURN(int64_t target, IntParam(t, "target_tokens", 1024));
    ASSIGN_OR_RETURN(int64_t max, IntParam(t, "max_tokens", 4096));
    if (target >= max) return InvalidArgument("rewards.length: target_tokens >= max_tokens");
    return std::unique_ptr<Scorer::Function>(new LengthFn(target, max));
  }
  if (n == "repetition") {
    RETURN_IF_ERROR(CheckParams(t, {"ngram"}));
    ASSIGN_OR_RETURN(int64_t ng, IntParam(t, "ngram", 3));
    if (ng < 1 || ng > 16) return InvalidArgument("rewards.repetition.ngram: 1..16");
    return std::unique_ptr<Scorer::Function>(new RepetitionFn(static_cast<int>(ng)));
  }
  return InvalidArgument("unknown reward function '" + n +
                         "' (accuracy|math|countdown|arith|code|format|format_graded|language|overlong|length|repetition)");
}

}  // namespace

Result<RewardConfig> RewardConfig::Parse(std::string_view spec) {
  RewardConfig c;
  std::string s(spec);
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item = Trim(item);
    if (item.empty()) continue;
    RewardTerm t;
    size_t eq = item.find('=');
    t.name = Trim(item.substr(0, eq));
    if (eq != std::string::npos) {
      std::string w = Trim(item.substr(eq + 1));
      char* end = nullptr;
      t.weight = std::strtod(w.c_str(), &end);
      if (w.empty() || *end != '\0' || !std::isfinite(t.weight))
        return InvalidArgument("rewards: weight of '" + t.name + "' is not a number: '" + w + "'");
    }
    for (const auto& prev : c.terms)
      if (prev.name == t.name) return InvalidArgument("rewards: '" + t.name + "' named twice");
    c.terms.push_back(std::move(t));
  }
  if (c.terms.empty()) return InvalidArgument("rewards: no functions named");
  return c;
}

Result<RewardConfig> RewardConfig::FromYaml(const YAML::Node& node) {
  if (!node.IsMap()) return InvalidArgument("rewards: expected a map of name: weight");
  RewardConfig c;
  try {
    for (const auto& kv : node) {
      RewardTerm t;
      t.name = kv.first.as<std::string>();
      if (kv.second.IsScalar()) {
        t.weight = kv.second.as<double>();
      } else if (kv.second.IsMap()) {
        for (const auto& p : kv.second) {
          std::string key = p.first.as<std::string>();
          if (key == "weight") t.weight = p.second.as<double>();
          else if (p.second.IsScalar()) t.params[key] = p.second.as<std::string>();
          else return InvalidArgument("rewards." + t.name + "." + key + ": expected a scalar");
        }
      } else {
        return InvalidArgument("rewards." + t.name + ": expected a weight or a map");
      }
      c.terms.push_back(std::move(t));
    }
  } catch (const YAML::Exception& e) {
    return InvalidArgument(std::string("rewards: ") + e.what());
  }
  if (c.terms.empty()) return InvalidArgument("rewards: no functions named");
  return c;
}

RewardConfig RewardConfig::Default() {
  RewardConfig c;
  c.terms = {{"accuracy", 1.0, {}}, {"format", 0.1, {}}};
  return c;
}

Scorer::~Scorer() = default;

Result<std::unique_ptr<Scorer>> Scorer::Create(const RewardConfig& config, Sandbox* sandbox,
                                               CodeOptions code) {
  std::unique_ptr<Scorer> s(new Scorer());
  s->config_ = config;
  for (const auto& t : config.terms) {
    ASSIGN_OR_RETURN(auto fn, MakeFunction(t, sandbox, code));
    s->functions_.push_back(std::move(fn));
  }
  return s;
}

ScoreReport Scorer::Score(const TaskSpec& task, const Completion& completion) const {
  ScoreReport r;
  bool have_verifier = false;
  for (size_t i = 0; i < functions_.size(); ++i) {
    const RewardTerm& t = config_.terms[i];
    Verdict v = functions_[i]->Evaluate(task, completion, &r.sandbox_outcomes);
    if (!std::isfinite(v.score)) v.score = 0;
    r.components.push_back({t.name, v.score, t.weight, v.note});
    r.total += t.weight * v.score;
    if (functions_[i]->is_verifier() && !have_verifier) {
      have_verifier = true;
      r.correct = v.score >= 0.99;
      r.answer_extracted = v.extracted;
    }
  }
  if (!have_verifier) {
    auto a = ExtractFinal(completion.text);
    if (a) r.answer_extracted = Trim(*a);
  }
  return r;
}

}  // namespace aha::rewardd
