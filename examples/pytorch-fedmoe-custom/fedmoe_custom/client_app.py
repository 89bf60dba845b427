"""fedmoe_custom: the ClientApp."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe_flwr.client import expert_evaluate, expert_probe, expert_train, node_profile
from fedmoe_custom.task import Net, load_data, test as test_fn, train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    model = Net()
    trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    fit = lambda m: train_fn(m, trainloader, context.run_config["local-epochs"], msg.content["config"]["lr"])
    return expert_train(msg, model, fit, stats_inputs=trainloader.dataset.tensors[0].numpy())


@app.query()
def query(msg: Message, context: Context):
    """Tell the server this node's capacity (a simulated fleet of 1-4 experts) and how its data routes."""
    model = Net()
    trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    profile = node_profile(context, model, capacity_fn=lambda ctx: {"max-experts": 1 + ctx.node_config["partition-id"] % 4})
    return expert_probe(msg, model, profile=profile, stats_inputs=trainloader.dataset.tensors[0].numpy())


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local validation data."""
    model = Net()
    _, valloader = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    return expert_evaluate(msg, model, lambda m: test_fn(m, valloader))
