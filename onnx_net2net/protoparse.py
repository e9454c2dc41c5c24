"""Parsing an ONNX file field by field, so that the file's bytes and the parsed
model are never held in memory together (see `parse_model_file`).

With `lazy_bytes`, the raw_data of large initializers is not read at all: the
parse records where each payload lies in the file (`Payload`) and leaves the
tensor without raw_data; `io.load(path, lazy=True)` turns those tensors into
references to the model file itself, read only if a rewrite needs them and
otherwise copied from file to file when the model is saved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx

from .errors import ModelLoadError

_MODEL_GRAPH_KEY = 7 << 3 | 2        # ModelProto.graph, length-delimited
_GRAPH_INITIALIZER_KEY = 5 << 3 | 2  # GraphProto.initializer, length-delimited
_TENSOR_RAW_DATA_KEY = 9 << 3 | 2  # TensorProto.raw_data, length-delimited
_MERGE_BATCH = 16 << 20


@dataclass(frozen=True)
class Payload:
    """Where the raw_data bytes of initializer `index` lie in the model file."""

    index: int
    offset: int
    length: int


def parse_model_file(path: Path, *, lazy_bytes: int | None = None,
                     payloads: list[Payload] | None = None) -> onnx.ModelProto:
    """`onnx.load_model(path, load_external_data=False)` without holding the
    file's bytes and the parsed model at the same time.

    ModelProto.graph is read field by field and every initializer is parsed on
    its own; the other fields are merged as they come (protobuf merges repeated
    fields by appending and singular ones in file order), so the result equals
    a whole-file parse while the peak is the model plus one tensor instead of
    twice the model.

    Args:
        path: the model file.
        lazy_bytes: skip the raw_data of initializers holding at least this
            many bytes (None: read everything).
        payloads: receives a `Payload` for every initializer left without its
            raw_data (required with `lazy_bytes`).
    """
    model = onnx.ModelProto()
    with open(path, "rb", buffering=1 << 20) as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            key, key_raw = _read_varint(f)
            if key == _MODEL_GRAPH_KEY:
                length, _ = _read_varint(f)
                _parse_graph(f, f.tell() + length, model.graph, lazy_bytes, payloads)
            else:
                model.MergeFromString(_read_field(f, key, key_raw))
    return model


def _parse_graph(f: BinaryIO, end: int, graph: onnx.GraphProto, lazy_bytes: int | None,
                 payloads: list[Payload] | None) -> None:
    pending = bytearray()  # small fields (nodes, inputs...), merged in batches
    while f.tell() < end:
        key, key_raw = _read_varint(f)
        if key == _GRAPH_INITIALIZER_KEY:
            if pending:
                graph.MergeFromString(bytes(pending))
                pending.clear()
            length, _ = _read_varint(f)
            tensor = graph.initializer.add()
            if lazy_bytes is not None and length >= lazy_bytes:
                payload = _parse_tensor_lazily(f, f.tell() + length, tensor, lazy_bytes, len(graph.initializer) - 1)
                if payload is not None:
                    payloads.append(payload)
            else:
                tensor.ParseFromString(_read_exactly(f, length))
        else:
            pending += _read_field(f, key, key_raw)
            if len(pending) > _MERGE_BATCH:
                graph.MergeFromString(bytes(pending))
                pending.clear()
    if f.tell() != end:
        raise ModelLoadError("the graph runs past its declared length")
    if pending:
        graph.MergeFromString(bytes(pending))


def _parse_tensor_lazily(f: BinaryIO, end: int, tensor: onnx.TensorProto, lazy_bytes: int,
                         index: int) -> Payload | None:
    """Parse a TensorProto without reading its raw_data when that holds at
    least `lazy_bytes`; its Payload, or None when the tensor was parsed whole
    (small, no raw_data, a raw_data given twice, external data fields too, or
    a string tensor: such tensors keep exactly what a whole parse gives)."""
    start = f.tell()
    metadata = bytearray()
    found = []
    while f.tell() < end:
        key, key_raw = _read_varint(f)
        if key == _TENSOR_RAW_DATA_KEY:
            length, _ = _read_varint(f)
            found.append((f.tell(), length))
            f.seek(length, os.SEEK_CUR)
        else:
            metadata += _read_field(f, key, key_raw)
    if f.tell() != end:
        raise ModelLoadError("a tensor runs past its declared length")
    tensor.ParseFromString(bytes(metadata))
    whole = (len(found) != 1 or found[0][1] < lazy_bytes or tensor.HasField("data_location")
             or len(tensor.external_data) > 0 or tensor.data_type == onnx.TensorProto.STRING)
    if whole:
        f.seek(start)
        tensor.ParseFromString(_read_exactly(f, end - start))
        return None
    offset, length = found[0]
    return Payload(index, offset, length)


def _read_varint(f: BinaryIO) -> tuple[int, bytes]:
    raw = bytearray()
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte or shift > 63:
            raise ModelLoadError("truncated or malformed protobuf")
        raw += byte
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value, bytes(raw)
        shift += 7


def _read_exactly(f: BinaryIO, length: int) -> bytes:
    data = f.read(length)
    if len(data) != length:
        raise ModelLoadError("truncated protobuf")
    return data


def _read_field(f: BinaryIO, key: int, key_raw: bytes) -> bytes:
    """The encoded bytes of the field whose key was just read."""
    wire = key & 7
    if wire == 0:
        return key_raw + _read_varint(f)[1]
    if wire == 1:
        return key_raw + _read_exactly(f, 8)
    if wire == 5:
        return key_raw + _read_exactly(f, 4)
    if wire == 2:
        length, length_raw = _read_varint(f)
        return key_raw + length_raw + _read_exactly(f, length)
    raise ModelLoadError(f"unsupported protobuf wire type {wire}")
