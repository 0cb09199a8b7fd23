#include "replay/dispatch_order.h"

#include <limits>

namespace aha::replay {
namespace {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [0, n) without modulo bias worth caring about (Lemire's multiply-shift).
uint64_t Below(uint64_t* state, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(SplitMix64(state)) * n) >> 64);
}

}  // namespace

DispatchOrder::DispatchOrder(uint64_t dataset_size, uint64_t seed, bool shuffle, uint32_t epochs)
    : size_(dataset_size), seed_(seed), shuffle_(shuffle), epochs_(epochs) {}

std::vector<uint64_t> DispatchOrder::EpochOrder(uint32_t epoch) const {
  std::vector<uint64_t> order(size_);
  for (uint64_t i = 0; i < size_; ++i) order[i] = i;
  if (!shuffle_) return order;
  uint64_t state = seed_ ^ (0xa0761d6478bd642full * (uint64_t(epoch) + 1));
  for (uint64_t i = size_; i > 1; --i) std::swap(order[i - 1], order[Below(&state, i)]);
  return order;
}

bool DispatchOrder::Exhausted(const DispatchCursor& c) const {
  if (size_ == 0) return true;
  return epochs_ != 0 && c.epoch >= epochs_;
}

uint64_t DispatchOrder::Remaining(const DispatchCursor& c) const {
  if (Exhausted(c)) return 0;
  if (epochs_ == 0) return std::numeric_limits<uint64_t>::max();
  return (uint64_t(epochs_) - c.epoch) * size_ - c.position;
}

std::optional<uint64_t> DispatchOrder::Next(DispatchCursor* c) {
  if (Exhausted(*c)) return std::nullopt;
  if (cached_epoch_ != c->epoch) {
    cached_ = EpochOrder(c->epoch);
    cached_epoch_ = c->epoch;
  }
  uint64_t task = cached_[c->position];
  if (++c->position == size_) {
    c->position = 0;
    ++c->epoch;
  }
  return task;
}

}  // namespace aha::replay
