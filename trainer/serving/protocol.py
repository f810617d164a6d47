"""The OpenAI wire format: request bodies (validated), response and stream-chunk bodies, errors.

Fields OpenAI defines that we do not implement are accepted at their neutral value and refused
with a 400 otherwise (n > 1, logprobs, tools, ...), so a client never silently gets less than it
asked for. Unknown fields are ignored, as vLLM does.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        return stops

    def refuse_unsupported(self, extra: dict[str, Any]) -> None:
        checks = {"n": self.n != 1, "presence_penalty": self.presence_penalty != 0,
                  "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias), **extra}
        for param, used in checks.items():
            if used:
                raise APIError(400, f"'{param}' is not supported by this server", param=param, code="unsupported")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check(self) -> None:
        self.refuse_unsupported({"echo": self.echo, "logprobs": self.logprobs is not None,
                                 "best_of": self.best_of not in (None, 1), "suffix": bool(self.suffix)})

    def prompt_ids(self, tokenizer) -> list[int]:
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            raise APIError(400, "only one prompt per request is supported", param="prompt", code="unsupported")
        ids = tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < len(tokenizer) for t in ids):
            raise APIError(400, "the prompt holds a token id outside the vocabulary", param="prompt")
        return ids


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict] = None

    @model_validator(mode="after")
    def _max(self) -> "ChatRequest":
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def check(self) -> None:
        self.refuse_unsupported({"logprobs": self.logprobs, "tools": bool(self.tools),
                                 "tool_choice": self.tool_choice not in (None, "none"),
                                 "response_format": (self.response_format or {}).get("type", "text") != "text"})

    def prompt_ids(self, tokenizer) -> list[int]:
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            out = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)
        except Exception as exc:  # jinja raises its own error types for conversations a template refuses
            raise APIError(400, f"the chat template refuses these messages: {exc}", param="messages") from None
        return list(out["input_ids"])


# ---- responses ------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, fingerprint: str, use: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    if use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish: str, fingerprint: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "usage": use,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}]}


def chat_chunk(rid: str, model: str, fingerprint: str, delta: dict | None, finish: str | None,
               use: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]}
    if use is not None:
        body["usage"] = use
    return body


# ---- fine-tuning jobs -------------------------------------------------------------------------

class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: Union[Literal["auto"], int, None] = None
    learning_rate_multiplier: Union[Literal["auto"], float, None] = None
    n_epochs: Union[Literal["auto"], int, None] = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hyperparameters: Optional[Hyperparameters] = None


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["supervised"]
    supervised: Optional[SupervisedMethod] = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    training_file: str = Field(min_length=1, description="a path the server can read (any data.path the trainer takes)")
    validation_file: Optional[str] = None
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    seed: Optional[int] = None
    suffix: Optional[str] = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    metadata: Optional[dict[str, str]] = None
    overrides: list[str] = Field(default_factory=list, description="peftforge: extra data./adapter./optim./train. "
                                 "key=value settings for the job, as on the train.py command line")

    def hyper(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()
