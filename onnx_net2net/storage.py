"""Where a tensor's bytes live, and how many there are, without reading them.

Shared by loading, checking and saving: element sizes per ONNX type (packed
4- and 2-bit types included), a tensor's size in bytes from its header or its
external reference, the external-data fields, and a walk over every
TensorProto of a model (initializers, attribute tensors, subgraphs, functions).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ModelLoadError

#: Types stored several elements to a byte (raw_data and external data are packed).
PACKED_BITS = {TensorProto.UINT4: 4, TensorProto.INT4: 4, TensorProto.FLOAT4E2M1: 4,
                TensorProto.UINT2: 2, TensorProto.INT2: 2}


#: The floating-point element types (weights; what counts as a parameter).
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})
KNOWN_TYPES = frozenset(value for name, value in TensorProto.DataType.items() if name != "UNDEFINED")


def element_bits(data_type: int) -> int | None:
    """Bits per element in raw/external storage, or None for an unknown or variable-size type."""
    if data_type in PACKED_BITS:
        return PACKED_BITS[data_type]
    if data_type not in KNOWN_TYPES or data_type == TensorProto.STRING:
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:  # noqa: BLE001 - a type this numpy/onnx cannot map
        return None
    return dtype.itemsize * 8


def element_count(tensor: TensorProto) -> int:
    """The number of elements (a Python int: no int64 overflow)."""
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count


def tensor_nbytes(tensor: TensorProto) -> int:
    """Size in bytes of a tensor's data, without loading it."""
    if is_external(tensor):
        length = external_info(tensor).get("length")
        if length is not None:
            return int(length)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    bits = element_bits(tensor.data_type)
    if bits is None:
        raise ModelLoadError(f"tensor '{tensor.name}' has unknown data type {tensor.data_type}")
    return (element_count(tensor) * bits + 7) // 8


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_info(tensor: TensorProto) -> dict:
    return {entry.key: entry.value for entry in tensor.external_data}


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers and attribute tensors, in subgraphs too."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def copy_metadata(src: TensorProto, dst: TensorProto) -> None:
    dst.name = src.name
    dst.data_type = src.data_type
    dst.dims.extend(src.dims)
    if src.doc_string:
        dst.doc_string = src.doc_string
