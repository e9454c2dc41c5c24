"""Extracting part of a model as a standalone model (a region, a block of one).

Only the weights the chosen nodes read come along: inline ones are copied,
external ones stay references into the model's data file (or are inlined),
and large inline ones can be handed to onnxruntime as arrays (`in_memory`),
so nothing else of the model is read.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from . import io
from .region_diff import RegionUnavailable, elem_type, node_inputs

#: Inline weights this large reach onnxruntime as arrays, not through the protobuf.
IN_MEMORY_BYTES = 1 << 20


def extract(handle: io.ModelHandle, nodes: list[int], inputs: list[str], outputs: list[str],
            types: dict[str, onnx.TypeProto], replaced: dict | None = None, *,
            keep_external: bool = False, in_memory: dict | None = None) -> onnx.ModelProto:
    """A standalone model of the given nodes (some `replaced` by others):
    boundary inputs as graph inputs, and only the weights those nodes read:
    inline (read here), or with `keep_external` still referring to the
    model's data file (locations io.load checked), for onnxruntime to read
    with the handle's folder as base: nothing else of the model is read.
    With `in_memory` (a dict), large inline weights become placeholders and
    their arrays go into the dict, for `sessions.make_session` to hand over as
    they are (no protobuf copy, serialisation or parse of them)."""
    source = handle.graph
    chosen = [(replaced or {}).get(i, source.node[i]) for i in nodes]
    graph = onnx.helper.make_graph(chosen, "region", [], [])
    read = {n for node in chosen for n in node_inputs(node)}
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


def _value_info(name: str, type_proto: onnx.TypeProto | None, keep_shape: bool = True) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto(name=name)
    if type_proto is None or elem_type(type_proto) == TensorProto.UNDEFINED:
        raise RegionUnavailable(f"the type of boundary tensor '{name}' is unknown")
    value.type.CopyFrom(type_proto)
    if not keep_shape:
        value.type.tensor_type.ClearField("shape")
    return value


def _inline(handle: io.ModelHandle, source: TensorProto, target: TensorProto) -> None:
    """`target` (a copy of the external `source`) with its bytes read in."""
    del target.external_data[:]
    target.data_location = TensorProto.DEFAULT
    target.raw_data = handle.external_bytes(source)


__all__ = ["IN_MEMORY_BYTES", "extract"]
