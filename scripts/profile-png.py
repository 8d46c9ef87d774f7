#!/usr/bin/env python3
"""Two PNG pictures of a model profile (Python 3 standard library only: zlib and struct, no plotting library).

    python3 scripts/profile-png.py PROFILE.json [OUTDIR]

writes, beside the profile (or in OUTDIR, created if missing), and prints the two paths:

- <stem>-heads.png: heat map of head_scores, one row per layer (layer 0 at the top), one column per query
  head (head 0 on the left). Each layer's scores are divided by that layer's largest score, so every row
  spans the colour map (dark purple 0 .. yellow 1, viridis-like) and its ranking is visible whatever the
  layer's scale; a layer whose scores are all <= 0 is min-max scaled instead. The top-4 heads of each layer
  in head_ranking (its SRHs at the default n_srh) carry a white dot ringed in black. Gridlines every cell,
  darker every 5 layers / heads; under the map, a strip of the colour map from 0 (left) to 1 (right).
- <stem>-layers.png: bar chart of layer_weights, one bar per layer, layer 0 on the left, 200 px tall for
  5% above the largest weight; a faint dashed line at the uniform weight 1/n_layer.

No text is drawn. The output is a pure function of the input (no timestamps): the same profile gives the
same bytes. Exit status 2, with a message, if the file is missing, not JSON, or lacks the fields.
"""
import json
import math
import os
import struct
import sys
import zlib

TOP = 4  # SRHs marked per layer

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID = (222, 222, 222)
GRID_MAJOR = (150, 150, 150)
FRAME = (90, 90, 90)
BAR = (33, 145, 140)  # the middle of the colour map
UNIFORM = (120, 120, 120)

# viridis at 0, 1/4, 1/2, 3/4, 1
STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colormap(v):
    """0..1 -> RGB, piecewise linear through STOPS."""
    v = min(1.0, max(0.0, v))
    x = v * (len(STOPS) - 1)
    i = min(int(x), len(STOPS) - 2)
    t = x - i
    a, b = STOPS[i], STOPS[i + 1]
    return tuple(int(round(a[k] + (b[k] - a[k]) * t)) for k in range(3))


class Canvas:
    """An RGB image, rows of bytearrays."""

    def __init__(self, w, h, bg=WHITE):
        self.w, self.h = w, h
        self.rows = [bytearray(bytes(bg) * w) for _ in range(h)]

    def rect(self, x, y, w, h, c):
        """Fill [x, x+w) x [y, y+h), clipped."""
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.w, x + w), min(self.h, y + h)
        if x0 >= x1:
            return
        run = bytes(c) * (x1 - x0)
        for yy in range(y0, y1):
            self.rows[yy][3 * x0 : 3 * x1] = run

    def blend(self, x, y, c, alpha):
        if 0 <= x < self.w and 0 <= y < self.h:
            r = self.rows[y]
            for k in range(3):
                r[3 * x + k] = int(round(r[3 * x + k] * (1 - alpha) + c[k] * alpha))

    def png(self):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        raw = b"".join(b"\x00" + bytes(r) for r in self.rows)  # filter type 0 on every row
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))  # 8-bit RGB
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def normalise(row):
    """A layer's scores to [0, 1]: divided by the maximum, or min-max if the maximum is <= 0."""
    hi, lo = max(row), min(row)
    if hi > 0:
        return [max(0.0, s / hi) for s in row]
    if hi > lo:
        return [(s - lo) / (hi - lo) for s in row]
    return [0.0 for _ in row]


def heads_png(scores, ranking):
    n_layer, n_head = len(scores), len(scores[0])
    cell = max(4, min(16, 1024 // n_head, 1024 // n_layer))
    m = 8  # margin
    gw, gh = n_head * (cell + 1) + 1, n_layer * (cell + 1) + 1  # grid with its lines
    strip = 10
    c = Canvas(2 * m + gw, 2 * m + gh + 6 + strip)
    # gridlines: the grid's background, major every 5, frame last
    c.rect(m, m, gw, gh, GRID)
    for i in range(0, n_head + 1, 5):
        c.rect(m + i * (cell + 1), m, 1, gh, GRID_MAJOR)
    for j in range(0, n_layer + 1, 5):
        c.rect(m, m + j * (cell + 1), gw, 1, GRID_MAJOR)
    for side in ((m, m, gw, 1), (m, m + gh - 1, gw, 1), (m, m, 1, gh), (m + gw - 1, m, 1, gh)):
        c.rect(*side, FRAME)
    dot = 6 if cell >= 12 else (4 if cell >= 8 else 2)
    for l in range(n_layer):
        y = m + 1 + l * (cell + 1)
        for h, v in enumerate(normalise(scores[l])):
            c.rect(m + 1 + h * (cell + 1), y, cell, cell, colormap(v))
        for h in ranking[l][:TOP]:
            x0 = m + 1 + h * (cell + 1) + (cell - dot) // 2
            y0 = y + (cell - dot) // 2
            if dot > 2:
                c.rect(x0, y0, dot, dot, BLACK)
                c.rect(x0 + 1, y0 + 1, dot - 2, dot - 2, WHITE)
            else:
                c.rect(x0, y0, dot, dot, WHITE)
    # the colour map, 0 .. 1 left to right, framed
    y = m + gh + 6
    c.rect(m, y, gw, strip, FRAME)
    for x in range(gw - 2):
        c.rect(m + 1 + x, y + 1, 1, strip - 2, colormap(x / max(1, gw - 3)))
    return c.png()


def layers_png(weights):
    n = len(weights)
    bar, gap, height, m = 12, 4, 200, 8
    top = 1.05 * max(max(weights), 1.0 / n)  # headroom above the tallest bar
    pw = n * (bar + gap) + gap  # plot area
    c = Canvas(2 * m + pw + 2, 2 * m + height + 2)
    x0, y0 = m + 1, m + 1  # inside the frame; the baseline is the frame's bottom
    # faint horizontal gridlines at quarters of the scale
    for q in (1, 2, 3):
        c.rect(x0, y0 + height - int(round(height * q / 4)), pw, 1, (240, 240, 240))
    for i, w in enumerate(weights):
        h = int(round(height * w / top))
        if w > 0:
            h = max(h, 1)
        c.rect(x0 + gap + i * (bar + gap), y0 + height - h, bar, h, BAR)
        if i % 5 == 0:  # tick every 5 layers, under the baseline
            c.rect(x0 + gap + i * (bar + gap) + bar // 2, y0 + height + 1, 1, 4, FRAME)
    # the uniform weight 1/n: faint dashed line over everything
    yu = y0 + height - int(round(height * (1.0 / n) / top))
    for x in range(x0, x0 + pw):
        if (x - x0) % 6 < 4:
            c.blend(x, yu, UNIFORM, 0.6)
    # frame: left and bottom axes dark, top and right light
    c.rect(m, m, pw + 2, 1, GRID)
    c.rect(m + pw + 1, m, 1, height + 2, GRID)
    c.rect(m, m, 1, height + 2, FRAME)
    c.rect(m, m + height + 1, pw + 2, 1, FRAME)
    return c.png()


def fail(msg):
    print(f"profile-png: {msg}", file=sys.stderr)
    sys.exit(2)


def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load(path):
    """The profile's head_scores, head_ranking, layer_weights, checked for shape; fail() otherwise."""
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read: {e}")
    except ValueError as e:
        fail(f"{path}: not valid JSON: {e}")
    if not isinstance(d, dict):
        fail(f"{path}: not a JSON object (expected a compresskv profile)")
    missing = [k for k in ("head_scores", "head_ranking", "layer_weights") if k not in d]
    if missing:
        fail(f"{path}: missing {', '.join(missing)} (expected a compresskv profile)")
    scores, ranking, weights = d["head_scores"], d["head_ranking"], d["layer_weights"]
    if not isinstance(scores, list) or not scores or not all(isinstance(r, list) and r for r in scores):
        fail(f"{path}: head_scores: expected a non-empty list of non-empty lists")
    n_layer, n_head = len(scores), len(scores[0])
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    if model.get("n_layer", n_layer) != n_layer:
        fail(f"{path}: head_scores: {n_layer} rows, model.n_layer is {model['n_layer']}")
    if model.get("n_head", n_head) != n_head:
        fail(f"{path}: head_scores[0]: {n_head} entries, model.n_head is {model['n_head']}")
    for l, row in enumerate(scores):
        if len(row) != n_head or not all(number(s) for s in row):
            fail(f"{path}: head_scores[{l}]: expected {n_head} finite numbers")
    if not isinstance(ranking, list) or len(ranking) != n_layer:
        fail(f"{path}: head_ranking: expected {n_layer} rows (one per layer)")
    for l, row in enumerate(ranking):
        if not isinstance(row, list) or sorted(row) != list(range(n_head)):
            fail(f"{path}: head_ranking[{l}]: expected a permutation of 0..{n_head}")
    if not isinstance(weights, list) or len(weights) != n_layer or not all(number(w) and w >= 0 for w in weights):
        fail(f"{path}: layer_weights: expected {n_layer} finite numbers >= 0")
    return scores, ranking, weights


def main(argv):
    if len(argv) in (2, 3) and argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0)
    if len(argv) not in (2, 3):
        print("usage: profile-png.py PROFILE.json [OUTDIR]", file=sys.stderr)
        sys.exit(2)
    path = argv[1]
    scores, ranking, weights = load(path)
    outdir = argv[2] if len(argv) == 3 else (os.path.dirname(path) or ".")
    stem = os.path.basename(path)
    if stem.endswith(".json"):
        stem = stem[: -len(".json")]
    try:
        os.makedirs(outdir, exist_ok=True)
        out = []
        for name, data in (("heads", heads_png(scores, ranking)), ("layers", layers_png(weights))):
            p = os.path.join(outdir, f"{stem}-{name}.png")
            with open(p, "wb") as f:
                f.write(data)
            out.append(p)
    except OSError as e:
        fail(f"cannot write into {outdir}: {e}")
    for p in out:
        print(p)


if __name__ == "__main__":
    main(sys.argv)
