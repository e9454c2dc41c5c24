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

Those constants are inputs of the small model, so one onnxruntime session
per region runs every width, and each routing found is kept, keyed by
everything the run depends on (`Simulation`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir import GraphIR, node_attr
from ..ops import ELEMENTWISE_UNARY
from ..sessions import ModelRunError, make_session, run_session
from .refined_shapes import refined_shape
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
    simulation: Simulation | None = field(default=None, repr=False, compare=False)  # built on first use

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
    found = simulate_many(ir, region, [width])[width]
    if isinstance(found, Refusal):
        raise found
    return found


def simulate_many(ir: GraphIR, region: Region, widths: list[int]) -> dict[int, Routing | Refusal]:
    """`simulate` at many widths, a refusal where a width does not route; one
    onnxruntime session serves them all (see `Simulation`)."""
    if region.simulation is None:
        region.simulation = Simulation(ir, region)
    return {width: region.simulation.routing_at(ir, width) for width in widths}


def simulate_alone(ir: GraphIR, region: Region, width: int) -> Routing:
    """`simulate` with a model of its own: the routing graph at `width`, its
    constants inlined (what `Simulation` falls back to)."""
    simulation = region.simulation or Simulation(ir, region)
    constants, dims = simulation.feeds_at(ir, width)
    return simulation.run_alone(width, constants, dims)


#: Routings found (or why a width does not route), by simulation model and
#: feeds; the oldest go first beyond this many.
ROUTINGS_KEPT = 4096
#: onnxruntime sessions kept, by simulation model (one per region).
SESSIONS_KEPT = 16
_ROUTINGS: OrderedDict[tuple, Routing | str] = OrderedDict()
_SESSIONS: OrderedDict[bytes, object] = OrderedDict()


class Simulation:
    """A region's routing as one onnxruntime model for every width.

    The width-dependent constants (Reshape dims, Split sizes, Slice bounds:
    `scaled_constant`) and the writers' labels are inputs of the model, so one
    session runs every width. Routings are kept process-wide, keyed by the
    model's bytes, the width, the writers' shapes and the constants' values
    (everything a run depends on): the same region in a later index of the
    model (after a rewrite elsewhere) runs nothing again, and a region whose
    routing changed has other bytes or other feeds. A width the shared model
    cannot run runs alone (`run_alone`), so its refusal gives onnxruntime's
    reason for that width's own model. It holds no GraphIR (the index is
    passed in): a region kept per index (routing._REGIONS, weak keys) must
    not keep its index alive.
    """

    def __init__(self, ir: GraphIR, region: Region):
        self.region = region
        self.opsets, self.ir_version = list(ir.handle.proto.opset_import), ir.handle.proto.ir_version
        self.watched = sorted({ir.nodes[node].input[port] for node, port in region.readers}
                              | set(region.per_channel_tensors(ir).values()))
        self.writers = [ir.nodes[writer].output[0] for writer in region.writers]
        self.nodes, self.constants = [], []
        for index in sorted(region.routing + region.support):
            self.nodes.append(_simulation_node(ir, index, self.constants))
        inputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in self.writers]
        for name, index, port in self.constants:
            dtype = helper.np_dtype_to_tensor_dtype(ir.const_value(ir.nodes[index].input[port]).dtype)
            inputs.append(helper.make_tensor_value_info(name, dtype, None))
        self.inputs = inputs
        self.key = hashlib.sha256(self._model(inputs, {}).SerializeToString(
            deterministic=True)).digest()

    def feeds_at(self, ir: GraphIR, width: int) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        """The constants at `width` and the writers' output dims.

        Raises:
            Refusal: a constant does not scale to `width`, or a writer's
                spatial size is unknown.
        """
        constants = {name: scaled_constant(ir, index, port, self.region.width, width)
                     for name, index, port in self.constants}
        dims = []
        for name in self.writers:
            shape = refined_shape(ir, name)
            if shape is None or any(d is None for d in shape[2:]):
                raise _refused("the spatial size of a writer's output is unknown")
            dims.append([shape[0] or 1, width] + list(shape[2:]))
        return constants, dims

    def routing_at(self, ir: GraphIR, width: int) -> Routing | Refusal:
        """The routing at `width`, or why it does not route."""
        try:
            constants, dims = self.feeds_at(ir, width)
        except Refusal as refused:
            return refused
        key = (self.key, width, tuple(map(tuple, dims)),
               tuple((name, value.dtype.str, value.shape, value.tobytes()) for name, value in constants.items()))
        found = _ROUTINGS.get(key)
        if found is None:
            try:
                found = self._run_shared(width, constants, dims)
            except Refusal as refused:
                found = refused.reason
            _keep(_ROUTINGS, key, found, ROUTINGS_KEPT)
        return found if isinstance(found, Routing) else _refused(found)

    def _run_shared(self, width: int, constants: dict, dims: list[list[int]]) -> Routing:
        session = self._session()
        if session is not None:
            try:
                values = run_session(session, {**constants, **_labels(self.writers, dims, width)}, self.watched)
            except ModelRunError:
                pass
            else:
                return _routing(self.watched, values, width)
        return self.run_alone(width, constants, dims)

    def _session(self):
        """The shared model's session (None: onnxruntime cannot load it)."""
        if self.key not in _SESSIONS:
            model = self._model(self.inputs, {})
            try:
                session = make_session(model, ["CPUExecutionProvider"], threads=1)
            except ModelRunError:
                session = None
            _keep(_SESSIONS, self.key, session, SESSIONS_KEPT)
        _SESSIONS.move_to_end(self.key)
        return _SESSIONS[self.key]

    def run_alone(self, width: int, constants: dict, dims: list[list[int]]) -> Routing:
        """The routing at `width` from a model of its own, constants inlined.

        Raises:
            Refusal: the model does not run, or does not route.
        """
        inputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
                  for name, shape in zip(self.writers, dims)]
        model = self._model(inputs, constants)
        try:
            session = make_session(model, ["CPUExecutionProvider"], threads=1)
            values = run_session(session, _labels(self.writers, dims, width), self.watched)
        except ModelRunError as error:  # any failure means: this width does not route
            raise _refused(f"the routing does not run at width {width} ({error.kind})") from None
        return _routing(self.watched, values, width)

    def _model(self, inputs: list, constants: dict) -> onnx.ModelProto:
        """The routing model with these inputs, `constants` inlined."""
        outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in self.watched]
        graph = helper.make_graph(self.nodes, "routing", inputs, outputs,
                                  initializer=[numpy_helper.from_array(v, k) for k, v in constants.items()])
        return helper.make_model(graph, opset_imports=self.opsets, ir_version=self.ir_version)


def _keep(table: OrderedDict, key, value, limit: int) -> None:
    table[key] = value
    while len(table) > limit:
        table.popitem(last=False)


def _labels(writers: list[str], dims: list[list[int]], width: int) -> dict[str, np.ndarray]:
    """Each writer's output with channel c of writer k labelled `label_of(k, c)`."""
    feeds = {}
    for number, (name, shape) in enumerate(zip(writers, dims)):
        labels = number * LABEL_BASE + np.arange(width, dtype=np.float32) + 1
        feeds[name] = np.broadcast_to(labels.reshape([1, width] + [1] * (len(shape) - 2)),
                                      shape).astype(np.float32)
    return feeds


def _routing(watched: list[str], values: list, width: int) -> Routing:
    labels = {}
    for name, value in zip(watched, values):
        if value.ndim < 2 or value.shape[1] == 0:
            raise _refused(f"at width {width}, a reader gets no channels")
        along = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
        if not np.all(along == along[:, :1]):
            raise _refused("a routing op mixes positions")
        labels[name] = along[:, 0].astype(np.int64)
        labels[name].setflags(write=False)  # routings are kept and shared (`Simulation`)
    return Routing(labels)


def _simulation_node(ir: GraphIR, index: int, constants: list) -> onnx.NodeProto:
    """The node as it routes labels: per-channel ops keep positions only;
    constant shape inputs become inputs (appended to `constants` as (input
    name, node, port)), which take their values at each width."""
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
        const_name = f"{name}@{index}.{port}"
        constants.append((const_name, index, port))
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
        rank = len(refined_shape(ir, node.input[0]) or ())
        out = value.copy()
        length = (refined_shape(ir, node.input[0]) or (None, None))[1]
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
    src, dst = refined_shape(ir, node.input[0]), refined_shape(ir, node.output[0])
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
