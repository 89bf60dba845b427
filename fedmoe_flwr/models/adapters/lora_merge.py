"""LoRA aggregation by product averaging: moved to :mod:`fedmoe_flwr.core.lora` (plain numpy,
called by the strategies' per-expert aggregation); re-exported here for existing imports."""

from fedmoe_flwr.core.lora import factorise, mean_product, merge_lora, merge_pair

__all__ = ["factorise", "mean_product", "merge_lora", "merge_pair"]
