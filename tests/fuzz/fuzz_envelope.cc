// Fuzz target: the wire decoder (common/wire.h) on arbitrary bytes, then a full read of whatever
// body decoded, as a receiver would. Must never crash, hang or leak; kj::Exception on bad text is
// the documented, caught outcome.
#include <cstddef>
#include <cstdint>

#include "common/nccl_membership.h"
#include "common/wire.h"

namespace {

template <typename List>
uint64_t SumList(List l) {
  uint64_t s = 0;
  for (auto x : l) s += static_cast<uint64_t>(x);
  return s;
}

uint64_t ReadTask(aha::proto::Task::Reader t) {
  uint64_t s = t.getId().size() + t.getPrompt().size() + t.getAnswer().size() + t.getMetadata().size();
  for (auto c : t.getTests()) s += c.getStdin().size() + c.getExpectedStdout().size();
  return s + SumList(t.getNumbers()) + static_cast<uint64_t>(t.getKind());
}

uint64_t ReadTrajectory(aha::proto::Trajectory::Reader t) {
  uint64_t s = t.getGroupId().size() + t.getCompletionText().size() + t.getActorId().size();
  s += ReadTask(t.getTask()) + SumList(t.getPromptTokens()) + SumList(t.getCompletionTokens());
  for (float f : t.getBehaviourLogprobs()) s += static_cast<uint64_t>(f != 0);
  for (auto v : t.getVersionSpans()) s += v.getVersion();
  return s;
}

uint64_t ReadScored(aha::proto::ScoredTrajectory::Reader t) {
  uint64_t s = ReadTrajectory(t.getTrajectory());
  for (auto c : t.getComponents()) s += c.getName().size() + c.getNote().size();
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  aha::MalformedReason why;
  auto env = aha::DecodeEnvelope(data, size, aha::WireLimits{}, &why);
  if (!env.ok()) return 0;
  using B = aha::proto::Envelope::Body;
  uint64_t sink = 0;
  try {
    auto root = (*env)->root();
    auto body = root.getBody();
    sink += root.getKey().size() + root.getSender().size();
    switch (body.which()) {
      case B::TASK: sink += ReadTask(body.getTask()); break;
      case B::TRAJECTORY: sink += ReadTrajectory(body.getTrajectory()); break;
      case B::SCORED_TRAJECTORY: sink += ReadScored(body.getScoredTrajectory()); break;
      case B::PROMPT_LEASE:
        for (auto t : body.getPromptLease().getTasks()) sink += ReadTask(t.getTask()) + t.getGroupId().size();
        break;
      case B::BATCH:
        for (auto g : body.getBatch().getGroups())
          for (auto s : g.getSamples()) sink += ReadScored(s);
        break;
      case B::ACK:
        for (auto a : body.getAck().getEntries()) sink += a.getSequence() + a.getReason().size();
        break;
      case B::WEIGHTS_ANNOUNCE:
        for (auto t : body.getWeightsAnnounce().getTensors()) sink += t.getName().size() + SumList(t.getShape());
        break;
      case B::WEIGHTS_CHUNK: sink += body.getWeightsChunk().getData().size(); break;
      case B::CONTROL_REPLY: sink += body.getControlReply().getError().size(); break;
      case B::NCCL_REQUEST: {
        auto s = aha::ReadNcclRequest(body.getNcclRequest());
        if (s.ok()) sink += s->actor_id.size() + s->epoch;
        break;
      }
      case B::NCCL_REPLY: {
        auto a = aha::ReadNcclReply(body.getNcclReply());
        if (a.ok()) sink += a->nccl_id.size() + a->bytes;
        break;
      }
      default: break;
    }
  } catch (const kj::Exception&) {
  }
  // Keep the reads from being optimised away.
  return sink == 0x5eed5eed5eed5eedull ? 1 : 0;
}
