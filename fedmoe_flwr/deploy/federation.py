"""Talking to a SuperLink's Control API: ``$FLWR_HOME/config.toml`` connections and the ``flwr`` CLI.

- :func:`write_connections` / :func:`add_connection`: ``flwr`` 1.41 reads SuperLink
  connections ("federations") from ``$FLWR_HOME/config.toml``, not from the app's
  ``pyproject.toml``; each names an address and how to trust it.
- :class:`FlwrCli`: ``flwr`` with a private environment; :meth:`~FlwrCli.run` submits an app
  with ``flwr run`` and waits for the run to end (:class:`RunResult`).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedmoe_flwr.deploy import tomlio
from fedmoe_flwr.deploy.processes import BIN


def connection(address: str, *, ca: str | Path | None = None) -> dict:
    """One ``[superlink.<name>]`` table: ``address`` (``host:port`` or ``:local:``), trusting ``ca``
    (the PEM of a private CA) or, without one, plain HTTP (``insecure``). ``:local:`` needs neither."""
    table: dict = {"address": address}
    if ca is not None:
        table["root-certificates"] = str(ca)
    elif address != ":local:":
        table["insecure"] = True
    return table


def write_connections(home: str | Path, connections: dict[str, dict], default: str) -> Path:
    """``home/config.toml`` with ``connections`` (name -> :func:`connection` table), ``default`` first choice."""
    if default not in connections:
        raise ValueError(f"default connection {default!r} is not one of {sorted(connections)}")
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    return tomlio.write(home / "config.toml", {"superlink": {"default": default, **connections}})


def add_connection(home: str | Path, name: str, table: dict) -> Path:
    """Add (or replace) connection ``name`` in ``home/config.toml``, keeping the others."""
    path = Path(home) / "config.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault("superlink", {})[name] = table
    return tomlio.write(path, data)


def write_run_config(path: str | Path, run_config: dict) -> Path:
    """A TOML file for ``flwr run --run-config <file>``: Flower flattens its tables to ``run_config``'s dotted keys."""
    return tomlio.write(path, tomlio.nest(run_config))


@dataclass
class RunResult:
    run_id: str
    status: str
    seconds: float
    output: str = ""


class FlwrCli:
    """The ``flwr`` CLI with a private environment (``env``, ``workdir``, ``connection``)."""

    env: dict
    workdir: Path
    connection: str

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run ``flwr *args``; returns stdout, raises with the output on failure."""
        cmd = [str(BIN / "flwr"), *args]
        done = subprocess.run(cmd, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)
        failed = done.returncode != 0
        if not failed and "json" in args and "{" in done.stdout:  # JSON output reports failures inside
            failed = json.loads(done.stdout[done.stdout.index("{"):]).get("success") is False
        if failed:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def run_status(self, run_id: str) -> str:
        """The run's status from ``flwr ls`` (``finished:completed`` when it succeeded)."""
        out = self.flwr("ls", self.connection, "--run-id", run_id, "--format", "json")
        runs = json.loads(out[out.index("{"):])["runs"]
        return str(runs[0]["status"]) if runs else "unknown"

    def run_log(self, run_id: str) -> str:
        """The run's log (ServerApp output) as ``flwr log --show`` prints it."""
        try:
            return self.flwr("log", run_id, self.connection, "--show", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired) as ex:
            return f"(no log: {ex})"

    def check_alive(self) -> None:
        """Raise if the SuperLink died (overridden where we own it)."""

    def run(self, app_dir: str | Path, run_config: dict, *, timeout: float = 600.0,
            done_file: str | Path | None = None, extra: tuple[str, ...] = ()) -> RunResult:
        """``flwr run app_dir <connection> --run-config <file>`` and wait until the run ends.

        ``done_file`` (e.g. the run's ``summary.json``) is watched to notice the end
        without polling the CLI; the status is then confirmed with ``flwr ls``.
        """
        t0 = time.monotonic()
        cfg_file = write_run_config(self.workdir / f"run-config-{int(t0 * 1000)}.toml", run_config)
        out = self.flwr("run", str(Path(app_dir).resolve()), self.connection, "--run-config", str(cfg_file),
                        *extra, "--format", "json")
        reply = json.loads(out[out.index("{"):])
        if not reply.get("success") or "run-id" not in reply:
            raise RuntimeError(f"flwr run failed: {reply}")
        run_id = str(reply["run-id"])
        done = Path(done_file) if done_file is not None else None
        started = time.time()
        status, last_check = "running", time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            fresh = done is not None and done.exists() and done.stat().st_mtime >= started - 1
            if fresh or time.monotonic() - last_check > 20:
                status, last_check = self.run_status(run_id), time.monotonic()
                if status.startswith("finished"):
                    seconds = time.monotonic() - t0
                    if status != "finished:completed":  # keep the run's log for the error message
                        out += "\n" + self.run_log(run_id)
                    return RunResult(run_id, status, seconds, out)
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} not finished after {timeout} s (status {status})")
