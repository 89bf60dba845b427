"""A simulation joins a Ray cluster that is already running (``ray_address``), on loopback.

The head is started here with ``ray start --head --block`` in its own temporary directory
and on free ports, so it never meets another Ray instance on the machine, and is stopped
by its own process ids (never ``ray stop``, which would stop every Ray of the user).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (this head's unique temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` tears its processes down on exit
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
    deadline = time.time() + 30
    while _pids_using(temp_dir) and time.time() < deadline:
        time.sleep(0.5)
    for pid in _pids_using(temp_dir):  # whatever outlived the head: ours, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def ray_head(num_cpus: int):
    """``(address, temp_dir)`` of a private Ray head with ``num_cpus`` CPUs."""
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, client, agent, agent_grpc, metrics, node_mgr, obj_mgr, runtime_env = _free_ports(8)
    cmd = [str(RAY), "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           f"--runtime-env-agent-port={runtime_env}", "--object-store-memory=200000000"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(Path(temp_dir).glob("session_*/logs/raylet.out")):
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        time.sleep(2)  # the raylet registers with the GCS
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _stop(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)  # its session logs and sockets


def _job_ids(temp_dir: str) -> list[str]:
    """Jobs (drivers) that connected to the head, from its log names ``python-core-driver-<job>..._<pid>.log``."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    return sorted({p.name.removeprefix("python-core-driver-")[:8] for p in logs.glob("python-core-driver-*.log")})


def _actor_processes(temp_dir: str, job: str) -> int:
    """Worker processes the head started for ``job`` (``worker-<id>-<job>-<pid>.out``)."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    return len({p.name for p in logs.glob(f"worker-*-{job}-*.out")})


def _run(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={out}", "num_rounds=2", "dataset.num_clients=6",
           "strategy.fraction_train=0.5", "report=false", "checkpoint_every=0", "save_model=false", "eval_every=1",
           *overrides]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k or "sim" in k} for r in rows]


@pytest.mark.slow
def test_a_simulation_joins_a_running_ray_head_with_per_client_cpus_and_matches_the_local_run(tmp_path):
    with ray_head(num_cpus=2) as (address, temp_dir):
        done = _run(tmp_path / "ray", "backend=ray", f"ray_address={address}", "num_cpus_per_client=1", "quiet=true")
        assert done.returncode == 0, done.stderr[-3000:]
        # the run's driver and its ClientApp actors ran on this head, not on a Ray of their own
        jobs = _job_ids(temp_dir)
        assert len(jobs) == 1, f"one driver joined the head, got {jobs}"
        assert _actor_processes(temp_dir, jobs[0]) == 2, "2 CPUs / num_cpus_per_client=1: two ClientApp actors"
    assert not _pids_using(temp_dir), "the head and its workers are gone"
    local = _run(tmp_path / "local", "backend=local", "quiet=true")
    assert local.returncode == 0, local.stderr[-3000:]
    assert _metrics(tmp_path / "ray") == _metrics(tmp_path / "local")
