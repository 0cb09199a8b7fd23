// Reward functions: the table-driven corpus (reward_corpus.jsonl, written by
// make_reward_corpus.py), hostile completions, the scorer's configuration, and the task generators.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <string>

#include "rewardd/countdown.h"
#include "rewardd/generators.h"
#include "rewardd/math_answer.h"
#include "rewardd/rewards.h"

namespace aha::rewardd {
namespace {

using nlohmann::json;

double ScoreCase(const json& c) {
  const std::string fn = c["fn"];
  std::string completion = c.value("completion", "");
  if (fn == "math") return ScoreMath(c["gold"].get<std::string>(), completion, false).score;
  if (fn == "math_dapo") return ScoreMath(c["gold"].get<std::string>(), completion, true).score;
  if (fn == "countdown")
    return ScoreCountdown(c["numbers"].get<std::vector<int64_t>>(), c["target"].get<int64_t>(),
                          completion).score;
  if (fn == "arith") return ScoreArith(c["gold"].get<std::string>(), completion).score;
  if (fn == "format") return ScoreFormat(completion, false, c.value("prefilled", false)).score;
  if (fn == "format_graded") return ScoreFormat(completion, true, c.value("prefilled", false)).score;
  if (fn == "language") return ScoreLanguage(completion, c["script"].get<std::string>()).score;
  if (fn == "overlong") return ScoreOverlong(c["tokens"], c["max"], c["cache"]).score;
  if (fn == "length") return ScoreLength(c["tokens"], c["target"], c["max"]).score;
  if (fn == "repetition") return ScoreRepetition(completion, 3).score;
  ADD_FAILURE() << "unknown fn " << fn;
  return NAN;
}

TEST(RewardCorpus, EveryCaseScoresAsExpected) {
  std::ifstream in(AHA_REWARD_CORPUS);
  ASSERT_TRUE(in) << AHA_REWARD_CORPUS;
  std::string line;
  int n = 0, failures = 0;
  std::map<std::string, int> per_fn;
  while (std::getline(in, line)) {
    ++n;
    json c = json::parse(line);
    double got = ScoreCase(c);
    double want = c["expect"].get<double>();
    ++per_fn[c["fn"].get<std::string>()];
    if (std::fabs(got - want) > 1e-6) {
      ++failures;
      ADD_FAILURE() << "corpus line " << n << ": " << line << "\n  got " << got << ", want " << want;
    }
  }
  EXPECT_GE(n, 300);
  EXPECT_EQ(failures, 0);
  EXPECT_GE(per_fn["math"], 150) << "hard math normalisation cases";
  EXPECT_GE(per_fn["countdown"], 40);
}

TEST(MathAnswer, ExtractionPrefersAnswerTagThenLastBalancedBoxed) {
  EXPECT_EQ(ExtractMathAnswer("<answer> 7 </answer>").value(), "7");
  EXPECT_EQ(ExtractMathAnswer("<answer>so \\boxed{\\frac{1}{2}} ok</answer>").value(), "\\frac{1}{2}");
  EXPECT_EQ(ExtractMathAnswer("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}").value(), "\\sqrt{\\frac{a}{b}}");
  EXPECT_EQ(ExtractMathAnswer("\\fbox{9}").value(), "9");
  EXPECT_FALSE(ExtractMathAnswer("\\boxed{unbalanced").has_value());
  EXPECT_FALSE(ExtractMathAnswer("no answer here").has_value());
}

TEST(MathAnswer, NormalisationRemovesNotation) {
  EXPECT_EQ(NormalizeMathAnswer("$\\left( \\dfrac{1}{2}, 3 \\right)$."), "(\\frac{1}{2},3)");
  EXPECT_EQ(NormalizeMathAnswer("1,234,567"), "1234567");
  EXPECT_EQ(NormalizeMathAnswer("x = 5\\text{ cm}"), "5");
  EXPECT_EQ(NormalizeMathAnswer("45^\\circ"), "45");
  EXPECT_EQ(NormalizeMathAnswer("\\text{(B)}"), "B");
}

TEST(MathAnswer, GoldDecidesOrderAndPrecision) {
  // Ordered gold tuple vs unordered gold set.
  EXPECT_FALSE(MathEquivalent("(1,2)", "(2,1)").equal);
  EXPECT_TRUE(MathEquivalent("\\{1,2\\}", "\\{2,1\\}").equal);
  // A 2-place gold accepts an exact value that rounds to it, but not the reverse.
  EXPECT_TRUE(MathEquivalent("0.33", "\\frac{1}{3}").equal);
  EXPECT_FALSE(MathEquivalent("\\frac{1}{3}", "0.33").equal);
}

// ---- hostile completions: a score and a note, never a crash ----

TEST(RewardBadInput, BinaryJunkScoresZeroWithNote) {
  std::string junk;
  uint64_t s = 12345;
  for (int i = 0; i < 100000; ++i) {
    s = s * 6364136223846793005ull + 1;
    junk.push_back(static_cast<char>(s >> 56));
  }
  junk += "<answer>\xff\xfe\x00\x01</answer>";
  for (auto v : {ScoreMath("5", junk, false), ScoreArith("5", junk), ScoreCountdown({1, 2}, 3, junk),
                 ScoreFormat(junk, true, false), ScoreLanguage(junk, "latin"), ScoreRepetition(junk, 3)}) {
    EXPECT_TRUE(std::isfinite(v.score));
    EXPECT_LE(v.score, 1.0);
    EXPECT_FALSE(v.note.empty());
  }
}

TEST(RewardBadInput, TenMegabyteCompletionIsScoredQuickly) {
  std::string big(10u << 20, 'a');
  big += " <answer>42</answer>";
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(ScoreMath("42", big, false).score, 1.0);
  EXPECT_EQ(ScoreArith("42", big).score, 1.0);
  EXPECT_EQ(ScoreFormat(big, false, false).score, 0.0);
  EXPECT_TRUE(std::isfinite(ScoreRepetition(big, 3).score));
  EXPECT_TRUE(std::isfinite(ScoreLanguage(big, "latin").score));
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(secs, 20.0);
  // A 10 MB answer is refused by size, not parsed.
  std::string huge_answer = "<answer>" + std::string(10u << 20, '1') + "</answer>";
  auto v = ScoreMath("1", huge_answer, false);
  EXPECT_EQ(v.score, 0.0);
  EXPECT_NE(v.note.find("longer"), std::string::npos) << v.note;
}

TEST(RewardBadInput, UnbalancedBracesAreWrongNotFatal) {
  for (std::string c : {"\\boxed{{{{", "\\boxed{}}}}", "<answer>{{{5</answer>", "<answer>)(</answer>",
                        "<answer>\\frac{1}{</answer>", "<answer>\\sqrt[</answer>", "<answer>[1,2</answer>"}) {
    auto v = ScoreMath("5", c, false);
    EXPECT_EQ(v.score, 0.0) << c;
    auto cd = ScoreCountdown({1, 2}, 3, c);
    EXPECT_LT(cd.score, 1.0) << c;
  }
}

TEST(RewardBadInput, TenThousandDeepNestingIsRejectedWithoutStackOverflow) {
  std::string deep_braces = std::string(10000, '{') + "5" + std::string(10000, '}');
  std::string deep_parens = std::string(10000, '(') + "5" + std::string(10000, ')');
  std::string deep_frac;
  for (int i = 0; i < 10000; ++i) deep_frac += "\\frac{1}{";
  deep_frac += "2" + std::string(10000, '}');
  for (const auto& a : {deep_braces, deep_parens, deep_frac}) {
    auto v = ScoreMath("5", "\\boxed{" + a + "}", false);
    EXPECT_EQ(v.score, 0.0);
    EXPECT_FALSE(v.note.empty());
    auto t = ScoreMath("5", "<answer>" + a + "</answer>", false);
    EXPECT_EQ(t.score, 0.0);
  }
  // Within the size limit but beyond the depth limit.
  std::string mid = std::string(1000, '(') + "5" + std::string(1000, ')');
  EXPECT_EQ(ScoreMath("5", "<answer>" + mid + "</answer>", false).score, 0.0);
  std::string cd = std::string(10000, '(') + "1+2" + std::string(10000, ')');
  auto v = ScoreCountdown({1, 2}, 3, "<answer>" + cd + "</answer>");
  EXPECT_EQ(v.score, 0.0);
  std::string cd_mid = std::string(200, '(') + "1+2" + std::string(200, ')');
  v = ScoreCountdown({1, 2}, 3, "<answer>" + cd_mid + "</answer>");
  EXPECT_EQ(v.score, 0.0);
  EXPECT_NE(v.note.find("nesting"), std::string::npos) << v.note;
}

TEST(RewardBadInput, DivisionByZeroIsAWrongAnswerWithNote) {
  auto v = ScoreCountdown({5, 5, 5, 5}, 1, "<answer>5 / (5 - 5) + 5</answer>");
  EXPECT_DOUBLE_EQ(v.score, 0.1);
  EXPECT_EQ(v.note, "division by zero");
  auto m = ScoreMath("1", "<answer>1/0</answer>", false);
  EXPECT_EQ(m.score, 0.0);
  EXPECT_EQ(ScoreMath("1", "<answer>0/0</answer>", false).score, 0.0);
}

TEST(Countdown, OverflowIsReportedNotWrapped) {
  auto p = ParseCountdown("999999999999999999 * 999999999999999999 * 999999999999999999");
  EXPECT_TRUE(p.well_formed);
  EXPECT_FALSE(p.evaluated);
  EXPECT_EQ(p.error, "arithmetic overflow");
}

TEST(Countdown, SolverFindsKnownSolutionsAndRefusesImpossible) {
  auto s = SolveCountdown({3, 3, 8, 8}, 24);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(ScoreCountdown({3, 3, 8, 8}, 24, "<answer>" + *s + "</answer>").score, 1.0) << *s;
  EXPECT_FALSE(SolveCountdown({1, 1, 1}, 100).has_value());
  EXPECT_FALSE(SolveCountdown({2, 2}, 5).has_value());
}

// ---- configuration ----

TEST(Scorer, CombinesNamedFunctionsWithWeights) {
  auto config = RewardConfig::Parse("accuracy=1, format=0.5, overlong=2");
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  auto scorer = Scorer::Create(*config, nullptr);
  ASSERT_TRUE(scorer.ok());
  TaskSpec task;
  task.kind = "math";
  task.answer = "\\frac{1}{2}";
  ScoreReport r = (*scorer)->Score(task, {"<think>x</think> <answer>0.5</answer>", 10, false});
  ASSERT_EQ(r.components.size(), 3u);
  EXPECT_EQ(r.components[0].name, "accuracy");
  EXPECT_EQ(r.components[0].score, 1.0);
  EXPECT_EQ(r.components[1].score, 1.0);
  EXPECT_EQ(r.components[2].score, 0.0);
  EXPECT_DOUBLE_EQ(r.total, 1.5);
  EXPECT_TRUE(r.correct);
  EXPECT_EQ(r.answer_extracted, "0.5");
  // Countdown through the same "accuracy" function.
  task.kind = "countdown";
  task.numbers = {1, 2, 3};
  task.target = 7;
  r = (*scorer)->Score(task, {"<answer>1 + 2 * 3</answer>", 10000, true});
  EXPECT_EQ(r.components[0].score, 1.0);
  EXPECT_EQ(r.components[2].score, -1.0);
  EXPECT_DOUBLE_EQ(r.total, 1.0 + 0.5 * 0.0 - 2.0);  // no <think>: strict format fails
}

TEST(Scorer, YamlConfigTakesWeightsAndParameters) {
  YAML::Node node = YAML::Load(
      "accuracy: {weight: 1, dapo: true}\nformat: {weight: 0.2, graded: true}\n"
      "language: {weight: 0.1, script: cjk}\n");
  auto config = RewardConfig::FromYaml(node);
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  auto scorer = Scorer::Create(*config, nullptr);
  ASSERT_TRUE(scorer.ok()) << scorer.status().ToString();
  TaskSpec task;
  task.answer = "3";
  ScoreReport r = (*scorer)->Score(task, {"<think>答案</think><answer>4</answer>", -1, false});
  EXPECT_EQ(r.components[0].score, -1.0);
  EXPECT_EQ(r.components[1].score, 1.0);
  EXPECT_EQ(r.components[2].score, 1.0);
  EXPECT_FALSE(r.correct);
}

TEST(Scorer, RejectsUnknownFunctionsAndParameters) {
  EXPECT_FALSE(Scorer::Create(*RewardConfig::Parse("acuracy=1"), nullptr).ok());
  EXPECT_FALSE(RewardConfig::Parse("accuracy=abc").ok());
  EXPECT_FALSE(RewardConfig::Parse("accuracy,accuracy").ok());
  EXPECT_FALSE(RewardConfig::Parse("").ok());
  EXPECT_FALSE(RewardConfig::FromYaml(YAML::Load("[1, 2]")).ok());
  auto c = RewardConfig::FromYaml(YAML::Load("format: {graded: maybe}"));
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(Scorer::Create(*c, nullptr).ok());
  c = RewardConfig::FromYaml(YAML::Load("language: {script: klingon}"));
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(Scorer::Create(*c, nullptr).ok());
  c = RewardConfig::FromYaml(YAML::Load("overlong: {max_tokens: 10, cache_tokens: 20}"));
  EXPECT_FALSE(Scorer::Create(*c, nullptr).ok());
}

TEST(Scorer, CodeTaskWithoutSandboxScoresZeroWithNote) {
  auto scorer = Scorer::Create(RewardConfig::Default(), nullptr);
  TaskSpec task;
  task.kind = "code";
  task.tests = {{"1\n", "1\n"}};
  ScoreReport r = (*scorer)->Score(task, {"```python\nprint(input())\n```", -1, false});
  EXPECT_EQ(r.components[0].score, 0.0);
  EXPECT_EQ(r.components[0].note, "no sandbox");
}

TEST(CodeBlock, TakesLastBlockOfTheTaskLanguage) {
  std::string c = "```python\nA\n```\ntext\n```cpp\nB\n```\n```python\nC\n```\n```\nD\n```";
  EXPECT_EQ(ExtractCodeBlock(c, "python").value(), "C\n");
  EXPECT_EQ(ExtractCodeBlock(c, "cpp").value(), "B\n");
  EXPECT_EQ(ExtractCodeBlock("```\nD\n```", "python").value(), "D\n");
  EXPECT_FALSE(ExtractCodeBlock("```python\nunterminated", "python").has_value());
}

// ---- generators ----

TEST(Generators, CountdownInstancesAreSolvableAndAccepted) {
  CountdownOptions o;
  o.min_count = 3;
  o.max_count = 5;
  auto records = MakeCountdown(300, 7, o);
  ASSERT_TRUE(records.ok()) << records.status().ToString();
  ASSERT_EQ(records->size(), 300u);
  for (const auto& r : *records) {
    ASSERT_GE(r.numbers.size(), 3u);
    ASSERT_LE(r.numbers.size(), 5u);
    EXPECT_GE(r.target, 1);
    EXPECT_LE(r.target, 999);
    auto solution = SolveCountdown(r.numbers, r.target);
    ASSERT_TRUE(solution.has_value()) << r.id;
    EXPECT_EQ(ScoreCountdown(r.numbers, r.target, "<answer>" + *solution + "</answer>").score, 1.0);
    EXPECT_EQ(ScoreCountdown(r.numbers, r.target, "<answer>" + r.answer + "</answer>").score, 1.0);
    json line = json::parse(ToJsonLine(r));
    EXPECT_EQ(line["kind"], "countdown");
    EXPECT_EQ(line["metadata"]["target"], r.target);
    EXPECT_EQ(line["metadata"]["numbers"].get<std::vector<int64_t>>(), r.numbers);
    EXPECT_NE(line["prompt"].get<std::string>().find(std::to_string(r.target)), std::string::npos);
  }
}

TEST(Generators, SameSeedSameData) {
  auto a = MakeCountdown(50, 3, {});
  auto b = MakeCountdown(50, 3, {});
  auto c = MakeCountdown(50, 4, {});
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  std::string sa, sb, sc;
  for (size_t i = 0; i < 50; ++i) {
    sa += ToJsonLine((*a)[i]);
    sb += ToJsonLine((*b)[i]);
    sc += ToJsonLine((*c)[i]);
  }
  EXPECT_EQ(sa, sb);
  EXPECT_NE(sa, sc);
}

TEST(Generators, ArithAnswersAreExactAndDigitsRespected) {
  ArithOptions o;
  o.min_digits = 5;
  o.max_digits = 9;
  auto records = MakeArith(500, 11, o);
  ASSERT_TRUE(records.ok());
  for (const auto& r : *records) {
    json meta = json::parse(r.metadata_json);
    int64_t a = meta["a"], b = meta["b"];
    std::string op = meta["op"];
    EXPECT_GE(a, 10000);
    EXPECT_LE(a, 999999999);
    int64_t want = op == "+" ? a + b : op == "-" ? a - b : a * b;
    EXPECT_EQ(r.answer, std::to_string(want));
    EXPECT_EQ(ScoreArith(r.answer, "<answer>" + r.answer + "</answer>").score, 1.0);
  }
  EXPECT_FALSE(MakeArith(10, 1, {1, 10, "+"}).ok());
  EXPECT_FALSE(MakeArith(10, 1, {1, 3, "/"}).ok());
  EXPECT_FALSE(MakeCountdown(0, 1, {}).ok());
}

}  // namespace
}  // namespace aha::rewardd
