"""EfficientViT's (MIT) multi-scale linear attention: heads of q | k | v
written by a 1x1 conv, aggregated by a depthwise conv and a grouped 1x1 conv
(one group per q, k or v of a head), both concatenated, then viewed as heads.

A unit is a whole head (3 d channels). The grouped conv's groups of d
channels nest inside the units, so it acts per unit: a copied head copies
its groups' filters and `group` grows by 3 per head. The concatenation holds
the heads twice ([S | S]); the view [1, 2 n, 3 d, HW] keeps both repeats on
the heads axis, and the merge back [1, 2 n d, H, W] keeps them too.
"""

from __future__ import annotations

import numpy as np
import onnx
from helpers import H, inspected, make_model, node, rand, widen_exact

HEADS, D, SIDE = 2, 4, 3


def _i64(*values):
    return np.array(values, dtype=np.int64)


def lite_attention() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    qkv = 3 * D * HEADS
    inits = {"qkv_w": rand(rng, qkv, 2, 1, 1), "dw_w": rand(rng, qkv, 1, 3, 3), "agg_w": rand(rng, qkv, D, 1, 1),
             "heads": _i64(1, -1, 3 * D, SIDE * SIDE), "sizes": _i64(D, D, D),
             "merge": _i64(1, 2 * HEADS * D, SIDE, SIDE), "proj_w": rand(rng, 3, 2 * HEADS * D, 1, 1)}
    nodes = [H("Conv", ["x", "qkv_w"], ["qkv"], name="qkv"),
             H("Conv", ["qkv", "dw_w"], ["dw"], name="dw", group=qkv, pads=[1, 1, 1, 1]),
             H("Conv", ["dw", "agg_w"], ["agg"], name="agg", group=3 * HEADS),
             H("Concat", ["qkv", "agg"], ["cat"], axis=1), H("Reshape", ["cat", "heads"], ["h"]),
             H("Transpose", ["h"], ["t"], perm=[0, 1, 3, 2]),
             H("Split", ["t", "sizes"], ["q", "k", "v"], axis=3),
             H("Relu", ["q"], ["qr"]), H("Relu", ["k"], ["kr"]),
             H("Transpose", ["kr"], ["kT"], perm=[0, 1, 3, 2]), H("MatMul", ["kT", "v"], ["kv"]),
             H("MatMul", ["qr", "kv"], ["o"]), H("Transpose", ["o"], ["oT"], perm=[0, 1, 3, 2]),
             H("Reshape", ["oT", "merge"], ["m"]), H("Conv", ["m", "proj_w"], ["y"], name="proj")]
    return make_model(nodes, [("x", [1, 2, SIDE, SIDE])], [("y", [1, 3, SIDE, SIDE])], inits)


def test_heads_grow_through_the_grouped_aggregation():
    model = lite_attention()
    report = inspected(model)
    for name in ("qkv", "dw", "agg"):
        assert report[name]["widen"]["ok"], (name, report[name]["widen"])
    assert report["qkv"]["widen"]["step"] == 3 * D
    wider, _ = widen_exact(model, {"qkv": 3 * D * (HEADS + 1)})
    assert next(a.i for a in node(wider, "agg").attribute if a.name == "group") == 3 * (HEADS + 1)
    onnx.checker.check_model(wider, full_check=True)
    assert inspected(wider)["qkv"]["width"] == 3 * D * (HEADS + 1)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in wider.graph.initializer}
    assert weights[node(wider, "proj").input[1]].shape[1] == 2 * (HEADS + 1) * D
