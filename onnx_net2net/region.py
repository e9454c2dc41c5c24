"""Region verification: check only the part of the graph a rewrite changed.

The argument
------------
Diff the reference graph G_old and the candidate G_new: a node is *unchanged*
when the other graph has a node with the same op, domain, attributes, inputs
and outputs, and every initializer it reads has the same type, shape and bytes
in both models. Every other node seeds the region. The region R is closed
over the tensors between its seeds: a node that is both downstream and
upstream of region nodes joins R (in either graph, and a node joining R in
one graph joins it in the other), until nothing changes. Then

* outside R, G_old and G_new are the same nodes reading the same weights, so
  every tensor produced outside R is the same function of the graph inputs
  and of R's outputs in both models;
* R's *boundary inputs* (tensors R reads but does not produce, weights aside)
  are produced outside R, upstream of it, so they carry the same values x in
  both models;
* R's *boundary outputs* (tensors R produces that are read outside R, or are
  graph outputs) are all the rest of the graph sees of R.

So if R_old(x) = R_new(x) for every x the boundary can carry, the models
compute the same function. Memory and time then scale with R (its weights,
read from disk alone; untouched external weights are never read), not with
the model.

Conditions and limits (stated, not hidden):

* Random x at the boundary (seeded, standard normal for floats) is a test,
  not a proof, exactly like full verification's random graph inputs. It is
  the right test for rewrites that are exact for *all* inputs (Net2Net).
* Random boundary values may be states the real model never produces (for
  example x and relu(x) both entering R, drawn independently). A region check
  is therefore at least as strict as needed, never laxer, for an exact
  rewrite: an R that agrees for all x makes the models agree.
* Boundary tensors whose values matter structurally (integer indices, shape
  tensors, booleans) and float tensors whose concrete shape is not known
  statically are computed from the real reference model on the verification
  inputs: the nodes upstream of them are extracted and run (their weights
  read) if those weights are small (`CONE_WEIGHT_LIMIT`); otherwise region
  mode falls back to full verification and says why.
* A widened group's region ends where the consumers contract the widened axis,
  so its boundary outputs keep their original shapes. If a boundary output's
  shape differs between the two regions, or the graph inputs/outputs differ,
  region mode falls back to full verification (with a note).
* A group spanning the whole network (a transformer's residual stream) makes R
  the whole model: region mode then costs what full verification costs. The
  block-by-block check would be block_new(E(x)) = E(block_old(x)) with E the
  stream's expansion map: for tiling E(x) = x[..., m] with m the unit mapping
  (new unit j copies old unit m[j]); for LEMON E(x) copies the old units and
  the extra units carry the mean over the old units (or zero, per the scheme).
  It is NOT implemented here: `auto` picks full for such rewrites (region
  weights above `AUTO_REGION_SHARE` of the model) and `region` still checks
  the whole-model region exactly, at full cost.
* Nodes with subgraphs (If, Loop, Scan) in the region: region mode falls back
  to full verification.
* In `widen`/`deepen`/`grow`, region mode checks the rewritten model in memory
  (its untouched external weights are references into the input's data file,
  equal by location without being read); the streamed copy of untouched
  weights into the output is checked by length, not by value.

Choosing (`--verify auto`): region when the model's weights exceed
`AUTO_REGION_BYTES` (1 GiB) or a third of the memory available now, unless
the region holds more than `AUTO_REGION_SHARE` of the weights; full otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from . import io
from .errors import UserError
from .sessions import ModelRunError, make_session, plain_onnxruntime_error
from .verification import (InputSpec, ReferenceRun, VerificationReport, choose_providers, compare_arrays,
                           make_inputs, tolerance_for)

#: `auto` chooses region verification above this many bytes of weights.
AUTO_REGION_BYTES = 1 << 30
#: ... or above this share of the memory available now.
AUTO_MEMORY_SHARE = 1 / 3
#: ... unless the region holds more than this share of the weights (full is then as cheap).
AUTO_REGION_SHARE = 0.5
#: Weights upstream of structural boundary tensors that may be read to compute them.
CONE_WEIGHT_LIMIT = 64 << 20
#: Inline weights this large reach onnxruntime as arrays, not through the protobuf.
IN_MEMORY_BYTES = 1 << 20
#: Integer initializers this small keep their values in the shape-inference skeleton (shape constants).
SMALL_TENSOR_BYTES = 4096
_COMPARE_CHUNK = 16 << 20
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
MODES = ("auto", "full", "region")


class RegionUnavailable(Exception):
    """Region verification cannot decide this pair; the reason says why (full verification then runs)."""


# ----------------------------------------------------------------------------
# The graph index


@dataclass
class _Graph:
    """One model's graph, indexed once: producers, consumers, initializers."""

    handle: io.ModelHandle
    nodes: list = field(default_factory=list)
    producer: dict = field(default_factory=dict)      # tensor -> node index
    consumers: dict = field(default_factory=dict)     # tensor -> [node index]
    inits: dict = field(default_factory=dict)         # name -> TensorProto
    outputs: set = field(default_factory=set)

    @classmethod
    def of(cls, handle: io.ModelHandle) -> "_Graph":
        graph = cls(handle, list(handle.graph.node))
        graph.inits = {t.name: t for t in handle.graph.initializer}
        graph.outputs = {o.name for o in handle.graph.output}
        for index, node in enumerate(graph.nodes):
            for name in node.output:
                if name:
                    graph.producer[name] = index
            for name in _node_inputs(node):
                graph.consumers.setdefault(name, []).append(index)
        return graph

    def key(self, index: int) -> str:
        """The node's identity across the two graphs: its first non-empty output."""
        return next((o for o in self.nodes[index].output if o), f"#node{index}")


def _node_inputs(node: onnx.NodeProto) -> list[str]:
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
        used.extend(n for n in _node_inputs(node) if n not in local)
        local.update(node.output)
    return used


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _signature(node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute))
    return node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs


# ----------------------------------------------------------------------------
# Diff and closure


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
    g_old, g_new = _Graph.of(old), _Graph.of(new)
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
                  _region_weight_bytes(g_old, region_old), _region_weight_bytes(g_new, region_new))


#: Ops whose output lies in a restricted range (Relu >= 0, Sigmoid in (0, 1), ...).
RANGE_OPS = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus", "Sqrt", "Tanh",
             "Softsign", "Erf", "Gelu", "HardSwish", "Mish", "Selu", "Elu", "Celu", "ThresholdedRelu"}
#: Ops that keep a restricted range (they move or pick values, or take maxima and means).
RANGE_KEEPING_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                     "Transpose", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Slice", "Concat", "Split",
                     "Expand", "Tile", "ReduceMax", "ReduceMean"}
_RANGE_DEPTH = 8


def _range_producers(graph: _Graph, region: set[int]) -> set[int]:
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


def _path_to_range_op(graph: _Graph, name: str) -> list[int]:
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


def _reshaped(g_old: _Graph, g_new: _Graph, names: list[str], types_old: dict, types_new: dict) -> list[str]:
    """Boundary outputs whose statically known shape differs between the
    models, or that are Shape/Size values that differ."""
    result = []
    for name in names:
        a, b = _concrete_dims(types_old.get(name)), _concrete_dims(types_new.get(name))
        if a is not None and b is not None and a != b:
            result.append(name)
            continue
        shape_old = _shape_constant(g_old.nodes[g_old.producer[name]], types_old) if name in g_old.producer else None
        shape_new = _shape_constant(g_new.nodes[g_new.producer[name]], types_new) if name in g_new.producer else None
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


def _unmatched(graph: _Graph, other: _Graph) -> set[int]:
    """Nodes of `graph` with no identical node (same first output) in `other`."""
    result = set()
    for index, node in enumerate(graph.nodes):
        twin = other.producer.get(graph.key(index))
        if twin is None or _signature(other.nodes[twin]) != _signature(node):
            result.add(index)
    return result


def _readers(graph: _Graph, names: set[str]) -> set[int]:
    return {i for name in names for i in graph.consumers.get(name, [])}


def _changed_weights(old: _Graph, new: _Graph) -> set[str]:
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
    a, b = _byte_reader(h_old, t_old), _byte_reader(h_new, t_new)
    try:
        for chunk_a, chunk_b in zip(a, b):
            if chunk_a != chunk_b:
                return False
        return True
    finally:
        a.close()
        b.close()


def _byte_reader(handle, tensor):
    if tensor.data_location != TensorProto.EXTERNAL:
        data = _stored_bytes(handle, tensor)
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


def _stored_bytes(handle, tensor) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return np.ascontiguousarray(handle.array(tensor)).tobytes()


def _close_jointly(g_old: _Graph, g_new: _Graph, seeds_old: set[int], seeds_new: set[int]):
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


def _twins(graph: _Graph, nodes: set[int], other: _Graph) -> set[int]:
    found = (other.producer.get(graph.key(i)) for i in nodes)
    return {i for i in found if i is not None}


def _between(graph: _Graph, seeds: set[int]) -> set[int]:
    """Seeds plus every node on a path between two seeds."""
    if not seeds:
        return set()
    return seeds | (_reachable(graph, seeds, downstream=True) & _reachable(graph, seeds, downstream=False))


def _reachable(graph: _Graph, start: set[int], *, downstream: bool) -> set[int]:
    seen, queue = set(), deque(start)
    while queue:
        index = queue.popleft()
        node = graph.nodes[index]
        if downstream:
            nexts = (c for o in node.output for c in graph.consumers.get(o, []))
        else:
            nexts = (graph.producer[i] for i in _node_inputs(node) if i in graph.producer)
        for n in nexts:
            if n not in seen:
                seen.add(n)
                queue.append(n)
    return seen


def _boundary_inputs(graph: _Graph, region: set[int]) -> set[str]:
    produced = {o for i in region for o in graph.nodes[i].output}
    read = {n for i in region for n in _node_inputs(graph.nodes[i])}
    return {n for n in read - produced if n not in graph.inits}


def _boundary_outputs(graph: _Graph, region: set[int]) -> list[str]:
    result = []
    for index in sorted(region):
        for name in graph.nodes[index].output:
            readers = graph.consumers.get(name, [])
            if name and (name in graph.outputs or any(r not in region for r in readers)):
                result.append(name)
    order = {o: k for k, o in enumerate(o.name for o in graph.handle.graph.output)}
    return sorted(result, key=lambda n: (order.get(n, -1), n))


def _region_weights(graph: _Graph, region: set[int]) -> list[str]:
    names = {n for i in region for n in _node_inputs(graph.nodes[i]) if n in graph.inits}
    return sorted(names)


def _region_weight_bytes(graph: _Graph, region: set[int]) -> int:
    return sum(io.tensor_nbytes(graph.inits[n]) for n in _region_weights(graph, region))


# ----------------------------------------------------------------------------
# Types and shapes of the tensors at the boundary


def _shape_skeleton(handle: io.ModelHandle, spec: InputSpec) -> onnx.ModelProto:
    """The model without its large weights (`skeleton.light_model`), graph
    inputs pinned to the shapes verification feeds, ready for shape inference."""
    from .skeleton import light_model

    model = light_model(handle)
    for value in model.graph.input[:len(handle.graph.input)]:
        value.CopyFrom(_pinned(value, spec))
    return model


def _pinned(value: onnx.ValueInfoProto, spec: InputSpec) -> onnx.ValueInfoProto:
    """The graph input with the concrete shape verification gives it."""
    pinned = onnx.ValueInfoProto()
    pinned.CopyFrom(value)
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return pinned
    dims = pinned.type.tensor_type.shape.dim
    wanted = spec.shapes.get(value.name)
    if wanted is not None and len(wanted) == len(dims):
        for dim, size in zip(dims, wanted):
            dim.Clear()
            dim.dim_value = size
        return pinned
    for axis, dim in enumerate(dims):
        if not (dim.HasField("dim_value") and dim.dim_value > 0):
            dim.Clear()
            dim.dim_value = 2 if axis == 0 else 1  # verification.make_inputs' choice (DEFAULT_BATCH, 1)
    return pinned


def _inline(handle: io.ModelHandle, source: TensorProto, target: TensorProto) -> None:
    del target.external_data[:]
    target.data_location = TensorProto.DEFAULT
    target.raw_data = _stored_bytes_external(handle, source)


def _stored_bytes_external(handle, tensor) -> bytes:
    if tensor.data_location == TensorProto.EXTERNAL:
        return handle.external_bytes(tensor)
    return _stored_bytes(handle, tensor)


def _value_types(handle: io.ModelHandle, spec: InputSpec) -> dict[str, onnx.TypeProto]:
    """Every tensor's type as shape inference (with data propagation) sees it."""
    skeleton = _shape_skeleton(handle, spec)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes are handled
        inferred = skeleton
    graph = inferred.graph
    types = {v.name: v.type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    for tensor in handle.graph.initializer:
        types[tensor.name] = onnx.helper.make_tensor_type_proto(tensor.data_type, tensor.dims)
    return types


def _concrete_dims(type_proto: onnx.TypeProto | None) -> list[int] | None:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return dims if all(d >= 0 for d in dims) else None


def _elem_type(type_proto: onnx.TypeProto | None) -> int:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return TensorProto.UNDEFINED
    return type_proto.tensor_type.elem_type


# ----------------------------------------------------------------------------
# Extraction


def extract(handle: io.ModelHandle, nodes: list[int], inputs: list[str], outputs: list[str],
            types: dict[str, onnx.TypeProto], replaced: dict | None = None, *,
            keep_external: bool = False, in_memory: dict | None = None) -> onnx.ModelProto:
    """A standalone model of the given nodes (some `replaced` by others):
    boundary inputs as graph inputs, and only the weights those nodes read:
    inline (read here), or with `keep_external` still referring to the
    model's data file (locations io.load checked), for onnxruntime to read
    with the handle's folder as base: nothing else of the model is read.
    With `in_memory` (a dict), large inline weights become placeholders and
    their arrays go into the dict, for `_region_session` to hand over as
    they are (no protobuf copy, serialisation or parse of them)."""
    source = handle.graph
    chosen = [(replaced or {}).get(i, source.node[i]) for i in nodes]
    graph = onnx.helper.make_graph(chosen, "region", [], [])
    read = {n for node in chosen for n in _node_inputs(node)}
    for name in inputs:
        if name in read:
            graph.input.append(_value_info(name, types.get(name)))
    for name in outputs:
        graph.output.append(_value_info(name, types.get(name), keep_shape=False))
    for tensor in source.initializer:
        if tensor.name not in read:
            continue
        weight = graph.initializer.add()
        external = tensor.data_location == TensorProto.EXTERNAL
        if in_memory is not None and not external and io.tensor_nbytes(tensor) >= IN_MEMORY_BYTES:
            _placeholder(tensor, weight)
            in_memory[tensor.name] = handle.array(tensor)
            continue
        weight.CopyFrom(tensor)
        if external and not keep_external:
            _inline(handle, tensor, weight)
    model = onnx.helper.make_model(graph, opset_imports=list(handle.proto.opset_import),
                                   ir_version=handle.proto.ir_version)
    model.functions.extend(handle.proto.functions)
    return model


def _placeholder(tensor: TensorProto, target: TensorProto) -> None:
    """An initializer with no data: onnxruntime gets its values as an OrtValue."""
    target.name, target.data_type = tensor.name, tensor.data_type
    target.dims.extend(tensor.dims)
    target.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "in-memory.region"), ("offset", "0"), ("length", str(io.tensor_nbytes(tensor)))):
        entry = target.external_data.add()
        entry.key, entry.value = key, value


def _region_session(model: onnx.ModelProto, providers: list[str], base_dir, arrays: dict):
    """`verification.make_session` (same options: optimisations off) plus the
    in-memory weights as external initializers (onnxruntime uses the arrays),
    and no weight prepacking (a region runs once: re-laying out its weights
    costs more than the run)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # failures reach the user as our one line, not onnxruntime's log
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.add_session_config_entry("session.disable_prepacking", "1")
    if base_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    names = list(arrays)
    if names:
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arrays[n]))
                                                  for n in names])
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        raise ModelRunError(f"onnxruntime cannot load the region: {plain_onnxruntime_error(exc)}") from None


def _value_info(name: str, type_proto: onnx.TypeProto | None, keep_shape: bool = True) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto(name=name)
    if type_proto is None or _elem_type(type_proto) == TensorProto.UNDEFINED:
        raise RegionUnavailable(f"the type of boundary tensor '{name}' is unknown")
    value.type.CopyFrom(type_proto)
    if not keep_shape:
        value.type.tensor_type.ClearField("shape")
    return value


# ----------------------------------------------------------------------------
# Boundary values


class _Spec:
    """What `verification.make_inputs` needs of a session: typed, shaped inputs."""

    class _Arg:
        def __init__(self, name, ort_type, shape):
            self.name, self.type, self.shape = name, ort_type, shape

    def __init__(self, args):
        self._args = args

    def get_inputs(self):
        return self._args


_ORT_TYPE = {TensorProto.FLOAT: "tensor(float)", TensorProto.DOUBLE: "tensor(double)",
             TensorProto.FLOAT16: "tensor(float16)"}


def boundary_values(old: io.ModelHandle, region: Region, types: dict, spec: InputSpec, announce=None
                    ) -> dict[str, np.ndarray]:
    """The values fed at the region's boundary:

    * graph inputs: exactly what full verification feeds;
    * static tensors (constants, shapes of tensors whose shape is known, and
      what is computed from them only): their exact values;
    * other float tensors of known shape: seeded random values;
    * the rest (indices, masks, unknown shapes): their real values, computed by
      the reference's nodes upstream of them on the verification inputs."""
    graph = _Graph.of(old)
    graph_inputs = _graph_input_values(old, spec, announce)
    dynamic = _dynamic_tensors(graph, types)
    values, random_args, static, structural = {}, [], [], []
    for name in region.inputs:
        dims, elem = _concrete_dims(types.get(name)), _elem_type(types.get(name))
        if name in graph_inputs:
            values[name] = graph_inputs[name]
        elif name not in dynamic:
            static.append(name)
        elif elem in _FLOAT_TYPES and dims is not None:
            random_args.append(_Spec._Arg(name, _ORT_TYPE[elem], dims))
        else:
            structural.append(name)
    if random_args:
        values.update(make_inputs(_Spec(random_args), InputSpec(seed=spec.seed)))
    if static:
        values.update(_computed_values(old, graph, static, types, {}, weight_limit=None))
    if structural:
        values.update(_computed_values(old, graph, structural, types, graph_inputs, weight_limit=CONE_WEIGHT_LIMIT))
    return values


def _dynamic_tensors(graph: _Graph, types: dict) -> set[str]:
    """Tensors whose values depend on the graph inputs' values (graph nodes are
    in topological order; with the inputs' shapes pinned, Shape and Size of a
    tensor of known shape are static)."""
    dynamic = {v.name for v in graph.handle.graph.input if v.name not in graph.inits}
    for node in graph.nodes:
        if _shape_constant(node, types) is not None:
            continue
        if any(n in dynamic for n in _node_inputs(node)):
            dynamic.update(o for o in node.output if o)
    return dynamic


def _shape_constant(node: onnx.NodeProto, types: dict) -> np.ndarray | None:
    """The value of a Shape or Size node whose input has a known shape."""
    if node.op_type not in ("Shape", "Size") or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    dims = _concrete_dims(types.get(node.input[0]))
    if dims is None:
        return None
    if node.op_type == "Size":
        return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return np.array(dims[start:end], dtype=np.int64)


def _cone(graph: _Graph, names: list[str], types: dict) -> tuple[set[int], dict[int, onnx.NodeProto]]:
    """The nodes upstream of `names`, stopping at Shape/Size nodes of known
    value, which become Constant nodes."""
    start = {graph.producer[n] for n in names if n in graph.producer}
    seen, queue, frozen = set(start), deque(start), {}
    while queue:
        index = queue.popleft()
        node = graph.nodes[index]
        value = _shape_constant(node, types)
        if value is not None:
            frozen[index] = onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                                  value=onnx.numpy_helper.from_array(value))
            continue
        for name in _node_inputs(node):
            producer = graph.producer.get(name)
            if producer is not None and producer not in seen:
                seen.add(producer)
                queue.append(producer)
    return seen, frozen


def _computed_values(handle: io.ModelHandle, graph: _Graph, names: list[str], types: dict,
                     feeds: dict[str, np.ndarray], weight_limit: int | None) -> dict[str, np.ndarray]:
    """Run the reference's nodes upstream of `names` (on `feeds`, the graph inputs)."""
    cone, frozen = _cone(graph, names, types)
    live = cone - set(frozen)
    weight_bytes = _region_weight_bytes(graph, live)
    if weight_limit is not None and weight_bytes > weight_limit:
        raise RegionUnavailable(f"computing the boundary's index/shape tensors {names[:2]} would read "
                                f"{weight_bytes >> 20} MiB of weights upstream of the region")
    graph_inputs = [v.name for v in handle.graph.input if v.name not in graph.inits]
    model = extract(handle, sorted(cone), graph_inputs, names, types, replaced=frozen)
    session = make_session(model, ["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    produced = _run(session, {k: v for k, v in feeds.items() if k in wanted}, names)
    return dict(zip(names, produced))


def _graph_input_values(handle: io.ModelHandle, spec: InputSpec, announce) -> dict[str, np.ndarray]:
    """The graph inputs exactly as full verification makes them (same seed, same order)."""
    inits = {t.name for t in handle.graph.initializer}
    args = []
    for value in handle.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        ort_type = f"tensor({_ORT_NAME.get(tensor_type.elem_type, 'unknown')})"
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        args.append(_Spec._Arg(value.name, ort_type, shape))
    return make_inputs(_Spec(args), spec, announce)


_ORT_NAME = {TensorProto.FLOAT: "float", TensorProto.DOUBLE: "double", TensorProto.FLOAT16: "float16",
             TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.INT16: "int16",
             TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.UINT16: "uint16",
             TensorProto.UINT32: "uint32", TensorProto.UINT64: "uint64", TensorProto.BOOL: "bool"}


# ----------------------------------------------------------------------------
# Verification


def verify_region(old: io.ModelHandle, new: io.ModelHandle, *, inputs: InputSpec | None = None,
                  atol: float | None = None, rtol: float | None = None, providers: list[str] | None = None,
                  announce=None, region: Region | None = None, base_dir=None, allow_nonfinite: bool = False,
                  upcast: bool = True, candidate_is_ours: bool = False) -> VerificationReport:
    """Compare the changed region of two models on the same boundary values.

    Tolerances default by each boundary output's type, as in full
    verification; non-finite reference values fail unless allowed.

    Raises RegionUnavailable when the pair cannot be decided by its region
    (the caller then runs full verification). `base_dir` and `upcast` are
    accepted for symmetry with ReferenceRun and unused: handles know their
    folders, and a region's low-precision outputs are reported natively."""
    spec = inputs or InputSpec()
    atol_fp32, rtol_fp32 = tolerance_for("tensor(float)", rtol, atol)[::-1]
    region = region or find_region(old, new)
    if region.old_nodes or region.new_nodes:
        types_old, types_new = _value_types(old, spec), _value_types(new, spec)
        region = find_region(old, new, types_old=types_old, types_new=types_new,
                             changed=set(region.changed_weights))
    if not region.old_nodes and not region.new_nodes:
        return VerificationReport(True, "none (the graphs are identical)", atol_fp32, rtol_fp32, [],
                                  notes=["region: no node or weight differs; the models are the same graph"])
    if any(_has_subgraph(old.graph.node[i]) for i in region.old_nodes) or \
            any(_has_subgraph(new.graph.node[i]) for i in region.new_nodes):
        raise RegionUnavailable("the region contains a node with a subgraph (If/Loop/Scan)")
    types_new.update({name: types_old[name] for name in region.inputs if name in types_old})
    feeds = boundary_values(old, region, types_old, spec, announce)
    providers = choose_providers(providers)
    reference, provider = _run_region(old, region.old_nodes, region, types_old, feeds, providers)
    from .verification import ours

    with ours() if candidate_is_ours else contextlib.nullcontext():
        candidate, _ = _run_region(new, region.new_nodes, region, types_new, feeds, providers)
    for name, a, b in zip(region.outputs, reference, candidate):
        if a.shape != b.shape:
            raise RegionUnavailable(f"boundary output '{name}' has shape {list(b.shape)} instead of "
                                    f"{list(a.shape)}")
    outputs = [compare_arrays(name, a, b, *tolerance_for(a.dtype, rtol, atol)[::-1], allow_nonfinite)
               for name, a, b in zip(region.outputs, reference, candidate)]
    return VerificationReport(all(o.passed for o in outputs), provider, atol_fp32, rtol_fp32, outputs,
                              [_describe(region)])


def _run_region(handle, nodes, region: Region, types, feeds, providers) -> tuple[list[np.ndarray], str]:
    """Extract one side's region, run it on the boundary values, free it."""
    arrays = {}
    model = extract(handle, nodes, region.inputs, region.outputs, types, keep_external=handle.base_dir is not None,
                    in_memory=arrays)
    wanted = {i.name for i in model.graph.input}
    try:
        session = _region_session(model, providers, handle.base_dir, arrays)
    except UserError as error:
        raise RegionUnavailable(f"the extracted region does not load ({error})") from None
    del model
    return _run(session, {k: v for k, v in feeds.items() if k in wanted}, region.outputs), session.get_providers()[0]


def _run(session, feeds: dict, names: list[str]) -> list[np.ndarray]:
    try:
        return [np.asarray(x) for x in session.run(names, feeds)]
    except Exception as exc:  # noqa: BLE001
        raise ModelRunError(f"onnxruntime failed to run the region: {plain_onnxruntime_error(exc)}") from None


def _describe(region: Region) -> str:
    return (f"region verification: {len(region.old_nodes)} -> {len(region.new_nodes)} node(s), "
            f"{len(region.inputs)} boundary input(s), {len(region.outputs)} boundary output(s), "
            f"weights {region.old_weight_bytes / 2**20:.1f} -> {region.new_weight_bytes / 2**20:.1f} MiB; "
            f"random boundary values are a test, not a proof")


# ----------------------------------------------------------------------------
# Choosing and dispatching


def choose_mode(mode: str, weight_bytes: int) -> str:
    """`auto` -> region for models over AUTO_REGION_BYTES or a third of available memory."""
    if mode != "auto":
        return mode
    memory = io.available_memory()
    large = weight_bytes > AUTO_REGION_BYTES or (memory is not None and weight_bytes > memory * AUTO_MEMORY_SHARE)
    return "region" if large else "full"


def verify_pair(old: io.ModelHandle, new: io.ModelHandle, full, *, mode: str = "auto", announce=None,
                **options) -> VerificationReport:
    """Verify by `mode` ('auto', 'full', 'region'); `full()` runs full
    verification (the caller knows the paths). Region falls back to it, with a note."""
    if mode not in MODES:
        raise UserError(f"--verify {mode}: choose one of {', '.join(MODES)}")
    weight_bytes = max(old.weight_bytes(), new.weight_bytes())
    if choose_mode(mode, weight_bytes) == "full":
        return full()
    try:
        region = find_region(old, new)
        if mode == "auto" and region.old_weight_bytes > AUTO_REGION_SHARE * weight_bytes and _fits(weight_bytes):
            raise RegionUnavailable(f"the region holds {region.old_weight_bytes / max(1, weight_bytes):.0%} of the "
                                    f"weights, full verification costs about as much")
        return verify_region(old, new, announce=announce, region=region, **options)
    except RegionUnavailable as why:
        note = f"region verification not used ({why}); running full verification"
        if announce:
            announce(note)
        report = full()
        report.notes.append(note)
        return report


def _fits(weight_bytes: int) -> bool:
    memory = io.available_memory()
    return memory is None or 3 * weight_bytes < memory


def verify_files(reference: str | os.PathLike, candidate: str | os.PathLike, *, mode: str = "auto",
                 announce=None, **options) -> VerificationReport:
    """`verify REFERENCE CANDIDATE --verify MODE`: any pair of model files."""
    from . import verification

    old, new = io.load(reference), io.load(candidate)

    def full() -> VerificationReport:
        return verification.verify_models(str(reference), str(candidate), announce=announce, **options)

    return verify_pair(old, new, full, mode=mode, announce=announce, **options)


def verify_grown(source: str | os.PathLike, grown: io.ModelHandle, staged: str | os.PathLike, *,
                 mode: str = "auto", announce=None, **options) -> VerificationReport:
    """Verify a rewritten model (`grown`, in memory, its untouched external
    weights still references into the source's data) against its source;
    full verification runs the written file `staged`."""
    from .verification import ours

    def full() -> VerificationReport:
        reference = ReferenceRun(str(source), announce=announce, **options)
        with ours():
            return reference.compare(str(staged))

    if choose_mode(mode, grown.weight_bytes()) == "full":
        return full()
    return verify_pair(io.load(source), grown, full, mode=mode, announce=announce, candidate_is_ours=True, **options)


def verify_models(reference, candidate, *, mode: str = "full", **options) -> VerificationReport:
    """The API's `verify` with a mode: ModelProtos or paths."""
    from .verification import verify_models as verify_full

    if mode == "full":
        return verify_full(reference, candidate, **options)
    old, new = (io.load(m) if isinstance(m, (str, os.PathLike)) else io.from_proto(m) for m in (reference, candidate))
    return verify_pair(old, new, lambda: verify_full(reference, candidate, **options), mode=mode, **options)


__all__ = ["MODES", "Region", "RegionUnavailable", "find_region", "extract", "boundary_values", "verify_region",
           "verify_pair", "verify_files", "verify_grown", "verify_models", "choose_mode"]
