"""``fedrolex``: rolling sub-model extraction (FedRolex, Alam et al., NeurIPS 2022).

A client of width ratio ``r`` trains ``width_units(r, W)`` consecutive hidden units of every
FFN, starting at ``round * roll_step mod W`` and wrapping around: the window moves every
round, so over ``W / roll_step`` rounds every unit is trained by small clients too (the
paper rolls one unit per round; ``roll_step`` shortens the cycle for short runs).
"""

from __future__ import annotations

import numpy as np

from fedmoe_flwr import widths as W
from fedmoe_flwr.strategies.width import WidthFedAvg


class FedRolex(WidthFedAvg):
    name = "fedrolex"

    def indices(self, ratio: float, full: int, rnd: int) -> np.ndarray:
        return W.rolling_indices(ratio, full, rnd, self.roll_step)
