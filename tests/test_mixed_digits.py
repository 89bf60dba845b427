"""Tests of the mixed_digits dataset: three offline image sources as the input domains of one task.

Offline; skips when the Fashion-MNIST Debian package (`apt-get install dataset-fashion-mnist`)
is absent, except the tests of the partition and the upsampling that need only sklearn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmoe_flwr.data import load_federated, sources
from fedmoe_flwr.data.catalog import BUILDERS, FASHION_LABEL_OFFSET, MIXED_DIGITS_DOMAINS
from fedmoe_flwr.data.federated import federate
from fedmoe_flwr.data.partition import clients_per_domain, source_domain_partition_indices

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist",
)


def mixed(num_clients: int = 100, seed: int = 0):
    return load_federated("mixed_digits", num_clients, partitioner="domain", alpha=0.5, seed=seed, num_domains=3)


# ------------------------------------------------------------------------------ upsampled digits
def test_upsampled_digits_have_the_mnist_shape_and_range():
    up, small, mnist = sources.load_digits_28(), sources.load_digits(), sources.load_mnist5k(0)
    assert up.x_train.shape == (1797, 784) and up.x_train.dtype == mnist.x_train.dtype == np.uint8
    assert np.array_equal(up.y_train, small.y_train)
    assert (up.x_train.max(axis=1) == 255).all() and (mnist.x_train.max(axis=1) >= 250).all()
    assert (up.x_train.min(axis=1) == 0).all()  # background 0, ink bright, as in MNIST
    # the ink stays where it was: 8x8 blocks of 3.5 pixels averaged back match the source image
    big = up.x_train[:50].reshape(-1, 28, 28).astype(np.float64) / 255
    back = sources.bilinear_resize(big, 8)
    orig = small.x_train[:50].reshape(-1, 8, 8) / small.x_train[:50].max(axis=1)[:, None, None]
    assert np.abs(back - orig).mean() < 0.05
    assert sources.load_digits_28() is up  # cached


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (2, 8, 8), elements=st.floats(0, 1)), st.integers(1, 40))
def test_bilinear_resize_stays_inside_the_input_range(images, size):
    out = sources.bilinear_resize(images, size)
    assert out.shape == (2, size, size)
    assert (out.min(axis=(1, 2)) >= images.min(axis=(1, 2)) - 1e-12).all()
    assert (out.max(axis=(1, 2)) <= images.max(axis=(1, 2)) + 1e-12).all()
    flat = np.full((1, 8, 8), 0.3)
    np.testing.assert_allclose(sources.bilinear_resize(flat, size), 0.3)


# ------------------------------------------------------------------------------ source partition
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=6), st.integers(0, 200))
def test_clients_per_domain_sum_and_at_least_one(sizes, extra):
    n = len(sizes) + extra
    counts = clients_per_domain(sizes, n)
    assert counts.sum() == n and (counts >= 1).all()
    quota = np.array(sizes) / sum(sizes) * n
    big = quota >= 2  # domains not lifted to their one client stay within one of their quota
    assert (np.abs(counts[big] - quota[big]) < len(sizes) + 1).all()


def test_clients_per_domain_proportional_and_errors():
    assert clients_per_domain([60000, 4000, 1438], 100).tolist() == [92, 6, 2]
    assert clients_per_domain([1000, 1, 1], 3).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3 clients"):
        clients_per_domain([5, 5, 5], 2)
    with pytest.raises(ValueError, match="needs samples"):
        clients_per_domain([5, 0, 5], 10)


def test_source_domain_partition_covers_and_keeps_clients_in_their_domain():
    rng = np.random.default_rng(0)
    doms = np.repeat([0, 1, 2], [600, 300, 300])
    labels = rng.integers(0, 10, len(doms))
    parts, client_domains = source_domain_partition_indices(labels, doms, 8, seed=1, alpha=0.5)
    allidx = np.sort(np.concatenate(parts))
    assert np.array_equal(allidx, np.arange(len(doms)))  # every sample exactly once
    assert np.bincount(client_domains).tolist() == [4, 2, 2]
    assert client_domains.tolist() == [0, 1, 2, 0, 0, 1, 2, 0]  # interleaved, not blocks
    for p, d in zip(parts, client_domains):
        assert len(p) and (doms[p] == d).all()
    with pytest.raises(ValueError, match="one domain id"):
        source_domain_partition_indices(labels, doms[:-1], 8)


# ------------------------------------------------------------------------------ the dataset
@needs_fmnist
def test_joint_label_space_fashion_shifted_digits_shared():
    fd = mixed()
    assert (fd.num_classes, fd.input_shape, fd.num_domains) == (20, (1, 28, 28), 3)
    assert fd.domain_names == MIXED_DIGITS_DOMAINS == ("fashion_mnist", "mnist5k", "digits")
    fm = sources.load_fashion_mnist()
    seen = {d: set() for d in range(3)}
    for i in range(fd.num_clients):
        _, y = fd.client_train(i)
        seen[fd.client_domain(i)] |= set(y.tolist())
    assert seen[0] == set(range(10, 20))  # clothing: Fashion-MNIST's 0..9 shifted by 10
    assert seen[1] == seen[2] == set(range(10))  # digits: MNIST and sklearn digits share 0..9
    i = int(np.flatnonzero(fd.client_domains == 0)[0])
    x, y = fd.client_train(i)
    k = fd.train_indices[i]  # Fashion-MNIST train images sit first in the pool, in order
    assert np.array_equal(y, fm.y_train[k] + FASHION_LABEL_OFFSET)
    np.testing.assert_allclose(x[:, 0], fm.x_train[k] / 255, atol=1e-6)


@needs_fmnist
def test_each_client_in_one_source_and_test_covers_all_three():
    fd = mixed()
    src = BUILDERS["mixed_digits"](0, 100, "domain")
    assert np.bincount(fd.client_domains).tolist() == [92, 6, 2]  # in proportion to 60,000/4,000/1,438
    for i in range(fd.num_clients):
        d = fd.client_domain(i)
        assert (src.domain_ids[fd.train_indices[i]] == d).all()
        assert (src.domain_ids[fd.holdout_indices[i]] == d).all()
        x, _ = fd.client_train(i)
        assert x.shape[1:] == (1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.bincount(fd.test_domains).tolist() == [10000, 1000, 359]  # FMNIST's official test + 20%
    assert np.array_equal(fd.test_domains, src.domain_ids[fd.test_indices])
    used = np.concatenate(fd.train_indices + fd.holdout_indices)
    assert len(np.unique(used)) == len(used) == len(src.candidates)
    assert not np.intersect1d(used, fd.test_indices).size
    xt, yt = fd.test
    assert xt.shape == (11359, 1, 28, 28) and set(yt[fd.test_domains == 0]) == set(range(10, 20))
    # the upsampled digits have the same range as the others: brightest pixel 1.0 per image
    digits_x = xt[fd.test_domains == 2].reshape(-1, 784)
    np.testing.assert_allclose(digits_x.max(axis=1), 1.0)


@needs_fmnist
def test_seeded_determinism():
    src = BUILDERS["mixed_digits"](0, 30, "domain")
    a = federate("mixed_digits", src, 30, "domain", 0.5, 0, 0.2, None)
    b = federate("mixed_digits", src, 30, "domain", 0.5, 0, 0.2, None)
    c = federate("mixed_digits", src, 30, "domain", 0.5, 1, 0.2, None)
    assert all(np.array_equal(p, q) for p, q in zip(a.train_indices + a.holdout_indices, b.train_indices + b.holdout_indices))
    assert np.array_equal(a.client_domains, b.client_domains)
    assert not all(np.array_equal(p, q) for p, q in zip(a.train_indices, c.train_indices))
    again = BUILDERS["mixed_digits"](0, 30, "domain")
    assert np.array_equal(again.candidates, src.candidates) and np.array_equal(again.test_indices, src.test_indices)


@needs_fmnist
def test_bad_domain_arguments_are_refused():
    with pytest.raises(ValueError, match="3 domains"):
        load_federated("mixed_digits", 20, partitioner="domain", num_domains=4)
    with pytest.raises(ValueError, match="no domain_transform"):
        load_federated("mixed_digits", 20, partitioner="domain", domain_transform="rotate")
    with pytest.raises(ValueError, match="at least 3 clients"):
        load_federated("mixed_digits", 2, partitioner="domain", num_domains=3)
    iid = load_federated("mixed_digits", 10, partitioner="iid", seed=0)  # other partitioners: no domains
    assert iid.client_domain(0) is None and iid.num_classes == 20


@needs_fmnist
def test_mixed_domain_scenario_composes_with_small_devices_under_a_quarter():
    from fedmoe_flwr.deploy.app_config import quickstart_config
    from fedmoe_flwr.experiment import load_data

    cfg = quickstart_config(["+benchmark=mixed-domain"])
    assert cfg.dataset.name.value == "mixed_digits" and cfg.dataset.partitioner == "domain"
    assert cfg.dataset.num_clients >= 100 and cfg.strategy.fraction_train == 0.1
    assert cfg.model.name.value == "moe_mlp"
    small = min(t.max_experts for t in cfg.fleet.tiers if t.max_experts > 0)
    assert small / cfg.model.num_experts <= 0.25
    data = load_data(cfg)
    assert data.num_domains == 3 and data.num_clients == cfg.dataset.num_clients
