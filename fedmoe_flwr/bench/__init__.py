"""Benchmarks: `python -m fedmoe_flwr.bench` (convergence sweeps), `.overhead` (the plugin's cost against
a plain PyTorch loop and Flower's FedAvg), `.scale` (server memory and time for many clients)."""
