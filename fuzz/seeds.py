#!/usr/bin/env python3
"""Seeds of the fuzz corpora (used by scripts/fuzz.sh).

The tracked seeds are few (fuzz/seeds/<target>/, a few dozen files per target, chosen by coverage); the
working corpus (fuzz/corpus/<target>/, git-ignored) is made from them at run time and grows on the machine
that fuzzes, between runs.

  seeds.py gen TARGET DIR        write the inputs generated at run time into DIR: for profile_parse the
                                 shipped profiles (profiles/*.json, as seed-<name>), for every target
                                 pseudo-random inputs of 8 B to 4 KiB (gen-<size>-<i>; the targets decode
                                 their bytes with arbitrary's Unstructured, and longer inputs reach larger
                                 shapes). Deterministic: the same files every time.
  seeds.py select CTL N OUT      from a libFuzzer -set_cover_merge control file CTL (every file's full
                                 feature set), pick at most N files greedily by the edges, then the
                                 features, they add to those of the generated inputs (ties: the smaller), leaving out the
                                 generated ones and files over SEED_MAX_BYTES (default 4096); replace OUT's
                                 files with them (named by SHA-1, as libFuzzer does). Prints a JSON summary.
"""
import hashlib
import json
import os
import random
import shutil
import sys


def gen(target, out):
    os.makedirs(out, exist_ok=True)
    n = 0
    if target == "profile_parse":
        # the last byte of an input picks the model description, the rest is the JSON text
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "profiles")
        for name in sorted(os.listdir(root)):
            if name.endswith(".json"):
                shutil.copyfile(os.path.join(root, name), os.path.join(out, "seed-" + name))
                n += 1
    rng = random.Random("compresskv-fuzz-" + target)
    for size in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        for i in range(2):
            data = bytes(rng.getrandbits(8) for _ in range(size))
            with open(os.path.join(out, f"gen-{size}-{i}"), "wb") as f:
                f.write(data)
            n += 1
    print(f"{n} generated seeds in {out}")


def parse_control(path):
    with open(path) as f:
        lines = f.read().splitlines()
    n = int(lines[0])
    names = lines[2 : 2 + n]
    sizes, feats = {}, {}
    for line in lines[2 + n :]:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "STARTED":
            sizes[int(parts[1])] = int(parts[2])
        elif parts[0] == "FT":
            feats[int(parts[1])] = set(map(int, parts[2:]))
    return names, sizes, feats


def select(ctl, limit, out):
    max_bytes = int(os.environ.get("SEED_MAX_BYTES", "4096"))
    names, sizes, feats = parse_control(ctl)
    every = set().union(*feats.values()) if feats else set()
    cands = {
        i: f
        for i, f in feats.items()
        if not os.path.basename(names[i]).startswith(("seed-", "gen-")) and sizes.get(i, 0) <= max_bytes
    }
    # what the inputs generated at run time cover already: the seeds are chosen to add to it
    generated = set().union(
        *(f for i, f in feats.items() if os.path.basename(names[i]).startswith(("seed-", "gen-")))
    )
    # libFuzzer's features are edge * 8 + a bucket of its hit count (then a few stack-depth ones): new edges
    # (code reached) first, then new features
    edges = {i: {x >> 3 for x in f} for i, f in feats.items()}
    covered, covered_edges, chosen = set(generated), {x >> 3 for x in generated}, []
    while len(chosen) < limit and cands:
        best = max(
            cands,
            key=lambda i: (len(edges[i] - covered_edges), len(cands[i] - covered), -sizes.get(i, 0)),
        )
        if not cands[best] - covered:
            break
        covered |= cands.pop(best)
        covered_edges |= edges[best]
        chosen.append(best)
    seeds_alone = set().union(*(feats[i] for i in chosen))
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    nbytes = 0
    for i in chosen:
        with open(names[i], "rb") as f:
            data = f.read()
        nbytes += len(data)
        with open(os.path.join(out, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)
    print(
        json.dumps(
            {
                "corpus_files": len(names),
                "corpus_features": len(every),
                "seed_files": len(chosen),
                "seed_bytes": nbytes,
                "generated_features": len(generated),
                "seed_features": len(seeds_alone),
                "seed_and_generated_features": len(covered),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "gen":
        gen(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "select":
        select(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(__doc__)
