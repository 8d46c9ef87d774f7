"""The benchmark figures as PNG, drawn with matplotlib (bench/requirements.txt pins it):

    needle heat maps     bench/plots/needle/<model>-<method>-<budget>.png, one per (model, method, budget):
                         depth (0-100%) x prompt tokens, the needle word score in each cell, red (0) to green (1)
    needle overview      bench/plots/needle-heatmaps-<model>.png: every method x budget map of one grid
    decode speed         bench/plots/decode-speed-<model>.png: decode tokens/s vs prompt tokens, one line per method
    quality vs KV        bench/plots/retention-<model>.png: the fraction of the full cache's score kept against
                         the fraction of the KV cache kept, one line per method (the paper's headline figure)
    query-agnostic       bench/plots/kvpress-<model>.png: RULER's mean score (% of the full cache's) against the
                         fraction of the context removed before its question, one line per method

Called by bench/plot.py, which also writes the Markdown tables; each function takes the harness's JSON as loaded.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the needle-in-a-haystack convention: red at 0, yellow at 0.5, green at 1
CMAP = LinearSegmentedColormap.from_list("needle", ["#d7191c", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"])


def _save(fig, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print("wrote", os.path.relpath(path, ROOT))


def _needle_grid(d):
    """(lengths, depths, tokens per length, {(method, budget): {(chars, depth): score}}) of a needle JSON."""
    rows = d["rows"]
    lengths = sorted({r["chars"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    tok = {}
    for r in rows:
        if r.get("n_prompt"):
            tok.setdefault(r["chars"], []).append(r["n_prompt"])
    tokens = {c: round(sum(v) / len(v)) for c, v in tok.items()}
    maps = {}
    for r in rows:
        maps.setdefault((r["method"], r["budget"]), {})[(r["chars"], r["depth"])] = r["score"]
    return lengths, depths, tokens, maps


def _draw_map(ax, lengths, depths, tokens, cells, title, annotate=True):
    import numpy as np
    z = np.full((len(depths), len(lengths)), np.nan)
    for (c, dp), v in cells.items():
        z[depths.index(dp), lengths.index(c)] = v
    im = ax.imshow(z, cmap=CMAP, vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(tokens.get(c, c)) for c in lengths])
    ax.set_yticks(range(len(depths)), [f"{dp * 100:.0f}%" for dp in depths])
    mean = np.nanmean(z) if np.isfinite(z).any() else float("nan")
    ax.set_title(f"{title}  (mean {mean:.2f})", fontsize=9)
    if annotate:
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if np.isfinite(z[i, j]):
                    ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=6.5)
    return im


def needle_heatmaps(d, out_dir):
    """One PNG per (method, budget) and an overview of them all; returns the overview's path."""
    lengths, depths, tokens, maps = _needle_grid(d)
    model = d["model"]
    for (m, b), cells in maps.items():
        fig, ax = plt.subplots(figsize=(1.1 + 0.9 * len(lengths), 0.9 + 0.32 * len(depths)))
        im = _draw_map(ax, lengths, depths, tokens, cells, f"{model}: {m}" + ("" if b is None else f" @ {b} cells"))
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        fig.colorbar(im, ax=ax, fraction=0.05)
        _save(fig, os.path.join(out_dir, "needle", f"{model}-{m}" + ("" if b is None else f"-{b}") + ".png"))
    methods = [m for m in dict.fromkeys(k[0] for k in maps) if m != "full"]
    budgets = sorted({b for (_, b) in maps if b is not None})
    ncol = max(1, len(budgets))
    fig, axes = plt.subplots(len(methods) + 1, ncol, figsize=(2.3 * ncol + 1, 2.2 * (len(methods) + 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    if ("full", None) in maps:
        ax = axes[0][0]
        ax.set_visible(True)
        _draw_map(ax, lengths, depths, tokens, maps[("full", None)], "full cache", annotate=False)
    for i, m in enumerate(methods, start=1):
        for j, b in enumerate(budgets):
            if (m, b) in maps:
                ax = axes[i][j]
                ax.set_visible(True)
                _draw_map(ax, lengths, depths, tokens, maps[(m, b)], f"{m} @ {b}", annotate=False)
    for ax in axes.flat:
        ax.tick_params(labelsize=6)
    fig.suptitle(f"Needle word score, {model} (rows: methods; columns: budgets in KV cells; x: prompt tokens, "
                 f"y: depth)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"needle-heatmaps-{model}.png")
    _save(fig, path)
    return path


def decode_speed(d, path):
    rows = [r for r in d["rows"] if r.get("decode_tps")]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["n_prompt"], r["decode_tps"]) for r in rows if r["method"] == m)
        label = m if m == "full" else f"{m} @ {d.get('budget')}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("prompt tokens (context depth)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"Decode speed vs depth, {d['model']}, {d.get('threads')} threads "
                 f"({d['machine']['host_cpu'][:32]})", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def kvspeed(d, dev, path):
    """llama-compresskv-bench rows: decode tok/s vs depth, one line per budget (full: the whole depth in cells)."""
    rows = [r for r in d["rows"] if r.get("ok") and r.get("decode_tps_mean")]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for b in sorted({r["budget"] or 0 for r in rows}):
        pts = sorted((max(r["depth"], 1), r["decode_tps_mean"]) for r in rows if (r["budget"] or 0) == b)
        label = "full cache" if b == 0 else f"{d['method']} @ {b} cells"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                color="black" if b == 0 else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context depth (prompt tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"Decode speed vs depth: {os.path.basename(d['model_path'])}, {dev}\n(a compressed cache of B cells can at best "
                 f"match the full cache at depth B)", fontsize=8)
    ax.legend(fontsize=8)
    _save(fig, path)


def retention(points, model, path):
    """points: {method: [(kv fraction, score fraction), ...]}."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m, pts in points.items():
        pts = sorted(pts)
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache kept (% of the prompt's cells)")
    ax.set_ylabel("score kept (% of the full cache's)")
    ax.set_ylim(0, 110)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Needle score kept vs KV cache kept, {model}", fontsize=9)
    _save(fig, path)


def kvpress(d, path):
    """RULER query-agnostic (bench/ruler.py --engine bench): the mean over tasks (each task weighted equally) of
    every method at every removed fraction, as a share of the full cache's mean; the goals of 95% at 0.5 and 90%
    at 0.75 marked."""
    rows = d["rows"]
    tasks = sorted({r["task"] for r in rows})

    def mean(method, budget):
        per = [[r["score"] for r in rows if r["task"] == t and r["method"] == method and r["budget"] == budget]
               for t in tasks]
        per = [sum(v) / len(v) for v in per if v]
        return sum(per) / len(per) if len(per) == len(tasks) else None
    full = mean("full", None)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        pts = sorted((b, mean(m, b)) for b in {r["budget"] for r in rows if r["method"] == m})
        pts = [(b, v) for b, v in pts if v is not None]
        ax.plot([100 * b for b, _ in pts], [100 * v / full for _, v in pts], marker="o", label=m)
    ax.scatter([50, 75], [95, 90], marker="*", s=120, color="black", label="goal", zorder=5)
    ax.set_xlabel("context removed before the question (% of its cells)")
    ax.set_ylabel("RULER score kept (% of the full cache's)")
    ax.set_ylim(0, 110)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = min(len({r["sample"] for r in rows if r["task"] == t}) for t in tasks)
    part = "" if d.get("complete", True) else "; run interrupted: some methods on fewer"
    ax.set_title(f"RULER {rows[0]['length']}, query-agnostic, {d['model']} ({n} samples x {len(tasks)} tasks{part})",
                 fontsize=9)
    _save(fig, path)
