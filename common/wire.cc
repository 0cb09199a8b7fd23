#include "common/wire.h"

#include <capnp/any.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>

namespace aha {

namespace {

// Reads every pointer of the message, without its schema (as totalSize() does, but through the
// readers that count what they read), so that each list is charged to the reader's traversal limit.
// totalSize() does not charge the elements of a list of zero-sized structs: a frame of a few hundred
// bytes can claim 2^29 of them, which Cap'n Proto counts against the limit only when the list is
// read (its amplification guard), and a receiver iterating them would spin for seconds. Here such a
// list exceeds the frame's budget and throws. Recursion is bounded by the reader's nesting limit.
void ReadPointers(capnp::AnyStruct::Reader s);
void ReadPointer(capnp::AnyPointer::Reader p) {
  if (p.getPointerType() == capnp::PointerType::STRUCT) {
    ReadPointers(p.getAs<capnp::AnyStruct>());
  } else if (p.getPointerType() == capnp::PointerType::LIST) {
    auto list = p.getAs<capnp::AnyList>();
    if (list.getElementSize() == capnp::ElementSize::INLINE_COMPOSITE) {
      for (auto e : list.as<capnp::List<capnp::AnyStruct>>()) ReadPointers(e);
    } else if (list.getElementSize() == capnp::ElementSize::POINTER) {
      for (auto e : list.as<capnp::List<capnp::AnyPointer>>()) ReadPointer(e);
    }
  }
}
void ReadPointers(capnp::AnyStruct::Reader s) {
  for (auto p : s.getPointerSection()) ReadPointer(p);
}

}  // namespace

const char* MalformedReasonName(MalformedReason r) {
  switch (r) {
    case MalformedReason::kOversized: return "oversized";
    case MalformedReason::kTruncated: return "truncated";
    case MalformedReason::kDecode: return "decode";
    case MalformedReason::kMagic: return "magic";
    case MalformedReason::kVersion: return "version";
    case MalformedReason::kSchema: return "schema";
  }
  return "unknown";
}

WireStats::WireStats(prometheus::Registry* registry) {
  if (!registry) return;
  auto& family = prometheus::BuildCounter()
                     .Name("aha_malformed_messages_total")
                     .Help("Frames dropped because they failed to decode, by reason")
                     .Register(*registry);
  for (int i = 0; i < 6; ++i)
    counters_[i] = &family.Add({{"reason", MalformedReasonName(static_cast<MalformedReason>(i))}});
}

void WireStats::CountMalformed(MalformedReason reason, const std::string& peer,
                               const std::string& detail) {
  int i = static_cast<int>(reason);
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  if (counters_[i]) counters_[i]->Increment();
  std::lock_guard<std::mutex> lock(mu_);
  std::string tag = peer + "/" + MalformedReasonName(reason);
  if (logged_.size() < 4096 && logged_.insert(tag).second)
    spdlog::warn("dropped malformed frame from {} ({}): {} (logged once per peer and reason)", peer,
                 MalformedReasonName(reason), detail);
}

uint64_t WireStats::malformed(MalformedReason reason) const {
  return counts_[static_cast<int>(reason)].load(std::memory_order_relaxed);
}

uint64_t WireStats::malformed_total() const {
  uint64_t n = 0;
  for (const auto& c : counts_) n += c.load(std::memory_order_relaxed);
  return n;
}

Result<std::unique_ptr<DecodedEnvelope>> DecodeEnvelope(const void* data, size_t size,
                                                        const WireLimits& limits,
                                                        MalformedReason* why,
                                                        std::shared_ptr<void> owner) {
  auto fail = [&](MalformedReason r, std::string msg) -> Status {
    *why = r;
    return InvalidArgument(std::move(msg));
  };
  if (size > limits.max_frame_bytes)
    return fail(MalformedReason::kOversized, "frame of " + std::to_string(size) + " bytes exceeds " +
                                                 std::to_string(limits.max_frame_bytes));
  if (size < 8 || size % 8 != 0)
    return fail(MalformedReason::kTruncated, "frame of " + std::to_string(size) +
                                                 " bytes is not a whole number of words");
  const auto* bytes = static_cast<const uint8_t*>(data);
  uint32_t first;
  std::memcpy(&first, bytes, 4);
  uint64_t segments = uint64_t(first) + 1;
  // Cap'n Proto itself refuses more than 512 segments; refuse before reading the table.
  if (segments > 512) return fail(MalformedReason::kDecode, "segment table claims too many segments");
  uint64_t header_bytes = (4 + 4 * segments + 7) / 8 * 8;
  if (header_bytes > size) return fail(MalformedReason::kTruncated, "segment table is cut off");
  uint64_t body_words = 0;
  for (uint64_t s = 0; s < segments; ++s) {
    uint32_t w;
    std::memcpy(&w, bytes + 4 + 4 * s, 4);
    body_words += w;
  }
  if (header_bytes + body_words * 8 > size)
    return fail(MalformedReason::kTruncated, "frame is shorter than its segment table says");
  if (header_bytes + body_words * 8 < size)
    return fail(MalformedReason::kDecode, "trailing bytes after the last segment");

  auto env = std::unique_ptr<DecodedEnvelope>(new DecodedEnvelope());
  env->frame_bytes_ = size;
  kj::ArrayPtr<const capnp::word> words;
  if (owner && reinterpret_cast<uintptr_t>(data) % alignof(capnp::word) == 0) {
    env->owner_ = std::move(owner);
    words = kj::ArrayPtr<const capnp::word>(static_cast<const capnp::word*>(data), size / 8);
  } else {
    env->words_ = kj::heapArray<capnp::word>(size / 8);  // Cap'n Proto reads aligned words only
    std::memcpy(env->words_.begin(), data, size);
    words = env->words_.asPtr();
  }
  try {
    capnp::ReaderOptions options;
    // A valid message is read about twice below (totalSize, then every pointer), about its own size
    // each time; the slack allows tiny messages.
    options.traversalLimitInWords = size / 8 * 4 + 1024;
    options.nestingLimit = limits.nesting_limit;
    capnp::FlatArrayMessageReader check_reader(words, options);
    auto root = check_reader.getRoot<proto::Envelope>();
    (void)root.totalSize();  // traverses every pointer: bounds, nesting and traversal limits
    if (root.getMagic() != proto::K_MAGIC)
      return fail(MalformedReason::kMagic, "bad magic number");
    if (root.getSchemaVersion() != proto::K_WIRE_VERSION)
      return fail(MalformedReason::kVersion,
                  "wire version " + std::to_string(root.getSchemaVersion()) + ", expected " +
                      std::to_string(proto::K_WIRE_VERSION));
    // Every list read once against the frame's budget: an amplified list throws here.
    ReadPointers(check_reader.getRoot<capnp::AnyStruct>());
    // The app's reader: the message was fully validated above, so reads are no longer counted
    // against a traversal budget that repeated field access could exhaust.
    capnp::ReaderOptions app_options;
    app_options.traversalLimitInWords = UINT64_MAX / 2;
    app_options.nestingLimit = limits.nesting_limit;
    env->reader_ = std::make_unique<capnp::FlatArrayMessageReader>(words, app_options);
    env->root_ = env->reader_->getRoot<proto::Envelope>();
  } catch (const kj::Exception& e) {
    return fail(MalformedReason::kDecode, e.getDescription().cStr());
  }
  return env;
}

proto::Envelope::Builder InitEnvelope(capnp::MessageBuilder& message, const std::string& sender) {
  auto env = message.initRoot<proto::Envelope>();
  env.setMagic(proto::K_MAGIC);
  env.setSchemaVersion(proto::K_WIRE_VERSION);
  env.setSender(sender);
  env.setSentUnixNs(UnixNanos());
  return env;
}

kj::Array<capnp::word> EncodeFrame(capnp::MessageBuilder& message) {
  return capnp::messageToFlatArray(message);
}

BodyKinds::BodyKinds(std::initializer_list<proto::Envelope::Body::Which> kinds) {
  for (auto k : kinds) mask_ |= uint64_t(1) << static_cast<unsigned>(k);
}

bool BodyKinds::Accepts(proto::Envelope::Body::Which w) const {
  unsigned k = static_cast<unsigned>(w);
  return k < 64 && (mask_ >> k) & 1;
}

int64_t UnixNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace aha
