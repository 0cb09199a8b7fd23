// Batched KV-cached generation (see generate.h).
#include "engine/generate.h"

#include <algorithm>
#include <deque>

namespace aha::engine {

const char* FinishReasonName(FinishReason r) { return r == FinishReason::kStop ? "stop" : "length"; }

Generator::Generator(Transformer* model, int max_batch, int max_len)
    : model_(model), max_batch_(max_batch), max_len_(max_len), cache_(model->NewKvCache(max_batch, max_len)) {}

namespace {

struct Active {
  int request = 0;
  int slot = 0;
  int len = 0;            // tokens already in the cache
  int32_t next = 0;       // sampled token not yet fed to the model
  Rng rng{0};
};

}  // namespace

Result<std::vector<GenerationResult>> Generator::Generate(const std::vector<GenerationRequest>& requests,
                                                          const Detokenize& detokenize) {
  const int V = model_->config().vocab_size;
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    const std::string which = "request " + std::to_string(i) + ": ";
    if (r.prompt.empty()) return InvalidArgument(which + "empty prompt");
    for (int32_t t : r.prompt)
      if (t < 0 || t >= V) return InvalidArgument(which + "token id " + std::to_string(t) + " outside the vocabulary of " + std::to_string(V));
    if (r.max_new_tokens < 1) return InvalidArgument(which + "max_new_tokens must be at least 1");
    if (static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens > max_len_)
      return InvalidArgument(which + "prompt (" + std::to_string(r.prompt.size()) + ") + max_new_tokens (" +
                             std::to_string(r.max_new_tokens) + ") exceeds the context limit " + std::to_string(max_len_));
    if (r.sampling.temperature < 0 || r.sampling.top_p <= 0 || r.sampling.top_p > 1 || r.sampling.top_k < 0)
      return InvalidArgument(which + "sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0");
  }
  std::vector<GenerationResult> results(requests.size());
  std::deque<int> waiting;
  for (size_t i = 0; i < requests.size(); ++i) waiting.push_back(static_cast<int>(i));
  std::vector<int> free_slots;
  for (int s = max_batch_ - 1; s >= 0; --s) free_slots.push_back(s);
  std::vector<Active> active;
  std::vector<float> logits;

  // Appends a sampled token; returns true when the sequence is finished.
  auto accept = [&](Active& a, const float* row) -> bool {
    const GenerationRequest& r = requests[a.request];
    GenerationResult& out = results[a.request];
    SampledToken t = SampleToken(row, V, r.sampling, a.rng);
    out.tokens.push_back(t.token);
    out.logprobs.push_back(t.logprob);
    a.next = t.token;
    if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), t.token) != r.stop_token_ids.end()) {
      out.finish = FinishReason::kStop;
      return true;
    }
    if (detokenize && !r.stop_strings.empty()) {
      const std::string text = detokenize(out.tokens);
      for (const auto& s : r.stop_strings)
        if (!s.empty() && text.find(s) != std::string::npos) {
          out.finish = FinishReason::kStop;
          return true;
        }
    }
    if (static_cast<int>(out.tokens.size()) >= r.max_new_tokens) {
      out.finish = FinishReason::kLength;
      return true;
    }
    return false;
  };

  while (!waiting.empty() || !active.empty()) {
    // Admit waiting requests into free slots and prefill them together.
    std::vector<Active> admitted;
    std::vector<int32_t> tokens, cu{0}, slots, start;
    while (!waiting.empty() && !free_slots.empty()) {
      Active a;
      a.request = waiting.front();
      waiting.pop_front();
      a.slot = free_slots.back();
      free_slots.pop_back();
      a.rng = Rng(requests[a.request].seed);
      const auto& p = requests[a.request].prompt;
      tokens.insert(tokens.end(), p.begin(), p.end());
      cu.push_back(static_cast<int32_t>(tokens.size()));
      slots.push_back(a.slot);
      start.push_back(0);
      a.len = static_cast<int>(p.size());
      admitted.push_back(a);
    }
    if (!admitted.empty()) {
      const int B = static_cast<int>(admitted.size());
      logits.resize(static_cast<size_t>(B) * V);
      model_->ForwardCached(tokens.data(), cu.data(), slots.data(), start.data(), B, &cache_, logits.data());
      for (int b = 0; b < B; ++b) {
        if (accept(admitted[b], logits.data() + static_cast<size_t>(b) * V)) free_slots.push_back(admitted[b].slot);
        else active.push_back(admitted[b]);
      }
      continue;  // admit more before decoding if slots were freed at once
    }
    // One decode step for every active sequence.
    const int B = static_cast<int>(active.size());
    tokens.clear();
    cu.assign(1, 0);
    slots.clear();
    start.clear();
    for (const Active& a : active) {
      tokens.push_back(a.next);
      cu.push_back(static_cast<int32_t>(tokens.size()));
      slots.push_back(a.slot);
      start.push_back(a.len);
    }
    logits.resize(static_cast<size_t>(B) * V);
    model_->ForwardCached(tokens.data(), cu.data(), slots.data(), start.data(), B, &cache_, logits.data());
    std::vector<Active> still;
    for (int b = 0; b < B; ++b) {
      Active& a = active[b];
      a.len += 1;
      if (accept(a, logits.data() + static_cast<size_t>(b) * V)) free_slots.push_back(a.slot);
      else still.push_back(a);
    }
    active = std::move(still);
  }
  return results;
}

}  // namespace aha::engine
