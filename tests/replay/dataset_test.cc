// Dataset JSONL parsing: valid records of every kind, and malformed lines named by line and field.
#include "replay/dataset.h"

#include <capnp/message.h>
#include <gtest/gtest.h>

#include <random>

#include "tests/replay/test_util.h"

namespace aha::replay {
namespace {

using testing::TempDir;
using testing::WriteFile;

Status Parse(const std::string& line) {
  capnp::MallocMessageBuilder m;
  return ParseTaskJson(line, m.initRoot<proto::Task>());
}

TEST(ParseTaskJson, ReadsMathCountdownAndCodeRecords) {
  capnp::MallocMessageBuilder m;
  auto t = m.initRoot<proto::Task>();
  ASSERT_TRUE(ParseTaskJson(R"({"id":"a","prompt":"1+1?","answer":"2","kind":"math","metadata":{"src":"x"}})", t).ok());
  EXPECT_EQ(std::string(t.getId().cStr()), "a");
  EXPECT_EQ(t.getKind(), proto::TaskKind::MATH);
  EXPECT_EQ(std::string(t.getAnswer().cStr()), "2");
  EXPECT_EQ(std::string(t.getMetadata().cStr()), R"({"src":"x"})");

  capnp::MallocMessageBuilder m2;
  auto c = m2.initRoot<proto::Task>();
  ASSERT_TRUE(ParseTaskJson(
      R"({"id":7,"prompt":"make 24","answer":"","kind":"countdown","metadata":{"numbers":[3,8,1],"target":24}})", c).ok());
  EXPECT_EQ(std::string(c.getId().cStr()), "7");  // integer ids are accepted as text
  ASSERT_EQ(c.getNumbers().size(), 3u);
  EXPECT_EQ(c.getNumbers()[1], 8);
  EXPECT_EQ(c.getTarget(), 24);

  capnp::MallocMessageBuilder m3;
  auto code = m3.initRoot<proto::Task>();
  ASSERT_TRUE(ParseTaskJson(
      R"({"id":"c","prompt":"add","kind":"code","language":"python","tests":[{"stdin":"1 2\n","stdout":"3\n"}]})", code).ok());
  ASSERT_EQ(code.getTests().size(), 1u);
  EXPECT_EQ(std::string(code.getTests()[0].getExpectedStdout().cStr()), "3\n");
  EXPECT_EQ(std::string(code.getLanguage().cStr()), "python");
}

TEST(ParseTaskJson, NamesTheBadField) {
  struct Case {
    const char* line;
    const char* expect;
  } cases[] = {
      {R"({"id":"a","answer":"1","kind":"math"})", "field 'prompt': missing"},
      {R"({"id":"a","prompt":"p","answer":"1","kind":"poetry"})", "field 'kind'"},
      {R"({"id":"a","prompt":"p","answer":"1","kind":"math","promt":"x"})", "field 'promt': unknown field"},
      {R"({"id":"a","prompt":7,"answer":"1","kind":"math"})", "field 'prompt': expected a string"},
      {R"({"id":"","prompt":"p","answer":"1","kind":"math"})", "field 'id': empty"},
      {R"({"id":"a","prompt":"p","kind":"math"})", "field 'answer': missing"},
      {R"({"id":"a","prompt":"p","answer":"1","kind":"countdown","metadata":{"target":3}})", "field 'metadata.numbers'"},
      {R"({"id":"a","prompt":"p","answer":"1","kind":"countdown","metadata":{"numbers":[1,"x"],"target":3}})", "field 'metadata.numbers[1]'"},
      {R"({"id":"a","prompt":"p","kind":"code","tests":[{"stdin":"1"}]})", "field 'tests[0].stdout': missing"},
      {R"({"id":"a","prompt":"p","kind":"code"})", "field 'tests'"},
      {R"({"id":"a","prompt":"p","answer":"1","kind":"math","metadata":[1]})", "field 'metadata': expected an object"},
      {R"([1,2])", "expected a JSON object"},
      {R"({"id":"a",)", "not valid JSON"},
  };
  for (const auto& c : cases) {
    Status s = Parse(c.line);
    EXPECT_TRUE(IsInvalidArgument(s)) << c.line;
    EXPECT_NE(s.message().find(c.expect), std::string::npos) << c.line << " -> " << s.message();
  }
}

TEST(ParseTaskJson, RandomBytesNeverCrash) {
  std::mt19937_64 rng(7);
  std::string valid = R"({"id":"a","prompt":"p","answer":"1","kind":"countdown","metadata":{"numbers":[1,2],"target":3}})";
  for (int i = 0; i < 3000; ++i) {
    std::string line = valid;
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) line[rng() % line.size()] = static_cast<char>(rng() % 256);
    (void)Parse(line);  // any Status is fine; it must not crash or throw
  }
}

TEST(ReadDatasetJsonl, FailsWithLineNumberAndField) {
  TempDir dir;
  std::string path = WriteFile(dir.Sub("d.jsonl"),
                               "{\"id\":\"a\",\"prompt\":\"p\",\"answer\":\"1\",\"kind\":\"math\"}\n"
                               "\n"
                               "{\"id\":\"b\",\"answer\":\"1\",\"kind\":\"math\"}\n");
  DatasetReadReport report;
  int seen = 0;
  Status s = ReadDatasetJsonl(path, {}, [&](uint64_t, proto::Task::Reader) { ++seen; return OkStatus(); }, &report);
  ASSERT_TRUE(IsInvalidArgument(s));
  EXPECT_EQ(s.message(), path + ":3: field 'prompt': missing");
}

TEST(ReadDatasetJsonl, SkipBadCountsSkippedLinesAndKeepsTheRest) {
  TempDir dir;
  std::string path = WriteFile(dir.Sub("d.jsonl"),
                               "{\"id\":\"a\",\"prompt\":\"p\",\"answer\":\"1\",\"kind\":\"math\"}\n"
                               "not json\n"
                               "{\"id\":\"a\",\"prompt\":\"q\",\"answer\":\"1\",\"kind\":\"math\"}\n"
                               "{\"id\":\"c\",\"prompt\":\"r\",\"answer\":\"1\",\"kind\":\"arith\"}");
  DatasetReadReport report;
  std::vector<uint64_t> lines;
  ASSERT_TRUE(ReadDatasetJsonl(path, {.skip_bad = true},
                               [&](uint64_t line, proto::Task::Reader) { lines.push_back(line); return OkStatus(); },
                               &report).ok());
  EXPECT_EQ(lines, (std::vector<uint64_t>{1, 4}));  // line 3 repeats id "a"
  EXPECT_EQ(report.skipped, 2u);
  EXPECT_EQ(report.records, 2u);
  EXPECT_EQ(report.first_error, path + ":2: not valid JSON");
}

TEST(ReadDatasetJsonl, DuplicateIdFailsTheLoad) {
  TempDir dir;
  std::string path = WriteFile(dir.Sub("d.jsonl"),
                               "{\"id\":\"a\",\"prompt\":\"p\",\"answer\":\"1\",\"kind\":\"math\"}\n"
                               "{\"id\":\"a\",\"prompt\":\"q\",\"answer\":\"1\",\"kind\":\"math\"}\n");
  DatasetReadReport report;
  Status s = ReadDatasetJsonl(path, {}, [](uint64_t, proto::Task::Reader) { return OkStatus(); }, &report);
  EXPECT_EQ(s.message(), path + ":2: field 'id': duplicate 'a' (first on line 1)");
}

TEST(ReadDatasetJsonl, MissingFileIsNotFound) {
  DatasetReadReport report;
  Status s = ReadDatasetJsonl("/nonexistent/d.jsonl", {}, [](uint64_t, proto::Task::Reader) { return OkStatus(); }, &report);
  EXPECT_TRUE(IsNotFound(s));
}

}  // namespace
}  // namespace aha::replay
