#include "common/transport.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>

namespace aha {
namespace {

int MakeWakeFd() { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

void Wake(int fd) {
  uint64_t one = 1;
  ssize_t n = write(fd, &one, sizeof(one));
  (void)n;  // EAGAIN only when the counter is saturated: the reader is awake anyway
}

void DrainWake(int fd) {
  uint64_t v;
  while (read(fd, &v, sizeof(v)) > 0) {
  }
}

// Polls a socket and the wake fd; returns {socket readable, woken}.
std::pair<bool, bool> PollSocketAndWake(zmq::socket_t& socket, int wake_fd, long timeout_ms) {
  zmq_pollitem_t items[2] = {{socket.handle(), 0, ZMQ_POLLIN, 0}, {nullptr, wake_fd, ZMQ_POLLIN, 0}};
  zmq::poll(items, 2, std::chrono::milliseconds(std::max(0L, timeout_ms)));
  return {(items[0].revents & ZMQ_POLLIN) != 0, (items[1].revents & ZMQ_POLLIN) != 0};
}

std::string PeerName(const zmq::message_t& id) {
  static const char* hex = "0123456789abcdef";
  std::string s = "peer-";
  const auto* p = static_cast<const uint8_t*>(id.data());
  for (size_t i = 0; i < id.size() && i < 8; ++i) {
    s += hex[p[i] >> 4];
    s += hex[p[i] & 15];
  }
  return s;
}

// One message off a ROUTER socket: the sender's routing id and exactly one payload frame.
// Returns false when nothing is waiting; a message of another shape is drained, counted as
// malformed "decode", and *ok is set false.
bool RecvRouterMessage(zmq::socket_t& socket, WireStats* stats, zmq::message_t* id, zmq::message_t* frame,
                       std::string* peer, bool* ok) {
  if (!socket.recv(*id, zmq::recv_flags::dontwait)) return false;
  std::vector<zmq::message_t> parts;
  while (socket.get(zmq::sockopt::rcvmore)) {
    parts.emplace_back();
    (void)socket.recv(parts.back(), zmq::recv_flags::none);
  }
  *peer = PeerName(*id);
  *ok = parts.size() == 1;
  if (*ok) *frame = std::move(parts[0]);
  else if (stats) stats->CountMalformed(MalformedReason::kDecode, *peer, "expected exactly one frame");
  return true;
}

Result<std::string> BindSocket(zmq::socket_t& socket, const std::string& endpoint) {
  try {
    socket.bind(endpoint);
  } catch (const zmq::error_t& e) {
    return Unavailable("cannot bind " + endpoint + ": " + e.what());
  }
  return socket.get(zmq::sockopt::last_endpoint);
}

}  // namespace

int EndpointPort(const std::string& endpoint) {
  auto colon = endpoint.rfind(':');
  if (colon == std::string::npos) return 0;
  try {
    return std::stoi(endpoint.substr(colon + 1));
  } catch (...) {
    return 0;
  }
}

// ---------------------------------------------------------------------------------------------
// ReliableSender

ReliableSender::ReliableSender(zmq::context_t& context, ReliableSenderOptions options)
    : context_(context), options_(std::move(options)) {}

Result<std::unique_ptr<ReliableSender>> ReliableSender::Create(zmq::context_t& context,
                                                               ReliableSenderOptions options) {
  if (options.endpoint.empty()) return InvalidArgument("reliable sender: empty endpoint");
  if (options.max_outbox == 0) return InvalidArgument("reliable sender: max_outbox must be > 0");
  std::unique_ptr<ReliableSender> s(new ReliableSender(context, std::move(options)));
  s->wake_fd_ = MakeWakeFd();
  if (s->wake_fd_ < 0) return Internal("eventfd failed");
  s->io_ = std::thread([p = s.get()] { p->Run(); });
  return s;
}

ReliableSender::~ReliableSender() {
  Close();
  if (wake_fd_ >= 0) close(wake_fd_);
}

void ReliableSender::Close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_ && !io_.joinable()) return;
    closed_ = true;
  }
  space_cv_.notify_all();
  if (wake_fd_ >= 0) Wake(wake_fd_);
  if (io_.joinable()) io_.join();
}

Status ReliableSender::Send(const std::string& key, capnp::MessageBuilder& message,
                            Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!space_cv_.wait_until(lock, deadline,
                            [&] { return closed_ || outbox_.size() < options_.max_outbox; }))
    return Timeout("outbox to " + options_.endpoint + " is full (" +
                   std::to_string(outbox_.size()) + " unacknowledged messages)");
  if (closed_) return Cancelled("sender closed");
  uint64_t sequence = next_sequence_++;
  lock.unlock();

  auto env = message.getRoot<proto::Envelope>();
  env.setSequence(sequence);
  env.setKey(key);
  if (env.getMagic() != proto::K_MAGIC) {  // the caller used initRoot, not InitEnvelope
    env.setMagic(proto::K_MAGIC);
    env.setSchemaVersion(proto::K_WIRE_VERSION);
    env.setSender(options_.name);
  }
  Pending p;
  p.key = key;
  p.frame = std::make_shared<const kj::Array<capnp::word>>(EncodeFrame(message));

  lock.lock();
  outbox_.emplace(sequence, std::move(p));
  fresh_.push_back(sequence);
  lock.unlock();
  Wake(wake_fd_);
  return OkStatus();
}

Status ReliableSender::Flush(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!space_cv_.wait_until(lock, deadline, [&] { return closed_ || outbox_.empty(); }))
    return Timeout(std::to_string(outbox_.size()) + " messages to " + options_.endpoint +
                   " still unacknowledged");
  return closed_ && !outbox_.empty() ? Cancelled("sender closed") : OkStatus();
}

size_t ReliableSender::outbox_size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return outbox_.size();
}

ReliableSenderCounters ReliableSender::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

void ReliableSender::Run() {
  zmq::socket_t socket(context_, zmq::socket_type::dealer);
  socket.set(zmq::sockopt::linger, 0);
  // Queue nothing for a peer that is not connected: such messages would sit in ZeroMQ's pipe
  // where we cannot see them; instead they stay `fresh` in our outbox until a peer is there.
  socket.set(zmq::sockopt::immediate, 1);
  socket.set(zmq::sockopt::sndhwm, 16384);
  socket.set(zmq::sockopt::rcvhwm, 16384);
  socket.set(zmq::sockopt::reconnect_ivl, 50);
  socket.set(zmq::sockopt::reconnect_ivl_max, 1000);
  socket.connect(options_.endpoint);

  // (due time, sequence) in transmission order; due times grow, so the front is the earliest.
  std::deque<std::pair<Clock::time_point, uint64_t>> resend_queue;
  bool blocked = false;  // the last send hit the high-water mark or found no peer

  // Zero-copy: ZeroMQ holds a reference to the frame until its I/O thread has written it.
  auto transmit = [&](const Frame& frame) {
    auto* hold = new Frame(frame);
    zmq::message_t msg(const_cast<capnp::word*>(frame->begin()), frame->size() * sizeof(capnp::word),
                       [](void*, void* hint) { delete static_cast<Frame*>(hint); }, hold);
    auto r = socket.send(msg, zmq::send_flags::dontwait);
    return r.has_value();  // on failure msg still owns `hold` and releases it
  };

  for (;;) {
    long timeout_ms = 200;
    if (blocked) timeout_ms = 5;
    if (!resend_queue.empty()) {
      auto wait = std::chrono::duration_cast<Millis>(resend_queue.front().first - Clock::now());
      timeout_ms = std::min<long>(timeout_ms, std::max<long>(0, wait.count()));
    }
    auto [readable, woken] = PollSocketAndWake(socket, wake_fd_, timeout_ms);
    if (woken) DrainWake(wake_fd_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) break;
    }

    // Acknowledgements.
    if (readable) {
      size_t freed = 0;
      for (int i = 0; i < 4096; ++i) {
        zmq::message_t msg;
        if (!socket.recv(msg, zmq::recv_flags::dontwait)) break;
        MalformedReason why;
        auto env = DecodeEnvelope(msg.data(), msg.size(), options_.limits, &why);
        if (!env.ok()) {
          if (options_.stats) options_.stats->CountMalformed(why, options_.endpoint, env.status().message());
          continue;
        }
        if ((*env)->which() != proto::Envelope::Body::ACK) {
          if (options_.stats)
            options_.stats->CountMalformed(MalformedReason::kSchema, options_.endpoint, "expected an ack");
          continue;
        }
        std::vector<std::pair<std::string, std::string>> rejected;
        try {
          auto entries = (*env)->root().getBody().getAck().getEntries();
          std::lock_guard<std::mutex> lock(mu_);
          for (auto e : entries) {
            auto it = outbox_.find(e.getSequence());
            if (it == outbox_.end()) continue;  // a duplicate ack of a resent message
            if (e.getOutcome() == proto::AckOutcome::REJECTED) {
              counters_.rejected++;
              rejected.emplace_back(it->second.key, e.getReason());
            } else {
              counters_.acked++;
            }
            outbox_.erase(it);
            freed++;
          }
        } catch (const kj::Exception& e) {
          if (options_.stats)
            options_.stats->CountMalformed(MalformedReason::kDecode, options_.endpoint, e.getDescription().cStr());
        }
        if (options_.on_rejected)
          for (auto& [k, r] : rejected) options_.on_rejected(k, r);
      }
      if (freed) space_cv_.notify_all();
    }

    // First transmissions, in order.
    blocked = false;
    for (;;) {
      uint64_t seq;
      const Frame* frame;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (fresh_.empty()) break;
        seq = fresh_.front();
        auto it = outbox_.find(seq);
        if (it == outbox_.end()) {  // acknowledged already (cannot happen before sending, but cheap)
          fresh_.pop_front();
          continue;
        }
        frame = &it->second.frame;  // map nodes are stable; only this thread erases
      }
      if (!transmit(*frame)) {
        blocked = true;
        break;
      }
      std::lock_guard<std::mutex> lock(mu_);
      fresh_.pop_front();
      counters_.sent++;
      resend_queue.emplace_back(Clock::now() + options_.resend_after, seq);
    }

    // Retransmissions of whatever was not acknowledged in time.
    auto now = Clock::now();
    while (!blocked && !resend_queue.empty() && resend_queue.front().first <= now) {
      uint64_t seq = resend_queue.front().second;
      const Frame* frame = nullptr;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = outbox_.find(seq);
        if (it != outbox_.end()) frame = &it->second.frame;
      }
      if (!frame) {
        resend_queue.pop_front();
        continue;
      }
      if (!transmit(*frame)) {
        blocked = true;
        break;
      }
      resend_queue.pop_front();
      resend_queue.emplace_back(now + options_.resend_after, seq);
      std::lock_guard<std::mutex> lock(mu_);
      counters_.resent++;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ReliableReceiver

ReliableReceiver::ReliableReceiver(zmq::context_t& context, ReliableReceiverOptions options)
    : context_(context), options_(std::move(options)) {}

Result<std::unique_ptr<ReliableReceiver>> ReliableReceiver::Create(zmq::context_t& context,
                                                                   ReliableReceiverOptions options) {
  if (!options.handler) return InvalidArgument("reliable receiver: no handler");
  std::unique_ptr<ReliableReceiver> r(new ReliableReceiver(context, std::move(options)));
  r->socket_ = std::make_unique<zmq::socket_t>(context, zmq::socket_type::router);
  r->socket_->set(zmq::sockopt::linger, 0);
  r->socket_->set(zmq::sockopt::rcvhwm, 16384);
  r->socket_->set(zmq::sockopt::sndhwm, 16384);
  ASSIGN_OR_RETURN(r->bound_endpoint_, BindSocket(*r->socket_, r->options_.endpoint));
  r->wake_fd_ = MakeWakeFd();
  if (r->wake_fd_ < 0) return Internal("eventfd failed");
  r->io_ = std::thread([p = r.get()] { p->Run(); });
  return r;
}

ReliableReceiver::~ReliableReceiver() {
  Close();
  if (wake_fd_ >= 0) close(wake_fd_);
}

void ReliableReceiver::Close() {
  closed_ = true;
  if (wake_fd_ >= 0) Wake(wake_fd_);
  if (io_.joinable()) io_.join();
  socket_.reset();
}

void ReliableReceiver::Ack(const AckToken& token, bool handled, const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    acks_.push_back({token, handled, reason});
  }
  Wake(wake_fd_);
}

void ReliableReceiver::Ack(const std::vector<AckToken>& tokens) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& t : tokens) acks_.push_back({t, true, ""});
  }
  Wake(wake_fd_);
}

void ReliableReceiver::FlushAcks(zmq::socket_t& socket) {
  std::vector<PendingAck> acks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    acks.swap(acks_);
  }
  if (acks.empty()) return;
  std::unordered_map<std::string, std::vector<const PendingAck*>> by_peer;
  for (const auto& a : acks) by_peer[a.token.peer].push_back(&a);
  for (auto& [peer, list] : by_peer) {
    for (size_t start = 0; start < list.size(); start += 8192) {
      size_t n = std::min<size_t>(8192, list.size() - start);
      capnp::MallocMessageBuilder message;
      auto env = InitEnvelope(message, "receiver");
      auto entries = env.getBody().initAck().initEntries(static_cast<unsigned>(n));
      for (size_t i = 0; i < n; ++i) {
        const PendingAck* a = list[start + i];
        entries[i].setSequence(a->token.sequence);
        entries[i].setOutcome(a->handled ? proto::AckOutcome::HANDLED : proto::AckOutcome::REJECTED);
        if (!a->reason.empty()) entries[i].setReason(a->reason);
      }
      auto words = EncodeFrame(message);
      zmq::message_t id(peer.data(), peer.size());
      zmq::message_t body(words.begin(), words.size() * sizeof(capnp::word));
      // A full pipe or a vanished peer drops the ack; the sender resends and we ack again.
      if (!socket.send(id, zmq::send_flags::sndmore | zmq::send_flags::dontwait)) continue;
      (void)socket.send(body, zmq::send_flags::dontwait);
    }
  }
}

void ReliableReceiver::Run() {
  zmq::socket_t& socket = *socket_;
  std::vector<Delivery> batch;
  while (!closed_) {
    auto [readable, woken] = PollSocketAndWake(socket, wake_fd_, 200);
    if (woken) DrainWake(wake_fd_);
    if (closed_) break;
    if (readable) {
      batch.clear();
      while (batch.size() < options_.max_batch) {
        zmq::message_t id, payload;
        std::string peer;
        bool ok = false;
        if (!RecvRouterMessage(socket, options_.stats, &id, &payload, &peer, &ok)) break;
        if (!ok) continue;
        received_++;
        MalformedReason why;
        auto frame = std::make_shared<zmq::message_t>(std::move(payload));
        auto env = DecodeEnvelope(frame->data(), frame->size(), options_.limits, &why, frame);
        if (!env.ok()) {
          if (options_.stats) options_.stats->CountMalformed(why, peer, env.status().message());
          continue;
        }
        if (!options_.accepts.Accepts((*env)->which())) {
          if (options_.stats)
            options_.stats->CountMalformed(MalformedReason::kSchema, peer,
                                           "body kind " + std::to_string(int((*env)->which())) +
                                               " is not accepted here");
          continue;
        }
        Delivery d;
        d.token.peer.assign(static_cast<const char*>(id.data()), id.size());
        try {
          d.token.sequence = (*env)->root().getSequence();
          d.key = (*env)->root().getKey();
        } catch (const kj::Exception& e) {
          if (options_.stats) options_.stats->CountMalformed(MalformedReason::kDecode, peer, e.getDescription().cStr());
          continue;
        }
        d.envelope = std::move(env).value();
        batch.push_back(std::move(d));
      }
      if (!batch.empty()) {
        try {
          options_.handler(batch);
        } catch (const kj::Exception& e) {
          if (options_.stats)
            options_.stats->CountMalformed(MalformedReason::kDecode, "batch", e.getDescription().cStr());
        }
      }
    }
    FlushAcks(socket);
  }
  FlushAcks(socket);
}

// ---------------------------------------------------------------------------------------------
// RpcServer

RpcServer::RpcServer(zmq::context_t& context, RpcServerOptions options)
    : context_(context), options_(std::move(options)) {}

Result<std::unique_ptr<RpcServer>> RpcServer::Create(zmq::context_t& context, RpcServerOptions options) {
  if (!options.handler) return InvalidArgument("rpc server: no handler");
  std::unique_ptr<RpcServer> s(new RpcServer(context, std::move(options)));
  s->socket_ = std::make_unique<zmq::socket_t>(context, zmq::socket_type::router);
  s->socket_->set(zmq::sockopt::linger, 0);
  ASSIGN_OR_RETURN(s->bound_endpoint_, BindSocket(*s->socket_, s->options_.endpoint));
  s->io_ = std::thread([p = s.get()] { p->Run(); });
  return s;
}

RpcServer::~RpcServer() { Close(); }

void RpcServer::Close() {
  closed_ = true;
  if (io_.joinable()) io_.join();
  socket_.reset();
}

void RpcServer::Run() {
  zmq::socket_t& socket = *socket_;
  while (!closed_) {
    zmq_pollitem_t items[1] = {{socket.handle(), 0, ZMQ_POLLIN, 0}};
    zmq::poll(items, 1, Millis(100));
    if (!(items[0].revents & ZMQ_POLLIN)) continue;
    zmq::message_t id, payload;
    std::string peer;
    bool ok = false;
    if (!RecvRouterMessage(socket, options_.stats, &id, &payload, &peer, &ok) || !ok) continue;
    MalformedReason why;
    auto request = DecodeEnvelope(payload.data(), payload.size(), options_.limits, &why);
    if (!request.ok()) {
      if (options_.stats) options_.stats->CountMalformed(why, peer, request.status().message());
      continue;
    }
    capnp::MallocMessageBuilder message;
    auto reply = InitEnvelope(message, options_.name);
    Status status;
    try {
      auto root = (*request)->root();
      reply.setSequence(root.getSequence());
      if (!options_.accepts.Accepts((*request)->which())) {
        if (options_.stats)
          options_.stats->CountMalformed(MalformedReason::kSchema, peer, "request kind not served here");
        status = InvalidArgument("request kind " + std::to_string(int((*request)->which())) +
                                 " is not served by " + options_.name);
      } else {
        status = options_.handler(root, reply);
      }
    } catch (const kj::Exception& e) {
      if (options_.stats) options_.stats->CountMalformed(MalformedReason::kDecode, peer, e.getDescription().cStr());
      status = InvalidArgument(std::string("malformed request: ") + e.getDescription().cStr());
    }
    if (!status.ok()) {
      auto err = reply.getBody().initError();
      err.setMessage(status.ToString());
    }
    auto words = EncodeFrame(message);
    zmq::message_t body(words.begin(), words.size() * sizeof(capnp::word));
    if (!socket.send(id, zmq::send_flags::sndmore | zmq::send_flags::dontwait)) continue;
    (void)socket.send(body, zmq::send_flags::dontwait);
  }
}

// ---------------------------------------------------------------------------------------------
// RpcClient

RpcClient::RpcClient(zmq::context_t& context, RpcClientOptions options)
    : context_(context), options_(std::move(options)) {}

Result<std::unique_ptr<RpcClient>> RpcClient::Create(zmq::context_t& context, RpcClientOptions options) {
  if (options.endpoint.empty()) return InvalidArgument("rpc client: empty endpoint");
  std::unique_ptr<RpcClient> c(new RpcClient(context, std::move(options)));
  try {
    c->Connect();
  } catch (const zmq::error_t& e) {
    return InvalidArgument("cannot connect to " + c->options_.endpoint + ": " + e.what());
  }
  return c;
}

void RpcClient::Connect() {
  socket_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::dealer);
  socket_->set(zmq::sockopt::linger, 0);
  socket_->set(zmq::sockopt::reconnect_ivl, 50);
  socket_->set(zmq::sockopt::reconnect_ivl_max, 1000);
  socket_->connect(options_.endpoint);
}

Result<std::unique_ptr<DecodedEnvelope>> RpcClient::Call(capnp::MessageBuilder& request, Millis timeout,
                                                          const std::function<bool()>& abandon) {
  std::lock_guard<std::mutex> lock(mu_);
  auto deadline = Clock::now() + timeout;
  uint64_t sequence = next_sequence_++;
  auto env = request.getRoot<proto::Envelope>();
  if (env.getMagic() != proto::K_MAGIC) {
    env.setMagic(proto::K_MAGIC);
    env.setSchemaVersion(proto::K_WIRE_VERSION);
    env.setSender(options_.name);
  }
  env.setSequence(sequence);
  auto words = EncodeFrame(request);
  zmq::message_t msg(words.begin(), words.size() * sizeof(capnp::word));
  if (!socket_->send(msg, zmq::send_flags::dontwait)) {
    Connect();
    return Unavailable("cannot send to " + options_.endpoint + " (queue full)");
  }
  for (;;) {
    auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now());
    if (left.count() <= 0) break;
    zmq_pollitem_t items[1] = {{socket_->handle(), 0, ZMQ_POLLIN, 0}};
    zmq::poll(items, 1, abandon ? std::min(left, kAbandonPoll) : left);
    if (!(items[0].revents & ZMQ_POLLIN)) {
      if (abandon && abandon()) {
        Connect();  // as after a timeout: the pending request cannot be answered into the next call
        return Cancelled("call to " + options_.endpoint + " abandoned");
      }
      continue;
    }
    zmq::message_t reply;
    if (!socket_->recv(reply, zmq::recv_flags::dontwait)) continue;
    MalformedReason why;
    auto decoded = DecodeEnvelope(reply.data(), reply.size(), options_.limits, &why);
    if (!decoded.ok()) {
      if (options_.stats) options_.stats->CountMalformed(why, options_.endpoint, decoded.status().message());
      continue;
    }
    try {
      if ((*decoded)->root().getSequence() != sequence) continue;  // a late reply to an old call
      if ((*decoded)->which() == proto::Envelope::Body::ERROR)
        return Unavailable(std::string((*decoded)->root().getBody().getError().getMessage().cStr()));
    } catch (const kj::Exception& e) {
      if (options_.stats) options_.stats->CountMalformed(MalformedReason::kDecode, options_.endpoint, e.getDescription().cStr());
      continue;
    }
    return std::move(decoded).value();
  }
  Connect();  // drop the pending request so it cannot be answered into the next call
  return Timeout("no reply from " + options_.endpoint + " within " + std::to_string(timeout.count()) + " ms");
}

}  // namespace aha
