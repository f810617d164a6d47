"""Cut documents into the units that are embedded, compared and selected.

As in GOT-D (App. C.2): pool and target are chunked the same way, to about `chunk_chars`
characters (1000, about 256 tokens). A long document is split at whitespace; short documents of
the same source are joined (in order, separated by a blank line) until the next one would not fit,
so a chunk of reviews holds several reviews and never mixes sources. `chunk_chars: 0` keeps every
document whole.
"""
from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Chunk:
    text: str
    first_row: int  # 0-based row of its source where the chunk starts (provenance)


def split_long(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, cut at the last whitespace before the limit (or hard,
    inside a word longer than the limit); whitespace at the cuts is dropped."""
    pieces, rest = [], text.strip()
    while len(rest) > limit:
        cut = rest.rfind(" ", 0, limit + 1)
        cut = max(cut, rest.rfind("\n", 0, limit + 1))
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def chunk_documents(documents: list[str], chunk_chars: int, min_chars: int = 1) -> list[Chunk]:
    """Chunks of one source's documents, in order; chunks shorter than `min_chars` are dropped."""
    if chunk_chars <= 0:
        return [Chunk(doc.strip(), i) for i, doc in enumerate(documents) if len(doc.strip()) >= max(min_chars, 1)]
    chunks: list[Chunk] = []
    buffer: list[str] = []
    buffer_len, buffer_row = 0, 0

    def flush() -> None:
        nonlocal buffer, buffer_len
        if buffer:
            text = SEPARATOR.join(buffer)
            if len(text) >= max(min_chars, 1):
                chunks.append(Chunk(text, buffer_row))
        buffer, buffer_len = [], 0

    for row, doc in enumerate(documents):
        for piece in split_long(doc, chunk_chars):
            added = len(piece) + (len(SEPARATOR) if buffer else 0)
            if buffer and buffer_len + added > chunk_chars:
                flush()
                added = len(piece)
            if not buffer:
                buffer_row = row
            buffer.append(piece)
            buffer_len += added
    flush()
    return chunks
