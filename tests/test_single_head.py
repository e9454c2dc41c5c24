"""Attention with a single head (SegFormer's and PVT v2's first stage, small
user models): viewing q, k, v as [B, T, 1, d] splits nothing, so no reshape
shows that the features form a head; the walk is refused at q k^T, which
contracts them. Retried with the whole axis as one unit, the head grows into
several copies, exactly (each copy computes the same attention; the output
projection's rows are split). Where copies of the head cannot be told apart
from a longer head (an Unsqueeze made the head axis), the head's size grows
instead (contraction.py)."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_net2net as n2n

from helpers import H, inspected, make_model, rand, widen_exact

B, T, D = 2, 5, 8


def _i64(*values):
    return np.array(values, dtype=np.int64)


def single_head_attention(fused: bool, seed: int = 0, split: str = "Reshape", merge: str = "Reshape"):
    """x [B, T, D] -> q, k, v (separate projections, or one fused [.., 3, 1, D]
    view gathered) viewed as [B, 1, T, D] -> softmax(q k^T / sqrt(D)) v ->
    [B, T, D] -> out -> + x -> head -> y. `split`, `merge`: the ops viewing
    the separate projections as [B, T, 1, D] and the context back as [B, T, D]
    (Reshape, or Unsqueeze / Squeeze of axis 2)."""
    rng = np.random.default_rng(seed)
    inits = {"w_out": rand(rng, D, D), "b_out": rand(rng, D), "w_head": rand(rng, D, 3),
             "scale": np.array(1 / np.sqrt(D), np.float32), "merge": _i64(0, 0, D), "axis2": _i64(2)}
    nodes = []
    if fused:
        inits.update(w_qkv=rand(rng, D, 3 * D), qkv_shape=_i64(0, 0, 3, 1, D))
        nodes += [H("MatMul", ["x", "w_qkv"], ["qkv"], name="qkv"), H("Reshape", ["qkv", "qkv_shape"], ["qkv5"]),
                  H("Transpose", ["qkv5"], ["qkv_t"], perm=[2, 0, 3, 1, 4])]
        for number, p in enumerate("qkv"):
            inits[f"i{p}"] = np.array(number, np.int64)
            nodes.append(H("Gather", ["qkv_t", f"i{p}"], [f"{p}_t"], axis=0))
    else:
        inits["head_shape"] = _i64(0, 0, 1, D)
        for p in "qkv":
            inits[f"w_{p}"] = rand(rng, D, D)
            nodes += [H("MatMul", ["x", f"w_{p}"], [p], name=f"{p}_proj"),
                      H("Reshape", [p, "head_shape"], [f"{p}_h"]) if split == "Reshape"
                      else H("Unsqueeze", [p, "axis2"], [f"{p}_h"]),
                      H("Transpose", [f"{p}_h"], [f"{p}_t"], perm=[0, 2, 1, 3])]
    nodes += [H("Transpose", ["k_t"], ["kT"], perm=[0, 1, 3, 2]), H("MatMul", ["q_t", "kT"], ["scores"]),
              H("Mul", ["scores", "scale"], ["scaled"]), H("Softmax", ["scaled"], ["probs"], axis=-1),
              H("MatMul", ["probs", "v_t"], ["context"]),
              H("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              H("Reshape", ["context_t", "merge"], ["merged"]) if merge == "Reshape"
              else H("Squeeze", ["context_t", "axis2"], ["merged"]),
              H("MatMul", ["merged", "w_out"], ["projected"], name="out"), H("Add", ["projected", "b_out"], ["attn"]),
              H("Add", ["x", "attn"], ["resid"]), H("MatMul", ["resid", "w_head"], ["y"], name="head")]
    return make_model(nodes, [("x", [B, T, D])], [("y", [B, T, 3])], inits)


@pytest.mark.parametrize("heads", [2, 3])
def test_a_single_head_of_separate_projections_grows_into_several(heads):
    model = single_head_attention(fused=False)
    layers = inspected(model)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert layers[name]["widen"]["ok"], layers[name]["widen"]["reason"]
        assert layers[name]["widen"]["step"] == D  # whole heads
    grown, _ = widen_exact(model, {"q_proj": heads * D})
    assert inspected(grown)["v_proj"]["width"] == heads * D


def test_a_single_head_of_a_fused_projection_grows_into_several():
    model = single_head_attention(fused=True)
    layer = inspected(model)["qkv"]
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    assert layer["widen"]["step"] == 3 * D
    grown, _ = widen_exact(model, {"qkv": 3 * 2 * D})
    assert inspected(grown)["qkv"]["width"] == 6 * D


def test_partial_heads_stay_refused():
    with pytest.raises(n2n.UserError, match=f"multiple of {D}"):
        n2n.widen(single_head_attention(fused=False), {"q_proj": D + 3})


@pytest.mark.parametrize("split, merge", [("Unsqueeze", "Reshape"), ("Reshape", "Squeeze"), ("Unsqueeze", "Squeeze")])
def test_a_single_head_made_by_unsqueeze_or_squeeze_grows_its_size(split, merge):
    """An Unsqueeze inserting the axis of 1, or a Squeeze removing it, cannot
    give that axis several heads: growing the head by copies would feed q k^T
    all the copies at once (not exact) or squeeze an axis of 2 (an invalid
    model). The head's size grows instead, k's copies divided by their number
    (contraction.py)."""
    model = single_head_attention(fused=False, split=split, merge=merge)
    layer = inspected(model)["q_proj"]
    assert layer["widen"]["ok"] and layer["widen"]["step"] == 1
    grown, _ = widen_exact(model, {"q_proj": D + 3})
    assert inspected(grown)["k_proj"]["width"] == D + 3
    assert inspected(grown)["v_proj"]["width"] == D  # v is a space of its own


def single_head_kv(seed: int = 0):
    """PVT v2's first stage as the TorchScript exporter writes it, batch dynamic:
    q [B, T, D] viewed as [B, 1, T, D]; one kv projection viewed as
    [B, T, 2, 1, D], moved to [2, B, 1, T, D], split and squeezed into k and v.
    Shapes alone cannot tell the Squeeze [1, B, 1, T, D] -> [B, 1, T, D] from a
    merge of the head with the batch: the head must stay apart."""
    rng = np.random.default_rng(seed)
    inits = {"w_q": rand(rng, D, D), "w_kv": rand(rng, D, 2 * D), "w_out": rand(rng, D, D), "w_head": rand(rng, D, 3),
             "scale": np.array(1 / np.sqrt(D), np.float32), "merge": _i64(0, 0, D), "head_shape": _i64(0, 0, 1, D),
             "kv_shape": _i64(0, 0, 2, 1, D), "ones": _i64(1, 1), "axis0": _i64(0)}
    nodes = [H("MatMul", ["x", "w_q"], ["q"], name="q_proj"), H("Reshape", ["q", "head_shape"], ["q_h"]),
             H("Transpose", ["q_h"], ["q_t"], perm=[0, 2, 1, 3]),
             H("MatMul", ["x", "w_kv"], ["kv"], name="kv_proj"), H("Reshape", ["kv", "kv_shape"], ["kv5"]),
             H("Transpose", ["kv5"], ["kv_t"], perm=[2, 0, 3, 1, 4]),
             H("Split", ["kv_t", "ones"], ["k1", "v1"], axis=0),
             H("Squeeze", ["k1", "axis0"], ["k_t"]), H("Squeeze", ["v1", "axis0"], ["v_t"]),
             H("Transpose", ["k_t"], ["kT"], perm=[0, 1, 3, 2]), H("MatMul", ["q_t", "kT"], ["scores"]),
             H("Mul", ["scores", "scale"], ["scaled"]), H("Softmax", ["scaled"], ["probs"], axis=-1),
             H("MatMul", ["probs", "v_t"], ["context"]), H("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
             H("Reshape", ["context_t", "merge"], ["merged"]), H("MatMul", ["merged", "w_out"], ["attn"], name="out"),
             H("Add", ["x", "attn"], ["resid"]), H("MatMul", ["resid", "w_head"], ["y"], name="head")]
    return make_model(nodes, [("x", ["B", T, D])], [("y", ["B", T, 3])], inits)


def test_a_single_head_beside_a_dynamic_batch_is_not_merged_with_it():
    model = single_head_kv()
    layers = inspected(model)
    for name, step in (("q_proj", D), ("kv_proj", 2 * D)):
        assert layers[name]["widen"]["ok"], layers[name]["widen"]["reason"]
        assert layers[name]["widen"]["step"] == step
    grown, _ = widen_exact(model, {"kv_proj": 2 * 3 * D})
    assert inspected(grown)["q_proj"]["width"] == 3 * D


def single_head_static_batch(seed: int = 0):
    """The dynamo exporter's decomposition of scaled_dot_product_attention with
    a static batch of 1: k [1, 1, T, D] is viewed as [1*1, T, D] (batch times
    heads), transposed, and viewed back as [1, 1, D, T]."""
    rng = np.random.default_rng(seed)
    inits = {"w_out": rand(rng, D, D), "w_head": rand(rng, D, 3), "scale": np.array(1 / np.sqrt(D), np.float32),
             "merge": _i64(1, T, D), "head_shape": _i64(1, T, 1, D), "bh": _i64(-1, T, D), "back": _i64(1, 1, D, T)}
    nodes = []
    for p in "qkv":
        inits[f"w_{p}"] = rand(rng, D, D)
        nodes += [H("MatMul", ["x", f"w_{p}"], [p], name=f"{p}_proj"), H("Reshape", [p, "head_shape"], [f"{p}_h"]),
                  H("Transpose", [f"{p}_h"], [f"{p}_t"], perm=[0, 2, 1, 3])]
    nodes += [H("Reshape", ["k_t", "bh"], ["k3"]), H("Transpose", ["k3"], ["k3T"], perm=[0, 2, 1]),
              H("Reshape", ["k3T", "back"], ["kT"]), H("MatMul", ["q_t", "kT"], ["scores"]),
              H("Mul", ["scores", "scale"], ["scaled"]), H("Softmax", ["scaled"], ["probs"], axis=-1),
              H("MatMul", ["probs", "v_t"], ["context"]), H("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              H("Reshape", ["context_t", "merge"], ["merged"]), H("MatMul", ["merged", "w_out"], ["attn"], name="out"),
              H("Add", ["x", "attn"], ["resid"]), H("MatMul", ["resid", "w_head"], ["y"], name="head")]
    return make_model(nodes, [("x", [1, T, D])], [("y", [1, T, 3])], inits)


def test_a_single_head_beside_a_static_batch_of_one_grows():
    model = single_head_static_batch()
    layers = inspected(model)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert layers[name]["widen"]["ok"], layers[name]["widen"]["reason"]
        assert layers[name]["widen"]["step"] == D
    grown, _ = widen_exact(model, {"k_proj": 2 * D})
    assert inspected(grown)["q_proj"]["width"] == 2 * D


def test_a_one_channel_map_flattened_with_a_static_batch_keeps_its_reading():
    """[1, 1, h, w] -> [1, h*w]: the one channel is the h*w features, not the batch."""
    rng = np.random.default_rng(1)
    inits = {"wc": rand(rng, 1, 2, 3, 3), "flat": _i64(1, 16), "wf": rand(rng, 16, 3)}
    nodes = [H("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]), H("Relu", ["c"], ["r"]),
             H("Reshape", ["r", "flat"], ["f"]), H("MatMul", ["f", "wf"], ["y"], name="fc")]
    model = make_model(nodes, [("x", [1, 2, 4, 4])], [("y", [1, 3])], inits)
    layer = inspected(model)["conv"]
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    widen_exact(model, {"conv": 3})
