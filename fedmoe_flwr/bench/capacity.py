"""The capacity gate: does capacity bind in a scenario? (docs/architecture.md#strategies)

    python -m fedmoe_flwr.bench.capacity --scenario shakespeare-lm [--steps 600] [--out docs/bench]

Trains three models centrally on the scenario's pooled client data, for the same steps and
batches: the dense model that fits the smallest device (``dense-small``), a dense model of
the MoE's total size (``dense-large``) and the MoE (:mod:`fedmoe_flwr.variants`). It prints
a table, writes ``capacity_<scenario>.json`` and a plot ``capacity_<scenario>.png``.

A scenario **passes** when the small dense model loses at least 5 accuracy points, or has
at least 10% higher perplexity, than the large one: only then can partial-model training
(MoE or width slicing) beat "train what fits" there. Adam is used so the gate measures
what the architectures can fit, not how well plain SGD is tuned; the loss is the scenario's
(``train.all_positions`` for LMs) plus the MoE's auxiliary losses.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from fedmoe_flwr.models import aux_loss
from fedmoe_flwr.models.evaluate import _per_sample_loss, evaluate

VARIANTS = ("dense-small", "dense-large", "moe")
ACC_GAP = 0.05  # accuracy points the small model must lose
PPL_RATIO = 1.10  # or: its perplexity at least this times the large one's


def pooled_train(data, max_per_client: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every client's train split (its first ``max_per_client`` samples), concatenated (the
    centralised control). Token ids that fit a byte are kept as uint8 (4M LM windows fit in memory)."""
    xs, ys = [], []
    for i in range(data.num_clients):
        x, y = data.client_train(i)
        x, y = x[:max_per_client], y[:max_per_client]
        if x.dtype.kind in "iu" and x.size and x.min() >= 0 and x.max() < 256:
            x = x.astype(np.uint8)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def train_central(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray], *,
                  steps: int, batch_size: int, lr: float, seed: int, all_positions: bool, eval_every: int,
                  balance_weight: float = 0.1, z_weight: float = 1e-3) -> list[dict]:
    """Adam for ``steps`` batches drawn from ``(seed, step)``; test loss/accuracy along the way."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    curve = []
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(xt), batch_size))
        xb, yb = xt[idx], yt[idx]
        if xb.dtype == torch.uint8:
            xb = xb.long()
        logits = model(xb)
        if all_positions and logits.dim() == 3 and yb.dim() == 1:
            yb = torch.cat([xb[:, 1:], yb[:, None]], dim=1)
        loss = _per_sample_loss(logits, yb).mean() + aux_loss(model, balance_weight, z_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            test_loss, acc, _ = evaluate(model, *test)
            curve.append({"step": step, "test_loss": test_loss, "accuracy": acc, "perplexity": math.exp(test_loss)})
    return curve


def gate_verdict(results: dict) -> dict:
    """Pass/fail of the gate from the final test figures of dense-small and dense-large."""
    small, large = results["dense-small"]["final"], results["dense-large"]["final"]
    acc_gap = large["accuracy"] - small["accuracy"]
    ppl_ratio = small["perplexity"] / large["perplexity"]
    return {"accuracy_gap": acc_gap, "perplexity_ratio": ppl_ratio,
            "passes": bool(acc_gap >= ACC_GAP or ppl_ratio >= PPL_RATIO)}


def run_gate(scenario: str, *, steps: int, batch_size: int, lr: float, eval_every: int, test_samples: int,
             overrides: list[str] | None = None, max_per_client: int | None = None) -> dict:
    from fedmoe_flwr.deploy.app_config import quickstart_config
    from fedmoe_flwr.experiment import build, load_data

    torch.set_num_threads(1)  # the shared machine: one core per run
    cfg = quickstart_config([f"+benchmark={scenario}", *(overrides or [])])
    data = load_data(cfg)
    x, y = pooled_train(data, max_per_client)
    tx, ty = data.test
    pick = np.random.default_rng(cfg.seed).permutation(len(tx))[:test_samples]
    test = (tx[np.sort(pick)], ty[np.sort(pick)])
    out = {"scenario": scenario, "steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": "adam",
           "train_samples": int(len(x)), "test_samples": int(len(test[0])), "seed": cfg.seed,
           "all_positions": cfg.train.all_positions, "models": {}}
    for variant in VARIANTS:
        model = build(cfg, data, variant=variant)
        t0 = time.perf_counter()
        curve = train_central(model, x, y, test, steps=steps, batch_size=batch_size, lr=lr, seed=cfg.seed,
                              all_positions=cfg.train.all_positions, eval_every=eval_every,
                              balance_weight=cfg.train.balance_weight, z_weight=cfg.train.z_weight)
        out["models"][variant] = {"params": int(sum(p.numel() for p in model.parameters())), "curve": curve,
                                  "final": curve[-1], "wall_s": time.perf_counter() - t0}
        print(f"  {variant}: {out['models'][variant]['params']:,} params, final {curve[-1]}", flush=True)
    out["gate"] = gate_verdict(out["models"])
    return out


def print_gate(result: dict) -> None:
    print(f"\ncapacity gate: {result['scenario']} ({result['steps']} Adam steps of {result['batch_size']}, "
          f"{result['train_samples']:,} pooled train samples, {result['test_samples']:,} test samples)")
    print(f"{'model':<12} {'params':>10} {'test loss':>10} {'perplexity':>11} {'accuracy %':>11}")
    for name, m in result["models"].items():
        f = m["final"]
        print(f"{name:<12} {m['params']:>10,} {f['test_loss']:>10.3f} {f['perplexity']:>11.2f} {100 * f['accuracy']:>11.1f}")
    g = result["gate"]
    print(f"small loses {100 * g['accuracy_gap']:.1f} accuracy points, perplexity x{g['perplexity_ratio']:.4f} "
          f"-> {'PASSES' if g['passes'] else 'FAILS'} (needs >= {100 * ACC_GAP:.0f} points or x{PPL_RATIO:.2f})")


def plot_gate(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in result["models"].items():
        steps = [c["step"] for c in m["curve"]]
        axes[0].plot(steps, [c["test_loss"] for c in m["curve"]], label=f"{name} ({m['params']:,})")
        axes[1].plot(steps, [100 * c["accuracy"] for c in m["curve"]], label=name)
    axes[0].set_ylabel("test loss")
    axes[1].set_ylabel("test accuracy %")
    for ax in axes:
        ax.set_xlabel("central Adam steps")
        ax.grid(alpha=0.3)
        ax.legend()
    verdict = "passes" if result["gate"]["passes"] else "fails"
    fig.suptitle(f"capacity gate: {result['scenario']} ({verdict})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Centralised capacity curves of a benchmark scenario (the capacity gate).")
    p.add_argument("--scenario", required=True, help="a config under conf/benchmark/")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--max-per-client", type=int, default=None, help="cap on each client's pooled samples")
    p.add_argument("--tag", default="", help="suffix of the output files (a variant of the scenario)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("overrides", nargs="*", help="Hydra overrides on top of the scenario (key=value)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    result = run_gate(a.scenario, steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every,
                      test_samples=a.test_samples, overrides=a.overrides, max_per_client=a.max_per_client)
    result["overrides"], result["max_per_client"] = a.overrides, a.max_per_client
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"capacity_{a.scenario}{a.tag}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot_gate(result, out / f"{stem}.png")
    print_gate(result)
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
