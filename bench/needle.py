#!/usr/bin/env python3
"""Needle-in-a-haystack prompts over Paul Graham essays (the standard filler).

    python3 bench/needle.py --essays DIR --chars 14000 --depth 0.5 [--template chatml] > prompt.txt
    python3 bench/needle.py --essays DIR --needle "The best thing to do in Oslo is ..." \
        --question "What is the best thing to do in Oslo?" > prompt.txt     # a needle of your own

The haystack is the essays concatenated in sorted file order, cut to --chars characters at a sentence
boundary; the needle sentence is inserted at the sentence boundary nearest to --depth (0..1) of it. The
prompt is the chat-formatted context + question, ending with the assistant header (the generation prompt).
Deterministic: same arguments, same bytes.
"""
import argparse
import os
import re
import sys

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"

TEMPLATES = {
    # SmolLM2 / Qwen2.5 style ChatML
    "chatml": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
               "<|im_start|>assistant\n"),
    "none": "{user}\n",
}


def haystack(essays_dir, n_chars):
    text = []
    total = 0
    for name in sorted(os.listdir(essays_dir)):
        if not name.endswith(".txt"):
            continue
        with open(os.path.join(essays_dir, name), encoding="utf-8") as f:
            t = f.read().strip()
        text.append(t)
        total += len(t)
        if total > n_chars + 1000:
            break
    s = re.sub(r"\s+", " ", " ".join(text))
    s = s[:n_chars]
    cut = s.rfind(". ")
    return s[: cut + 1] if cut > 0 else s


def insert_needle(hay, depth, needle=NEEDLE):
    if depth >= 1.0:
        return hay + " " + needle
    target = int(len(hay) * depth)
    # nearest sentence boundary at or before the target
    cut = hay.rfind(". ", 0, target)
    if cut < 0 or depth <= 0.0:
        return needle + " " + hay
    return hay[: cut + 1] + " " + needle + hay[cut + 1 :]


def prompt(essays_dir, n_chars, depth, template="chatml", needle=NEEDLE, question=QUESTION):
    ctx = insert_needle(haystack(essays_dir, n_chars), depth, needle)
    # the question comes last, as in the standard needle-in-a-haystack prompt
    user = ("Read the document below and answer the question at the end in one sentence, using the document.\n\n"
            "<document>\n" + ctx + "\n</document>\n\nQuestion: " + question)
    return TEMPLATES[template].format(user=user)


def score(answer, expected=ANSWER):
    """Fraction of the expected answer's words present in the answer (case-insensitive)."""
    words = re.findall(r"[a-z]+", expected.lower())
    got = set(re.findall(r"[a-z]+", answer.lower()))
    return sum(w in got for w in words) / len(words)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--essays", required=True)
    ap.add_argument("--chars", type=int, default=14000)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--template", choices=sorted(TEMPLATES), default="chatml")
    ap.add_argument("--needle", default=NEEDLE, help="the needle sentence (default: the San Francisco needle)")
    ap.add_argument("--question", default=QUESTION, help="the question asked at the end (default: its question)")
    ap.add_argument("--score", metavar="ANSWER_FILE", help="print the word score of an answer file instead")
    a = ap.parse_args()
    if a.score:
        with open(a.score, encoding="utf-8", errors="replace") as f:
            print(f"{score(f.read()):.3f}")
        return
    if not 0.0 <= a.depth <= 1.0:
        sys.exit("needle.py: --depth must be in [0, 1]")
    sys.stdout.write(prompt(a.essays, a.chars, a.depth, a.template, a.needle, a.question))


if __name__ == "__main__":
    main()
