#!/usr/bin/env bash
# Build the compresskv static library and the patched llama.cpp tools (CPU by default).
#
#   scripts/build-llama.sh                 llama-completion, llama-cli, llama-server, llama-bench
#   scripts/build-llama.sh --cuda          the same with -DGGML_CUDA=ON (CMAKE_CUDA_ARCHITECTURES from $CUDA_ARCH, default 90)
#   scripts/build-llama.sh --targets "a b" only these targets
#   scripts/build-llama.sh --off           upstream behaviour: LLAMA_COMPRESSKV=OFF (build dir vendor/build-off)
#
# Output: vendor/build/bin (vendor/build-cuda/bin with --cuda). Uses ccache when installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

cuda=0; off=0
targets="llama-completion llama-cli llama-server llama-bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1; shift ;;
    --off) off=1; shift ;;
    --targets) targets="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build-llama.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

command -v cmake >/dev/null || { echo "build-llama.sh: cmake not found (scripts/setup.sh installs it)" >&2; exit 1; }
vendor/fetch.sh

jobs=${JOBS:-$(nproc)}
flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
cflags=$(scripts/ggml-cflags.sh)  # AMX off: see there
flags+=(-DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags")
if [ $off = 1 ]; then
  build=vendor/build-off
  flags+=(-DLLAMA_COMPRESSKV=OFF)
else
  cargo build --release --lib --quiet
  build=vendor/build
  flags+=(-DLLAMA_COMPRESSKV=ON -DLLAMA_COMPRESSKV_DIR="$root" -DLLAMA_COMPRESSKV_LIB="$root/target/release/libcompresskv.a")
fi
if [ $cuda = 1 ]; then
  build="$build-cuda"
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}")
fi
cmake -S vendor/llama.cpp -B "$build" "${flags[@]}" >/dev/null
# shellcheck disable=SC2086
cmake --build "$build" -j "$jobs" --target $targets
echo "built: $(cd "$build/bin" && ls | tr '\n' ' ')"
