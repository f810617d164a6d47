"""Render one row to token ids and labels; labels are -100 wherever the model must not learn.

Formats (`data.format`):
- text:           {"text"}; the loss covers every token, and an EOS is appended.
- alpaca:         {"instruction", "input" (optional), "output"}; the loss covers the output + EOS.
- chat:           {"messages": [{"role", "content"}, ...]}; the loss covers each assistant reply
                  and its end-of-turn token, as the tokenizer's chat template renders them.
- classification: {"text", "label"}; one label per row, a class name or id, mapped to a class id
                  by the run's labels (trainer.data.labels).
- pairs:          {"query", "passage"}; a relevant passage per query, for retrieval and
                  reranking. The texts are kept: each task tokenizes them itself (a bi-encoder
                  apart, a cross-encoder as one pair sequence that only the tokenizer's own pair
                  template builds correctly).
"""
from __future__ import annotations

from jinja2 import TemplateError

from trainer.errors import UserError

IGNORE = -100
FORMATS = ("text", "alpaca", "chat", "classification", "pairs")
RANKING_TASKS = ("retrieval", "reranking")
ROLES = ("system", "user", "assistant")
CAUSAL_FORMATS = ("text", "alpaca", "chat")
# A fixed prompt, so a tuned model is later queried with exactly the text it was trained on.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def infer_format(rows: list[dict]) -> str:
    """The format the columns imply: messages→chat, instruction+output→alpaca,
    text+label→classification, query+passage→pairs, text→text."""
    columns = set(rows[0])
    if "messages" in columns:
        return "chat"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"text", "label"} <= columns:
        return "classification"
    if {"query", "passage"} <= columns:
        return "pairs"
    if "text" in columns:
        return "text"
    raise UserError(f"cannot infer the format from the columns {sorted(columns)}", where="data.format",
                    hint="set data.format to text, alpaca, chat, classification or pairs, or rename the columns")


def check_format(fmt: str, task: str, tokenizer) -> None:
    """Refuse a format the task or tokenizer cannot use, before any row is rendered."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'", where="data.format", hint="valid: " + ", ".join(FORMATS))
    if task == "sequence_classification" and fmt != "classification":
        raise UserError(f"format '{fmt}' cannot train model.task=sequence_classification",
                        where="data.format",
                        hint="use rows with text and label and data.format=classification")
    if task == "causal_lm" and fmt == "classification":
        raise UserError("format 'classification' needs model.task=sequence_classification",
                        where="data.format")
    if task in RANKING_TASKS and fmt != "pairs":
        raise UserError(f"format '{fmt}' cannot train model.task={task}", where="data.format",
                        hint="use rows with query and passage and data.format=pairs")
    if fmt == "pairs" and task not in RANKING_TASKS:
        raise UserError(f"format 'pairs' needs model.task=retrieval or reranking, not {task}", where="data.format")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("chat format needs a tokenizer with a chat template, and this one has none",
                        where="data.format", hint="use a chat/instruct model, or data.format=text or alpaca")


def render(row: dict, fmt: str, tokenizer, max_length: int, where: str, labels=None) -> dict:
    """Token ids and labels of one row (for pairs: its two texts); `where` ("FILE: row N")
    prefixes every error. Classification needs `labels` (a LabelMap) to map the row's label."""
    if fmt == "text":
        ids = _encode(tokenizer, _text(row, "text", where), special=True) + _eos(tokenizer)
        example = {"input_ids": ids, "labels": list(ids)}
    elif fmt == "alpaca":
        example = _alpaca(row, tokenizer, where)
    elif fmt == "chat":
        example = _chat(row, tokenizer, where)
    elif fmt == "pairs":
        return {"query": _nonempty(row, "query", where), "passage": _nonempty(row, "passage", where)}
    else:
        if labels is None:
            raise ValueError("classification rows need the run's labels (a trainer.data.labels.LabelMap)")
        return {"input_ids": classification_ids(_text(row, "text", where), tokenizer, max_length),
                "label": labels.id_of(row.get("label"), where)}
    return {key: values[:max_length] for key, values in example.items()}


def plain_text(row: dict, fmt: str, where: str) -> str:
    """The row's language as one plain string, for reading text rather than training on it (data
    selection embeds and compares it): text and classification rows give their text, alpaca rows
    instruction, input and output, chat rows their turns' contents, pairs query then passage."""
    if fmt in ("text", "classification"):
        return _text(row, "text", where)
    if fmt == "alpaca":
        extra = row.get("input")
        parts = [_text(row, "instruction", where), extra if isinstance(extra, str) else "", _text(row, "output", where)]
    elif fmt == "chat":
        parts = [m["content"] for m in chat_messages(row, where)]
    elif fmt == "pairs":
        parts = [_nonempty(row, "query", where), _nonempty(row, "passage", where)]
    else:
        raise UserError(f"unknown format '{fmt}'", where="data.format", hint="valid: " + ", ".join(FORMATS))
    return "\n".join(p for p in parts if p)


def alpaca_prompt(row: dict, where: str) -> str:
    """The fixed prompt of an alpaca row (instruction and optional input), answered after it."""
    instruction = _text(row, "instruction", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"field 'input' must be a string, got {type(extra).__name__}", where=where)
    return (ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra) if extra
            else ALPACA_PROMPT.format(instruction=instruction))


def _alpaca(row: dict, tokenizer, where: str) -> dict:
    prompt, output = alpaca_prompt(row, where), _text(row, "output", where)
    # Prompt and answer are encoded apart, exactly as generation will see them: prompt ids, then
    # the model's own tokens. That also makes the prompt/answer boundary exact.
    prompt_ids = _encode(tokenizer, prompt, special=True)
    answer_ids = _encode(tokenizer, output, special=False) + _eos(tokenizer)
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


def _chat(row: dict, tokenizer, where: str) -> dict:
    messages = chat_messages(row, where)

    def template(turns: list[dict], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except TemplateError as exc:
            raise UserError(f"the chat template rejects this conversation: {exc}", where=where) from exc

    full = template(messages)
    # An assistant reply is the text between "everything before it + the assistant header" and
    # "everything up to and including it". Rendering those prefixes is template-agnostic; a
    # template whose earlier turns change with later ones cannot be split this way and is refused.
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = template(messages[:index], generation_prompt=True), template(messages[: index + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(f"cannot locate assistant message {index + 1}: the chat template renders "
                            "earlier turns differently depending on what follows", where=where)
        spans.append((len(before), len(through)))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        inside = [t for t, (s, _) in enumerate(offsets) if start <= s < end]
        # Keep the reply through its end-of-turn token (the last special token in the span), so
        # the model learns to stop; separators the template adds after it are not the model's.
        ends = [t for t in inside if ids[t] in special]
        if ends:
            inside = [t for t in inside if t <= ends[-1]]
        for t in inside:
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels}


def chat_messages(row: dict, where: str) -> list[dict]:
    """The validated {role, content} messages of a chat row."""
    messages = row.get("messages")
    if messages is None:
        raise UserError("missing field 'messages'", where=where)
    if not isinstance(messages, list) or not messages:
        raise UserError("field 'messages' must be a non-empty list of {role, content} objects", where=where)
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise UserError(f"message {number} must be an object with role and content", where=where)
        role = message.get("role")
        if role is None:
            raise UserError(f"message {number}: missing field 'role'", where=where)
        if role not in ROLES:
            raise UserError(f"unknown role '{role}' (expected system, user, assistant)", where=where)
        if not isinstance(message.get("content"), str):
            raise UserError(f"message {number}: missing field 'content' (a string)", where=where)
    if messages[0]["role"] == "assistant":
        # Its reply span would start at an empty conversation, which templates cannot render.
        raise UserError("a conversation cannot start with an assistant message", where=where,
                        hint="put a user (or system) message first")
    # Only role and content reach the template: extra keys (names, ids) would change rendering.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if value is None:
        raise UserError(f"missing field '{field}'", where=where)
    if not isinstance(value, str):
        raise UserError(f"field '{field}' must be a string, got {type(value).__name__}", where=where)
    return value


def _nonempty(row: dict, field: str, where: str) -> str:
    value = _text(row, field, where)
    if not value.strip():
        raise UserError(f"field '{field}' is empty", where=where)
    return value


def classification_ids(text: str, tokenizer, max_length: int) -> list[int]:
    """The token ids a classifier reads for `text` (training, evaluation and prediction alike)."""
    return _encode(tokenizer, text, special=True)[:max_length]


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
