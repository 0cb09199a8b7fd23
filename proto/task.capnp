# Tasks and prompt leases.
#
# Flow: aha-replay holds the prompt dataset (one Task per JSONL record, docs/data.md). An actor sends
# a LeaseRequest to replay (request/reply); replay answers with a PromptLease: up to N tasks and a
# deadline. A group that is not complete by the deadline goes back to replay's queue, and samples
# that arrive for an expired lease are dropped and counted.
@0xa6bac4457894deec;
using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("aha::proto");

enum TaskKind {
  math @0;
  countdown @1;
  arith @2;
  code @3;
  other @4;
}

struct CodeTest {
  stdin @0 :Text;
  expectedStdout @1 :Text;
}

struct Task {
  schemaVersion @0 :UInt16 = 1;
  id @1 :Text;              # dataset record id, unique within the dataset
  kind @2 :TaskKind;
  prompt @3 :Text;          # the question, before the job's prompt template is applied
  answer @4 :Text;          # reference answer (gold), "" when the task has none
  tests @5 :List(CodeTest); # code tasks only
  language @6 :Text;        # code tasks: python|cpp
  numbers @7 :List(Int64);  # countdown: the numbers to use
  target @8 :Int64;         # countdown: the target
  metadata @9 :Text;        # free JSON object, passed through untouched
}

struct LeaseRequest {
  schemaVersion @0 :UInt16 = 1;
  actorId @1 :Text;
  maxTasks @2 :UInt32;      # replay may hand out fewer (rate limiter, end of data)
  policyVersion @3 :UInt64; # the actor's current weights
  requestId @4 :UInt64;     # a retried request (same actorId and requestId) gets the same lease
}

struct LeasedTask {
  groupId @0 :Text;         # one group of G samples per leased task
  task @1 :Task;
  groupSize @2 :UInt32;
}

struct PromptLease {
  schemaVersion @0 :UInt16 = 1;
  leaseId @1 :UInt64;
  tasks @2 :List(LeasedTask);
  deadlineUnixMs @3 :Int64;
  policyVersion @4 :UInt64;  # learner version known to replay at dispatch
  retryAfterMs @5 :UInt32;   # when tasks is empty: how long to wait before asking again
  finished @6 :Bool;         # no more prompts will ever be handed out for this job
}
