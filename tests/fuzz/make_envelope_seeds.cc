// Writes valid envelopes of every body kind into a folder: the seed corpus of fuzz_envelope.
#include <fstream>
#include <string>

#include "common/wire.h"

static void Write(const std::string& dir, const std::string& name, capnp::MallocMessageBuilder& m) {
  auto w = aha::EncodeFrame(m);
  std::ofstream(dir + "/" + name, std::ios::binary).write(reinterpret_cast<const char*>(w.begin()), w.size() * 8);
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  std::string dir = argv[1];
  {
    capnp::MallocMessageBuilder m;
    auto s = aha::InitEnvelope(m, "seed").getBody().initScoredTrajectory();
    auto t = s.initTrajectory();
    t.setGroupId("g");
    auto task = t.initTask();
    task.setPrompt("What is 2+2?");
    task.initTests(2)[1].setStdin("1 2");
    task.initNumbers(3).set(2, 7);
    t.initCompletionTokens(5).set(4, 9);
    t.initBehaviourLogprobs(5).set(4, -1.5f);
    t.initVersionSpans(2)[1].setVersion(2);
    s.initComponents(2)[0].setName("accuracy");
    Write(dir, "scored", m);
  }
  {
    capnp::MallocMessageBuilder m;
    auto b = aha::InitEnvelope(m, "seed").getBody().initBatch();
    auto g = b.initGroups(2);
    g[0].initSamples(2)[1].initTrajectory().setCompletionText("<answer>4</answer>");
    Write(dir, "batch", m);
  }
  {
    capnp::MallocMessageBuilder m;
    auto a = aha::InitEnvelope(m, "seed").getBody().initAck().initEntries(3);
    a[2].setReason("no such group");
    Write(dir, "ack", m);
  }
  {
    capnp::MallocMessageBuilder m;
    auto l = aha::InitEnvelope(m, "seed").getBody().initPromptLease().initTasks(2);
    l[0].initTask().setAnswer("12");
    Write(dir, "lease", m);
  }
  {
    capnp::MallocMessageBuilder m;
    auto w = aha::InitEnvelope(m, "seed").getBody().initWeightsAnnounce().initTensors(1);
    w[0].setName("model.embed_tokens.weight");
    w[0].initShape(2).set(1, 64);
    Write(dir, "weights", m);
  }
  {
    capnp::MallocMessageBuilder m;
    auto r = aha::InitEnvelope(m, "seed").getBody().initNcclRequest();
    r.setActorId("actor-0");
    r.setIncarnation(7);
    r.setSequence(3);
    r.setEpoch(2);
    Write(dir, "nccl_request", m);
  }
  {
    capnp::MallocMessageBuilder m;
    auto r = aha::InitEnvelope(m, "seed").getBody().initNcclReply();
    r.setEnabled(true);
    r.setEpoch(2);
    r.setNcclId("00ff");
    r.setRank(1);
    r.setNranks(2);
    r.setBytes(4096);
    Write(dir, "nccl_reply", m);
  }
  return 0;
}
