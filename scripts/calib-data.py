#!/usr/bin/env python3
"""Prompts for llama-compresskv-calibrate: needle probes (SRH identification) and held-out QA samples
(per-layer eviction error).

    python3 scripts/calib-data.py --essays DIR --hotpotqa FILE --out DIR \
        [--lengths 1000,2000,3000,4500,6000] [--depths 0.1,0.3,0.5,0.7,0.9] [--calib 16] [--calib-tokens 2500]

Writes DIR/probes.jsonl and DIR/calib.jsonl, one JSON object per line with the fields the tool reads:
id, set, pre, span, post (the user message is pre + span + post; span is the answer clause the heads are
credited for), answer, meta.

Held out from the benchmarks by construction:
- the needles are our own three sentences (the benchmarks use the San Francisco needle), and the filler is the
  essays in *reverse* file order (the benchmark haystack starts at the first essay);
- the QA samples are HotpotQA dev questions taken from the end of the file (the last 1000 entries), their
  context built from their own paragraphs plus paragraphs of other questions in that range.
Lengths are targets in tokens, converted with --chars-per-token (the tool reports the real counts).
Deterministic: same arguments, same bytes.
"""
import argparse
import json
import os
import random
import re

NEEDLES = [
    # (sentence before the answer, answer clause, sentence after, question)
    ("The secret ingredient in Grandma Alma's lemon cake is ", "a spoonful of lavender honey", ".",
     "What is the secret ingredient in Grandma Alma's lemon cake?"),
    ("Every spring, the lighthouse keeper on Marrow Island ", "paints the tower door bright orange", ".",
     "What does the lighthouse keeper on Marrow Island do every spring?"),
    ("The spare key to the old observatory is hidden ", "under the third stone of the garden path", ".",
     "Where is the spare key to the old observatory hidden?"),
]

INSTRUCTION = "Read the document below and answer the question at the end in one sentence, using the document.\n\n"


def essays_text(essays_dir):
    parts = []
    for name in sorted(os.listdir(essays_dir), reverse=True):
        if name.endswith(".txt"):
            with open(os.path.join(essays_dir, name), encoding="utf-8") as f:
                parts.append(f.read().strip())
    return re.sub(r"\s+", " ", " ".join(parts))


def cut_sentence(s, n_chars):
    s = s[:n_chars]
    cut = s.rfind(". ")
    return s[: cut + 1] if cut > 0 else s


def needle_probes(essays_dir, lengths, depths, cpt):
    text = essays_text(essays_dir)
    out = []
    for ni, (before, span, after, question) in enumerate(NEEDLES):
        # each needle gets its own stretch of filler
        start = text.find(". ", ni * len(text) // (len(NEEDLES) + 1)) + 2
        for length in lengths:
            hay = cut_sentence(text[start:], int(length * cpt))
            for depth in depths:
                at = hay.rfind(". ", 0, int(len(hay) * depth))
                at = 0 if at < 0 else at + 2
                pre = INSTRUCTION + "<document>\n" + hay[:at] + before
                post = after + " " + hay[at:] + "\n</document>\n\nQuestion: " + question
                out.append({
                    "id": f"needle{ni}-L{length}-d{depth:g}",
                    "set": "needle",
                    "pre": pre, "span": span, "post": post, "answer": span,
                    "meta": {"needle": ni, "length": length, "depth": depth},
                })
    return out


def qa_samples(hotpotqa, n, tokens, cpt, seed):
    with open(hotpotqa, encoding="utf-8") as f:
        data = json.load(f)
    pool = data[-1000:]
    rng = random.Random(seed)
    picks = rng.sample(range(len(pool)), n)
    paras = [(i, title + ". " + "".join(sents)) for i, e in enumerate(pool) for title, sents in e["context"]]
    out = []
    for k, qi in enumerate(picks):
        e = pool[qi]
        own = [p for i, p in paras if i == qi]
        others = [p for i, p in paras if i != qi]
        rng.shuffle(others)
        docs = list(own)
        budget = int(tokens * cpt)
        for p in others:
            if sum(len(d) for d in docs) + len(p) > budget:
                break
            docs.append(p)
        rng.shuffle(docs)
        ctx = "\n\n".join(f"Document {j + 1}:\n{d}" for j, d in enumerate(docs))
        user = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                "other words.\n\nThe following are given documents.\n\n" + ctx + "\n\nAnswer the question based "
                "on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: "
                + e["question"] + " Answer:")
        out.append({"id": f"hotpotqa-{e['_id']}", "set": "hotpotqa", "pre": user, "span": "", "post": "",
                    "answer": e["answer"], "meta": {"index": len(data) - 1000 + qi}})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--essays", required=True)
    ap.add_argument("--hotpotqa", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="1000,2000,3000,4500,6000")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--calib-tokens", type=int, default=2500)
    ap.add_argument("--chars-per-token", type=float, default=4.2)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    os.makedirs(a.out, exist_ok=True)
    probes = needle_probes(a.essays, lengths, depths, a.chars_per_token)
    calib = qa_samples(a.hotpotqa, a.calib, a.calib_tokens, a.chars_per_token, a.seed)
    for name, rows in (("probes.jsonl", probes), ("calib.jsonl", calib)):
        with open(os.path.join(a.out, name), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{a.out}/probes.jsonl: {len(probes)} probes; {a.out}/calib.jsonl: {len(calib)} samples")


if __name__ == "__main__":
    main()
