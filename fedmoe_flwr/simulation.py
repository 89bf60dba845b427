"""Launch a simulation run of a :class:`~fedmoe_flwr.config.Config` (what ``run.py`` calls).

Two backends, both driving Flower's ``Strategy.start`` with the same ServerApp and ClientApp:

- ``ray``: Flower's Simulation Engine through ``flwr.simulation.run_simulation`` (virtual
  SuperNodes on Ray). The config reaches both apps as the defaults of their factories, in
  the same flat form ``flwr run --run-config`` would give them. Costs 10-20 s of start-up.
- ``local``: :class:`~fedmoe_flwr.sim.LocalGrid`, the nodes' ClientApp calls in this process,
  one after another (or on ``num_workers`` forked processes). Same messages, same results,
  no start-up cost: used by tests, benchmarks and sweeps.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fedmoe_flwr.config import Backend, Config, flatten


def quiet_flower() -> None:
    """Silence Flower's and Ray's per-round INFO logs (our progress display replaces them)."""
    for name in ("flwr", "alembic", "alembic.runtime.plugins", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def ray_backend_config(cfg: Config) -> dict:
    """Flower's ``backend_config`` for the Ray backend: per-client resources, and the
    cluster to join when ``cfg.ray_address`` names one (``ray start --head`` elsewhere;
    docs: README "Ray beyond one machine")."""
    init_args: dict = {"include_dashboard": False, "log_to_driver": False}
    if cfg.ray_address:  # without it, ray.init starts a private one-machine cluster
        init_args["address"] = cfg.ray_address
    return {"client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}


def run(cfg: Config, out_dir: str | Path, progress=None) -> dict:
    """Run ``cfg`` as a Flower simulation, writing outputs into ``out_dir``; returns the summary."""
    from fedmoe_flwr.client.app import make_client_app
    from fedmoe_flwr.server_app import make_server_app, run_server
    from fedmoe_flwr.sim import LocalGrid

    if not cfg.verbose:
        quiet_flower()  # after the imports above: importing flwr resets its log level
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = flatten(cfg)
    client_app = make_client_app(flat)
    if cfg.backend == Backend.local:
        with LocalGrid(client_app, cfg.dataset.num_clients, seed=cfg.seed, workers=cfg.num_workers) as grid:
            return run_server(grid, cfg, out_dir, progress)
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=make_server_app(flat, str(out_dir), progress),
        client_app=client_app,
        num_supernodes=cfg.dataset.num_clients,
        backend_config=ray_backend_config(cfg),
    )
    summary = out_dir / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the simulation ended without writing {summary}; see the log above")
    return json.loads(summary.read_text())
