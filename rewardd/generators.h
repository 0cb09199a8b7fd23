// Task generators for `aha data make`: synthetic datasets whose answers the verifiers accept.
//
// countdown (TinyZero): `count` numbers in [1, max_number] and a target reached by combining all of
//   them with + - * / (exact division only, no negative or zero intermediates), so every instance
//   is solvable by construction; the answer field holds that expression, and the generator checks
//   it with ScoreCountdown and (verify_with_solver) with the independent SolveCountdown search.
// arith: `a op b` with operands of min_digits..max_digits digits (<= 9), op from `ops` (+ - *);
//   the answer is the exact integer.
// Records follow docs/data.md: id, prompt, answer, kind, metadata ({"numbers": [...], "target": N}
// for countdown). Deterministic: the same options and seed give the same file on every machine
// (own splitmix64 generator, no std distributions).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace aha::rewardd {

struct DatasetRecord {
  std::string id;
  std::string kind;
  std::string prompt;
  std::string answer;
  std::vector<int64_t> numbers;  // countdown
  int64_t target = 0;            // countdown
  std::string metadata_json;     // "{...}" or ""
};

struct CountdownOptions {
  int min_count = 3;
  int max_count = 4;
  int64_t max_number = 99;
  int64_t max_target = 999;
  bool verify_with_solver = true;
};

struct ArithOptions {
  int min_digits = 2;
  int max_digits = 4;
  std::string ops = "+-*";
  // false: the bare question ("What is 23 + 5?"), for small models whose prompt template or
  // cold start carries the output format instead.
  bool instructions = true;
};

Result<std::vector<DatasetRecord>> MakeCountdown(int64_t n, uint64_t seed, const CountdownOptions& options);
Result<std::vector<DatasetRecord>> MakeArith(int64_t n, uint64_t seed, const ArithOptions& options);

// One JSONL line (no trailing newline).
std::string ToJsonLine(const DatasetRecord& record);

}  // namespace aha::rewardd
