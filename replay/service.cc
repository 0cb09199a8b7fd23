#include "replay/service.h"

#include <kj/exception.h>
#include <spdlog/spdlog.h>

namespace aha::replay {

Result<std::unique_ptr<ReplayService>> ReplayService::Create(zmq::context_t& context, ReplayStore* store,
                                                             ReplayServiceOptions options) {
  std::unique_ptr<ReplayService> s(new ReplayService(store, std::move(options)));
  // The frame limit sits above the store's trajectory limit, so an oversized sample still
  // decodes and is rejected with a reason (and an ack) instead of being resent forever.
  WireLimits limits;
  limits.max_frame_bytes = std::max<size_t>(store->options().max_trajectory_bytes * 2, 1u << 20);

  ReliableReceiverOptions r;
  r.endpoint = s->options_.ingest_endpoint;
  r.accepts = BodyKinds{proto::Envelope::Body::SCORED_TRAJECTORY};
  r.max_batch = s->options_.max_batch;
  r.limits = limits;
  r.stats = s->options_.stats;
  r.handler = [p = s.get()](std::vector<Delivery>& batch) { p->HandleIngest(batch); };
  ASSIGN_OR_RETURN(s->receiver_, ReliableReceiver::Create(context, std::move(r)));

  RpcServerOptions o;
  o.endpoint = s->options_.rpc_endpoint;
  o.name = "aha-replay";
  o.accepts = BodyKinds{proto::Envelope::Body::LEASE_REQUEST, proto::Envelope::Body::BATCH_REQUEST};
  o.stats = s->options_.stats;
  o.handler = [p = s.get()](const proto::Envelope::Reader& req, proto::Envelope::Builder reply) {
    return p->HandleRpc(req, reply);
  };
  ASSIGN_OR_RETURN(s->rpc_, RpcServer::Create(context, std::move(o)));
  return s;
}

ReplayService::~ReplayService() { Close(); }

void ReplayService::Close() {
  if (receiver_) receiver_->Close();
  if (rpc_) rpc_->Close();
}

void ReplayService::HandleIngest(std::vector<Delivery>& batch) {
  std::vector<proto::ScoredTrajectory::Reader> items;
  std::vector<const AckToken*> tokens;
  items.reserve(batch.size());
  for (auto& d : batch) {
    try {
      items.push_back(d.envelope->root().getBody().getScoredTrajectory());
      tokens.push_back(&d.token);
    } catch (const kj::Exception& e) {
      receiver_->Ack(d.token, false, "malformed");
    }
  }
  auto results = store_->Ingest(items);
  if (!results.ok()) {
    // Nothing was stored: acknowledge nothing, the senders resend.
    if (!write_error_logged_.exchange(true))
      spdlog::error("replay: ingest write failed (senders will resend): {}", results.status().ToString());
    return;
  }
  write_error_logged_ = false;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const IngestResult& r = (*results)[i];
    if (r.outcome == IngestOutcome::kRejected) receiver_->Ack(*tokens[i], false, r.reason);
    else receiver_->Ack(*tokens[i], true);
  }
}

Status ReplayService::HandleRpc(const proto::Envelope::Reader& request, proto::Envelope::Builder reply) {
  auto body = request.getBody();
  switch (body.which()) {
    case proto::Envelope::Body::LEASE_REQUEST:
      return store_->Lease(body.getLeaseRequest(), reply.getBody().initPromptLease());
    case proto::Envelope::Body::BATCH_REQUEST:
      return store_->ServeBatch(body.getBatchRequest(), reply.getBody().initBatch());
    default:
      return InvalidArgument("aha-replay serves LeaseRequest and BatchRequest only");
  }
}

}  // namespace aha::replay
