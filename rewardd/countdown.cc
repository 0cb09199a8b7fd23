#include "rewardd/countdown.h"

#include <cctype>
#include <numeric>

namespace aha::rewardd {
namespace {

// Overflow-checked rational arithmetic; returns false on overflow or division by zero.
bool Normalize(__int128 n, __int128 d, Rational* out) {
  if (d == 0) return false;
  if (d < 0) n = -n, d = -d;
  __int128 a = n < 0 ? -n : n, b = d;
  while (b != 0) {
    __int128 t = a % b;
    a = b;
    b = t;
  }
  if (a > 1) n /= a, d /= a;
  constexpr __int128 kMax = INT64_MAX;
  if (n > kMax || n < -kMax || d > kMax) return false;
  out->num = static_cast<int64_t>(n);
  out->den = static_cast<int64_t>(d);
  return true;
}

bool Apply(char op, const Rational& x, const Rational& y, Rational* out) {
  __int128 a = x.num, b = x.den, c = y.num, d = y.den;
  switch (op) {
    case '+': return Normalize(a * d + c * b, b * d, out);
    case '-': return Normalize(a * d - c * b, b * d, out);
    case '*': return Normalize(a * c, b * d, out);
    case '/': return c != 0 && Normalize(a * d, b * c, out);
  }
  return false;
}

class Parser {
 public:
  explicit Parser(std::string text) : s_(std::move(text)) {}

  CountdownParse Run() {
    CountdownParse r;
    Rational v;
    bool ok = Expr(&v);
    Skip();
    if (ok && pos_ != s_.size()) {
      ok = false;
      if (error_.empty()) error_ = "unexpected '" + std::string(1, s_[pos_]) + "'";
    }
    r.numbers = numbers_;
    if (!ok) {
      r.error = error_.empty() ? "malformed expression" : error_;
      return r;
    }
    r.well_formed = true;
    r.evaluated = eval_error_.empty();
    r.error = eval_error_;
    r.value = v;
    return r;
  }

 private:
  void Skip() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool Fail(std::string why) {
    if (error_.empty()) error_ = std::move(why);
    return false;
  }
  // Combines and records the first evaluation error but keeps parsing (well-formedness first).
  void Combine(char op, const Rational& a, const Rational& b, Rational* out) {
    if (!eval_error_.empty()) return;
    if (!Apply(op, a, b, out))
      eval_error_ = (op == '/' && b.num == 0) ? "division by zero" : "arithmetic overflow";
  }

  bool Expr(Rational* out) {
    if (++depth_ > 64) return Fail("nesting deeper than 64");
    Rational acc;
    if (!Term(&acc)) return false;
    while (true) {
      Skip();
      if (pos_ >= s_.size() || (s_[pos_] != '+' && s_[pos_] != '-')) break;
      char op = s_[pos_++];
      Rational rhs;
      if (!Term(&rhs)) return false;
      Combine(op, acc, rhs, &acc);
    }
    --depth_;
    *out = acc;
    return true;
  }

  bool Term(Rational* out) {
    Rational acc;
    if (!Factor(&acc)) return false;
    while (true) {
      Skip();
      if (pos_ >= s_.size() || (s_[pos_] != '*' && s_[pos_] != '/')) break;
      char op = s_[pos_++];
      Rational rhs;
      if (!Factor(&rhs)) return false;
      Combine(op, acc, rhs, &acc);
    }
    *out = acc;
    return true;
  }

  bool Factor(Rational* out) {
    Skip();
    if (pos_ >= s_.size()) return Fail("expression ends early");
    char c = s_[pos_];
    if (c == '(') {
      ++pos_;
      if (!Expr(out)) return false;
      Skip();
      if (pos_ >= s_.size() || s_[pos_] != ')') return Fail("unbalanced parentheses");
      ++pos_;
      return true;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t b = pos_;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
      if (pos_ - b > 18) return Fail("number too long");
      if (pos_ < s_.size() && s_[pos_] == '.') return Fail("decimals are not allowed");
      int64_t v = std::stoll(s_.substr(b, pos_ - b));
      numbers_.push_back(v);
      *out = {v, 1};
      return true;
    }
    if (c == '-' || c == '+') return Fail("unary sign is not allowed");
    return Fail("unexpected '" + std::string(1, c) + "'");
  }

  std::string s_;
  size_t pos_ = 0;
  int depth_ = 0;
  std::vector<int64_t> numbers_;
  std::string error_, eval_error_;
};

void ReplaceAll(std::string& s, std::string_view from, std::string_view to) {
  size_t i = 0;
  while ((i = s.find(from, i)) != std::string::npos) {
    s.replace(i, from.size(), to);
    i += to.size();
  }
}

struct Item {
  Rational value;
  std::string text;
  bool atomic;  // a number or parenthesised: needs no parentheses as an operand
};

bool Search(std::vector<Item>& items, const Rational& target, std::string* out) {
  if (items.size() == 1) {
    if (items[0].value == target) {
      *out = items[0].text;
      return true;
    }
    return false;
  }
  for (size_t i = 0; i < items.size(); ++i) {
    for (size_t j = 0; j < items.size(); ++j) {
      if (i == j) continue;
      for (char op : {'+', '-', '*', '/'}) {
        if ((op == '+' || op == '*') && j < i) continue;  // commutative: one order suffices
        Rational v;
        if (!Apply(op, items[i].value, items[j].value, &v)) continue;
        auto wrap = [](const Item& x) { return x.atomic ? x.text : "(" + x.text + ")"; };
        Item merged{v, wrap(items[i]) + " " + op + " " + wrap(items[j]), false};
        std::vector<Item> next;
        next.reserve(items.size() - 1);
        for (size_t k = 0; k < items.size(); ++k)
          if (k != i && k != j) next.push_back(items[k]);
        next.push_back(merged);
        if (Search(next, target, out)) return true;
      }
    }
  }
  return false;
}

}  // namespace

std::string Rational::ToString() const {
  return den == 1 ? std::to_string(num) : std::to_string(num) + "/" + std::to_string(den);
}

CountdownParse ParseCountdown(std::string_view expression) {
  if (expression.size() > 1024) {
    CountdownParse r;
    r.error = "expression longer than 1024 chars";
    return r;
  }
  std::string s(expression);
  ReplaceAll(s, "\xC3\x97", "*");  // ×
  ReplaceAll(s, "\xC3\xB7", "/");  // ÷
  ReplaceAll(s, "\\times", "*");
  ReplaceAll(s, "\\cdot", "*");
  ReplaceAll(s, "\\div", "/");
  ReplaceAll(s, "\\left", "");
  ReplaceAll(s, "\\right", "");
  ReplaceAll(s, "$", "");
  size_t eq = s.find('=');
  if (eq != std::string::npos) s = s.substr(0, eq);  // "(1 + 2) * 3 = 9"
  return Parser(std::move(s)).Run();
}

std::optional<std::string> SolveCountdown(const std::vector<int64_t>& numbers, int64_t target) {
  if (numbers.empty() || numbers.size() > 7) return std::nullopt;
  std::vector<Item> items;
  for (int64_t n : numbers) items.push_back({{n, 1}, std::to_string(n), true});
  std::string out;
  if (Search(items, {target, 1}, &out)) return out;
  return std::nullopt;
}

}  // namespace aha::rewardd
