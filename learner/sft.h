// Supervised fine-tuning (the R1 recipe's cold start and distillation) with the same engine as GRPO.
//
// Data: JSONL, one {"prompt": ..., "completion": ...} per line. The prompt goes through the job's
// prompt template; the loss is the mean negative log-likelihood of the completion tokens (prompt
// tokens carry none), over all completion tokens of a batch of `batch_sequences` sequences:
//   L = -sum_{completion tokens} log p(t | before) / (completion tokens in the batch)
// so d L / d logprob = -1 / count on completion tokens, pushed through Transformer::Backward.
// AdamW with linear warm-up, grad clipping at 1.0, batches in a seeded shuffled order per epoch.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/status.h"
#include "engine/backend.h"

namespace aha {

struct SftExample {
  std::vector<int32_t> prompt, completion;
};

struct SftOptions {
  SftConfig sft;
  std::string model_dir;        // start
  std::string out_dir;          // written at the end (model + tokenizer files)
  std::string prompt_template = "r1-zero";
  uint64_t seed = 1234;
  // Called after every step with (step, total steps, mean loss of the step).
  std::function<void(int64_t, int64_t, double)> on_step;
};

// Reads prompt/completion JSONL and tokenizes it with the model's tokenizer. Errors name the file,
// line and field.
Result<std::vector<SftExample>> LoadSftData(const std::string& path, const std::string& model_dir,
                                            const std::string& prompt_template);

// Trains and writes out_dir. Returns the mean loss of the last epoch.
Result<double> RunSft(const SftOptions& options, const std::vector<SftExample>& data, engine::Backend* backend);

}  // namespace aha
