"""The privacy accountant of client-level DP (docs/architecture.md#differential-privacy).

The core adds the noise (:mod:`fedmoe_flwr.core.privacy`); this module counts what it
costs, with ``dp-accounting``'s RDP accountant: each round, each aggregation group is one
Poisson-subsampled Gaussian mechanism with noise multiplier ``z`` and sampling rate
``q_g`` = clients sent group ``g`` / clients known (the shared group: the cohort; expert
``k``: the clients sent ``k``). Three figures per round:

- ``dp_epsilon``: a client's total loss. Clipping bounds a client's *whole* delta and each
  group's noise is scaled like that client's share of the group's mean, so the round's
  release (all groups together) is one Gaussian mechanism of multiplier ``z`` on the
  client's update, subsampled at the cohort rate: the shared group's accountant.
- ``dp_epsilon_expert_max``: the largest epsilon of one expert's releases on their own
  (each expert: its own, lower, sampling rate).
- ``dp_epsilon_composed``: the shared group composed with every expert group, the bound a
  client would get if each group were clipped to ``C`` on its own (a loose upper bound).

Sampling is approximated as Poisson at the realised rate (cohorts are drawn without
replacement) and the assignment itself, which reads clients' routing histograms, is not
privatised; docs/architecture.md#differential-privacy says what that means.
"""

from __future__ import annotations

from dp_accounting import dp_event, rdp

from fedmoe_flwr.core.privacy import SHARED

ORDERS = tuple(range(2, 65)) + (128, 256, 512)
"""RDP orders the accountants track: integer orders, where the subsampled Gaussian's RDP is exact."""


def sampled_gaussian(q: float, noise_multiplier: float) -> dp_event.DpEvent:
    """One round of one group: the Gaussian mechanism on a Poisson sample at rate ``q``."""
    return dp_event.PoissonSampledDpEvent(float(q), dp_event.GaussianDpEvent(float(noise_multiplier)))


def sampling_rates(sent: list[tuple[str, ...]], expert_keys, known: int) -> dict[str, float]:
    """One round's ``q`` per group: clients sent the shared tensors (every message: the
    cohort) or expert ``k``, over the ``known`` clients; experts nobody was sent are left out."""
    known = max(int(known), 1)
    rates = {SHARED: len(sent) / known}
    for k in expert_keys:
        holders = sum(k in experts for experts in sent)
        if holders:
            rates[k] = holders / known
    return rates


class PrivacyLedger:
    """Per-group RDP accountants of one run; ``rates`` keeps every round's sampling rates so
    a checkpoint can rebuild the ledger (:meth:`state_dict`)."""

    def __init__(self, noise_multiplier: float, delta: float):
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.rates: list[dict[str, float]] = []
        self._groups: dict[str, rdp.RdpAccountant] = {}
        self._composed = rdp.RdpAccountant(list(ORDERS))

    def step(self, rates: dict[str, float]) -> None:
        """Compose one round: ``rates`` maps ``"shared"`` and each expert key sent to its ``q``."""
        for q in rates.values():
            if not 0 <= q <= 1:
                raise ValueError(f"sampling rates must be in [0, 1], got {rates}")
        self.rates.append({g: float(q) for g, q in rates.items()})
        for group, q in sorted(rates.items()):
            if q <= 0:
                continue
            event = sampled_gaussian(q, self.noise_multiplier)
            self._groups.setdefault(group, rdp.RdpAccountant(list(ORDERS))).compose(event)
            self._composed.compose(event)

    def epsilon(self, group: str = SHARED) -> float:
        """The epsilon (at :attr:`delta`) of one group's releases so far; 0 before any."""
        acc = self._groups.get(group)
        return float(acc.get_epsilon(self.delta)) if acc is not None else 0.0

    def metrics(self) -> dict[str, float]:
        """``dp_epsilon``, ``dp_epsilon_expert_max``, ``dp_epsilon_composed`` (module doc)."""
        experts = [self.epsilon(g) for g in self._groups if g != SHARED]
        composed = float(self._composed.get_epsilon(self.delta)) if self.rates else 0.0
        return {"dp_epsilon": self.epsilon(SHARED), "dp_epsilon_expert_max": max(experts, default=0.0),
                "dp_epsilon_composed": composed, "dp_delta": self.delta}

    def state_dict(self) -> list[dict[str, float]]:
        return [dict(r) for r in self.rates]

    def load_state_dict(self, rates: list[dict[str, float]]) -> None:
        """Rebuild the accountants from the rates of the rounds so far."""
        self.rates, self._groups, self._composed = [], {}, rdp.RdpAccountant(list(ORDERS))
        for r in rates:
            self.step(r)
