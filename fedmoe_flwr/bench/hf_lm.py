"""The federated MoE LM scenario: a tiny Hugging Face MoE on Shakespeare roles, strategies compared.

    python -m fedmoe_flwr.bench.hf_lm [--out DIR] [--rounds N] [--variants aligned,random,...]
                                      [--pretrain-steps N]

Each variant is ``python run.py +benchmark=hf-lm <overrides>`` (conf/benchmark/hf-lm.yaml)
run in this process over the in-process grid: the same seed, data split, fleet and initial
weights for all. Printed: next-character perplexity of the global model (exp of the
central test loss) per evaluation round, bytes on the wire, simulated time, wall time; for
LoRA variants, the mean relative error of the aggregated adapter product to the holders'
weighted mean product ``||B A - mean_i(B_i A_i)|| / ||mean_i(B_i A_i)||`` (the bias of
averaging factors separately; 0 would be exact). Writes ``DIR/hf_lm.json``.

With ``--pretrain-steps N`` (> 0) the MoE and its dense sibling are first pretrained
centrally for N AdamW steps on 100 *other* roles (disjoint from the federated clients and
their test text), saved with ``save_pretrained``, and every variant starts from that
checkpoint (``model.pretrained=DIR``): federated fine-tuning, the setting LoRA is for.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

VARIANTS: dict[str, list[str]] = {
    "aligned": [],
    "random": ["strategy=random"],
    "aligned-lora": ["train.lora_rank=4", "train.lr=0.1"],  # adapters aggregated by product (core.lora)
    "aligned-lora-factors": ["train.lora_rank=4", "train.lr=0.1", "strategy.lora_aggregation=factors"],  # A, B averaged apart
    "dense-lora": ["strategy=dense", "train.lora_rank=4", "train.lr=0.1"],  # dense twin, LoRA, Flower's FedAvg
    "dense": ["strategy=dense"],  # dense twin, full fine-tuning, FedAvg
}


@contextmanager
def adapter_bias(errors: list[float]):
    """Record, per aggregation, the relative error of each aggregated LoRA product."""
    from fedmoe_flwr.core import round as core_round
    from fedmoe_flwr.core.lora import mean_product

    real = core_round.aggregate_experts

    def measured(global_params, updates, layout, **kw):
        new, delta, stats = real(global_params, updates, layout, **kw)
        owner = layout.expert_of
        for a, b in layout.lora_pairs.items():
            holders = [u for u in updates if a in u.params and b in u.params]
            if not holders:
                continue
            w = [u.tokens.get(owner[a], 0.0) if a in owner else float(u.num_samples) for u in holders]
            target = mean_product([u.params[a] for u in holders], [u.params[b] for u in holders], w)
            norm = np.linalg.norm(target)
            if norm > 0:
                got = np.asarray(new[b], np.float64) @ np.asarray(new[a], np.float64)
                errors.append(float(np.linalg.norm(got - target) / norm))
        return new, delta, stats

    core_round.aggregate_experts = measured
    try:
        yield
    finally:
        core_round.aggregate_experts = real


PRETRAIN_ROLES = 100


def pretrain(out: Path, steps: int, dense: bool, batch_size: int = 64, lr: float = 3e-3) -> Path:
    """Train the scenario's model (or its dense sibling) centrally on other roles; its directory."""
    import torch
    import torch.nn.functional as F

    from fedmoe_flwr.data import load_federated
    from fedmoe_flwr.deploy.app_config import quickstart_config
    from fedmoe_flwr.experiment import build, load_data

    cfg = quickstart_config(["+benchmark=hf-lm", *(["strategy=dense"] if dense else [])])
    n = cfg.dataset.num_clients
    pool = load_federated("shakespeare", num_clients=n + PRETRAIN_ROLES, partitioner="natural", seed=cfg.seed,
                          max_train_samples=300 * (n + PRETRAIN_ROLES))
    ids = np.concatenate([np.concatenate([x, y[:, None]], axis=1)
                          for x, y in (pool.client_train(i) for i in range(n, n + PRETRAIN_ROLES))])
    model = build(cfg, load_data(cfg), dense=dense)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    for _ in range(steps):
        batch = torch.from_numpy(ids[rng.choice(len(ids), batch_size, replace=False)])
        logits = model(batch[:, :-1])  # every position predicts the next character
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = out / ("pretrained-dense" if dense else "pretrained")
    model.hf.save_pretrained(path)
    print(f"pretrained {'dense sibling' if dense else 'MoE'}: {steps} steps on {len(ids)} windows of "
          f"{PRETRAIN_ROLES} other roles, last batch loss {float(loss.detach()):.3f} -> {path}")
    return path


def run_variant(name: str, overrides: list[str], out: Path, rounds: int | None) -> dict:
    from fedmoe_flwr.client.app import make_client_app
    from fedmoe_flwr.config import flatten
    from fedmoe_flwr.deploy.app_config import quickstart_config
    from fedmoe_flwr.server_app import run_server
    from fedmoe_flwr.sim import LocalGrid

    cfg = quickstart_config(["+benchmark=hf-lm", *overrides, *([f"num_rounds={rounds}"] if rounds else [])])
    run_dir = out / name
    errors: list[float] = []
    t0 = time.perf_counter()
    with adapter_bias(errors):
        summary = run_server(LocalGrid(make_client_app(flatten(cfg)), cfg.dataset.num_clients, seed=cfg.seed), cfg, run_dir)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {r["round"]: math.exp(r["loss"]) for r in rows if r.get("loss") is not None}
    return {"variant": name, "overrides": overrides, "perplexity": curve, "final_perplexity": curve[max(curve)],
            "final_accuracy": summary["final_accuracy"], "bytes_mb": summary["bytes_total"] / 1e6,
            "sim_time_s": summary["sim_time_total"], "wall_s": wall,
            "adapter_rel_error": float(np.mean(errors)) if errors else None}


def table(results: list[dict]) -> str:
    rounds = sorted({r for res in results for r in res["perplexity"]})
    head = "| variant | " + " | ".join(f"ppl r{r}" for r in rounds) + " | acc | MB | sim s | wall s | adapter product error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        ppl = " | ".join(f"{res['perplexity'].get(r, float('nan')):.2f}" for r in rounds)
        err = "-" if res["adapter_rel_error"] is None else f"{res['adapter_rel_error']:.3f}"
        lines.append(f"| {res['variant']} | {ppl} | {res['final_accuracy']:.3f} | {res['bytes_mb']:.2f} | "
                     f"{res['sim_time_s']:.0f} | {res['wall_s']:.0f} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench-hf-lm"))
    ap.add_argument("--rounds", type=int, default=None, help="override num_rounds (default: the scenario's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated among: {', '.join(VARIANTS)}")
    ap.add_argument("--lr", type=float, default=None, help="train.lr for every variant (default: the scenario's and each variant's)")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="central pretraining steps first (0 = random init)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start: dict[bool, list[str]] = {False: [], True: []}
    if args.pretrain_steps > 0:
        for dense in (False, True):
            if any(("strategy=dense" in VARIANTS[v]) == dense for v in names):
                start[dense] = [f"model.pretrained={pretrain(args.out, args.pretrain_steps, dense)}"]
    lr = [f"train.lr={args.lr}"] if args.lr is not None else []
    results = [run_variant(v, VARIANTS[v] + start["strategy=dense" in VARIANTS[v]] + lr, args.out, args.rounds)
               for v in names]
    print(table(results))
    (args.out / "hf_lm.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
