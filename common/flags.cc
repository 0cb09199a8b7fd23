#include "common/flags.h"

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>

namespace aha {

FlagSet::FlagSet(std::string program, std::string summary)
    : program_(std::move(program)), summary_(std::move(summary)) {}

FlagSet::Flag* FlagSet::Find(const std::string& name) {
  for (auto& f : flags_)
    if (f.name == name) return &f;
  return nullptr;
}

bool FlagSet::was_set(const std::string& name) const {
  for (const auto& f : flags_)
    if (f.name == name) return f.seen;
  return false;
}

void FlagSet::String(const std::string& name, std::string* out, const std::string& help) {
  flags_.push_back({name, help, "string", [out](const std::string& v) {
                      *out = v;
                      return OkStatus();
                    }});
}

void FlagSet::Int(const std::string& name, int64_t* out, const std::string& help) {
  flags_.push_back({name, help, "int", [out, name](const std::string& v) {
                      int64_t x = 0;
                      auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
                      if (ec != std::errc() || p != v.data() + v.size() || v.empty())
                        return InvalidArgument("--" + name + " expects an integer, got '" + v + "'");
                      *out = x;
                      return OkStatus();
                    }});
}

void FlagSet::Double(const std::string& name, double* out, const std::string& help) {
  flags_.push_back({name, help, "number", [out, name](const std::string& v) {
                      char* end = nullptr;
                      double x = std::strtod(v.c_str(), &end);
                      if (v.empty() || end != v.c_str() + v.size())
                        return InvalidArgument("--" + name + " expects a number, got '" + v + "'");
                      *out = x;
                      return OkStatus();
                    }});
}

void FlagSet::Bool(const std::string& name, bool* out, const std::string& help) {
  flags_.push_back({name, help, "bool", [out, name](const std::string& v) {
                      if (v == "" || v == "true" || v == "1") *out = true;
                      else if (v == "false" || v == "0") *out = false;
                      else return InvalidArgument("--" + name + " expects true or false, got '" + v + "'");
                      return OkStatus();
                    }});
}

void FlagSet::StringList(const std::string& name, std::vector<std::string>* out,
                         const std::string& help) {
  flags_.push_back({name, help, "list", [out](const std::string& v) {
                      out->push_back(v);
                      return OkStatus();
                    }});
}

void FlagSet::Positional(const std::string& name, std::string* out, const std::string& help,
                         bool required) {
  positionals_.push_back({name, help, out, required});
}

Status FlagSet::Parse(int argc, char** argv) {
  size_t next_pos = 0;
  bool only_positionals = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (!only_positionals && arg == "--") {
      only_positionals = true;
      continue;
    }
    if (!only_positionals && (arg == "--help" || arg == "-h")) {
      help_requested_ = true;
      return OkStatus();
    }
    if (!only_positionals && arg.size() > 1 && arg[0] == '-') {
      std::string name = arg.substr(arg[1] == '-' ? 2 : 1), value;
      bool has_value = false;
      if (auto eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      Flag* f = Find(name);
      if (!f) return InvalidArgument("unknown flag '" + arg + "' (see --help)");
      if (!has_value && f->kind != "bool") {
        if (i + 1 >= argc) return InvalidArgument("flag --" + name + " needs a value");
        value = argv[++i];
      }
      RETURN_IF_ERROR(f->set(value));
      f->seen = true;
      continue;
    }
    if (next_pos >= positionals_.size())
      return InvalidArgument("unexpected argument '" + arg + "' (see --help)");
    *positionals_[next_pos++].out = arg;
  }
  for (size_t p = next_pos; p < positionals_.size(); ++p)
    if (positionals_[p].required) return InvalidArgument("missing argument " + positionals_[p].name);
  return OkStatus();
}

std::string FlagSet::Usage() const {
  std::ostringstream os;
  os << "usage: " << program_;
  if (!flags_.empty()) os << " [flags]";
  for (const auto& p : positionals_) os << (p.required ? " " : " [") << p.name << (p.required ? "" : "]");
  os << "\n\n" << summary_ << "\n";
  if (!positionals_.empty()) {
    os << "\narguments:\n";
    for (const auto& p : positionals_) os << "  " << p.name << "\n      " << p.help << "\n";
  }
  os << "\nflags:\n";
  for (const auto& f : flags_) {
    os << "  --" << f.name;
    if (f.kind != "bool") os << " <" << f.kind << ">";
    os << "\n      " << f.help << "\n";
  }
  os << "  --help\n      print this help\n";
  if (!epilog_.empty()) os << "\n" << epilog_ << "\n";
  return os.str();
}

void ParseOrExit(FlagSet& flags, int argc, char** argv) {
  Status s = flags.Parse(argc, argv);
  if (!s.ok()) std::exit(Fail(flags.program(), s.message(), 2));
  if (flags.help_requested()) {
    std::cout << flags.Usage();
    std::exit(0);
  }
}

int Fail(const std::string& program, const std::string& message, int code) {
  std::string line = message;
  for (char& c : line)
    if (c == '\n') c = ' ';
  std::fprintf(stderr, "%s: error: %s\n", program.c_str(), line.c_str());
  return code;
}

}  // namespace aha
