"""Group normalisation with one group (timm's PoolFormer: GroupNorm(1, C)).

Statistics over every channel and position of a sample are unchanged when
every channel is copied equally often, so the residual stream grows by
multiples. PyTorch exports GroupNorm(1, C) as Reshape [N, C, H, W] ->
[N, 1, C*H*W], InstanceNormalization (scale and bias of size 1), Reshape
back (to Shape(x), or to a constant shape), Mul gamma, Add beta. Opset
21's GroupNormalization is refused (ONNX infers no type for its output). More groups, and non-multiples, are refused.
"""

import numpy as np
import pytest

import onnx_net2net as n2n
from helpers import H, make_model, rand, vi, widen_exact

C, SIDE = 4, 3


def _inits(rng, groups=1):
    return {"w0": rand(rng, C, 2, 3, 3), "shape": np.array([0, groups, -1]), "one": np.ones(groups, np.float32),
            "zero": np.zeros(groups, np.float32), "g": 1 + rand(rng, C, 1, 1, scale=0.2), "b": rand(rng, C, 1, 1),
            "w1": rand(rng, 2 * C, C, 1, 1), "w2": rand(rng, C, 2 * C, 1, 1), "wo": rand(rng, 3, C, 1, 1),
            "back": np.array([2, C, SIDE, SIDE])}


def _stream(norm_nodes, inits, batch="N", opset=17, value_info=()):
    """stem -> h; h + fc2(relu(fc1(norm(h)))) -> head: norm_nodes turn 'h' into 'n'."""
    nodes = [H("Conv", ["x", "w0"], ["h"], name="stem", pads=[1, 1, 1, 1]), *norm_nodes,
             H("Conv", ["n", "w1"], ["u"], name="fc1"), H("Relu", ["u"], ["a"]),
             H("Conv", ["a", "w2"], ["f"], name="fc2"), H("Add", ["h", "f"], ["s"]),
             H("Conv", ["s", "wo"], ["y"], name="head")]
    return make_model(nodes, [("x", [batch, 2, SIDE, SIDE])], [("y", [batch, 3, SIDE, SIDE])], inits, opset=opset,
                      value_info=value_info)


def exported_group_norm(groups=1, constant_shape=False):
    """GroupNorm(groups, C) the way torch.onnx.export writes it."""
    rng = np.random.default_rng(0)
    back = ["back"] if constant_shape else ["hs"]
    nodes = [H("Reshape", ["h", "shape"], ["r"]), H("InstanceNormalization", ["r", "one", "zero"], ["i"], epsilon=1e-5),
             *([] if constant_shape else [H("Shape", ["h"], ["hs"])]),
             H("Reshape", ["i", *back], ["rb"]), H("Mul", ["rb", "g"], ["m"]), H("Add", ["m", "b"], ["n"])]
    return _stream(nodes, _inits(rng, groups), batch=2 if constant_shape else "N")


def group_normalization_op(groups=1):
    """The same norm as one GroupNormalization (opset 21: per-channel scale and bias)."""
    rng = np.random.default_rng(0)
    inits = _inits(rng)
    inits.update(gs=1 + rand(rng, C, scale=0.2), gb=rand(rng, C))
    nodes = [H("GroupNormalization", ["h", "gs", "gb"], ["n"], num_groups=groups, epsilon=1e-5)]
    # (ONNX's shape inference gives GroupNormalization's output no type: it is stated)
    return _stream(nodes, inits, opset=21, value_info=[vi("n", ["N", C, SIDE, SIDE])])


def _layers(model):
    return {layer["name"]: layer["widen"] for layer in n2n.inspect(model, trial=False)["layers"]}


@pytest.mark.parametrize("constant_shape", [False, True])
def test_exported_group_norm_stream_grows_by_multiples(constant_shape):
    model = exported_group_norm(constant_shape=constant_shape)
    layers = _layers(model)
    assert layers["stem"]["ok"] and layers["stem"]["step"] == C
    assert sorted(layers["stem"]["group"]) == ["fc2", "stem"]
    widen_exact(model, {"stem": 2 * C}, split="random")
    widen_exact(model, {"fc2": 3 * C})
    widen_exact(model, {"fc1": 3 * C - 1})  # the hidden layer is not normalised: any width


def test_exported_group_norm_refuses_other_widths_with_the_reason():
    model = exported_group_norm()
    assert "group normalisation" in _layers(model)["stem"]["note"]
    with pytest.raises(n2n.UserError, match="multiple of 4.*group normalisation"):
        n2n.widen(model, {"stem": C + 2})


def test_exported_group_norm_with_two_groups_is_refused():
    """[N, C, H, W] -> [N, 2, C/2*H*W] puts half the channels in each group:
    copies appended after the old channels would join the last group."""
    widen = _layers(exported_group_norm(groups=2))["stem"]
    assert not widen["ok"] and "Reshape" in widen["reason"], widen


def test_group_normalization_op_is_refused_with_the_reason():
    """One group would be exact, but ONNX infers no type for its output, so
    the grown model's shapes could not be checked: refused, saying so."""
    widen = _layers(group_normalization_op())["stem"]
    assert not widen["ok"] and "shape inference" in widen["reason"], widen
    widen = _layers(group_normalization_op(groups=2))["stem"]
    assert not widen["ok"] and "in 2 groups" in widen["reason"], widen
