"""The one TOML writer of the deployment code (``tomli_w``), for every TOML text it produces.

Flower reads TOML in four places we write: the app config in ``pyproject.toml``
(:mod:`.app_config`), ``flwr run --run-config <file>``, the ``--node-config`` of a SuperNode
(``key=value`` pairs whose values are TOML literals) and the SuperLink connections in
``$FLWR_HOME/config.toml`` (:mod:`.federation`). All of them go through :func:`dumps`, so
quoting and escaping (a client id with a quote or a space, a path with a backslash) follow
one implementation of the TOML spec.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w


def nest(flat: dict) -> dict:
    """Dotted keys as nested tables (``{"a.b": 1}`` -> ``{"a": {"b": 1}}``), as TOML reads them.

    A key that is both a value and a table (``a`` and ``a.b``) cannot be written as TOML:
    that raises with both names.
    """
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key!r}: {'.'.join(parents[: i + 1])!r} is a value, not a table")
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"{key!r} is a table (it has dotted sub-keys) and cannot also be a value")
        node[leaf] = value
    return out


def dumps(data: dict) -> str:
    """``data`` (nested dicts of str, int, float, bool, lists) as TOML text."""
    return tomli_w.dumps(data)


def write(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(dumps(data))
    return path


def literal(value) -> str:
    """One TOML value literal (``"a b"``, ``3``, ``0.25``, ``true``): the right side of ``k = v``."""
    if value is None:
        raise ValueError("TOML has no null; give a value (Config.flatten writes None as '')")
    if not isinstance(value, (str, int, float)):  # bool is an int
        raise TypeError(f"a scalar literal is str, int, float or bool, not {type(value).__name__}: {value!r}")
    line = dumps({"v": value})
    return line[len("v = "):].rstrip("\n")
