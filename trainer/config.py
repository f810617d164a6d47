"""The typed config: YAML file + `dotted.key=value` overrides, validated before anything loads.

Every section is a strict pydantic model: an unknown key is an error that names the nearest
valid key, a wrong type or range names the key path and the YAML line it came from. The
`adapter:` and `optim:` sections are validated against the option class that the chosen method
registered (see adapters/base.py, optim/base.py), so a method's options are typed too.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

import adapters
import optim
from trainer.data.labels import LabelNames
from trainer.errors import UserError
from trainer.federated.config import FederatedConfig
from trainer.serving.config import ServingConfig
from trainer.selection.config import SelectionConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field("packaged:smollm2-135m-instruct", description="hub id, local folder, packaged:NAME or tiny:llama|bert")
    task: Literal["causal_lm", "sequence_classification", "retrieval", "reranking"] = "causal_lm"
    num_labels: Optional[int] = Field(None, ge=2, description="classes, for sequence_classification; unset: the labels' count")
    temperature: float = Field(0.05, gt=0, description="retrieval: InfoNCE temperature over cosine similarities")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Optional[Literal["eager", "sdpa", "sdpa_varlen", "flash_attention_2"]] = Field(
        None, description="null: transformers' default (sdpa), or for packed batches the per-document kernel "
                          "of trainer.varlen_attention (flash_attention_2 on CUDA in bf16/fp16 when installed)")


class DataConfig(Section):
    path: str = Field("packaged:chitchat", description="jsonl/json/csv/parquet file, save_to_disk folder, or packaged:NAME")
    format: Optional[Literal["text", "alpaca", "chat", "classification", "pairs"]] = None
    eval_path: Optional[str] = None
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(512, ge=8)
    packing: bool = False
    max_examples: Optional[int] = Field(None, ge=1)
    labels: LabelNames = Field(None, description="class names in id order; unset: from the data (trainer.data.labels)")


class TrainConfig(Section):
    output_dir: str = "runs/default"
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1, description="micro-batch per process")
    gradient_accumulation_steps: int = Field(1, ge=1)
    seed: int = 42
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="null disables clipping")
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    eval_at_start: bool = Field(False, description="also evaluate the untrained model, logged as step 0")
    eval_batches: Optional[int] = Field(None, ge=1, description="cap on eval micro-batches")
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0, description="0: no intermediate checkpoints")
    keep_last: int = Field(2, ge=1)
    stop_after_steps: Optional[int] = Field(None, ge=1, description="stop resumably after this many steps "
                                            "(a checkpoint is saved); the LR schedule still spans max_steps")
    resume: Optional[Literal["auto"]] = Field(None, description="auto: continue from the last checkpoint in output_dir")
    overwrite: bool = False
    gradient_checkpointing: bool = False
    logits: Literal["auto", "full"] = Field("auto", description="auto: causal LM lm_head + loss only at the loss "
                                            "positions, in chunks, where the model allows it; full: every position")
    padding_free: bool = Field(True, description="a padded causal-LM batch runs as one row of its real tokens "
                                "where the model's attention keeps rows apart (trainer.padding_free)")
    compile: bool = Field(False, description="torch.compile each decoder layer (trainer.compile)")
    sample_prompts: list[str] = Field(default_factory=list, description="answered before and after training")
    max_new_tokens: int = Field(48, ge=1)


class TrackingConfig(Section):
    wandb: bool = False
    project: str = "peftforge"
    run_name: Optional[str] = None
    entity: Optional[str] = None
    tags: list[str] = Field(default_factory=list)


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: adapters.AdapterOptions
    optim: optim.OptimizerOptions
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    # where each key was set (the YAML's lines, the command line's overrides), so that an error found
    # after loading (a method refusing the model, a launch it cannot run under) can name the line too
    _source: tuple[dict, dict, Optional[Path]] = PrivateAttr(default=({}, {}, None))

    def where(self, key: str) -> str:
        """`key`, and the file:line or command-line override that set it, for a UserError's `where`."""
        origin, lines, path = self._source
        return _where(key, origin, lines, path)

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        method = adapters.ADAPTERS[self.adapter.type]
        if method.tasks and self.model.task not in method.tasks:
            raise ValueError(f"adapter.type={self.adapter.type} supports model.task "
                             f"{' | '.join(method.tasks)}, not {self.model.task}")
        if self.train.gradient_checkpointing and method.no_gradient_checkpointing:
            raise ValueError(f"adapter.type={self.adapter.type} cannot train with train.gradient_checkpointing=true: "
                             f"{method.no_gradient_checkpointing}")
        spec = optim.OPTIMIZERS[self.optim.name]
        if spec.full_parameter_only and self.adapter.type != "none":
            raise ValueError(
                f"optim.name={self.optim.name} projects full weight matrices and cannot train adapter "
                f"parameters; set adapter.type=none for full fine-tuning"
            )
        return self

    def to_dict(self) -> dict:
        # serialize_as_any: adapter/optim hold subclasses of the declared option classes, whose
        # own fields (r, rank, ...) must not be dropped
        return self.model_dump(mode="json", serialize_as_any=True)


# ---- loading ---------------------------------------------------------------------------------

def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key path -> 1-based line in the YAML text, for error messages."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    if not path.is_file():
        raise UserError("config file not found", where=str(path), hint="pass --config configs/<recipe>.yaml")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"malformed YAML: {getattr(e, 'problem', e)}", where=where) from None
    if not isinstance(data, dict):
        raise UserError("top level must be a mapping of sections", where=str(path))
    return data, _key_lines(text)


def _apply_override(data: dict, item: str, origin: dict[str, str]) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value", where="command line", hint="e.g. train.max_steps=20")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set {key}: {part} is not a section", where="command line")
    node[parts[-1]] = value
    origin[key] = f"command line '{item}'"


def _section_fields(data: dict) -> dict[str, list[str]]:
    """Valid keys per section, given the chosen adapter and optimizer."""
    fields = {name: list(f.annotation.model_fields) for name, f in Config.model_fields.items()
              if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    fields["adapter"] = list(_adapter_options(data).model_fields)
    fields["optim"] = list(_optim_options(data).model_fields)
    fields[""] = list(Config.model_fields)
    return fields


def _adapter_options(data: dict) -> type[BaseModel]:
    name = (data.get("adapter") or {}).get("type", "lora")
    if name not in adapters.ADAPTERS:
        raise _choice_error("adapter.type", name, adapters.ADAPTERS)
    return adapters.ADAPTERS[name].options


def _optim_options(data: dict) -> type[BaseModel]:
    name = (data.get("optim") or {}).get("name", "adamw")
    if name not in optim.OPTIMIZERS:
        raise _choice_error("optim.name", name, optim.OPTIMIZERS)
    return optim.OPTIMIZERS[name].options


def _choice_error(key: str, value: Any, choices) -> UserError:
    near = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return UserError(f"unknown {key} {value!r}", where=key, hint=f"{hint}choices: {', '.join(sorted(choices))}")


def _drop_options_of_replaced_method(data: dict, fields: dict, origin: dict[str, str], path: Path | None) -> None:
    """`adapter.type=X` (or `optim.name=X`) on the command line swaps the method of a recipe:
    the file's options that X does not have are dropped, with a note, instead of refused."""
    for section, selector in (("adapter", "type"), ("optim", "name")):
        if f"{section}.{selector}" not in origin:
            continue
        dropped = [k for k in list(data[section]) if k not in fields[section] and f"{section}.{k}" not in origin]
        for key in dropped:
            del data[section][key]
        if dropped and os.environ.get("RANK", "0") == "0":
            print(f"note: {section}.{selector}={data[section][selector]} has no "
                  f"{', '.join(section + '.' + k for k in dropped)}; ignoring them from {path}", file=sys.stderr)


def _where(key: str, origin: dict[str, str], lines: dict[str, int], path: Path | None) -> str:
    if key in origin:
        return f"{key} ({origin[key]})"
    probe = key
    while probe:
        if probe in lines and path is not None:
            return f"{key} ({path}:{lines[probe]})"
        probe = probe.rpartition(".")[0]
    return key


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML, apply overrides, validate everything. Raises UserError on any problem."""
    cfg_path = Path(path) if path else None
    data, lines = _read_yaml(cfg_path) if cfg_path else ({}, {})
    origin: dict[str, str] = {}
    for item in overrides:
        _apply_override(data, item, origin)
    for section in ("adapter", "optim"):
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise UserError(f"{section} must be a mapping", where=_where(section, origin, lines, cfg_path))
    data["adapter"].setdefault("type", "lora")
    data["optim"].setdefault("name", "adamw")
    try:
        fields = _section_fields(data)
    except UserError as e:  # an unknown adapter.type / optim.name: say where it was written
        raise UserError(e.what, where=_where(e.where, origin, lines, cfg_path), hint=e.hint) from None

    _drop_options_of_replaced_method(data, fields, origin, cfg_path)
    # unknown keys first, with the nearest valid one
    for section, value in [("", data)] + [(k, v) for k, v in data.items() if isinstance(v, dict)]:
        valid = fields.get(section)
        if valid is None:
            continue
        for key in value:
            if key not in valid:
                full = f"{section}.{key}" if section else key
                near = difflib.get_close_matches(key, valid, n=1)
                hint = f"did you mean {section + '.' if section else ''}{near[0]}?" if near else f"valid keys: {', '.join(valid)}"
                raise UserError(f"unknown key {full!r}", where=_where(full, origin, lines, cfg_path), hint=hint)
    try:
        adapter = _adapter_options(data).model_validate(data.pop("adapter"))
        optimizer = _optim_options(data).model_validate(data.pop("optim"))
        cfg = Config.model_validate({**data, "adapter": adapter, "optim": optimizer})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        section = _section_of(e.title)
        key = f"{section}.{loc}" if section and loc else (loc or section)
        msg = err["msg"].removeprefix("Value error, ")
        if not key and (named := re.match(r"([a-z_]+\.[a-z_]+)=", msg)):
            key = named[1]  # a rule over several keys (Config._combinations) names the first key it is about
        got = err.get("input")
        shown = "" if isinstance(got, (dict, BaseModel)) or not loc else f" (got {got!r})"
        raise UserError(f"{msg[0].lower()}{msg[1:]}{shown}", where=_where(key, origin, lines, cfg_path) if key else cfg_path and str(cfg_path)) from None
    cfg._source = (origin, lines, cfg_path)
    return cfg


def _section_of(title: str) -> str:
    """Which config section a pydantic model (named by its class) validates."""
    if any(spec.options.__name__ == title for spec in adapters.ADAPTERS.values()):
        return "adapter"
    if any(spec.options.__name__ == title for spec in optim.OPTIMIZERS.values()):
        return "optim"
    return ""


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
