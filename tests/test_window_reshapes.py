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

from helpers import H, make_model, rand, widen_exact

C, WINDOW = 6, 2


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _layer(model, name):
    return next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == name)


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
    layer = _layer(model, "fc1")
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 5, 3, 3)).astype(np.float32)}
    widen_exact(model, {"fc1": 9}, feeds=feeds)


def test_a_partition_that_moves_the_channel_axis_is_refused():
    reason = _layer(swin_windows(channels_moved=True), "fc1")["widen"]["reason"]
    assert reason.startswith("Reshape") and "cannot match shape [?, ?, ?, 6] to [?, 6, ?, 2, ?, 2]" in reason, reason


P, SIDE = 2, 4  # MobileViT: patches of P x P on a SIDE x SIDE map


def mobilevit_unfold_fold(*, batch=1, mixed: bool = False) -> onnx.ModelProto:
    """x [batch, 3, 4, 4] -> conv1 (1x1) -> [batch, C, 4, 4] -> unfold: Reshape
    [batch * C * 2, 2, 2, 2] (channels merged into the batch axis), Transpose,
    Reshape [batch, C, 4, 4] ([B, C, patches, pixels]), Transpose to [B, P, N, C],
    Reshape [B * 4, 4, C] -> per-token MatMul mix (C -> C) -> fold (the same
    steps back) -> conv2. `batch` None: a dynamic batch, sizes read at run time
    as the TorchScript exporter writes them. `mixed`: the unfold reads
    [B * 6, 4, 4] instead, a view whose rows hold parts of two channels."""
    rng = np.random.default_rng(5)
    rows = SIDE // P
    b = batch or 1
    inits = {"w1": rand(rng, C, 3, 1, 1), "w2": rand(rng, 2, C, 1, 1), "mix": rand(rng, C, C),
             "patches": _i64(b, C, rows * rows, P * P), "tokens": _i64(b * P * P, rows * rows, C),
             "back": _i64(b, P * P, rows * rows, C), "image": _i64(b, C, SIDE, SIDE)}
    unfold = _i64(b * C * 2 // 3, 3 * P, P, P) if mixed else _i64(b * C * rows, P, rows, P)
    inits["unfold"] = unfold
    inits["fold"] = _i64(b * C * rows, rows, P, P)
    nodes = [H("Conv", ["x", "w1"], ["h"], name="conv1")]
    if batch is None:
        nodes += _dynamic_unfold_target(inits)
    nodes += [H("Reshape", ["h", "unfold"], ["u1"]), H("Transpose", ["u1"], ["u2"], perm=[0, 2, 1, 3]),
              H("Reshape", ["u2", "patches"], ["u3"]), H("Transpose", ["u3"], ["u4"], perm=[0, 3, 2, 1]),
              H("Reshape", ["u4", "tokens"], ["t"]), H("MatMul", ["t", "mix"], ["m"], name="mix"),
              H("Relu", ["m"], ["a"]),
              H("Reshape", ["a", "back"], ["f1"]), H("Transpose", ["f1"], ["f2"], perm=[0, 3, 2, 1]),
              H("Reshape", ["f2", "fold"], ["f3"]), H("Transpose", ["f3"], ["f4"], perm=[0, 2, 1, 3]),
              H("Reshape", ["f4", "image"], ["folded"]), H("Conv", ["folded", "w2"], ["y"], name="conv2")]
    shape = ["B" if batch is None else batch, 3, SIDE, SIDE]
    return make_model(nodes, [("x", shape)], [("y", [shape[0], 2, SIDE, SIDE])], inits, check=False)


def _dynamic_unfold_target(inits):
    """The unfold's target [B * C * 2, 2, 2, 2] with B and C read from h's shape."""
    nodes = []
    batch, width = _size(nodes, inits, "h", 0, "ub"), _size(nodes, inits, "h", 1, "uc")
    inits.update(rows=_i64(SIDE // P), pair=_i64(P))
    del inits["unfold"]
    return nodes + [H("Mul", [batch, width], ["bc"]), H("Mul", ["bc", "rows"], ["bcr"]),
                    H("Concat", ["bcr", "pair", "rows", "pair"], ["unfold"], axis=0)]


def _targets(model):
    """The constant targets of the model's Reshapes, by the Reshape's data input."""
    consts = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in model.graph.initializer}
    return {n.input[0]: consts.get(n.input[1]) for n in model.graph.node if n.op_type == "Reshape"}


def test_mobilevit_unfold_and_fold_grow():
    model = mobilevit_unfold_fold()
    for name in ("conv1", "mix"):
        layer = _layer(model, name)
        assert layer["widen"]["ok"], layer["widen"]["reason"]
    grown, _ = widen_exact(model, {"conv1": 9})
    targets = _targets(grown)
    assert targets["h"] == [9 * 2, P, 2, P] and targets["u2"] == [1, 9, 4, 4], targets
    assert targets["u4"] == [4, 4, 9], targets
    grown, _ = widen_exact(model, {"mix": 8})
    targets = _targets(grown)
    assert targets["a"] == [1, 4, 4, 8] and targets["f2"] == [8 * 2, 2, P, P], targets


def test_mobilevit_unfold_that_mixes_channels_is_refused():
    reason = _layer(mobilevit_unfold_fold(mixed=True), "conv1")["widen"]["reason"]
    assert reason.startswith("Reshape") and "regroups the unit axis" in reason, reason


def test_mobilevit_unfold_with_a_dynamic_batch_is_refused_with_the_reason():
    reason = _layer(mobilevit_unfold_fold(batch=None), "conv1")["widen"]["reason"]
    assert "merges the unit axis with the batch into axis 0" in reason and "2 whole rows" in reason, reason
    assert "known only at run time" in reason
