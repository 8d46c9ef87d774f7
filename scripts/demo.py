#!/usr/bin/env python3
"""The demo's chat (scripts/demo.sh runs it): a long document and its question, then follow-up questions, as a
conversation with llama-server, once with the full cache and once with --compresskv. Per turn it prints both
answers, the seconds the turn took, the tokens it prefilled and the slot's KV memory.

    python3 scripts/demo.py --model M.gguf --essays DIR --out DIR [--chars N] [-- extra llama-server flags]

The first message holds the document (Paul Graham essays with the needle sentence at half depth) and the
question. The follow-ups ask about what the first answer found: a compressed conversation keeps what its
questions attended to, and questions about other parts of the document are the query-agnostic scoring issue
(docs/usage.md, "A context compressed before its question").
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from needle import score  # noqa: E402

FOLLOW_UPS = [
    ("Where in San Francisco should one sit, according to the document?", "dolores park"),
    ("And what should one eat there?", "sandwich"),
]


def call(port, path, body=None, timeout=1800):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


def chat(a, name, flags):
    """One conversation through a fresh llama-server: a row per turn."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(a.out, f"server-{name}.log")
    p = subprocess.Popen([os.path.join(ROOT, "vendor/build/bin/llama-server"), "-m", a.model, "-c", "8192", "-np", "1",
                          "-t", str(os.cpu_count()), "--no-warmup", "--host", "127.0.0.1", "--port", str(port)] + flags,
                         stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        for _ in range(600):
            try:
                if call(port, "/health", timeout=5).get("status") == "ok":
                    break
            except Exception:
                time.sleep(0.2)
        else:
            sys.exit(f"llama-server did not come up: {log}")
        doc = subprocess.run([sys.executable, os.path.join(ROOT, "bench/needle.py"), "--essays", a.essays, "--chars",
                              str(a.chars), "--depth", "0.5", "--template", "none"], check=True, capture_output=True,
                             text=True).stdout
        messages, rows = [{"role": "user", "content": doc}], []
        for turn in range(len(FOLLOW_UPS) + 1):
            t0 = time.time()
            r = call(port, "/v1/chat/completions", {"messages": messages, "max_tokens": 48, "temperature": 0, "seed": 1})
            answer = r["choices"][0]["message"]["content"].strip()
            rows.append({"s": time.time() - t0, "prefilled": r["timings"]["prompt_n"], "reused": r["timings"]["cache_n"],
                         "decode_tps": r["timings"]["predicted_per_second"], "cells": call(port, "/slots")[0].get("n_cells"),
                         "answer": answer})
            print(f"  {name}, turn {turn + 1}: {rows[-1]['s']:.1f} s", flush=True)
            if turn < len(FOLLOW_UPS):
                messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UPS[turn][0]}]
        return rows
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--essays", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chars", type=int, default=24000, help="document characters (~4.3 characters a token)")
    ap.add_argument("flags", nargs="*", help="extra llama-server flags for the compressed run (after --)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    stats = os.path.join(a.out, "stats.jsonl")
    if os.path.exists(stats):
        os.remove(stats)
    print(f"model {os.path.basename(a.model)}; {os.cpu_count()} threads")
    full = chat(a, "full cache", [])
    ckv = chat(a, "--compresskv", ["--compresskv", "--compresskv-stats", stats] + a.flags)
    lines = [json.loads(x) for x in open(stats)] if os.path.exists(stats) else []
    if not lines:
        sys.exit("--compresskv did not compress: see " + os.path.join(a.out, "server---compresskv.log"))
    # KV bytes per cell: the same model and cache type in both runs
    per_cell = lines[0]["kv_bytes_before"] / lines[0]["cells_before"]
    print(f"\nthe document and its question: {full[0]['prefilled']} tokens; budget {lines[0]['budget']} cells, "
          f"method {lines[0]['method']}; {len(lines)} compressions")
    questions = ["What is the best thing to do in San Francisco? (with the document)"] + [q for q, _ in FOLLOW_UPS]
    for turn, q in enumerate(questions):
        print(f"\nturn {turn + 1}: {q}")
        for name, rows in (("full cache", full), ("--compresskv", ckv)):
            r = rows[turn]
            right = score(r["answer"]) if turn == 0 else float(FOLLOW_UPS[turn - 1][1] in r["answer"].lower())
            print(f"  [{name:>12}] {r['answer']!r}")
            print(f"  {'':>14} right: {right:.2f}   {r['s']:.1f} s   prefilled {r['prefilled']} tokens (reused "
                  f"{r['reused']})   KV {r['cells'] * per_cell / 1048576:.1f} MiB ({r['cells']} cells)   decode "
                  f"{r['decode_tps']:.1f} tokens/s")


if __name__ == "__main__":
    main()
