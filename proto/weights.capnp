# Weight publication: aha-learner -> aha-actor.
#
# The learner casts its fp32 master weights to the actors' dtype in one flat buffer. On GPUs the
# bytes go by ncclBroadcast and only WeightsAnnounce crosses ZeroMQ; on CPU the actor pulls them:
# WeightsRequest{chunkIndex = -1} -> WeightsAnnounce of the newest version, then
# WeightsRequest{version, chunkIndex = i} -> WeightsChunk i, over the learner's weights socket
# (request/reply). An actor swaps in a version only when every byte of it has arrived and the
# checksum matches.
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
  checksum @6 :UInt64;    # FNV-1a 64 of the flat buffer
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
