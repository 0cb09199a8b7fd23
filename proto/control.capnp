# Control plane: every daemon serves ControlRequest on its control socket (request/reply).
#
# Flow: `aha status|stop|pause|resume|checkpoint` (or the orchestrator) -> daemon -> ControlReply.
# The status body is typed: common fields for every process plus one per-process section.
@0xb80301e7e70df3e1;
using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("aha::proto");

enum ControlCommand {
  status @0;
  pause @1;
  resume @2;
  stop @3;
  checkpoint @4;
}

struct ControlRequest {
  schemaVersion @0 :UInt16 = 1;
  command @1 :ControlCommand;
  argument @2 :Text;      # checkpoint: target directory ("" = the process default)
}

enum ProcessState {
  starting @0;
  running @1;
  paused @2;
  stopping @3;
}

struct ReplayStatus {
  tasksQueued @0 :UInt64;
  leasesActive @1 :UInt64;
  groupsIncomplete @2 :UInt64;
  groupsComplete @3 :UInt64;
  groupsServed @4 :UInt64;
  diskBytes @5 :UInt64;
  learnerVersion @6 :UInt64;
  epoch @7 :UInt32;
}

struct ActorStatus {
  tokensPerSecond @0 :Float64;
  samplesPerSecond @1 :Float64;
  activeSequences @2 :UInt32;
  outboxDepth @3 :UInt32;
}

struct RewarddStatus {
  scoredPerSecond @0 :Float64;
  inFlight @1 :UInt32;
  workers @2 :UInt32;
  outboxDepth @3 :UInt32;
}

struct LearnerStatus {
  step @0 :UInt64;
  totalSteps @1 :UInt64;
  stage @2 :Text;
  tokensPerSecond @3 :Float64;
  lastLoss @4 :Float64;
  lastReward @5 :Float64;
}

struct ProcessStatus {
  process @0 :Text;       # aha-replay, aha-actor, ...
  roleIndex @1 :UInt32;
  pid @2 :UInt32;
  state @3 :ProcessState;
  uptimeSeconds @4 :Float64;
  policyVersion @5 :UInt64;
  version @6 :Text;       # build version and git revision
  detail :union {
    none @7 :Void;
    replay @8 :ReplayStatus;
    actor @9 :ActorStatus;
    rewardd @10 :RewarddStatus;
    learner @11 :LearnerStatus;
  }
}

struct ControlReply {
  schemaVersion @0 :UInt16 = 1;
  ok @1 :Bool;
  error @2 :Text;         # one line when ok is false
  status @3 :ProcessStatus;
  result @4 :Text;        # checkpoint: the directory written
}
