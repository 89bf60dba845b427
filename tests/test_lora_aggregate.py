"""LoRA through the strategy: the per-expert aggregation averages adapter products, not factors.

Core tests (plain numpy, no transformers): a layout's ``lora_pairs`` become the re-factorised
weighted mean of their holders' products; ``lora="factors"`` keeps the biased factor means;
robust aggregators leave pairs alone. An end-to-end run (transformers) trains LoRA adapters
of a tiny Mixtral through ``run.py``'s apps with only adapters and routers on the wire.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr.core.aggregate import ClientUpdate, aggregate_experts
from fedmoe_flwr.core.lora import lora_pairs, mean_product
from fedmoe_flwr.layout import ParamLayout

A0, B0 = "m.experts.w.lora_A/E0", "m.experts.w.lora_B/E0"
A1, B1 = "m.experts.w.lora_A/E1", "m.experts.w.lora_B/E1"
SA, SB = "attn.q.lora_A", "attn.q.lora_B"
R, IN, OUT = 2, 5, 4


def layout(pairs: bool = True) -> ParamLayout:
    names = [A0, B0, A1, B1, SA, SB]
    return ParamLayout(
        expert_params={"L0.E0": (A0, B0), "L0.E1": (A1, B1)}, shared_params=(SA, SB), router_params={},
        nbytes={n: 8 for n in names}, num_experts={0: 2}, lora_pairs=lora_pairs(names) if pairs else {},
    )


def random_state(g: np.random.Generator) -> dict[str, np.ndarray]:
    return {n: g.normal(size=(R, IN) if "lora_A" in n else (OUT, R)) for n in (A0, B0, A1, B1, SA, SB)}


def update(cid: str, held: set[str], n: int, tokens: float, vals: dict) -> ClientUpdate:
    names = {SA, SB} | ({A0, B0} if "L0.E0" in held else set()) | ({A1, B1} if "L0.E1" in held else set())
    return ClientUpdate(cid, {k: vals[k] for k in names}, frozenset(held), n, {k: tokens for k in held})


def test_lora_pairs_of_a_layout_pair_each_factor_once():
    assert lora_pairs([A0, B0, A1, SA, SB, "x.weight"]) == {A0: B0, SA: SB}, "A1 has no B: not a pair"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n_clients=st.integers(1, 4))
def test_each_adapter_is_the_best_rank_r_fit_of_its_holders_mean_product(seed, n_clients):
    g = np.random.default_rng(seed)
    global_ = random_state(g)
    ups = [update(f"c{i}", {"L0.E0"} | ({"L0.E1"} if i % 2 else set()), 10 + i, 1.0 + i, random_state(g))
           for i in range(n_clients)]
    new, delta, _ = aggregate_experts(global_, ups, layout(), clip_norm=None)
    fac, _, _ = aggregate_experts(global_, ups, layout(pairs=False), clip_norm=None)
    for a, b, owner in ((A0, B0, "L0.E0"), (SA, SB, None)):
        holders = [u for u in ups if a in u.params]
        w = [u.tokens[owner] if owner else u.num_samples for u in holders]
        target = mean_product([u.params[a] for u in holders], [u.params[b] for u in holders], w)
        got = new[b] @ new[a]
        best = np.linalg.svd(target, compute_uv=False)[R:]  # what no rank-R matrix can fit
        assert np.isclose(np.linalg.norm(got - target), np.linalg.norm(best), atol=1e-8)
        assert np.linalg.norm(got - target) <= np.linalg.norm(fac[b] @ fac[a] - target) + 1e-9, "never worse than factors"
        assert np.allclose(global_[a] + delta[a], new[a]), "the delta is what server_step applies"
    if not any(A1 in u.params for u in ups):
        assert new[A1] is global_[A1] and new[B1] is global_[B1], "nobody held expert 1: untouched"


def test_factors_mode_and_robust_aggregators_average_each_factor():
    g = np.random.default_rng(0)
    global_ = random_state(g)
    ups = [update("a", {"L0.E0"}, 10, 1.0, random_state(g)), update("b", {"L0.E0"}, 10, 1.0, random_state(g))]
    plain, _, _ = aggregate_experts(global_, ups, layout(pairs=False), clip_norm=None)
    factors, _, _ = aggregate_experts(global_, ups, layout(), clip_norm=None, lora="factors")
    median, _, _ = aggregate_experts(global_, ups, layout(), clip_norm=None, method="median")
    assert np.allclose(factors[A0], (ups[0].params[A0] + ups[1].params[A0]) / 2)
    assert all(np.array_equal(factors[n], plain[n]) for n in (A0, B0, SA, SB))
    assert np.allclose(median[A0], plain[A0]), "median of two is their mean; pairs untouched"
    product, _, _ = aggregate_experts(global_, ups, layout(), clip_norm=None)
    assert not np.allclose(product[B0] @ product[A0], factors[B0] @ factors[A0]), "the two differ: factors are biased"
    with pytest.raises(ValueError, match="lora must be one of"):
        aggregate_experts(global_, ups, layout(), lora="stack")


def test_run_py_trains_lora_adapters_of_a_tiny_mixtral_with_product_averaging():
    pytest.importorskip("transformers")
    from fedmoe_flwr.client.app import make_client_app
    from fedmoe_flwr.config import flatten
    from fedmoe_flwr.experiment import experiment_for
    from fedmoe_flwr.server_app import run_server
    from fedmoe_flwr.sim import LocalGrid
    from tests.test_hf_run import NODES, hf_cfg

    plain_layout = experiment_for(hf_cfg())[3]
    cfg = hf_cfg()
    cfg.train.lora_rank, cfg.train.lr = 2, 0.5
    _, _, model, lora_layout = experiment_for(cfg)
    assert lora_layout.lora_pairs and all(".lora_" in n for k in lora_layout.expert_keys for n in lora_layout.expert_params[k])
    owner = lora_layout.expert_of
    assert all(owner.get(a) == owner.get(b) for a, b in lora_layout.lora_pairs.items()), "a pair has one owner"
    lora_bytes = sum(lora_layout.nbytes.values())
    assert lora_bytes < sum(plain_layout.nbytes.values()) / 4, "only adapters and routers travel"
    summary = run_server(LocalGrid(make_client_app(flatten(cfg)), NODES, seed=0), cfg, None)
    assert summary["rounds"] == 2 and summary["rejected_total"] == 0
    assert summary["final_loss"] < np.log(81) - 0.05, summary["final_loss"]
    assert summary["bytes_total"] <= 2 * 2 * NODES * lora_bytes, "each round: at most the adapters down and up per node"
