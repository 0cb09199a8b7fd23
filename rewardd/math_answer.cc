#include "rewardd/math_answer.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <vector>

namespace aha::rewardd {
namespace {

bool IsAlpha(char c) { return std::isalpha(static_cast<unsigned char>(c)) != 0; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsSpace(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }

std::string Trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && IsSpace(s[b])) ++b;
  while (e > b && IsSpace(s[e - 1])) --e;
  return std::string(s.substr(b, e - b));
}

void ReplaceAll(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (true) {
    size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    out.append(s, i, j - i);
    out.append(to);
    i = j + from.size();
  }
  out.append(s, i, std::string::npos);
  s.swap(out);
}

// Replaces the LaTeX command `cmd` (e.g. "\\left") when it is not the prefix of a longer command.
void ReplaceCommand(std::string& s, std::string_view cmd, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    if (s.compare(i, cmd.size(), cmd) == 0 &&
        (i + cmd.size() >= s.size() || !IsAlpha(s[i + cmd.size()]))) {
      out.append(to);
      i += cmd.size();
    } else {
      out.push_back(s[i++]);
    }
  }
  s.swap(out);
}

// Index of the brace that closes the one at `open`, or npos.
size_t MatchBrace(std::string_view s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      ++i;
      continue;
    }
    if (s[i] == '{') ++depth;
    else if (s[i] == '}' && --depth == 0) return i;
  }
  return std::string_view::npos;
}

// `\cmd{x}` -> `x` for every occurrence (innermost-first is not needed: contents are kept).
void UnwrapCommand(std::string& s, std::string_view cmd) {
  std::string pat = std::string(cmd) + "{";
  size_t from = 0;
  while (true) {
    size_t i = s.find(pat, from);
    if (i == std::string::npos) return;
    size_t open = i + cmd.size();
    size_t close = MatchBrace(s, open);
    if (close == std::string::npos) return;
    s = s.substr(0, i) + s.substr(open + 1, close - open - 1) + s.substr(close + 1);
    from = i;
  }
}

bool AllMatch(std::string_view s, size_t b, size_t e, int (*pred)(int)) {
  for (size_t i = b; i < e; ++i)
    if (!pred(static_cast<unsigned char>(s[i]))) return false;
  return true;
}

// ^[+-]?\d{1,3}(SEP\d{3})+(\.\d+)?$
bool IsGroupedNumber(std::string_view s, char sep) {
  size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
  size_t lead = 0;
  while (i < s.size() && IsDigit(s[i])) ++i, ++lead;
  if (lead < 1 || lead > 3) return false;
  int groups = 0;
  while (i < s.size() && s[i] == sep) {
    if (i + 4 > s.size() || !AllMatch(s, i + 1, i + 4, isdigit)) return false;
    if (i + 4 < s.size() && IsDigit(s[i + 4])) return false;
    i += 4;
    ++groups;
  }
  if (groups == 0) return false;
  if (i < s.size() && s[i] == '.') {
    ++i;
    size_t d = 0;
    while (i < s.size() && IsDigit(s[i])) ++i, ++d;
    if (d == 0) return false;
  }
  return i == s.size();
}

const std::set<std::string>& UnitWords() {
  static const std::set<std::string> units = {
      "cm", "m", "km", "mm", "inches", "inch", "feet", "ft", "foot", "miles", "mile", "meters",
      "meter", "metres", "metre", "units", "unit", "square", "sq", "cubic", "degrees", "degree",
      "dollars", "dollar", "cents", "cent", "hours", "hour", "hrs", "minutes", "minute", "mins",
      "seconds", "second", "sec", "days", "day", "weeks", "week", "years", "year", "kg", "grams",
      "gram", "pounds", "lbs", "lb", "liters", "liter", "litres", "ml", "mph", "percent", "people",
      "students", "ways", "points", "apples", "marbles", "cookies", "books", "times", "yards",
      "yard", "ounces", "oz", "gallons", "gallon", "months", "month", "items", "pages", "tickets"};
  return units;
}

// Drops trailing unit words ("5 cm", "12 square units", "3 cm^2") after something with a digit.
void DropTrailingUnits(std::string& s) {
  while (true) {
    std::string t = Trim(s);
    size_t sp = t.find_last_of(' ');
    if (sp == std::string::npos) return;
    std::string word = t.substr(sp + 1);
    std::string head = Trim(t.substr(0, sp));
    std::string base = word;
    size_t caret = base.find('^');
    if (caret != std::string::npos) base = base.substr(0, caret);
    std::transform(base.begin(), base.end(), base.begin(), ::tolower);
    if (!UnitWords().count(base) ||
        std::none_of(head.begin(), head.end(), [](char c) { return IsDigit(c); }))
      return;
    s = head;
  }
}

// Collapses whitespace: a space survives only between two letters (so `\pi r` stays readable).
std::string CompactSpaces(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (!IsSpace(s[i])) {
      out.push_back(s[i]);
      continue;
    }
    size_t j = i;
    while (j < s.size() && IsSpace(s[j])) ++j;
    if (!out.empty() && IsAlpha(out.back()) && j < s.size() && IsAlpha(s[j])) out.push_back(' ');
    i = j - 1;
  }
  return out;
}

// Top-level positions of `c` (outside (), [], {}).
std::vector<size_t> TopLevel(std::string_view s, std::string_view token) {
  std::vector<size_t> at;
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c == '(' || c == '[' || c == '{') ++depth;
    else if (c == ')' || c == ']' || c == '}') --depth;
    else if (depth == 0 && s.compare(i, token.size(), token) == 0) at.push_back(i);
  }
  return at;
}

bool IsVariableName(std::string_view s) {
  s = std::string_view(s).substr(0, s.size());
  std::string t = Trim(s);
  if (t.empty()) return false;
  size_t i = 0;
  if (t[0] == '\\') {
    ++i;
    while (i < t.size() && IsAlpha(t[i])) ++i;
    if (i == 1) return false;
  } else if (IsAlpha(t[0])) {
    ++i;
  } else {
    return false;
  }
  if (i < t.size() && t[i] == '_') {
    ++i;
    if (i < t.size() && t[i] == '{') {
      size_t close = MatchBrace(t, i);
      if (close == std::string::npos) return false;
      i = close + 1;
    } else if (i < t.size()) {
      ++i;
    }
  }
  return i == t.size();
}

// "x = 5" -> "5"; "a = b = 5" -> "5"; leaves "x + y = 5" alone.
std::string StripVariablePrefix(const std::string& s) {
  std::vector<size_t> eq = TopLevel(s, "=");
  if (eq.empty() || !TopLevel(s, ",").empty()) return s;  // lists strip per element
  // `\le=`-style operators and `==` are not assignments.
  if (IsVariableName(s.substr(0, eq[0]))) return Trim(s.substr(eq.back() + 1));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Scalar expressions.

struct Node {
  enum Kind { kNum, kVar, kAdd, kSub, kMul, kDiv, kPow, kNeg, kFunc, kFact };
  Node(Kind k, double v = 0, std::string n = "", int x = -1, int y = -1)
      : kind(k), value(v), name(std::move(n)), a(x), b(y) {}
  Kind kind;
  double value;
  std::string name;
  int a, b;
};

struct Tok {
  enum Kind { kNum, kVar, kCmd, kOp, kOpen, kClose, kLBrace, kRBrace, kEnd, kBad };
  Tok(Kind k, std::string t, double v = 0, bool i = false)
      : kind(k), text(std::move(t)), value(v), integer(i) {}
  Kind kind;
  std::string text;
  double value;
  bool integer;
};

std::vector<Tok> Tokenize(std::string_view s) {
  std::vector<Tok> out;
  size_t i = 0;
  while (i < s.size()) {
    char c = s[i];
    if (IsSpace(c)) {
      ++i;
      continue;
    }
    if (IsDigit(c) || (c == '.' && i + 1 < s.size() && IsDigit(s[i + 1]))) {
      size_t b = i;
      bool integer = true;
      while (i < s.size() && IsDigit(s[i])) ++i;
      if (i < s.size() && s[i] == '.' && i + 1 < s.size() && IsDigit(s[i + 1])) {
        integer = false;
        ++i;
        while (i < s.size() && IsDigit(s[i])) ++i;
      } else if (i < s.size() && s[i] == '.' && (i + 1 == s.size() || !IsDigit(s[i + 1]))) {
        ++i;  // "5." is 5
      }
      if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
        size_t j = i + 1;
        if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
        if (j < s.size() && IsDigit(s[j])) {
          integer = false;
          i = j;
          while (i < s.size() && IsDigit(s[i])) ++i;
        }
      }
      std::string text(s.substr(b, i - b));
      out.push_back({Tok::kNum, text, std::strtod(text.c_str(), nullptr), integer});
      continue;
    }
    if (IsAlpha(c)) {
      out.push_back({Tok::kVar, std::string(1, c)});
      ++i;
      continue;
    }
    if (c == '\\') {
      size_t b = ++i;
      while (i < s.size() && IsAlpha(s[i])) ++i;
      if (i == b) {
        if (i < s.size() && s[i] == '{') {
          out.push_back({Tok::kOpen, "{"});
          ++i;
        } else if (i < s.size() && s[i] == '}') {
          out.push_back({Tok::kClose, "}"});
          ++i;
        } else {
          out.push_back({Tok::kBad, "\\"});
          ++i;
        }
        continue;
      }
      out.push_back({Tok::kCmd, std::string(s.substr(b, i - b))});
      continue;
    }
    switch (c) {
      case '+': case '-': case '*': case '/': case '^': case '!': case '%': case '_': case '|':
        out.push_back({Tok::kOp, std::string(1, c)});
        break;
      case '(': case '[':
        out.push_back({Tok::kOpen, std::string(1, c)});
        break;
      case ')': case ']':
        out.push_back({Tok::kClose, std::string(1, c)});
        break;
      case '{':
        out.push_back({Tok::kLBrace, "{"});
        break;
      case '}':
        out.push_back({Tok::kRBrace, "}"});
        break;
      default:
        out.push_back({Tok::kBad, std::string(1, c)});
    }
    ++i;
  }
  out.push_back({Tok::kEnd, ""});
  return out;
}

const std::set<std::string>& FunctionNames() {
  static const std::set<std::string> f = {"sin", "cos", "tan", "cot", "sec", "csc", "ln", "log",
                                          "exp", "arcsin", "arccos", "arctan", "sinh", "cosh",
                                          "tanh"};
  return f;
}
const std::set<std::string>& GreekNames() {
  static const std::set<std::string> g = {
      "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
      "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon",
      "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma",
      "Phi", "Psi", "Omega"};
  return g;
}

class ExprParser {
 public:
  explicit ExprParser(std::vector<Tok> toks) : t_(std::move(toks)) {}

  // Root node index, or -1 when the text is not one scalar expression.
  int ParseAll() {
    int root = Expr();
    if (root < 0 || t_[p_].kind != Tok::kEnd) return -1;
    return root;
  }
  const std::vector<Node>& nodes() const { return nodes_; }

 private:
  const Tok& Peek() const { return t_[p_]; }
  bool IsOp(const char* op) const { return Peek().kind == Tok::kOp && Peek().text == op; }
  bool IsCmd(const char* c) const { return Peek().kind == Tok::kCmd && Peek().text == c; }
  int Add(Node n) {
    nodes_.push_back(std::move(n));
    return static_cast<int>(nodes_.size()) - 1;
  }
  int Bin(Node::Kind k, int a, int b) { return (a < 0 || b < 0) ? -1 : Add({k, 0, "", a, b}); }

  struct DepthGuard {
    explicit DepthGuard(int* d) : d_(d) { ++*d_; }
    ~DepthGuard() { --*d_; }
    int* d_;
  };

  int Expr() {
    DepthGuard g(&depth_);
    if (depth_ > kMaxParseDepth) return -1;
    int left = Term();
    while (left >= 0 && (IsOp("+") || IsOp("-"))) {
      Node::Kind k = Peek().text == "+" ? Node::kAdd : Node::kSub;
      ++p_;
      left = Bin(k, left, Term());
    }
    return left;
  }

  bool StartsPrimary() const {
    const Tok& k = Peek();
    if (k.kind == Tok::kNum || k.kind == Tok::kVar || k.kind == Tok::kLBrace) return true;
    if (k.kind == Tok::kOpen) return k.text != "{";  // `\{` opens a set, not a factor
    if (k.kind == Tok::kCmd)
      return k.text == "frac" || k.text == "sqrt" || k.text == "pi" || k.text == "infty" ||
             FunctionNames().count(k.text) || GreekNames().count(k.text);
    return false;
  }

  int Term() {
    int left = Unary();
    while (left >= 0) {
      if (IsOp("*") || IsCmd("cdot") || IsCmd("times")) {
        ++p_;
        left = Bin(Node::kMul, left, Unary());
      } else if (IsOp("/") || IsCmd("div")) {
        ++p_;
        left = Bin(Node::kDiv, left, Unary());
      } else if (StartsPrimary()) {
        left = Bin(Node::kMul, left, Power());
      } else {
        break;
      }
    }
    return left;
  }

  int Unary() {
    DepthGuard g(&depth_);
    if (depth_ > kMaxParseDepth) return -1;
    if (IsOp("-")) {
      ++p_;
      int x = Unary();
      return x < 0 ? -1 : Add({Node::kNeg, 0, "", x});
    }
    if (IsOp("+")) {
      ++p_;
      return Unary();
    }
    return Power();
  }

  int Power() {
    DepthGuard g(&depth_);
    if (depth_ > kMaxParseDepth) return -1;
    int base = Postfix();
    if (base >= 0 && IsOp("^")) {
      ++p_;
      int exp = Exponent();
      return Bin(Node::kPow, base, exp);
    }
    return base;
  }

  // `^{...}`, `^2`, `^-1`, `^x`, `^\pi`.
  int Exponent() {
    if (Peek().kind == Tok::kLBrace) return Group();
    if (IsOp("-")) {
      ++p_;
      int x = Exponent();
      return x < 0 ? -1 : Add({Node::kNeg, 0, "", x});
    }
    return Postfix();
  }

  int Postfix() {
    int x = Primary();
    while (x >= 0) {
      if (IsOp("!")) {
        ++p_;
        x = Add({Node::kFact, 0, "", x});
      } else if (IsOp("%")) {
        ++p_;
        x = Bin(Node::kDiv, x, Add({Node::kNum, 100.0}));
      } else {
        break;
      }
    }
    return x;
  }

  int Group() {  // `{ expr }`
    if (Peek().kind != Tok::kLBrace) return -1;
    ++p_;
    int x = Expr();
    if (x < 0 || Peek().kind != Tok::kRBrace) return -1;
    ++p_;
    return x;
  }

  // Argument of \frac, \sqrt, `\frac12`: a braced group or a single digit / letter / command.
  int Argument() {
    if (Peek().kind == Tok::kLBrace) return Group();
    if (Peek().kind == Tok::kNum) {
      // `\frac12`: the first digit only.
      Tok& k = t_[p_];
      if (k.integer && k.text.size() > 1) {
        double d = k.text[0] - '0';
        k.text = k.text.substr(1);
        k.value = std::strtod(k.text.c_str(), nullptr);
        return Add({Node::kNum, d});
      }
      ++p_;
      return Add({Node::kNum, k.value});
    }
    if (Peek().kind == Tok::kVar) {
      ++p_;
      return Add({Node::kVar, 0, t_[p_ - 1].text});
    }
    return Primary();
  }

  int Primary() {
    DepthGuard g(&depth_);
    if (depth_ > kMaxParseDepth) return -1;
    const Tok k = Peek();
    switch (k.kind) {
      case Tok::kNum: {
        ++p_;
        int n = Add({Node::kNum, k.value});
        // Mixed number: `2\frac{1}{2}` is 2 + 1/2.
        if (k.integer && IsCmd("frac")) {
          size_t save = p_;
          int f = Primary();
          if (f >= 0 && nodes_[f].kind == Node::kDiv && nodes_[nodes_[f].a].kind == Node::kNum &&
              nodes_[nodes_[f].b].kind == Node::kNum)
            return Bin(Node::kAdd, n, f);
          p_ = save;
        }
        return n;
      }
      case Tok::kVar:
        ++p_;
        return Add({Node::kVar, 0, k.text});
      case Tok::kLBrace:
        return Group();
      case Tok::kOpen: {
        if (k.text == "{") return -1;
        ++p_;
        int x = Expr();
        if (x < 0 || Peek().kind != Tok::kClose) return -1;
        ++p_;
        return x;
      }
      case Tok::kOp:
        if (k.text == "|") {  // |x|
          ++p_;
          int x = Expr();
          if (x < 0 || !IsOp("|")) return -1;
          ++p_;
          return Add({Node::kFunc, 0, "abs", x});
        }
        return -1;
      case Tok::kCmd: {
        ++p_;
        if (k.text == "frac") {
          int a = Argument();
          int b = a < 0 ? -1 : Argument();
          return Bin(Node::kDiv, a, b);
        }
        if (k.text == "sqrt") {
          int index = -1;
          if (Peek().kind == Tok::kOpen && Peek().text == "[") {
            ++p_;
            index = Expr();
            if (index < 0 || Peek().kind != Tok::kClose || Peek().text != "]") return -1;
            ++p_;
          }
          int x = Argument();
          if (x < 0) return -1;
          if (index < 0) return Add({Node::kFunc, 0, "sqrt", x});
          int inv = Bin(Node::kDiv, Add({Node::kNum, 1.0}), index);
          return Bin(Node::kPow, x, inv);
        }
        if (k.text == "pi") return Add({Node::kNum, M_PI});
        if (k.text == "infty") return Add({Node::kNum, INFINITY});
        if (GreekNames().count(k.text)) return Add({Node::kVar, 0, "\\" + k.text});
        if (FunctionNames().count(k.text)) {
          std::string name = k.text;
          int base = -1;
          if (name == "log" && IsOp("_")) {
            ++p_;
            base = Argument();
            if (base < 0) return -1;
          }
          int power = -1;  // \sin^2 x
          if (IsOp("^")) {
            ++p_;
            power = Exponent();
            if (power < 0) return -1;
          }
          int arg = Power();
          if (arg < 0) return -1;
          int f = Add({Node::kFunc, 0, base >= 0 ? "ln" : name, arg});
          if (base >= 0)
            f = Bin(Node::kDiv, f, Add({Node::kFunc, 0, "ln", base}));
          if (power >= 0) f = Bin(Node::kPow, f, power);
          return f;
        }
        return -1;
      }
      default:
        return -1;
    }
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
  int depth_ = 0;
  std::vector<Node> nodes_;
};

double Eval(const std::vector<Node>& n, int i, const std::map<std::string, double>& vars) {
  const Node& x = n[i];
  switch (x.kind) {
    case Node::kNum: return x.value;
    case Node::kVar: {
      auto it = vars.find(x.name);
      return it == vars.end() ? NAN : it->second;
    }
    case Node::kAdd: return Eval(n, x.a, vars) + Eval(n, x.b, vars);
    case Node::kSub: return Eval(n, x.a, vars) - Eval(n, x.b, vars);
    case Node::kMul: return Eval(n, x.a, vars) * Eval(n, x.b, vars);
    case Node::kDiv: return Eval(n, x.a, vars) / Eval(n, x.b, vars);
    case Node::kPow: return std::pow(Eval(n, x.a, vars), Eval(n, x.b, vars));
    case Node::kNeg: return -Eval(n, x.a, vars);
    case Node::kFact: {
      double v = Eval(n, x.a, vars);
      if (v < 0 || v > 170 || v != std::floor(v)) return NAN;
      return std::tgamma(v + 1);
    }
    case Node::kFunc: {
      double v = Eval(n, x.a, vars);
      const std::string& f = x.name;
      if (f == "sqrt") return std::sqrt(v);
      if (f == "abs") return std::fabs(v);
      if (f == "sin") return std::sin(v);
      if (f == "cos") return std::cos(v);
      if (f == "tan") return std::tan(v);
      if (f == "cot") return 1 / std::tan(v);
      if (f == "sec") return 1 / std::cos(v);
      if (f == "csc") return 1 / std::sin(v);
      if (f == "ln") return std::log(v);
      if (f == "log") return std::log10(v);
      if (f == "exp") return std::exp(v);
      if (f == "arcsin") return std::asin(v);
      if (f == "arccos") return std::acos(v);
      if (f == "arctan") return std::atan(v);
      if (f == "sinh") return std::sinh(v);
      if (f == "cosh") return std::cosh(v);
      if (f == "tanh") return std::tanh(v);
      return NAN;
    }
  }
  return NAN;
}

struct Parsed {
  std::vector<Node> nodes;
  int root = -1;
  std::set<std::string> vars;
};

std::optional<Parsed> ParseScalar(std::string_view s) {
  if (s.empty() || s.size() > kMaxAnswerChars) return std::nullopt;
  ExprParser parser(Tokenize(s));
  int root = parser.ParseAll();
  if (root < 0) return std::nullopt;
  Parsed p{parser.nodes(), root, {}};
  for (const Node& n : p.nodes)
    if (n.kind == Node::kVar) p.vars.insert(n.name);
  return p;
}

bool Close(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return false;
  if (std::isinf(a) || std::isinf(b)) return a == b;
  double diff = std::fabs(a - b);
  return diff <= 1e-9 || diff <= 1e-6 * std::max(std::fabs(a), std::fabs(b));
}

// Places after the point of a decimal literal ("0.33" -> 2), or -1.
int DecimalPlaces(std::string_view s) {
  size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
  size_t dot = s.find('.');
  if (dot == std::string_view::npos || i == s.size()) return -1;
  for (size_t k = i; k < s.size(); ++k)
    if (k != dot && !IsDigit(s[k])) return -1;
  return static_cast<int>(s.size() - dot - 1);
}

bool TextEqual(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i])))
      return false;
  return true;
}

Equivalence ScalarEquivalent(std::string gold, std::string pred) {
  gold = StripVariablePrefix(gold);
  pred = StripVariablePrefix(pred);
  if (gold == pred) return {true, "string"};
  if (TextEqual(gold, pred)) return {true, "text"};
  // Percentages: "50%" matches 50 and 0.5.
  bool gold_pct = !gold.empty() && gold.back() == '%';
  bool pred_pct = !pred.empty() && pred.back() == '%';
  if (gold_pct) gold.pop_back();
  if (pred_pct) pred.pop_back();
  auto g = ParseScalar(gold);
  auto p = ParseScalar(pred);
  if (!g || !p) return {false, !g ? "gold does not parse" : "answer does not parse"};
  std::set<std::string> vars = g->vars;
  vars.insert(p->vars.begin(), p->vars.end());
  if (vars.empty()) {
    double gv = Eval(g->nodes, g->root, {});
    double pv = Eval(p->nodes, p->root, {});
    if (Close(gv, pv)) return {true, "numeric"};
    if (pred_pct && !gold_pct && Close(gv, pv / 100)) return {true, "numeric (percent)"};
    if (gold_pct && !pred_pct && Close(gv / 100, pv)) return {true, "numeric (percent)"};
    int places = DecimalPlaces(gold);
    if (places >= 2 && DecimalPlaces(pred) < 0 && std::isfinite(pv) &&
        std::fabs(pv - gv) <= 0.5 * std::pow(10.0, -places) + 1e-12)
      return {true, "numeric (rounded to gold precision)"};
    return {false, "numeric mismatch"};
  }
  // Expressions: equal at fixed pseudo-random points (deterministic: same verdict every run).
  uint64_t state = 0x9E3779B97F4A7C15ull;
  int agreed = 0;
  for (int trial = 0; trial < 12; ++trial) {
    std::map<std::string, double> at;
    for (const auto& v : vars) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      at[v] = 0.5 + 2.0 * static_cast<double>(state >> 11) / 9007199254740992.0;
    }
    double gv = Eval(g->nodes, g->root, at);
    double pv = Eval(p->nodes, p->root, at);
    if (!std::isfinite(gv) && !std::isfinite(pv)) continue;
    if (!Close(gv, pv)) return {false, "expression differs at a test point"};
    ++agreed;
  }
  if (agreed >= 3) return {true, "expression"};
  return {false, "expression not evaluable"};
}

// The shape of an answer: see the header.
struct Shape {
  enum Kind { kScalar, kSequence, kSet, kList, kUnion } kind = kScalar;
  char open = 0, close = 0;
  std::vector<std::string> items;
};

std::vector<std::string> SplitTopLevel(const std::string& s, std::string_view sep) {
  std::vector<std::string> parts;
  size_t from = 0;
  for (size_t at : TopLevel(s, sep)) {
    parts.push_back(Trim(std::string_view(s).substr(from, at - from)));
    from = at + sep.size();
  }
  parts.push_back(Trim(std::string_view(s).substr(from)));
  return parts;
}

// True when the bracket at 0 closes at the last character.
bool Enclosed(const std::string& s) {
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c == '(' || c == '[' || c == '{') ++depth;
    else if (c == ')' || c == ']' || c == '}') {
      if (--depth == 0 && i + 1 != s.size()) return false;
    }
  }
  return depth == 0;
}

Shape ShapeOf(const std::string& s) {
  Shape shape;
  if (TopLevel(s, "\\cup").size() > 0) {
    shape.kind = Shape::kUnion;
    shape.items = SplitTopLevel(s, "\\cup");
    return shape;
  }
  if (s.size() >= 4 && s.rfind("\\{", 0) == 0 && s.compare(s.size() - 2, 2, "\\}") == 0 &&
      Enclosed(s.substr(1))) {
    shape.kind = Shape::kSet;
    std::string inner = s.substr(2, s.size() - 4);
    shape.items = Trim(inner).empty() ? std::vector<std::string>{} : SplitTopLevel(inner, ",");
    return shape;
  }
  if (s.size() >= 2 && (s[0] == '(' || s[0] == '[') && (s.back() == ')' || s.back() == ']') &&
      Enclosed(s)) {
    std::string inner = s.substr(1, s.size() - 2);
    if (!TopLevel(inner, ",").empty()) {
      shape.kind = Shape::kSequence;
      shape.open = s[0];
      shape.close = s.back();
      shape.items = SplitTopLevel(inner, ",");
      return shape;
    }
  }
  if (!TopLevel(s, ",").empty()) {
    shape.kind = Shape::kList;
    shape.items = SplitTopLevel(s, ",");
    return shape;
  }
  size_t pm = s.find("\\pm");
  if (pm != std::string::npos && s.find("\\pm", pm + 3) == std::string::npos) {
    shape.kind = Shape::kList;
    shape.items = {s.substr(0, pm) + "+" + s.substr(pm + 3), s.substr(0, pm) + "-" + s.substr(pm + 3)};
    return shape;
  }
  shape.items = {s};
  return shape;
}

Equivalence Equivalent(const std::string& gold, const std::string& pred, int depth);

bool UnorderedMatch(const std::vector<std::string>& g, const std::vector<std::string>& p,
                    int depth) {
  if (g.size() != p.size()) return false;
  std::vector<bool> used(p.size(), false);
  for (const auto& x : g) {
    bool found = false;
    for (size_t j = 0; j < p.size() && !found; ++j)
      if (!used[j] && Equivalent(x, p[j], depth + 1).equal) used[j] = found = true;
    if (!found) return false;
  }
  return true;
}

Equivalence Equivalent(const std::string& gold, const std::string& pred, int depth) {
  if (depth > 8) return {false, "nesting too deep"};
  if (gold == pred) return {true, "string"};
  Shape g = ShapeOf(gold);
  Shape p = ShapeOf(pred);
  switch (g.kind) {
    case Shape::kScalar:
      if (p.kind != Shape::kScalar) return {false, "answer is not a single value"};
      return ScalarEquivalent(gold, pred);
    case Shape::kSequence: {
      if (p.kind != Shape::kSequence) return {false, "answer is not a tuple/interval"};
      if (g.open != p.open || g.close != p.close) return {false, "brackets differ"};
      if (g.items.size() != p.items.size()) return {false, "tuple length differs"};
      for (size_t i = 0; i < g.items.size(); ++i)
        if (!Equivalent(g.items[i], p.items[i], depth + 1).equal)
          return {false, "element " + std::to_string(i + 1) + " differs"};
      return {true, g.open == '(' && g.close == ')' ? "tuple" : "interval"};
    }
    case Shape::kSet:
    case Shape::kList:
      if (p.kind != Shape::kSet && p.kind != Shape::kList) return {false, "answer is not a set"};
      return UnorderedMatch(g.items, p.items, depth) ? Equivalence{true, "set"}
                                                      : Equivalence{false, "sets differ"};
    case Shape::kUnion:
      if (p.kind != Shape::kUnion) return {false, "answer is not a union"};
      return UnorderedMatch(g.items, p.items, depth) ? Equivalence{true, "union"}
                                                      : Equivalence{false, "unions differ"};
  }
  return {false, "unreachable"};
}

}  // namespace

std::optional<std::string> ExtractAnswerTag(std::string_view text) {
  size_t close = text.rfind("</answer>");
  if (close == std::string_view::npos) return std::nullopt;
  size_t open = text.rfind("<answer>", close);
  if (open == std::string_view::npos) return std::nullopt;
  return std::string(text.substr(open + 8, close - open - 8));
}

std::optional<std::string> ExtractLastBoxed(std::string_view text) {
  size_t best = std::string_view::npos;
  size_t best_len = 0;
  for (std::string_view cmd : {std::string_view("\\boxed"), std::string_view("\\fbox")}) {
    size_t at = text.rfind(cmd);
    if (at != std::string_view::npos && (best == std::string_view::npos || at > best)) {
      best = at;
      best_len = cmd.size();
    }
  }
  if (best == std::string_view::npos) return std::nullopt;
  size_t i = best + best_len;
  while (i < text.size() && text[i] == ' ') ++i;
  if (i < text.size() && text[i] == '{') {
    size_t close = MatchBrace(text, i);
    if (close == std::string_view::npos) return std::nullopt;
    return std::string(text.substr(i + 1, close - i - 1));
  }
  // `\boxed 5`: up to the next space or `$`.
  size_t b = i;
  while (i < text.size() && text[i] != '$' && !IsSpace(text[i])) ++i;
  if (i == b) return std::nullopt;
  return std::string(text.substr(b, i - b));
}

std::optional<std::string> ExtractMathAnswer(std::string_view completion) {
  if (auto tag = ExtractAnswerTag(completion)) {
    if (auto boxed = ExtractLastBoxed(*tag)) return boxed;
    return Trim(*tag);
  }
  return ExtractLastBoxed(completion);
}

std::string NormalizeMathAnswer(std::string_view answer) {
  std::string s = Trim(answer);
  if (s.size() > kMaxAnswerChars) return s;
  // Unicode spellings of LaTeX symbols.
  ReplaceAll(s, "\xE2\x88\x92", "-");        // U+2212 minus
  ReplaceAll(s, "\xC3\x97", "\\times ");     // ×
  ReplaceAll(s, "\xC2\xB7", "\\cdot ");      // ·
  ReplaceAll(s, "\xC3\xB7", "/");            // ÷
  ReplaceAll(s, "\xCF\x80", "\\pi ");        // π
  ReplaceAll(s, "\xE2\x88\x9E", "\\infty "); // ∞
  ReplaceAll(s, "\xE2\x88\x9A", "\\sqrt");   // √
  ReplaceAll(s, "\xC2\xB0", "");             // °
  ReplaceAll(s, "\xE2\x88\xAA", "\\cup ");   // ∪
  ReplaceAll(s, "**", "^");
  // Math-mode delimiters.
  if (s.rfind("\\(", 0) == 0 && s.size() >= 4 && s.compare(s.size() - 2, 2, "\\)") == 0)
    s = s.substr(2, s.size() - 4);
  if (s.rfind("\\[", 0) == 0 && s.size() >= 4 && s.compare(s.size() - 2, 2, "\\]") == 0)
    s = s.substr(2, s.size() - 4);
  ReplaceAll(s, "\\$", "");
  ReplaceAll(s, "$", "");
  // Sizing and spacing.
  ReplaceCommand(s, "\\left.", "");
  ReplaceCommand(s, "\\right.", "");
  ReplaceAll(s, "\\left.", "");
  ReplaceAll(s, "\\right.", "");
  ReplaceCommand(s, "\\left", "");
  ReplaceCommand(s, "\\right", "");
  ReplaceCommand(s, "\\bigl", "");
  ReplaceCommand(s, "\\bigr", "");
  ReplaceCommand(s, "\\displaystyle", "");
  ReplaceCommand(s, "\\dfrac", "\\frac");
  ReplaceCommand(s, "\\tfrac", "\\frac");
  ReplaceCommand(s, "\\quad", " ");
  ReplaceCommand(s, "\\qquad", " ");
  ReplaceAll(s, "{,}", "");
  ReplaceAll(s, "\\!", "");
  ReplaceAll(s, "\\,", " ");
  ReplaceAll(s, "\\;", " ");
  ReplaceAll(s, "\\:", " ");
  ReplaceAll(s, "\\ ", " ");
  ReplaceAll(s, "~", " ");
  // Degrees and percent.
  ReplaceAll(s, "^{\\circ}", "");
  ReplaceAll(s, "^\\circ", "");
  ReplaceCommand(s, "\\circ", "");
  ReplaceCommand(s, "\\degree", "");
  ReplaceAll(s, "\\%", "%");
  ReplaceCommand(s, "\\le", "\\leq");
  ReplaceCommand(s, "\\ge", "\\geq");
  ReplaceCommand(s, "\\inf", "\\infty");
  // Text wrappers (units are dropped below).
  for (const char* cmd : {"\\text", "\\textbf", "\\textit", "\\textrm", "\\textnormal", "\\mathrm",
                          "\\mathbf", "\\mathit", "\\mbox", "\\operatorname", "\\boxed"})
    UnwrapCommand(s, cmd);
  s = Trim(s);
  DropTrailingUnits(s);
  while (!s.empty() && (s.back() == '.' || IsSpace(s.back()))) s.pop_back();
  while (s.size() >= 2 && s.compare(s.size() - 2, 2, "\\\\") == 0) s = Trim(s.substr(0, s.size() - 2));
  s = Trim(s);
  s = StripVariablePrefix(s);
  if (IsGroupedNumber(s, ',')) ReplaceAll(s, ",", "");
  if (IsGroupedNumber(s, ' ')) ReplaceAll(s, " ", "");
  s = CompactSpaces(s);
  ReplaceAll(s, "+\\infty", "\\infty");
  if (s.size() > 1 && s[0] == '+' && IsDigit(s[1])) s = s.substr(1);
  // Multiple-choice letters: "(B)" -> "B".
  if (s.size() == 3 && s[0] == '(' && s[2] == ')' && std::isupper(static_cast<unsigned char>(s[1])))
    s = s.substr(1, 1);
  return s;
}

Equivalence MathEquivalent(std::string_view gold, std::string_view pred) {
  if (pred.size() > kMaxAnswerChars) return {false, "answer longer than 4096 chars"};
  if (gold.size() > kMaxAnswerChars) return {false, "gold longer than 4096 chars"};
  std::string g = NormalizeMathAnswer(gold);
  std::string p = NormalizeMathAnswer(pred);
  if (p.empty()) return {false, "empty answer"};
  return Equivalent(g, p, 0);
}

std::optional<double> EvaluateMathScalar(std::string_view normalized) {
  auto p = ParseScalar(normalized);
  if (!p || !p->vars.empty()) return std::nullopt;
  return Eval(p->nodes, p->root, {});
}

}  // namespace aha::rewardd
