"""Benchmarks: `python -m fedmoe_flwr.bench.overhead` (plugin costs)."""
