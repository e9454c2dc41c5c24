"""Attention built with onnx.helper in the layouts exporters write: separate
or fused Q/K/V projections, split by Split (explicit sizes or num_outputs) or
by a reshape to [3, heads, head size] as timm does. Widening adds whole heads;
a fused projection repeats the head space three times."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import onnx_net2net as n2n
from onnx_net2net.ir import GraphIR
from onnx_net2net import analysis, io

from helpers import H, init, make_model, node, rand, widen_exact

B, T, HEADS, HEAD = 2, 4, 2, 4
D = HEADS * HEAD
QKV = "qkv"


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _attention_core(q, k, v, nodes, inits):
    """softmax(q k^T / sqrt(d)) v on [B, heads, T, d] tensors, then the output projection."""
    nodes += [
        H("Transpose", [k], ["kT"], perm=[0, 1, 3, 2]),
        H("MatMul", [q, "kT"], ["scores"]),
        H("Mul", ["scores", "scale"], ["scaled"]),
        H("Softmax", ["scaled"], ["probs"], axis=-1),
        H("MatMul", ["probs", v], ["context"]),
        H("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        H("Reshape", ["context_t", "merge_shape"], ["merged"]),
        H("MatMul", ["merged", "w_out"], ["projected"], name="out"),
        H("Add", ["projected", "b_out"], ["y"]),
    ]
    inits.update(scale=np.array(1 / np.sqrt(HEAD), np.float32), merge_shape=_i64(0, 0, D))


def _heads(piece: str, nodes, inits) -> str:
    nodes += [H("Reshape", [piece, "head_shape"], [f"{piece}_h"]),
              H("Transpose", [f"{piece}_h"], [f"{piece}_t"], perm=[0, 2, 1, 3])]
    inits["head_shape"] = _i64(0, 0, HEADS, HEAD)
    return f"{piece}_t"


def fused_attention(style: str, seed: int = 0):
    """x [B, T, D] -> one fused Q/K/V MatMul (+ bias) -> attention -> y [B, T, D]."""
    rng = np.random.default_rng(seed)
    inits = {"w_qkv": rand(rng, D, 3 * D), "b_qkv": rand(rng, 3 * D), "w_out": rand(rng, D, D), "b_out": rand(rng, D)}
    nodes = [H("MatMul", ["x", "w_qkv"], ["qkv_mm"], name=QKV), H("Add", ["qkv_mm", "b_qkv"], ["qkv_out"])]
    opset = 17
    if style == "slices":
        big = np.iinfo(np.int64).max
        inits.update(axis2=_i64(2), **{f"start_{p}": _i64(i * D) for i, p in enumerate("qkv")},
                     end_q=_i64(D), end_k=_i64(2 * D), end_v=_i64(big))
        nodes += [H("Slice", ["qkv_out", f"start_{p}", f"end_{p}", "axis2"], [p]) for p in "qkv"]
        q, k, v = (_heads(p, nodes, inits) for p in ("q", "k", "v"))
    elif style in ("split-sizes", "split-even"):
        if style == "split-sizes":
            inits["sizes"] = _i64(D, D, D)
            nodes.append(H("Split", ["qkv_out", "sizes"], ["q", "k", "v"], axis=2))
        else:
            opset = 18
            nodes.append(H("Split", ["qkv_out"], ["q", "k", "v"], axis=2, num_outputs=3))
        q, k, v = (_heads(p, nodes, inits) for p in ("q", "k", "v"))
    else:  # timm: [B, T, 3, heads, d] -> [3, B, heads, T, d] -> unbind(0)
        inits["qkv_shape"] = _i64(0, 0, 3, HEADS, HEAD)
        nodes += [H("Reshape", ["qkv_out", "qkv_shape"], ["qkv5"]),
                  H("Transpose", ["qkv5"], ["qkv_t"], perm=[2, 0, 3, 1, 4])]
        if style == "timm-split":
            inits["ones"], inits["axis0"] = _i64(1, 1, 1), _i64(0)
            nodes.append(H("Split", ["qkv_t", "ones"], ["q1", "k1", "v1"], axis=0))
            nodes += [H("Squeeze", [f"{p}1", "axis0"], [p]) for p in "qkv"]
        else:
            for number, p in enumerate("qkv"):
                inits[f"index_{p}"] = np.array(number, np.int64)
                nodes.append(H("Gather", ["qkv_t", f"index_{p}"], [p], axis=0))
        q, k, v = "q", "k", "v"
    _attention_core(q, k, v, nodes, inits)
    return make_model(nodes, [("x", [B, T, D])], [("y", [B, T, D])], inits, opset=opset)


STYLES = ["split-sizes", "split-even", "slices", "timm-split", "timm-gather"]


@pytest.mark.parametrize("style", STYLES)
def test_fused_qkv_is_one_head_space_repeated_three_times(style):
    model = fused_attention(style)
    layer = {l["name"]: l for l in n2n.inspect(model, trial=False)["layers"]}[QKV]
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    assert layer["width"] == 3 * D
    assert layer["widen"]["step"] == 3 * HEAD  # one head more in each of q, k and v
    group = analysis.find_group(GraphIR(io.ModelHandle(proto=model)), 0)
    assert (group.size, group.unit_width, group.repeats) == (HEADS, HEAD, 3)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("split", ["equal", "random"])
def test_widen_fused_qkv_by_whole_heads_is_exact(style, split):
    model = fused_attention(style)
    grown, _ = widen_exact(model, {QKV: 3 * D + 2 * 3 * HEAD}, split=split, seed=1)
    heads = HEADS + 2
    w, w_qkv = init(grown, node(grown, QKV).input[1]), init(model, "w_qkv")
    assert w.shape == (D, 3 * heads * HEAD) and init(grown, "w_out").shape == (heads * HEAD, D)
    # Each third (q, k, v) keeps its old heads first, in order.
    for third in range(3):
        np.testing.assert_array_equal(w[:, third * heads * HEAD:][:, :D], w_qkv[:, third * D:(third + 1) * D])
    if style == "split-sizes":
        np.testing.assert_array_equal(init(grown, "sizes"), [heads * HEAD] * 3)
    if style == "slices":
        starts = [init(grown, node.input[1])[0] for node in grown.graph.node if node.op_type == "Slice"]
        assert starts == [0, heads * HEAD, 2 * heads * HEAD]
    if style.startswith("timm"):
        np.testing.assert_array_equal(init(grown, "qkv_shape"), [0, 0, 3, heads, HEAD])
    else:
        np.testing.assert_array_equal(init(grown, "head_shape"), [0, 0, heads, HEAD])


def test_widen_fused_qkv_refuses_partial_heads():
    with pytest.raises(n2n.UserError, match=f"multiple of {3 * HEAD}"):
        n2n.widen(fused_attention("split-sizes"), {QKV: 3 * D + 3})


def test_even_split_with_the_units_in_one_output_gets_explicit_sizes():
    rng = np.random.default_rng(0)
    inits = {"w": rand(rng, D, D), "w2": rand(rng, D, 2)}
    nodes = [H("MatMul", ["x", "w"], ["h"], name="layer"), H("Concat", ["h", "x"], ["hx"], axis=1),
             H("Split", ["hx"], ["a", "b"], axis=1, num_outputs=2), H("MatMul", ["a", "w2"], ["y"]),
             H("Identity", ["b"], ["z"])]
    model = make_model(nodes, [("x", [B, D])], [("y", [B, 2]), ("z", [B, D])], inits, opset=18)
    wider, _ = widen_exact(model, {"layer": D + 2})
    split = next(n for n in wider.graph.node if n.op_type == "Split")
    assert len(split.input) == 2 and not any(a.name == "num_outputs" for a in split.attribute)
    onnx.checker.check_model(wider, full_check=True)


def _flatten_by_gather(indices: np.ndarray):
    """Conv -> ReduceMean -> Reshape [-1] -> Gather(indices) -> Reshape -> Gemm:
    the `as_strided` pattern the dynamo exporter writes."""
    rng = np.random.default_rng(0)
    channels = 4
    inits = {"w": rand(rng, channels, 2, 3, 3), "axes": _i64(2, 3), "flat": _i64(-1), "indices": indices,
             "rows": _i64(1, channels), "fc": rand(rng, channels, 3)}
    nodes = [H("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             H("ReduceMean", ["c", "axes"], ["m"], keepdims=1), H("Reshape", ["m", "flat"], ["v"]),
             H("Gather", ["v", "indices"], ["g"], axis=0), H("Reshape", ["g", "rows"], ["r"]),
             H("Gemm", ["r", "fc"], ["y"])]
    return make_model(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 3])], inits, opset=18)


def test_gather_of_every_position_in_order_moves_the_units():
    model = _flatten_by_gather(np.arange(4, dtype=np.int64).reshape(1, 4, 1, 1))
    grown, _ = widen_exact(model, {"conv": 7}, split="random")
    assert init(grown, "w").shape == (7, 2, 3, 3)
    gather = next(n for n in grown.graph.node if n.op_type == "Gather")
    np.testing.assert_array_equal(init(grown, gather.input[1]).ravel()[:4], np.arange(4))
    assert init(grown, gather.input[1]).shape == (1, 7, 1, 1)


@pytest.mark.parametrize("indices", [np.array([1, 0, 2, 3]), np.array([0, 1, 2, 2])])
def test_gather_that_reorders_or_repeats_units_is_refused(indices):
    model = _flatten_by_gather(indices.astype(np.int64).reshape(1, 4, 1, 1))
    layer = {l["name"]: l for l in n2n.inspect(model, trial=False)["layers"]}["conv"]
    assert not layer["widen"]["ok"] and "gathers along the unit axis" in layer["widen"]["reason"]


def test_noise_never_touches_integer_indices():
    model = _flatten_by_gather(np.arange(4, dtype=np.int64).reshape(1, 4, 1, 1))
    grown, _ = n2n.widen(model, {"conv": 7}, noise=0.5, verify=False)
    gather = next(n for n in grown.graph.node if n.op_type == "Gather")
    indices = init(grown, gather.input[1])
    assert indices.dtype == np.int64 and set(indices.ravel()) <= set(range(7))


def test_inspect_explains_the_step_of_a_fused_projection():
    layer = {l["name"]: l for l in n2n.inspect(fused_attention("split-sizes"), trial=False)["layers"]}[QKV]
    assert "whole attention heads of 4" in layer["widen"]["note"] and "repeat 3x" in layer["widen"]["note"]
