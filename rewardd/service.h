// RewardService: aha-rewardd's data path. Trajectories in from actors, ScoredTrajectory out to
// replay, upstream acknowledgements only after replay acknowledged (shared/DESIGN.md §1).
//
//   actor --Trajectory--> [ReliableReceiver] --queue--> worker pool (Scorer, sandbox)
//         --scored queue--> forwarder --ScoredTrajectory--> [ReliableSender] --> aha-replay
//   forwarder: sends one *round* (whatever is scored, up to max_round), waits for replay to
//   acknowledge the whole round (ReliableSender::Flush), then acknowledges each trajectory of the
//   round upstream: handled, or rejected with replay's reason (the actor then drops it). Rounds are
//   how "ack after downstream ack" is done with a sender that reports rejections per key but
//   acceptances only as a drained outbox; a round costs one replay write, so rounds of hundreds
//   keep the pipe full.
//   Idempotency: a trajectory whose key ("group/sample") is already in flight (an actor resend)
//   is not scored again; its ack token joins the first copy's and both are acknowledged together.
//   A Trajectory that cannot be read (kj::Exception on bad text) is rejected upstream at once.
//
// Backpressure: at most max_in_flight trajectories are held (received, not yet acknowledged
// upstream); beyond that the receive handler waits, the receiver stops acknowledging, and the
// actors' bounded outboxes fill up.
//
// Metrics (prefix aha_rewardd_): scored_total, scored_per_second, correct_total,
// score_seconds (per trajectory, histogram), latency_seconds (receipt to upstream ack),
// reward{component} (histogram per component, and component="total"), response_length_tokens
// (histogram), truncated_total (finished at max_new_tokens), sandbox_outcomes_total{reason},
// rejected_total{reason}, in_flight, outbox_depth, duplicates_total.
//
// Threading: one receiver I/O thread, `workers` scoring threads, one forwarder thread, the
// sender's I/O thread. Close() stops intake, drains what is held, and joins.
#pragma once

#include <prometheus/registry.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <zmq.hpp>

#include "common/transport.h"
#include "rewardd/rewards.h"

namespace aha::rewardd {

struct RewardServiceOptions {
  std::string listen_endpoint = "tcp://127.0.0.1:0";  // Trajectory in (bind)
  std::string replay_endpoint;                         // ScoredTrajectory out (connect), required
  std::string name = "aha-rewardd";
  int workers = 2;
  size_t max_in_flight = 4096;
  size_t max_round = 1024;
  Millis resend_after{1000};
  WireStats* stats = nullptr;
  prometheus::Registry* registry = nullptr;  // metrics when set
};

struct RewardServiceCounters {
  uint64_t received = 0, duplicates = 0, scored = 0, forwarded = 0, acked_upstream = 0,
           rejected = 0, correct = 0;
};

class RewardService {
 public:
  // `scorer` must outlive the service.
  static Result<std::unique_ptr<RewardService>> Create(zmq::context_t& context, const Scorer* scorer,
                                                       RewardServiceOptions options);
  ~RewardService();

  std::string listen_endpoint() const { return receiver_->bound_endpoint(); }
  void SetPaused(bool paused);
  RewardServiceCounters counters() const;
  size_t in_flight() const;
  size_t outbox_depth() const { return sender_ ? sender_->outbox_size() : 0; }
  double scored_per_second() const { return rate_.load(); }
  int workers() const { return options_.workers; }
  // Stops taking trajectories, finishes and forwards what is held (until `drain` passes), joins.
  void Close(Millis drain = Millis(10000));

  struct Metrics;

 private:
  RewardService(const Scorer* scorer, RewardServiceOptions options);
  struct Item;
  void HandleBatch(std::vector<Delivery>& batch);
  void WorkerLoop();
  void ForwarderLoop();
  void AckUpstream(const std::string& key, bool handled, const std::string& reason);

  const Scorer* scorer_;
  RewardServiceOptions options_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<ReliableReceiver> receiver_;
  std::unique_ptr<ReliableSender> sender_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_, scored_cv_, space_cv_;
  std::deque<std::unique_ptr<Item>> work_;
  std::deque<std::unique_ptr<Item>> scored_;
  // key -> ack tokens of every copy received while the key is in flight.
  std::unordered_map<std::string, std::vector<AckToken>> in_flight_;
  std::map<std::string, std::string> rejected_by_replay_;  // key -> reason, filled by the sender
  RewardServiceCounters counters_;
  bool paused_ = false;
  bool closing_ = false;   // no new work accepted
  bool stop_ = false;      // threads exit
  std::atomic<double> rate_{0};
  std::vector<std::thread> workers_;
  std::thread forwarder_;
};

}  // namespace aha::rewardd
