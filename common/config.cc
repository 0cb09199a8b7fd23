#include "common/config.h"

#include <yaml-cpp/yaml.h>

#include <charconv>
#include <cmath>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

namespace aha {
namespace {

using Choices = std::initializer_list<const char*>;
constexpr double kInf = HUGE_VAL;
constexpr int64_t kMaxInt = INT64_MAX;

// Where errors point: the file, and which key paths came from --set.
struct Origin {
  std::string name;
  std::map<std::string, std::string> overrides;  // key path -> "--set a.b=c"
  Status error;
  void Fail(const std::string& path, const YAML::Mark* mark, const std::string& what) {
    if (!error.ok()) return;  // report the first problem only
    std::string where = name;
    auto o = overrides.find(path);
    if (o != overrides.end()) where = o->second;
    else if (mark && mark->line >= 0) where += ":" + std::to_string(mark->line + 1) + ":" + std::to_string(mark->column + 1);
    error = InvalidArgument(where + ": " + path + ": " + what);
  }
};

std::string Describe(const YAML::Node& n) {
  if (n.IsScalar()) return "'" + n.Scalar() + "'";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "nothing";
}

// ----- reading

class Reader {
 public:
  Reader(YAML::Node node, std::string prefix, Origin* origin)
      : node_(std::move(node)), prefix_(std::move(prefix)), origin_(origin) {}

  void Field(const char* key, std::string& out, Choices choices = {}) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    if (!n.IsScalar()) return Fail(key, n, "expected a string, got " + Describe(n));
    std::string v = n.Scalar();
    if (choices.size() && !OneOf(v, choices)) return Fail(key, n, "'" + v + "' is not one of " + Join(choices));
    out = v;
  }
  void Field(const char* key, int64_t& out, int64_t lo = 0, int64_t hi = kMaxInt) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    int64_t v = 0;
    const std::string s = n.IsScalar() ? n.Scalar() : "";
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (!n.IsScalar() || s.empty() || ec != std::errc() || p != s.data() + s.size())
      return Fail(key, n, "expected an integer, got " + Describe(n));
    if (v < lo || v > hi) return Fail(key, n, s + " is out of range [" + std::to_string(lo) + ", " + (hi == kMaxInt ? "inf" : std::to_string(hi)) + "]");
    out = v;
  }
  void Field(const char* key, double& out, double lo = -kInf, double hi = kInf) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    const std::string s = n.IsScalar() ? n.Scalar() : "";
    char* end = nullptr;
    double v = s.empty() ? 0 : std::strtod(s.c_str(), &end);
    if (!n.IsScalar() || s.empty() || end != s.c_str() + s.size() || !std::isfinite(v))
      return Fail(key, n, "expected a number, got " + Describe(n));
    if (v < lo || v > hi) {
      std::ostringstream r;
      r << s << " is out of range [" << lo << ", " << hi << "]";
      return Fail(key, n, r.str());
    }
    out = v;
  }
  void Field(const char* key, bool& out) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    const std::string s = n.IsScalar() ? n.Scalar() : "";
    if (s == "true" || s == "yes" || s == "on") out = true;
    else if (s == "false" || s == "no" || s == "off") out = false;
    else Fail(key, n, "expected true or false, got " + Describe(n));
  }
  void Field(const char* key, std::vector<std::string>& out, Choices choices = {}) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    if (!n.IsSequence()) return Fail(key, n, "expected a list, got " + Describe(n));
    std::vector<std::string> v;
    for (size_t i = 0; i < n.size(); ++i) {
      YAML::Node e = n[i];
      std::string k = std::string(key) + "[" + std::to_string(i) + "]";
      if (!e.IsScalar()) return Fail(k.c_str(), e, "expected a string, got " + Describe(e));
      if (choices.size() && !OneOf(e.Scalar(), choices))
        return Fail(k.c_str(), e, "'" + e.Scalar() + "' is not one of " + Join(choices));
      v.push_back(e.Scalar());
    }
    out = v;
  }
  void Field(const char* key, std::map<std::string, std::string>& out) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    if (!n.IsMap()) return Fail(key, n, "expected a mapping, got " + Describe(n));
    std::map<std::string, std::string> m;
    for (auto it : n) {
      std::string k = std::string(key) + "." + it.first.Scalar();
      if (!it.second.IsScalar()) return Fail(k.c_str(), it.second, "expected a scalar, got " + Describe(it.second));
      m[it.first.Scalar()] = it.second.Scalar();
    }
    out = m;
  }
  template <typename S>
  void Section(const char* key, S& out) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    if (!n.IsMap()) return Fail(key, n, "expected a mapping, got " + Describe(n));
    Reader r(n, prefix_ + key + ".", origin_);
    Visit(r, out);
    r.Finish();
  }
  template <typename S>
  void List(const char* key, std::vector<S>& out) {
    YAML::Node n;
    if (!Take(key, &n)) return;
    if (!n.IsSequence()) return Fail(key, n, "expected a list, got " + Describe(n));
    std::vector<S> v(n.size());
    for (size_t i = 0; i < n.size(); ++i) {
      std::string k = std::string(key) + "[" + std::to_string(i) + "]";
      if (!n[i].IsMap()) return Fail(k.c_str(), n[i], "expected a mapping, got " + Describe(n[i]));
      Reader r(n[i], prefix_ + k + ".", origin_);
      Visit(r, v[i]);
      r.Finish();
    }
    out = v;
  }
  void Required(const char* key) {
    if (!node_[key].IsDefined() && origin_->error.ok())
      origin_->Fail(prefix_ + key, nullptr, "required key is missing");
  }
  // Unknown keys are errors, with the known ones listed.
  void Finish() {
    for (auto it : node_) {
      std::string k = it.first.IsScalar() ? it.first.Scalar() : "?";
      if (!known_.count(k)) {
        std::string list;
        for (const auto& s : order_) list += (list.empty() ? "" : ", ") + s;
        YAML::Mark m = it.first.Mark();
        origin_->Fail(prefix_ + k, &m, "unknown key (known: " + list + ")");
      }
    }
  }

 private:
  bool Take(const char* key, YAML::Node* out) {
    known_.insert(key);
    order_.push_back(key);
    YAML::Node n = node_[key];
    if (!n.IsDefined() || n.IsNull()) return false;
    *out = n;
    return true;
  }
  void Fail(const char* key, const YAML::Node& n, const std::string& what) {
    YAML::Mark m = n.Mark();
    origin_->Fail(prefix_ + key, &m, what);
  }
  static bool OneOf(const std::string& v, Choices c) {
    for (const char* x : c)
      if (v == x) return true;
    return false;
  }
  static std::string Join(Choices c) {
    std::string s;
    for (const char* x : c) s += (s.empty() ? "" : "|") + std::string(x);
    return s;
  }

  YAML::Node node_;
  std::string prefix_;
  Origin* origin_;
  std::set<std::string> known_;
  std::vector<std::string> order_;
};

// ----- printing

class Writer {
 public:
  explicit Writer(YAML::Emitter& out) : out_(out) {}
  void Field(const char* key, const std::string& v, Choices choices = {}) {
    // An unset choice (model.init.arch of a job that uses model.path) is left out: "" is not one of
    // the choices, so printing it would make the printed job unreadable.
    if (v.empty() && choices.size() > 0) return;
    out_ << YAML::Key << key << YAML::Value << v;
  }
  void Field(const char* key, const int64_t& v, int64_t = 0, int64_t = 0) { out_ << YAML::Key << key << YAML::Value << v; }
  void Field(const char* key, const double& v, double = 0, double = 0) {
    std::ostringstream s;
    s.precision(17);
    s << v;
    out_ << YAML::Key << key << YAML::Value << s.str();
  }
  void Field(const char* key, const bool& v) { out_ << YAML::Key << key << YAML::Value << (v ? "true" : "false"); }
  void Field(const char* key, const std::vector<std::string>& v, Choices = {}) {
    out_ << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginSeq;
    for (const auto& s : v) out_ << s;
    out_ << YAML::EndSeq;
  }
  void Field(const char* key, const std::map<std::string, std::string>& v) {
    out_ << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginMap;
    for (const auto& [k, x] : v) out_ << YAML::Key << k << YAML::Value << x;
    out_ << YAML::EndMap;
  }
  template <typename S>
  void Section(const char* key, S& s) {
    out_ << YAML::Key << key << YAML::Value << YAML::BeginMap;
    Visit(*this, s);
    out_ << YAML::EndMap;
  }
  template <typename S>
  void List(const char* key, std::vector<S>& v) {
    out_ << YAML::Key << key << YAML::Value << YAML::BeginSeq;
    for (auto& s : v) {
      out_ << YAML::BeginMap;
      Visit(*this, s);
      out_ << YAML::EndMap;
    }
    out_ << YAML::EndSeq;
  }
  void Required(const char*) {}

 private:
  YAML::Emitter& out_;
};

// ----- the schema (one place for reading, checking and printing)

template <typename V> void Visit(V& v, ModelInitConfig& c) {
  v.Field("arch", c.arch, {"qwen2", "qwen3", "llama"});
  v.Field("preset", c.preset);
  v.Field("config", c.config);
}
template <typename V> void Visit(V& v, ModelConfig& c) {
  v.Field("path", c.path);
  v.Section("init", c.init);
  v.Field("tokenizer", c.tokenizer);
  v.Field("dtype", c.dtype, {"f32", "bf16"});
  v.Field("prompt_template", c.prompt_template);
}
template <typename V> void Visit(V& v, DataConfig& c) {
  v.Field("train", c.train);
  v.Field("eval", c.eval);
  v.Field("shuffle", c.shuffle);
  v.Field("epochs", c.epochs, 1, 1000000);
  v.Field("skip_bad", c.skip_bad);
}
template <typename V> void Visit(V& v, SftConfig& c) {
  v.Field("data", c.data);
  v.Field("epochs", c.epochs, 1, 100000);
  v.Field("lr", c.lr, 0.0, 1.0);
  v.Field("batch_sequences", c.batch_sequences, 1, 1 << 20);
  v.Field("warmup_steps", c.warmup_steps, 0, kMaxInt);
}
template <typename V> void Visit(V& v, SampleConfig& c) {
  v.Field("samples", c.samples, 1, 4096);
  v.Field("keep", c.keep, {"correct", "all"});
  v.Field("out", c.out);
  v.Field("temperature", c.temperature, 0.0, 10.0);
}
template <typename V> void Visit(V& v, GrpoConfig& c) {
  v.Field("steps", c.steps, 1, kMaxInt);
  v.Field("group_size", c.group_size, 2, 4096);
  v.Field("prompts_per_step", c.prompts_per_step, 1, 1 << 20);
  v.Field("lr", c.lr, 0.0, 1.0);
  v.Field("lr_schedule", c.lr_schedule, {"constant", "warmup", "cosine"});
  v.Field("warmup_steps", c.warmup_steps, 0, kMaxInt);
  v.Field("min_lr_ratio", c.min_lr_ratio, 0.0, 1.0);
  v.Field("clip_low", c.clip_low, 0.0, 1.0);
  v.Field("clip_high", c.clip_high, 0.0, 100.0);
  v.Field("beta", c.beta, 0.0, 100.0);
  v.Field("ref_reset_every", c.ref_reset_every, 0, kMaxInt);
  v.Field("loss_aggregation", c.loss_aggregation, {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"});
  v.Field("advantage_scale", c.advantage_scale, {"group", "batch", "none"});
  v.Field("std_eps", c.std_eps, 0.0, 1.0);
  v.Field("ratio", c.ratio, {"token", "sequence"});
  v.Field("max_staleness", c.max_staleness, 0, 1000);
  v.Field("dynamic_sampling", c.dynamic_sampling);
  v.Field("overlong_filter", c.overlong_filter);
  v.Field("max_new_tokens", c.max_new_tokens, 1, 1 << 20);
  v.Field("temperature", c.temperature, 1e-3, 10.0);
  v.Field("top_p", c.top_p, 1e-6, 1.0);
  v.Field("top_k", c.top_k, 0, 1 << 24);
  v.Field("micro_batch_tokens", c.micro_batch_tokens, 1, kMaxInt);
  v.Field("grad_clip", c.grad_clip, 0.0, 1e9);
  v.Field("weight_decay", c.weight_decay, 0.0, 10.0);
  v.Field("adam_beta1", c.adam_beta1, 0.0, 0.999999);
  v.Field("adam_beta2", c.adam_beta2, 0.0, 0.999999999);
  v.Field("adam_eps", c.adam_eps, 0.0, 1.0);
  v.Field("eval_every", c.eval_every, 0, kMaxInt);
  v.Field("weight_sync", c.weight_sync, {"auto", "nccl", "zmq"});
}
template <typename V> void Visit(V& v, RewardConfig& c) {
  v.Required("name");
  v.Field("name", c.name, {"format", "format_graded", "accuracy", "math", "countdown", "arith", "language",
                           "code", "overlong", "length", "repetition"});
  v.Field("weight", c.weight, -1000.0, 1000.0);
  v.Field("params", c.params);
}
template <typename V> void Visit(V& v, ActorSpec& c) {
  v.Field("device", c.device);
  v.Field("max_batch", c.max_batch, 0, 1 << 16);
}
template <typename V> void Visit(V& v, TopologyConfig& c) {
  v.List("actors", c.actors);
  v.Field("learner_devices", c.learner_devices);
  v.Field("reward_workers", c.reward_workers, 1, 4096);
  v.Field("host", c.host);
  v.Field("peak_tflops", c.peak_tflops, 0.0, 1e6);
}
template <typename V> void Visit(V& v, PortsConfig& c) { v.Field("base", c.base, 0, 65000); }
template <typename V> void Visit(V& v, CheckpointConfig& c) {
  v.Field("every", c.every, 0, kMaxInt);
  v.Field("keep", c.keep, 1, 100000);
}
template <typename V> void Visit(V& v, ReplayConfig& c) {
  v.Field("durability", c.durability, {"sync", "buffered"});
  v.Field("lease_timeout_s", c.lease_timeout_s, 0.1, 1e7);
  v.Field("retention_steps", c.retention_steps, -1, kMaxInt);  // -1 keeps consumed groups (export)
  v.Field("max_inflight_groups", c.max_inflight_groups, 0, kMaxInt);
  v.Field("poll_ms", c.poll_ms, 1, 10000);
}
template <typename V> void Visit(V& v, JobConfig& c) {
  v.Field("name", c.name);
  v.Field("seed", c.seed, 0, kMaxInt);
  v.Section("model", c.model);
  v.Section("data", c.data);
  v.Required("stages");
  v.Field("stages", c.stages, {"sft", "sample", "grpo"});
  v.Section("sft", c.sft);
  v.Section("sample", c.sample);
  v.Section("grpo", c.grpo);
  v.List("rewards", c.rewards);
  v.Section("topology", c.topology);
  v.Section("ports", c.ports);
  v.Section("checkpoint", c.checkpoint);
  v.Section("replay", c.replay);
}

bool Has(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// Rules that span several keys.
void CheckCrossFields(const JobConfig& c, Origin* o) {
  if (c.stages.empty()) o->Fail("stages", nullptr, "must name at least one of sft, sample, grpo");
  std::set<std::string> uniq(c.stages.begin(), c.stages.end());
  if (uniq.size() != c.stages.size()) o->Fail("stages", nullptr, "a stage is listed twice");
  bool has_path = !c.model.path.empty(), has_init = !c.model.init.arch.empty();
  if (has_path == has_init) o->Fail("model", nullptr, "set exactly one of model.path or model.init.arch");
  if (has_init && c.model.init.preset.empty() && c.model.init.config.empty())
    o->Fail("model.init", nullptr, "set model.init.preset or model.init.config");
  if ((Has(c.stages, "grpo") || Has(c.stages, "sample")) && c.data.train.empty())
    o->Fail("data.train", nullptr, "required key is missing (the grpo and sample stages read it)");
  if (Has(c.stages, "sft") && c.sft.data.empty())
    o->Fail("sft.data", nullptr, "required key is missing (the sft stage reads it)");
  if (Has(c.stages, "sample") && c.sample.out.empty())
    o->Fail("sample.out", nullptr, "required key is missing (the sample stage writes it)");
  if ((Has(c.stages, "grpo") || Has(c.stages, "sample")) && c.rewards.empty())
    o->Fail("rewards", nullptr, "name at least one reward function");
  if (c.topology.actors.empty()) o->Fail("topology.actors", nullptr, "at least one actor is needed");
  if (c.topology.learner_devices.empty()) o->Fail("topology.learner_devices", nullptr, "at least one device is needed");
  static const std::regex device(R"(cpu|cuda:[0-9]+)");
  for (size_t i = 0; i < c.topology.actors.size(); ++i)
    if (!std::regex_match(c.topology.actors[i].device, device))
      o->Fail("topology.actors[" + std::to_string(i) + "].device", nullptr,
              "'" + c.topology.actors[i].device + "' is not cpu or cuda:N");
  for (const auto& d : c.topology.learner_devices)
    if (!std::regex_match(d, device)) o->Fail("topology.learner_devices", nullptr, "'" + d + "' is not cpu or cuda:N");
  {  // one data-parallel replica per GPU, all on GPUs or all on the CPU (learner/data_parallel.h)
    std::set<std::string> gpus;
    bool cpu = false;
    for (const auto& d : c.topology.learner_devices) {
      if (d == "cpu") cpu = true;
      else if (!gpus.insert(d).second) o->Fail("topology.learner_devices", nullptr, d + " is listed twice (one replica per GPU)");
    }
    if (cpu && !gpus.empty())
      o->Fail("topology.learner_devices", nullptr, "mixes cpu and cuda devices (replicas must be all cpu or all cuda)");
  }
  if (c.model.prompt_template != "r1-zero" && c.model.prompt_template != "plain" &&
      c.model.prompt_template != "qwen-chat" &&
      c.model.prompt_template.find("{prompt}") == std::string::npos)
    o->Fail("model.prompt_template", nullptr, "must be r1-zero, qwen-chat, plain, or a text containing {prompt}");
}

// Applies "a.b.c=value" to the tree; the value is parsed as YAML.
Status ApplyOverride(YAML::Node root, const std::string& arg, Origin* origin) {
  auto eq = arg.find('=');
  if (eq == std::string::npos || eq == 0) return InvalidArgument("--set " + arg + ": expected key.path=value");
  std::string path = arg.substr(0, eq), text = arg.substr(eq + 1);
  std::vector<std::string> parts;
  std::stringstream ss(path);
  for (std::string p; std::getline(ss, p, '.');) {
    if (p.empty()) return InvalidArgument("--set " + arg + ": empty key in '" + path + "'");
    parts.push_back(p);
  }
  YAML::Node value;
  try {
    value = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    return InvalidArgument("--set " + arg + ": " + e.msg);
  }
  YAML::Node node = root;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    if (!node[parts[i]].IsMap()) node[parts[i]] = YAML::Node(YAML::NodeType::Map);
    node.reset(node[parts[i]]);
  }
  node[parts.back()] = value;
  origin->overrides[path] = "--set " + arg;
  return OkStatus();
}

}  // namespace

Result<JobConfig> ParseJobConfig(const std::string& yaml_text, const std::string& origin_name,
                                 const std::vector<std::string>& overrides) {
  Origin origin;
  origin.name = origin_name;
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    return InvalidArgument(origin_name + ":" + std::to_string(e.mark.line + 1) + ":" +
                           std::to_string(e.mark.column + 1) + ": " + e.msg);
  }
  if (root.IsNull() || !root.IsDefined()) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) return InvalidArgument(origin_name + ": the job file must be a mapping of sections");
  for (const auto& o : overrides) RETURN_IF_ERROR(ApplyOverride(root, o, &origin));
  JobConfig config;
  Reader reader(root, "", &origin);
  Visit(reader, config);
  reader.Finish();
  if (origin.error.ok()) CheckCrossFields(config, &origin);
  if (!origin.error.ok()) return origin.error;
  return config;
}

Result<JobConfig> LoadJobConfig(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream f(path);
  if (!f) return NotFound(path + ": cannot open job file");
  std::stringstream s;
  s << f.rdbuf();
  return ParseJobConfig(s.str(), path, overrides);
}

std::string ToYaml(const JobConfig& config) {
  YAML::Emitter out;
  JobConfig copy = config;
  Writer w(out);
  out << YAML::BeginMap;
  Visit(w, copy);
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace aha
