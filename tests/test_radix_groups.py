"""Grouped convolutions over a space repeated once per group (ResNeSt's
split attention): a conv with `group` = radix writes [S | S], one repeat per
group; the radix splits are viewed as [N, radix, C, H, W], summed, gated by a
softmax over the radix axis, and summed again.

A repeated space through a grouped conv: every repeat splits into
group / repeats blocks (one here), so the units grow freely; a producer copies
rows within each repeat's groups, a consumer splits each group's input
channels with the mapping of its block of its repeat.
"""

from __future__ import annotations

import numpy as np
import onnx
from helpers import H, inspected, make_model, node_weight, rand, widen_exact

C, RADIX = 4, 2


def _i64(*values):
    return np.array(values, dtype=np.int64)


def split_attention() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"stem_w": rand(rng, RADIX * 3, 2, 1, 1), "conv_w": rand(rng, RADIX * C, 3, 3, 3),
             "split5": _i64(0, RADIX, C, 5, 5), "radix_axis": _i64(1), "fc1_w": rand(rng, 3, C, 1, 1),
             "fc2_w": rand(rng, RADIX * C, 3, 1, 1), "fc2_b": rand(rng, RADIX * C), "gate4": _i64(0, 1, RADIX, C),
             "gate5": _i64(0, RADIX, C, 1, 1), "head_w": rand(rng, 2, C, 1, 1)}
    nodes = [H("Conv", ["x", "stem_w"], ["s"], name="stem"),
             H("Conv", ["s", "conv_w"], ["c"], name="conv", group=RADIX, pads=[1, 1, 1, 1]),
             H("Relu", ["c"], ["cr"]), H("Reshape", ["cr", "split5"], ["splits"]),
             H("ReduceSum", ["splits", "radix_axis"], ["summed"], keepdims=0),
             H("GlobalAveragePool", ["summed"], ["pooled"]), H("Conv", ["pooled", "fc1_w"], ["f1"], name="fc1"),
             H("Relu", ["f1"], ["f1r"]), H("Conv", ["f1r", "fc2_w", "fc2_b"], ["f2"], name="fc2"),
             H("Reshape", ["f2", "gate4"], ["g4"]), H("Transpose", ["g4"], ["gt"], perm=[0, 2, 1, 3]),
             H("Softmax", ["gt"], ["gs"], axis=1), H("Reshape", ["gs", "gate5"], ["g5"]),
             H("Mul", ["splits", "g5"], ["gated"]),
             H("ReduceSum", ["gated", "radix_axis"], ["out"], keepdims=0),
             H("Conv", ["out", "head_w"], ["y"], name="head")]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 2, 5, 5])], inits)


def repeated_into_grouped_conv() -> onnx.ModelProto:
    """a -> [a | relu(a)] -> grouped conv (group 2): each group reads one repeat."""
    rng = np.random.default_rng(1)
    inits = {"a_w": rand(rng, C, 2, 1, 1), "g_w": rand(rng, 6, C, 1, 1), "head_w": rand(rng, 2, 6, 1, 1)}
    nodes = [H("Conv", ["x", "a_w"], ["a"], name="a"), H("Relu", ["a"], ["r"]),
             H("Concat", ["a", "r"], ["cat"], axis=1), H("Conv", ["cat", "g_w"], ["g"], name="grouped", group=2),
             H("Conv", ["g", "head_w"], ["y"], name="head")]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 2, 5, 5])], inits)


def test_radix_splits_grow_in_every_split():
    model = split_attention()
    report = inspected(model)
    for name in ("conv", "fc1", "fc2"):
        assert report[name]["widen"]["ok"], (name, report[name]["widen"])
    wider, _ = widen_exact(model, {"conv": RADIX * (C + 3)})
    assert node_weight(wider, "head").shape[1] == C + 3
    assert node_weight(wider, "fc2").shape[0] == RADIX * (C + 3)
    onnx.checker.check_model(wider, full_check=True)


def test_a_grouped_conv_reading_one_repeat_per_group_splits_each_group():
    model = repeated_into_grouped_conv()
    wider, _ = widen_exact(model, {"a": C + 3})
    assert node_weight(wider, "grouped").shape == (6, C + 3, 1, 1)
