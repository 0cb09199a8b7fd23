# The envelope: every ZeroMQ frame aha sends is exactly one Envelope message in Cap'n Proto's
# standard (unpacked) serialisation, segment table first.
#
# Decoding (common/wire.h) treats the bytes as untrusted: the frame size is capped before parsing,
# the reader's traversal limit and nesting limit are set explicitly, `magic` rejects bytes that only
# happen to parse, `schemaVersion` rejects peers of another wire version, and the union tag says which
# body it holds; a receiver that expects another body counts the frame as "schema".
#
# Reliable channel (common/transport.h): the sender stamps `sequence` (unique per sender incarnation)
# and `key` (the application's idempotency key); the receiver answers with an Ack carrying the
# sequences it has handled durably.
@0xf68230d298b6a71b;
using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("aha::proto");
using T = import "task.capnp";
using Tr = import "trajectory.capnp";
using B = import "batch.capnp";
using W = import "weights.capnp";
using C = import "control.capnp";

const kMagic :UInt32 = 0x31414841;   # "AHA1" little-endian
const kWireVersion :UInt16 = 1;

enum AckOutcome {
  handled @0;    # durable (or forwarded and acknowledged downstream)
  rejected @1;   # will never be accepted (bad group, oversized, ...): do not resend
}

struct AckEntry {
  sequence @0 :UInt64;
  outcome @1 :AckOutcome;
  reason @2 :Text;
}

struct Ack {
  schemaVersion @0 :UInt16 = 1;
  entries @1 :List(AckEntry);
}

struct ErrorReply {
  schemaVersion @0 :UInt16 = 1;
  message @1 :Text;
}

struct Envelope {
  magic @0 :UInt32;
  schemaVersion @1 :UInt16;
  sender @2 :Text;          # process name and role, for logs
  sequence @3 :UInt64;      # reliable channel / request id
  key @4 :Text;             # idempotency key (reliable channel)
  sentUnixNs @5 :Int64;
  body :union {
    empty @6 :Void;
    ack @7 :Ack;
    error @8 :ErrorReply;
    task @9 :T.Task;
    leaseRequest @10 :T.LeaseRequest;
    promptLease @11 :T.PromptLease;
    trajectory @12 :Tr.Trajectory;
    scoredTrajectory @13 :Tr.ScoredTrajectory;
    batchRequest @14 :B.BatchRequest;
    batch @15 :B.Batch;
    weightsAnnounce @16 :W.WeightsAnnounce;
    weightsChunk @17 :W.WeightsChunk;
    controlRequest @18 :C.ControlRequest;
    controlReply @19 :C.ControlReply;
    blob @20 :Data;         # opaque payload (tests, benchmarks)
    weightsRequest @21 :W.WeightsRequest;
    ncclRequest @22 :W.NcclRequest;
    ncclReply @23 :W.NcclReply;
  }
}
