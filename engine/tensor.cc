// Tensor storage and bf16 conversion (see tensor.h).
#include "engine/tensor.h"

#include <cmath>
#include <cstdlib>

namespace aha::engine {

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
  }
  return 0;
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
  }
  return "?";
}

std::string Device::ToString() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

int64_t NumElements(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string ShapeString(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

uint16_t F32ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  uint32_t rounding = 0x7fff + ((u >> 16) & 1);  // round to nearest, ties to even
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float BF16ToF32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void F32ToBF16(const float* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = F32ToBF16(in[i]);
}
void BF16ToF32(const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = BF16ToF32(in[i]);
}

namespace {
const DeviceMemory* g_device_memory = nullptr;
}  // namespace

void SetDeviceMemory(const DeviceMemory* memory) { g_device_memory = memory; }
const DeviceMemory* GetDeviceMemory() { return g_device_memory; }

Tensor::Tensor(DType dtype, Shape shape, Device device)
    : dtype_(dtype), shape_(std::move(shape)), numel_(NumElements(shape_)), device_(device) {
  for (int64_t d : shape_) AHA_CHECK_GE(d, 0);
  if (!device_.is_cpu()) {
    AHA_CHECK(g_device_memory != nullptr) << "no backend for device " << device_.ToString() << " in this build";
    data_ = g_device_memory->alloc(nbytes() == 0 ? 256 : nbytes(), device_.index);
    return;
  }
  // 64-byte alignment: whole cache lines for the blocked loops and for BLAS.
  size_t bytes = (nbytes() + 63) / 64 * 64;
  data_ = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
  AHA_CHECK(data_ != nullptr) << "out of memory allocating " << bytes << " bytes";
}

Tensor::~Tensor() { Release(); }

void Tensor::Release() {
  if (data_ && reserved_) g_device_memory->unreserve(data_, nbytes() == 0 ? 256 : nbytes(), device_.index);
  else if (data_ && !device_.is_cpu()) g_device_memory->free(data_, device_.index);
  else std::free(data_);
  data_ = nullptr;
  reserved_ = false;
}

Tensor Tensor::Reserved(DType dtype, Shape shape, Device device) {
  if (device.is_cpu()) return Tensor(dtype, std::move(shape), device);
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.numel_ = NumElements(t.shape_);
  t.device_ = device;
  for (int64_t d : t.shape_) AHA_CHECK_GE(d, 0);
  AHA_CHECK(g_device_memory != nullptr) << "no backend for device " << device.ToString() << " in this build";
  t.data_ = g_device_memory->reserve(t.nbytes() == 0 ? 256 : t.nbytes(), device.index);
  t.reserved_ = true;
  return t;
}

Tensor::Tensor(Tensor&& o) noexcept
    : dtype_(o.dtype_), shape_(std::move(o.shape_)), numel_(o.numel_), device_(o.device_), data_(o.data_),
      reserved_(o.reserved_) {
  o.data_ = nullptr;
  o.numel_ = 0;
  o.reserved_ = false;
}

Tensor& Tensor::operator=(Tensor&& o) noexcept {
  if (this != &o) {
    Release();
    dtype_ = o.dtype_;
    shape_ = std::move(o.shape_);
    numel_ = o.numel_;
    device_ = o.device_;
    data_ = o.data_;
    reserved_ = o.reserved_;
    o.data_ = nullptr;
    o.numel_ = 0;
    o.reserved_ = false;
  }
  return *this;
}

Tensor Tensor::Zeros(DType dtype, Shape shape, Device device) {
  Tensor t(dtype, std::move(shape), device);
  t.SetZero();
  return t;
}

Tensor Tensor::FromVector(const std::vector<float>& values, Shape shape) {
  Tensor t(DType::kF32, std::move(shape));
  AHA_CHECK_EQ(static_cast<int64_t>(values.size()), t.numel());
  std::memcpy(t.raw(), values.data(), t.nbytes());
  return t;
}

Tensor Tensor::FromVector(const std::vector<int32_t>& values, Shape shape) {
  Tensor t(DType::kI32, std::move(shape));
  AHA_CHECK_EQ(static_cast<int64_t>(values.size()), t.numel());
  std::memcpy(t.raw(), values.data(), t.nbytes());
  return t;
}

void Tensor::SetZero() {
  if (!data_) return;
  AHA_CHECK(!reserved_) << "SetZero of a reserved tensor (no memory behind it)";
  if (device_.is_cpu()) std::memset(data_, 0, nbytes());
  else g_device_memory->zero(data_, nbytes(), device_.index);
}

Tensor Tensor::ToDevice(Device device) const {
  AHA_CHECK(!reserved_) << "copy of a reserved tensor (no memory behind it)";
  Tensor out(dtype_, shape_, device);
  if (nbytes() == 0) return out;
  if (device_.is_cpu() && device.is_cpu()) std::memcpy(out.raw(), raw(), nbytes());
  else if (device_.is_cpu()) g_device_memory->copy(out.raw(), raw(), nbytes(), 0, device.index);
  else if (device.is_cpu()) g_device_memory->copy(out.raw(), raw(), nbytes(), 1, device_.index);
  else g_device_memory->copy(out.raw(), raw(), nbytes(), 2, device.index);
  return out;
}

Tensor Tensor::To(DType dtype) const {
  if (!device_.is_cpu()) return ToDevice(Device::Cpu()).To(dtype);
  Tensor out(dtype, shape_, device_);
  if (dtype == dtype_) {
    std::memcpy(out.raw(), raw(), nbytes());
  } else if (dtype_ == DType::kF32 && dtype == DType::kBF16) {
    F32ToBF16(static_cast<const float*>(data_), out.bf16(), numel_);
  } else if (dtype_ == DType::kBF16 && dtype == DType::kF32) {
    BF16ToF32(static_cast<const uint16_t*>(data_), out.f32(), numel_);
  } else {
    AHA_CHECK(false) << "no conversion " << DTypeName(dtype_) << " -> " << DTypeName(dtype);
  }
  return out;
}

std::vector<float> Tensor::ToVector() const {
  if (!device_.is_cpu()) return ToDevice(Device::Cpu()).ToVector();
  std::vector<float> v(numel_);
  if (dtype_ == DType::kF32) {
    std::memcpy(v.data(), data_, nbytes());
  } else if (dtype_ == DType::kBF16) {
    BF16ToF32(static_cast<const uint16_t*>(data_), v.data(), numel_);
  } else {
    const int32_t* p = static_cast<const int32_t*>(data_);
    for (int64_t i = 0; i < numel_; ++i) v[i] = static_cast<float>(p[i]);
  }
  return v;
}

}  // namespace aha::engine
