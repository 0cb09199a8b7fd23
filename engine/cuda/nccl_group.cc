// NcclGroup (see nccl_group.h).
#include "engine/cuda/nccl_group.h"

#include <nccl.h>

#include <thread>

namespace aha::engine::cuda {

struct NcclGroup::Comm {
  ncclComm_t comm = nullptr;
};

namespace {

std::string Hex(const unsigned char* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) s += d[p[i] >> 4], s += d[p[i] & 15];
  return s;
}

bool Unhex(const std::string& s, unsigned char* out, size_t n) {
  if (s.size() != 2 * n) return false;
  auto v = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
  for (size_t i = 0; i < n; ++i) {
    const int hi = v(s[2 * i]), lo = v(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<unsigned char>(hi * 16 + lo);
  }
  return true;
}

}  // namespace

Result<std::string> NcclGroup::NewId() {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return Unavailable(std::string("ncclGetUniqueId: ") + ncclGetErrorString(r));
  return Hex(reinterpret_cast<const unsigned char*>(id.internal), sizeof id.internal);
}

Result<std::unique_ptr<NcclGroup>> NcclGroup::Join(const std::string& id_hex, int nranks, int rank, int device,
                                                   cudaStream_t stream, Deadline deadline, const GiveUp& give_up) {
  ncclUniqueId id;
  if (!Unhex(id_hex, reinterpret_cast<unsigned char*>(id.internal), sizeof id.internal))
    return InvalidArgument("NCCL id: expected " + std::to_string(2 * sizeof id.internal) + " hex digits");
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return InvalidArgument("NCCL rank " + std::to_string(rank) + " of " + std::to_string(nranks));
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess)
    return Unavailable("cuda:" + std::to_string(device) + ": " + cudaGetErrorString(e));
  std::unique_ptr<NcclGroup> g(new NcclGroup);
  g->comm_ = std::make_unique<Comm>();
  g->stream_ = stream;
  g->rank_ = rank;
  g->nranks_ = nranks;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&g->comm_->comm, nranks, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress)
    return Unavailable(std::string("ncclCommInitRankConfig: ") + ncclGetErrorString(r));
  RETURN_IF_ERROR(g->Poll("joining the NCCL group", std::chrono::steady_clock::now() + deadline, give_up));
  return g;
}

NcclGroup::~NcclGroup() {
  if (!comm_ || !comm_->comm) return;
  if (aborted_) return;
  // A clean finish would wait for peers that may be gone: abort, which never blocks on them.
  ncclCommAbort(comm_->comm);
}

void NcclGroup::Abort() {
  if (comm_ && comm_->comm && !aborted_) ncclCommAbort(comm_->comm);
  aborted_ = true;
}

bool NcclGroup::GivingUp(const GiveUp& give_up, std::chrono::steady_clock::time_point* last_asked) {
  if (!give_up) return false;
  const auto now = std::chrono::steady_clock::now();
  if (now - *last_asked < std::chrono::milliseconds(1)) return false;
  *last_asked = now;
  return give_up();
}

Status NcclGroup::Poll(const char* what, std::chrono::steady_clock::time_point until, const GiveUp& give_up) {
  // NCCL's own state (init / enqueue in progress, or an error from a peer).
  std::chrono::steady_clock::time_point asked{};
  for (;;) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm_->comm, &state);
    if (r != ncclSuccess) state = r;
    if (state == ncclSuccess) break;
    if (state != ncclInProgress) {
      Abort();
      return Unavailable(std::string(what) + ": NCCL error: " + ncclGetErrorString(state));
    }
    if (std::chrono::steady_clock::now() > until) {
      Abort();
      return Timeout(std::string(what) + ": deadline passed; communicator aborted");
    }
    if (GivingUp(give_up, &asked)) {
      Abort();
      return Cancelled(std::string(what) + ": a peer is gone; communicator aborted");
    }
    std::this_thread::yield();
  }
  return OkStatus();
}

Status NcclGroup::Wait(Deadline deadline, const GiveUp& give_up) {
  if (aborted_) return FailedPrecondition("NCCL group was aborted");
  const auto until = std::chrono::steady_clock::now() + deadline;
  std::chrono::steady_clock::time_point asked{};
  for (;;) {
    RETURN_IF_ERROR(Poll("NCCL collective", until, nullptr));
    cudaError_t e = cudaStreamQuery(stream_);
    if (e == cudaSuccess) return OkStatus();
    if (e != cudaErrorNotReady) {
      Abort();
      return Internal(std::string("NCCL collective: CUDA error ") + cudaGetErrorString(e));
    }
    if (std::chrono::steady_clock::now() > until) {
      Abort();
      return Timeout("NCCL collective: deadline passed; communicator aborted");
    }
    if (GivingUp(give_up, &asked)) {
      Abort();
      return Cancelled("NCCL collective: a peer is gone; communicator aborted");
    }
    std::this_thread::yield();
  }
}

Status NcclGroup::Drained(cudaStream_t stream, Deadline deadline) {
  const auto until = std::chrono::steady_clock::now() + deadline;
  for (;;) {
    cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return OkStatus();
    if (e != cudaErrorNotReady) return Internal(std::string("CUDA stream: ") + cudaGetErrorString(e));
    if (std::chrono::steady_clock::now() > until)
      return Timeout("NCCL work still running " + std::to_string(deadline.count()) + " ms after the abort");
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

Status NcclGroup::BroadcastAsync(void* buf, size_t bytes, int root, Deadline deadline, const GiveUp& give_up) {
  if (aborted_) return FailedPrecondition("NCCL group was aborted");
  ncclResult_t r = ncclBroadcast(buf, buf, bytes, ncclUint8, root, comm_->comm, stream_);
  if (r != ncclSuccess && r != ncclInProgress) {
    Abort();
    return Unavailable(std::string("ncclBroadcast: ") + ncclGetErrorString(r));
  }
  return Poll("ncclBroadcast enqueue", std::chrono::steady_clock::now() + deadline, give_up);
}

Status NcclGroup::Broadcast(void* buf, size_t bytes, int root, Deadline deadline, const GiveUp& give_up) {
  RETURN_IF_ERROR(BroadcastAsync(buf, bytes, root, deadline, give_up));
  return Wait(deadline, give_up);
}

Status NcclGroup::AllReduceSumAsync(float* buf, size_t n, Deadline deadline) {
  if (aborted_) return FailedPrecondition("NCCL group was aborted");
  ncclResult_t r = ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, comm_->comm, stream_);
  if (r != ncclSuccess && r != ncclInProgress) {
    Abort();
    return Unavailable(std::string("ncclAllReduce: ") + ncclGetErrorString(r));
  }
  return Poll("ncclAllReduce enqueue", std::chrono::steady_clock::now() + deadline);
}

Status NcclGroup::AllReduceSum(float* buf, size_t n, Deadline deadline) {
  RETURN_IF_ERROR(AllReduceSumAsync(buf, n, deadline));
  return Wait(deadline);
}

}  // namespace aha::engine::cuda
