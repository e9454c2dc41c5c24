"""torch.nn.MultiheadAttention as the TorchScript exporter writes it with a
dynamic batch: the packed in_proj [E, 3E] is unflattened to [T, B, 3, E] by a
target read at run time (`Shape(p)[0:Mod(2, 3)]`, which ONNX shape inference
cannot follow), then q, k, v are viewed as [T, B*heads, head size] (the heads
merged with a batch of unknown size), transposed, and split back into
[B, heads, T, head size] for the attention. The heads grow whole (step 3 x
head size): the merged entry B*heads of each view becomes -1."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_net2net as n2n

from helpers import H, inspected_layer, make_model, rand, random_feeds, run, widen_exact

T, E, HEADS = 5, 8, 2
HEAD = E // HEADS


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _size(name: str, axis: int) -> list:
    """Shape(x)[axis] as a one-element vector (Gather + Unsqueeze)."""
    return [H("Gather", [f"{name}_shape", f"axis{axis}"], [f"{name}_d{axis}"], axis=0),
            H("Unsqueeze", [f"{name}_d{axis}", "zero"], [f"{name}_d{axis}v"])]


def _unflatten(nodes: list) -> None:
    """p [T, B, 3E] -> [T, B, 3, E] with the target read at run time."""
    nodes += [H("Shape", ["p"], ["p_shape"]), H("Mod", ["two", "three"], ["mod"]),
              H("Reshape", ["mod", "one_v"], ["mod_v"]), H("Slice", ["p_shape", "zero", "mod_v"], ["lead"]),
              H("Add", ["mod", "one_v"], ["after"]), H("Slice", ["p_shape", "after", "big"], ["rest"]),
              H("Concat", ["lead", "three", "x_d2v", "rest"], ["unflat"], axis=0),
              H("Reshape", ["p", "unflat"], ["p5"]), H("Unsqueeze", ["p5", "zero"], ["p6"]),
              H("Transpose", ["p6"], ["p7"], perm=[3, 1, 2, 0, 4]), H("Squeeze", ["p7", "three"], ["packed"])]


def legacy_attention(between=None, merged_products: bool = False):
    """x [T, B, E] -> in_proj -> attention (heads merged with the batch, then
    split out) -> out_proj -> + x -> head -> y. `between(nodes, inits)` may
    add ops on q viewed as [B*heads, T, head size] ('qh' -> 'qh2').
    `merged_products`: the attention products run on [B*heads, T, head size]
    (need_weights=True), the context goes back by [T, B*heads, head size] ->
    [T*B, E]."""
    rng = np.random.default_rng(0)
    inits = {"w_in": rand(rng, E, 3 * E), "b_in": rand(rng, 3 * E), "w_out": rand(rng, E, E), "b_out": rand(rng, E),
             "w_head": rand(rng, E, 3), "zero": _i64(0), "one_v": _i64(1), "two": _i64(2), "three": _i64(3),
             "big": _i64(2**62), "heads": np.array(HEADS, np.int64), "heads_v": _i64(HEADS),
             "scale": np.array(1 / np.sqrt(HEAD), np.float32)}
    inits.update({f"axis{a}": np.array(a, np.int64) for a in range(3)})
    nodes = [H("MatMul", ["x", "w_in"], ["p0"], name="in_proj"), H("Add", ["p0", "b_in"], ["p"]),
             H("Shape", ["x"], ["x_shape"])] + _size("x", 0) + _size("x", 1) + _size("x", 2)
    _unflatten(nodes)
    nodes += [H("Mul", ["x_d1", "heads"], ["bh"]), H("Unsqueeze", ["bh", "zero"], ["bh_v"]),
              H("Div", ["x_d2", "heads"], ["hd"]), H("Unsqueeze", ["hd", "zero"], ["hd_v"]),
              H("Concat", ["x_d0v", "bh_v", "hd_v"], ["merged_heads"], axis=0),
              H("Concat", ["x_d1v", "heads_v", "x_d0v", "hd_v"], ["split_heads"], axis=0)]
    for i, name in enumerate("qkv"):
        nodes += [H("Gather", ["packed", f"axis{i}"], [name], axis=0),
                  H("Reshape", [name, "merged_heads"], [f"{name}3"]),
                  H("Transpose", [f"{name}3"], [f"{name}h"], perm=[1, 0, 2])]
    q = "qh"
    if between is not None:
        between(nodes, inits)
        q = "qh2"
    if merged_products:
        nodes += [H("Mul", [q, "scale"], ["qs"]), H("Transpose", ["kh"], ["kT"], perm=[0, 2, 1]),
                  H("MatMul", ["qs", "kT"], ["scores"]), H("Softmax", ["scores"], ["probs"], axis=-1),
                  H("MatMul", ["probs", "vh"], ["context"]),
                  H("Transpose", ["context"], ["context_t"], perm=[1, 0, 2])]
    else:
        nodes += [H("Reshape", [q, "split_heads"], ["q4"]), H("Reshape", ["kh", "split_heads"], ["k4"]),
                  H("Reshape", ["vh", "split_heads"], ["v4"]), H("Transpose", ["k4"], ["kT"], perm=[0, 1, 3, 2]),
                  H("MatMul", ["q4", "kT"], ["scores"]), H("Mul", ["scores", "scale"], ["scaled"]),
                  H("Softmax", ["scaled"], ["probs"], axis=-1), H("MatMul", ["probs", "v4"], ["context"]),
                  H("Transpose", ["context"], ["context_t"], perm=[2, 0, 1, 3])]
    nodes += [
              H("Mul", ["x_d0", "x_d1"], ["tb"]), H("Unsqueeze", ["tb", "zero"], ["tb_v"]),
              H("Concat", ["tb_v", "x_d2v"], ["merge"], axis=0), H("Reshape", ["context_t", "merge"], ["merged"]),
              H("Gemm", ["merged", "w_out", "b_out"], ["attn2"], name="out_proj"),
              H("Concat", ["x_d0v", "x_d1v", "x_d2v"], ["back"], axis=0), H("Reshape", ["attn2", "back"], ["attn"]),
              H("Add", ["x", "attn"], ["resid"]), H("MatMul", ["resid", "w_head"], ["y"], name="head")]
    return make_model(nodes, [("x", [T, "B", E])], ["y"], inits)


@pytest.mark.parametrize("heads, merged_products", [(3, False), (4, False), (3, True)])
def test_heads_merged_with_a_dynamic_batch_grow_whole(heads, merged_products):
    model = legacy_attention(merged_products=merged_products)
    layer = inspected_layer(model, "in_proj")
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    assert layer["widen"]["step"] == 3 * HEAD
    grown, _ = widen_exact(model, {"in_proj": 3 * heads * HEAD})
    for batch in (1, 4):  # the merged entry is inferred (-1): any batch
        feeds = random_feeds(model, batch=batch)
        np.testing.assert_allclose(run(model, feeds)[0], run(grown, feeds)[0], rtol=1e-5, atol=1e-5)


def separate_projection(mix_batch: bool):
    """x [T, B, E] -> q_proj -> view [T, B*heads, head size] -> transpose ->
    Relu (or minus its mean over the merged batch axis) -> transpose -> view
    [T, B, E] -> out -> y."""
    rng = np.random.default_rng(1)
    inits = {"wq": rand(rng, E, E), "wo": rand(rng, E, 3), "zero": _i64(0), "heads": np.array(HEADS, np.int64)}
    inits.update({f"axis{a}": np.array(a, np.int64) for a in range(3)})
    nodes = [H("MatMul", ["x", "wq"], ["q"], name="q_proj"), H("Shape", ["x"], ["x_shape"])]
    nodes += _size("x", 0) + _size("x", 1) + _size("x", 2)
    nodes += [H("Mul", ["x_d1", "heads"], ["bh"]), H("Unsqueeze", ["bh", "zero"], ["bh_v"]),
              H("Div", ["x_d2", "heads"], ["hd"]), H("Unsqueeze", ["hd", "zero"], ["hd_v"]),
              H("Concat", ["x_d0v", "bh_v", "hd_v"], ["merged_heads"], axis=0),
              H("Reshape", ["q", "merged_heads"], ["q3"]), H("Transpose", ["q3"], ["qh"], perm=[1, 0, 2])]
    if mix_batch:
        nodes += [H("ReduceMean", ["qh"], ["qmean"], axes=[0], keepdims=1), H("Sub", ["qh", "qmean"], ["qa"])]
    else:
        nodes += [H("Relu", ["qh"], ["qa"])]
    nodes += [H("Transpose", ["qa"], ["qt"], perm=[1, 0, 2]),
              H("Concat", ["x_d0v", "x_d1v", "x_d2v"], ["back"], axis=0), H("Reshape", ["qt", "back"], ["qb"]),
              H("MatMul", ["qb", "wo"], ["y"], name="out")]
    return make_model(nodes, [("x", [T, "B", E])], ["y"], inits)


def test_a_separate_projection_merged_with_the_batch_grows_whole_heads():
    model = separate_projection(mix_batch=False)
    assert inspected_layer(model, "q_proj")["widen"]["step"] == HEAD
    widen_exact(model, {"q_proj": 3 * HEAD})


def test_an_op_mixing_the_merged_batch_axis_is_refused():
    reason = inspected_layer(separate_projection(mix_batch=True), "q_proj")["widen"]["reason"]
    assert "ReduceMean" in reason and "merged with a batch of unknown size" in reason


def test_units_merged_with_an_unknown_batch_map_both_ways():
    from onnx_net2net.analysis import Placement, map_through_reshape

    heads = Placement(axis=2, rank=3, length=E, inner=HEAD)  # [T, B, E]: whole heads
    merged, _ = map_through_reshape(heads, (T, None, E), (T, None, HEAD))
    assert merged == Placement(axis=1, rank=3, length=HEADS, inner=1, batch=True)
    assert map_through_reshape(merged, (T, None, HEAD), (T, None, E))[0] == heads
    split, _ = map_through_reshape(merged.on_axis(0, 3), (None, T, HEAD), (None, HEADS, T, HEAD))
    assert split == Placement(axis=1, rank=4, length=HEADS)
    assert map_through_reshape(split, (None, HEADS, T, HEAD), (None, T, HEAD))[0] == merged.on_axis(0, 3)
    flat, _ = map_through_reshape(merged, (T, None, HEAD), (None, E))
    assert flat == Placement(axis=1, rank=2, length=E, inner=HEAD)
    assert map_through_reshape(flat, (None, E), (T, None, HEAD))[0] == merged
    features = Placement(axis=2, rank=3, length=E)  # one unit per feature: a head is split across units
    refused = map_through_reshape(features, (T, None, E), (T, None, HEAD))[1]
    assert refused.retry == ((HEAD, 1),)


def test_shapes_past_a_target_shape_inference_cannot_follow_are_computed():
    from onnx_net2net.analysis.refined_shapes import refined_shape
    from onnx_net2net.io import from_proto
    from onnx_net2net.ir import GraphIR

    ir = GraphIR(from_proto(legacy_attention()))
    assert ir.shape("p5") is None and ir.shape("packed") is None  # ONNX's inference stops at the unflatten
    assert refined_shape(ir, "p5") == (T, None, 3, E)
    assert refined_shape(ir, "packed") == (3, T, None, E)
    assert refined_shape(ir, "qh") == (None, T, HEAD)


def _hidden_pairs(mix_rows: bool):
    """x [T, B, 3] -> fc1 [T, B, 4] -> viewed as [T*B*2, 2], the 2 read at run
    time from an op no size algebra follows (ArgMax), so both dims of the view
    are unknown, as they are for [T, B*4] -> Softmax over axis 0 (or Relu) ->
    back to [T, B, 4] -> fc2."""
    rng = np.random.default_rng(3)
    inits = {"w1": rand(rng, 3, 4), "w2": rand(rng, 4, 2), "pick": np.array([0, 0, 1], np.float32),
             "a0": np.array(0, np.int64), "a1": np.array(1, np.int64), "zero": _i64(0)}
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Shape", ["h"], ["hs"]),
             H("Gather", ["hs", "a0"], ["d0"], axis=0), H("Gather", ["hs", "a1"], ["d1"], axis=0),
             H("ArgMax", ["pick"], ["two"], axis=0, keepdims=1), H("Mul", ["d0", "d1"], ["tb"]),
             H("Unsqueeze", ["tb", "zero"], ["tbv"]), H("Mul", ["tbv", "two"], ["rows"]),
             H("Concat", ["rows", "two"], ["t"], axis=0), H("Reshape", ["h", "t"], ["f"]),
             H("Softmax", ["f"], ["r"], axis=0) if mix_rows else H("Relu", ["f"], ["r"]),
             H("Reshape", ["r", "hs"], ["g"]), H("MatMul", ["g", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", [T, "B", 3])], ["y"], inits)


def test_a_view_with_unknown_leading_dims_is_not_taken_for_a_batch_merge():
    # [?, ?, 4] -> [?, ?] was read as [T, B, 4] -> [T, B*4]; here it is
    # [T*B*2, 2], and a Softmax over axis 0 mixes the units: widen verified
    # and failed (exit 1) instead of refusing.
    from onnx_net2net.analysis import Placement, map_through_reshape

    units = Placement(axis=2, rank=3, length=4)
    assert map_through_reshape(units, (None, None, 4), (None, None))[0] is None
    assert map_through_reshape(units, (T, None, 4), (T, None))[0] == Placement(axis=1, rank=2, length=4, batch=True)
    assert not inspected_layer(_hidden_pairs(mix_rows=True), "fc1")["widen"]["ok"]
    with pytest.raises(n2n.GrowthRefused):
        n2n.widen(_hidden_pairs(mix_rows=True), {"fc1": 8})


def test_a_refined_shape_does_not_depend_on_which_tensor_was_asked_first():
    # A question past MAX_DEPTH from the unknown dims kept its cut-short
    # answer for every tensor on the way: asked next, a tensor 12 nodes from
    # the reshape stayed unknown, though asked first it is computed.
    from onnx_net2net import io
    from onnx_net2net.analysis.refined_shapes import MAX_DEPTH, refined_shape
    from onnx_net2net.ir import GraphIR

    inits = {"zero": _i64(0), "two": _i64(2), "three": _i64(3), "tail": _i64(1)}
    nodes = [H("Shape", ["x"], ["s"]), H("Mod", ["two", "three"], ["m"]), H("Slice", ["s", "zero", "m"], ["lead"]),
             H("Concat", ["lead", "tail"], ["t"], axis=0), H("Reshape", ["x", "t"], ["r0"])]
    chain = MAX_DEPTH + 12
    nodes += [H("Relu", [f"r{k}"], [f"r{k + 1}"]) for k in range(chain)]
    model = make_model(nodes, [("x", [2, 4, 1])], [(f"r{chain}", [None, None, None])], inits, check=False)
    assert refined_shape(GraphIR(io.from_proto(model)), "r12") == (2, 4, 1)
    ir = GraphIR(io.from_proto(model))
    refined_shape(ir, f"r{chain}")
    assert refined_shape(ir, "r12") == (2, 4, 1)
