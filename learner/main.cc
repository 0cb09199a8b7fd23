#include "learner/learner_daemon.h"

int main(int argc, char** argv) { return aha::RunLearnerDaemon(argc, argv); }
