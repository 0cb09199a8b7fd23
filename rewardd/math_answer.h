// Math answers: extraction from a completion, normalisation, and equivalence with a gold answer.
//
// Extraction (ExtractMathAnswer): the last `<answer>...</answer>`; inside it the last `\boxed{...}`
// when there is one, else its whole text. Without an answer tag, the last `\boxed{...}` (or
// `\fbox{...}`) of the completion. Braces are matched with nesting.
//
// Normalisation (NormalizeMathAnswer) makes notational variants one string: `$`, `\(..\)`,
// `\left`/`\right`, `\dfrac`/`\tfrac` -> `\frac`, `\text{..}`/`\mathrm{..}` unwrapped and trailing
// unit words dropped, degrees, `\%` -> `%`, thousands separators (`1,234`, `1{,}234`, `1\,234`),
// a trailing period, `x =` prefixes, and spacing.
//
// Equivalence (MathEquivalent(gold, pred)), gold first because the gold decides the structure:
//   1. equal normalised strings (case-insensitive for plain words);
//   2. structures: a bracketed sequence `(a,b)` / `[a,b)` compares ordered with its brackets (tuples
//      and intervals), `\{a,b\}` and a bare list `a, b` compare unordered (sets, solution lists),
//      `A \cup B` compares unordered, `a \pm b` expands to two elements;
//   3. scalars: parsed with a small LaTeX expression parser (integers, decimals, scientific
//      notation, `\frac`, mixed numbers, `\sqrt`, `\sqrt[n]`, `\pi`, powers, `\cdot`/`\times`,
//      implicit products, percentages, `\sin`/`\cos`/`\ln`/...) and compared numerically within a
//      relative tolerance; expressions with variables are evaluated at fixed pseudo-random points.
//      A gold decimal with >= 2 places also accepts an exact prediction (`\frac13` for `0.33`) that
//      rounds to it; a literal decimal prediction must match within the tolerance.
//
// Hostile input: every function is linear in the input up to kMaxAnswerChars (longer answers are
// rejected with a note), and the parser's recursion depth is bounded (kMaxParseDepth), so a
// 10,000-deep nesting returns "not equivalent", never a stack overflow.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace aha::rewardd {

inline constexpr size_t kMaxAnswerChars = 4096;
inline constexpr int kMaxParseDepth = 128;

// Contents of the last `<answer>...</answer>`, if any.
std::optional<std::string> ExtractAnswerTag(std::string_view text);
// Contents of the last `\boxed{...}` / `\fbox{...}` with balanced braces, if any.
std::optional<std::string> ExtractLastBoxed(std::string_view text);
// The answer as described above; nullopt when the completion states none.
std::optional<std::string> ExtractMathAnswer(std::string_view completion);

std::string NormalizeMathAnswer(std::string_view answer);

struct Equivalence {
  bool equal = false;
  std::string how;  // "string", "numeric", "expression", "tuple", "set", ... or why not
};
Equivalence MathEquivalent(std::string_view gold, std::string_view pred);

// Evaluates a normalised scalar expression without variables; nullopt when it does not parse
// or has free variables. Exposed for tests and for the arith verifier.
std::optional<double> EvaluateMathScalar(std::string_view normalized);

}  // namespace aha::rewardd
