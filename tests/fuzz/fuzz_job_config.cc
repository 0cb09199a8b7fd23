// Fuzz target: the job-file parser (common/config.h) on arbitrary text. Must return a Status,
// never crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto r = aha::ParseJobConfig(text, "fuzz.yaml");
  if (r.ok()) (void)aha::ToYaml(*r);
  return 0;
}
