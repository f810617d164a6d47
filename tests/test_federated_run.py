"""Flower's two engines on the tiny model, inside the loopback-only namespace (tests run under
scripts/offline.sh): the simulation engine (Ray) with a client that fails mid-round, killed after
a round and resumed, against the same run uninterrupted; and the deployment engine, a SuperLink
and two SuperNodes on 127.0.0.1 driven by `flwr run`."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import ROOT, metrics, run_subprocess
from trainer.federated.strategy import sample_clients

pytestmark = pytest.mark.slow
FED_TINY = str(ROOT / "configs" / "fed-tiny.yaml")
BIN = Path(sys.executable).parent
SEED = 42
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}


def rows_by_round(run_dir: Path) -> dict[int, dict]:
    return {m["round"]: m for m in metrics(run_dir)}


def test_simulation_with_a_failing_client_resumes_exactly_after_a_kill(tmp_path):
    failing = sample_clients(4, 2, SEED, 2)[0]
    args = ["federated", "--config", FED_TINY, "federated.rounds=3", "federated.strategy=ferret",
            f"federated.simulate_failures={{2: [{failing}]}}", f"train.seed={SEED}", "tracking.wandb=true",
            "tracking.project=peftforge-test"]
    whole = run_subprocess(*args, f"train.output_dir={tmp_path / 'whole'}", env=FLWR_ENV)
    assert whole.returncode == 0, whole.stderr[-3000:]
    rows = rows_by_round(tmp_path / "whole")
    assert sorted(rows) == [0, 1, 2, 3] and all(math.isfinite(r["eval/loss"]) for r in rows.values())
    assert rows[3]["eval/loss"] < rows[0]["eval/loss"]
    # round 2: the failing client is reported, the other one's update is applied
    assert rows[2]["failures"] == 1 and rows[2]["failed_clients"] == str(failing) and rows[2]["aggregated"] == 1
    assert all(rows[r]["failures"] == 0 and rows[r]["aggregated"] == 2 for r in (1, 3))
    for r in (1, 2, 3):
        assert rows[r]["bytes_up"] > 0 and rows[r]["bytes_down"] > 0 and "train/loss" in rows[r]
        assert any(k.startswith("client/") and k.endswith("/train_loss") for k in rows[r])
        # a Ferret reply is K fp32 coefficients and little else
        assert 4 * 256 < rows[r]["bytes_up_per_client"] < 4 * 256 + 2500
    assert (tmp_path / "whole" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "whole" / "config.yaml").exists()

    # the same run, killed once round 2 is checkpointed, then resumed
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"train.output_dir={killed}"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **FLWR_ENV}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_tree(proc.pid)  # the run and the Ray processes it started
    proc.wait()
    assert (killed / "checkpoints" / "step-2").is_dir() and not (killed / "adapter").exists()
    resumed = run_subprocess(*args, f"train.output_dir={killed}", "train.resume=auto", env=FLWR_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # W&B (offline): the resumed process continued the killed one's run, and got the round rows
    runs = sorted((killed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    assert b"bytes_up_per_client" in next(runs[1].glob("run-*.wandb")).read_bytes()
    again = rows_by_round(killed)
    assert sorted(again) == [0, 1, 2, 3]
    for r in range(4):
        assert again[r]["eval/loss"] == pytest.approx(rows[r]["eval/loss"], abs=1e-6), r
        if r:
            assert again[r]["train/loss"] == pytest.approx(rows[r]["train/loss"], abs=1e-6), r


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it. Ray's daemons may run in sessions of their own,
    out of reach of killpg, but they are the driver's descendants until it dies."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} (exit code {proc.poll()})")


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop what the test started: each process and its descendants, politely, then for sure."""
    import psutil

    tree = []
    for p in procs:
        try:
            root = psutil.Process(p.pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)
    for p in procs:
        p.wait(timeout=30)


def test_deployment_superlink_and_two_supernodes_on_loopback(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "deploy"\n\n'
                                      '[superlink.deploy]\naddress = "127.0.0.1:8000"\ninsecure = true\n')
    # the SuperLink and SuperNodes start `flower-superexec` by name: the venv's bin must be on PATH
    env = {**os.environ, "OMP_NUM_THREADS": "1", **FLWR_ENV, "FLWR_HOME": str(home),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "run"
    procs = [_start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation"],
                    tmp_path / "superlink.log", env)]
    try:
        _wait_for_port(8000, procs[0])
        for i in range(2):
            procs.append(_start([str(BIN / "flower-supernode"), "--insecure", "--superlink", "127.0.0.1:8000",
                                 "--port", str(9094 + i), "--node-config", f"partition-id={i} num-partitions=2"],
                                tmp_path / f"supernode-{i}.log", env))
        overrides = (f"train.output_dir={out} federated.num_clients=2 federated.clients_per_round=2 "
                     "federated.rounds=2 federated.partition=iid")
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "deploy", "--stream", "--run-config",
                              f"config='configs/fed-tiny.yaml' overrides='{overrides}'"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _stop(procs)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    # `flwr run --stream` can exit 0 on a failed run: the run directory is the evidence
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + logs
    rows = rows_by_round(out)
    assert sorted(rows) == [0, 1, 2], run.stdout[-2000:] + logs
    assert all(rows[r]["aggregated"] == 2 and rows[r]["bytes_up"] > 0 for r in (1, 2))
    assert (out / "adapter" / "adapter_config.json").exists()
    assert json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["round"] == 2
