"""Every shipped model: inspect promises, factor-2 widening, deepening after
every layer that inspect says can be deepened."""

import onnx
import pytest

import onnx_net2net as n2n
from helpers import SHIPPED, assert_same_function, deepen_exact, model_path, widen_exact

#: The layer that produces each model's logits: its units reach a graph output.
HEADS = {"cnn": "/11/Gemm", "mlp": "/4/Gemm", "resnet_block": "/fc/Gemm", "cnn1d": "/7/Gemm",
         "dense_concat": "/fc/Gemm", "sklearn_mlp": "MatMul2"}
LAYER_COUNTS = {"cnn": 4, "mlp": 3, "resnet_block": 9, "cnn1d": 4, "dense_concat": 5, "sklearn_mlp": 3}


@pytest.fixture(scope="module")
def inspected():
    return {name: n2n.inspect(str(model_path(name))) for name in SHIPPED}


@pytest.mark.parametrize("name", SHIPPED)
def test_inspect_promises(name, inspected):
    report = inspected[name]
    assert report["model"].endswith(f"{name}.onnx")
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert len(layers) == LAYER_COUNTS[name]
    assert all(layer["op"] in ("Conv", "Gemm", "MatMul") for layer in layers.values())
    for layer_name, layer in layers.items():
        if layer_name == HEADS[name]:
            assert layer["widen"]["ok"] is False and layer["widen"]["reason"]
            continue
        assert layer["widen"]["ok"] is True, (layer_name, layer["widen"]["reason"])
        assert layer["deepen"]["ok"] is True, (layer_name, layer["deepen"]["reason"])
        assert layer_name in layer["widen"]["group"]
    head = layers[HEADS[name]]
    assert "graph output" in head["widen"]["reason"] or "Softmax" in head["widen"]["reason"]


@pytest.mark.parametrize("name", SHIPPED)
def test_factor_two(name, inspected):
    model = onnx.load(str(model_path(name)))
    wider, report = widen_exact(model, factor=2)
    before = {layer["name"]: layer for layer in inspected[name]["layers"]}
    after = {layer["name"]: layer for layer in n2n.inspect(wider, trial=False)["layers"]}
    assert set(before) == set(after)
    for layer_name, layer in before.items():
        expected = layer["width"] * 2 if layer["widen"]["ok"] else layer["width"]
        assert after[layer_name]["width"] == expected, layer_name
    assert report["parameters"]["after"] > report["parameters"]["before"]
    groups = {frozenset(layer["widen"]["group"]) for layer in before.values() if layer["widen"]["ok"]}
    assert len(report["changes"]) == len(groups)


@pytest.mark.parametrize("name", SHIPPED)
def test_deepen_after_every_deepenable_layer(name, inspected):
    model = onnx.load(str(model_path(name)))
    layers = [layer["name"] for layer in inspected[name]["layers"] if layer["deepen"]["ok"]]
    assert layers
    for layer in layers:
        deeper, report = deepen_exact(model, [layer])
        assert f"{layer}/deeper0" in {n.name for n in deeper.graph.node}
    deeper, report = deepen_exact(model, layers)
    assert len(report["changes"]) == len(layers)


@pytest.mark.parametrize("name", SHIPPED)
def test_deepen_then_factor_two(name, inspected):
    """Grow both ways: deepen after the first layer, then widen everything."""
    model = onnx.load(str(model_path(name)))
    first = inspected[name]["layers"][0]["name"]
    deeper, _ = deepen_exact(model, [first])
    grown, _ = widen_exact(deeper, factor=2)
    assert_same_function(model, grown)
