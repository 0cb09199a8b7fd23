#!/usr/bin/env bash
# Coverage-guided fuzzing with clang's libFuzzer: builds every fuzz target into build-fuzz/ with
# -fsanitize=fuzzer,address and runs each for SECONDS (default 60) from its seed corpus.
#   ./scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (scripts/setup.sh installs it)" >&2; exit 1; }
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DAHA_FUZZ=ON -DAHA_CUDA=OFF >/dev/null
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=($(ninja -C build-fuzz -t targets all | grep -oE '^fuzz_[a-z_]+' | sort -u))
fi
ninja -C build-fuzz -j2 envelope_seeds "${targets[@]}"
for t in "${targets[@]}"; do
  corpus=build-fuzz/corpus/$t
  mkdir -p "$corpus"
  [ "$t" = fuzz_envelope ] && cp build-fuzz/tests/fuzz/envelope_seeds/* "$corpus"/
  echo "fuzz: $t for ${seconds}s"
  mkdir -p build-fuzz/artifacts
  # Crashes and slow inputs land in build-fuzz/artifacts/ (not the checkout's root).
  build-fuzz/fuzz/"$t" -max_total_time="$seconds" -rss_limit_mb=2048 -artifact_prefix="build-fuzz/artifacts/$t-" "$corpus"
done
