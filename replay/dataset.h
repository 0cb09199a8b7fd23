// Prompt datasets: JSONL records (docs/data.md) parsed into proto::Task.
//
// One JSON object per line:
//   {"id": "gsm8k-17", "prompt": "...", "answer": "42", "kind": "math",
//    "tests": [{"stdin": "1 2\n", "stdout": "3\n"}], "language": "python",
//    "metadata": {"numbers": [3, 7, 25], "target": 46}}
// `id`, `prompt` and `kind` are required, `answer` too except for code tasks; countdown tasks need
// metadata.numbers (integers) and metadata.target (integer). Unknown top-level fields are errors
// (they are usually typos: "promt"); put anything extra under `metadata`, which is passed through.
//
// A dataset file is untrusted input: every failure names the line and the field, lines are capped
// at kMaxLineBytes (a file without newlines cannot make the loader buffer it whole), and nlohmann's
// parser is used without exceptions and with its default depth guard.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "common/status.h"
#include "proto/task.capnp.h"

namespace aha::replay {

inline constexpr size_t kMaxLineBytes = 16u << 20;

// Fills `out` from one JSON line. InvalidArgument names the field: "field 'prompt': missing".
Status ParseTaskJson(std::string_view line, proto::Task::Builder out);

struct DatasetReadOptions {
  bool skip_bad = false;  // count and skip malformed lines instead of failing the load
};

struct DatasetReadReport {
  uint64_t lines = 0;     // non-blank lines seen
  uint64_t records = 0;   // tasks handed to the sink
  uint64_t skipped = 0;   // malformed lines skipped (skip_bad)
  uint64_t fingerprint = 0;  // FNV-1a of the file's bytes
  std::string first_error;   // "data.jsonl:17: field 'kind': ..." of the first skipped line
};

// Reads `path` line by line and calls `sink(line_number, task)` for each valid record, in file
// order. Fails with "PATH:LINE: field 'x': reason" on the first bad line unless skip_bad is set,
// and on duplicate ids (an id must name one task). Stops at the sink's first error.
Status ReadDatasetJsonl(const std::string& path, const DatasetReadOptions& options,
                        const std::function<Status(uint64_t line, proto::Task::Reader task)>& sink,
                        DatasetReadReport* report);

}  // namespace aha::replay
