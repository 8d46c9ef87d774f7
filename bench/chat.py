#!/usr/bin/env python3
"""A long document, then a chat of many turns through llama-server's /v1/chat/completions: the full-cache server
(upstream behaviour: the slot reuses its prompt prefix) against --compresskv (the slot reuses its compressed
history and is compressed again past --compresskv-trigger), same model, same document, same questions, one slot.

    python3 bench/chat.py [--model qwen05] [--budget 512] [--turns 30] [--chars 14000]

Per turn and configuration it records the wall time of the request, timings.prompt_n (tokens prefilled) and
cache_n (tokens reused), the slot's KV cells (/slots n_cells) and their MiB, and the answer with whether it
names the fact asked. The compressed configurations are the scoring options that exist (the question-anchored
window, the window at the end, a probe text, the key gate, reconstruction) and a trigger of twice the budget. The document holds six facts at depths 0.1 .. 0.9; turn 0 asks the first, every later turn
asks the next one, round robin, so later turns ask facts whose text the compressed slot may have evicted.
Writes bench/results/chat-<model>-cpu.json (and bench/plots/chat-<model>.png with matplotlib installed:
bench/requirements.txt).
"""
import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from harness import git_commit, machine, write  # noqa: E402

FACTS = [
    ("The secret code of the vault is 4917.", "What is the secret code of the vault?", "4917"),
    ("Maria's favourite fruit is the mango.", "What is Maria's favourite fruit?", "mango"),
    ("The meeting with the architects is on Thursday.", "On which day is the meeting with the architects?", "thursday"),
    ("The red bicycle belongs to Professor Okafor.", "Who owns the red bicycle?", "okafor"),
    ("The museum's new wing is painted turquoise.", "What colour is the museum's new wing?", "turquoise"),
    ("The ferry to the island leaves at 7:45.", "When does the ferry to the island leave?", "7:45"),
]


# a fixed instruction for query-agnostic scoring (--compresskv-probe): what later questions will ask for
PROBE = "Answer questions about the document: the names, numbers, places, days, times and colours it mentions."


def document(essays, chars):
    text = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(essays, "*.txt"))))[:chars]
    out, at = [], 0
    for i, (fact, _, _) in enumerate(FACTS):
        cut = text.rfind(". ", 0, int(len(text) * (0.1 + 0.8 * i / (len(FACTS) - 1)))) + 2
        out += [text[at:cut], fact, " "]
        at = cut
    return "".join(out + [text[at:]])


def call(port, path, body=None, timeout=900):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


def serve(binary, model, args, threads, ctx, log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([binary, "-m", model, "-t", str(threads), "-c", str(ctx), "-np", "1", "--no-warmup",
                          "--host", "127.0.0.1", "--port", str(port)] + args, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    for _ in range(600):
        try:
            if call(port, "/health", timeout=5).get("status") == "ok":
                return p, port
        except Exception:
            time.sleep(0.2)
    p.kill()
    sys.exit(f"llama-server did not come up: {log}")


def bytes_per_cell(stats):
    """KV bytes of one cell (all layers, K and V) from a --compresskv-stats line: the same for every configuration
    of one model and cache type."""
    for line in open(stats):
        s = json.loads(line)
        return s["kv_bytes_after"] / s["cells_after"]


def run(name, extra, a, model, doc):
    log = os.path.join(a.tmp, f"chat-{name}.log")
    stats = os.path.join(a.tmp, f"chat-{name}.jsonl")
    if os.path.exists(stats):
        os.remove(stats)
    p, port = serve(a.server, model, extra + (["--compresskv-stats", stats] if extra else []), a.threads, a.ctx, log)
    try:
        rows, messages = [], [{"role": "user", "content": f"Read this document, then answer my questions.\n\n{doc}\n\n{FACTS[0][1]}"}]
        for turn in range(a.turns + 1):
            _, question, want = FACTS[turn % len(FACTS)]
            t0 = time.time()
            r = call(port, "/v1/chat/completions", {"messages": messages, "max_tokens": a.n_predict, "temperature": 0, "seed": 1})
            dt = time.time() - t0
            answer = r["choices"][0]["message"]["content"]
            slot = call(port, "/slots")[0]
            rows.append({"turn": turn, "s": round(dt, 3), "prompt_n": r["timings"]["prompt_n"], "cache_n": r["timings"]["cache_n"],
                         "ms_prompt": r["timings"]["prompt_ms"], "ms_decode": r["timings"]["predicted_ms"],
                         "n_cells": slot.get("n_cells"), "history": slot.get("n_prompt_tokens"),
                         "fact": want, "right": want in answer.lower(), "answer": answer})
            print(f"{name} turn {turn}: {dt:.2f} s, prefilled {rows[-1]['prompt_n']}, reused {rows[-1]['cache_n']}, "
                  f"{rows[-1]['n_cells']} cells, {'right' if rows[-1]['right'] else 'wrong'}: {answer[:60]!r}", flush=True)
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FACTS[(turn + 1) % len(FACTS)][1]}]
    finally:
        p.kill()
        p.wait()
    return {"args": extra, "rows": rows, "stats": stats if extra else None,
            "compressions": sum(1 for _ in open(stats)) if extra else 0}


def summarize(c, bpc):
    rows = c["rows"]
    for r in rows:
        r["kv_mib"] = round(r["n_cells"] * bpc / 1048576, 2)
    later = rows[1:]
    c["summary"] = {
        "s_first": rows[0]["s"], "s_later_mean": round(sum(r["s"] for r in later) / len(later), 3),
        "s_later_max": max(r["s"] for r in later), "prefilled_later_mean": round(sum(r["prompt_n"] for r in later) / len(later), 1),
        "kv_mib_max": max(r["kv_mib"] for r in rows), "kv_mib_last": rows[-1]["kv_mib"], "compressions": c["compressions"],
        "right": sum(r["right"] for r in rows), "right_later": sum(r["right"] for r in later), "turns": len(rows)}


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib (pip install -r bench/requirements.txt): no plot")
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, c in res["configs"].items():
        t = [r["turn"] for r in c["rows"]]
        ax[0].plot(t[1:], [r["s"] for r in c["rows"]][1:], marker=".", label=name)
        ax[1].plot(t, [r["kv_mib"] for r in c["rows"]], marker=".", label=name)
        right, acc = 0, []
        for r in c["rows"]:
            right += r["right"]
            acc.append(right)
        ax[2].plot(t, acc, marker=".", label=name)
    ax[0].set(title="seconds per turn (after the document)", xlabel="turn")
    ax[1].set(title="KV MiB of the slot", xlabel="turn")
    ax[2].set(title="facts answered right (cumulative)", xlabel="turn")
    for x in ax:
        x.legend()
    fig.suptitle(f"chat over a {res['doc_tokens']}-token document, {res['model']}, budget {res['budget']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    print("wrote", os.path.relpath(path, ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen05", help="scripts/fetch-model.sh name (smollm2, qwen05, qwen15)")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--turns", type=int, default=30, help="turns after the first")
    ap.add_argument("--chars", type=int, default=14000, help="document characters")
    ap.add_argument("--n-predict", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--server", default=os.path.join(ROOT, "vendor/build/bin/llama-server"))
    ap.add_argument("--tmp", default=os.path.join(ROOT, "target/bench-chat"))
    ap.add_argument("--out")
    ap.add_argument("--only", action="append", help="a configuration's name (repeatable): run these and merge them "
                    "into --out's existing JSON (same model, budget and turns), keeping its other configurations")
    a = ap.parse_args()
    os.makedirs(a.tmp, exist_ok=True)
    model = subprocess.run([os.path.join(ROOT, "scripts/fetch-model.sh"), a.model], check=True, capture_output=True, text=True).stdout.strip()
    essays = subprocess.run([os.path.join(ROOT, "scripts/fetch-data.sh")], check=True, capture_output=True, text=True).stdout.strip()
    doc = document(essays, a.chars)
    ckv = ["--compresskv", "--compresskv-budget", str(a.budget)]
    configs = {
        "full cache": [],
        # the scoring options that exist, each compressing after every prompt past the budget
        "compresskv": ckv,
        "compresskv, window at the end": ckv + ["--compresskv-window-anchor", "end"],
        "compresskv, probe": ckv + ["--compresskv-probe", PROBE],
        # query-agnostic scorers: the profile's key gate (no queries), and reconstruction (all heads, one token set
        # per layer: a compressed slot is compressed again, which needs it)
        "compresskv, key gate": ckv + ["--compresskv-method", "gate"],
        "compresskv, reconstruction": ckv + ["--compresskv-method", "snapkv", "--compresskv-reconstruct"],
        # compressed again only past twice the budget: fewer compressions, more memory
        "compresskv, trigger 2x": ckv + ["--compresskv-trigger", str(2 * a.budget)],
    }
    res = {"bench": "chat", "model": a.model, "budget": a.budget, "turns": a.turns, "n_predict": a.n_predict,
           "machine": machine(), "commit": git_commit(), "configs": {}}
    out = a.out or os.path.join(ROOT, f"bench/results/chat-{a.model}-cpu.json")
    only = a.only or list(configs)
    unknown = [n for n in only if n not in configs]
    if unknown:
        sys.exit(f"chat.py: unknown configuration(s) {unknown}; expected some of {list(configs)}")
    if a.only:
        with open(out) as f:
            prev = json.load(f)
        if (prev["model"], prev["budget"], prev["turns"], prev["n_predict"]) != (a.model, a.budget, a.turns, a.n_predict):
            sys.exit(f"chat.py: {out} is another run (model, budget, turns, n_predict differ)")
        res["configs"] = prev["configs"]
        res["merged"] = prev.get("merged", []) + [{"configs": only, "commit": res["commit"], "machine": res["machine"],
                                                    "date": time.strftime("%Y-%m-%dT%H:%M:%S")}]
        res["commit"], res["machine"] = prev["commit"], prev["machine"]
    for name in only:
        res["configs"][name] = run(name, configs[name], a, model, doc)
    res["doc_tokens"] = res["configs"]["full cache"]["rows"][0]["prompt_n"]
    res["kv_bytes_per_cell"] = bytes_per_cell(res["configs"]["compresskv"]["stats"])
    for c in res["configs"].values():
        summarize(c, res["kv_bytes_per_cell"])
    write(out, res)
    for name, c in res["configs"].items():
        print(name, json.dumps(c["summary"]))
    plot(res, os.path.join(ROOT, f"bench/plots/chat-{a.model}.png"))


if __name__ == "__main__":
    main()
