// FlagSet: the command-line parser of every aha binary.
//
// Flags are `--name value`, `--name=value` or, for booleans, `--name`. Positionals are matched in
// order. `--help` prints the usage. Anything else (an unknown flag, a missing value, a value of the
// wrong type, a missing required positional) is an InvalidArgument naming the flag. ParseOrExit()
// turns that into the one-line `prog: error: ...` on stderr and exit code 2, as every CLI must.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"

namespace aha {

class FlagSet {
 public:
  FlagSet(std::string program, std::string summary);

  void String(const std::string& name, std::string* out, const std::string& help);
  void Int(const std::string& name, int64_t* out, const std::string& help);
  void Double(const std::string& name, double* out, const std::string& help);
  void Bool(const std::string& name, bool* out, const std::string& help);
  // Repeatable: every occurrence appends.
  void StringList(const std::string& name, std::vector<std::string>* out, const std::string& help);
  void Positional(const std::string& name, std::string* out, const std::string& help, bool required);
  // Extra text after the flag table (what the program does not do yet, examples...).
  void Epilog(const std::string& text) { epilog_ = text; }

  // Ok, or InvalidArgument. Sets help_requested() instead of failing on --help.
  Status Parse(int argc, char** argv);
  bool help_requested() const { return help_requested_; }
  bool was_set(const std::string& name) const;
  std::string Usage() const;
  const std::string& program() const { return program_; }

 private:
  struct Flag {
    std::string name;
    std::string help;
    std::string kind;  // string, int, double, bool, list
    std::function<Status(const std::string&)> set;
    bool seen = false;
  };
  struct Pos {
    std::string name;
    std::string help;
    std::string* out;
    bool required;
  };
  Flag* Find(const std::string& name);

  std::string program_, summary_, epilog_;
  std::vector<Flag> flags_;
  std::vector<Pos> positionals_;
  bool help_requested_ = false;
};

// Parses or exits: usage on stdout and exit 0 for --help, `prog: error: ...` and exit 2 on error.
void ParseOrExit(FlagSet& flags, int argc, char** argv);

// Prints `prog: error: message` (one line) to stderr and returns `code`, for `return Fail(...)`.
int Fail(const std::string& program, const std::string& message, int code = 1);

}  // namespace aha
