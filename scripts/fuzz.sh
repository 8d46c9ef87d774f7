#!/usr/bin/env bash
# Fuzzing of every C entry point of include/compresskv.h and of profile parsing (cargo-fuzz / libFuzzer,
# AddressSanitizer), and AddressSanitizer + UBSan on the C example. Not part of scripts/test.sh.
#
#   scripts/fuzz.sh [SECONDS]     build, run every target for SECONDS (default 60), one after the other, the
#                                 corpus in fuzz/corpus/<target>; then the C example under ASan + UBSan;
#                                 writes bench/results/fuzz.json (other targets' entries are kept)
#   scripts/fuzz.sh --cmin        minimize every corpus in place (cargo fuzz cmin)
#   scripts/fuzz.sh --asan-c      only the C example under ASan + UBSan (recorded in bench/results/fuzz.json)
#   scripts/fuzz.sh --asan-llama  the patched llama.cpp with ASan (vendor/build-asan) under the e2e tests
#
# Environment: TARGETS="budget plan_compact" (a subset), FUZZ_SANITIZER=address|none (default address),
# NICE (default 10), FUZZ_TMPDIR (scratch files of profile_files; default /dev/shm when writable).
#
# cargo-fuzz wants a nightly compiler for -Zsanitizer; on a stable toolchain RUSTC_BOOTSTRAP=1 makes rustc
# accept the -Z flags (the ASan runtime, librustc-*_rt.asan.a, ships with the standard toolchain).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mode=run secs=60
case "${1:-}" in
  --cmin) mode=cmin ;;
  --asan-c) mode=asan-c ;;
  --asan-llama) mode=asan-llama ;;
  -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
  "") ;;
  *[!0-9]*) echo "fuzz.sh: unknown argument '$1'" >&2; exit 2 ;;
  *) secs=$1 ;;
esac

all_targets="abi_misc fingerprint dequantize_row budget profile_parse profile_files plan_compact"
targets=${TARGETS:-$all_targets}
san=${FUZZ_SANITIZER:-address}
nice_n=${NICE:-10}
host=$(rustc -vV | sed -n 's/^host: //p')
sysroot=$(rustc --print sysroot)
export RUSTC_BOOTSTRAP=1
export RAYON_NUM_THREADS=1
out_json=bench/results/fuzz.json

if [ "$san" = address ] && ! ls "$sysroot/lib/rustlib/$host/lib/"librustc-*_rt.asan.a >/dev/null 2>&1; then
  echo "fuzz.sh: no AddressSanitizer runtime in $sysroot/lib/rustlib/$host/lib: falling back to -s none" >&2
  san=none
fi

# ---- the C example under ASan + UBSan --------------------------------------------------------------------
# The library is built with -Zsanitizer=address (target/asan, a separate target directory), the example with
# gcc's -fsanitize=address,undefined; gcc's ASan runtime serves both (checked: an out-of-bounds read inside
# the Rust code is reported).
asan_c() {
  echo "== the C example under AddressSanitizer + UBSan"
  nice -n "$nice_n" cargo build --release --lib --quiet --target "$host" --target-dir target/asan \
    --config "target.$host.rustflags=['-Zsanitizer=address','-Cdebuginfo=1','-Cforce-frame-pointers=yes']"
  local lib=target/asan/$host/release/libcompresskv.a exe=target/asan/ckv_example_asan log=target/asan/ckv_example_asan.log
  ${CC:-cc} -std=c11 -Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=undefined -Iinclude examples/c/ckv_example.c "$lib" -lpthread -ldl -lm -o "$exe"
  local rc=0
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$exe" >"$log" 2>&1 || rc=$?
  local summary reports
  summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 || true)
  reports=$(grep -cE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$log" || true)
  echo "   exit $rc, '$summary', sanitizer reports: $reports (log: $log)"
  python3 - "$out_json" "$rc" "$summary" "$reports" <<'EOF'
import json, sys, os, subprocess
path, rc, summary, reports = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
d = json.load(open(path)) if os.path.exists(path) else {}
cc = os.environ.get("CC", "cc")
d["c_example_asan"] = {
    "what": "examples/c/ckv_example.c with -fsanitize=address,undefined, libcompresskv.a with -Zsanitizer=address",
    "compiler": subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    "exit_status": rc, "summary": summary, "sanitizer_reports": reports,
    "commit": os.environ.get("FUZZ_COMMIT")
    or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": __import__("datetime").date.today().isoformat(),
}
json.dump(d, open(path, "w"), indent=1)
open(path, "a").write("\n")
EOF
  [ "$rc" = 0 ] && [ "$reports" = 0 ]
}

if [ "$mode" = asan-c ]; then
  asan_c
  exit $?
fi

if [ "$mode" = asan-llama ]; then
  # The library instrumented as above, llama.cpp built with -fsanitize=address into vendor/build-asan, then the
  # e2e tests of the compression paths run against those binaries (COMPRESSKV_LLAMA_BIN). Every ASan report
  # goes to a file of its own (log_path), so that one from a run a test expects to fail is not lost in its
  # exit status: any file there fails this step. 11 tests, 2185 s on 2 idle cores (2026-12-01).
  nice -n "$nice_n" cargo build --release --lib --quiet --target "$host" --target-dir target/asan \
    --config "target.$host.rustflags=['-Zsanitizer=address','-Cdebuginfo=1','-Cforce-frame-pointers=yes']"
  vendor/fetch.sh
  cflags=$(scripts/ggml-cflags.sh)
  cmake -S vendor/llama.cpp -B vendor/build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_ADDRESS=ON \
    -DLLAMA_COMPRESSKV=ON -DLLAMA_COMPRESSKV_DIR="$root" -DLLAMA_COMPRESSKV_LIB="$root/target/asan/$host/release/libcompresskv.a" >/dev/null
  cmake --build vendor/build-asan -j "${JOBS:-$(nproc)}" --target llama-completion llama-server llama-quantize
  [ "${ASAN_BUILD_ONLY:-0}" = 1 ] && { echo "built vendor/build-asan/bin"; exit 0; }
  logs=$root/target/asan-logs
  rm -rf "$logs" && mkdir -p "$logs"
  tests="compressed_cache_finds transposed_v graph_compaction injected_faults bad_runtime_input prompt_longer
         compressed_session server_compresses gemma3 compacted_equals_masked_exact q8_0_cache"
  echo "== the e2e tests of the compression paths against vendor/build-asan/bin"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  COMPRESSKV_LLAMA_BIN=$root/vendor/build-asan/bin ASAN_OPTIONS=detect_leaks=0:log_path=$logs/asan \
    cargo test --release --features llama --test e2e_llama -- $tests 2>&1 | tee target/asan-e2e.log
  status=${PIPESTATUS[0]}
  reports=$(find "$logs" -type f | wc -l)
  passed=$(sed -n 's/^test result: .* \([0-9]*\) passed.*/\1/p' target/asan-e2e.log)
  python3 - "$status" "$reports" "${passed:-0}" "$(( $(date +%s) - t0 ))" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
status, reports, passed, secs, commit = sys.argv[1:]
path = "bench/results/fuzz.json"
d = json.load(open(path))
d["asan_llama"] = {"commit": commit, "tests": "tests/e2e_llama.rs, 11 compression-path tests (scripts/fuzz.sh --asan-llama)",
                   "cargo_test_status": int(status), "passed": int(passed), "asan_reports": int(reports), "seconds": int(secs),
                   "binaries": "vendor/build-asan (RelWithDebInfo, -fsanitize=address, library with -Zsanitizer=address)",
                   "asan_options": "detect_leaks=0, log_path: one file per report"}
json.dump(d, open(path, "w"), indent=1)
print("asan_llama:", d["asan_llama"])
PY
  [ "$status" = 0 ] && [ "$reports" = 0 ] || { echo "fuzz.sh: ASan reports in $logs or failed tests" >&2; exit 1; }
  exit 0
fi

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
fuzz() { nice -n "$nice_n" cargo fuzz "$@"; }
# profile_parse's seeds: the shipped profiles (the last byte of an input picks the model description)
seed() {
  if [ "$1" = profile_parse ]; then
    for p in profiles/*.json; do cp -n "$p" "fuzz/corpus/$1/seed-$(basename "$p")"; done
  fi
}

# the commit the targets are built from (others may commit while they run); -dirty: src/, fuzz/ or include/
# differ from it (untracked corpus files aside)
commit=$(git rev-parse --short HEAD)
if [ -n "$(git status --porcelain --untracked-files=no -- src fuzz include)" ]; then commit="$commit-dirty"; fi
export FUZZ_COMMIT=$commit
echo "== building the fuzz targets (sanitizer: $san, commit $commit)"
fuzz build -O -a -s "$san"

if [ "$mode" = cmin ]; then
  for t in $targets; do
    echo "== cmin $t: $(ls fuzz/corpus/$t | wc -l) files before"
    fuzz cmin -O -a -s "$san" "$t" "fuzz/corpus/$t" -- -rss_limit_mb=4096 >"target/fuzz-cmin-$t.log" 2>&1
    if [ "$t" = profile_parse ]; then
      # mutated copies of the shipped profiles (14-18 KB each) would be most of the committed corpus: keep
      # the small inputs and the seeds, from which the fuzzer finds the large ones again within seconds
      find "fuzz/corpus/$t" -type f -size +4k ! -name 'seed-*' -delete
      seed "$t"
    fi
    files=$(ls "fuzz/corpus/$t" | wc -l) bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
    echo "   $files files, $bytes bytes"
    # the committed corpus is the minimized one: record its size next to the run's
    python3 - "$out_json" "$t" "$files" "$bytes" <<'EOF'
import json, os, sys
path, t, files, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
d = json.load(open(path)) if os.path.exists(path) else {}
e = d.get("targets", {}).get(t)
if e is not None:
    e["corpus_files_after_cmin"], e["corpus_bytes_after_cmin"] = files, nbytes
    json.dump(d, open(path, "w"), indent=1)
    open(path, "a").write("\n")
EOF
  done
  exit 0
fi

tmp=${FUZZ_TMPDIR:-}
if [ -z "$tmp" ] && [ -w /dev/shm ]; then tmp=/dev/shm; fi
[ -n "$tmp" ] && export TMPDIR=$tmp

failed=0
results=$(mktemp)
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seed "$t"
  marker=$(mktemp)
  log=target/fuzz-$t.log
  echo "== $t for ${secs}s ($(ls fuzz/corpus/$t | wc -l) corpus files)"
  rc=0
  fuzz run -O -a -s "$san" "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 \
    -print_final_stats=1 >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  crashes=$(find "fuzz/artifacts/$t" -type f -newer "$marker" | wc -l)
  rm -f "$marker"
  rm -rf "${TMPDIR:-/tmp}"/ckv-fuzz-files-*
  files=$(ls "fuzz/corpus/$t" | wc -l)
  bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
  echo "   exit $rc: ${execs:-?} executions in ${took:-?}s, $crashes new artifacts, corpus $files files ($bytes bytes) (log: $log)"
  if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
    failed=1
    grep -E 'panicked|ERROR:|SUMMARY|Test unit written' "$log" | head -5 | sed 's/^/   /'
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "${execs:-0}" "${took:-$secs}" "$files" "$bytes" "$crashes" "$rc" >>"$results"
done

python3 - "$out_json" "$results" "$san" "$secs" <<'EOF'
import json, os, sys, subprocess, platform, datetime
path, results, san, secs = sys.argv[1:5]
d = json.load(open(path)) if os.path.exists(path) else {}
run = lambda *a: subprocess.run(a, capture_output=True, text=True).stdout.strip()
commit = os.environ["FUZZ_COMMIT"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
mem = next((int(l.split()[1]) // 1024 // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
machine = f"{cpu}, {os.cpu_count()} cores, {mem} GiB, {platform.system()} {platform.machine()}"
targets = d.get("targets", {})
for line in open(results):
    t, execs, took, files, nbytes, crashes, rc = line.rstrip("\n").split("\t")
    targets[t] = {
        "executions": int(execs), "seconds": int(took), "corpus_files": int(files), "corpus_bytes": int(nbytes),
        "crashes": int(crashes), "exit_status": int(rc), "sanitizer": san, "commit": commit, "machine": machine,
        "date": datetime.date.today().isoformat(),
    }
d["targets"] = dict(sorted(targets.items()))
d["total_executions"] = sum(v["executions"] for v in d["targets"].values())
d["tools"] = {"rustc": run("rustc", "--version"), "cargo-fuzz": run("cargo", "fuzz", "--version"),
              "note": "stable rustc with RUSTC_BOOTSTRAP=1 for -Zsanitizer; libFuzzer via libfuzzer-sys; -O -a "
                      "(optimized, debug assertions and overflow checks); one process at a time, nice, RAYON_NUM_THREADS=1"}
d["command"] = f"scripts/fuzz.sh {secs}"
json.dump(d, open(path, "w"), indent=1)
open(path, "a").write("\n")
EOF
rm -f "$results"

if [ -z "${TARGETS:-}" ]; then
  asan_c || failed=1
fi
echo "summary: $out_json"
exit $failed
