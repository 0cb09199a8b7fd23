// Countdown (TinyZero): an arithmetic expression over + - * / and parentheses that uses each given
// number exactly once and equals the target.
//
// ParseCountdown() is our own recursive-descent parser with exact rational arithmetic; nothing is
// ever handed to a shell or an eval. Grammar (whitespace ignored; `×`, `÷`, `\times`, `\cdot`,
// `\div` accepted as * and /; a trailing `= N` is dropped):
//   expr   := term (('+' | '-') term)*
//   term   := factor (('*' | '/') factor)*
//   factor := integer | '(' expr ')'
// There is no unary minus: every operand must be one of the given numbers. Limits: 1,024 chars,
// nesting depth 64, integers of up to 18 digits; intermediate values are int64 fractions and an
// overflow is reported, not wrapped.
//
// SolveCountdown() searches all ways of combining the numbers pairwise (exact rationals) and returns
// one expression that reaches the target, if any: used to prove generated instances solvable.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aha::rewardd {

struct Rational {
  int64_t num = 0;
  int64_t den = 1;  // > 0, gcd(num, den) == 1
  bool operator==(const Rational&) const = default;
  std::string ToString() const;
};

struct CountdownParse {
  bool well_formed = false;   // parsed per the grammar
  bool evaluated = false;     // and evaluated without division by zero or overflow
  Rational value;
  std::vector<int64_t> numbers;  // operands in order of appearance
  std::string error;             // why not well formed / not evaluated
};

CountdownParse ParseCountdown(std::string_view expression);

// An expression over `numbers` (each exactly once) equal to `target`, or nullopt. Cost grows as
// O(n! ^ 2) pair combinations: fine for n <= 6.
std::optional<std::string> SolveCountdown(const std::vector<int64_t>& numbers, int64_t target);

}  // namespace aha::rewardd
