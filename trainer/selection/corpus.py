"""The candidate pool and the target set as chunks of text, each tagged with its source.

Rows are read by the trainer's own readers (`trainer.data.load_rows`: files, save_to_disk folders,
packaged corpora) and turned into plain text by its formats, so anything `data.path` accepts is
a pool source or a target, with the same errors naming the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.data import load_rows, packaged
from trainer.data.formats import infer_format, plain_text
from trainer.errors import UserError
from trainer.selection.chunking import chunk_documents


@dataclass
class Corpus:
    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # per chunk
    rows: list[int] = field(default_factory=list)  # per chunk: first row of its source it came from
    names: list[str] = field(default_factory=list)  # the sources, in order

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in self.names}
        for source in self.sources:
            out[source] += 1
        return out

    def subset(self, keep: list[int]) -> "Corpus":
        names = [n for n in self.names if n in {self.sources[i] for i in keep}]
        return Corpus([self.texts[i] for i in keep], [self.sources[i] for i in keep],
                      [self.rows[i] for i in keep], names)


def source_name(path: str) -> str:
    if path.startswith("packaged:"):
        return path.removeprefix("packaged:")
    name = Path(path).name
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        name = name.removesuffix(suffix)
    return name or path


def read_texts(path: str, where: str, max_rows: int | None = None) -> list[str]:
    """Plain text of every row of `path` (format as `data.path` would infer it)."""
    rows = load_rows(path, where)
    if max_rows is not None:
        rows = rows[:max_rows]
    fmt = packaged.natural_format(path.removeprefix("packaged:")) if path.startswith("packaged:") else None
    try:
        fmt = fmt or infer_format(rows)
    except UserError as e:
        raise UserError(e.what.replace("the format", f"what text {path} holds"), where=where,
                        hint="give rows with text, messages, instruction/output or query/passage") from None
    return [plain_text(row, fmt, where=f"{where}={path}: row {i + 1}") for i, row in enumerate(rows)]


def read_pool(selection) -> Corpus:
    sources = selection.sources()
    if not sources:
        raise UserError("the candidate pool is empty", where="selection.pool",
                        hint="list sources, e.g. selection.pool=[packaged:hamlet,packaged:lee_news,data/web.jsonl]")
    corpus = Corpus()
    for number, source in enumerate(sources):
        where = f"selection.pool[{number}]"
        name = source.name or source_name(source.path)
        if name in corpus.names:
            raise UserError(f"two pool sources are named '{name}'", where=where,
                            hint="give one a name: {path: ..., name: ...}")
        chunks = chunk_documents(read_texts(source.path, where, source.max_rows), selection.chunk_chars,
                                 selection.min_chars)
        if not chunks:
            raise UserError(f"{source.path} holds no text of at least {selection.min_chars} characters", where=where)
        corpus.names.append(name)
        for chunk in chunks:
            corpus.texts.append(chunk.text)
            corpus.sources.append(name)
            corpus.rows.append(chunk.first_row)
    return corpus


def read_target(selection, default_path: str) -> tuple[str, list[str]]:
    source = selection.target_source(default_path)
    where = "selection.target" if selection.target else "selection.target (unset: data.path)"
    chunks = chunk_documents(read_texts(source.path, where, source.max_rows), selection.chunk_chars,
                             selection.min_chars)
    if not chunks:
        raise UserError(f"the target {source.path} holds no text of at least {selection.min_chars} characters",
                        where=where)
    return source.path, [c.text for c in chunks]


def resolve_budget(budget: int | float, pool_size: int) -> int:
    """A count of chunks, or a fraction (< 1) of the pool; never more than the pool holds."""
    count = max(1, round(budget * pool_size)) if isinstance(budget, float) and budget < 1 else int(budget)
    if count > pool_size:
        raise UserError(f"budget {count} is larger than the pool ({pool_size} chunks)", where="selection.budget",
                        hint="select fewer, give a fraction such as 0.1, or add sources")
    return count
