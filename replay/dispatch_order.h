// DispatchOrder: which task replay hands out next, over epochs, with a seeded shuffle.
//
// The order of epoch e is a Fisher-Yates permutation of [0, dataset_size) drawn from SplitMix64
// seeded with (seed, e), or the identity when shuffle is off. The same (size, seed, epoch) gives
// the same order on every machine and every run, so the cursor (epoch, position) that replay
// persists is all it needs to resume exactly where it stopped.
// Cost: O(dataset_size) time and 4-8 bytes per task of memory when an epoch starts; O(1) per task.
// Not thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace aha::replay {

struct DispatchCursor {
  uint32_t epoch = 0;
  uint64_t position = 0;  // next position inside the epoch's order
};

class DispatchOrder {
 public:
  // epochs == 0: cycle forever.
  DispatchOrder(uint64_t dataset_size, uint64_t seed, bool shuffle, uint32_t epochs);

  // The task at `cursor`, advancing it; nullopt once every epoch is handed out.
  std::optional<uint64_t> Next(DispatchCursor* cursor);
  bool Exhausted(const DispatchCursor& cursor) const;
  // Tasks left to hand out from `cursor` on (UINT64_MAX when epochs == 0 and the set is non-empty).
  uint64_t Remaining(const DispatchCursor& cursor) const;
  // The permutation of one epoch (for tests).
  std::vector<uint64_t> EpochOrder(uint32_t epoch) const;

 private:
  uint64_t size_, seed_;
  bool shuffle_;
  uint32_t epochs_;
  std::optional<uint32_t> cached_epoch_;
  std::vector<uint64_t> cached_;
};

// The rate limiter of DESIGN.md §1 (off-policy bound), in the spirit of Reverb's: actors may hold
// at most `max_in_flight` groups that the learner has not consumed yet (leased + complete), which
// defaults to (max_staleness + 1) x groups_per_step. With that bound no group can be produced by a
// policy more than max_staleness steps older than the learner that consumes it, unless leases
// expire and are re-dispatched. O(1), stateless, thread-compatible.
class InFlightLimiter {
 public:
  explicit InFlightLimiter(uint64_t max_in_flight) : max_(max_in_flight) {}
  static uint64_t DefaultBound(uint32_t max_staleness, uint32_t groups_per_step) {
    return (uint64_t(max_staleness) + 1) * groups_per_step;
  }
  // How many of `requested` new groups may be dispatched with `in_flight` outstanding.
  uint64_t Grant(uint64_t requested, uint64_t in_flight) const {
    if (in_flight >= max_) return 0;
    return requested < max_ - in_flight ? requested : max_ - in_flight;
  }
  uint64_t bound() const { return max_; }

 private:
  uint64_t max_;
};

}  // namespace aha::replay
