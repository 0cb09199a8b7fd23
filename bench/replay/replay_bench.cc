// replay_bench: aha-replay's ingest and serve rates, side by side with RocksDB's own raw write
// rate of the same bytes (same keys, same write-batch size, same WAL and sync setting, same disk),
// all in one run.
//
//   replay_bench [--dir /tmp] [--trajectories 20000] [--group-size 8] [--tokens 256] [--batch 256]
//                [--serve-groups 32] [--durability sync|buffered] [--transport]
//
// Rows:
//   rocksdb raw write      WriteBatch of `batch` pre-serialised samples, one Write() each
//   replay ingest (store)  ReplayStore::Ingest of `batch` samples (validation, copy, group
//                          assembly, completion records, state record), one Write() each
//   replay ingest (zmq)    --transport: the same through ReliableSender -> ReplayService over
//                          loopback TCP, acknowledged after the write (batches as they arrive)
//   replay serve           ServeBatch of `serve-groups` groups per request until empty
#include <capnp/message.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "common/flags.h"
#include "common/transport.h"
#include "common/wire.h"
#include "replay/records.h"
#include "replay/service.h"
#include "replay/store.h"

namespace aha::replay {
namespace {

using SteadyClock = std::chrono::steady_clock;
double Seconds(SteadyClock::time_point a) { return std::chrono::duration<double>(SteadyClock::now() - a).count(); }

void FillSample(proto::ScoredTrajectory::Builder st, const std::string& gid, uint32_t index, int tokens) {
  st.setReward(static_cast<float>(index % 2));
  st.setCorrect(index % 2);
  auto comps = st.initComponents(2);
  comps[0].setName("accuracy");
  comps[0].setScore(static_cast<float>(index % 2));
  comps[1].setName("format");
  comps[1].setScore(1);
  auto t = st.initTrajectory();
  t.setGroupId(gid);
  t.setSampleIndex(index);
  auto prompt = t.initPromptTokens(128);
  for (unsigned i = 0; i < 128; ++i) prompt.set(i, 1000 + i);
  auto comp = t.initCompletionTokens(tokens);
  auto lp = t.initBehaviourLogprobs(tokens);
  for (int i = 0; i < tokens; ++i) {
    comp.set(i, static_cast<uint32_t>(i * 7 + index));
    lp.set(i, -0.01f * static_cast<float>(i % 50));
  }
  t.setCompletionText(std::string(static_cast<size_t>(tokens) * 4, 'x'));
  t.initVersionSpans(1)[0].setVersion(0);
}

struct Row {
  std::string name;
  double seconds;
  double items;
  const char* unit;
  double bytes;
};

}  // namespace
}  // namespace aha::replay

namespace aha::replay {
struct BenchParams {
  std::string root;
  Durability durability;
  int64_t n, group_size, tokens, batch, serve_groups;
  bool transport;
};
std::vector<Row> RunOnce(const BenchParams& p, double* sample_bytes);
}  // namespace aha::replay

int main(int argc, char** argv) {
  using namespace aha;
  using namespace aha::replay;
  FlagSet flags("replay_bench", "aha-replay ingest/serve rates vs RocksDB raw writes of the same bytes.");
  std::string dir = std::filesystem::temp_directory_path().string(), durability = "sync";
  int64_t n = 20000, group_size = 8, tokens = 256, batch = 256, serve_groups = 32, repeat = 3;
  bool transport = false;
  flags.String("dir", &dir, "directory for the databases (the disk under test)");
  flags.Int("trajectories", &n, "samples to ingest");
  flags.Int("group-size", &group_size, "G");
  flags.Int("tokens", &tokens, "completion tokens per sample");
  flags.Int("batch", &batch, "samples per write batch");
  flags.Int("serve-groups", &serve_groups, "groups per BatchRequest");
  flags.String("durability", &durability, "sync|buffered");
  flags.Bool("transport", &transport, "also measure ingest through ReliableSender -> ReplayService");
  flags.Int("repeat", &repeat, "runs; the table shows the median of each row");
  ParseOrExit(flags, argc, argv);
  spdlog::set_level(spdlog::level::warn);
  auto dur = ParseDurability(durability);
  if (!dur.ok()) return Fail("replay_bench", dur.status().message(), 2);
  if (n % group_size != 0) return Fail("replay_bench", "--trajectories must be a multiple of --group-size", 2);
  std::vector<std::vector<Row>> runs;
  double sample_bytes = 0;
  std::vector<double> ratios;
  for (int64_t r = 0; r < std::max<int64_t>(repeat, 1); ++r) {
    std::string root = dir + "/replay-bench-" + std::to_string(getpid()) + "-" + std::to_string(r);
    std::filesystem::create_directories(root);
    runs.push_back(RunOnce({root, *dur, n, group_size, tokens, batch, serve_groups, transport}, &sample_bytes));
    std::filesystem::remove_all(root);
    ratios.push_back((runs.back()[1].items / runs.back()[1].seconds) / (runs.back()[0].items / runs.back()[0].seconds));
  }
  std::printf("replay_bench: %lld samples of %.1f KiB (%lld tokens), G=%lld, batch %lld, durability %s, dir %s, "
              "median of %zu runs\n",
              static_cast<long long>(n), sample_bytes / 1024, static_cast<long long>(tokens),
              static_cast<long long>(group_size), static_cast<long long>(batch), durability.c_str(), dir.c_str(),
              runs.size());
  std::printf("%-24s %10s %14s %10s %12s\n", "", "seconds", "rate", "MiB/s", "vs raw");
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::vector<double> raw;
  for (const auto& run : runs) raw.push_back(run[0].items / run[0].seconds);
  std::vector<double> raw_secs;
  for (const auto& run : runs) raw_secs.push_back(run[0].seconds);
  double raw_rate = runs[0][0].items / median(raw_secs);
  for (size_t i = 0; i < runs[0].size(); ++i) {
    std::vector<double> secs;
    for (const auto& run : runs) secs.push_back(run[i].seconds);
    const Row& r = runs[0][i];
    double s = median(secs), rate = r.items / s;
    std::string vs = r.unit[0] == 't' ? std::to_string(static_cast<int>(100 * rate / raw_rate)) + "%" : "";
    std::printf("%-24s %10.3f %9.0f %-4s/s %10.1f %11s\n", r.name.c_str(), s, rate, r.unit[0] == 't' ? "traj" : "grp",
                r.bytes / s / (1 << 20), vs.c_str());
  }
  std::printf("store ingest / raw write, per run:");
  for (double x : ratios) std::printf(" %.0f%%", 100 * x);
  std::printf("\n");
  return 0;
}

namespace aha::replay {
std::vector<Row> RunOnce(const BenchParams& p, double* sample_bytes) {
  const std::string& root = p.root;
  const int64_t n = p.n, group_size = p.group_size, tokens = p.tokens, batch = p.batch, serve_groups = p.serve_groups;
  const bool transport = p.transport;
  const Durability* dur = &p.durability;
  const int64_t groups = n / group_size;
  std::vector<Row> rows;

  // The store, with every group leased up front.
  auto open = [&](const std::string& name) {
    ReplayOptions o;
    o.db_path = root + "/" + name;
    o.durability = *dur;
    o.group_size = static_cast<uint32_t>(group_size);
    o.max_in_flight = static_cast<uint64_t>(groups) + 1;
    o.shuffle = false;
    o.epochs = 0;
    o.lease_timeout_ms = 3'600'000;
    auto store = ReplayStore::Open(o);
    AHA_CHECK(store.ok()) << store.status().ToString();
    std::string data = root + "/data.jsonl";
    FILE* f = std::fopen(data.c_str(), "w");
    for (int i = 0; i < 1000; ++i)
      std::fprintf(f, "{\"id\":\"t%d\",\"prompt\":\"what is %d+%d?\",\"answer\":\"%d\",\"kind\":\"arith\"}\n", i, i, i, 2 * i);
    std::fclose(f);
    AHA_CHECK((*store)->LoadDataset(data, false).ok());
    std::vector<std::string> gids;
    while (static_cast<int64_t>(gids.size()) < groups) {
      capnp::MallocMessageBuilder req, rep;
      auto r = req.initRoot<proto::LeaseRequest>();
      r.setActorId("bench");
      r.setMaxTasks(static_cast<uint32_t>(std::min<int64_t>(4096, groups - gids.size())));
      auto out = rep.initRoot<proto::PromptLease>();
      AHA_CHECK_OK((*store)->Lease(r.asReader(), out));
      for (auto t : out.getTasks()) gids.push_back(t.getGroupId().cStr());
    }
    return std::make_pair(std::move(store).value(), gids);
  };
  auto [store, gids] = open("store");

  // The samples, built once; the raw writer stores exactly these bytes under the same keys.
  std::vector<std::unique_ptr<capnp::MallocMessageBuilder>> messages;
  std::vector<std::string> keys, values;
  double total_bytes = 0;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < group_size; ++i) {
      auto m = std::make_unique<capnp::MallocMessageBuilder>();
      FillSample(m->initRoot<proto::ScoredTrajectory>(), gids[g], static_cast<uint32_t>(i), static_cast<int>(tokens));
      keys.push_back(TrajectoryKey(gids[g], static_cast<uint32_t>(i)));
      values.push_back(MessageBytes(*m));
      total_bytes += static_cast<double>(values.back().size());
      messages.push_back(std::move(m));
    }

  // 1. RocksDB raw: same column-family layout, WAL on, same sync setting and batch size.
  {
    rocksdb::DBOptions dbo;
    dbo.create_if_missing = true;
    dbo.create_missing_column_families = true;
    dbo.max_background_jobs = 2;
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{"default", {}}, {"trajectories", {}}};
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* db = nullptr;
    AHA_CHECK(rocksdb::DB::Open(dbo, root + "/raw", cfs, &handles, &db).ok());
    rocksdb::WriteOptions wo;
    wo.sync = *dur == Durability::kSync;
    auto t0 = SteadyClock::now();
    for (int64_t i = 0; i < n; i += batch) {
      rocksdb::WriteBatch wb;
      for (int64_t j = i; j < std::min(n, i + batch); ++j) wb.Put(handles[1], keys[j], values[j]);
      AHA_CHECK(db->Write(wo, &wb).ok());
    }
    rows.push_back({"rocksdb raw write", Seconds(t0), static_cast<double>(n), "trajectories", total_bytes});
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
    delete db;
  }

  // 2. ReplayStore::Ingest, same batch size.
  {
    auto t0 = SteadyClock::now();
    for (int64_t i = 0; i < n; i += batch) {
      std::vector<proto::ScoredTrajectory::Reader> items;
      for (int64_t j = i; j < std::min(n, i + batch); ++j)
        items.push_back(messages[j]->getRoot<proto::ScoredTrajectory>().asReader());
      auto r = store->Ingest(items);
      AHA_CHECK(r.ok()) << r.status().ToString();
      for (const auto& x : *r) AHA_CHECK(x.outcome == IngestOutcome::kStored) << x.reason;
    }
    rows.push_back({"replay ingest (store)", Seconds(t0), static_cast<double>(n), "trajectories", total_bytes});
    AHA_CHECK_EQ(store->Counts().groups_complete, static_cast<uint64_t>(groups));
  }

  // 3. Serving every group.
  {
    auto t0 = SteadyClock::now();
    int64_t served = 0;
    uint64_t request = 0;
    while (true) {
      capnp::MallocMessageBuilder req, rep;
      auto r = req.initRoot<proto::BatchRequest>();
      r.setNumGroups(static_cast<uint32_t>(serve_groups));
      r.setRequestId(++request);
      auto out = rep.initRoot<proto::Batch>();
      AHA_CHECK_OK(store->ServeBatch(r.asReader(), out));
      if (out.getGroups().size() == 0) break;
      served += out.getGroups().size();
    }
    AHA_CHECK_EQ(served, groups);
    rows.push_back({"replay serve", Seconds(t0), static_cast<double>(groups), "groups", total_bytes});
  }

  // 4. Through the wire: ReliableSender -> ReplayService (ack after the synced write).
  if (transport) {
    auto [store2, gids2] = open("store-zmq");
    zmq::context_t ctx;
    ReplayServiceOptions so;
    auto service = ReplayService::Create(ctx, store2.get(), so);
    AHA_CHECK(service.ok()) << service.status().ToString();
    ReliableSenderOptions o;
    o.endpoint = (*service)->ingest_endpoint();
    auto sender = ReliableSender::Create(ctx, o);
    AHA_CHECK(sender.ok());
    // Envelopes are built before the clock starts: the row measures the channel and the store.
    std::vector<std::unique_ptr<capnp::MallocMessageBuilder>> envelopes;
    std::vector<std::string> wire_keys;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < group_size; ++i) {
        wire_keys.push_back(gids2[g] + "/" + std::to_string(i));
        envelopes.push_back(std::make_unique<capnp::MallocMessageBuilder>());
        FillSample(InitEnvelope(*envelopes.back(), "bench").getBody().initScoredTrajectory(), gids2[g],
                   static_cast<uint32_t>(i), static_cast<int>(tokens));
      }
    auto t0 = SteadyClock::now();
    for (int64_t j = 0; j < n; ++j)
      AHA_CHECK_OK((*sender)->Send(wire_keys[j], *envelopes[j], Clock::now() + std::chrono::seconds(60)));
    AHA_CHECK_OK((*sender)->Flush(Clock::now() + std::chrono::seconds(120)));
    rows.push_back({"replay ingest (zmq)", Seconds(t0), static_cast<double>(n), "trajectories", total_bytes});
    AHA_CHECK_EQ(store2->Counts().groups_complete, static_cast<uint64_t>(groups));
    if (store2->Counts().duplicates) std::printf("(zmq run: %llu resent duplicates)\n", static_cast<unsigned long long>(store2->Counts().duplicates));
    (*service)->Close();
  }

  *sample_bytes = total_bytes / static_cast<double>(n);
  return rows;
}
}  // namespace aha::replay
