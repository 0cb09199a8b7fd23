#include "rewardd/generators.h"

#include <nlohmann/json.hpp>

#include "rewardd/countdown.h"
#include "rewardd/rewards.h"

namespace aha::rewardd {
namespace {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [lo, hi] (the modulo bias is below 2^-40 for our ranges).
  int64_t Range(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(Next() % static_cast<uint64_t>(hi - lo + 1));
  }

 private:
  uint64_t s_;
};

std::string Join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

constexpr const char* kAnswerFormat =
    " Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
    "tags";

struct Item {
  int64_t value;
  std::string text;
  bool atomic;
};

// Combines all numbers at random into one positive integer; false when a draw dead-ends.
bool Construct(const std::vector<int64_t>& numbers, SplitMix64& rng, Item* out) {
  std::vector<Item> pool;
  for (int64_t n : numbers) pool.push_back({n, std::to_string(n), true});
  while (pool.size() > 1) {
    size_t i = static_cast<size_t>(rng.Range(0, static_cast<int64_t>(pool.size()) - 1));
    size_t j = static_cast<size_t>(rng.Range(0, static_cast<int64_t>(pool.size()) - 2));
    if (j >= i) ++j;
    Item a = pool[i], b = pool[j];
    char op = "+-*/"[rng.Range(0, 3)];
    if (op == '-' && a.value < b.value) std::swap(a, b);
    if (op == '-' && a.value == b.value) op = '+';
    if (op == '/') {
      if (b.value > a.value) std::swap(a, b);
      if (b.value <= 1 || a.value % b.value != 0) op = '*';
    }
    int64_t v = 0;
    switch (op) {
      case '+': v = a.value + b.value; break;
      case '-': v = a.value - b.value; break;
      case '*': v = a.value * b.value; break;
      case '/': v = a.value / b.value; break;
    }
    if (v > 1000000) return false;
    auto wrap = [](const Item& x) { return x.atomic ? x.text : "(" + x.text + ")"; };
    Item merged{v, wrap(a) + " " + op + " " + wrap(b), false};
    if (i > j) std::swap(i, j);
    pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(j));
    pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(i));
    pool.push_back(merged);
  }
  *out = pool[0];
  return true;
}

}  // namespace

Result<std::vector<DatasetRecord>> MakeCountdown(int64_t n, uint64_t seed,
                                                 const CountdownOptions& o) {
  if (n < 1) return InvalidArgument("--n must be at least 1");
  if (o.min_count < 2 || o.max_count > 6 || o.min_count > o.max_count)
    return InvalidArgument("countdown: numbers per instance must be within 2..6 (min <= max)");
  if (o.max_number < 2 || o.max_number > 10000)
    return InvalidArgument("countdown: --max-number must be within 2..10000");
  if (o.max_target < 1) return InvalidArgument("countdown: --max-target must be positive");
  SplitMix64 rng(seed);
  std::vector<DatasetRecord> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    int count = static_cast<int>(rng.Range(o.min_count, o.max_count));
    Item built;
    std::vector<int64_t> numbers;
    for (int attempt = 0;; ++attempt) {
      if (attempt > 100000) return Internal("countdown: no instance found; raise --max-target");
      numbers.clear();
      for (int i = 0; i < count; ++i) numbers.push_back(rng.Range(1, o.max_number));
      if (Construct(numbers, rng, &built) && built.value >= 1 && built.value <= o.max_target) break;
    }
    DatasetRecord r;
    r.id = "countdown-" + std::to_string(seed) + "-" + std::to_string(k);
    r.kind = "countdown";
    r.numbers = numbers;
    r.target = built.value;
    r.answer = built.text;
    r.prompt = "Using the numbers [" + Join(numbers) + "], create an equation that equals " +
               std::to_string(built.value) +
               ". You can use basic arithmetic operations (+, -, *, /) and each number can only be "
               "used once." + kAnswerFormat + ", for example <answer> (1 + 2) / 3 </answer>.";
    nlohmann::json meta = {{"numbers", numbers}, {"target", built.value}};
    r.metadata_json = meta.dump();
    Verdict v = ScoreCountdown(numbers, built.value, "<answer>" + r.answer + "</answer>");
    if (v.score != 1.0) return Internal("countdown: generated answer rejected: " + v.note);
    if (o.verify_with_solver && !SolveCountdown(numbers, built.value))
      return Internal("countdown: solver found no solution for " + r.id);
    out.push_back(std::move(r));
  }
  return out;
}

Result<std::vector<DatasetRecord>> MakeArith(int64_t n, uint64_t seed, const ArithOptions& o) {
  if (n < 1) return InvalidArgument("--n must be at least 1");
  if (o.min_digits < 1 || o.max_digits > 9 || o.min_digits > o.max_digits)
    return InvalidArgument("arith: digits must be within 1..9 (min <= max)");
  if (o.ops.empty() || o.ops.find_first_not_of("+-*") != std::string::npos)
    return InvalidArgument("arith: --ops takes characters from '+-*'");
  static const int64_t kPow10[] = {1, 10, 100, 1000, 10000, 100000, 1000000, 10000000,
                                   100000000, 1000000000};
  SplitMix64 rng(seed);
  std::vector<DatasetRecord> out;
  for (int64_t k = 0; k < n; ++k) {
    auto operand = [&]() {
      int d = static_cast<int>(rng.Range(o.min_digits, o.max_digits));
      return rng.Range(d == 1 ? 0 : kPow10[d - 1], kPow10[d] - 1);
    };
    int64_t a = operand(), b = operand();
    char op = o.ops[static_cast<size_t>(rng.Range(0, static_cast<int64_t>(o.ops.size()) - 1))];
    int64_t v = op == '+' ? a + b : op == '-' ? a - b : a * b;
    DatasetRecord r;
    r.id = "arith-" + std::to_string(seed) + "-" + std::to_string(k);
    r.kind = "arith";
    r.answer = std::to_string(v);
    r.prompt = "What is " + std::to_string(a) + " " + op + " " + std::to_string(b) + "?";
    if (o.instructions) r.prompt += std::string(kAnswerFormat) + ", for example <answer> 42 </answer>.";
    nlohmann::json meta = {{"a", a}, {"b", b}, {"op", std::string(1, op)}};
    r.metadata_json = meta.dump();
    out.push_back(std::move(r));
  }
  return out;
}

std::string ToJsonLine(const DatasetRecord& r) {
  nlohmann::ordered_json j;
  j["id"] = r.id;
  j["prompt"] = r.prompt;
  j["answer"] = r.answer;
  j["kind"] = r.kind;
  if (!r.metadata_json.empty()) j["metadata"] = nlohmann::ordered_json::parse(r.metadata_json);
  return j.dump();
}

}  // namespace aha::rewardd
