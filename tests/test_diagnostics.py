"""Specialisation diagnostics: entropy, domain/expert mutual information, assignment purity."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr.bench.diagnostics import (assignment_purity, client_histograms, domain_mutual_information,
                                           routing_entropy)
from fedmoe_flwr.models import build_model


def _hists(draw_seed, clients, experts):
    rng = np.random.default_rng(draw_seed)
    h = rng.random((clients, experts)) + 1e-3
    return h / h.sum(1, keepdims=True)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 8))
def test_entropy_and_mutual_information_stay_in_their_bounds(seed, clients, experts):
    hist = _hists(seed, clients, experts)
    layer_of = np.zeros(experts, int)
    h = routing_entropy(hist, layer_of)
    assert (h >= -1e-12).all() and (h <= np.log2(experts) + 1e-9).all()
    domains = np.random.default_rng(seed).integers(0, 3, clients)
    mi = domain_mutual_information(hist, np.ones(clients), domains, layer_of)[0]
    assert -1e-12 <= mi <= min(np.log2(experts), np.log2(len(set(domains.tolist())))) + 1e-9


def test_mutual_information_is_zero_when_routing_ignores_the_domain_and_maximal_when_it_fixes_it():
    layer_of = np.zeros(4, int)
    same = np.tile([0.1, 0.2, 0.3, 0.4], (4, 1))
    assert abs(domain_mutual_information(same, np.ones(4), [0, 0, 1, 1], layer_of)[0]) < 1e-12
    onehot = np.eye(4)
    assert np.isclose(domain_mutual_information(onehot, np.ones(4), [0, 1, 2, 3], layer_of)[0], 2.0)
    assert np.isclose(routing_entropy(onehot, layer_of), 0).all()


def test_mutual_information_is_per_layer():
    layer_of = np.array([0, 0, 1, 1])
    hist = np.array([[1, 0, 0.5, 0.5], [0, 1, 0.5, 0.5]])
    mi = domain_mutual_information(hist, np.ones(2), ["a", "b"], layer_of)
    assert np.allclose(mi, [1.0, 0.0])


def test_purity_counts_assignments_in_each_experts_main_domain():
    domain = {"0": "a", "1": "a", "2": "b"}
    pure = [{"0": ["E0"], "1": ["E0"], "2": ["E1"]}]
    assert assignment_purity(pure, domain) == 1.0
    mixed = [{"0": ["E0"], "1": ["E1"], "2": ["E0"]}]
    assert assignment_purity(mixed, domain) == 2 / 3
    assert assignment_purity([], domain) is None


def test_client_histograms_route_every_clients_inputs_through_every_layer():
    torch.manual_seed(0)
    model = build_model("moe_lm", vocab_size=12, block_size=6, d_model=8, n_layer=2, n_head=2, d_hidden=8, num_experts=4)
    xs = [np.random.default_rng(i).integers(0, 12, (5, 6)) for i in range(3)]
    hist = client_histograms(model, xs)
    assert hist.shape == (3, 8)
    assert np.allclose(hist[:, :4].sum(1), 1) and np.allclose(hist[:, 4:].sum(1), 1)
