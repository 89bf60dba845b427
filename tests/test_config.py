"""Config schema: wrong keys and values fail with their names; flat form round-trips."""

import pytest
from omegaconf.errors import ConfigKeyError, ValidationError

from fedmoe_flwr.config import Config, TierConfig, flatten, to_config, unflatten


def test_flatten_roundtrip_with_lists_and_none():
    c = Config()
    c.fleet.tiers = [TierConfig(name="a", fraction=0.4, max_experts=2), TierConfig(name="b", fraction=0.6)]
    c.targets = [0.5, 0.75]
    c.fleet.deadline_s = None
    c.dataset.max_train_samples = 1000
    flat = flatten(c)
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert unflatten(flat) == c


def test_wrong_strategy_name_lists_allowed_values():
    with pytest.raises(ValidationError, match=r"aligned, flex, greedy, random, full, dense"):
        to_config({"strategy": {"name": "fedbogus"}})


def test_unknown_key_is_named():
    with pytest.raises(ConfigKeyError, match="nme"):
        to_config({"strategy": {"nme": "aligned"}})
    with pytest.raises(KeyError, match="strategy.nope"):
        unflatten({"strategy.nope": 1})


def test_wrong_type_is_named():
    with pytest.raises(ValidationError, match="num_rounds"):
        to_config({"num_rounds": "many"})
