"""Grouped-query attention (LLaMA, Qwen2) as the dynamo exporter writes it:
q has 4 heads, k and v 2 heads each repeated for 2 query heads by
Unsqueeze -> Expand -> Reshape, which also merges the batch with the heads
([B * heads, T, head size] for a 3-D attention). The units are then a K/V head
with its 2 query heads: q_proj, k_proj and v_proj grow together, from any of them."""

from __future__ import annotations

import numpy as np

import onnx_net2net as n2n

from helpers import H, make_model, rand, widen_exact

B, T, D, HEAD, Q_HEADS, KV_HEADS = 2, 3, 16, 4, 4, 2
REP = Q_HEADS // KV_HEADS


def _i64(*values):
    return np.array(values, dtype=np.int64)


def gqa():
    rng = np.random.default_rng(0)
    inits = {"wq": rand(rng, D, Q_HEADS * HEAD), "wk": rand(rng, D, KV_HEADS * HEAD), "wv": rand(rng, D, KV_HEADS * HEAD),
             "wo": rand(rng, Q_HEADS * HEAD, D), "w_head": rand(rng, D, 2),
             "q_shape": _i64(B, T, Q_HEADS, HEAD), "kv_shape": _i64(B, T, KV_HEADS, HEAD),
             "expand": _i64(B, KV_HEADS, REP, T, HEAD), "repeated": _i64(B * Q_HEADS, T, HEAD),
             "unmerged": _i64(B, Q_HEADS, T, HEAD), "two": _i64(2),
             "merge": _i64(B, T, Q_HEADS * HEAD), "scale": np.array(1 / np.sqrt(HEAD), np.float32)}
    nodes = [H("MatMul", ["x", "wq"], ["q"], name="q_proj"), H("Reshape", ["q", "q_shape"], ["q4"]),
             H("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]), H("Reshape", ["qt", "repeated"], ["qh"])]
    for name in "kv":
        nodes += [H("MatMul", ["x", f"w{name}"], [name], name=f"{name}_proj"),
                  H("Reshape", [name, "kv_shape"], [f"{name}4"]),
                  H("Transpose", [f"{name}4"], [f"{name}t"], perm=[0, 2, 1, 3]),
                  H("Unsqueeze", [f"{name}t", "two"], [f"{name}u"]), H("Expand", [f"{name}u", "expand"], [f"{name}e"]),
                  H("Reshape", [f"{name}e", "repeated"], [f"{name}h"])]
    nodes += [H("Transpose", ["kh"], ["kT"], perm=[0, 2, 1]), H("MatMul", ["qh", "kT"], ["scores"]),
              H("Mul", ["scores", "scale"], ["scaled"]), H("Softmax", ["scaled"], ["probs"], axis=-1),
              H("MatMul", ["probs", "vh"], ["context3"]), H("Reshape", ["context3", "unmerged"], ["context"]),
              H("Transpose", ["context"], ["ct"], perm=[0, 2, 1, 3]),
              H("Reshape", ["ct", "merge"], ["merged"]), H("MatMul", ["merged", "wo"], ["attn"], name="o_proj"),
              H("Add", ["x", "attn"], ["r"]), H("MatMul", ["r", "w_head"], ["y"], name="head")]
    return make_model(nodes, [("x", [B, T, D])], ["y"], inits)


def test_query_projection_grows_with_its_key_value_heads():
    layers = {l["name"]: l["widen"] for l in n2n.inspect(gqa(), trial=False)["layers"]}
    assert layers["q_proj"]["ok"], layers["q_proj"]["reason"]
    assert layers["q_proj"]["step"] == REP * HEAD and set(layers["q_proj"]["group"]) == {"q_proj", "k_proj", "v_proj"}
    grown, _ = widen_exact(gqa(), {"q_proj": (Q_HEADS + REP) * HEAD})
    wk = next(i for i in grown.graph.initializer if i.name.startswith("wk"))
    assert list(wk.dims) == [D, (KV_HEADS + 1) * HEAD]


def test_key_projection_grows_the_query_heads_it_serves():
    widen_exact(gqa(), {"k_proj": (KV_HEADS + 1) * HEAD})
