"""Channel routing regions: layers whose channels are shuffled, not shared.

ShuffleNetV2 concatenates two branches, interleaves their channels (Reshape
[N, 2, C/2, H, W] -> Transpose -> Reshape), and the next block splits the
result in halves: one half passes on untouched, the other feeds a branch.
Units here are not one space copied everywhere (coupling.py's model): each
channel is *routed*, and where it ends (which later convolution reads it)
depends on the width. So the whole stage grows together:

* the region: every tensor reachable from the seed layer through routing ops
  (Concat, Split, Slice, Reshape, Transpose, per-channel ops such as Relu,
  BatchNormalization, depthwise Conv, pooling), the weighted layers writing
  into it (all of width h) and the weighted layers reading it;
* the routing, found by running it: a small model of the region's routing
  ops, fed with each channel's label as its value (per-channel ops become
  identities), gives the label at every position a reader sees, at the old
  width h and at a new width h'. Dynamic shapes (Shape -> Div -> Reshape,
  Split by num_outputs) route exactly as they will at run time;
* the fate of a channel: the set of reading layers it reaches. At width h',
  every old channel is given a new slot of its writer with the same fate (a
  copy keeps its function), extra slots of a fate copy channels of that fate
  (Net2Net: the readers divide), and slots of a fate no old channel had are
  read with weight 0. A width where some fate has fewer slots than channels
  is refused.

Everything outside the region is untouched, and the result is verified by
the caller like any other widening.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .coupling import ELEMENTWISE_UNARY, UnitGroup, layer_width, seed_placement
from .ir import GraphIR, node_attr

LABEL_BASE = 1 << 12      # label of channel c of writer k: k * LABEL_BASE + c + 1 (exact in float32)
_ROUTING = frozenset("Concat Split Slice Reshape Transpose Flatten Squeeze Unsqueeze".split())
_PER_CHANNEL = frozenset("BatchNormalization MaxPool AveragePool GlobalAveragePool GlobalMaxPool".split())


class RoutingRefused(Exception):
    """Not a region this module can grow, or not at this width (the reason)."""


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


@dataclass
class RoutedGroup(UnitGroup):
    """A channel routing region seen as a group (see the module docstring)."""

    region: Region | None = None
    old_routing: Routing | None = None
    old_fates: dict | None = None
    feasible: dict[int, str | None] = field(default_factory=dict)     # width -> why not (None: it routes)
    routings: dict[int, Routing] = field(default_factory=dict)         # width -> its routing, once run


#: Regions found per IR view (a view never changes; a rewrite builds a new one).
_REGIONS: "weakref.WeakKeyDictionary[GraphIR, list[RoutedGroup]]" = weakref.WeakKeyDictionary()


def find_routed_group(ir: GraphIR, layer: int) -> tuple[UnitGroup | None, str | None]:
    """The routing region of `layer`, or (None, why it cannot grow as one)."""
    known = _REGIONS.setdefault(ir, [])
    for group in known:
        if layer in group.producers or layer in group.passthrough:
            return group, None
    try:
        region = _discover(ir, layer)
        old = simulate(ir, region, region.width)
    except RoutingRefused as refused:
        return None, str(refused)
    group = RoutedGroup(seed=layer, size=region.width, region=region, old_routing=old,
                        producers=list(region.writers),
                        passthrough=[i for i in region.per_channel_tensors(ir) if ir.nodes[i].op_type == "Conv"])
    group.ops = {ir.nodes[i].op_type for i in region.routing}
    for writer in region.writers:
        group.placements[ir.nodes[writer].output[0]] = seed_placement(ir, writer)
    step = _step(ir, group)
    if step is None:
        return None, f"no width up to {min(2 * region.width, region.width + MAX_WIDTHS_LISTED)} routes"
    group.step = step
    known.append(group)
    return group, None


def check_width(ir: GraphIR, group: RoutedGroup, width: int) -> str | None:
    """Why the region cannot grow to `width` (None: it can)."""
    if width not in group.feasible:
        prefetch(ir, group, [width])
    return group.feasible[width]


def prefetch(ir: GraphIR, group: RoutedGroup, widths) -> None:
    """Decide many widths with one routing run (see `simulate_many`)."""
    wanted = [w for w in dict.fromkeys(widths) if w not in group.feasible]
    if not wanted:
        return
    found = simulate_many(ir, group.region, wanted) if len(wanted) > 1 else {
        wanted[0]: _simulate_or_refusal(ir, group.region, wanted[0])}
    for width in wanted:
        new = found[width]
        try:
            if isinstance(new, RoutingRefused):
                raise new
            assign(group, new, width, np.random.default_rng(0))
            group.routings[width] = new
            group.feasible[width] = None
        except RoutingRefused as refused:
            group.feasible[width] = str(refused)


def _simulate_or_refusal(ir: GraphIR, region: Region, width: int) -> Routing | RoutingRefused:
    try:
        return simulate(ir, region, width)
    except RoutingRefused as refused:
        return refused


def _step(ir: GraphIR, group: RoutedGroup) -> int | None:
    """1 when every width tried routes (the next three, 1.5x, 2x); else the
    smallest increment that routes, with `valid_widths` telling the others."""
    h = group.size
    tried = [h + 1, h + 2, h + 3, (3 * h + 1) // 2, 2 * h]
    prefetch(ir, group, tried)
    if all(check_width(ir, group, w) is None for w in tried):
        return 1
    last = min(2 * h, h + MAX_WIDTHS_LISTED)
    for start in range(h + 1, last + 1, _PREFETCH_CHUNK):  # in chunks: the first width that routes ends it
        prefetch(ir, group, range(start, min(start + _PREFETCH_CHUNK, last + 1)))
        if any(group.feasible[w] is None for w in range(start, min(start + _PREFETCH_CHUNK, last + 1))):
            break
    first = next((w for w in range(h + 1, last + 1) if check_width(ir, group, w) is None), None)
    return None if first is None else first - h


#: Widths decided per routing run while searching for the smallest step.
_PREFETCH_CHUNK = 8
#: Widths tried when listing the valid ones (each is a run of the routing).
MAX_WIDTHS_LISTED = 128


def valid_widths(ir: GraphIR, group: RoutedGroup, factor: int = 2) -> list[int]:
    """The widths up to `factor` times the current one (at most
    MAX_WIDTHS_LISTED of them) at which the region routes."""
    last = min(factor * group.size, group.size + MAX_WIDTHS_LISTED)
    prefetch(ir, group, range(group.size + 1, last + 1))
    return [w for w in range(group.size + 1, last + 1) if check_width(ir, group, w) is None]


def nearest_width(ir: GraphIR, group: RoutedGroup, wanted: int, multiple: int = 1) -> int | None:
    """The first width that routes from `wanted` up, else down (multiples of
    `multiple` only), trying at most MAX_WIDTHS_LISTED widths."""
    up = range(wanted, 4 * group.size + 1)
    down = range(wanted - 1, group.size, -1)
    candidates = [w for w in list(up) + list(down) if w % multiple == 0][:MAX_WIDTHS_LISTED]
    prefetch(ir, group, candidates)
    return next((w for w in candidates if check_width(ir, group, w) is None), None)


def describe_valid_widths(ir: GraphIR, group: RoutedGroup) -> str:
    """'widths that route: 57-64 (checked up to 96)'."""
    last = min(2 * group.size, group.size + MAX_WIDTHS_LISTED)
    return f"widths that route: {width_ranges(valid_widths(ir, group)) or 'none'} (checked up to {last})"


def width_ranges(widths: list[int]) -> str:
    """[57, 58, 59, 60, 97] -> '57-60, 97'."""
    runs, start = [], None
    for k, w in enumerate(widths):
        start = w if start is None else start
        if k + 1 == len(widths) or widths[k + 1] != w + 1:
            runs.append(f"{start}-{w}" if w > start else f"{w}")
            start = None
    return ", ".join(runs)


# ----------------------------------------------------------------------------
# Discovery


def _discover(ir: GraphIR, seed: int) -> Region:
    """Every tensor, writer, reader and routing op connected to `seed` (a
    writer, or a depthwise convolution inside the region)."""
    if _is_writer(ir, seed):
        writers, routing = {seed}, set()
    elif _is_routing(ir, seed):
        writers, routing = set(), {seed}
    else:
        raise RoutingRefused("not a plain convolution, dense layer or depthwise convolution")
    readers, tensors, width = [], set(), layer_width(ir, seed) if writers else None
    queue = [ir.nodes[seed].output[0]] + ([ir.nodes[seed].input[0]] if routing else [])
    while queue:
        tensor = queue.pop()
        if tensor in tensors:
            continue
        tensors.add(tensor)
        if tensor in ir.graph_outputs or tensor in ir.graph_inputs:
            raise RoutingRefused("reaches a graph input or output")
        producer = ir.producer_node(tensor)
        if producer is not None and producer not in writers and producer not in routing:
            if _is_writer(ir, producer) and ir.nodes[producer].output[0] == tensor:
                width = width or layer_width(ir, producer)
                if layer_width(ir, producer) != width:
                    raise RoutingRefused("writers of different widths")
                writers.add(producer)
            elif _is_routing(ir, producer):
                routing.add(producer)
                queue += _data_inputs(ir, producer) + [o for o in ir.nodes[producer].output if o]
            else:
                raise RoutingRefused(f"{ir.nodes[producer].op_type} writes into the region")
        for use in ir.uses(tensor):
            node = ir.nodes[use.node]
            if use.port < 0:
                raise RoutingRefused("read inside a subgraph")
            if node.op_type in ("Shape", "Size"):
                continue
            if _is_reader(ir, use.node, use.port):
                readers.append((use.node, use.port))
            elif _is_routing(ir, use.node) and tensor in _data_inputs(ir, use.node):
                routing.add(use.node)
                queue += _data_inputs(ir, use.node) + [o for o in node.output if o]
            else:
                raise RoutingRefused(f"{node.op_type} reads the region")
    if not writers or not readers:
        raise RoutingRefused("no layer writes or reads the region")
    order = {index: position for position, index in enumerate(ir.topological_order())}
    routing_sorted = sorted(routing, key=order.__getitem__)
    support = _support_nodes(ir, routing_sorted, tensors)
    return Region(sorted(writers, key=order.__getitem__), sorted(set(readers)), routing_sorted,
                  sorted(support, key=order.__getitem__), tensors, width,
                  {ir.nodes[node].input[port] for node, port in readers})


def _is_writer(ir: GraphIR, index: int) -> bool:
    node = ir.nodes[index]
    if len(node.input) < 2 or not ir.is_const(node.input[1]):
        return False
    if node.op_type == "Conv":
        return int(node_attr(node, "group", 1)) == 1
    return node.op_type == "Gemm" and not node_attr(node, "transA", 0)


def _is_reader(ir: GraphIR, index: int, port: int) -> bool:
    return port == 0 and _is_writer(ir, index)


def _is_routing(ir: GraphIR, index: int) -> bool:
    node = ir.nodes[index]
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Conv":
        weight = ir.const_value(node.input[1]) if len(node.input) > 1 else None
        groups = int(node_attr(node, "group", 1))
        return weight is not None and groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1
    if node.op_type in ("Dropout", "BatchNormalization", "MaxPool") and len([o for o in node.output if o]) > 1:
        return False
    return node.op_type in _ROUTING | _PER_CHANNEL or node.op_type in ELEMENTWISE_UNARY


def _data_inputs(ir: GraphIR, index: int) -> list[str]:
    node = ir.nodes[index]
    if node.op_type == "Concat":
        return [name for name in node.input if name]
    return [node.input[0]]


def _support_nodes(ir: GraphIR, routing: list[int], tensors: set[str]) -> set[int]:
    """Nodes computing the non-constant shape inputs of routing ops."""
    support, stack = set(), []
    for index in routing:
        data = set(_data_inputs(ir, index))
        stack += [name for name in ir.nodes[index].input[1:] if name and name not in data and not ir.is_const(name)]
    while stack:
        producer = ir.producer_node(stack.pop())
        if producer is None:
            raise RoutingRefused("a shape input comes from a graph input")
        if producer in support or producer in routing:
            continue
        support.add(producer)
        node = ir.nodes[producer]
        if node.op_type in ("Shape", "Size"):
            if node.input[0] not in tensors:
                raise RoutingRefused("a shape input reads a tensor outside the region")
            continue
        stack += [name for name in node.input if name and not ir.is_const(name)]
    return support


# ----------------------------------------------------------------------------
# Simulation: run the routing on channel labels


def simulate(ir: GraphIR, region: Region, width: int) -> Routing:
    """Labels along axis 1 of every tensor a reader or per-channel op sees,
    with every writer at `width` channels."""
    graph = _simulation_graph(ir, region, width)
    values = _run_simulation(ir, [graph], f"at width {width}")
    return _routing(graph, values, width)


def simulate_many(ir: GraphIR, region: Region, widths: list[int]) -> dict[int, Routing | RoutingRefused]:
    """`simulate` at many widths with one onnxruntime session: the routing
    graph once per width (names suffixed), side by side in one model. If the
    combined model fails, each width runs alone (so one failing width cannot
    hide the others)."""
    results, graphs = {}, []
    for width in widths:
        try:
            graphs.append(_simulation_graph(ir, region, width, suffix=f"@w{width}"))
        except RoutingRefused as refused:
            results[width] = refused
    if len(graphs) > 1:
        try:
            values = _run_simulation(ir, graphs, "together")
        except RoutingRefused:
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
        except RoutingRefused as refused:
            results[graph["width"]] = refused
    return results


def _routing_or_refusal(graph: dict, values: list) -> Routing | RoutingRefused:
    try:
        return _routing(graph, values, graph["width"])
    except RoutingRefused as refused:
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
            raise RoutingRefused("the spatial size of a writer's output is unknown")
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
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        # Labels are only moved, never combined: optimisations cannot change them and cost most of the time.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run([o.name for o in outputs], feeds)
    except Exception as error:  # noqa: BLE001 - any failure means: this width does not route
        raise RoutingRefused(f"the routing does not run {where} ({type(error).__name__})") from None


def _routing(graph: dict, values: list, width: int) -> Routing:
    labels = {}
    for name, value in zip(graph["watched"], values):
        if value.ndim < 2 or value.shape[1] == 0:
            raise RoutingRefused(f"at width {width}, a reader gets no channels")
        along = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
        if not np.all(along == along[:, :1]):
            raise RoutingRefused("a routing op mixes positions")
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
        return np.array([_scale(int(v), old, new) for v in value], dtype=value.dtype)
    if node.op_type == "Slice" and port in (1, 2):
        axes = ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(value))
        rank = len(ir.shape(node.input[0]) or ())
        out = value.copy()
        length = (ir.shape(node.input[0]) or (None, None))[1]
        for k, axis in enumerate(axes):
            if int(axis) % max(rank, 1) == 1:
                bound = int(value[k])
                if bound < 0:
                    raise RoutingRefused("a slice bound counted from the end")
                if length is None or bound <= length:  # larger ends are clamped: they stay
                    out[k] = _scale(bound, old, new)
        return out
    return value


def _scaled_reshape(ir: GraphIR, index: int, value: np.ndarray, old: int, new: int) -> np.ndarray:
    """Reshape target dims covering the input's channel axis, at the new width."""
    from .coupling import _reshape_segments

    node = ir.nodes[index]
    src, dst = ir.shape(node.input[0]), ir.shape(node.output[0])
    segments = _reshape_segments(src, dst) if src and dst else None
    if segments is None:
        raise RoutingRefused("a reshape with unknown shapes")
    out = value.copy()
    for (i0, i1), (j0, j1) in segments:
        if not i0 <= 1 < i1:
            continue
        if j1 - j0 == 1:
            if int(value[j0]) > 0:
                out[j0] = _scale(int(value[j0]), old, new)
        else:
            last = j1 - 1  # [groups, C / groups]: the groups stay, the last dim grows
            if int(value[last]) > 0:
                out[last] = _scale(int(value[last]), old, new)
    return out


def _scale(count: int, old: int, new: int) -> int:
    if count * new % old:
        raise RoutingRefused(f"{count} channels do not scale from width {old} to {new}")
    return count * new // old


# ----------------------------------------------------------------------------
# Assignment: which old channel each new slot carries


@dataclass
class Assignment:
    """For writer k and new slot j: the old channel it copies, or -1 (read
    with weight 0 everywhere)."""

    source: dict[int, np.ndarray]


def assign(group: RoutedGroup, new: Routing, width: int, rng: np.random.Generator,
           replicate: bool = True) -> Assignment:
    """Give every old channel a new slot with the same fate (see the module
    docstring); extra slots copy a channel of their fate (`replicate`) or
    carry nothing (read with weight 0)."""
    region = group.region
    if group.old_fates is None:
        group.old_fates = _fates_from(region, group.old_routing)
    old_fates, new_fates = group.old_fates, _fates_from(region, new)
    source = {}
    for number in range(len(region.writers)):
        by_fate_old: dict[frozenset, list[int]] = {}
        for c in range(region.width):
            by_fate_old.setdefault(old_fates.get(label_of(number, c), frozenset()), []).append(c)
        by_fate_new: dict[frozenset, list[int]] = {}
        for j in range(width):
            by_fate_new.setdefault(new_fates.get(label_of(number, j), frozenset()), []).append(j)
        chosen = np.full(width, -1, dtype=np.int64)
        for fate, channels in by_fate_old.items():
            slots = by_fate_new.get(fate, [])
            if len(slots) < len(channels):
                raise RoutingRefused(f"at width {width}, {len(slots)} channels reach what {len(channels)} did")
            chosen[slots[:len(channels)]] = channels
            extra = slots[len(channels):]
            if extra and fate and replicate:
                chosen[extra] = rng.choice(channels, size=len(extra))
        source[number] = chosen
    return Assignment(source)


def _fates_from(region: Region, routing: Routing) -> dict[int, frozenset]:
    found: dict[int, set] = {}
    for tensor, labels in routing.labels.items():
        if tensor not in region.reader_tensors:
            continue
        for label in labels:
            found.setdefault(int(label), set()).add(tensor)
    return {label: frozenset(tensors) for label, tensors in found.items()}


def label_of(number: int, channel: int) -> int:
    return number * LABEL_BASE + channel + 1
