// rewardd throughput: rule rewards scored per second on one core, and sandboxed code tests per
// second, each beside a reference measured in the same run:
//   - math/format/countdown/arith: aha's verifiers on one thread (completions/s/core);
//     reference: bench/rewardd/reference_scorers.py (Python: TinyZero's countdown scorer, a
//     sympy-based math check) when a python3 with sympy is on PATH.
//   - code: python3 and C++ tests through the bwrap sandbox at 1 and 2 parallel runs;
//     reference: the same python3 program spawned directly, without the sandbox.
// Usage: reward_bench [--seconds S] [--reference PATH/TO/reference_scorers.py]
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "rewardd/generators.h"
#include "rewardd/rewards.h"
#include "rewardd/sandbox.h"

extern char** environ;

namespace aha::rewardd {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Runs fn(i) repeatedly for about `seconds`; returns calls per second.
template <typename F>
double Rate(double seconds, F fn) {
  auto t0 = Clock::now();
  size_t n = 0;
  double sink = 0;
  while (Seconds(t0) < seconds) {
    for (int k = 0; k < 64; ++k) sink += fn(n++);
  }
  if (sink == 12345.678) std::puts("");  // keep the work observable
  return static_cast<double>(n) / Seconds(t0);
}

struct MathCase {
  const char* gold;
  const char* answer;
};
const MathCase kMath[] = {
    {"42", "42"}, {"\\frac{1}{2}", "0.5"}, {"2\\sqrt{3}", "\\sqrt{12}"}, {"(1,2)", "(1, 2)"},
    {"x^2-1", "(x-1)(x+1)"}, {"1000", "1,000"}, {"50\\%", "0.5"}, {"\\pi", "3.14159265"},
    {"\\{1,2\\}", "\\{2,1\\}"}, {"[2,5)", "[2, 5)"}, {"7", "x = 8"}, {"\\frac{3}{4}", "\\frac{4}{3}"},
    {"10", "10 \\text{ meters}"}, {"-7", "- 7"}, {"2^{10}", "1024"}, {"n(n+1)/2", "\\frac{n^2+n}{2}"}};

double SpawnRate(const std::vector<std::string>& args, int n) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    if (posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ) == 0) waitpid(pid, nullptr, 0);
    posix_spawn_file_actions_destroy(&fa);
  }
  return n / Seconds(t0);
}

int Main(int argc, char** argv) {
  double seconds = 2.0;
  std::string reference;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--seconds") == 0) seconds = std::atof(argv[i + 1]);
    if (std::strcmp(argv[i], "--reference") == 0) reference = argv[i + 1];
  }
  std::printf("rewardd benchmark (%.1f s per row, one thread unless noted)\n\n", seconds);
  std::printf("%-44s %14s\n", "what", "per second");

  std::vector<std::string> math_completions;
  for (const auto& c : kMath)
    math_completions.push_back(std::string("<think>Let me compute this carefully step by step.</think> <answer>") +
                               c.answer + "</answer>");
  size_t nm = math_completions.size();
  std::printf("%-44s %14.0f\n", "math accuracy (16 mixed answers)",
              Rate(seconds, [&](size_t i) { return ScoreMath(kMath[i % nm].gold, math_completions[i % nm], false).score; }));
  std::printf("%-44s %14.0f\n", "format (strict)",
              Rate(seconds, [&](size_t i) { return ScoreFormat(math_completions[i % nm], false, false).score; }));
  auto cd = MakeCountdown(256, 1, {});
  std::vector<std::string> cd_completions;
  for (const auto& r : *cd) cd_completions.push_back("<think>try</think> <answer>" + r.answer + "</answer>");
  std::printf("%-44s %14.0f\n", "countdown (3-4 numbers)",
              Rate(seconds, [&](size_t i) {
                const auto& r = (*cd)[i % 256];
                return ScoreCountdown(r.numbers, r.target, cd_completions[i % 256]).score;
              }));
  std::string arith = "<think>multiply</think> <answer>1,793,412</answer>";
  std::printf("%-44s %14.0f\n", "arith",
              Rate(seconds, [&](size_t) { return ScoreArith("1793412", arith).score; }));
  auto scorer = Scorer::Create(*RewardConfig::Parse("accuracy=1,format=0.1,language=0.1,overlong=1,repetition=0.1"), nullptr);
  TaskSpec task;
  task.answer = "\\frac{1}{2}";
  std::string long_completion = "<think>";
  for (int i = 0; i < 200; ++i) long_completion += "we add the two fractions and simplify the result ";
  long_completion += "</think> <answer>0.5</answer>";
  std::printf("%-44s %14.0f\n", "5 functions on a 10 KB math completion",
              Rate(seconds, [&](size_t) { return (*scorer)->Score(task, {long_completion, 2500, false}).total; }));

  // Sandboxed code tests.
  for (int parallel : {1, 2}) {
    SandboxOptions o;
    o.max_parallel = parallel;
    auto box = Sandbox::Create(o);
    if (!box.ok()) {
      std::printf("sandbox unavailable: %s\n", box.status().ToString().c_str());
      break;
    }
    TaskSpec code;
    code.kind = "code";
    for (int t = 0; t < 8; ++t) code.tests.push_back({std::to_string(t) + "\n", std::to_string(2 * t) + "\n"});
    CodeOptions co;
    std::string py = "```python\nprint(2 * int(input()))\n```";
    std::atomic<int> tests{0};
    auto t0 = Clock::now();
    std::vector<std::thread> threads;
    for (int k = 0; k < parallel; ++k)
      threads.emplace_back([&] {
        while (Seconds(t0) < seconds * 2) {
          auto v = ScoreCode(box->get(), co, code, py, nullptr);
          if (v.score == 1.0) tests += static_cast<int>(code.tests.size());
        }
      });
    for (auto& t : threads) t.join();
    char label[64];
    std::snprintf(label, sizeof label, "python tests in sandbox, %d parallel", parallel);
    std::printf("%-44s %14.1f\n", label, tests / Seconds(t0));
    if (parallel == 1) {
      code.language = "cpp";
      std::string cpp = "```cpp\n#include <iostream>\nint main(){long n; std::cin >> n; std::cout << 2*n << \"\\n\";}\n```";
      auto c0 = Clock::now();
      auto v = ScoreCode(box->get(), co, code, cpp, nullptr);
      double total = Seconds(c0);
      std::printf("%-44s %14.2f  (%.0f%% passed)\n", "C++: compile + 8 tests, per second", 1 / total, 100 * v.score);
    }
  }
  std::printf("%-44s %14.1f\n", "reference: /usr/bin/python3 spawned, no sandbox",
              SpawnRate({"/usr/bin/python3", "-I", "-c", "print(2 * 3)"}, 40));
  std::printf("%-44s %14.1f\n", "reference: /bin/true spawned, no sandbox", SpawnRate({"/bin/true"}, 200));
  if (!reference.empty()) {
    std::printf("\nreference (Python, same machine, same run):\n");
    std::fflush(stdout);
    std::string cmd = "python3 " + reference + " --seconds " + std::to_string(seconds);
    int rc = std::system(cmd.c_str());
    if (rc != 0) std::printf("  (reference script failed: exit %d)\n", rc);
  }
  return 0;
}

}  // namespace
}  // namespace aha::rewardd

int main(int argc, char** argv) { return aha::rewardd::Main(argc, argv); }
