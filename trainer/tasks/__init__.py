"""Task registry: `model.task` -> the class that owns its batches, loss, loss units and evaluation.

The loop builds `TASKS[cfg.model.task](cfg, tokenizer)` once and asks it for everything
task-specific (see trainer/tasks/base.py).
"""
from trainer.tasks.base import Task
from trainer.tasks.causal_lm import CausalLM
from trainer.tasks.classification import SequenceClassification
from trainer.tasks.reranking import Reranking
from trainer.tasks.retrieval import Retrieval

TASKS: dict[str, type[Task]] = {t.name: t for t in (CausalLM, SequenceClassification, Retrieval, Reranking)}

__all__ = ["TASKS", "Task"]
