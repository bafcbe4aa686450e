def test_tiny_model_loads(tiny_model_dir):
    from workers.modeling.registry import load_model
    model, tok = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token is not None
