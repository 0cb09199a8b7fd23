# Training batches: aha-learner asks aha-replay for complete groups.
#
# Flow: learner --BatchRequest--> replay (request/reply) --Batch--> learner. Replay serves only
# groups with learnerVersion - version <= max_staleness, each group exactly once.
@0xd7022d5ca4795608;
using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("aha::proto");
using ScoredTrajectory = import "trajectory.capnp".ScoredTrajectory;

struct BatchRequest {
  schemaVersion @0 :UInt16 = 1;
  learnerVersion @1 :UInt64;
  numGroups @2 :UInt32;
  requestId @3 :UInt64;    # a retried request with the same id gets the same groups again
}

struct Group {
  groupId @0 :Text;
  samples @1 :List(ScoredTrajectory);
  minVersion @2 :UInt64;   # oldest policy version of any token in the group
}

struct Batch {
  schemaVersion @0 :UInt16 = 1;
  requestId @1 :UInt64;
  groups @2 :List(Group);
  retryAfterMs @3 :UInt32; # when fewer than asked are ready
  finished @4 :Bool;       # the dataset is exhausted and nothing is in flight
  droppedStale @5 :UInt32; # groups dropped since the last batch for exceeding max_staleness
}
