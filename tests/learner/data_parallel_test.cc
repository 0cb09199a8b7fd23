// Data-parallel GRPO on CPU replicas (learner/data_parallel.h, learner/grad_reducer.h): a step on R
// replicas equals a step on one over the same global batch, for the aggregation modes whose
// normalisers depend on global counts, with and without the reference model, for splits that are
// uneven or leave a replica idle; replicas stay bit-identical and resume exactly; the host reducer
// sums every bucket; the device list is checked.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <thread>

#include "common/config.h"
#include "learner/data_parallel.h"
#include "learner/grad_reducer.h"
#include "tests/learner/trainer_fixtures.h"

namespace aha {
namespace {

using namespace trainer_test;

// Several CPU "devices" (each its own backend) for the replicas.
struct CpuDevices {
  std::vector<std::unique_ptr<engine::CpuBackend>> owned;
  explicit CpuDevices(int n) {
    for (int i = 0; i < n; ++i) owned.push_back(std::make_unique<engine::CpuBackend>());
  }
  std::vector<engine::Backend*> get() const {
    std::vector<engine::Backend*> out;
    for (const auto& b : owned) out.push_back(b.get());
    return out;
  }
};

std::unique_ptr<GrpoTrainer> NewTrainerOn(const GrpoConfig& g, const std::vector<engine::Backend*>& backends,
                                          size_t bucket_bytes = size_t{64} << 10, const TinyModel& model = Model()) {
  TrainerOptions o;
  o.grpo = g;
  o.model_dir = model.dir.string();
  o.reduce_bucket_bytes = bucket_bytes;  // the tiny model is 3 MiB: many buckets, most mid-backward
  auto t = GrpoTrainer::Create(o, backends);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return std::move(t).value();
}

// Sums in another order (and OpenBLAS may block a product of another height differently) move the
// losses and gradients by ~1e-7 relative; the bounds leave a factor of ten.
constexpr double kStatTolerance = 1e-6, kNormTolerance = 1e-5;

// With its default eps, Adam divides a near-zero gradient by its own size: a last-bit difference
// becomes a change of sign, and the weights differ by up to 2 lr where the gradients barely differ.
// The comparisons therefore run Adam with eps = 1, where the update is about lr * g / (|g| + 1) with
// |g| << 1 (clipped to norm 1): smooth in g, so weight differences show gradient differences as
// they are. Observed max |difference| / max |update|: ~1e-6; bound 1e-5.
constexpr double kWeightTolerance = 1e-5;

// Runs `steps` steps of the same batches on one replica and on `replicas`, comparing each step's
// statistics, then the weights; the replicas must hold identical bits.
void ExpectDataParallelMatchesOne(const GrpoConfig& g, int replicas, const std::vector<std::vector<TrainGroup>>& batches,
                                  size_t bucket_bytes = size_t{64} << 10, const TinyModel& model = Model()) {
  GrpoConfig linear = g;
  linear.adam_eps = 1.0;
  linear.lr = 0.1;
  CpuDevices one_dev(1), dp_dev(replicas);
  auto one = NewTrainerOn(linear, one_dev.get(), bucket_bytes, model);
  auto dp = NewTrainerOn(linear, dp_dev.get(), bucket_bytes, model);
  const std::vector<float> start(one->model().params(), one->model().params() + one->model().num_params());
  ASSERT_EQ(dp->replicas(), replicas);
  bool clipped = false;
  for (size_t i = 0; i < batches.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i + 1));
    auto a = one->Step(batches[i], i);
    auto b = dp->Step(batches[i], i);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    ExpectSameStats(*a, *b, kStatTolerance, kNormTolerance);
    clipped = clipped || a->clip_low + a->clip_high > 0;
    if (g.beta > 0 && i > 0) {
      EXPECT_GT(a->kl, 0) << "the reference must have drifted from the policy";
    }
  }
  const size_t n = one->model().num_params();
  const double weight_diff = RelativeWeightDiff({one->model().params(), one->model().params() + n},
                                                {dp->model().params(), dp->model().params() + n}, start);
  EXPECT_LT(weight_diff, kWeightTolerance);
  std::printf("max |weight difference| / max |update|: %.3g\n", weight_diff);
  for (int r = 1; r < replicas; ++r)
    EXPECT_EQ(std::memcmp(dp->model(0).params(), dp->model(r).params(), dp->model().num_params() * sizeof(float)), 0)
        << "replica " << r << " drifted from replica 0";
  if (batches.size() > 2) {
    EXPECT_TRUE(clipped) << "later steps should exercise the clipped branch";
  }
}

struct Mode {
  const char* aggregation;
  double beta;
  int64_t micro_batch_tokens;
};

class DataParallelStep : public ::testing::TestWithParam<Mode> {};

TEST_P(DataParallelStep, TwoCpuReplicasEqualOneOnTheSameGlobalBatch) {
  GrpoConfig g = Config();
  g.loss_aggregation = GetParam().aggregation;
  g.beta = GetParam().beta;
  g.micro_batch_tokens = GetParam().micro_batch_tokens;
  std::vector<std::vector<TrainGroup>> batches;
  {
    CpuDevices dev(1);
    auto source = NewTrainerOn(g, dev.get());
    // The same batch three times: the policy moves away from the behaviour log-probs, so later
    // steps clip and (beta > 0) see a KL.
    auto batch = Ragged(MakeBatch(source->model(), 11, 4, 4, RewardEvenTokens));
    batches = {batch, batch, batch};
  }
  ExpectDataParallelMatchesOne(g, 2, batches);
}

INSTANTIATE_TEST_SUITE_P(
    Aggregations, DataParallelStep,
    ::testing::Values(Mode{"token-mean", 0.0, 1 << 20}, Mode{"token-mean", 0.04, 1 << 20},
                      Mode{"seq-mean-token-mean", 0.0, 1 << 20}, Mode{"seq-mean-token-mean", 0.04, 1 << 20},
                      Mode{"token-mean", 0.04, 24}, Mode{"seq-mean-token-mean", 0.0, 24}),
    [](const ::testing::TestParamInfo<Mode>& info) {
      std::string name = info.param.aggregation;
      for (char& c : name)
        if (c == '-') c = '_';
      name += info.param.beta > 0 ? "_beta" : "_no_beta";
      if (info.param.micro_batch_tokens < 1000) name += "_micro_batches";
      return name;
    });

TEST(DataParallel, UnevenAndIdleSplitsEqualOneReplica) {
  GrpoConfig g = Config();
  g.beta = 0.04;
  CpuDevices dev(1);
  auto source = NewTrainerOn(g, dev.get());
  {
    SCOPED_TRACE("3 groups of unequal size on 2 replicas");
    ExpectDataParallelMatchesOne(g, 2, {Ragged(MakeBatch(source->model(), 21, 3, 4, RewardEvenTokens))});
  }
  {
    SCOPED_TRACE("1 group on 2 replicas: replica 1 has nothing to do but still reduces");
    ExpectDataParallelMatchesOne(g, 2, {Ragged(MakeBatch(source->model(), 22, 1, 4, RewardEvenTokens))});
  }
  {
    SCOPED_TRACE("5 groups on 3 replicas, several micro-batches each, 4 KiB buckets");
    g.micro_batch_tokens = 20;
    ExpectDataParallelMatchesOne(g, 3, {Ragged(MakeBatch(source->model(), 23, 5, 4, RewardEvenTokens))}, 4 << 10);
  }
}

TEST(DataParallel, UntiedLmHeadAtTheEndOfTheBufferEqualsOneReplica) {
  // The lm-head's gradient is final before any layer's: the first buckets hold it.
  GrpoConfig g = Config();
  g.micro_batch_tokens = 30;
  CpuDevices dev(1);
  auto source = NewTrainerOn(g, dev.get(), size_t{64} << 10, UntiedModel());
  auto batch = Ragged(MakeBatch(source->model(), 31, 4, 4, RewardEvenTokens));
  ExpectDataParallelMatchesOne(g, 2, {batch, batch}, 4 << 10, UntiedModel());
}

TEST(DataParallel, ResumeOnTwoReplicasIsBitExact) {
  GrpoConfig g = Config();
  g.beta = 0.01;
  std::vector<std::vector<TrainGroup>> batches;
  {
    CpuDevices dev(1);
    auto source = NewTrainerOn(g, dev.get());
    for (int i = 0; i < 4; ++i) batches.push_back(Ragged(MakeBatch(source->model(), 300 + i, 3, 4, RewardEvenTokens)));
  }
  CpuDevices d1(2), d2(2), d3(2);
  auto straight = NewTrainerOn(g, d1.get());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(straight->Step(batches[i], i).ok());
  fs::path ckpt = fs::temp_directory_path() / ("aha_dp_ckpt_" + std::to_string(::getpid()));
  {
    auto first = NewTrainerOn(g, d2.get());
    for (int i = 0; i < 2; ++i) ASSERT_TRUE(first->Step(batches[i], i).ok());
    ASSERT_TRUE(first->Checkpoint(ckpt.string(), 2).ok());
  }
  auto resumed = NewTrainerOn(g, d3.get());
  auto version = resumed->Restore(ckpt.string());
  ASSERT_TRUE(version.ok()) << version.status().ToString();
  EXPECT_EQ(*version, 2u);
  EXPECT_EQ(resumed->step(), 2);
  const size_t bytes = resumed->model().num_params() * sizeof(float);
  EXPECT_EQ(std::memcmp(resumed->model(0).params(), resumed->model(1).params(), bytes), 0)
      << "Restore must load every replica";
  for (int i = 2; i < 4; ++i) ASSERT_TRUE(resumed->Step(batches[i], i).ok());
  for (int r = 0; r < 2; ++r)
    EXPECT_EQ(std::memcmp(straight->model(r).params(), resumed->model(r).params(), bytes), 0)
        << "replica " << r << ": steps 3-4 after a resume must equal an uninterrupted run bit for bit";
  fs::remove_all(ckpt);
}

TEST(DataParallel, RefusesTwoReplicasOnOneBackend) {
  CpuDevices dev(1);
  TrainerOptions o;
  o.grpo = Config();
  o.model_dir = Model().dir.string();
  auto t = GrpoTrainer::Create(o, {dev.get()[0], dev.get()[0]});
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(IsInvalidArgument(t.status())) << t.status().ToString();
}

TEST(GradReducer, HostSumsEveryBucketAcrossRanksWhateverTheyReportWhen) {
  constexpr int kRanks = 3;
  constexpr size_t kN = 10;
  CpuDevices dev(kRanks);
  auto reducer = GradReducer::Create(dev.get(), kN, 3 * sizeof(float));
  ASSERT_TRUE(reducer.ok()) << reducer.status().ToString();
  EXPECT_EQ((*reducer)->buckets(), 4u);  // [7, 10), [4, 7), [1, 4), [0, 1)
  std::vector<std::vector<float>> grads(kRanks, std::vector<float>(kN));
  for (int r = 0; r < kRanks; ++r) {
    for (size_t i = 0; i < kN; ++i) grads[r][i] = static_cast<float>((r + 1) * 100 + i);
    ASSERT_TRUE((*reducer)->Attach(r, grads[r].data()).ok());
  }
  // Two steps: the bucket cursor must start over. Rank 0 reports its backward layer by layer, rank
  // 1 in one late call, rank 2 (an idle replica) only finishes.
  for (int step = 0; step < 2; ++step) {
    std::vector<std::thread> threads;
    std::vector<Status> status(kRanks);
    threads.emplace_back([&] {
      for (size_t begin : {9u, 6u, 3u, 0u})
        if (Status s = (*reducer)->GradsReady(0, begin); !s.ok()) status[0] = s;
      if (Status s = (*reducer)->Finish(0); !s.ok()) status[0] = s;
    });
    threads.emplace_back([&] {
      if (Status s = (*reducer)->GradsReady(1, 5); !s.ok()) status[1] = s;
      status[1] = (*reducer)->Finish(1);
    });
    threads.emplace_back([&] { status[2] = (*reducer)->Finish(2); });
    for (auto& t : threads) t.join();
    for (int r = 0; r < kRanks; ++r) ASSERT_TRUE(status[r].ok()) << status[r].ToString();
    for (size_t i = 0; i < kN; ++i) {
      const float want = step == 0 ? static_cast<float>(600 + 3 * i) : static_cast<float>(3 * (600 + 3 * i));
      for (int r = 0; r < kRanks; ++r) EXPECT_EQ(grads[r][i], want) << "step " << step << " rank " << r << " [" << i << "]";
    }
  }
}

TEST(LearnerDevices, RejectsMixedAndDuplicateDevicesNamingTheKey) {
  // The job file refuses these when it is loaded (config_test); the learner checks again for its
  // --device flag, which does not go through the job file.
  const char* job = R"(name: t
model: {init: {arch: qwen2, preset: tiny}}
data: {train: train.jsonl}
stages: [grpo]
rewards: [{name: accuracy}]
topology: {learner_devices: [cpu, "cuda:0"]}
)";
  auto parsed = ParseJobConfig(job, "job.yaml");
  ASSERT_FALSE(parsed.ok());
  EXPECT_NE(parsed.status().message().find("topology.learner_devices: mixes cpu and cuda"), std::string::npos)
      << parsed.status().message();
  auto expect_error = [](const std::vector<std::string>& devices, const std::string& what) {
    Status s = CheckLearnerDevices(devices, "topology.learner_devices");
    EXPECT_TRUE(IsInvalidArgument(s)) << s.ToString();
    EXPECT_EQ(s.message().rfind("topology.learner_devices: ", 0), 0u) << s.message();
    EXPECT_NE(s.message().find(what), std::string::npos) << s.message();
    EXPECT_EQ(s.message().find('\n'), std::string::npos) << "one line: " << s.message();
  };
  expect_error({"cpu", "cuda:0"}, "mixes cpu and cuda");
  expect_error({"cuda:0", "cuda:1", "cuda:0"}, "cuda:0 is listed twice");
  expect_error({"cuda", "cuda:0"}, "cuda:0 is listed twice");
  expect_error({"cuda:1", "gpu"}, "'gpu' is not cpu, cuda or cuda:N");
  expect_error({}, "at least one device");
  EXPECT_TRUE(CheckLearnerDevices({"cpu"}, "x").ok());
  EXPECT_TRUE(CheckLearnerDevices({"cpu", "cpu", "cpu"}, "x").ok()) << "several CPU replicas are allowed";
  EXPECT_TRUE(CheckLearnerDevices({"cuda:0", "cuda:1"}, "x").ok());
  // Refused before any backend is made: this runs on machines without a GPU.
  auto backends = MakeLearnerBackends(SplitDeviceList("cuda:0, cpu"), "--device");
  ASSERT_FALSE(backends.ok());
  EXPECT_EQ(backends.status().message(), "--device: mixes cpu and cuda devices (replicas must be all cpu or all cuda)");
  EXPECT_EQ(SplitDeviceList("cuda:0, cuda:1"), (std::vector<std::string>{"cuda:0", "cuda:1"}));
  EXPECT_EQ(SplitDeviceList("cpu,"), (std::vector<std::string>{"cpu", ""}));
}

TEST(BalanceByTokens, AssignsEveryGroupOnceAndBoundsTheImbalanceByTheLargest) {
  const std::vector<int64_t> tokens = {50, 10, 70, 30, 30, 90, 5, 60, 20};
  for (int parts : {1, 2, 3, 4, 12}) {
    SCOPED_TRACE("parts " + std::to_string(parts));
    auto split = BalanceByTokens(tokens, parts);
    ASSERT_EQ(split.size(), static_cast<size_t>(parts));
    std::vector<int> seen(tokens.size(), 0);
    int64_t lo = INT64_MAX, hi = 0;
    for (const auto& part : split) {
      EXPECT_TRUE(std::is_sorted(part.begin(), part.end())) << "batch order within a part";
      int64_t sum = 0;
      for (size_t i : part) ++seen[i], sum += tokens[i];
      lo = std::min(lo, sum);
      hi = std::max(hi, sum);
    }
    for (int s : seen) EXPECT_EQ(s, 1);
    EXPECT_LE(hi - lo, 90);
    EXPECT_EQ(split, BalanceByTokens(tokens, parts)) << "deterministic";
  }
  // Largest first, each to the lighter part: {90, 50, 30, 10, 5} = 185 and {70, 60, 30, 20} = 180.
  auto two = BalanceByTokens(tokens, 2);
  EXPECT_EQ(two[0], (std::vector<size_t>{0, 1, 4, 5, 6}));
  EXPECT_EQ(two[1], (std::vector<size_t>{2, 3, 7, 8}));
}

}  // namespace
}  // namespace aha
