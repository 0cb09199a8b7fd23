// Export: stored samples as JSONL, the input format of SFT (cold start, rejection sampling,
// distillation). `aha-replay export --db DIR --out FILE.jsonl [--filter correct|all] [--min-reward X]`.
//
// One line per stored sample (docs/data.md, "Export records"):
//   {"id": task id, "group_id": "g000000000042", "sample_index": 3, "kind": "math",
//    "prompt": "...", "completion": "...", "answer": reference answer, "reward": 1.0,
//    "correct": true, "components": {"accuracy": 1.0, "format": 1.0}, "finish_reason": "stop",
//    "state": "served"}
// The DB is opened read-only, so a running aha-replay may keep writing meanwhile (the export sees
// the state at the moment it opened the DB).
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace aha::replay {

struct ExportOptions {
  std::string db_path;
  std::string out_path;
  bool only_correct = false;  // --filter correct
  bool has_min_reward = false;
  double min_reward = 0;
};

struct ExportReport {
  uint64_t scanned = 0;  // samples read
  uint64_t written = 0;  // lines written
};

Result<ExportReport> ExportJsonl(const ExportOptions& options);

}  // namespace aha::replay
