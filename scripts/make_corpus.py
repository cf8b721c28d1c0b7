#!/usr/bin/env python3
"""Build topcoat's small embedded text corpus from Debian documentation packages.

Run (as root, Python 3 standard library only):

    python3 scripts/make_corpus.py                       # small: rewrites data/corpus/ (committed)
    python3 scripts/make_corpus.py --size medium --out /tmp/corpus-medium
    python3 scripts/make_corpus.py --size large  --out /tmp/corpus-large

Packages are fetched with `apt-get download NAME` (running `apt-get update` once if that fails)
and unpacked with `dpkg-deb -x` into a temporary directory; nothing is installed.

Output: OUT/corpus.jsonl, one {"text": ..., "source": ...} object per line, plus OUT/LICENSES.md.
The output depends only on the package contents and --seed: rerunning reproduces the same bytes
(as long as apt serves the same package versions; LICENSES.md records them).

Sources:
  wordnet-base  WordNet 3.0 synsets, rewritten as dictionary entries and prose (several phrasings
                per meaning, see wordnet_document), one document per lemma, up to 3 senses.
  perl-doc      perlfaq1-9 and perlfaq.pod: one document per question with its answer, plus one
                "list of questions" document per perlfaq file.
  debian-faq    the Debian FAQ (plain text): one document per numbered section, plus one
                "list of questions" document per chapter.
  python3.11-doc (medium, large only) the Python FAQ (reStructuredText sources): one document per
                question, plus one list of questions per FAQ page.
"""

import argparse
import glob
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile

SIZES = {
    # lemmas: how many WordNet lemmas (None = every eligible lemma); tagged_only: only lemmas that
    # occur in the sense-tagged SemCor counts (cntlist.rev), i.e. reasonably common words.
    "small": {"lemmas": 2700, "tagged_only": True, "python_faq": False},
    "medium": {"lemmas": 12000, "tagged_only": True, "python_faq": True},
    "large": {"lemmas": None, "tagged_only": False, "python_faq": True},
}
MAX_SENSES = 3
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
POS_ORDER = {"n": 0, "v": 1, "a": 2, "s": 2, "r": 3}
SS_TYPE_NUM = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}


# ----------------------------------------------------------------------------- packages

def fetch_packages(names, workdir):
    """apt-get download each package into workdir/debs, unpack into workdir/root.
    Returns {name: version}."""
    debs = os.path.join(workdir, "debs")
    root = os.path.join(workdir, "root")
    os.makedirs(debs)
    os.makedirs(root)
    cmd = ["apt-get", "download"] + names
    if subprocess.run(cmd, cwd=debs).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(cmd, cwd=debs, check=True)
    versions = {}
    for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        name = subprocess.run(["dpkg-deb", "-f", deb, "Package"], check=True,
                              capture_output=True, text=True).stdout.strip()
        version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        versions[name] = version
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    missing = [n for n in names if n not in versions]
    if missing:
        sys.exit(f"make_corpus: packages not downloaded: {missing}")
    return root, versions


def seeded_rank(seed, key):
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


# ----------------------------------------------------------------------------- WordNet

def parse_wordnet_data(path, pos_char):
    """Parse one WordNet data.POS file. Returns {offset: synset} where synset is a dict with
    ss_type, lexfile, words [(lemma, lex_id)], hypernyms [offsets], definition, examples."""
    synsets = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, sep, gloss = line.rstrip("\n").partition(" | ")
            if not sep:
                head, gloss = line.rstrip(" \n"), ""
            fields = head.split()
            offset, lexfile, ss_type = fields[0], int(fields[1]), fields[2]
            w_cnt = int(fields[3], 16)
            words = []
            i = 4
            for _ in range(w_cnt):
                word = re.sub(r"\((a|p|ip)\)$", "", fields[i])  # adjective position markers
                words.append((word, int(fields[i + 1], 16)))
                i += 2
            p_cnt = int(fields[i])
            i += 1
            hypernyms = []
            for _ in range(p_cnt):
                symbol, target, tpos = fields[i], fields[i + 1], fields[i + 2]
                if symbol in ("@", "@i") and tpos == pos_char:
                    hypernyms.append(target)
                i += 4
            definition, examples = split_gloss(gloss.strip())
            synsets[offset] = {"pos": pos_char, "ss_type": ss_type, "lexfile": lexfile,
                               "words": words, "hypernyms": hypernyms,
                               "definition": definition, "examples": examples}
    return synsets


def split_gloss(gloss):
    """'definition; "example one"; "example two"' -> (definition, [examples])."""
    examples = [e.strip() for e in re.findall(r'"([^"]*)"', gloss) if e.strip()]
    q = gloss.find('"')
    definition = gloss if q < 0 else gloss[:q]
    definition = definition.strip().rstrip(";:,").strip()
    return definition, examples


def parse_index(path):
    """index.POS -> {lemma: [offset, ...]} in WordNet's sense order (most frequent first)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            offsets = fields[4 + p_cnt + 2:]
            assert len(offsets) == synset_cnt, line
            out[lemma] = offsets
    return out


def parse_cntlist(path):
    """cntlist.rev: 'sense_key sense_number tag_cnt' -> {'lemma%t:ff:ii': tag_cnt}."""
    counts = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _num, cnt = line.split()
            short = ":".join(key.split(":")[:3])
            counts[short] = counts.get(short, 0) + int(cnt)
    return counts


def load_wordnet(wn_dir):
    data, index = {}, {}
    for pos_char, name in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
        data[pos_char] = parse_wordnet_data(os.path.join(wn_dir, f"data.{name}"), pos_char)
        index[pos_char] = parse_index(os.path.join(wn_dir, f"index.{name}"))
    counts = parse_cntlist(os.path.join(wn_dir, "cntlist.rev"))
    return data, index, counts


def lemma_senses(lemma, data, index, counts):
    """All senses of lemma across parts of speech, most frequent first (SemCor tag count, then
    part of speech n, v, a, r, then WordNet's own sense order)."""
    senses = []
    for pos_char in ("n", "v", "a", "r"):
        for rank, off in enumerate(index[pos_char].get(lemma, [])):
            ss = data[pos_char][off]
            # exact case: "Sue" (Eugene Sue) is not a sense of "sue"
            lex_id = next((lid for w, lid in ss["words"] if w == lemma), None)
            if lex_id is None or not ss["definition"]:
                continue
            key = f"{lemma}%{SS_TYPE_NUM[ss['ss_type']]}:{ss['lexfile']:02d}:{lex_id:02d}"
            tags = counts.get(key, 0)
            senses.append((-tags, POS_ORDER[pos_char], rank, off, ss, tags))
    senses.sort(key=lambda s: s[:3])
    return [(s[4], s[5]) for s in senses]


def eligible_lemmas(index, data, counts, tagged_only):
    lemmas = set()
    for pos_char in index:
        for lemma in index[pos_char]:
            if lemma.isascii() and lemma.isalpha() and lemma.islower() and len(lemma) >= 2:
                lemmas.add(lemma)
    out = []
    for lemma in sorted(lemmas):
        senses = lemma_senses(lemma, data, index, counts)
        if not senses:
            continue
        if tagged_only and senses[0][1] == 0:
            continue
        out.append(lemma)
    return out


def article(phrase):
    w = phrase.split()[0].lower() if phrase.split() else ""
    if re.match(r"(uni|use|usu|uti|eu|one|once|ur)", w):
        return "a"
    if re.match(r"(hour|honest|honor|honour|heir)", w):
        return "an"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


DETERMINERS = {"a", "an", "the", "any", "one", "some", "someone", "something", "anything",
               "anyone", "each", "every", "either", "all", "two", "three", "several", "many",
               "that", "this", "what", "whatever", "informal", "(informal)"}


def noun_phrase(definition):
    """Definition as a noun phrase that can follow 'is': add an article unless the definition
    already starts with a determiner or looks plural."""
    d = re.sub(r"^\([^)]*\)\s*", "", definition)  # leading domain label: (biology) ...
    first = d.split()[0].lower() if d.split() else ""
    if first in DETERMINERS:
        return d
    if first.endswith("s") and not first.endswith(("ss", "us", "is")) and len(first) > 3:
        return d  # probably plural: "organisms that live ..."
    return f"{article(d)} {d}"


def cap(s):
    return s[:1].upper() + s[1:]


def lemma_phrase(word):
    return word.replace("_", " ")


def sense_sentences(lemma, ss, data, variant):
    """Prose sentences for one sense; variant (0..2) picks the phrasing."""
    pos = ss["pos"]
    d = ss["definition"]
    out = []
    if pos == "n":
        np_ = noun_phrase(d)
        first = [f"{cap(article(lemma))} {lemma} is {np_}.",
                 f"The word \"{lemma}\" refers to {np_}.",
                 f"In English, {article(lemma)} {lemma} is {np_}."][variant]
        out.append(first)
    elif pos == "v":
        vp = d[3:] if d.startswith("to ") else d
        out.append([f"To {lemma} is to {vp}.",
                    f"The verb \"{lemma}\" means to {vp}.",
                    f"When you {lemma}, you {vp}."][variant]
                   if not (variant == 2 and vp.startswith("be ")) else f"To {lemma} is to {vp}.")
    elif pos in ("a", "s"):
        out.append([f"The adjective \"{lemma}\" describes something {d}.",
                    f"\"{cap(lemma)}\" means {d}.",
                    f"As an adjective, \"{lemma}\" means {d}."][variant])
    else:
        out.append([f"The adverb \"{lemma}\" means {d}.",
                    f"\"{cap(lemma)}\", as an adverb, means {d}.",
                    f"As an adverb, \"{lemma}\" means {d}."][variant])
    if ss["hypernyms"]:
        hyper_ss = data[pos][ss["hypernyms"][0]]
        hyper = lemma_phrase(hyper_ss["words"][0][0])
        if pos == "n":
            out.append(f"{cap(article(lemma))} {lemma} is a kind of {hyper}.")
        elif pos == "v":
            out.append(f"To {lemma} is a way to {hyper}.")
    synonyms = [lemma_phrase(w) for w, _ in ss["words"] if w != lemma]
    synonyms = list(dict.fromkeys(synonyms))[:4]
    if len(synonyms) == 1:
        out.append(f"Another word for this is \"{synonyms[0]}\".")
    elif synonyms:
        quoted = [f"\"{s}\"" for s in synonyms]
        out.append(f"Other words for this are {', '.join(quoted[:-1])} and {quoted[-1]}.")
    for k, ex in enumerate(lemma_examples(lemma, ss)[:2]):
        out.append(f"{'For example' if k == 0 else 'Another example'}: \"{ex}\".")
    return out


def lemma_examples(lemma, ss):
    """The synset's usage examples that use this lemma (WordNet's examples may show a synonym
    instead); a word starting with the lemma's stem counts, so "penalized" is kept for "penalize"."""
    stem = lemma[:-2] if len(lemma) > 5 else lemma[:-1] if len(lemma) > 3 else lemma
    return [ex for ex in ss["examples"] if re.search(r"\b" + re.escape(stem), ex.lower())]


def wordnet_document(lemma, senses, data, seed):
    """One document: a dictionary-entry block (one line per sense) and a prose paragraph per
    sense, each phrasing chosen by a seeded hash of the lemma and sense number."""
    senses = senses[:MAX_SENSES]
    entry = []
    for ss, _tags in senses:
        line = f"{lemma} ({POS_NAME[ss['pos']]}): {ss['definition']}."
        examples = lemma_examples(lemma, ss)
        if examples:
            line += f" \"{examples[0]}\""
        entry.append(line)
    prose = []
    for i, (ss, _tags) in enumerate(senses):
        variant = int(seeded_rank(seed, f"{lemma}#{i}")[:8], 16) % 3
        sentences = sense_sentences(lemma, ss, data, variant)
        if i > 0:
            sentences.insert(0, f"\"{cap(lemma)}\" has another meaning.")
        prose.append(" ".join(sentences))
    return "\n".join(entry) + "\n\n" + "\n\n".join(prose)


def wordnet_docs(root, n_lemmas, tagged_only, seed):
    wn_dir = os.path.join(root, "usr/share/wordnet")
    data, index, counts = load_wordnet(wn_dir)
    pool = eligible_lemmas(index, data, counts, tagged_only)
    chosen = sorted(pool, key=lambda l: seeded_rank(seed, l))
    if n_lemmas is not None:
        chosen = chosen[:n_lemmas]
    docs = []
    for lemma in sorted(chosen):
        senses = lemma_senses(lemma, data, index, counts)
        docs.append({"text": wordnet_document(lemma, senses, data, seed),
                     "source": f"wordnet:{lemma}"})
    return docs, len(pool)


# ----------------------------------------------------------------------------- POD (perlfaq)

POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&",
                "apos": "'", "nbsp": " "}


def pod_inline(s):
    """Strip POD formatting codes (B<>, C<<< >>>, L<text|target>, E<lt>, ...) to plain text."""
    out = []
    i = 0
    while i < len(s):
        m = re.match(r"([A-Z])(<+)(\s?)", s[i:])
        if m and m.group(1) in "BCEFILSXZ":
            code, n = m.group(1), len(m.group(2))
            if n > 1:  # C<< text >>: ends at whitespace followed by n '>'
                end_re = re.compile(r"\s" + ">" * n)
            else:
                end_re = None
            j = i + m.end() if n > 1 else i + 2
            if end_re is None:
                depth, k = 1, j
                while k < len(s) and depth:
                    if s[k] == "<" and k > 0 and s[k - 1].isupper() and s[k - 1] in "BCEFILSXZ":
                        depth += 1
                    elif s[k] == ">":
                        depth -= 1
                    k += 1
                inner, i = s[j:k - 1] if depth == 0 else s[j:], k
            else:
                em = end_re.search(s, j)
                if em is None:
                    inner, i = s[j:], len(s)
                else:
                    inner, i = s[j:em.start()], em.end()
            out.append(pod_code(code, inner))
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def pod_code(code, inner):
    if code == "E":
        if inner.isdigit():
            return chr(int(inner))
        if inner.lower().startswith("0x"):
            return chr(int(inner, 16))
        return POD_ENTITIES.get(inner, {"eacute": "é", "egrave": "è", "uuml": "ü",
                                        "auml": "ä", "ouml": "ö"}.get(inner, inner))
    if code in ("X", "Z"):
        return ""
    if code == "L":
        if "|" in inner:
            return pod_inline(inner.split("|", 1)[0])
        text = pod_inline(inner)
        if text.startswith("/"):
            return text[1:].strip('"')
        if "/" in text and not re.match(r"\w+://", text):
            page, sec = text.split("/", 1)
            return f"{sec.strip(chr(34))} in {page}"
        return text.strip('"')
    return pod_inline(inner)


def pod_blocks(text):
    """Split POD source into (kind, payload) blocks: ('cmd', (name, arg)), ('verbatim', str),
    ('para', str), skipping =begin/=end and =for regions."""
    blocks = []
    paras = re.split(r"\n[ \t]*\n", text.replace("\r", ""))
    skipping = None
    for p in paras:
        if not p.strip():
            continue
        if p.startswith("="):
            name, _, arg = p[1:].replace("\n", " ").partition(" ")
            arg = " ".join(arg.split())
            if skipping:
                if name == "end" and arg.split()[:1] == [skipping]:
                    skipping = None
                continue
            if name == "begin":
                skipping = arg.split()[0] if arg else ""
                continue
            if name in ("for", "cut", "pod", "encoding"):
                continue
            blocks.append(("cmd", (name, arg)))
        elif skipping:
            continue
        elif p[0] in " \t":
            lines = p.expandtabs(8).split("\n")
            indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
            blocks.append(("verbatim", "\n".join(l[indent:].rstrip() for l in lines)))
        else:
            blocks.append(("para", " ".join(pod_inline(p).split())))
    return blocks


def render_pod(blocks):
    """Blocks of one section body -> plain text."""
    out = []
    bullet = []
    for kind, payload in blocks:
        if kind == "cmd":
            name, arg = payload
            if name == "over":
                bullet.append(None)
            elif name == "back":
                if bullet:
                    bullet.pop()
            elif name == "item":
                a = pod_inline(arg).strip()
                if a in ("*", "") or a == "o":
                    out.append("* ")
                elif re.match(r"^\d+\.?$", a):
                    out.append(a.rstrip(".") + ". ")
                else:
                    out.append(a)
            elif name.startswith("head"):
                out.append(pod_inline(arg))
        elif kind == "verbatim":
            out.append("\n".join("    " + l if l else "" for l in payload.split("\n")))
        else:
            if out and out[-1] in ("* ",) or (out and re.match(r"^\d+\. $", out[-1] or "")):
                out[-1] = out[-1] + payload
            else:
                out.append(payload)
    return "\n\n".join(x.rstrip() for x in out if x.strip())


def perlfaq_docs(root):
    pod_dir = os.path.join(root, "usr/share/perl")
    files = sorted(glob.glob(os.path.join(pod_dir, "*/pod/perlfaq*.pod")))
    if not files:
        sys.exit("make_corpus: no perlfaq*.pod in perl-doc")
    qa, lists = [], []
    for path in files:
        name = os.path.basename(path)[:-4]
        with open(path, encoding="utf-8") as f:
            blocks = pod_blocks(f.read())
        title = ""
        head1 = None
        current = None
        sections = []
        for kind, payload in blocks:
            if kind == "cmd" and payload[0] == "head1":
                head1 = payload[1]
                current = None
                if head1 == "NAME":
                    current = ["NAME", []]
                continue
            if kind == "cmd" and payload[0] == "head2":
                current = [pod_inline(payload[1]).strip(), []]
                sections.append((head1, current))
                continue
            if current is not None:
                if current[0] == "NAME":
                    if kind == "para":
                        title = payload.split(" - ", 1)[-1].strip()
                        current = None
                else:
                    current[1].append((kind, payload))
        questions = []
        for h1, (q, body) in sections:
            if name == "perlfaq" and h1 == "THE QUESTIONS":
                continue  # the per-file lists below say the same
            text = render_pod(body).strip()
            if not text:
                continue
            qa.append({"text": f"{q}\n\n{text}", "source": f"perl-doc:{name}"})
            questions.append(q)
        if name != "perlfaq" and questions:
            lists.append({"text": f"Frequently asked questions about Perl: {title}\n\n"
                                  + "\n".join(questions),
                          "source": f"perl-doc:{name}:questions"})
    return qa, lists


# ----------------------------------------------------------------------------- Debian FAQ

def unwrap(para):
    """Join a hard-wrapped prose paragraph (or bullet item) into one line; leave anything that
    looks laid out by hand (tables, commands: short or unevenly indented lines) as it is."""
    lines = para.split("\n")
    ind = len(lines[0]) - len(lines[0].lstrip())
    bullet = lines[0].lstrip().startswith("* ")
    rest_ind = ind + 2 if bullet else ind
    if len(lines) == 1 or ind > 8:
        return para
    if any(len(l) - len(l.lstrip()) != rest_ind for l in lines[1:]):
        return para
    if any(len(l.strip()) < 40 or "   " in l.strip() for l in lines[:-1]):
        return para
    out = lines[0].rstrip()
    for l in lines[1:]:
        l = l.strip()
        out += l if out.endswith("/") or l.startswith("/") else " " + l
    return out


def debian_faq_docs(root):
    path = os.path.join(root, "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().replace("\u00a0", " ").split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("Chapter 1."))
    heading_re = re.compile(r"^(\d+(?:\.\d+)+)\. (.*)$")
    chapter_re = re.compile(r"^Chapter (\d+)\. (.*)$")
    sections, chapters = [], []
    cur = None
    i = start
    while i < len(lines):
        line = lines[i]
        m = heading_re.match(line)
        c = chapter_re.match(line)
        if c:
            chapters.append([c.group(2).strip(), []])
            cur = None
            i += 1
            continue
        if m:
            title = [m.group(2).strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(" "):
                title.append(lines[i].strip())
                i += 1
            cur = {"num": m.group(1), "title": " ".join(title), "body": []}
            sections.append(cur)
            chapters[-1][1].append(cur)
            continue
        if cur is not None:
            cur["body"].append(line)
        i += 1
    docs = []
    for s in sections:
        body = s["body"]
        body = [l[4:] if l.startswith("    ") else l.strip() for l in body]
        text = "\n".join(l.rstrip() for l in body).strip()
        text = "\n\n".join(unwrap(p) for p in re.split(r"\n\s*\n", text) if p.strip())
        if not text:
            continue
        docs.append({"text": f"{s['title']}\n\n{text}", "source": f"debian-faq:{s['num']}"})
    lists = []
    for n, (ctitle, secs) in enumerate(chapters, 1):
        qs = [s["title"] for s in secs if s["title"].endswith("?")]
        if len(qs) >= 2:
            lists.append({"text": f"Debian FAQ, {ctitle}\n\n" + "\n".join(qs),
                          "source": f"debian-faq:chapter{n}:questions"})
    return docs, lists


# ----------------------------------------------------------------------------- Python FAQ

def rst_inline(s):
    s = re.sub(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)\s*(?:<[^>]*>)?`", r"\1", s)  # :func:`x`
    s = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", s)  # `text <url>`_
    s = re.sub(r"``([^`]+)``", r"\1", s)
    s = re.sub(r"`([^`]+)`_*", r"\1", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"\1", s)
    return s


def python_faq_docs(root):
    found = sorted(glob.glob(os.path.join(root, "usr/share/doc/python3*/html/_sources/faq/*.rst.txt")))
    # python3.11-doc ships the same tree under two doc directories (one a symlink): keep one copy
    files = list({os.path.realpath(f): f for f in found}.values())
    files = sorted({os.path.basename(f): f for f in files}.values())
    if not files:
        sys.exit("make_corpus: no faq/*.rst.txt in python3.11-doc")
    docs, lists = [], []
    for path in files:
        page = os.path.basename(path)[: -len(".rst.txt")]
        if page == "index":
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # A title is a line followed by an underline of = - ~ " ^ characters of at least its length.
        titles = []
        for i in range(len(lines) - 1):
            u = lines[i + 1]
            if (lines[i].strip() and not lines[i].startswith(" ") and u and len(set(u)) == 1
                    and u[0] in "=-~\"^*+#" and len(u) >= len(lines[i].rstrip())):
                titles.append(i)
        page_title = rst_inline(lines[titles[0]].strip()) if titles else page
        questions = []
        for k, t in enumerate(titles):
            q = rst_inline(lines[t].strip())
            end = titles[k + 1] if k + 1 < len(titles) else len(lines)
            body = lines[t + 2:end]
            out, skip = [], False
            for l in body:
                if re.match(r"^\.\. (contents|index|highlight|_|only|toctree|seealso)", l.strip()) \
                        or l.strip().startswith(".. _"):
                    skip = True
                    continue
                if skip and (l.startswith(" ") or not l.strip()):
                    if not l.strip():
                        skip = False
                    continue
                skip = False
                if re.match(r"^\.\. [a-z-]+::", l.strip()):
                    continue
                out.append(rst_inline(l.rstrip()).replace("::", ":"))
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
            if not text or not q.endswith("?"):
                continue
            docs.append({"text": f"{q}\n\n{text}", "source": f"python3-doc:faq/{page}"})
            questions.append(q)
        if len(questions) >= 2:
            lists.append({"text": f"Python {page_title}\n\n" + "\n".join(questions),
                          "source": f"python3-doc:faq/{page}:questions"})
    return docs, lists


# ----------------------------------------------------------------------------- licences

def licenses_md(root, versions, packages):
    def read(p):
        with open(os.path.join(root, p), encoding="utf-8") as f:
            return f.read()

    wn_copy = read("usr/share/doc/wordnet-base/copyright")
    m = re.search(r"License: WordNet3\.0\n((?: .*\n)+)", wn_copy)
    wn_text = "\n".join("" if l.strip() == "." else l[1:] for l in m.group(1).rstrip("\n").split("\n"))
    faq_copy = read("usr/share/doc/debian-faq/copyright")
    m = re.search(r"(Copyright \(C\) 1996-2003.*?in the original English\.)", faq_copy, re.S)
    faq_text = "\n".join(l[2:] if l.startswith("  ") else l for l in m.group(1).split("\n"))
    parts = [
        "# Licences of the corpus sources",
        "",
        "Every document in `corpus.jsonl` comes from one Debian package, named in its `source`",
        "field. Package versions are those `scripts/make_corpus.py` unpacked (`dpkg-deb -f`).",
        "",
        f"## wordnet-base {versions['wordnet-base']}: WordNet 3.0",
        "",
        "Taken: glosses, usage examples, synonyms and the first hypernym of the synsets of a seeded",
        "subset of single-word lemmas (`/usr/share/wordnet/data.*`, `index.*`, `cntlist.rev`),",
        "rewritten by the script as dictionary entries and prose sentences. Licence (WordNet 3.0),",
        "reproduced in full as it requires:",
        "",
        "```",
        wn_text,
        "```",
        "",
        f"## perl-doc {versions['perl-doc']}: perlfaq",
        "",
        "Taken: the questions and answers of `perlfaq.pod` and `perlfaq1.pod` ... `perlfaq9.pod`,",
        "with POD markup stripped, and their lists of questions.",
        "Licence: GPL-1+ or Artistic (\"the same terms as Perl itself\"). Copyright (c) 1997-2010",
        "Tom Christiansen, Nathan Torkington, and other authors as noted; perlfaq.pod by brian d foy.",
        "The perlfaq states: \"Irrespective of its distribution, all code examples here are in the",
        "public domain.\"",
        "",
        f"## debian-faq {versions['debian-faq']}: The Debian GNU/Linux FAQ",
        "",
        "Taken: the sections of `debian-faq.en.txt.gz` (chapters 1-16), lightly re-indented, and",
        "each chapter's list of questions. The document itself reads \"Copyright © 1996-2021",
        "Software in the Public Interest\". Licence (from the package's copyright file):",
        "",
        "```",
        faq_text,
        "```",
        "",
    ]
    if "python3.11-doc" in packages:
        parts += [
            f"## python3.11-doc {versions['python3.11-doc']}: the Python FAQ",
            "",
            "Taken (medium and large sizes only): the questions and answers of",
            "`html/_sources/faq/*.rst.txt`, with reStructuredText markup stripped.",
            "Licence: the Python Software Foundation License (PSF-2.0); Copyright (c) 2001-2023",
            "Python Software Foundation.",
            "",
        ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--out", default=None,
                    help="output directory (default data/corpus for --size small; required otherwise)")
    ap.add_argument("--seed", type=int, default=20241127)
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.out is None:
        if args.size != "small":
            sys.exit("make_corpus: --size medium/large are not committed; pass --out DIR")
        args.out = os.path.join(repo, "data", "corpus")
    cfg = SIZES[args.size]
    packages = ["wordnet-base", "perl-doc", "debian-faq"]
    if cfg["python_faq"]:
        packages.append("python3.11-doc")

    with tempfile.TemporaryDirectory(prefix="make_corpus.") as work:
        root, versions = fetch_packages(packages, work)
        wn, pool = wordnet_docs(root, cfg["lemmas"], cfg["tagged_only"], args.seed)
        perl_qa, perl_lists = perlfaq_docs(root)
        deb_qa, deb_lists = debian_faq_docs(root)
        py_qa, py_lists = python_faq_docs(root) if cfg["python_faq"] else ([], [])
        licenses = licenses_md(root, versions, packages)

    groups = [("wordnet", wn), ("perlfaq", perl_qa), ("perlfaq questions", perl_lists),
              ("debian-faq", deb_qa), ("debian-faq questions", deb_lists),
              ("python-faq", py_qa), ("python-faq questions", py_lists)]
    docs = [d for _, g in groups for d in g]
    # One fixed shuffle so that any contiguous slice (e.g. a held-out tail) mixes all sources.
    random.Random(args.seed).shuffle(docs)
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "corpus.jsonl")
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"text": d["text"], "source": d["source"]}, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "LICENSES.md"), "w", encoding="utf-8") as f:
        f.write(licenses)

    print(f"size {args.size}, seed {args.seed}, packages "
          + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"wordnet: {len(wn)} lemmas chosen of {pool} eligible")
    print(f"{'group':<22} {'docs':>6} {'text bytes':>11}")
    for name, g in groups:
        if g:
            print(f"{name:<22} {len(g):>6} {sum(len(d['text'].encode()) for d in g):>11}")
    total = sum(len(d["text"].encode()) for d in docs)
    with open(out_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"{'total':<22} {len(docs):>6} {total:>11}")
    print(f"{out_path}: {os.path.getsize(out_path)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
