#include <cstring>
#include <iostream>
#include <string>

#include "common/flags.h"
#include "common/version.h"
#include "orchestrator/commands.h"

namespace aha {

const std::vector<Command>& Commands() {
  static const std::vector<Command> commands = {
  };
  return commands;
}

namespace {

void PrintUsage() {
  std::cout << "usage: aha <command> [flags]   (aha <command> --help for its flags)\n\n"
               "aha trains reasoning language models with GRPO: actors sample groups of answers,\n"
               "rewardd scores them with rules, replay stores them, the learner trains.\n\ncommands:\n";
  for (const auto& c : Commands()) std::cout << "  " << c.name << std::string(12 - std::strlen(c.name), ' ') << c.summary << "\n";
}

}  // namespace

int RunAha(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage();
    return 2;
  }
  std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    PrintUsage();
    return 0;
  }
  if (name == "--version") {
    std::cout << "aha " << kAhaVersion << " (" << kAhaRevision << ")\n";
    return 0;
  }
  for (const auto& c : Commands()) {
    if (name == c.name) {
      std::string program = "aha " + name;
      std::vector<char*> args(argv + 1, argv + argc);
      args[0] = program.data();
      return c.run(static_cast<int>(args.size()), args.data());
    }
  }
  if (!name.empty() && name[0] == '-') return Fail("aha", "unknown flag '" + name + "' (see aha --help)", 2);
  return Fail("aha", "unknown command '" + name + "' (see aha --help)", 2);
}

}  // namespace aha
