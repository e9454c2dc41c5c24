"""Weights computed from constants (weight normalisation, a transposed
weight) are folded into plain initializers and grown exactly; a quantized
weight (DequantizeLinear) is refused with the reason."""

from __future__ import annotations

import numpy as np
import onnx_net2net as n2n

from helpers import H, assert_same_function, make_model, rand, widen_exact


def weight_normed_conv():
    """x -> c1 with W = g * v / ||v|| (per output channel) -> Relu -> c2 -> y."""
    rng = np.random.default_rng(0)
    inits = {"v": rand(rng, 6, 3, 3), "g": rand(rng, 6, 1, 1) + 1, "b1": rand(rng, 6), "w2": rand(rng, 2, 6, 1),
             "norm_axes": np.array([1, 2], np.int64)}
    nodes = [H("ReduceL2", ["v", "norm_axes"], ["norm"], keepdims=1), H("Div", ["v", "norm"], ["direction"]),
             H("Mul", ["g", "direction"], ["w1"]),
             H("Conv", ["x", "w1", "b1"], ["c"], name="c1", pads=[1, 1]), H("Relu", ["c"], ["r"]),
             H("Conv", ["r", "w2"], ["y"], name="c2")]
    return make_model(nodes, [("x", ["N", 3, 10])], ["y"], inits, opset=18)


def test_weight_norm_is_folded_and_the_layer_grows():
    model = weight_normed_conv()
    report = n2n.inspect(model, trial=False)
    layer = next(l for l in report["layers"] if l["name"] == "c1")
    assert layer["widen"]["ok"] and report["folded"][0]["from"] == ["Div", "Mul", "ReduceL2"]
    grown, report = widen_exact(model, {"c1": 9})
    assert report["folded"] and not any(n.op_type == "ReduceL2" for n in grown.graph.node)


def test_weight_norm_layer_deepens_after_folding():
    model = weight_normed_conv()
    deeper, report = n2n.deepen(model, ["c1"])
    assert_same_function(model, deeper)
    assert report["folded"]
    assert sum(n.op_type == "Conv" for n in deeper.graph.node) == 3


def test_a_weight_transposed_by_a_node_grows():
    rng = np.random.default_rng(1)
    inits = {"w1_t": rand(rng, 5, 4), "w2": rand(rng, 5, 2)}
    nodes = [H("Transpose", ["w1_t"], ["w1"], perm=[1, 0]), H("MatMul", ["x", "w1"], ["h"], name="fc1"),
             H("Tanh", ["h"], ["a"]), H("MatMul", ["a", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [("x", ["N", 4])], ["y"], inits)
    widen_exact(model, {"fc1": 8})


def test_a_quantized_consumer_weight_is_refused_with_the_reason():
    rng = np.random.default_rng(2)
    inits = {"w1": rand(rng, 4, 5), "w2_q": rng.integers(-100, 100, (5, 2)).astype(np.int8),
             "w2_scale": np.array([0.01, 0.02], np.float32), "w2_zero": np.zeros(2, np.int8)}
    nodes = [H("DequantizeLinear", ["w2_q", "w2_scale", "w2_zero"], ["w2"], axis=1),
             H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
             H("MatMul", ["a", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [("x", ["N", 4])], ["y"], inits)
    layer = next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == "fc1")
    assert "quantized (int8 'w2_q' through DequantizeLinear, per-channel scales on axis 1)" in layer["widen"]["reason"]


def scattered_bias_mlp():
    """torchvision's Swin V2 qkv bias: a copy of b with its middle third zeroed
    (ScatterND on constants), added after the MatMul: x -> fc1 + b' -> Relu -> fc2."""
    rng = np.random.default_rng(2)
    inits = {"w1": rand(rng, 4, 6), "b": rand(rng, 6), "idx": np.arange(2, 4, dtype=np.int64).reshape(2, 1),
             "zeros": np.zeros(2, np.float32), "w2": rand(rng, 6, 3)}
    nodes = [H("ScatterND", ["b", "idx", "zeros"], ["b_zeroed"]), H("MatMul", ["x", "w1"], ["h"], name="fc1"),
             H("Add", ["b_zeroed", "h"], ["hb"]), H("Relu", ["hb"], ["a"]), H("MatMul", ["a", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["N", 4])], ["y"], inits)


def test_a_matmul_bias_computed_by_scatternd_is_folded_and_the_layer_grows():
    model = scattered_bias_mlp()
    report = n2n.inspect(model, trial=False)
    assert next(l for l in report["layers"] if l["name"] == "fc1")["widen"]["ok"], report
    assert report["folded"][0]["from"] == ["ScatterND"]
    grown, report = widen_exact(model, {"fc1": 9}, split="random")
    assert report["folded"] and not any(n.op_type == "ScatterND" for n in grown.graph.node)
