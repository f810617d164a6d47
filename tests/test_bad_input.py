"""Bad input as a new user types it: one line on stderr naming what and where, exit 2,
nothing created or overwritten."""
from __future__ import annotations

import json
import re

import pytest

from cli_runner import TINY, run_inprocess, run_subprocess

TINY_TEXT = open(TINY).read()


def chat(role):
    return {"messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "hello"}]}


CASES = {
    # name: (files to create {name: text}, args, text the error line must contain)
    "missing config": ({}, ["--config", "nope.yaml"], ["nope.yaml", "not found"]),
    "malformed yaml": ({"bad.yaml": "train:\n  max_steps: [3\n"}, ["--config", "bad.yaml"], ["bad.yaml:3", "malformed YAML"]),
    "unknown key": ({}, ["--config", TINY, "train.max_step=3"], ["train.max_step", "did you mean train.max_steps"]),
    "wrong type": ({}, ["--config", TINY, "train.batch_size=abc"], ["train.batch_size", "integer"]),
    "negative lr": ({}, ["--config", TINY, "optim.lr=-1"], ["optim.lr", "greater than 0"]),
    "empty dataset": ({"empty.jsonl": ""}, ["--config", TINY, "data.path=empty.jsonl"], ["data.path", "empty.jsonl", "no rows"]),
    "broken jsonl line": ({"broken.jsonl": '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n'},
                          ["--config", TINY, "data.path=broken.jsonl"], ["broken.jsonl:2", "invalid JSON"]),
    "unknown chat role": ({"role.jsonl": "".join(json.dumps(chat(r)) + "\n" for r in ["assistant"] * 5 + ["robot"])},
                          ["--config", TINY, "data.path=role.jsonl", "data.format=chat"], ["role.jsonl", "robot"]),
    "missing model": ({}, ["--config", TINY, "model.name_or_path=./no/such/model"], ["model.name_or_path", "no/such/model"]),
    "missing data file": ({}, ["--config", TINY, "data.path=missing.jsonl"], ["data.path", "missing.jsonl"]),
    "unknown adapter": ({}, ["--config", TINY, "adapter.type=lorra"], ["adapter.type", "did you mean 'lora'"]),
    "galore on an adapter": ({}, ["--config", TINY, "optim.name=galore_adamw"], ["optim.name", "adapter.type=none"]),
    # a rule over two keys (adapter and task) names the line of the adapter it refuses
    "adapter for another task": ({"bitfit.yaml": TINY_TEXT.replace("type: lora", "type: bitfit", 1)
                                  .replace("  r: 4\n  alpha: 8\n  dropout: 0.0\n", "")},
                                 ["--config", "bitfit.yaml"], ["adapter.type (bitfit.yaml:12)", "not causal_lm"]),
    # refused when the adapter is built, after the config loaded: still the file and line
    "adapter refusing at build": ({"adalora.yaml": TINY_TEXT.replace("type: lora", "type: adalora", 1)
                                   .replace("  r: 4\n  alpha: 8\n", "").replace("max_steps: 20", "max_steps: 1")},
                                  ["--config", "adalora.yaml"], ["adapter.type (adalora.yaml:12)", "train.max_steps=1"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, tmp_path, monkeypatch, capsys):
    files, args, needles = CASES[name]
    monkeypatch.chdir(tmp_path)
    for fname, text in files.items():
        (tmp_path / fname).write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_inprocess(*args, f"train.output_dir={tmp_path / 'run'}")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Warning" not in line
           and "warnings.warn" not in line]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run dir, nothing else


def test_user_error_exits_2_without_traceback_as_a_process(tmp_path):
    proc = run_subprocess("--config", TINY, "optim.lr=-1", f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: optim.lr")
    assert not (tmp_path / "run").exists()


def test_adalora_budget_errors_are_user_errors(tmp_path, capsys):
    assert run_inprocess("--config", TINY, "adapter.type=adalora", "adapter.init_r=4", "adapter.target_r=4",
                         f"train.output_dir={tmp_path / 'a'}") == 2
    assert "target_r (4) must be below init_r (4)" in capsys.readouterr().err
    assert run_inprocess("--config", TINY, "adapter.type=adalora", "adapter.tinit=3", "adapter.tfinal=3",
                         "train.max_steps=5", f"train.output_dir={tmp_path / 'b'}") == 2
    err = capsys.readouterr().err
    assert "adapter.tinit" in err and "Traceback" not in err
    # one step: the final budget would be fixed at step 1 with no importance score gathered
    assert run_inprocess("--config", TINY, "adapter.type=adalora", "train.max_steps=1",
                         f"train.output_dir={tmp_path / 'c'}") == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "Traceback" not in err and "KeyError" not in err
    assert not (tmp_path / "c").exists()  # refused before the run directory is made
    # the step count it suggests is one peft's allocator really runs to the end with
    suggested = int(re.search(r"raise train.max_steps to (\d+)", err).group(1))
    assert run_inprocess("--config", TINY, "adapter.type=adalora", f"train.max_steps={suggested}",
                         f"train.output_dir={tmp_path / 'd'}") == 0
