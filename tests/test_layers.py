"""The package's layers never reach up (docs/architecture.md#architecture).

Every import in ``fedmoe_flwr/`` (module level or inside a function) is checked against
the rank of its layer: a module may import its own layer and those below, never one above.
The alignment core, additionally, imports no Flower, Hydra/OmegaConf or torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedmoe_flwr"

RANK = {
    "layout": 0, "seeding": 0, "imports": 0, "variants": 0, "widths": 0,
    "core": 1,
    "config": 2, "protocol": 2, "privacy": 2,
    "models": 3, "data": 3,
    "fleet": 4, "experiment": 4,
    "client": 5, "strategies": 5,
    "recording": 6, "deployment_grid": 6, "tracking": 6, "checkpoint": 6, "outputs": 6, "progress": 6, "sim": 6, "server_app": 6, "server_reference": 6,
    "simulation": 7, "report": 7,
    "deploy": 8, "bench": 8,
}
"""Layer of each top-level module or subpackage of fedmoe_flwr (0 = bottom)."""

APART = {("client", "strategies"), ("strategies", "client"), ("models", "data"), ("data", "models")}
"""Layers of one rank that must not import each other: the two sides of the wire, and
models and data (joined only by ``experiment``)."""


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fedmoe_flwr" or len(parts) < 2 or parts[1] in ("__init__", "__main__", "py"):
        return None  # the package root only re-exports
    return parts[1]


def _imports(path: Path, root: Path = ROOT):
    """``(line, imported module)`` of every import in a file, relative ones resolved."""
    mod = ".".join(path.relative_to(root).with_suffix("").parts)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    pkg = pkg.removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            if target == "fedmoe_flwr":  # `from fedmoe_flwr import core` names the layer
                for a in node.names:
                    yield node.lineno, f"{target}.{a.name}"


def _violations(root: Path = ROOT) -> list[str]:
    found = []
    for f in sorted((root / "fedmoe_flwr").rglob("*.py")):
        own = _layer(".".join(f.relative_to(root).with_suffix("").parts))
        if own is None:
            continue
        assert own in RANK, f"{f.relative_to(root)}: layer {own!r} has no rank; add it to RANK and docs/architecture.md"
        for line, target in _imports(f, root):
            other = _layer(target)
            if other is None or other == own or other not in RANK:
                continue
            if RANK[other] > RANK[own] or (own, other) in APART:
                found.append(f"{f.relative_to(root)}:{line} ({own}, rank {RANK[own]}) imports {target} ({other}, rank {RANK[other]})")
    return sorted(set(found))


def test_no_module_imports_a_layer_above_it():
    bad = _violations()
    assert not bad, "layers reach up:\n" + "\n".join(bad)


def test_the_layer_check_catches_a_module_reaching_up(tmp_path):
    """The check itself can fail: a core module importing the server app is reported."""
    fake = tmp_path / "fedmoe_flwr" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from fedmoe_flwr.server_app import run_server\n")
    (fake / "fine.py").write_text("from ..layout import ParamLayout\nfrom . import round\n")
    assert _violations(tmp_path) == ["fedmoe_flwr/core/bad.py:2 (core, rank 1) imports fedmoe_flwr.server_app (server_app, rank 6)"]


@pytest.mark.parametrize("banned", ["flwr", "hydra", "omegaconf", "torch"])
def test_core_imports_no_framework(banned):
    for f in (PACKAGE / "core").glob("*.py"):
        for line, target in _imports(f):
            assert target.split(".")[0] != banned, f"core/{f.name}:{line} imports {target}"
