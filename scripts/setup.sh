#!/usr/bin/env bash
# Installs every Debian package aha needs (idempotent: apt-get runs only when something is
# missing, with one `apt-get update` first), then configures and builds into build/ with -j2.
#
#   ./scripts/setup.sh                 # packages + RelWithDebInfo build (CUDA when nvcc is found)
#   AHA_CMAKE_ARGS="-DAHA_CUDA=OFF" ./scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libzmq3-dev cppzmq-dev capnproto libcapnp-dev librocksdb-dev prometheus-cpp-dev
  libyaml-cpp-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libgtest-dev libgmock-dev
  libopenblas-dev libpcre2-dev libutf8proc-dev
  bubblewrap libseccomp-dev python3
  clang libclang-rt-14-dev
  nodejs curl
  slurmctld slurmd slurm-client munge shellcheck
  prometheus
  buildah mmdebstrap
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} Debian packages present"
fi

# npm comes with the machine's Node.js (its package, not Debian's npm, which conflicts with it);
# the tokenizer parity test installs its reference packages with it at test time.
command -v npm >/dev/null || echo "setup: warning: npm not found; the tokenizer parity test will fail" >&2

# The CI build turns warnings into errors; so does every setup build.
cmake -S . -B build -G Ninja -DAHA_WERROR=ON ${AHA_CMAKE_ARGS:-}
cmake --build build -j2
echo "setup: built $(ls build/bin | wc -l) binaries into build/bin"
