// Fuzz target: one dataset line (replay/dataset.h) of arbitrary bytes. Must return a Status,
// never crash, throw or hang.
#include <capnp/message.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "replay/dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  capnp::MallocMessageBuilder message;
  auto task = message.initRoot<aha::proto::Task>();
  (void)aha::replay::ParseTaskJson(std::string_view(reinterpret_cast<const char*>(data), size), task);
  return 0;
}
