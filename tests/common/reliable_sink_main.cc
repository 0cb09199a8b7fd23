// reliable_sink: the receiving side of the kill-restart test. Receives BLOB envelopes over a
// ReliableReceiver, writes each batch into RocksDB (key = idempotency key, value = payload) with
// a synced WAL write, and only then acknowledges. Being SIGKILLed at any moment must lose nothing
// that was acknowledged.
//   reliable_sink --endpoint tcp://127.0.0.1:P --db DIR --ready FILE
#include <signal.h>

#include <fstream>
#include <iostream>

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include "common/flags.h"
#include "common/transport.h"

int main(int argc, char** argv) {
  using namespace aha;
  std::string endpoint, db_dir, ready;
  FlagSet flags("reliable_sink", "Durable test receiver for the reliable channel.");
  flags.String("endpoint", &endpoint, "bind address");
  flags.String("db", &db_dir, "RocksDB directory");
  flags.String("ready", &ready, "file to create once listening");
  ParseOrExit(flags, argc, argv);

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  rocksdb::Options options;
  options.create_if_missing = true;
  rocksdb::DB* raw = nullptr;
  auto st = rocksdb::DB::Open(options, db_dir, &raw);
  if (!st.ok()) return Fail("reliable_sink", st.ToString());
  std::unique_ptr<rocksdb::DB> db(raw);

  zmq::context_t ctx;
  std::unique_ptr<ReliableReceiver> rx;
  ReliableReceiverOptions o;
  o.endpoint = endpoint;
  o.handler = [&](std::vector<Delivery>& batch) {
    rocksdb::WriteBatch wb;
    std::vector<AckToken> tokens;
    for (auto& d : batch) {
      auto blob = d.envelope->root().getBody().getBlob();
      wb.Put(d.key, rocksdb::Slice(reinterpret_cast<const char*>(blob.begin()), blob.size()));
      tokens.push_back(d.token);
    }
    rocksdb::WriteOptions wo;
    wo.sync = true;  // durable before the ack
    if (db->Write(wo, &wb).ok()) rx->Ack(tokens);
  };
  auto r = ReliableReceiver::Create(ctx, o);
  if (!r.ok()) return Fail("reliable_sink", r.status().message());
  rx = std::move(r).value();
  std::ofstream(ready) << "ready\n";
  int sig = 0;
  sigwait(&set, &sig);
  rx->Close();
  return 0;
}
