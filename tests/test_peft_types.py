"""`add_str_enum_member` (how our tuners join peft's PeftType enum) touches CPython's Enum
internals, so it runs on every CPython minor version `requires-python` admits: a member added at
run time must behave exactly like one written in the class body (Python's own enum is the
reference), observed through every public way of using an enum member."""
from __future__ import annotations

import glob
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

from adapters.peft_types import add_str_enum_member, ensure_peft_type

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import enum, json, pickle, sys

class Grown(str, enum.Enum):
    LORA = "LORA"
    IA3 = "IA3"

class Written(str, enum.Enum):  # the reference: the same member written in the class body
    LORA = "LORA"
    IA3 = "IA3"
    NEW = "NEW"

def observe(cls):
    def attempt(f):
        try:
            return repr(f())
        except Exception as e:  # the same failure counts as the same behaviour
            return type(e).__name__
    new = cls.NEW
    return {
        "names": [m.name for m in cls], "values": [m.value for m in cls], "len": len(cls),
        "by_name": cls["NEW"] is new, "by_value": cls("NEW") is new, "by_attr": getattr(cls, "NEW") is new,
        "members": list(cls.__members__), "isinstance": isinstance(new, cls) and isinstance(new, str),
        "equal_str": new == "NEW", "hash": hash(new) == hash("NEW"), "dict_key": {new: 1}.get("NEW"),
        "json": json.dumps(new), "pickle": pickle.loads(pickle.dumps(new)) is new,
        "member_in": new in cls, "value_in": attempt(lambda: "NEW" in cls), "other_in": attempt(lambda: "X" in cls),
        "unknown_value": attempt(lambda: cls("X")), "format": f"{new}".replace(cls.__name__, "C"), "str": str(new).replace(cls.__name__, "C"),
        "repr": repr(new).replace(cls.__name__, "C"), "sorted": [m.name for m in sorted(cls)],
        "in_dir": "NEW" in dir(cls), "reversed": [m.name for m in reversed(cls)],
    }

ADD
first = add_str_enum_member(Grown, "NEW")
again = add_str_enum_member(Grown, "NEW")
assert first is again and len(Grown) == 3, "not idempotent"
got, want = observe(Grown), observe(Written)
diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
print(json.dumps({"python": sys.version.split()[0], "diff": diff}))
'''


def _allowed_minors() -> list[int]:
    spec = re.search(r'requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    low = int(re.search(r">=\s*3\.(\d+)", spec).group(1))
    high = int(re.search(r"<\s*3\.(\d+)", spec).group(1))  # an upper bound is required: each minor is tested
    return list(range(low, high))


def _interpreter(minor: int) -> str | None:
    if sys.version_info[:2] == (3, minor):
        return sys.executable
    found = sorted(glob.glob(str(Path.home() / f".pyenv/versions/3.{minor}.*/bin/python3")))
    found += [p for p in (f"/usr/bin/python3.{minor}", f"/usr/local/bin/python3.{minor}") if Path(p).exists()]
    return found[0] if found else None


@pytest.mark.parametrize("minor", _allowed_minors())
def test_added_member_behaves_like_a_written_one(minor):
    python = _interpreter(minor)
    if python is None:
        pytest.skip(f"no CPython 3.{minor} on this machine")
    script = PROBE.replace("ADD", textwrap.dedent(inspect.getsource(add_str_enum_member)))
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["python"].startswith(f"3.{minor}.")
    assert result["diff"] == {}


def test_our_tuners_are_peft_types_and_registration_is_idempotent():
    for name in ("TRIADAPTLORA", "BOTTLENECK", "IAA"):
        member = PeftType[name]
        assert PeftType(name) is member and member in PEFT_TYPE_TO_TUNER_MAPPING
        assert ensure_peft_type(name) is member
    assert len(PeftType) == len(set(PeftType))
