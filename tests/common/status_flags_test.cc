#include <gtest/gtest.h>

#include "common/flags.h"
#include "common/status.h"

namespace aha {
namespace {

Result<int> Half(int x) {
  if (x % 2) return InvalidArgument("odd");
  return x / 2;
}

Status UseHalf(int x, int* out) {
  ASSIGN_OR_RETURN(*out, Half(x));
  RETURN_IF_ERROR(x > 100 ? OutOfRange("big") : OkStatus());
  return OkStatus();
}

TEST(Status, PropagatesErrorsThroughMacros) {
  int v = 0;
  EXPECT_TRUE(UseHalf(8, &v).ok());
  EXPECT_EQ(v, 4);
  Status s = UseHalf(3, &v);
  EXPECT_TRUE(IsInvalidArgument(s));
  EXPECT_EQ(s.ToString(), "invalid argument: odd");
  EXPECT_TRUE(IsOutOfRange(UseHalf(200, &v)));
  EXPECT_EQ(Timeout("x").WithContext("rpc").ToString(), "timeout: rpc: x");
  EXPECT_TRUE(IsTimeout(Timeout("x")));
  EXPECT_FALSE(IsTimeout(Unavailable("x")));
}

TEST(Check, FailureNamesOperandsFileAndLine) {
  EXPECT_DEATH({ AHA_CHECK_EQ(1 + 1, 3) << "context"; },
               "check failed at .*status_flags_test.cc:[0-9]+: 1 \\+ 1 == 3 \\(2 vs 3\\) context");
  EXPECT_DEATH({ Result<int> r = InvalidArgument("bad"); (void)r.value(); }, "failed Result: invalid argument: bad");
}

struct Parsed {
  std::string name;
  int64_t n = 0;
  double x = 0;
  bool on = false;
  std::vector<std::string> sets;
  std::string pos;
};

Status ParseArgs(std::vector<std::string> args, Parsed* p, FlagSet** out = nullptr) {
  static FlagSet* keep = nullptr;
  delete keep;
  keep = new FlagSet("prog", "test");
  keep->String("name", &p->name, "");
  keep->Int("n", &p->n, "");
  keep->Double("x", &p->x, "");
  keep->Bool("on", &p->on, "");
  keep->StringList("set", &p->sets, "");
  keep->Positional("FILE", &p->pos, "", true);
  std::vector<char*> argv;
  std::string prog = "prog";
  argv.push_back(prog.data());
  for (auto& a : args) argv.push_back(a.data());
  if (out) *out = keep;
  return keep->Parse(static_cast<int>(argv.size()), argv.data());
}

TEST(Flags, ParsesEveryKind) {
  Parsed p;
  ASSERT_TRUE(ParseArgs({"--name", "a", "--n=5", "--x", "0.5", "--on", "--set", "a=1", "--set", "b=2", "f.yaml"}, &p).ok());
  EXPECT_EQ(p.name, "a");
  EXPECT_EQ(p.n, 5);
  EXPECT_DOUBLE_EQ(p.x, 0.5);
  EXPECT_TRUE(p.on);
  EXPECT_EQ(p.sets, (std::vector<std::string>{"a=1", "b=2"}));
  EXPECT_EQ(p.pos, "f.yaml");
}

TEST(Flags, RejectsUnknownFlagWithOneLine) {
  Parsed p;
  Status s = ParseArgs({"--bogus", "f"}, &p);
  EXPECT_TRUE(IsInvalidArgument(s));
  EXPECT_EQ(s.message(), "unknown flag '--bogus' (see --help)");
}

TEST(Flags, RejectsBadValuesAndMissingArguments) {
  Parsed p;
  EXPECT_EQ(ParseArgs({"--n", "five", "f"}, &p).message(), "--n expects an integer, got 'five'");
  EXPECT_EQ(ParseArgs({"--x", "1.5z", "f"}, &p).message(), "--x expects a number, got '1.5z'");
  EXPECT_EQ(ParseArgs({"f", "--name"}, &p).message(), "flag --name needs a value");
  EXPECT_EQ(ParseArgs({}, &p).message(), "missing argument FILE");
  EXPECT_EQ(ParseArgs({"f", "g"}, &p).message(), "unexpected argument 'g' (see --help)");
}

TEST(Flags, HelpIsNotAnError) {
  Parsed p;
  FlagSet* fs = nullptr;
  EXPECT_TRUE(ParseArgs({"--help"}, &p, &fs).ok());
  EXPECT_TRUE(fs->help_requested());
  EXPECT_NE(fs->Usage().find("--name"), std::string::npos);
}

}  // namespace
}  // namespace aha
