// Generator: batched, KV-cached sampling of completions for many prompts at once.
//
// Up to max_batch sequences decode together; a finished sequence's place is refilled with the next
// waiting request (continuous batching). Newly admitted prompts are prefilled together as one
// packed batch; each decode step then runs one token of every active sequence in one batched
// forward pass (Transformer::ForwardCached). Each request has its own seeded RNG stream, advanced
// once per drawn token, so its tokens do not depend on which other requests share the batch.
//
// KV memory is a paged pool (transformer.h KvCache) with a free list of blocks: a sequence takes
// blocks as it grows and returns them when it finishes. A waiting request is admitted when the free
// blocks cover its prefill plus one token. When a decode step finds the pool empty, the most
// recently admitted running sequence is preempted (vLLM's recompute mode): its blocks go back to
// the pool, and it returns to the front of the queue keeping its drawn tokens and RNG state; when
// re-admitted, its prompt and drawn tokens are prefilled again and it continues where it stopped,
// so its completion is the one it would have produced without the preemption (at unchanged
// weights: after a step hook's swap the recomputed keys and values are the new weights').
//
// A sequence stops at the first of: a token in stop_token_ids (kept in the output: the learner
// trains on it), a stop string appearing in the decoded completion (needs `detokenize`; tokens are
// kept through the one that completed it), or max_new_tokens ("length"). Stop strings are looked
// for in the text of the last (longest stop string's length + 16) tokens after each token, a hit
// confirmed on the whole text, so checking costs O(length), not O(length^2).
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

struct GeneratorOptions {
  // KV pool size in tokens (rounded up to whole blocks); 0 = max_batch x max_len, enough for every
  // sequence at full length at once (never preempts). Smaller pools trade preemptions (recomputed
  // prefills) for memory; the pool must hold at least one sequence of max_len.
  int64_t kv_cache_tokens = 0;
  int block_size = kKvBlockSize;  // positions per KV block (transformer.h)
  // Sampling on a device (or with backend_sampling): decode step k + 1 is queued before step k's
  // tokens are read back, for the rows known to carry on past step k (not stopped, not at their
  // token cap with step k's draw), its input tokens gathered from step k's draws on the device. The
  // device then does not sit idle while the host reads tokens, checks stops and launches. A row that
  // stops at step k (a stop token or string) was in step k + 1 already: that draw is dropped (one
  // row of one step of wasted work). The chain of steps ends when a waiting request could take a
  // free place or the pool cannot cover the next positions. Off: every step waits for the last.
  bool run_ahead = true;
  // The CPU engine draws on the host from each request's own Rng stream. True makes it draw through
  // Backend::SampleRows as a device does (keyed by seed and tokens drawn), with the device's control
  // flow, run-ahead included: what the CPU tests of that flow use.
  bool backend_sampling = false;
};

// Counts of the last Generate() call.
struct GeneratorStats {
  int64_t preemptions = 0;        // sequences sent back to the queue because the pool ran dry
  int64_t recomputed_tokens = 0;  // positions prefilled again for re-admitted sequences
  int peak_blocks_used = 0;       // most blocks held at once
  // Where Generate's time went: forward passes with their sampling, each ending with the drawn
  // tokens on the host (so a device's work is inside). Prefill calls admit sequences (prompt rows);
  // decode steps feed one row per active sequence. Generate's wall time minus both is the host's
  // own bookkeeping between them.
  int64_t prefill_calls = 0, prefill_rows = 0;
  int64_t decode_steps = 0, decode_rows = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  // On a device: host time from the end of one forward pass (its tokens on the host) to the next
  // pass's launch, summed over consecutive passes. The device has nothing queued then, so this is
  // (up to the launch latency) the time it sits idle between steps. A step run ahead (see
  // GeneratorOptions::run_ahead) adds none: it was queued before the last pass's tokens came back.
  double launch_gap_seconds = 0;
  int64_t steps_ahead = 0;           // decode steps queued before the previous step's tokens were read
  int64_t rows_dropped_ahead = 0;    // rows of those steps whose sequence had stopped the step before
};

class Generator {
 public:
  using Detokenize = std::function<std::string(const std::vector<int32_t>&)>;
  // max_len bounds prompt + completion of each sequence. Aborts on max_batch, max_len or
  // options that cannot work (a pool smaller than one max_len sequence): a caller bug.
  Generator(Transformer* model, int max_batch, int max_len, const GeneratorOptions& options = {});
  // InvalidArgument for an empty prompt, an out-of-vocabulary token, or prompt + max_new_tokens >
  // max_len. Results are in request order.
  Result<std::vector<GenerationResult>> Generate(const std::vector<GenerationRequest>& requests,
                                                 const Detokenize& detokenize = nullptr);
  // Called before every forward pass (each prefill and each decode step), on the generating
  // thread: the place to swap new weights in without stopping the batch (an actor's in-flight
  // update). Returns the policy version in use from then on, recorded per drawn token.
  using StepHook = std::function<uint64_t()>;
  void SetStepHook(StepHook hook) { step_hook_ = std::move(hook); }

  const GeneratorStats& stats() const { return stats_; }
  int num_blocks() const { return cache_.num_blocks; }
  int free_blocks() const { return static_cast<int>(free_blocks_.size()); }  // all of them between calls

 private:
  Transformer* model_;
  int max_batch_, max_len_;
  GeneratorOptions options_;
  KvCache cache_;
  std::vector<int32_t> free_blocks_;  // the allocator: a stack of free block ids
  GeneratorStats stats_;
  Tensor device_logits_, device_params_, device_out_;  // device path only (generate.cc)
  StepHook step_hook_;
};

}  // namespace aha::engine
