// Fuzz target: tokenizer.json text. Whatever the input, loading returns a status, and a tokenizer
// that loads encodes and decodes without crashing and only emits ids it can decode.
// Seed: seeds/tiny_tokenizer.json (every supported component). See tests/fuzz/CMakeLists.txt.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/check.h"
#include "engine/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto tok = aha::tokenizer::Tokenizer::FromJson(text);
  if (!tok.ok()) return 0;
  auto ids = (*tok)->Encode("Hello world 123 <|im_end|> <think> \xff caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac", true);
  for (int32_t id : ids) AHA_CHECK(!(*tok)->TokenBytes(id).empty()) << "encode emitted id " << id;
  (void)(*tok)->Decode(ids, false);
  return 0;
}
