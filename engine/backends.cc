// Backend selection by device name (see backends.h).
#include "engine/backends.h"

#include "engine/cpu_backend.h"
#ifdef AHA_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

namespace aha::engine {

bool BuiltWithCuda() {
#ifdef AHA_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

// "cpu" -> -1, "cuda" -> 0, "cuda:N" -> N.
Result<int> ParseDevice(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.starts_with("cuda:") && device.size() > 5 && device.size() < 9 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos)
    return std::stoi(device.substr(5));
  return InvalidArgument("device '" + device + "': expected cpu, cuda or cuda:N");
}

}  // namespace

Status CheckDevice(const std::string& device) {
  ASSIGN_OR_RETURN(int index, ParseDevice(device));
  if (index < 0) return OkStatus();
#ifdef AHA_HAVE_CUDA
  return cuda::CudaBackend::Probe(index);
#else
  return Unavailable("device '" + device + "': this build of aha has no CUDA backend (configure with nvcc present)");
#endif
}

Result<std::unique_ptr<Backend>> MakeBackend(const std::string& device) {
  ASSIGN_OR_RETURN(int index, ParseDevice(device));
  if (index < 0) return std::unique_ptr<Backend>(new CpuBackend);
#ifdef AHA_HAVE_CUDA
  ASSIGN_OR_RETURN(auto b, cuda::CudaBackend::Create(index));
  return std::unique_ptr<Backend>(std::move(b));
#else
  (void)index;
  return Unavailable("device '" + device + "': this build of aha has no CUDA backend (configure with nvcc present)");
#endif
}

std::string DescribeBackend(Backend* backend) {
#ifdef AHA_HAVE_CUDA
  if (auto* c = dynamic_cast<cuda::CudaBackend*>(backend)) return c->Describe();
#endif
  return backend->device().ToString();
}

double DeviceMemoryGiB(Backend* backend) {
#ifdef AHA_HAVE_CUDA
  if (auto* c = dynamic_cast<cuda::CudaBackend*>(backend)) return static_cast<double>(c->MemoryInUse()) / (1 << 30);
#endif
  (void)backend;
  return -1.0;
}

}  // namespace aha::engine
