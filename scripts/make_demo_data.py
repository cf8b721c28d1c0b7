#!/usr/bin/env python3
"""Build the demo data set (data/demo/): a pretraining corpus plus SFT, preference, RL and eval
files, all derived from WordNet 3.0 and two human-written FAQs, with lemma-level splits.

Run (as root, Python 3 standard library only):

    python3 scripts/make_demo_data.py                       # small: rewrites data/demo/ (committed)
    python3 scripts/make_demo_data.py --size medium --out /tmp/demo-medium
    python3 scripts/make_demo_data.py --size large  --out /tmp/demo-large

Packages (wordnet-base, perl-doc, debian-faq) are fetched and unpacked exactly as
scripts/make_corpus.py does, whose parsers this script reuses. The output depends only on the
package contents, --size and --seed.

Lemmas are split three ways:
  train    their meaning is in the corpus AND in the SFT / preference / RL data;
  heldout  their meaning is in the corpus only (SFT never shows them);
  control  they occur nowhere: not in the corpus, not in SFT or preference text.
heldout and control are drawn from one pool (lemmas that occur in no text built for train, the
FAQs or the question lists) and assigned by a seeded hash, so the two groups are alike in
difficulty; the only difference is whether the lemma's own documents are in the corpus.
Each lemma contributes ONE sense (its most frequent), so "What does 'X' mean?" has one answer.

Files (JSONL, one object per line, UTF-8): corpus.jsonl, sft.jsonl, prefs.jsonl,
eval_questions.jsonl, eval_prefs.jsonl, eval_probe.jsonl, rl_prompts.jsonl; plus splits.json,
README.md and LICENSES.md. The formats are in docs/FORMATS.md ("Demo data").
"""

import argparse
import json
import os
import random
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_corpus as mc  # noqa: E402  (the package fetch and the WordNet / FAQ parsers)
from demo_data_docs import licenses, readme, sha256  # noqa: E402  (README.md, LICENSES.md)

SIZES = {
    # train/heldout/control: lemma counts; eval_train: train lemmas also asked in eval_questions;
    # rl: train lemmas in rl_prompts; trim_perlfaq: shorten perlfaq answers (code-heavy bulk);
    # tagged_only: lemmas must occur in WordNet's sense-tagged counts (cntlist.rev).
    "small": {"train": 400, "heldout": 150, "control": 150, "eval_train": 100, "rl": 200,
              "trim_perlfaq": True, "tagged_only": True},
    "medium": {"train": 5000, "heldout": 1000, "control": 1000, "eval_train": 500, "rl": 2000,
               "trim_perlfaq": False, "tagged_only": True},
    "large": {"train": 20000, "heldout": 2000, "control": 2000, "eval_train": 1000, "rl": 5000,
              "trim_perlfaq": False, "tagged_only": False},
}
MAX_DEFINITION = 90   # characters: short glosses, so a tiny model can reproduce an answer
MAX_FAQ_QUESTION = 80  # characters: FAQ questions used as rejected replies
PERLFAQ_MAX_CODE_LINES = 6
PERLFAQ_MAX_CHARS = 400
LIST_HEADERS = ["Frequently asked word questions", "Questions readers ask about words",
                "Word questions from the mailbag", "Vocabulary questions",
                "More questions about words", "What people ask about English words"]
KIND_MIX = [("hard", 50), ("question", 30), ("random", 20)]  # percent


def rank(seed, key):
    return mc.seeded_rank(seed, key)


def rank_int(seed, key):
    return int(rank(seed, key)[:12], 16)


def words(text):
    """Lower-cased whole words: the unit of every 'does lemma X occur in this text' check."""
    return set(re.findall(r"\w+", text.lower()))


def question(lemma):
    return f"What does '{lemma}' mean?"


def gloss_sentence(definition):
    """The SFT answer: the gloss capitalised, ending with a full stop."""
    d = definition.strip()
    return mc.cap(d) + ("" if d.endswith((".", "!", "?")) else ".")


def example_sentence(example):
    e = example.strip()
    return mc.cap(e) + ("" if e.endswith((".", "!", "?")) else ".")


# ----------------------------------------------------------------------------- WordNet

class Lexicon:
    """WordNet with each eligible lemma's most frequent sense, and hypernym children."""

    def __init__(self, root, tagged_only):
        wn_dir = os.path.join(root, "usr/share/wordnet")
        self.data, self.index, self.counts = mc.load_wordnet(wn_dir)
        self.sense = {}
        for lemma in mc.eligible_lemmas(self.index, self.data, self.counts, tagged_only):
            ss, _tags = mc.lemma_senses(lemma, self.data, self.index, self.counts)[0]
            if len(ss["definition"]) <= MAX_DEFINITION:
                self.sense[lemma] = ss
        self.children = {}
        self.by_lexfile = {}
        self.all_synsets = []
        self.keys = {}
        for pos in sorted(self.data):
            for off in sorted(self.data[pos]):
                ss = self.data[pos][off]
                if not ss["definition"]:
                    continue
                key = (pos, off)
                self.keys[id(ss)] = key
                self.all_synsets.append(key)
                self.by_lexfile.setdefault((pos, ss["lexfile"]), []).append(key)
                for h in ss["hypernyms"]:
                    self.children.setdefault((pos, h), []).append(key)

    def synset(self, key):
        return self.data[key[0]][key[1]]

    def key_of(self, ss):
        return self.keys[id(ss)]


def entry_document(lemma, ss, data):
    """Dictionary-entry form: headword, part of speech, gloss, example, synonyms, broader term."""
    line = f"{lemma} ({mc.POS_NAME[ss['pos']]}): {ss['definition']}."
    examples = mc.lemma_examples(lemma, ss)
    if examples:
        line += f" \"{examples[0]}\""
    lines = [line]
    synonyms = list(dict.fromkeys(mc.lemma_phrase(w) for w, _ in ss["words"] if w != lemma))[:4]
    if synonyms:
        lines.append("Synonyms: " + ", ".join(synonyms) + ".")
    if ss["hypernyms"]:
        hyper = mc.lemma_phrase(data[ss["pos"]][ss["hypernyms"][0]]["words"][0][0])
        lines.append(f"Broader term: {hyper}.")
    return "\n".join(lines)


def prose_document(lemma, ss, data, seed):
    """Prose form: make_corpus's sentences for the sense (one seeded phrasing of the definition,
    hypernym, synonyms, examples), then the definition once more in a second phrasing."""
    variant = rank_int(seed, f"{lemma}#0") % 3
    sentences = mc.sense_sentences(lemma, ss, data, variant)
    alt = mc.sense_sentences(lemma, ss, data, 1 if variant != 1 else 0)[0]
    alt = alt.replace(f"\"{mc.cap(lemma)}\"", f"\"{lemma}\"")  # '"Big" means' mid-sentence
    sentences.append("Put simply, " + alt[:1].lower() + alt[1:])
    return " ".join(sentences)


# ----------------------------------------------------------------------------- FAQs

def trim_perlfaq(doc):
    """Keep a perlfaq answer's prose; cut each code block to its first lines and the whole answer
    to about PERLFAQ_MAX_CHARS (at a paragraph boundary, keeping at least one paragraph)."""
    paras = doc["text"].split("\n\n")
    out, size = [], 0
    for p in paras:
        lines = p.split("\n")
        if lines[0].startswith("    ") and len(lines) > PERLFAQ_MAX_CODE_LINES:
            p = "\n".join(lines[:PERLFAQ_MAX_CODE_LINES] + ["    ..."])
        if len(out) >= 2 and size + len(p) > PERLFAQ_MAX_CHARS:
            break
        out.append(p)
        size += len(p) + 2
    return {"text": "\n\n".join(out), "source": doc["source"]}


# ----------------------------------------------------------------------------- pairs

def pick(seed, tag, candidates, ok):
    """A seeded choice among candidates that passes ok(), None if none does: first up to 32
    seeded-hash draws by index (cheap for long lists), then every candidate in seeded-hash order."""
    n = len(candidates)
    if n == 0:
        return None
    for i in range(32):
        c = candidates[rank_int(seed, f"{tag}:draw{i}") % n]
        if ok(c):
            return c
    for c in sorted(candidates, key=lambda c: rank(seed, f"{tag}:{c}")):
        if ok(c):
            return c
    return None


def kind_for(seed, lemma):
    r = rank_int(seed, f"kind:{lemma}") % 100
    for kind, pct in KIND_MIX:
        if r < pct:
            return kind
        r -= pct
    raise AssertionError


def make_pair(lex, seed, lemma, kind, train_lemmas, faq_questions, avoid):
    """One preference pair for lemma. The rejected side is chosen so it differs from the chosen
    gloss and contains none of the words in avoid. Returns (pair, kind actually used)."""
    ss = lex.sense[lemma]
    chosen = gloss_sentence(ss["definition"])
    own = lex.key_of(ss)

    def gloss_ok(key):
        text = gloss_sentence(lex.synset(key)["definition"])
        return text != chosen and not (words(text) & avoid)

    rejected = None
    used = kind
    if kind == "hard":
        # co-hyponyms: same first hypernym; else a synset from the same lexicographer file
        siblings = []
        if ss["hypernyms"]:
            siblings = [k for k in lex.children.get((ss["pos"], ss["hypernyms"][0]), []) if k != own]
        key = pick(seed, f"hard:{lemma}", siblings, gloss_ok)
        if key is None:
            same_file = [k for k in lex.by_lexfile[(ss["pos"], ss["lexfile"])] if k != own]
            key = pick(seed, f"hardfile:{lemma}", same_file, gloss_ok)
            used = "hard-lexfile"
        rejected = gloss_sentence(lex.synset(key)["definition"])
    elif kind == "question":
        if rank_int(seed, f"qform:{lemma}") % 2 == 0:
            other = pick(seed, f"qlemma:{lemma}", [l for l in train_lemmas if l != lemma],
                         lambda l: not (words(question(l)) & avoid))
            rejected = question(other)
        else:
            rejected = pick(seed, f"qfaq:{lemma}", faq_questions, lambda q: not (words(q) & avoid))
    else:
        key = pick(seed, f"random:{lemma}", lex.all_synsets, lambda k: k != own and gloss_ok(k))
        rejected = gloss_sentence(lex.synset(key)["definition"])
    pair = {"prompt": question(lemma), "chosen": chosen, "rejected": rejected,
            "lemma": lemma, "kind": "hard" if used == "hard-lexfile" else used}
    return pair, used


# ----------------------------------------------------------------------------- build

def build(root, cfg, seed):
    lex = Lexicon(root, cfg["tagged_only"])
    pool = sorted(lex.sense)

    # FAQ documents and their question lists (fixed text, whatever the split)
    perl_qa, perl_lists = mc.perlfaq_docs(root)
    deb_qa, deb_lists = mc.debian_faq_docs(root)
    if cfg["trim_perlfaq"]:
        perl_qa = [trim_perlfaq(d) for d in perl_qa]
    faq_docs = perl_qa + perl_lists + deb_qa + deb_lists
    faq_questions = sorted({q for d in perl_lists + deb_lists
                            for q in d["text"].split("\n\n", 1)[1].split("\n")
                            if q.endswith("?") and "'" not in q and len(q) <= MAX_FAQ_QUESTION})

    # train: the first lemmas of the pool in seeded-hash order
    by_rank = sorted(pool, key=lambda l: rank(seed, l))
    train = sorted(by_rank[:cfg["train"]])
    train_set = set(train)

    knowledge = {}
    for lemma in train:
        ss = lex.sense[lemma]
        knowledge[lemma] = [
            {"text": entry_document(lemma, ss, lex.data), "source": f"wordnet:{lemma}:entry"},
            {"text": prose_document(lemma, ss, lex.data, seed), "source": f"wordnet:{lemma}:prose"}]

    sft = []
    for lemma in train:
        ss = lex.sense[lemma]
        sft.append({"messages": [{"role": "user", "content": question(lemma)},
                                 {"role": "assistant", "content": gloss_sentence(ss["definition"])}],
                    "lemma": lemma})
        examples = [e for e in mc.lemma_examples(lemma, ss) if lemma in words(e)]
        if examples:
            sft.append({"messages": [{"role": "user", "content": f"Use '{lemma}' in a sentence."},
                                     {"role": "assistant", "content": example_sentence(examples[0])}],
                        "lemma": lemma})

    prefs, used_kinds = [], {}
    for lemma in train:
        pair, used = make_pair(lex, seed, lemma, kind_for(seed, lemma), train, faq_questions, set())
        prefs.append(pair)
        used_kinds[used] = used_kinds.get(used, 0) + 1

    # every word of every text built so far (heldout and control must be none of them)
    seen = set()
    for d in faq_docs + [d for docs in knowledge.values() for d in docs]:
        seen |= words(d["text"])
    for ex in sft:
        seen |= words(" ".join(m["content"] for m in ex["messages"]))
    for p in prefs:
        seen |= words(" ".join([p["prompt"], p["chosen"], p["rejected"]]))
    seen |= words(" ".join(LIST_HEADERS))

    # heldout and control: one pool, group by seeded hash; a lemma is taken only if it occurs
    # in no text but its own documents (and its documents name no lemma already taken)
    heldout, control, taken, taken_words = [], [], set(), set()
    want = {"heldout": cfg["heldout"], "control": cfg["control"]}
    candidates = [l for l in by_rank[cfg["train"]:] if l not in seen]
    for lemma in candidates:
        if len(heldout) == want["heldout"] and len(control) == want["control"]:
            break
        group = "heldout" if rank_int(seed, f"group:{lemma}") % 2 == 0 else "control"
        target = heldout if group == "heldout" else control
        if len(target) == want[group] or lemma in taken_words:
            continue
        ss = lex.sense[lemma]
        docs = [{"text": entry_document(lemma, ss, lex.data), "source": f"wordnet:{lemma}:entry"},
                {"text": prose_document(lemma, ss, lex.data, seed), "source": f"wordnet:{lemma}:prose"}]
        doc_words = set().union(*(words(d["text"]) for d in docs)) - {lemma}
        if doc_words & taken:
            continue
        target.append(lemma)
        taken.add(lemma)
        taken_words |= doc_words
        knowledge[lemma] = docs
    if len(heldout) < want["heldout"] or len(control) < want["control"]:
        sys.exit(f"make_demo_data: only {len(heldout)} heldout and {len(control)} control lemmas "
                 f"found of {len(candidates)} candidates; lower the counts")
    heldout.sort()
    control.sort()
    control_set = set(control)

    # word-question lists: every train and heldout lemma in two lists (two seeded shuffles)
    lists = []
    asked = train + heldout
    for rnd in range(2):
        order = sorted(asked, key=lambda l: rank(seed, f"list{rnd}:{l}"))
        i = 0
        while i < len(order):
            n = 12 + rank_int(seed, f"listlen{rnd}:{i}") % 19
            chunk = order[i:i + n]
            header = LIST_HEADERS[rank_int(seed, f"listhdr{rnd}:{i}") % len(LIST_HEADERS)]
            lists.append({"text": header + "\n\n" + "\n".join(question(l) for l in chunk),
                          "source": f"words:questions:{len(lists) + 1}"})
            i += n

    corpus = [d for lemma in train + heldout for d in knowledge[lemma]] + faq_docs + lists
    random.Random(seed).shuffle(corpus)

    random.Random(seed + 1).shuffle(sft)
    random.Random(seed + 2).shuffle(prefs)

    # evaluation: a sample of train lemmas, every heldout and every control lemma
    eval_train = sorted(train, key=lambda l: rank(seed, f"evaltrain:{l}"))[:cfg["eval_train"]]
    groups = [(l, "train") for l in eval_train] + [(l, "heldout") for l in heldout] + \
             [(l, "control") for l in control]
    groups.sort(key=lambda g: rank(seed, f"evalorder:{g[0]}"))
    eval_questions = [{"prompt": question(l), "reference": gloss_sentence(lex.sense[l]["definition"]),
                       "lemma": l, "group": g} for l, g in groups]

    # held-out pairs: same kind mix; rejected sides name no control or other heldout lemma
    eval_prefs, eval_kinds = [], {}
    for lemma in heldout:
        avoid = (control_set | set(heldout)) - {lemma}
        pair, used = make_pair(lex, seed, lemma, kind_for(seed, lemma), train, faq_questions, avoid)
        pair["group"] = "heldout"
        eval_prefs.append(pair)
        eval_kinds[used] = eval_kinds.get(used, 0) + 1
    random.Random(seed + 3).shuffle(eval_prefs)

    # knowledge probe: for every heldout and control lemma, its gloss against a co-hyponym's
    # (hard pairs only), so that which one a model prefers says whether it knows the lemma
    eval_probe = []
    for group, lemmas in (("heldout", heldout), ("control", control)):
        for lemma in lemmas:
            avoid = (control_set | set(heldout)) - {lemma}
            pair, _ = make_pair(lex, seed, lemma, "hard", train, faq_questions, avoid)
            pair["group"] = group
            eval_probe.append(pair)
    random.Random(seed + 4).shuffle(eval_probe)

    rl = [{"prompt": question(l)}
          for l in sorted(train, key=lambda l: rank(seed, f"rl:{l}"))[:cfg["rl"]]]

    splits = {"seed": seed, "train": train, "heldout": heldout, "control": control}
    check(splits, corpus, sft, prefs, eval_prefs)
    stats = {"pool": len(pool), "candidates": len(candidates), "prefs_kinds": used_kinds,
             "eval_prefs_kinds": eval_kinds, "word_lists": len(lists),
             "faq_docs": len(faq_docs), "sft_sentence": sum(
                 1 for e in sft if e["messages"][0]["content"].startswith("Use "))}
    files = {"corpus.jsonl": corpus, "sft.jsonl": sft, "prefs.jsonl": prefs,
             "eval_questions.jsonl": eval_questions, "eval_prefs.jsonl": eval_prefs,
             "eval_probe.jsonl": eval_probe, "rl_prompts.jsonl": rl}
    return files, splits, stats


def check(splits, corpus, sft, prefs, eval_prefs):
    """The promises the Rust test (tests/demo_data.rs) checks, checked here first."""
    train, heldout, control = (set(splits[k]) for k in ("train", "heldout", "control"))
    assert not (train & heldout) and not (train & control) and not (heldout & control)
    corpus_words = set().union(*(words(d["text"]) for d in corpus))
    assert not (corpus_words & control), sorted(corpus_words & control)[:10]
    assert heldout <= corpus_words
    tuned = set()
    for e in sft:
        tuned |= words(" ".join(m["content"] for m in e["messages"]))
        assert e["lemma"] in train
    for p in prefs:
        tuned |= words(" ".join([p["prompt"], p["chosen"], p["rejected"]]))
        assert p["lemma"] in train
    assert not (tuned & (heldout | control)), sorted(tuned & (heldout | control))[:10]
    assert all(p["lemma"] in heldout for p in eval_prefs)


# ----------------------------------------------------------------------------- output

def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--out", default=None,
                    help="output directory (default data/demo for --size small; required otherwise)")
    ap.add_argument("--seed", type=int, default=20241127)
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.out is None:
        if args.size != "small":
            sys.exit("make_demo_data: --size medium/large are not committed; pass --out DIR")
        args.out = os.path.join(repo, "data", "demo")
    cfg = SIZES[args.size]

    with tempfile.TemporaryDirectory(prefix="make_demo_data.") as work:
        root, versions = mc.fetch_packages(["wordnet-base", "perl-doc", "debian-faq"], work)
        files, splits, stats = build(root, cfg, args.seed)
        licence_text = licenses(root, versions)

    os.makedirs(args.out, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(os.path.join(args.out, name), rows)
    with open(os.path.join(args.out, "splits.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(splits, indent=1) + "\n")
    with open(os.path.join(args.out, "LICENSES.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(licence_text)
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        limits = {"max_definition": MAX_DEFINITION, "perlfaq_max_code_lines": PERLFAQ_MAX_CODE_LINES,
                  "perlfaq_max_chars": PERLFAQ_MAX_CHARS}
        f.write(readme(args, cfg, limits, versions, splits, stats, files, args.out))

    print(f"size {args.size}, seed {args.seed}, packages "
          + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"lemmas: pool {stats['pool']}, train {len(splits['train'])}, heldout "
          f"{len(splits['heldout'])}, control {len(splits['control'])} "
          f"(of {stats['candidates']} candidates)")
    print(f"prefs kinds {stats['prefs_kinds']}, eval_prefs kinds {stats['eval_prefs_kinds']}")
    text_bytes = sum(len(d["text"].encode()) for d in files["corpus.jsonl"])
    print(f"corpus text {text_bytes} bytes")
    for name in list(files) + ["splits.json"]:
        path = os.path.join(args.out, name)
        print(f"{name:<22} {os.path.getsize(path):>9} bytes  sha256 {sha256(path)}")


if __name__ == "__main__":
    main()
