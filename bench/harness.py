#!/usr/bin/env python3
"""Side-by-side evaluation of KV-cache compression methods through the patched llama-completion.

One engine, one model, the same prompts for every method: the full cache, StreamingLLM, SnapKV, PyramidKV,
CompressKV with the paper's selection and CompressKV with our defaults. Every row is a real greedy run of
the model; nothing is estimated.

    needle:  for each (prompt length, needle depth): for each method x budget: run, score the answer
             (bench/needle.py word score), read the stats line (cells, KV bytes, timings) and the perf
             lines (prompt and decode tokens/s)  ->  bench/results/needle-<model>-<device>.json
    speed:   for each context length: full cache vs each method at one budget, a fixed number of decoded
             tokens (--ignore-eos)  ->  bench/results/speed-<model>-<device>.json
    kvspeed: decode tok/s by context depth, the full cache and each budget, on random tokens through
             llama-compresskv-bench (target/release/, --tool; prefill, compress, time the decode; resumable)
             ->  bench/results/kvspeed-<model>-cpu.json (the GPU runs: bench/gpu.sh)

Then `python3 bench/plot.py` draws the SVG plots under bench/plots/ from those files.

    python3 bench/harness.py needle [--model smollm2] [--chars 6000,14000] [--depths 0.1,0.3,0.5,0.7,0.9]
                                    [--budgets 128,256] [--methods ...]
    python3 bench/harness.py speed  [--model smollm2] [--tokens 1024,2048,4096,8192] [--budget 256]
    python3 bench/harness.py kvspeed [--model smollm2] [--depths 256,1024,2048,4096,8000] [--budgets 0,256,1024,2048]
    python3 bench/harness.py bounded [--model smollm2] [--chars 26000] [--budget 512]
             [--configs full,oneshot,question@2048,recent@2048,question@4096]
             prompts longer than the context: the full cache (large -c) vs compressing whenever the cache
             would overflow (NAME@C: -c C), with peak memory  ->  bench/results/bounded-<model>-cpu.json

The profile comparison (SnapKV vs SnapKV + SRH vs CompressKV, same selection, same occupied cells):

    python3 bench/harness.py needle --threads 1 --model smollm2 --chars 6000,14000 --depths 0.1,0.5,0.9 \
        --budgets 64,128,256,512 --methods full,snapkv-ours,snapkv-srh,compresskv,compresskv-exact \
        --out bench/results/profile-smollm2-cpu.json
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import needle  # noqa: E402

# name -> llama-completion flags (None: the full cache)
METHODS = {
    "full": None,
    "streamingllm": ["--compresskv", "--compresskv-method", "streamingllm"],
    "snapkv": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv"],
    "pyramidkv": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "pyramidkv"],
    "compresskv-paper": ["--compresskv", "--compresskv-preset", "paper"],
    "compresskv": ["--compresskv"],
    # the profile comparison (issue: offline calibration), every one with our selection defaults:
    "snapkv-ours": ["--compresskv", "--compresskv-method", "snapkv"],        # all heads, uniform budgets
    "snapkv-srh": ["--compresskv", "--compresskv-method", "snapkv-srh"],     # the profile's SRHs, uniform
    "compresskv-exact": ["--compresskv", "--compresskv-form", "exact"],      # SRHs + weighted budgets, exact form
    # the paper's accounting: the budget is the average over layers, the cache holds the largest layer budget
    "compresskv-avg": ["--compresskv", "--compresskv-form", "exact", "--compresskv-budget-avg"],
    # our defaults with another span length (--compresskv-chunk, default 32; 0 = single tokens)
    "compresskv-k16": ["--compresskv", "--compresskv-chunk", "16"],
    "compresskv-k0": ["--compresskv", "--compresskv-chunk", "0"],
    # one token set per KV head (KVzip's head-wise eviction)
    "snapkv-per-head": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                        "--compresskv-per-head"],
    # the same without the scores' smoothing (pooling kernel 1), as KVzip chooses from its reconstruction scores
    "snapkv-per-head-p1": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                           "--compresskv-per-head", "--compresskv-pool", "1"],
    # KVzip's selection of reconstruction scores: the maximum over the KV group's heads, not their mean
    "snapkv-per-head-max": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                            "--compresskv-per-head", "--compresskv-head-reduce", "max"],
    "snapkv-per-head-max-p1": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                               "--compresskv-per-head", "--compresskv-head-reduce", "max", "--compresskv-pool", "1"],
    # the reconstruction's scores kept as 4- and 8-token spans per KV head (whole numbers, whole names)
    "snapkv-per-head-c4": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                           "--compresskv-per-head", "--compresskv-pool", "1", "--compresskv-chunk", "4"],
    "snapkv-per-head-c8": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                           "--compresskv-per-head", "--compresskv-pool", "1", "--compresskv-chunk", "8"],
    "snapkv-per-head-max-c8": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                               "--compresskv-per-head", "--compresskv-head-reduce", "max", "--compresskv-pool", "1",
                               "--compresskv-chunk", "8"],
    "snapkv-max-p1": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "snapkv",
                      "--compresskv-head-reduce", "max", "--compresskv-pool", "1"],
    # query-agnostic: the profile's key gate (no queries, no decode) with our selection (32-token spans), and with
    # the paper's (single tokens), one token set per layer or per KV head
    "gate": ["--compresskv", "--compresskv-method", "gate"],
    "gate-paper": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "gate"],
    "gate-per-head": ["--compresskv", "--compresskv-preset", "paper", "--compresskv-method", "gate",
                      "--compresskv-per-head"],
}


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def git_commit():
    """HEAD, with -dirty when the library or the patches differ from it (what a result was measured with)."""
    try:
        c = sh("git", "-C", ROOT, "rev-parse", "HEAD")
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "src", "patches", "include"]).returncode
        return c + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def completion_cmd(binary, model, prompt, n_predict, ctx, threads):
    """The llama-completion command line every benchmark runs: a raw prompt file, greedy, seeded."""
    return [binary, "-m", model, "-f", prompt, "-n", str(n_predict), "--temp", "0", "--seed", "1", "-c", str(ctx),
            "-t", str(threads), "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup"]


# the fields of a --compresskv-stats line that every benchmark row keeps
STATS_FIELDS = ("n_prompt", "cells_before", "cells_after", "kv_bytes_before", "kv_bytes_after", "ms_redecode",
                "ms_compact", "ms_total")


# A child's ru_maxrss survives execve: a process forked from this (possibly large) Python and exec'ed into
# llama-completion would report Python's resident size if that is larger. So the command is forked from a small
# fresh interpreter, which reports its child's own peak (the floor is that interpreter's ~10 MiB).
_LAUNCHER = ("import os, sys\n"
             "fd = int(sys.argv[1])\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    os.close(fd)\n"
             "    os.execvp(sys.argv[2], sys.argv[2:])\n"
             "_, status, ru = os.wait4(pid, 0)\n"
             "os.write(fd, str(ru.ru_maxrss).encode())\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_measured(cmd):
    """Run cmd; (returncode, stdout, stderr, peak resident memory of that process in MiB)."""
    import threading
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(w)] + list(cmd), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, errors="replace", pass_fds=(w,))
    os.close(w)
    out = {}
    readers = [threading.Thread(target=lambda k, f: out.__setitem__(k, f.read()), args=(k, f))
               for k, f in (("out", p.stdout), ("err", p.stderr))]
    for t in readers:
        t.start()
    with os.fdopen(r) as f:
        rss = f.read()
    p.wait()
    for t in readers:
        t.join()
    return p.returncode, out["out"], out["err"], int(rss or 0) / 1024


def machine():
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host_cpu": cpu or platform.processor(), "nproc": os.cpu_count(), "system": platform.system()}


def perf(log):
    ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second", log)
    pp = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens.*?([\d.]+) tokens per second", log)
    return {
        "decode_tps": float(ev.group(3)) if ev else None,
        "n_decoded": int(ev.group(2)) if ev else None,
        "prompt_tps": float(pp.group(3)) if pp else None,
        "n_prompt": int(pp.group(2)) if pp else None,
    }


class Runner:
    def __init__(self, args):
        self.bin = os.path.join(ROOT, "vendor/build/bin/llama-completion")
        if not os.path.exists(self.bin):
            sys.exit(f"{self.bin} is missing: run scripts/build-llama.sh")
        self.model = sh(os.path.join(ROOT, "scripts/fetch-model.sh"), args.model)
        self.essays = sh(os.path.join(ROOT, "scripts/fetch-data.sh"))
        self.threads = args.threads
        self.extra = args.extra.split() if args.extra else []
        self.tmp = os.path.join(ROOT, "target/bench")
        os.makedirs(self.tmp, exist_ok=True)

    def prompt(self, chars, depth):
        path = os.path.join(self.tmp, f"needle-{chars}-{depth}-{os.getpid()}.txt")
        with open(path, "w") as f:
            f.write(needle.prompt(self.essays, chars, depth))
        return path

    def run(self, prompt, flags, n_predict, ctx, ignore_eos=False, session=None, save_session=False, log_kv=True):
        stats = os.path.join(self.tmp, f"stats-{os.getpid()}.jsonl")  # per process: runs may overlap
        if os.path.exists(stats):
            os.remove(stats)
        cmd = completion_cmd(self.bin, self.model, prompt, n_predict, ctx, self.threads) + self.extra
        if ignore_eos:
            cmd.append("--ignore-eos")
        if session:
            cmd += ["--prompt-cache", session] + ([] if save_session else ["--prompt-cache-ro"])
        if log_kv:
            # libllama's KV allocation line is logged at -lv 4 only; the speed runs stay at the default verbosity
            # (the debug lines cost a little per decoded token)
            cmd += ["-lv", "4"]
        if flags:
            cmd += flags + ["--compresskv-stats", stats]
        t0 = time.time()
        rc, out, err, rss = run_measured(cmd)
        row = {"ok": rc == 0, "wall_s": round(time.time() - t0, 2), "answer": out.strip(), "peak_rss_mib": round(rss, 1)}
        row.update(perf(err))
        if session and not save_session:
            row["session_whole"] = "session file has exact match for prompt" in err
        kv = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells", err)
        row["kv_alloc_mib"], row["kv_alloc_cells"] = (float(kv.group(1)), int(kv.group(2))) if kv else (None, None)
        if flags:
            st = [json.loads(l) for l in open(stats)] if os.path.exists(stats) else []
            row["compressed"] = bool(st)
            row["n_compressions"] = len(st)
            if st:
                s = st[0]
                row.update({k: s[k] for k in STATS_FIELDS})
                row["window"] = s["plan"].get("window")
                row["method_lib"] = s["plan"].get("method")
                row["profile"] = s.get("profile")
                row["cells_after_max"] = max(x["cells_after"] for x in st)
                row["final"] = {k: st[-1][k] for k in STATS_FIELDS} | {"window": st[-1].get("window")}
        if not row["ok"]:
            row["log_tail"] = err[-2000:]
        return row


def needle_cmd(args):
    """The needle grid: context lengths x depths x (full cache, then every method x budget).

    Each prompt is prefilled twice, whatever the number of methods: once by the full cache's own run (the
    reference a user gets), once by a run that saves its cache (--prompt-cache: the state before the last prompt
    token). Every compressed run loads that cache, replays the last token and compresses: close to a run that
    prefilled the prompt itself (the same prefill, its last batch one token shorter; compression decodes its window
    and everything after it again).
    --no-share prefills every run instead. --full is the whole grid (the usable context of SmolLM2 x 11 depths x
    budgets 64-1024). Rows already in --out are kept (resumable)."""
    if args.full:
        args.chars, args.depths, args.budgets = FULL_GRID["chars"], FULL_GRID["depths"], FULL_GRID["budgets"]
        args.methods = FULL_GRID["methods"]
    r = Runner(args)
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"harness.py: unknown method {m} ({', '.join(METHODS)})")
    budgets = [int(b) for b in args.budgets.split(",")]
    out = args.out or os.path.join(ROOT, f"bench/results/needle-{args.model}-cpu.json")
    rows = []
    if os.path.exists(out):
        prev = json.load(open(out))
        if prev.get("kind") == "needle" and prev.get("model") == args.model and prev.get("share") == args.share \
                and prev.get("n_predict") == args.n_predict:
            rows = [x for x in prev["rows"] if x.get("ok")]
            # a resumed grid may mix commits and machines: rows written before rows carried their own take the
            # previous run's
            for x in rows:
                x.setdefault("commit", prev.get("commit"))
                x.setdefault("host_cpu", (prev.get("machine") or {}).get("host_cpu"))
            print(f"resuming: {len(rows)} rows in {out}", flush=True)
    done = {(x["chars"], x["depth"], x["method"], x["budget"]) for x in rows}
    meta = {"kind": "needle", "model": args.model, "model_path": os.path.basename(r.model),
            "model_sha256": file_sha256(r.model), "commit": git_commit(), "machine": machine(),
            "threads": args.threads, "n_predict": args.n_predict, "share": args.share,
            "methods": {m: METHODS[m] for m in methods}, "budgets": budgets, "extra_flags": r.extra}

    def save(complete):
        # rewritten after every prompt, so an interrupted grid still leaves its finished prompts
        write(out, dict(meta, complete=complete, command="bench/harness.py " + " ".join(sys.argv[1:]), rows=rows,
                        summary=summarize(rows)))

    grid = [(int(c), float(d)) for c in args.chars.split(",") for d in args.depths.split(",")]
    runs = [(m, b) for m in methods for b in ([None] if METHODS[m] is None else budgets)]
    n_todo = sum(1 for c, d in grid for m, b in runs if (c, d, m, b) not in done)
    print(f"{len(grid)} prompts x {len(runs)} runs: {n_todo} to do", flush=True)
    t0, n_run = time.time(), 0
    session = os.path.join(r.tmp, f"needle-session-{os.getpid()}.bin")
    for chars, depth in grid:
        todo = [(m, b) for m, b in runs if (chars, depth, m, b) not in done]
        if not todo:
            continue
        prompt = r.prompt(chars, depth)
        saved = False
        for m, b in todo:
            flags = None if METHODS[m] is None else METHODS[m] + ["--compresskv-budget", str(b)]
            sess = None
            if flags and args.share:
                if not saved:
                    if os.path.exists(session):
                        os.remove(session)
                    pre = r.run(prompt, None, 1, args.ctx, session=session, save_session=True)
                    if not pre["ok"] or not os.path.exists(session):
                        sys.exit(f"harness.py: the run saving the prompt's cache failed:\n{pre.get('log_tail', '')}")
                    saved = True
                sess = session
            row = r.run(prompt, flags, args.n_predict, args.ctx, session=sess)
            if not row["ok"]:
                sys.exit(f"harness.py: {chars} d{depth} {m} {b} failed:\n{row.get('log_tail', '')}")
            if sess and not row.get("session_whole"):
                sys.exit(f"harness.py: {chars} d{depth} {m} {b}: the saved cache did not cover the prompt")
            row.update({"chars": chars, "depth": depth, "method": m, "budget": b, "score": needle.score(row["answer"]),
                        "commit": meta["commit"], "host_cpu": meta["machine"]["host_cpu"]})
            rows.append(row)
            n_run += 1
            print(f"{progress(n_run, n_todo, t0)} {chars:6d} d{depth:.1f} {m:17s} {str(b):5s} score {row['score']:.2f} "
                  f"n={row.get('n_prompt')} cells={row.get('cells_after', '-')} {row['answer'][:60]!r}", flush=True)
        save(False)
    if os.path.exists(session):
        os.remove(session)
    save(True)


# --full: SmolLM2's usable context (8K) in four lengths x 11 depths x every method at budgets 64-1024
FULL_GRID = {"chars": "4000,8500,17500,36000", "depths": ",".join(f"{i / 10:.1f}" for i in range(11)),
             "budgets": "64,128,256,512,1024",
             "methods": "full,streamingllm,snapkv,pyramidkv,compresskv-paper,compresskv"}


def progress(n_done, n_todo, t0):
    """'[done/todo elapsed, eta]' of a long run, for its progress lines."""
    el = time.time() - t0
    return f"[{n_done}/{n_todo} {el / 60:5.1f} min, eta {el / max(1, n_done) * (n_todo - n_done) / 60:5.1f} min]"


def file_sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def summarize(rows):
    """Mean needle score per (method, budget), over every prompt."""
    acc = {}
    for row in rows:
        key = f"{row['method']}@{row['budget']}" if row["budget"] else row["method"]
        acc.setdefault(key, []).append(row["score"])
    return {k: {"mean_score": round(sum(v) / len(v), 4), "n": len(v)} for k, v in acc.items()}


def speed_cmd(args):
    r = Runner(args)
    rows = []
    methods = args.methods.split(",")
    for n_tok in map(int, args.tokens.split(",")):
        chars = int(n_tok * args.chars_per_token)
        prompt = r.prompt(chars, 0.5)
        ctx = n_tok + args.n_predict + 256
        for m in methods:
            flags = None if METHODS[m] is None else METHODS[m] + ["--compresskv-budget", str(args.budget)]
            row = r.run(prompt, flags, args.n_predict, ctx, ignore_eos=True, log_kv=False)
            row.update({"target_tokens": n_tok, "method": m, "budget": None if flags is None else args.budget})
            del row["answer"]
            rows.append(row)
            print(f"{n_tok:6d} {m:17s} prompt {row.get('n_prompt')} decode {row.get('decode_tps')} tok/s "
                  f"cells {row.get('cells_after')}", flush=True)
    out = args.out or os.path.join(ROOT, f"bench/results/speed-{args.model}-cpu.json")
    write(out, {"kind": "speed", "model": args.model, "model_path": os.path.basename(r.model),
                "model_sha256": file_sha256(r.model), "commit": git_commit(), "machine": machine(),
                "threads": args.threads, "n_predict": args.n_predict,
                "budget": args.budget, "extra_flags": r.extra, "command": " ".join(sys.argv), "rows": rows})


# bounded-memory prefill: configuration -> flags; "NAME@C" runs NAME with -c C, the others with --ctx-full
BOUNDED = {
    "full": None,
    "oneshot": ["--compresskv"],  # the whole prompt in a large cache, compressed once after prefill
    "question": ["--compresskv", "--compresskv-overflow-window", "question"],
    "recent": ["--compresskv", "--compresskv-overflow-window", "recent"],
}


def bounded_cmd(args):
    r = Runner(args)
    configs = args.configs.split(",")
    rows = []
    out = args.out or os.path.join(ROOT, f"bench/results/bounded-{args.model}-cpu.json")
    # resumable: rows of an earlier run with the same model, budget and full-cache context are kept
    if os.path.exists(out):
        prev = json.load(open(out))
        if (prev.get("kind"), prev.get("model"), prev.get("budget"), prev.get("ctx_full"), prev.get("n_predict")) == \
                ("bounded", args.model, args.budget, args.ctx_full, args.n_predict):
            rows = [dict(x, commit=x.get("commit", prev.get("commit"))) for x in prev["rows"]
                    if x.get("ok") and x["config"] in configs]
            print(f"resuming: {len(rows)} rows in {out}", flush=True)
    done = {(x["chars"], x["depth"], x["config"]) for x in rows}
    model_sha256 = file_sha256(r.model)

    def save(complete):
        summary = {}
        for c in configs:
            sel = [x for x in rows if x["config"] == c]
            if sel:
                summary[c] = {"mean_score": round(sum(x["score"] for x in sel) / len(sel), 4), "n": len(sel),
                              "peak_rss_mib_max": max(x["peak_rss_mib"] for x in sel),
                              "kv_alloc_mib": max((x["kv_alloc_mib"] or 0) for x in sel),
                              "cells_occupied_max": max(x.get("cells_after_max") or x.get("n_prompt") or 0 for x in sel)}
        write(out, {"kind": "bounded", "model": args.model, "model_path": os.path.basename(r.model),
                    "model_sha256": model_sha256, "machine": machine(), "threads": args.threads,
                    "n_predict": args.n_predict, "budget": args.budget,
                    "ctx_full": args.ctx_full, "configs": {c: BOUNDED[c.split("@")[0]] for c in configs},
                    "extra_flags": r.extra, "commit": git_commit(), "complete": complete, "command": " ".join(sys.argv),
                    "rows": rows, "summary": summary})

    for chars in map(int, args.chars.split(",")):
        for depth in map(float, args.depths.split(",")):
            prompt = r.prompt(chars, depth)
            for c in configs:
                if (chars, depth, c) in done:
                    continue
                name, _, ctx = c.partition("@")
                flags = BOUNDED[name]
                flags = None if flags is None else flags + ["--compresskv-budget", str(args.budget)]
                ctx = int(ctx) if ctx else args.ctx_full
                row = r.run(prompt, flags, args.n_predict, ctx)
                row.update({"chars": chars, "depth": depth, "config": c, "score": needle.score(row["answer"]), "ctx": ctx,
                            "commit": git_commit()})
                rows.append(row)
                print(f"{chars:6d} d{depth:.1f} {c:9s} score {row['score']:.2f} prompt {row.get('n_prompt')} "
                      f"compressions {row.get('n_compressions')} cells<= {row.get('cells_after_max')} "
                      f"rss {row['peak_rss_mib']} MiB kv {row['kv_alloc_mib']} MiB {row['wall_s']} s "
                      f"{row['answer'][:60]!r}", flush=True)
                save(False)  # after every row: a 32K-token full-cache run takes a quarter of an hour on 2 cores
    save(True)


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    obj["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a run killed mid-write leaves the last whole file, which resume reads
    print("wrote", path)


def kvspeed_cmd(args):
    """llama-compresskv-bench on a fetched model; the JSON it writes gains the commit, machine and checksum."""
    model = sh(os.path.join(ROOT, "scripts/fetch-model.sh"), args.model)
    tool = args.tool
    if not os.path.exists(tool):
        sys.exit(f"{tool} is missing: run cargo build --release --features llama --bins "
                 "(or scripts/build-llama.sh --targets llama-compresskv-bench)")
    out = args.out or os.path.join(ROOT, f"bench/results/kvspeed-{args.model}-cpu.json")
    cmd = [tool, "-m", model, "-o", out, "-t", str(args.threads), "-d", args.depths, "-B", args.budgets,
           "-n", str(args.n_gen), "-r", str(args.reps), "--method", args.method] + args.extra.split()
    rc = subprocess.call(cmd)
    d = json.load(open(out))
    d.update({"model": args.model, "model_sha256": file_sha256(model),
              "commit": git_commit(), "machine": machine(), "command": " ".join(["bench/harness.py"] + sys.argv[1:])})
    write(out, d)
    if rc != 0:
        sys.exit(f"llama-compresskv-bench exited with {rc}: the rows done are in {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("needle", "speed", "bounded", "kvspeed"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2", help="a name known to scripts/fetch-model.sh")
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--extra", default="", help="more llama-completion flags for every run (e.g. '-ngl 99')")
        p.add_argument("--out")
        if name == "needle":
            p.add_argument("--chars", default="6000,14000")
            p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
            p.add_argument("--budgets", default="128,256")
            p.add_argument("--methods", default="full,streamingllm,snapkv,pyramidkv,compresskv-paper,compresskv")
            p.add_argument("--n-predict", type=int, default=32)
            p.add_argument("--ctx", type=int, default=8448)
            p.add_argument("--full", action="store_true", help="the whole grid: " + str(FULL_GRID))
            p.add_argument("--share", action=argparse.BooleanOptionalAction, default=True,
                           help="prefill each prompt once for every compressed run (default; --no-share: per run)")
        elif name == "kvspeed":
            p.add_argument("--depths", default="256,1024,2048,4096,8000")
            p.add_argument("--budgets", default="0,256,1024,2048", help="0: the full cache")
            p.add_argument("--n-gen", type=int, default=64)
            p.add_argument("--reps", type=int, default=2)
            p.add_argument("--method", default="compresskv")
            # the Rust tool of src/bin (cargo build --release --features llama --bins)
            p.add_argument("--tool", default=os.environ.get("COMPRESSKV_BENCH_TOOL",
                                                          os.path.join(ROOT, "target/release/llama-compresskv-bench")))
        elif name == "bounded":
            p.add_argument("--chars", default="26000")
            p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
            p.add_argument("--budget", type=int, default=512)
            p.add_argument("--ctx-full", type=int, default=8192, help="-c of a configuration without @C")
            p.add_argument("--configs", default="full,oneshot,question@2048,recent@2048,question@4096")
            p.add_argument("--n-predict", type=int, default=32)
        else:
            p.add_argument("--tokens", default="1024,2048,4096,8192")
            p.add_argument("--chars-per-token", type=float, default=4.4)
            p.add_argument("--budget", type=int, default=256)
            p.add_argument("--methods", default="full,compresskv")
            p.add_argument("--n-predict", type=int, default=128)
    args = ap.parse_args()
    {"needle": needle_cmd, "speed": speed_cmd, "bounded": bounded_cmd, "kvspeed": kvspeed_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
