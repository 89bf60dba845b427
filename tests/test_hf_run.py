

def test_the_dense_baseline_is_the_familys_dense_sibling_and_trains():
    cfg = hf_cfg()
    cfg.strategy.name, cfg.num_rounds = cfg.strategy.name.dense, 1
    cfg.strategy.min_train_nodes = 2
    _, data, model, layout = experiment_for(cfg)
    assert type(model.hf).__name__ == "MistralForCausalLM" and layout.expert_keys == []
    assert model.hf.config.intermediate_size == cfg.model.top_k * cfg.model.d_hidden, "the MoE's active width"
    summary = run_server(LocalGrid(client_app.make_client_app(flatten(cfg)), NODES, seed=0), cfg, None)
    assert summary["rounds"] == 1 and summary["final_loss"] < math.log(81), summary
