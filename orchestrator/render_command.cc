#include "orchestrator/render_command.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/config.h"
#include "common/flags.h"
#include "common/version.h"

namespace aha {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

constexpr int kDefaultPortBase = 7100;
constexpr int kMaxRestarts = 5;  // as `aha run`'s supervisor

// ---- What both targets share: ports, roles, the rendered job, the stage commands ----

struct PortPlan {
  int base = kDefaultPortBase;
  int replay_rpc() const { return base; }
  int replay_ingest() const { return base + 1; }
  int rewardd_listen() const { return base + 2; }
  int learner_weights() const { return base + 3; }
  int control(int role) const { return base + 10 + 2 * role; }
  int metrics(int role) const { return base + 11 + 2 * role; }
};

struct Role {
  std::string name;    // replay, rewardd, learner, actor-<i>
  std::string binary;  // aha-replay, ...
  int index = 0;       // k in the port plan
  int gpus = 0;        // GPUs the process needs (0: CPU only)
  int actor = -1;      // actor index, or -1
};

bool IsCuda(const std::string& device) { return device.rfind("cuda:", 0) == 0; }

std::vector<Role> Roles(const JobConfig& job) {
  int learner_gpus = static_cast<int>(std::count_if(job.topology.learner_devices.begin(),
                                                    job.topology.learner_devices.end(), IsCuda));
  std::vector<Role> roles = {{"replay", "aha-replay", 0, 0, -1},
                             {"rewardd", "aha-rewardd", 1, 0, -1},
                             {"learner", "aha-learner", 2, learner_gpus, -1}};
  for (size_t i = 0; i < job.topology.actors.size(); ++i)
    roles.push_back({"actor-" + std::to_string(i), "aha-actor", 3 + static_cast<int>(i),
                     IsCuda(job.topology.actors[i].device) ? 1 : 0, static_cast<int>(i)});
  return roles;
}

const Role& Find(const std::vector<Role>& roles, const std::string& name) {
  for (const auto& r : roles)
    if (r.name == name) return r;
  AHA_CHECK(false) << "no role " << name;
  return roles.front();
}

bool UsesGpus(const std::vector<Role>& roles) {
  return std::any_of(roles.begin(), roles.end(), [](const Role& r) { return r.gpus > 0; });
}

// The job as the deployed processes read it: `input` maps each path the job reads, `output` the
// path the sample stage writes; each process sees only its own GPUs, numbered from 0.
JobConfig DeployedJob(JobConfig job, const std::function<std::string(const std::string&)>& input,
                      const std::function<std::string(const std::string&)>& output) {
  for (std::string* p : {&job.model.path, &job.model.init.config, &job.data.train, &job.data.eval, &job.sft.data})
    if (!p->empty()) *p = input(*p);
  if (job.model.tokenizer != "byte") job.model.tokenizer = input(job.model.tokenizer);
  if (!job.sample.out.empty()) job.sample.out = output(job.sample.out);
  for (auto& a : job.topology.actors)
    if (IsCuda(a.device)) a.device = "cuda:0";
  int next = 0;
  for (auto& d : job.topology.learner_devices)
    if (IsCuda(d)) d = "cuda:" + std::to_string(next++);
  return job;
}

// The job file the processes read: ToYaml, less the empty model.init section of a job that starts
// from model.path, which ToYaml prints as `arch: ""` and which LoadJobConfig then refuses
// ("'' is not one of qwen2|qwen3|llama").
std::string JobYaml(const JobConfig& job) {
  std::string text = ToYaml(job);
  if (!job.model.init.arch.empty()) return text;
  size_t at = text.find("\n  init:\n");
  if (at == std::string::npos) return text;
  size_t end = at + 9;
  while (end < text.size() && text.compare(end, 4, "    ") == 0) {
    size_t nl = text.find('\n', end);
    end = nl == std::string::npos ? text.size() : nl + 1;
  }
  return text.erase(at + 1, end - at - 1);
}

// Where the processes find things, as the target sees them.
struct Layout {
  std::string bin;           // prefix of a binary: "" (on PATH) or "${BIN}/"
  std::string run;           // the run directory
  std::string daemon_config; // the job file the daemons read
  std::string bind;          // address the daemons bind
  std::string replay_host, rewardd_host, learner_host;  // as their peers reach them
  std::string replay_db;
  bool ready_files = false;  // write RUN/procs/<role>.ready (Slurm waits on them)
};

std::string Tcp(const std::string& host, int port) { return "tcp://" + host + ":" + std::to_string(port); }

// The command line of one role: the same flags `aha run` passes, with the cluster's addresses.
std::vector<std::string> DaemonArgs(const JobConfig& job, const Role& role, const PortPlan& ports, const Layout& l,
                                    const std::string& grpo_model) {
  std::vector<std::string> a = {l.bin + role.binary, "--config", l.daemon_config};
  if (l.ready_files) a.insert(a.end(), {"--ready-file", l.run + "/procs/" + role.name + ".ready"});
  a.insert(a.end(), {"--control", Tcp(l.bind, ports.control(role.index)), "--metrics",
                     l.bind + ":" + std::to_string(ports.metrics(role.index))});
  const std::string replay_rpc = Tcp(l.replay_host, ports.replay_rpc());
  if (role.name == "replay") {
    a.insert(a.end(), {"--db", l.replay_db, "--data", job.data.train, "--rpc", Tcp(l.bind, ports.replay_rpc()),
                       "--ingest", Tcp(l.bind, ports.replay_ingest())});
  } else if (role.name == "rewardd") {
    a.insert(a.end(), {"--listen", Tcp(l.bind, ports.rewardd_listen()), "--replay",
                       Tcp(l.replay_host, ports.replay_ingest())});
  } else if (role.name == "learner") {
    // --resume always: with no checkpoint yet it starts fresh, and a restarted learner continues.
    a.insert(a.end(), {"--model", grpo_model, "--replay", replay_rpc, "--weights", Tcp(l.bind, ports.learner_weights()),
                       "--run-dir", l.run, "--resume"});
  } else {
    a.insert(a.end(), {"--model", grpo_model, "--replay", replay_rpc, "--rewardd",
                       Tcp(l.rewardd_host, ports.rewardd_listen()), "--weights",
                       Tcp(l.learner_host, ports.learner_weights()), "--role-index", std::to_string(role.actor)});
  }
  return a;
}

struct Step {
  std::string name;               // log name, as `aha run` names it: init, sft, eval-before, ...
  std::vector<std::string> argv;  // an `aha` subcommand
};

// The stage commands of `aha run` around the grpo daemons. After the learner, the model is the
// newest checkpoint, known only then: the finish steps name it ${MODEL}.
struct StagePlan {
  std::vector<Step> prepare;
  std::string grpo_model;
  std::vector<Step> finish;
  std::string final_model;
};

constexpr const char* kModelVar = "${MODEL}";

StagePlan PlanStages(const JobConfig& job, const std::string& aha, const std::string& run) {
  StagePlan plan;
  const std::string config = run + "/config.yaml";
  std::string model = job.model.path;
  if (model.empty()) {
    model = run + "/models/init";
    std::vector<std::string> a = {aha, "init", "--arch", job.model.init.arch, "--out", model, "--seed", std::to_string(job.seed)};
    if (!job.model.init.preset.empty()) a.insert(a.end(), {"--preset", job.model.init.preset});
    if (!job.model.init.config.empty()) a.insert(a.end(), {"--config", job.model.init.config});
    if (job.model.tokenizer != "byte") a.insert(a.end(), {"--tokenizer", job.model.tokenizer});
    plan.prepare.push_back({"init", a});
  }
  std::vector<Step>* steps = &plan.prepare;
  for (const std::string& stage : job.stages) {
    if (stage == "sft") {
      std::string out = run + "/models/sft";
      steps->push_back({"sft", {aha, "sft", "--model", model, "--data", job.sft.data, "--out", out, "--config", config}});
      model = out;
    } else if (stage == "sample") {
      steps->push_back({"sample", {aha, "sample", "--model", model, "--data", job.data.train, "--samples",
                                   std::to_string(job.sample.samples), "--keep", job.sample.keep, "--out",
                                   job.sample.out, "--config", config}});
    } else if (stage == "grpo") {
      auto eval = [&](const std::string& which) -> Step {
        return {"eval-" + which, {aha, "eval", "--model", model, "--data", job.data.eval, "--config", config,
                                  "--json-out", run + "/eval/" + which + ".json"}};
      };
      if (!job.data.eval.empty()) plan.prepare.push_back(eval("before"));
      plan.grpo_model = model;
      model = kModelVar;
      steps = &plan.finish;
      if (!job.data.eval.empty()) plan.finish.push_back(eval("after"));
    }
  }
  plan.final_model = model;
  return plan;
}

// ---- Shell ----

// One shell word: single quotes when literal text needs quoting; the script's own variables
// (${RUN}, ${BIN}, ${MODEL}, ${..._HOST}) stay expandable inside double quotes.
std::string ShellWord(const std::string& s) {
  static const std::regex plain(R"([A-Za-z0-9_@%+=:,./-]+)");
  if (std::regex_match(s, plain)) return s;
  if (s.find("${") == std::string::npos) {
    std::string out = "'";
    for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
  }
  std::string out = "\"";
  for (char c : s) {
    if (c == '\\' || c == '"' || c == '`' || c == '$') out += '\\';
    out += c;
  }
  out += "\"";
  for (const char* var : {"RUN", "BIN", "MODEL", "REPLAY_HOST", "REWARDD_HOST", "LEARNER_HOST"}) {
    std::string escaped = std::string("\\${") + var + "}", plain_var = std::string("${") + var + "}";
    for (size_t at; (at = out.find(escaped)) != std::string::npos;) out.replace(at, escaped.size(), plain_var);
  }
  return out;
}

// `words` (already shell text) then `argv` (quoted here) as one command, wrapped before a flag
// when the line grows past 100 columns.
std::string ShellCommand(const std::string& words, const std::vector<std::string>& argv, int indent = 0) {
  std::string out = std::string(indent, ' ') + words;
  size_t line_start = 0;
  for (size_t i = 0; i < argv.size(); ++i) {
    std::string w = ShellWord(argv[i]);
    // Keep a flag with its value: break only before a word that starts with "--".
    bool flag = argv[i].rfind("--", 0) == 0;
    size_t next = (flag && i + 1 < argv.size()) ? w.size() + 1 + ShellWord(argv[i + 1]).size() : w.size();
    if (flag && out.size() - line_start + 1 + next > 100) {
      out += " \\\n";
      line_start = out.size();
      out += std::string(indent + 4, ' ') + w;
    } else {
      out += (out.empty() || out.back() == ' ' ? "" : " ") + w;
    }
  }
  return out + "\n";
}

// ---- YAML (block style, for the manifests) ----

bool IsPlainScalar(const std::string& s) {
  static const std::regex plain(R"((--)?[A-Za-z/][A-Za-z0-9_./@-]*)");  // flags stay plain too
  static const std::set<std::string> reserved = {"y", "yes", "n", "no", "true", "false", "on", "off", "null"};
  std::string lower = s;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  return std::regex_match(s, plain) && !reserved.count(lower);
}

// A multi-line string that a literal block scalar (`|` or `|-`) carries unchanged.
bool IsLiteralBlock(const Json& v) {
  if (!v.is_string()) return false;
  const auto& s = v.get_ref<const std::string&>();
  if (s.find('\n') == std::string::npos || s.find('\r') != std::string::npos) return false;
  if (s.empty() || s[0] == ' ' || s[0] == '\n') return false;
  return s.size() < 2 || s.substr(s.size() - 2) != "\n\n";
}

std::string FlowScalar(const Json& v) {
  if (v.is_object()) return "{}";
  if (v.is_array()) return "[]";
  if (v.is_string()) {
    const auto& s = v.get_ref<const std::string&>();
    return IsPlainScalar(s) ? s : Json(s).dump();  // a JSON string is a YAML double-quoted scalar
  }
  return v.dump();
}

void EmitMapping(const Json& obj, int indent, bool first_inline, std::string& out);
void EmitSequence(const Json& arr, int indent, std::string& out);

// What follows "key:" or "-".
void EmitValue(const Json& v, int indent, std::string& out) {
  if (v.is_object() && !v.empty()) {
    out += "\n";
    EmitMapping(v, indent, false, out);
  } else if (v.is_array() && !v.empty()) {
    out += "\n";
    EmitSequence(v, indent, out);
  } else if (IsLiteralBlock(v)) {
    const auto& s = v.get_ref<const std::string&>();
    out += s.back() == '\n' ? " |\n" : " |-\n";
    std::istringstream lines(s);
    for (std::string line; std::getline(lines, line);) out += line.empty() ? "\n" : std::string(indent, ' ') + line + "\n";
  } else {
    out += " " + FlowScalar(v) + "\n";
  }
}

void EmitMapping(const Json& obj, int indent, bool first_inline, std::string& out) {
  bool first = true;
  for (const auto& [key, value] : obj.items()) {
    if (!(first && first_inline)) out += std::string(indent, ' ');
    first = false;
    out += (IsPlainScalar(key) ? key : Json(key).dump()) + ":";
    EmitValue(value, indent + 2, out);
  }
}

void EmitSequence(const Json& arr, int indent, std::string& out) {
  for (const auto& item : arr) {
    out += std::string(indent, ' ') + "-";
    if (item.is_object() && !item.empty()) {
      out += " ";
      EmitMapping(item, indent + 2, true, out);
    } else {
      EmitValue(item, indent + 2, out);
    }
  }
}

std::string ToYamlDocuments(const std::vector<Json>& objects) {
  std::string out;
  for (size_t i = 0; i < objects.size(); ++i) {
    if (i) out += "---\n";
    EmitMapping(objects[i], 0, false, out);
  }
  return out;
}

// ---- Kubernetes ----

constexpr const char* kRunMount = "/var/lib/aha/run";
constexpr const char* kReplayMount = "/var/lib/aha/replay";
constexpr const char* kJobMount = "/etc/aha";
constexpr const char* kModelsMount = "/models";

struct K8sOptions {
  std::string ns, instance, image = "aha:latest", storage_class, run_storage = "50Gi", replay_storage = "20Gi";
  std::string job_dir = "/opt/aha/configs", models_claim;
  bool service_monitor = false;
};

// A DNS-1123 label from a job name: lower case, [a-z0-9-], at most 63 characters.
std::string DnsLabel(const std::string& s) {
  std::string out;
  for (char c : s) {
    char l = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    out += std::isalnum(static_cast<unsigned char>(l)) ? l : '-';
  }
  out = out.substr(0, 63);
  while (!out.empty() && out.front() == '-') out.erase(out.begin());
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out.empty() ? "aha" : out;
}

bool IsDnsLabel(const std::string& s) {
  static const std::regex label(R"([a-z0-9]([-a-z0-9]*[a-z0-9])?)");
  return s.size() <= 63 && std::regex_match(s, label);
}

class K8sRenderer {
 public:
  K8sRenderer(const JobConfig& job, K8sOptions o, PortPlan ports)
      : job_(job), o_(std::move(o)), ports_(ports), roles_(Roles(job)) {
    layout_.run = kRunMount;
    layout_.daemon_config = std::string(kJobMount) + "/job.yaml";
    layout_.bind = "0.0.0.0";
    layout_.replay_host = Host("replay");
    layout_.rewardd_host = Host("rewardd");
    layout_.learner_host = Host("learner");
    layout_.replay_db = std::string(kReplayMount) + "/db";
    plan_ = PlanStages(job_, "aha", kRunMount);
  }

  // file name -> YAML documents
  std::vector<std::pair<std::string, std::string>> Render() const {
    std::vector<std::pair<std::string, std::string>> files;
    Json ns = {{"apiVersion", "v1"}, {"kind", "Namespace"},
               {"metadata", {{"name", o_.ns},
                             {"labels", {{"app.kubernetes.io/name", "aha"}, {"app.kubernetes.io/instance", o_.instance}}}}}};
    files.push_back({"00-namespace.yaml", ToYamlDocuments({ns})});
    Json config = {{"apiVersion", "v1"}, {"kind", "ConfigMap"}, {"metadata", Meta("aha-job", "job")},
                   {"data", {{"job.yaml", JobYaml(job_)}}}};
    files.push_back({"01-job-configmap.yaml", ToYamlDocuments({config})});
    Json run = {{"apiVersion", "v1"}, {"kind", "PersistentVolumeClaim"}, {"metadata", Meta("aha-run", "run")},
                {"spec", ClaimSpec("ReadWriteMany", o_.run_storage)}};
    files.push_back({"02-run-volume.yaml", ToYamlDocuments({run})});
    files.push_back({"10-replay.yaml", ToYamlDocuments({Service(Find(roles_, "replay"), false), Replay()})});
    files.push_back({"20-rewardd.yaml", ToYamlDocuments({Service(Find(roles_, "rewardd"), false), Rewardd()})});
    files.push_back({"30-learner.yaml", ToYamlDocuments({Service(Find(roles_, "learner"), true), Learner()})});
    for (const auto& r : roles_)
      if (r.actor >= 0)
        files.push_back({std::to_string(40 + r.actor) + "-" + r.name + ".yaml", ToYamlDocuments({Service(r, false), Actor(r)})});
    if (o_.service_monitor) files.push_back({"90-service-monitor.yaml", ToYamlDocuments({ServiceMonitor()})});
    return files;
  }

 private:
  std::string Host(const std::string& role) const { return "aha-" + role + "." + o_.ns + ".svc"; }

  Json Selector(const std::string& component) const {
    return {{"app.kubernetes.io/name", "aha"}, {"app.kubernetes.io/instance", o_.instance},
            {"app.kubernetes.io/component", component}};
  }
  Json Meta(const std::string& name, const std::string& component) const {
    return {{"name", name}, {"namespace", o_.ns}, {"labels", Selector(component)}};
  }
  Json ClaimSpec(const std::string& mode, const std::string& size) const {
    Json spec = {{"accessModes", {mode}}, {"resources", {{"requests", {{"storage", size}}}}}};
    if (!o_.storage_class.empty()) spec["storageClassName"] = o_.storage_class;
    return spec;
  }

  // Named ports of a role: its sockets, then control and metrics.
  std::vector<std::pair<std::string, int>> Ports(const Role& r) const {
    std::vector<std::pair<std::string, int>> p;
    if (r.name == "replay") p = {{"rpc", ports_.replay_rpc()}, {"ingest", ports_.replay_ingest()}};
    if (r.name == "rewardd") p = {{"listen", ports_.rewardd_listen()}};
    if (r.name == "learner") p = {{"weights", ports_.learner_weights()}};
    p.push_back({"control", ports_.control(r.index)});
    p.push_back({"metrics", ports_.metrics(r.index)});
    return p;
  }

  Json Container(const std::string& name, const Role& r, Json args, Json mounts, bool with_ports) const {
    Json c = {{"name", name}, {"image", o_.image}, {"imagePullPolicy", "IfNotPresent"}, {"args", std::move(args)}};
    if (with_ports) {
      Json ports = Json::array();
      for (const auto& [pname, port] : Ports(r)) ports.push_back({{"name", pname}, {"containerPort", port}, {"protocol", "TCP"}});
      c["ports"] = ports;
    }
    if (r.gpus > 0) c["resources"] = {{"requests", {{"nvidia.com/gpu", r.gpus}}}, {"limits", {{"nvidia.com/gpu", r.gpus}}}};
    if (!mounts.empty()) c["volumeMounts"] = std::move(mounts);
    return c;
  }

  Json DaemonContainer(const std::string& name, const Role& r, Json mounts) const {
    Json args = DaemonArgs(job_, r, ports_, layout_, plan_.grpo_model);
    return Container(name, r, std::move(args), std::move(mounts), true);
  }

  Json Mount(const std::string& volume, const std::string& path, bool read_only) const {
    Json m = {{"name", volume}, {"mountPath", path}};
    if (read_only) m["readOnly"] = true;
    return m;
  }
  Json JobVolume() const { return {{"name", "job"}, {"configMap", {{"name", "aha-job"}}}}; }
  Json RunVolume() const { return {{"name", "run"}, {"persistentVolumeClaim", {{"claimName", "aha-run"}}}}; }
  Json ModelsVolume() const {
    return {{"name", "models"}, {"persistentVolumeClaim", {{"claimName", o_.models_claim}, {"readOnly", true}}}};
  }

  Json PodTemplate(const Role& r, Json spec) const {
    spec["enableServiceLinks"] = false;  // no AHA_*_PORT variables from the Services
    if (r.gpus > 0)
      spec["tolerations"] = Json::array({{{"key", "nvidia.com/gpu"}, {"operator", "Exists"}, {"effect", "NoSchedule"}}});
    Json annotations = {{"prometheus.io/scrape", "true"}, {"prometheus.io/port", std::to_string(ports_.metrics(r.index))},
                        {"prometheus.io/path", "/metrics"}};
    return {{"metadata", {{"labels", Selector(r.name)}, {"annotations", annotations}}}, {"spec", std::move(spec)}};
  }

  Json Service(const Role& r, bool publish_not_ready) const {
    // Numeric target ports: the endpoints controller looks a named one up in the pod's containers
    // only, and the learner's sockets live in an init container.
    Json ports = Json::array();
    for (const auto& [pname, port] : Ports(r))
      ports.push_back({{"name", pname}, {"port", port}, {"targetPort", port}, {"protocol", "TCP"}});
    Json spec = {{"selector", Selector(r.name)}, {"ports", ports}};
    if (publish_not_ready) spec["publishNotReadyAddresses"] = true;
    // The ServiceMonitor takes Prometheus's job label from aha/job: the binary's name, one job for
    // all actors, as dashboards/alerts.yml expects.
    Json meta = Meta("aha-" + r.name, r.name);
    meta["labels"]["aha/job"] = r.binary;
    return {{"apiVersion", "v1"}, {"kind", "Service"}, {"metadata", meta}, {"spec", spec}};
  }

  Json Deployment(const Role& r, Json pod_spec) const {
    return {{"apiVersion", "apps/v1"}, {"kind", "Deployment"}, {"metadata", Meta("aha-" + r.name, r.name)},
            {"spec", {{"replicas", 1}, {"strategy", {{"type", "Recreate"}}}, {"selector", {{"matchLabels", Selector(r.name)}}},
                      {"template", PodTemplate(r, std::move(pod_spec))}}}};
  }

  Json Replay() const {
    const Role& r = Find(roles_, "replay");
    Json mounts = {Mount("job", kJobMount, true), Mount("replay-db", kReplayMount, false)};
    Json pod = {{"containers", {DaemonContainer("replay", r, mounts)}}, {"volumes", {JobVolume()}}};
    Json claim = {{"metadata", {{"name", "replay-db"}}}, {"spec", ClaimSpec("ReadWriteOnce", o_.replay_storage)}};
    return {{"apiVersion", "apps/v1"}, {"kind", "StatefulSet"}, {"metadata", Meta("aha-replay", "replay")},
            {"spec", {{"serviceName", "aha-replay"}, {"replicas", 1}, {"selector", {{"matchLabels", Selector("replay")}}},
                      {"template", PodTemplate(r, pod)}, {"volumeClaimTemplates", {claim}}}}};
  }

  Json Rewardd() const {
    const Role& r = Find(roles_, "rewardd");
    Json pod = {{"containers", {DaemonContainer("rewardd", r, {Mount("job", kJobMount, true)})}}, {"volumes", {JobVolume()}}};
    return Deployment(r, pod);
  }

  // Mounts of the pods that read the run directory (and the models claim, when given).
  Json RunMounts(bool read_only) const {
    Json m = {Mount("job", kJobMount, true), Mount("run", kRunMount, read_only)};
    if (!o_.models_claim.empty()) m.push_back(Mount("models", kModelsMount, true));
    return m;
  }
  Json RunVolumes() const {
    Json v = {JobVolume(), RunVolume()};
    if (!o_.models_claim.empty()) v.push_back(ModelsVolume());
    return v;
  }

  Json Learner() const {
    const Role& r = Find(roles_, "learner");
    const std::string run = kRunMount;
    std::string prepare = "set -euo pipefail\n";
    prepare += "if [ -e " + run + "/procs/prepare.done ]; then echo 'prepare: done in an earlier pod'; exit 0; fi\n";
    prepare += "mkdir -p";
    for (const char* sub : {"logs", "procs", "metrics", "models", "checkpoints", "eval", "report"}) prepare += " " + run + "/" + sub;
    prepare += "\ncp " + std::string(kJobMount) + "/job.yaml " + run + "/config.yaml\nset -x\n";
    for (const auto& s : plan_.prepare) prepare += ShellCommand("", s.argv);
    prepare += "touch " + run + "/procs/prepare.done\n";

    std::string finish = "set -euo pipefail\n";
    finish += "if [ -e " + run + "/checkpoints/latest ]; then MODEL=$(readlink -f " + run + "/checkpoints/latest); else MODEL=" +
              ShellWord(plan_.grpo_model) + "; fi\nset -x\n";
    for (const auto& s : plan_.finish) finish += ShellCommand("", s.argv);
    finish += "echo " + ShellWord(plan_.final_model) + " > " + run + "/final_model.txt\n";
    finish += "aha report " + run + "\n";

    Json mounts = RunMounts(false);
    Json pod = {{"restartPolicy", "OnFailure"},
                {"initContainers", {Container("prepare", r, {"/bin/bash", "-c", prepare}, mounts, false),
                                    DaemonContainer("learner", r, mounts)}},
                {"containers", {Container("finish", r, {"/bin/bash", "-c", finish}, mounts, false)}},
                {"volumes", RunVolumes()}};
    return {{"apiVersion", "batch/v1"}, {"kind", "Job"}, {"metadata", Meta("aha-learner", "learner")},
            {"spec", {{"backoffLimit", 3}, {"template", PodTemplate(r, pod)}}}};
  }

  Json Actor(const Role& r) const {
    std::string wait = "until [ -e " + std::string(kRunMount) +
                       "/procs/prepare.done ]; do echo 'waiting for the learner pod to prepare the model'; sleep 10; done\n";
    Json mounts = RunMounts(true);
    Role no_gpu = r;
    no_gpu.gpus = 0;
    Json waiter = Container("wait-for-model", no_gpu, {"/bin/sh", "-c", wait}, {Mount("run", kRunMount, true)}, false);
    Json pod = {{"initContainers", {waiter}},
                {"containers", {DaemonContainer("actor", r, mounts)}},
                {"volumes", RunVolumes()}};
    return Deployment(r, pod);
  }

  Json ServiceMonitor() const {
    Json selector = {{"app.kubernetes.io/name", "aha"}, {"app.kubernetes.io/instance", o_.instance}};
    return {{"apiVersion", "monitoring.coreos.com/v1"}, {"kind", "ServiceMonitor"}, {"metadata", Meta("aha", "monitoring")},
            {"spec", {{"jobLabel", "aha/job"}, {"selector", {{"matchLabels", selector}}},
                      {"namespaceSelector", {{"matchNames", {o_.ns}}}},
                      {"endpoints", {{{"port", "metrics"}, {"path", "/metrics"}, {"interval", "15s"}}}}}}};
  }

  JobConfig job_;
  K8sOptions o_;
  PortPlan ports_;
  std::vector<Role> roles_;
  Layout layout_;
  StagePlan plan_;
};

// ---- Slurm ----

struct SlurmOptions {
  std::string run_dir, bin_dir, partition, gpu_partition, time = "1-00:00:00", bind = "0.0.0.0", out_dir, job_path;
};

// One component of the allocation: who runs there and what it asks for.
struct Component {
  std::string var;    // ON_LEARNER, ON_GPU_ACTORS, ON_CPU
  std::string hosts;  // shell variable naming its first host (LEARNER_HOST, REPLAY_HOST) or ""
  std::vector<std::string> directives;
};

std::string RenderSlurm(const JobConfig& job, const SlurmOptions& o, const PortPlan& ports) {
  const std::vector<Role> roles = Roles(job);
  const bool het = UsesGpus(roles);
  Layout l;
  l.bin = "${BIN}/";
  l.run = "${RUN}";
  l.daemon_config = "${RUN}/config.yaml";
  l.bind = o.bind;
  l.replay_host = l.rewardd_host = "${REPLAY_HOST}";
  l.learner_host = "${LEARNER_HOST}";
  l.replay_db = "${RUN}/replay";
  l.ready_files = true;
  const StagePlan plan = PlanStages(job, "${BIN}/aha", "${RUN}");

  // Which component each role runs in, and the components' directives.
  std::vector<std::string> cpu_roles = {"replay", "rewardd"}, gpu_actors;
  int learner_gpus = Find(roles, "learner").gpus;
  for (const auto& r : roles)
    if (r.actor >= 0) (r.gpus > 0 ? gpu_actors : cpu_roles).push_back(r.name);
  auto partition = [&](bool gpu) -> std::vector<std::string> {
    const std::string& p = gpu && !o.gpu_partition.empty() ? o.gpu_partition : o.partition;
    return p.empty() ? std::vector<std::string>{} : std::vector<std::string>{"--partition=" + p};
  };
  std::vector<Component> comps;
  std::map<std::string, std::string> component_of;  // role -> ON_* variable
  if (!het) {
    Component all{"ON_NODE", "", partition(false)};
    all.directives.insert(all.directives.end(), {"--nodes=1", "--ntasks=" + std::to_string(roles.size()), "--cpus-per-task=1"});
    comps.push_back(all);
    for (const auto& r : roles) component_of[r.name] = "ON_NODE";
  } else {
    Component learner{"ON_LEARNER", "LEARNER_HOST", partition(learner_gpus > 0)};
    learner.directives.insert(learner.directives.end(), {"--nodes=1", "--ntasks=1", "--cpus-per-task=4"});
    if (learner_gpus > 0) learner.directives.push_back("--gpus=" + std::to_string(learner_gpus));
    comps.push_back(learner);
    component_of["learner"] = "ON_LEARNER";
    if (!gpu_actors.empty()) {
      Component actors{"ON_GPU_ACTORS", "", partition(true)};
      actors.directives.insert(actors.directives.end(), {"--ntasks=" + std::to_string(gpu_actors.size()),
                                                         "--gpus-per-task=1", "--cpus-per-task=2"});
      comps.push_back(actors);
      for (const auto& a : gpu_actors) component_of[a] = "ON_GPU_ACTORS";
    }
    Component cpu{"ON_CPU", "REPLAY_HOST", partition(false)};
    cpu.directives.insert(cpu.directives.end(), {"--nodes=1", "--ntasks=" + std::to_string(cpu_roles.size()), "--cpus-per-task=1"});
    comps.push_back(cpu);
    for (const auto& r : cpu_roles) component_of[r] = "ON_CPU";
  }

  std::ostringstream s;
  s << "#!/bin/bash\n"
    << "# aha job '" << job.name << "' on Slurm, rendered by `aha render slurm` (aha " << kAhaVersion << ", " << kAhaRevision
    << ")\n# from " << o.job_path << ". Submit: sbatch " << o.out_dir << "/aha.sbatch\n";
  if (!het) {
    s << "# One allocation on one node, a task per process: aha-replay, aha-rewardd, aha-learner and "
      << job.topology.actors.size() << " aha-actor.\n";
  } else {
    s << "# A heterogeneous job: component 0 the learner";
    if (learner_gpus > 0) s << " (" << learner_gpus << " GPU)";
    if (!gpu_actors.empty()) s << ", component 1 the " << gpu_actors.size() << " GPU actor(s)";
    s << ", component " << comps.size() - 1 << " replay, rewardd and the CPU actors.\n";
  }
  s << "# Each role is one background srun step (restarted up to " << kMaxRestarts << " times, as `aha run` does); stage\n"
    << "# commands run as steps on the learner's component. The run directory must be visible from every\n"
    << "# node; resubmitting resumes: finished stages are skipped, the learner continues from its newest\n"
    << "# checkpoint, replay keeps its database. AHA_RUN_DIR=DIR at submission puts the run elsewhere.\n";
  s << "#SBATCH --job-name=aha-" << DnsLabel(job.name) << "\n#SBATCH --output=" << o.out_dir << "/slurm-%j.out\n"
    << "#SBATCH --time=" << o.time << "\n";
  for (size_t c = 0; c < comps.size(); ++c) {
    if (c) s << "#SBATCH hetjob\n";
    for (const auto& d : comps[c].directives) s << "#SBATCH " << d << "\n";
  }
  s << "# shellcheck disable=SC2034,SC2016  # ON_* arrays are used by name; start's bash -c text expands in the step\n"
    << "set -euo pipefail\n\n"
    << "BIN=" << ShellWord(o.bin_dir) << "\n"
    << "RUN=${AHA_RUN_DIR:-" << ShellWord(o.run_dir) << "}\n"
    << "# Processes share their node's cores: one compute thread each unless the environment says otherwise.\n"
    << "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}\n"
    << "mkdir -p \"$RUN\"/{logs,procs,metrics,models,checkpoints,eval,report}\n"
    << "cat > \"$RUN/config.yaml\" <<'AHA_JOB_YAML'\n" << JobYaml(job) << "AHA_JOB_YAML\n\n";

  s << "# Where each role runs: one step of one task in its component of the allocation.\n";
  for (size_t c = 0; c < comps.size(); ++c) {
    s << comps[c].var << "=(srun --nodes=1 --ntasks=1 --exact";
    if (het) s << " --het-group=" << c;
    if (comps[c].var == "ON_LEARNER" && learner_gpus > 0) s << " --gpus=" << learner_gpus;
    if (comps[c].var == "ON_GPU_ACTORS") s << " --gpus=1";
    s << ")\n";
  }
  s << "first_host() { scontrol show hostnames \"$1\" | head -n 1; }\n";
  if (!het) {
    s << "REPLAY_HOST=$(first_host \"$SLURM_JOB_NODELIST\")\nLEARNER_HOST=$REPLAY_HOST\n";
  } else {
    for (size_t c = 0; c < comps.size(); ++c)
      if (!comps[c].hosts.empty())
        s << comps[c].hosts << "=$(first_host \"$SLURM_JOB_NODELIST_HET_GROUP_" << c << "\")\n";
  }
  s << R"SH(
stage() {  # stage NAME COMMAND...: a stage command as one step; output in logs/NAME.log
  local name=$1 log="$RUN/logs/$1.log"
  shift
  echo "\$ $*" >> "$log"
  if ! "$@" >> "$log" 2>&1; then
    echo "aha: stage $name failed; the end of $log:" >&2
    tail -n 5 "$log" >&2
    exit 1
  fi
}

declare -A PID
# start ROLE COMPONENT COMMAND...: ROLE as a background step on COMPONENT (an ON_* array), run
# again when it fails. The step records its id, so that stop can signal it through scancel.
start() {
  local role=$1
  local -n on=$2
  shift 2
  rm -f "$RUN/procs/$role.step" "$RUN/procs/$role.stopping"
  (
    trap 'if [ -n "${child:-}" ]; then kill -TERM "$child" 2>/dev/null; fi; exit 1' TERM
    for ((restarts = 0; restarts <= )SH" << kMaxRestarts << R"SH(; restarts++)); do
      "${on[@]}" --job-name="aha-$role" bash -c 'echo "$SLURM_JOB_ID.$SLURM_STEP_ID" > "$0"; exec "$@"' \
        "$RUN/procs/$role.step" "$@" --restarts "$restarts" >> "$RUN/logs/$role.log" 2>&1 &
      child=$!
      status=0
      wait "$child" || status=$?
      if [ "$status" -eq 0 ] || [ -e "$RUN/procs/$role.stopping" ]; then exit 0; fi
      echo "aha: $role exited with status $status" >> "$RUN/logs/$role.log"
      sleep 2
    done
    exit 1
  ) &
  PID[$role]=$!
}

# stop ROLE...: SIGTERM to each process, then wait for them. The signal goes through scancel:
# srun itself answers SIGTERM by killing its step, which would cost the learner its checkpoint.
stop() {
  local r
  for r in "$@"; do
    [ -n "${PID[$r]:-}" ] || continue
    touch "$RUN/procs/$r.stopping"
    scancel --signal=TERM "$(cat "$RUN/procs/$r.step" 2>/dev/null)" 2>/dev/null || kill -TERM "${PID[$r]}" 2>/dev/null || true
  done
  for r in "$@"; do
    [ -n "${PID[$r]:-}" ] || continue
    wait "${PID[$r]}" 2>/dev/null || true
    unset "PID[$r]"
  done
}

fail() {  # fail ROLE MESSAGE: stop everything, show the end of ROLE's log, exit 1
  echo "aha: $2 (log: $RUN/logs/$1.log)" >&2
  tail -n 8 "$RUN/logs/$1.log" >&2 || true
  stop )SH";
  std::string actors_list;
  for (const auto& r : roles)
    if (r.actor >= 0) actors_list += (actors_list.empty() ? "" : " ") + r.name;
  s << actors_list << R"SH(
  stop learner rewardd replay
  exit 1
}

wait_ready() {  # wait_ready ROLE: until ROLE listens (its ready file), at most 10 minutes
  local i
  for ((i = 0; i < 600; i++)); do
    [ -s "$RUN/procs/$1.ready" ] && return 0
    kill -0 "${PID[$1]}" 2>/dev/null || break
    sleep 1
  done
  fail "$1" "$1 did not start"
}

)SH";
  s << "if [ ! -e \"$RUN/procs/prepare.done\" ]; then\n";
  for (const auto& step : plan.prepare)
    s << ShellCommand("stage " + step.name + " \"${" + component_of["learner"] + "[@]}\"", step.argv, 2);
  s << "  touch \"$RUN/procs/prepare.done\"\nfi\n\n";

  s << "# GRPO: every process, in the order `aha run` starts them.\nrm -f \"$RUN\"/procs/*.ready\n";
  for (const auto& r : roles) {
    s << ShellCommand("start " + r.name + " " + component_of[r.name], DaemonArgs(job, r, ports, l, plan.grpo_model));
    if (r.actor < 0) s << "wait_ready " << r.name << "\n";
  }
  s << R"SH(
# Until the learner is done; a role that failed )SH" << kMaxRestarts + 1 << R"SH( times ends the job.
while kill -0 "${PID[learner]}" 2>/dev/null; do
  for r in "${!PID[@]}"; do
    if [ "$r" != learner ] && ! kill -0 "${PID[$r]}" 2>/dev/null; then
      if wait "${PID[$r]}"; then unset "PID[$r]"; else fail "$r" "$r failed )SH" << kMaxRestarts + 1 << R"SH( times"; fi
    fi
  done
  sleep 2
done
wait "${PID[learner]}" || fail learner "the learner failed )SH" << kMaxRestarts + 1 << R"SH( times"
unset "PID[learner]"
# Actors first (they wait on the others), then the rest.
stop )SH" << actors_list << R"SH(
stop rewardd replay

if [ -e "$RUN/checkpoints/latest" ]; then MODEL=$(readlink -f "$RUN/checkpoints/latest"); else MODEL=)SH"
    << ShellWord(plan.grpo_model) << "; fi\n";
  for (const auto& step : plan.finish)
    s << ShellCommand("stage " + step.name + " \"${" + component_of["learner"] + "[@]}\"", step.argv);
  s << "echo " << ShellWord(plan.final_model) << " > \"$RUN/final_model.txt\"\n"
    << "stage report \"${BIN}/aha\" report \"$RUN\"\n"
    << "cat \"$RUN/report/summary.txt\"\necho \"run directory: $RUN\"\n";
  return s.str();
}

// ---- The command ----

std::string SelfDir() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::current_path().string() : p.parent_path().string();
}

Status WriteFile(const fs::path& path, const std::string& text, bool executable = false) {
  std::ofstream f(path);
  f << text;
  f.close();
  if (!f) return IoError(path.string() + ": cannot write");
  if (executable) {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_exec | fs::perms::group_exec | fs::perms::others_exec, fs::perm_options::add, ec);
  }
  return OkStatus();
}

}  // namespace

int RunRenderCommand(int argc, char** argv) {
  std::string target, job_path, out;
  std::vector<std::string> sets;
  K8sOptions k8s;
  SlurmOptions slurm;
  FlagSet flags("aha render", "Writes the job as Kubernetes manifests (k8s) or a Slurm batch script (slurm) into --out.\n"
                              "Each runs the command lines `aha run` runs on one machine; docs/deploy.md is the guide.");
  flags.Positional("TARGET", &target, "k8s | slurm", true);
  flags.Positional("JOB.yaml", &job_path, "the job file", true);
  flags.String("out", &out, "folder to write into, created if missing (required)");
  flags.StringList("set", &sets, "override a job-file key (a.b=c), repeatable");
  flags.String("image", &k8s.image, "k8s: container image with every aha binary (default aha:latest)");
  flags.String("namespace", &k8s.ns, "k8s: namespace (default: the job's name)");
  flags.Bool("service-monitor", &k8s.service_monitor, "k8s: also write a Prometheus Operator ServiceMonitor");
  flags.String("storage-class", &k8s.storage_class, "k8s: storage class of the volumes (default: the cluster's)");
  flags.String("run-storage", &k8s.run_storage, "k8s: size of the run directory volume, ReadWriteMany (default 50Gi)");
  flags.String("replay-storage", &k8s.replay_storage, "k8s: size of replay's database volume (default 20Gi)");
  flags.String("job-dir", &k8s.job_dir, "k8s: folder in the image that relative job paths resolve against (default /opt/aha/configs)");
  flags.String("models-claim", &k8s.models_claim, "k8s: an existing PersistentVolumeClaim mounted read-only at /models");
  flags.String("run-dir", &slurm.run_dir, "slurm: run directory on a shared file system (default OUT/run)");
  flags.String("bin-dir", &slurm.bin_dir, "slurm: folder of the aha binaries on the nodes (default: this aha's folder)");
  flags.String("partition", &slurm.partition, "slurm: partition (default: the cluster's)");
  flags.String("gpu-partition", &slurm.gpu_partition, "slurm: partition of the GPU components (default --partition)");
  flags.String("time", &slurm.time, "slurm: time limit (default 1-00:00:00)");
  flags.String("bind", &slurm.bind, "slurm: address the daemons bind on their node (default 0.0.0.0)");
  flags.Epilog("Ports: ports.base (7100 when 0): B+0..3 the sockets, B+10+2k control and B+11+2k metrics of role k\n"
               "(replay, rewardd, learner, actors). Examples:\n"
               "  aha render k8s configs/tiny-cpu.yaml --out k8s-tiny --image registry/aha:0.1 --service-monitor\n"
               "  aha render slurm configs/tiny-cpu.yaml --out slurm-job && sbatch slurm-job/aha.sbatch");
  ParseOrExit(flags, argc, argv);
  const std::string prog = "aha render";

  if (target != "k8s" && target != "slurm") return Fail(prog, "unknown target '" + target + "' (k8s or slurm)", 2);
  static const std::vector<std::string> k8s_only = {"image", "namespace", "service-monitor", "storage-class",
                                                    "run-storage", "replay-storage", "job-dir", "models-claim"};
  static const std::vector<std::string> slurm_only = {"run-dir", "bin-dir", "partition", "gpu-partition", "time", "bind"};
  for (const auto& f : target == "k8s" ? slurm_only : k8s_only)
    if (flags.was_set(f)) return Fail(prog, "--" + f + " applies to the " + (target == "k8s" ? "slurm" : "k8s") + " target only", 2);
  if (out.empty()) return Fail(prog, "--out is required", 2);

  auto job_or = LoadJobConfig(job_path, sets);
  if (!job_or.ok()) return Fail(prog, job_or.status().message(), 2);
  const JobConfig& job = *job_or;
  if (std::find(job.stages.begin(), job.stages.end(), "grpo") == job.stages.end())
    return Fail(prog, job_path + ": stages: render deploys the grpo daemons, and the job has no grpo stage (use aha run)", 2);
  PortPlan ports;
  if (job.ports.base > 0) ports.base = static_cast<int>(job.ports.base);
  const int top = ports.metrics(2 + static_cast<int>(job.topology.actors.size()));
  if (top > 65535)
    return Fail(prog, job_path + ": ports.base: " + std::to_string(ports.base) + " leaves no room for " +
                          std::to_string(top - ports.base + 1) + " ports below 65536", 2);

  if (target == "k8s") {
    k8s.instance = DnsLabel(job.name);
    if (k8s.ns.empty()) k8s.ns = k8s.instance;
    if (!IsDnsLabel(k8s.ns)) return Fail(prog, "--namespace " + k8s.ns + ": not a DNS label ([a-z0-9-], at most 63)", 2);
    if (k8s.image.empty()) return Fail(prog, "--image: empty", 2);
    if (!k8s.models_claim.empty() && !IsDnsLabel(k8s.models_claim))
      return Fail(prog, "--models-claim " + k8s.models_claim + ": not a valid claim name", 2);
    static const std::regex quantity(R"([0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?)");
    for (const auto& [flag, value] : {std::pair<std::string, std::string>{"run-storage", k8s.run_storage},
                                      {"replay-storage", k8s.replay_storage}})
      if (!std::regex_match(value, quantity))
        return Fail(prog, "--" + flag + " " + value + ": not a Kubernetes quantity (e.g. 50Gi)", 2);
  }

  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out) || access(out.c_str(), W_OK) != 0)
    return Fail(prog, "--out " + out + ": " + (ec ? ec.message() : std::string("not a writable folder")), 2);
  const fs::path out_dir = fs::absolute(out).lexically_normal();
  const fs::path job_dir = fs::absolute(job_path).parent_path();

  std::vector<std::pair<std::string, std::string>> files;
  if (target == "k8s") {
    const std::string in_image = k8s.job_dir;
    JobConfig deployed = DeployedJob(
        job, [&](const std::string& p) { return fs::path(p).is_absolute() ? p : (fs::path(in_image) / p).lexically_normal().string(); },
        [&](const std::string& p) { return fs::path(p).is_absolute() ? p : (fs::path(kRunMount) / p).lexically_normal().string(); });
    files = K8sRenderer(deployed, k8s, ports).Render();
  } else {
    slurm.run_dir = slurm.run_dir.empty() ? (out_dir / "run").string() : fs::absolute(slurm.run_dir).lexically_normal().string();
    slurm.bin_dir = slurm.bin_dir.empty() ? SelfDir() : fs::absolute(slurm.bin_dir).lexically_normal().string();
    slurm.out_dir = out_dir.string();
    slurm.job_path = fs::absolute(job_path).lexically_normal().string();
    auto local = [&](const std::string& p) { return fs::path(p).is_absolute() ? p : (job_dir / p).lexically_normal().string(); };
    JobConfig deployed = DeployedJob(job, local, local);
    files = {{"aha.sbatch", RenderSlurm(deployed, slurm, ports)}, {"job.yaml", JobYaml(deployed)}};
  }
  for (const auto& [name, text] : files)
    if (Status s = WriteFile(out_dir / name, text, name == "aha.sbatch"); !s.ok())
      return Fail(prog, "--out " + out + ": " + s.message(), 2);
  for (const auto& [name, text] : files) std::printf("%s\n", (out_dir / name).string().c_str());
  return 0;
}

}  // namespace aha
