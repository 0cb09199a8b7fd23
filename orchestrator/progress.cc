#include "orchestrator/progress.h"

#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

namespace aha {

std::string FormatDuration(double s) {
  char buf[32];
  long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60) std::snprintf(buf, sizeof(buf), "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof(buf), "%lds", t);
  return buf;
}

void Progress::Line(const std::string& text) {
  if (drawn_) std::printf("\n");
  drawn_ = false;
  std::printf("%s\n", text.c_str());
  std::fflush(stdout);
}

void Progress::Update(const std::string& path, int64_t total, std::chrono::steady_clock::time_point started) {
  std::ifstream f(path);
  std::string line, last;
  while (std::getline(f, line))
    if (!line.empty()) last = line;
  if (last.empty()) return;
  auto j = nlohmann::json::parse(last, nullptr, false);
  if (j.is_discarded() || !j.contains("step")) return;
  int64_t step = j["step"].get<int64_t>();
  if (!tty_ && step == last_step_) return;
  last_step_ = step;
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  double eta = step > 0 ? elapsed / static_cast<double>(step) * static_cast<double>(total - step) : 0;
  const int width = 24;
  int fill = total > 0 ? static_cast<int>(width * step / total) : 0;
  std::string bar(static_cast<size_t>(fill), '#');
  bar += std::string(static_cast<size_t>(width - fill), '.');
  char buf[256];
  std::snprintf(buf, sizeof(buf), "grpo [%s] step %lld/%lld  reward %.3f  acc %.3f  len %.0f  tok/s %.0f  ETA %s",
                bar.c_str(), static_cast<long long>(step), static_cast<long long>(total), j.value("reward", 0.0),
                j.value("accuracy", 0.0), j.value("length", 0.0), j.value("tokens_per_s", 0.0), FormatDuration(eta).c_str());
  if (tty_) {
    std::printf("\r%s\x1b[K", buf);
    drawn_ = true;
  } else {
    std::printf("%s\n", buf);
  }
  std::fflush(stdout);
}

void Progress::Finish() {
  if (drawn_) std::printf("\n");
  drawn_ = false;
  std::fflush(stdout);
}

}  // namespace aha
