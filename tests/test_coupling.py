"""Unit spaces: which tensors and weights grow together, where the units sit,
and refusals that name the op and the reason."""

import numpy as np
import onnx
import pytest

import onnx_net2net as n2n
from onnx_net2net import analysis
from onnx_net2net.io import from_proto
from onnx_net2net.ir import GraphIR
from helpers import (H, attr, conv_sandwich, dense_sandwich, init, make_model, model_path, node, node_weight, rand,
                     unary, widen_exact)
from test_widen import concat_model, flatten_gemm_model, residual_model


def group_of(model, layer):
    ir = GraphIR(from_proto(model))
    return ir, analysis.find_group(ir, analysis.find_layer(ir, layer))


def names(ir, indices):
    return sorted(ir.nodes[i].name for i in indices)


# ----------------------------------------------------------------------------
# Placements


def test_conv_output_placement():
    ir, group = group_of(conv_sandwich(unary("Relu")), "L1")
    assert group.ok and group.size == 3 and group.step == 1
    p = group.placements["t1"]
    assert (p.axis, p.rank, p.length, p.offset, p.inner, p.outer) == (1, 4, 3, 0, 1, 1)
    assert set(group.placements) == {"t1", "t1_Relu"}
    assert names(ir, group.producers) == ["L1"]
    roles = sorted((ir.nodes[e.node].name, e.port, e.axis, e.role) for e in group.weight_edits)
    assert roles == [("L1", 1, 0, "copy"), ("L1", 2, 0, "copy"), ("L2", 1, 1, "split")]


def test_concat_offset():
    ir, group = group_of(concat_model(), "B")
    p = group.placements["cat"]
    assert (p.axis, p.length, p.offset, p.inner) == (1, 5, 3, 1)
    assert group.placements["sb"].offset == 0


def test_flatten_placement_is_blocks_of_hw():
    ir, group = group_of(flatten_gemm_model(), "L1")
    p = group.placements["flat"]
    assert (p.axis, p.rank, p.length, p.offset, p.inner, p.outer) == (1, 2, 27, 0, 9, 1)


def test_nhwc_flatten_placement_is_interleaved():
    def nhwc(inits):
        return [H("Transpose", ["r"], ["nhwc"], perm=[0, 2, 3, 1]), H("Flatten", ["nhwc"], ["flat"])]
    ir, group = group_of(flatten_gemm_model(reshape=nhwc), "L1")
    assert group.placements["nhwc"].axis == 3
    p = group.placements["flat"]
    assert (p.axis, p.length, p.inner, p.outer) == (1, 27, 1, 9)


def test_residual_group_has_every_producer():
    ir, group = group_of(residual_model(), "A")
    assert group.ok
    assert names(ir, group.producers) == ["A", "B"]
    assert {"a", "ra", "b", "s", "rs"} <= set(group.placements)


def test_resnet_block_stage_groups():
    model = onnx.load(str(model_path("resnet_block")))
    ir, group = group_of(model, "/stem/stem.0/Conv")
    assert names(ir, group.producers) == ["/layer1/layer1.0/conv2/Conv", "/layer1/layer1.1/conv2/Conv",
                                          "/stem/stem.0/Conv"]
    ir, group = group_of(model, "/layer2/shortcut/shortcut.0/Conv")
    assert names(ir, group.producers) == ["/layer2/conv2/Conv", "/layer2/shortcut/shortcut.0/Conv"]


def test_dense_concat_groups_are_separate():
    model = onnx.load(str(model_path("dense_concat")))
    ir, group = group_of(model, "/dense1/conv/Conv")
    assert names(ir, group.producers) == ["/dense1/conv/Conv"]
    # the dense1 units sit after the 8 stem channels in both concatenations
    assert group.placements["/dense1/Concat_output_0"].offset == 8
    assert group.placements["/dense2/Concat_output_0"].offset == 8


def test_depthwise_with_multiplier():
    """A depthwise conv with channel multiplier 2: each unit is a block of 2 filters."""
    rng = np.random.default_rng(9)
    inits = {"WA": rand(rng, 3, 2, 1, 1), "WD": rand(rng, 6, 1, 3, 3), "BD": rand(rng, 6),
             "WC": rand(rng, 2, 6, 1, 1)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A"), H("Relu", ["a"], ["ra"]),
             H("Conv", ["ra", "WD", "BD"], ["d"], name="DW", group=3, pads=[1] * 4), H("Relu", ["d"], ["rd"]),
             H("Conv", ["rd", "WC"], ["y"], name="C")]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    ir, group = group_of(model, "A")
    assert group.placements["d"].inner == 2
    wider, _ = widen_exact(model, {"A": 5})
    assert attr(node(wider, "DW"), "group") == 5
    assert node_weight(wider, "DW").shape == (10, 1, 3, 3)
    assert node_weight(wider, "C").shape == (2, 10, 1, 1)


def test_softmax_over_another_axis_is_per_unit():
    model = conv_sandwich(unary("Softmax", axis=-1))
    wider, _ = widen_exact(model, {"L1": 4})
    assert node_weight(wider, "L2").shape[1] == 4


def test_reduce_mean_over_spatial_axes_keeps_units():
    def reduce(t, inits, rng, c):
        return [H("ReduceMean", [t], ["m"], axes=[2, 3], keepdims=1, name="RM")], "m"
    model = conv_sandwich(reduce)
    wider, _ = widen_exact(model, {"L1": 4})
    assert node_weight(wider, "L2").shape[1] == 4


def test_reduce_mean_axes_input_opset18():
    def reduce(t, inits, rng, c):
        inits["axes"] = np.array([2, 3], np.int64)
        return [H("ReduceMean", [t, "axes"], ["m"], keepdims=0, name="RM"), H("Unsqueeze", ["m", "axes"], ["u"])], "u"
    model = conv_sandwich(reduce, opset=18)
    wider, _ = widen_exact(model, {"L1": 4})
    assert node_weight(wider, "L2").shape == (2, 4, 3, 3)


def test_layernorm_over_other_axis_is_per_unit():
    """LayerNormalization over the last (spatial) axis does not mix channels."""
    def ln(t, inits, rng, c):
        inits.update(ln_s=rand(rng, 5), ln_b=rand(rng, 5))
        return [H("LayerNormalization", [t, "ln_s", "ln_b"], ["n"], axis=-1, name="LN")], "n"
    model = conv_sandwich(ln)
    wider, _ = widen_exact(model, {"L1": 4})
    assert node_weight(wider, "L2").shape == (2, 4, 3, 3)
    assert init(wider, node(wider, "LN").input[1]).shape == (5,)      # over the spatial axis: unchanged


# ----------------------------------------------------------------------------
# Refusals carry reasons


def refused(model, layer, width):
    with pytest.raises(n2n.GrowthRefused) as info:
        n2n.widen(model, {layer: width})
    return str(info.value)


def test_refuse_graph_output():
    model = dense_sandwich(unary("Relu"))
    message = refused(model, "L2", 3)
    assert "graph output 'y'" in message
    ir, group = group_of(model, "L2")
    assert not group.ok and "graph output" in str(group.refusal)


def test_refuse_group_reaching_graph_output_through_ops():
    """L1's units reach a graph output after a Relu: the output shape would change."""
    model = dense_sandwich(unary("Relu"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("t1_Relu", onnx.TensorProto.FLOAT, ["N", 3]))
    assert "graph output 't1_Relu'" in refused(model, "L1", 4)


def test_refuse_softmax_over_unit_axis():
    model = conv_sandwich(unary("Softmax", axis=1))
    message = refused(model, "L1", 4)
    assert "Softmax" in message and "normalises over the unit axis" in message


def test_refuse_softmax_default_axis_dense():
    model = dense_sandwich(unary("Softmax"))
    assert "Softmax" in refused(model, "L1", 4)


def test_refuse_logsoftmax_over_unit_axis():
    model = dense_sandwich(unary("LogSoftmax", axis=1))
    assert "LogSoftmax" in refused(model, "L1", 4)


def reduce_over_units_model(op, c=3):
    """L1 (c ch) -> Relu -> <op> over the channel axis (keepdims) -> L2 (1 -> 2 ch)."""
    def reduce(t, inits, rng, c):
        if op == "ReduceSum":                  # axes is an input from opset 13
            inits["axes"] = np.array([1], np.int64)
            return [H("Relu", [t], ["r"]), H(op, ["r", "axes"], ["m"], keepdims=1, name="RM")], "m"
        return [H("Relu", [t], ["r"]), H(op, ["r"], ["m"], axes=[1], keepdims=1, name="RM")], "m"
    model = conv_sandwich(reduce, c=c)
    for t in model.graph.initializer:      # L2 now reads 1 channel
        if t.name == "W2":
            t.CopyFrom(onnx.numpy_helper.from_array(np.linspace(-1, 1, 18, dtype=np.float32).reshape(2, 1, 3, 3),
                                                    "W2"))
    return model


def test_reduce_mean_over_unit_axis_needs_whole_copies():
    """Mean over the units is kept only when every unit is copied equally (tiling)."""
    model = reduce_over_units_model("ReduceMean")
    with pytest.raises(n2n.UserError, match="multiple of 3"):
        n2n.widen(model, {"L1": 4})
    wider, _ = widen_exact(model, {"L1": 6})
    assert node_weight(wider, "L1").shape == (6, 2, 3, 3)
    np.testing.assert_array_equal(node_weight(wider, "L2"), init(model, "W2"))


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceL2", "ReduceL1", "ReduceLogSumExp", "ReduceSumSquare",
                                "ReduceMax", "ReduceMin", "ReduceProd"])
def test_reductions_over_unit_axis_refuse_or_stay_exact(op):
    """Tiling doubles a sum, a norm, a product: such growth must be refused, never wrong."""
    model = reduce_over_units_model(op)
    try:
        wider, _ = n2n.widen(model, {"L1": 6})
    except n2n.GrowthRefused as refusal:
        assert op in str(refusal) and "unit axis" in str(refusal)
        return
    except n2n.VerificationFailed as failure:
        pytest.fail(f"{op} over the units: the package produced a wrong model ({failure})")
    from helpers import assert_same_function
    assert_same_function(model, wider)


def test_softmax_over_unit_axis_even_with_tiling_is_refused():
    model = conv_sandwich(unary("Softmax", axis=1))
    for width in (4, 6):
        with pytest.raises(n2n.GrowthRefused, match="Softmax"):
            n2n.widen(model, {"L1": width})


def test_layernorm_over_units_tiles_multiples_and_averages_the_rest():
    def ln(t, inits, rng, c):
        inits.update(ln_s=rng.uniform(0.5, 1.5, c).astype(np.float32), ln_b=rand(rng, c))
        return [H("LayerNormalization", [t, "ln_s", "ln_b"], ["n"], axis=-1, epsilon=1e-3, name="LN")], "n"
    model = dense_sandwich(ln, c=3)
    wider, _ = widen_exact(model, {"L1": 9})
    np.testing.assert_array_equal(init(wider, node(wider, "LN").input[1]), np.tile(init(model, "ln_s"), 3))
    wider, _ = widen_exact(model, {"L1": 4}, split="random")  # LEMON: one extra unit carrying the mean
    assert init(wider, node(wider, "LN").input[1]).shape == (4,)
    assert attr(node(wider, "LN"), "epsilon") == pytest.approx(1e-3 * 3 / 4)


def test_refuse_unknown_op():
    def lrn(t, inits, rng, c):
        return [H("LRN", [t], ["n"], size=3, name="lrn")], "n"
    message = refused(conv_sandwich(lrn), "L1", 4)
    assert "LRN" in message and "not known" in message


def test_refuse_custom_domain_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # onnxruntime's symbolic shape inference may drop a file in the cwd
    rng = np.random.default_rng(0)
    inits = {"W1": rand(rng, 3, 4), "W2": rand(rng, 2, 3)}
    nodes = [H("Gemm", ["x", "W1"], ["t"], name="L1", transB=1),
             H("MyAct", ["t"], ["a"], name="custom", domain="com.example"),
             H("Gemm", ["a", "W2"], ["y"], name="L2", transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], [("y", ["N", 2])], inits, extra_opsets=[("com.example", 1)],
                       check=False)
    ir, group = group_of(model, "L1")
    assert not group.ok and "MyAct" in str(group.refusal)


def grouped_model():
    """L1 (4 ch) -> Relu -> grouped conv G (group 2, 4 -> 4) -> Relu -> L3."""
    rng = np.random.default_rng(0)
    inits = {"W1": rand(rng, 4, 2, 1, 1), "WG": rand(rng, 4, 2, 3, 3), "BG": rand(rng, 4), "W3": rand(rng, 2, 4, 1, 1)}
    nodes = [H("Conv", ["x", "W1"], ["a"], name="L1"), H("Relu", ["a"], ["r"]),
             H("Conv", ["r", "WG", "BG"], ["g"], name="G", group=2, pads=[1] * 4), H("Relu", ["g"], ["rg"]),
             H("Conv", ["rg", "W3"], ["y"], name="L3")]
    return make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)


def test_grouped_conv_consumer_sets_the_step():
    model = grouped_model()
    ir, group = group_of(model, "L1")
    assert group.ok and group.step == 2
    layers = {entry["name"]: entry for entry in n2n.inspect(model, trial=False)["layers"]}
    assert layers["L1"]["widen"]["step"] == 2
    wider, _ = widen_exact(model, {"L1": 6})
    assert node_weight(wider, "L1").shape == (6, 2, 1, 1)
    assert node_weight(wider, "G").shape == (4, 3, 3, 3)
    assert attr(node(wider, "G"), "group") == 2
    with pytest.raises(n2n.UserError, match="multiple of 2"):
        n2n.widen(model, {"L1": 5})


def test_grouped_conv_as_producer():
    model = grouped_model()
    wider, _ = widen_exact(model, {"G": 8})
    assert node_weight(wider, "G").shape == (8, 2, 3, 3)
    assert node_weight(wider, "G", 2).shape == (8,)
    assert node_weight(wider, "L3").shape == (2, 8, 1, 1)
    with pytest.raises(n2n.UserError, match="multiple of 2"):
        n2n.widen(model, {"G": 5})


def test_refuse_grouped_conv_over_part_of_a_concatenation():
    rng = np.random.default_rng(0)
    inits = {"WA": rand(rng, 2, 2, 1, 1), "WB": rand(rng, 2, 2, 1, 1), "WG": rand(rng, 4, 2, 3, 3),
             "W3": rand(rng, 2, 4, 1, 1)}
    nodes = [H("Conv", ["x", "WA"], ["a"], name="A"), H("Conv", ["x", "WB"], ["b"], name="B"),
             H("Concat", ["a", "b"], ["cat"], axis=1),
             H("Conv", ["cat", "WG"], ["g"], name="G", group=2, pads=[1] * 4), H("Conv", ["g", "W3"], ["y"], name="L3")]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], ["y"], inits)
    message = refused(model, "A", 4)
    assert "grouped convolution" in message and "concatenation" in message


def test_refuse_grouped_conv_transpose():
    rng = np.random.default_rng(0)
    inits = {"W1": rand(rng, 4, 2, 1, 1), "WT": rand(rng, 4, 2, 2, 2), "W3": rand(rng, 2, 4, 1, 1)}
    nodes = [H("Conv", ["x", "W1"], ["a"], name="L1"),
             H("ConvTranspose", ["a", "WT"], ["t"], name="T", group=2, strides=[2, 2]),
             H("Conv", ["t", "W3"], ["y"], name="L3")]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], ["y"], inits)
    message = refused(model, "L1", 6)
    assert "ConvTranspose" in message and "grouped transposed convolution" in message


def test_refuse_width_not_larger():
    model = dense_sandwich(unary("Relu"))
    for width in (3, 2):
        with pytest.raises(n2n.UserError, match="not larger than its width 3"):
            n2n.widen(model, {"L1": width})


def test_refuse_unknown_layer():
    with pytest.raises(n2n.UserError, match="unknown layer 'nope'.*L1"):
        n2n.widen(dense_sandwich(unary("Relu")), {"nope": 5})
    with pytest.raises(n2n.UserError, match="unknown layer"):
        n2n.deepen(dense_sandwich(unary("Relu")), ["nope"])


def test_attention_scores_grow_the_key_size():
    """(x Wq)(x Wk)^T sums over the units of q and k: they grow together, k's copies divided."""
    rng = np.random.default_rng(0)
    inits = {"Wq": rand(rng, 4, 3), "Wk": rand(rng, 4, 3)}
    nodes = [H("MatMul", ["x", "Wq"], ["q"], name="Q"), H("MatMul", ["x", "Wk"], ["k"], name="K"),
             H("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), H("MatMul", ["q", "kt"], ["y"], name="QK")]
    model = make_model(nodes, [("x", ["N", 5, 4])], ["y"], inits)
    wider, _ = widen_exact(model, {"Q": 5})
    assert node_weight(wider, "K").shape == (4, 5)


def test_refuse_a_product_of_a_tensor_with_itself():
    """(x Wq)(x Wq)^T: both sides are the same tensor, so neither can be divided."""
    rng = np.random.default_rng(0)
    nodes = [H("MatMul", ["x", "Wq"], ["q"], name="Q"), H("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
             H("MatMul", ["q", "qt"], ["y"], name="QQ")]
    model = make_model(nodes, [("x", ["N", 5, 4])], ["y"], {"Wq": rand(rng, 4, 3)})
    message = refused(model, "Q", 4)
    assert "QQ" in message and "contracts the units" in message and "also read by" in message


def test_refusals_are_reported_by_inspect():
    model = conv_sandwich(unary("Softmax", axis=1))
    report = n2n.inspect(model, trial=False)
    layer = {entry["name"]: entry for entry in report["layers"]}["L1"]
    assert layer["widen"]["ok"] is False
    assert "Softmax" in layer["widen"]["reason"] and "unit axis" in layer["widen"]["reason"]
    assert layer["widen"]["group"] == []


def test_step_of_a_plain_group_is_one():
    ir, group = group_of(onnx.load(str(model_path("cnn"))), "/4/Conv")
    assert group.ok and group.step == 1 and group.size == 16
    # the flatten after the second conv: each channel is a 4x4 block of 16 features
    assert group.placements["/8/Flatten_output_0"].inner == 16


def test_shared_constant_readers_get_their_own_copy():
    """One bias initializer read by two unrelated layers: widening one must not touch the other."""
    rng = np.random.default_rng(1)
    inits = {"W1": rand(rng, 3, 4), "W2": rand(rng, 3, 4), "b": rand(rng, 3), "W3": rand(rng, 2, 3),
             "W4": rand(rng, 2, 3)}
    nodes = [H("Gemm", ["x", "W1", "b"], ["h1"], name="L1", transB=1), H("Relu", ["h1"], ["r1"]),
             H("Gemm", ["x", "W2", "b"], ["h2"], name="L2", transB=1), H("Relu", ["h2"], ["r2"]),
             H("Gemm", ["r1", "W3"], ["y1"], name="L3", transB=1), H("Gemm", ["r2", "W4"], ["y2"], name="L4", transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], ["y1", "y2"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    assert node_weight(wider, "L1", 2).shape == (5,)
    np.testing.assert_array_equal(node_weight(wider, "L2", 2), init(model, "b"))
