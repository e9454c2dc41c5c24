"""Type information that stays true after a rewrite.

An ONNX model declares types and shapes beside its nodes: `value_info` for
intermediate tensors (the dynamo exporter writes one for nearly every tensor,
initializers included), graph inputs that list initializers (older exporters),
graph outputs, and the same inside subgraphs. A rewrite that changes a width
makes some of those declarations false; strict shape inference, the ONNX
checker and every tool downstream then reject the model, or worse, trust it.

This module is the one place that keeps them consistent. A rewrite runs inside
`kept_consistent(handle)`, which

1. fingerprints the graph before the rewrite (node contents, initializer
   types and shapes, and the values of small initializers, which may be shape
   constants);
2. after it, marks a tensor *changed* when its producer is new or edited or
   reads a changed tensor (in topological order; initializers are changed when
   their fingerprint is). An unchanged tensor is the same function of the same
   inputs as before, so its declaration stays as it was;
3. drops the declarations of changed tensors, runs ONNX shape inference on the
   model without its weights, and declares each changed tensor again with what
   inference now knows: a dim inference computes is written; a symbolic dim
   (batch, sequence) is kept; a fixed dim inference cannot confirm is left
   unknown; a tensor inference knows nothing about is no longer declared.
   Declarations of initializers are rewritten from the initializers themselves.

The model without its weights, which inference runs on, is
`skeleton.light_model`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .errors import InternalError, first_line
from .io import ModelHandle
from .ir import GraphIR, outer_scope_reads
from .skeleton import infer, light_model

#: Initializers with at most this many elements have their values fingerprinted
#: (shape constants, Resize scales); larger ones only their type and shape.
_FINGERPRINT_VALUES_MAX = 4096


@dataclass
class _Fingerprint:
    nodes: list[bytes]                 # each node's serialisation, in graph order
    initializers: dict[str, tuple]     # type, shape and (small ones) values


# ----------------------------------------------------------------------------
# Keeping declarations true


@contextlib.contextmanager
def kept_consistent(handle: ModelHandle):
    """Run a rewrite of `handle`; afterwards, its type declarations are true."""
    before = _fingerprint(handle)
    yield
    reconcile(handle, before)


def reconcile(handle: ModelHandle, before: _Fingerprint) -> None:
    """Make every declaration of `handle` true after a rewrite (see the module
    docstring); `before` is the fingerprint taken before the rewrite."""
    after = _fingerprint(handle)
    if after == before:
        return  # nothing was rewritten
    handle.rewritten = True
    graph = handle.graph
    changed = _changed_tensors(handle, before, after)
    _forget_removed(graph)
    _declare_initializers(graph)
    stale = _drop_declarations(graph, changed)
    stale_subgraphs = _drop_subgraph_declarations(graph, changed)
    if not stale and not stale_subgraphs and not _changed_outputs(graph, changed):
        return
    try:
        inferred = infer(light_model(handle))
    except Exception as exc:  # noqa: BLE001
        raise InternalError(f"the rewritten model's shapes are inconsistent: {first_line(exc)}") from None
    _redeclare(graph.value_info, stale, _declarations(inferred.graph))
    _redeclare_outputs(graph, changed, _declarations(inferred.graph))
    for (node, attribute, position), entries in stale_subgraphs.items():
        subgraph = _subgraph(inferred.graph, node, attribute, position)
        _redeclare(_subgraph(graph, node, attribute, position).value_info, entries, _declarations(subgraph))


def _fingerprint(handle: ModelHandle) -> _Fingerprint:
    nodes = [node.SerializeToString(deterministic=True) for node in handle.graph.node]
    initializers = {t.name: _initializer_key(handle, t) for t in handle.graph.initializer}
    return _Fingerprint(nodes, initializers)


def _initializer_key(handle: ModelHandle, tensor: TensorProto) -> tuple:
    key = (tensor.data_type, tuple(tensor.dims))
    count = 1
    for dim in tensor.dims:
        count *= dim
    if count <= _FINGERPRINT_VALUES_MAX:
        key += (handle.array(tensor).tobytes(),)
    return key


def _changed_tensors(handle: ModelHandle, before: _Fingerprint, after: _Fingerprint) -> set[str]:
    """Tensors that may differ from before: outputs of new or edited nodes and
    everything computed from a changed tensor."""
    changed = {name for name, key in after.initializers.items() if before.initializers.get(name) != key}
    unmatched = Counter(before.nodes)
    for index, reads in _reads_in_order(handle):
        node, key = handle.graph.node[index], after.nodes[index]
        if unmatched[key] > 0 and not (reads & changed):
            unmatched[key] -= 1
            continue
        changed.update(name for name in node.output if name)
    return changed


def _reads_in_order(handle: ModelHandle) -> list[tuple[int, set[str]]]:
    """(node position, every name it reads, subgraphs included) in
    topological order; InternalError when the rewritten graph is malformed."""
    found = _reads_if_sorted(handle.graph)
    if found is not None:
        return found
    try:  # not in order, or malformed: the index sorts it, or says what is wrong
        ir = GraphIR(handle, infer_shapes=False)
    except Exception as exc:  # noqa: BLE001 - a graph we broke is our bug
        raise InternalError(f"the rewritten graph is malformed: {first_line(exc)}") from None
    return [(index, set(ir.nodes[index].input) | ir.outer_reads.get(index, set()))
            for index in ir.topological_order()]


def _reads_if_sorted(graph: onnx.GraphProto) -> list[tuple[int, set[str]]] | None:
    """`_reads_in_order` in one pass over a graph whose nodes are in order
    and well formed (the usual case after a rewrite: the editor keeps the
    order); None otherwise."""
    defined = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {""}  # "": an input left out
    found = []
    for index, node in enumerate(graph.node):
        reads = set(node.input) | outer_scope_reads(node)
        if not reads <= defined:
            return None
        outputs = [name for name in node.output if name]
        if len(set(outputs)) != len(outputs) or not defined.isdisjoint(outputs):
            return None
        defined.update(outputs)
        found.append((index, reads))
    if any(not value.name or value.name not in defined for value in graph.output):
        return None
    return found


def _forget_removed(graph: onnx.GraphProto) -> None:
    """Declarations of tensors the rewrite removed go with them."""
    present = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    present.update(name for node in graph.node for name in node.output)
    kept = [value for value in graph.value_info if value.name in present]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)


def _declare_initializers(graph: onnx.GraphProto) -> None:
    """Declarations of initializers (graph inputs, value_info) say what the
    initializers are."""
    initializers = {t.name: t for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info):
        tensor = initializers.get(value.name)
        if tensor is not None:
            value.type.CopyFrom(onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))


def _drop_declarations(graph: onnx.GraphProto, changed: set[str]) -> dict[str, onnx.ValueInfoProto]:
    """Remove the value_info of changed tensors; return what was removed."""
    initializers = {t.name for t in graph.initializer}
    stale, kept = {}, []
    for value in graph.value_info:
        if value.name in changed and value.name not in initializers:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(value)
            stale[value.name] = copy
        else:
            kept.append(value)
    if stale:
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return stale


def _drop_subgraph_declarations(graph: onnx.GraphProto, changed: set[str]) -> dict[tuple, dict]:
    """Every declaration inside the subgraphs of changed nodes, removed;
    keyed by (node position, attribute name, position in the attribute)."""
    stale = {}
    for index, node in enumerate(graph.node):
        if not any(name in changed for name in node.output):
            continue
        for attribute in node.attribute:
            for position, subgraph in enumerate(_graphs_of(attribute)):
                entries = {}
                _strip_all(subgraph, entries)
                if entries:
                    stale[(index, attribute.name, position)] = entries
    return stale


def _strip_all(graph: onnx.GraphProto, entries: dict) -> None:
    """Remove this graph's value_info into `entries`; nested subgraphs are
    stripped in place (inference declares them again)."""
    for value in graph.value_info:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        entries[value.name] = copy
    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in _graphs_of(attribute):
                _strip_all(subgraph, {})


def _graphs_of(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)


def _subgraph(graph: onnx.GraphProto, node: int, attribute: str, position: int) -> onnx.GraphProto:
    found = next(a for a in graph.node[node].attribute if a.name == attribute)
    return _graphs_of(found)[position]


def _declarations(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    return {v.name: v for v in list(graph.value_info) + list(graph.output)}


def _redeclare(target, stale: dict[str, onnx.ValueInfoProto], inferred: dict[str, onnx.ValueInfoProto]) -> None:
    for name, old in stale.items():
        merged = merge_declaration(old, inferred.get(name))
        if merged is not None:
            target.append(merged)


def _changed_outputs(graph: onnx.GraphProto, changed: set[str]) -> bool:
    return any(value.name in changed for value in graph.output)


def _redeclare_outputs(graph: onnx.GraphProto, changed: set[str], inferred: dict) -> None:
    for value in graph.output:
        if value.name in changed:
            merged = merge_declaration(value, inferred.get(value.name))
            if merged is not None:
                value.CopyFrom(merged)
            else:
                _forget_fixed_dims(value)


def merge_declaration(old: onnx.ValueInfoProto, inferred: onnx.ValueInfoProto | None
                      ) -> onnx.ValueInfoProto | None:
    """`old` with what inference now knows (see the module docstring), or None
    when inference knows nothing about the tensor."""
    if inferred is None or not inferred.type.HasField("tensor_type"):
        if inferred is not None and inferred.type.ByteSize():
            merged = onnx.ValueInfoProto()
            merged.CopyFrom(old)
            merged.type.CopyFrom(inferred.type)
            return merged
        return None
    merged = onnx.ValueInfoProto()
    merged.CopyFrom(old)
    new_type, old_type = inferred.type.tensor_type, old.type.tensor_type
    if not old.type.HasField("tensor_type"):
        merged.type.CopyFrom(inferred.type)
        return merged
    tensor_type = merged.type.tensor_type
    if new_type.elem_type:
        tensor_type.elem_type = new_type.elem_type
    if not new_type.HasField("shape"):
        tensor_type.ClearField("shape")
        return merged
    old_dims = list(old_type.shape.dim) if old_type.HasField("shape") else []
    tensor_type.shape.ClearField("dim")
    for axis, dim in enumerate(new_type.shape.dim):
        out = tensor_type.shape.dim.add()
        if dim.HasField("dim_value"):
            out.dim_value = dim.dim_value
        elif len(old_dims) == len(new_type.shape.dim) and old_dims[axis].HasField("dim_param"):
            out.dim_param = old_dims[axis].dim_param
        elif dim.HasField("dim_param"):
            out.dim_param = dim.dim_param
    return merged


def _forget_fixed_dims(value: onnx.ValueInfoProto) -> None:
    if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dim.Clear()
