"""torch.nn.MultiheadAttention as the dynamo exporter writes it: one packed
in_proj [E, 3E], unflatten to [..., 3, E], unsqueeze / transpose / squeeze to
[3, T, B, E], a select (Gather) of 0, 1, 2, then the heads merged with the
batch: view(T, B * heads, head size). With a batch of 1 (a static export) the
heads grow whole, repeated three times; with a batch of 2 the heads are
interleaved with the batch and the layer is refused."""

from __future__ import annotations

import numpy as np

from helpers import H, inspected_layer, make_model, rand, widen_exact

T, E, HEADS = 5, 8, 2
HEAD = E // HEADS


def _i64(*values):
    return np.array(values, dtype=np.int64)


def packed_attention(batch: int = 1):
    rng = np.random.default_rng(0)
    inits = {"w_in": rand(rng, E, 3 * E), "b_in": rand(rng, 3 * E), "w_out": rand(rng, E, E), "b_out": rand(rng, E),
             "w_head": rand(rng, E, 3), "unflat": _i64(T, batch, 3, E), "zero": _i64(0), "three_axis": _i64(3),
             "heads_shape": _i64(T, batch * HEADS, HEAD), "merge": _i64(T * batch, E), "back": _i64(T, batch, E),
             "scale": np.array(1 / np.sqrt(HEAD), np.float32)}
    nodes = [H("MatMul", ["x", "w_in"], ["p0"], name="in_proj"), H("Add", ["p0", "b_in"], ["p"]),
             H("Reshape", ["p", "unflat"], ["p5"]), H("Unsqueeze", ["p5", "zero"], ["p6"]),
             H("Transpose", ["p6"], ["p7"], perm=[3, 1, 2, 0, 4]), H("Squeeze", ["p7", "three_axis"], ["packed"])]
    for i, name in enumerate("qkv"):
        inits[f"i{i}"] = np.array(i, np.int64)
        nodes += [H("Gather", ["packed", f"i{i}"], [name], axis=0),
                  H("Reshape", [name, "heads_shape"], [f"{name}3"]),
                  H("Transpose", [f"{name}3"], [f"{name}h"], perm=[1, 0, 2])]
    nodes += [H("Transpose", ["kh"], ["kT"], perm=[0, 2, 1]), H("MatMul", ["qh", "kT"], ["scores"]),
              H("Mul", ["scores", "scale"], ["scaled"]), H("Softmax", ["scaled"], ["probs"], axis=-1),
              H("MatMul", ["probs", "vh"], ["context"]), H("Transpose", ["context"], ["context_t"], perm=[1, 0, 2]),
              H("Reshape", ["context_t", "merge"], ["merged"]),
              H("Gemm", ["merged", "w_out", "b_out"], ["attn2"], name="out_proj"),
              H("Reshape", ["attn2", "back"], ["attn"]), H("Add", ["x", "attn"], ["resid"]),
              H("MatMul", ["resid", "w_head"], ["y"], name="head")]
    return make_model(nodes, [("x", [T, batch, E])], ["y"], inits)


def test_packed_in_proj_grows_whole_heads_repeated_three_times():
    model = packed_attention()
    layer = inspected_layer(model, "in_proj")
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    assert layer["widen"]["step"] == 3 * HEAD
    for heads in (3, 4):
        grown, _ = widen_exact(model, {"in_proj": 3 * heads * HEAD})
        weight = next(i for i in grown.graph.initializer if i.name.startswith("w_in"))
        assert list(weight.dims) == [E, 3 * heads * HEAD]


def test_packed_in_proj_with_heads_merged_into_a_batch_of_two_is_refused():
    reason = inspected_layer(packed_attention(batch=2), "in_proj")["widen"]["reason"]
    assert "Reshape" in reason and ("regroups the unit axis" in reason or "splits the unit axis" in reason)
