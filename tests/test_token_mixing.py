"""MLP-Mixer's token mixing: MLPs over the token axis after a Transpose.

The hidden layer of a token-mixing MLP has units over tokens that pass per
unit through the activation to the second layer: it grows exactly. The
second layer's outputs are the tokens themselves, the positions flattened
from the patch stem's spatial axes: their number is fixed by the input's
size, so it is refused with that reason."""

from __future__ import annotations

import numpy as np

import onnx_net2net as n2n

from helpers import H, make_model, rand, widen_exact


def mixer_block():
    """x[N, 3, 8, 8] -> stem Conv (6 channels, 4x4 patches) -> [N, 6, 4 tokens]
    -> token MLP (tok1: 4 -> 8, Erf GELU, tok2: 8 -> 4) + residual -> channel
    MatMul -> mean over tokens -> y[N, 3]."""
    rng = np.random.default_rng(0)
    inits = {"ws": rand(rng, 6, 3, 4, 4), "bs": rand(rng, 6), "flat": np.array([0, 6, 4], np.int64),
             "w1": rand(rng, 4, 8), "b1": rand(rng, 8), "w2": rand(rng, 8, 4), "b2": rand(rng, 4),
             "sqrt2": np.array(1.4142135, np.float32), "one": np.array(1.0, np.float32),
             "half": np.array(0.5, np.float32), "wc": rand(rng, 6, 3), "axes": np.array([1], np.int64)}
    nodes = [H("Conv", ["x", "ws", "bs"], ["patches"], name="stem", kernel_shape=[4, 4], strides=[4, 4]),
             H("Reshape", ["patches", "flat"], ["tokens_cf"]),
             H("Transpose", ["tokens_cf"], ["tokens"], perm=[0, 2, 1]),
             H("Transpose", ["tokens"], ["mix_in"], perm=[0, 2, 1]),
             H("MatMul", ["mix_in", "w1"], ["h0"], name="tok1"), H("Add", ["h0", "b1"], ["h"]),
             H("Div", ["h", "sqrt2"], ["hd"]), H("Erf", ["hd"], ["he"]), H("Add", ["he", "one"], ["hp"]),
             H("Mul", ["h", "hp"], ["hm"]), H("Mul", ["hm", "half"], ["g"]),
             H("MatMul", ["g", "w2"], ["t0"], name="tok2"), H("Add", ["t0", "b2"], ["t"]),
             H("Transpose", ["t"], ["t_back"], perm=[0, 2, 1]), H("Add", ["tokens", "t_back"], ["res"]),
             H("MatMul", ["res", "wc"], ["c"], name="channels"),
             H("ReduceMean", ["c", "axes"], ["y"], keepdims=0)]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 3])], inits, opset=18)


def test_the_token_mlp_hidden_layer_grows_exactly():
    model = mixer_block()
    layer = next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == "tok1")
    assert layer["widen"]["ok"]
    widen_exact(model, {"tok1": 12})


def test_the_tokens_themselves_are_refused_as_positions_fixed_by_the_input():
    layer = next(l for l in n2n.inspect(mixer_block(), trial=False)["layers"] if l["name"] == "tok2")
    reason = layer["widen"]["reason"]
    assert not layer["widen"]["ok"]
    assert "4 positions (tokens) flattened from the spatial axes [2, 2] of Conv 'stem'" in reason
    assert "fixed by the input's size" in reason
