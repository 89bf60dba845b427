"""Which parameters of a model belong to which expert: plain data shared by models and core.

The model package builds a :class:`ParamLayout` from a torch module (``models.slicing``);
the alignment core reads it to slice, validate and aggregate without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from math import prod

import numpy as np

_KEY = re.compile(r"^L(\d+)\.E(\d+)$")


def array_nbytes(shape, dtype) -> int:
    """Bytes of one tensor: ``numel * itemsize``. The one byte count of the project: layouts,
    wire records (:func:`fedmoe_flwr.protocol.record_nbytes`) and logs all use it."""
    return int(prod(int(d) for d in shape)) * np.dtype(dtype).itemsize


def expert_key(layer: int, index: int) -> str:
    """The stable name of expert ``index`` of MoE layer ``layer``: ``"L{layer}.E{index}"``."""
    return f"L{layer}.E{index}"


def parse_expert_key(key: str) -> tuple[int, int]:
    """Inverse of :func:`expert_key`; raises ``ValueError`` naming the bad key."""
    m = _KEY.match(key)
    if m is None:
        raise ValueError(f"not an expert key: {key!r} (expected 'L<layer>.E<index>')")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class ParamLayout:
    """How a model's state splits into shared parameters and per-expert parameters.

    Attributes:
        expert_params: expert key -> names (state_dict keys) of that expert's tensors.
        shared_params: names of every tensor that is not an expert's (routers included).
        router_params: name of a router tensor -> MoE layer index. Row ``e`` of such a
            tensor (its first dimension) belongs to expert ``e`` of that layer.
        nbytes: name -> byte size of that tensor (numel * itemsize).
        num_experts: MoE layer index -> number of experts in it.
        lora_pairs: LoRA adapters, A name -> B name; aggregation averages their product
            (``core.lora``), not each factor. Empty for models without adapters.
    """

    expert_params: dict[str, tuple[str, ...]]
    shared_params: tuple[str, ...]
    router_params: dict[str, int]
    nbytes: dict[str, int]
    num_experts: dict[int, int] = field(default_factory=dict)
    lora_pairs: dict[str, str] = field(default_factory=dict)

    @property
    def expert_keys(self) -> list[str]:
        """All expert keys in (layer, index) order (a fresh list; the sort is done once)."""
        return list(self._sorted_expert_keys)

    @cached_property
    def _sorted_expert_keys(self) -> tuple[str, ...]:
        # Read per reply and per client in a round: sorting (with a regex per key) each
        # time cost ~65 us per call at 64 experts, most of a 1,000-client round's checks.
        return tuple(sorted(self.expert_params, key=parse_expert_key))

    def expert_nbytes(self, key: str) -> int:
        """Bytes of one expert's tensors (what moves on the wire for it)."""
        if key not in self.expert_params:
            raise KeyError(f"unknown expert key {key!r}; known: {self.expert_keys[:4]}...")
        return sum(self.nbytes[n] for n in self.expert_params[key])

    @cached_property
    def layer_of(self) -> np.ndarray:
        """``[K]`` the MoE layer of each expert, in :attr:`expert_keys` order."""
        return np.array([parse_expert_key(k)[0] for k in self.expert_keys], dtype=np.int64)

    @cached_property
    def expert_of(self) -> dict[str, str]:
        """Tensor name -> the expert key it belongs to (expert tensors only)."""
        return {n: k for k, names in self.expert_params.items() for n in names}

    @property
    def shared_nbytes(self) -> int:
        """Bytes of every shared tensor (routers included)."""
        return sum(self.nbytes[n] for n in self.shared_params)

    def param_names(self, keys) -> list[str]:
        """Shared names plus those of the given experts, in a stable order."""
        names = list(self.shared_params)
        for k in sorted(set(keys), key=parse_expert_key):
            if k not in self.expert_params:
                raise KeyError(f"unknown expert key {k!r}")
            names.extend(self.expert_params[k])
        return names

    def to_dict(self) -> dict:
        return {
            "expert_params": {k: list(v) for k, v in self.expert_params.items()},
            "shared_params": list(self.shared_params),
            "router_params": dict(self.router_params),
            "nbytes": dict(self.nbytes),
            "num_experts": {str(k): v for k, v in self.num_experts.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ParamLayout":
        return cls(
            expert_params={k: tuple(v) for k, v in d["expert_params"].items()},
            shared_params=tuple(d["shared_params"]),
            router_params={k: int(v) for k, v in d["router_params"].items()},
            nbytes={k: int(v) for k, v in d["nbytes"].items()},
            num_experts={int(k): int(v) for k, v in d.get("num_experts", {}).items()},
        )
