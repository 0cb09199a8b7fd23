// The engine's `aha` subcommands (listed in orchestrator/cli.cc):
//   aha init      --arch qwen2|qwen3|llama --preset tiny|0.5b|1.5b | --config FILE  --out DIR [--seed S]
//                 [--tokenizer tokenizer.json] [--dtype f32|bf16]
//   aha logprobs  --model DIR [--temperature T]  < {"tokens": [[...], ...]}
//   aha generate  --model DIR --prompt TEXT | --prompt-tokens 1,2,3 [--samples K --temperature T
//                 --top-p P --top-k K --max-new-tokens N --seed S --stop STR ...]
// Each returns the exit code (0 ok, 2 bad usage, 1 other failure) and prints failures as one line.
#pragma once

namespace aha {

int RunInitCommand(int argc, char** argv);
int RunLogprobsCommand(int argc, char** argv);
int RunGenerateCommand(int argc, char** argv);

}  // namespace aha
