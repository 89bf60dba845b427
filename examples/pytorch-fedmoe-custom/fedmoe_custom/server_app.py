"""fedmoe_custom: the ServerApp."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmoe_flwr.models import param_layout
from fedmoe_flwr.recording import record_run
from fedmoe_flwr.strategies import AlignedStrategy
from fedmoe_custom.task import Net, load_test_data, test

app = ServerApp()


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Evaluate the global model on the server's test set."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, load_test_data())
    return MetricRecord({"accuracy": accuracy, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training with the strategy below."""
    num_rounds = context.run_config["num-server-rounds"]
    model = Net()
    strategy = record_run(AlignedStrategy(param_layout(model), fraction_train=context.run_config["fraction-train"]), "outputs")
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        train_config=ConfigRecord({"lr": context.run_config["lr"]}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
