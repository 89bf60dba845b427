"""Start a Flower deployment on this machine and stop every process of it again.

Used by the deployment tests and the overhead measurement; the same commands
(:mod:`.commands`), typed by hand on several machines, are the real deployment
(docs/deployment.md).

- :class:`LoopbackFederation`: a SuperLink and N SuperNodes on 127.0.0.1 with free ports, a
  private ``FLWR_HOME`` holding the SuperLink connection, optionally TLS
  (:func:`~.credentials.make_tls_certificates`), SuperNode authentication
  (:func:`~.credentials.make_node_key`) and the Fleet gateway (:mod:`.fleet_gateway`) that
  the SuperNodes then connect through, as in the runbook. As a context manager it stops
  all its processes on exit, also when the body raised.
- :class:`LocalSimulation`: ``flwr run <app> local`` (Flower's Simulation Runtime).

The pieces live in their own modules and are importable from here too: processes
(:mod:`.processes`), credentials (:mod:`.credentials`), command lines (:mod:`.commands`),
``flwr`` and its connections (:mod:`.federation`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe_flwr.deploy.commands import (
    CONTROL_HOST,
    gateway_argv,
    node_config_arg,
    superlink_argv,
    supernode_argv,
)
from fedmoe_flwr.deploy.credentials import make_node_key, make_tls_certificates
from fedmoe_flwr.deploy.federation import FlwrCli, RunResult, connection, write_connections, write_run_config
from fedmoe_flwr.deploy.processes import (
    BIN,
    QUIET_ENV,
    ManagedProcess,
    alive,
    flower_env,
    forget_detached,
    free_port,
    pids_with_arg,
    process_tree,
    stop_all,
    stop_processes,
    stop_trees,
    watch_detached,
)

_alive = alive  # the name this module had for it
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

__all__ = [
    "BIN", "QUIET_ENV", "FlwrCli", "LocalSimulation", "LoopbackFederation", "ManagedProcess", "RunResult", "alive",
    "flower_env", "free_port", "make_node_key", "make_tls_certificates", "node_config_arg", "pids_with_arg",
    "process_tree", "stop_all", "stop_processes", "stop_trees", "write_run_config",
]


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
        gateway: SuperNodes reach the Fleet API through the Fleet gateway on
            ``gateway_host`` (as in the runbook) instead of the SuperLink's own address.
    """

    workdir: Path
    nodes: list[dict]
    tls: bool = False
    auth: bool = False
    gateway: bool = False
    gateway_host: str = CONTROL_HOST
    connection: str = "loopback"
    start_timeout: float = 90.0
    superlink: ManagedProcess | None = None
    fleet_gateway: ManagedProcess | None = None
    supernodes: list[ManagedProcess] = field(default_factory=list)
    port: int = 0
    gateway_port: int = 0
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

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the gateway, else the SuperLink itself."""
        if self.gateway:
            host = CONTROL_HOST if self.gateway_host in ("0.0.0.0", "::") else self.gateway_host
            return f"{host}:{self.gateway_port}"
        return f"{CONTROL_HOST}:{self.port}"

    def superlink_argv(self) -> list[str]:
        return superlink_argv(self.port, certs=self.certs if self.tls else None, auth=self.auth, bin_dir=BIN)

    def gateway_argv(self) -> list[str]:
        return gateway_argv(self.gateway_port, self.port, host=self.gateway_host,
                            certs=self.certs if self.tls else None, python=sys.executable)

    def supernode_argv(self, i: int, key: Path | None = None) -> list[str]:
        if key is None and self.auth:
            key = self.node_keys[i][0]
        return supernode_argv(self.fleet_address, self.nodes[i], ca=self.certs["ca"] if self.tls else None, key=key,
                              runtime_port=free_port(), bin_dir=BIN)

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.tls and not self.certs:  # given certs (ca, cert, key paths) are used as they are
            self.certs = make_tls_certificates(self.workdir / "certs")
        self._write_connection()
        self.superlink = ManagedProcess("superlink", self.superlink_argv(), env=self.env,
                                        log_path=self.workdir / "superlink.log", cwd=self.workdir).start()
        if self.gateway:
            self.gateway_port = free_port()
            # the gateway runs the fedmoe_flwr imported here (a checkout need not be the installed one)
            env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, self.env.get("PYTHONPATH")]))}
            self.fleet_gateway = ManagedProcess("fleet-gateway", self.gateway_argv(), env=env,
                                                log_path=self.workdir / "fleet-gateway.log", cwd=self.workdir).start()
        self.superlink.wait_for_log("Uvicorn running", self.start_timeout)
        if self.fleet_gateway is not None:
            self.fleet_gateway.wait_for_log("Uvicorn running", self.start_timeout)
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
        stop_processes([p for p in (self.fleet_gateway, self.superlink) if p is not None])

    def pids(self) -> list[int]:
        """PIDs of every process of this federation that is alive now."""
        procs = [self.superlink, self.fleet_gateway, *self.supernodes]
        roots = [p.pid for p in procs if p is not None and p.pid is not None]
        return [q for r in roots for q in process_tree(r) if alive(q)]

    def check_alive(self) -> None:
        if self.superlink is None or not self.superlink.running():
            raise RuntimeError(f"the SuperLink exited:\n{self.superlink.log() if self.superlink else ''}")

    def _write_connection(self) -> None:
        """The operator's connection: the Control API on the SuperLink's loopback address."""
        table = connection(f"{CONTROL_HOST}:{self.port}", ca=self.certs["ca"] if self.tls else None)
        write_connections(self.home, {self.connection: table}, default=self.connection)


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
        write_connections(self.home, {self.connection: connection(":local:")}, default=self.connection)

    def __enter__(self) -> "LocalSimulation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, app_dir, run_config, **kw) -> RunResult:  # type: ignore[override]
        watch_detached(str(self.home))  # flwr leaves that SuperLink running
        return super().run(app_dir, run_config, extra=("--federation-config", f"num-supernodes={self.num_supernodes}"), **kw)

    def pids(self) -> list[int]:
        return [q for r in pids_with_arg(str(self.home)) for q in process_tree(r) if alive(q)]

    def stop(self) -> None:
        stop_trees(pids_with_arg(str(self.home)))
        forget_detached(str(self.home))
