"""Parsing an ONNX file field by field, so that the file's bytes and the parsed
model are never held in memory together (see `parse_model_file`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import onnx

from .errors import ModelLoadError

_MODEL_GRAPH_KEY = 7 << 3 | 2        # ModelProto.graph, length-delimited
_GRAPH_INITIALIZER_KEY = 5 << 3 | 2  # GraphProto.initializer, length-delimited
_MERGE_BATCH = 16 << 20


def parse_model_file(path: Path) -> onnx.ModelProto:
    """`onnx.load_model(path, load_external_data=False)` without holding the
    file's bytes and the parsed model at the same time.

    ModelProto.graph is read field by field and every initializer is parsed on
    its own; the other fields are merged as they come (protobuf merges repeated
    fields by appending and singular ones in file order), so the result equals
    a whole-file parse while the peak is the model plus one tensor instead of
    twice the model.
    """
    model = onnx.ModelProto()
    with open(path, "rb", buffering=1 << 20) as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            key, key_raw = _read_varint(f)
            if key == _MODEL_GRAPH_KEY:
                length, _ = _read_varint(f)
                _parse_graph(f, f.tell() + length, model.graph)
            else:
                model.MergeFromString(_read_field(f, key, key_raw))
    return model


def _parse_graph(f: BinaryIO, end: int, graph: onnx.GraphProto) -> None:
    pending = bytearray()  # small fields (nodes, inputs...), merged in batches
    while f.tell() < end:
        key, key_raw = _read_varint(f)
        if key == _GRAPH_INITIALIZER_KEY:
            if pending:
                graph.MergeFromString(bytes(pending))
                pending.clear()
            length, _ = _read_varint(f)
            graph.initializer.add().ParseFromString(_read_exactly(f, length))
        else:
            pending += _read_field(f, key, key_raw)
            if len(pending) > _MERGE_BATCH:
                graph.MergeFromString(bytes(pending))
                pending.clear()
    if f.tell() != end:
        raise ModelLoadError("the graph runs past its declared length")
    if pending:
        graph.MergeFromString(bytes(pending))


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
