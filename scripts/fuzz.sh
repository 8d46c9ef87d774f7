#!/usr/bin/env bash
# Fuzzing of every C entry point of include/compresskv.h and of profile parsing (cargo-fuzz / libFuzzer,
# AddressSanitizer), and AddressSanitizer + UBSan on the C ABI test and the C example. Not part of
# scripts/test.sh.
#
#   scripts/fuzz.sh [SECONDS]     build, run every target for SECONDS (default 60), one after the other, on its
#                                 working corpus fuzz/corpus/<target>; then tests/c/ckv_abi_test.c and
#                                 examples/c/ckv_example.c under ASan + UBSan; writes bench/results/fuzz.json
#                                 (other targets' entries are kept)
#   scripts/fuzz.sh --cmin        minimize every working corpus in place (cargo fuzz cmin), then choose the
#                                 tracked seeds from it again: fuzz/seeds/<target>, the 15 to 65 inputs (by
#                                 target, 275 in all) that add the most code edges, then coverage features, to
#                                 those of the generated inputs (per-input features of libFuzzer's
#                                 -set_cover_merge; fuzz/seeds.py select); `git add -A fuzz/seeds` keeps them
#   scripts/fuzz.sh --seeds-check [SECONDS]  what a fresh clone starts from: each target's coverage (cov, ft)
#                                 from its seeds and generated inputs alone, against the working corpus's
#                                 (where it has grown over earlier runs), then after SECONDS (default 40) of
#                                 fuzzing from them, in a scratch corpus (bench/results/fuzz.json, "seeds_check")
#   scripts/fuzz.sh --asan-c      only the C ABI test and the C example under ASan + UBSan (recorded in
#                                 bench/results/fuzz.json)
#   scripts/fuzz.sh --asan-llama  the patched llama.cpp with ASan (vendor/build-asan) under the e2e tests
#
# The corpus: git tracks only the seeds, fuzz/seeds/<target>/ (under 300 files in all). Before a target runs,
# its seeds and the inputs generated at run time (fuzz/seeds.py gen: the shipped profiles for profile_parse,
# pseudo-random inputs of 8 B to 4 KiB for every target) are copied into fuzz/corpus/<target>/, the working
# corpus: git-ignored, it keeps what the fuzzer finds from one run to the next on this machine. A fresh clone
# starts from the seeds and generated inputs alone: measured 2026-12-06 (--seeds-check 40, bench/results/
# fuzz.json "seeds_check") against the minimized corpus of 12.7 M executions these seeds were chosen from,
# they reach 97% of its PCs when loaded (15833 of 16282; 95-100% a target), and as many after 40 s of fuzzing
# per target (16336 in all; plan_compact 7270 of 7293, the others at or above); "seeds": their features.
#
# Environment: TARGETS="budget plan_compact" (a subset), FUZZ_SANITIZER=address|none (default address),
# NICE (default 10), FUZZ_TMPDIR (scratch files of profile_files; default /dev/shm when writable), SEEDS
# (--cmin: seeds kept per target, instead of the per-target numbers).
#
# cargo-fuzz wants a nightly compiler for -Zsanitizer; on a stable toolchain RUSTC_BOOTSTRAP=1 makes rustc
# accept the -Z flags (the ASan runtime, librustc-*_rt.asan.a, ships with the standard toolchain). cargo-fuzz
# itself is installed with `cargo install cargo-fuzz --locked` when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mode=run secs=60
case "${1:-}" in
  --cmin) mode=cmin ;;
  --asan-c) mode=asan-c ;;
  --asan-llama) mode=asan-llama ;;
  --seeds-check)
    mode=seeds-check secs=${2:-40}
    case $secs in ''|*[!0-9]*) echo "fuzz.sh: --seeds-check takes SECONDS" >&2; exit 2 ;; esac ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
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

# ---- the C ABI test and the C example under ASan + UBSan -------------------------------------------------
# The library is built with -Zsanitizer=address (target/asan, a separate target directory), the C programs with
# gcc's -fsanitize=address,undefined; gcc's ASan runtime serves both (checked: an out-of-bounds read inside
# the Rust code is reported).
asan_c() {
  echo "== the C ABI test and the C example under AddressSanitizer + UBSan"
  nice -n "$nice_n" cargo build --release --lib --quiet --target "$host" --target-dir target/asan \
    --config "target.$host.rustflags=['-Zsanitizer=address','-Cdebuginfo=1','-Cforce-frame-pointers=yes']"
  local lib=target/asan/$host/release/libcompresskv.a rc=0 reports=0 summary="" src name exe log r n
  for src in tests/c/ckv_abi_test.c examples/c/ckv_example.c; do
    name=$(basename "$src" .c)
    exe=target/asan/${name}_asan log=target/asan/${name}_asan.log
    ${CC:-cc} -std=c11 -Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
      -fno-sanitize-recover=undefined -Iinclude "$src" "$lib" -lpthread -ldl -lm -o "$exe"
    r=0
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      "$exe" >"$log" 2>&1 || r=$?
    n=$(grep -cE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$log" || true)
    if [ "$src" = tests/c/ckv_abi_test.c ]; then
      summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 || true)
    elif [ "$r" = 0 ] && ! grep -q '^ok: ' "$log"; then
      r=1
    fi
    echo "   $src: exit $r, sanitizer reports: $n (log: $log)"
    [ "$r" = 0 ] || rc=$r
    reports=$((reports + n))
  done
  echo "   ckv_abi_test: '$summary'"
  python3 - "$out_json" "$rc" "$summary" "$reports" <<'EOF'
import json, sys, os, subprocess
path, rc, summary, reports = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
d = json.load(open(path)) if os.path.exists(path) else {}
cc = os.environ.get("CC", "cc")
d["c_example_asan"] = {
    "what": "tests/c/ckv_abi_test.c (the summary) and examples/c/ckv_example.c with -fsanitize=address,undefined, "
            "libcompresskv.a with -Zsanitizer=address",
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
d["asan_llama"] = {"commit": commit, "tests": "tests/e2e_llama/, 11 compression-path tests (scripts/fuzz.sh --asan-llama)",
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
# A target's working corpus: its tracked seeds and the inputs generated at run time (fuzz/seeds.py gen).
prepare() {
  mkdir -p "fuzz/corpus/$1" "fuzz/artifacts/$1"
  if [ -d "fuzz/seeds/$1" ]; then find "fuzz/seeds/$1" -type f -exec cp -n {} "fuzz/corpus/$1/" \;; fi
  python3 fuzz/seeds.py gen "$1" "fuzz/corpus/$1" >/dev/null
}

# the commit the targets are built from (others may commit while they run); -dirty: src/, fuzz/ or include/
# differ from it (the working corpus, git-ignored, aside)
commit=$(git rev-parse --short HEAD)
if [ -n "$(git status --porcelain --untracked-files=no -- src fuzz include)" ]; then commit="$commit-dirty"; fi
export FUZZ_COMMIT=$commit
echo "== building the fuzz targets (sanitizer: $san, commit $commit)"
fuzz build -O -a -s "$san"

tmp=${FUZZ_TMPDIR:-}
if [ -z "$tmp" ] && [ -w /dev/shm ]; then tmp=/dev/shm; fi
[ -n "$tmp" ] && export TMPDIR=$tmp

if [ "$mode" = cmin ]; then
  for t in $targets; do
    # seeds kept per target: about what covers the edges of its minimized corpus, within 300 files in all
    # (275; measured 2026-12: full cover would take 10 to 171 files a target, 524 in all)
    case $t in
      fingerprint) nseeds=15 ;; abi_misc) nseeds=25 ;; dequantize_row) nseeds=30 ;; budget) nseeds=35 ;;
      profile_files) nseeds=50 ;; profile_parse) nseeds=55 ;; plan_compact) nseeds=65 ;; *) nseeds=40 ;;
    esac
    nseeds=${SEEDS:-$nseeds}
    prepare "$t"
    echo "== cmin $t: $(ls "fuzz/corpus/$t" | wc -l) files before"
    fuzz cmin -O -a -s "$san" "$t" "fuzz/corpus/$t" -- -rss_limit_mb=4096 >"target/fuzz-cmin-$t.log" 2>&1
    files=$(ls "fuzz/corpus/$t" | wc -l) bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
    # the tracked seeds: the nseeds inputs of the minimized corpus that add the most code edges, then coverage
    # features, to those of the generated inputs (put back for this), from the per-input feature sets of a
    # set-cover merge (into a scratch directory; only its control file is used)
    prepare "$t"
    ctl=target/fuzz-seeds-$t.ctl scratch=$(mktemp -d)
    rm -f "$ctl"
    nice -n "$nice_n" "fuzz/target/$host/release/$t" -set_cover_merge=1 -merge_control_file="$ctl" \
      -rss_limit_mb=4096 -timeout=30 "$scratch" "fuzz/corpus/$t" >"target/fuzz-seeds-$t.log" 2>&1
    rm -rf "$scratch"
    sel=$(python3 fuzz/seeds.py select "$ctl" "$nseeds" "fuzz/seeds/$t")
    echo "   $files files, $bytes bytes; seeds: $sel"
    python3 - "$out_json" "$t" "$files" "$bytes" "$sel" <<'EOF'
import datetime, json, os, sys
path, t, files, nbytes, sel = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
d = json.load(open(path)) if os.path.exists(path) else {}
e = d.get("targets", {}).get(t)
if e is not None:
    e["corpus_files_after_cmin"], e["corpus_bytes_after_cmin"] = files, nbytes
sel.update(commit=os.environ["FUZZ_COMMIT"], date=datetime.date.today().isoformat())
d.setdefault("seeds", {})[t] = sel
d["seeds"] = dict(sorted(d["seeds"].items()))
json.dump(d, open(path, "w"), indent=1)
open(path, "a").write("\n")
EOF
  done
  echo "tracked seeds: $(find fuzz/seeds -type f | wc -l) files in fuzz/seeds (git add -A fuzz/seeds to keep this choice)"
  exit 0
fi

if [ "$mode" = seeds-check ]; then
  # What a fresh clone starts from: the coverage (PCs, features) of the seeds and generated inputs alone,
  # against that of this machine's working corpus (telling where it has grown over earlier runs), then after
  # SECONDS of fuzzing from them, in a scratch corpus (the working one gets only what prepare puts there).
  results=$(mktemp)
  for t in $targets; do
    prepare "$t"
    bin=fuzz/target/$host/release/$t fresh=$(mktemp -d)
    find "fuzz/seeds/$t" -type f -exec cp {} "$fresh/" \;
    python3 fuzz/seeds.py gen "$t" "$fresh" >/dev/null
    inited() { sed -n 's/^#[0-9]*[[:space:]]*INITED cov: \([0-9]*\) ft: \([0-9]*\).*/\1 \2/p' | tail -1; }
    full=$(nice -n "$nice_n" "$bin" -runs=0 -rss_limit_mb=4096 "fuzz/corpus/$t" 2>&1 | inited)
    start=$(nice -n "$nice_n" "$bin" -runs=0 -rss_limit_mb=4096 "$fresh" 2>&1 | inited)
    nice -n "$nice_n" "$bin" -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -artifact_prefix="fuzz/artifacts/$t/" \
      "$fresh" >"target/fuzz-seeds-check-$t.log" 2>&1 || failed=1
    end=$(sed -n 's/^#[0-9]*[[:space:]]*DONE[[:space:]]*cov: \([0-9]*\) ft: \([0-9]*\).*/\1 \2/p' \
      "target/fuzz-seeds-check-$t.log" | tail -1)
    echo "== $t: working corpus ${full:-?} (cov ft); seeds + generated ${start:-?}, after ${secs}s ${end:-?}"
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$(ls "fuzz/corpus/$t" | wc -l)" "${full:-0 0}" "${start:-0 0}" "${end:-0 0}" >>"$results"
    rm -rf "$fresh" "${TMPDIR:-/tmp}"/ckv-fuzz-files-*
  done
  python3 - "$out_json" "$results" "$secs" <<'EOF'
import datetime, json, os, sys
path, results, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = json.load(open(path)) if os.path.exists(path) else {}
check = d.get("seeds_check", {})
for line in open(results):
    t, files, full, start, end = line.rstrip("\n").split("\t")
    pair = lambda s: dict(zip(("cov", "ft"), map(int, s.split())))
    check[t] = {"working_corpus_files": int(files), "working_corpus": pair(full), "seeds_and_generated": pair(start),
                f"after_{secs}s": pair(end), "commit": os.environ["FUZZ_COMMIT"],
                "date": datetime.date.today().isoformat()}
check = dict(sorted(check.items()))
d["seeds_check"] = check
json.dump(d, open(path, "w"), indent=1)
open(path, "a").write("\n")
EOF
  rm -f "$results"
  exit ${failed:-0}
fi

failed=0
results=$(mktemp)
for t in $targets; do
  prepare "$t"
  marker=$(mktemp)
  log=target/fuzz-$t.log
  echo "== $t for ${secs}s ($(ls fuzz/corpus/$t | wc -l) corpus files)"
  rc=0
  fuzz run -O -a -s "$san" "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 \
    -print_final_stats=1 >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  # coverage (PCs) when the corpus was loaded and at the end
  cov0=$(sed -n 's/^#[0-9]*[[:space:]]*INITED cov: \([0-9]*\).*/\1/p' "$log" | tail -1)
  cov1=$(sed -n 's/^#[0-9]*[[:space:]]*DONE[[:space:]]*cov: \([0-9]*\).*/\1/p' "$log" | tail -1)
  crashes=$(find "fuzz/artifacts/$t" -type f -newer "$marker" | wc -l)
  rm -f "$marker"
  rm -rf "${TMPDIR:-/tmp}"/ckv-fuzz-files-*
  files=$(ls "fuzz/corpus/$t" | wc -l)
  bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
  echo "   exit $rc: ${execs:-?} executions in ${took:-?}s, $crashes new artifacts, corpus $files files ($bytes bytes), cov ${cov0:-?} -> ${cov1:-?} (log: $log)"
  if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
    failed=1
    grep -E 'panicked|ERROR:|SUMMARY|Test unit written' "$log" | head -5 | sed 's/^/   /'
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "${execs:-0}" "${took:-$secs}" "$files" "$bytes" "$crashes" "$rc" \
    "${cov0:-0}" "${cov1:-0}" >>"$results"
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
    t, execs, took, files, nbytes, crashes, rc, cov0, cov1 = line.rstrip("\n").split("\t")
    targets[t] = {
        "executions": int(execs), "seconds": int(took), "corpus_files": int(files), "corpus_bytes": int(nbytes),
        "cov_start": int(cov0), "cov_end": int(cov1),
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
