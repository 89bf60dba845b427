"""Width slicing (server rules and aggregation) and the client's sub-width models."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr import widths as W
from fedmoe_flwr.models import build_model
from fedmoe_flwr.models.width import dense_ffns, model_for_state, ordered_dropout, resized_copy

LEVELS = [0.125, 0.25, 0.5, 1.0]


def dense_lm(width=64):
    torch.manual_seed(0)
    return build_model("dense_lm", vocab_size=20, block_size=8, d_model=16, n_layer=2, n_head=2, d_hidden=width)


def numpy_state(model):
    return {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}


def test_layout_finds_every_ffn_hidden_axis():
    state = numpy_state(dense_lm(64))
    layout = W.WidthLayout.from_shapes({n: a.shape for n, a in state.items()})
    assert layout.widths == {"blocks.0.ffn": 64, "blocks.1.ffn": 64}
    assert layout.sliced["blocks.1.ffn.fc1.weight"] == ("blocks.1.ffn", 0)
    assert layout.sliced["blocks.1.ffn.fc2.weight"] == ("blocks.1.ffn", 1)
    assert "blocks.1.ffn.fc2.bias" not in layout.sliced  # d_model-sized: shared
    with pytest.raises(ValueError, match="no FFN block"):
        W.WidthLayout.from_shapes({"head.weight": (4, 4)})


@given(st.floats(0.0, 1.0))
def test_width_level_is_the_largest_level_that_fits(capacity):
    level = W.width_level(capacity, LEVELS)
    fitting = [l for l in LEVELS if l <= capacity + 1e-9]  # byte ratios may land a hair below a level
    assert level == (max(fitting) if fitting else None)


@given(st.sampled_from(LEVELS), st.integers(1, 300))
def test_static_slice_is_the_first_units(ratio, full):
    idx = W.static_indices(ratio, full)
    assert np.array_equal(idx, np.arange(len(idx)))
    assert len(idx) == max(1, round(ratio * full))


@given(st.sampled_from(LEVELS[:-1]), st.integers(2, 200), st.integers(0, 50), st.integers(1, 17))
def test_rolling_window_moves_by_step_and_covers_every_unit(ratio, full, rnd, step):
    a, b = W.rolling_indices(ratio, full, rnd, step), W.rolling_indices(ratio, full, rnd + 1, step)
    assert len(set(a.tolist())) == len(a) == W.width_units(ratio, full)  # distinct units
    assert b[0] == (a[0] + step) % full
    covered = set()
    for r in range(rnd, rnd + full):  # at most W rounds go round the whole width
        covered |= set(W.rolling_indices(ratio, full, r, step).tolist())
    if len(a) >= np.gcd(step, full):  # starts visit every multiple of gcd(step, W)
        assert covered == set(range(full))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_aggregation_is_the_mean_over_holders_element_by_element(seed, clients):
    rng = np.random.default_rng(seed)
    full = int(rng.integers(2, 9))
    current = {"ffn.fc1.weight": rng.normal(size=(full, 3)), "ffn.fc2.weight": rng.normal(size=(3, full)),
               "head.weight": rng.normal(size=(2, 3))}
    layout = W.WidthLayout.from_shapes({n: a.shape for n, a in current.items()})
    updates = []
    for _ in range(clients):
        idx = {"ffn": np.sort(rng.choice(full, int(rng.integers(1, full + 1)), replace=False))}
        sub = W.slice_arrays({n: rng.normal(size=a.shape) for n, a in current.items()}, layout, idx)
        updates.append((sub, idx, float(rng.integers(1, 5))))
    new = W.aggregate_sliced(current, layout, updates)
    for j in range(full):  # brute force, unit by unit
        holders = [(sub, list(idx["ffn"]).index(j), w) for sub, idx, w in updates if j in idx["ffn"]]
        if not holders:
            assert np.array_equal(new["ffn.fc1.weight"][j], current["ffn.fc1.weight"][j])
            continue
        want = sum(w * sub["ffn.fc1.weight"][p] for sub, p, w in holders) / sum(w for *_, w in holders)
        assert np.allclose(new["ffn.fc1.weight"][j], want)
        want2 = sum(w * sub["ffn.fc2.weight"][:, p] for sub, p, w in holders) / sum(w for *_, w in holders)
        assert np.allclose(new["ffn.fc2.weight"][:, j], want2)
    total = sum(w for *_, w in updates)
    assert np.allclose(new["head.weight"], sum(w * s["head.weight"] for s, _, w in updates) / total)


def test_aggregation_rejects_a_slice_of_the_wrong_shape():
    current = {"ffn.fc1.weight": np.zeros((4, 2))}
    layout = W.WidthLayout.from_shapes({"ffn.fc1.weight": (4, 2)})
    with pytest.raises(ValueError, match="shape"):
        W.aggregate_sliced(current, layout, [({"ffn.fc1.weight": np.zeros((3, 2))}, {"ffn": np.arange(2)}, 1.0)])


def _masked_forward(model, keep: dict[str, np.ndarray], x):
    """The full model with every hidden unit outside ``keep`` forced to 0."""
    hooks = []
    for name, ffn in dense_ffns(model).items():
        mask = torch.zeros(ffn.fc1.out_features)
        mask[torch.as_tensor(keep[name])] = 1.0
        hooks.append(ffn.act.register_forward_hook(lambda m, a, out, mask=mask: out * mask))
    try:
        return model(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("rule", ["static", "rolling"])
def test_a_sliced_sub_model_computes_the_full_model_restricted_to_its_units(rule):
    full = dense_lm(64)
    state = numpy_state(full)
    layout = W.WidthLayout.from_shapes({n: a.shape for n, a in state.items()})
    make = (lambda r, w: W.static_indices(r, w)) if rule == "static" else (lambda r, w: W.rolling_indices(r, w, 7, 9))
    idx = {p: make(0.25, w) for p, w in layout.widths.items()}
    sub = model_for_state(full, {n: torch.from_numpy(a) for n, a in W.slice_arrays(state, layout, idx).items()})
    assert {n: f.fc1.out_features for n, f in dense_ffns(sub).items()} == {p: 16 for p in layout.widths}
    x = torch.randint(0, 20, (3, 8))
    with torch.no_grad():
        assert torch.allclose(sub(x), _masked_forward(full, idx, x), atol=1e-5)


def test_a_state_that_does_not_fit_is_refused():
    full = dense_lm(64)
    state = {n: t.clone() for n, t in full.state_dict().items()}
    state["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        model_for_state(full, state)
    with pytest.raises(ValueError, match="width"):
        resized_copy(full, {"blocks.0.ffn": 65})


def test_ordered_dropout_trains_only_the_drawn_prefix():
    full = dense_lm(64)
    sub = resized_copy(full, {"blocks.0.ffn": 32, "blocks.1.ffn": 32})  # a client of ratio 0.5
    sub.train()
    x = torch.randint(0, 20, (4, 8))
    with ordered_dropout(sub, [0.25], {"blocks.0.ffn": 64, "blocks.1.ffn": 64}, np.random.default_rng(0)) as cur:
        out = sub(x)
        out.sum().backward()
    assert cur["p"] == 0.25
    keep = {n: np.arange(16) for n in ("blocks.0.ffn", "blocks.1.ffn")}
    sub.eval()
    with torch.no_grad():
        assert torch.allclose(out, _masked_forward(sub, keep, x), atol=1e-5)
    g = dense_ffns(sub)["blocks.0.ffn"].fc1.weight.grad
    assert g[16:].abs().sum() == 0 and g[:16].abs().sum() > 0  # units beyond the prefix get no gradient
