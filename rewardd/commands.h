// `aha reward` and `aha data`: the reward functions and task generators from the command line.
//
//   aha reward --task KIND [--answer A] [--numbers 1,2,3 --target T] [--tests FILE]
//              [--language python|cpp] [--rewards accuracy=1,format=0.1] [--tokens N] < completion
//     prints {"total": x, "components": {"accuracy": 1, ...}, "notes": {...},
//             "answer_extracted": "...", "correct": true} and exits 0; 2 with one line on bad flags.
//   aha data make countdown|arith --n N --seed S --out FILE.jsonl [difficulty flags]
#pragma once

namespace aha::rewardd {

int RunRewardCommand(int argc, char** argv);
int RunDataCommand(int argc, char** argv);

}  // namespace aha::rewardd
