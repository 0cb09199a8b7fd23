// `aha eval` and `aha sample`: generate K completions per prompt of a dataset (docs/data.md) with
// the engine and score them with aha-rewardd's verifiers, in this process.
//
//   aha eval --model DIR --data FILE.jsonl [--samples K --temperature 0.6 --top-p 0.95]
//            [--max-new-tokens N] [--json] [--json-out FILE] [--config JOB.yaml]
//     pass@1 = mean correctness over the K samples of a prompt, averaged over prompts;
//     cons@K = correctness of the majority answer (extracted answers grouped by exact string after
//     the verifier's extraction), as in the R1 tables; both per task kind and overall, with the
//     mean completion length in tokens.
//   aha sample --model DIR --data FILE.jsonl --samples K --keep correct|all --out FILE.jsonl
//     rejection sampling: writes {"id","prompt","completion","reward","correct"} lines, the input
//     format of `aha sft`.
#pragma once

namespace aha {

int RunEvalCommand(int argc, char** argv);
int RunSampleCommand(int argc, char** argv);

}  // namespace aha
