// The `aha` command table. Each subcommand is `int Run...(int argc, char** argv)` where argv[0] is
// "aha <name>"; it returns the process exit code (0 ok, 2 bad usage, 1 other failure) and prints
// failures as one line via aha::Fail. Commands live with the component they drive (the tokenizer's
// in engine/tokenizer/, reward's in rewardd/, ...) and are listed here, in one readable table.
#pragma once

#include <string>
#include <vector>

namespace aha {

struct Command {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
};

// Every `aha` subcommand, in the order `aha --help` lists them.
const std::vector<Command>& Commands();

// Runs `aha` with its full argv.
int RunAha(int argc, char** argv);

}  // namespace aha
