"""README.md and LICENSES.md of a demo data set built by make_demo_data.py: counts, sizes,
sha256 of every file, how the splits were drawn, and the licences of the sources."""

import hashlib
import os

import make_corpus as mc  # the licence texts of the packages


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def licenses(root, versions):
    text = mc.licenses_md(root, versions, ["wordnet-base", "perl-doc", "debian-faq"])
    old_head = ("# Licences of the corpus sources\n\n"
                "Every document in `corpus.jsonl` comes from one Debian package, named in its `source`\n"
                "field. Package versions are those `scripts/make_corpus.py` unpacked (`dpkg-deb -f`).\n")
    new_head = ("# Licences of the demo data sources\n\n"
                "Every file in data/demo is derived from three Debian packages. The glosses, examples,\n"
                "synonyms and hypernyms in `corpus.jsonl` (`wordnet:` documents), `sft.jsonl`,\n"
                "`prefs.jsonl`, `eval_questions.jsonl`, `eval_prefs.jsonl`, `eval_probe.jsonl` and\n"
                "`rl_prompts.jsonl` come from WordNet 3.0; the FAQ documents and some rejected replies (FAQ questions)\n"
                "from perl-doc and debian-faq. perlfaq answers are shortened in the small size (code\n"
                "blocks cut to their first lines). Package versions are those\n"
                "`scripts/make_demo_data.py` unpacked (`dpkg-deb -f`).\n")
    assert text.startswith(old_head), "make_corpus.licenses_md changed its header"
    return new_head + text[len(old_head):]


def readme(args, cfg, limits, versions, splits, stats, files, out):
    """README.md of a built data set. limits: the script's max_definition,
    perlfaq_max_code_lines and perlfaq_max_chars."""
    rows = []
    for name in list(files) + ["splits.json"]:
        path = os.path.join(out, name)
        n = f"{len(files[name]):,}" if name in files else "-"
        rows.append(f"| `{name}` | {n} | {os.path.getsize(path):,} | `{sha256(path)}` |")
    corpus = files["corpus.jsonl"]
    text_bytes = sum(len(d["text"].encode()) for d in corpus)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(stats["prefs_kinds"].items()))
    ekinds = ", ".join(f"{k} {v}" for k, v in sorted(stats["eval_prefs_kinds"].items()))
    pkgs = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    n_wn = sum(1 for d in corpus if d["source"].startswith("wordnet:"))
    wn_bytes = sum(len(d["text"].encode()) for d in corpus if d["source"].startswith("wordnet:"))
    ls = [d for d in corpus if d["source"].startswith("words:")]
    ls_bytes = sum(len(d["text"].encode()) for d in ls)
    faq_bytes = text_bytes - wn_bytes - ls_bytes
    size_flag = "" if args.size == "small" else f" --size {args.size} --out DIR"
    sizes_text = f"{cfg['train']:,} train lemmas give {text_bytes / 1e6:.2f} MB of corpus text.\n"
    if args.size == "small":
        sizes_text += ("That is about 140k tokens with the demo's 4,096-token BPE (`topcoat demo` prints\n"
                       "the count it prepared), so the CPU demo's 1.8M-token pretraining (900 steps of\n"
                       "2,048 tokens) sees every document about 14 times. Few lemmas, many passes: a\n"
                       "1.35M-parameter model only starts to store definitions after many exposures.\n")
    sizes_text += (f"{cfg['heldout']:,} heldout and {cfg['control']:,} control lemmas give accuracy "
                   f"estimates with a\nstandard error of at most "
                   f"{50 / min(cfg['heldout'], cfg['control']) ** 0.5:.1f} points each.")
    perl_note = (f"perlfaq answers shortened: code\n  blocks cut to {limits['perlfaq_max_code_lines']} "
                 f"lines, answers to about {limits['perlfaq_max_chars']} characters; "
                 if cfg["trim_perlfaq"] else "")
    return f"""# data/demo: the demo data set ({args.size} size)

Data for `topcoat demo`: pretrain on `corpus.jsonl`, instruction-tune on `sft.jsonl`, train a
reward model and DPO on `prefs.jsonl`, run RL on `rl_prompts.jsonl`, then measure on
`eval_questions.jsonl`, `eval_prefs.jsonl` and `eval_probe.jsonl`. Everything is derived from WordNet 3.0, the
perlfaq and the Debian FAQ by `scripts/make_demo_data.py` (licences and package versions in
[LICENSES.md](LICENSES.md)); formats in docs/FORMATS.md, "Demo data".

## The question it lets the demo ask

Does instruction tuning teach a model to *retrieve* what pretraining stored? Lemmas are split
three ways (`splits.json`), one WordNet sense each (the most frequent), so
`What does 'X' mean?` has one right answer:

| split | lemmas | meaning in the pretraining corpus | in SFT / preference / RL data |
| --- | ---: | --- | --- |
| `train` | {len(splits['train']):,} | yes | yes |
| `heldout` | {len(splits['heldout']):,} | yes | no |
| `control` | {len(splits['control']):,} | no (the word occurs nowhere) | no |

If SFT answers heldout questions better than control ones, the answers come from pretraining.
Following Allen-Zhu & Li (Physics of Language Models 3.1, 2023: extraction generalises only when
pretraining states a fact in several phrasings), each lemma's meaning is in the corpus as two
documents that land apart in the shuffle:

- `wordnet:X:entry`: `x (noun): gloss. "example"`, then synonyms and the broader term;
- `wordnet:X:prose`: one of three prose phrasings of the gloss ("A x is ...", "The word "x"
  refers to ...", ...), its hypernym, synonyms and examples, then a second phrasing
  ("Put simply, ...").

The SFT answer is the gloss as a sentence (`Gloss text.`), so the gloss is in the corpus nearly
verbatim, in three phrasings.

**Choice of lemmas.** The pool is the {stats['pool']:,} WordNet lemmas that are single lower-case
ASCII words, {'occur in the sense-tagged counts (cntlist.rev), ' if cfg['tagged_only'] else ''}and whose
most frequent sense has a gloss of at most {limits['max_definition']} characters (short answers a tiny model can
reproduce). `train` is the first {cfg['train']:,} of the pool in seeded-hash order. heldout and
control come from one candidate set: the {stats['candidates']:,} remaining lemmas that occur (whole
word, case-insensitive) in no text built for train, the FAQs or the question-list headers; walking
it in seeded-hash order, a hash bit assigns each lemma to heldout or control, and a lemma is
skipped if a lemma already taken names it, or if its documents name one. So the two groups are
equally hard; heldout and control words are rarer than train words (common words occur in the
FAQs), which is why train is a reference, not a comparison group.

**Sizes.**
{sizes_text}

## Files

| file | lines | bytes | sha256 |
| --- | ---: | ---: | --- |
{chr(10).join(rows)}

- `corpus.jsonl` `{{"text", "source"}}`: {len(corpus):,} documents, {text_bytes:,} bytes of text, one
  seeded shuffle: {n_wn:,} WordNet documents (two per train and heldout lemma, {wn_bytes:,} bytes),
  {stats['faq_docs']} FAQ documents (perlfaq and the Debian FAQ and their lists of questions;
  {perl_note}{faq_bytes:,} bytes), and {len(ls)} lists of word questions
  (`words:questions:N`, {ls_bytes:,} bytes): a header such as "Frequently asked word questions" and 12-30 lines
  `What does 'x' mean?`, every train and heldout lemma in two lists, so that a base model
  given such a question tends to go on with another one.
- `sft.jsonl` `{{"messages", "lemma"}}`: per train lemma, `What does 'x' mean?` -> its gloss
  sentence; plus `Use 'x' in a sentence.` -> WordNet's usage example, for the
  {stats['sft_sentence']:,} train lemmas that have one containing the word itself.
- `prefs.jsonl` `{{"prompt", "chosen", "rejected", "lemma", "kind"}}`: one pair per train lemma;
  chosen is the gloss sentence; rejected by `kind`, aiming at 50/30/20: `hard` the gloss of a
  co-hyponym (same first hypernym; when there is none with a different gloss, a synset from
  the same WordNet lexicographer file, e.g. noun.animal), `question` a reply that is another
  question (`What does 'y' mean?` for a train lemma y, or a question from the FAQ lists),
  `random` the gloss of a random synset.
  Counts: {kinds} (`hard-lexfile`, written as `hard`, is the
  fallback: mostly adjectives and adverbs, which have no hypernyms in WordNet).
- `eval_questions.jsonl` `{{"prompt", "reference", "lemma", "group"}}`: {cfg['eval_train']} train
  lemmas (a seeded sample), every heldout and every control lemma, in one seeded order.
- `eval_prefs.jsonl`: pairs as in prefs.jsonl plus `"group": "heldout"`, one per heldout lemma
  (rejected sides name no control or other heldout lemma).
  Counts: {ekinds}.
- `eval_probe.jsonl`: the knowledge probe, pairs as in prefs.jsonl plus `"group"`: for every
  heldout and every control lemma, its gloss sentence (chosen) against a co-hyponym's (rejected,
  `hard`; rejected sides name no control or other heldout lemma). A model that prefers the right
  gloss of heldout lemmas more often than of control lemmas knows what pretraining told it.
- `rl_prompts.jsonl` `{{"prompt"}}`: {cfg['rl']} train lemmas' questions.
- `splits.json` `{{"seed", "train", "heldout", "control"}}`: sorted lemma lists.

tests/demo_data.rs checks the committed files: disjoint splits, every SFT and preference lemma
in train, no heldout or control word in SFT or preference text, no control word anywhere in the
corpus, every heldout word in it.

## Rebuild

```
python3 scripts/make_demo_data.py{size_flag}   # as root; seed {args.seed}
```

Built from {pkgs}.
The script fetches them with `apt-get download` and unpacks them with `dpkg-deb -x` into a
temporary directory (nothing is installed); the same package versions and seed give the same
bytes. `--size medium --out DIR` (5,000 / 1,000 / 1,000 lemmas, full
perlfaq) and `--size large --out DIR` (20,000 / 2,000 / 2,000, untagged lemmas allowed) are for
GPU runs and are not committed.
"""
