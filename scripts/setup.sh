#!/usr/bin/env bash
# Install what a fresh machine lacks (cmake, libclang for bindgen, ccache), then fetch llama.cpp, the
# default model and the needle data. Safe to run again: every step is skipped when already done.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ccache >/dev/null || need+=(ccache)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} with apt-get"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$root/vendor/fetch.sh"
"$root/scripts/fetch-model.sh" smollm2 >/dev/null
"$root/scripts/fetch-data.sh" essays >/dev/null
"$root/scripts/fetch-data.sh" ruler >/dev/null
echo "setup: done"
