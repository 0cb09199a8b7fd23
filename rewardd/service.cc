#include "rewardd/service.h"

#include <capnp/message.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <spdlog/spdlog.h>

#include "common/metrics.h"

namespace aha::rewardd {
namespace {

std::string TaskKindName(proto::TaskKind k) {
  switch (k) {
    case proto::TaskKind::MATH: return "math";
    case proto::TaskKind::COUNTDOWN: return "countdown";
    case proto::TaskKind::ARITH: return "arith";
    case proto::TaskKind::CODE: return "code";
    default: return "other";
  }
}

// Capnp Text must not hold NUL; notes and answers are short by design.
std::string SafeText(const std::string& s, size_t max = 1024) {
  std::string out = s.substr(0, max);
  for (char& c : out)
    if (c == '\0') c = '?';
  return out;
}

std::string_view View(capnp::Text::Reader t) { return std::string_view(t.begin(), t.size()); }

}  // namespace

struct RewardService::Item {
  std::string key;
  std::unique_ptr<DecodedEnvelope> envelope;
  Clock::time_point received;
  std::unique_ptr<capnp::MallocMessageBuilder> scored;  // set by a worker
};

struct RewardService::Metrics {
  prometheus::Counter* scored = nullptr;
  prometheus::Counter* correct = nullptr;
  prometheus::Counter* duplicates = nullptr;
  prometheus::Gauge* rate = nullptr;
  prometheus::Gauge* in_flight = nullptr;
  prometheus::Gauge* outbox = nullptr;
  prometheus::Histogram* score_seconds = nullptr;
  prometheus::Histogram* latency_seconds = nullptr;
  prometheus::Histogram* response_length = nullptr;
  prometheus::Counter* truncated = nullptr;
  prometheus::Family<prometheus::Histogram>* reward = nullptr;
  prometheus::Family<prometheus::Counter>* sandbox = nullptr;
  prometheus::Family<prometheus::Counter>* rejected = nullptr;
  std::mutex mu;  // guards the lazily added labelled children
  std::map<std::string, prometheus::Histogram*> reward_by_component;

  explicit Metrics(prometheus::Registry& r) {
    const std::string p = "aha_rewardd_";
    scored = &prometheus::BuildCounter().Name(p + "scored_total").Help("Trajectories scored").Register(r).Add({});
    correct = &prometheus::BuildCounter().Name(p + "correct_total").Help("Trajectories the verifier accepted").Register(r).Add({});
    duplicates = &prometheus::BuildCounter().Name(p + "duplicates_total").Help("Resent trajectories joined to one in flight").Register(r).Add({});
    rate = &prometheus::BuildGauge().Name(p + "scored_per_second").Help("Trajectories scored per second (last interval)").Register(r).Add({});
    in_flight = &prometheus::BuildGauge().Name(p + "in_flight").Help("Trajectories received and not yet acknowledged upstream").Register(r).Add({});
    outbox = &prometheus::BuildGauge().Name(p + "outbox_depth").Help("ScoredTrajectory not yet acknowledged by replay").Register(r).Add({});
    score_seconds = &prometheus::BuildHistogram().Name(p + "score_seconds").Help("Scoring time per trajectory").Register(r)
                         .Add({}, ExponentialBuckets(1e-6, 4, 14));
    latency_seconds = &prometheus::BuildHistogram().Name(p + "latency_seconds").Help("Receipt to upstream acknowledgement").Register(r)
                           .Add({}, ExponentialBuckets(1e-4, 3, 14));
    reward = &prometheus::BuildHistogram().Name(p + "reward").Help("Reward per component (unweighted) and total").Register(r);
    response_length = &prometheus::BuildHistogram().Name(p + "response_length_tokens").Help("Completion length of each scored trajectory, tokens").Register(r)
                           .Add({}, ExponentialBuckets(4, 2, 12));
    truncated = &prometheus::BuildCounter().Name(p + "truncated_total").Help("Scored completions cut off at max_new_tokens").Register(r).Add({});
    sandbox = &prometheus::BuildCounter().Name(p + "sandbox_outcomes_total").Help("Code test runs by outcome").Register(r);
    // Every reason ScoreCode (rewards.cc) counts, present at 0 from the start: a dashboard or an
    // alert then sees a series, not nothing, on a run that has not run code yet.
    for (const char* reason : {"passed", "wrong_output", "compile_error", "runtime_error", "signal", "wall_timeout",
                               "cpu_limit", "memory", "output_limit", "sandbox_error"})
      sandbox->Add({{"reason", reason}});
    rejected = &prometheus::BuildCounter().Name(p + "rejected_total").Help("Trajectories rejected, by reason").Register(r);
  }

  void ObserveReward(const std::string& component, double v) {
    prometheus::Histogram* h;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = reward_by_component.find(component);
      if (it == reward_by_component.end()) {
        prometheus::Histogram::BucketBoundaries b;
        for (int i = -10; i <= 10; ++i) b.push_back(i * 0.1 + 1e-9);
        for (double x : {1.5, 2.0, 3.0, 5.0}) b.push_back(x);
        it = reward_by_component.emplace(component, &reward->Add({{"component", component}}, b)).first;
      }
      h = it->second;
    }
    h->Observe(v);
  }
};

RewardService::RewardService(const Scorer* scorer, RewardServiceOptions options)
    : scorer_(scorer), options_(std::move(options)) {}

RewardService::~RewardService() { Close(Millis(0)); }

Result<std::unique_ptr<RewardService>> RewardService::Create(zmq::context_t& context, const Scorer* scorer,
                                                             RewardServiceOptions options) {
  if (scorer == nullptr) return InvalidArgument("rewardd: no scorer");
  if (options.replay_endpoint.empty()) return InvalidArgument("rewardd: no replay endpoint");
  if (options.workers < 1 || options.workers > 4096) return InvalidArgument("rewardd: workers must be in [1, 4096]");
  if (options.max_in_flight < 1 || options.max_round < 1) return InvalidArgument("rewardd: max_in_flight and max_round must be positive");
  std::unique_ptr<RewardService> s(new RewardService(scorer, std::move(options)));
  RewardService* self = s.get();
  if (s->options_.registry) s->metrics_ = std::make_unique<Metrics>(*s->options_.registry);

  ReliableSenderOptions so;
  so.endpoint = s->options_.replay_endpoint;
  so.name = s->options_.name;
  so.max_outbox = std::max(s->options_.max_round, s->options_.max_in_flight);
  so.resend_after = s->options_.resend_after;
  so.stats = s->options_.stats;
  so.on_rejected = [self](const std::string& key, const std::string& reason) {
    std::lock_guard<std::mutex> lock(self->mu_);
    self->rejected_by_replay_[key] = reason;
  };
  ASSIGN_OR_RETURN(s->sender_, ReliableSender::Create(context, std::move(so)));

  for (int i = 0; i < s->options_.workers; ++i) s->workers_.emplace_back([self] { self->WorkerLoop(); });
  s->forwarder_ = std::thread([self] { self->ForwarderLoop(); });

  ReliableReceiverOptions ro;
  ro.endpoint = s->options_.listen_endpoint;
  ro.accepts = BodyKinds{proto::Envelope::Body::TRAJECTORY};
  ro.max_batch = 1024;
  ro.stats = s->options_.stats;
  ro.handler = [self](std::vector<Delivery>& batch) { self->HandleBatch(batch); };
  auto receiver = ReliableReceiver::Create(context, std::move(ro));
  if (!receiver.ok()) {
    s->Close(Millis(0));
    return receiver.status();
  }
  s->receiver_ = std::move(*receiver);
  return s;
}

void RewardService::HandleBatch(std::vector<Delivery>& batch) {
  for (auto& d : batch) {
    std::unique_lock<std::mutex> lock(mu_);
    if (d.key.empty()) {
      lock.unlock();
      receiver_->Ack(d.token, false, "no idempotency key");
      if (metrics_) metrics_->rejected->Add({{"reason", "no_key"}}).Increment();
      continue;
    }
    counters_.received++;
    auto it = in_flight_.find(d.key);
    if (it != in_flight_.end()) {
      it->second.push_back(d.token);
      counters_.duplicates++;
      if (metrics_) metrics_->duplicates->Increment();
      continue;
    }
    // Backpressure: hold the receiver's thread; unacknowledged actors resend later.
    space_cv_.wait(lock, [&] { return closing_ || in_flight_.size() < options_.max_in_flight; });
    if (closing_) return;  // not acknowledged: the actor resends to our successor
    in_flight_[d.key] = {d.token};
    auto item = std::make_unique<Item>();
    item->key = d.key;
    item->envelope = std::move(d.envelope);
    item->received = Clock::now();
    work_.push_back(std::move(item));
    work_cv_.notify_one();
  }
}

void RewardService::WorkerLoop() {
  for (;;) {
    std::unique_ptr<Item> item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || (!paused_ && !work_.empty()); });
      if (stop_) return;
      item = std::move(work_.front());
      work_.pop_front();
    }
    auto t0 = Clock::now();
    std::string reject_reason;
    ScoreReport report;
    size_t completion_tokens = 0;
    bool truncated = false;
    try {
      auto traj = item->envelope->root().getBody().getTrajectory();
      auto task = traj.getTask();
      TaskSpec spec;
      spec.kind = TaskKindName(task.getKind());
      spec.answer = std::string(View(task.getAnswer()));
      for (int64_t n : task.getNumbers()) spec.numbers.push_back(n);
      spec.target = task.getTarget();
      for (auto t : task.getTests())
        spec.tests.push_back({std::string(View(t.getStdin())), std::string(View(t.getExpectedStdout()))});
      if (task.getLanguage().size() > 0) spec.language = std::string(View(task.getLanguage()));
      Completion c;
      c.text = View(traj.getCompletionText());
      c.tokens = traj.getCompletionTokens().size() > 0 || c.text.empty()
                     ? static_cast<int64_t>(traj.getCompletionTokens().size())
                     : -1;
      c.truncated = traj.getFinishReason() == proto::FinishReason::LENGTH;
      completion_tokens = traj.getCompletionTokens().size();
      truncated = c.truncated;
      report = scorer_->Score(spec, c);

      item->scored = std::make_unique<capnp::MallocMessageBuilder>();
      auto env = InitEnvelope(*item->scored, options_.name);
      auto st = env.getBody().initScoredTrajectory();
      st.setTrajectory(traj);
      st.setReward(static_cast<float>(report.total));
      auto comps = st.initComponents(static_cast<unsigned>(report.components.size()));
      for (size_t i = 0; i < report.components.size(); ++i) {
        const auto& rc = report.components[i];
        auto out = comps[static_cast<unsigned>(i)];
        out.setName(rc.name);
        out.setScore(static_cast<float>(rc.score));
        out.setWeight(static_cast<float>(rc.weight));
        out.setNote(SafeText(rc.note, 256));
      }
      st.setAnswerExtracted(SafeText(report.answer_extracted));
      st.setCorrect(report.correct);
    } catch (const kj::Exception& e) {
      reject_reason = std::string("unreadable trajectory: ") + e.getDescription().cStr();
    } catch (const std::exception& e) {  // e.g. bad_alloc on a hostile size: reject, never crash
      reject_reason = std::string("cannot score: ") + e.what();
    }
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!reject_reason.empty()) {
      if (metrics_) metrics_->rejected->Add({{"reason", "decode"}}).Increment();
      AckUpstream(item->key, false, reject_reason);
      continue;
    }
    if (metrics_) {
      metrics_->scored->Increment();
      if (report.correct) metrics_->correct->Increment();
      metrics_->score_seconds->Observe(secs);
      metrics_->response_length->Observe(static_cast<double>(completion_tokens));
      if (truncated) metrics_->truncated->Increment();
      for (const auto& rc : report.components) metrics_->ObserveReward(rc.name, rc.score);
      metrics_->ObserveReward("total", report.total);
      for (const auto& [reason, n] : report.sandbox_outcomes)
        metrics_->sandbox->Add({{"reason", reason}}).Increment(n);
    }
    std::lock_guard<std::mutex> lock(mu_);
    counters_.scored++;
    if (report.correct) counters_.correct++;
    scored_.push_back(std::move(item));
    scored_cv_.notify_one();
  }
}

void RewardService::AckUpstream(const std::string& key, bool handled, const std::string& reason) {
  std::vector<AckToken> tokens;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_flight_.find(key);
    if (it == in_flight_.end()) return;
    tokens = std::move(it->second);
    in_flight_.erase(it);
    if (handled) counters_.acked_upstream += tokens.size();
    else counters_.rejected += tokens.size();
  }
  space_cv_.notify_all();
  for (const auto& t : tokens) receiver_->Ack(t, handled, reason);
}

void RewardService::ForwarderLoop() {
  auto last_tick = Clock::now();
  uint64_t last_scored = 0;
  for (;;) {
    std::vector<std::unique_ptr<Item>> round;
    {
      std::unique_lock<std::mutex> lock(mu_);
      scored_cv_.wait_for(lock, Millis(250), [&] { return stop_ || !scored_.empty(); });
      if (stop_ && scored_.empty()) return;
      while (!scored_.empty() && round.size() < options_.max_round) {
        round.push_back(std::move(scored_.front()));
        scored_.pop_front();
      }
      auto now = Clock::now();
      double dt = std::chrono::duration<double>(now - last_tick).count();
      if (dt >= 1.0) {
        rate_.store(static_cast<double>(counters_.scored - last_scored) / dt);
        last_scored = counters_.scored;
        last_tick = now;
        if (metrics_) {
          metrics_->rate->Set(rate_.load());
          metrics_->in_flight->Set(static_cast<double>(in_flight_.size()));
          metrics_->outbox->Set(static_cast<double>(sender_->outbox_size()));
        }
      }
    }
    if (round.empty()) continue;
    bool cancelled = false;
    for (auto& item : round) {
      for (;;) {
        Status st = sender_->Send(item->key, *item->scored, Clock::now() + Millis(500));
        if (st.ok()) break;
        if (IsCancelled(st)) {
          cancelled = true;
          break;
        }
      }
      if (cancelled) break;
    }
    // Replay must hold the whole round durably before any of it is acknowledged upstream.
    while (!cancelled) {
      Status st = sender_->Flush(Clock::now() + Millis(500));
      if (st.ok()) break;
      if (IsCancelled(st)) cancelled = true;
    }
    if (cancelled) return;  // Close(): unacknowledged trajectories are resent by the actors
    {
      std::lock_guard<std::mutex> lock(mu_);
      counters_.forwarded += round.size();
    }
    auto now = Clock::now();
    for (auto& item : round) {
      std::string reason;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = rejected_by_replay_.find(item->key);
        if (it != rejected_by_replay_.end()) {
          reason = it->second;
          rejected_by_replay_.erase(it);
        }
      }
      if (!reason.empty() && metrics_) metrics_->rejected->Add({{"reason", "replay: " + reason}}).Increment();
      AckUpstream(item->key, reason.empty(), reason);
      if (metrics_) metrics_->latency_seconds->Observe(std::chrono::duration<double>(now - item->received).count());
    }
  }
}

void RewardService::SetPaused(bool paused) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    paused_ = paused;
  }
  work_cv_.notify_all();
}

RewardServiceCounters RewardService::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

size_t RewardService::in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_flight_.size();
}

void RewardService::Close(Millis drain) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (stop_) return;
    closing_ = true;
    paused_ = false;
    space_cv_.notify_all();
    work_cv_.notify_all();
    // Finish what is held: score it, forward it, acknowledge it.
    space_cv_.wait_for(lock, drain, [&] { return in_flight_.empty(); });
    stop_ = true;
  }
  work_cv_.notify_all();
  scored_cv_.notify_all();
  if (sender_) sender_->Close();  // unblocks a forwarder waiting on replay
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  if (forwarder_.joinable()) forwarder_.join();
  if (receiver_) receiver_->Close();
}

}  // namespace aha::rewardd
