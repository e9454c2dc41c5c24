"""Low-precision models, seen in float32.

An exact split is exact in the math but not in fp16/bf16 bits: a weight
divided by 3 and rounded to fp16 is not a third of the original, and every
layer then rounds its own sums. To show which error is which, verification
runs both models a second time with every low-precision float upcast to
float32: the weights keep the values they hold (fp16 -> fp32 is exact), the
arithmetic is fp32. What remains in that comparison is the rewrite's own
rounding of the weights; the rest of the native error is fp16/bf16 arithmetic.

`upcast` rewrites a copy of the model: float16/bfloat16 initializers and
Constant values become float32, declared types follow, and the element-type
attributes that could produce low precision (Cast's `to`, `dtype` of
generators, ConstantOfShape's value) say float32, in every subgraph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .sessions import make_session, run_session

LOW_PRECISION_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def upcast(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every float16/bfloat16 tensor and type in float32."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _upcast_graph(copy.graph)
    return copy


def upcast_outputs(model, feeds: dict[str, np.ndarray], providers: list[str], base_dir: Path | None = None
                   ) -> list[np.ndarray]:
    """Run the upcast model on the same feeds (low-precision feeds upcast)."""
    session = make_session(upcast(_in_memory(model, base_dir)), providers)
    wanted = {i.name for i in session.get_inputs()}
    upcast_feeds = {name: (value.astype(np.float32) if value.dtype == np.float16 else value)
                    for name, value in feeds.items() if name in wanted}
    return run_session(session, upcast_feeds)


def _in_memory(model, base_dir: Path | None) -> onnx.ModelProto:
    """The model with its weights, read through io's checked loads."""
    from . import io

    if isinstance(model, (str, Path)):
        return io.load(model).inlined().proto
    handle = io.from_proto(model, base_dir)
    return handle.inlined(copy=True).proto if handle.has_external_data() else model


def _upcast_graph(graph: onnx.GraphProto) -> None:
    for tensor in graph.initializer:
        _upcast_tensor(tensor)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        _upcast_type(value.type)
    for node in graph.node:
        for attribute in node.attribute:
            _upcast_attribute(node, attribute)


def _upcast_attribute(node: onnx.NodeProto, attribute: onnx.AttributeProto) -> None:
    if attribute.type == onnx.AttributeProto.TENSOR:
        _upcast_tensor(attribute.t)
    elif attribute.type == onnx.AttributeProto.TENSORS:
        for tensor in attribute.tensors:
            _upcast_tensor(tensor)
    elif attribute.type == onnx.AttributeProto.INT and attribute.name in ("to", "dtype", "output_dtype"):
        if attribute.i in LOW_PRECISION_TYPES:
            attribute.i = TensorProto.FLOAT
    elif attribute.type == onnx.AttributeProto.GRAPH:
        _upcast_graph(attribute.g)
    elif attribute.type == onnx.AttributeProto.GRAPHS:
        for subgraph in attribute.graphs:
            _upcast_graph(subgraph)
    elif attribute.type == onnx.AttributeProto.TYPE_PROTO:
        _upcast_type(attribute.tp)


def _upcast_tensor(tensor: TensorProto) -> None:
    if tensor.data_type not in LOW_PRECISION_TYPES:
        return
    values = numpy_helper.to_array(tensor).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _upcast_type(type_proto: onnx.TypeProto) -> None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        if type_proto.tensor_type.elem_type in LOW_PRECISION_TYPES:
            type_proto.tensor_type.elem_type = TensorProto.FLOAT
    elif kind == "sequence_type":
        _upcast_type(type_proto.sequence_type.elem_type)
    elif kind == "optional_type":
        _upcast_type(type_proto.optional_type.elem_type)
    elif kind == "map_type":
        _upcast_type(type_proto.map_type.value_type)


def with_float32_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose named low-precision graph outputs are cast to
    float32 (the values unchanged; the output names kept)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for value in graph.output:
        if value.name not in names:
            continue
        inner = f"{value.name}/low_precision"
        for node in graph.node:
            node.output[:] = [inner if name == value.name else name for name in node.output]
            node.input[:] = [inner if name == value.name else name for name in node.input]
        graph.node.append(onnx.helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT))
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    return copy
