// safetensors reader and writer (format and limits in safetensors.h).
#include "engine/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace aha::engine {

using nlohmann::json;

namespace {

int DtypeBytes(const std::string& d) {
  if (d == "F32" || d == "I32") return 4;
  if (d == "BF16" || d == "F16") return 2;
  if (d == "I64" || d == "F64") return 8;
  if (d == "I8" || d == "U8" || d == "BOOL") return 1;
  return 0;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else v = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

}  // namespace

Result<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return NotFound(path + ": cannot open");
  const std::streamsize size = in.tellg();
  in.seekg(0);
  std::vector<char> bytes(static_cast<size_t>(std::max<std::streamsize>(size, 0)));
  if (size > 0 && !in.read(bytes.data(), size)) return IoError(path + ": read failed");
  return FromBytes(std::move(bytes), path);
}

Result<SafetensorsFile> SafetensorsFile::FromBytes(std::vector<char> bytes, const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  f.bytes_ = std::move(bytes);
  const uint64_t size = f.bytes_.size();
  if (size < 8) return DataLoss(path + ": truncated safetensors file (" + std::to_string(size) + " bytes, no header length)");
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(static_cast<uint8_t>(f.bytes_[i])) << (8 * i);
  if (header_len > kMaxSafetensorsHeaderBytes)
    return DataLoss(path + ": safetensors header length " + std::to_string(header_len) + " exceeds the limit");
  if (8 + header_len > size)
    return DataLoss(path + ": truncated safetensors header (claims " + std::to_string(header_len) +
                    " bytes, file has " + std::to_string(size - 8) + ")");
  f.data_start_ = 8 + header_len;
  const uint64_t data_len = size - f.data_start_;
  json h = json::parse(f.bytes_.begin() + 8, f.bytes_.begin() + 8 + header_len, nullptr, false);
  if (h.is_discarded() || !h.is_object()) return DataLoss(path + ": safetensors header is not a JSON object");
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") {
      if (e.is_object())
        for (auto m = e.begin(); m != e.end(); ++m)
          if (m.value().is_string()) f.metadata_[m.key()] = m.value().get<std::string>();
      continue;
    }
    const std::string where = path + ": tensor " + name + ": ";
    if (!e.is_object() || !e.contains("dtype") || !e["dtype"].is_string() || !e.contains("shape") ||
        !e["shape"].is_array() || !e.contains("data_offsets") || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2)
      return DataLoss(where + "malformed header entry");
    SafetensorsEntry entry;
    entry.dtype = e["dtype"].get<std::string>();
    const int eb = DtypeBytes(entry.dtype);
    if (eb == 0) return InvalidArgument(where + "unsupported dtype " + entry.dtype);
    uint64_t count = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
        return DataLoss(where + "bad shape");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 40) || (dim && count > (uint64_t{1} << 40) / dim)) return DataLoss(where + "shape too large");
      count *= dim;
      entry.shape.push_back(static_cast<int64_t>(dim));
    }
    for (const auto& o : e["data_offsets"])
      if (!o.is_number_unsigned() && !(o.is_number_integer() && o.get<int64_t>() >= 0))
        return DataLoss(where + "bad data_offsets");
    entry.begin = e["data_offsets"][0].get<uint64_t>();
    entry.end = e["data_offsets"][1].get<uint64_t>();
    if (entry.begin > entry.end || entry.end > data_len)
      return DataLoss(where + "data range [" + std::to_string(entry.begin) + ", " + std::to_string(entry.end) +
                      ") outside the file's " + std::to_string(data_len) + " data bytes (truncated?)");
    if (entry.end - entry.begin != count * eb)
      return DataLoss(where + "byte size " + std::to_string(entry.end - entry.begin) + " does not match " +
                      entry.dtype + " " + ShapeString(entry.shape));
    f.entries_[name] = std::move(entry);
  }
  return f;
}

Result<Tensor> SafetensorsFile::Read(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return NotFound(path_ + ": missing tensor " + name);
  const SafetensorsEntry& e = it->second;
  const char* src = bytes_.data() + data_start_ + e.begin;
  const int64_t n = NumElements(e.shape);
  if (e.dtype == "F32") {
    Tensor t(DType::kF32, e.shape);
    std::memcpy(t.raw(), src, n * 4);
    return t;
  }
  if (e.dtype == "BF16" || e.dtype == "F16") {
    Tensor t(DType::kF32, e.shape);
    float* out = t.f32();
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      out[i] = e.dtype == "BF16" ? BF16ToF32(h) : HalfToFloat(h);
    }
    return t;
  }
  if (e.dtype == "I32") {
    Tensor t(DType::kI32, e.shape);
    std::memcpy(t.raw(), src, n * 4);
    return t;
  }
  if (e.dtype == "I64") {
    Tensor t(DType::kI32, e.shape);
    int32_t* out = t.i32();
    for (int64_t i = 0; i < n; ++i) {
      int64_t v;
      std::memcpy(&v, src + 8 * i, 8);
      if (v < INT32_MIN || v > INT32_MAX) return InvalidArgument(path_ + ": tensor " + name + ": I64 value out of i32 range");
      out[i] = static_cast<int32_t>(v);
    }
    return t;
  }
  return InvalidArgument(path_ + ": tensor " + name + ": unsupported dtype " + e.dtype);
}

Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  std::vector<const NamedTensor*> sorted;
  for (const auto& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const NamedTensor* t : sorted) {
    const uint64_t bytes = NumElements(t->shape) * DTypeSize(t->dtype);
    const char* dt = t->dtype == DType::kF32 ? "F32" : t->dtype == DType::kBF16 ? "BF16" : "I32";
    h[t->name] = {{"dtype", dt}, {"shape", t->shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header = h.dump();
  while (header.size() % 8 != 0) header.push_back(' ');
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return IoError(tmp + ": cannot create");
    uint64_t len = header.size();
    char lenbytes[8];
    for (int i = 0; i < 8; ++i) lenbytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
    out.write(lenbytes, 8);
    out.write(header.data(), header.size());
    for (const NamedTensor* t : sorted)
      out.write(static_cast<const char*>(t->data), NumElements(t->shape) * DTypeSize(t->dtype));
    if (!out.flush()) return IoError(tmp + ": write failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return IoError(path + ": rename failed: " + ec.message());
  return OkStatus();
}

Result<SafetensorsModel> SafetensorsModel::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  SafetensorsModel m;
  const std::string single = dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  if (fs::exists(single)) {
    ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(single));
    for (const auto& [name, e] : f.entries()) m.where_[name] = 0;
    m.files_.push_back(std::move(f));
    return m;
  }
  if (!fs::exists(index)) return NotFound(dir + ": no model.safetensors or model.safetensors.index.json");
  std::ifstream in(index);
  json j = json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    return InvalidArgument(index + ": no \"weight_map\" object");
  std::map<std::string, int> file_index;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) return InvalidArgument(index + ": tensor " + it.key() + ": shard name is not a string");
    const std::string shard = it.value().get<std::string>();
    // Shards must be plain file names in the model directory (no traversal out of it).
    if (shard.empty() || shard.find('/') != std::string::npos || shard.find("..") != std::string::npos)
      return InvalidArgument(index + ": tensor " + it.key() + ": bad shard name '" + shard + "'");
    if (!file_index.count(shard)) {
      ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(dir + "/" + shard));
      file_index[shard] = static_cast<int>(m.files_.size());
      m.files_.push_back(std::move(f));
    }
    const int fi = file_index[shard];
    if (!m.files_[fi].Has(it.key()))
      return DataLoss(dir + "/" + shard + ": missing tensor " + it.key() + " (listed in model.safetensors.index.json)");
    m.where_[it.key()] = fi;
  }
  return m;
}

bool SafetensorsModel::Has(const std::string& name) const { return where_.count(name) > 0; }

const SafetensorsEntry* SafetensorsModel::Find(const std::string& name, std::string* file) const {
  auto it = where_.find(name);
  if (it == where_.end()) return nullptr;
  const SafetensorsFile& f = files_[it->second];
  if (file) *file = f.path();
  return &f.entries().at(name);
}

Result<Tensor> SafetensorsModel::Read(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    std::string where = files_.empty() ? "model" : files_[0].path();
    return NotFound(where + ": missing tensor " + name);
  }
  return files_[it->second].Read(name);
}

std::vector<std::string> SafetensorsModel::Names() const {
  std::vector<std::string> out;
  for (const auto& [n, _] : where_) out.push_back(n);
  return out;
}

}  // namespace aha::engine
