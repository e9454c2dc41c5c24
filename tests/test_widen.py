"""Net2WiderNet per operator pattern, on tiny onnx.helper graphs.

Every test widens, checks the outputs in onnxruntime (our own run, plus the
package's verification) to max rel err 1e-5, and checks that the weights
really changed shape.
"""

import numpy as np
import onnx
import pytest

import onnx_net2net as n2n
import onnx_net2net.io as nio
from onnx_net2net.ir import GraphIR
from helpers import (H, assert_same_function, attr, batchnorm, chain, clip, conv_sandwich, dense_sandwich,
                     erf_gelu, infer_mapping, init, make_model, max_rel_error, model_path, node, node_weight,
                     per_channel, rand, random_feeds, silu, unary, widen_exact)


def check_producer_copies(old_model, new_model, weight, n, q, axis=0):
    """The first n units are untouched and every new unit copies an old one; returns g."""
    old, new = init(old_model, weight), node_weight(new_model, "L1") if weight == "W1" else init(new_model, weight)
    assert new.shape[axis] == q and old.shape[axis] == n
    np.testing.assert_array_equal(np.take(new, range(n), axis=axis), old)
    g = infer_mapping(old, new, axis)
    np.testing.assert_array_equal(g[:n], np.arange(n))
    return g


def check_consumer_split(old, new, g, axis=1):
    """Consumer slots of the copies of u sum to the original slot of u."""
    n = old.shape[axis]
    summed = np.zeros_like(old, dtype=np.float64)
    for j, u in enumerate(g):
        index = [slice(None)] * old.ndim
        index[axis] = u
        summed[tuple(index)] += np.take(new, j, axis=axis)
    np.testing.assert_allclose(summed, old, rtol=1e-6, atol=1e-7)
    assert new.shape[axis] == len(g) and n < len(g)


# ----------------------------------------------------------------------------
# Weighted layers


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_nd(dims):
    model = conv_sandwich(unary("Relu"), dims=dims, size=5 if dims < 3 else 4)
    wider, report = widen_exact(model, {"L1": 5})
    g = check_producer_copies(model, wider, "W1", 3, 5)
    np.testing.assert_array_equal(node_weight(wider, "L1", 2), init(model, "B1")[g])
    check_consumer_split(init(model, "W2"), node_weight(wider, "L2"), g)
    assert node_weight(wider, "L2").shape == (2, 5) + (3,) * dims
    change = report["changes"][0]
    assert change["layers"] == ["L1"] and change["old_width"] == 3 and change["new_width"] == 5


def test_conv_without_bias():
    model = conv_sandwich(unary("Relu"), bias=False)
    wider, _ = widen_exact(model, {"L1": 6})
    assert node_weight(wider, "L1").shape == (6, 2, 3, 3)
    assert node_weight(wider, "L2").shape == (2, 6, 3, 3)


def test_conv_transpose():
    rng = np.random.default_rng(1)
    inits = {"W1": rand(rng, 2, 3, 3, 3), "B1": rand(rng, 3), "W2": rand(rng, 3, 2, 3, 3), "B2": rand(rng, 2)}
    nodes = [H("ConvTranspose", ["x", "W1", "B1"], ["t"], name="L1", strides=[2, 2]),
             H("Relu", ["t"], ["r"]),
             H("ConvTranspose", ["r", "W2", "B2"], ["y"], name="L2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    w1 = node_weight(wider, "L1")
    assert w1.shape == (2, 5, 3, 3)                      # output channels on axis 1
    g = infer_mapping(init(model, "W1"), w1, axis=1)
    np.testing.assert_array_equal(node_weight(wider, "L1", 2), init(model, "B1")[g])
    check_consumer_split(init(model, "W2"), node_weight(wider, "L2"), g, axis=0)   # input channels on axis 0


def test_conv_into_conv_transpose():
    rng = np.random.default_rng(2)
    inits = {"W1": rand(rng, 3, 2, 3, 3), "W2": rand(rng, 3, 2, 2, 2)}
    nodes = [H("Conv", ["x", "W1"], ["t"], name="L1", pads=[1, 1, 1, 1]), H("Tanh", ["t"], ["r"]),
             H("ConvTranspose", ["r", "W2"], ["y"], name="L2", strides=[2, 2])]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 4})
    assert node_weight(wider, "L2").shape == (4, 2, 2, 2)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_b):
    model = dense_sandwich(unary("Relu"), trans_b=trans_b)
    wider, _ = widen_exact(model, {"L1": 7})
    w1, w2 = node_weight(wider, "L1"), node_weight(wider, "L2")
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    assert w1.shape[out_axis] == 7 and w2.shape[in_axis] == 7
    g = check_producer_copies(model, wider, "W1", 3, 7, axis=out_axis)
    np.testing.assert_array_equal(node_weight(wider, "L1", 2), init(model, "B1")[g])
    check_consumer_split(init(model, "W2"), w2, g, axis=in_axis)


def test_gemm_by_weight_name():
    model = dense_sandwich(unary("Relu"))
    wider, _ = widen_exact(model, {"W1": 4})
    assert node_weight(wider, "L1").shape == (4, 4)


def test_matmul_add():
    model = dense_sandwich(unary("Relu"), kind="matmul")
    wider, _ = widen_exact(model, {"L1": 6})
    assert node_weight(wider, "L1").shape == (4, 6)
    assert node_weight(wider, "L1/bias").shape == (6,)
    assert node_weight(wider, "L2").shape == (6, 2)


def test_matmul_3d_activations():
    """MatMul on [N, T, D] (token-wise dense layers)."""
    rng = np.random.default_rng(3)
    inits = {"W1": rand(rng, 4, 3), "B1": rand(rng, 3), "W2": rand(rng, 3, 2)}
    nodes = [H("MatMul", ["x", "W1"], ["m"], name="L1"), H("Add", ["m", "B1"], ["a"]), H("Gelu", ["a"], ["r"]),
             H("MatMul", ["r", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 5, 4])], ["y"], inits, opset=20)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L2").shape == (5, 2)


def test_sklearn_mlp_matmul_add():
    model = onnx.load(str(model_path("sklearn_mlp")))
    feeds = {"float_input": np.random.default_rng(0).integers(0, 17, (6, 64)).astype(np.float32)}
    wider, report = widen_exact(model, {"MatMul": 40, "MatMul1": 20}, feeds=feeds)
    assert node_weight(wider, "MatMul").shape == (64, 40)
    assert node_weight(wider, "Add", 1).shape == (1, 40)
    assert node_weight(wider, "MatMul1").shape == (40, 20)
    assert node_weight(wider, "MatMul2").shape == (20, 10)
    assert sorted(c["new_width"] for c in report["changes"]) == [20, 40]


# ----------------------------------------------------------------------------
# Per-unit ops between producer and consumer


def test_batchnorm_replicated():
    model = conv_sandwich(chain(batchnorm, unary("Relu")))
    wider, _ = widen_exact(model, {"L1": 6})
    g = check_producer_copies(model, wider, "W1", 3, 6)
    bn = node(wider, "BN")
    for port, name in enumerate(["bn_scale", "bn_bias", "bn_mean", "bn_var"], start=1):
        new = init(wider, bn.input[port])
        np.testing.assert_array_equal(new, init(model, name)[g])
    # copies of the trained statistics, not fresh identity statistics
    assert not np.allclose(init(wider, bn.input[3])[3:], 0) and not np.allclose(init(wider, bn.input[4])[3:], 1)
    assert attr(bn, "epsilon") == pytest.approx(1e-3)


def test_prelu_per_channel_slope():
    model = conv_sandwich(per_channel("PRelu", 2, "slope"))
    wider, _ = widen_exact(model, {"L1": 5})
    g = check_producer_copies(model, wider, "W1", 3, 5)
    slope = init(wider, node(wider, "PRelu_slope").input[1])
    assert slope.shape == (5, 1, 1)
    np.testing.assert_array_equal(slope, init(model, "slope")[g])


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div", "Max"])
def test_per_channel_constants(op):
    model = conv_sandwich(chain(per_channel(op, 2), unary("Relu")))
    wider, _ = widen_exact(model, {"L1": 5})
    assert init(wider, node(wider, f"{op}_pc").input[1]).shape == (5, 1, 1)


def test_per_channel_constant_dense():
    model = dense_sandwich(chain(per_channel("Mul", 0, "scale"), unary("Tanh")))
    wider, _ = widen_exact(model, {"L1": 5})
    assert init(wider, node(wider, "Mul_scale").input[1]).shape == (5,)


def test_scalar_constant_is_left_alone():
    def scalar(t, inits, rng, c):
        inits["s"] = np.array(1.7, np.float32)
        return [H("Mul", [t, "s"], ["scaled"], name="scalar")], "scaled"
    model = conv_sandwich(scalar)
    wider, _ = widen_exact(model, {"L1": 4})
    assert init(wider, "s").shape == ()


ACTIVATIONS = {
    "Relu": (unary("Relu"), 17),
    "LeakyRelu": (unary("LeakyRelu", alpha=0.1), 17),
    "Clip": (clip, 17),
    "Sigmoid": (unary("Sigmoid"), 17),
    "Tanh": (unary("Tanh"), 17),
    "Gelu": (unary("Gelu"), 20),
    "Gelu-tanh": (unary("Gelu", approximate="tanh"), 20),
    "Erf-GELU": (erf_gelu, 17),
    "SiLU": (silu, 17),
    "Elu": (unary("Elu", alpha=0.7), 17),
    "Selu": (unary("Selu"), 17),
    "Softplus": (unary("Softplus"), 17),
    "HardSigmoid": (unary("HardSigmoid", alpha=0.3, beta=0.4), 17),
    "HardSwish": (unary("HardSwish"), 17),
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_activation(activation, kind):
    middle, opset = ACTIVATIONS[activation]
    if kind == "conv":
        model = conv_sandwich(middle, opset=opset)
    else:
        model = dense_sandwich(middle, opset=opset)
    wider, _ = widen_exact(model, {"L1": 6})
    assert node_weight(wider, "L1").shape[0] == 6
    assert node_weight(wider, "L2").shape[1] == 6


POOLS = {
    "MaxPool": unary("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
    "MaxPool-pads": unary("MaxPool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "AveragePool": unary("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
    "GlobalAveragePool": unary("GlobalAveragePool"),
    "GlobalMaxPool": unary("GlobalMaxPool"),
    "LpPool": unary("LpPool", kernel_shape=[2, 2], p=2),
}


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_pooling(pool):
    model = conv_sandwich(chain(unary("Relu"), POOLS[pool]), size=6)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L2").shape[1] == 5


def test_dropout_identity_cast():
    def cast_round_trip(t, inits, rng, c):
        return [H("Cast", [t], ["c64"], name="to64", to=onnx.TensorProto.DOUBLE),
                H("Sqrt", ["c64"], ["s64"], name="sqrt64"),
                H("Cast", ["s64"], ["c32"], name="to32", to=onnx.TensorProto.FLOAT)], "c32"

    def dropout_with_mask(t, inits, rng, c):
        return [H("Dropout", [t], ["d", "mask"], name="drop")], "d"

    model = conv_sandwich(chain(unary("Relu"), unary("Dropout"), unary("Identity"), dropout_with_mask,
                                cast_round_trip))
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L2").shape[1] == 5


def test_pad_spatial():
    def pad(t, inits, rng, c):
        inits["pads"] = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)
        return [H("Pad", [t, "pads"], ["padded"], name="Pad", mode="reflect")], "padded"
    model = conv_sandwich(chain(unary("Relu"), pad))
    wider, _ = widen_exact(model, {"L1": 5})
    np.testing.assert_array_equal(init(wider, "pads"), [0, 0, 1, 2, 0, 0, 2, 1])
    assert node_weight(wider, "L2").shape[1] == 5


def test_pad_with_axes_input():
    def pad(t, inits, rng, c):
        inits["pads"] = np.array([1, 1, 1, 1], np.int64)
        inits["axes"] = np.array([2, 3], np.int64)
        return [H("Pad", [t, "pads", "", "axes"], ["padded"], name="Pad")], "padded"
    model = conv_sandwich(chain(unary("Relu"), pad), opset=18)
    wider, _ = widen_exact(model, {"L1": 4})
    assert node_weight(wider, "L2").shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(init(wider, "axes"), [2, 3])


def test_pad_on_channel_axis_is_refused():
    def pad(t, inits, rng, c):
        inits["pads"] = np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64)
        return [H("Pad", [t, "pads"], ["padded"], name="Pad")], "padded"
    model = conv_sandwich(pad, c=3)
    # L2 reads c + 2 channels; rebuild its weight accordingly
    for tensor in model.graph.initializer:
        if tensor.name == "W2":
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ones((2, 5, 3, 3), np.float32), "W2"))
    with pytest.raises(n2n.GrowthRefused, match="pads the unit axis"):
        n2n.widen(model, {"L1": 4})


# ----------------------------------------------------------------------------
# Coupled spaces


def residual_model(seed=0):
    """x -> A -> Relu -> B -> Add(+ relu A) -> Relu -> C -> y: A and B share a space."""
    rng = np.random.default_rng(seed)
    inits = {"WA": rand(rng, 3, 2, 3, 3), "BA": rand(rng, 3), "WB": rand(rng, 3, 3, 3, 3), "BB": rand(rng, 3),
             "WC": rand(rng, 2, 3, 1, 1), "BC": rand(rng, 2)}
    nodes = [H("Conv", ["x", "WA", "BA"], ["a"], name="A", pads=[1] * 4), H("Relu", ["a"], ["ra"], name="reluA"),
             H("Conv", ["ra", "WB", "BB"], ["b"], name="B", pads=[1] * 4), H("Add", ["b", "ra"], ["s"], name="add"),
             H("Relu", ["s"], ["rs"], name="reluS"), H("Conv", ["rs", "WC", "BC"], ["y"], name="C")]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], ["y"], inits)


@pytest.mark.parametrize("layer", ["A", "B"])
def test_residual_add_widens_the_whole_stage(layer):
    model = residual_model()
    wider, report = widen_exact(model, {layer: 5})
    assert sorted(report["changes"][0]["layers"]) == ["A", "B"]
    assert node_weight(wider, "A").shape == (5, 2, 3, 3)
    assert node_weight(wider, "B").shape == (5, 5, 3, 3)     # consumer and producer of the same space
    assert node_weight(wider, "C").shape == (2, 5, 1, 1)


def concat_model(seed=0, consumer="conv"):
    """Conv A (3 ch) and Conv B (2 ch) concatenated on channels -> C."""
    rng = np.random.default_rng(seed)
    inits = {"WA": rand(rng, 3, 2, 3, 3), "WB": rand(rng, 2, 2, 1, 1), "BB": rand(rng, 2),
             "WC": rand(rng, 2, 5, 3, 3)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A", pads=[1] * 4), H("Relu", ["a"], ["ra"]),
             H("Conv", ["x", "WB", "BB"], ["b"], name="B"), H("Sigmoid", ["b"], ["sb"]),
             H("Concat", ["ra", "sb"], ["cat"], name="cat", axis=1),
             H("Conv", ["cat", "WC"], ["y"], name="C")]
    return make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)


def test_concat_first_branch():
    model = concat_model()
    wider, _ = widen_exact(model, {"A": 5})
    wc = node_weight(wider, "C")
    assert wc.shape == (2, 7, 3, 3)
    # B's slots moved from 3..4 to 5..6, untouched
    np.testing.assert_array_equal(wc[:, 5:], init(model, "WC")[:, 3:])
    g = infer_mapping(init(model, "WA"), node_weight(wider, "A"))
    check_consumer_split(init(model, "WC")[:, :3], wc[:, :5], g)


def test_concat_second_branch_offset():
    model = concat_model()
    wider, _ = widen_exact(model, {"B": 4})
    wc = node_weight(wider, "C")
    assert wc.shape == (2, 7, 3, 3)
    np.testing.assert_array_equal(wc[:, :3], init(model, "WC")[:, :3])
    g = infer_mapping(init(model, "WB"), node_weight(wider, "B"))
    check_consumer_split(init(model, "WC")[:, 3:], wc[:, 3:], g)


def test_concat_negative_axis_and_both_branches():
    model = concat_model()
    for n in model.graph.node:
        if n.op_type == "Concat":
            n.attribute[0].i = -3
    wider, report = widen_exact(model, {"A": 4, "B": 3})
    assert node_weight(wider, "C").shape == (2, 7, 3, 3)
    assert len(report["changes"]) == 2


def split_model(seed=0, op="Split"):
    """Concat(A: 4 ch, B: 3 ch) -> Split [4, 3] (or two Slices) -> C, D -> Add -> y."""
    rng = np.random.default_rng(seed)
    inits = {"WA": rand(rng, 4, 2, 1, 1), "WB": rand(rng, 3, 2, 1, 1), "WC": rand(rng, 2, 4, 1, 1),
             "WD": rand(rng, 2, 3, 1, 1)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A"), H("Conv", ["x", "WB"], ["b"], name="B"),
             H("Concat", ["a", "b"], ["cat"], axis=1, name="cat"), H("Relu", ["cat"], ["r"])]
    if op == "Split":
        inits["sizes"] = np.array([4, 3], np.int64)
        nodes.append(H("Split", ["r", "sizes"], ["p0", "p1"], axis=1, name="split"))
    else:
        inits.update(s0=np.array([0], np.int64), e0=np.array([4], np.int64), s1=np.array([4], np.int64),
                     e1=np.array([7], np.int64), ax=np.array([1], np.int64))
        nodes += [H("Slice", ["r", "s0", "e0", "ax"], ["p0"], name="slice0"),
                  H("Slice", ["r", "s1", "e1", "ax"], ["p1"], name="slice1")]
    nodes += [H("Conv", ["p0", "WC"], ["c"], name="C"), H("Conv", ["p1", "WD"], ["d"], name="D"),
              H("Add", ["c", "d"], ["y"])]
    return make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)


def test_split_on_channel_axis():
    model = split_model()
    wider, _ = widen_exact(model, {"A": 6})
    np.testing.assert_array_equal(init(wider, node(wider, "split").input[1]), [6, 3])
    assert node_weight(wider, "C").shape == (2, 6, 1, 1)
    wider, _ = widen_exact(model, {"B": 5})
    np.testing.assert_array_equal(init(wider, node(wider, "split").input[1]), [4, 5])
    assert node_weight(wider, "D").shape == (2, 5, 1, 1)


def test_slice_on_channel_axis_first_piece():
    model = split_model(op="Slice")
    # A's units are in slice0 only; slice1 must move to 6:9
    wider, _ = widen_exact(model, {"A": 6})
    assert node_weight(wider, "C").shape == (2, 6, 1, 1)


def test_slice_on_channel_axis_last_piece():
    model = split_model(op="Slice")
    wider, _ = widen_exact(model, {"B": 5})
    assert node_weight(wider, "D").shape == (2, 5, 1, 1)
    assert int(init(wider, node(wider, "slice1").input[2])[0]) == 9


def test_slice_taking_a_channel_subrange_of_one_layer():
    """Conv A (5 ch) -> Slice [1:5] -> C: the units are cut. The kept range
    is a space of its own beside channel 0 (which nothing reads), so every
    width grows it: 7 keeps [1:7]."""
    rng = np.random.default_rng(4)
    inits = {"WA": rand(rng, 5, 2, 1, 1), "WC": rand(rng, 2, 4, 1, 1), "s": np.array([1], np.int64),
             "e": np.array([5], np.int64), "ax": np.array([1], np.int64)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A"), H("Slice", ["a", "s", "e", "ax"], ["p"], name="slice"),
             H("Conv", ["p", "WC"], ["y"], name="C")]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)
    wider, _ = widen_exact(model, {"A": 7})
    assert init(wider, "s").tolist() == [1] and init(wider, "e").tolist() == [7]
    assert node_weight(wider, "C").shape == (2, 6, 1, 1)


def test_transpose_nhwc_then_flatten_into_gemm():
    """Feature index p*C + c after NHWC flattening: units interleaved with positions."""
    def nhwc(inits):
        return [H("Transpose", ["r"], ["nhwc"], perm=[0, 2, 3, 1], name="T"),
                H("Flatten", ["nhwc"], ["flat"], name="F")]
    model = flatten_gemm_model(reshape=nhwc)
    wider, _ = widen_exact(model, {"L1": 5})
    wg = node_weight(wider, "L2")
    assert wg.shape == (4, 45)
    g = infer_mapping(init(model, "W1"), node_weight(wider, "L1"))
    old = init(model, "WG").reshape(4, 9, 3)            # [out, position, channel]
    check_consumer_split(old, wg.reshape(4, 9, 5), g, axis=2)


def flatten_gemm_model(reshape=None, seed=6, batch="N"):
    """Conv L1 (3 ch, 3x3 map) -> Relu -> Flatten (or `reshape(inits)` nodes) -> Gemm L2 (27 -> 4)."""
    rng = np.random.default_rng(seed)
    inits = {"W1": rand(rng, 3, 2, 3, 3), "B1": rand(rng, 3), "WG": rand(rng, 4, 27), "BG": rand(rng, 4)}
    nodes = [H("Conv", ["x", "W1", "B1"], ["t"], name="L1", pads=[1] * 4), H("Relu", ["t"], ["r"])]
    if reshape is None:
        nodes.append(H("Flatten", ["r"], ["flat"], name="F"))
    else:
        nodes += reshape(inits)
    nodes.append(H("Gemm", ["flat", "WG", "BG"], ["y"], name="L2", transB=1))
    return make_model(nodes, [("x", [batch, 2, 3, 3])], ["y"], inits)


def check_nchw_flatten(model, wider):
    wg = node_weight(wider, "L2")
    assert wg.shape == (4, 45)
    g = infer_mapping(init(model, "W1"), node_weight(wider, "L1"))
    old = init(model, "WG").reshape(4, 3, 9)            # [out, channel, position]: feature c*H*W + p
    check_consumer_split(old, wg.reshape(4, 5, 9), g, axis=1)


def test_flatten_nchw_into_gemm():
    model = flatten_gemm_model()
    wider, _ = widen_exact(model, {"L1": 5})
    check_nchw_flatten(model, wider)


def test_reshape_with_constant_shape():
    def reshape(inits):
        inits["shape"] = np.array([-1, 27], np.int64)
        return [H("Reshape", ["r", "shape"], ["flat"], name="R")]
    model = flatten_gemm_model(reshape=reshape)
    wider, _ = widen_exact(model, {"L1": 5})
    check_nchw_flatten(model, wider)
    np.testing.assert_array_equal(init(wider, node(wider, "R").input[1]), [-1, 45])


def test_reshape_with_constant_node_shape():
    def reshape(inits):
        return [H("Constant", [], ["shape"], name="shape_const",
                  value=onnx.numpy_helper.from_array(np.array([0, 27], np.int64))),
                H("Reshape", ["r", "shape"], ["flat"], name="R")]
    model = flatten_gemm_model(reshape=reshape)
    wider, _ = widen_exact(model, {"L1": 5})
    check_nchw_flatten(model, wider)


def runtime_flatten(inits):
    """Shape -> Gather(0) -> Unsqueeze -> Concat(-1) -> Reshape: torch's x.view(x.size(0), -1)."""
    inits.update(zero=np.array(0, np.int64), axes0=np.array([0], np.int64), minus1=np.array([-1], np.int64))
    return [H("Shape", ["r"], ["shp"], name="Shape"), H("Gather", ["shp", "zero"], ["batch"], name="Gather"),
            H("Unsqueeze", ["batch", "axes0"], ["batch1"], name="Unsq"),
            H("Concat", ["batch1", "minus1"], ["shape"], axis=0, name="ShapeCat"),
            H("Reshape", ["r", "shape"], ["flat"], name="R")]


def test_reshape_with_runtime_shape_static_batch():
    model = flatten_gemm_model(reshape=runtime_flatten, batch=3)
    wider, _ = widen_exact(model, {"L1": 5})
    check_nchw_flatten(model, wider)


def test_reshape_with_runtime_shape_dynamic_batch():
    model = flatten_gemm_model(reshape=runtime_flatten)
    wider, _ = widen_exact(model, {"L1": 5})
    check_nchw_flatten(model, wider)


def test_reshape_with_runtime_shape_literal_width():
    """Shape -> Gather(0) -> Unsqueeze -> Concat([27]): the literal 27 must become 45."""
    def reshape(inits):
        inits.update(zero=np.array(0, np.int64), axes0=np.array([0], np.int64), width=np.array([27], np.int64))
        return [H("Shape", ["r"], ["shp"], name="Shape"), H("Gather", ["shp", "zero"], ["batch"], name="Gather"),
                H("Unsqueeze", ["batch", "axes0"], ["batch1"], name="Unsq"),
                H("Concat", ["batch1", "width"], ["shape"], axis=0, name="ShapeCat"),
                H("Reshape", ["r", "shape"], ["flat"], name="R")]
    model = flatten_gemm_model(reshape=reshape)
    wider, _ = widen_exact(model, {"L1": 5})
    check_nchw_flatten(model, wider)


def test_identity_on_shared_weight():
    """Two layers read one initializer through Identity nodes (exporters do this)."""
    rng = np.random.default_rng(7)
    inits = {"W": rand(rng, 4, 4), "B1": rand(rng, 4), "B2": rand(rng, 4), "W3": rand(rng, 2, 4)}
    nodes = [H("Identity", ["W"], ["W_a"], name="idA"), H("Identity", ["W"], ["W_b"], name="idB"),
             H("Gemm", ["x", "W_a", "B1"], ["h1"], name="L1", transB=1), H("Relu", ["h1"], ["r1"]),
             H("Gemm", ["r1", "W_b", "B2"], ["h2"], name="L2", transB=1), H("Relu", ["h2"], ["r2"]),
             H("Gemm", ["r2", "W3"], ["y"], name="L3", transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 6})
    # whatever the plumbing (clone or Identity), L1 produces 6 units and L2 consumes 6
    ir = GraphIR(nio.from_proto(wider))
    assert ir.const_value(node(wider, "L1").input[1]).shape == (6, 4)
    assert ir.const_value(node(wider, "L2").input[1]).shape == (4, 6)


# ----------------------------------------------------------------------------
# Options


def test_split_random_is_exact_and_differs_from_equal():
    model = dense_sandwich(unary("Tanh"), c=3)
    equal, _ = widen_exact(model, {"L1": 8}, split="equal", seed=3)
    random, report = widen_exact(model, {"L1": 8}, split="random", seed=3)
    assert report["options"]["split"] == "random"
    np.testing.assert_array_equal(node_weight(equal, "L1"), node_weight(random, "L1"))   # same mapping
    w2_eq, w2_rand = node_weight(equal, "L2"), node_weight(random, "L2")
    assert w2_rand.shape == w2_eq.shape == (2, 8)
    assert not np.allclose(w2_eq, w2_rand)
    g = infer_mapping(init(model, "W1"), node_weight(random, "L1"))
    check_consumer_split(init(model, "W2"), w2_rand, g)


@pytest.mark.parametrize("width", [6, 8, 11])  # new units copy random old ones: 2, 3 or more copies
def test_zero_sum_split_is_exact_and_its_copies_differ(width):
    model = dense_sandwich(unary("Tanh"), c=3)
    equal, _ = widen_exact(model, {"L1": width}, split="equal", seed=5)
    zero_sum, report = widen_exact(model, {"L1": width}, split="zero-sum", seed=5)
    assert report["options"]["split"] == "zero-sum" and report["exact"] is True
    assert report["verification"]["max_rel"] < 1e-5
    w1 = node_weight(zero_sum, "L1")
    np.testing.assert_array_equal(w1, node_weight(equal, "L1"))                 # producers copy exactly
    g = infer_mapping(init(model, "W1"), w1)
    w2 = node_weight(zero_sum, "L2")
    check_consumer_split(init(model, "W2"), w2, g)                              # copies sum to the original
    spread = float(np.std(init(model, "W2")))
    copied = [unit for unit in range(3) if np.count_nonzero(g == unit) > 1]
    assert copied
    for unit in copied:
        copies = w2[:, g == unit]
        assert np.abs(copies - copies[:, :1]).max() > 0.01 * spread             # and differ from step 0
        np.testing.assert_allclose(copies - copies.mean(axis=1, keepdims=True),
                                   (w2 - node_weight(equal, "L2"))[:, g == unit], atol=1e-6)


def test_zero_sum_noise_sets_the_magnitude_and_stays_exact():
    model = conv_sandwich(unary("Relu"))
    deviations = []
    for noise in (0.01, 0.3):
        grown, report = widen_exact(model, {"L1": 6}, split="zero-sum", noise=noise, seed=2)
        assert report["options"]["noise"] == noise
        equal, _ = n2n.widen(model, {"L1": 6}, split="equal", seed=2)
        deviations.append(float(np.std(node_weight(grown, "L2") - node_weight(equal, "L2"))))
    assert 10 < deviations[1] / deviations[0] < 60   # std scales with --noise (30x, sampled)


def test_zero_sum_split_of_attention_heads_is_exact():
    model = onnx.load(str(model_path("gpt2_tiny")))
    widen_exact(model, factor=2.0, split="zero-sum", seed=1)


def test_noise_changes_the_function_slightly_and_says_so():
    model = dense_sandwich(unary("Relu"), c=4)
    noisy, report = n2n.widen(model, {"L1": 8}, noise=0.05)
    assert report["exact"] is False
    assert report["verification"]["max_rel"] > 0
    err = max_rel_error(model, noisy)
    assert 0 < err < 1.0
    assert node_weight(noisy, "L1").shape == (8, 4)


def test_random_pad_is_not_function_preserving():
    model = conv_sandwich(unary("Relu"))
    padded, report = n2n.widen(model, {"L1": 6}, init="random-pad")
    assert report["exact"] is False
    w1, w2 = node_weight(padded, "L1"), node_weight(padded, "L2")
    assert w1.shape == (6, 2, 3, 3) and w2.shape == (2, 6, 3, 3)
    np.testing.assert_array_equal(w1[:3], init(model, "W1"))
    np.testing.assert_array_equal(w2[:, :3], init(model, "W2"))   # old slots are not divided
    assert max_rel_error(model, padded) > 1e-3


def test_multiple_groups_in_one_call():
    model = onnx.load(str(model_path("mlp")))
    wider, report = widen_exact(model, {"/0/Gemm": 50, "/2/Gemm": 40})
    assert len(report["changes"]) == 2
    assert node_weight(wider, "/0/Gemm").shape == (50, 64)
    assert node_weight(wider, "/2/Gemm").shape == (40, 50)
    assert node_weight(wider, "/4/Gemm").shape == (10, 40)


def test_same_group_named_twice_with_different_widths_is_refused():
    with pytest.raises(n2n.UserError, match="grow together"):
        n2n.widen(residual_model(), {"A": 5, "B": 6})


def test_factor_widens_every_growable_group():
    model = residual_model()
    wider, report = widen_exact(model, factor=2)
    assert node_weight(wider, "A").shape == (6, 2, 3, 3)
    assert node_weight(wider, "B").shape == (6, 6, 3, 3)
    assert node_weight(wider, "C").shape == (2, 6, 1, 1)
    assert report["parameters"]["after"] > report["parameters"]["before"]


def test_input_model_is_not_modified():
    model = conv_sandwich(unary("Relu"))
    before = model.SerializeToString()
    widen_exact(model, {"L1": 5})
    assert model.SerializeToString() == before


def test_depthwise_conv_in_the_group():
    """Conv A (3 ch) -> depthwise 3x3 (group 3) -> pointwise C: depthwise grows with A."""
    rng = np.random.default_rng(8)
    inits = {"WA": rand(rng, 3, 2, 1, 1), "WD": rand(rng, 3, 1, 3, 3), "BD": rand(rng, 3),
             "WC": rand(rng, 2, 3, 1, 1)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A"), H("Relu", ["a"], ["ra"]),
             H("Conv", ["ra", "WD", "BD"], ["d"], name="DW", group=3, pads=[1] * 4), H("Relu", ["d"], ["rd"]),
             H("Conv", ["rd", "WC"], ["y"], name="C")]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"A": 5})
    assert attr(node(wider, "DW"), "group") == 5
    assert node_weight(wider, "DW").shape == (5, 1, 3, 3)
    assert node_weight(wider, "C").shape == (2, 5, 1, 1)


def test_value_info_is_kept_truthful():
    model = conv_sandwich(unary("Relu"))
    model = onnx.shape_inference.infer_shapes(model)
    assert len(model.graph.value_info) > 0
    wider, _ = widen_exact(model, {"L1": 5})
    onnx.checker.check_model(wider, full_check=True)
    for value in wider.graph.value_info:
        if value.name in ("t1", "t1_Relu"):
            assert value.type.tensor_type.shape.dim[1].dim_value == 5


def test_random_inputs_agree_at_several_seeds():
    model = conv_sandwich(chain(batchnorm, unary("Relu")))
    wider, _ = n2n.widen(model, {"L1": 7}, seed=11)
    for seed in range(3):
        assert_same_function(model, wider, random_feeds(model, seed=seed, batch=2))


# ----------------------------------------------------------------------------
# More coupling patterns


def se_block_model(seed=10):
    """Squeeze-excite: r * Sigmoid(S2(Relu(S1(GAP(r))))): the gate's units are r's units."""
    rng = np.random.default_rng(seed)
    inits = {"WA": rand(rng, 4, 2, 3, 3), "W1": rand(rng, 2, 4, 1, 1), "B1": rand(rng, 2),
             "W2": rand(rng, 4, 2, 1, 1), "B2": rand(rng, 4), "WC": rand(rng, 2, 4, 1, 1)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A", pads=[1] * 4), H("Relu", ["a"], ["r"]),
             H("GlobalAveragePool", ["r"], ["p"]), H("Conv", ["p", "W1", "B1"], ["s1"], name="S1"),
             H("Relu", ["s1"], ["s1r"]), H("Conv", ["s1r", "W2", "B2"], ["s2"], name="S2"),
             H("Sigmoid", ["s2"], ["gate"]), H("Mul", ["r", "gate"], ["m"]), H("Conv", ["m", "WC"], ["y"], name="C")]
    return make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)


def test_squeeze_excite_gate_joins_the_group():
    model = se_block_model()
    wider, report = widen_exact(model, {"A": 6})
    assert sorted(report["changes"][0]["layers"]) == ["A", "S2"]
    assert node_weight(wider, "S1").shape == (2, 6, 1, 1)       # consumer of the pooled units
    assert node_weight(wider, "S2").shape == (6, 2, 1, 1)       # producer of the gate's units
    assert node_weight(wider, "C").shape == (2, 6, 1, 1)
    g_a = infer_mapping(init(model, "WA"), node_weight(wider, "A"))
    g_s2 = infer_mapping(init(model, "W2"), node_weight(wider, "S2"))
    np.testing.assert_array_equal(g_a, g_s2)                    # one mapping for the whole group


def test_squeeze_excite_bottleneck():
    model = se_block_model()
    wider, _ = widen_exact(model, {"S1": 5})
    assert node_weight(wider, "S2").shape == (4, 5, 1, 1)


def test_concat_on_a_spatial_axis_couples_both_inputs():
    rng = np.random.default_rng(11)
    inits = {"WA": rand(rng, 3, 2, 3, 3), "WB": rand(rng, 3, 2, 3, 3), "WC": rand(rng, 2, 3, 3, 3)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A", pads=[1] * 4),
             H("Conv", ["x", "WB"], ["b"], name="B", pads=[1] * 4),
             H("Concat", ["a", "b"], ["cat"], axis=2), H("Relu", ["cat"], ["r"]),
             H("Conv", ["r", "WC"], ["y"], name="C")]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    wider, report = widen_exact(model, {"A": 5})
    assert sorted(report["changes"][0]["layers"]) == ["A", "B"]
    assert node_weight(wider, "B").shape == (5, 2, 3, 3)


def test_concat_of_the_same_tensor_twice_holds_the_units_twice():
    rng = np.random.default_rng(12)
    inits = {"W1": rand(rng, 3, 2, 1, 1), "W2": rand(rng, 2, 6, 1, 1)}
    nodes = [H("Conv", ["x", "W1"], ["a"], name="L1"), H("Concat", ["a", "a"], ["c"], axis=1),
             H("Conv", ["c", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L2").shape == (2, 10, 1, 1)


def test_residual_from_the_graph_input_is_refused():
    rng = np.random.default_rng(13)
    inits = {"W1": rand(rng, 2, 2, 3, 3), "W2": rand(rng, 2, 2, 1, 1)}
    nodes = [H("Conv", ["x", "W1"], ["a"], name="L1", pads=[1] * 4), H("Add", ["a", "x"], ["s"]),
             H("Conv", ["s", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)
    with pytest.raises(n2n.GrowthRefused, match="graph input 'x'"):
        n2n.widen(model, {"L1": 4})


def test_where_and_comparison_with_full_width_operands():
    def relu_by_where(t, inits, rng, c):
        inits["zeros"] = np.zeros(c, np.float32)
        return [H("Greater", [t, "zeros"], ["pos"]), H("Where", ["pos", t, "zeros"], ["w"], name="Where")], "w"
    model = dense_sandwich(relu_by_where)
    wider, _ = widen_exact(model, {"L1": 5})
    assert init(wider, node(wider, "Where").input[2]).shape == (5,)


def test_gap_squeeze_into_gemm():
    rng = np.random.default_rng(14)
    inits = {"W1": rand(rng, 3, 2, 3, 3), "WG": rand(rng, 4, 3), "axes": np.array([2, 3], np.int64)}
    nodes = [H("Conv", ["x", "W1"], ["t"], name="L1"), H("Relu", ["t"], ["r"]), H("GlobalAveragePool", ["r"], ["p"]),
             H("Squeeze", ["p", "axes"], ["flat"]), H("Gemm", ["flat", "WG"], ["y"], name="L2", transB=1)]
    model = make_model(nodes, [("x", ["N", 2, 5, 5])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L2").shape == (4, 5)


def test_resize_on_spatial_axes():
    def resize(t, inits, rng, c):
        inits["scales"] = np.array([1, 1, 2, 2], np.float32)
        return [H("Resize", [t, "", "scales"], ["up"], mode="nearest", name="Resize")], "up"
    model = conv_sandwich(resize)
    wider, _ = widen_exact(model, {"L1": 5})
    np.testing.assert_array_equal(init(wider, "scales"), [1, 1, 2, 2])


def test_instance_normalization():
    def inorm(t, inits, rng, c):
        inits.update(in_s=rng.uniform(0.5, 1.5, c).astype(np.float32), in_b=rand(rng, c))
        return [H("InstanceNormalization", [t, "in_s", "in_b"], ["n"], name="IN")], "n"
    model = conv_sandwich(inorm)
    wider, _ = widen_exact(model, {"L1": 5})
    assert init(wider, node(wider, "IN").input[1]).shape == (5,)


@pytest.mark.parametrize("bias_shape", [[3], [1, 3], [1]])
def test_gemm_alpha_beta_and_bias_shapes(bias_shape):
    rng = np.random.default_rng(15)
    inits = {"W1": rand(rng, 3, 4), "B1": rand(rng, *bias_shape), "W2": rand(rng, 2, 3)}
    nodes = [H("Gemm", ["x", "W1", "B1"], ["h"], name="L1", transB=1, alpha=0.5, beta=2.0), H("Relu", ["h"], ["r"]),
             H("Gemm", ["r", "W2"], ["y"], name="L2", transB=1, alpha=3.0)]
    model = make_model(nodes, [("x", ["N", 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L1").shape == (5, 4)
    expected = {(3,): (5,), (1, 3): (1, 5), (1,): (1,)}[tuple(bias_shape)]
    assert node_weight(wider, "L1", 2).shape == expected


def test_gemm_trans_a_consumer():
    rng = np.random.default_rng(16)
    inits = {"W1": rand(rng, 3, 4), "W2": rand(rng, 3, 2)}
    nodes = [H("Gemm", ["x", "W1"], ["h"], name="L1", transB=1), H("Relu", ["h"], ["r"]),
             H("Transpose", ["r"], ["rt"]), H("Gemm", ["rt", "W2"], ["y"], name="L2", transA=1)]
    model = make_model(nodes, [("x", [5, 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L2").shape == (5, 2)


def test_batched_matmul_weights():
    rng = np.random.default_rng(17)
    inits = {"W1": rand(rng, 2, 4, 3), "W2": rand(rng, 2, 3, 2)}
    nodes = [H("MatMul", ["x", "W1"], ["h"], name="L1"), H("Relu", ["h"], ["r"]),
             H("MatMul", ["r", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", [2, 5, 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L1").shape == (2, 4, 5) and node_weight(wider, "L2").shape == (2, 5, 2)


def test_weight_shared_by_two_layers_directly():
    """L1 and L2 read the same initializer: each gets the edit it needs."""
    rng = np.random.default_rng(18)
    inits = {"W": rand(rng, 4, 4), "W3": rand(rng, 2, 4)}
    nodes = [H("Gemm", ["x", "W"], ["h1"], name="L1", transB=1), H("Relu", ["h1"], ["r1"]),
             H("Gemm", ["r1", "W"], ["h2"], name="L2", transB=1), H("Relu", ["h2"], ["r2"]),
             H("Gemm", ["r2", "W3"], ["y"], name="L3", transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 6})
    assert node_weight(wider, "L1").shape == (6, 4)
    assert node_weight(wider, "L2").shape == (4, 6)


def test_conv_strides_dilations_auto_pad():
    rng = np.random.default_rng(19)
    inits = {"W1": rand(rng, 3, 2, 3, 3), "W2": rand(rng, 2, 3, 3, 3)}
    nodes = [H("Conv", ["x", "W1"], ["a"], name="L1", auto_pad="SAME_UPPER", strides=[2, 2]), H("Relu", ["a"], ["r"]),
             H("Conv", ["r", "W2"], ["y"], name="L2", dilations=[2, 2], pads=[2, 2, 2, 2])]
    model = make_model(nodes, [("x", ["N", 2, 7, 7])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L2").shape == (2, 5, 3, 3)


def test_conv_transpose_output_padding():
    rng = np.random.default_rng(20)
    inits = {"W1": rand(rng, 2, 3, 3, 3), "W2": rand(rng, 2, 3, 3, 3)}
    nodes = [H("ConvTranspose", ["x", "W1"], ["a"], name="L1", strides=[2, 2], output_padding=[1, 1],
               pads=[1, 1, 1, 1]),
             H("Relu", ["a"], ["r"]), H("Conv", ["r", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L1").shape == (2, 5, 3, 3)


def _concat_branches(rng, tail, x_shape=("N", 2, 3, 3), a=2, b=3, extra=None):
    inits = {"WA": rand(rng, a, 2, 1, 1), "WB": rand(rng, b, 2, 1, 1), **(extra or {})}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A"), H("Conv", ["x", "WB"], ["b"], name="B"),
             H("Concat", ["a", "b"], ["c"], axis=1), H("Relu", ["c"], ["r"])] + tail
    return make_model(nodes, [("x", list(x_shape))], ["y"], inits)


def pattern(name, rng):
    if name == "concat-flatten":
        return _concat_branches(rng, [H("Flatten", ["r"], ["f"]), H("Gemm", ["f", "WG"], ["y"], name="G", transB=1)],
                                extra={"WG": rand(rng, 4, 45)})
    if name == "concat-nhwc-flatten":
        return _concat_branches(rng, [H("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]), H("Flatten", ["t"], ["f"]),
                                      H("Gemm", ["f", "WG"], ["y"], name="G", transB=1)],
                                extra={"WG": rand(rng, 4, 45)})
    if name == "channel-shuffle":
        return _concat_branches(rng, [H("Split", ["r", "sizes"], ["p", "q"], axis=1),
                                      H("Concat", ["q", "p"], ["c2"], axis=1),
                                      H("Conv", ["c2", "WC"], ["y"], name="C")],
                                extra={"sizes": np.array([2, 3], np.int64), "WC": rand(rng, 2, 5, 1, 1)})
    if name == "depthwise-after-concat":
        return _concat_branches(rng, [H("Conv", ["r", "WD"], ["d"], name="DW", group=5, pads=[1] * 4),
                                      H("Conv", ["d", "WC"], ["y"], name="C")],
                                extra={"WD": rand(rng, 5, 1, 3, 3), "WC": rand(rng, 2, 5, 1, 1)})
    inits = {"WA": rand(rng, 3, 2, 3, 3)}
    head = [H("Conv", ["x", "WA"], ["a"], name="A", pads=[1] * 4), H("Relu", ["a"], ["r"])]
    outputs = ["y"]
    if name == "nhwc-tokens-matmul":
        inits.update(W2=rand(rng, 3, 4), shape=np.array([0, -1, 3], np.int64))
        tail = [H("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]), H("Reshape", ["t", "shape"], ["tok"]),
                H("MatMul", ["tok", "W2"], ["y"], name="M")]
    elif name == "reshape-transpose-matmul":
        inits.update(W2=rand(rng, 3, 4), shape=np.array([0, 3, -1], np.int64))
        tail = [H("Reshape", ["r", "shape"], ["rs"]), H("Transpose", ["rs"], ["t"], perm=[0, 2, 1]),
                H("MatMul", ["t", "W2"], ["y"], name="M")]
    elif name == "spatial-attention":
        inits.update(WS=rand(rng, 1, 3, 3, 3), WC=rand(rng, 2, 3, 1, 1))
        tail = [H("Conv", ["r", "WS"], ["s"], name="S", pads=[1] * 4), H("Sigmoid", ["s"], ["sg"]),
                H("Mul", ["r", "sg"], ["m"]), H("Conv", ["m", "WC"], ["y"], name="C")]
    elif name == "two-kinds-of-consumer":
        inits.update(WC=rand(rng, 2, 3, 1, 1), WG=rand(rng, 2, 27))
        tail = [H("Conv", ["r", "WC"], ["y"], name="C"), H("Flatten", ["r"], ["f"]),
                H("Gemm", ["f", "WG"], ["g"], name="G", transB=1)]
        outputs = ["y", "g"]
    elif name == "reduce-mean-spatial-keepdims0":
        inits.update(WG=rand(rng, 2, 3))
        tail = [H("ReduceMean", ["r"], ["p"], axes=[2, 3], keepdims=0),
                H("Gemm", ["p", "WG"], ["y"], name="G", transB=1)]
    elif name == "negative-pads-and-spatial-slice":
        inits.update(WC=rand(rng, 2, 3, 1, 1), pads=np.array([0, 0, -1, 0, 0, 0, 0, -1], np.int64),
                     s=np.array([1], np.int64), e=np.array([3], np.int64), ax=np.array([3], np.int64))
        tail = [H("Pad", ["r", "pads"], ["p"]), H("Slice", ["p", "s", "e", "ax"], ["sl"]),
                H("Conv", ["sl", "WC"], ["y"], name="C")]
    return make_model(head + tail, [("x", ["N", 2, 3, 3])], outputs, inits)


PATTERNS = ["concat-flatten", "concat-nhwc-flatten", "channel-shuffle", "depthwise-after-concat",
            "nhwc-tokens-matmul", "reshape-transpose-matmul", "spatial-attention", "two-kinds-of-consumer",
            "reduce-mean-spatial-keepdims0", "negative-pads-and-spatial-slice"]


@pytest.mark.parametrize("split", ["equal", "random"])
@pytest.mark.parametrize("name", PATTERNS)
def test_coupling_patterns(name, split):
    model = pattern(name, np.random.default_rng(21))
    layers = ["A", "B"] if "concat" in name or "shuffle" in name else ["A"]
    for layer in layers:
        old = node_weight(model, layer).shape[0]
        wider, report = widen_exact(model, {layer: old + 2}, split=split, seed=4)
        assert node_weight(wider, layer).shape[0] == old + 2
        assert report["changes"][0]["new_width"] == old + 2


def slice_range_model(start, end, width_c):
    """Concat(A: 4 ch, B: 3 ch) -> Relu -> Slice(start:end on channels) -> C."""
    rng = np.random.default_rng(22)
    inits = {"WA": rand(rng, 4, 2, 1, 1), "WB": rand(rng, 3, 2, 1, 1), "WC": rand(rng, 2, width_c, 1, 1),
             "s": np.array([start], np.int64), "e": np.array([end], np.int64), "ax": np.array([1], np.int64)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A"), H("Conv", ["x", "WB"], ["b"], name="B"),
             H("Concat", ["a", "b"], ["cat"], axis=1), H("Relu", ["cat"], ["r"]),
             H("Slice", ["r", "s", "e", "ax"], ["sl"], name="slice"), H("Conv", ["sl", "WC"], ["y"], name="C")]
    return make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)


def test_slice_containing_the_units_grows_its_end():
    model = slice_range_model(0, 5, 5)                 # A's 4 channels and B's first
    wider, _ = widen_exact(model, {"A": 6})
    assert int(init(wider, node(wider, "slice").input[2])[0]) == 7
    assert node_weight(wider, "C").shape == (2, 7, 1, 1)
    with pytest.raises(n2n.GrowthRefused, match="cuts through"):
        n2n.widen(model, {"B": 5})                     # B's units are cut by the slice


def test_slice_with_negative_start_keeps_counting_from_the_end():
    model = slice_range_model(-6, 100, 6)              # channels 1..6: A's last 3, all of B
    wider, _ = widen_exact(model, {"B": 5})
    assert int(init(wider, node(wider, "slice").input[1])[0]) == -8
    assert node_weight(wider, "C").shape == (2, 8, 1, 1)


# ----------------------------------------------------------------------------
# init="fresh": new units freshly initialised, zero outgoing weights


def check_fresh_rows(old, new, fan_in, axis=0):
    """Old units untouched; new ones nonzero, within PyTorch's default bound, unlike every old unit."""
    n = old.shape[axis]
    np.testing.assert_array_equal(np.take(new, range(n), axis=axis), old)
    fresh = np.take(new, range(n, new.shape[axis]), axis=axis)
    bound = 1 / np.sqrt(fan_in)
    assert np.all(fresh != 0) and np.abs(fresh).max() <= bound
    assert np.abs(fresh).max() > 0.5 * bound                       # drawn over the whole range
    for j in range(fresh.shape[axis]):
        row = np.take(fresh, j, axis=axis)
        assert all(not np.allclose(row, np.take(old, u, axis=axis)) for u in range(n))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fresh_mlp_is_exact_with_fresh_incoming_and_zero_outgoing(trans_b):
    model = dense_sandwich(unary("Relu"), c=3, trans_b=trans_b)
    wider, report = widen_exact(model, {"L1": 8}, init="fresh", seed=4)
    assert report["options"]["init"] == "fresh" and report["verification"]["max_rel"] < 1e-6
    axis = 0 if trans_b else 1
    check_fresh_rows(init(model, "W1"), node_weight(wider, "L1"), fan_in=4, axis=axis)
    check_fresh_rows(init(model, "B1"), node_weight(wider, "L1", 2), fan_in=4)
    w2 = node_weight(wider, "L2")
    consumer_axis = 1 if trans_b else 0
    np.testing.assert_array_equal(np.take(w2, range(3), axis=consumer_axis), init(model, "W2"))   # not divided
    assert not np.take(w2, range(3, 8), axis=consumer_axis).any()                               # zero outgoing


def test_fresh_matmul_add_bias_is_fresh_too():
    model = dense_sandwich(unary("Tanh"), c=3, kind="matmul")
    wider, _ = widen_exact(model, {"L1": 6}, init="fresh", seed=1)
    check_fresh_rows(init(model, "W1"), node_weight(wider, "L1"), fan_in=4, axis=1)
    check_fresh_rows(init(model, "B1"), node_weight(wider, "L1/bias"), fan_in=4)
    assert not node_weight(wider, "L2")[3:].any()


def test_fresh_cnn_with_batchnorm_copies_the_bn_parameters():
    model = conv_sandwich(chain(batchnorm, unary("Relu")))
    wider, report = widen_exact(model, {"L1": 7}, init="fresh", seed=2)
    assert report["verification"]["max_rel"] < 1e-6
    check_fresh_rows(init(model, "W1"), node_weight(wider, "L1"), fan_in=2 * 9)
    check_fresh_rows(init(model, "B1"), node_weight(wider, "L1", 2), fan_in=2 * 9)
    for port, name in enumerate(("bn_scale", "bn_bias", "bn_mean", "bn_var"), start=1):
        old, new = init(model, name), node_weight(wider, "BN", port)
        np.testing.assert_array_equal(new[:3], old)
        assert all(value in old for value in new[3:])            # a source unit's parameters and statistics
    w2 = node_weight(wider, "L2")
    np.testing.assert_array_equal(w2[:, :3], init(model, "W2"))
    assert not w2[:, 3:].any()


def test_fresh_residual_block_reads_new_units_with_fresh_weights():
    model = residual_model()
    wider, _ = widen_exact(model, {"A": 6}, init="fresh", seed=3)
    wa, wb, wc = (node_weight(wider, name) for name in "ABC")
    check_fresh_rows(init(model, "WA"), wa, fan_in=2 * 9)
    np.testing.assert_array_equal(wb[:3, :3], init(model, "WB"))
    assert not wb[:3, 3:].any()                         # old units do not read the new ones
    bound = 1 / np.sqrt(6 * 9)                          # B reads the grown stream: fan_in 6 * 3 * 3
    assert np.all(wb[3:] != 0) and np.abs(wb[3:]).max() <= bound   # new units read old and new ones
    assert not wc[:, 3:].any()


def test_fresh_is_seeded():
    model = conv_sandwich(unary("Relu"))
    first, _ = n2n.widen(model, {"L1": 6}, init="fresh", seed=7)
    again, _ = n2n.widen(model, {"L1": 6}, init="fresh", seed=7)
    other, _ = n2n.widen(model, {"L1": 6}, init="fresh", seed=8)
    assert first.SerializeToString() == again.SerializeToString()
    assert not np.allclose(node_weight(first, "L1")[3:], node_weight(other, "L1")[3:])


def test_fresh_factor_on_the_mlp_zoo_model():
    model = onnx.load(str(model_path("mlp")))
    widen_exact(model, factor=2.0, init="fresh", seed=0)


def layernorm_over_units_model(seed=0):
    """x -> Gemm L1 -> LayerNormalization over the units -> Relu -> Gemm L2 -> y."""
    rng = np.random.default_rng(seed)
    inits = {"W1": rand(rng, 3, 4), "B1": rand(rng, 4), "g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
             "b": rand(rng, 4), "W2": rand(rng, 4, 2)}
    nodes = [H("Gemm", ["x", "W1", "B1"], ["h"], name="L1"),
             H("LayerNormalization", ["h", "g", "b"], ["n"], name="LN", axis=-1), H("Relu", ["n"], ["r"]),
             H("Gemm", ["r", "W2"], ["y"], name="L2")]
    return make_model(nodes, [("x", ["N", 3])], ["y"], inits)


def test_fresh_is_refused_where_a_norm_takes_statistics_over_the_units():
    model = layernorm_over_units_model()
    widen_exact(model, {"L1": 8})                                   # Net2Net grows it (tiled copies)
    with pytest.raises(n2n.UserError, match=r"init=fresh.*LayerNormalization 'LN'.*statistics"):
        n2n.widen(model, {"L1": 8}, init="fresh")
    with pytest.raises(n2n.UserError, match="LayerNormalization"):
        n2n.widen(model, factor=2.0, init="fresh")


def test_fresh_is_refused_where_units_reach_a_sqrt():
    model = dense_sandwich(chain(unary("Relu"), unary("Sqrt")), c=3)
    widen_exact(model, {"L1": 6})
    with pytest.raises(n2n.UserError, match="Sqrt"):
        n2n.widen(model, {"L1": 6}, init="fresh")


def test_fresh_takes_no_split_or_noise():
    model = dense_sandwich(unary("Relu"), c=3)
    for kwargs in ({"split": "random"}, {"noise": 0.1}):
        with pytest.raises(n2n.UserError, match="not used by"):
            n2n.widen(model, {"L1": 6}, init="fresh", **kwargs)
