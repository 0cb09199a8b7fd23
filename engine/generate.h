// Generator: batched, KV-cached sampling of completions for many prompts at once.
//
// Up to max_batch sequences decode together; a finished sequence's cache slot is refilled with the
// next waiting request (continuous batching). Newly admitted prompts are prefilled together as one
// packed batch; each decode step then runs one token of every active sequence in one batched
// forward pass (Transformer::ForwardCached). Each request has its own seeded RNG, so its tokens do
// not depend on which other requests share the batch.
//
// A sequence stops at the first of: a token in stop_token_ids (kept in the output: the learner
// trains on it), a stop string appearing in the decoded completion (needs `detokenize`; tokens are
// kept through the one that completed it), or max_new_tokens ("length").
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/sampler.h"
#include "engine/transformer.h"

namespace aha::engine {

struct GenerationRequest {
  std::vector<int32_t> prompt;  // at least one token
  SamplingOptions sampling;
  uint64_t seed = 0;
  int max_new_tokens = 64;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;
};

enum class FinishReason { kStop, kLength };
const char* FinishReasonName(FinishReason r);  // "stop", "length"

struct GenerationResult {
  std::vector<int32_t> tokens;   // the completion (prompt excluded)
  std::vector<float> logprobs;   // behaviour log-prob of each completion token (sampler.h)
  std::vector<uint64_t> versions;  // the step hook's value when each token was drawn (0 without one)
  FinishReason finish = FinishReason::kLength;
};

class Generator {
 public:
  using Detokenize = std::function<std::string(const std::vector<int32_t>&)>;
  // max_len bounds prompt + completion of each sequence (KV cache length).
  Generator(Transformer* model, int max_batch, int max_len);
  // InvalidArgument for an empty prompt, an out-of-vocabulary token, or prompt + max_new_tokens >
  // max_len. Results are in request order.
  Result<std::vector<GenerationResult>> Generate(const std::vector<GenerationRequest>& requests,
                                                 const Detokenize& detokenize = nullptr);
  // Called before every forward pass (each prefill and each decode step), on the generating
  // thread: the place to swap new weights in without stopping the batch (an actor's in-flight
  // update). Returns the policy version in use from then on, recorded per drawn token.
  using StepHook = std::function<uint64_t()>;
  void SetStepHook(StepHook hook) { step_hook_ = std::move(hook); }

 private:
  Transformer* model_;
  int max_batch_, max_len_;
  KvCache cache_;
  Tensor device_logits_, device_params_, device_out_;  // device path only (generate.cc)
  StepHook step_hook_;
};

}  // namespace aha::engine
