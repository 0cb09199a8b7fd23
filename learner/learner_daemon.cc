#include "learner/learner_daemon.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/config.h"
#include "common/daemon.h"
#include "common/flags.h"
#include "engine/backends.h"
#include "learner/data_parallel.h"
#include "learner/trainer.h"
#include "learner/weight_publication.h"

namespace aha {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// proto Group -> TrainGroup. InvalidArgument names the group and sample that are malformed.
Result<TrainGroup> ToTrainGroup(proto::Group::Reader g) {
  TrainGroup out;
  out.id = g.getGroupId();
  for (auto scored : g.getSamples()) {
    auto t = scored.getTrajectory();
    TrainSample s;
    for (auto x : t.getPromptTokens()) s.prompt.push_back(static_cast<int32_t>(x));
    for (auto x : t.getCompletionTokens()) s.completion.push_back(static_cast<int32_t>(x));
    for (auto x : t.getBehaviourLogprobs()) s.behaviour_logprobs.push_back(x);
    s.reward = scored.getReward();
    s.correct = scored.getCorrect();
    s.truncated = t.getFinishReason() == proto::FinishReason::LENGTH;
    uint64_t minv = UINT64_MAX;
    for (auto span : t.getVersionSpans()) minv = std::min<uint64_t>(minv, span.getVersion());
    s.min_version = minv == UINT64_MAX ? 0 : minv;
    out.samples.push_back(std::move(s));
  }
  return out;
}

struct LearnerMetrics {
  prometheus::Gauge *loss, *pg_loss, *kl, *entropy, *clip_low, *clip_high, *grad_norm, *reward, *accuracy,
      *length, *tokens_per_s, *mfu, *version, *step, *lr, *staleness;
  prometheus::Gauge *phase[5];
  prometheus::Counter *publish_bytes, *steps_total, *dropped_batches;
  prometheus::Histogram* publish_seconds;

  explicit LearnerMetrics(prometheus::Registry& r) {
    auto gauge = [&](const std::string& name, const std::string& help) {
      return &prometheus::BuildGauge().Name("aha_learner_" + name).Help(help).Register(r).Add({});
    };
    loss = gauge("loss", "GRPO loss of the last step");
    pg_loss = gauge("pg_loss", "Policy-gradient part of the last step's loss");
    kl = gauge("kl", "k3 KL to the reference (before beta), last step");
    entropy = gauge("entropy", "Mean per-token entropy of the policy on completion tokens, last step");
    auto& clip = prometheus::BuildGauge().Name("aha_learner_clip_fraction").Help("Share of tokens on the clipped branch, by side").Register(r);
    clip_low = &clip.Add({{"side", "low"}});
    clip_high = &clip.Add({{"side", "high"}});
    grad_norm = gauge("grad_norm", "Global gradient norm before clipping, last step");
    reward = gauge("reward_mean", "Mean total reward of the last step's samples");
    accuracy = gauge("accuracy", "Share of the last step's samples the verifier accepted");
    length = gauge("response_length_tokens", "Mean completion length of the last step, tokens");
    tokens_per_s = gauge("tokens_per_second", "Tokens (prompt + completion) trained per second, last step");
    mfu = gauge("mfu", "Model FLOP utilisation of the last step (needs --peak-tflops)");
    version = gauge("policy_version", "Policy version last published");
    step = gauge("step", "Optimizer steps taken");
    lr = gauge("learning_rate", "Learning rate of the last step");
    staleness = gauge("staleness_max", "Largest learner version - sample version in the last batch");
    auto& ph = prometheus::BuildGauge().Name("aha_learner_step_seconds").Help("Time of the last step by phase").Register(r);
    const char* names[5] = {"wait", "forward", "backward", "optimizer", "publish"};
    for (int i = 0; i < 5; ++i) phase[i] = &ph.Add({{"phase", names[i]}});
    publish_bytes = &prometheus::BuildCounter().Name("aha_learner_weight_publish_bytes_total").Help("Bytes of weights published").Register(r).Add({});
    steps_total = &prometheus::BuildCounter().Name("aha_learner_steps_total").Help("Optimizer steps taken by this process").Register(r).Add({});
    dropped_batches = &prometheus::BuildCounter().Name("aha_learner_rejected_batches_total").Help("Batches refused as malformed").Register(r).Add({});
    publish_seconds = &prometheus::BuildHistogram().Name("aha_learner_weight_publish_seconds").Help("Time to publish one version")
                           .Register(r).Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.01, 0.1, 1, 10});
  }
};

std::string LatestCheckpoint(const fs::path& root) {
  std::string best;
  if (!fs::exists(root)) return best;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory() && fs::exists(e.path() / "trainer.json") && e.path().filename().string() > fs::path(best).filename().string())
      best = e.path().string();
  return best;
}

}  // namespace

int RunLearnerDaemon(int argc, char** argv) {
  DaemonFlags daemon_flags;
  std::string config_path, model_dir, replay, weights = "tcp://127.0.0.1:0", run_dir, device;
  std::vector<std::string> sets;
  bool resume = false;
  double peak_tflops = 0;
  FlagSet flags("aha-learner",
                "The learner: pulls complete groups from aha-replay, runs GRPO (shared/GRPO.md) and publishes\n"
                "every new policy version to the actors.");
  AddDaemonFlags(flags, &daemon_flags);
  flags.StringList("set", &sets, "override a job-file key (a.b=c), repeatable");
  flags.String("model", &model_dir, "Hugging Face model directory to start from (required)");
  flags.String("replay", &replay, "aha-replay's request socket (its --rpc) (required)");
  flags.String("weights", &weights, "bind address of the weights socket actors pull from");
  flags.String("run-dir", &run_dir, "checkpoints go to RUN_DIR/checkpoints, step metrics to RUN_DIR/metrics/learner.jsonl (required)");
  flags.Bool("resume", &resume, "continue from the newest checkpoint in RUN_DIR/checkpoints");
  flags.Double("peak-tflops", &peak_tflops, "peak FLOP/s of the device in TFLOP/s, for the MFU metric (default: the job's topology.peak_tflops; 0: not reported)");
  flags.String("device", &device, "cpu, cuda, cuda:N, or a comma list to train data-parallel (cuda:0,cuda:1) (default: the job's topology.learner_devices)");
  flags.Epilog("The job file (--config) gives the grpo and checkpoint sections.");
  ParseOrExit(flags, argc, argv);
  const std::string prog = "aha-learner";
  if (daemon_flags.config.empty()) return Fail(prog, "--config is required", 2);
  if (model_dir.empty()) return Fail(prog, "--model is required", 2);
  if (replay.empty()) return Fail(prog, "--replay is required", 2);
  if (run_dir.empty()) return Fail(prog, "--run-dir is required", 2);
  auto job = LoadJobConfig(daemon_flags.config, sets);
  if (!job.ok()) return Fail(prog, job.status().message());

  auto rt_or = DaemonRuntime::Create("learner", daemon_flags);
  if (!rt_or.ok()) return Fail(prog, rt_or.status().message());
  auto& rt = *rt_or;

  const std::vector<std::string> devices = device.empty() ? job->topology.learner_devices : SplitDeviceList(device);
  if (!flags.was_set("peak-tflops")) peak_tflops = job->topology.peak_tflops;
  peak_tflops *= static_cast<double>(devices.size());  // MFU is of the whole learner, every device's peak
  auto backends_or = MakeLearnerBackends(devices, device.empty() ? "topology.learner_devices" : "--device");
  if (!backends_or.ok()) return Fail(prog, backends_or.status().message());
  for (size_t i = 0; i < backends_or->size(); ++i)
    spdlog::info("training replica {} on {}", i, engine::DescribeBackend((*backends_or)[i].get()));
  TrainerOptions topt;
  topt.grpo = job->grpo;
  topt.model_dir = model_dir;
  auto trainer_or = GrpoTrainer::Create(topt, BackendPointers(*backends_or));
  if (!trainer_or.ok()) return Fail(prog, trainer_or.status().message());
  auto& trainer = *trainer_or;
  uint64_t version = 0;
  fs::path ckpt_root = fs::path(run_dir) / "checkpoints";
  if (resume) {
    std::string latest = LatestCheckpoint(ckpt_root);
    if (!latest.empty()) {
      auto v = trainer->Restore(latest);
      if (!v.ok()) return Fail(prog, v.status().message());
      version = *v;
      spdlog::info("resumed from {} at step {} (policy version {})", latest, trainer->step(), version);
    }
  }

  auto sync = ResolveWeightSync(*job, trainer->model().backend()->device(), BuiltWithNccl());
  if (!sync.ok()) return Fail(prog, sync.status().message());
  WeightPublicationOptions wo;
  wo.endpoint = weights;
  wo.mode = *sync;
  wo.stats = &rt->wire_stats();
  wo.registry = &rt->metrics().registry();
  auto publication_or = WeightPublication::Create(rt->zmq(), &trainer->model(), version, wo);
  if (!publication_or.ok()) return Fail(prog, publication_or.status().message());
  auto& publication = *publication_or;
  rt->AddReadyField("weights", publication->bound_endpoint());
  spdlog::info("weights: {} (grpo.weight_sync: {})",
               *sync == WeightSync::kNccl ? "bf16 NCCL broadcast to GPU actors, ZeroMQ pull for the others"
                                          : "ZeroMQ pull", job->grpo.weight_sync);

  RpcClientOptions ro;
  ro.endpoint = replay;
  ro.name = "aha-learner";
  ro.stats = &rt->wire_stats();
  auto replay_or = RpcClient::Create(rt->zmq(), ro);
  if (!replay_or.ok()) return Fail(prog, replay_or.status().message());
  auto& replay_client = *replay_or;

  LearnerMetrics metrics(rt->metrics().registry());
  metrics.version->Set(static_cast<double>(version));
  metrics.step->Set(static_cast<double>(trainer->step()));
  std::atomic<uint64_t> published_version{version};
  std::atomic<int64_t> step_now{trainer->step()};
  std::atomic<double> last_loss{0}, last_reward{0}, last_tps{0};
  ControlHooks hooks;
  hooks.policy_version = [&] { return published_version.load(); };
  hooks.fill_status = [&](proto::ProcessStatus::Builder st) {
    auto l = st.getDetail().initLearner();
    l.setStep(static_cast<uint64_t>(step_now.load()));
    l.setTotalSteps(static_cast<uint64_t>(job->grpo.steps));
    l.setStage("grpo");
    l.setTokensPerSecond(last_tps.load());
    l.setLastLoss(last_loss.load());
    l.setLastReward(last_reward.load());
  };
  std::mutex checkpoint_mu;
  hooks.checkpoint = [&](const std::string& dir) -> Result<std::string> {
    std::lock_guard<std::mutex> lock(checkpoint_mu);
    std::string target = dir.empty() ? (ckpt_root / ("manual-" + std::to_string(step_now.load()))).string() : dir;
    RETURN_IF_ERROR(trainer->Checkpoint(target, published_version.load()));
    return target;
  };
  rt->SetHooks(hooks);
  if (Status s = rt->Start(); !s.ok()) return Fail(prog, s.message());

  fs::create_directories(fs::path(run_dir) / "metrics");
  std::ofstream log(fs::path(run_dir) / "metrics" / "learner.jsonl", std::ios::app);
  const int64_t G = job->grpo.group_size;
  uint64_t request_id = (static_cast<uint64_t>(trainer->step()) << 20) + 1;
  int exit_code = 0;
  // Parameters of one forward+backward token: 6 FLOPs per parameter (MFU's usual estimate).
  const double flops_per_token = 6.0 * static_cast<double>(trainer->model().num_params());

  while (!rt->stopping() && trainer->step() < job->grpo.steps) {
    if (rt->paused()) {
      rt->WaitForStopFor(100ms);
      continue;
    }
    auto t_wait = std::chrono::steady_clock::now();
    std::vector<TrainGroup> groups;
    bool finished = false;
    while (!rt->stopping() && static_cast<int64_t>(groups.size()) < job->grpo.prompts_per_step) {
      publication->ServeJoiners();
      capnp::MallocMessageBuilder m;
      auto req = InitEnvelope(m, "aha-learner").getBody().initBatchRequest();
      req.setLearnerVersion(version);
      req.setNumGroups(static_cast<uint32_t>(job->grpo.prompts_per_step - static_cast<int64_t>(groups.size())));
      req.setRequestId(request_id);
      auto reply = replay_client->Call(m, 5000ms);
      if (!reply.ok()) {
        spdlog::warn("batch request to {}: {}", replay, reply.status().ToString());
        rt->WaitForStopFor(200ms);
        continue;  // a retry carries the same request id: replay answers with the same groups
      }
      ++request_id;
      if ((*reply)->which() != proto::Envelope::Body::BATCH) {
        metrics.dropped_batches->Increment();
        continue;
      }
      auto batch = (*reply)->root().getBody().getBatch();
      for (auto g : batch.getGroups()) {
        auto tg = ToTrainGroup(g);
        if (tg.ok() && static_cast<int64_t>(tg->samples.size()) == G) groups.push_back(std::move(tg).value());
        else metrics.dropped_batches->Increment();
      }
      if (batch.getFinished()) {
        finished = true;
        break;
      }
      if (batch.getGroups().size() == 0) rt->WaitForStopFor(std::chrono::milliseconds(std::max<uint32_t>(1, batch.getRetryAfterMs())));
    }
    if (rt->stopping()) break;
    if (groups.empty()) {
      if (finished) {
        spdlog::info("replay has no more groups: stopping after {} steps", trainer->step());
        break;
      }
      continue;
    }
    double wait_s = SecondsSince(t_wait);
    auto t_step = std::chrono::steady_clock::now();
    std::optional<StepStats> st;
    bool fatal = false;
    {
      std::lock_guard<std::mutex> lock(checkpoint_mu);
      auto r = trainer->Step(groups, version);
      if (r.ok()) {
        st = *r;
      } else if (IsInvalidArgument(r.status())) {
        spdlog::error("step refused: {}", r.status().ToString());  // a malformed batch: drop it, count it
      } else {
        // The trainer itself failed (a device or the data-parallel all-reduce): every later step
        // would fail the same way and eat batches. Exit instead; `aha run` restarts the learner
        // from its newest checkpoint (--resume), and replay re-serves what was not trained on.
        spdlog::error("step failed: {}; exiting so that the learner restarts from its checkpoint", r.status().ToString());
        fatal = true;
      }
    }
    if (fatal) {
      exit_code = 1;
      break;
    }
    if (!st) {
      metrics.dropped_batches->Increment();
      continue;
    }
    double step_s = SecondsSince(t_step);
    auto t_pub = std::chrono::steady_clock::now();
    ++version;
    const uint64_t bytes = publication->Publish(version);
    double publish_s = SecondsSince(t_pub);
    published_version = version;
    step_now = st->step;

    double tps = st->tokens / std::max(1e-9, step_s);
    last_loss = st->loss;
    last_reward = st->reward_mean;
    last_tps = tps;
    metrics.loss->Set(st->loss);
    metrics.pg_loss->Set(st->pg_loss);
    metrics.kl->Set(st->kl);
    metrics.entropy->Set(st->entropy);
    metrics.clip_low->Set(st->clip_low);
    metrics.clip_high->Set(st->clip_high);
    metrics.grad_norm->Set(st->grad_norm);
    metrics.reward->Set(st->reward_mean);
    metrics.accuracy->Set(st->accuracy);
    metrics.length->Set(st->length_mean);
    metrics.tokens_per_s->Set(tps);
    double mfu = peak_tflops > 0 ? tps * flops_per_token / (peak_tflops * 1e12) : 0;
    metrics.mfu->Set(mfu);
    metrics.version->Set(static_cast<double>(version));
    metrics.step->Set(static_cast<double>(st->step));
    metrics.lr->Set(st->lr);
    metrics.staleness->Set(st->max_staleness);
    metrics.phase[0]->Set(wait_s);
    metrics.phase[1]->Set(st->forward_s);
    metrics.phase[2]->Set(st->backward_s);
    metrics.phase[3]->Set(st->optimizer_s);
    metrics.phase[4]->Set(publish_s);
    metrics.publish_bytes->Increment(static_cast<double>(bytes));
    metrics.publish_seconds->Observe(publish_s);
    metrics.steps_total->Increment();
    nlohmann::json line = {{"step", st->step}, {"version", version}, {"time", UnixNanos() / 1e9},
                           {"loss", st->loss}, {"pg_loss", st->pg_loss}, {"kl", st->kl}, {"entropy", st->entropy},
                           {"clip_low", st->clip_low}, {"clip_high", st->clip_high}, {"grad_norm", st->grad_norm},
                           {"lr", st->lr}, {"reward", st->reward_mean}, {"accuracy", st->accuracy},
                           {"length", st->length_mean}, {"tokens", st->tokens}, {"tokens_per_s", tps}, {"mfu", mfu},
                           {"staleness", st->max_staleness}, {"wait_s", wait_s}, {"forward_s", st->forward_s},
                           {"backward_s", st->backward_s}, {"optimizer_s", st->optimizer_s}, {"publish_s", publish_s}};
    log << line.dump() << "\n" << std::flush;
    spdlog::info("step {}/{} reward {:.3f} acc {:.3f} len {:.1f} loss {:.4f} kl {:.4f} |g| {:.3f} wait {:.2f}s step {:.2f}s",
                 st->step, job->grpo.steps, st->reward_mean, st->accuracy, st->length_mean, st->loss, st->kl,
                 st->grad_norm, wait_s, step_s);
    if (job->checkpoint.every > 0 && st->step % job->checkpoint.every == 0) {
      std::lock_guard<std::mutex> lock(checkpoint_mu);
      char name[32];
      std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(st->step));
      if (Status s = trainer->Checkpoint((ckpt_root / name).string(), version); !s.ok()) {
        spdlog::error("checkpoint failed: {}", s.ToString());
        exit_code = 1;
        break;
      }
    }
  }
  if (exit_code == 0 && trainer->step() > 0) {
    char name[32];
    std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(trainer->step()));
    fs::path final_dir = ckpt_root / name;
    if (!fs::exists(final_dir / "trainer.json")) {
      if (Status s = trainer->Checkpoint(final_dir.string(), version); !s.ok()) {
        spdlog::error("final checkpoint failed: {}", s.ToString());
        exit_code = 1;
      }
    }
    std::error_code ec;
    fs::remove(ckpt_root / "latest", ec);
    fs::create_directory_symlink(name, ckpt_root / "latest", ec);
  }
  spdlog::info("stopped at step {} (policy version {})", trainer->step(), version);
  return exit_code;
}

}  // namespace aha
