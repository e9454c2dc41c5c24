"""`info`: what a model is made of, without running it."""

from __future__ import annotations

from collections import Counter

import onnx

from .io import ModelHandle, parameter_count, tensor_nbytes


def model_info(handle: ModelHandle) -> dict:
    graph = handle.graph
    initializers = {t.name for t in graph.initializer}
    return {
        "model": str(handle.path) if handle.path else graph.name,
        "ir_version": handle.proto.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in handle.proto.opset_import},
        "producer": " ".join(filter(None, [handle.proto.producer_name, handle.proto.producer_version])),
        "inputs": [_value(v) for v in graph.input if v.name not in initializers],
        "outputs": [_value(v) for v in graph.output],
        "nodes": len(graph.node),
        "ops": dict(sorted(Counter(n.op_type for n in graph.node).items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": parameter_count(graph),
        "weight_bytes": int(sum(tensor_nbytes(t) for t in graph.initializer)),
        "external_data": handle.has_external_data(),
    }


def _value(value: onnx.ValueInfoProto) -> dict:
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "?"
    return {"name": value.name, "dtype": dtype.lower(), "shape": dims}


def format_info(info: dict) -> str:
    opsets = ", ".join(f"{domain} {version}" for domain, version in info["opsets"].items())
    lines = [f"{info['model']}: IR {info['ir_version']}, opsets {opsets}"
             + (f", produced by {info['producer']}" if info["producer"] else "")]
    for kind in ("inputs", "outputs"):
        for value in info[kind]:
            lines.append(f"  {kind[:-1]:6} {value['name']}: {value['dtype']} {value['shape']}")
    ops = ", ".join(f"{op} {count}" for op, count in info["ops"].items())
    lines.append(f"  {info['nodes']} nodes: {ops}")
    size = info["weight_bytes"]
    lines.append(f"  {info['parameters']:,} parameters, {size:,} bytes of weights"
                 + (" (external data)" if info["external_data"] else ""))
    return "\n".join(lines)
