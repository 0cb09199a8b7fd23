#!/usr/bin/env bash
# Runs the default test set with ctest and prints its summary. The labels soak and gpu are left out
# by default (gpu tests also skip themselves without a GPU); slurm (a one-node Slurm cluster on this
# host, about a minute) and image (the CPU and the CUDA container images built with buildah and the
# tiny job run in each, about 8 minutes) run, skipped without root. Pass ctest arguments to choose others, e.g.
# `./scripts/test.sh -L fault`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d build ] || { echo "test: no build/ (run ./scripts/setup.sh first)" >&2; exit 1; }
cmake --build build -j2
if [ $# -gt 0 ]; then
  exec ctest --test-dir build --output-on-failure "$@"
fi
exec ctest --test-dir build --output-on-failure -LE 'soak|gpu'
