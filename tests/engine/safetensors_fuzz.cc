// Fuzz target for the model-file parsers: the bytes are tried as a safetensors file (every tensor
// it declares is then read) and as a config.json. Neither may crash, hang or read out of bounds;
// errors are values.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aha::engine;
  std::vector<char> bytes(reinterpret_cast<const char*>(data), reinterpret_cast<const char*>(data) + size);
  auto file = SafetensorsFile::FromBytes(bytes, "fuzz.safetensors");
  if (file.ok()) {
    for (const auto& [name, entry] : file->entries()) {
      // Bound the work per input: a header may declare a huge (but in-bounds, so file-sized) tensor.
      if (entry.end - entry.begin > (1u << 24)) continue;
      auto t = file->Read(name);
      (void)t;
    }
  }
  auto config = ParseModelConfig(std::string(bytes.begin(), bytes.end()), "fuzz/config.json");
  (void)config;
  return 0;
}
