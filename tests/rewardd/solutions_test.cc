// Cold-start solutions: correct ones pass the verifiers, the wrong share is what was asked, and a
// malformed task line is an error with its line number.
#include "rewardd/solutions.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "rewardd/generators.h"
#include "rewardd/rewards.h"

namespace aha::rewardd {
namespace {

namespace fs = std::filesystem;

struct Files {
  fs::path dir = fs::temp_directory_path() / ("aha_solutions_" + std::to_string(::getpid()));
  Files() { fs::create_directories(dir); }
  ~Files() { fs::remove_all(dir); }
};

std::vector<DatasetRecord> WriteArith(const fs::path& path, int n) {
  ArithOptions o;
  o.min_digits = 1;
  o.max_digits = 3;
  auto recs = MakeArith(n, 5, o);
  EXPECT_TRUE(recs.ok());
  std::ofstream f(path);
  for (const auto& r : *recs) f << ToJsonLine(r) << "\n";
  return *recs;
}

std::vector<nlohmann::json> ReadLines(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream f(p);
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

TEST(ColdStartSolutions, CorrectSolutionsPassFormatAndAccuracy) {
  Files f;
  auto recs = WriteArith(f.dir / "tasks.jsonl", 200);
  auto n = WriteColdStartSolutions((f.dir / "tasks.jsonl").string(), (f.dir / "sft.jsonl").string(), {});
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 200);
  auto lines = ReadLines(f.dir / "sft.jsonl");
  ASSERT_EQ(lines.size(), 200u);
  for (size_t i = 0; i < lines.size(); ++i) {
    std::string c = lines[i]["completion"];
    EXPECT_EQ(lines[i]["prompt"], recs[i].prompt);
    EXPECT_EQ(ScoreFormat(c, false, false).score, 1.0) << c;
    EXPECT_EQ(ScoreArith(recs[i].answer, c).score, 1.0) << c << " gold " << recs[i].answer;
  }
}

TEST(ColdStartSolutions, WrongFractionIsHonoured) {
  Files f;
  auto recs = WriteArith(f.dir / "tasks.jsonl", 1000);
  SolutionOptions o;
  o.wrong_fraction = 0.3;
  o.seed = 9;
  ASSERT_TRUE(WriteColdStartSolutions((f.dir / "tasks.jsonl").string(), (f.dir / "sft.jsonl").string(), o).ok());
  auto lines = ReadLines(f.dir / "sft.jsonl");
  int wrong = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    std::string c = lines[i]["completion"];
    EXPECT_EQ(ScoreFormat(c, false, false).score, 1.0);  // wrong answers keep the format
    wrong += ScoreArith(recs[i].answer, c).score < 1.0;
  }
  EXPECT_NEAR(wrong / 1000.0, 0.3, 0.05);
}

TEST(ColdStartSolutions, MalformedLineNamesItsLine) {
  Files f;
  std::ofstream(f.dir / "bad.jsonl") << "{\"prompt\": \"p\", \"kind\": \"arith\", \"metadata\": {\"a\": 1, \"b\": 2, \"op\": \"+\"}}\n"
                                     << "not json\n";
  auto r = WriteColdStartSolutions((f.dir / "bad.jsonl").string(), (f.dir / "o.jsonl").string(), {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("bad.jsonl:2:"), std::string::npos) << r.status().message();
  std::ofstream(f.dir / "bad2.jsonl") << "{\"prompt\": \"p\", \"kind\": \"arith\", \"metadata\": {\"a\": 1, \"op\": \"+\"}}\n";
  r = WriteColdStartSolutions((f.dir / "bad2.jsonl").string(), (f.dir / "o.jsonl").string(), {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("metadata"), std::string::npos);
}

}  // namespace
}  // namespace aha::rewardd
