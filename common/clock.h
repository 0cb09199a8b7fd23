// Wall-clock intervals for the timings the daemons, benchmarks and generator report.
#pragma once

#include <chrono>

namespace aha {

using Clock = std::chrono::steady_clock;

// Seconds from `since` to now.
inline double SecondsSince(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

}  // namespace aha
