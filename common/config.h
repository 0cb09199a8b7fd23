// Job configuration: one YAML file describes a job (shared/DESIGN.md §6).
//
// LoadJobConfig() reads the file into typed structs. Every problem is an InvalidArgument whose
// message names the place and the key path, one line:
//   job.yaml:12:3: grpo.clip_low: expected a number, got 'abc'
//   job.yaml:4:1: grpo.gruop_size: unknown key (known: steps, group_size, ...)
//   job.yaml: data.train: required key is missing
//   job.yaml:7:9: grpo.beta: -1 is out of range [0, 100]
//   --set grpo.steps=x: grpo.steps: expected an integer, got 'x'
// `--set a.b=c` overrides are applied to the YAML tree before it is typed, so they are checked
// exactly like the file. ToYaml() prints the resolved config (every key, defaults included), and
// loading that output gives the same config back.
//
// The schema is written once, as Visit() functions in config.cc, and drives reading, checking
// and printing alike.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/status.h"

namespace aha {

struct ModelInitConfig {
  std::string arch;    // qwen2|qwen3|llama ("" = not initialising from scratch)
  std::string preset;  // tiny|small|0.5b|... (engine presets)
  std::string config;  // a config.json to initialise from, instead of a preset
};

struct ModelConfig {
  std::string path;              // Hugging Face model directory to start from
  ModelInitConfig init;          // or: a model initialised from scratch
  std::string tokenizer = "byte";  // "byte", or a tokenizer.json / directory
  std::string dtype = "f32";     // f32|bf16 (actors' weight dtype; the learner keeps f32 masters)
  std::string prompt_template = "r1-zero";  // built-in name, or text containing {prompt}
};

struct DataConfig {
  std::string train;             // prompt dataset, JSONL (docs/data.md)
  std::string eval;              // held-out prompts for `aha eval` and the report
  bool shuffle = true;
  int64_t epochs = 1;
  bool skip_bad = false;         // skip malformed dataset lines (counted) instead of failing
};

struct SftConfig {
  std::string data;              // prompt/completion JSONL
  int64_t epochs = 1;
  double lr = 1e-4;
  int64_t batch_sequences = 16;
  int64_t warmup_steps = 0;
};

struct SampleConfig {
  int64_t samples = 4;           // K completions per prompt
  std::string keep = "correct";  // correct|all
  std::string out;               // JSONL written
  double temperature = 1.0;
};

struct GrpoConfig {
  int64_t steps = 100;
  int64_t group_size = 8;        // G
  int64_t prompts_per_step = 8;
  double lr = 1e-6;
  std::string lr_schedule = "constant";  // constant|warmup|cosine
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.1;     // cosine floor
  double clip_low = 0.2;
  double clip_high = 0.28;
  double beta = 0.0;             // k3 KL coefficient; 0 skips the reference model entirely
  int64_t ref_reset_every = 0;
  std::string loss_aggregation = "token-mean";  // token-mean|seq-mean-token-mean|seq-mean-token-sum-norm
  std::string advantage_scale = "group";        // group|batch|none
  double std_eps = 1e-6;
  std::string ratio = "token";   // token|sequence (GSPO)
  int64_t max_staleness = 1;
  bool dynamic_sampling = false;
  bool overlong_filter = false;
  int64_t max_new_tokens = 256;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;             // 0 = off
  int64_t micro_batch_tokens = 4096;
  double grad_clip = 1.0;
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  int64_t eval_every = 0;
  // How the learner sends weights to the actors: nccl (bf16 ncclBroadcast to the actors on GPUs,
  // ZeroMQ for any other), zmq (every actor pulls f32 over ZeroMQ), or auto (nccl when the
  // learner and every actor of the topology are on CUDA devices and the build has NCCL).
  std::string weight_sync = "auto";
};

struct RewardConfig {
  std::string name;              // format|format_graded|accuracy|math|countdown|arith|language|code|overlong|length|repetition
  double weight = 1.0;
  std::map<std::string, std::string> params;  // function-specific scalars
};

struct ActorSpec {
  std::string device = "cpu";    // cpu | cuda:N
  int64_t max_batch = 0;         // sequences decoded together; 0 = 256 on a GPU, 32 on the CPU
};

struct TopologyConfig {
  std::vector<ActorSpec> actors = {ActorSpec{}};
  std::vector<std::string> learner_devices = {"cpu"};
  int64_t reward_workers = 2;
  std::string host = "127.0.0.1";  // address every socket binds to
  double peak_tflops = 0;        // the learner device's peak (e.g. 785, the bf16 GEMM rate measured on an H200), for MFU; 0 = not reported
};

struct PortsConfig {
  int64_t base = 0;              // 0 = pick free ports; else replay base, rewardd base+10, ...
};

struct CheckpointConfig {
  int64_t every = 0;             // steps; 0 = only at the end
  int64_t keep = 3;
};

struct ReplayConfig {
  std::string durability = "sync";  // sync|buffered
  double lease_timeout_s = 120;
  int64_t retention_steps = 10;     // -1 keeps consumed groups forever (for export)
  int64_t max_inflight_groups = 0;  // 0 = (max_staleness + 1) * prompts_per_step
  int64_t poll_ms = 5;              // retry hint to actors and learner while groups are on their way
};

struct JobConfig {
  std::string name = "aha-job";
  int64_t seed = 1234;
  ModelConfig model;
  DataConfig data;
  std::vector<std::string> stages;  // sft|sample|grpo, in order
  SftConfig sft;
  SampleConfig sample;
  GrpoConfig grpo;
  std::vector<RewardConfig> rewards;
  TopologyConfig topology;
  PortsConfig ports;
  CheckpointConfig checkpoint;
  ReplayConfig replay;
};

// Reads `path`, applies `overrides` ("a.b=c", YAML values), checks everything.
Result<JobConfig> LoadJobConfig(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from text; `origin` names it in errors.
Result<JobConfig> ParseJobConfig(const std::string& yaml_text, const std::string& origin,
                                 const std::vector<std::string>& overrides = {});
// The resolved config as YAML (every key).
std::string ToYaml(const JobConfig& config);

}  // namespace aha
