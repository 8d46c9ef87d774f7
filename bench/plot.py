#!/usr/bin/env python3
"""Plots and tables from the harness's JSON: PNG figures (bench/figures.py, matplotlib: bench/requirements.txt)
and the Markdown tables that bench/results/README.md quotes.

    pip install -r bench/requirements.txt
    python3 bench/plot.py [--needle bench/results/needle-*.json] [--speed bench/results/speed-smollm2-cpu.json]

writes, for every needle grid (one per model), bench/plots/needle-heatmaps-<model>.png (every method x budget),
bench/plots/needle/*.png (one per method and budget) and bench/plots/retention-<model>.png (needle score kept vs
KV kept); bench/plots/decode-speed-<model>.png, bench/results/summary.md, bench/results/profiles.md from
bench/results/profile-*.json, bench/results/ruler.md from bench/results/ruler-*.json, bench/results/bounded.md, and
bench/results/kvspeed.md + bench/plots/kvspeed-<name>.png from bench/results/kvspeed-*.json (llama-compresskv-bench,
bench/gpu.sh); then refreshes the copies of those tables quoted between `<!-- BEGIN path -->` and
`<!-- END path -->` in bench/results/README.md (the results page; also bench/results/tune.md, which
bench/tune.py writes). The landing README.md keeps one static table and quotes nothing, but a marker pair
added there is refreshed too.
"""
import argparse
import glob
import json
import re
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    print("wrote", os.path.relpath(path, ROOT))


def grid_table(d, title, with_cells):
    """Needle word score per method and budget (the full cache in every column), mean over the grid's prompts;
    with_cells: the mean occupied KV cells per layer beside each score."""
    rows = d["rows"]
    budgets = sorted({r["budget"] for r in rows if r["budget"]})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n_prompts = len({(r["chars"], r["depth"]) for r in rows})
    sizes = sorted({r["n_prompt"] for r in rows if r.get("n_prompt")})
    done = "" if d.get("complete", True) else " (grid interrupted: the prompts finished so far)"
    out = [title.format(n_prompts=n_prompts, lo=sizes[0], hi=sizes[-1], done=done, model=d["model"],
                        command=d["command"]), "",
           "| method | " + " | ".join(f"budget {b}" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            sel = [r for r in rows if r["method"] == m and (r["budget"] == b or m == "full")]
            if not sel:
                cells.append("")
                continue
            text = f"{sum(r['score'] for r in sel) / len(sel):.2f}"
            occ = [r.get("cells_after", r.get("n_prompt")) for r in sel]
            if with_cells and all(occ):
                text += f" ({sum(occ) / len(occ):.0f})"
            cells.append(text)
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def retention_points(d):
    """{method: [(KV kept, score kept)]} of a needle grid: per budget, the mean fraction of the prompt's cells
    kept and the sum of scores over the full cache's sum, on the prompts the full cache scores > 0."""
    rows = d["rows"]
    full = {(r["chars"], r["depth"]): r["score"] for r in rows if r["method"] == "full"}
    acc = {}
    for r in rows:
        key = (r["chars"], r["depth"])
        if r["method"] == "full" or not full.get(key) or not r.get("n_prompt"):
            continue
        a = acc.setdefault(r["method"], {}).setdefault(r["budget"], [0.0, 0.0, 0.0, 0])
        a[0] += r["score"]
        a[1] += full[key]
        a[2] += min(1.0, r.get("cells_after", r["n_prompt"]) / r["n_prompt"])
        a[3] += 1
    return {m: [(kv / n, s / f) for (s, f, kv, n) in per.values()] for m, per in acc.items()}


def needle_table(d):
    """Mean needle score per method and budget, with the mean KV MiB the sequence occupies after compression
    (--compresskv-stats kv_bytes_after; the full cache's: kv_bytes_before of the same prompts)."""
    rows = d["rows"]
    budgets = sorted({r["budget"] for r in rows if r["budget"]})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "full"]
    prompts = {(r["chars"], r["depth"]) for r in rows}
    sizes = sorted({r["n_prompt"] for r in rows if r.get("n_prompt")})
    full_bytes = {}
    for r in rows:
        if r.get("kv_bytes_before"):
            full_bytes[(r["chars"], r["depth"])] = r["kv_bytes_before"]
    done = "" if d.get("complete", True) else " (grid interrupted: the prompts finished so far)"
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["chars"] for r in rows})
    out = [f"Needle word score (mean KV MiB occupied), {len(prompts)} prompts ({len(lengths)} lengths x "
           f"{len(depths)} depths) of {sizes[0]}-{sizes[-1]} tokens{done} ({d['model']}; `{d['command']}`):", ""]
    full = [r for r in rows if r["method"] == "full"]
    if full:
        fb = [full_bytes[(r["chars"], r["depth"])] for r in full if (r["chars"], r["depth"]) in full_bytes]
        mib = f" ({sum(fb) / len(fb) / 2 ** 20:.1f})" if fb else ""
        out += [f"full cache: {sum(r['score'] for r in full) / len(full):.2f}{mib}", ""]
    out += ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            sel = [r for r in rows if r["method"] == m and r["budget"] == b]
            if not sel:
                cells.append("")
                continue
            text = f"{sum(r['score'] for r in sel) / len(sel):.2f}"
            kb = [r["kv_bytes_after"] for r in sel if r.get("kv_bytes_after")]
            if kb:
                text += f" ({sum(kb) / len(kb) / 2 ** 20:.1f})"
            cells.append(text)
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def speed_table(d):
    out = [f"Decode speed ({d['model']}, {d['threads']} threads, {d['n_predict']} tokens decoded; `{d['command']}`):",
           "", "| prompt tokens | method | cells after | KV MiB | decode tok/s | compression ms | time to first token |",
           "|---|---|---|---|---|---|---|"]
    full_kv = {r["n_prompt"]: r["kv_bytes_before"] for r in d["rows"] if r.get("kv_bytes_before")}
    for r in d["rows"]:
        cells = r.get("cells_after", r.get("n_prompt"))
        kv = r.get("kv_bytes_after", full_kv.get(r.get("n_prompt")))
        # time to first token: the prompt's prefill (llama.cpp's prompt eval time) plus the compression step
        pre = r["n_prompt"] / r["prompt_tps"] * 1000 if r.get("n_prompt") and r.get("prompt_tps") else None
        ms = r.get("ms_total")
        ttft = "" if pre is None else f"{(pre + (ms or 0)) / 1000:.2f} s" + (f" ({ms / pre:.1%} compression)" if ms else "")
        out.append(f"| {r.get('n_prompt')} | {r['method']} | {cells} | "
                   f"{'' if kv is None else f'{kv / 1048576:.1f}'} | {r.get('decode_tps')} | "
                   f"{'' if ms is None else round(ms, 1)} | {ttft} |")
    return "\n".join(out)


def profile_table(d):
    """The profile comparison: needle word score and mean occupied KV cells per method and budget."""
    return grid_table(d, "{model}: needle word score (mean occupied KV cells per layer), {n_prompts} held-out "
                         "prompts of {lo}-{hi} tokens{done}; `{command}`:", with_cells=True)


RULER_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


def ruler_table(d):
    """RULER (bench/ruler.py): mean score per task x (method, budget) for each length, the mean over tasks (each
    task weighted equally) and the fraction of the full cache's mean that each method keeps."""
    out = []
    for length in sorted({r["length"] for r in d["rows"]}):
        rows = [r for r in d["rows"] if r["length"] == length]
        cols = list(dict.fromkeys((r["method"], r["budget"]) for r in sorted(
            rows, key=lambda r: (r["method"] != "full", r["budget"] or 0, list(d["methods"]).index(r["method"])))))
        tasks = [t for t in RULER_TASKS if any(r["task"] == t for r in rows)]
        n = {t: len({r["sample"] for r in rows if r["task"] == t}) for t in tasks}
        sizes = sorted(r["n_prompt"] for r in rows if r.get("n_prompt"))
        done = "" if d.get("complete", True) else " (run interrupted: the samples finished so far)"
        share = ", context prefilled once per sample and shared by every method" if d.get("share_prefix") else ""
        if d.get("bounded_ctx"):
            share = (f"; **bounded-memory prefill**: the compressed methods run with -c {d['bounded_ctx']} (the prompt "
                     f"prefilled in chunks, window: {d.get('overflow_window')}), the full cache with -c {length + 64}")
        if d.get("placement") == "agnostic" and d.get("engine") == "bench":
            share += ("; **query-agnostic**, one process (`llama-compresskv-bench --agnostic`): each context is "
                      "prefilled once, every method compresses a restored copy of its cache before the question "
                      f"arrives (`/end`: scored by its own last tokens, `/probe`: by the fixed instruction "
                      f"{d.get('probe_text')!r}; `gate`: the profile's key gate"
                      f"{'; `/recon`: by reconstruction, --compresskv-reconstruct, its scores shared by the ratios of one context' if any(m.endswith('/recon') for m in d['methods']) else ''}"
                      "), then the question is decoded into "
                      "it and answered greedily; `/aware`: compressed after the question (the upper reference); "
                      "`-X%`: the fraction of the cells removed")
        elif d.get("placement") == "agnostic":
            share += (f"; **query-agnostic**: each context compressed before its question arrives (`/end`: scored by "
                      f"its own last tokens, `/probe`: by the fixed instruction {d.get('probe_text')!r}, decoded for "
                      f"scoring only{', `/recon`: by reconstruction, --compresskv-reconstruct' if any(m.endswith('/recon') for m in d['methods']) else ''}), saved with --prompt-cache and loaded by a run without --compresskv that "
                      f"decodes the question and answers")
        out += [f"RULER {length} ({d['model']}): score (0-1) per task, {min(n.values())}-{max(n.values())} samples per "
                f"task, prompts of {sizes[0]}-{sizes[-1]} tokens{done}{share}; `{d['command']}`:", "",
                "| task | " + " | ".join(m if b is None else f"{m}@{b}" if isinstance(b, int) else f"{m} -{b:.0%}"
                                       for m, b in cols) + " |",
                "|---|" + "---|" * len(cols)]
        mean = {}
        for t in tasks:
            cells = []
            for c in cols:
                v = [r["score"] for r in rows if r["task"] == t and (r["method"], r["budget"]) == c]
                if v:
                    mean.setdefault(c, []).append(sum(v) / len(v))
                cells.append(f"{sum(v) / len(v):.2f}" if v else "")
            out.append(f"| {t} (n={n[t]}) | " + " | ".join(cells) + " |")
        avg = {c: sum(v) / len(v) for c, v in mean.items()}
        out.append("| **mean over tasks** | " + " | ".join(f"**{avg[c]:.3f}**" if c in avg else "" for c in cols) + " |")
        full = avg.get(("full", None))
        if full:
            out.append("| kept of full | " + " | ".join(f"{avg[c] / full:.0%}" if c in avg else "" for c in cols) + " |")
        if all(r.get("peak_rss_mib") for r in rows):
            rss = {c: max(r["peak_rss_mib"] for r in rows if (r["method"], r["budget"]) == c) for c in cols}
            out.append("| peak RSS | " + " | ".join(f"{rss[c]:.0f} MiB" for c in cols) + " |")
        if any(r.get("n_compressions") for r in rows):
            held = {c: max(r.get("cells_after_max") or 0 for r in rows if (r["method"], r["budget"]) == c) for c in cols}
            out.append("| cells held after a pass, at most | " + " | ".join(str(held[c] or "") for c in cols) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def bounded_table(d):
    """Prompts longer than the context: score per depth and configuration, memory, passes."""
    configs = list(d["configs"])
    depths = sorted({r["depth"] for r in d["rows"]})
    by = {(r["config"], r["depth"]): r for r in d["rows"]}
    out = [f"{d['model']}: needle word score, {d['rows'][0]['chars']}-character prompts "
           f"({d['rows'][0].get('final', {}).get('n_prompt') or d['rows'][0].get('n_prompt')} tokens), budget {d['budget']} cells after the "
           f"prompt; `{d['command']}`" + ("" if d.get("complete") else " (incomplete grid)"), "",
           "| configuration | -c | " + " | ".join(f"depth {x:g}" for x in depths) + " | mean | passes | cells held at most | peak RSS |",
           "|---|---|" + "---|" * len(depths) + "---|---|---|---|"]
    for c in configs:
        rows = [by[(c, x)] for x in depths if (c, x) in by]
        if not rows:
            continue
        held = max(r.get("cells_before") or r.get("n_prompt") or 0 for r in rows)  # before the first pass: the most
        cells = [by[(c, x)]["score"] if (c, x) in by else None for x in depths]
        out.append(f"| {c.split('@')[0]} | {rows[0]['ctx']} | " + " | ".join("" if v is None else f"{v:.2f}" for v in cells)
                   + f" | {sum(r['score'] for r in rows) / len(rows):.2f} | {max(r.get('n_compressions') or 0 for r in rows)}"
                   + f" | {held} | {max(r['peak_rss_mib'] for r in rows):.0f} MiB |")
    return "\n".join(out)


def kvspeed_device(d):
    """Where a llama-compresskv-bench run ran: its GPUs, else the host CPU and threads."""
    gpus = ", ".join(x["description"] for x in d.get("devices", []) if "CPU" not in x["name"].upper())
    return gpus or f"{d.get('machine', {}).get('host_cpu', 'CPU')}, {d['threads']} threads"


def kvspeed_table(d, name):
    """llama-compresskv-bench rows: per depth, the full cache and each budget (speed-up, compression time)."""
    rows = [r for r in d["rows"] if r.get("ok")]
    budgets = sorted({r["budget"] for r in rows if r["budget"]})
    dev = kvspeed_device(d)
    out = [f"{d.get('model', name)}: {os.path.basename(d['model_path'])} ({d['model_desc']}, {d['n_layer']} layers, {d['n_head']}/{d['n_head_kv']} heads, KV "
           f"{d['type_k']}/{d['type_v']}), {dev}, flash attention {d['flash_attn']}, {d['n_gen']} tokens x "
           f"{d['reps']} decoded per row, method {d['method']}, depths run in the order "
           f"{', '.join(map(str, dict.fromkeys(r['depth'] for r in d['rows'])))}; "
           f"`{d.get('command', 'llama-compresskv-bench')}`"
           + ("" if d.get("complete") else " (run interrupted: the rows finished so far)"), "",
           "| depth | full: decode tok/s | full: prefill s | full: KV MiB | " +
           " | ".join(f"@{b}: decode tok/s (x full) | @{b}: compression s (share of TTFT)" for b in budgets) + " |",
           "|---" * (4 + 2 * len(budgets)) + "|"]
    for depth in sorted({r["depth"] for r in rows}):
        full = next((r for r in rows if r["depth"] == depth and not r["budget"]), None)
        cells = [f"{depth}"]
        cells += ["", "", ""] if full is None else [f"{full['decode_tps_mean']:.1f}", f"{full['prefill_s']:.2f}",
                                                   f"{full['kv_bytes_used'] / 2 ** 20:.0f}"]
        for b in budgets:
            r = next((r for r in rows if r["depth"] == depth and r["budget"] == b), None)
            if r is None:
                cells += ["", ""]
                continue
            x = f" ({r['decode_tps_mean'] / full['decode_tps_mean']:.2f}x)" if full else ""
            cells += [f"{r['decode_tps_mean']:.1f}{x}", f"{r['compress_s']:.2f} ({r['ttft_share']:.0%})"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--needle", nargs="*", help="needle grids (default: bench/results/needle-*.json, one per model)",
                    default=sorted(glob.glob(os.path.join(ROOT, "bench/results/needle-*.json")),
                                   key=lambda f: ("smollm2" not in f, f)))
    ap.add_argument("--speed", default=os.path.join(ROOT, "bench/results/speed-smollm2-cpu.json"))
    args = ap.parse_args()
    parts = []
    try:
        import figures
    except ImportError as e:
        figures = None
        print(f"plot.py: no figures ({e}): pip install -r bench/requirements.txt")
    plots = os.path.join(ROOT, "bench/plots")
    for path in args.needle:
        d = json.load(open(path))
        if figures:
            figures.needle_heatmaps(d, plots)
            figures.retention(retention_points(d), d["model"], os.path.join(plots, f"retention-{d['model']}.png"))
        parts.append(needle_table(d))
    if os.path.exists(args.speed):
        d = json.load(open(args.speed))
        if figures:
            figures.decode_speed(d, os.path.join(plots, f"decode-speed-{d['model']}.png"))
        parts.append(speed_table(d))
    kvs = []
    # by name without ".json", so that a run (kvspeed-X) comes before its variants (kvspeed-X-reversed)
    for f in sorted(glob.glob(os.path.join(ROOT, "bench/results/kvspeed-*.json")), key=lambda f: f[:-len(".json")]):
        d = json.load(open(f))
        name = os.path.basename(f)[len("kvspeed-"):-len(".json")]
        if figures:
            figures.kvspeed(d, kvspeed_device(d), os.path.join(plots, f"kvspeed-{name}.png"))
        kvs.append(kvspeed_table(d, name))
    if kvs:
        write(os.path.join(ROOT, "bench/results/kvspeed.md"), "\n\n".join(kvs))
    write(os.path.join(ROOT, "bench/results/summary.md"), "\n\n".join(parts))
    prof = [profile_table(json.load(open(f))) for f in sorted(glob.glob(os.path.join(ROOT, "bench/results/profile-*.json")))]
    if prof:
        write(os.path.join(ROOT, "bench/results/profiles.md"), "\n\n".join(prof))
    ruler = []
    for f in sorted(glob.glob(os.path.join(ROOT, "bench/results/ruler-*.json"))):
        d = json.load(open(f))
        ruler.append(ruler_table(d))
        if figures and os.path.basename(f).startswith("ruler-kvpress-") and "pilot" not in f:
            figures.kvpress(d, os.path.join(plots, f"kvpress-{d['model']}.png"))
    if ruler:
        write(os.path.join(ROOT, "bench/results/ruler.md"), "\n\n".join(ruler))
    bounded = [bounded_table(json.load(open(f))) for f in sorted(glob.glob(os.path.join(ROOT, "bench/results/bounded-*.json")))]
    if bounded:
        write(os.path.join(ROOT, "bench/results/bounded.md"), "\n\n".join(bounded))
    sync_readme()


# the Markdown files that quote generated tables between markers, relative to the repository root
QUOTING = ["bench/results/README.md", "README.md"]


def sync_readme():
    """Files in QUOTING quote the tables between `<!-- BEGIN path -->` and `<!-- END path -->`: refresh them."""
    for rel in QUOTING:
        path = os.path.join(ROOT, rel)
        if not os.path.exists(path):
            continue
        text = open(path).read()

        def fill(m):
            src = os.path.join(ROOT, m.group(1))
            return m.group(0) if not os.path.exists(src) else \
                f"<!-- BEGIN {m.group(1)} -->\n{open(src).read().strip()}\n<!-- END {m.group(1)} -->"
        new = re.sub(r"<!-- BEGIN (\S+) -->\n.*?<!-- END \1 -->", fill, text, flags=re.S)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print(f"updated the tables in {rel}")


if __name__ == "__main__":
    main()
