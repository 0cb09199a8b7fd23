// `aha render k8s` output against the Kubernetes API schemas, without a cluster: every rendered
// object goes through tests/deploy/validate_k8s.cjs (kubernetes-models' validators generated from
// the OpenAPI spec, a strict unknown-field check compiled by tsc, and the cross-object rules of
// the API server and controllers). The npm packages come from the fixture deploy_npm_setup.
// The same validator must reject deliberately broken copies of the rendered files, one fault each.
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>

#include "tests/shell.h"

#ifndef AHA_BIN_DIR
#error "AHA_BIN_DIR must name build/bin"
#endif

namespace {

namespace fs = std::filesystem;

using aha::test::Output;
// Runs `cmd` with stderr folded into the output.
Output Sh(const std::string& cmd) { return aha::test::Sh(cmd + " 2>&1"); }

std::string Source(const std::string& rel) { return (fs::path(AHA_SOURCE_DIR) / rel).string(); }

class K8sSchema : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("aha_k8s_schema_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Renders `job` with `flags` into dir_/name; returns that folder.
  fs::path Render(const std::string& name, const std::string& job, const std::string& flags = "") {
    fs::path out = dir_ / name;
    Output o = Sh(std::string(AHA_BIN_DIR) + "/aha render k8s " + Source(job) + " --out " + out.string() + " " + flags);
    EXPECT_EQ(o.code, 0) << o.out;
    return out;
  }
  // Validates each of the space-separated folders `sets` on its own (one node process).
  Output Validate(const std::string& sets, const std::string& extra = "") {
    return Sh("node " + Source("tests/deploy/validate_k8s.cjs") + " " + AHA_NPM_DIR + " " + extra + " " + sets);
  }
  // A copy of `from` with `before` replaced by `after` in `file` (which must contain it).
  fs::path Broken(const fs::path& from, const std::string& file, const std::string& before, const std::string& after) {
    fs::path to = dir_ / ("broken-" + std::to_string(++broken_));
    fs::copy(from, to);
    std::ifstream in(to / file);
    std::string text((std::istreambuf_iterator<char>(in)), {});
    size_t at = text.find(before);
    EXPECT_NE(at, std::string::npos) << file << " has no '" << before << "' any more: update this test";
    if (at != std::string::npos) text.replace(at, before.size(), after);
    std::ofstream(to / file) << text;
    return to;
  }

  fs::path dir_;
  int broken_ = 0;
};

TEST_F(K8sSchema, EveryRenderedObjectIsValid) {
  fs::path tiny = Render("tiny", "configs/tiny-cpu.yaml", "--service-monitor --storage-class fast");
  fs::path many = Render("many", "configs/tiny-cpu.yaml", "--set 'topology.actors=[{device: cpu}, {device: cpu}, {device: cpu}]'");
  fs::path gpu = Render("gpu", "configs/qwen2.5-0.5b-gpu.yaml", "--service-monitor --models-claim models");
  Output v = Validate(tiny.string() + " " + many.string() + " " + gpu.string(), "--external-claim models");
  EXPECT_EQ(v.code, 0) << v.out;
  EXPECT_NE(v.out.find("valid " + tiny.string() + ": 12 objects"), std::string::npos) << v.out;
  EXPECT_NE(v.out.find("valid " + many.string() + ": 15 objects"), std::string::npos)
      << "an actor is a Deployment and a Service\n" << v.out;
  EXPECT_NE(v.out.find("valid " + gpu.string() + ": 12 objects"), std::string::npos) << v.out;
}

TEST_F(K8sSchema, TheValidatorRejectsBrokenManifests) {
  fs::path good = Render("good", "configs/tiny-cpu.yaml", "--service-monitor");
  struct Fault {
    std::string file, before, after, expect;
  };
  const std::vector<Fault> faults = {
      // A type error (schema).
      {"10-replay.yaml", "containerPort: 7100", "containerPort: seventy", "containerPort must be integer"},
      // A missing required field (schema).
      {"20-rewardd.yaml", "  selector:\n    matchLabels:", "  selectr:\n    matchLabels:", "must have required property selector"},
      // A misspelt field, which the OpenAPI schema alone lets through (strict field check).
      {"10-replay.yaml", "volumeClaimTemplates:", "volumeClaimTemplate:", "'\"volumeClaimTemplate\"' does not exist"},
      {"40-actor-0.yaml", "imagePullPolicy:", "imagePullPolcy:", "'\"imagePullPolcy\"' does not exist"},
      // Cross-object rules.
      {"30-learner.yaml", "restartPolicy: OnFailure", "restartPolicy: Always", "restartPolicy 'Always' is not allowed for a Job"},
      {"20-rewardd.yaml", "targetPort: 7102", "targetPort: 7999", "targetPort 7999 is not a port"},
      {"30-learner.yaml", "targetPort: 7103", "targetPort: weights", "targetPort weights is not a port"},
      {"01-job-configmap.yaml", "name: aha-job", "name: aha-jobs", "names ConfigMap 'aha-job', which is not rendered"},
      {"90-service-monitor.yaml", "port: metrics", "port: metric", "endpoint port 'metric' is not a port"},
      // Not YAML at all.
      {"00-namespace.yaml", "metadata:", "metadata: [", "YAML"},
  };
  std::vector<fs::path> sets;
  std::string all;
  for (const auto& f : faults) {
    sets.push_back(Broken(good, f.file, f.before, f.after));
    all += sets.back().string() + " ";
  }
  // And a volume claim that nothing renders (and that is not declared external).
  fs::path claim = Render("claim", "configs/tiny-cpu.yaml", "--models-claim models");
  Output v = Validate(all + claim.string());
  EXPECT_EQ(v.code, 1) << v.out;
  for (size_t i = 0; i < faults.size(); ++i) {
    std::string want = "INVALID " + sets[i].string() + ": ";
    size_t at = v.out.find(want);
    EXPECT_NE(at, std::string::npos) << faults[i].after << ": no problem reported (" << faults[i].file << ")\n" << v.out;
    bool found = false;
    for (size_t p = at; p != std::string::npos; p = v.out.find(want, p + 1)) {
      size_t eol = v.out.find('\n', p);
      found |= v.out.substr(p, eol - p).find(faults[i].expect) != std::string::npos;
    }
    EXPECT_TRUE(found) << faults[i].file << ": want '" << faults[i].expect << "' in:\n" << v.out;
  }
  EXPECT_NE(v.out.find("INVALID " + claim.string() +
                       ": 30-learner.yaml: Job/aha-learner: volume 'models' names claim 'models', which is not rendered"),
            std::string::npos) << v.out;
  EXPECT_EQ(v.out.find("valid "), std::string::npos) << "every broken set is rejected\n" << v.out;
}

}  // namespace
