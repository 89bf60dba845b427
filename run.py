"""fedmoe_flwr's Hydra entry point: compose ``conf/`` and run a Flower simulation.

    python run.py                                   # the quickstart (conf/config.yaml)
    python run.py strategy=random num_rounds=20     # override anything
    python run.py -m strategy=aligned,random seed=0,1   # a sweep, one job per combination
    python run.py backend=ray                       # Flower's Ray simulation engine

Each job writes ``metrics.jsonl``, ``summary.json``, ``model.pt`` and Hydra's ``.hydra/``
into its run directory (``hydra.run.dir=...`` to choose it), plus ``metrics.csv``,
``details.jsonl``, ``checkpoints/`` and ``report/report.html`` (``report=false`` skips it).

    python run.py hydra.run.dir=RUN_DIR resume=true     # continue RUN_DIR from its last checkpoint
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedmoe_flwr.config import register_configs, to_config


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> float | None:
    from fedmoe_flwr.progress import RoundProgress
    from fedmoe_flwr.simulation import run

    cfg = to_config(dcfg)
    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    if cfg.resume:  # continue the checkpointed run's config (see fedmoe_flwr/checkpoint/)
        from fedmoe_flwr.checkpoint import resume_config, save_resolved_config

        cfg = resume_config(out_dir, cfg, list(hc.overrides.task))
        save_resolved_config(cfg, out_dir, hc.output_subdir)
    label = f"{cfg.strategy.name.value} seed={cfg.seed}"
    with RoundProgress(cfg.num_rounds, quiet=cfg.quiet, label=label) as progress:
        summary = run(cfg, out_dir, progress)
    if cfg.report:  # the run's results are written already: a failing plot must not fail the run
        from fedmoe_flwr.report import write_report

        try:
            write_report([out_dir])
        except Exception:  # noqa: BLE001
            logging.getLogger("fedmoe_flwr").exception("the report could not be written (python -m fedmoe_flwr.report %s)", out_dir)
    acc = summary.get("final_accuracy")
    print(
        f"[{label}] final accuracy {acc:.4f} after {summary['rounds']} rounds, "
        f"{summary['bytes_total'] / 1e6:.1f} MB, simulated {summary['sim_time_total']:.0f} s, "
        f"wall {summary['wall_time_total']:.1f} s -> {out_dir}"
    )
    return acc


if __name__ == "__main__":
    register_configs()
    main()
