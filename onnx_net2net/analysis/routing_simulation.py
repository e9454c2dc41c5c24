"""Running a routing region on channel labels, at any width.

A channel routing region (routing.py) is a set of routing ops (Concat,
Split, Slice, Reshape, Transpose, ...) and per-channel ops between writers
and readers. Channel c of writer k carries the label k * LABEL_BASE + c + 1
(exact in float32). A small model of the region, fed with each channel's
label as its value (per-channel ops become identities, depthwise
convolutions and average pools become max pools over the same windows),
gives the label at every position a reader or per-channel op sees: the
`Routing` of the region at that width. Constant shape inputs that count
channels (Reshape dims, Split sizes, Slice bounds on axis 1) take their
values at the new width h' (`scaled_constant`: count * h' / h); dynamic
ones route exactly as they will at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir import GraphIR, node_attr
from ..ops import ELEMENTWISE_UNARY
from ..sessions import ModelRunError, make_session, run_session
from .refusal import Refusal, RefusalKind
from .shape_algebra import reshape_segments

LABEL_BASE = 1 << 12      # label of channel c of writer k: k * LABEL_BASE + c + 1 (exact in float32)


@dataclass
class Region:
    """The tensors, writers, readers and routing ops of a channel routing region."""

    writers: list[int]                      # weighted layers writing channels into the region
    readers: list[tuple[int, int]]          # (node, port) of weighted layers reading a region tensor
    routing: list[int]                      # routing and per-channel nodes, in topological order
    support: list[int]                      # nodes computing their shape inputs (Shape, Gather, ...)
    tensors: set[str]
    width: int                              # the writers' width
    reader_tensors: set[str] = field(default_factory=set)

    def per_channel_tensors(self, ir: GraphIR) -> dict[int, str]:
        """Per-channel ops with parameters -> the region tensor they read."""
        found = {}
        for index in self.routing:
            node = ir.nodes[index]
            if node.op_type in ("BatchNormalization", "Conv"):
                found[index] = node.input[0]
        return found


@dataclass
class Routing:
    """Labels along axis 1 of each watched tensor, at some width."""

    labels: dict[str, np.ndarray]


def simulate(ir: GraphIR, region: Region, width: int) -> Routing:
    """Labels along axis 1 of every tensor a reader or per-channel op sees,
    with every writer at `width` channels."""
    graph = _simulation_graph(ir, region, width)
    values = _run_simulation(ir, [graph], f"at width {width}")
    return _routing(graph, values, width)


def simulate_many(ir: GraphIR, region: Region, widths: list[int]) -> dict[int, Routing | Refusal]:
    """`simulate` at many widths with one onnxruntime session: the routing
    graph once per width (names suffixed), side by side in one model. If the
    combined model fails, each width runs alone (so one failing width cannot
    hide the others)."""
    results, graphs = {}, []
    for width in widths:
        try:
            graphs.append(_simulation_graph(ir, region, width, suffix=f"@w{width}"))
        except Refusal as refused:
            results[width] = refused
    if len(graphs) > 1:
        try:
            values = _run_simulation(ir, graphs, "together")
        except Refusal:
            values = None
        if values is not None:
            start = 0
            for graph in graphs:
                count = len(graph["watched"])
                results[graph["width"]] = _routing_or_refusal(graph, values[start:start + count])
                start += count
            return results
    for graph in graphs:
        try:
            results[graph["width"]] = _routing(graph, _run_simulation(ir, [graph], f"at width {graph['width']}"),
                                               graph["width"])
        except Refusal as refused:
            results[graph["width"]] = refused
    return results


def _routing_or_refusal(graph: dict, values: list) -> Routing | Refusal:
    try:
        return _routing(graph, values, graph["width"])
    except Refusal as refused:
        return refused


def _simulation_graph(ir: GraphIR, region: Region, width: int, suffix: str = "") -> dict:
    """The routing region at `width` as nodes, constants, inputs and feeds;
    every name carries `suffix` (so several widths fit in one model)."""
    watched = sorted({ir.nodes[node].input[port] for node, port in region.readers}
                     | set(region.per_channel_tensors(ir).values()))
    nodes, inits = [], {}
    for index in sorted(region.routing + region.support):
        nodes.append(_simulation_node(ir, index, region, width, inits))
    inputs, feeds = [], {}
    for number, writer in enumerate(region.writers):
        name = ir.nodes[writer].output[0]
        shape = ir.shape(name)
        if shape is None or any(d is None for d in shape[2:]):
            raise _refused("the spatial size of a writer's output is unknown")
        dims = [shape[0] or 1, width] + list(shape[2:])
        labels = number * LABEL_BASE + np.arange(width, dtype=np.float32) + 1
        feeds[name + suffix] = np.broadcast_to(labels.reshape([1, width] + [1] * (len(dims) - 2)),
                                               dims).astype(np.float32)
        inputs.append(helper.make_tensor_value_info(name + suffix, onnx.TensorProto.FLOAT, dims))
    if suffix:
        for node in nodes:
            node.input[:] = [n + suffix if n else n for n in node.input]
            node.output[:] = [n + suffix if n else n for n in node.output]
            node.name = node.name + suffix if node.name else node.name
        inits = {k + suffix: v for k, v in inits.items()}
    return dict(width=width, nodes=nodes, inits=inits, inputs=inputs, feeds=feeds, watched=watched,
                outputs=[name + suffix for name in watched])


def _run_simulation(ir: GraphIR, graphs: list[dict], where: str) -> list:
    nodes = [n for g in graphs for n in g["nodes"]]
    inputs = [i for g in graphs for i in g["inputs"]]
    outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for g in graphs for name in g["outputs"]]
    inits = [numpy_helper.from_array(v, k) for g in graphs for k, v in g["inits"].items()]
    graph = helper.make_graph(nodes, "routing", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(ir.handle.proto.opset_import), ir_version=ir.handle.proto.ir_version)
    feeds = {k: v for g in graphs for k, v in g["feeds"].items()}
    try:
        session = make_session(model, ["CPUExecutionProvider"])
        return run_session(session, feeds, [o.name for o in outputs])
    except ModelRunError as error:  # any failure means: this width does not route
        raise _refused(f"the routing does not run {where} ({error.kind})") from None


def _routing(graph: dict, values: list, width: int) -> Routing:
    labels = {}
    for name, value in zip(graph["watched"], values):
        if value.ndim < 2 or value.shape[1] == 0:
            raise _refused(f"at width {width}, a reader gets no channels")
        along = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
        if not np.all(along == along[:, :1]):
            raise _refused("a routing op mixes positions")
        labels[name] = along[:, 0].astype(np.int64)
    return Routing(labels)


def _simulation_node(ir: GraphIR, index: int, region: Region, width: int, inits: dict) -> onnx.NodeProto:
    """The node as it routes labels: per-channel ops keep positions only;
    constant shape inputs take their values at `width`."""
    node = ir.nodes[index]
    if node.op_type in ("BatchNormalization", "Dropout") or node.op_type in ELEMENTWISE_UNARY:
        return helper.make_node("Identity", [node.input[0]], [node.output[0]])
    if node.op_type in ("Conv", "AveragePool"):  # depthwise conv / average: same positions as a MaxPool
        kernel = node_attr(node, "kernel_shape") or list(ir.const_value(node.input[1]).shape[2:])
        attrs = {k: node_attr(node, k) for k in ("strides", "pads", "dilations", "auto_pad", "ceil_mode")
                 if node_attr(node, k) is not None}
        return helper.make_node("MaxPool", [node.input[0]], [node.output[0]], kernel_shape=kernel, **attrs)
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for port, name in enumerate(copy.input):
        if port == 0 or not name or not ir.is_const(name):
            continue
        value = scaled_constant(ir, index, port, region.width, width)
        const_name = f"{name}@{index}.{port}"
        inits[const_name] = value
        copy.input[port] = const_name
    return copy


def scaled_constant(ir: GraphIR, index: int, port: int, old: int, new: int) -> np.ndarray:
    """A routing op's constant shape input at writer width `new`: entries that
    count channels (Reshape dims, Split sizes, Slice bounds on axis 1) scale."""
    node = ir.nodes[index]
    value = ir.const_value(node.input[port]).copy()
    if old == new or node.op_type in ("Transpose", "Squeeze", "Unsqueeze") or value.dtype.kind not in "iu":
        return value
    if node.op_type == "Reshape":
        return _scaled_reshape(ir, index, value, old, new)
    if node.op_type == "Split":
        return np.array([_scale_count(int(v), old, new) for v in value], dtype=value.dtype)
    if node.op_type == "Slice" and port in (1, 2):
        axes = ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(value))
        rank = len(ir.shape(node.input[0]) or ())
        out = value.copy()
        length = (ir.shape(node.input[0]) or (None, None))[1]
        for k, axis in enumerate(axes):
            if int(axis) % max(rank, 1) == 1:
                bound = int(value[k])
                if bound < 0:
                    raise _refused("a slice bound counted from the end")
                if length is None or bound <= length:  # larger ends are clamped: they stay
                    out[k] = _scale_count(bound, old, new)
        return out
    return value


def _scaled_reshape(ir: GraphIR, index: int, value: np.ndarray, old: int, new: int) -> np.ndarray:
    """Reshape target dims covering the input's channel axis, at the new width."""
    node = ir.nodes[index]
    src, dst = ir.shape(node.input[0]), ir.shape(node.output[0])
    segments = reshape_segments(src, dst) if src and dst else None
    if segments is None:
        raise _refused("a reshape with unknown shapes")
    out = value.copy()
    for (i0, i1), (j0, j1) in segments:
        if not i0 <= 1 < i1:
            continue
        if j1 - j0 == 1:
            if int(value[j0]) > 0:
                out[j0] = _scale_count(int(value[j0]), old, new)
        else:
            last = j1 - 1  # [groups, C / groups]: the groups stay, the last dim grows
            if int(value[last]) > 0:
                out[last] = _scale_count(int(value[last]), old, new)
    return out


def _scale_count(count: int, old: int, new: int) -> int:
    if count * new % old:
        raise _refused(f"{count} channels do not scale from width {old} to {new}")
    return count * new // old


def label_of(number: int, channel: int) -> int:
    """The label of channel `channel` of writer `number`."""
    return number * LABEL_BASE + channel + 1


def _refused(reason: str) -> Refusal:
    return Refusal(reason, RefusalKind.NOT_ROUTABLE)
