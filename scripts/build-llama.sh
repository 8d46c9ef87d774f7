#!/usr/bin/env bash
# Build the compresskv static library, the patched llama.cpp tools (CPU by default) and this repository's
# own tools over llama.h (src/bin: llama-compresskv-calibrate, llama-compresskv-bench).
#
#   scripts/build-llama.sh                 llama-completion, llama-cli, llama-server, llama-bench, ggml-rpc-server
#                                          and the two compresskv tools (with the RPC backend, -DGGML_RPC=ON:
#                                          inert unless --rpc names servers)
#   scripts/build-llama.sh --cuda          the same with -DGGML_CUDA=ON (CMAKE_CUDA_ARCHITECTURES from $CUDA_ARCH, default 90)
#   scripts/build-llama.sh --targets "a b" only these targets
#   scripts/build-llama.sh --off           upstream behaviour: LLAMA_COMPRESSKV=OFF (build dir vendor/build-off;
#                                          the compresskv tools are not built)
#
# Output: vendor/build/bin (vendor/build-cuda/bin with --cuda). Uses ccache when installed.
# The compresskv tools are Rust binaries (`cargo build --release --features llama --bins`: build.rs builds
# its own libllama.a into target/release/llama.cpp and links them with it), built into target/release/ and
# copied into the bin directory above, where the callers that look for them beside llama-completion find
# them. With --cuda they are built with COMPRESSKV_LLAMA_CUDA=$CUDA_ARCH into target/cuda/release/ (their
# libllama.a then has the CUDA backend; needs the CUDA toolkit, as the cmake build does).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

cuda=0; off=0
targets="llama-completion llama-cli llama-server llama-bench ggml-rpc-server llama-compresskv-calibrate llama-compresskv-bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1; shift ;;
    --off) off=1; shift ;;
    --targets) targets="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-llama.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

# the Rust tools out of the cmake targets (llama.cpp's tree may still define C++ targets of the same names:
# never build those, they would overwrite the copies)
cmake_targets=""; rust_tools=""
for t in $targets; do
  case "$t" in
    llama-compresskv-calibrate|llama-compresskv-bench) rust_tools="$rust_tools $t" ;;
    *) cmake_targets="$cmake_targets $t" ;;
  esac
done
if [ $off = 1 ] && [ -n "$rust_tools" ]; then
  echo "build-llama.sh: --off builds no compresskv tool (skipping$rust_tools)" >&2
  rust_tools=""
fi

command -v cmake >/dev/null || { echo "build-llama.sh: cmake not found (scripts/setup.sh installs it)" >&2; exit 1; }
vendor/fetch.sh

jobs=${JOBS:-$(nproc)}
flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_RPC=ON)
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
if [ -n "$cmake_targets" ]; then
  # shellcheck disable=SC2086
  cmake --build "$build" -j "$jobs" --target $cmake_targets
fi
if [ -n "$rust_tools" ]; then
  bins=()
  for t in $rust_tools; do bins+=(--bin "$t"); done
  if [ $cuda = 1 ]; then
    out=target/cuda/release
    CARGO_TARGET_DIR=target/cuda COMPRESSKV_LLAMA_CUDA="${CUDA_ARCH:-90}" \
      cargo build --release --features llama "${bins[@]}"
  else
    out=target/release
    cargo build --release --features llama "${bins[@]}"
  fi
  mkdir -p "$build/bin"
  for t in $rust_tools; do
    # a copy, not a link: a later build of the other configuration must not change what this directory runs
    rm -f "$build/bin/$t"
    cp "$out/$t" "$build/bin/$t"
  done
fi
echo "built: $(cd "$build/bin" && ls | tr '\n' ' ')"
