// `aha sft --model DIR --data FILE.jsonl --out DIR [--config JOB.yaml] [--epochs N --lr X]`:
// supervised fine-tuning (cold start, distillation) with the engine (learner/sft.h).
#pragma once

namespace aha {

int RunSftCommand(int argc, char** argv);

}  // namespace aha
