// Progress: what `aha run` shows while a job runs. On a terminal one line redrawn in place (stage,
// bar, step/total, reward, accuracy, tokens/s, ETA); otherwise a plain line per new step, so logs
// and CI output stay readable.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace aha {

class Progress {
 public:
  explicit Progress(bool tty) : tty_(tty) {}
  // A message on its own line.
  void Line(const std::string& text);
  // Reads the newest line of the learner's metrics JSONL and redraws.
  void Update(const std::string& metrics_jsonl, int64_t total_steps, std::chrono::steady_clock::time_point started);
  void Finish();

 private:
  bool tty_;
  bool drawn_ = false;
  int64_t last_step_ = -1;
};

// "1h02m", "3m07s", "12s".
std::string FormatDuration(double seconds);

}  // namespace aha
