"""fedmoe_hf: the ServerApp. Fused expert tensors travel split per expert (the wire state)."""

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmoe_flwr.models import load_wire, param_layout, to_wire
from fedmoe_flwr.recording import record_run
from fedmoe_flwr.strategies import AlignedStrategy
from fedmoe_hf.task import Net, load_test_data, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training of the tiny Mixtral."""
    torch.manual_seed(0)
    model = Net()
    test_ids = load_test_data(context.run_config["num-partitions"])

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_wire(model, arrays.to_torch_state_dict())  # wire names: "<fused tensor>/E<expert>"
        loss, _, metrics = test(model, test_ids)
        return MetricRecord({"loss": loss, "perplexity": math.exp(loss), **metrics})

    strategy = record_run(AlignedStrategy(param_layout(model), fraction_train=context.run_config["fraction-train"]), "outputs")
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(to_wire(model)),
        train_config=ConfigRecord({"lr": context.run_config["lr"]}),
        num_rounds=context.run_config["num-server-rounds"],
        evaluate_fn=global_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
