#!/usr/bin/env python3
"""The default path of llama.cpp is unchanged without --compresskv: same outputs, same speed.

Compares the patched build (vendor/build, LLAMA_COMPRESSKV=ON, no --compresskv flag) with the same tree built
with the option off (vendor/build-off, `scripts/build-llama.sh --off --targets "llama-completion llama-bench"`):

    outputs: greedy llama-completion on needle prompts (several lengths and cache settings): the generated
             text of both builds must be byte-identical
    speed:   llama-bench (prompt processing and token generation, -r repetitions each), both builds run
             alternately so that drift of the machine hits both alike

    python3 bench/default_path.py [--model smollm2] [--threads 2] [--reps 5]
        -> bench/results/default-path-<model>-cpu.json (exit status 1 if any output differs)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import harness  # noqa: E402
import needle  # noqa: E402

BUILDS = {"on": "vendor/build/bin", "off": "vendor/build-off/bin"}
CASES = [  # (prompt chars, llama-completion flags)
    (6000, []),
    (14000, []),
    (14000, ["-fa", "off"]),
    (14000, ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]),
]


def binary(build, name):
    path = os.path.join(ROOT, BUILDS[build], name)
    if not os.path.exists(path):
        hint = "--off " if build == "off" else ""
        sys.exit(f"{path} is missing: scripts/build-llama.sh {hint}--targets \"llama-completion llama-bench\"")
    return path


def bench_once(build, model, threads):
    out = subprocess.run([binary(build, "llama-bench"), "-m", model, "-t", str(threads), "-p", "512", "-n", "64",
                          "-r", "1", "-o", "json"], check=True, capture_output=True, text=True).stdout
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()

    model = harness.sh(os.path.join(ROOT, "scripts/fetch-model.sh"), args.model)
    essays = harness.sh(os.path.join(ROOT, "scripts/fetch-data.sh"))
    tmp = os.path.join(ROOT, "target/bench")
    os.makedirs(tmp, exist_ok=True)

    outputs = []
    for chars, flags in CASES:
        prompt = os.path.join(tmp, f"default-path-{chars}-{os.getpid()}.txt")
        with open(prompt, "w") as f:
            f.write(needle.prompt(essays, chars, 0.5))
        got = {}
        for build in BUILDS:
            cmd = harness.completion_cmd(binary(build, "llama-completion"), model, prompt, 48, 4608,
                                         args.threads) + flags
            p = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
            got[build] = {"ok": p.returncode == 0, "answer": p.stdout, **harness.perf(p.stderr)}
        row = {"chars": chars, "flags": flags, "n_prompt": got["on"]["n_prompt"],
               "identical": got["on"]["ok"] and got["off"]["ok"] and got["on"]["answer"] == got["off"]["answer"],
               "answer_on": got["on"]["answer"].strip(), "answer_off": got["off"]["answer"].strip()}
        outputs.append(row)
        print(f"{chars} chars {' '.join(flags) or '(defaults)'}: {'identical' if row['identical'] else 'DIFFERENT'}",
              flush=True)

    runs = {b: [] for b in BUILDS}
    for i in range(args.reps):
        for build in (BUILDS if i % 2 == 0 else reversed(list(BUILDS))):
            runs[build].append(bench_once(build, model, args.threads))
        print(f"llama-bench repetition {i + 1}/{args.reps}", flush=True)
    speed = {}
    for build, rs in runs.items():
        speed[build] = {k: {"median_tps": round(statistics.median(r[k] for r in rs), 2),
                            "runs_tps": [round(r[k], 2) for r in rs]} for k in ("pp", "tg")}
    ratio = {k: round(speed["on"][k]["median_tps"] / speed["off"][k]["median_tps"], 4) for k in ("pp", "tg")}
    print(f"speed on/off: prompt processing {ratio['pp']}, token generation {ratio['tg']}")

    out = args.out or os.path.join(ROOT, f"bench/results/default-path-{args.model}-cpu.json")
    harness.write(out, {"kind": "default-path", "model": args.model, "model_path": os.path.basename(model),
                        "model_sha256": harness.file_sha256(model), "commit": harness.git_commit(),
                        "machine": harness.machine(), "threads": args.threads,
                        "llama_bench": "-p 512 -n 64 -r 1, repeated --reps times alternately",
                        "command": " ".join(sys.argv), "outputs": outputs, "speed": speed,
                        "speed_ratio_on_over_off": ratio,
                        "all_identical": all(r["identical"] for r in outputs)})
    sys.exit(0 if all(r["identical"] for r in outputs) else 1)


if __name__ == "__main__":
    main()
