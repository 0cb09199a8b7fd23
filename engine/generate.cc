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
  // On the CPU the logits come back to the host and each sequence draws from its own Rng stream.
  // On a device they stay there and Backend::SampleRows draws every row in one launch, keyed by
  // (request seed, tokens drawn so far); only B tokens and log-probs come back.
  Backend* backend = model_->backend();
  const bool on_host = backend->device().is_cpu();
  std::vector<float> logits;
  std::vector<SampledToken> drawn;
  uint64_t version = 0;
  auto forward_and_sample = [&](const std::vector<int32_t>& tokens, const std::vector<int32_t>& cu,
                                const std::vector<int32_t>& slots, const std::vector<int32_t>& start,
                                std::vector<Active>& rows) {
    const int B = static_cast<int>(rows.size());
    drawn.resize(B);
    if (step_hook_) version = step_hook_();
    if (on_host) {
      logits.resize(static_cast<size_t>(B) * V);
      model_->ForwardCached(tokens.data(), cu.data(), slots.data(), start.data(), B, &cache_, logits.data());
      for (int b = 0; b < B; ++b)
        drawn[b] = SampleToken(logits.data() + static_cast<size_t>(b) * V, V, requests[rows[b].request].sampling,
                               rows[b].rng);
      return;
    }
    if (device_logits_.empty()) {
      const Device d = backend->device();
      device_logits_ = Tensor(DType::kF32, {max_batch_, V}, d);
      device_params_ = Tensor(DType::kF32, {max_batch_ * 8}, d);  // temperature top_k top_p seeds(2) counters(2), padded
      device_out_ = Tensor(DType::kF32, {max_batch_ * 2}, d);
    }
    model_->ForwardCached(tokens.data(), cu.data(), slots.data(), start.data(), B, &cache_, device_logits_.f32());
    std::vector<float> temperature(B), top_p(B);
    std::vector<int32_t> top_k(B);
    std::vector<uint64_t> seeds(B), counters(B);
    for (int b = 0; b < B; ++b) {
      const GenerationRequest& r = requests[rows[b].request];
      temperature[b] = r.sampling.temperature;
      top_k[b] = r.sampling.top_k;
      top_p[b] = r.sampling.top_p;
      seeds[b] = r.seed;
      counters[b] = results[rows[b].request].tokens.size();
    }
    char* p = static_cast<char*>(device_params_.raw());
    float* d_temperature = reinterpret_cast<float*>(p);
    int32_t* d_top_k = reinterpret_cast<int32_t*>(p + 4 * max_batch_);
    float* d_top_p = reinterpret_cast<float*>(p + 8 * max_batch_);
    uint64_t* d_seeds = reinterpret_cast<uint64_t*>(p + 12 * max_batch_ + (12 * max_batch_) % 8);
    uint64_t* d_counters = d_seeds + max_batch_;
    backend->Upload(d_temperature, temperature.data(), B * sizeof(float));
    backend->Upload(d_top_k, top_k.data(), B * sizeof(int32_t));
    backend->Upload(d_top_p, top_p.data(), B * sizeof(float));
    backend->Upload(d_seeds, seeds.data(), B * sizeof(uint64_t));
    backend->Upload(d_counters, counters.data(), B * sizeof(uint64_t));
    int32_t* d_tokens = reinterpret_cast<int32_t*>(device_out_.raw());
    float* d_logprobs = device_out_.f32() + max_batch_;
    backend->SampleRows(d_tokens, d_logprobs, device_logits_.f32(), B, V, d_temperature, d_top_k, d_top_p, d_seeds,
                        d_counters);
    std::vector<int32_t> tok(B);
    std::vector<float> lp(B);
    backend->Download(tok.data(), d_tokens, B * sizeof(int32_t));
    backend->Download(lp.data(), d_logprobs, B * sizeof(float));
    for (int b = 0; b < B; ++b) drawn[b] = SampledToken{tok[b], lp[b]};
  };

  // Appends a sampled token; returns true when the sequence is finished.
  auto accept = [&](Active& a, const SampledToken& t) -> bool {
    const GenerationRequest& r = requests[a.request];
    GenerationResult& out = results[a.request];
    out.tokens.push_back(t.token);
    out.logprobs.push_back(t.logprob);
    out.versions.push_back(version);
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
      forward_and_sample(tokens, cu, slots, start, admitted);
      for (int b = 0; b < B; ++b) {
        if (accept(admitted[b], drawn[b])) free_slots.push_back(admitted[b].slot);
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
    forward_and_sample(tokens, cu, slots, start, active);
    std::vector<Active> still;
    for (int b = 0; b < B; ++b) {
      Active& a = active[b];
      a.len += 1;
      if (accept(a, drawn[b])) free_slots.push_back(a.slot);
      else still.push_back(a);
    }
    active = std::move(still);
  }
  return results;
}

}  // namespace aha::engine
