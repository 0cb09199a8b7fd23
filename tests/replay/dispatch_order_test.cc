// DispatchOrder (epochs, seeded shuffle, resumable cursor) and the InFlightLimiter.
#include "replay/dispatch_order.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

namespace aha::replay {
namespace {

TEST(DispatchOrder, EachEpochIsAPermutationAndSeedsAreDeterministic) {
  DispatchOrder a(100, 42, true, 3), b(100, 42, true, 3), c(100, 43, true, 3);
  for (uint32_t e = 0; e < 3; ++e) {
    auto order = a.EpochOrder(e);
    EXPECT_EQ(order, b.EpochOrder(e));
    auto sorted = order;
    std::sort(sorted.begin(), sorted.end());
    std::vector<uint64_t> identity(100);
    std::iota(identity.begin(), identity.end(), 0);
    EXPECT_EQ(sorted, identity);
    EXPECT_NE(order, identity);
  }
  EXPECT_NE(a.EpochOrder(0), a.EpochOrder(1));  // reshuffled every epoch
  EXPECT_NE(a.EpochOrder(0), c.EpochOrder(0));  // another seed, another order
}

TEST(DispatchOrder, WithoutShuffleIsFileOrder) {
  DispatchOrder o(5, 1, false, 2);
  DispatchCursor cur;
  std::vector<uint64_t> got;
  while (auto t = o.Next(&cur)) got.push_back(*t);
  EXPECT_EQ(got, (std::vector<uint64_t>{0, 1, 2, 3, 4, 0, 1, 2, 3, 4}));
  EXPECT_TRUE(o.Exhausted(cur));
  EXPECT_EQ(o.Remaining(cur), 0u);
}

TEST(DispatchOrder, CursorResumesInTheMiddleOfAnEpoch) {
  DispatchOrder full(50, 9, true, 2);
  DispatchCursor cur;
  std::vector<uint64_t> all;
  while (auto t = full.Next(&cur)) all.push_back(*t);
  ASSERT_EQ(all.size(), 100u);
  // Stop after 37 tasks, "restart" with a fresh object and the saved cursor.
  DispatchOrder first(50, 9, true, 2);
  DispatchCursor saved;
  for (int i = 0; i < 37; ++i) first.Next(&saved);
  EXPECT_EQ(first.Remaining(saved), 63u);
  DispatchOrder second(50, 9, true, 2);
  std::vector<uint64_t> rest;
  while (auto t = second.Next(&saved)) rest.push_back(*t);
  EXPECT_EQ(rest, std::vector<uint64_t>(all.begin() + 37, all.end()));
}

TEST(DispatchOrder, ZeroEpochsCyclesForever) {
  DispatchOrder o(3, 1, true, 0);
  DispatchCursor cur;
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(o.Next(&cur).has_value());
  EXPECT_EQ(cur.epoch, 333u);
  EXPECT_FALSE(o.Exhausted(cur));
}

TEST(DispatchOrder, ShuffleIsUniformOverManySeeds) {
  // Where task 0 lands in a 10-task epoch, over 20,000 seeds: each slot ~2000 times.
  const int kSeeds = 20000, kN = 10;
  std::vector<int> slot(kN, 0);
  for (int s = 0; s < kSeeds; ++s) {
    auto order = DispatchOrder(kN, s, true, 1).EpochOrder(0);
    slot[std::find(order.begin(), order.end(), 0u) - order.begin()]++;
  }
  double chi2 = 0, expected = double(kSeeds) / kN;
  for (int c : slot) chi2 += (c - expected) * (c - expected) / expected;
  EXPECT_LT(chi2, 27.9);  // chi-square, 9 degrees of freedom, p = 0.001
}

TEST(DispatchOrder, EmptyDatasetIsExhausted) {
  DispatchOrder o(0, 1, true, 0);
  DispatchCursor cur;
  EXPECT_FALSE(o.Next(&cur).has_value());
}

TEST(InFlightLimiter, GrantsUpToTheBoundAndNothingBeyond) {
  InFlightLimiter l(InFlightLimiter::DefaultBound(/*max_staleness=*/1, /*groups_per_step=*/4));
  EXPECT_EQ(l.bound(), 8u);
  EXPECT_EQ(l.Grant(3, 0), 3u);
  EXPECT_EQ(l.Grant(10, 5), 3u);
  EXPECT_EQ(l.Grant(10, 8), 0u);
  EXPECT_EQ(l.Grant(10, 9), 0u);
  EXPECT_EQ(InFlightLimiter(InFlightLimiter::DefaultBound(0, 4)).bound(), 4u);  // strictly on-policy
}

}  // namespace
}  // namespace aha::replay
