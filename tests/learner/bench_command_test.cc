// `aha bench gen` and `aha bench train` on the CPU with a tiny model: their flags reach the run and its
// report, and bad values get a one-line error and exit 2.
#include "learner/bench_command.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "engine/commands.h"

namespace aha {
namespace {

namespace fs = std::filesystem;

// Runs a command's entry point with args, capturing what it prints on stdout (std::cout) and on
// stderr (the file descriptor: Fail() writes there with fprintf).
int RunCapture(int (*run)(int, char**), std::vector<std::string> args, std::string* out, std::string* err) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::ostringstream o;
  auto* old_out = std::cout.rdbuf(o.rdbuf());
  ::testing::internal::CaptureStderr();
  const int rc = run(static_cast<int>(argv.size()), argv.data());
  *err = ::testing::internal::GetCapturedStderr();
  std::cout.rdbuf(old_out);
  *out = o.str();
  return rc;
}

class BenchGen : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("aha_bench_gen_test_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    std::string out, err;
    ASSERT_EQ(RunCapture(RunInitCommand, {"aha init", "--preset", "tiny", "--out", dir_.string(), "--seed", "5"}, &out,
                  &err),
              0)
        << err;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::vector<std::string> Gen(std::vector<std::string> extra) const {
    std::vector<std::string> a = {"aha bench", "gen", "--model", dir_.string(), "--device", "cpu", "--prompts", "3",
                                  "--prompt-len", "4", "--new-tokens", "5"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  fs::path dir_;
};

TEST_F(BenchGen, SamplingFlagsReachTheRunAndItsReport) {
  std::string out, err;
  ASSERT_EQ(RunCapture(RunBenchCommand, Gen({"--temperature", "0.7", "--top-p", "0.9", "--top-k", "7"}), &out, &err), 0) << err;
  EXPECT_NE(out.find("sampling: temperature 0.7, top-p 0.9, top-k 7"), std::string::npos) << out;
  const auto j = nlohmann::json::parse(out.substr(out.rfind('{')));
  EXPECT_DOUBLE_EQ(j["temperature"].get<double>(), 0.7);
  EXPECT_DOUBLE_EQ(j["top_p"].get<double>(), 0.9);
  EXPECT_EQ(j["top_k"].get<int>(), 7);
  EXPECT_EQ(j["decode_steps"].get<int>(), 4);  // the prefill draws the first of the 5 tokens
  EXPECT_GT(j["tokens_per_s"].get<double>(), 0.0);
  // With the prompts' 3 x 4 tokens: 15 new tokens and 12 prompt tokens in the same seconds.
  const double seconds = j["seconds"].get<double>();
  EXPECT_NEAR(j["total_tokens_per_s"].get<double>(), (15.0 + 12.0) / seconds, 1e-9 * (27.0 / seconds));
  EXPECT_NEAR(j["tokens_per_s"].get<double>(), 15.0 / seconds, 1e-9 * (15.0 / seconds));

  // The defaults: plain sampling, no sampling line.
  ASSERT_EQ(RunCapture(RunBenchCommand, Gen({}), &out, &err), 0) << err;
  EXPECT_EQ(out.find("sampling:"), std::string::npos) << out;
  const auto d = nlohmann::json::parse(out.substr(out.rfind('{')));
  EXPECT_DOUBLE_EQ(d["temperature"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(d["top_p"].get<double>(), 1.0);
  EXPECT_EQ(d["top_k"].get<int>(), 0);
}

// The digest covers every drawn token and log-prob: equal for the same seed (and across a run's
// repeats, whose draws are the same), different for another seed's prompts and draws.
TEST_F(BenchGen, TokensDigestFollowsTheDraws) {
  auto digest = [&](std::vector<std::string> extra) {
    std::string out, err;
    EXPECT_EQ(RunCapture(RunBenchCommand, Gen(extra), &out, &err), 0) << err;
    const auto j = nlohmann::json::parse(out.substr(out.rfind('{')));
    const std::string d = j["tokens_digest"].get<std::string>();
    EXPECT_NE(out.find("tokens digest " + d), std::string::npos) << out;
    return d;
  };
  const std::string a = digest({"--seed", "3"});
  EXPECT_EQ(a.size(), 16u);
  EXPECT_EQ(digest({"--seed", "3", "--repeats", "2"}), a);
  EXPECT_NE(digest({"--seed", "4"}), a);
  EXPECT_NE(digest({"--seed", "3", "--temperature", "0.5"}), a);
}

// The KV pool's block size moves where keys live, not what the attention computes: the same draws
// bit for bit at any size, power of two or not; the report and the JSON name the size.
TEST_F(BenchGen, BlockSizeMovesTheKeysNotTheDraws) {
  auto run = [&](const std::string& bs) {
    std::string out, err;
    EXPECT_EQ(RunCapture(RunBenchCommand, Gen({"--seed", "5", "--block-size", bs}), &out, &err), 0) << err;
    const auto j = nlohmann::json::parse(out.substr(out.rfind('{')));
    EXPECT_EQ(j["block_size"].get<int>(), std::stoi(bs));
    EXPECT_NE(out.find("blocks of " + bs + " ("), std::string::npos) << out;
    return j["tokens_digest"].get<std::string>();
  };
  const std::string d16 = run("16");
  EXPECT_EQ(run("5"), d16);
  EXPECT_EQ(run("64"), d16);
  for (const std::string bad : {"0", "-3", "5000"}) {
    std::string out, err;
    EXPECT_EQ(RunCapture(RunBenchCommand, Gen({"--block-size", bad}), &out, &err), 2) << bad;
    EXPECT_NE(err.find("--block-size"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
}

TEST_F(BenchGen, BadSamplingValuesExitTwoWithOneLine) {
  for (const auto& bad : std::vector<std::vector<std::string>>{
           {"--top-p", "0"}, {"--top-p", "1.5"}, {"--top-k", "-1"}, {"--temperature", "-0.5"}}) {
    std::string out, err;
    EXPECT_EQ(RunCapture(RunBenchCommand, Gen(bad), &out, &err), 2) << bad[0] << " " << bad[1];
    EXPECT_NE(err.find("--top-p"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
}

// `aha bench train`: --group-size sets the groups (so a long-sequence step can be one group of 2), the
// report and the JSON name it and the prompt length, and a bad size or a batch that is not whole groups
// exits 2 with one line.
TEST_F(BenchGen, TrainGroupSizeSetsTheGroups) {
  auto train = [&](std::vector<std::string> extra, std::string* out, std::string* err) {
    std::vector<std::string> a = {"aha bench", "train", "--model", dir_.string(), "--devices", "cpu",
                                  "--seq-len",  "12",    "--prompt-len", "4",    "--steps",   "1"};
    a.insert(a.end(), extra.begin(), extra.end());
    return RunCapture(RunBenchCommand, a, out, err);
  };
  std::string out, err;
  ASSERT_EQ(train({"--sequences", "2", "--group-size", "2"}, &out, &err), 0) << err;
  const auto j = nlohmann::json::parse(out.substr(out.rfind('{')));
  EXPECT_EQ(j["sequences"].get<int>(), 2);
  EXPECT_EQ(j["group_size"].get<int>(), 2);
  EXPECT_EQ(j["prompt_len"].get<int>(), 4);
  EXPECT_TRUE(j["device_memory_gib"].is_null()) << out;  // the CPU backend does not report it
  EXPECT_GT(j["tokens_per_s"].get<double>(), 0.0);
  EXPECT_NE(out.find("2 x 12 tokens (prompts of 4, groups of 2)"), std::string::npos) << out;
  EXPECT_EQ(out.find("device memory"), std::string::npos) << out;
  for (const auto& bad : std::vector<std::vector<std::string>>{{"--sequences", "2"},  // default groups of 4
                                                               {"--sequences", "6", "--group-size", "4"},
                                                               {"--sequences", "4", "--group-size", "1"},
                                                               {"--sequences", "0", "--group-size", "2"}}) {
    EXPECT_EQ(train(bad, &out, &err), 2) << bad[1];
    EXPECT_NE(err.find("--group-size"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
}

}  // namespace
}  // namespace aha
