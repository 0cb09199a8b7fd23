#include "orchestrator/sft_command.h"

#include <cstdio>

#include "common/config.h"
#include "common/flags.h"
#include "engine/backends.h"
#include "learner/sft.h"

namespace aha {

int RunSftCommand(int argc, char** argv) {
  std::string model, data, out, config;
  int64_t epochs = -1, batch = -1, seed = 1234;
  double lr = -1;
  FlagSet flags("aha sft", "Supervised fine-tuning on prompt/completion JSONL (cold start, distillation).");
  flags.String("model", &model, "starting model directory (required)");
  flags.String("data", &data, "JSONL of {\"prompt\", \"completion\"} (required)");
  flags.String("out", &out, "output model directory (required)");
  flags.String("config", &config, "job file: its sft section and prompt template");
  flags.Int("epochs", &epochs, "passes over the data (default: the job's sft.epochs, else 1)");
  flags.Int("batch", &batch, "sequences per step (default: the job's sft.batch_sequences, else 16)");
  flags.Double("lr", &lr, "learning rate (default: the job's sft.lr, else 1e-4)");
  flags.Int("seed", &seed, "shuffle seed");
  std::string device = "cpu";
  flags.String("device", &device, "cpu, cuda or cuda:N (default: the job's topology.learner_devices[0], else cpu)");
  ParseOrExit(flags, argc, argv);
  const std::string prog = "aha sft";
  if (model.empty() || data.empty() || out.empty()) return Fail(prog, "--model, --data and --out are required", 2);
  SftOptions o;
  if (!config.empty()) {
    auto job = LoadJobConfig(config);
    if (!job.ok()) return Fail(prog, job.status().message(), 2);
    o.sft = job->sft;
    o.prompt_template = job->model.prompt_template;
    o.seed = static_cast<uint64_t>(job->seed);
    if (!flags.was_set("device") && !job->topology.learner_devices.empty()) device = job->topology.learner_devices[0];
  }
  if (epochs > 0) o.sft.epochs = epochs;
  if (batch > 0) o.sft.batch_sequences = batch;
  if (lr > 0) o.sft.lr = lr;
  if (flags.was_set("seed")) o.seed = static_cast<uint64_t>(seed);
  o.model_dir = model;
  o.out_dir = out;
  auto examples = LoadSftData(data, model, o.prompt_template);
  if (!examples.ok()) return Fail(prog, examples.status().message());
  o.on_step = [](int64_t step, int64_t total, double loss) {
    if (step == 1 || step % 10 == 0 || step == total) std::printf("sft step %lld/%lld loss %.4f\n", (long long)step, (long long)total, loss);
    std::fflush(stdout);
  };
  auto backend = engine::MakeBackend(device);
  if (!backend.ok()) return Fail(prog, backend.status().message(), 2);
  auto loss = RunSft(o, *examples, backend->get());
  if (!loss.ok()) return Fail(prog, loss.status().message());
  std::printf("sft: %zu examples, %lld epoch(s), last-epoch loss %.4f -> %s\n", examples->size(),
              (long long)o.sft.epochs, *loss, out.c_str());
  return 0;
}

}  // namespace aha
