// The reliable channel survives a receiver that is SIGKILLed and restarted: 100,000 messages
// go through while the durable receiver (reliable_sink) dies twice; afterwards its RocksDB store
// holds every message exactly once, with the right payload.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

#include <rocksdb/db.h>

#include "common/transport.h"

#ifndef AHA_RELIABLE_SINK
#error "AHA_RELIABLE_SINK must name the reliable_sink binary"
#endif

namespace aha {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

pid_t StartSink(const std::string& endpoint, const std::string& db, const std::string& ready) {
  fs::remove(ready);
  pid_t pid = fork();
  if (pid == 0) {
    execl(AHA_RELIABLE_SINK, "reliable_sink", "--endpoint", endpoint.c_str(), "--db", db.c_str(),
          "--ready", ready.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < 500 && !fs::exists(ready); ++i) std::this_thread::sleep_for(10ms);
  EXPECT_TRUE(fs::exists(ready)) << "sink did not start";
  return pid;
}

std::string Payload(int i) { return "payload-" + std::to_string(i) + std::string(64, 'x'); }

TEST(ReliableChannelFault, ReceiverKilledTwiceLosesAndDuplicatesNothing) {
  constexpr int kMessages = 100000;
  fs::path dir = fs::temp_directory_path() / ("aha_killrestart_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::string db = (dir / "db").string(), ready = (dir / "ready").string();

  zmq::context_t ctx;
  std::string endpoint;
  {
    zmq::socket_t probe(ctx, zmq::socket_type::router);
    probe.bind("tcp://127.0.0.1:0");
    endpoint = probe.get(zmq::sockopt::last_endpoint);
  }
  pid_t sink = StartSink(endpoint, db, ready);

  ReliableSenderOptions o;
  o.endpoint = endpoint;
  o.max_outbox = 8192;
  o.resend_after = 300ms;
  auto tx = std::move(ReliableSender::Create(ctx, o)).value();

  std::atomic<int> sent{0};
  std::thread producer([&] {
    for (int i = 0; i < kMessages; ++i) {
      capnp::MallocMessageBuilder m;
      auto env = InitEnvelope(m, "test");
      std::string p = Payload(i);
      env.getBody().setBlob(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(p.data()), p.size()));
      ASSERT_TRUE(tx->Send("m" + std::to_string(i), m, Clock::now() + 60s).ok());
      sent++;
    }
  });

  int kills = 0;
  for (uint64_t threshold : {25000u, 60000u}) {
    auto deadline = Clock::now() + 60s;
    while (tx->counters().acked < threshold && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
    ASSERT_GE(tx->counters().acked, threshold);
    kill(sink, SIGKILL);
    waitpid(sink, nullptr, 0);
    ++kills;
    std::this_thread::sleep_for(200ms);  // the sender keeps queueing while the receiver is down
    sink = StartSink(endpoint, db, ready);
  }
  producer.join();
  ASSERT_TRUE(tx->Flush(Clock::now() + 120s).ok());
  auto c = tx->counters();
  EXPECT_EQ(c.acked, static_cast<uint64_t>(kMessages));
  EXPECT_GT(c.resent, 0u) << "the kills should have forced retransmissions";
  tx.reset();
  kill(sink, SIGTERM);
  int wstatus = 0;
  waitpid(sink, &wstatus, 0);
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
  EXPECT_EQ(kills, 2);

  rocksdb::DB* raw = nullptr;
  rocksdb::Options options;
  ASSERT_TRUE(rocksdb::DB::OpenForReadOnly(options, db, &raw).ok());
  std::unique_ptr<rocksdb::DB> store(raw);
  std::unique_ptr<rocksdb::Iterator> it(store->NewIterator(rocksdb::ReadOptions()));
  std::vector<char> seen(kMessages, 0);
  int count = 0, wrong = 0;
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    ++count;
    std::string key = it->key().ToString();
    int i = std::stoi(key.substr(1));
    ASSERT_TRUE(i >= 0 && i < kMessages) << key;
    seen[i]++;
    if (it->value().ToString() != Payload(i)) ++wrong;
  }
  EXPECT_EQ(count, kMessages);
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), kMessages);
  std::printf("kill-restart: %d messages, %d kills, %lu first sends, %lu resends\n", kMessages, kills,
              static_cast<unsigned long>(c.sent), static_cast<unsigned long>(c.resent));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace aha
