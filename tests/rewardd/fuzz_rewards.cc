// Fuzz target: completions are untrusted input. The first line of the input is the gold answer,
// the rest the completion; every verifier must return a finite score in its range and never crash,
// hang or overflow the stack.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "rewardd/countdown.h"
#include "rewardd/math_answer.h"
#include "rewardd/rewards.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aha::rewardd;
  std::string in(reinterpret_cast<const char*>(data), size);
  size_t nl = in.find('\n');
  std::string gold = nl == std::string::npos ? in : in.substr(0, nl);
  std::string completion = nl == std::string::npos ? in : in.substr(nl + 1);
  auto check = [](const Verdict& v, double lo, double hi) {
    if (!std::isfinite(v.score) || v.score < lo - 1e-9 || v.score > hi + 1e-9) std::abort();
  };
  check(ScoreMath(gold, completion, false), 0, 1);
  check(ScoreMath(gold, completion, true), -1, 1);
  check(ScoreArith(gold, completion), 0, 1);
  check(ScoreCountdown({1, 2, 3, 4}, 24, completion), 0, 1);
  check(ScoreFormat(completion, false, false), 0, 1);
  check(ScoreFormat(completion, true, true), 0, 1);
  check(ScoreLanguage(completion, "latin"), 0, 1);
  check(ScoreRepetition(completion, 3), -1, 0);
  (void)MathEquivalent(gold, completion);
  (void)MathEquivalent(completion, gold);
  (void)ParseCountdown(completion);
  (void)ExtractCodeBlock(completion, "python");
  return 0;
}
