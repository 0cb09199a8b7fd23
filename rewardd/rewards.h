// Rule-based reward functions (shared/GRPO.md "Rule-based rewards") and the Scorer that combines
// the ones a job names into a total.
//
// Each function maps (task, completion) to an unweighted score and a short note. The job names the
// functions and their weights (`rewards:` in the job file, or `--rewards accuracy=1,format=0.1`):
//   accuracy    the task's verifier, chosen by task kind: math (MathEquivalent), countdown, arith,
//               code; 1 correct / 0 wrong (`dapo: true`: +1 / -1). Countdown keeps TinyZero's 0.1
//               for a well-formed wrong expression.
//   math, countdown, arith, code   one verifier explicitly (0 with a note for other kinds)
//   format      R1-Zero template `<think>..</think> <answer>..</answer>`, each tag once, in order:
//               1/0; `graded: true` (or the name format_graded) gives 0.25 per well-placed tag. `think_prefilled: true` when the
//               prompt template already ends with `<think>`.
//   language    share of reasoning words (inside <think>, else before <answer>) in the target script
//               (`script: latin|cjk|cyrillic|arabic|devanagari`, default latin).
//   overlong    DAPO soft overlong punishment over completion tokens (`max_tokens`, `cache_tokens`):
//               0, linear down to -1 inside the buffer, -1 beyond.
//   length      per-sample length penalty: 0 up to `target_tokens`, linear to -1 at `max_tokens`.
//   repetition  -(1 - distinct n-grams / n-grams) over words (`ngram`, default 3).
// The total is sum(weight * score). `correct` is the verifier's verdict (accuracy score >= 0.99).
//
// Thread-safety: Score() is const and safe from many threads (the code sandbox serialises what it
// must). Cost: linear in the completion, plus sandbox runs for code.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "rewardd/sandbox.h"

namespace YAML {
class Node;
}

namespace aha::rewardd {

struct CodeTestCase {
  std::string stdin_data;
  std::string expected_stdout;
};

// What a verifier knows of a task (mirrors proto Task).
struct TaskSpec {
  std::string kind = "math";  // math|countdown|arith|code|other
  std::string answer;
  std::vector<int64_t> numbers;
  int64_t target = 0;
  std::vector<CodeTestCase> tests;
  std::string language = "python";
};

struct Completion {
  std::string_view text;
  int64_t tokens = -1;     // completion tokens; -1 = unknown (estimated as bytes / 4)
  bool truncated = false;  // finish reason "length"
};

struct ComponentScore {
  std::string name;
  double score = 0;
  double weight = 0;
  std::string note;
};

struct ScoreReport {
  double total = 0;
  std::vector<ComponentScore> components;
  std::string answer_extracted;
  bool correct = false;
  // Sandbox outcomes of code tests by reason (for metrics); empty for other tasks.
  std::map<std::string, int> sandbox_outcomes;
};

// One function of the job's reward list.
struct RewardTerm {
  std::string name;
  double weight = 1.0;
  std::map<std::string, std::string> params;
};

struct RewardConfig {
  std::vector<RewardTerm> terms;
  // `accuracy=1,format=0.1,overlong=1`; a name without `=w` has weight 1.
  static Result<RewardConfig> Parse(std::string_view spec);
  // The job file's `rewards:` map: `name: weight` or `name: {weight: w, param: value, ...}`.
  static Result<RewardConfig> FromYaml(const YAML::Node& node);
  // accuracy 1.0, format 0.1.
  static RewardConfig Default();
};

// Code verifier settings.
struct CodeOptions {
  SandboxLimits run_limits;      // per test
  SandboxLimits compile_limits;  // g++ step
  CodeOptions();
};

class Scorer {
 public:
  // Fails on an unknown function name or a bad parameter. `sandbox` may be null when no term can
  // run code; code tasks then score 0 with the note "no sandbox".
  static Result<std::unique_ptr<Scorer>> Create(const RewardConfig& config, Sandbox* sandbox,
                                                CodeOptions code = CodeOptions());
  ~Scorer();

  ScoreReport Score(const TaskSpec& task, const Completion& completion) const;
  const RewardConfig& config() const { return config_; }

  class Function;  // one reward function (rewards.cc)

 private:
  Scorer() = default;
  RewardConfig config_;
  std::vector<std::unique_ptr<Function>> functions_;
};

// Individual verifiers, exposed for tests, benches and `aha sample --keep correct`.
struct Verdict {
  double score = 0;
  std::string note;
  std::string extracted;
};
Verdict ScoreFormat(std::string_view completion, bool graded, bool think_prefilled);
Verdict ScoreMath(std::string_view gold, std::string_view completion, bool dapo);
Verdict ScoreCountdown(const std::vector<int64_t>& numbers, int64_t target,
                       std::string_view completion);
Verdict ScoreArith(std::string_view gold, std::string_view completion);
Verdict ScoreLanguage(std::string_view completion, std::string_view script);
Verdict ScoreOverlong(int64_t tokens, int64_t max_tokens, int64_t cache_tokens);
Verdict ScoreLength(int64_t tokens, int64_t target_tokens, int64_t max_tokens);
Verdict ScoreRepetition(std::string_view completion, int ngram);
// Last fenced block of `language` (python: ```python/```py/```python3; cpp: ```cpp/```c++/```cc),
// else the last untagged block; nullopt when none.
std::optional<std::string> ExtractCodeBlock(std::string_view completion, std::string_view language);
Verdict ScoreCode(Sandbox* sandbox, const CodeOptions& options, const TaskSpec& task,
                  std::string_view completion, std::map<std::string, int>* outcomes);

}  // namespace aha::rewardd
