// `aha run JOB.yaml [--run-dir DIR] [--set k=v ...]`: the whole job on this machine.
//
// Run directory layout:
//   config.yaml            the resolved job (every key)
//   logs/<role>.log        one log per process and per stage command
//   procs/<role>.ready     each daemon's ready file (pid, control socket, metrics address)
//   metrics/learner.jsonl  one line per GRPO step
//   models/                the initial model (model.init) and the SFT output
//   checkpoints/           learner checkpoints (checkpoints/latest -> the newest)
//   replay/                aha-replay's RocksDB
//   eval/                  `aha eval` results before and after GRPO (JSON)
//   report/index.html      plots and tables (`aha report RUN_DIR` rebuilds it)
// Stages run in the job's order: sft and sample as commands, grpo as supervised daemons.
#pragma once

namespace aha {

int RunRunCommand(int argc, char** argv);

}  // namespace aha
