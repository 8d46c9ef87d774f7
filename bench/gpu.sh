#!/usr/bin/env bash
# GPU speed runs and the CUDA compaction check, as one prepared script for a lent GPU machine (no registry
# access there, 64 MiB carried per call, minutes of device time in all).
#
#   bench/gpu.sh pack          here: target/gpu/ = the patched llama.cpp source (no docs, models, tests) as a
#                              tarball + the compresskv static library (debug info stripped), ~17 MB, + the
#                              crates the Rust tool needs (`cargo vendor`, target/gpu/crates.tar.gz, ~9 MB)
#   bench/gpu.sh run           there (the device tool; carry the packed files: target/gpu/llama-src.tar.gz,
#                              target/gpu/libcompresskv.a.gz, target/gpu/crates.tar.gz, target/gpu/commit, not
#                              target/gpu): unpack, build llama-compresskv-bench with CUDA, write the
#                              random-weight models (bench/random_gguf.py), run the exactness checks (--check
#                              and --paths on a 1B-shaped F16 model), then the speed grid on the 8B-shaped one; JSON results and logs go to $OUT (default target/gpu/out)
#   bench/gpu.sh collect DIR   here: copy DIR's JSON results to bench/results/ (then python3 bench/plot.py)
#
# What run needs on the GPU machine: cmake, python3, timeout, a C/C++ compiler and the CUDA toolkit (nvcc; not
# with CUDA=0), and for the tool itself either
#   - cargo and rustc (>= 1.80) and libclang (bindgen reads llama.h): llama-compresskv-bench is then this
#     repository's Rust tool (src/bin), built offline from target/gpu/crates.tar.gz with
#     `cargo build --release --features llama` and COMPRESSKV_LLAMA_CUDA=$CUDA_ARCH (build.rs builds its
#     libllama.a with the CUDA backend into target/gpu/cargo/release/llama.cpp-cuda), or
#   - without cargo: the C++ tool of llama.cpp's tools/compresskv-bench, while the packed source still has it
#     (patch 0005; being dropped), built with cmake as before. Without either, run stops before the build.
# Not yet run on a GPU machine in its Rust form (the cargo path above was written without a GPU to try it).
#
# Environment for run: CUDA_ARCH (default 90), DEPTHS (default 256,1024,2048,8192,32768,131072 first, then
# 4096,16384,65536: a deadline still leaves the whole range), BUDGETS (default 0,256,1024,2048), N_GEN, SHAPE (8b; tiny for a dry run),
# CUDA=0 (a CPU dry run of the same steps), DEVICE_NAME (the file suffix, default h200), DEADLINE (seconds
# after the start by which the speed grid stops so that its rows are copied out, default 560), TOOL=cpp
# (use the C++ tool even where cargo exists).
# Resumable on a machine that stays warm: the build, the model and the rows done are kept under target/gpu/
# (the speed tool skips the rows its JSON already holds), so run it again to go on.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cmd=${1:-}

case "$cmd" in
pack)
  scripts/build-llama.sh --targets llama-compresskv-bench >/dev/null
  mkdir -p target/gpu
  # the crates of Cargo.lock, for an offline `cargo build` there
  rm -rf target/gpu/crates
  cargo vendor --locked --quiet target/gpu/crates >/dev/null
  tar czf target/gpu/crates.tar.gz -C target/gpu crates
  rm -rf target/gpu/crates
  tar czf target/gpu/llama-src.tar.gz -C vendor --exclude=llama.cpp/.git --exclude=llama.cpp/docs \
      --exclude=llama.cpp/models --exclude=llama.cpp/tests --exclude=llama.cpp/benches \
      --exclude=llama.cpp/examples --exclude=llama.cpp/tools/server/public llama.cpp
  cp target/release/libcompresskv.a target/gpu/libcompresskv.a
  strip --strip-debug target/gpu/libcompresskv.a
  gzip -9 -f target/gpu/libcompresskv.a
  git rev-parse HEAD > target/gpu/commit
  du -bc target/gpu/llama-src.tar.gz target/gpu/libcompresskv.a.gz target/gpu/crates.tar.gz target/gpu/commit  # what travels
  ;;
run)
  out=${OUT:-target/gpu/out}
  mkdir -p "$out"
  exec > >(tee -a "$out/gpu.log") 2>&1
  t0=$(date +%s)
  stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
  for t in cmake python3 timeout; do  # fail before the build, not after it
    command -v $t >/dev/null || { echo "gpu.sh: $t not found on this machine" >&2; exit 1; }
  done
  if [ "${CUDA:-1}" = 1 ] && ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "gpu.sh: nvcc not found (CUDA toolkit); CUDA=0 runs on the CPU" >&2; exit 1
  fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi
  src=target/gpu/src
  packed=(target/gpu/llama-src.tar.gz target/gpu/libcompresskv.a.gz)
  [ -f target/gpu/crates.tar.gz ] && packed+=(target/gpu/crates.tar.gz)
  sum=$(cat "${packed[@]}" | sha256sum | cut -c1-16)
  if [ "$(cat "$src/.packed" 2>/dev/null)" != "$sum" ]; then  # a new pack: unpack again (the build dir stays)
    rm -rf "$src/llama.cpp" && mkdir -p "$src" && tar xzf target/gpu/llama-src.tar.gz -C "$src"
    gunzip -kf target/gpu/libcompresskv.a.gz
    if [ -f target/gpu/crates.tar.gz ]; then rm -rf target/gpu/crates && tar xzf target/gpu/crates.tar.gz -C target/gpu; fi
    echo "$sum" > "$src/.packed"
  fi
  # the Rust tool where cargo is (and the crates came along), else the C++ tool while the source has it
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$PATH:$HOME/.cargo/bin"
  tool=cpp
  if [ "${TOOL:-rust}" != cpp ] && command -v cargo >/dev/null && [ -d target/gpu/crates ]; then
    tool=rust
  elif [ ! -d "$src/llama.cpp/tools/compresskv-bench" ]; then
    echo "gpu.sh: no cargo here (or no target/gpu/crates.tar.gz carried), and the packed llama.cpp has no C++" \
         "llama-compresskv-bench: install cargo and rustc >= 1.80 (and libclang) on this machine" >&2
    exit 1
  fi
  stamp "tool: $tool"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt" || true
  build=$src/build
  flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
         -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF
         -DLLAMA_COMPRESSKV=ON -DLLAMA_COMPRESSKV_DIR="$root" -DLLAMA_COMPRESSKV_LIB="$root/target/gpu/libcompresskv.a")
  ngl=0
  if [ "${CUDA:-1}" = 1 ]; then
    flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}")
    ngl=99
  fi
  if [ $tool = rust ]; then
    # build.rs reads the patched source at vendor/llama.cpp, which is not carried: the unpacked one
    [ -e vendor/llama.cpp ] || ln -s "$root/$src/llama.cpp" vendor/llama.cpp
    cuda_env=()
    [ "${CUDA:-1}" = 1 ] && cuda_env=(COMPRESSKV_LLAMA_CUDA="${CUDA_ARCH:-90}")
    stamp "build (cargo)"
    env "${cuda_env[@]}" CARGO_TARGET_DIR=target/gpu/cargo cargo build --release --offline --features llama \
        --bin llama-compresskv-bench --config "source.crates-io.replace-with='vendored-sources'" \
        --config "source.vendored-sources.directory='$root/target/gpu/crates'" > "$out/build.log" 2>&1 \
      || { tail -40 "$out/build.log"; exit 1; }
    bin=target/gpu/cargo/release/llama-compresskv-bench
  else
    stamp "configure"
    cmake -S "$src/llama.cpp" -B "$build" "${flags[@]}" > "$out/cmake.log" 2>&1 || { tail -30 "$out/cmake.log"; exit 1; }
    stamp "build (cmake, the C++ tool)"
    cmake --build "$build" -j "$(nproc)" --target llama-compresskv-bench > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
    bin=$build/bin/llama-compresskv-bench
  fi
  shape=${SHAPE:-8b}
  model=${MODEL:-/tmp/compresskv-random-$shape.gguf}
  stamp "model ($shape)"
  [ -f "$model" ] || python3 bench/random_gguf.py --shape "$shape" -o "$model"
  dev=${DEVICE_NAME:-h200}
  [ "${CUDA:-1}" = 1 ] || dev=cpu-dry
  res=target/gpu/results
  mkdir -p "$res"
  quiet() { grep -v "^run: compresskv: no profile" || true; }
  check_rc=0
  # the exactness checks, on F16 weights with distinct data per tensor (a 1B shape: the layers differ and no
  # weight quantizes the activations). Criteria, fixed here before any run: --check, compacted logits within
  # 2e-3 of the masked reference with no greedy disagreement outside near ties, the full cache 100x further
  # (the control); --paths, per cache setting, the device scores within 1e-4 of the library's host scores, the
  # same cells, the same checksum of the compacted cells as the host-copy path, the same greedy tokens.
  cshape=${CHECK_SHAPE:-1b}
  cmodel=/tmp/compresskv-random-$cshape-f16.gguf
  stamp "check model ($cshape, F16)"
  [ -f "$cmodel" ] || python3 bench/random_gguf.py --shape "$cshape" --type f16 --scale 0.02 -o "$cmodel"
  if [ ! -f "$res/kvcheck-random-$cshape-f16-$dev.json" ]; then
    stamp "compaction check"
    # a failed check is reported (its JSON and the exit code) but does not cost the speed grid its device time
    "$bin" -m "$cmodel" --check -ngl $ngl -t "$(nproc)" -d 4096 -B 256,1024 -n 16 \
        -o "$res/kvcheck-random-$cshape-f16-$dev.json" 2>&1 | quiet || { check_rc=$?; stamp "compaction check FAILED"; }
  fi
  for cfg in "fa-on:-fa on" "fa-off:-fa off" "q8_0:-fa on -ctk q8_0 -ctv q8_0" "per-head:-fa on --per-head"; do
    f="$res/kvpaths-random-$cshape-f16-${cfg%%:*}-$dev.json"
    [ -f "$f" ] && continue
    stamp "device vs host paths (${cfg%%:*})"
    # shellcheck disable=SC2086
    "$bin" -m "$cmodel" --paths ${cfg#*:} -ngl $ngl -t "$(nproc)" -d 8192 -B 256,1024 -n 16 -o "$f" 2>&1 | quiet \
      || { check_rc=$?; stamp "paths ${cfg%%:*} FAILED"; }
  done
  left=$(( ${DEADLINE:-560} - ($(date +%s) - t0) ))
  stamp "speed grid ($left s left)"
  if [ $left -gt 10 ]; then
    timeout --signal=INT "$left" "$bin" -m "$model" -ngl $ngl -t "$(nproc)" -fa on -ub 2048 -n "${N_GEN:-128}" -r 2 \
        -d "${DEPTHS:-256,1024,2048,8192,32768,131072,4096,16384,65536}" -B "${BUDGETS:-0,256,1024,2048}" \
        -o "$res/kvspeed-random-$shape-$dev.json" 2>&1 | quiet || stamp "speed grid stopped (rc $?): its rows so far are kept"
  fi
  cp "$res"/*.json "$out"/
  stamp "done: $(ls "$out"/*.json | tr '\n' ' ')"
  exit $check_rc
  ;;
collect)
  dir=${2:?collect DIR}
  for f in "$dir"/kvspeed-*.json "$dir"/kvcheck-*.json "$dir"/kvpaths-*.json; do
    [ -f "$f" ] || continue
    python3 - "$f" "$(cat target/gpu/commit 2>/dev/null || git rev-parse HEAD)" "$dir/gpu.txt" <<'EOF'
import json, os, sys
d = json.load(open(sys.argv[1]))
d["commit"] = sys.argv[2]
# the machine, as the CPU runs record it: nvidia-smi's line (name, memory, driver) and the host CPU (the run's
# "threads" is already in d)
gpu = open(sys.argv[3]).read().strip() if os.path.exists(sys.argv[3]) else None
cpu = next((x["description"] for x in d.get("devices", []) if x["name"] == "CPU"), None)
d["machine"] = {"gpu": gpu, "host_cpu": cpu}
d["command"] = "bench/gpu.sh run (on the lent GPU machine; bench/gpu.sh pack here first)"
json.dump(d, open(os.path.join("bench/results", os.path.basename(sys.argv[1])), "w"), indent=1)
EOF
    echo "bench/results/$(basename "$f")"
  done
  ;;
*)
  sed -n '2,31p' "$0"; exit 2 ;;
esac
