"""Net2DeeperNet: every construction and activation family on tiny graphs,
conv identity kernels, and insertions in awkward places."""

import numpy as np
import onnx
import pytest

import onnx_net2net as n2n
from onnx_net2net.io import from_proto
from helpers import (H, assert_same_function, attr, chain, clip, conv_sandwich, deepen_exact, dense_sandwich,
                     erf_gelu, init, make_model, max_rel_error, model_path, node, node_weight, rand, random_feeds,
                     run_intermediates, silu, unary, widen_exact)

ACTIVATIONS = {
    "none": (None, 17),
    "Relu": (unary("Relu"), 17),
    "Clip": (clip, 17),
    "LeakyRelu": (unary("LeakyRelu", alpha=0.2), 17),
    "Sigmoid": (unary("Sigmoid"), 17),
    "Tanh": (unary("Tanh"), 17),
    "Gelu": (unary("Gelu"), 20),
    "Erf-GELU": (erf_gelu, 17),
    "SiLU": (silu, 17),
    "Elu": (unary("Elu"), 17),
    "Softplus": (unary("Softplus"), 17),
    "HardSwish": (unary("HardSwish"), 17),
}
IDEMPOTENT = {"none", "Relu", "Clip", "Erf-GELU"}   # Erf-GELU: L1's output has two readers, no activation followed
MODES = ["auto", "identity", "before-activation", "residual", "prelu"]


def new_nodes(before, after):
    old = {n.name for n in before.graph.node}
    return [n for n in after.graph.node if n.name not in old]


def expected_ops(mode, activation):
    if mode == "auto":
        mode = "identity" if activation in IDEMPOTENT else "prelu"
    act_ops = {"none": [], "SiLU": ["Sigmoid", "Mul"], "Erf-GELU": []}.get(activation, [activation])
    if mode == "identity":
        return mode, ["Gemm"] + act_ops
    if mode == "before-activation":
        return mode, ["Gemm"]
    if mode == "prelu":
        return mode, ["Gemm", "PRelu"]
    return mode, ["Gemm"] + (act_ops or ["Relu"]) + ["Gemm", "Add"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_dense_constructions(activation, mode):
    middle, opset = ACTIVATIONS[activation]
    model = dense_sandwich(middle, opset=opset, c=4)
    refusal = None
    if mode == "identity" and activation not in IDEMPOTENT:
        refusal = "not exact after"
    if mode == "before-activation" and activation in ("none", "Erf-GELU"):
        refusal = "needs an activation"
    if refusal:
        with pytest.raises(n2n.GrowthRefused, match=refusal):
            n2n.deepen(model, ["L1"], mode=mode)
        return
    deeper, report = deepen_exact(model, ["L1"], mode=mode)
    change = report["changes"][0]
    chosen, ops = expected_ops(mode, activation)
    assert change["mode"] == chosen
    added = new_nodes(model, deeper)
    assert sorted(n.op_type for n in added) == sorted(ops)
    assert all(n.name.startswith("L1/deeper0") for n in added)
    identity = node(deeper, "L1/deeper0")
    np.testing.assert_array_equal(init(deeper, identity.input[1]), np.eye(4, dtype=np.float32))
    np.testing.assert_array_equal(init(deeper, identity.input[2]), np.zeros(4, np.float32))
    if chosen == "prelu":
        np.testing.assert_array_equal(init(deeper, node(deeper, "L1/deeper0/prelu").input[1]), np.ones(4))
    if chosen == "residual":
        assert not init(deeper, node(deeper, "L1/deeper0/out").input[1]).any()


def test_identity_after_sigmoid_is_refused_with_reason():
    model = conv_sandwich(unary("Sigmoid"))
    with pytest.raises(n2n.GrowthRefused) as info:
        n2n.deepen(model, ["L1"], mode="identity")
    message = str(info.value)
    assert "L1" in message and "Sigmoid" in message and "not exact" in message


@pytest.mark.parametrize("mode", ["auto", "before-activation", "residual", "prelu"])
@pytest.mark.parametrize("activation", ["Relu", "Tanh", "SiLU"])
def test_conv_constructions(activation, mode):
    middle, opset = ACTIVATIONS[activation]
    model = conv_sandwich(middle, opset=opset)
    deeper, report = deepen_exact(model, ["L1"], mode=mode)
    identity = node(deeper, "L1/deeper0")
    assert identity.op_type == "Conv"
    assert node_weight(deeper, "L1/deeper0").shape == (3, 3, 3, 3)
    if report["changes"][0]["mode"] == "prelu":
        assert init(deeper, node(deeper, "L1/deeper0/prelu").input[1]).shape == (3, 1, 1)


def test_matmul_layer_gets_matmul_add():
    model = dense_sandwich(unary("Relu"), kind="matmul")
    deeper, _ = deepen_exact(model, ["L1"])
    added = new_nodes(model, deeper)
    assert sorted(n.op_type for n in added) == ["Add", "MatMul", "Relu"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b(trans_b):
    deeper, _ = deepen_exact(dense_sandwich(unary("Relu"), trans_b=trans_b), ["L1"])
    assert attr(node(deeper, "L1/deeper0"), "transB", 0) == trans_b


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel", [3, 5])
def test_conv_identity_kernel_centre(dims, kernel):
    """W[i, i, k//2, ...] = 1 (0-based): the new conv's output equals its input exactly."""
    model = conv_sandwich(unary("Relu"), dims=dims, size=6 if dims < 3 else 5, c=3)
    deeper, _ = deepen_exact(model, ["L1"], kernel=kernel)
    identity = node(deeper, "L1/deeper0")
    weight = init(deeper, identity.input[1])
    assert weight.shape == (3, 3) + (kernel,) * dims
    expected = np.zeros_like(weight)
    for c in range(3):
        expected[(c, c) + (kernel // 2,) * dims] = 1
    np.testing.assert_array_equal(weight, expected)
    assert list(attr(identity, "pads")) == [kernel // 2] * 2 * dims
    assert list(attr(identity, "kernel_shape")) == [kernel] * dims
    feeds = random_feeds(model, seed=5)
    values = run_intermediates(deeper, [identity.input[0], identity.output[0]], feeds)
    assert np.array_equal(values[identity.input[0]], values[identity.output[0]])


def test_conv_identity_default_kernel_made_odd():
    """A 2x2 stride-2 conv: the identity gets kernel 3 (odd), stride 1."""
    rng = np.random.default_rng(0)
    inits = {"W1": rand(rng, 3, 2, 2, 2), "W2": rand(rng, 2, 3, 1, 1)}
    nodes = [H("Conv", ["x", "W1"], ["t"], name="L1", strides=[2, 2]), H("Relu", ["t"], ["r"]),
             H("Conv", ["r", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 2, 6, 6])], ["y"], inits)
    deeper, _ = deepen_exact(model, ["L1"])
    identity = node(deeper, "L1/deeper0")
    assert list(attr(identity, "kernel_shape")) == [3, 3]
    assert list(attr(identity, "strides")) == [1, 1]


def test_even_kernel_option_is_refused():
    with pytest.raises(n2n.UserError, match="odd"):
        n2n.deepen(conv_sandwich(unary("Relu")), ["L1"], kernel=4)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_identity_after_depthwise_conv(multiplier):
    rng = np.random.default_rng(1)
    c = 3
    inits = {"WD": rand(rng, c * multiplier, 1, 3, 3), "BD": rand(rng, c * multiplier),
             "W2": rand(rng, 2, c * multiplier, 1, 1)}
    nodes = [H("Conv", ["x", "WD", "BD"], ["d"], name="DW", group=c, pads=[1] * 4), H("Relu", ["d"], ["r"]),
             H("Conv", ["r", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", c, 5, 5])], ["y"], inits)
    deeper, _ = deepen_exact(model, ["DW"])
    groups = check_conv_identity(deeper, "DW/deeper0", random_feeds(model))
    assert groups > 1                                  # stays depthwise/grouped like the layer
    if multiplier == 1:
        assert groups == c and init(deeper, node(deeper, "DW/deeper0").input[1]).shape == (c, 1, 3, 3)


def test_batchnorm_identity_is_exact():
    model = conv_sandwich(unary("Relu"))
    deeper, _ = deepen_exact(model, ["L1"], batchnorm=True)
    bn = node(deeper, "L1/deeper0/bn")
    eps = np.float32(attr(bn, "epsilon"))
    var = init(deeper, bn.input[4])
    assert (np.float32(var + eps) == np.float32(1)).all()
    np.testing.assert_array_equal(init(deeper, bn.input[1]), 1)
    np.testing.assert_array_equal(init(deeper, bn.input[2]), 0)
    np.testing.assert_array_equal(init(deeper, bn.input[3]), 0)
    values = run_intermediates(deeper, [bn.input[0], bn.output[0]], random_feeds(model))
    assert np.array_equal(*values.values())


def test_multiple_insertions_in_one_run():
    model = onnx.load(str(model_path("mlp")))
    deeper, report = deepen_exact(model, ["/0/Gemm", "/2/Gemm"])
    assert [c["after"] for c in report["changes"]] == ["/0/Gemm", "/2/Gemm"]
    assert {"/0/Gemm/deeper0", "/2/Gemm/deeper0"} <= {n.name for n in deeper.graph.node}


def _nodes(model):
    return [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


@pytest.mark.parametrize("name, mode", [("resnet_block", "auto"), ("cnn", "residual"), ("mlp", "prelu"),
                                        ("cnn", "before-activation")])
def test_one_pass_over_many_layers_equals_one_layer_at_a_time(name, mode):
    """A pass plans every insertion on one index and inserts them in one edit:
    the model must be the one inserting them one by one would give."""
    model = onnx.load(str(model_path(name)))
    layers = [layer["name"] for layer in n2n.inspect(model, trial=False)["layers"] if layer["deepen"]["ok"]]
    assert len(layers) >= 2
    together, report = deepen_exact(model, layers, mode=mode)
    one_by_one = model
    for layer in layers:
        one_by_one, _ = n2n.deepen(one_by_one, [layer], mode=mode, verify=False)
    assert sorted(_nodes(together)) == sorted(_nodes(one_by_one))
    for a, b in zip(sorted(together.graph.initializer, key=lambda t: t.name),
                    sorted(one_by_one.graph.initializer, key=lambda t: t.name)):
        assert a.name == b.name and np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert [c["after"] for c in report["changes"]] == layers


def test_a_refused_layer_leaves_the_model_untouched():
    """Every insertion is planned before the first is made."""
    model = dense_sandwich(unary("Relu"))
    handle = from_proto(model)
    before = handle.proto.SerializeToString()
    with pytest.raises(n2n.GrowthRefused, match="L2"):
        n2n.DeepenPass(["L1", "L2"])(handle)
    assert handle.proto.SerializeToString() == before


def test_same_layer_twice_gets_numbered_names():
    model = dense_sandwich(unary("Relu"))
    deeper, _ = deepen_exact(model, ["L1", "L1"])
    names = {n.name for n in deeper.graph.node}
    assert {"L1/deeper0", "L1/deeper1"} <= names
    again, _ = deepen_exact(deeper, ["L1"])
    assert "L1/deeper2" in {n.name for n in again.graph.node}


def test_deepen_then_widen_the_new_layer():
    model = onnx.load(str(model_path("mlp")))
    deeper, _ = deepen_exact(model, ["/0/Gemm"])
    grown, _ = widen_exact(deeper, {"/0/Gemm/deeper0": 60})
    assert node_weight(grown, "/0/Gemm/deeper0").shape == (60, 48)
    assert node_weight(grown, "/2/Gemm").shape == (32, 60)
    assert_same_function(model, grown)


def test_widen_then_deepen():
    model = onnx.load(str(model_path("cnn")))
    wider, _ = widen_exact(model, {"/0/Conv": 12})
    grown, _ = deepen_exact(wider, ["/0/Conv"])
    assert node_weight(grown, "/0/Conv/deeper0").shape == (12, 12, 3, 3)
    assert_same_function(model, grown)


def test_inside_residual_block():
    model = onnx.load(str(model_path("resnet_block")))
    for layer in ["/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/conv2/Conv"]:
        deeper, report = deepen_exact(model, [layer])
        assert report["changes"][0]["mode"] == "identity"
        assert node_weight(deeper, layer + "/deeper0").shape == (16, 16, 3, 3)


def test_before_flatten():
    model = onnx.load(str(model_path("cnn1d")))
    deeper, _ = deepen_exact(model, ["/2/Conv"])
    identity = node(deeper, "/2/Conv/deeper0")
    act = node(deeper, "/2/Conv/deeper0/act")
    flatten = [n for n in deeper.graph.node if n.op_type == "Flatten"][0]
    assert identity.input[0] == "/3/Relu_output_0"
    assert flatten.input[0] == act.output[0]


def test_after_pooling_and_before_pooling():
    rng = np.random.default_rng(2)
    inits = {"WA": rand(rng, 3, 2, 3, 3), "WB": rand(rng, 4, 3, 3, 3), "WG": rand(rng, 2, 4)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A", pads=[1] * 4), H("Relu", ["a"], ["ra"]),
             H("MaxPool", ["ra"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             H("Conv", ["p", "WB"], ["b"], name="B", pads=[1] * 4), H("Relu", ["b"], ["rb"]),
             H("GlobalAveragePool", ["rb"], ["gap"]), H("Flatten", ["gap"], ["f"]),
             H("Gemm", ["f", "WG"], ["y"], name="G", transB=1)]
    model = make_model(nodes, [("x", ["N", 2, 6, 6])], ["y"], inits)
    deeper, _ = deepen_exact(model, ["A", "B"])
    assert node(deeper, "A/deeper0").input[0] == "ra"
    assert node(deeper, "B/deeper0").input[0] == "rb"


def test_output_with_several_consumers():
    """The activation feeds two branches and a residual Add: all are rewired."""
    rng = np.random.default_rng(3)
    inits = {"WA": rand(rng, 3, 2, 3, 3), "WB": rand(rng, 3, 3, 1, 1), "WC": rand(rng, 3, 3, 3, 3)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A", pads=[1] * 4), H("Relu", ["a"], ["ra"]),
             H("Conv", ["ra", "WB"], ["b"], name="B"), H("Conv", ["ra", "WC"], ["c"], name="C", pads=[1] * 4),
             H("Add", ["b", "c"], ["bc"]), H("Add", ["bc", "ra"], ["y"])]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    deeper, _ = deepen_exact(model, ["A"])
    out = node(deeper, "A/deeper0/act").output[0]
    readers = [n.name or n.op_type for n in deeper.graph.node if out in n.input]
    assert len(readers) == 3
    assert not any("ra" in n.input for n in deeper.graph.node if n.name in ("B", "C"))


def test_conv_output_with_two_readers_gets_linear_identity():
    """The conv's own output is read twice: the identity goes right after it."""
    rng = np.random.default_rng(4)
    inits = {"WA": rand(rng, 3, 2, 3, 3), "WB": rand(rng, 3, 3, 1, 1)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A", pads=[1] * 4), H("Sigmoid", ["a"], ["s"]),
             H("Conv", ["a", "WB"], ["b"], name="B"), H("Add", ["s", "b"], ["y"])]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    deeper, report = deepen_exact(model, ["A"])
    assert report["changes"][0]["activation"] == "none"
    assert node(deeper, "A/deeper0").input[0] == "a"


def test_deepen_head_is_refused():
    with pytest.raises(n2n.GrowthRefused, match="graph output"):
        n2n.deepen(dense_sandwich(unary("Relu")), ["L2"])


def check_conv_identity(deeper, name, feeds):
    """The new conv is an identity under its own grouping and maps its input to itself exactly."""
    identity = node(deeper, name)
    weight = init(deeper, identity.input[1])
    width, per_group = weight.shape[:2]
    groups = attr(identity, "group", 1)
    assert groups * per_group == width
    centre = tuple(k // 2 for k in weight.shape[2:])
    for channel in range(width):
        assert weight[(channel, channel % per_group) + centre] == 1
    assert weight.sum() == width and np.count_nonzero(weight) == width
    values = run_intermediates(deeper, [identity.input[0], identity.output[0]], feeds)
    assert np.array_equal(values[identity.input[0]], values[identity.output[0]])
    return groups


def test_deepen_grouped_conv():
    rng = np.random.default_rng(0)
    inits = {"WG": rand(rng, 4, 2, 3, 3), "W2": rand(rng, 2, 4, 1, 1)}
    nodes = [H("Conv", ["x", "WG"], ["g"], name="G", group=2, pads=[1] * 4), H("Relu", ["g"], ["r"]),
             H("Conv", ["r", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 4, 4, 4])], ["y"], inits)
    deeper, _ = deepen_exact(model, ["G"])
    assert check_conv_identity(deeper, "G/deeper0", random_feeds(model)) in (1, 2)


def test_deepen_noise_changes_the_function_slightly():
    model = dense_sandwich(unary("Relu"), c=4)
    noisy, report = n2n.deepen(model, ["L1"], noise=0.05)
    assert report["exact"] is False
    assert 0 < max_rel_error(model, noisy) < 1.0
    weight = node_weight(noisy, "L1/deeper0")
    assert not np.array_equal(weight, np.eye(4))


def test_deepen_input_model_is_not_modified():
    model = conv_sandwich(unary("Relu"))
    before = model.SerializeToString()
    deepen_exact(model, ["L1"], mode="residual")
    assert model.SerializeToString() == before


def test_deepen_unknown_mode_is_a_user_error():
    with pytest.raises(n2n.UserError, match="mode"):
        n2n.deepen(conv_sandwich(unary("Relu")), ["L1"], mode="sideways")


def test_bias_and_batchnorm_are_stepped_over():
    """Conv -> BN -> Relu: the identity goes after the Relu, keeping BN intact."""
    from helpers import batchnorm
    model = conv_sandwich(chain(batchnorm, unary("Relu")))
    deeper, report = deepen_exact(model, ["L1"])
    assert report["changes"][0]["activation"] == "Relu"
    assert node(deeper, "L1/deeper0").input[0] == "bn_Relu"
    deeper, _ = deepen_exact(model, ["L1"], mode="before-activation")
    assert node(deeper, "L1/deeper0").input[0] == "bn"


@pytest.mark.parametrize("mode", ["auto", "residual", "prelu", "before-activation"])
def test_matmul_on_token_sequences(mode):
    rng = np.random.default_rng(5)
    inits = {"W1": rand(rng, 4, 3), "B1": rand(rng, 3), "W2": rand(rng, 3, 2)}
    nodes = [H("MatMul", ["x", "W1"], ["m"], name="L1"), H("Add", ["m", "B1"], ["a"]), H("Relu", ["a"], ["r"]),
             H("MatMul", ["r", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 5, 4])], ["y"], inits)
    deeper, _ = deepen_exact(model, ["L1"], mode=mode)
    np.testing.assert_array_equal(node_weight(deeper, "L1/deeper0"), np.eye(3, dtype=np.float32))


@pytest.mark.parametrize("mode", ["auto", "before-activation", "residual", "prelu"])
def test_after_a_prelu_activation(mode):
    rng = np.random.default_rng(6)
    inits = {"W1": rand(rng, 3, 2, 3, 3), "W2": rand(rng, 2, 3, 3, 3),
             "slope": rng.uniform(0, 0.3, (3, 1, 1)).astype(np.float32)}
    nodes = [H("Conv", ["x", "W1"], ["a"], name="L1", pads=[1] * 4), H("PRelu", ["a", "slope"], ["p"]),
             H("Conv", ["p", "W2"], ["y"], name="L2")]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    deepen_exact(model, ["L1"], mode=mode)
    with pytest.raises(n2n.GrowthRefused, match="PRelu"):
        n2n.deepen(model, ["L1"], mode="identity")


def test_activation_that_is_a_graph_output():
    """The Relu's output is also a graph output: identity after it would rename the output."""
    rng = np.random.default_rng(7)
    inits = {"W1": rand(rng, 3, 4), "W2": rand(rng, 2, 3)}
    nodes = [H("Gemm", ["x", "W1"], ["h"], name="L1", transB=1), H("Relu", ["h"], ["r"]),
             H("Gemm", ["r", "W2"], ["y"], name="L2", transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], ["y", "r"], inits)
    with pytest.raises(n2n.GrowthRefused, match="graph output"):
        n2n.deepen(model, ["L1"])
    deeper, _ = deepen_exact(model, ["L1"], mode="before-activation")
    assert [o.name for o in deeper.graph.output] == ["y", "r"]
