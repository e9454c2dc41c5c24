"""Review of the contraction change (6a28777): products that sum over the
units divide one side's copies, spaces in some parts of a split output.

Each test is a graph where `inspect` says ok and `widen` must be exact (or a
request that must be honoured). All failed on 6a28777:

1. a bias Add or depthwise conv before the Split that selects k (fused
   q | k | v, GPT-style c_attn with one head) had all its repeats divided;
2. a tensor on the divided side that is a graph output (keep_output_shapes);
3. AlignPass asked qkv and the depthwise conv on q for different unit counts;
4. the requests of two spaces written by one layer (q | k and v) were taken
   for one group (factor grew only one; widths for both were refused);
5. keys gathered from a constant table: nothing was divided;
6. a Gemm bias broadcast over the units on the divided side.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import H, inspected, make_model, rand, widen_exact
from test_contraction import cascaded_head

import onnx_net2net as n2n
from onnx_net2net.passes import AlignPass, WidenPass

C, SIDE = 8, 3
N = SIDE * SIDE


def _i64(*values):
    return np.array(values, np.int64)


def fused_conv_head(before_split: str, d: int = 4, seed: int = 0):
    """x -> Conv qkv (3 x d channels) -> `before_split` over all of them
    ("add": a per-channel bias, "dw": a depthwise conv with bias) -> Split in
    3 -> softmax(q^T k) -> v @ attn^T -> proj -> y: the space repeated 3x."""
    rng = np.random.default_rng(seed)
    inits = {"w": rand(rng, 3 * d, C, 1, 1), "flat": _i64(1, d, N), "map": _i64(1, d, SIDE, SIDE),
             "wp": rand(rng, 5, d, 1, 1), "sizes": _i64(d, d, d)}
    nodes = [H("Conv", ["x", "w"], ["qkv0"], name="qkv")]
    if before_split == "dw":
        inits.update(dw=rand(rng, 3 * d, 1, 3, 3), dwb=rand(rng, 3 * d))
        nodes.append(H("Conv", ["qkv0", "dw", "dwb"], ["qkv"], group=3 * d, pads=[1] * 4, name="dw_all"))
    else:
        inits.update(pb=rand(rng, 1, 3 * d, 1, 1))
        nodes.append(H("Add", ["qkv0", "pb"], ["qkv"]))
    nodes += [H("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=1),
              H("Reshape", ["q", "flat"], ["qf"]), H("Transpose", ["qf"], ["qt"], perm=[0, 2, 1]),
              H("Reshape", ["k", "flat"], ["kf"]), H("MatMul", ["qt", "kf"], ["s"], name="scores"),
              H("Softmax", ["s"], ["a"], axis=-1), H("Transpose", ["a"], ["at"], perm=[0, 2, 1]),
              H("Reshape", ["v", "flat"], ["vf"]), H("MatMul", ["vf", "at"], ["c"]),
              H("Reshape", ["c", "map"], ["cm"]), H("Conv", ["cm", "wp"], ["y"], name="proj")]
    return make_model(nodes, [("x", [1, C, SIDE, SIDE])], [("y", [1, 5, SIDE, SIDE])], inits)


def fused_single_head(d: int = 4, seed: int = 0):
    """x [2, 5, 6] -> MatMul + Add bias (q | k | v, one head each of d) -> Split -> softmax(q k^T) v -> out -> y."""
    rng = np.random.default_rng(seed)
    inits = {"w": rand(rng, 6, 3 * d), "b": rand(rng, 3 * d), "wo": rand(rng, d, 3), "sizes": _i64(d, d, d)}
    nodes = [H("MatMul", ["x", "w"], ["qkv0"], name="qkv_proj"), H("Add", ["qkv0", "b"], ["qkv"]),
             H("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1),
             H("Transpose", ["k"], ["kT"], perm=[0, 2, 1]), H("MatMul", ["q", "kT"], ["s"]),
             H("Softmax", ["s"], ["p"], axis=-1), H("MatMul", ["p", "v"], ["c"]),
             H("MatMul", ["c", "wo"], ["y"], name="out")]
    return make_model(nodes, [("x", [2, 5, 6])], [("y", [2, 5, 3])], inits)


# -- 1. a constant bias (or a depthwise conv's bias) before the Split that selects k


def test_bias_of_a_fused_single_head_projection_divides_only_k():
    """GPT-style fused c_attn with one head: the bias Add is before the Split;
    only k's third of it may be divided (dividing q's and v's changes them)."""
    model = fused_single_head()
    assert inspected(model)["qkv_proj"]["widen"]["ok"]
    widen_exact(model, {"qkv_proj": 3 * 6})


def test_per_channel_bias_before_the_split_divides_only_k():
    model = fused_conv_head("add")
    assert inspected(model)["qkv"]["widen"]["ok"]
    widen_exact(model, {"qkv": 3 * 6})


def test_depthwise_conv_before_the_split_divides_only_ks_bias():
    model = fused_conv_head("dw")
    assert inspected(model)["qkv"]["widen"]["ok"]
    widen_exact(model, {"qkv": 3 * 6})


# -- 2. a tensor on the divided side that is also a graph output (keep_output_shapes)


def _with_output(model: onnx.ModelProto, name: str, shape: list[int]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    onnx.checker.check_model(copy, full_check=True)
    return copy


def test_divided_tensor_kept_as_a_graph_output_divides_the_other_side():
    """k is a graph output: with keep_output_shapes the rewrite slices it back
    to the original channels, so its copies must keep their values (q is divided)."""
    model = _with_output(cascaded_head(), "k", [1, 4, SIDE, SIDE])
    widen_exact(model, {"qkv": 2 * 4 + 6 + 2 * 2}, keep_output_shapes=True)


# -- 3. a group seeded from two layers (qkv and the depthwise conv on q) under align


def test_align_grows_the_space_of_q_and_k_once():
    """AlignPass asks every growable layer for its aligned width: qkv (14 -> 16:
    5 units) and the depthwise conv on q (4 -> 8: 8 units) hold one space,
    which must be grown once, not refused as conflicting requests."""
    model = cascaded_head()
    result = AlignPass(8)(model)
    assert result.report["changes"]
    widths = {layer["name"]: layer["width"] for layer in n2n.inspect(result.model, trial=False)["layers"]}
    assert widths["qkv"] % 8 == 0 or widths["dw"] % 8 == 0


# -- 4. two spaces written by one layer (q | k beside v, v with a depthwise conv of its own)


def cascaded_head_with_v_conv(v_size: int = 6):
    """cascaded_head with a depthwise conv on v too: v's channels are a space
    of their own (seeded from 'dw_v'), written by the same qkv conv as q and k's."""
    model = cascaded_head(v_size)
    rng = np.random.default_rng(1)
    graph = model.graph
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[0] == "v":
            node.input[0] = "v_dw"
    at = next(i for i, node in enumerate(graph.node) if node.op_type == "Split")
    graph.node.insert(at + 1, H("Conv", ["v", "dwv_w", "dwv_b"], ["v_dw"], name="dw_v", group=v_size,
                                pads=[1, 1, 1, 1]))
    for name, value in (("dwv_w", rand(rng, v_size, 1, 3, 3)), ("dwv_b", rand(rng, v_size))):
        graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_factor_grows_both_spaces_of_one_layer():
    """Before 6a28777, factor 2 grew v's space (dw_v 6 -> 12); the q/k space
    now also grows, and must not take v's place (both have producers {qkv})."""
    model = cascaded_head_with_v_conv()
    layers = inspected(model)
    assert layers["qkv"]["widen"]["ok"] and layers["dw_v"]["widen"]["ok"]
    grown, _ = widen_exact(model, factor=2.0)
    widths = {layer["name"]: layer["width"] for layer in n2n.inspect(grown, trial=False)["layers"]}
    assert widths["dw_v"] == 12 and widths["dw"] == 8
    assert widths["qkv"] == 2 * 8 + 12


def test_widths_for_both_spaces_of_one_layer():
    """{"qkv": 18, "dw_v": 8}: qkv's width counts v's channels, which dw_v's request grows to 8,
    so q and k grow to (18 - 8) / 2 = 5 units and qkv ends as wide as asked, in either order."""
    model = cascaded_head_with_v_conv()
    for widths in ({"qkv": 18, "dw_v": 8}, {"dw_v": 8, "qkv": 18}):
        grown, _ = widen_exact(model, widths)
        grown_widths = {layer["name"]: layer["width"] for layer in n2n.inspect(grown, trial=False)["layers"]}
        assert grown_widths["dw"] == 5 and grown_widths["dw_v"] == 8 and grown_widths["qkv"] == 18


def test_width_the_other_request_already_reached_grows_only_v():
    """qkv 16 = q and k's 4 units each + v's 8: dw_v's request alone makes it so."""
    model = cascaded_head_with_v_conv()
    grown, _ = widen_exact(model, {"qkv": 16, "dw_v": 8})
    widths = {layer["name"]: layer["width"] for layer in n2n.inspect(grown, trial=False)["layers"]}
    assert widths["dw"] == 4 and widths["dw_v"] == 8 and widths["qkv"] == 16


def test_width_that_v_growth_leaves_odd_is_refused_naming_the_layer():
    """qkv 18 is valid alone (q and k 6 units each beside v's 6), but with v grown to 9 q and k
    would need 4.5 units each: refused before anything is written, naming qkv."""
    model = cascaded_head_with_v_conv()
    with pytest.raises(n2n.UserError, match="layer 'qkv': width 18 cannot hold"):
        n2n.widen(model, {"qkv": 18, "dw_v": 9})


def test_factor_pass_on_q_k_and_v_spaces_is_exact():
    model = cascaded_head_with_v_conv()
    result = WidenPass(factor=1.5)(model)
    from helpers import assert_same_function
    assert_same_function(model, result.model)


# -- 5. the divided side gathered from a constant table (learned key embeddings)


def gathered_keys(seed: int = 0):
    """q = x Wq; k = E[ids] (a constant table gathered by run-time indices): scores q k^T."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    inits = {"wq": rand(rng, 6, 4), "E": rand(rng, 7, 4), "wv": rand(rng, 6, 6), "wo": rand(rng, 6, 3)}
    nodes = [H("MatMul", ["x", "wq"], ["q"], name="q_proj"), H("Gather", ["E", "ids"], ["k"], axis=0, name="emb"),
             H("Transpose", ["k"], ["kT"], perm=[0, 2, 1]), H("MatMul", ["q", "kT"], ["s"]),
             H("Softmax", ["s"], ["p"], axis=-1), H("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             H("MatMul", ["p", "v"], ["c"]), H("MatMul", ["c", "wo"], ["y"], name="out")]
    inputs = [("x", [2, 5, 6]), helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])]
    return make_model(nodes, inputs, [("y", [2, 5, 3])], inits)


def test_keys_gathered_from_a_table_divide_the_tables_copies():
    """The table is the Gather's input 0: its copied columns must be divided
    (before: nothing was divided and the scores doubled for copied units)."""
    from helpers import max_rel_error

    model = gathered_keys()
    entry = inspected(model)["q_proj"]["widen"]
    if not entry["ok"]:
        return  # refusing is exact too
    wider, _ = n2n.widen(model, {"q_proj": 6}, verify=False)  # its own random ids overrun the table
    assert max_rel_error(model, wider) <= 1e-5


# -- 6. a Gemm producing the divided side with a bias broadcast over the units


def gemm_keys(bias_shape: tuple, seed: int = 0):
    """q = Gemm(x, Wq); k = Gemm(x, Wk, C) with C of `bias_shape`; y = q k^T (the raw scores)."""
    rng = np.random.default_rng(seed)
    bias = rand(rng, *bias_shape) if bias_shape else np.array(0.7, np.float32)
    inits = {"wq": rand(rng, 6, 4), "wk": rand(rng, 6, 4), "ck": bias}
    nodes = [H("Gemm", ["x", "wq"], ["q"], name="q_proj"), H("Gemm", ["x", "wk", "ck"], ["k"], name="k_proj"),
             H("Transpose", ["k"], ["kT"], perm=[1, 0]), H("MatMul", ["q", "kT"], ["y"], name="scores")]
    return make_model(nodes, [("x", [5, 6])], [("y", [5, 5])], inits)



@pytest.mark.parametrize("bias_shape", [(), (1,), (5, 1)])
def test_a_gemm_bias_broadcast_over_the_units_is_not_divided_by_dividing_the_weight(bias_shape):
    """k = x Wk + c with c the same for every unit: dividing Wk's copied columns leaves
    c whole in every copy, so q k^T counts c once per copy (refuse, or divide q)."""
    model = gemm_keys(bias_shape)
    if inspected(model)["q_proj"]["widen"]["ok"]:
        widen_exact(model, {"q_proj": 6})


@pytest.mark.parametrize("bias_shape", [(4,), (1, 4)])
def test_a_gemm_bias_per_unit_is_divided(bias_shape):
    widen_exact(gemm_keys(bias_shape), {"q_proj": 6})
