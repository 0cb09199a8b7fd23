#include "actors/actor_daemon.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>

#include "common/config.h"
#include "common/daemon.h"
#include "common/flags.h"
#include "common/weight_sync.h"
#include "engine/backends.h"
#include "engine/generate.h"
#include "engine/tokenizer/prompt_template.h"
#include "engine/tokenizer/tokenizer.h"

#if AHA_HAVE_NCCL
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/weight_broadcast.h"
#endif

namespace aha {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

uint64_t Mix(uint64_t h, uint64_t x) {
  h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

struct ActorMetrics {
  prometheus::Counter *tokens, *samples, *leases, *swaps, *send_timeouts;
  prometheus::Gauge *tokens_per_s, *samples_per_s, *version, *lag, *outbox;
  prometheus::Histogram* swap_seconds;
  explicit ActorMetrics(prometheus::Registry& r) {
    auto counter = [&](const std::string& n, const std::string& h) {
      return &prometheus::BuildCounter().Name("aha_actor_" + n).Help(h).Register(r).Add({});
    };
    auto gauge = [&](const std::string& n, const std::string& h) {
      return &prometheus::BuildGauge().Name("aha_actor_" + n).Help(h).Register(r).Add({});
    };
    tokens = counter("generated_tokens_total", "Completion tokens generated");
    samples = counter("samples_total", "Completions sent to aha-rewardd");
    leases = counter("leases_total", "Prompt leases received");
    swaps = counter("weight_swaps_total", "New policy versions swapped in");
    send_timeouts = counter("send_timeouts_total", "Sends that waited past their deadline on a full outbox");
    tokens_per_s = gauge("tokens_per_second", "Generation throughput of the last round, tokens/s");
    samples_per_s = gauge("samples_per_second", "Completions per second of the last round");
    version = gauge("policy_version", "Policy version of the weights in use");
    lag = gauge("policy_lag", "Newest published version minus the version in use, at the last check");
    outbox = gauge("outbox_depth", "Trajectories sent and not yet acknowledged by aha-rewardd");
    swap_seconds = &prometheus::BuildHistogram().Name("aha_actor_weight_swap_seconds").Help("Time to fetch and swap in a version")
                        .Register(r).Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.01, 0.1, 1, 10});
  }
};

}  // namespace

int64_t ActorBatchSize(int64_t flag, int64_t job_value, bool gpu) {
  if (flag > 0) return flag;
  if (job_value > 0) return job_value;
  return gpu ? 256 : 32;
}

int64_t LeaseTasks(int64_t batch, int64_t group_size, int64_t prompts_per_step, int64_t max_staleness) {
  // Seen on the 0.5B pipeline before this cap: at max_staleness 1, half of every 256-row batch
  // dropped as stale.
  const int64_t steps = std::max<int64_t>(1, max_staleness);
  return std::max<int64_t>(1, std::min(batch / std::max<int64_t>(1, group_size), prompts_per_step * steps));
}

int RunActorDaemon(int argc, char** argv) {
  DaemonFlags daemon_flags;
  std::string model_dir, replay, rewardd, weights, actor_id, device;
  std::vector<std::string> sets;
  int64_t max_batch = 0;
  FlagSet flags("aha-actor",
                "The rollout actor: leases prompts from aha-replay, samples G completions per prompt and sends\n"
                "them to aha-rewardd; receives new weights from the learner (its NCCL broadcast on a GPU, else pulled\n"
                "over ZeroMQ) and swaps them in between decode steps.");
  AddDaemonFlags(flags, &daemon_flags);
  flags.StringList("set", &sets, "override a job-file key (a.b=c), repeatable");
  flags.String("model", &model_dir, "Hugging Face model directory with tokenizer.json (required)");
  flags.String("replay", &replay, "aha-replay's request socket (its --rpc) (required)");
  flags.String("rewardd", &rewardd, "aha-rewardd's trajectory socket (its --ingest) (required)");
  flags.String("weights", &weights, "the learner's weights socket; empty = never update weights");
  flags.String("actor-id", &actor_id, "name in trajectories and logs (default actor-<role-index>)");
  flags.Int("max-batch", &max_batch,
            "sequences decoded together (default: topology.actors[role-index].max_batch, else 256 on a GPU, 32 on the CPU)");
  flags.String("device", &device, "cpu, cuda or cuda:N (default: topology.actors[role-index].device of the job)");
  flags.Epilog("The job file (--config) gives the prompt template and the grpo sampling settings.");
  ParseOrExit(flags, argc, argv);
  const std::string prog = "aha-actor";
  if (daemon_flags.config.empty()) return Fail(prog, "--config is required", 2);
  if (model_dir.empty()) return Fail(prog, "--model is required", 2);
  if (replay.empty()) return Fail(prog, "--replay is required", 2);
  if (rewardd.empty()) return Fail(prog, "--rewardd is required", 2);
  if (flags.was_set("max-batch") && max_batch < 1) return Fail(prog, "--max-batch must be >= 1", 2);
  if (actor_id.empty()) actor_id = "actor-" + std::to_string(daemon_flags.role_index);
  auto job = LoadJobConfig(daemon_flags.config, sets);
  if (!job.ok()) return Fail(prog, job.status().message());
  auto tmpl = tokenizer::PromptTemplate::Parse(job->model.prompt_template);
  if (!tmpl.ok()) return Fail(prog, tmpl.status().message());
  auto tok = tokenizer::Tokenizer::Load(model_dir);
  if (!tok.ok()) return Fail(prog, tok.status().message());

  auto rt_or = DaemonRuntime::Create("actor", daemon_flags);
  if (!rt_or.ok()) return Fail(prog, rt_or.status().message());
  auto& rt = *rt_or;
  if (device.empty()) {
    const auto& actors = job->topology.actors;
    const size_t i = static_cast<size_t>(daemon_flags.role_index);
    device = i < actors.size() ? actors[i].device : "cpu";
  }
  auto backend_or = engine::MakeBackend(device);
  if (!backend_or.ok()) return Fail(prog, backend_or.status().message());
  engine::Backend& backend = **backend_or;
  spdlog::info("generating on {}", engine::DescribeBackend(&backend));
  {
    const auto& actors = job->topology.actors;
    const size_t i = static_cast<size_t>(daemon_flags.role_index);
    max_batch = ActorBatchSize(max_batch, i < actors.size() ? actors[i].max_batch : 0,
                               backend.device().kind == engine::DeviceKind::kCuda);
  }
  auto model_or = engine::Transformer::Load(model_dir, &backend);
  if (!model_or.ok()) return Fail(prog, model_or.status().message());
  auto& model = *model_or;

  const GrpoConfig& g = job->grpo;
  const int G = static_cast<int>(g.group_size);
  const int max_prompt_tokens = 1024;
  engine::Generator generator(model.get(), static_cast<int>(max_batch), max_prompt_tokens + static_cast<int>(g.max_new_tokens));

  RpcClientOptions ro;
  ro.endpoint = replay;
  ro.name = actor_id;
  ro.stats = &rt->wire_stats();
  auto replay_or = RpcClient::Create(rt->zmq(), ro);
  if (!replay_or.ok()) return Fail(prog, replay_or.status().message());
  auto& replay_client = *replay_or;
  ReliableSenderOptions so;
  so.endpoint = rewardd;
  so.name = actor_id;
  so.max_outbox = 4096;
  so.resend_after = 2000ms;
  so.stats = &rt->wire_stats();
  so.on_rejected = [](const std::string& key, const std::string& reason) {
    spdlog::warn("aha-rewardd rejected trajectory {}: {}", key, reason);
  };
  auto sender_or = ReliableSender::Create(rt->zmq(), so);
  if (!sender_or.ok()) return Fail(prog, sender_or.status().message());
  auto& sender = *sender_or;
  std::unique_ptr<WeightSubscriber> subscriber;
  if (!weights.empty()) {
    auto s = WeightSubscriber::Create(rt->zmq(), weights, &rt->wire_stats());
    if (!s.ok()) return Fail(prog, s.status().message());
    subscriber = std::move(s).value();
  }
#if AHA_HAVE_NCCL
  // On a GPU the actor offers to take the learner's NCCL broadcast; a learner that publishes over
  // ZeroMQ only says so on the first exchange, and the fetcher pulls instead.
  std::unique_ptr<engine::cuda::WeightReceiver> receiver;
  if (auto* cuda = dynamic_cast<engine::cuda::CudaBackend*>(&backend); cuda && !weights.empty()) {
    engine::cuda::WeightReceiverOptions o;
    o.endpoint = weights;
    o.actor_id = actor_id;
    o.device = cuda->device().index;
    o.n = model->num_params();
    o.params = model->params();
    o.shadow = cuda->gemm().Bf16Copy(model->params());
    o.swap_stream = cuda->stream();
    o.stats = &rt->wire_stats();
    o.stopping = [&rt] { return rt->stopping(); };  // a learner gone at shutdown is not waited out
    auto r = engine::cuda::WeightReceiver::Create(rt->zmq(), o);
    if (!r.ok()) return Fail(prog, r.status().message());
    receiver = std::move(r).value();
  }
#endif

  ActorMetrics metrics(rt->metrics().registry());
  std::atomic<uint64_t> version{0};
  std::atomic<double> last_tps{0}, last_sps{0};
  ControlHooks hooks;
  hooks.policy_version = [&] { return version.load(); };
  hooks.fill_status = [&](proto::ProcessStatus::Builder st) {
    auto a = st.getDetail().initActor();
    a.setTokensPerSecond(last_tps.load());
    a.setSamplesPerSecond(last_sps.load());
    a.setOutboxDepth(static_cast<uint32_t>(sender->outbox_size()));
  };
  rt->SetHooks(hooks);
  if (Status s = rt->Start(); !s.ok()) return Fail(prog, s.message());

  std::vector<int32_t> stop_ids;
  if (tok.value()->eos_id() >= 0) stop_ids.push_back(tok.value()->eos_id());
  for (int id : model->config().eos_token_ids)
    if (std::find(stop_ids.begin(), stop_ids.end(), id) == stop_ids.end()) stop_ids.push_back(id);
  const int64_t lease_tasks = LeaseTasks(max_batch, G, g.prompts_per_step, g.max_staleness);
  uint64_t lease_request = 1;
  auto detok = [&](const std::vector<int32_t>& ids) { return tok.value()->Decode(ids, true); };

  // In-flight weight updates: a fetcher thread pulls each new version from the learner into a
  // staging copy while generation runs; the generator's step hook swaps it in between two decode
  // steps (or before a prefill), so generation never stops for a sync. Each token records the
  // version that drew it (the trajectory's versionSpans). The subscriber's socket belongs to the
  // fetcher thread alone.
  std::mutex staged_mu;
  std::shared_ptr<const WeightsVersion> staged;  // newest fetched, not yet swapped in
  std::atomic<uint64_t> fetched{0};
  std::thread fetcher;
  if (subscriber) {
    fetcher = std::thread([&] {
#if AHA_HAVE_NCCL
      // NCCL: each round reports to the learner and joins, receives, or waits one poll interval.
      // A failed round has already aborted the communicator; the next ones rejoin.
      bool answered = false, failing = false;
      while (receiver && !rt->stopping()) {
        auto r = receiver->Step();
        if (rt->stopping()) break;  // a failure now is the shutdown's, not news
        if (!r.ok() && IsFailedPrecondition(r.status())) {
          if (answered) spdlog::warn("weights over NCCL: {}; pulling over ZeroMQ instead", r.status().message());
          else spdlog::info("weights: {}; pulling over ZeroMQ", r.status().message());
          break;
        }
        if (!r.ok()) {
          // Before the learner first answers (it may still be starting) this is not news.
          if (!answered) spdlog::debug("weights: {}", r.status().ToString());
          else if (!failing) spdlog::warn("weights over NCCL: {}", r.status().ToString());
          failing = answered;
          rt->WaitForStopFor(200ms);
          continue;
        }
        if (!answered) spdlog::info("weights: taking the learner's NCCL broadcast");
        if (failing) spdlog::info("weights over NCCL: back in step with the learner");
        answered = true;
        failing = false;
        metrics.lag->Set(static_cast<double>(receiver->received_version()) - static_cast<double>(version.load()));
        if (!*r) rt->WaitForStopFor(receiver->poll_interval());
      }
      if (rt->stopping()) return;
#endif
      while (!rt->stopping()) {
        auto got = subscriber->FetchIfNewer(fetched.load(), 2000ms, [&rt] { return rt->stopping(); });
        if (!got.ok()) {
          spdlog::debug("weights: {}", got.status().ToString());
          rt->WaitForStopFor(200ms);
          continue;
        }
        if (!got->has_value()) {
          metrics.lag->Set(static_cast<double>(fetched.load() - version.load()));
          rt->WaitForStopFor(10ms);  // a step is often under 100 ms: ask again soon
          continue;
        }
        auto w = std::make_shared<const WeightsVersion>(std::move(**got));
        if (w->bytes->size() != model->num_params() * sizeof(float) || w->dtype != proto::DType::F32) {
          spdlog::error("weights version {} does not fit this model ({} bytes, {} expected)", w->version,
                        w->bytes->size(), model->num_params() * sizeof(float));
          rt->WaitForStopFor(1000ms);
          continue;
        }
        // Same size is not the same layout (a learner of another aha version may order the flat
        // buffer differently, e.g. q/k/v biases interleaved): the tensor table must match ours.
        const auto& table = model->param_table();
        bool same_layout = w->tensors.size() == table.size();
        for (size_t i = 0; same_layout && i < table.size(); ++i)
          same_layout = w->tensors[i].name == table[i].name && w->tensors[i].offset == table[i].offset * sizeof(float);
        if (!same_layout) {
          spdlog::error("weights version {}: the learner's tensor layout differs from this model's", w->version);
          rt->WaitForStopFor(1000ms);
          continue;
        }
        fetched = w->version;
        metrics.lag->Set(static_cast<double>(w->version - version.load()));
        std::lock_guard<std::mutex> lock(staged_mu);
        staged = std::move(w);
      }
    });
  }
  auto swap_in = [&]() -> uint64_t {
#if AHA_HAVE_NCCL
    if (receiver) {
      const auto t0 = std::chrono::steady_clock::now();
      auto got = receiver->SwapIn(version.load());
      if (!got.ok()) {
        spdlog::error("weight swap: {}", got.status().ToString());
      } else if (got->has_value()) {
        backend.Synchronize();  // the swap is queued on the model's stream: time it to the end
        version = **got;
        spdlog::info("swapped in policy version {} (NCCL)", version.load());
        metrics.swaps->Increment();
        metrics.swap_seconds->Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        metrics.version->Set(static_cast<double>(version.load()));
        metrics.lag->Set(static_cast<double>(receiver->received_version()) - static_cast<double>(version.load()));
      }
    }
#endif
    std::shared_ptr<const WeightsVersion> w;
    {
      std::lock_guard<std::mutex> lock(staged_mu);
      w = std::move(staged);
    }
    if (w && w->version > version.load()) {
      const auto t0 = std::chrono::steady_clock::now();
      model->SetParams(reinterpret_cast<const float*>(w->bytes->data()));
      version = w->version;
      spdlog::info("swapped in policy version {}", w->version);
      metrics.swaps->Increment();
      metrics.swap_seconds->Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      metrics.version->Set(static_cast<double>(version.load()));
      metrics.lag->Set(static_cast<double>(fetched.load() - version.load()));
    }
    return version.load();
  };
  generator.SetStepHook(swap_in);

  uint64_t total_tokens = 0;
  double total_gen_s = 0;
  const auto run_start = std::chrono::steady_clock::now();
  while (!rt->stopping()) {
    if (rt->paused()) {
      rt->WaitForStopFor(100ms);
      continue;
    }
    swap_in();  // the lease below reports the version in use

    capnp::MallocMessageBuilder lm;
    auto lr = InitEnvelope(lm, actor_id).getBody().initLeaseRequest();
    lr.setActorId(actor_id);
    lr.setMaxTasks(static_cast<uint32_t>(lease_tasks));
    lr.setPolicyVersion(version.load());
    lr.setRequestId(lease_request);
    auto lease_env = replay_client->Call(lm, 5000ms);
    if (!lease_env.ok()) {
      spdlog::warn("lease request to {}: {}", replay, lease_env.status().ToString());
      rt->WaitForStopFor(500ms);
      continue;  // the retry keeps its request id: replay hands back the same lease
    }
    ++lease_request;
    if ((*lease_env)->which() != proto::Envelope::Body::PROMPT_LEASE) continue;
    auto lease = (*lease_env)->root().getBody().getPromptLease();
    if (lease.getTasks().size() == 0) {
      rt->WaitForStopFor(std::chrono::milliseconds(std::max<uint32_t>(1, lease.getRetryAfterMs())));
      continue;
    }
    metrics.leases->Increment();

    std::vector<engine::GenerationRequest> requests;
    std::vector<std::vector<int32_t>> prompts;
    for (auto lt : lease.getTasks()) {
      std::string rendered = tmpl->Render(lt.getTask().getPrompt().cStr());
      std::vector<int32_t> prompt = tok.value()->Encode(rendered, false);
      // The R1-Zero output format: a prompt that asks for <answer> tags ends at the closing tag.
      std::vector<std::string> stop_strings;
      if (rendered.find("<answer>") != std::string::npos) stop_strings.push_back("</answer>");
      if (prompt.size() > static_cast<size_t>(max_prompt_tokens)) prompt.resize(max_prompt_tokens);
      uint64_t h = 1469598103934665603ull;
      for (char c : std::string(lt.getGroupId().cStr())) h = Mix(h, static_cast<uint8_t>(c));
      for (uint32_t i = 0; i < lt.getGroupSize(); ++i) {
        engine::GenerationRequest r;
        r.prompt = prompt;
        r.sampling.temperature = static_cast<float>(g.temperature);
        r.sampling.top_p = static_cast<float>(g.top_p);
        r.sampling.top_k = static_cast<int>(g.top_k);
        r.seed = Mix(h, i);
        r.max_new_tokens = static_cast<int>(g.max_new_tokens);
        r.stop_token_ids = stop_ids;
        r.stop_strings = stop_strings;
        requests.push_back(std::move(r));
      }
    }
    auto t_gen = std::chrono::steady_clock::now();
    auto results = generator.Generate(requests, detok);
    double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_gen).count();
    if (!results.ok()) {
      spdlog::error("generation failed: {}", results.status().ToString());
      continue;
    }
    uint64_t new_tokens = 0;
    size_t k = 0;
    for (auto lt : lease.getTasks()) {
      for (uint32_t i = 0; i < lt.getGroupSize(); ++i, ++k) {
        const auto& res = (*results)[k];
        new_tokens += res.tokens.size();
        capnp::MallocMessageBuilder m;
        auto t = InitEnvelope(m, actor_id).getBody().initTrajectory();
        t.setGroupId(lt.getGroupId());
        t.setSampleIndex(i);
        t.setGroupSize(lt.getGroupSize());
        t.setLeaseId(lease.getLeaseId());
        t.setTask(lt.getTask());
        auto pt = t.initPromptTokens(static_cast<unsigned>(requests[k].prompt.size()));
        for (size_t j = 0; j < requests[k].prompt.size(); ++j) pt.set(j, static_cast<uint32_t>(requests[k].prompt[j]));
        auto ct = t.initCompletionTokens(static_cast<unsigned>(res.tokens.size()));
        auto lp = t.initBehaviourLogprobs(static_cast<unsigned>(res.tokens.size()));
        for (size_t j = 0; j < res.tokens.size(); ++j) {
          ct.set(j, static_cast<uint32_t>(res.tokens[j]));
          lp.set(j, res.logprobs[j]);
        }
        t.setCompletionText(detok(res.tokens));
        // Runs of tokens drawn under one policy version (a swap can land mid-completion).
        std::vector<std::pair<uint32_t, uint64_t>> spans;
        for (size_t j = 0; j < res.versions.size(); ++j)
          if (spans.empty() || spans.back().second != res.versions[j]) spans.emplace_back(j, res.versions[j]);
        if (spans.empty()) spans.emplace_back(0, version.load());
        auto vs = t.initVersionSpans(static_cast<unsigned>(spans.size()));
        for (size_t j = 0; j < spans.size(); ++j) {
          vs[j].setStartToken(spans[j].first);
          vs[j].setVersion(spans[j].second);
        }
        t.setFinishReason(res.finish == engine::FinishReason::kStop ? proto::FinishReason::STOP : proto::FinishReason::LENGTH);
        t.setActorId(actor_id);
        t.getTimings().setDecodeMs(static_cast<float>(gen_s * 1000));
        t.setTemperature(static_cast<float>(g.temperature));
        std::string key = std::string(lt.getGroupId().cStr()) + "/" + std::to_string(i);
        for (;;) {  // backpressure: wait for aha-rewardd rather than drop
          Status s = sender->Send(key, m, Clock::now() + 10s);
          if (s.ok() || rt->stopping()) break;
          metrics.send_timeouts->Increment();
          spdlog::warn("trajectory {}: {}", key, s.ToString());
        }
        metrics.samples->Increment();
      }
    }
    // Where the batch's time went (engine/generate.h GeneratorStats): the figures that tell a slow
    // actor's host from its device.
    const engine::GeneratorStats& st = generator.stats();
    spdlog::info("batch of {} sequences, {} tokens in {:.3f} s: prefill {:.3f} s ({} calls), {} decode steps of "
                 "{:.1f} rows at {:.3f} ms, device idle between passes {:.3f} s, {} steps run ahead",
                 requests.size(), new_tokens, gen_s, st.prefill_seconds, st.prefill_calls, st.decode_steps,
                 st.decode_steps ? static_cast<double>(st.decode_rows) / st.decode_steps : 0.0,
                 st.decode_steps ? 1e3 * st.decode_seconds / st.decode_steps : 0.0, st.launch_gap_seconds,
                 st.steps_ahead);
    metrics.tokens->Increment(static_cast<double>(new_tokens));
    total_tokens += new_tokens;
    total_gen_s += gen_s;
    last_tps = new_tokens / std::max(1e-9, gen_s);
    last_sps = static_cast<double>(requests.size()) / std::max(1e-9, gen_s);
    metrics.tokens_per_s->Set(last_tps.load());
    metrics.samples_per_s->Set(last_sps.load());
    metrics.outbox->Set(static_cast<double>(sender->outbox_size()));
  }
  // Give in-flight trajectories a moment to be acknowledged; what is left is re-leased by replay.
  (void)sender->Flush(Clock::now() + 2s);
  if (fetcher.joinable()) fetcher.join();
  // The actor's own rate, for scaling runs (bench/gpu/scaling.sh sums it over actors): the learner
  // only shows what it consumed.
  const double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  spdlog::info("stopped at policy version {}: {} tokens generated in {:.2f} s of generation, {:.2f} s running "
               "({:.0f} tokens/s generating, {:.0f} tokens/s overall)",
               version.load(), total_tokens, total_gen_s, run_s, total_tokens / std::max(1e-9, total_gen_s),
               total_tokens / std::max(1e-9, run_s));
  return 0;
}

}  // namespace aha
