#include "rewardd/commands.h"
#include "rewardd/solutions.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

#include "common/flags.h"
#include "rewardd/generators.h"
#include "rewardd/rewards.h"
#include "rewardd/sandbox.h"

namespace aha::rewardd {
namespace {

using nlohmann::json;

Result<std::vector<int64_t>> ParseNumbers(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0') return InvalidArgument("--numbers: '" + item + "' is not an integer");
    out.push_back(v);
  }
  if (out.empty()) return InvalidArgument("--numbers is empty");
  return out;
}

// A JSON array of {"stdin", "stdout"}, or JSONL of such objects.
Result<std::vector<CodeTestCase>> ReadTests(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFound("--tests: cannot read " + path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<json> items;
  json whole = json::parse(text, nullptr, false);
  if (!whole.is_discarded() && whole.is_array()) {
    items.assign(whole.begin(), whole.end());
  } else {
    std::stringstream ss(text);
    std::string line;
    int n = 0;
    while (std::getline(ss, line)) {
      ++n;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded()) return InvalidArgument("--tests: " + path + ":" + std::to_string(n) + ": not JSON");
      items.push_back(j);
    }
  }
  std::vector<CodeTestCase> tests;
  for (const auto& j : items) {
    if (!j.is_object() || !j.contains("stdin") || !j.contains("stdout") || !j["stdin"].is_string() ||
        !j["stdout"].is_string())
      return InvalidArgument("--tests: each test needs string fields \"stdin\" and \"stdout\"");
    tests.push_back({j["stdin"].get<std::string>(), j["stdout"].get<std::string>()});
  }
  if (tests.empty()) return InvalidArgument("--tests: " + path + " holds no tests");
  return tests;
}

}  // namespace

int RunRewardCommand(int argc, char** argv) {
  std::string task_kind, answer, numbers, tests_path, language = "python", rewards;
  int64_t target = 0, tokens = -1;
  bool truncated = false;
  FlagSet flags(argv[0], "score one completion (read from stdin) and print the reward as JSON");
  flags.String("task", &task_kind, "task kind: math|countdown|arith|code (required)");
  flags.String("answer", &answer, "gold answer (math, arith)");
  flags.String("numbers", &numbers, "countdown: the numbers, comma-separated");
  flags.Int("target", &target, "countdown: the target");
  flags.String("tests", &tests_path, "code: JSON array or JSONL of {\"stdin\", \"stdout\"}");
  flags.String("language", &language, "code: python|cpp (default python)");
  flags.String("rewards", &rewards, "functions and weights, e.g. accuracy=1,format=0.1 (default)");
  flags.Int("tokens", &tokens, "completion length in tokens for overlong/length (default bytes/4)");
  flags.Bool("truncated", &truncated, "the completion hit the length cap");
  flags.Epilog("example: echo '<think>2+2</think> <answer>4</answer>' | aha reward --task math --answer 4");
  ParseOrExit(flags, argc, argv);

  const std::string prog = argv[0];
  if (task_kind.empty()) return Fail(prog, "--task is required (math|countdown|arith|code)", 2);
  TaskSpec task;
  task.kind = task_kind;
  task.answer = answer;
  task.language = language;
  if (task_kind == "countdown") {
    if (!flags.was_set("numbers") || !flags.was_set("target"))
      return Fail(prog, "--task countdown needs --numbers and --target", 2);
    auto n = ParseNumbers(numbers);
    if (!n.ok()) return Fail(prog, n.status().message(), 2);
    task.numbers = *n;
    task.target = target;
  } else if (task_kind == "math" || task_kind == "arith") {
    if (!flags.was_set("answer")) return Fail(prog, "--task " + task_kind + " needs --answer", 2);
  } else if (task_kind == "code") {
    if (tests_path.empty()) return Fail(prog, "--task code needs --tests FILE", 2);
    if (language != "python" && language != "cpp")
      return Fail(prog, "--language must be python or cpp, got '" + language + "'", 2);
    auto t = ReadTests(tests_path);
    if (!t.ok()) return Fail(prog, t.status().message(), 2);
    task.tests = *t;
  } else {
    return Fail(prog, "unknown --task '" + task_kind + "' (math|countdown|arith|code)", 2);
  }
  RewardConfig config = RewardConfig::Default();
  if (!rewards.empty()) {
    auto c = RewardConfig::Parse(rewards);
    if (!c.ok()) return Fail(prog, c.status().message(), 2);
    config = *c;
  }
  std::unique_ptr<Sandbox> sandbox;
  if (task_kind == "code") {
    auto s = Sandbox::Create(SandboxOptions());
    if (!s.ok()) return Fail(prog, s.status().message(), 1);
    sandbox = std::move(*s);
  }
  auto scorer = Scorer::Create(config, sandbox.get());
  if (!scorer.ok()) return Fail(prog, scorer.status().message(), 2);

  std::string completion((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  ScoreReport r = (*scorer)->Score(task, {completion, tokens, truncated});
  json out;
  out["total"] = r.total;
  out["components"] = json::object();
  out["notes"] = json::object();
  out["weights"] = json::object();
  for (const auto& c : r.components) {
    out["components"][c.name] = c.score;
    out["notes"][c.name] = c.note;
    out["weights"][c.name] = c.weight;
  }
  out["answer_extracted"] = r.answer_extracted;
  out["correct"] = r.correct;
  // Completions are arbitrary bytes: invalid UTF-8 is replaced, never a throw.
  std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  return 0;
}

int RunDataCommand(int argc, char** argv) {
  std::string action, kind, out_path;
  int64_t n = 0, seed = 0;
  int64_t min_numbers = 3, max_numbers = 4, max_number = 99, max_target = 999;
  int64_t min_digits = 2, max_digits = 4;
  std::string ops = "+-*";
  std::string tasks_path;
  double wrong_fraction = 0;
  FlagSet flags(argv[0],
                "dataset tools: `make countdown|arith` writes a synthetic JSONL dataset; `solve` writes\n"
                "cold-start SFT data (R1-Zero format solutions) for a task dataset (rewardd/solutions.h)");
  flags.Positional("action", &action, "make|solve", true);
  flags.Positional("kind", &kind, "make: countdown|arith", false);
  flags.String("tasks", &tasks_path, "solve: the task dataset to write solutions for");
  flags.Double("wrong-fraction", &wrong_fraction, "solve: share of solutions with a plausible wrong result (weak teacher)");
  flags.Int("n", &n, "number of records (required)");
  flags.Int("seed", &seed, "generator seed (default 0)");
  flags.String("out", &out_path, "output JSONL file (required; '-' for stdout)");
  flags.Int("min-numbers", &min_numbers, "countdown: fewest numbers per instance (default 3)");
  flags.Int("max-numbers", &max_numbers, "countdown: most numbers per instance (default 4, at most 6)");
  flags.Int("max-number", &max_number, "countdown: largest number drawn (default 99)");
  flags.Int("max-target", &max_target, "countdown: largest target (default 999)");
  flags.Int("min-digits", &min_digits, "arith: fewest digits per operand (default 2)");
  flags.Int("max-digits", &max_digits, "arith: most digits per operand (default 4, at most 9)");
  flags.String("ops", &ops, "arith: operators drawn from, subset of '+-*' (default all)");
  bool no_instructions = false;
  flags.Bool("no-instructions", &no_instructions, "arith: bare questions, without the answer-format sentence");
  flags.Epilog("example: aha data make countdown --n 1000 --seed 1 --out countdown.jsonl");
  ParseOrExit(flags, argc, argv);
  const std::string prog = argv[0];
  if (action == "solve") {
    if (tasks_path.empty() || out_path.empty()) return Fail(prog, "solve needs --tasks and --out", 2);
    SolutionOptions so;
    so.wrong_fraction = wrong_fraction;
    so.seed = static_cast<uint64_t>(seed);
    auto written = WriteColdStartSolutions(tasks_path, out_path, so);
    if (!written.ok()) return Fail(prog, written.status().message(), IsInvalidArgument(written.status()) ? 2 : 1);
    std::cerr << "wrote " << *written << " solutions to " << out_path << "\n";
    return 0;
  }
  if (action != "make") return Fail(prog, "unknown action '" + action + "' (make|solve)", 2);
  if (kind.empty()) return Fail(prog, "make needs a kind: countdown|arith", 2);
  if (!flags.was_set("n")) return Fail(prog, "--n is required", 2);
  if (out_path.empty()) return Fail(prog, "--out is required", 2);
  if (seed < 0) return Fail(prog, "--seed must be non-negative", 2);
  Result<std::vector<DatasetRecord>> records = InvalidArgument("unknown kind '" + kind + "' (countdown|arith)");
  if (kind == "countdown") {
    CountdownOptions o;
    o.min_count = static_cast<int>(min_numbers);
    o.max_count = static_cast<int>(max_numbers);
    o.max_number = max_number;
    o.max_target = max_target;
    records = MakeCountdown(n, static_cast<uint64_t>(seed), o);
  } else if (kind == "arith") {
    ArithOptions o;
    o.min_digits = static_cast<int>(min_digits);
    o.max_digits = static_cast<int>(max_digits);
    o.ops = ops;
    o.instructions = !no_instructions;
    records = MakeArith(n, static_cast<uint64_t>(seed), o);
  }
  if (!records.ok()) return Fail(prog, records.status().message(), IsInvalidArgument(records.status()) ? 2 : 1);
  std::ofstream file;
  std::ostream* out = &std::cout;
  if (out_path != "-") {
    file.open(out_path, std::ios::trunc);
    if (!file) return Fail(prog, "cannot write " + out_path, 1);
    out = &file;
  }
  for (const auto& r : *records) *out << ToJsonLine(r) << "\n";
  out->flush();
  if (!*out) return Fail(prog, "write to " + out_path + " failed", 1);
  if (out_path != "-")
    std::cerr << "wrote " << records->size() << " " << kind << " records to " << out_path << "\n";
  return 0;
}

}  // namespace aha::rewardd
