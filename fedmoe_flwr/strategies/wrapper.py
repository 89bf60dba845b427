"""A strategy that wraps another: every Flower hook forwards to ``inner``.

The run's wrappers (:class:`~fedmoe_flwr.recording.RecordedStrategy` records what the
hooks return, :class:`~fedmoe_flwr.checkpoint.ResumedStrategy` shifts rounds) change only
what they add; attributes not defined on the wrapper are the inner strategy's.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """Forwards every hook to ``inner`` with the round :meth:`inner_round` maps it to."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def inner_round(self, server_round: int) -> int:
        """The inner strategy's round for Flower's ``server_round`` (default: the same)."""
        return server_round

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(self.inner_round(server_round), arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(self.inner_round(server_round), replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(self.inner_round(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(self.inner_round(server_round), replies)
