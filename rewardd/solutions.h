// Cold-start solutions: turns a task dataset (docs/data.md) into SFT data in the R1-Zero format,
//   {"prompt": "What is 48 + 37?", "completion": " <think> 8 + 7 = 15 , 4 + 3 + 1 = 8 </think> <answer> 85 </answer>"}
// for arith: two-digit additions as column addition (units first, then tens with the carry; the
// answer assembled from the steps), which a small model learns from single-digit facts and then
// applies to sums it never saw; other arith tasks as "a op b = c". Countdown: the answer expression.
//
// `wrong_fraction` of the solutions, chosen by a seeded draw, carry a plausible wrong result
// (off by 1 or 10, or a digit-swap), the way distillation from a weak teacher does. The cold-start
// model then knows the format and roughly how to compute, but is wrong often enough that GRPO with
// an accuracy reward has something to fix: it is the R1 recipe's cold start in miniature.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace aha::rewardd {

struct SolutionOptions {
  double wrong_fraction = 0.0;
  uint64_t seed = 0;
};

// Reads tasks from `in_path`, writes SFT lines to `out_path`; returns how many were written.
// Tasks of other kinds are skipped; a malformed line fails with its line number.
Result<int64_t> WriteColdStartSolutions(const std::string& in_path, const std::string& out_path,
                                        const SolutionOptions& options);

}  // namespace aha::rewardd
