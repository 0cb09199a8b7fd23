// CudaBackend: the ops of backend.h as CUDA launches on one stream (see cuda_backend.h).
#include "engine/cuda/cuda_backend.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <cuda.h>

#include "engine/cuda/kernels.h"
#include "engine/tensor.h"

namespace aha::engine::cuda {

namespace {

void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha: CUDA %s failed: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

// Tensor's device memory (tensor.h). Plain cudaMalloc; the synchronous cudaMemset/cudaMemcpy run
// on the legacy default stream, which orders them with the backend's (blocking) stream.
void* DeviceAlloc(size_t bytes, int device) {
  CheckCuda(cudaSetDevice(device), "set device");
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha: cuda:%d: cannot allocate %zu bytes: %s\n", device, bytes, cudaGetErrorString(e));
    std::abort();
  }
  return p;
}
void DeviceFree(void* p, int /*device*/) { CheckCuda(cudaFree(p), "free"); }
void DeviceZero(void* p, size_t bytes, int /*device*/) { CheckCuda(cudaMemset(p, 0, bytes), "memset"); }
void DeviceCopy(void* dst, const void* src, size_t bytes, int kind, int /*device*/) {
  const cudaMemcpyKind k = kind == 0 ? cudaMemcpyHostToDevice : kind == 1 ? cudaMemcpyDeviceToHost
                                                                          : cudaMemcpyDeviceToDevice;
  CheckCuda(cudaMemcpy(dst, src, bytes, k), "memcpy");
}
// Address ranges without memory (Tensor::Reserved): cuMemAddressReserve through the driver's entry
// point (the runtime has no form of it), in whole allocation granules.
using ReserveFn = CUresult (*)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
using FreeFn = CUresult (*)(CUdeviceptr, size_t);
template <typename Fn>
Fn DriverFn(const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess || p == nullptr) {
    std::fprintf(stderr, "aha: the CUDA driver has no %s\n", name);
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}
constexpr size_t kReserveGranule = size_t{2} << 20;  // the VMM allocation granularity on sm_90
size_t Granules(size_t bytes) { return (bytes + kReserveGranule - 1) / kReserveGranule * kReserveGranule; }
void* DeviceReserve(size_t bytes, int device) {
  static const ReserveFn reserve = DriverFn<ReserveFn>("cuMemAddressReserve");
  CheckCuda(cudaSetDevice(device), "set device");
  CUdeviceptr p = 0;
  const CUresult r = reserve(&p, Granules(bytes), 0, 0, 0);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "aha: cuda:%d: cannot reserve %zu bytes of addresses (CUresult %d)\n", device, bytes,
                 static_cast<int>(r));
    std::abort();
  }
  return reinterpret_cast<void*>(p);
}
void DeviceUnreserve(void* p, size_t bytes, int /*device*/) {
  static const FreeFn release = DriverFn<FreeFn>("cuMemAddressFree");
  release(reinterpret_cast<CUdeviceptr>(p), Granules(bytes));
}
const DeviceMemory kDeviceMemory{&DeviceAlloc, &DeviceFree, &DeviceZero,
                                 &DeviceCopy, &DeviceReserve, &DeviceUnreserve};

}  // namespace

Status CudaBackend::Probe(int index) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return Unavailable("cuda:" + std::to_string(index) + ": no CUDA device: " + cudaGetErrorString(e));
  if (index < 0 || index >= count)
    return Unavailable("cuda:" + std::to_string(index) + ": this machine has " + std::to_string(count) + " CUDA device(s)");
  return OkStatus();
}

Result<std::unique_ptr<CudaBackend>> CudaBackend::Create(int index, GemmPrecision precision) {
  RETURN_IF_ERROR(Probe(index));
  cudaError_t e = cudaSetDevice(index);
  if (e != cudaSuccess) return Unavailable("cuda:" + std::to_string(index) + ": " + cudaGetErrorString(e));
  cudaStream_t stream = nullptr;
  e = cudaStreamCreate(&stream);  // blocking: ordered with the legacy default stream (tensor copies)
  if (e != cudaSuccess) return Unavailable("cuda:" + std::to_string(index) + ": cannot create a stream: " + cudaGetErrorString(e));
  SetDeviceMemory(&kDeviceMemory);
  return std::unique_ptr<CudaBackend>(new CudaBackend(index, stream, precision));
}

struct CudaBackend::Profile {
  struct Mark {
    cudaEvent_t event;
    const char* op;
  };
  cudaEvent_t Take();  // a spare event, or a new one
  std::vector<cudaEvent_t> spare;
  std::vector<Mark> pending;  // recorded, not yet read
  cudaEvent_t base = nullptr;  // the last event read: the start of the next op's interval
  struct Sum {
    int64_t calls = 0;
    double ms = 0;
  };
  std::map<std::string, Sum> sums;
};

CudaBackend::CudaBackend(int index, cudaStream_t stream, GemmPrecision precision)
    : index_(index), stream_(stream), gemm_(new Gemm(stream, precision)) {
  CheckCuda(cudaMalloc(&sum_out_, sizeof(double)), "allocate");
  const char* attention = std::getenv("AHA_ATTENTION");
  tc_attention_ = !(attention && std::string(attention) == "f32");
  const char* kv = std::getenv("AHA_KV_CACHE");
  bf16_kv_cache_ = !(kv && std::string(kv) == "f32");
  const char* keep = std::getenv("AHA_KEEP_BF16");
  keep_bf16_ = !(keep && std::string(keep) == "0");
  const char* profile = std::getenv("AHA_PROFILE");
  if (profile && std::string(profile) == "1") profile_ = std::make_unique<Profile>();
  if (const char* split = std::getenv("AHA_SPLIT_K")) split_k_ = std::max(0, std::atoi(split));
  const char* fused_sample = std::getenv("AHA_FUSED_SAMPLE");
  fused_sample_ = !(fused_sample && std::string(fused_sample) == "0");
  const char* mlp = std::getenv("AHA_FUSED_MLP");
  fused_mlp_ = !(mlp && std::string(mlp) == "0");
  CheckCuda(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, index), "query multiprocessors");
}

cudaEvent_t CudaBackend::Profile::Take() {
  cudaEvent_t e = nullptr;
  if (!spare.empty()) {
    e = spare.back();
    spare.pop_back();
  } else {
    CheckCuda(cudaEventCreate(&e), "create profiling event");
  }
  return e;
}

void CudaBackend::Mark(const char* op) {
  if (!profile_ || capturing_) return;
  cudaEvent_t e = profile_->Take();
  CheckCuda(cudaEventRecord(e, stream_), "record profiling event");
  profile_->pending.push_back({e, op});
  if (profile_->pending.size() >= 4096) ResolveProfile();
}

// Reads the pending events (waiting for the last) into the per-op sums. The GPU is idle
// afterwards, so the next interval starts from a fresh event: the host's time before its next
// launch (say, after the trainer's phase boundaries) is counted in that op, the idle GPU before
// this call in none.
void CudaBackend::ResolveProfile() {
  if (!profile_ || capturing_ || profile_->pending.empty()) return;
  Profile& p = *profile_;
  CheckCuda(cudaEventSynchronize(p.pending.back().event), "wait for profiling event");
  for (const auto& m : p.pending) {
    if (p.base) {
      float ms = 0;
      CheckCuda(cudaEventElapsedTime(&ms, p.base, m.event), "read profiling event");
      auto& sum = p.sums[m.op];
      ++sum.calls;
      sum.ms += ms;
      p.spare.push_back(p.base);
    }
    p.base = m.event;
  }
  p.pending.clear();
  CheckCuda(cudaEventRecord(p.base, stream_), "record profiling event");
}

void CudaBackend::PrintProfile() const {
  if (!profile_ || profile_->sums.empty()) return;
  std::vector<std::pair<std::string, Profile::Sum>> rows(profile_->sums.begin(), profile_->sums.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  double total = 0;
  for (const auto& r : rows) total += r.second.ms;
  std::fprintf(stderr, "AHA_PROFILE cuda:%d: GPU time by op (%.1f ms in all)\n%-28s %8s %11s %10s %6s\n", index_, total,
               "op", "calls", "total ms", "ms/call", "share");
  for (const auto& [op, sum] : rows)
    std::fprintf(stderr, "%-28s %8lld %11.2f %10.4f %5.1f%%\n", op.c_str(), static_cast<long long>(sum.calls), sum.ms,
                 sum.ms / static_cast<double>(sum.calls), 100.0 * sum.ms / total);
}

CudaBackend::~CudaBackend() {
  cudaStreamSynchronize(stream_);
  if (profile_) {
    ResolveProfile();
    PrintProfile();
    for (const auto& m : profile_->pending) cudaEventDestroy(m.event);
    for (cudaEvent_t e : profile_->spare) cudaEventDestroy(e);
    if (profile_->base) cudaEventDestroy(profile_->base);
  }
  auto free_slot = [](HostSlot& h) {
    if (h.host) cudaFreeHost(h.host);
    if (h.done) cudaEventDestroy(h.done);
  };
  for (HostSlot& h : stages_) free_slot(h);
  for (HostSlot& h : downloads_) free_slot(h);
  gemm_.reset();
  if (workspace_) cudaFree(workspace_);
  if (cast_copy_) cudaFree(cast_copy_);
  cudaFree(sum_out_);
  cudaStreamDestroy(stream_);
}

std::string CudaBackend::Describe() const {
  cudaDeviceProp p{};
  CheckCuda(cudaGetDeviceProperties(&p, index_), "get device properties");
  int driver = 0;
  cudaDriverGetVersion(&driver);
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s, %d SMs, %.1f GiB, CUDA driver %d.%d", p.name, p.multiProcessorCount,
                static_cast<double>(p.totalGlobalMem) / (1 << 30), driver / 1000, (driver % 1000) / 10);
  return buf;
}

// KeptCopy finds a copy only with bf16 products (Gemm::Bf16CopyOf).
bool CudaBackend::KeepsBf16() const { return keep_bf16_ && gemm_->precision() == GemmPrecision::kBF16; }

size_t CudaBackend::MemoryInUse() const {
  CheckCuda(cudaSetDevice(index_), "set device");
  size_t free_bytes = 0, total = 0;
  CheckCuda(cudaMemGetInfo(&free_bytes, &total), "get memory info");
  return total - free_bytes;
}

void* CudaBackend::Workspace(size_t bytes) {
  if (bytes > workspace_bytes_) {
    // The old buffer may still be read by queued launches: let them finish first.
    CheckCuda(cudaStreamSynchronize(stream_), "synchronize");
    if (workspace_) CheckCuda(cudaFree(workspace_), "free workspace");
    // At least a quarter more: sizes follow the batch, which varies by a few rows per step.
    bytes = std::max(bytes, workspace_bytes_ + workspace_bytes_ / 4);
    CheckCuda(cudaMalloc(&workspace_, bytes), "allocate workspace");
    workspace_bytes_ = bytes;
    ++workspace_generation_;
  }
  return workspace_;
}

uint16_t* CudaBackend::CastCopy(size_t count) {
  if (gemm_->precision() != GemmPrecision::kBF16 || count == 0) return nullptr;
  if (count > cast_copy_count_) {
    if (capturing_) return nullptr;  // no allocation inside a graph; the eager first step sized it
    CheckCuda(cudaStreamSynchronize(stream_), "synchronize");  // queued products may still read it
    if (cast_copy_) CheckCuda(cudaFree(cast_copy_), "free bf16 copy");
    count = std::max(count, cast_copy_count_ + cast_copy_count_ / 4);
    CheckCuda(cudaMalloc(&cast_copy_, count * sizeof(uint16_t)), "allocate bf16 copy");
    cast_copy_count_ = count;
    ++cast_copy_generation_;
  }
  return cast_copy_;
}

void CudaBackend::AdoptCastCopy(const float* f32, size_t count, const uint16_t* bf16) {
  if (bf16) gemm_->AdoptCast(f32, count, bf16);
}

void CudaBackend::Check(const char* op, bool forget_casts) {
  if (forget_casts) gemm_->ForgetCasts();
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha: CUDA launch of %s failed: %s\n", op, cudaGetErrorString(e));
    std::abort();
  }
  Mark(op);
}

void CudaBackend::Copy(void* dst, const void* src, size_t bytes) {
  if (bytes) CheckCuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  Check("copy");
}
void CudaBackend::Zero(void* dst, size_t bytes) {
  if (bytes) CheckCuda(cudaMemsetAsync(dst, 0, bytes, stream_), "zero");
  Check("zero");
}
void CudaBackend::EnsureHost(HostSlot& slot, size_t bytes, const char* what) {
  if (!slot.done) CheckCuda(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming), what);
  if (slot.bytes >= bytes) return;
  if (slot.host) {
    CheckCuda(cudaEventSynchronize(slot.done), what);
    CheckCuda(cudaFreeHost(slot.host), what);
  }
  const size_t grown = std::max(bytes, slot.bytes + slot.bytes / 4);
  CheckCuda(cudaMallocHost(&slot.host, grown), what);
  slot.bytes = grown;
}

void CudaBackend::Upload(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return Check("upload");
  if (bytes > kStageBytes || capturing_) {
    CheckCuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "upload");
    return Check("upload");
  }
  HostSlot& st = stages_[next_stage_++ % kStages];
  EnsureHost(st, kStageBytes, "upload staging");
  CheckCuda(cudaEventSynchronize(st.done), "wait for an upload stage");  // its last DMA has run
  std::memcpy(st.host, src, bytes);
  CheckCuda(cudaMemcpyAsync(dst, st.host, bytes, cudaMemcpyHostToDevice, stream_), "upload");
  CheckCuda(cudaEventRecord(st.done, stream_), "record upload stage");
  Check("upload");
}
void CudaBackend::Download(void* dst, const void* src, size_t bytes) {
  if (bytes) CheckCuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
  Mark("download");
  CheckCuda(cudaStreamSynchronize(stream_), "synchronize after download");
  ResolveProfile();
}
uint64_t CudaBackend::DownloadAsync(void* dst, const void* src, size_t bytes) {
  const uint64_t ticket = next_download_++;
  HostSlot& d = downloads_[ticket % kAsyncDownloads];
  if (d.busy) {
    std::fprintf(stderr, "aha: DownloadAsync: more than %d downloads outstanding\n", kAsyncDownloads);
    std::abort();
  }
  EnsureHost(d, bytes, "async download buffer");
  if (bytes) CheckCuda(cudaMemcpyAsync(d.host, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
  CheckCuda(cudaEventRecord(d.done, stream_), "record download");
  Mark("download");
  d.dst = dst;
  d.count = bytes;
  d.busy = true;
  return ticket;
}
void CudaBackend::GatherInt32(int32_t* dst, const int32_t* src, const int32_t* index, int n) {
  cuda::GatherInt32(dst, src, index, n, stream_);
  Check("gather");
}
void CudaBackend::AwaitDownload(uint64_t ticket) {
  HostSlot& d = downloads_[ticket % kAsyncDownloads];
  if (!d.busy || ticket >= next_download_ || next_download_ - ticket > kAsyncDownloads) {
    std::fprintf(stderr, "aha: AwaitDownload: ticket %llu is not outstanding\n", static_cast<unsigned long long>(ticket));
    std::abort();
  }
  CheckCuda(cudaEventSynchronize(d.done), "wait for download");
  if (d.count) std::memcpy(d.dst, d.host, d.count);
  d.busy = false;
}
void CudaBackend::Synchronize() {
  CheckCuda(cudaStreamSynchronize(stream_), "synchronize");
  ResolveProfile();
}
void CudaBackend::ResetProfile() {
  if (!profile_) return;
  Synchronize();
  profile_->sums.clear();
}

void CudaBackend::RegisterWeights(const float* base, size_t n) {
  gemm_->RegisterWeights(base, n);
}
void CudaBackend::UnregisterWeights(const float* base) { gemm_->UnregisterWeights(base); }
uint16_t* CudaBackend::KeptCopy(const float* p, size_t n) {
  for (const Kept& k : kept_)
    if (p >= k.base && p + n <= k.base + k.n) return gemm_->Bf16CopyOf(p, n);  // null with f32 products
  return nullptr;
}
void CudaBackend::KeepAsBf16(const float* base, size_t n) {
  if (!keep_bf16_) return;
  gemm_->RegisterWeights(base, n);  // its bf16 copy, which its writers fill
  kept_.push_back({base, n});
}
void CudaBackend::ReleaseBf16(const float* base) {
  for (size_t i = 0; i < kept_.size(); ++i)
    if (kept_[i].base == base) {
      gemm_->UnregisterWeights(base);
      kept_.erase(kept_.begin() + static_cast<long>(i));
      return;
    }
}
void CudaBackend::WeightsChanged(const float* base) {
  gemm_->WeightsChanged(base);
  Check("cast weights to bf16");
}

bool CudaBackend::BeginCapture() {
  gemm_->ForgetCasts();  // a graph must not depend on what the scratch held before it
  capturing_ = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  return capturing_;
}

void* CudaBackend::EndCapture() {
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamEndCapture(stream_, &graph);
  capturing_ = false;
  gemm_->ForgetCasts();
  if (e != cudaSuccess || !graph) {
    std::fprintf(stderr, "aha: CUDA graph capture failed (%s); running without graphs\n", cudaGetErrorString(e));
    cudaGetLastError();
    return nullptr;
  }
  cudaGraphExec_t exec = nullptr;
  e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha: CUDA graph instantiation failed (%s); running without graphs\n", cudaGetErrorString(e));
    cudaGetLastError();
    return nullptr;
  }
  return exec;
}

void CudaBackend::Replay(void* graph) {
  CheckCuda(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph), stream_), "graph launch");
  Check("graph replay (decode step)");
}

void CudaBackend::DestroyGraph(void* graph) { cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph)); }

void CudaBackend::EmbeddingForward(float* out, const int32_t* ids, const float* wte, int N, int C) {
  cuda::EmbeddingForward(out, ids, wte, N, C, stream_);
  Check("embedding");
}
void CudaBackend::EmbeddingBackward(float* dwte, const float* dout, const int32_t* ids, int N, int C) {
  cuda::EmbeddingBackward(dwte, dout, ids, N, C, stream_);
  Check("embedding backward");
}
// The norms and SwiGLU also write their output in bf16 for the product that follows (q/k/v and
// gate/up after a norm, down after SwiGLU; PackQkv and SwiGluBackward below likewise for the
// backward products): that product skips its input cast (Gemm::AdoptCast).
// Check() forgets every held cast first, so the adoption comes after it.
// A kept output (KeepAsBf16) gets only its bf16 copy.
void CudaBackend::RmsNormForward(float* out, float* rstd, const float* x, const float* w, int N, int C, float eps) {
  const size_t n = static_cast<size_t>(N) * C;
  if (uint16_t* kept = KeptCopy(out, n)) {
    cuda::RmsNormForward(nullptr, rstd, x, w, N, C, eps, kept, stream_);
    return Check("rmsnorm");
  }
  uint16_t* copy = CastCopy(n);
  cuda::RmsNormForward(out, rstd, x, w, N, C, eps, copy, stream_);
  Check("rmsnorm");
  AdoptCastCopy(out, n, copy);
}
void CudaBackend::AddRmsNormForward(float* x, float* ln, float* rstd, const float* y, const float* w, int N, int C,
                                    float eps) {
  AddPartsRmsNorm(x, ln, rstd, y, 1, w, N, C, eps);
}
// y holds `parts` partial sums of the addend (LinearAddRmsNorm's split product).
void CudaBackend::AddPartsRmsNorm(float* x, float* ln, float* rstd, const float* y, int parts, const float* w, int N,
                                  int C, float eps) {
  const size_t n = static_cast<size_t>(N) * C;
  if (uint16_t* kept = KeptCopy(ln, n)) {
    cuda::AddPartsRmsNormForward(x, nullptr, rstd, y, parts, w, N, C, eps, kept, stream_);
    return Check("add + rmsnorm");
  }
  uint16_t* copy = CastCopy(n);
  cuda::AddPartsRmsNormForward(x, ln, rstd, y, parts, w, N, C, eps, copy, stream_);
  Check("add + rmsnorm");
  AdoptCastCopy(ln, n, copy);
}
void CudaBackend::RmsNormBackward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                                  const float* rstd, int N, int C) {
  // dx is the residual gradient the next product reads as dout (the o and down backwards): its
  // bf16 copy saves that product's cast.
  const size_t n = static_cast<size_t>(N) * C;
  uint16_t* copy = CastCopy(n);
  const bool wrote = cuda::RmsNormBackward(dx, dw, dout, x, w, rstd, N, C, copy, stream_);
  Check("rmsnorm backward");
  if (wrote) AdoptCastCopy(dx, n, copy);
}
void CudaBackend::RopeForward(float* x, const int32_t* positions, const float* inv_freq, int N, int H, int D) {
  cuda::RopeForward(x, positions, inv_freq, N, H, D, false, stream_);
  Check("rope");
}
void CudaBackend::RopeBackward(float* dx, const int32_t* positions, const float* inv_freq, int N, int H, int D) {
  cuda::RopeForward(dx, positions, inv_freq, N, H, D, true, stream_);
  Check("rope backward");
}

// Consecutive linear ops reuse each other's bf16 input casts (Gemm::set_cast_reuse): between two
// of them only products run, and those track what they overwrite. The bias kernels write `out` /
// `db`, never an input. Every other op forgets the casts (Check).
// A kept output (KeepAsBf16) is written in bf16 by the product's epilogue.
void CudaBackend::LinearForward(float* out, const float* x, const float* w, const float* b, int N, int C, int OC) {
  uint16_t* kept = KeptCopy(out, static_cast<size_t>(N) * OC);
  if (kept && b) {
    std::fprintf(stderr, "aha CudaBackend: LinearForward with a bias into a range kept in bf16\n");
    std::abort();
  }
  gemm_->set_cast_reuse(true);
  if (kept) gemm_->NTBf16(kept, out, x, w, N, OC, C);
  else gemm_->NT(out, x, w, N, OC, C, 1.0f, 0.0f);
  gemm_->set_cast_reuse(false);
  if (b) cuda::AddBias(out, b, N, OC, stream_);
  Check("linear", /*forget_casts=*/false);
}

// The parts: 4 (else 2) when the output's 128 x 128 tiles times that many still fit the
// multiprocessors, each part a multiple of 8 long (16-byte-aligned starts) and at least 128. A
// decode step's 256 x 896 output is 14 tiles: the o and down products take 4 parts. Measured on the
// H200 (docs/kernels.md, version 11): 4 parts -24 ms per generation, 2 parts -20 ms, 8 (7 for o)
// +20 ms (each part's fixed cost and the norm's extra reads outweigh the fuller device). A training
// micro-batch (hundreds of tiles) takes 1: the plain product.
int CudaBackend::SplitParts(int N, int K, int C) const {
  if (gemm_->precision() != GemmPrecision::kBF16 || split_k_ == 1) return 1;
  auto fits = [&](int S) { return K % S == 0 && (K / S) % 8 == 0 && K / S >= 128; };
  if (split_k_ > 1) return fits(split_k_) ? split_k_ : 1;
  const int tiles = ((N + 127) / 128) * ((C + 127) / 128);
  for (int S : {4, 2})
    if (tiles * S <= sms_ && fits(S)) return S;
  return 1;
}

// y = a @ w^T as S partial products over K (one batched cuBLASLt call: Gemm::NTSplitK) that the
// norm adds (AddPartsRmsNorm); 1 part is LinearForward + AddRmsNormForward.
void CudaBackend::LinearAddRmsNorm(float* x, float* ln, float* rstd, float* tmp, const float* a, const float* w,
                                   const float* norm_w, int N, int K, int C, float eps) {
  const int S = SplitParts(N, K, C);
  if (S <= 1) return Backend::LinearAddRmsNorm(x, ln, rstd, tmp, a, w, norm_w, N, K, C, eps);
  const size_t n = static_cast<size_t>(N) * C;
  auto* parts = static_cast<float*>(Workspace(S * n * sizeof(float)));
  gemm_->set_cast_reuse(true);
  gemm_->NTSplitK(parts, a, w, N, C, K, S);
  gemm_->set_cast_reuse(false);
  Check("linear (K in parts)");
  AddPartsRmsNorm(x, ln, rstd, parts, S, norm_w, N, C, eps);
}

void CudaBackend::LinearBackward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w,
                                 int N, int C, int OC, bool accumulate_dx) {
  uint16_t* kept = dx ? KeptCopy(dx, static_cast<size_t>(N) * C) : nullptr;
  if (kept && accumulate_dx) {
    std::fprintf(stderr, "aha CudaBackend: LinearBackward accumulating into a range kept in bf16\n");
    std::abort();
  }
  gemm_->set_cast_reuse(true);
  if (kept) gemm_->NNBf16(kept, dx, dout, w, N, C, OC);
  else if (dx) gemm_->NN(dx, dout, w, N, C, OC, 1.0f, accumulate_dx ? 1.0f : 0.0f);
  gemm_->TN(dw, dout, x, OC, C, N, 1.0f, 1.0f);
  gemm_->set_cast_reuse(false);
  // A kept dout has only its bf16 copy, which the products above read too, so db sums rounded values
  // (the Transformer keeps no dout that has a bias: Transformer::KeepsQkvGradient).
  if (db) cuda::BiasBackward(db, dout, KeptCopy(dout, static_cast<size_t>(N) * OC), N, OC, stream_);
  Check("linear backward", /*forget_casts=*/false);
}

void CudaBackend::SplitQkv(float* q, float* k, float* v, const float* qkv, const float* bias, int N, int QD,
                           int KD) {
  cuda::SplitQkv(q, k, v, qkv, bias, N, QD, KD, stream_);
  Check("split qkv");
}
// PackQkv's and SwiGluBackward's outputs are the dout of the q/k/v and gate/up backward products
// (read by both NN and TN): their bf16 copies replace those products' casts, as in the forward.
void CudaBackend::PackQkv(float* dqkv, const float* dq, const float* dk, const float* dv, int N, int QD, int KD) {
  const size_t n = static_cast<size_t>(N) * (QD + 2 * KD);
  uint16_t* copy = CastCopy(n);
  cuda::PackQkv(dqkv, dq, dk, dv, N, QD, KD, copy, stream_);
  Check("pack qkv");
  AdoptCastCopy(dqkv, n, copy);
}
void CudaBackend::SwiGluForward(float* h, const float* gu, int N, int I) {
  const size_t n = static_cast<size_t>(N) * I;
  const uint16_t* gu16 = KeptCopy(gu, 2 * n);
  // A kept h: only the bf16 copy the products read is written.
  if (uint16_t* kept = KeptCopy(h, n)) {
    cuda::SwiGluForward(nullptr, gu, gu16, N, I, kept, stream_);
    return Check("swiglu");
  }
  uint16_t* copy = CastCopy(n);
  cuda::SwiGluForward(h, gu, gu16, N, I, copy, stream_);
  Check("swiglu");
  AdoptCastCopy(h, n, copy);
}
bool CudaBackend::FusesMlp(int N, int C, int I) const {
  return fused_mlp_ && gemm_->precision() == GemmPrecision::kBF16 && N <= kFusedMlpRows &&
         cuda::GateUpSwiGluSupported(N, C, I);
}
// The norm before it wrote x's bf16 copy (kept), the weights' copy is current (WeightsChanged), and
// the kernel writes h's kept copy, which the down product reads.
void CudaBackend::GateUpSwiGlu(float* h, float* gu, const float* x, const float* w, int N, int C, int I) {
  const size_t n = static_cast<size_t>(N) * I;
  uint16_t* h16 = FusesMlp(N, C, I) ? KeptCopy(h, n) : nullptr;
  const uint16_t* x16 = h16 ? KeptCopy(x, static_cast<size_t>(N) * C) : nullptr;
  const uint16_t* w16 = x16 ? gemm_->Bf16CopyOf(w, 2 * static_cast<size_t>(I) * C) : nullptr;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };  // 16-byte copies
  if (!w16 || !aligned(x16) || !aligned(w16) || !aligned(h16)) return Backend::GateUpSwiGlu(h, gu, x, w, N, C, I);
  cuda::GateUpSwiGlu(h16, x16, w16, N, C, I, stream_);
  Check("gate/up + swiglu");
}
void CudaBackend::SwiGluBackward(float* dgu, const float* dh, const float* gu, int N, int I) {
  const size_t n = static_cast<size_t>(N) * 2 * I;
  uint16_t* copy = CastCopy(n);
  cuda::SwiGluBackward(dgu, dh, KeptCopy(dh, n / 2), gu, KeptCopy(gu, n), N, I, copy, stream_);
  Check("swiglu backward");
  AdoptCastCopy(dgu, n, copy);
}
// dgu only feeds the two products, which read its bf16 copy: the f32 buffer is never written (1.5x
// fewer bytes than SwiGluBackward's). With f32 products, or no room for the copy while capturing a
// graph, the two ops run as they are.
void CudaBackend::SwiGluLinearBackward(float* dx, float* dw, float* dgu, const float* dh, const float* gu,
                                       const float* x, const float* w, int N, int C, int I) {
  const size_t n = static_cast<size_t>(N) * 2 * I;
  uint16_t* copy = CastCopy(n);  // null with f32 products
  if (copy == nullptr) return Backend::SwiGluLinearBackward(dx, dw, dgu, dh, gu, x, w, N, C, I);
  cuda::SwiGluBackward(nullptr, dh, KeptCopy(dh, n / 2), gu, KeptCopy(gu, n), N, I, copy, stream_);
  Check("swiglu backward");
  AdoptCastCopy(dgu, n, copy);
  const uint64_t reads = gemm_->adopted_reads();
  LinearBackward(dx, dw, nullptr, dgu, x, w, N, C, 2 * I, false);
  // Both products (one without dx) read dgu from its copy: its f32 values do not exist.
  if (gemm_->adopted_reads() != reads + (dx ? 2 : 1)) {
    std::fprintf(stderr, "aha CudaBackend: the gate/up backward product cast dgu instead of reading its bf16 copy\n");
    std::abort();
  }
}
void CudaBackend::Add(float* out, const float* a, const float* b, size_t n) {
  cuda::Add(out, a, b, n, stream_);
  Check("add");
}

// A kept output (KeepAsBf16: the training forward's, read by the o product and the backward) gets
// only its bf16 copy from the tensor-core kernels; the f32 kernels write f32 and a cast of it.
// A kept q (no f32 storage behind it: Tensor::Reserved) is widened into scratch first.
void CudaBackend::AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                                   const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) {
  const size_t n = static_cast<size_t>(N) * Hq * D;
  uint16_t* kept = KeptCopy(out, n);
  const uint16_t* q16 = KeptCopy(q, n);
  const bool tc = UseTcAttention();
  const bool kept_tc = kept && tc && (D == 64 || D == 128);
  float* scratch = nullptr;  // [q widened | out before its cast]
  if (q16 || (kept && !kept_tc)) scratch = static_cast<float*>(Workspace(2 * n * sizeof(float)));
  if (q16) {
    cuda::CastBF16ToF32(scratch, q16, n, stream_);
    q = scratch;
  }
  if (kept_tc) {
    cuda::AttentionForwardTC(nullptr, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, stream_, kept);
    return Check("attention");
  }
  if (!tc || kept) {
    float* o = kept ? scratch + n : out;  // a kept out has no f32 storage either
    if (tc) cuda::AttentionForwardTC(o, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, stream_);
    else cuda::AttentionForward(o, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, stream_);
    if (kept) cuda::CastF32ToBF16(kept, o, n, stream_);
    return Check("attention");
  }
  // The output feeds the o product: the tensor-core kernel writes its bf16 copy too.
  uint16_t* copy = CastCopy(n);
  const bool wrote = cuda::AttentionForwardTC(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, stream_, copy);
  Check("attention");
  if (wrote) AdoptCastCopy(out, n, copy);
}
// A kept out, dout (the o product's dx) or q is read from its bf16 copy: by the wgmma backward
// directly, else widened into f32 scratch after the workspace.
void CudaBackend::AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                                    const float* lse, const float* q, const float* k, const float* v,
                                    const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D) {
  const size_t n = static_cast<size_t>(N) * Hq * D;
  const uint16_t* out16 = KeptCopy(out, n);
  const uint16_t* dout16 = KeptCopy(dout, n);
  const bool tc = UseTcAttention();
  // A kept q has no f32 values (Tensor::Reserved); the f32 forward read the same copy, widened.
  const uint16_t* q16 = KeptCopy(q, n);
  if (tc && cuda::AttentionBackwardWgmmaSupported(D)) {  // AttentionBackwardTC's own choice, made here
    void* ws = Workspace(cuda::AttentionBackwardTCWorkspace(N, Hq, D));
    cuda::AttentionBackwardWgmma(dq, dk, dv, dout16 ? nullptr : dout, out16 ? nullptr : out, lse, q16 ? nullptr : q, k,
                                 v, cu_seqlens, S, N, Hq, Hkv, D, ws, stream_, out16, dout16, q16);
    return Check("attention backward");
  }
  const size_t ws_bytes =
      ((tc ? cuda::AttentionBackwardTCWorkspace(N, Hq, D) : AttentionBackwardWorkspace(N, Hq)) + 255) / 256 * 256;
  void* ws = Workspace(ws_bytes + ((out16 ? n : 0) + (dout16 ? n : 0) + (q16 ? n : 0)) * sizeof(float));
  float* wide = reinterpret_cast<float*>(static_cast<char*>(ws) + ws_bytes);
  auto widen = [&](const uint16_t* from, const float*& to) {
    if (!from) return;
    cuda::CastBF16ToF32(wide, from, n, stream_);
    to = wide;
    wide += n;
  };
  widen(out16, out);
  widen(dout16, dout);
  widen(q16, q);
  if (tc) cuda::AttentionBackwardTC(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, ws, stream_);
  else cuda::AttentionBackward(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, ws, stream_);
  Check("attention backward");
}
DType CudaBackend::kv_cache_dtype() const {
  return bf16_kv_cache_ && gemm_->precision() == GemmPrecision::kBF16 ? DType::kBF16 : DType::kF32;
}
static cuda::KvPages Pages(const PagedKv& c) {
  if (c.dtype != DType::kF32 && c.dtype != DType::kBF16) {
    std::fprintf(stderr, "aha CudaBackend: KV cache dtype %s is neither f32 nor bf16\n", DTypeName(c.dtype));
    std::abort();
  }
  return {c.k, c.v, c.dtype == DType::kBF16, c.num_blocks, c.block_size, c.block_table, c.max_blocks};
}
void CudaBackend::KvCacheWrite(const PagedKv& cache, const float* k, const float* v, const int32_t* cu_q,
                               const int32_t* start, int B, int Nq, int Hkv, int D) {
  cuda::KvCacheWrite(Pages(cache), k, v, cu_q, start, B, Nq, Hkv, D, stream_);
  Check("kv cache write");
}
// AHA_FUSED_QKV=0 runs the ops the fused q/k/v kernels stand for (the A/B of bench/gpu/gpu_run.sh).
// Odd D cannot be rotated in pairs; no model reaches these with one, but the composition stays right.
static bool FusedQkv(int D) {
  static const bool on = [] {
    const char* e = std::getenv("AHA_FUSED_QKV");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on && D % 2 == 0;
}
// A kept q (the training attention's, KeepAsBf16) gets its bf16 copy beside the f32 values here.
void CudaBackend::QkvRope(float* q, float* k, float* v, const float* qkv, const float* bias, const int32_t* positions,
                          const float* inv_freq, int N, int Hq, int Hkv, int D) {
  const size_t qn = static_cast<size_t>(N) * Hq * D;
  uint16_t* q_kept = KeptCopy(q, qn);
  if (!FusedQkv(D)) {  // a kept q has no f32 storage (Tensor::Reserved): the ops write scratch
    float* qf = q_kept ? static_cast<float*>(Workspace(qn * sizeof(float))) : q;
    Backend::QkvRope(qf, k, v, qkv, bias, positions, inv_freq, N, Hq, Hkv, D);
    if (q_kept) cuda::CastF32ToBF16(q_kept, qf, qn, stream_);
    return Check("q/k/v + rope");
  }
  cuda::QkvRope(q_kept ? nullptr : q, k, v, qkv, bias, positions, inv_freq, N, Hq, Hkv, D, stream_, nullptr, nullptr,
                q_kept);
  Check("q/k/v + rope");
}
// k and v in bf16 for the tensor-core attention, in the workspace (only this op reads them), unless
// AHA_ATTENTION_KV16=0 (the A/B: the kernel then stages and converts f32 tiles).
static bool FusedQkvAttentionTakes(bool tc, int N, int D) {
  static const bool kv16_on = [] {
    const char* e = std::getenv("AHA_ATTENTION_KV16");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return kv16_on && FusedQkv(D) && tc && (D == 64 || D == 128) && N > 0;
}
void CudaBackend::QkvRopeAttention(float* out, float* lse, float* q, float* k, float* v, const float* qkv,
                                   const float* bias, const int32_t* positions, const float* inv_freq,
                                   const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D,
                                   bool forward_only) {
  if (!FusedQkvAttentionTakes(UseTcAttention(), N, D))
    return Backend::QkvRopeAttention(out, lse, q, k, v, qkv, bias, positions, inv_freq, cu_seqlens, S, N, Hq, Hkv,
                                     D);
  FusedQkvAttention(nullptr, out, lse, q, k, v, qkv, bias, positions, inv_freq, cu_seqlens, S, N, Hq, Hkv, D,
                    forward_only);
}
// The ops, when the fused form does not take the call: a kept q (no f32 storage) is normed and
// rotated in scratch and kept as its bf16 copy, which the attention then reads (widened).
void CudaBackend::QkvNormRopeAttention(float* out, float* lse, float* q_pre, float* k_pre, float* q, float* k,
                                       float* v, float* q_rstd, float* k_rstd, const float* qkv, const float* bias,
                                       const float* q_norm, const float* k_norm, float eps, const int32_t* positions,
                                       const float* inv_freq, const int32_t* cu_seqlens, int S, int N, int Hq,
                                       int Hkv, int D, bool forward_only) {
  if (FusedQkvAttentionTakes(UseTcAttention(), N, D) && cuda::QkvNormSupported(D)) {
    const cuda::QkvNorm norm{q_pre, k_pre, q_rstd, k_rstd, q_norm, k_norm, eps};
    return FusedQkvAttention(&norm, out, lse, q, k, v, qkv, bias, positions, inv_freq, cu_seqlens, S, N, Hq, Hkv, D,
                             forward_only);
  }
  const size_t n = static_cast<size_t>(N) * Hq * D;
  uint16_t* q_kept = KeptCopy(q, n);
  if (!q_kept)
    return Backend::QkvNormRopeAttention(out, lse, q_pre, k_pre, q, k, v, q_rstd, k_rstd, qkv, bias, q_norm, k_norm,
                                         eps, positions, inv_freq, cu_seqlens, S, N, Hq, Hkv, D);
  auto* qf = static_cast<float*>(Workspace(n * sizeof(float)));
  SplitNormRopeOps(q_pre, k_pre, qf, k, v, q_rstd, k_rstd, qkv, bias, q_norm, k_norm, eps, positions, inv_freq, N, Hq,
                   Hkv, D);
  cuda::CastF32ToBF16(q_kept, qf, n, stream_);
  Check("q norm + rope");
  AttentionForward(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D);
}
void CudaBackend::FusedQkvAttention(const cuda::QkvNorm* norm, float* out, float* lse, float* q, float* k, float* v,
                                    const float* qkv, const float* bias, const int32_t* positions,
                                    const float* inv_freq, const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv,
                                    int D, bool forward_only) {
  // A kept q (read again only by the backward, from its bf16 copy) is written as that copy and, for
  // the wgmma forward, as the forward's own operand (q scaled and rounded, in the workspace): no f32.
  // A forward alone writes only that operand (or q in f32 for the mma.sync forward) and the bf16 k
  // and v: no copy of q, no f32 k and v, no q_pre, k_pre or rstds.
  const size_t kn = static_cast<size_t>(N) * Hkv * D, n = static_cast<size_t>(N) * Hq * D;
  uint16_t* q_kept = KeptCopy(q, n);
  const bool q_reserved = q_kept != nullptr;  // q has no f32 storage
  if (forward_only) q_kept = nullptr;
  const bool q16_only = (q_reserved || forward_only) && cuda::AttentionForwardWgmmaSupported(D);
  // Without the wgmma forward a kept q is written in f32 to scratch (it has no f32 storage).
  const bool q_scratch = q_reserved && !q16_only;
  cuda::QkvNorm lean;  // the norms' weights alone
  if (forward_only) {
    if (norm) lean = {nullptr, nullptr, nullptr, nullptr, norm->q_norm, norm->k_norm, norm->eps}, norm = &lean;
    k = v = nullptr;
  }
  auto* k16 = static_cast<uint16_t*>(
      Workspace((2 * kn + (q16_only ? n : 0)) * sizeof(uint16_t) + (q_scratch ? n * sizeof(float) : 0)));
  uint16_t* v16 = k16 + kn;
  uint16_t* q16s = q16_only ? v16 + kn : nullptr;
  if (q_scratch) q = reinterpret_cast<float*>(v16 + kn);
  cuda::QkvRope(q16_only ? nullptr : q, k, v, qkv, bias, positions, inv_freq, N, Hq, Hkv, D, stream_, k16, v16, q_kept,
                q16s, norm);
  Check("q/k/v + rope");
  // The output feeds the o product: the kernel writes its bf16 copy too (as AttentionForward), or
  // only that when the output is kept in bf16.
  if (uint16_t* kept = KeptCopy(out, n)) {
    cuda::AttentionForwardTCBf16Kv(nullptr, lse, q, k16, v16, cu_seqlens, S, N, Hq, Hkv, D, stream_, kept, q16s);
    return Check("attention");
  }
  uint16_t* copy = CastCopy(n);
  cuda::AttentionForwardTCBf16Kv(out, lse, q, k16, v16, cu_seqlens, S, N, Hq, Hkv, D, stream_, copy, q16s);
  Check("attention");
  AdoptCastCopy(out, n, copy);
}
// The packed rows are the dout of the q/k/v backward product: their bf16 copy replaces its cast.
// A kept dqkv (the training backward's, KeepAsBf16: read only by the q/k/v product's backward, bias
// included) gets its bf16 copy alone; the unfused ops write f32 scratch and a cast of it.
void CudaBackend::RopePackQkv(float* dqkv, float* dq, float* dk, const float* dv, const int32_t* positions,
                              const float* inv_freq, int N, int Hq, int Hkv, int D) {
  const size_t n = static_cast<size_t>(N) * (Hq + 2 * Hkv) * D;
  uint16_t* kept = KeptCopy(dqkv, n);
  if (!FusedQkv(D)) {  // (PackQkv's cast copy of an unkept dqkv stays adopted: no Check after it)
    if (!kept) return Backend::RopePackQkv(dqkv, dq, dk, dv, positions, inv_freq, N, Hq, Hkv, D);
    auto* f32 = static_cast<float*>(Workspace(n * sizeof(float)));
    Backend::RopePackQkv(f32, dq, dk, dv, positions, inv_freq, N, Hq, Hkv, D);
    cuda::CastF32ToBF16(kept, f32, n, stream_);
    return Check("rope backward + pack qkv");
  }
  if (kept) {
    cuda::RopePackQkv(nullptr, kept, dq, dk, dv, positions, inv_freq, N, Hq, Hkv, D, stream_);
    return Check("rope backward + pack qkv");
  }
  uint16_t* copy = CastCopy(n);
  cuda::RopePackQkv(dqkv, copy, dq, dk, dv, positions, inv_freq, N, Hq, Hkv, D, stream_);
  Check("rope backward + pack qkv");
  AdoptCastCopy(dqkv, n, copy);
}
// A kept dqkv gets its bf16 copy alone, as in RopePackQkv; the ops (AHA_FUSED_QKV=0, or a shape the
// kernel does not take) write f32 scratch and a cast of it.
void CudaBackend::NormRopePackQkv(float* dqkv, float* dq_norm, float* dk_norm, float* dq_pre, float* dk_pre,
                                  float* dq, float* dk, const float* dv, const float* q_pre, const float* k_pre,
                                  const float* q_norm, const float* k_norm, const float* q_rstd, const float* k_rstd,
                                  const int32_t* positions, const float* inv_freq, int N, int Hq, int Hkv, int D) {
  const size_t n = static_cast<size_t>(N) * (Hq + 2 * Hkv) * D;
  uint16_t* kept = KeptCopy(dqkv, n);
  const bool fused = FusedQkv(D) && N > 0 &&
                     cuda::NormRopePackQkvSupported(D, {kept ? nullptr : dqkv, dq, dk, dv, q_pre, k_pre, q_norm,
                                                        k_norm});
  if (!fused) {
    float* f32 = kept ? static_cast<float*>(Workspace(n * sizeof(float))) : dqkv;
    Backend::NormRopePackQkv(f32, dq_norm, dk_norm, dq_pre, dk_pre, dq, dk, dv, q_pre, k_pre, q_norm, k_norm, q_rstd,
                             k_rstd, positions, inv_freq, N, Hq, Hkv, D);
    if (kept) cuda::CastF32ToBF16(kept, f32, n, stream_);
    return Check("norm + rope backward + pack qkv");
  }
  if (kept) {
    cuda::NormRopePackQkv(nullptr, kept, dq_norm, dk_norm, dq, dk, dv, q_pre, k_pre, q_norm, k_norm, q_rstd, k_rstd,
                          positions, inv_freq, N, Hq, Hkv, D, stream_);
    return Check("norm + rope backward + pack qkv");
  }
  uint16_t* copy = CastCopy(n);
  cuda::NormRopePackQkv(dqkv, copy, dq_norm, dk_norm, dq, dk, dv, q_pre, k_pre, q_norm, k_norm, q_rstd, k_rstd,
                        positions, inv_freq, N, Hq, Hkv, D, stream_);
  Check("norm + rope backward + pack qkv");
  AdoptCastCopy(dqkv, n, copy);
}
void CudaBackend::QkvRopeKvWrite(float* q, float* k, float* v, const float* qkv, const float* bias,
                                 const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                                 const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) {
  if (!FusedQkv(D))
    return Backend::QkvRopeKvWrite(q, k, v, qkv, bias, positions, inv_freq, cache, cu_q, start, B, Nq, Hq, Hkv, D);
  cuda::QkvRopeKvWrite(q, qkv, bias, positions, inv_freq, Pages(cache), cu_q, start, B, Nq, Hq, Hkv, D, stream_);
  Check("q/k/v + rope + kv cache write");
}
// A/B of the decode kernels: AHA_DECODE_ATTENTION=rowwise sends decode steps through the prefill
// kernel too; =simt keeps them off the tensor cores (the GQA-grouped f32-math decode kernel).
enum class Decode { kDefault, kRowwise, kSimt };
static Decode DecodeMode() {
  static const Decode mode = [] {
    const char* e = std::getenv("AHA_DECODE_ATTENTION");
    const std::string v = e != nullptr ? e : "";
    return v == "rowwise" ? Decode::kRowwise : v == "simt" ? Decode::kSimt : Decode::kDefault;
  }();
  return mode;
}

// A cached layer's q/k/v step and attention as the tensor-core decode kernel: decode steps (Nq == B)
// on the default decode kernel, at D = 64 always, at D = 128 only with Qwen3's per-head norms (the
// fused kernel then replaces six kernels, not one). Measured on the H200 (docs/kernels.md, version
// 25): at D = 128 without norms the fused prologue's chain (the q/k/v row's loads, RoPE, the new
// key's write, the barriers) cost Qwen2.5-1.5B's decode step 1.7-1.9% more than QkvRopeKvWrite's
// kernel saves. AHA_DECODE_FUSED=0 never fuses, =1 always where it can; AHA_FUSED_QKV=0 never fuses.
static bool FusedDecodeStep(const cuda::KvPages& kv, int B, int Nq, int Hq, int Hkv, int D, bool norms) {
  static const int setting = [] {
    const char* e = std::getenv("AHA_DECODE_FUSED");
    return e == nullptr || *e == '\0' ? -1 : std::atoi(e);
  }();
  if (setting == 0 || !FusedQkv(D) || DecodeMode() != Decode::kDefault || Nq != B || Nq <= 0 ||
      !cuda::CachedAttentionDecodeTcSupported(kv, Hq, Hkv, D))
    return false;
  return setting == 1 || D == 64 || norms;
}

void CudaBackend::QkvRopeCachedAttention(float* out, float* q, float* k, float* v, const float* qkv,
                                         const float* bias, const int32_t* positions, const float* inv_freq,
                                         const PagedKv& cache, const int32_t* cu_q, const int32_t* start, int B,
                                         int Nq, int Hq, int Hkv, int D) {
  if (!FusedDecodeStep(Pages(cache), B, Nq, Hq, Hkv, D, false))
    return Backend::QkvRopeCachedAttention(out, q, k, v, qkv, bias, positions, inv_freq, cache, cu_q, start, B, Nq,
                                           Hq, Hkv, D);
  FusedDecodeAttention(out, qkv, bias, nullptr, nullptr, 0.0f, positions, inv_freq, cache, cu_q, start, B, Nq, Hq,
                       Hkv, D);
}

void CudaBackend::QkvNormRopeCachedAttention(float* out, float* q, float* k, float* v, float* rstd, const float* qkv,
                                             const float* bias, const float* q_norm, const float* k_norm, float eps,
                                             const int32_t* positions, const float* inv_freq, const PagedKv& cache,
                                             const int32_t* cu_q, const int32_t* start, int B, int Nq, int Hq,
                                             int Hkv, int D) {
  if (!FusedDecodeStep(Pages(cache), B, Nq, Hq, Hkv, D, true))
    return Backend::QkvNormRopeCachedAttention(out, q, k, v, rstd, qkv, bias, q_norm, k_norm, eps, positions,
                                               inv_freq, cache, cu_q, start, B, Nq, Hq, Hkv, D);
  FusedDecodeAttention(out, qkv, bias, q_norm, k_norm, eps, positions, inv_freq, cache, cu_q, start, B, Nq, Hq, Hkv,
                       D);
}

void CudaBackend::FusedDecodeAttention(float* out, const float* qkv, const float* bias, const float* q_norm,
                                       const float* k_norm, float eps, const int32_t* positions,
                                       const float* inv_freq, const PagedKv& cache, const int32_t* cu_q,
                                       const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) {
  const cuda::KvPages kv = Pages(cache);
  void* ws = Workspace(cuda::CachedAttentionDecodeTcWorkspace(kv, Nq, Hq, Hkv, D));
  const size_t n = static_cast<size_t>(Nq) * Hq * D;
  uint16_t* copy = CastCopy(n);
  cuda::QkvRopeCachedAttentionDecodeTC(out, qkv, bias, positions, inv_freq, kv, cu_q, start, B, Nq, Hq, Hkv, D, ws,
                                       stream_, copy, q_norm, k_norm, eps);
  Check("q/k/v + rope + cached attention");
  AdoptCastCopy(out, n, copy);
}

void CudaBackend::CachedAttentionForward(float* out, const float* q, const PagedKv& cache, const int32_t* cu_q,
                                         const int32_t* start, int B, int Nq, int Hq, int Hkv, int D) {
  const cuda::KvPages kv = Pages(cache);
  const Decode mode = DecodeMode();
  // The output feeds the o product: the tensor-core decode kernel writes its bf16 copy too.
  const size_t n = static_cast<size_t>(Nq) * Hq * D;
  uint16_t* copy = nullptr;
  bool wrote = false;
  if (mode == Decode::kRowwise || (mode == Decode::kSimt && Nq != B)) {
    cuda::CachedAttentionRowwise(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, D, stream_);
  } else if (mode == Decode::kSimt) {
    void* ws = Workspace(cuda::CachedAttentionDecodeWorkspace(kv, Nq, Hq, Hkv, D));
    cuda::CachedAttentionDecode(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, D, ws, stream_);
  } else {
    void* ws = Workspace(cuda::CachedAttentionWorkspace(kv, B, Nq, Hq, Hkv, D));
    copy = CastCopy(n);
    wrote = cuda::CachedAttentionForward(out, q, kv, cu_q, start, B, Nq, Hq, Hkv, D, ws, stream_, copy);
  }
  Check("cached attention");
  if (wrote) AdoptCastCopy(out, n, copy);
}

void CudaBackend::LmHeadForward(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                                const int32_t* targets, int N, int C, int V, float temperature) {
  LmHeadForwardKeep(logprob, entropy, lse, h, w, targets, N, C, V, temperature, nullptr);
}
void CudaBackend::LmHeadBackward(float* dh, float* dw, const float* dlogprob, const float* dentropy, const float* h,
                                 const float* w, const int32_t* targets, const float* lse, const float* entropy, int N,
                                 int C, int V, float temperature) {
  LmHeadBackwardKept(dh, dw, dlogprob, dentropy, h, w, targets, lse, entropy, N, C, V, temperature, nullptr);
}

// With logits null the chunk logits live in the workspace only (and the backward recomputes them).
void CudaBackend::LmHeadForwardKeep(float* logprob, float* entropy, float* lse, const float* h, const float* w,
                                    const int32_t* targets, int N, int C, int V, float temperature, float* logits) {
  void* ws = Workspace(LmHeadWorkspace(N, V));
  cuda::LmHeadForward(*gemm_, logprob, entropy, lse, h, w, targets, N, C, V, temperature, ws, stream_, logits);
  Check("lm-head");
}
void CudaBackend::LmHeadBackwardKept(float* dh, float* dw, const float* dlogprob, const float* dentropy,
                                     const float* h, const float* w, const int32_t* targets, const float* lse,
                                     const float* entropy, int N, int C, int V, float temperature, float* logits) {
  void* ws = Workspace(LmHeadWorkspace(N, V));
  cuda::LmHeadBackward(*gemm_, dh, dw, dlogprob, dentropy, h, w, targets, lse, entropy, N, C, V, temperature, ws,
                       stream_, logits);
  Check("lm-head backward");
}

double CudaBackend::SumSquares(const float* x, size_t n) {
  void* ws = Workspace(SumSquaresWorkspace());
  cuda::SumSquares(sum_out_, x, n, ws, stream_);
  Check("sum of squares");
  double out = 0;
  Download(&out, sum_out_, sizeof out);
  return out;
}
void CudaBackend::Scale(float* x, float s, size_t n) {
  cuda::Scale(x, s, n, stream_);
  Check("scale");
}
void CudaBackend::AdamW(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                        float beta2, float eps, float weight_decay, int64_t t) {
  // The products' bf16 copy of the weights is written in the same pass (the cast WeightsChanged
  // would do next is then skipped).
  uint16_t* copy = gemm_->Bf16CopyOf(param, n);
  cuda::AdamW(param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, t, copy, stream_);
  if (copy) gemm_->CopyWritten(param, n);
  Check("adamw");
}
void CudaBackend::SampleRows(int32_t* tokens, float* logprobs, const float* logits, int B, int V,
                             const float* temperature, const int32_t* top_k, const float* top_p, const uint64_t* seeds,
                             const uint64_t* counters) {
  void* ws = Workspace(SampleWorkspace(B, V));
  cuda::SampleRows(tokens, logprobs, logits, B, V, temperature, top_k, top_p, seeds, counters, ws, stream_);
  Check("sample");
}
// The product and the draw in one kernel (lmhead_sample.cu) when the products are bf16: x's bf16
// copy is the final norm's (a kept buffer in a decode step) or a cast here, w's the weights' cached
// copy. AHA_FUSED_SAMPLE=0 or set_fused_sample(false): LinearForward + SampleRows (the A/B;
// docs/kernels.md, version 22).
void CudaBackend::LmHeadSample(int32_t* tokens, float* logprobs, float* logits, const float* x, const float* w, int B,
                               int C, int V, const float* temperature, const int32_t* top_k, const float* top_p,
                               const uint64_t* seeds, const uint64_t* counters) {
  const size_t n = static_cast<size_t>(B) * C;
  const bool fused =
      fused_sample_ && gemm_->precision() == GemmPrecision::kBF16 && cuda::LmHeadSampleSupported(B, C, V);
  const uint16_t* w16 = fused ? gemm_->Bf16CopyOf(w, static_cast<size_t>(V) * C) : nullptr;
  const uint16_t* x16 = w16 ? KeptCopy(x, n) : nullptr;
  uint16_t* cast = w16 && !x16 ? CastCopy(n) : nullptr;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };  // the copies' rule
  if (!w16 || (!x16 && !cast) || !aligned(w16) || !aligned(x16 ? x16 : cast))
    return Backend::LmHeadSample(tokens, logprobs, logits, x, w, B, C, V, temperature, top_k, top_p, seeds, counters);
  if (!x16) {
    cuda::CastF32ToBF16(cast, x, n, stream_);
    x16 = cast;
  }
  void* ws = Workspace(cuda::LmHeadSampleWorkspace(B, V));
  cuda::LmHeadSample(tokens, logprobs, logits, x16, w16, B, C, V, temperature, top_k, top_p, seeds, counters, ws,
                     sms_, stream_);
  Check("lm-head + sample");
}

}  // namespace aha::engine::cuda
