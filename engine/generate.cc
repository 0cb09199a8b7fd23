// Batched KV-cached generation (see generate.h).
#include "engine/generate.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <deque>
#include <optional>

#include "common/clock.h"

namespace aha::engine {

const char* FinishReasonName(FinishReason r) { return r == FinishReason::kStop ? "stop" : "length"; }

namespace {

int64_t BlocksFor(int64_t positions, int64_t block_size) { return (positions + block_size - 1) / block_size; }

// Tokens decoded beyond the longest stop string's length when checking stop strings (see accept).
constexpr size_t kStopWindowMargin = 16;

struct Active {
  int request = 0;
  int64_t admitted = 0;        // admission order: the most recent is preempted first
  int len = 0;                 // positions already in the cache
  int32_t next = 0;            // sampled token not yet fed to the model
  std::vector<int32_t> blocks;  // block-table row: block i holds positions [i, i + 1) x block_size
};

}  // namespace

Generator::Generator(Transformer* model, int max_batch, int max_len, const GeneratorOptions& options)
    : model_(model), max_batch_(max_batch), max_len_(max_len), options_(options) {
  AHA_CHECK(max_batch > 0 && max_len > 0 && options.block_size > 0 && options.kv_cache_tokens >= 0)
      << "Generator: max_batch " << max_batch << ", max_len " << max_len << ", block_size " << options.block_size
      << ", kv_cache_tokens " << options.kv_cache_tokens;
  const int64_t per_sequence = BlocksFor(max_len, options.block_size);
  const int64_t blocks = options.kv_cache_tokens > 0 ? BlocksFor(options.kv_cache_tokens, options.block_size)
                                                     : max_batch * per_sequence;
  AHA_CHECK(blocks >= per_sequence && blocks < (int64_t{1} << 31))
      << "Generator: a KV pool of " << blocks << " blocks cannot hold one sequence of max_len " << max_len;
  cache_ = model->NewKvCache(max_batch, max_len, static_cast<int>(blocks), options.block_size);
  for (int64_t b = blocks - 1; b >= 0; --b) free_blocks_.push_back(static_cast<int32_t>(b));
}

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
  std::vector<Rng> rngs;  // per request, advanced once per drawn token (kept across preemptions)
  rngs.reserve(requests.size());
  for (const auto& r : requests) rngs.emplace_back(r.seed);
  std::deque<int> waiting;
  for (size_t i = 0; i < requests.size(); ++i) waiting.push_back(static_cast<int>(i));
  std::vector<Active> active;
  stats_ = {};
  const int bs = cache_.block_size, MB = cache_.max_blocks;
  int64_t admissions = 0;
  auto release = [&](Active& a) {
    free_blocks_.insert(free_blocks_.end(), a.blocks.begin(), a.blocks.end());
    a.blocks.clear();
  };
  auto take_blocks = [&](Active& a, int64_t positions) {
    while (static_cast<int64_t>(a.blocks.size()) * bs < positions) {
      AHA_CHECK(!free_blocks_.empty()) << "Generator: KV pool ran dry while allocating";
      a.blocks.push_back(free_blocks_.back());
      free_blocks_.pop_back();
    }
    stats_.peak_blocks_used = std::max(stats_.peak_blocks_used, cache_.num_blocks - free_blocks());
  };
  // On the CPU the logits come back to the host and each sequence draws from its own Rng stream.
  // On a device they stay there and Backend::SampleRows draws every row in one launch, keyed by
  // (request seed, tokens drawn so far); only B tokens and log-probs come back, without waiting
  // (DownloadAsync), so that the next step can be queued first (GeneratorOptions::run_ahead).
  Backend* backend = model_->backend();
  const bool on_host = backend->device().is_cpu() && !options_.backend_sampling;
  const bool run_ahead = options_.run_ahead && !on_host;
  std::vector<float> logits;
  std::optional<Clock::time_point> last_pass_end;  // when the last pass's tokens were on the host
  int in_flight = 0;                               // passes launched and not yet read back

  // One forward pass with its draws: launched, then read back (collect).
  struct Pass {
    int B = 0;
    std::vector<int> request;  // per row
    uint64_t version = 0;  // the step hook's value for this pass
    uint64_t ticket = 0;
    Clock::time_point launched;
    std::vector<int32_t> out;          // device path: tokens at [0, B), log-prob bits from max_batch_ on
    std::vector<SampledToken> drawn;   // after collect
  };
  // Rows are the block-table rows of the pass, in order. drawn_before is how many tokens each row
  // draws before this pass beyond those already in its result (1 for a step run ahead: the previous
  // step's, not yet read). device_tokens / token_rows: a step run ahead takes row b's token from the
  // previous pass's draws on the device, at that pass's row token_rows[b] (ForwardCached).
  auto launch = [&](Pass& p, const std::vector<int32_t>& tokens, const std::vector<int32_t>& cu,
                    const std::vector<int32_t>& start, const std::vector<const Active*>& rows, int drawn_before,
                    const int32_t* device_tokens, const std::vector<int32_t>& token_rows) {
    const int B = static_cast<int>(rows.size());
    p.B = B;
    p.request.resize(B);
    for (int b = 0; b < B; ++b) p.request[b] = rows[b]->request;
    p.launched = Clock::now();
    std::vector<int32_t> table(static_cast<size_t>(B) * MB, -1);  // -1: never read (past the row's length)
    for (int b = 0; b < B; ++b) std::copy(rows[b]->blocks.begin(), rows[b]->blocks.end(), table.begin() + b * MB);
    if (step_hook_) p.version = step_hook_();
    if (on_host) {
      logits.resize(static_cast<size_t>(B) * V);
      model_->ForwardCached(tokens.data(), cu.data(), start.data(), table.data(), B, &cache_, logits.data());
      p.drawn.resize(B);
      for (int b = 0; b < B; ++b)
        p.drawn[b] = SampleToken(logits.data() + static_cast<size_t>(b) * V, V, requests[rows[b]->request].sampling,
                                 rngs[rows[b]->request]);
      return;
    }
    if (device_logits_.empty()) {
      const Device d = backend->device();
      device_logits_ = Tensor(DType::kF32, {max_batch_, V}, d);
      device_params_ = Tensor(DType::kF32, {max_batch_ * 8}, d);  // temperature top_k top_p seeds(2) counters(2), padded
      device_out_ = Tensor(DType::kF32, {max_batch_ * 2}, d);
    }
    // The sampling parameters, laid out as device_params_ holds them (temperature | top_k | top_p at
    // max_batch_ entries each, then seeds and counters 8-byte aligned), go up in one copy before the
    // forward, so the draw never waits for the host.
    const size_t mb = static_cast<size_t>(max_batch_), seeds_at = 12 * mb + (12 * mb) % 8;
    std::vector<char> params(seeds_at + 16 * mb);
    for (int b = 0; b < B; ++b) {
      const GenerationRequest& r = requests[rows[b]->request];
      const uint64_t counter = results[rows[b]->request].tokens.size() + drawn_before;
      std::memcpy(&params[4 * b], &r.sampling.temperature, 4);
      std::memcpy(&params[4 * (mb + b)], &r.sampling.top_k, 4);
      std::memcpy(&params[4 * (2 * mb + b)], &r.sampling.top_p, 4);
      std::memcpy(&params[seeds_at + 8 * b], &r.seed, 8);
      std::memcpy(&params[seeds_at + 8 * (mb + b)], &counter, 8);
    }
    char* prm = static_cast<char*>(device_params_.raw());
    backend->Upload(prm, params.data(), params.size());
    const float* d_temperature = reinterpret_cast<const float*>(prm);
    const int32_t* d_top_k = reinterpret_cast<const int32_t*>(prm + 4 * mb);
    const float* d_top_p = reinterpret_cast<const float*>(prm + 8 * mb);
    const uint64_t* d_seeds = reinterpret_cast<const uint64_t*>(prm + seeds_at);
    const uint64_t* d_counters = d_seeds + mb;
    // The draw is the forward's last op (inside a decode step's graph): the lm-head product and the
    // draw in one where the backend has it (Backend::LmHeadSample). Rows past B (a decode bucket's
    // padding) draw too, from whatever options their slots hold; nothing reads them.
    int32_t* d_tokens = reinterpret_cast<int32_t*>(device_out_.raw());
    float* d_logprobs = device_out_.f32() + max_batch_;
    const Transformer::Draw draw{d_tokens, d_logprobs, d_temperature, d_top_k, d_top_p, d_seeds, d_counters};
    model_->ForwardCached(tokens.data(), cu.data(), start.data(), table.data(), B, &cache_, device_logits_.f32(),
                          device_tokens, device_tokens ? token_rows.data() : nullptr, &draw);
    if (in_flight == 0 && last_pass_end) stats_.launch_gap_seconds += SecondsSince(*last_pass_end);
    // Tokens and log-probs in one copy: tokens at [0, B), log-probs from max_batch_ on.
    p.out.resize(static_cast<size_t>(max_batch_) + B);
    p.ticket = backend->DownloadAsync(p.out.data(), d_tokens, p.out.size() * sizeof(int32_t));
    ++in_flight;
  };
  auto pointers = [](const std::vector<Active>& v) {
    std::vector<const Active*> p;
    for (const Active& a : v) p.push_back(&a);
    return p;
  };
  auto collect = [&](Pass& p) {
    if (on_host) return;
    backend->AwaitDownload(p.ticket);
    --in_flight;
    p.drawn.resize(p.B);
    for (int b = 0; b < p.B; ++b) {
      float lp;
      std::memcpy(&lp, &p.out[max_batch_ + b], sizeof(lp));
      p.drawn[b] = SampledToken{p.out[b], lp};
    }
    last_pass_end = Clock::now();
  };

  // Appends a sampled token; returns true when the sequence is finished.
  auto accept = [&](Active& a, const SampledToken& t, uint64_t version) -> bool {
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
      // A stop string that appears now overlaps the new token's text, so it lies in the text of the
      // last few tokens: decode a window of max-stop-length + kStopWindowMargin tokens (every token is
      // at least a byte; the margin covers what a window's first tokens decode differently, a split
      // UTF-8 character or a dropped leading space) instead of the whole completion at every token,
      // which grew quadratically with its length. A hit in a window is confirmed on the whole text.
      auto contains_stop = [&](const std::string& text) {
        for (const auto& s : r.stop_strings)
          if (!s.empty() && text.find(s) != std::string::npos) return true;
        return false;
      };
      size_t longest = 0;
      for (const auto& s : r.stop_strings) longest = std::max(longest, s.size());
      const size_t k = std::min(out.tokens.size(), longest + kStopWindowMargin);
      const std::vector<int32_t> window(out.tokens.end() - static_cast<std::ptrdiff_t>(k), out.tokens.end());
      if (contains_stop(detokenize(window)) && (k == out.tokens.size() || contains_stop(detokenize(out.tokens)))) {
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
    // Admit waiting requests (first come, first served) while the batch has room and the free
    // blocks cover the prefill plus the next token, and prefill them together. A preempted request
    // prefills its prompt and every token drawn so far (the last one not yet fed) and continues.
    std::vector<Active> admitted;
    std::vector<int32_t> tokens, cu{0}, start;
    while (!waiting.empty() && static_cast<int>(active.size() + admitted.size()) < max_batch_) {
      const int r = waiting.front();
      const auto& prompt = requests[r].prompt;
      const auto& so_far = results[r].tokens;
      const int len = static_cast<int>(prompt.size() + so_far.size());
      if (BlocksFor(len + 1, bs) > free_blocks()) break;
      waiting.pop_front();
      Active a;
      a.request = r;
      a.admitted = admissions++;
      a.len = len;
      take_blocks(a, len);
      if (!so_far.empty()) stats_.recomputed_tokens += len;
      tokens.insert(tokens.end(), prompt.begin(), prompt.end());
      tokens.insert(tokens.end(), so_far.begin(), so_far.end());
      cu.push_back(static_cast<int32_t>(tokens.size()));
      start.push_back(0);
      admitted.push_back(std::move(a));
    }
    if (!admitted.empty()) {
      const int B = static_cast<int>(admitted.size());
      Pass p;
      launch(p, tokens, cu, start, pointers(admitted), 0, nullptr, {});
      collect(p);
      stats_.prefill_seconds += SecondsSince(p.launched);
      ++stats_.prefill_calls;
      stats_.prefill_rows += static_cast<int64_t>(tokens.size());
      for (int b = 0; b < B; ++b) {
        if (accept(admitted[b], p.drawn[b], p.version)) release(admitted[b]);
        else active.push_back(std::move(admitted[b]));
      }
      continue;  // admit more before decoding if blocks were freed at once
    }
    AHA_CHECK(!active.empty()) << "Generator: request " << waiting.front() << " cannot be admitted into an empty pool";
    // The decode step writes position len of every sequence: one at a block boundary needs a new
    // block. While the pool cannot cover them, preempt the most recently admitted sequence.
    auto needs_block = [&](const Active& a) { return static_cast<int64_t>(a.blocks.size()) * bs <= a.len; };
    while (std::count_if(active.begin(), active.end(), needs_block) > free_blocks()) {
      auto victim = std::max_element(active.begin(), active.end(),
                                     [](const Active& x, const Active& y) { return x.admitted < y.admitted; });
      release(*victim);
      waiting.push_front(victim->request);
      active.erase(victim);
      ++stats_.preemptions;
    }
    if (active.empty()) continue;
    for (Active& a : active) take_blocks(a, a.len + 1);
    tokens.clear();
    cu.assign(1, 0);
    start.clear();
    for (const Active& a : active) {
      tokens.push_back(a.next);
      cu.push_back(static_cast<int32_t>(tokens.size()));
      start.push_back(a.len);
    }
    // A chain of decode steps: step k is in flight; step k + 1 is queued behind it (run ahead) before
    // step k's tokens are read, for the rows known to carry on: those not yet stopped and not at their
    // token cap with step k's draw. A row that stops at step k was in step k + 1 already: that draw is
    // dropped, and step k + 2 takes the other rows' tokens from step k + 1's draws by row. The chain
    // ends when a waiting request could take a free place, the pool cannot cover the next positions,
    // or no row carries on; the loop above then admits, preempts and starts the next chain.
    std::deque<Pass> flight;
    flight.emplace_back();
    launch(flight.back(), tokens, cu, start, pointers(active), 0, nullptr, {});
    Clock::time_point counted_from = flight.back().launched;  // decode time is wall time, overlaps once
    std::vector<int> slot(requests.size(), -1);                // request -> its place in active
    auto reindex = [&] {
      std::fill(slot.begin(), slot.end(), -1);
      for (size_t i = 0; i < active.size(); ++i) slot[active[i].request] = static_cast<int>(i);
    };
    reindex();
    while (!flight.empty()) {
      const bool room_for_waiting = !waiting.empty() && static_cast<int>(active.size()) < max_batch_;
      if (run_ahead && flight.size() == 1 && !room_for_waiting) {
        const Pass& prev = flight.back();
        std::vector<Active*> carry;
        std::vector<int32_t> from;  // each row's place in prev
        int64_t new_blocks = 0;
        for (int b = 0; b < prev.B; ++b) {
          const int at = slot[prev.request[b]];
          if (at < 0) continue;  // stopped at an earlier step: its draw in prev is dropped
          Active& a = active[at];
          if (static_cast<int>(results[a.request].tokens.size()) + 1 >= requests[a.request].max_new_tokens) continue;
          if (static_cast<int64_t>(a.blocks.size()) * bs <= a.len + 1) ++new_blocks;  // position len + 1
          carry.push_back(&a);
          from.push_back(b);
        }
        if (!carry.empty() && new_blocks <= free_blocks()) {
          std::vector<const Active*> rows;
          std::vector<int32_t> t(carry.size(), 0), c{0}, st;
          for (Active* a : carry) {
            take_blocks(*a, a->len + 2);
            rows.push_back(a);
            c.push_back(static_cast<int32_t>(c.size()));
            st.push_back(a->len + 1);
          }
          flight.emplace_back();
          // Its tokens are the previous step's draws, still on the device (SampleRows' output).
          launch(flight.back(), t, c, st, rows, 1, reinterpret_cast<const int32_t*>(device_out_.raw()), from);
          ++stats_.steps_ahead;
        }
      }
      Pass& p = flight.front();
      collect(p);
      stats_.decode_seconds += SecondsSince(std::max(p.launched, counted_from));
      counted_from = Clock::now();
      ++stats_.decode_steps;
      stats_.decode_rows += p.B;
      bool stopped = false;
      for (int b = 0; b < p.B; ++b) {
        const int at = slot[p.request[b]];
        if (at < 0) {  // stopped at the step before, while this one was queued
          ++stats_.rows_dropped_ahead;
          continue;
        }
        Active& a = active[at];
        a.len += 1;
        if (accept(a, p.drawn[b], p.version)) {
          release(a);  // a step queued after this one may still write its next position: ordered before any reuse
          slot[a.request] = -1;
          stopped = true;
        }
      }
      if (stopped) {
        active.erase(std::remove_if(active.begin(), active.end(), [&](const Active& a) { return slot[a.request] < 0; }),
                     active.end());
        reindex();
      }
      flight.pop_front();
    }
  }
  AHA_CHECK(in_flight == 0) << "Generator: " << in_flight << " passes left in flight";
  return results;
}

}  // namespace aha::engine
