// aha: the command-line front end (shared/DESIGN.md §5).
#include "orchestrator/commands.h"

int main(int argc, char** argv) { return aha::RunAha(argc, argv); }
