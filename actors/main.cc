#include "actors/actor_daemon.h"

int main(int argc, char** argv) { return aha::RunActorDaemon(argc, argv); }
