// Transport benchmark: trajectory-sized messages (1,024 prompt+completion tokens with log-probs)
// over loopback through the reliable channel (encode, send, decode, validate, ack), beside raw
// ZeroMQ PUSH/PULL of the same bytes with no reliability, in the same run.
//   transport_bench [--messages N] [--prompt-tokens P] [--completion-tokens C]
#include <chrono>
#include <cstdio>
#include <thread>

#include "common/flags.h"
#include "common/transport.h"

using namespace aha;
using namespace std::chrono_literals;

static void BuildTrajectory(capnp::MallocMessageBuilder& m, int i, int prompt, int completion) {
  // The texts exist already in a real actor; build them once so only transport work is timed.
  static const std::string prompt_text(400, 'q');
  static const std::string completion_text(static_cast<size_t>(completion) * 4, 'c');
  auto env = InitEnvelope(m, "bench");
  auto t = env.getBody().initTrajectory();
  t.setGroupId("group-" + std::to_string(i / 8));
  t.setSampleIndex(i % 8);
  t.setGroupSize(8);
  auto task = t.initTask();
  task.setId("task-" + std::to_string(i / 8));
  task.setPrompt(prompt_text);
  task.setAnswer("42");
  auto pt = t.initPromptTokens(prompt);
  for (int k = 0; k < prompt; ++k) pt.set(k, 1000 + k);
  auto ct = t.initCompletionTokens(completion);
  auto lp = t.initBehaviourLogprobs(completion);
  for (int k = 0; k < completion; ++k) {
    ct.set(k, 2000 + k);
    lp.set(k, -0.5f - k * 1e-4f);
  }
  t.setCompletionText(completion_text);
  t.initVersionSpans(1)[0].setVersion(3);
  t.setActorId("actor-0");
}

int main(int argc, char** argv) {
  int64_t messages = 200000, prompt = 256, completion = 768;
  FlagSet flags("transport_bench", "Reliable-channel throughput for trajectory-sized messages.");
  flags.Int("messages", &messages, "messages to send (default 200000)");
  flags.Int("prompt-tokens", &prompt, "prompt tokens per trajectory (default 256)");
  flags.Int("completion-tokens", &completion, "completion tokens per trajectory (default 768)");
  ParseOrExit(flags, argc, argv);

  zmq::context_t ctx(2);
  size_t frame_bytes = 0;
  {
    capnp::MallocMessageBuilder m;
    BuildTrajectory(m, 0, prompt, completion);
    frame_bytes = EncodeFrame(m).size() * 8;
  }

  // 1. Reliable channel.
  std::atomic<uint64_t> tokens_seen{0};
  std::unique_ptr<ReliableReceiver> rx;
  ReliableReceiverOptions ro;
  ro.endpoint = "tcp://127.0.0.1:0";
  ro.accepts = BodyKinds{proto::Envelope::Body::TRAJECTORY};
  ro.handler = [&](std::vector<Delivery>& batch) {
    std::vector<AckToken> tokens;
    tokens.reserve(batch.size());
    for (auto& d : batch) {
      auto t = d.envelope->root().getBody().getTrajectory();
      tokens_seen += t.getCompletionTokens().size();  // touch the payload like a consumer would
      tokens.push_back(d.token);
    }
    rx->Ack(tokens);
  };
  rx = std::move(ReliableReceiver::Create(ctx, ro)).value();
  ReliableSenderOptions so;
  so.endpoint = rx->bound_endpoint();
  so.max_outbox = 8192;
  so.resend_after = 5000ms;
  auto tx = std::move(ReliableSender::Create(ctx, so)).value();
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < messages; ++i) {
    capnp::MallocMessageBuilder m(2048);  // one first segment holds the whole trajectory
    BuildTrajectory(m, static_cast<int>(i), static_cast<int>(prompt), static_cast<int>(completion));
    if (!tx->Send(std::to_string(i), m, Clock::now() + 30s).ok()) return Fail("transport_bench", "send timed out");
  }
  if (!tx->Flush(Clock::now() + 60s).ok()) return Fail("transport_bench", "flush timed out");
  double reliable_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto counters = tx->counters();
  tx.reset();
  rx.reset();

  // 2. Raw ZeroMQ PUSH/PULL of the same frame bytes (no encode, decode or acks): the ceiling.
  std::string frame;
  {
    capnp::MallocMessageBuilder m;
    BuildTrajectory(m, 0, static_cast<int>(prompt), static_cast<int>(completion));
    auto w = EncodeFrame(m);
    frame.assign(reinterpret_cast<const char*>(w.begin()), w.size() * 8);
  }
  zmq::socket_t pull(ctx, zmq::socket_type::pull);
  pull.bind("tcp://127.0.0.1:0");
  std::string ep = pull.get(zmq::sockopt::last_endpoint);
  std::thread consumer([&] {
    zmq::message_t msg;
    for (int64_t i = 0; i < messages; ++i) (void)pull.recv(msg);
  });
  zmq::socket_t push(ctx, zmq::socket_type::push);
  push.connect(ep);
  auto t1 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < messages; ++i) push.send(zmq::buffer(frame), zmq::send_flags::none);
  consumer.join();
  double raw_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();

  double mb = double(frame_bytes) * messages / 1e6;
  std::printf("transport_bench: %ld messages of %zu bytes (%ld prompt + %ld completion tokens), %lu resends\n",
              static_cast<long>(messages), frame_bytes, static_cast<long>(prompt), static_cast<long>(completion),
              static_cast<unsigned long>(counters.resent));
  std::printf("| path | messages/s | MB/s |\n|---|---|---|\n");
  std::printf("| reliable channel (encode+send+decode+ack) | %.0f | %.0f |\n", messages / reliable_s, mb / reliable_s);
  std::printf("| raw ZeroMQ PUSH/PULL, same bytes | %.0f | %.0f |\n", messages / raw_s, mb / raw_s);
  return tokens_seen.load() == uint64_t(messages) * completion ? 0 : 1;
}
