// safetensors: read and write the Hugging Face tensor file format.
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length H,
// H bytes of JSON {"NAME": {"dtype": "F32"|"BF16"|..., "shape": [..], "data_offsets": [begin, end]},
// ..., "__metadata__": {str: str}}, then the data block; offsets are relative to the data block,
// row-major, little-endian. Writers pad the header with spaces to a multiple of 8 bytes.
//
// The reader treats the file as untrusted: the header length is capped (kMaxHeaderBytes, stops a
// huge allocation from an 8-byte lie), every tensor's byte range must lie inside the file and match
// its dtype times its shape (stops out-of-bounds reads), and each error names the file and tensor.
// Read dtypes: F32, BF16, F16, I32, I64 (I64 narrowed to i32 when in range; F16 widened to f32).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/tensor.h"

namespace aha::engine {

inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100 << 20;

struct SafetensorsEntry {
  std::string dtype;  // as in the file: "F32", "BF16", ...
  Shape shape;
  uint64_t begin = 0, end = 0;  // in the data block
};

// One opened file: the parsed header and the whole file's bytes.
class SafetensorsFile {
 public:
  static Result<SafetensorsFile> Open(const std::string& path);
  // Parses a whole file's bytes; `path` only names it in errors.
  static Result<SafetensorsFile> FromBytes(std::vector<char> bytes, const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool Has(const std::string& name) const { return entries_.count(name) > 0; }
  // The tensor converted to f32 (floating dtypes) or i32 (integer dtypes), on the CPU.
  Result<Tensor> Read(const std::string& name) const;

 private:
  std::string path_;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  std::vector<char> bytes_;
  uint64_t data_start_ = 0;
};

// A named CPU tensor view for writing (f32, bf16 or i32 storage).
struct NamedTensor {
  std::string name;
  DType dtype;  // of `data`
  Shape shape;
  const void* data;
};

// Writes tensors (sorted by name) with `metadata`; written via a temporary file and rename, so a
// crash never leaves a half-written file under `path`.
Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

// A model's weights: model.safetensors, or the shards listed in model.safetensors.index.json.
class SafetensorsModel {
 public:
  static Result<SafetensorsModel> Open(const std::string& dir);
  bool Has(const std::string& name) const;
  // Errors name the file and the tensor.
  Result<Tensor> Read(const std::string& name) const;
  const SafetensorsEntry* Find(const std::string& name, std::string* file) const;
  std::vector<std::string> Names() const;

 private:
  std::vector<SafetensorsFile> files_;
  std::map<std::string, int> where_;  // tensor name -> index in files_
};

}  // namespace aha::engine
