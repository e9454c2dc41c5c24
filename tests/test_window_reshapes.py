"""Reshapes that move whole windows or patches of a tensor but keep each unit
apart: Swin's window partition after a cyclic shift (TorchScript export: the
sizes are read at run time and shape inference loses every dim of the rolled
map) and MobileViT's unfold / fold (channels merged into the batch axis and
back). Each positive case is grown and compared in onnxruntime; each negative
case (a reshape that mixes units) is refused with its reason."""

from __future__ import annotations

import numpy as np
import onnx

import onnx_net2net as n2n

from helpers import H, assert_same_function, inspected_layer, make_model, rand, widen_exact

C, WINDOW = 6, 2


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _size(nodes, inits, source, axis, name):
    """Unsqueeze(Gather(Shape(source), axis)): a 1-element size read at run time."""
    inits.setdefault("axes0", _i64(0))
    inits[f"{name}_i"] = np.array(axis, np.int64)
    nodes += [H("Shape", [source], [f"{name}_shape"]),
              H("Gather", [f"{name}_shape", f"{name}_i"], [f"{name}_g"], axis=0),
              H("Unsqueeze", [f"{name}_g", "axes0"], [name])]
    return name


def _windows(nodes, inits, source, width, name):
    """Unsqueeze(Gather(Shape(source), axis) / WINDOW): windows along an axis, read at run time."""
    inits.setdefault("window", np.array(WINDOW, np.int64))
    inits.setdefault("axes0", _i64(0))
    inits[f"{name}_i"] = np.array(width, np.int64)
    nodes += [H("Shape", [source], [f"{name}_shape"]),
              H("Gather", [f"{name}_shape", f"{name}_i"], [f"{name}_g"], axis=0),
              H("Div", [f"{name}_g", "window"], [f"{name}_d"]), H("Unsqueeze", [f"{name}_d", "axes0"], [name])]
    return name


def swin_windows(*, channels_moved: bool = False) -> onnx.ModelProto:
    """x [B, H, W, 3] -> fc1 -> h [B, H, W, C] -> pad H and W to even sizes
    (pads read at run time) -> roll by one row (Slice + Concat: inference
    loses every dim) -> + h-shaped residual stream kept apart -> window
    partition Reshape [B, H/2, 2, W/2, 2, C] (sizes read at run time, C from
    h's shape) -> Transpose -> Reshape [-1, 4, C] -> fc2.
    `channels_moved`: the partition reads [B, C, H/2, 2, W/2, 2] instead (a
    view that moves the channel axis, not per unit)."""
    rng = np.random.default_rng(3)
    inits = {"w1": rand(rng, 3, C), "w2": rand(rng, C, 2), "two": np.array(2, np.int64), "zero1": _i64(0),
             "one": _i64(1), "big": _i64(2 ** 31), "axis1": _i64(1), "minus1": _i64(-1), "pair": _i64(WINDOW)}
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Relu", ["h"], ["r"])]
    pads = []
    for name, axis in (("ph", 1), ("pw", 2)):
        dim = _size(nodes, inits, "h", axis, f"{name}_dim")
        nodes += [H("Mod", [dim, "two"], [name])]
        pads.append(name)
    nodes += [H("Concat", ["zero1", "zero1", "zero1", "zero1", "zero1", pads[0], pads[1], "zero1"], ["pads"], axis=0),
              H("Pad", ["r", "pads"], ["padded"]),
              H("Slice", ["padded", "one", "big", "axis1"], ["tail"]),
              H("Slice", ["padded", "zero1", "one", "axis1"], ["head"]),
              H("Concat", ["tail", "head"], ["rolled"], axis=1)]
    batch = _size(nodes, inits, "rolled", 0, "batch")
    rows, cols = _windows(nodes, inits, "rolled", 1, "rows"), _windows(nodes, inits, "rolled", 2, "cols")
    width = _size(nodes, inits, "h", 3, "width")
    target = [batch, width, rows, "pair", cols, "pair"] if channels_moved else [batch, rows, "pair", cols, "pair", width]
    perm = [0, 2, 4, 1, 3, 5]
    nodes += [H("Concat", target, ["partition"], axis=0), H("Reshape", ["rolled", "partition"], ["windows"]),
              H("Transpose", ["windows"], ["windows_t"], perm=perm),
              H("Concat", ["minus1", "area", width], ["tokens"], axis=0),
              H("Reshape", ["windows_t", "tokens"], ["tok"]),
              H("MatMul", ["tok", "w2"], ["y"], name="fc2")]
    inits["area"] = _i64(WINDOW * WINDOW)
    return make_model(nodes, [("x", ["B", "H", "W", 3])], [("y", [None, WINDOW * WINDOW, 2])], inits, check=False)


def test_swin_window_partition_after_a_roll_grows():
    model = swin_windows()
    layer = inspected_layer(model, "fc1")
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 5, 3, 3)).astype(np.float32)}
    widen_exact(model, {"fc1": 9}, feeds=feeds)


def test_a_partition_that_moves_the_channel_axis_is_refused():
    reason = inspected_layer(swin_windows(channels_moved=True), "fc1")["widen"]["reason"]
    assert reason.startswith("Reshape") and "cannot match shape [?, ?, ?, 6] to [?, 6, ?, 2, ?, 2]" in reason, reason


P, SIDE = 2, 4  # MobileViT: patches of P x P on a SIDE x SIDE map


def mobilevit_unfold_fold(*, mixed: bool = False) -> onnx.ModelProto:
    """x [batch, 3, 4, 4] -> conv1 (1x1) -> [batch, C, 4, 4] -> unfold: Reshape
    [batch * C * 2, 2, 2, 2] (channels merged into the batch axis), Transpose,
    Reshape [batch, C, 4, 4] ([B, C, patches, pixels]), Transpose to [B, P, N, C],
    Reshape [B * 4, 4, C] -> per-token MatMul mix (C -> C) -> fold (the same
    steps back) -> conv2 (batch 1; `mobilevit_dynamic` for a dynamic one).
    `mixed`: the unfold reads [B * 6, 4, 4] instead, a view whose rows hold
    parts of two channels."""
    rng = np.random.default_rng(5)
    rows = SIDE // P
    b = 1
    inits = {"w1": rand(rng, C, 3, 1, 1), "w2": rand(rng, 2, C, 1, 1), "mix": rand(rng, C, C),
             "patches": _i64(b, C, rows * rows, P * P), "tokens": _i64(b * P * P, rows * rows, C),
             "back": _i64(b, P * P, rows * rows, C), "image": _i64(b, C, SIDE, SIDE)}
    unfold = _i64(b * C * 2 // 3, 3 * P, P, P) if mixed else _i64(b * C * rows, P, rows, P)
    inits["unfold"] = unfold
    inits["fold"] = _i64(b * C * rows, rows, P, P)
    nodes = [H("Conv", ["x", "w1"], ["h"], name="conv1")]
    nodes += [H("Reshape", ["h", "unfold"], ["u1"]), H("Transpose", ["u1"], ["u2"], perm=[0, 2, 1, 3]),
              H("Reshape", ["u2", "patches"], ["u3"]), H("Transpose", ["u3"], ["u4"], perm=[0, 3, 2, 1]),
              H("Reshape", ["u4", "tokens"], ["t"]), H("MatMul", ["t", "mix"], ["m"], name="mix"),
              H("Relu", ["m"], ["a"]),
              H("Reshape", ["a", "back"], ["f1"]), H("Transpose", ["f1"], ["f2"], perm=[0, 3, 2, 1]),
              H("Reshape", ["f2", "fold"], ["f3"]), H("Transpose", ["f3"], ["f4"], perm=[0, 2, 1, 3]),
              H("Reshape", ["f4", "image"], ["folded"]), H("Conv", ["folded", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [("x", [b, 3, SIDE, SIDE])], [("y", [b, 2, SIDE, SIDE])], inits, check=False)


def _targets(model):
    """The constant targets of the model's Reshapes, by the Reshape's data input."""
    consts = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in model.graph.initializer}
    return {n.input[0]: consts.get(n.input[1]) for n in model.graph.node if n.op_type == "Reshape"}


def test_mobilevit_unfold_and_fold_grow():
    model = mobilevit_unfold_fold()
    for name in ("conv1", "mix"):
        layer = inspected_layer(model, name)
        assert layer["widen"]["ok"], layer["widen"]["reason"]
    grown, _ = widen_exact(model, {"conv1": 9})
    targets = _targets(grown)
    assert targets["h"] == [9 * 2, P, 2, P] and targets["u2"] == [1, 9, 4, 4], targets
    assert targets["u4"] == [4, 4, 9], targets
    grown, _ = widen_exact(model, {"mix": 8})
    targets = _targets(grown)
    assert targets["a"] == [1, 4, 4, 8] and targets["f2"] == [8 * 2, 2, P, P], targets


def test_mobilevit_unfold_that_mixes_channels_is_refused():
    reason = inspected_layer(mobilevit_unfold_fold(mixed=True), "conv1")["widen"]["reason"]
    assert reason.startswith("Reshape") and "regroups the unit axis" in reason, reason


def mobilevit_dynamic(variant: str = "exact") -> onnx.ModelProto:
    """MobileViT's unfold / fold as the TorchScript exporter writes it with a
    dynamic batch: every target read at run time from h's shape (B, C).
    x [B, 3, 4, 4] -> conv1 -> h [B, C, 4, 4] -> Reshape [B*C*2, 2, 2, 2]
    (the channels merged with the batch) -> Transpose -> Reshape [B, C, 4, 4]
    -> Transpose -> Reshape [B*4, 4, -1] -> + Relu(mix (C -> C)) -> fold:
    Reshape [B, 4, 4, -1] -> Transpose -> Reshape [B*C*2, 2, 2, 2] ->
    Transpose -> Reshape [B, C, 4, 4] -> conv2. The fold reads C from h, as
    MobileViT's does: conv1 and mix grow together (the residual stream).
    `mixed`: the unfold reads [B*C*2/3, 6, 2, 2], rows holding parts of two
    channels; `five`: the unfold reads [B*C*2, 2, 2, 1, 2] (a merge into a
    view of higher rank); `leading`: [2, B*C*2, 2, 2], whose axis 1 holds
    whole channels for an even batch only (for B = 1 the second half of it
    starts inside a channel's rows)."""
    rng = np.random.default_rng(6)
    rows = SIDE // P
    inits = {"w1": rand(rng, C, 3, 1, 1), "w2": rand(rng, 2, C, 1, 1), "mix": rand(rng, C, C),
             "rows": _i64(rows), "pair": _i64(P), "area": _i64(P * P), "patches": _i64(rows * rows),
             "minus1": _i64(-1), "three": _i64(3), "two": _i64(2), "six": _i64(3 * P), "side": _i64(SIDE),
             "one": _i64(1)}
    nodes = [H("Conv", ["x", "w1"], ["h"], name="conv1")]
    batch, width = _size(nodes, inits, "h", 0, "B"), _size(nodes, inits, "h", 1, "C")
    nodes += [H("Mul", [batch, width], ["bc"]), H("Mul", ["bc", "rows"], ["bcr"]),
              H("Mul", [batch, "area"], ["bp"])]
    if variant == "mixed":
        nodes += [H("Mul", ["bc", "two"], ["bc2"]), H("Div", ["bc2", "three"], ["bc23"]),
                  H("Concat", ["bc23", "six", "pair", "pair"], ["unfold"], axis=0)]
    elif variant == "leading":
        nodes += [H("Concat", ["two", "bcr", "pair", "pair"], ["unfold"], axis=0)]
    elif variant == "five":
        nodes += [H("Concat", ["bcr", "pair", "rows", "one", "pair"], ["unfold"], axis=0)]
    else:
        nodes += [H("Concat", ["bcr", "pair", "rows", "pair"], ["unfold"], axis=0)]
    nodes += [H("Concat", [batch, width, "patches", "area"], ["to_patches"], axis=0),
              H("Concat", ["bp", "patches", "minus1"], ["to_tokens"], axis=0),
              H("Concat", [batch, "area", "patches", "minus1"], ["to_back"], axis=0),
              H("Concat", ["bcr", "rows", "pair", "pair"], ["to_fold"], axis=0),
              H("Concat", [batch, width, "side", "side"], ["to_image"], axis=0)]
    nodes += [H("Reshape", ["h", "unfold"], ["u1"]),
              H("Transpose", ["u1"], ["u2"], perm=[0, 2, 1, 3] + [4] * (variant == "five")),
              H("Reshape", ["u2", "to_patches"], ["u3"]), H("Transpose", ["u3"], ["u4"], perm=[0, 3, 2, 1]),
              H("Reshape", ["u4", "to_tokens"], ["t"]), H("MatMul", ["t", "mix"], ["m"], name="mix"),
              H("Relu", ["m"], ["r"]), H("Add", ["t", "r"], ["a"]),
              H("Reshape", ["a", "to_back"], ["f1"]), H("Transpose", ["f1"], ["f2"], perm=[0, 3, 2, 1]),
              H("Reshape", ["f2", "to_fold"], ["f3"]), H("Transpose", ["f3"], ["f4"], perm=[0, 2, 1, 3]),
              H("Reshape", ["f4", "to_image"], ["folded"]), H("Conv", ["folded", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [("x", ["B", 3, SIDE, SIDE])], [("y", ["B", 2, SIDE, SIDE])], inits)


def _feeds(batch):
    return {"x": np.random.default_rng(batch).standard_normal((batch, 3, SIDE, SIDE)).astype(np.float32)}


def test_mobilevit_unfold_and_fold_with_a_dynamic_batch_grow():
    # The channels merged with the batch keep 2 whole rows each per batch item
    # (Placement.batch); the targets' merged entries are inferred (-1) once C grows.
    model = mobilevit_dynamic()
    for name in ("conv1", "mix"):
        layer = inspected_layer(model, name)
        assert layer["widen"]["ok"], layer["widen"]["reason"]
    for widths in ({"conv1": 9}, {"mix": 7}):
        grown, _ = widen_exact(model, widths, feeds=_feeds(1))
        onnx.checker.check_model(grown, full_check=True)
        assert_same_function(model, grown, _feeds(3))
        assert_same_function(model, grown, _feeds(2))


def test_mobilevit_unfold_into_a_view_of_higher_rank_with_a_dynamic_batch_grows():
    model = mobilevit_dynamic("five")
    layer = inspected_layer(model, "conv1")
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    for widths in ({"conv1": 8},):
        grown, _ = widen_exact(model, widths, feeds=_feeds(1))
        onnx.checker.check_model(grown, full_check=True)
        assert_same_function(model, grown, _feeds(3))
        assert_same_function(model, grown, _feeds(2))


def test_mobilevit_unfold_with_a_dynamic_batch_that_mixes_channels_is_refused():
    reason = inspected_layer(mobilevit_dynamic("mixed"), "conv1")["widen"]["reason"]
    assert "merges the unit axis with a dim of unknown size (a dynamic batch) into axis 0" in reason, reason
    assert "would hold parts of several units" in reason, reason


def test_mobilevit_unfold_with_the_batch_behind_a_known_axis_is_refused():
    reason = inspected_layer(mobilevit_dynamic("leading"), "conv1")["widen"]["reason"]
    assert "into axis 1" in reason and "do not split the units' layout into whole repeats" in reason, reason
    try:
        n2n.widen(mobilevit_dynamic("leading"), {"conv1": 9})
    except n2n.GrowthRefused:
        pass
    else:
        raise AssertionError("widened")


def test_units_merged_with_a_batch_by_their_strides_map_both_ways():
    from onnx_net2net.analysis import Placement, map_through_reshape

    channels = Placement(axis=1, rank=4, length=C)
    merged, _ = map_through_reshape(channels, (None, C, 4, 4), (None, 2, 2, 2))
    assert merged == Placement(axis=0, rank=4, length=2 * C, inner=2, batch=True)
    assert map_through_reshape(merged, (None, 2, 2, 2), (None, C, 4, 4))[0] == channels
    tokens, _ = map_through_reshape(merged.on_axis(0, 4), (None, 2, 2, 2), (None, 8))  # [B*C*2, 8]
    assert tokens == Placement(axis=0, rank=2, length=2 * C, inner=2, batch=True)
    concat = Placement(axis=1, rank=4, length=C + 2, offset=2)  # after a concat behind 2 other channels
    assert map_through_reshape(concat, (None, C + 2, 4, 4), (None, 2, 2, 2))[0] == Placement(
        axis=0, rank=4, length=2 * (C + 2), offset=4, inner=2, batch=True)
    for dst in ((None, 3, 4), (None, 6, 2, 2), (2, None, 2, 2), (None, None, 2, 2)):
        moved, refusal = map_through_reshape(channels, (None, C, 4, 4), dst)
        assert moved is None and refusal is not None, dst
