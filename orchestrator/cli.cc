#include <cstring>
#include <iostream>
#include <string>

#include "common/flags.h"
#include "common/version.h"
#include "engine/commands.h"
#include "engine/tokenizer/tokenize_command.h"
#include "learner/bench_command.h"
#include "orchestrator/commands.h"
#include "orchestrator/control_commands.h"
#include "orchestrator/eval_command.h"
#include "orchestrator/render_command.h"
#include "orchestrator/report.h"
#include "orchestrator/run_command.h"
#include "orchestrator/sft_command.h"
#include "rewardd/commands.h"

namespace aha {

const std::vector<Command>& Commands() {
  static const std::vector<Command> commands = {
      {"run", "run a job: every stage and process, supervised, with a progress bar", &RunRunCommand},
      {"status", "state of every process of a run", &RunStatusCommand},
      {"stop", "stop a run", &RunStopCommand},
      {"pause", "pause every process of a run", &RunPauseCommand},
      {"resume", "resume a paused run", &RunResumeCommand},
      {"checkpoint", "checkpoint the learner and replay of a run now", &RunCheckpointCommand},
      {"eval", "pass@1 and cons@K of a model on a dataset", &RunEvalCommand},
      {"sft", "supervised fine-tuning on prompt/completion JSONL", &RunSftCommand},
      {"sample", "rejection sampling: keep the completions the verifiers accept", &RunSampleCommand},
      {"report", "plots and tables of a run directory", &RunReportCommand},
      {"render", "the job as Kubernetes manifests or a Slurm batch script", &RunRenderCommand},
      {"bench", "engine benchmarks: gen (tokens/s), train (GRPO step tokens/s, MFU), sync, gemm", &RunBenchCommand},
      {"init", "write a randomly initialised model directory", &RunInitCommand},
      {"logprobs", "per-token log-probs of token sequences (JSON on stdin)", &RunLogprobsCommand},
      {"generate", "sample completions of a prompt", &RunGenerateCommand},
      {"tokenize", "encode text to token ids or decode ids (tokenizer.json)", &tokenizer::RunTokenizeCommand},
      {"reward", "score one completion (stdin) with the rule rewards, JSON out", &rewardd::RunRewardCommand},
      {"data", "dataset tools: make countdown|arith synthetic datasets", &rewardd::RunDataCommand},
  };
  return commands;
}

namespace {

void PrintUsage() {
  std::cout << "usage: aha <command> [flags]   (aha <command> --help for its flags)\n\n"
               "aha trains reasoning language models with GRPO: actors sample groups of answers,\n"
               "rewardd scores them with rules, replay stores them, the learner trains.\n\ncommands:\n";
  for (const auto& c : Commands()) std::cout << "  " << c.name << std::string(12 - std::strlen(c.name), ' ') << c.summary << "\n";
}

}  // namespace

int RunAha(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage();
    return 2;
  }
  std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    PrintUsage();
    return 0;
  }
  if (name == "--version") {
    std::cout << "aha " << kAhaVersion << " (" << kAhaRevision << ")\n";
    return 0;
  }
  for (const auto& c : Commands()) {
    if (name == c.name) {
      std::string program = "aha " + name;
      std::vector<char*> args(argv + 1, argv + argc);
      args[0] = program.data();
      return c.run(static_cast<int>(args.size()), args.data());
    }
  }
  if (!name.empty() && name[0] == '-') return Fail("aha", "unknown flag '" + name + "' (see aha --help)", 2);
  return Fail("aha", "unknown command '" + name + "' (see aha --help)", 2);
}

}  // namespace aha
