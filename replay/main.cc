// aha-replay: the job's durable store (replay/store.h), served over ZeroMQ (replay/service.h).
//
//   aha-replay --db DIR [--data FILE.jsonl] [--config JOB.yaml] [flags]   run the daemon
//   aha-replay export --db DIR --out FILE.jsonl [--filter correct|all] [--min-reward X]
//
// Settings come from the job file (--config) when given; a flag given explicitly wins over it.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/config.h"
#include "common/daemon.h"
#include "common/flags.h"
#include "replay/export.h"
#include "replay/service.h"
#include "replay/store.h"

namespace aha::replay {
namespace {

int RunExport(int argc, char** argv) {
  FlagSet flags("aha-replay export",
                "Writes stored samples as prompt/completion/reward JSONL (docs/data.md), the input of SFT.");
  std::string db, out, filter = "all";
  double min_reward = 0;
  flags.String("db", &db, "replay database directory (required)");
  flags.String("out", &out, "JSONL file to write (required)");
  flags.String("filter", &filter, "correct|all: keep only samples the verifier accepted, or all");
  flags.Double("min-reward", &min_reward, "keep only samples with reward >= X");
  ParseOrExit(flags, argc, argv);
  if (db.empty()) return Fail(flags.program(), "--db is required", 2);
  if (out.empty()) return Fail(flags.program(), "--out is required", 2);
  if (filter != "correct" && filter != "all")
    return Fail(flags.program(), "--filter must be correct or all, got '" + filter + "'", 2);
  ExportOptions o;
  o.db_path = db;
  o.out_path = out;
  o.only_correct = filter == "correct";
  o.has_min_reward = flags.was_set("min-reward");
  o.min_reward = min_reward;
  auto report = ExportJsonl(o);
  if (!report.ok()) return Fail(flags.program(), report.status().message());
  std::printf("exported %llu of %llu samples to %s\n", static_cast<unsigned long long>(report->written),
              static_cast<unsigned long long>(report->scanned), out.c_str());
  return 0;
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int RunDaemon(int argc, char** argv) {
  FlagSet flags("aha-replay",
                "The job's durable store: prompt dataset and leases, scored trajectories, complete groups\n"
                "for the learner (RocksDB). Subcommand: `aha-replay export --help`.");
  DaemonFlags daemon_flags;
  AddDaemonFlags(flags, &daemon_flags);
  std::string db, data, restore_from, ingest = "tcp://127.0.0.1:0", rpc = "tcp://127.0.0.1:0";
  std::string durability = "sync", endpoints_file, checkpoint_dir;
  int64_t group_size = 8, groups_per_step = 8, max_staleness = 1, max_in_flight = 0;
  int64_t lease_timeout_ms = 120'000, retention_steps = 10, epochs = 1, seed = 1234;
  int64_t max_trajectory_bytes = 8 << 20, tick_ms = 500, poll_ms = 5;
  bool skip_bad = false, dynamic_sampling = false, shuffle = true;
  flags.String("db", &db, "RocksDB directory of this job's replay (required)");
  flags.String("data", &data, "prompt dataset JSONL, loaded into the db once (docs/data.md)");
  flags.Bool("skip-bad", &skip_bad, "skip and count malformed dataset lines instead of failing");
  flags.String("restore-from", &restore_from, "start from this checkpoint (copied into --db, which must not exist)");
  flags.String("ingest", &ingest, "bind address for ScoredTrajectory from aha-rewardd (reliable channel)");
  flags.String("rpc", &rpc, "bind address for LeaseRequest (actors) and BatchRequest (learner)");
  flags.String("endpoints-file", &endpoints_file, "write {\"ingest\",\"rpc\"} bound endpoints as JSON here");
  flags.String("durability", &durability, "sync (fsync the WAL per write batch) | buffered (WAL in page cache)");
  flags.Int("group-size", &group_size, "G: samples per prompt");
  flags.Int("groups-per-step", &groups_per_step, "prompts per learner step");
  flags.Int("max-staleness", &max_staleness, "serve only groups with learner_version - version <= this");
  flags.Int("max-in-flight", &max_in_flight, "rate limit on leased + unserved groups; 0 = (max_staleness+1) x groups_per_step");
  flags.Int("lease-timeout-ms", &lease_timeout_ms, "a leased prompt not complete by then goes back to the queue");
  flags.Int("retention-steps", &retention_steps, "delete consumed groups this many learner versions later; -1 keeps them");
  flags.Bool("dynamic-sampling", &dynamic_sampling, "set aside groups whose rewards are all equal (DAPO)");
  flags.Bool("shuffle", &shuffle, "shuffle the dataset every epoch (--shuffle=false keeps file order)");
  flags.Int("seed", &seed, "shuffle seed");
  flags.Int("epochs", &epochs, "passes over the dataset; 0 = forever");
  flags.Int("max-trajectory-bytes", &max_trajectory_bytes, "larger samples are rejected as oversized");
  flags.String("checkpoint-dir", &checkpoint_dir, "where `aha checkpoint` writes when given no directory (default DB.checkpoints)");
  flags.Int("tick-ms", &tick_ms, "how often leases are checked for expiry");
  flags.Int("poll-ms", &poll_ms, "retry hint while groups are on their way (paused or finished: 200 ms)");
  ParseOrExit(flags, argc, argv);
  const std::string prog = flags.program();

  if (!daemon_flags.config.empty()) {
    auto cfg = LoadJobConfig(daemon_flags.config);
    if (!cfg.ok()) return Fail(prog, cfg.status().message(), 2);
    auto set = [&](const char* flag, auto* out, auto value) {
      if (!flags.was_set(flag)) *out = value;
    };
    set("data", &data, cfg->data.train);
    set("skip-bad", &skip_bad, cfg->data.skip_bad);
    set("shuffle", &shuffle, cfg->data.shuffle);
    set("epochs", &epochs, cfg->data.epochs);
    set("seed", &seed, cfg->seed);
    set("group-size", &group_size, cfg->grpo.group_size);
    set("groups-per-step", &groups_per_step, cfg->grpo.prompts_per_step);
    set("max-staleness", &max_staleness, cfg->grpo.max_staleness);
    set("dynamic-sampling", &dynamic_sampling, cfg->grpo.dynamic_sampling);
    set("durability", &durability, cfg->replay.durability);
    set("lease-timeout-ms", &lease_timeout_ms, static_cast<int64_t>(cfg->replay.lease_timeout_s * 1000));
    set("retention-steps", &retention_steps, cfg->replay.retention_steps);
    set("max-in-flight", &max_in_flight, cfg->replay.max_inflight_groups);
    set("poll-ms", &poll_ms, cfg->replay.poll_ms);
  }
  if (db.empty()) return Fail(prog, "--db is required", 2);
  auto dur = ParseDurability(durability);
  if (!dur.ok()) return Fail(prog, "--durability: " + dur.status().message(), 2);
  auto positive = [&](const char* name, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) {
      Fail(prog, fmt::format("--{} must be in [{}, {}], got {}", name, lo, hi, v), 2);
      return false;
    }
    return true;
  };
  if (!positive("group-size", group_size, 1, 65536) || !positive("groups-per-step", groups_per_step, 1, 1 << 20) ||
      !positive("max-staleness", max_staleness, 0, 1 << 20) || !positive("max-in-flight", max_in_flight, 0, 1ll << 32) ||
      !positive("lease-timeout-ms", lease_timeout_ms, 1, 1ll << 40) ||
      !positive("retention-steps", retention_steps, -1, 1ll << 40) || !positive("epochs", epochs, 0, 1 << 30) ||
      !positive("max-trajectory-bytes", max_trajectory_bytes, 1024, 1ll << 30) || !positive("tick-ms", tick_ms, 1, 60000) ||
      !positive("poll-ms", poll_ms, 1, 10000))
    return 2;

  auto runtime_or = DaemonRuntime::Create("replay", daemon_flags);
  if (!runtime_or.ok()) return Fail(prog, runtime_or.status().message());
  auto runtime = std::move(runtime_or).value();

  ReplayOptions o;
  o.db_path = db;
  o.restore_from = restore_from;
  o.durability = *dur;
  o.group_size = static_cast<uint32_t>(group_size);
  o.groups_per_step = static_cast<uint32_t>(groups_per_step);
  o.max_staleness = static_cast<uint32_t>(max_staleness);
  o.max_in_flight = static_cast<uint64_t>(max_in_flight);
  o.lease_timeout_ms = lease_timeout_ms;
  o.retention_steps = retention_steps;
  o.dynamic_sampling = dynamic_sampling;
  o.shuffle = shuffle;
  o.shuffle_seed = static_cast<uint64_t>(seed);
  o.epochs = static_cast<uint32_t>(epochs);
  o.max_trajectory_bytes = static_cast<uint64_t>(max_trajectory_bytes);
  o.poll_after_ms = static_cast<uint32_t>(poll_ms);
  o.registry = &runtime->metrics().registry();
  auto store_or = ReplayStore::Open(o);
  if (!store_or.ok()) return Fail(prog, store_or.status().message());
  auto store = std::move(store_or).value();
  if (!data.empty()) {
    auto loaded = store->LoadDataset(data, skip_bad);
    if (!loaded.ok()) return Fail(prog, loaded.status().message());
  } else if (!store->has_dataset()) {
    return Fail(prog, "the db holds no dataset yet: give --data FILE.jsonl", 2);
  }

  if (checkpoint_dir.empty()) checkpoint_dir = db + ".checkpoints";
  ReplayStore* s = store.get();
  ControlHooks hooks;
  hooks.fill_status = [s](proto::ProcessStatus::Builder st) { s->FillStatus(st.getDetail().initReplay()); };
  hooks.policy_version = [s] { return s->Counts().learner_version; };
  hooks.pause = [s] {
    s->SetPaused(true);
    return OkStatus();
  };
  hooks.resume = [s] {
    s->SetPaused(false);
    return OkStatus();
  };
  hooks.checkpoint = [s, checkpoint_dir](const std::string& arg) -> Result<std::string> {
    std::string dir = arg.empty() ? checkpoint_dir + "/replay-" + std::to_string(UnixMs()) : arg;
    RETURN_IF_ERROR(s->Checkpoint(dir));
    return dir;
  };
  runtime->SetHooks(std::move(hooks));

  ReplayServiceOptions so;
  so.ingest_endpoint = ingest;
  so.rpc_endpoint = rpc;
  so.stats = &runtime->wire_stats();
  auto service_or = ReplayService::Create(runtime->zmq(), s, so);
  if (!service_or.ok()) return Fail(prog, service_or.status().message());
  auto service = std::move(service_or).value();
  if (!endpoints_file.empty()) {
    std::string tmp = endpoints_file + ".tmp";
    std::ofstream(tmp) << nlohmann::json{{"ingest", service->ingest_endpoint()}, {"rpc", service->rpc_endpoint()}}.dump()
                       << "\n";
    std::filesystem::rename(tmp, endpoints_file);
  }
  if (Status st = runtime->Start(); !st.ok()) return Fail(prog, st.message());
  spdlog::info("aha-replay: ingest {} rpc {} db {}", service->ingest_endpoint(), service->rpc_endpoint(), db);

  while (!runtime->WaitForStopFor(std::chrono::milliseconds(tick_ms))) {
    if (Status st = s->ExpireLeases(); !st.ok()) spdlog::error("replay: lease expiry failed: {}", st.ToString());
  }
  service->Close();
  spdlog::info("aha-replay: stopped");
  return 0;
}

}  // namespace
}  // namespace aha::replay

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "export") == 0) return aha::replay::RunExport(argc - 1, argv + 1);
  return aha::replay::RunDaemon(argc, argv);
}
