"""moe-quickstart: the ClientApp."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe_flwr.client import expert_probe, expert_train, load_assigned, node_profile
from moe_quickstart.task import Net, load_data
from moe_quickstart.task import test as test_fn
from moe_quickstart.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    model = Net()
    trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    epochs, lr = context.run_config["local-epochs"], msg.content["config"]["lr"]
    fit = lambda m: {"num-examples": len(trainloader.dataset), "train-loss": train_fn(m, trainloader, epochs, lr)}
    return expert_train(msg, model, fit, profile=node_profile(context, model), stats_inputs=trainloader.dataset.tensors[0].numpy())


@app.query()
def query(msg: Message, context: Context):
    """Tell the server this node's capacity and how its data routes to the experts."""
    model = Net()
    trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    return expert_probe(msg, model, profile=node_profile(context, model), stats_inputs=trainloader.dataset.tensors[0].numpy())


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local validation data."""
    model = Net()
    load_assigned(msg, model)
    _, valloader = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    eval_loss, eval_acc = test_fn(model, valloader)
    metrics = MetricRecord({"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(valloader.dataset)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
