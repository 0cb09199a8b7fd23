// Choosing a backend by device name: "cpu", "cuda" (= cuda:0) or "cuda:N".
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "engine/backend.h"

namespace aha::engine {

// InvalidArgument for a malformed name; Unavailable when this build has no CUDA backend or the
// machine has no such GPU (the message says which).
Result<std::unique_ptr<Backend>> MakeBackend(const std::string& device);
// What MakeBackend would say about `device`, without creating a backend (no CUDA context, no
// cuBLAS): ok, or the same error.
Status CheckDevice(const std::string& device);
// Whether this build contains the CUDA backend (it may still find no GPU at run time).
bool BuiltWithCuda();
// A one-line description of the device behind `backend` ("cpu", "NVIDIA H200, 132 SMs, ...").
std::string DescribeBackend(Backend* backend);
// GiB of the device's memory in use (every process's, as nvidia-smi counts it); -1 on the CPU.
double DeviceMemoryGiB(Backend* backend);

}  // namespace aha::engine
