# Weight publication: aha-learner -> aha-actor.
#
# The learner casts its fp32 master weights to the actors' dtype in one flat buffer. Two paths share
# the learner's weights socket (request/reply):
#  - ZeroMQ (CPU actors, or a learner without NCCL): the actor pulls.
#    WeightsRequest{chunkIndex = -1} -> WeightsAnnounce of the newest version, then
#    WeightsRequest{version, chunkIndex = i} -> WeightsChunk i. An actor swaps in a version only when
#    every byte of it has arrived and the checksum matches.
#  - NCCL (GPU actors): only control crosses ZeroMQ. An actor sends NcclRequest (its whole state)
#    every poll interval; the NcclReply says which communicator it belongs to (epoch, hex
#    ncclUniqueId, rank) and which broadcast to take part in; the bf16 bytes go by ncclBroadcast from
#    the learner (rank 0). common/nccl_membership.h specifies the exchange.
@0xc09225043b95b7e6;
using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("aha::proto");

enum DType {
  f32 @0;
  bf16 @1;
  i32 @2;
}

struct TensorEntry {
  name @0 :Text;          # Hugging Face tensor name
  shape @1 :List(UInt64);
  offset @2 :UInt64;      # byte offset in the flat buffer
}

struct WeightsAnnounce {
  schemaVersion @0 :UInt16 = 1;
  version @1 :UInt64;
  dtype @2 :DType;
  totalBytes @3 :UInt64;
  tensors @4 :List(TensorEntry);
  chunkBytes @5 :UInt64;  # size of every WeightsChunk but the last (CPU path)
  checksum @6 :UInt64;    # WeightsChecksum (common/weight_sync.h) of the flat buffer
}

struct WeightsChunk {
  schemaVersion @0 :UInt16 = 1;
  version @1 :UInt64;
  index @2 :UInt32;
  data @3 :Data;
}

struct WeightsRequest {
  schemaVersion @0 :UInt16 = 1;
  haveVersion @1 :UInt64;  # the asker's current version
  version @2 :UInt64;      # chunk requests: the version being fetched
  chunkIndex @3 :Int64;    # -1: announce the newest version; >= 0: that chunk of `version`
}

# NCCL path: an actor's state, sent every poll interval (it doubles as the join request).
struct NcclRequest {
  schemaVersion @0 :UInt16 = 1;
  actorId @1 :Text;
  incarnation @2 :UInt64;   # random per actor process: a restarted actor is a new member
  sequence @3 :UInt64;      # increases per request of one incarnation; older ones are ignored
  device @4 :Int32;         # the actor's CUDA device index (logs)
  epoch @5 :UInt64;         # communicator the actor has joined; 0 = none (asks to join)
  received @6 :UInt64;      # last broadcast of that epoch it received whole
  failedEpoch @7 :UInt64;   # last epoch whose join or broadcast failed on its side (0 = none)
  leave @8 :Bool;           # stopping: leave now rather than be timed out
  gpu @9 :Text;             # "host/PCI bus id" of its GPU: NCCL needs a GPU of its own per rank
}

# The learner's answer: where the actor should be.
struct NcclReply {
  schemaVersion @0 :UInt16 = 1;
  enabled @1 :Bool;         # false: this learner publishes over ZeroMQ only (pull WeightsRequest)
  learner @2 :UInt64;       # learner incarnation: a change means every communicator is gone
  epoch @3 :UInt64;         # communicator to be in; 0 = none yet (stay registered, keep polling)
  ncclId @4 :Text;          # hex ncclUniqueId of that epoch
  rank @5 :UInt32;
  nranks @6 :UInt32;
  broadcast @7 :UInt64;     # newest broadcast of the epoch (numbered from 1; 0 = none yet)
  version @8 :UInt64;       # policy version that broadcast carries
  bytes @9 :UInt64;         # size of every broadcast: the flat buffer
  dtype @10 :DType;         # of the flat buffer (bf16)
  reason @11 :Text;         # with enabled = false: why this actor should pull over ZeroMQ
}
