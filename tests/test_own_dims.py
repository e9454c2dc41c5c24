"""Reshape targets that copy the input's own dims, read at run time.

TorchScript writes `x.flatten(2)` as `Reshape(x, Concat(Shape(x)[0:2], [-1]))`
and gcvit's `q.repeat(B // Bq, 1, 1, 1, 1).reshape(-1, *q.shape[2:])` as a Tile
whose repeats come from a OneHot, then a Reshape to `Concat([-1],
Shape(t)[2:5])`. With a symbolic batch, shape inference leaves the target's
other dims unknown. An entry that is the input's own dim k (read by Shape and
moved unchanged) equals that dim, known or not, so the `-1` is numel over the
other dims with those cancelled on both sides; a Tile axis repeated once keeps
its dim. Each case is grown and compared in onnxruntime at two batch sizes.
"""

from __future__ import annotations

import numpy as np
import onnx

from helpers import H, inspected, make_model, rand, widen_exact

from onnx_net2net.analysis.refined_shapes import refined_shape
from onnx_net2net.analysis.runtime_shapes import reshape_output_shape
from onnx_net2net.io import from_proto
from onnx_net2net.ir import GraphIR


def _i64(*values):
    return np.array(values, dtype=np.int64)


def flatten_by_own_dims() -> onnx.ModelProto:
    """conv -> Reshape [N, C, -1] (N, C read from its input) -> tokens ->
    fc -> back to [N, C2, 4, 4] (N, C2 read from its input) -> head conv."""
    rng = np.random.default_rng(0)
    inits = {"conv_w": rand(rng, 6, 2, 3, 3), "fc_w": rand(rng, 6, 5), "head_w": rand(rng, 3, 5, 1, 1),
             "zero": _i64(0), "two": _i64(2), "rest": _i64(-1), "hw": _i64(4, 4)}
    nodes = [H("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             H("Shape", ["c"], ["c_shape"]), H("Slice", ["c_shape", "zero", "two"], ["c_nc"]),
             H("Concat", ["c_nc", "rest"], ["flat_shape"], axis=0),
             H("Reshape", ["c", "flat_shape"], ["flat"]), H("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
             H("MatMul", ["tokens", "fc_w"], ["f"], name="fc"), H("Relu", ["f"], ["fr"]),
             H("Transpose", ["fr"], ["ft"], perm=[0, 2, 1]),
             H("Shape", ["ft"], ["ft_shape"]), H("Slice", ["ft_shape", "zero", "two"], ["ft_nc"]),
             H("Concat", ["ft_nc", "hw"], ["map_shape"], axis=0),
             H("Reshape", ["ft", "map_shape"], ["m"]), H("Conv", ["m", "head_w"], ["y"], name="head")]
    return make_model(nodes, [("x", [None, 2, 4, 4])], ["y"], inits)


def repeated_global_query() -> onnx.ModelProto:
    """gcvit: q [N, C, 2, 2] -> channels last -> Unsqueeze(1) -> Tile by
    OneHot([1], 5, [1, N]) -> Reshape [-1, 2, 2, C] (dims 2..4 read from the
    Tile's output) -> fc over C -> output."""
    rng = np.random.default_rng(1)
    inits = {"q_w": rand(rng, 6, 2, 1, 1), "fc_w": rand(rng, 6, 3), "one": _i64(1), "depth": np.array(5, np.int64),
             "index": _i64(1), "zero": _i64(0), "zero_end": _i64(0), "from2": _i64(2), "to5": _i64(5),
             "rest": _i64(-1), "flat": _i64(-1)}
    nodes = [H("Conv", ["x", "q_w"], ["q"], name="q"), H("Transpose", ["q"], ["ql"], perm=[0, 2, 3, 1]),
             H("Unsqueeze", ["ql", "one"], ["qu"]),
             H("Shape", ["x"], ["x_shape"]), H("Slice", ["x_shape", "zero", "one"], ["batch"]),
             H("Concat", ["one", "batch"], ["on_off"], axis=0),
             H("OneHot", ["index", "depth", "on_off"], ["hot"]), H("Reshape", ["hot", "flat"], ["repeats"]),
             H("Tile", ["qu", "repeats"], ["tiled"]),
             H("Shape", ["tiled"], ["t_shape"]), H("Slice", ["t_shape", "zero", "zero_end"], ["none"]),
             H("Slice", ["t_shape", "from2", "to5"], ["t_tail"]),
             H("Concat", ["none", "rest", "t_tail"], ["target"], axis=0),
             H("Reshape", ["tiled", "target"], ["r"]), H("MatMul", ["r", "fc_w"], ["y"], name="fc")]
    return make_model(nodes, [("x", ["N", 2, 2, 2])], ["y"], inits)


def _feeds(model, batch):
    shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": np.random.default_rng(batch).standard_normal(shape).astype(np.float32)}


def test_the_target_dims_copied_from_the_input_are_its_dims():
    ir = GraphIR(from_proto(flatten_by_own_dims()))
    flatten = next(i for i, node in enumerate(ir.nodes) if node.output[0] == "flat")
    assert reshape_output_shape(ir, flatten) == (None, 6, 16)  # the -1 is 4 * 4, the batch cancelled
    ir = GraphIR(from_proto(repeated_global_query()))
    assert ir.shape("r") == (None, None, None, 6)  # what shape inference leaves
    assert refined_shape(ir, "tiled") == (None, None, 2, 2, 6)
    assert refined_shape(ir, "r") == (None, 2, 2, 6)


def test_flatten_and_unflatten_by_own_dims_grow():
    model = flatten_by_own_dims()
    report = inspected(model)
    assert report["conv"]["widen"]["ok"] and report["fc"]["widen"]["ok"], (report["conv"], report["fc"])
    for batch in (1, 3):
        widen_exact(model, {"conv": 9, "fc": 8}, feeds=_feeds(model, batch))


def test_a_query_tiled_by_the_batch_grows():
    model = repeated_global_query()
    assert inspected(model)["q"]["widen"]["ok"], inspected(model)["q"]
    for batch in (1, 2):
        wider, _ = widen_exact(model, {"q": 9}, feeds=_feeds(model, batch))
    onnx.checker.check_model(wider, full_check=True)


def reshape_by_moved_dims() -> onnx.ModelProto:
    """conv -> c [N, 6, L] -> Reshape to [L, -1, N] read from Shape(c) (a view,
    not a transpose: it mixes the channels with the batch) -> fc."""
    rng = np.random.default_rng(2)
    inits = {"conv_w": rand(rng, 6, 2, 1), "fc_w": rand(rng, 6, 3), "zero": _i64(0), "one": _i64(1),
             "two": _i64(2), "three": _i64(3), "rest": _i64(-1)}
    nodes = [H("Conv", ["x", "conv_w"], ["c"], name="conv"), H("Shape", ["c"], ["s"]),
             H("Slice", ["s", "two", "three"], ["length"]), H("Slice", ["s", "zero", "one"], ["batch"]),
             H("Concat", ["length", "rest", "batch"], ["target"], axis=0),
             H("Reshape", ["c", "target"], ["r"], name="view"), H("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             H("MatMul", ["t", "fc_w"], ["y"], name="fc")]
    return make_model(nodes, [("x", ["N", 2, "L"])], ["y"], inits)


def test_a_target_moving_an_unknown_dim_to_another_axis_is_refused():
    """[x.shape[2], -1, x.shape[0]] has the sizes of a transpose but moves no
    data: the unknown dims were paired by position and the channels (6 in the
    middle) taken for the units (inspect said ok, widen changed the function)."""
    report = inspected(reshape_by_moved_dims())["conv"]["widen"]
    assert not report["ok"]
    assert "dim 2 (of unknown size) at axis 0" in report["reason"]


def test_one_hot_indices_count_from_the_end_and_out_of_range_ones_are_all_off():
    """OneHot(i, depth): a negative i is i + depth; an i outside [-depth,
    depth) gives a row of the off value (was wrapped around by i % depth)."""
    from onnx_net2net.analysis.size_evaluator import SizeEvaluator

    inits = {"depth": np.array(4, np.int64), "values": _i64(1, 7), "flat": _i64(-1)}
    for index, expected in ((-1, [1, 1, 1, 7]), (4, [1, 1, 1, 1]), (-5, [1, 1, 1, 1]), (2, [1, 1, 7, 1])):
        inits["index"] = _i64(index)
        nodes = [H("OneHot", ["index", "depth", "values"], ["hot"]), H("Reshape", ["hot", "flat"], ["repeats"]),
                 H("Tile", ["x", "repeats"], ["y"])]
        model = make_model(nodes, [("x", [2, 2, 2, 2])], ["y"], inits)
        ir = GraphIR(from_proto(model))
        entries = SizeEvaluator(ir, {}).port_entries(len(ir.nodes) - 1, 1)
        assert [e.base for e in entries] == expected, index


def test_a_where_between_two_unknown_dims_is_neither():
    """Where(c, x.shape[0], x.shape[2]) with c read at run time: both are
    unknown (equal Entries), but the pick is not x's dim 0 (a Reshape target
    would have kept it as that dim)."""
    from onnx_net2net.analysis.size_evaluator import SizeEvaluator

    inits = {"zero": _i64(0), "one": _i64(1), "two": _i64(2), "three": _i64(3)}
    nodes = [H("Shape", ["x"], ["s"]), H("Slice", ["s", "zero", "one"], ["d0"]),
             H("Slice", ["s", "two", "three"], ["d2"]), H("Greater", ["d0", "d2"], ["c"]),
             H("Where", ["c", "d0", "d2"], ["picked"]), H("Concat", ["picked", "one"], ["target"], axis=0),
             H("Reshape", ["x", "target"], ["y"])]
    model = make_model(nodes, [("x", ["N", 1, "N"])], ["y"], inits)
    ir = GraphIR(from_proto(model))
    entries = SizeEvaluator(ir, {}).port_entries(len(ir.nodes) - 1, 1)
    assert entries[0].base is None and entries[0].dim_of is None
