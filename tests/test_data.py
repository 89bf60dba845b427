"""Tests of fedmoe_flwr.data: sources, partitioning, the federated view, online loaders.

Everything is offline. Fashion-MNIST tests skip when the Debian package
(`apt-get install dataset-fashion-mnist`) is absent.
"""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from fedmoe_flwr.data import (
    DATASETS,
    PARTITIONERS,
    VOCAB_SIZE,
    DomainTransform,
    domain_partition_indices,
    load_digits,
    load_federated,
    load_mnist5k,
    load_shakespeare,
    partition_indices,
    read_idx,
    split_holdout,
    synthetic,
)
from fedmoe_flwr.data import online, sources
from fedmoe_flwr.data.shakespeare import decode, encode, parse_play

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist",
)


def tv_from_global(labels: np.ndarray, parts: list[np.ndarray], num_classes: int = 10) -> float:
    """Mean total variation distance of the partitions' label distributions from the global one."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    tvs = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - glob).sum()
           for p in parts if len(p)]
    return float(np.mean(tvs))


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "some sample lost or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))


# ------------------------------------------------------------------------------------ sources
@needs_fmnist
def test_fashion_mnist_shapes():
    d = sources.load_fashion_mnist()
    assert d.x_train.shape == (60000, 28, 28) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (10000, 28, 28)
    assert d.y_train.dtype == np.int64
    assert d.y_train.shape == (60000,) and d.y_test.shape == (10000,)
    assert np.array_equal(np.bincount(d.y_train), np.full(10, 6000))
    assert np.array_equal(np.bincount(d.y_test), np.full(10, 1000))
    assert sources.load_fashion_mnist() is d  # cached


def test_idx_parser_and_missing_dir_message(tmp_path, monkeypatch):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + imgs.tobytes())
    assert np.array_equal(read_idx(tmp_path / "x.gz"), imgs)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad.gz")
    monkeypatch.setattr(sources, "_fmnist_via_torchvision", lambda cache: None)
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist") as e:
        sources.load_fashion_mnist(str(tmp_path / "nowhere"))
    assert "digits" in str(e.value) and "mnist5k" in str(e.value) and "synthetic" in str(e.value)


def test_digits_shapes():
    d = load_digits()
    assert d.x_train.shape == (1797, 64) and d.x_train.dtype == np.float32
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert d.y_train.dtype == np.int64 and set(np.unique(d.y_train)) == set(range(10))
    assert d.x_test is None and d.num_classes == 10


def test_mnist5k_shapes_and_seeded_shuffle():
    a, b, c = load_mnist5k(0), load_mnist5k(0), load_mnist5k(1)
    assert a.x_train.shape == (5000, 784) and a.x_train.dtype == np.uint8 and a.x_train.max() == 255
    assert np.array_equal(np.bincount(a.y_train), np.full(10, 500))
    assert np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_train, c.y_train)
    assert not np.all(np.diff(a.y_train) >= 0), "rows must be shuffled (the file is sorted)"

    def rows(d):  # same rows, other order: the multiset of (image, label) rows is identical
        return sorted(map(bytes, np.column_stack([d.x_train, d.y_train.astype(np.uint8)])))

    assert rows(a) == rows(c)


def test_synthetic_shapes_and_determinism():
    d = synthetic(0.5, 0.5, num_devices=30, seed=3)
    assert d.num_devices == 30 and d.num_classes == 10
    sizes = np.array([len(y) for y in d.y])
    assert sizes.min() >= 50 and sizes.max() <= sources.SYNTHETIC_MAX_SAMPLES_PER_DEVICE
    assert all(x.shape == (len(y), 60) and x.dtype == np.float32 for x, y in zip(d.x, d.y))
    ys = np.concatenate(d.y)
    assert ys.dtype == np.int64 and ys.min() >= 0 and ys.max() < 10 and len(np.unique(ys)) >= 5
    again = synthetic(0.5, 0.5, num_devices=30, seed=3)
    other = synthetic(0.5, 0.5, num_devices=30, seed=4)
    assert np.array_equal(d.x[0], again.x[0])
    assert not np.array_equal(d.y[0][:10], other.y[0][:10]) or len(d.y[0]) != len(other.y[0])


def test_shakespeare_vocab_roles_and_windows():
    d = load_shakespeare(seq_len=80, min_samples=64)
    assert d.vocab_size == VOCAB_SIZE == 81
    assert d.num_roles >= 800
    assert all(d.num_samples(i) >= 64 for i in range(d.num_roles))
    assert any(r.endswith("/HAMLET") for r in d.roles)
    text = "To be, or not to be: that is the question.\n[Exit]"
    codes = encode(text)
    assert codes.dtype == np.uint8 and len(codes) == len(text) and decode(codes) == text
    assert list(encode("\u00e6\u2014$")) == [VOCAB_SIZE - 1] * 3  # outside LEAF's alphabet: unknown
    play = ("# P\n\n**HAMLET**  \nTo be,  \n_Aside_\nor not.\n\n_Enter\nOPHELIA_\n\n"
            "**ophelia**  \nGood my lord.\n")
    assert parse_play(play) == {"HAMLET": ["To be,", "or not."], "OPHELIA": ["Good my lord."]}


def test_shakespeare_federated_samples():
    fd = load_federated("shakespeare", 50, seed=0)
    assert fd.task == "next_char" and fd.num_classes == fd.vocab_size == 81
    assert fd.num_clients == 50 and len(set(fd.client_names)) == 50
    x, y = fd.client_train(0)
    assert x.shape[1:] == (80,) and x.dtype == np.int64 and y.dtype == np.int64 and len(x) == len(y)
    # y is the character after the window: window j+1 ends with y[j] when starts are consecutive
    starts = fd.pool.starts[fd.train_indices[0]]
    j = int(np.flatnonzero(np.diff(starts) == 1)[0])
    assert x[j + 1, -1] == y[j] and np.array_equal(x[j + 1, :-1], x[j, 1:])
    xt, yt = fd.test
    assert xt.shape[1:] == (80,) and len(xt) == len(yt) > 0 and yt.max() < 81
    # test windows come from the tail of each role's text, never from client data
    used = np.concatenate(fd.train_indices + fd.holdout_indices)
    assert not np.intersect1d(used, fd.test_indices).size
    other = load_federated("shakespeare", 50, seed=1)
    assert fd.client_names != other.client_names


# ------------------------------------------------------------------------------------ partitions
@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_every_sample_used_exactly_once(scheme):
    y = load_digits().y_train
    for n_parts in (7, 20):
        parts = partition_indices(y, scheme, n_parts, seed=1, alpha=0.3, shards_per_partition=2)
        assert len(parts) == n_parts
        assert_exact_cover(parts, len(y))


def test_shards_are_label_skewed():
    y = load_digits().y_train
    parts = partition_indices(y, "shards", 20, seed=0, shards_per_partition=2)
    classes = [len(np.unique(y[p])) for p in parts]
    assert np.mean(classes) <= 3.5


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = load_mnist5k(0).y_train
    tv = {
        a: np.mean([tv_from_global(y, partition_indices(y, "dirichlet", 20, seed=s, alpha=a))
                    for s in (0, 1)])
        for a in (0.1, 1.0)
    }
    tv_iid = tv_from_global(y, partition_indices(y, "iid", 20, seed=0))
    assert tv[0.1] > tv[1.0] > tv_iid
    assert tv[0.1] > 0.5 and tv_iid < 0.1


def test_dirichlet_terminates_when_min_size_cannot_be_met():
    y = load_digits().y_train[:300]
    parts = partition_indices(y, "dirichlet", 40, seed=0, alpha=0.05, min_partition_size=50)
    assert_exact_cover(parts, len(y))


def test_partition_seeded_determinism():
    y = load_digits().y_train
    for scheme in ("iid", "dirichlet", "shards"):
        a = partition_indices(y, scheme, 10, seed=5)
        b = partition_indices(y, scheme, 10, seed=5)
        c = partition_indices(y, scheme, 10, seed=6)
        assert all(np.array_equal(p, q) for p, q in zip(a, b))
        assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_natural_partition():
    y = np.arange(12) % 3
    ids = np.array(list("bbaacccaabbc"))
    parts = partition_indices(y, "natural", None, natural_ids=ids)
    # one partition per id, in sorted id order: a, b, c
    assert [list(p) for p in parts] == [[2, 3, 7, 8], [0, 1, 9, 10], [4, 5, 6, 11]]
    with pytest.raises(ValueError, match="natural_ids"):
        partition_indices(y, "natural", 3)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="iid, dirichlet, shards, natural"):
        partition_indices(np.zeros(10, dtype=int), "pathological", 2)
    with pytest.raises(ValueError) as e:
        load_federated("cifar100", 10)
    assert all(n in str(e.value) for n in DATASETS)
    with pytest.raises(ValueError, match="dirichlet"):
        load_federated("digits", 10, partitioner="zipf")
    with pytest.raises(ValueError, match="natural"):
        load_federated("digits", 10, partitioner="natural")
    with pytest.raises(TypeError, match="seq_len"):
        load_federated("digits", 10, seq_len=5)
    with pytest.raises(ValueError, match="rotate, permute"):
        DomainTransform("blur", 4)
    assert set(PARTITIONERS) == {"iid", "dirichlet", "shards", "domain", "natural"}


# ------------------------------------------------------------------------------------ domains
def test_domain_partition_covers_and_assigns_domains():
    y = load_digits().y_train
    parts, doms = domain_partition_indices(y, 10, 4, seed=0, alpha=0.5)
    assert_exact_cover(parts, len(y))
    assert list(doms) == [i % 4 for i in range(10)]


def test_domain_rotation_applied_to_clients_and_test():
    fd = load_federated("mnist5k", 12, partitioner="domain", alpha=0.5, seed=0, num_domains=4)
    raw = load_mnist5k(0)
    assert [fd.client_domain(i) for i in range(12)] == [i % 4 for i in range(12)]
    for i in (1, 5):  # both in domain 1: rotated by 90 degrees counter-clockwise
        x, y = fd.client_train(i)
        idx = fd.train_indices[i]
        want = np.rot90(raw.x_train[idx].reshape(-1, 28, 28), 1, axes=(1, 2)) / 255
        np.testing.assert_allclose(x[:, 0], want, atol=1e-6)
        assert np.array_equal(y, raw.y_train[idx])
    x0, _ = fd.client_train(0)  # domain 0: untouched
    want = raw.x_train[fd.train_indices[0]].reshape(-1, 28, 28) / 255
    np.testing.assert_allclose(x0[:, 0], want, atol=1e-6)
    xh, _ = fd.client_holdout(2)  # holdout gets the domain transform too (180 degrees)
    want = raw.x_train[fd.holdout_indices[2]].reshape(-1, 28, 28)[:, ::-1, ::-1] / 255
    np.testing.assert_allclose(xh[:, 0], want, atol=1e-6)
    xt, _ = fd.test  # test sample j is in domain j % 4
    assert list(fd.test_domains[:6]) == [0, 1, 2, 3, 0, 1]
    j = 3
    want = np.rot90(raw.x_train[fd.test_indices[j]].reshape(28, 28), 3) / 255
    np.testing.assert_allclose(xt[j, 0], want, atol=1e-6)


def test_domain_transforms_flat_inputs():
    digits = load_federated("digits", 8, partitioner="domain", seed=0)
    x, _ = digits.client_train(1)
    raw = load_digits().x_train[digits.train_indices[1]]
    want = np.rot90(raw.reshape(-1, 8, 8), 1, axes=(1, 2)).reshape(-1, 64)
    np.testing.assert_array_equal(x, want)
    syn = load_federated("synthetic", 8, partitioner="domain", seed=0)
    t = syn.transform
    assert t.kind == "permute"
    p1 = t.permutation(1, 60)
    for i in (1, 5):  # same domain, same permutation
        x, _ = syn.client_train(i)
        np.testing.assert_array_equal(x, syn.pool.x[syn.train_indices[i]][:, p1])
    assert not np.array_equal(p1, t.permutation(2, 60))
    assert np.array_equal(t.permutation(0, 60), np.arange(60))
    with pytest.raises(ValueError, match="permute"):
        load_federated("synthetic", 8, partitioner="domain", domain_transform="rotate")
    x = np.random.default_rng(0).random((3, 1, 9, 9))  # non-multiple-of-90 angles use scipy
    assert DomainTransform("rotate", 8)(x, 1).shape == x.shape


# ------------------------------------------------------------------------------- federated view
def test_federated_digits_view_holdout_and_test_disjoint():
    fd = load_federated("digits", 20, partitioner="dirichlet", alpha=0.3, seed=0)
    assert (fd.num_clients, fd.num_classes, fd.input_shape) == (20, 10, (64,))
    assert fd.task == "classification"
    assert fd.client_domain(0) is None
    for i in range(fd.num_clients):
        tr, ho = fd.train_indices[i], fd.holdout_indices[i]
        assert not np.intersect1d(tr, ho).size and len(tr) >= 1
        assert abs(len(ho) - 0.2 * (len(tr) + len(ho))) <= 1
    used = np.concatenate(fd.train_indices + fd.holdout_indices)
    assert len(np.unique(used)) == len(used)
    assert not np.intersect1d(used, fd.test_indices).size
    assert len(used) + len(fd.test_indices) == 1797
    x, y = fd.client_train(3)
    assert x.dtype == np.float32 and x.shape == (len(fd.train_indices[3]), 64)
    assert y.dtype == np.int64
    xt, yt = fd.test
    assert xt.shape == (len(fd.test_indices), 64) and (np.bincount(yt, minlength=10) > 0).all()
    assert fd.label_counts().sum() == fd.train_sizes.sum()
    with pytest.raises(IndexError):
        fd.client_train(20)


def test_split_holdout_edge_cases():
    parts = [np.array([7]), np.array([1, 2]), np.arange(10), np.arange(3)]
    train, hold = split_holdout(parts, 0.5, seed=0)
    assert list(map(len, train)) == [1, 1, 5, 1] and list(map(len, hold)) == [0, 1, 5, 2]
    with pytest.raises(ValueError):
        split_holdout([np.arange(3)], 1.0, seed=0)


def test_load_federated_cached_and_seeded():
    a = load_federated("digits", 20, seed=3)
    assert load_federated("digits", 20, partitioner="dirichlet", seed=3) is a
    b = load_federated("digits", 20, seed=4)
    assert not all(np.array_equal(p, q) for p, q in zip(a.train_indices, b.train_indices))


def test_max_train_samples_and_natural_synthetic():
    fd = load_federated("mnist5k", 10, partitioner="iid", max_train_samples=1000, seed=0)
    assert fd.train_sizes.sum() + fd.holdout_sizes.sum() == 1000
    syn = load_federated("synthetic", 15, seed=0, synthetic_alpha=1.0, synthetic_beta=1.0)
    assert syn.num_clients == 15 and syn.input_shape == (60,) and syn.num_classes == 10
    assert all(n.startswith("device-") for n in syn.client_names)
    assert syn.test[0].shape[1] == 60


def test_digits_build_is_fast():
    load_federated("digits", 20, seed=11)  # warm imports and the sklearn file
    t = time.perf_counter()
    fd = load_federated("digits", 20, alpha=0.1, seed=12)
    fd.client_train(0)
    assert time.perf_counter() - t < 1.0


@needs_fmnist
def test_fashion_mnist_federated():
    t = time.perf_counter()
    fd = load_federated("fashion_mnist", 100, alpha=0.1, seed=0, max_train_samples=20_000)
    assert time.perf_counter() - t < 10.0
    assert fd.input_shape == (1, 28, 28) and fd.num_clients == 100
    assert fd.train_sizes.sum() + fd.holdout_sizes.sum() == 20_000
    x, y = fd.client_train(0)
    assert x.shape[1:] == (1, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    xt, yt = fd.test
    assert xt.shape == (10000, 1, 28, 28) and np.array_equal(np.bincount(yt), np.full(10, 1000))


# ------------------------------------------------------------------------------------ online
def test_online_offline_raises_quickly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("cifar10", "femnist", "ag_news"):
        t = time.perf_counter()
        with pytest.raises(RuntimeError, match="digits") as e:
            online.load_online(name, 10)
        assert time.perf_counter() - t < 5.0
        assert "HF_" in str(e.value) and "shakespeare" in str(e.value)
    with pytest.raises(ValueError, match="cifar10"):
        online.load_online("imagenet", 10)


def test_online_unreachable_endpoint_raises_quickly(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="not reachable"):
        online.load_online("ag_news", 5, timeout=1.0)
    assert time.perf_counter() - t < 5.0


def test_online_conversion_on_local_fixture():
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    img_ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pix], "label": list(np.arange(12) % 10)},
        features=datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
        ),
    )
    x, y = online.hf_to_numpy(img_ds.select([3, 1, 4]), "img", "label", "image")
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8 and list(y) == [3, 1, 4]
    np.testing.assert_array_equal(x[0], pix[3].transpose(2, 0, 1))
    spec = online.ONLINE_DATASETS["cifar10"]
    parts = [online.hf_to_numpy(img_ds.select(range(i, i + 5)), "img", "label", "image")
             for i in (0, 5)]
    fd = online.assemble("cifar10", spec, parts, (x, y), seed=0, holdout_fraction=0.2)
    assert fd.num_clients == 2 and fd.input_shape == (3, 32, 32)
    cx, cy = fd.client_train(0)
    assert cx.dtype == np.float32 and cx.max() <= 1.0
    assert len(cx) + len(fd.client_holdout(0)[1]) == 5
    np.testing.assert_allclose(fd.test[0][0], pix[3].transpose(2, 0, 1) / 255, atol=1e-6)

    texts = ["Stocks rally on Wall St", "Team wins the cup", "", "New GPU"]
    txt_ds = datasets.Dataset.from_dict({"text": texts, "label": [2, 1, 0, 3]})
    tx, ty = online.hf_to_numpy(txt_ds, "text", "label", "text", max_len=4, vocab_size=100)
    assert tx.shape == (4, 4) and tx.dtype == np.int64 and list(ty) == [2, 1, 0, 3]
    assert (tx[0] > 0).all() and (tx[2] == 0).all() and tx.max() < 100
    fd = online.assemble("ag_news", online.ONLINE_DATASETS["ag_news"], [(tx, ty)] * 2, None,
                         seed=0, test_fraction=0.25, vocab_size=100)
    assert fd.task == "text_classification" and fd.vocab_size == 100 and len(fd.test_indices) == 2


def test_online_loader_end_to_end_on_local_parquet(tmp_path, monkeypatch):
    """The real load_online path (flwr_datasets.FederatedDataset + partitioner + conversion),
    pointed at a tiny local parquet dataset instead of the Hub."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (70, 28, 28), dtype=np.uint8)
    feats = datasets.Features({"image": datasets.Image(), "character": datasets.Value("int64"),
                               "writer_id": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pix], "character": list(np.arange(70) % 62),
         "writer_id": [f"w{i % 7}" for i in range(70)]},
        features=feats,
    )
    (tmp_path / "fx").mkdir()
    ds.to_parquet(str(tmp_path / "fx" / "train.parquet"))
    spec = online.OnlineSpec(str(tmp_path / "fx"), "image", "character", "image", 62,
                             test_split=None, natural_id="writer_id")
    monkeypatch.setitem(online.ONLINE_DATASETS, "femnist", spec)
    monkeypatch.setattr(online, "_offline_reason", lambda timeout: None)
    fd = online.load_online("femnist", 5, partitioner="natural", seed=0,
                            cache_dir=str(tmp_path / "hf-cache"))
    assert fd.num_clients == 5 and fd.input_shape == (1, 28, 28) and fd.num_classes == 62
    assert len(set(fd.client_names)) == 5 and all(n.startswith("w") for n in fd.client_names)
    assert (fd.train_sizes + fd.holdout_sizes).sum() + len(fd.test_indices) == 50  # 5 writers x 10
    x, y = fd.client_train(0)
    assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == np.int64
