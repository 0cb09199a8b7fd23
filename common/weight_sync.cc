#include "common/weight_sync.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace aha {

namespace {

constexpr uint64_t kPrime = 1099511628211ull;  // FNV-1a 64's
constexpr uint64_t kBasis = 1469598103934665603ull;
constexpr size_t kBlock = size_t{1} << 20;

uint64_t Mix(uint64_t h) {  // SplitMix64's finaliser: spreads a lane's state before folding
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

uint64_t BlockHash(const uint8_t* p, size_t n) {
  uint64_t h[4] = {kBasis, kBasis ^ 1, kBasis ^ 2, kBasis ^ 3};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w[4];
    std::memcpy(w, p + i, 32);
    for (int l = 0; l < 4; ++l) h[l] = (h[l] ^ w[l]) * kPrime;
  }
  for (; i < n; ++i) h[0] = (h[0] ^ p[i]) * kPrime;
  uint64_t out = Mix(n);
  for (int l = 0; l < 4; ++l) out = Mix(out ^ Mix(h[l]));
  return out;
}

}  // namespace

uint64_t WeightsChecksum(const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  const size_t blocks = (size + kBlock - 1) / kBlock;
  std::vector<uint64_t> hashes(blocks);
  auto run = [&](size_t first, size_t step) {
    for (size_t b = first; b < blocks; b += step) hashes[b] = BlockHash(p + b * kBlock, std::min(kBlock, size - b * kBlock));
  };
  const size_t threads = std::min<size_t>({blocks / 16, 8, std::max(1u, std::thread::hardware_concurrency())});
  if (threads <= 1) {
    run(0, 1);
  } else {
    std::vector<std::thread> pool;
    for (size_t t = 1; t < threads; ++t) pool.emplace_back(run, t, threads);
    run(0, threads);
    for (auto& t : pool) t.join();
  }
  uint64_t h = kBasis ^ size;
  for (uint64_t x : hashes) h = (h ^ x) * kPrime;
  return Mix(h);
}

Result<std::unique_ptr<WeightPublisher>> WeightPublisher::Create(zmq::context_t& context,
                                                                 WeightPublisherOptions options) {
  if (options.chunk_bytes == 0) return InvalidArgument("weight publisher: chunk_bytes must be > 0");
  std::unique_ptr<WeightPublisher> p(new WeightPublisher());
  p->options_ = options;
  RpcServerOptions o;
  o.endpoint = options.endpoint;
  o.name = "weights";
  o.accepts = BodyKinds{proto::Envelope::Body::WEIGHTS_REQUEST, proto::Envelope::Body::NCCL_REQUEST};
  o.stats = options.stats;
  o.handler = [raw = p.get()](const proto::Envelope::Reader& req, proto::Envelope::Builder reply) {
    return raw->Serve(req, reply);
  };
  ASSIGN_OR_RETURN(p->server_, RpcServer::Create(context, std::move(o)));
  return p;
}

void WeightPublisher::Publish(WeightsVersion v) {
  v.checksum = WeightsChecksum(v.bytes->data(), v.bytes->size());
  auto shared = std::make_shared<const WeightsVersion>(std::move(v));
  std::lock_guard<std::mutex> lock(mu_);
  previous_ = newest_;
  newest_ = shared;
}

uint64_t WeightPublisher::latest_version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return newest_ ? newest_->version : 0;
}

Status WeightPublisher::Serve(const proto::Envelope::Reader& request, proto::Envelope::Builder reply) {
  if (request.getBody().which() == proto::Envelope::Body::NCCL_REQUEST) {
    NcclAssignment a;
    a.reason = "the learner publishes weights over ZeroMQ only";
    if (options_.nccl) {
      ASSIGN_OR_RETURN(NcclActorState actor, ReadNcclRequest(request.getBody().getNcclRequest()));
      ASSIGN_OR_RETURN(a, options_.nccl->Serve(actor, Clock::now()));
    }
    WriteNcclReply(a, reply.getBody().initNcclReply());
    return OkStatus();
  }
  auto req = request.getBody().getWeightsRequest();
  if (req.getChunkIndex() < 0) announces_.fetch_add(1);
  std::shared_ptr<const WeightsVersion> newest, previous;
  {
    std::lock_guard<std::mutex> lock(mu_);
    newest = newest_;
    previous = previous_;
  }
  if (!newest) return Unavailable("no weights published yet");
  const uint64_t chunk = options_.chunk_bytes;
  if (req.getChunkIndex() < 0) {
    auto a = reply.getBody().initWeightsAnnounce();
    a.setVersion(newest->version);
    a.setDtype(newest->dtype);
    a.setTotalBytes(newest->bytes->size());
    a.setChunkBytes(chunk);
    a.setChecksum(newest->checksum);
    auto t = a.initTensors(static_cast<unsigned>(newest->tensors.size()));
    for (size_t i = 0; i < newest->tensors.size(); ++i) {
      t[i].setName(newest->tensors[i].name);
      t[i].setOffset(newest->tensors[i].offset);
      auto shape = t[i].initShape(static_cast<unsigned>(newest->tensors[i].shape.size()));
      for (size_t d = 0; d < newest->tensors[i].shape.size(); ++d) shape.set(d, newest->tensors[i].shape[d]);
    }
    return OkStatus();
  }
  const WeightsVersion* v = nullptr;
  if (newest->version == req.getVersion()) v = newest.get();
  else if (previous && previous->version == req.getVersion()) v = previous.get();
  if (!v) return NotFound("weights version " + std::to_string(req.getVersion()) + " is no longer served");
  uint64_t begin = static_cast<uint64_t>(req.getChunkIndex()) * chunk;
  if (begin >= v->bytes->size() && !(begin == 0 && v->bytes->empty()))
    return OutOfRange("chunk " + std::to_string(req.getChunkIndex()) + " is past the end");
  uint64_t n = std::min<uint64_t>(chunk, v->bytes->size() - begin);
  auto c = reply.getBody().initWeightsChunk();
  c.setVersion(v->version);
  c.setIndex(static_cast<uint32_t>(req.getChunkIndex()));
  c.setData(capnp::Data::Reader(v->bytes->data() + begin, n));
  return OkStatus();
}

Result<std::unique_ptr<WeightSubscriber>> WeightSubscriber::Create(zmq::context_t& context,
                                                                   const std::string& endpoint,
                                                                   WireStats* stats) {
  std::unique_ptr<WeightSubscriber> s(new WeightSubscriber());
  RpcClientOptions o;
  o.endpoint = endpoint;
  o.name = "weights-subscriber";
  o.stats = stats;
  ASSIGN_OR_RETURN(s->client_, RpcClient::Create(context, o));
  return s;
}

Result<std::optional<WeightsVersion>> WeightSubscriber::FetchIfNewer(uint64_t have_version, Millis timeout,
                                                                     const std::function<bool()>& abandon) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    capnp::MallocMessageBuilder ask;
    auto req = InitEnvelope(ask, "actor").getBody().initWeightsRequest();
    req.setHaveVersion(have_version);
    req.setChunkIndex(-1);
    ASSIGN_OR_RETURN(auto announce_env, client_->Call(ask, timeout, abandon));
    if (announce_env->which() != proto::Envelope::Body::WEIGHTS_ANNOUNCE)
      return DataLoss("weights socket answered with something other than an announce");
    auto a = announce_env->root().getBody().getWeightsAnnounce();
    if (a.getVersion() <= have_version) return std::optional<WeightsVersion>();
    WeightsVersion v;
    v.version = a.getVersion();
    v.dtype = a.getDtype();
    v.checksum = a.getChecksum();
    const uint64_t total = a.getTotalBytes(), chunk = a.getChunkBytes();
    // Hostile-input bound: the buffer is allocated from the announce, so cap it (64 GiB).
    if (chunk == 0 || total > (64ull << 30)) return DataLoss("weights announce with an impossible size");
    for (auto t : a.getTensors()) {
      WeightTensor w;
      w.name = t.getName();
      w.offset = t.getOffset();
      for (auto d : t.getShape()) w.shape.push_back(d);
      v.tensors.push_back(std::move(w));
    }
    auto bytes = std::make_shared<std::vector<uint8_t>>(total);
    bool restart = false;
    for (uint64_t i = 0; i * chunk < total; ++i) {
      capnp::MallocMessageBuilder m;
      auto r = InitEnvelope(m, "actor").getBody().initWeightsRequest();
      r.setHaveVersion(have_version);
      r.setVersion(v.version);
      r.setChunkIndex(static_cast<int64_t>(i));
      auto reply = client_->Call(m, timeout, abandon);
      if (!reply.ok() && IsUnavailable(reply.status()) &&
          reply.status().message().find("no longer served") != std::string::npos) {
        restart = true;  // two newer versions were published meanwhile: start over with the newest
        break;
      }
      if (!reply.ok()) return reply.status();
      if ((*reply)->which() != proto::Envelope::Body::WEIGHTS_CHUNK)
        return DataLoss("weights socket answered a chunk request with something else");
      auto c = (*reply)->root().getBody().getWeightsChunk();
      auto data = c.getData();
      uint64_t begin = i * chunk;
      if (c.getVersion() != v.version || c.getIndex() != i || begin + data.size() > total ||
          data.size() != std::min<uint64_t>(chunk, total - begin))
        return DataLoss("weights chunk " + std::to_string(i) + " does not fit version " + std::to_string(v.version));
      std::memcpy(bytes->data() + begin, data.begin(), data.size());
    }
    if (restart) continue;
    if (WeightsChecksum(bytes->data(), bytes->size()) != v.checksum)
      return DataLoss("weights version " + std::to_string(v.version) + " failed its checksum");
    v.bytes = std::move(bytes);
    return std::optional<WeightsVersion>(std::move(v));
  }
  return Unavailable("weights kept changing while fetching; try again");
}

}  // namespace aha
