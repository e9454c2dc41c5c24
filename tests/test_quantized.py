"""Quantized (QDQ) models: quantized layers are listed and refused with the
reason (their readers would have to divide integer weights by the copy
count); activations quantized with one scale act per unit, so float layers
around them grow exactly."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_net2net as n2n
from onnx_net2net.errors import GrowthRefused

from helpers import H, make_model, rand, widen_exact


def quantized_cnn(per_channel: bool):
    """x -> QDQ -> conv1 (int8 weight) -> Relu -> QDQ -> conv2 (int8 weight) -> y."""
    rng = np.random.default_rng(0)
    channels = (4 if per_channel else 1,)
    inits = {"w1_q": rng.integers(-120, 120, (4, 2, 3, 3)).astype(np.int8),
             "w1_s": np.full(channels, 0.01, np.float32), "w1_z": np.zeros(channels, np.int8),
             "w2_q": rng.integers(-120, 120, (3, 4, 3, 3)).astype(np.int8),
             "w2_s": np.full(3 if per_channel else 1, 0.02, np.float32),
             "w2_z": np.zeros(3 if per_channel else 1, np.int8),
             "a_s": np.array(0.05, np.float32), "a_z": np.array(128, np.uint8)}
    if not per_channel:
        for name in ("w1_s", "w1_z", "w2_s", "w2_z"):
            inits[name] = inits[name].reshape(())
    nodes = [H("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1"], axis=0),
             H("DequantizeLinear", ["w2_q", "w2_s", "w2_z"], ["w2"], axis=0),
             H("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"]), H("DequantizeLinear", ["xq", "a_s", "a_z"], ["xd"]),
             H("Conv", ["xd", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), H("Relu", ["c1"], ["r1"]),
             H("QuantizeLinear", ["r1", "a_s", "a_z"], ["rq"]), H("DequantizeLinear", ["rq", "a_s", "a_z"], ["rd"]),
             H("Conv", ["rd", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [("x", ["N", 2, 6, 6])], [("y", ["N", 3, 6, 6])], inits)


@pytest.mark.parametrize("per_channel, scales", [(True, "per-channel scales on axis 0"), (False, "one scale")])
def test_quantized_layers_are_listed_and_refused_with_the_reason(per_channel, scales):
    model = quantized_cnn(per_channel)
    layers = {l["name"]: l for l in n2n.inspect(model, trial=False)["layers"]}
    assert list(layers) == ["conv1", "conv2"]
    reason = layers["conv1"]["widen"]["reason"]
    assert f"int8 'w1_q' through DequantizeLinear, {scales}" in reason
    assert "divide its weights by the copy count, which int8 values cannot hold exactly" in reason
    assert not layers["conv1"]["deepen"]["ok"] and "would run in float" in layers["conv1"]["deepen"]["reason"]
    with pytest.raises(GrowthRefused, match="int8 values cannot hold exactly"):
        n2n.widen(model, {"conv1": 6})


def float_layers_around(consumer_quantized: bool, per_channel_activation: bool = False):
    """x -> fc1 (float) -> Relu -> QuantizeLinear -> DequantizeLinear -> fc2 -> y,
    fc2's weight float or int8 (per output channel)."""
    rng = np.random.default_rng(1)
    inits = {"w1": rand(rng, 4, 6), "b1": rand(rng, 6), "w2": rand(rng, 6, 3),
             "a_s": np.array(0.05, np.float32), "a_z": np.array(0, np.int8)}
    if per_channel_activation:
        inits.update(a_s=np.full(6, 0.05, np.float32), a_z=np.zeros(6, np.int8))
    nodes = [H("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
             H("QuantizeLinear", ["a", "a_s", "a_z"], ["aq"], axis=1),
             H("DequantizeLinear", ["aq", "a_s", "a_z"], ["ad"], axis=1)]
    if consumer_quantized:
        inits.update(w2_q=rng.integers(-120, 120, (6, 3)).astype(np.int8), w2_s=np.full(3, 0.01, np.float32),
                     w2_z=np.zeros(3, np.int8))
        del inits["w2"]
        nodes.append(H("DequantizeLinear", ["w2_q", "w2_s", "w2_z"], ["w2"], axis=1))
    nodes.append(H("MatMul", ["ad", "w2"], ["y"], name="fc2"))
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 3])], inits)


def test_a_float_layer_grows_through_activations_quantized_with_one_scale():
    model = float_layers_around(consumer_quantized=False)
    assert next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == "fc1")["widen"]["ok"]
    widen_exact(model, {"fc1": 9})


def test_a_float_layer_read_by_a_quantized_layer_is_refused_there():
    model = float_layers_around(consumer_quantized=True)
    layer = next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == "fc1")
    assert "MatMul 'fc2': its weight 'w2' is quantized (int8 'w2_q' through DequantizeLinear, per-channel scales " \
           "on axis 1)" in layer["widen"]["reason"]


def test_activations_quantized_per_unit_are_refused():
    model = float_layers_around(consumer_quantized=False, per_channel_activation=True)
    layer = next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == "fc1")
    assert "scales per channel on the unit axis (axis 1)" in layer["widen"]["reason"]
