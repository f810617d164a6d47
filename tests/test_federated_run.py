"""Flower's two engines on the tiny model, inside the loopback-only namespace (tests run under
scripts/offline.sh): the simulation engine (Ray) with a client that fails mid-round, killed after
a round and resumed, against the same run uninterrupted; and the deployment engine, a SuperLink
and two SuperNodes on 127.0.0.1 driven by `flwr run`, against the same rounds delivered directly."""
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

from cli_runner import ROOT, metrics
from federated_direct import run_direct
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
    """One run on Flower's simulation engine (Ray), with a client failing in round 2, SIGKILLed
    once round 2 is checkpointed; resumed with train.resume=auto; against the uninterrupted run.
    (To keep CI short, the resume and the uninterrupted reference deliver the rounds directly in
    this process: the same ServerApp code, the ClientApp's handlers without Ray.)"""
    failing = sample_clients(4, 2, SEED, 2)[0]
    args = ["federated.rounds=3", "federated.strategy=ferret", f"federated.simulate_failures={{2: [{failing}]}}",
            f"train.seed={SEED}", "tracking.wandb=true", "tracking.project=peftforge-test"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "federated", "--config", FED_TINY, *args,
                             f"train.output_dir={killed}"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **FLWR_ENV}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "sim.log").open("w"))
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_tree(proc.pid)  # the run and the Ray processes it started
    proc.wait()
    assert (killed / "checkpoints" / "step-2").is_dir(), (tmp_path / "sim.log").read_text()[-3000:]
    assert not (killed / "adapter").exists()
    on_ray = rows_by_round(killed)
    assert sorted(on_ray) == [0, 1, 2]
    # round 2: the failing client is reported, the other one's update is applied
    assert on_ray[2]["failures"] == 1 and on_ray[2]["failed_clients"] == str(failing) and on_ray[2]["aggregated"] == 1
    assert on_ray[1]["failures"] == 0 and on_ray[1]["aggregated"] == 2
    for r in (1, 2):
        assert on_ray[r]["bytes_up"] > 0 and on_ray[r]["bytes_down"] > 0 and "train/loss" in on_ray[r]
        assert any(k.startswith("client/") and k.endswith("/train_loss") for k in on_ray[r])
        # a Ferret reply is K fp32 coefficients and little else
        assert 4 * 256 < on_ray[r]["bytes_up_per_client"] < 4 * 256 + 2500

    run_direct(FED_TINY, [*args, f"train.output_dir={killed}", "train.resume=auto"])
    run_direct(FED_TINY, [*args, f"train.output_dir={tmp_path / 'whole'}", "tracking.wandb=false"])
    whole, again = rows_by_round(tmp_path / "whole"), rows_by_round(killed)
    assert sorted(whole) == sorted(again) == [0, 1, 2, 3] and again[3]["aggregated"] == 2
    assert whole[3]["eval/loss"] < whole[0]["eval/loss"] and all(math.isfinite(r["eval/loss"]) for r in whole.values())
    for r in range(4):  # Ray's rounds 0-2 and the resumed round 3 are the uninterrupted run's
        assert again[r]["eval/loss"] == pytest.approx(whole[r]["eval/loss"], abs=1e-6), r
        if r:
            assert again[r]["train/loss"] == pytest.approx(whole[r]["train/loss"], abs=1e-6), r
    assert (killed / "adapter" / "adapter_config.json").exists() and (killed / "config.yaml").exists()
    # W&B (offline): the resumed process continued the killed one's run, and got the round rows
    runs = sorted((killed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    # (the killed process's file may have lost its unflushed tail with the SIGKILL)
    assert b"bytes_up_per_client" in next(runs[1].glob("run-*.wandb")).read_bytes()


def _tree(pids) -> list:
    """The processes and all their descendants. Ray's daemons may run in sessions of their own,
    out of reach of killpg, but they are the driver's descendants until it dies."""
    import psutil

    tree = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return tree


def _signal(tree: list, how: str) -> None:
    import psutil

    for p in tree:
        try:
            getattr(p, how)()
        except psutil.NoSuchProcess:
            pass


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it."""
    import psutil

    tree = _tree([pid])
    _signal(tree, "kill")
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

    tree = _tree(p.pid for p in procs)
    _signal(tree, "terminate")
    _, alive = psutil.wait_procs(tree, timeout=5)
    _signal(alive, "kill")
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
    # the same rounds delivered directly: a process per message on the nodes computes the same thing
    run_direct(FED_TINY, [*overrides.replace(str(out), str(tmp_path / "direct")).split()])
    direct = rows_by_round(tmp_path / "direct")
    for r in (0, 1, 2):
        assert rows[r]["eval/loss"] == pytest.approx(direct[r]["eval/loss"], abs=1e-5), r
