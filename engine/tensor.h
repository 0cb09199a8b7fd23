// Tensor: a contiguous, typed, device-resident buffer with a shape (RAII, move-only).
//
// The engine has no generic autograd (DESIGN.md §3): tensors are plain storage that the transformer's
// explicit forward and backward passes read and write through the Backend op interface (backend.h).
// dtypes: f32 (all CPU compute), bf16 (storage: safetensors files, GPU weights), i32 (token ids,
// cu_seqlens). Shapes are row-major and contiguous; element [i, j] of a [R, C] tensor is at i * C + j.
// Devices: cpu, or cuda:N. Device memory comes from the allocator the CUDA backend registers
// (SetDeviceMemory) when it is created; allocating on a device with no registered allocator is a bug
// and aborts. SetZero, To and ToVector work on device tensors too (through host copies).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/check.h"

namespace aha::engine {

enum class DType { kF32, kBF16, kI32 };

size_t DTypeSize(DType t);
const char* DTypeName(DType t);  // "f32", "bf16", "i32"

enum class DeviceKind { kCpu, kCuda };
struct Device {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;
  static Device Cpu() { return {}; }
  bool is_cpu() const { return kind == DeviceKind::kCpu; }
  std::string ToString() const;
  bool operator==(const Device&) const = default;
};

using Shape = std::vector<int64_t>;
int64_t NumElements(const Shape& s);
std::string ShapeString(const Shape& s);  // "[64, 128]"

// bf16 <-> f32. Rounding to bf16 is round-to-nearest-even (as torch's .to(torch.bfloat16)); NaN stays
// NaN (quiet). bf16 -> f32 is exact.
uint16_t F32ToBF16(float f);
float BF16ToF32(uint16_t b);
void F32ToBF16(const float* in, uint16_t* out, size_t n);
void BF16ToF32(const uint16_t* in, float* out, size_t n);

// How tensors reach a non-CPU device's memory (registered by engine/cuda/cuda_backend.cc).
struct DeviceMemory {
  void* (*alloc)(size_t bytes, int device);
  void (*free)(void* p, int device);
  void (*zero)(void* p, size_t bytes, int device);
  // kind: 0 host -> device, 1 device -> host, 2 device -> device. Synchronous with the device.
  void (*copy)(void* dst, const void* src, size_t bytes, int kind, int device);
  // Device addresses with no memory behind them (Tensor::Reserved); any access faults.
  void* (*reserve)(size_t bytes, int device);
  void (*unreserve)(void* p, size_t bytes, int device);
};
void SetDeviceMemory(const DeviceMemory* memory);
const DeviceMemory* GetDeviceMemory();

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape, Device device = Device::Cpu());
  ~Tensor();
  Tensor(Tensor&& o) noexcept;
  Tensor& operator=(Tensor&& o) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  static Tensor Zeros(DType dtype, Shape shape, Device device = Device::Cpu());
  // A device tensor that names an address range but has no memory behind it: for an activation
  // a backend keeps in bf16 only (Backend::KeepsBf16), whose f32 pointer is only the key of its copy.
  // Reading or writing its f32 values faults. On the CPU an ordinary tensor.
  static Tensor Reserved(DType dtype, Shape shape, Device device);
  bool reserved() const { return reserved_; }
  // A CPU f32 tensor holding `values` (tests, small inputs).
  static Tensor FromVector(const std::vector<float>& values, Shape shape);
  static Tensor FromVector(const std::vector<int32_t>& values, Shape shape);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return numel_ * DTypeSize(dtype_); }
  const Device& device() const { return device_; }
  bool empty() const { return data_ == nullptr; }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  float* f32() { AHA_CHECK(dtype_ == DType::kF32) << DTypeName(dtype_); return static_cast<float*>(data_); }
  const float* f32() const { AHA_CHECK(dtype_ == DType::kF32) << DTypeName(dtype_); return static_cast<const float*>(data_); }
  int32_t* i32() { AHA_CHECK(dtype_ == DType::kI32) << DTypeName(dtype_); return static_cast<int32_t*>(data_); }
  const int32_t* i32() const { AHA_CHECK(dtype_ == DType::kI32) << DTypeName(dtype_); return static_cast<const int32_t*>(data_); }
  uint16_t* bf16() { AHA_CHECK(dtype_ == DType::kBF16) << DTypeName(dtype_); return static_cast<uint16_t*>(data_); }

  void SetZero();
  // The same tensor on `device` (a copy).
  Tensor ToDevice(Device device) const;
  // Same shape, f32 <-> bf16 conversion (on the CPU; a device tensor comes back as a CPU tensor).
  Tensor To(DType dtype) const;
  std::vector<float> ToVector() const;  // f32 host copy of an f32/bf16/i32 tensor

 private:
  void Release();
  DType dtype_ = DType::kF32;
  Shape shape_;
  int64_t numel_ = 0;
  Device device_;
  void* data_ = nullptr;
  bool reserved_ = false;
};

}  // namespace aha::engine
