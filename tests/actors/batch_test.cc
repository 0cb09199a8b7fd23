// The actor's batch size and lease size (actors/actor_daemon.h): regressions from the GPU runs of
// issue 11, where a 32-row batch idled the H200 and a two-step lease had half its groups dropped
// as stale.
#include "actors/actor_daemon.h"

#include <gtest/gtest.h>

namespace aha {
namespace {

TEST(ActorBatchSize, FlagThenJobThenDevice) {
  EXPECT_EQ(ActorBatchSize(0, 0, /*gpu=*/true), 256);
  EXPECT_EQ(ActorBatchSize(0, 0, /*gpu=*/false), 32);
  EXPECT_EQ(ActorBatchSize(0, 64, true), 64);
  EXPECT_EQ(ActorBatchSize(8, 64, true), 8);
  EXPECT_EQ(ActorBatchSize(8, 0, false), 8);
}

TEST(LeaseTasks, AtMostMaxStalenessStepsOfPrompts) {
  // The 0.5B pipeline: 256 rows, groups of 16, 8 prompts per step; at max_staleness 1 -> 8, not 16.
  EXPECT_EQ(LeaseTasks(256, 16, 8, 1), 8);
  // At max_staleness 2 both steps' prompts fill the batch; at 4 the batch is the cap.
  EXPECT_EQ(LeaseTasks(256, 16, 8, 2), 16);
  EXPECT_EQ(LeaseTasks(256, 16, 8, 4), 16);
  // small-gpu: 256 rows hold exactly one step of 16 x 16.
  EXPECT_EQ(LeaseTasks(256, 16, 16, 1), 16);
  // tiny-cpu: 32 rows, groups of 8 -> 4 prompts, under a step of 8.
  EXPECT_EQ(LeaseTasks(32, 8, 8, 1), 4);
  // A group larger than the batch still leases one prompt (the generator queues its rows).
  EXPECT_EQ(LeaseTasks(8, 16, 8, 1), 1);
  // A bound of 0 (only the current version's samples) still leases up to one step.
  EXPECT_EQ(LeaseTasks(256, 16, 8, 0), 8);
}

}  // namespace
}  // namespace aha
