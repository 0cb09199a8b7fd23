// Logging: spdlog with the process name and role index on every line, to stderr and optionally a
// file. Call InitLogging once in main(); use the AHA_LOG_* macros (or spdlog directly) afterwards.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

#include "common/status.h"

namespace aha {

struct LogOptions {
  std::string process = "aha";  // aha-replay, aha-actor, ...
  int role_index = 0;           // actor 0, actor 1, ...
  std::string file;             // "" = stderr only
  std::string level = "info";   // trace|debug|info|warn|error
  bool to_stderr = true;        // false: the file only (CLIs that own the terminal)
};

// Installs the default logger: "[2026-11-28 14:00:00.123] [aha-actor:1] [info] message".
Status InitLogging(const LogOptions& options);

}  // namespace aha
