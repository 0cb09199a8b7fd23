// Wire format: one ZeroMQ frame = one proto::Envelope (proto/envelope.capnp) in Cap'n Proto's
// standard unpacked serialisation.
//
// Frame layout (Cap'n Proto's): u32 segment_count-1, u32 size of each segment in words, padding to
// a word, then the segments. Frames are a whole number of 8-byte words.
//
// Bytes off the wire are untrusted. DecodeEnvelope() checks, in this order, and names the first
// failure as the reason counted in aha_malformed_messages_total{reason}:
//   oversized  frame larger than WireLimits::max_frame_bytes (stops memory exhaustion)
//   truncated  not a whole number of words, or shorter than its segment table says
//   decode     a segment table or pointer Cap'n Proto rejects (out-of-bounds pointers, too deep
//              nesting, traversal beyond the limit: stops amplification and stack exhaustion)
//   magic      parses, but is not an aha envelope (random bytes that happen to parse)
//   version    an aha envelope of another wire version
//   schema     a body this receiver does not accept (checked by the receiver, see Accepts())
// The whole message is traversed at decode time (totalSize(), then every pointer read through the
// counting readers, so that a list of zero-sized structs claiming 2^29 elements in a few bytes is
// charged to the traversal limit and rejected as "decode"), so a DecodedEnvelope that was returned
// has only in-bounds pointers and no list longer than its bytes allow; the app may still hit a
// kj::Exception on bad text (missing NUL), which the transport catches and counts as "decode".
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/registry.h>

#include "common/status.h"
#include "proto/envelope.capnp.h"

namespace aha {

struct WireLimits {
  // 256 MiB: large enough for a 0.5B-model weight chunk or a big batch, small enough that a
  // hostile peer cannot make a daemon allocate without bound.
  size_t max_frame_bytes = 256u << 20;
  // Cap'n Proto nesting limit: our deepest path (Batch > Group > ScoredTrajectory > Trajectory >
  // Task > CodeTest) is 7 levels; 16 leaves room and stops stack-exhaustion attacks.
  int nesting_limit = 16;
};

enum class MalformedReason { kOversized, kTruncated, kDecode, kMagic, kVersion, kSchema };
const char* MalformedReasonName(MalformedReason r);

// Counts malformed frames per reason, in Prometheus (when given a registry) and locally.
// Logs at most once per (peer, reason). Thread-safe.
class WireStats {
 public:
  explicit WireStats(prometheus::Registry* registry = nullptr);
  void CountMalformed(MalformedReason reason, const std::string& peer, const std::string& detail);
  uint64_t malformed(MalformedReason reason) const;
  uint64_t malformed_total() const;

 private:
  std::atomic<uint64_t> counts_[6] = {};
  prometheus::Counter* counters_[6] = {};
  std::mutex mu_;
  std::set<std::string> logged_;
};

// A decoded, validated envelope. Owns its (word-aligned) bytes.
class DecodedEnvelope {
 public:
  proto::Envelope::Reader root() const { return root_; }
  proto::Envelope::Body::Which which() const { return root_.getBody().which(); }
  size_t frame_bytes() const { return frame_bytes_; }

 private:
  friend Result<std::unique_ptr<DecodedEnvelope>> DecodeEnvelope(const void*, size_t,
                                                                  const WireLimits&,
                                                                  MalformedReason*,
                                                                  std::shared_ptr<void>);
  kj::Array<capnp::word> words_;   // an aligned copy, or empty when the bytes were used in place
  std::shared_ptr<void> owner_;    // keeps bytes used in place alive
  size_t frame_bytes_ = 0;
  std::unique_ptr<capnp::FlatArrayMessageReader> reader_;
  proto::Envelope::Reader root_;
};

// Decodes and validates a frame. On failure returns InvalidArgument and sets *why.
// With an `owner` that keeps `data` alive and word-aligned data, the bytes are read in place;
// otherwise they are copied into an aligned buffer.
Result<std::unique_ptr<DecodedEnvelope>> DecodeEnvelope(const void* data, size_t size,
                                                        const WireLimits& limits,
                                                        MalformedReason* why,
                                                        std::shared_ptr<void> owner = nullptr);

// Starts an envelope: magic, wire version, sender and send time filled in; set the body and
// (for reliable sends the transport does it) sequence and key.
proto::Envelope::Builder InitEnvelope(capnp::MessageBuilder& message, const std::string& sender);

// Serialises a message into a frame.
kj::Array<capnp::word> EncodeFrame(capnp::MessageBuilder& message);

// The set of body kinds a receiver accepts; anything else is counted as "schema".
class BodyKinds {
 public:
  BodyKinds(std::initializer_list<proto::Envelope::Body::Which> kinds);
  bool Accepts(proto::Envelope::Body::Which w) const;

 private:
  uint64_t mask_ = 0;
};

int64_t UnixNanos();

}  // namespace aha
