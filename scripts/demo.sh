#!/usr/bin/env bash
# The main job: set everything up on a fresh machine, then answer a needle question over a ~6K-token
# prompt (Paul Graham essays, SmolLM2-135M-Instruct, greedy) twice: full cache and --compresskv.
# Prints the answers, the KV bytes and the decode speed of both.
#
#   scripts/demo.sh [extra llama-completion flags, e.g. --compresskv-budget 128]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/build-llama.sh --targets llama-completion
model=$(scripts/fetch-model.sh smollm2)
essays=$(scripts/fetch-data.sh)
out=$root/target/demo
mkdir -p "$out"
python3 bench/needle.py --essays "$essays" --chars 24000 --depth 0.5 > "$out/prompt.txt"
rm -f "$out/stats.jsonl"

common=(-m "$model" -f "$out/prompt.txt" -n 48 --temp 0 --seed 1 -c 8192 -t "$(nproc)" -no-cnv
        --no-display-prompt --simple-io --no-warmup)
echo "== full cache"
vendor/build/bin/llama-completion "${common[@]}" > "$out/full.txt" 2> "$out/full.log"
echo "== --compresskv"
vendor/build/bin/llama-completion "${common[@]}" --compresskv --compresskv-stats "$out/stats.jsonl" "$@" \
    > "$out/ckv.txt" 2> "$out/ckv.log"

python3 - "$out" <<'PY'
import json, re, sys, os
out = sys.argv[1]
sys.path.insert(0, os.path.join(os.path.dirname(out), "..", "bench"))
from needle import score

def perf(log):
    t = open(log, errors="replace").read()
    ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second", t)
    pp = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", t)
    kv = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", t)
    return (float(ev.group(3)) if ev else float("nan"), int(pp.group(2)) if pp else -1,
            float(kv.group(1)) if kv else float("nan"))

st = [json.loads(l) for l in open(os.path.join(out, "stats.jsonl"))] if os.path.exists(os.path.join(out, "stats.jsonl")) else []
rows = []
for name, tag in (("full cache", "full"), ("--compresskv", "ckv")):
    ans = open(os.path.join(out, tag + ".txt"), errors="replace").read().strip()
    tps, n_prompt, alloc = perf(os.path.join(out, tag + ".log"))
    rows.append((name, ans, tps, n_prompt, alloc))

s = st[0] if st else None
for name, ans, tps, n_prompt, alloc in rows:
    print(f"\n[{name}] answer: {ans!r}")
    print(f"  needle word score: {score(ans):.2f}")
    if name == "full cache":
        used = s["kv_bytes_before"] if s else float("nan")
        print(f"  prompt tokens: {n_prompt}   KV bytes occupied: {used/1048576:.2f} MiB   decode: {tps:.1f} tokens/s")
    elif s:
        p = s["plan"]
        print(f"  method {p['method']}, budget {p['budget']}, window {p['window']}: {s['cells_before']} -> {s['cells_after']} cells")
        print(f"  KV bytes occupied: {s['kv_bytes_after']/1048576:.2f} MiB ({100*s['kv_bytes_after']/s['kv_bytes_before']:.1f}% of full)"
              f"   decode: {tps:.1f} tokens/s   compression took {s['ms_total']:.1f} ms")
    else:
        print("  compression did not run: see target/demo/ckv.log")
PY
