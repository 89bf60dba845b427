"""Specialisation diagnostics: does routing follow the clients' domains, and do assignments?

    python -m fedmoe_flwr.bench.diagnostics RUN_DIR [--samples 256]

``RUN_DIR`` is a ``run.py`` output with ``model.pt`` (``save_model=true``), its Hydra config
(``.hydra/config.yaml``) and ``details.jsonl``. The command routes each client's train
sample through the final MoE and prints, and writes to ``RUN_DIR/diagnostics.json``:

- routing entropy per client (bits, mean over MoE layers; 0 = every token to one expert);
- mutual information between a client's domain and the top-1 expert, per layer (bits; 0 =
  routing ignores the domain, ``H(domain)`` = the domain fixes the expert). The domain is the
  dataset's domain id, else the play of a Shakespeare role (``play/ROLE``);
- purity of the assignments (``details.jsonl``, last ``--rounds`` rounds): the share of
  (client, expert) assignments whose client is in the expert's most frequent domain.

The measures are pure numpy (:func:`routing_entropy`, :func:`domain_mutual_information`,
:func:`assignment_purity`); only :func:`client_histograms` runs the model.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def _layer_blocks(layer_of: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(layer_of == l) for l in np.unique(layer_of)]


def routing_entropy(hist: np.ndarray, layer_of: np.ndarray) -> np.ndarray:
    """``[C]`` mean over layers of the entropy (bits) of each client's top-1 histogram."""
    hist = np.asarray(hist, dtype=np.float64)
    out = np.zeros(hist.shape[0])
    blocks = _layer_blocks(np.asarray(layer_of))
    for cols in blocks:
        p = hist[:, cols]
        p = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            out += -np.where(p > 0, p * np.log2(p), 0.0).sum(1)
    return out / max(len(blocks), 1)


def domain_mutual_information(hist: np.ndarray, weights: np.ndarray, domains, layer_of: np.ndarray) -> list[float]:
    """Per layer, ``I(domain; top-1 expert)`` in bits over tokens: client ``c`` contributes
    ``weights[c] * hist[c]`` to its domain's row of the joint distribution."""
    hist = np.asarray(hist, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    labels, dom = np.unique(np.asarray(domains), return_inverse=True)
    out = []
    for cols in _layer_blocks(np.asarray(layer_of)):
        p = hist[:, cols] / np.maximum(hist[:, cols].sum(1, keepdims=True), 1e-300)
        joint = np.zeros((len(labels), len(cols)))
        np.add.at(joint, dom, w[:, None] * p)
        total = joint.sum()
        if total <= 0:
            out.append(0.0)
            continue
        joint /= total
        pd, pe = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(joint > 0, joint * np.log2(joint / (pd * pe)), 0.0)
        out.append(float(max(terms.sum(), 0.0)))
    return out


def assignment_purity(assignments: list[dict[str, list[str]]], domain_of: dict[str, object]) -> float | None:
    """Share of (client, expert) assignments, over all rounds given, whose client is in the
    expert's most frequent domain; None when there are none."""
    per_expert: dict[str, Counter] = defaultdict(Counter)
    for rnd in assignments:
        for cid, keys in rnd.items():
            if cid in domain_of:
                for k in keys:
                    per_expert[k][domain_of[cid]] += 1
    total = sum(sum(c.values()) for c in per_expert.values())
    if total == 0:
        return None
    return sum(max(c.values()) for c in per_expert.values()) / total


def client_histograms(model, inputs: list[np.ndarray]) -> np.ndarray:
    """``[C, K]`` top-1 routing histogram of each client's inputs over all experts (per-layer shares)."""
    from fedmoe_flwr.client.local_update import routing_stats
    from fedmoe_flwr.models import set_active_experts

    set_active_experts(model, None)
    return np.stack([routing_stats(model, x)[0] for x in inputs])


def client_domains(data) -> list:
    """Each client's domain: the dataset's domain id, else the play of a ``play/ROLE`` name, else the client."""
    if data.client_domains is not None:
        return [int(d) for d in data.client_domains]
    if data.client_names is not None:
        return [str(n).split("/")[0] for n in data.client_names]
    return list(range(data.num_clients))


def diagnose(run_dir: Path, samples: int = 256, rounds: int = 10) -> dict:
    import torch
    from omegaconf import OmegaConf

    from fedmoe_flwr.config import to_config
    from fedmoe_flwr.experiment import build, load_data
    from fedmoe_flwr.layout import parse_expert_key
    from fedmoe_flwr.models import expert_keys, load_wire

    cfg = to_config(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    data = load_data(cfg)
    model = build(cfg, data, variant="moe")
    load_wire(model, torch.load(run_dir / "model.pt"))
    keys = expert_keys(model)
    layer_of = np.array([parse_expert_key(k)[0] for k in keys])
    inputs = [data.client_train(i)[0][:samples] for i in range(data.num_clients)]
    hist = client_histograms(model, inputs)
    domains = client_domains(data)
    weights = np.array([len(x) for x in inputs], dtype=np.float64)
    details = run_dir / "details.jsonl"
    rows = [json.loads(l) for l in details.read_text().splitlines()] if details.exists() else []
    assigned = [r["assignment"] for r in rows[-rounds:] if r.get("assignment")]
    entropy = routing_entropy(hist, layer_of)
    return {
        "run": str(run_dir), "clients": data.num_clients, "domains": len(set(domains)),
        "routing_entropy_bits": {"mean": float(entropy.mean()), "min": float(entropy.min()), "max": float(entropy.max()),
                                 "uniform": float(np.log2(len(keys) / len(np.unique(layer_of))))},
        "mi_domain_top1_bits": domain_mutual_information(hist, weights, domains, layer_of),
        "assignment_purity": assignment_purity(assigned, {str(i): d for i, d in enumerate(domains)}),
        "expert_usage": (hist * weights[:, None]).sum(0).tolist(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Routing specialisation diagnostics of a finished run.")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=256, help="train samples routed per client")
    p.add_argument("--rounds", type=int, default=10, help="last rounds of details.jsonl for the purity")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    if not (run_dir / "model.pt").exists():
        p.error(f"{run_dir} has no model.pt: run with save_model=true")
    result = diagnose(run_dir, a.samples, a.rounds)
    (run_dir / "diagnostics.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "expert_usage"}, indent=1))


if __name__ == "__main__":
    main()
