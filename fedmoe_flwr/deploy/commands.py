"""The command lines of a deployment: SuperLink, Fleet gateway and SuperNode.

The launcher starts exactly these commands, and docs/deployment.md prints them (a test
checks that the runbook's commands are what these functions build), so the runbook is the
command line the tests ran.

Where each API listens (Flower 1.41): ``flower-superlink`` serves its Fleet, Control and
Runtime APIs over HTTP on one address, ``--host``:``--port``. The Control API has no
authentication of its own in Flower's open-source build, so whoever reaches it (and
trusts the CA, which every device holds) can ``flwr supernode register`` a key of their
own, start runs (the ServerApp runs their code on the server) or stop them. Flower's
``--control-api-address`` and ``--fleet-api-address`` are deprecated and only address the
legacy gRPC servers, not the HTTP APIs, so they cannot move the Control API elsewhere.
Therefore the SuperLink is always bound to loopback (:data:`CONTROL_HOST`), and the devices
reach only its Fleet API, through :mod:`.fleet_gateway` on a public address
(:data:`PUBLIC_HOST`), which forwards ``/v1/fleet/*`` and refuses everything else.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedmoe_flwr.deploy.tomlio import literal

CONTROL_HOST = "127.0.0.1"
"""The SuperLink's bind address: its Control and Runtime APIs are never reachable from outside."""
PUBLIC_HOST = "0.0.0.0"
"""The Fleet gateway's bind address in a deployment: every interface of the server."""
SUPERLINK_PORT = 8000  # Flower's default port of the SuperLink's HTTP APIs
GATEWAY_PORT = 9092  # the Fleet API's port in the runbook (Flower's former gRPC Fleet port)
GATEWAY_MODULE = "fedmoe_flwr.deploy.fleet_gateway"


def _program(name: str, bin_dir: str | Path | None) -> str:
    return str(Path(bin_dir) / name) if bin_dir is not None else name


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def node_config_arg(config: dict) -> str:
    """``--node-config`` text: ``key=value`` pairs with TOML values, space separated.

    Flower splits the text with a regular expression that takes ``"..."`` or ``'...'`` without
    escapes, so a string with a double quote is written as a TOML literal string ``'...'``; one
    with both quote kinds (or a control character) cannot be passed and raises.
    """
    parts = []
    for key, value in config.items():
        if not _BARE_KEY.fullmatch(str(key)):
            raise ValueError(f"node_config key {key!r}: --node-config takes bare keys (letters, digits, '-', '_')")
        parts.append(f"{key}={_node_value(key, value)}")
    return " ".join(parts)


def _node_value(key: str, value) -> str:
    if not (isinstance(value, str) and '"' in value):
        return literal(value)
    if "'" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"node_config {key}={value!r}: a --node-config string cannot hold both quote kinds "
                         "or control characters")
    return f"'{value}'"


def superlink_argv(port: int = SUPERLINK_PORT, *, certs: dict | None = None, auth: bool = False,
                   database: str | Path | None = None, bin_dir: str | Path | None = None) -> list[str]:
    """``flower-superlink`` on ``127.0.0.1:port``, with TLS when ``certs`` (``ca``, ``cert``,
    ``key`` paths) and SuperNode authentication when ``auth`` (which needs TLS)."""
    if auth and not certs:
        raise ValueError("SuperNode authentication needs TLS: give certs (ca, cert, key)")
    argv = [_program("flower-superlink", bin_dir), "--host", CONTROL_HOST, "--port", str(port)]
    if certs:
        argv += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                 "--ssl-keyfile", str(certs["key"])]
    else:
        argv += ["--insecure"]
    if auth:
        argv += ["--enable-supernode-auth"]
    argv += ["--disable-runtime-dependency-installation"]  # else the SuperLink runs `uv sync` per run
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def gateway_argv(port: int = GATEWAY_PORT, superlink_port: int = SUPERLINK_PORT, *, host: str = PUBLIC_HOST,
                 certs: dict | None = None, python: str | None = None) -> list[str]:
    """The Fleet gateway on ``host:port`` in front of the SuperLink on ``127.0.0.1:superlink_port``.

    ``python``: the interpreter (default ``python``, as typed in the runbook).
    """
    argv = [python or "python", "-m", GATEWAY_MODULE, "--host", host, "--port", str(port),
            "--superlink", f"{CONTROL_HOST}:{superlink_port}"]
    if certs:
        argv += ["--ssl-certfile", str(certs["cert"]), "--ssl-keyfile", str(certs["key"]),
                 "--ssl-ca-certfile", str(certs["ca"])]
    else:
        argv += ["--insecure"]
    return argv


def supernode_argv(superlink: str, node_config: dict, *, ca: str | Path | None = None, key: str | Path | None = None,
                   runtime_port: int | None = None, bin_dir: str | Path | None = None) -> list[str]:
    """``flower-supernode`` connecting to the Fleet API at ``superlink`` (``host:port``).

    ``ca``: the CA to trust (else ``--insecure``); ``key``: its authentication private key;
    ``runtime_port``: the port of its own Runtime API on loopback (Flower's default 9094;
    several SuperNodes on one machine need one each).
    """
    argv = [_program("flower-supernode", bin_dir), "--superlink", superlink]
    argv += ["--root-certificates", str(ca)] if ca is not None else ["--insecure"]
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    argv += ["--node-config", node_config_arg(node_config)]
    if runtime_port is not None:
        argv += ["--port", str(runtime_port)]
    return argv
