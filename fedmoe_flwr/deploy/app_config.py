"""The Flower App config (``[tool.flwr.app.config]`` in ``pyproject.toml``).

Flower flattens nested tables of the app config into dotted keys (``[tool.flwr.app.config.
strategy] name = "aligned"`` becomes ``strategy.name``), which are exactly the keys of
:func:`fedmoe_flwr.config.flatten`. ``flwr run --run-config 'k=v'`` may only override keys
that exist there, so the section lists every key of the schema, with the values of the
quickstart (``conf/config.yaml``): ``flwr run`` then starts from what ``python run.py`` runs.

Besides the schema, a run config carries a few keys for the run itself (:data:`RUN_KEYS`):
the ServerApp reads them, the ClientApp ignores them.

    python -m fedmoe_flwr.deploy.app_config            # print the section
    python -m fedmoe_flwr.deploy.app_config --check    # exit 1 if pyproject.toml differs
    python -m fedmoe_flwr.deploy.app_config --write    # rewrite the section in place
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmoe_flwr.deploy import tomlio

ROOT = Path(__file__).resolve().parents[2]

from fedmoe_flwr.config import RUN_KEYS  # noqa: E402 - the run-level keys live beside the schema

SECTION = "tool.flwr.app.config"


def quickstart_config(overrides: list[str] | None = None, conf_dir: Path | None = None):
    """The :class:`~fedmoe_flwr.config.Config` that ``python run.py <overrides>`` composes."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedmoe_flwr.config import register_configs, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir or ROOT / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=list(overrides or []))
    return to_config(dcfg)


def app_config_toml(cfg=None) -> str:
    """The ``[tool.flwr.app.config]`` tables for ``cfg`` (default: the quickstart)."""
    from fedmoe_flwr.config import flatten

    cfg = cfg if cfg is not None else quickstart_config()
    nested = tomlio.nest({**RUN_KEYS, **flatten(cfg)})
    body = tomlio.dumps({"tool": {"flwr": {"app": {"config": nested}}}})
    # tomli_w writes the parent tables too; keep from the config table on.
    start = body.index(f"[{SECTION}]")
    return body[start:]


def _split(text: str) -> tuple[str, str, str]:
    """``pyproject.toml`` as (before, the app-config tables, after)."""
    lines = text.splitlines(keepends=True)
    begin = next((i for i, l in enumerate(lines) if l.strip() == f"[{SECTION}]"), None)
    if begin is None:
        raise ValueError(f"no [{SECTION}] table")
    end = begin + 1
    while end < len(lines):
        s = lines[end].strip()
        if s.startswith("[") and not s.startswith(f"[{SECTION}."):
            break
        end += 1
    return "".join(lines[:begin]), "".join(lines[begin:end]), "".join(lines[end:])


def flat_app_config(pyproject: Path) -> dict:
    """The flat run config Flower derives from a ``pyproject.toml``."""
    import tomli
    from flwr.common.config import flatten_dict

    data = tomli.loads(pyproject.read_text())
    return flatten_dict(data["tool"]["flwr"]["app"].get("config", {}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("--check", action="store_true", help="exit 1 if the section differs")
    ap.add_argument("--write", action="store_true", help="rewrite the section in place")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = ap.parse_args(argv)
    section = app_config_toml(quickstart_config(args.overrides))
    if args.check:
        import tomli

        want = tomli.loads(section)
        have = {"tool": {"flwr": {"app": {"config": tomli.loads(args.pyproject.read_text())["tool"]["flwr"]["app"].get("config", {})}}}}
        if want != have:
            print(f"{args.pyproject}: [{SECTION}] differs from the quickstart config; run with --write", file=sys.stderr)
            return 1
        return 0
    if args.write:
        before, _, after = _split(args.pyproject.read_text())
        args.pyproject.write_text(before + section + ("\n" + after if after else ""))
        return 0
    sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
