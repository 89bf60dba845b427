"""fedmoe_hf: the ClientApp. Each node builds only the experts the strategy assigns it."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe_flwr.client import expert_evaluate, expert_probe, expert_train, node_profile
from fedmoe_flwr.client.compact import model_for_message
from fedmoe_hf.task import Net, load_data, test as test_fn, train as train_fn

app = ClientApp()


def _capacity(ctx: Context) -> dict:
    """A simulated fleet: nodes hold 2, 4 or 6 of the 8 experts (2 layers x 4)."""
    return {"max-experts": 2 + 2 * (ctx.node_config["partition-id"] % 3)}


@app.train()
def train(msg: Message, context: Context):
    """Train the assigned experts (and the shared layers) on this role's lines."""
    model = model_for_message(msg, Net)  # allocates only the assigned experts' rows
    ids, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    fit = lambda m: train_fn(m, ids, context.run_config["local-epochs"], msg.content["config"]["lr"])
    return expert_train(msg, model, fit, stats_inputs=ids[:64])


@app.query()
def query(msg: Message, context: Context):
    """This node's capacity and how its text routes (for the strategy's first assignment)."""
    model = Net()
    ids, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    profile = node_profile(context, model, capacity_fn=_capacity)
    return expert_probe(msg, model, profile=profile, stats_inputs=ids[:64])


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate this node's sub-model on its held-out lines."""
    model = model_for_message(msg, Net)
    _, val = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    return expert_evaluate(msg, model, lambda m: test_fn(m, val))
