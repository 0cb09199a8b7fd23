#include "orchestrator/eval_command.h"

#include <cstdio>
#include <fstream>
#include <map>

#include <capnp/message.h>
#include <nlohmann/json.hpp>

#include "common/config.h"
#include "common/flags.h"
#include "engine/backends.h"
#include "engine/generate.h"
#include "engine/tokenizer/prompt_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "replay/dataset.h"
#include "rewardd/rewards.h"

namespace aha {
namespace {

struct EvalTask {
  std::string id, kind, prompt;
  rewardd::TaskSpec spec;
};

const char* KindName(proto::TaskKind k) {
  switch (k) {
    case proto::TaskKind::MATH: return "math";
    case proto::TaskKind::COUNTDOWN: return "countdown";
    case proto::TaskKind::ARITH: return "arith";
    case proto::TaskKind::CODE: return "code";
    default: return "other";
  }
}

Result<std::vector<EvalTask>> ReadTasks(const std::string& path) {
  std::vector<EvalTask> tasks;
  replay::DatasetReadReport report;
  RETURN_IF_ERROR(replay::ReadDatasetJsonl(path, {}, [&](uint64_t, proto::Task::Reader t) {
    EvalTask e;
    e.id = t.getId();
    e.kind = KindName(t.getKind());
    e.prompt = t.getPrompt();
    e.spec.kind = e.kind;
    e.spec.answer = t.getAnswer();
    for (auto n : t.getNumbers()) e.spec.numbers.push_back(n);
    e.spec.target = t.getTarget();
    for (auto c : t.getTests()) e.spec.tests.push_back({c.getStdin(), c.getExpectedStdout()});
    if (t.getLanguage().size()) e.spec.language = t.getLanguage();
    tasks.push_back(std::move(e));
    return OkStatus();
  }, &report));
  if (tasks.empty()) return InvalidArgument(path + ": no tasks");
  return tasks;
}

struct Sampled {
  std::string text;
  size_t tokens = 0;
  bool truncated = false;
};

struct SampleSettings {
  std::string model_dir, prompt_template = "r1-zero", device = "cpu";
  int64_t samples = 1, max_new_tokens = 256, seed = 1;
  double temperature = 1.0, top_p = 1.0;
};

Result<std::vector<std::vector<Sampled>>> SampleAll(const SampleSettings& s, const std::vector<EvalTask>& tasks) {
  ASSIGN_OR_RETURN(auto backend, engine::MakeBackend(s.device));
  ASSIGN_OR_RETURN(auto model, engine::Transformer::Load(s.model_dir, backend.get()));
  ASSIGN_OR_RETURN(auto tok, tokenizer::Tokenizer::Load(s.model_dir));
  ASSIGN_OR_RETURN(auto tmpl, tokenizer::PromptTemplate::Parse(s.prompt_template));
  std::vector<int32_t> stop_ids;
  if (tok->eos_id() >= 0) stop_ids.push_back(tok->eos_id());
  for (int id : model->config().eos_token_ids) stop_ids.push_back(id);
  std::vector<engine::GenerationRequest> reqs;
  size_t max_prompt = 0;
  for (size_t i = 0; i < tasks.size(); ++i) {
    std::string rendered = tmpl.Render(tasks[i].prompt);
    auto prompt = tok->Encode(rendered, false);
    // The R1-Zero output format: a prompt that asks for <answer> tags ends at the closing tag.
    std::vector<std::string> stop_strings;
    if (rendered.find("<answer>") != std::string::npos) stop_strings.push_back("</answer>");
    max_prompt = std::max(max_prompt, prompt.size());
    for (int64_t k = 0; k < s.samples; ++k) {
      engine::GenerationRequest r;
      r.prompt = prompt;
      r.sampling.temperature = static_cast<float>(s.temperature);
      r.sampling.top_p = static_cast<float>(s.top_p);
      r.seed = static_cast<uint64_t>(s.seed) * 1000003ull + i * 7919ull + static_cast<uint64_t>(k);
      r.max_new_tokens = static_cast<int>(s.max_new_tokens);
      r.stop_token_ids = stop_ids;
      r.stop_strings = stop_strings;
      reqs.push_back(std::move(r));
    }
  }
  engine::Generator gen(model.get(), 64, static_cast<int>(max_prompt + s.max_new_tokens));
  auto detok = [&](const std::vector<int32_t>& ids) { return tok->Decode(ids, true); };
  ASSIGN_OR_RETURN(auto results, gen.Generate(reqs, detok));
  std::vector<std::vector<Sampled>> out(tasks.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    Sampled x;
    x.text = detok(results[i].tokens);
    x.tokens = results[i].tokens.size();
    x.truncated = results[i].finish == engine::FinishReason::kLength;
    out[i / static_cast<size_t>(s.samples)].push_back(std::move(x));
  }
  return out;
}

void AddCommonFlags(FlagSet& flags, SampleSettings* s, std::string* data, std::string* config) {
  flags.String("model", &s->model_dir, "model directory (required)");
  flags.String("data", data, "dataset JSONL, docs/data.md (required)");
  flags.Int("samples", &s->samples, "completions per prompt");
  flags.Double("temperature", &s->temperature, "sampling temperature");
  flags.Double("top-p", &s->top_p, "nucleus sampling threshold");
  flags.Int("max-new-tokens", &s->max_new_tokens, "completion length cap (default: the job's grpo.max_new_tokens, else 256)");
  flags.Int("seed", &s->seed, "sampling seed");
  flags.String("config", config, "job file: prompt template and defaults");
  flags.String("device", &s->device, "cpu, cuda or cuda:N (default: the job's topology.learner_devices[0], else cpu)");
}

Status ApplyJob(const std::string& config, FlagSet& flags, SampleSettings* s) {
  if (config.empty()) return OkStatus();
  ASSIGN_OR_RETURN(auto job, LoadJobConfig(config));
  s->prompt_template = job.model.prompt_template;
  if (!flags.was_set("max-new-tokens")) s->max_new_tokens = job.grpo.max_new_tokens;
  if (!flags.was_set("device") && !job.topology.learner_devices.empty()) s->device = job.topology.learner_devices[0];
  return OkStatus();
}

}  // namespace

int RunEvalCommand(int argc, char** argv) {
  SampleSettings s;
  s.temperature = 0.6;
  s.top_p = 0.95;
  s.samples = 4;
  std::string data, config, json_out;
  bool json = false;
  FlagSet flags("aha eval", "pass@1 and cons@K of a model on a dataset, per task kind.");
  AddCommonFlags(flags, &s, &data, &config);
  flags.Bool("json", &json, "print JSON instead of a table");
  flags.String("json-out", &json_out, "also write the JSON to this file");
  ParseOrExit(flags, argc, argv);
  const std::string prog = "aha eval";
  if (s.model_dir.empty() || data.empty()) return Fail(prog, "--model and --data are required", 2);
  if (s.samples < 1) return Fail(prog, "--samples must be >= 1", 2);
  if (Status st = ApplyJob(config, flags, &s); !st.ok()) return Fail(prog, st.message(), 2);
  auto tasks = ReadTasks(data);
  if (!tasks.ok()) return Fail(prog, tasks.status().message());
  auto scorer = rewardd::Scorer::Create(*rewardd::RewardConfig::Parse("accuracy=1"), nullptr);
  if (!scorer.ok()) return Fail(prog, scorer.status().message());
  auto sampled = SampleAll(s, *tasks);
  if (!sampled.ok()) return Fail(prog, sampled.status().message());

  struct Acc {
    double pass = 0, cons = 0, length = 0;
    int n = 0;
  };
  std::map<std::string, Acc> by_kind;
  for (size_t i = 0; i < tasks->size(); ++i) {
    const auto& t = (*tasks)[i];
    double correct = 0, length = 0;
    std::map<std::string, std::pair<int, bool>> votes;  // extracted answer -> (count, correct)
    for (const auto& x : (*sampled)[i]) {
      auto rep = (*scorer)->Score(t.spec, {x.text, static_cast<int64_t>(x.tokens), x.truncated});
      correct += rep.correct;
      length += static_cast<double>(x.tokens);
      if (!rep.answer_extracted.empty()) {
        auto& v = votes[rep.answer_extracted];
        v.first++;
        v.second = v.second || rep.correct;
      }
    }
    bool cons = false;
    int best = 0;
    for (const auto& [ans, v] : votes)
      if (v.first > best) best = v.first, cons = v.second;  // ties: the first answer in order
    for (const std::string& key : {t.kind, std::string("all")}) {
      Acc& a = by_kind[key];
      a.pass += correct / static_cast<double>(s.samples);
      a.cons += cons;
      a.length += length / static_cast<double>(s.samples);
      a.n++;
    }
  }
  nlohmann::json j = {{"model", s.model_dir}, {"data", data}, {"samples", s.samples},
                      {"temperature", s.temperature}, {"top_p", s.top_p}, {"kinds", nlohmann::json::object()}};
  for (const auto& [k, a] : by_kind)
    j["kinds"][k] = {{"prompts", a.n}, {"pass@1", a.pass / a.n}, {"cons@k", a.cons / a.n}, {"mean_length", a.length / a.n}};
  if (!json_out.empty()) std::ofstream(json_out) << j.dump(2) << "\n";
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%-10s %8s %8s %8s %12s\n", "kind", "prompts", "pass@1", ("cons@" + std::to_string(s.samples)).c_str(), "mean length");
    for (const auto& [k, a] : by_kind)
      std::printf("%-10s %8d %8.3f %8.3f %12.1f\n", k.c_str(), a.n, a.pass / a.n, a.cons / a.n, a.length / a.n);
  }
  return 0;
}

int RunSampleCommand(int argc, char** argv) {
  SampleSettings s;
  s.samples = 4;
  std::string data, config, out, keep = "correct";
  FlagSet flags("aha sample", "Rejection sampling: K completions per prompt, keep what the verifiers accept.");
  AddCommonFlags(flags, &s, &data, &config);
  flags.String("keep", &keep, "correct|all");
  flags.String("out", &out, "JSONL to write (required)");
  ParseOrExit(flags, argc, argv);
  const std::string prog = "aha sample";
  if (s.model_dir.empty() || data.empty() || out.empty()) return Fail(prog, "--model, --data and --out are required", 2);
  if (keep != "correct" && keep != "all") return Fail(prog, "--keep must be correct or all", 2);
  if (Status st = ApplyJob(config, flags, &s); !st.ok()) return Fail(prog, st.message(), 2);
  auto tasks = ReadTasks(data);
  if (!tasks.ok()) return Fail(prog, tasks.status().message());
  auto scorer = rewardd::Scorer::Create(rewardd::RewardConfig::Default(), nullptr);
  if (!scorer.ok()) return Fail(prog, scorer.status().message());
  auto sampled = SampleAll(s, *tasks);
  if (!sampled.ok()) return Fail(prog, sampled.status().message());
  std::ofstream f(out);
  if (!f) return Fail(prog, "cannot write " + out);
  int kept = 0, total = 0;
  for (size_t i = 0; i < tasks->size(); ++i)
    for (const auto& x : (*sampled)[i]) {
      ++total;
      auto rep = (*scorer)->Score((*tasks)[i].spec, {x.text, static_cast<int64_t>(x.tokens), x.truncated});
      if (keep == "correct" && !rep.correct) continue;
      ++kept;
      f << nlohmann::json{{"id", (*tasks)[i].id}, {"prompt", (*tasks)[i].prompt}, {"completion", x.text},
                          {"reward", rep.total}, {"correct", rep.correct}}.dump() << "\n";
    }
  std::printf("kept %d of %d completions -> %s\n", kept, total, out.c_str());
  return 0;
}

}  // namespace aha
