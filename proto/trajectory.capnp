# Trajectories: one sampled completion of one task, and its scored form.
#
# Flow: aha-actor --Trajectory--> aha-rewardd --ScoredTrajectory--> aha-replay, both hops over the
# reliable channel (common/transport.h). The idempotency key of both is "groupId/sampleIndex", so a
# resend never stores a sample twice.
@0xf0835e5bff6afd2d;
using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("aha::proto");
using Task = import "task.capnp".Task;

enum FinishReason {
  stop @0;    # EOS or a stop string
  length @1;  # hit max new tokens
  abort @2;   # actor shut down or lease expired mid-generation
}

# Weights can change while a sequence is being decoded (in-flight update): tokens from
# startToken up to the next span's startToken were sampled with policy `version`.
struct VersionSpan {
  startToken @0 :UInt32;
  version @1 :UInt64;
}

struct Timings {
  queuedMs @0 :Float32;
  prefillMs @1 :Float32;
  decodeMs @2 :Float32;
}

struct Trajectory {
  schemaVersion @0 :UInt16 = 1;
  groupId @1 :Text;
  sampleIndex @2 :UInt32;
  groupSize @3 :UInt32;
  leaseId @4 :UInt64;
  task @5 :Task;
  promptTokens @6 :List(UInt32);
  completionTokens @7 :List(UInt32);
  completionText @8 :Text;
  behaviourLogprobs @9 :List(Float32);  # one per completion token, at the sampling temperature
  versionSpans @10 :List(VersionSpan);  # per-token policy versions, run-length coded
  finishReason @11 :FinishReason;
  actorId @12 :Text;
  timings @13 :Timings;
  temperature @14 :Float32;
}

struct RewardComponent {
  name @0 :Text;     # format, accuracy, countdown, arith, language, code, overlong, ...
  score @1 :Float32; # unweighted score of this function
  weight @2 :Float32;
  note @3 :Text;     # short verifier note ("boxed answer 12 != 13")
}

struct ScoredTrajectory {
  schemaVersion @0 :UInt16 = 1;
  trajectory @1 :Trajectory;
  reward @2 :Float32;            # sum of weight * score over components
  components @3 :List(RewardComponent);
  answerExtracted @4 :Text;
  correct @5 :Bool;              # the task's verifier accepted the answer
}
