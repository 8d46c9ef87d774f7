#!/usr/bin/env python3
"""Plots and tables from the harness's JSON (no plotting library needed: plain SVG and Markdown).

    python3 bench/plot.py [--needle bench/results/needle-smollm2-cpu.json]
                          [--speed bench/results/speed-smollm2-cpu.json] [--core bench/results/core-cpu.json]

writes bench/plots/needle-heatmap.svg, bench/plots/decode-speed.svg and bench/results/summary.md (the
tables the README quotes), bench/results/profiles.md from bench/results/profile-*.json and bench/results/ruler.md
(RULER scores per task and method) from bench/results/ruler-*.json.
"""
import argparse
import glob
import json
import re
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def color(v):
    """Score 0..1 -> red..yellow..green."""
    v = max(0.0, min(1.0, v))
    if v < 0.5:
        r, g = 220, int(60 + 2 * v * 160)
    else:
        r, g = int(220 - (v - 0.5) * 2 * 180), 200
    return f"rgb({r},{g},70)"


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;")


def heatmap(d, path):
    rows = d["rows"]
    prompts = []
    for r in rows:
        key = (r["chars"], r["depth"])
        if key not in prompts:
            prompts.append(key)
    n_tok = {}
    for r in rows:
        if r.get("n_prompt"):
            n_tok[(r["chars"], r["depth"])] = r["n_prompt"]
    lines = []
    for r in rows:
        key = (r["method"], r["budget"])
        if key not in lines:
            lines.append(key)
    score = {(r["method"], r["budget"], r["chars"], r["depth"]): r["score"] for r in rows}
    cw, ch, left, top = 46, 22, 190, 70
    W = left + cw * len(prompts) + 70
    H = top + ch * len(lines) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13">Needle word score, {esc(d["model"])} '
           f'({esc(d["machine"]["host_cpu"][:40])}), greedy</text>']
    for j, (chars, depth) in enumerate(prompts):
        x = left + j * cw + cw / 2
        out.append(f'<text x="{x}" y="{top - 22}" text-anchor="middle">{n_tok.get((chars, depth), "?")}</text>')
        out.append(f'<text x="{x}" y="{top - 8}" text-anchor="middle">d{depth:g}</text>')
    out.append(f'<text x="{left - 6}" y="{top - 22}" text-anchor="end">prompt tokens</text>')
    out.append(f'<text x="{left - 6}" y="{top - 8}" text-anchor="end">needle depth</text>')
    for i, (m, b) in enumerate(lines):
        y = top + i * ch
        out.append(f'<text x="{left - 6}" y="{y + ch * 0.7}" text-anchor="end">{esc(m)}'
                   f'{"" if b is None else " @" + str(b)}</text>')
        vals = []
        for j, (chars, depth) in enumerate(prompts):
            v = score.get((m, b, chars, depth))
            if v is None:
                continue
            vals.append(v)
            x = left + j * cw
            out.append(f'<rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{color(v)}"/>')
            out.append(f'<text x="{x + cw / 2}" y="{y + ch * 0.7}" text-anchor="middle">{v:.2f}</text>')
        if vals:
            out.append(f'<text x="{left + cw * len(prompts) + 6}" y="{y + ch * 0.7}">mean {sum(vals) / len(vals):.2f}</text>')
    out.append("</svg>")
    write(path, "\n".join(out))


def speed_plot(d, path):
    rows = [r for r in d["rows"] if r.get("decode_tps")]
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    xs = sorted({r["n_prompt"] for r in rows if r.get("n_prompt")})
    ymax = max(r["decode_tps"] for r in rows) * 1.15
    W, H, l, b, t, rgt = 560, 360, 60, 50, 40, 150
    pw, ph = W - l - rgt, H - t - b
    xmax = max(xs) * 1.05

    def px(x):
        return l + pw * x / xmax

    def py(y):
        return t + ph * (1 - y / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{l}" y="20" font-size="13">Decode speed vs prompt length, {esc(d["model"])}, '
           f'{d["threads"]} threads</text>',
           f'<line x1="{l}" y1="{t + ph}" x2="{l + pw}" y2="{t + ph}" stroke="black"/>',
           f'<line x1="{l}" y1="{t}" x2="{l}" y2="{t + ph}" stroke="black"/>',
           f'<text x="{l + pw / 2}" y="{H - 12}" text-anchor="middle">prompt tokens</text>',
           f'<text x="16" y="{t + ph / 2}" transform="rotate(-90 16 {t + ph / 2})" text-anchor="middle">decode tokens/s</text>']
    for x in xs:
        out.append(f'<text x="{px(x)}" y="{t + ph + 16}" text-anchor="middle">{x}</text>')
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000) if ymax / s <= 8)
    y = 0.0
    while y <= ymax:
        out.append(f'<text x="{l - 6}" y="{py(y) + 4}" text-anchor="end">{y:g}</text>')
        out.append(f'<line x1="{l}" y1="{py(y)}" x2="{l + pw}" y2="{py(y)}" stroke="#ddd"/>')
        y += step
    palette = ["#444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    for k, m in enumerate(methods):
        pts = sorted((r["n_prompt"], r["decode_tps"]) for r in rows if r["method"] == m)
        c = palette[k % len(palette)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts) + '"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
        label = m if m == "full" else f"{m} @{d['budget']}"
        out.append(f'<text x="{l + pw + 10}" y="{t + 16 * (k + 1)}" fill="{c}">{esc(label)}</text>')
    out.append("</svg>")
    write(path, "\n".join(out))


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


def needle_table(d):
    return grid_table(d, "Needle word score, mean over {n_prompts} prompts of {lo}-{hi} tokens{done} "
                         "({model}; `{command}`):", with_cells=False)


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
        if d.get("placement") == "agnostic":
            share += (f"; **query-agnostic**: each context compressed before its question arrives (`/end`: scored by "
                      f"its own last tokens, `/probe`: by the fixed instruction {d.get('probe_text')!r}, decoded for "
                      f"scoring only), saved with --prompt-cache and loaded by a run without --compresskv that "
                      f"decodes the question and answers")
        out += [f"RULER {length} ({d['model']}): score (0-1) per task, {min(n.values())}-{max(n.values())} samples per "
                f"task, prompts of {sizes[0]}-{sizes[-1]} tokens{done}{share}; `{d['command']}`:", "",
                "| task | " + " | ".join(m if b is None else f"{m}@{b}" for m, b in cols) + " |",
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--needle", default=os.path.join(ROOT, "bench/results/needle-smollm2-cpu.json"))
    ap.add_argument("--speed", default=os.path.join(ROOT, "bench/results/speed-smollm2-cpu.json"))
    args = ap.parse_args()
    parts = []
    if os.path.exists(args.needle):
        d = json.load(open(args.needle))
        heatmap(d, os.path.join(ROOT, "bench/plots/needle-heatmap.svg"))
        parts.append(needle_table(d))
    if os.path.exists(args.speed):
        d = json.load(open(args.speed))
        speed_plot(d, os.path.join(ROOT, "bench/plots/decode-speed.svg"))
        parts.append(speed_table(d))
    write(os.path.join(ROOT, "bench/results/summary.md"), "\n\n".join(parts))
    prof = [profile_table(json.load(open(f))) for f in sorted(glob.glob(os.path.join(ROOT, "bench/results/profile-*.json")))]
    if prof:
        write(os.path.join(ROOT, "bench/results/profiles.md"), "\n\n".join(prof))
    ruler = [ruler_table(json.load(open(f))) for f in sorted(glob.glob(os.path.join(ROOT, "bench/results/ruler-*.json")))]
    if ruler:
        write(os.path.join(ROOT, "bench/results/ruler.md"), "\n\n".join(ruler))
    bounded = [bounded_table(json.load(open(f))) for f in sorted(glob.glob(os.path.join(ROOT, "bench/results/bounded-*.json")))]
    if bounded:
        write(os.path.join(ROOT, "bench/results/bounded.md"), "\n\n".join(bounded))
    sync_readme()


def sync_readme():
    """The README quotes the tables between `<!-- BEGIN path -->` and `<!-- END path -->`: refresh them."""
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    def fill(m):
        src = os.path.join(ROOT, m.group(1))
        return m.group(0) if not os.path.exists(src) else \
            f"<!-- BEGIN {m.group(1)} -->\n{open(src).read().strip()}\n<!-- END {m.group(1)} -->"
    new = re.sub(r"<!-- BEGIN (\S+) -->\n.*?<!-- END \1 -->", fill, text, flags=re.S)
    if new != text:
        with open(path, "w") as f:
            f.write(new)
        print("updated the tables in README.md")


if __name__ == "__main__":
    main()
