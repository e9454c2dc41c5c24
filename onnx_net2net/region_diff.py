"""Diffing two models into the region a rewrite changed (`find_region`).

Each graph is indexed once (producers, consumers, initializers). Nodes with no
identical twin in the other graph, and the readers of initializers whose type,
shape or bytes differ, seed the region; it is then closed over the tensors
between its seeds, jointly in both graphs. Weights are compared without being
read when both sides refer to the same bytes of the same file, and otherwise
streamed in chunks. Why agreement on the region implies agreement of the
models, and the conditions, is in `region`'s docstring.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from . import io
from .errors import UserError

_COMPARE_CHUNK = 16 << 20


class RegionUnavailable(Exception):
    """Region verification cannot decide this pair; the reason says why (full verification then runs)."""


@dataclass
class IndexedGraph:
    """One model's graph, indexed once: producers, consumers, initializers."""

    handle: io.ModelHandle
    nodes: list = field(default_factory=list)
    producer: dict = field(default_factory=dict)      # tensor -> node index
    consumers: dict = field(default_factory=dict)     # tensor -> [node index]
    inits: dict = field(default_factory=dict)         # name -> TensorProto
    outputs: set = field(default_factory=set)

    @classmethod
    def of(cls, handle: io.ModelHandle) -> "IndexedGraph":
        graph = cls(handle, list(handle.graph.node))
        graph.inits = {t.name: t for t in handle.graph.initializer}
        graph.outputs = {o.name for o in handle.graph.output}
        for index, node in enumerate(graph.nodes):
            for name in node.output:
                if name:
                    graph.producer[name] = index
            for name in node_inputs(node):
                graph.consumers.setdefault(name, []).append(index)
        return graph

    def key(self, index: int) -> str:
        """The node's identity across the two graphs: its first non-empty output."""
        return next((o for o in self.nodes[index].output if o), f"#node{index}")


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads, outer-scope names used in its subgraphs included."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            names.extend(_outer_names(graph))
    return names


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used = []
    for node in graph.node:
        used.extend(n for n in node_inputs(node) if n not in local)
        local.update(node.output)
    return used


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _signature(node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute))
    return node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs


@dataclass
class Region:
    """The changed part of both graphs, and how it meets the rest."""

    old_nodes: list[int]
    new_nodes: list[int]
    inputs: list[str]           # boundary inputs (not weights), sorted
    outputs: list[str]          # boundary outputs, in graph order
    changed_weights: list[str]
    old_weight_bytes: int
    new_weight_bytes: int


def find_region(old: io.ModelHandle, new: io.ModelHandle, *, types_old: dict | None = None,
                types_new: dict | None = None, changed: set[str] | None = None) -> Region:
    """Diff two models and close the changed nodes over the tensors between them.

    With the tensors' types (`types_old`, `types_new`), a boundary output whose
    shape differs (say a widened tensor read by a Shape node outside) pulls its
    readers into the region, until every boundary output keeps its shape."""
    g_old, g_new = IndexedGraph.of(old), IndexedGraph.of(new)
    _check_same_interface(old.graph, new.graph)
    changed = _changed_weights(g_old, g_new) if changed is None else changed
    seeds_old = _unmatched(g_old, g_new) | _readers(g_old, changed)
    seeds_new = _unmatched(g_new, g_old) | _readers(g_new, changed)
    while True:
        region_old, region_new = _close_jointly(g_old, g_new, seeds_old, seeds_new)
        pulled_old = _range_producers(g_old, region_old) | _twins(g_new, _range_producers(g_new, region_new), g_old)
        pulled_new = _twins(g_old, pulled_old, g_new)
        if pulled_old - region_old or pulled_new - region_new:
            seeds_old, seeds_new = region_old | pulled_old, region_new | pulled_new
            continue
        outputs_old, outputs_new = _boundary_outputs(g_old, region_old), _boundary_outputs(g_new, region_new)
        if outputs_old != outputs_new:
            raise RegionUnavailable(f"the region's outputs differ between the models "
                                    f"({sorted(set(outputs_old) ^ set(outputs_new))[:5]})")
        reshaped = _reshaped(g_old, g_new, outputs_old, types_old, types_new) if types_old and types_new else []
        if not reshaped:
            break
        if any(name in g_old.outputs for name in reshaped):
            raise RegionUnavailable(f"graph output(s) {reshaped[:3]} change shape")
        seeds_old = region_old | {r for n in reshaped for r in g_old.consumers.get(n, []) if r not in region_old}
        seeds_new = region_new | {r for n in reshaped for r in g_new.consumers.get(n, []) if r not in region_new}
    inputs = sorted(_boundary_inputs(g_old, region_old) | _boundary_inputs(g_new, region_new))
    return Region(sorted(region_old), sorted(region_new), inputs, outputs_old, sorted(changed),
                  region_weight_bytes(g_old, region_old), region_weight_bytes(g_new, region_new))


#: Ops whose output lies in a restricted range (Relu >= 0, Sigmoid in (0, 1), ...).
RANGE_OPS = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus", "Sqrt", "Tanh",
             "Softsign", "Erf", "Gelu", "HardSwish", "Mish", "Selu", "Elu", "Celu", "ThresholdedRelu"}


#: Ops that keep a restricted range (they move or pick values, or take maxima and means).
RANGE_KEEPING_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                     "Transpose", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Slice", "Concat", "Split",
                     "Expand", "Tile", "ReduceMax", "ReduceMean"}


_RANGE_DEPTH = 8


def _range_producers(graph: IndexedGraph, region: set[int]) -> set[int]:
    """Nodes to pull into the region so that a boundary input coming out of an
    activation (through pooling or reshapes) enters it before the activation.

    An identity layer inserted after a Relu (deepen) is exact because its input
    is >= 0; random values at the Relu's output would be negative too. Starting
    the region before the activation keeps the boundary where any real value
    can occur."""
    pulled = set()
    for name in _boundary_inputs(graph, region):
        path = _path_to_range_op(graph, name)
        if path:
            pulled.update(path)
    return pulled - region


def _path_to_range_op(graph: IndexedGraph, name: str) -> list[int]:
    path = []
    for _ in range(_RANGE_DEPTH):
        index = graph.producer.get(name)
        if index is None:
            return []
        node = graph.nodes[index]
        path.append(index)
        if node.op_type in RANGE_OPS and node.domain in ("", "ai.onnx"):
            return path
        if node.op_type not in RANGE_KEEPING_OPS or not node.input:
            return []
        name = node.input[0]
    return []


def _reshaped(g_old: IndexedGraph, g_new: IndexedGraph, names: list[str], types_old: dict, types_new: dict) -> list[str]:
    """Boundary outputs whose statically known shape differs between the
    models, or that are Shape/Size values that differ."""
    result = []
    for name in names:
        a, b = concrete_dims(types_old.get(name)), concrete_dims(types_new.get(name))
        if a is not None and b is not None and a != b:
            result.append(name)
            continue
        shape_old = shape_constant(g_old.nodes[g_old.producer[name]], types_old) if name in g_old.producer else None
        shape_new = shape_constant(g_new.nodes[g_new.producer[name]], types_new) if name in g_new.producer else None
        if shape_old is not None and shape_new is not None and not np.array_equal(shape_old, shape_new):
            result.append(name)
    return result


def _check_same_interface(old: onnx.GraphProto, new: onnx.GraphProto) -> None:
    def interface(values):
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    if interface(old.output) != interface(new.output):
        raise RegionUnavailable("the models' outputs differ (names or types)")
    inits_old, inits_new = {t.name for t in old.initializer}, {t.name for t in new.initializer}
    inputs_old = [v for v in interface(old.input) if v[0] not in inits_old]
    inputs_new = [v for v in interface(new.input) if v[0] not in inits_new]
    if inputs_old != inputs_new:
        raise RegionUnavailable("the models' inputs differ (names or types)")
    if {i.name for i in old.input} & inits_old or {i.name for i in new.input} & inits_new:
        raise RegionUnavailable("an initializer is also a graph input (an overridable default)")


def _unmatched(graph: IndexedGraph, other: IndexedGraph) -> set[int]:
    """Nodes of `graph` with no identical node (same first output) in `other`."""
    result = set()
    for index, node in enumerate(graph.nodes):
        twin = other.producer.get(graph.key(index))
        if twin is None or _signature(other.nodes[twin]) != _signature(node):
            result.add(index)
    return result


def _readers(graph: IndexedGraph, names: set[str]) -> set[int]:
    return {i for name in names for i in graph.consumers.get(name, [])}


def _changed_weights(old: IndexedGraph, new: IndexedGraph) -> set[str]:
    """Initializers added, removed, or with a different type, shape or bytes."""
    changed = set(old.inits) ^ set(new.inits)
    for name in set(old.inits) & set(new.inits):
        if not _same_tensor(old.handle, old.inits[name], new.handle, new.inits[name]):
            changed.add(name)
    return changed


def _same_tensor(h_old, t_old: TensorProto, h_new, t_new: TensorProto) -> bool:
    if t_old.data_type != t_new.data_type or list(t_old.dims) != list(t_new.dims):
        return False
    external_old = t_old.data_location == TensorProto.EXTERNAL
    external_new = t_new.data_location == TensorProto.EXTERNAL
    if external_old and external_new and _same_location(h_old, t_old, h_new, t_new):
        return True  # the very same bytes on disk: equal without reading them
    if not external_old and not external_new and t_old.HasField("raw_data") and t_new.HasField("raw_data"):
        return t_old.raw_data == t_new.raw_data
    if not external_old and not external_new:
        return t_old.SerializeToString(deterministic=True) == _renamed(t_new, t_old.name)
    return _same_bytes_streamed(h_old, t_old, h_new, t_new)


def _renamed(tensor: TensorProto, name: str) -> bytes:
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy.SerializeToString(deterministic=True)


def _location(handle, tensor) -> tuple:
    info = {e.key: e.value for e in tensor.external_data}
    return handle.external_path(tensor), int(info.get("offset", 0)), io.tensor_nbytes(tensor)


def _same_location(h_old, t_old, h_new, t_new) -> bool:
    return _location(h_old, t_old) == _location(h_new, t_new)


def _same_bytes_streamed(h_old, t_old, h_new, t_new) -> bool:
    """Compare two tensors' bytes in chunks (memory stays bounded)."""
    if io.tensor_nbytes(t_old) != io.tensor_nbytes(t_new):
        return False
    a, b = byte_reader(h_old, t_old), byte_reader(h_new, t_new)
    try:
        for chunk_a, chunk_b in zip(a, b):
            if chunk_a != chunk_b:
                return False
        return True
    finally:
        a.close()
        b.close()


def byte_reader(handle, tensor):
    if tensor.data_location != TensorProto.EXTERNAL:
        data = stored_bytes(handle, tensor)
        for start in range(0, len(data), _COMPARE_CHUNK):
            yield data[start:start + _COMPARE_CHUNK]
        return
    path, offset, length = _location(handle, tensor)
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(length, _COMPARE_CHUNK))
            if not chunk:
                raise UserError(f"external data of '{tensor.name}' is shorter than its shape")
            length -= len(chunk)
            yield chunk


def stored_bytes(handle, tensor) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return np.ascontiguousarray(handle.array(tensor)).tobytes()


def _close_jointly(g_old: IndexedGraph, g_new: IndexedGraph, seeds_old: set[int], seeds_new: set[int]):
    """Close both regions over the tensors between their nodes, mirroring
    every node that joins one region into the other, to a fixed point."""
    region_old, region_new = set(seeds_old), set(seeds_new)
    while True:
        region_old = _between(g_old, region_old)
        region_new = _between(g_new, region_new)
        grown_old = region_old | _twins(g_new, region_new, g_old)
        grown_new = region_new | _twins(g_old, region_old, g_new)
        if grown_old == region_old and grown_new == region_new:
            return region_old, region_new
        region_old, region_new = grown_old, grown_new


def _twins(graph: IndexedGraph, nodes: set[int], other: IndexedGraph) -> set[int]:
    found = (other.producer.get(graph.key(i)) for i in nodes)
    return {i for i in found if i is not None}


def _between(graph: IndexedGraph, seeds: set[int]) -> set[int]:
    """Seeds plus every node on a path between two seeds."""
    if not seeds:
        return set()
    return seeds | (_reachable(graph, seeds, downstream=True) & _reachable(graph, seeds, downstream=False))


def _reachable(graph: IndexedGraph, start: set[int], *, downstream: bool) -> set[int]:
    seen, queue = set(), deque(start)
    while queue:
        index = queue.popleft()
        node = graph.nodes[index]
        if downstream:
            nexts = (c for o in node.output for c in graph.consumers.get(o, []))
        else:
            nexts = (graph.producer[i] for i in node_inputs(node) if i in graph.producer)
        for n in nexts:
            if n not in seen:
                seen.add(n)
                queue.append(n)
    return seen


def _boundary_inputs(graph: IndexedGraph, region: set[int]) -> set[str]:
    produced = {o for i in region for o in graph.nodes[i].output}
    read = {n for i in region for n in node_inputs(graph.nodes[i])}
    return {n for n in read - produced if n not in graph.inits}


def _boundary_outputs(graph: IndexedGraph, region: set[int]) -> list[str]:
    result = []
    for index in sorted(region):
        for name in graph.nodes[index].output:
            readers = graph.consumers.get(name, [])
            if name and (name in graph.outputs or any(r not in region for r in readers)):
                result.append(name)
    order = {o: k for k, o in enumerate(o.name for o in graph.handle.graph.output)}
    return sorted(result, key=lambda n: (order.get(n, -1), n))


def _region_weights(graph: IndexedGraph, region: set[int]) -> list[str]:
    names = {n for i in region for n in node_inputs(graph.nodes[i]) if n in graph.inits}
    return sorted(names)


def region_weight_bytes(graph: IndexedGraph, region: set[int]) -> int:
    return sum(io.tensor_nbytes(graph.inits[n]) for n in _region_weights(graph, region))


def concrete_dims(type_proto: onnx.TypeProto | None) -> list[int] | None:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return dims if all(d >= 0 for d in dims) else None


def elem_type(type_proto: onnx.TypeProto | None) -> int:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return TensorProto.UNDEFINED
    return type_proto.tensor_type.elem_type


def shape_constant(node: onnx.NodeProto, types: dict) -> np.ndarray | None:
    """The value of a Shape or Size node whose input has a known shape."""
    if node.op_type not in ("Shape", "Size") or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    dims = concrete_dims(types.get(node.input[0]))
    if dims is None:
        return None
    if node.op_type == "Size":
        return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return np.array(dims[start:end], dtype=np.int64)
