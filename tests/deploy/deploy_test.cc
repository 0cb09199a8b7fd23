// deploy/ and `aha render` without a cluster (default run):
//   - the Dockerfiles name exactly the binaries build/bin has, their runtime stage installs the
//     package of every shared library those binaries load (ldd + dpkg), and their build stage
//     installs only packages scripts/setup.sh installs (so a rename anywhere breaks this test);
//   - `aha render k8s` writes every object with the job's ports, image, GPU requests and the
//     command lines of `aha run`, and every flag it passes exists in the daemon's --help;
//   - `aha render slurm` writes a single allocation for a CPU job and a heterogeneous job for a
//     GPU job, both valid bash (bash -n and shellcheck);
//   - bad input is one line and exit code 2.
// tests/deploy/k8s_schema_test.cc checks the manifests against the Kubernetes API schemas and
// tests/deploy/slurm_test.sh runs the batch script on a real (one-node) Slurm cluster.
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "tests/shell.h"
#include "common/config.h"

#ifndef AHA_BIN_DIR
#error "AHA_BIN_DIR must name build/bin"
#endif

namespace {

namespace fs = std::filesystem;

using aha::test::Output;
using aha::test::Sh;

std::string Read(const fs::path& p) {
  std::ifstream f(p);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::string Source(const std::string& rel) { return (fs::path(AHA_SOURCE_DIR) / rel).string(); }
std::string Aha() { return std::string(AHA_BIN_DIR) + "/aha"; }

struct TempDir {
  fs::path dir;
  explicit TempDir(const std::string& tag) {
    dir = fs::temp_directory_path() / ("aha_deploy_" + tag + "_" + std::to_string(getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~TempDir() { fs::remove_all(dir); }
};

// shellcheck on a script (scripts/setup.sh installs it): its findings, empty when clean.
std::string Shellcheck(const fs::path& script, const std::string& flags = "") {
  if (Sh("command -v shellcheck").code != 0) return "shellcheck is not installed (scripts/setup.sh installs it)";
  Output sc = Sh("shellcheck " + flags + " " + script.string());
  return sc.code == 0 ? "" : sc.out + sc.err;
}

// ---- Dockerfiles ----

// Binary names a Dockerfile builds (`--target ...`) and copies (`build/bin/NAME`).
std::set<std::string> DockerfileBinaries(const std::string& text) {
  std::set<std::string> names;
  std::smatch m;
  for (auto it = text.cbegin(); std::regex_search(it, text.cend(), m, std::regex(R"(build/bin/([A-Za-z0-9_.-]+))")); it = m.suffix().first)
    names.insert(m[1]);
  if (std::regex_search(text, m, std::regex(R"(--target((?: +[A-Za-z0-9_.-]+)+))"))) {
    std::istringstream words(m[1].str());
    for (std::string w; words >> w;) names.insert(w);
  }
  return names;
}

// The words of every `apt-get install` in `text`, flags left out.
std::set<std::string> AptPackages(const std::string& text) {
  std::set<std::string> out;
  std::string joined = std::regex_replace(text, std::regex(R"(\\\n)"), " ");
  std::smatch m;
  const std::regex install(R"(apt-get install ([^&\n]*))");
  for (auto it = joined.cbegin(); std::regex_search(it, joined.cend(), m, install); it = m.suffix().first) {
    std::istringstream words(m[1].str());
    for (std::string w; words >> w;)
      if (w[0] != '-') out.insert(w);
  }
  return out;
}

std::set<std::string> AhaBinaries() {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(AHA_BIN_DIR))
    if (e.path().filename().string().rfind("aha", 0) == 0) out.insert(e.path().filename().string());
  return out;
}

TEST(Dockerfile, NamesExactlyTheBinariesOfBuildBin) {
  for (const char* file : {"deploy/Dockerfile", "deploy/Dockerfile.cuda"}) {
    std::set<std::string> named = DockerfileBinaries(Read(Source(file)));
    ASSERT_FALSE(named.empty()) << file;
    for (const auto& n : named)
      EXPECT_TRUE(fs::exists(fs::path(AHA_BIN_DIR) / n)) << file << " names " << n << ", which build/bin lacks";
    for (const auto& b : AhaBinaries()) EXPECT_TRUE(named.count(b)) << file << " leaves out build/bin/" << b;
  }
}

TEST(Dockerfile, RuntimeStageInstallsThePackageOfEveryLibraryTheBinariesLoad) {
  if (Sh("command -v dpkg-query").code != 0) GTEST_SKIP() << "not a Debian host";
  std::string text = Read(Source("deploy/Dockerfile"));
  std::set<std::string> runtime = AptPackages(text.substr(text.rfind("\nFROM ")));
  // In every Debian image, slim included.
  for (const char* base : {"libc6", "libgcc-s1", "libstdc++6"}) runtime.insert(base);
  // Every library the binaries load (one ldd), then their packages (one dpkg -S; usrmerge: dpkg
  // may know a library under /lib or under /usr/lib).
  std::string bins;
  for (const auto& b : AhaBinaries()) bins += " " + std::string(AHA_BIN_DIR) + "/" + b;
  Output ldd = Sh("ldd" + bins + " | awk '/=> \\//{print $3}' | sort -u");
  ASSERT_EQ(ldd.code, 0) << ldd.err;
  std::vector<std::string> libs;
  std::string paths;
  std::istringstream lines(ldd.out);
  for (std::string lib; lines >> lib;) {
    // A CUDA build's binaries also load the toolkit's runtime and NCCL; the CPU image builds with
    // -DAHA_CUDA=OFF and deploy/Dockerfile.cuda bundles those from the toolkit it is given.
    if (lib.rfind("/usr/local/cuda", 0) == 0) continue;
    libs.push_back(lib);
    paths += " " + lib + " /usr" + lib;
  }
  ASSERT_GT(libs.size(), 5u) << ldd.out;
  Output dpkg = Sh("dpkg -S" + paths);
  std::map<std::string, std::string> package_of;  // path -> package
  std::istringstream owners(dpkg.out);
  for (std::string line; std::getline(owners, line);) {
    size_t sep = line.find(": /");
    if (sep != std::string::npos) package_of[line.substr(sep + 2)] = line.substr(0, line.find_first_of(":,"));
  }
  std::set<std::string> missing;
  for (const auto& lib : libs) {
    std::string name = package_of.count(lib) ? package_of[lib] : package_of["/usr" + lib];
    EXPECT_FALSE(name.empty()) << "no Debian package owns " << lib;
    if (!name.empty() && !runtime.count(name)) missing.insert(name + " (" + fs::path(lib).filename().string() + ")");
  }
  std::string list;
  for (const auto& m : missing) list += " " + m;
  EXPECT_TRUE(missing.empty()) << "deploy/Dockerfile's runtime stage lacks:" << list;
}

TEST(Dockerfile, BuildStagesInstallOnlyWhatSetupShInstalls) {
  std::string setup = Read(Source("scripts/setup.sh"));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(setup, m, std::regex(R"(PACKAGES=\(([^)]*)\))")));
  std::set<std::string> known;
  std::istringstream words(m[1].str());
  for (std::string w; words >> w;) known.insert(w);
  for (const char* file : {"deploy/Dockerfile", "deploy/Dockerfile.cuda"}) {
    std::string text = Read(Source(file));
    std::string build = text.substr(0, text.rfind("\nFROM "));
    for (const auto& p : AptPackages(build)) {
      EXPECT_TRUE(known.count(p)) << file << " installs " << p << ", which scripts/setup.sh does not";
    }
  }
}

// ---- aha render k8s ----

std::vector<YAML::Node> LoadAll(const fs::path& dir) {
  std::vector<YAML::Node> out;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".yaml") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const auto& f : files)
    for (const auto& doc : YAML::LoadAllFromFile(f.string())) out.push_back(doc);
  return out;
}

YAML::Node Object(const std::vector<YAML::Node>& all, const std::string& kind, const std::string& name) {
  for (const auto& o : all)
    if (o["kind"].as<std::string>() == kind && o["metadata"]["name"].as<std::string>() == name) return o;
  ADD_FAILURE() << "no " << kind << "/" << name;
  return YAML::Node();
}

std::vector<std::string> Strings(const YAML::Node& seq) {
  std::vector<std::string> out;
  for (const auto& s : seq) out.push_back(s.as<std::string>());
  return out;
}

// Every container of a pod template, init containers first.
std::vector<YAML::Node> Containers(const YAML::Node& workload) {
  std::vector<YAML::Node> out;
  YAML::Node spec = workload["spec"]["template"]["spec"];
  for (const char* key : {"initContainers", "containers"})
    for (const auto& c : spec[key]) out.push_back(c);
  return out;
}

YAML::Node ContainerNamed(const YAML::Node& workload, const std::string& name) {
  for (const auto& c : Containers(workload))
    if (c["name"].as<std::string>() == name) return c;
  ADD_FAILURE() << "no container " << name;
  return YAML::Node();
}

std::map<std::string, int> ServicePorts(const YAML::Node& service) {
  std::map<std::string, int> out;
  for (const auto& p : service["spec"]["ports"]) out[p["name"].as<std::string>()] = p["port"].as<int>();
  return out;
}

bool Contains(const std::vector<std::string>& v, const std::vector<std::string>& run) {
  return std::search(v.begin(), v.end(), run.begin(), run.end()) != v.end();
}

TEST(RenderK8s, WritesEveryObjectWithTheJobsPortsAndImage) {
  TempDir t("k8s");
  Output o = Sh(Aha() + " render k8s " + Source("configs/tiny-cpu.yaml") + " --out " + t.dir.string() +
                " --set ports.base=9000 --image registry.example/aha:1 --namespace grpo-test");
  ASSERT_EQ(o.code, 0) << o.err;
  EXPECT_FALSE(fs::exists(t.dir / "90-service-monitor.yaml")) << "only with --service-monitor";
  auto all = LoadAll(t.dir);
  std::multiset<std::string> kinds;
  for (const auto& obj : all) kinds.insert(obj["kind"].as<std::string>());
  EXPECT_EQ(kinds, (std::multiset<std::string>{"Namespace", "ConfigMap", "PersistentVolumeClaim", "Service", "Service",
                                                "Service", "Service", "StatefulSet", "Deployment", "Deployment", "Job"}));
  for (const auto& obj : all)
    if (obj["kind"].as<std::string>() != "Namespace") {
      EXPECT_EQ(obj["metadata"]["namespace"].as<std::string>(), "grpo-test");
    }

  // Ports: the sockets from ports.base, then control and metrics per role.
  using P = std::map<std::string, int>;
  EXPECT_EQ(ServicePorts(Object(all, "Service", "aha-replay")),
            (P{{"rpc", 9000}, {"ingest", 9001}, {"control", 9010}, {"metrics", 9011}}));
  EXPECT_EQ(ServicePorts(Object(all, "Service", "aha-rewardd")), (P{{"listen", 9002}, {"control", 9012}, {"metrics", 9013}}));
  EXPECT_EQ(ServicePorts(Object(all, "Service", "aha-learner")), (P{{"weights", 9003}, {"control", 9014}, {"metrics", 9015}}));
  EXPECT_EQ(ServicePorts(Object(all, "Service", "aha-actor-0")), (P{{"control", 9016}, {"metrics", 9017}}));

  // Every pod: Prometheus annotations naming its metrics port; every container: the image.
  std::map<std::string, int> metrics = {{"aha-replay", 9011}, {"aha-rewardd", 9013}, {"aha-learner", 9015}, {"aha-actor-0", 9017}};
  for (const auto& obj : all) {
    if (!obj["spec"] || !obj["spec"]["template"]) continue;
    std::string name = obj["metadata"]["name"].as<std::string>();
    YAML::Node ann = obj["spec"]["template"]["metadata"]["annotations"];
    EXPECT_EQ(ann["prometheus.io/scrape"].as<std::string>(), "true") << name;
    EXPECT_EQ(ann["prometheus.io/port"].as<std::string>(), std::to_string(metrics[name])) << name;
    EXPECT_EQ(ann["prometheus.io/path"].as<std::string>(), "/metrics") << name;
    for (const auto& c : Containers(obj)) EXPECT_EQ(c["image"].as<std::string>(), "registry.example/aha:1") << name;
  }
  EXPECT_EQ(Read(t.dir / "30-learner.yaml").find("nvidia.com/gpu"), std::string::npos) << "a CPU job asks for no GPU";
  EXPECT_EQ(Object(all, "StatefulSet", "aha-replay")["spec"]["volumeClaimTemplates"].size(), 1u);

  // The ConfigMap holds the resolved job, its paths inside the image.
  auto job = aha::ParseJobConfig(Object(all, "ConfigMap", "aha-job")["data"]["job.yaml"].as<std::string>(), "configmap");
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->data.train, "/opt/aha/configs/data/arith-train.jsonl");
  EXPECT_EQ(job->sft.data, "/opt/aha/configs/data/arith-sft.jsonl");
  EXPECT_EQ(job->ports.base, 9000);
  EXPECT_EQ(job->grpo.steps, 200);
}

TEST(RenderK8s, ProcessesRunTheCommandLinesOfAhaRunWithServiceAddresses) {
  TempDir t("k8s_args");
  Output o = Sh(Aha() + " render k8s " + Source("configs/tiny-cpu.yaml") + " --out " + t.dir.string());
  ASSERT_EQ(o.code, 0) << o.err;
  auto all = LoadAll(t.dir);
  const std::string ns = "tiny-cpu";  // the job's name
  auto args = [&](const std::string& kind, const std::string& name, const std::string& container) {
    return Strings(ContainerNamed(Object(all, kind, name), container)["args"]);
  };
  std::vector<std::string> replay = args("StatefulSet", "aha-replay", "replay");
  EXPECT_EQ(replay, (std::vector<std::string>{"aha-replay", "--config", "/etc/aha/job.yaml", "--control", "tcp://0.0.0.0:7110",
                                              "--metrics", "0.0.0.0:7111", "--db", "/var/lib/aha/replay/db", "--data",
                                              "/opt/aha/configs/data/arith-train.jsonl", "--rpc", "tcp://0.0.0.0:7100",
                                              "--ingest", "tcp://0.0.0.0:7101"}));
  std::vector<std::string> rewardd = args("Deployment", "aha-rewardd", "rewardd");
  EXPECT_TRUE(Contains(rewardd, {"--replay", "tcp://aha-replay." + ns + ".svc:7101"}));
  std::vector<std::string> learner = args("Job", "aha-learner", "learner");
  EXPECT_EQ(learner, (std::vector<std::string>{"aha-learner", "--config", "/etc/aha/job.yaml", "--control", "tcp://0.0.0.0:7114",
                                               "--metrics", "0.0.0.0:7115", "--model", "/var/lib/aha/run/models/sft",
                                               "--replay", "tcp://aha-replay." + ns + ".svc:7100", "--weights",
                                               "tcp://0.0.0.0:7103", "--run-dir", "/var/lib/aha/run", "--resume"}));
  std::vector<std::string> actor = args("Deployment", "aha-actor-0", "actor");
  EXPECT_TRUE(Contains(actor, {"--model", "/var/lib/aha/run/models/sft"}));
  EXPECT_TRUE(Contains(actor, {"--replay", "tcp://aha-replay." + ns + ".svc:7100"}));
  EXPECT_TRUE(Contains(actor, {"--rewardd", "tcp://aha-rewardd." + ns + ".svc:7102"}));
  EXPECT_TRUE(Contains(actor, {"--weights", "tcp://aha-learner." + ns + ".svc:7103"}));
  EXPECT_TRUE(Contains(actor, {"--role-index", "0"}));

  // The learner pod runs the stages in aha run's order around the daemon.
  std::string prepare = args("Job", "aha-learner", "prepare").at(2), finish = args("Job", "aha-learner", "finish").at(2);
  std::vector<std::string> order = {"aha init --arch qwen2 --out /var/lib/aha/run/models/init --seed 7 --preset tiny",
                                    "aha sft --model /var/lib/aha/run/models/init --data /opt/aha/configs/data/arith-sft.jsonl",
                                    "aha eval --model /var/lib/aha/run/models/sft --data /opt/aha/configs/data/arith-eval.jsonl",
                                    "touch /var/lib/aha/run/procs/prepare.done"};
  size_t at = 0;
  for (const auto& step : order) {
    size_t found = prepare.find(step, at);
    EXPECT_NE(found, std::string::npos) << step << "\nin:\n" << prepare;
    if (found != std::string::npos) at = found;
  }
  EXPECT_NE(finish.find("aha eval --model \"${MODEL}\""), std::string::npos) << finish;
  EXPECT_NE(finish.find("--json-out /var/lib/aha/run/eval/after.json"), std::string::npos) << finish;
  EXPECT_NE(finish.find("aha report /var/lib/aha/run"), std::string::npos) << finish;
  EXPECT_NE(args("Deployment", "aha-actor-0", "wait-for-model").at(2).find("/var/lib/aha/run/procs/prepare.done"), std::string::npos);

  // Every flag passed to a daemon is one its --help lists (a renamed flag breaks this test).
  for (const auto& argv : {replay, rewardd, learner, actor}) {
    Output help = Sh(std::string(AHA_BIN_DIR) + "/" + argv[0] + " --help");
    for (const auto& a : argv)
      if (a.rfind("--", 0) == 0) {
        EXPECT_TRUE(std::regex_search(help.out, std::regex("(^|\\s)" + a + "(\\s|$)"))) << argv[0] << " has no " << a;
      }
  }
  // The stage scripts are sound bash.
  for (const auto& [name, script] : {std::pair<std::string, std::string>{"prepare", prepare}, {"finish", finish}}) {
    std::ofstream(t.dir / (name + ".sh")) << script;
    EXPECT_EQ(Shellcheck(t.dir / (name + ".sh"), "-s bash"), "") << name;
  }
}

TEST(RenderK8s, GpuJobRequestsGpusAndNumbersDevicesPerProcess) {
  TempDir t("k8s_gpu");
  Output o = Sh(Aha() + " render k8s " + Source("configs/qwen2.5-0.5b-gpu.yaml") + " --out " + t.dir.string() +
                " --models-claim models --service-monitor");
  ASSERT_EQ(o.code, 0) << o.err;
  auto all = LoadAll(t.dir);
  for (const auto& c : Containers(Object(all, "Job", "aha-learner")))
    EXPECT_EQ(c["resources"]["limits"]["nvidia.com/gpu"].as<int>(), 1) << c["name"].as<std::string>();
  YAML::Node actor = ContainerNamed(Object(all, "Deployment", "aha-actor-0"), "actor");
  EXPECT_EQ(actor["resources"]["limits"]["nvidia.com/gpu"].as<int>(), 1);
  EXPECT_EQ(actor["resources"]["requests"]["nvidia.com/gpu"].as<int>(), 1);
  EXPECT_FALSE(ContainerNamed(Object(all, "Deployment", "aha-rewardd"), "rewardd")["resources"]);
  auto job = aha::ParseJobConfig(Object(all, "ConfigMap", "aha-job")["data"]["job.yaml"].as<std::string>(), "configmap");
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->topology.actors[0].device, "cuda:0") << "cuda:1 of the job is the actor pod's only GPU";
  EXPECT_EQ(job->topology.learner_devices, std::vector<std::string>{"cuda:0"});
  EXPECT_EQ(job->model.path, "/models/Qwen2.5-0.5B");
  // The model comes from the claim; the ServiceMonitor scrapes every Service's metrics port.
  bool mounted = false;
  for (const auto& m : actor["volumeMounts"]) mounted |= m["mountPath"].as<std::string>() == "/models";
  EXPECT_TRUE(mounted);
  YAML::Node sm = Object(all, "ServiceMonitor", "aha");
  EXPECT_EQ(sm["apiVersion"].as<std::string>(), "monitoring.coreos.com/v1");
  EXPECT_EQ(sm["spec"]["endpoints"][0]["port"].as<std::string>(), "metrics");
  // Prometheus's job label: the binary's name, as dashboards/alerts.yml selects on (job="aha-actor").
  EXPECT_EQ(sm["spec"]["jobLabel"].as<std::string>(), "aha/job");
  EXPECT_EQ(Object(all, "Service", "aha-actor-0")["metadata"]["labels"]["aha/job"].as<std::string>(), "aha-actor");
  EXPECT_EQ(Object(all, "Service", "aha-replay")["metadata"]["labels"]["aha/job"].as<std::string>(), "aha-replay");
  EXPECT_EQ(ServicePorts(Object(all, "Service", "aha-learner")).at("weights"), 7103) << "ports.base 0 renders as 7100";
}

// ---- aha render slurm ----

TEST(RenderSlurm, CpuJobIsOneAllocationOfValidBash) {
  TempDir t("slurm");
  Output o = Sh(Aha() + " render slurm " + Source("configs/tiny-cpu.yaml") + " --out " + t.dir.string());
  ASSERT_EQ(o.code, 0) << o.err;
  std::string script = Read(t.dir / "aha.sbatch");
  EXPECT_EQ(script.find("hetjob"), std::string::npos);
  EXPECT_NE(script.find("#SBATCH --ntasks=4\n"), std::string::npos) << script;
  EXPECT_NE(script.find("RUN=${AHA_RUN_DIR:-" + (t.dir / "run").string() + "}"), std::string::npos);
  EXPECT_NE(script.find("BIN=" + std::string(AHA_BIN_DIR)), std::string::npos);
  for (const char* role : {"start replay", "start rewardd", "start learner", "start actor-0", "stage sft", "stage eval-after"})
    EXPECT_NE(script.find(role), std::string::npos) << role;
  EXPECT_NE(script.find("--replay \"tcp://${REPLAY_HOST}:7100\""), std::string::npos);
  EXPECT_NE(script.find("--data " + Source("configs/data/arith-train.jsonl")), std::string::npos)
      << "paths resolve against the job file";
  EXPECT_TRUE(aha::ParseJobConfig(Read(t.dir / "job.yaml"), "job.yaml").ok());
  Output syntax = Sh("bash -n " + (t.dir / "aha.sbatch").string());
  EXPECT_EQ(syntax.code, 0) << syntax.err;
  EXPECT_EQ(Shellcheck(t.dir / "aha.sbatch"), "");
}

TEST(RenderSlurm, GpuJobIsHeterogeneousWithAddressesFromTheComponents) {
  TempDir t("slurm_gpu");
  Output o = Sh(Aha() + " render slurm " + Source("configs/qwen2.5-0.5b-gpu.yaml") + " --out " + t.dir.string() +
                " --partition cpu --gpu-partition gpu --time 2:00:00");
  ASSERT_EQ(o.code, 0) << o.err;
  std::string script = Read(t.dir / "aha.sbatch");
  std::regex hetjob("#SBATCH hetjob");
  EXPECT_EQ(std::distance(std::sregex_iterator(script.begin(), script.end(), hetjob), std::sregex_iterator()), 2)
      << "learner, GPU actors, CPU roles";
  for (const char* want : {"#SBATCH --partition=gpu\n#SBATCH --nodes=1\n#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=4\n"
                           "#SBATCH --gpus=1\n",
                           "#SBATCH --partition=gpu\n#SBATCH --ntasks=1\n#SBATCH --gpus-per-task=1\n",
                           "#SBATCH --partition=cpu\n#SBATCH --nodes=1\n#SBATCH --ntasks=2\n",
                           "ON_LEARNER=(srun --nodes=1 --ntasks=1 --exact --het-group=0 --gpus=1)",
                           "ON_GPU_ACTORS=(srun --nodes=1 --ntasks=1 --exact --het-group=1 --gpus=1)",
                           "ON_CPU=(srun --nodes=1 --ntasks=1 --exact --het-group=2)",
                           "LEARNER_HOST=$(first_host \"$SLURM_JOB_NODELIST_HET_GROUP_0\")",
                           "REPLAY_HOST=$(first_host \"$SLURM_JOB_NODELIST_HET_GROUP_2\")",
                           "start actor-0 ON_GPU_ACTORS", "start replay ON_CPU",
                           "#SBATCH --time=2:00:00"})
    EXPECT_NE(script.find(want), std::string::npos) << want << "\nin:\n" << script;
  auto job = aha::ParseJobConfig(Read(t.dir / "job.yaml"), "job.yaml");
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->topology.actors[0].device, "cuda:0");
  Output syntax = Sh("bash -n " + (t.dir / "aha.sbatch").string());
  EXPECT_EQ(syntax.code, 0) << syntax.err;
  EXPECT_EQ(Shellcheck(t.dir / "aha.sbatch"), "");
}

// ---- Bad input ----

void ExpectOneLineExit2(const Output& o, const std::string& message) {
  EXPECT_EQ(o.code, 2) << o.err;
  EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err;
  EXPECT_EQ(o.err.rfind("aha render: error: ", 0), 0u) << o.err;
  EXPECT_NE(o.err.find(message), std::string::npos) << "want '" << message << "' in: " << o.err;
}

TEST(RenderErrors, AreOneLineAndExitCode2) {
  TempDir t("errors");
  const std::string job = Source("configs/tiny-cpu.yaml"), out = " --out " + (t.dir / "out").string();
  ExpectOneLineExit2(Sh(Aha() + " render helm " + job + out), "unknown target 'helm' (k8s or slurm)");
  ExpectOneLineExit2(Sh(Aha() + " render k8s " + job), "--out is required");
  ExpectOneLineExit2(Sh(Aha() + " render k8s /nonexistent/job.yaml" + out), "/nonexistent/job.yaml");
  ExpectOneLineExit2(Sh(Aha() + " render k8s " + job + out + " --set grpo.gruop_size=4"), "grpo.gruop_size: unknown key");
  ExpectOneLineExit2(Sh(Aha() + " render slurm " + job + out + " --set stages=[sft]"), "stages: render deploys the grpo daemons");
  ExpectOneLineExit2(Sh(Aha() + " render slurm " + job + out + " --image x"), "--image applies to the k8s target only");
  ExpectOneLineExit2(Sh(Aha() + " render k8s " + job + out + " --partition x"), "--partition applies to the slurm target only");
  ExpectOneLineExit2(Sh(Aha() + " render k8s " + job + out + " --namespace Bad_NS"), "--namespace Bad_NS: not a DNS label");
  ExpectOneLineExit2(Sh(Aha() + " render k8s " + job + out + " --run-storage 50GB"), "--run-storage 50GB: not a Kubernetes quantity");
  std::string many_actors = "[{device: cpu}";
  for (int i = 1; i < 300; ++i) many_actors += ", {device: cpu}";
  ExpectOneLineExit2(Sh(Aha() + " render k8s " + job + out + " --set ports.base=65000 --set 'topology.actors=" + many_actors + "]'"),
                     "ports.base: 65000 leaves no room");
  std::ofstream(t.dir / "file") << "x";
  ExpectOneLineExit2(Sh(Aha() + " render k8s " + job + " --out " + (t.dir / "file" / "sub").string()),
                     "--out " + (t.dir / "file" / "sub").string() + ": ");
  ExpectOneLineExit2(Sh(Aha() + " render slurm " + job + " --out /proc/aha-render-test"), "--out /proc/aha-render-test: ");
  fs::create_directories(t.dir / "readonly");
  fs::permissions(t.dir / "readonly", fs::perms::owner_read | fs::perms::owner_exec);
  if (getuid() != 0)  // root writes anywhere
    ExpectOneLineExit2(Sh(Aha() + " render slurm " + job + " --out " + (t.dir / "readonly").string()), "not a writable folder");
  EXPECT_FALSE(fs::exists(t.dir / "out")) << "nothing is written for bad input";
}

}  // namespace
