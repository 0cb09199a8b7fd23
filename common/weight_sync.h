// Weight publication without GPUs: the learner serves versioned flat weight buffers over its
// weights socket and actors pull them in chunks (shared/DESIGN.md §1 "Weight publication", the ZMQ
// path; proto/weights.capnp gives the exchange).
//
// The learner Publish()es each new version (it keeps the newest and the one before, so an actor
// halfway through fetching a version can finish it). An actor calls FetchIfNewer() between decode
// steps: one request learns the newest version; if it is newer, the chunks follow, are checked
// against the FNV-1a checksum, and the whole version is returned for the actor to swap in. A
// version that disappears mid-fetch (two newer ones were published) makes the fetch start over
// with the newest.
//
// The same socket carries the NCCL path's control messages (NcclRequest -> NcclReply, see
// common/nccl_membership.h): a publisher given an NcclMembership serves them from it; one without
// answers `enabled = false`, which tells a GPU actor to pull over ZeroMQ instead.
#pragma once

#include <atomic>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/nccl_membership.h"
#include "common/status.h"
#include "common/transport.h"
#include "proto/weights.capnp.h"

namespace aha {

struct WeightTensor {
  std::string name;
  std::vector<uint64_t> shape;
  uint64_t offset = 0;  // bytes into the flat buffer
};

struct WeightsVersion {
  uint64_t version = 0;
  proto::DType dtype = proto::DType::F32;
  std::vector<WeightTensor> tensors;
  std::shared_ptr<const std::vector<uint8_t>> bytes;
  uint64_t checksum = 0;  // WeightsChecksum of bytes
};

// The weights' corruption check (not cryptographic): each 1 MiB block is hashed in four lanes of
// 64-bit words (FNV-1a's step, h = (h ^ word) * prime, per lane), the block hashes are folded in
// order, and large buffers hash their blocks on several threads; the result depends only on the
// bytes. Byte-wise FNV-1a ran at ~0.8 GB/s: 0.37 s of every publish for a 76M-parameter model on
// each side (measured on the H200 host), 2.5 s for the 0.5B shape.
uint64_t WeightsChecksum(const void* data, size_t size);

struct WeightPublisherOptions {
  std::string endpoint = "tcp://127.0.0.1:0";
  uint64_t chunk_bytes = 4u << 20;
  WireStats* stats = nullptr;
  NcclMembership* nccl = nullptr;  // serves NcclRequest when set (the learner broadcasts over NCCL)
};

class WeightPublisher {
 public:
  static Result<std::unique_ptr<WeightPublisher>> Create(zmq::context_t& context,
                                                         WeightPublisherOptions options);
  // Makes `v` the newest version. Its checksum is computed here. Thread-safe.
  void Publish(WeightsVersion v);
  uint64_t latest_version() const;
  // Announce requests served so far (actors asking for the newest version): a learner whose GPU
  // actors get weights over NCCL refreshes the ZeroMQ copy only when someone pulls.
  uint64_t announces_served() const { return announces_.load(); }
  std::string bound_endpoint() const { return server_->bound_endpoint(); }

 private:
  WeightPublisher() = default;
  Status Serve(const proto::Envelope::Reader& request, proto::Envelope::Builder reply);
  WeightPublisherOptions options_;
  mutable std::mutex mu_;
  std::shared_ptr<const WeightsVersion> newest_, previous_;
  std::atomic<uint64_t> announces_{0};
  std::unique_ptr<RpcServer> server_;
};

class WeightSubscriber {
 public:
  static Result<std::unique_ptr<WeightSubscriber>> Create(zmq::context_t& context,
                                                          const std::string& endpoint,
                                                          WireStats* stats = nullptr);
  // nullopt when the publisher has nothing newer than `have_version`. Timeout/Unavailable when the
  // learner does not answer; DataLoss on a checksum mismatch; Cancelled when `abandon` says so
  // while a call waits (RpcClient::Call).
  Result<std::optional<WeightsVersion>> FetchIfNewer(uint64_t have_version, Millis call_timeout,
                                                     const std::function<bool()>& abandon = {});

 private:
  std::unique_ptr<RpcClient> client_;
};

}  // namespace aha
