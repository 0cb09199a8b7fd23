// Job config: one test per class of error, overrides, and the printed config loading back.
#include "common/config.h"

#include <gtest/gtest.h>

#include <filesystem>

namespace aha {
namespace {

const char* kGood = R"(name: t
model:
  init: {arch: qwen2, preset: tiny}
data:
  train: train.jsonl
stages: [grpo]
grpo:
  steps: 10
  group_size: 4
  clip_high: 0.28
rewards:
  - name: accuracy
    weight: 1.0
  - name: format
    weight: 0.2
    params: {strict: "true"}
topology:
  actors: [{device: cpu}, {device: "cuda:1", max_batch: 512}]
)";

std::string Err(const std::string& yaml, std::vector<std::string> sets = {}) {
  auto r = ParseJobConfig(yaml, "job.yaml", sets);
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(IsInvalidArgument(r.status()));
  return r.status().message();
}

TEST(JobConfig, LoadsTypedValuesAndDefaults) {
  auto r = ParseJobConfig(kGood, "job.yaml");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->grpo.steps, 10);
  EXPECT_EQ(r->grpo.group_size, 4);
  EXPECT_DOUBLE_EQ(r->grpo.clip_high, 0.28);
  EXPECT_DOUBLE_EQ(r->grpo.clip_low, 0.2);  // default
  ASSERT_EQ(r->rewards.size(), 2u);
  EXPECT_EQ(r->rewards[1].params.at("strict"), "true");
  ASSERT_EQ(r->topology.actors.size(), 2u);
  EXPECT_EQ(r->topology.actors[1].device, "cuda:1");
  EXPECT_EQ(r->topology.actors[0].max_batch, 0);  // default: the actor picks by device
  EXPECT_EQ(r->topology.actors[1].max_batch, 512);
  EXPECT_EQ(r->model.init.arch, "qwen2");
}

TEST(JobConfig, UnknownKeyNamesLineAndPath) {
  std::string y = std::string(kGood) + "extra: 1\n";
  EXPECT_EQ(Err(y).substr(0, 31), "job.yaml:19:1: extra: unknown k");
  std::string nested = kGood;
  nested.replace(nested.find("  steps: 10"), 11, "  stepz: 10");
  std::string e = Err(nested);
  EXPECT_NE(e.find("job.yaml:8:3: grpo.stepz: unknown key (known: steps, group_size"), std::string::npos) << e;
}

TEST(JobConfig, WrongTypeNamesLineAndPath) {
  std::string y = kGood;
  y.replace(y.find("group_size: 4"), 13, "group_size: four");
  EXPECT_EQ(Err(y), "job.yaml:9:15: grpo.group_size: expected an integer, got 'four'");
  y = kGood;
  y.replace(y.find("clip_high: 0.28"), 15, "clip_high: [1]");
  EXPECT_EQ(Err(y), "job.yaml:10:14: grpo.clip_high: expected a number, got a list");
}

TEST(JobConfig, OutOfRangeNamesTheBound) {
  std::string y = kGood;
  y.replace(y.find("group_size: 4"), 13, "group_size: 1");
  EXPECT_EQ(Err(y), "job.yaml:9:15: grpo.group_size: 1 is out of range [2, 4096]");
  y = kGood;
  y.replace(y.find("max_batch: 512"), 14, "max_batch: -1");
  EXPECT_NE(Err(y).find("topology.actors[1].max_batch: -1 is out of range [0, 65536]"), std::string::npos) << Err(y);
}

TEST(JobConfig, LearnerDevicesAreAllCpuOrDistinctGpus) {
  const std::string base = std::string(kGood) + "  learner_devices: ";
  EXPECT_NE(Err(base + "[\"cuda:0\", \"cuda:0\"]\n").find("topology.learner_devices: cuda:0 is listed twice"),
            std::string::npos);
  EXPECT_NE(Err(base + "[cpu, \"cuda:1\"]\n").find("topology.learner_devices: mixes cpu and cuda"), std::string::npos);
  auto ok = ParseJobConfig(base + "[\"cuda:0\", \"cuda:1\"]\n", "job.yaml");
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
  auto cpus = ParseJobConfig(base + "[cpu, cpu]\n", "job.yaml");  // the tests' data-parallel replicas
  EXPECT_TRUE(cpus.ok()) << cpus.status().ToString();
}

TEST(JobConfig, BadChoiceListsTheChoices) {
  std::string y = std::string(kGood) + "replay: {durability: maybe}\n";
  EXPECT_NE(Err(y).find("replay.durability: 'maybe' is not one of sync|buffered"), std::string::npos);
}

TEST(JobConfig, WeightSyncIsAutoNcclOrZmq) {
  auto r = ParseJobConfig(kGood, "job.yaml");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->grpo.weight_sync, "auto");
  auto nccl = ParseJobConfig(kGood, "job.yaml", {"grpo.weight_sync=nccl"});
  ASSERT_TRUE(nccl.ok()) << nccl.status().ToString();
  EXPECT_EQ(nccl->grpo.weight_sync, "nccl");
  EXPECT_EQ(Err(kGood, {"grpo.weight_sync=mpi"}),
            "--set grpo.weight_sync=mpi: grpo.weight_sync: 'mpi' is not one of auto|nccl|zmq");
}

TEST(JobConfig, MissingRequiredKeys) {
  EXPECT_EQ(Err("model: {path: m}\n"), "job.yaml: stages: required key is missing");
  EXPECT_EQ(Err("model: {path: m}\nstages: [grpo]\nrewards: [{name: accuracy}]\n"),
            "job.yaml: data.train: required key is missing (the grpo and sample stages read it)");
  EXPECT_EQ(Err("model: {path: m}\nstages: [sft]\n"), "job.yaml: sft.data: required key is missing (the sft stage reads it)");
  EXPECT_EQ(Err("model: {path: m}\nstages: [sft]\nsft: {data: d}\nrewards: [{weight: 1}]\n"),
            "job.yaml: rewards[0].name: required key is missing");
}

TEST(JobConfig, CrossFieldRules) {
  EXPECT_EQ(Err("stages: [sft]\nsft: {data: d}\n"), "job.yaml: model: set exactly one of model.path or model.init.arch");
  std::string y = kGood;
  y.replace(y.find("\"cuda:1\""), 8, "gpu1");
  EXPECT_EQ(Err(y), "job.yaml: topology.actors[1].device: 'gpu1' is not cpu or cuda:N");
}

TEST(JobConfig, SyntaxErrorNamesLine) {
  std::string e = Err("stages: [grpo\nmodel: x\n");
  EXPECT_EQ(e.rfind("job.yaml:", 0), 0u);
}

TEST(JobConfig, OverridesApplyAndAreCheckedLikeTheFile) {
  auto r = ParseJobConfig(kGood, "job.yaml", {"grpo.steps=3", "grpo.beta=0.04", "replay.durability=buffered"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->grpo.steps, 3);
  EXPECT_DOUBLE_EQ(r->grpo.beta, 0.04);
  EXPECT_EQ(r->replay.durability, "buffered");
  EXPECT_EQ(Err(kGood, {"grpo.steps=x"}), "--set grpo.steps=x: grpo.steps: expected an integer, got 'x'");
  EXPECT_EQ(Err(kGood, {"grpo.nope=1"}).substr(0, 37), "--set grpo.nope=1: grpo.nope: unknown");
  EXPECT_EQ(Err(kGood, {"novalue"}), "--set novalue: expected key.path=value");
}

TEST(JobConfig, PrintedConfigLoadsBackIdentically) {
  auto r = ParseJobConfig(kGood, "job.yaml", {"grpo.lr=3e-6"});
  ASSERT_TRUE(r.ok());
  std::string printed = ToYaml(*r);
  auto again = ParseJobConfig(printed, "resolved.yaml");
  ASSERT_TRUE(again.ok()) << again.status().ToString() << "\n" << printed;
  EXPECT_EQ(ToYaml(*again), printed);
  EXPECT_DOUBLE_EQ(again->grpo.lr, 3e-6);
  EXPECT_NE(printed.find("loss_aggregation: token-mean"), std::string::npos);
  // A job that starts from a model directory (no model.init.arch) prints and loads back too.
  auto from_path = ParseJobConfig(kGood, "job.yaml", {"model.init.arch=", "model.path=/models/m"});
  ASSERT_TRUE(from_path.ok()) << from_path.status().ToString();
  auto reloaded = ParseJobConfig(ToYaml(*from_path), "resolved.yaml");
  ASSERT_TRUE(reloaded.ok()) << reloaded.status().ToString() << "\n" << ToYaml(*from_path);
  EXPECT_EQ(reloaded->model.path, "/models/m");
}

TEST(JobConfig, EveryShippedConfigLoads) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(std::string(AHA_SOURCE_DIR) + "/configs")) {
    if (e.path().extension() != ".yaml") continue;
    auto r = LoadJobConfig(e.path().string());
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    ++n;
  }
  EXPECT_GE(n, 2);
}

TEST(JobConfig, MissingFileIsNotFound) {
  auto r = LoadJobConfig("/nonexistent/job.yaml");
  EXPECT_TRUE(IsNotFound(r.status()));
  EXPECT_EQ(r.status().message(), "/nonexistent/job.yaml: cannot open job file");
}

}  // namespace
}  // namespace aha
