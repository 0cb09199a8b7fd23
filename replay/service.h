// ReplayService: aha-replay's sockets, wired to a ReplayStore.
//
//   ingest (ReliableReceiver, ROUTER): ScoredTrajectory from aha-rewardd. Each batch the receiver
//     hands over is stored in ONE synced write (ReplayStore::Ingest), and only then acknowledged:
//     stored and duplicate samples as handled, rejected ones with their reason (the sender drops
//     them). An I/O failure acknowledges nothing, so the sender resends.
//   rpc (RpcServer, ROUTER): LeaseRequest -> PromptLease (actors), BatchRequest -> Batch (learner).
// Both bind to the given endpoints (port 0 picks a free port; see the *_endpoint() accessors).
// Threading: one I/O thread per socket; the store serialises them.
#pragma once

#include <memory>
#include <string>

#include <zmq.hpp>

#include "common/transport.h"
#include "replay/store.h"

namespace aha::replay {

struct ReplayServiceOptions {
  std::string ingest_endpoint = "tcp://127.0.0.1:0";
  std::string rpc_endpoint = "tcp://127.0.0.1:0";
  size_t max_batch = 1024;       // deliveries per write batch
  WireStats* stats = nullptr;    // malformed frames are counted here
};

class ReplayService {
 public:
  static Result<std::unique_ptr<ReplayService>> Create(zmq::context_t& context, ReplayStore* store,
                                                       ReplayServiceOptions options);
  ~ReplayService();
  std::string ingest_endpoint() const { return receiver_->bound_endpoint(); }
  std::string rpc_endpoint() const { return rpc_->bound_endpoint(); }
  void Close();

 private:
  ReplayService(ReplayStore* store, ReplayServiceOptions options) : store_(store), options_(std::move(options)) {}
  void HandleIngest(std::vector<Delivery>& batch);
  Status HandleRpc(const proto::Envelope::Reader& request, proto::Envelope::Builder reply);

  ReplayStore* store_;
  ReplayServiceOptions options_;
  std::unique_ptr<ReliableReceiver> receiver_;
  std::unique_ptr<RpcServer> rpc_;
  std::atomic<bool> write_error_logged_{false};
};

}  // namespace aha::replay
