"""Long-running Flower processes: start them, wait for their logs, stop them with all they spawned.

- :class:`ManagedProcess`: one command (``flower-superlink``, ``flower-supernode``, the Fleet
  gateway) in its own session, logging to a file. :meth:`~ManagedProcess.stop` ends it and
  everything it spawned (Flower's SuperExec, ServerApp and ClientApp processes) by PID: the
  process tree is read from ``/proc`` before signalling, since Flower starts its SuperExec
  in a new session (a process-group kill would miss it).
- :func:`stop_all` (registered with ``atexit``) stops whatever is left if the interpreter
  exits early, including detached processes registered with :func:`watch_detached`.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
"""Flower's executables live beside this interpreter (the venv's ``bin``)."""

QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else the SuperLink runs `uv sync` per run
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}

_LIVE: list["ManagedProcess"] = []
_DETACHED: set[str] = set()  # command-line markers of processes others started detached


def flower_env(flwr_home: str | Path, extra: dict | None = None) -> dict[str, str]:
    """The environment for Flower's executables: quiet, private ``FLWR_HOME``, venv on PATH.

    The venv's ``bin`` must be on ``PATH``: the SuperLink and SuperNode start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc``; just ``[pid]`` elsewhere)."""
    if not Path("/proc").is_dir():
        return [pid]
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which has exited but is not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


class ManagedProcess:
    """A command run in its own session with output to ``log_path``; see the module doc."""

    def __init__(self, name: str, argv: list[str], *, env: dict, log_path: Path, cwd: str | Path | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = env
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")  # a fresh log: wait_for_log must not see an earlier run
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        finally:
            log.close()
        _LIVE.append(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Wait until ``text`` appears in the log; raise (with the log) if it exits or times out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log(tail=10**7):
                return
            if not self.running():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {text!r}:\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {text!r} after {timeout} s:\n{self.log()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM this process and its descendants, SIGKILL what is left after ``grace`` s."""
        stop_processes([self], grace)


def stop_trees(roots: list[int], grace: float = 10.0, reap=lambda: None) -> None:
    """SIGTERM ``roots`` and their descendants, SIGKILL what is left after ``grace`` s."""
    for _ in range(2):  # a second pass catches processes spawned while stopping
        pids = [q for r in roots for q in process_tree(r) if alive(q)]
        if not pids:
            break
        _signal(pids, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(alive(q) for q in pids):
            reap()
            time.sleep(0.1)
        _signal([q for q in pids if alive(q)], signal.SIGKILL)


def pids_with_arg(text: str) -> list[int]:
    """PIDs of live processes with ``text`` in their command line (e.g. a private FLWR_HOME)."""
    out = []
    for entry in os.listdir("/proc") if Path("/proc").is_dir() else []:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and alive(int(entry)):
                out.append(int(entry))
    return out


def stop_processes(procs: list["ManagedProcess"], grace: float = 10.0) -> None:
    """Stop several processes and their descendants at once (see :meth:`ManagedProcess.stop`)."""
    procs = [p for p in procs if p is not None and p.proc is not None]

    def reap():
        for p in procs:
            p.proc.poll()  # reap our own children

    stop_trees([p.proc.pid for p in procs], grace, reap)
    for p in procs:
        try:
            p.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if p in _LIVE:
            _LIVE.remove(p)


@atexit.register
def stop_all() -> None:
    """Stop every :class:`ManagedProcess` still running (last resort, at interpreter exit)."""
    stop_processes(list(_LIVE), grace=3.0)
    for marker in list(_DETACHED):
        stop_trees(pids_with_arg(marker), grace=3.0)


def watch_detached(marker: str) -> None:
    """Have :func:`stop_all` stop processes with ``marker`` in their command line.

    For processes another program starts detached (``flwr run`` against ``local`` starts a
    SuperLink and leaves it running), which are found by PID only through their arguments.
    """
    _DETACHED.add(marker)


def forget_detached(marker: str) -> None:
    _DETACHED.discard(marker)
