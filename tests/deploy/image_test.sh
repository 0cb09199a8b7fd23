#!/usr/bin/env bash
# The container images for real (ctest label image): builds deploy/Dockerfile (`cpu`) or
# deploy/Dockerfile.cuda with this host's CUDA toolkit (`cuda`) with buildah, then, in a container
# of the image: every binary finds every library it loads (the GPU driver, which the NVIDIA
# container toolkit mounts at run time, excepted), `aha --help` runs, and the tiny job, shortened
# as slurm_test.sh shortens it (SFT on 800 solutions for one epoch, 4 GRPO steps, evaluation on 40
# questions), runs end to end under `aha run` with the image's binaries and configs; then
# check_run_dir.sh checks its run directory inside the container. Prints the wall times.
#   tests/deploy/image_test.sh cpu|cuda        (AHA_KEEP=1 keeps the image and the temp folder)
#
# Base images: debian:bookworm and debian:bookworm-slim from the local image store. Where the store
# lacks them (this machine and CI reach Debian's package mirror but no container registry), they
# are made from Debian's packages with mmdebstrap (a minimal bookworm) and stored under those
# names; with a registry, `buildah pull debian:bookworm debian:bookworm-slim` first uses the
# official ones. RUN steps use chroot isolation (BUILDAH_ISOLATION overrides it): this machine is
# itself a container, where the OCI runtime may not set the container's rlimits.
# Exit 77 (skipped) when not root (buildah's default store and chroot isolation need it), and for
# `cuda` on a host without nvcc. Wall time here (2 cores): cpu about 3 minutes, cuda about 4.5.
set -euo pipefail
[ $# -eq 1 ] && { [ "$1" = cpu ] || [ "$1" = cuda ]; } || { echo "usage: $0 cpu|cuda" >&2; exit 2; }
KIND=$1
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
started=$(date +%s)
say() { echo "image_test($KIND): $*"; }
if [ "$(id -u)" -ne 0 ]; then say "skipped: needs root (buildah's store and chroot isolation)"; exit 77; fi
for p in buildah mmdebstrap python3; do
  command -v "$p" >/dev/null || { say "$p not found: scripts/setup.sh installs buildah and mmdebstrap" >&2; exit 1; }
done
if [ "$KIND" = cuda ]; then
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  [ -x "$nvcc" ] || { say "skipped: no nvcc (the CUDA image builds with this host's CUDA toolkit)"; exit 77; }
  # The toolkit root is nvcc's own TOP, not the folder above the nvcc on PATH: that one may be a
  # wrapper script (CI's /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc).
  top=$( (cd /tmp && "$nvcc" -v __aha_no_input 2>&1 || true) | sed -n 's/^#\$ TOP=//p' | head -1)
  [ -n "$top" ] || { say "$nvcc -v printed no TOP= line: cannot tell the CUDA toolkit's root" >&2; exit 1; }
  CUDA_ROOT=$(readlink -f "$top")
  for f in bin/nvcc bin/nvcc.profile nvvm/libdevice include/cuda_runtime.h; do
    [ -e "$CUDA_ROOT/$f" ] || { say "the CUDA toolkit root $CUDA_ROOT (from $nvcc -v) lacks $f" >&2; exit 1; }
  done
fi
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
IMAGE=localhost/aha-image-test:$KIND-$$
T=$(mktemp -d /tmp/aha-image-test.XXXXXX)
CTR=""
cleanup() {
  local rc=$?
  [ -n "$CTR" ] && buildah rm "$CTR" > /dev/null 2>&1
  if [ -n "${AHA_KEEP:-}" ]; then
    say "kept $T and $IMAGE"
  else
    buildah rmi "$IMAGE" > /dev/null 2>&1 || true
    rm -rf "$T"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# The base images, made once per store (one minimal bookworm under both names).
made=""
for tag in bookworm bookworm-slim; do
  ref=docker.io/library/debian:$tag
  buildah inspect --type image "$ref" > /dev/null 2>&1 && continue
  if [ -n "$made" ]; then buildah tag "$made" "$ref"; continue; fi
  say "no $ref in the image store: making a minimal bookworm with mmdebstrap"
  mmdebstrap --quiet --variant=minbase --format=tar bookworm "$T/bookworm.tar" http://deb.debian.org/debian
  base=$(buildah from scratch)
  buildah add --quiet "$base" "$T/bookworm.tar" / > /dev/null
  buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$base"
  buildah commit --quiet --rm "$base" "$ref" > /dev/null
  rm "$T/bookworm.tar"
  made=$ref
done

# The image, from the sources only (the Dockerfile's ignore file keeps build trees out).
built=$(date +%s)
file=deploy/Dockerfile
args=()
if [ "$KIND" = cuda ]; then
  file=deploy/Dockerfile.cuda
  args=(--build-context "cuda=$CUDA_ROOT")
fi
args+=(--network=host --pull=never --layers=false -f "$file" --ignorefile "$file.dockerignore")
(cd "$ROOT" && buildah bud --quiet "${args[@]}" -t "$IMAGE" .) > "$T/build.log" 2>&1 ||
  { tail -n 40 "$T/build.log"; say "the image did not build"; exit 1; }
say "built $IMAGE in $(( $(date +%s) - built )) s ($(buildah images --format '{{.Size}}' "$IMAGE"))"

CTR=$(buildah from --pull-never "$IMAGE")
in_image() { buildah run --network=host "$CTR" -- "$@"; }

# Every binary finds its libraries: the CPU image's from Debian's packages, the CUDA image's from
# /opt/aha/lib (dist/, the wrappers' LD_LIBRARY_PATH) with cuBLAS(Lt), which the engine opens with
# dlopen, beside them.
if [ "$KIND" = cpu ]; then
  bins=(/usr/local/bin/aha /usr/local/bin/aha-replay /usr/local/bin/aha-rewardd /usr/local/bin/aha-actor
        /usr/local/bin/aha-learner)
  missing=$(in_image sh -c "ldd ${bins[*]} | grep 'not found' || true")
else
  bins=(/opt/aha/libexec/aha /opt/aha/libexec/aha-replay /opt/aha/libexec/aha-rewardd /opt/aha/libexec/aha-actor
        /opt/aha/libexec/aha-learner)
  missing=$(in_image sh -c \
    "LD_LIBRARY_PATH=/opt/aha/lib ldd ${bins[*]} | grep 'not found' | grep -v 'libcuda\\.so' || true")
  in_image sh -c 'cd /opt/aha/lib && ls libcublas.so.* libcublasLt.so.* libcudart.so.* libnccl.so.*' \
    > /dev/null ||
    { say "the CUDA image lacks the toolkit's runtime libraries"; exit 1; }
fi
[ -z "$missing" ] || { say "libraries not found in the image:"; echo "$missing"; exit 1; }
for b in "${bins[@]}"; do
  in_image sh -c "ldd $b" > /dev/null || { say "$b is not a dynamic executable of this image"; exit 1; }
done
in_image aha --help | grep -q "^usage: aha" || { say "aha --help printed no usage"; exit 1; }
# Asked for a GPU, the CPU image's aha says it has no CUDA backend; the CUDA image's has one and,
# on this machine without a GPU (or in a container started without one), says the device is missing.
want="this build of aha has no CUDA backend"
[ "$KIND" = cuda ] && want="cuda:0: no CUDA device"
out=$(in_image sh -c "echo '{\"tokens\": [[1]]}' | aha logprobs --model /nonexistent --device cuda:0" 2>&1 || true)
echo "$out" | grep -qF "$want" || { say "aha logprobs --device cuda:0 said '$out', want '$want'"; exit 1; }

# The tiny job, shortened, with the image's binaries and the configs it ships at /opt/aha/configs.
read -r AHA_BASE < <(python3 "$ROOT/tests/deploy/free_ports.py" 18)
head -n 800 "$ROOT/configs/data/arith-sft.jsonl" > "$T/sft.jsonl"
head -n 40 "$ROOT/configs/data/arith-eval.jsonl" > "$T/eval.jsonl"
buildah copy --quiet "$CTR" "$T/sft.jsonl" "$T/eval.jsonl" "$ROOT/tests/deploy/check_run_dir.sh" /tmp/job/ > /dev/null
job=$(date +%s)
in_image aha run /opt/aha/configs/tiny-cpu.yaml --run-dir /tmp/job/run --set ports.base="$AHA_BASE" \
  --set sft.data=/tmp/job/sft.jsonl --set sft.epochs=1 --set data.eval=/tmp/job/eval.jsonl \
  --set grpo.steps=4 --set checkpoint.every=3 > "$T/job.log" 2>&1 ||
  { tail -n 30 "$T/job.log"; in_image sh -c 'tail -n 15 /tmp/job/run/logs/*.log' || true
    say "the job failed"; exit 1; }
in_image bash /tmp/job/check_run_dir.sh /tmp/job/run 4
say "passed: the image builds, its binaries load, the tiny job ran in it in $(( $(date +%s) - job )) s;" \
    "wall time $(( $(date +%s) - started )) s"
