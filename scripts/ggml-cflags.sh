#!/usr/bin/env sh
# The C/C++ flags every build of vendor/llama.cpp passes (CMAKE_C_FLAGS and CMAKE_CXX_FLAGS): printed on stdout
# for scripts/build-llama.sh, scripts/fuzz.sh and build.rs, so that their compiler command lines agree (ccache
# serves one build's objects to the other).
#
# ggml's AMX matmul, which -march=native compiles in on CPUs with AMX (Intel Sapphire Rapids and later),
# segfaults on the first prompt at this llama.cpp commit, whatever the model or flags (upstream llama.cpp issue
# 20824, open). Where the compiler knows the flags (x86 gcc and clang) it is left out, and ggml's AVX-512 kernels
# run instead; on CPUs without AMX the flags change nothing. COMPRESSKV_GGML_AMX=1 keeps AMX.
amx_off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ "${COMPRESSKV_GGML_AMX:-0}" != 1 ] && echo 'int x;' | "${CC:-cc}" $amx_off -x c -c -o /dev/null - 2>/dev/null; then
  echo "$amx_off"
fi
