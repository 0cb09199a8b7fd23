// Transport: ZeroMQ sockets carrying Envelope frames (common/wire.h).
//
// Reliable channel (at-least-once, shared/DESIGN.md §1 "Delivery guarantees"):
//   ReliableSender (DEALER, connects) --Envelope{sequence, key, body}--> ReliableReceiver (ROUTER,
//   binds) --Envelope{ack: [sequence, outcome]}--> back to the sender.
//   The sender keeps every message in a bounded outbox until its ack arrives and resends it after
//   `resend_after`. The receiver hands validated messages to the application in batches; the
//   application acknowledges each one *after* it is durable (or forwarded and acknowledged
//   downstream). A resend therefore can arrive twice: receivers deduplicate by the idempotency
//   key (`key`, e.g. "group/3"), which makes the whole path effectively exactly-once.
//   A full outbox makes Send() wait, and fail with Timeout at its deadline: backpressure.
//
// Request/reply with deadlines: RpcClient (DEALER) / RpcServer (ROUTER). A reply matches its
// request by `sequence`; a call that misses its deadline returns Timeout and its socket is
// rebuilt, so a late reply can never be mistaken for the next call's.
//
// Threading: every socket lives on one I/O thread owned by its object. Public methods are
// thread-safe unless noted. Handlers run on the I/O thread and must not block for long.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <zmq.hpp>

#include "common/status.h"
#include "common/wire.h"

namespace aha {

using Clock = std::chrono::steady_clock;
using Millis = std::chrono::milliseconds;

// The port a "tcp://host:port" endpoint is bound to (after binding to port 0), or 0.
int EndpointPort(const std::string& endpoint);

// ---------------------------------------------------------------------------------------------
// ReliableSender

struct ReliableSenderOptions {
  std::string endpoint;             // "tcp://127.0.0.1:5601"
  std::string name = "sender";      // Envelope.sender, for the receiver's logs
  size_t max_outbox = 4096;         // unacknowledged messages held; Send() waits beyond this
  Millis resend_after{1000};        // resend a message not acknowledged within this time
  WireLimits limits;
  WireStats* stats = nullptr;       // where malformed acks are counted (optional)
  // Called on the I/O thread when the receiver rejects a message for good (it is not resent).
  std::function<void(const std::string& key, const std::string& reason)> on_rejected;
};

struct ReliableSenderCounters {
  uint64_t sent = 0;       // first transmissions
  uint64_t resent = 0;     // retransmissions after a timeout
  uint64_t acked = 0;      // handled by the receiver
  uint64_t rejected = 0;   // rejected by the receiver
};

class ReliableSender {
 public:
  static Result<std::unique_ptr<ReliableSender>> Create(zmq::context_t& context,
                                                        ReliableSenderOptions options);
  ~ReliableSender();  // stops the I/O thread; unacknowledged messages are dropped (not durable)

  // Stamps sequence and key into the message's Envelope (its body must be set) and queues it.
  // Waits while the outbox is full; Timeout at `deadline`, Cancelled after Close().
  Status Send(const std::string& key, capnp::MessageBuilder& message, Clock::time_point deadline);
  // Waits until every queued message is acknowledged; Timeout at `deadline`.
  Status Flush(Clock::time_point deadline);
  size_t outbox_size() const;
  ReliableSenderCounters counters() const;
  void Close();

 private:
  explicit ReliableSender(zmq::context_t& context, ReliableSenderOptions options);
  void Run();
  using Frame = std::shared_ptr<const kj::Array<capnp::word>>;
  struct Pending {
    std::string key;
    Frame frame;  // shared with ZeroMQ while a transmission is in its queue (zero-copy)
    Clock::time_point due;  // next (re)send time
    bool transmitted = false;
  };

  zmq::context_t& context_;
  ReliableSenderOptions options_;
  mutable std::mutex mu_;
  std::condition_variable space_cv_;     // outbox shrank
  std::map<uint64_t, Pending> outbox_;   // by sequence
  std::deque<uint64_t> fresh_;           // queued, not yet transmitted
  uint64_t next_sequence_ = 1;
  ReliableSenderCounters counters_;
  bool closed_ = false;
  int wake_fd_ = -1;                     // eventfd: Send() wakes the I/O thread
  std::thread io_;
};

// ---------------------------------------------------------------------------------------------
// ReliableReceiver

// Identifies one received message for its acknowledgement. Copyable; valid after the handler.
struct AckToken {
  std::string peer;       // ZeroMQ routing id of the sending connection
  uint64_t sequence = 0;
};

struct Delivery {
  AckToken token;
  std::string key;
  std::unique_ptr<DecodedEnvelope> envelope;
};

struct ReliableReceiverOptions {
  std::string endpoint;     // bind address; port 0 picks a free one (see bound_endpoint())
  BodyKinds accepts{proto::Envelope::Body::BLOB};
  size_t max_batch = 1024;  // deliveries per handler call
  WireLimits limits;
  WireStats* stats = nullptr;
  // Called on the I/O thread with every batch of valid deliveries. It may Ack() at once or later.
  // A kj::Exception thrown while reading a delivery is caught: the batch's unacked deliveries are
  // not acked (their sender resends) and the frame is counted as malformed "decode".
  std::function<void(std::vector<Delivery>& batch)> handler;
};

class ReliableReceiver {
 public:
  static Result<std::unique_ptr<ReliableReceiver>> Create(zmq::context_t& context,
                                                          ReliableReceiverOptions options);
  ~ReliableReceiver();
  // Thread-safe. `handled` = durable; otherwise rejected for good with `reason` (not resent).
  void Ack(const AckToken& token, bool handled = true, const std::string& reason = "");
  void Ack(const std::vector<AckToken>& tokens);
  std::string bound_endpoint() const { return bound_endpoint_; }
  uint64_t received() const { return received_.load(); }
  void Close();

 private:
  explicit ReliableReceiver(zmq::context_t& context, ReliableReceiverOptions options);
  void Run();
  void FlushAcks(zmq::socket_t& socket);

  zmq::context_t& context_;
  ReliableReceiverOptions options_;
  std::string bound_endpoint_;
  std::mutex mu_;
  struct PendingAck {
    AckToken token;
    bool handled;
    std::string reason;
  };
  std::vector<PendingAck> acks_;
  std::atomic<uint64_t> received_{0};
  std::atomic<bool> closed_{false};
  int wake_fd_ = -1;
  std::unique_ptr<zmq::socket_t> socket_;  // created by Create(), used only by the I/O thread
  std::thread io_;
};

// ---------------------------------------------------------------------------------------------
// Request/reply

struct RpcServerOptions {
  std::string endpoint;  // bind address; port 0 picks one
  std::string name = "server";
  BodyKinds accepts{proto::Envelope::Body::CONTROL_REQUEST};
  WireLimits limits;
  WireStats* stats = nullptr;
  // Fills `reply`'s body (InitEnvelope is already done). A non-ok Status becomes an ErrorReply.
  std::function<Status(const proto::Envelope::Reader& request, proto::Envelope::Builder reply)>
      handler;
};

class RpcServer {
 public:
  static Result<std::unique_ptr<RpcServer>> Create(zmq::context_t& context, RpcServerOptions options);
  ~RpcServer();
  std::string bound_endpoint() const { return bound_endpoint_; }
  void Close();

 private:
  explicit RpcServer(zmq::context_t& context, RpcServerOptions options);
  void Run();
  zmq::context_t& context_;
  RpcServerOptions options_;
  std::string bound_endpoint_;
  std::atomic<bool> closed_{false};
  std::unique_ptr<zmq::socket_t> socket_;
  std::thread io_;
};

struct RpcClientOptions {
  std::string endpoint;
  std::string name = "client";
  WireLimits limits;
  WireStats* stats = nullptr;
};

// Not an I/O thread: Call() runs on the caller's thread, serialised by a mutex.
class RpcClient {
 public:
  static Result<std::unique_ptr<RpcClient>> Create(zmq::context_t& context, RpcClientOptions options);
  // Sends `request` (an Envelope with its body set) and waits for the reply until `timeout`.
  // Timeout when none came; Unavailable with the server's message for an ErrorReply. `abandon`
  // (may be empty) is asked at least every kAbandonPoll while the call waits: true gives the call
  // up with Cancelled (a daemon that is stopping does not wait out a peer that is gone).
  Result<std::unique_ptr<DecodedEnvelope>> Call(capnp::MessageBuilder& request, Millis timeout,
                                                const std::function<bool()>& abandon = {});
  static constexpr Millis kAbandonPoll{20};

 private:
  RpcClient(zmq::context_t& context, RpcClientOptions options);
  void Connect();
  zmq::context_t& context_;
  RpcClientOptions options_;
  std::mutex mu_;
  std::unique_ptr<zmq::socket_t> socket_;
  uint64_t next_sequence_ = 1;
};

}  // namespace aha
