"""Start a Flower deployment on this machine and stop every process of it again.

Used by the deployment tests and the overhead measurement; the same commands, typed by
hand on several machines, are the real deployment (README, "Run on a real federation").

- :class:`ManagedProcess`: one long-running command (``flower-superlink``,
  ``flower-supernode``) in its own session, logging to a file. :meth:`~ManagedProcess.stop`
  ends it and everything it spawned (Flower's SuperExec, ServerApp and ClientApp
  processes) by PID: the process tree is read from ``/proc`` before signalling, since
  Flower starts its SuperExec in a new session (a process-group kill would miss it).
- :class:`LoopbackFederation`: a SuperLink and N SuperNodes on 127.0.0.1 with free ports, a
  private ``FLWR_HOME`` holding the SuperLink connection, optionally TLS
  (:func:`make_tls_certificates`) and SuperNode authentication (:func:`make_node_key`),
  and :meth:`~LoopbackFederation.run` for ``flwr run``. As a context manager it stops all
  its processes on exit, also when the body raised; :func:`stop_all` (registered with
  ``atexit``) stops whatever is left if the interpreter exits early.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
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
_LOCAL_HOMES: set[str] = set()  # FLWR_HOMEs of LocalSimulations whose SuperLink may still run


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


def _alive(pid: int) -> bool:
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
        pids = [q for r in roots for q in process_tree(r) if _alive(q)]
        if not pids:
            break
        _signal(pids, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(_alive(q) for q in pids):
            reap()
            time.sleep(0.1)
        _signal([q for q in pids if _alive(q)], signal.SIGKILL)


def pids_with_arg(text: str) -> list[int]:
    """PIDs of live processes with ``text`` in their command line (e.g. a private FLWR_HOME)."""
    out = []
    for entry in os.listdir("/proc") if Path("/proc").is_dir() else []:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and _alive(int(entry)):
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
    for home in list(_LOCAL_HOMES):
        stop_trees(pids_with_arg(home), grace=3.0)


# -------------------------------------------------------------------------- credentials
def make_tls_certificates(out_dir: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A self-signed CA and a server certificate for ``hosts`` signed by it (PEM files).

    Returns paths ``ca`` (give to SuperNodes and the ``flwr`` CLI), ``cert`` and ``key``
    (the SuperLink's). For real machines, put every name and address the SuperNodes use
    to reach the SuperLink into ``hosts``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoe-flwr test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def make_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``).

    Returns ``(private, public)``: the SuperNode starts with ``--auth-supernode-private-key
    private``; the public key is registered with ``flwr supernode register public``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / name, out / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


# -------------------------------------------------------------------------- the federation
def node_config_arg(config: dict) -> str:
    """``--node-config`` text: TOML values (strings quoted), space separated."""
    parts = []
    for k, v in config.items():
        if isinstance(v, bool):
            val = "true" if v else "false"
        elif isinstance(v, (int, float)):
            val = repr(v)
        else:
            val = json.dumps(str(v))
        parts.append(f"{k}={val}")
    return " ".join(parts)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_run_config(path: str | Path, run_config: dict) -> Path:
    """A TOML file of flat dotted keys for ``flwr run --run-config <file>``."""
    path = Path(path)
    lines = [f"{k} = {_toml_value(v)}" for k, v in run_config.items()]  # dotted keys nest, as Flower expects
    path.write_text("\n".join(lines) + "\n")
    return path


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


@dataclass
class LoopbackFederation(FlwrCli):
    """A SuperLink and SuperNodes on 127.0.0.1 (see the module doc).

    Args:
        workdir: logs, certificates, keys and ``FLWR_HOME`` go here.
        nodes: one ``node_config`` dict per SuperNode.
        tls: serve the SuperLink over TLS with certificates made for 127.0.0.1 (or ``certs``:
            paths ``ca``, ``cert``, ``key`` made elsewhere, e.g. by openssl).
        auth: SuperNode authentication: the SuperLink accepts only registered node keys
            (``node_keys``: ``(private, public)`` paths per node, else generated).
    """

    workdir: Path
    nodes: list[dict]
    tls: bool = False
    auth: bool = False
    connection: str = "loopback"
    start_timeout: float = 90.0
    superlink: ManagedProcess | None = None
    supernodes: list[ManagedProcess] = field(default_factory=list)
    port: int = 0
    certs: dict = field(default_factory=dict)
    node_keys: list[tuple[Path, Path]] = field(default_factory=list)

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.home = self.workdir / "flwr-home"
        self.env = flower_env(self.home)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "LoopbackFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def superlink_argv(self) -> list[str]:
        argv = [BIN / "flower-superlink", "--port", self.port, "--disable-runtime-dependency-installation"]
        if self.tls:
            argv += ["--ssl-ca-certfile", self.certs["ca"], "--ssl-certfile", self.certs["cert"], "--ssl-keyfile", self.certs["key"]]
        else:
            argv += ["--insecure"]
        if self.auth:
            argv += ["--enable-supernode-auth"]
        return argv

    def supernode_argv(self, i: int, key: Path | None = None) -> list[str]:
        argv = [BIN / "flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", free_port(),
                "--node-config", node_config_arg(self.nodes[i])]
        argv += ["--root-certificates", self.certs["ca"]] if self.tls else ["--insecure"]
        if self.auth or key is not None:
            argv += ["--auth-supernode-private-key", key if key is not None else self.node_keys[i][0]]
        return argv

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.tls and not self.certs:  # given certs (ca, cert, key paths) are used as they are
            self.certs = make_tls_certificates(self.workdir / "certs")
        self._write_connection()
        self.superlink = ManagedProcess("superlink", self.superlink_argv(), env=self.env,
                                        log_path=self.workdir / "superlink.log", cwd=self.workdir).start()
        self.superlink.wait_for_log("Uvicorn running", self.start_timeout)
        for i in range(len(self.nodes)):
            self.add_node(i, wait=False)
        for p in self.supernodes:
            p.wait_for_log("SuperNode ID", self.start_timeout)

    def add_node(self, i: int, *, wait: bool = True) -> ManagedProcess:
        """Start SuperNode ``i`` (registering its key first when ``auth``)."""
        if self.auth:
            while len(self.node_keys) <= i:
                self.node_keys.append(make_node_key(self.workdir / "keys", f"node{len(self.node_keys)}"))
            self.flwr("supernode", "register", str(self.node_keys[i][1]), self.connection)
        p = self.spawn_node(i)
        while len(self.supernodes) <= i:
            self.supernodes.append(None)  # type: ignore[arg-type]
        self.supernodes[i] = p
        if wait:
            p.wait_for_log("SuperNode ID", self.start_timeout)
        return p

    def spawn_node(self, i: int, key: Path | None = None, name: str | None = None) -> ManagedProcess:
        """Start a SuperNode process for ``nodes[i]`` (``key``: its auth key, registered or not)."""
        name = name or f"supernode{i}"
        return ManagedProcess(name, self.supernode_argv(i, key), env=self.env,
                              log_path=self.workdir / f"{name}.log", cwd=self.workdir).start()

    def stop_node(self, i: int) -> None:
        self.supernodes[i].stop()

    def stop(self) -> None:
        # SuperNodes first: with their SuperLink gone they retry instead of exiting.
        stop_processes([p for p in self.supernodes if p is not None])
        stop_processes([self.superlink] if self.superlink is not None else [])

    def pids(self) -> list[int]:
        """PIDs of every process of this federation that is alive now."""
        roots = [p.pid for p in [self.superlink, *self.supernodes] if p is not None and p.pid is not None]
        return [q for r in roots for q in process_tree(r) if _alive(q)]

    def check_alive(self) -> None:
        if self.superlink is None or not self.superlink.running():
            raise RuntimeError(f"the SuperLink exited:\n{self.superlink.log() if self.superlink else ''}")

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{self.connection}"', "", f"[superlink.{self.connection}]",
                 f'address = "127.0.0.1:{self.port}"']
        if self.tls:
            lines.append(f'root-certificates = "{self.certs["ca"]}"')
        else:
            lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")


@dataclass
class LocalSimulation(FlwrCli):
    """``flwr run <app> local``: Flower's Simulation Runtime behind a managed local SuperLink.

    ``flwr`` starts that SuperLink itself, detached, on the ports named by
    ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and ``FLWR_LOCAL_CONTROL_API_PORT``, and leaves it
    running after the run. Here it gets free ports and a private ``FLWR_HOME``; on exit it
    is stopped by PID (found by that ``FLWR_HOME`` in its command line).
    """

    workdir: Path
    num_supernodes: int
    connection: str = "local"

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home, {
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        })
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\naddress = ":local:"\n'
        )

    def __enter__(self) -> "LocalSimulation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, app_dir, run_config, **kw) -> RunResult:  # type: ignore[override]
        _LOCAL_HOMES.add(str(self.home))
        return super().run(app_dir, run_config, extra=("--federation-config", f"num-supernodes={self.num_supernodes}"), **kw)

    def pids(self) -> list[int]:
        return [q for r in pids_with_arg(str(self.home)) for q in process_tree(r) if _alive(q)]

    def stop(self) -> None:
        stop_trees(pids_with_arg(str(self.home)))
        _LOCAL_HOMES.discard(str(self.home))
