"""Client memory versus experts held, printed (never asserted): it scales with k, not E.

    python -m fedmoe_flwr.bench.memory [--families mixtral,switch,fedmoe] [--sizes tiny,mid]
                                       [--out memory.json]

For each model and k in (1, 2, E) a fresh subprocess (its imports warmed up
by a tiny model first) builds what a client holding k
experts per layer allocates (``build_compact``; k = E is the plain full model), runs one
SGD step on a small batch, and reports:

* ``param_mb``: bytes of parameters and buffers actually allocated (exact);
* ``peak_rss_mb``: growth of the process's peak resident memory (Linux ``VmHWM``, reset
  after imports through ``/proc/self/clear_refs``), which includes activations and
  allocator slack, so it is noisy for the tiny models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODELS = {"tiny": 8, "mid": 16}  # size -> E


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _factory(family: str, size: str, num_experts: int):
    if family == "fedmoe":
        from fedmoe_flwr.models import build_model
        from fedmoe_flwr.models.hf_tiny import SIZES

        s = SIZES[size]
        return lambda: build_model("moe_lm", n_layer=2, num_experts=num_experts, d_model=s["hidden"],
                                   d_hidden=s["inter"], n_head=2, vocab_size=s["vocab"], block_size=64)
    from fedmoe_flwr.models.hf_tiny import hf_model_class, hf_tiny_config

    config = hf_tiny_config(family, num_experts, top_k=1 if family == "switch" else 2, size=size)
    return lambda: hf_model_class(family)(config)


def measure(family: str, size: str, k: int) -> dict:
    """One measurement, in this process (call it in a fresh one)."""
    import torch

    from fedmoe_flwr.models.adapters.compact import build_compact, resident_nbytes
    from fedmoe_flwr.models.hf_tiny import hf_forward

    num_experts = MODELS[size]
    factory = _factory(family, size, num_experts)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    # Warm up: transformers imports a family's modules lazily (~130 MB), which is no model memory.
    warm = build_compact(_factory(family, "tiny", 2), ["L0.E0", "L1.E0"] + (["L2.E0", "L3.E0"] if family == "switch" else []))
    (warm(ids) if family == "fedmoe" else hf_forward(warm, ids)).float().sum().backward()
    del warm
    try:  # reset the peak so that it measures from here
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base_kb, peak0_kb = _rss_kb("VmRSS"), _rss_kb("VmHWM")
    if k == num_experts:
        model = factory()
    else:
        keys = [f"L{l}.E{e}" for l in range(4 if family == "switch" else 2) for e in range(k)]
        model = build_compact(factory, keys)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if not p.is_meta], lr=0.01)
    out = model(ids) if family == "fedmoe" else hf_forward(model, ids)
    out.float().logsumexp(-1).mean().backward()
    opt.step()
    peak_kb = _rss_kb("VmHWM")
    return {
        "family": family, "size": size, "E": num_experts, "k": k,
        "param_mb": resident_nbytes(model) / 2**20,
        "peak_rss_mb": (peak_kb - max(base_kb, min(peak0_kb, base_kb))) / 1024,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="mixtral,switch,fedmoe")
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # family,size,k: measure in this process
    args = p.parse_args(argv)
    if args.one:
        family, size, k = args.one.split(",")
        print(json.dumps(measure(family, size, int(k))))
        return
    rows = []
    for family in args.families.split(","):
        for size in args.sizes.split(","):
            for k in (1, 2, MODELS[size]):
                cmd = [sys.executable, "-m", "fedmoe_flwr.bench.memory", "--one", f"{family},{size},{k}"]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'family':<9} {'size':<5} {'E':>3} {'k':>3} {'params MB':>10} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['family']:<9} {r['size']:<5} {r['E']:>3} {r['k']:>3} {r['param_mb']:>10.2f} {r['peak_rss_mb']:>12.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
