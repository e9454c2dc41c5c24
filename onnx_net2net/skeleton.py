"""The model without its weights: what shape inference and the ONNX checker
need, at a cost that does not grow with the weights.

`light_model` keeps the graph and the small initializers (shape constants)
and turns large ones into graph inputs of the same type and shape. `infer`
runs ONNX shape inference on it (strict, lenient only for ops ONNX has no
schema for); `full_check_error` runs `onnx.checker.check_model(full_check=True)`
on it: the CLI calls it on the input once and on every output before writing.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from .errors import first_line
from .io import ModelHandle, copy_fields, tensor_nbytes

#: Initializers up to this size are kept for shape inference (shape constants).
SHAPE_INFERENCE_KEEP_BYTES = 1 << 16


def light_model(handle: ModelHandle) -> onnx.ModelProto:
    """A copy of the model for checking and shape inference, without the bulk
    of the weights.

    Big initializers become graph inputs of the same type and shape: shape
    inference needs their shapes, not their values, and copying them would
    double the memory of a large model. Small ones (shape constants) keep
    their values (integer ones are read from external data where they are
    stored there; float weights never are).
    """
    model = onnx.ModelProto()
    copy_fields(handle.proto, model, skip="graph")
    graph, source = model.graph, handle.proto.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    declared = {v.name for v in source.input}
    for tensor in source.initializer:
        external = tensor.data_location == TensorProto.EXTERNAL
        if tensor_nbytes(tensor) <= SHAPE_INFERENCE_KEEP_BYTES and not (external and _is_float(tensor)):
            graph.initializer.append(tensor)
            if external:  # a shape constant stored outside: read it (float weights are never read here)
                kept = graph.initializer[-1]
                del kept.external_data[:]
                kept.data_location = TensorProto.DEFAULT
                kept.raw_data = handle.external_bytes(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return model


def _is_float(tensor: TensorProto) -> bool:
    if tensor.data_type == TensorProto.BFLOAT16:  # numpy sees ml_dtypes' bfloat16 as kind "V"
        return True
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind in "fc"


def infer(light: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, strict; lenient only where the model uses ops
    ONNX has no schema for (custom domains).

    Raises:
        onnx.shape_inference.InferenceError: the declared shapes contradict
            the ones inference computes.
    """
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        message = first_line(exc).lower()
        if "custom" in message or "no op registered" in message or "schema" in message:
            return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        raise


def full_check_error(handle: ModelHandle) -> str | None:
    """Why `onnx.checker.check_model(full_check=True)` rejects the model
    (weights left out: their shapes are checked, not their bytes), or None."""
    try:
        onnx.checker.check_model(light_model(handle), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises ValidationError, InferenceError, RuntimeError
        return first_line(exc)
    return None
