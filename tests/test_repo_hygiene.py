"""What the repository's own text says must hold: every repository path a comment or page cites
exists, no file names a path of one developer's machine, and nothing loads a pickle with
`weights_only=False` (checkpoints and results are read as tensors and plain values only)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".sh", ".json")
# a repository path: a top-level folder of this repo (or research/, which it does not have), then a file
CITED = re.compile(r"(?<![\w/.\-])((?:docs|research|configs|scripts|tests|trainer|adapters|optim)/[\w./\-]*\w"
                   r"\.(?:md|py|yaml|yml|json|txt|png))")
MACHINE = re.compile(r"(?<![\w.])/(?:work|root|home/\w+)/")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.split() if f.endswith(TEXT) and (ROOT / f).is_file()]


def test_every_cited_repository_path_exists():
    missing = [f"{p.relative_to(ROOT)}: {m.group(1)}" for p in _tracked()
               for m in CITED.finditer(p.read_text(errors="ignore")) if not (ROOT / m.group(1)).exists()]
    assert missing == []


def test_no_machine_paths():
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _tracked() if p.name != Path(__file__).name
             for m in MACHINE.finditer(p.read_text(errors="ignore"))]
    assert found == []


def test_no_unpickling_loads():
    found = [str(p.relative_to(ROOT)) for p in _tracked()
             if p.suffix == ".py" and p.name != Path(__file__).name and "weights_only=False" in p.read_text()]
    assert found == []
