"""Classification metrics from a confusion matrix, and the short table `train.py eval` prints."""
from __future__ import annotations

import math

# Wider confusion matrices do not fit a terminal; they stay in the JSON.
MAX_TABLE_CLASSES = 10


def classification_metrics(confusion: list[list[int]]) -> dict[str, float]:
    """Accuracy and macro-F1 of `confusion[true][predicted]` counts.

    Macro-F1 is the unweighted mean of per-class F1 = 2 TP / (2 TP + FP + FN) over the classes that
    occur among the true or the predicted labels (as scikit-learn's f1_score(average="macro")
    counts them): a class absent from both has no F1 to average.
    """
    n = len(confusion)
    total = sum(map(sum, confusion))
    correct = sum(confusion[c][c] for c in range(n))
    f1s = []
    for c in range(n):
        tp = confusion[c][c]
        fn = sum(confusion[c]) - tp
        fp = sum(confusion[t][c] for t in range(n)) - tp
        if tp + fn + fp:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / total if total else math.nan,
            "macro_f1": sum(f1s) / len(f1s) if f1s else math.nan}


def table(report: dict) -> str:
    """The report of `train.py eval` as a few aligned lines (and the confusion matrix, if small)."""
    lines = [f"{report['task']} on {report['data']} ({report['examples']} examples)"]
    width = max(map(len, report["metrics"]))
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in report["metrics"].items()]
    confusion = report.get("confusion_matrix")
    if confusion and len(confusion["labels"]) <= MAX_TABLE_CLASSES:
        names = [str(n) for n in confusion["labels"]]
        cell = max(6, *map(len, names), *(len(str(v)) for row in confusion["matrix"] for v in row))
        lines.append("  confusion (rows: true, columns: predicted)")
        lines.append("  " + " " * cell + "".join(f" {n:>{cell}}" for n in names))
        for name, row in zip(names, confusion["matrix"]):
            lines.append(f"  {name:>{cell}}" + "".join(f" {v:>{cell}}" for v in row))
    elif confusion:
        lines.append(f"  confusion matrix of {len(confusion['labels'])} classes: see the JSON")
    return "\n".join(lines)
