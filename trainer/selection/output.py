"""The selection's output folder: selected.jsonl (a dataset `data.path` reads directly),
selection.json (config, counts, timings, OT convergence) and selection.png.

Written into a temporary folder beside the target and renamed into place at the end, so a failed
or killed run leaves no half selection and an existing one is replaced only once the new one is
complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from trainer.errors import UserError

SUMMARY = "selection.json"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a folder that holds anything, before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError("is a file, not a folder", where=f"selection.output_dir={out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError("already holds files", where=f"selection.output_dir={out}",
                        hint="pass --overwrite (selection.overwrite=true) or choose another selection.output_dir")


def write(out: Path, rows: list[dict], summary: dict, plot: dict | None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / "selected.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if plot is not None:
            summary["plot"] = _plot(tmp / "selection.png", **plot)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _plot(path: Path, scores: np.ndarray, selected: np.ndarray, pool_counts: dict, selected_counts: dict,
          score_meaning: str, method: str) -> str | None:
    """Score histogram (all candidates vs the selected) and each source's share of pool and selection."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install 'peftforge[selection]')"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.histogram_bin_edges(scores, bins=50)
    left.hist(scores, bins=bins, alpha=0.5, label=f"pool ({len(scores)})")
    left.hist(scores[selected], bins=bins, alpha=0.8, label=f"selected ({len(selected)})")
    left.set_xlabel(score_meaning.split(" (")[0])
    left.set_ylabel("chunks")
    left.legend()
    names = list(pool_counts)
    total_pool, total_sel = max(sum(pool_counts.values()), 1), max(sum(selected_counts.values()), 1)
    pos = np.arange(len(names))
    right.barh(pos - 0.2, [pool_counts[n] / total_pool for n in names], height=0.4, label="share of pool")
    right.barh(pos + 0.2, [selected_counts.get(n, 0) / total_sel for n in names], height=0.4, label="share of selection")
    right.set_yticks(pos, names)
    right.invert_yaxis()
    right.set_xlabel("fraction of chunks")
    right.legend()
    fig.suptitle(f"{method}: {len(selected)} of {len(scores)} chunks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
