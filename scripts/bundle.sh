#!/usr/bin/env bash
# Makes dist/: the binaries of build/bin plus the non-system shared libraries they link (found
# with ldd), and a wrapper per binary that sets LD_LIBRARY_PATH, so they run on a host that has
# only glibc, the CUDA driver and toolkit libraries, and NCCL (the GPU hosts provide those).
#   ./scripts/bundle.sh [BUILD_DIR] [EXTRA_BINARY...]   then: dist/bin/aha --help
# Left out on purpose: glibc and the loader, libstdc++/libgcc_s (every host has them), the CUDA
# driver (libcuda), and the libraries the GPU hosts ship: cudart, cuBLAS(Lt), NCCL, cuDNN.
# BUNDLE_CUDA=1 takes cudart, NCCL and cuBLAS(Lt) along too (about 800 MB), for a host or an image
# that has only the driver (deploy/Dockerfile.cuda); cuBLAS is opened with dlopen (gemm.cu), so ldd
# does not list it and it is copied from beside the cudart the binaries load.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
[ -d "$build/bin" ] || { echo "bundle: no $build/bin (run ./scripts/setup.sh first)" >&2; exit 1; }
rm -rf dist
mkdir -p dist/bin dist/lib dist/libexec

toolkit='|libcudart|libcublas|libcublasLt|libnccl|libcudnn'
[ "${BUNDLE_CUDA:-0}" = 1 ] && toolkit=''
skip="^(linux-vdso|ld-linux|libc\\.so|libm\\.so|libdl\\.so|libpthread\\.so|librt\\.so|libresolv\\.so|libstdc\\+\\+|libgcc_s|libcuda\\.so|libnvidia$toolkit)"
binaries=("$build"/bin/* "$@")
for bin in "${binaries[@]}"; do
  [ -f "$bin" ] && [ -x "$bin" ] || continue
  name=$(basename "$bin")
  cp "$bin" dist/libexec/"$name"
  strip --strip-debug dist/libexec/"$name"  # the device tool carries at most 64 MiB
  ldd "$bin" | awk '/=> \//{print $1" "$3}' | while read -r soname path; do
    if ! [[ $soname =~ $skip ]] && [ ! -e dist/lib/"$soname" ]; then
      cp -L "$path" dist/lib/"$soname"
    fi
  done
  cat > dist/bin/"$name" <<WRAP
#!/usr/bin/env bash
here=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")/.." && pwd)
export LD_LIBRARY_PATH="\$here/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$here/libexec/$name" "\$@"
WRAP
  chmod +x dist/bin/"$name"
done
if [ "${BUNDLE_CUDA:-0}" = 1 ]; then
  cudart=$(ldd "$build/bin/aha" | awk '/libcudart\.so\.[0-9]+ => \//{print $3; exit}')
  [ -n "$cudart" ] || { echo "bundle: BUNDLE_CUDA=1 but $build/bin/aha loads no libcudart (a CPU build?)" >&2; exit 1; }
  major=${cudart##*.so.}
  for lib in libcublas.so."$major" libcublasLt.so."$major"; do
    [ -e "$(dirname "$cudart")/$lib" ] || { echo "bundle: no $lib beside $cudart" >&2; exit 1; }
    cp -L "$(dirname "$cudart")/$lib" dist/lib/"$lib"
  done
fi
# Files named in BUNDLE_SHARE (space-separated) go to dist/share, e.g. the Qwen3 tokenizer that
# bench/gpu/scaling.sh initialises the 0.5B shape with.
if [ -n "${BUNDLE_SHARE:-}" ]; then
  mkdir -p dist/share
  for f in $BUNDLE_SHARE; do cp "$f" dist/share/; done
fi
# The device tool carries at most 64 MiB (OpenBLAS alone is 35 MB): BUNDLE_PACK=1 also writes
# dist.tar.xz (about 14 MB) to carry instead; unpack it there with `tar xJf dist.tar.xz`.
[ "${BUNDLE_PACK:-0}" = 1 ] && tar -cJf dist.tar.xz dist
echo "bundle: $(ls dist/bin | wc -l) binaries, $(ls dist/lib | wc -l) libraries, $(du -sh dist | cut -f1) in dist/"
