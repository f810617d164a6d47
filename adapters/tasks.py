"""Map the trainer's task names to peft's TaskType (which decides heads kept trainable)."""
from peft import TaskType

# a re-ranker is a one-logit classifier (its head stays trainable); a bi-encoder is a bare encoder
_TASKS = {"causal_lm": TaskType.CAUSAL_LM, "sequence_classification": TaskType.SEQ_CLS, "reranking": TaskType.SEQ_CLS}


def peft_task_type(task: str):
    return _TASKS.get(task, TaskType.FEATURE_EXTRACTION)
