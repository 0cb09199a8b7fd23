// `aha status|stop|pause|resume|checkpoint [--run-dir DIR]`: job control through the control
// socket of every process of a run (found in RUN_DIR/procs/*.ready).
#pragma once

namespace aha {

int RunStatusCommand(int argc, char** argv);
int RunStopCommand(int argc, char** argv);
int RunPauseCommand(int argc, char** argv);
int RunResumeCommand(int argc, char** argv);
int RunCheckpointCommand(int argc, char** argv);

}  // namespace aha
