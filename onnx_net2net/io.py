"""Loading and saving ONNX models safely.

Three promises, kept here and nowhere else:

* Nothing is read outside the model's folder: every external-data location is
  checked (relative, inside the folder after resolving links, within the file)
  before a byte of it is read.
* The input is never modified, and an output never replaces the input.
* An output is either complete or absent: it is written to temporary files in
  the target folder and renamed into place; stale temporaries of killed runs
  are removed by the next save into the same folder.

Weights held in external data files are read lazily (only the tensors a rewrite
changes are ever loaded) and streamed from the input's data file into the
output's, so memory stays bounded by what changes, not by the model. Where a
whole model must be in memory (the Python API returns ModelProtos; trial runs
in `inspect`), `ModelHandle.inlined` reads it through the same checks.

This module is the public face (`load`, `from_proto`, `save`, `ModelHandle`);
the work is done in `protoparse` (reading the file), `safety` (the checks
before trust), `storage` (tensor sizes and external references) and `saving`
(atomic writes).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import ModelLoadError, first_line
from .protoparse import Payload, parse_model_file
from .safety import (check_input_file, check_model_header, check_raw_length, check_tensor_header, check_tensors,
                     check_text, resolve_external, sniff_text, tensor_label)
from .saving import EXTERNAL_DATA_THRESHOLD, INLINE_TENSOR_BYTES, check_output_path, copy_fields, save
from .storage import (FLOAT_TYPES, PACKED_BITS, all_tensors, copy_metadata, element_count, external_info, is_external,
                      tensor_nbytes)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "INLINE_TENSOR_BYTES", "ModelHandle", "available_memory", "check_output_path",
           "copy_fields", "from_proto", "load", "parameter_count", "save", "set_tensor_values", "tensor_nbytes"]


PROTOBUF_LIMIT = 2**31 - 1
#: `load(lazy=True)` leaves inline tensors of at least this many bytes in the file until they are read.
LAZY_TENSOR_BYTES = 1 << 16


@dataclass
class ModelHandle:
    """A model and where its weights live.

    Attributes:
        proto: the ModelProto. Initializers stored externally keep their
            external references until a rewrite replaces their data.
        base_dir: the folder external-data locations resolve against, or None
            for a model that came from memory.
        path: the file the model was loaded from, if any.
        checked: `onnx.checker` accepted the model as it was given (it runs
            once, on the first graph index built over the handle).
        rewritten: a rewrite has changed the model since (from then on, a
            model that does not check is our bug, not the user's).
        deferred: for a model loaded with `lazy=True`, the inline tensors
            whose bytes were left in the model file: payload offset -> the
            tensor as stored, without its raw_data. In `proto` such a tensor
            is an external reference to the model file itself (so every
            reader of external data reads it); `save` writes it back inline,
            as it was, copying its bytes from file to file.
        deferred_location: the model file's name, the location of those references.
    """

    proto: onnx.ModelProto
    base_dir: Path | None = None
    path: Path | None = None
    checked: bool = False
    rewritten: bool = False
    deferred: dict = field(default_factory=dict, repr=False)
    deferred_location: str | None = None
    _data_sizes: dict = field(default_factory=dict, repr=False)
    _resolved: dict = field(default_factory=dict, repr=False)  # location -> checked real path

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def has_external_data(self) -> bool:
        """Whether weights live in external data files (deferred inline ones do not count)."""
        return any(is_external(t) and self.deferred_metadata(t) is None for t in all_tensors(self.proto))

    def deferred_metadata(self, tensor: TensorProto) -> TensorProto | None:
        """The stored form (without raw_data) of an inline tensor whose bytes
        `load(lazy=True)` left in the model file, or None for any other tensor."""
        if not self.deferred or not is_external(tensor):
            return None
        info = external_info(tensor)
        if info.get("location") != self.deferred_location:
            return None
        return self.deferred.get(int(info.get("offset", -1)))

    def array(self, tensor: TensorProto) -> np.ndarray:
        """The values of `tensor`, read from its external file if needed."""
        if not is_external(tensor):
            try:
                return numpy_helper.to_array(tensor)
            except Exception as exc:  # noqa: BLE001 - onnx/numpy raise ValueError, TypeError, KeyError...
                raise ModelLoadError(f"{tensor_label(tensor)}: its data cannot be read ({first_line(exc, 200)})") from None
        if self.base_dir is None:
            raise ModelLoadError(f"tensor '{tensor.name}' has external data but the model has no folder")
        info = external_info(tensor)
        if tensor.data_type in PACKED_BITS:
            inline = TensorProto()
            copy_metadata(tensor, inline)
            inline.raw_data = self.external_bytes(tensor)
            return numpy_helper.to_array(inline)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = element_count(tensor)
        # The checked, resolved path: never the raw location (see resolve_external).
        with open(self.external_path(tensor), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise ModelLoadError(f"external data of tensor '{tensor.name}' is shorter than its shape")
        return data.reshape(tuple(tensor.dims))

    def external_path(self, tensor: TensorProto) -> Path:
        """The checked real path of an external tensor's data file (checked
        once per location: every tensor of a model usually shares one file)."""
        if self.base_dir is None:
            raise ModelLoadError(f"{tensor_label(tensor)} has external data but the model has no folder")
        location = external_info(tensor).get("location", "")
        resolved = self._resolved.get(location)
        if resolved is None:
            resolved = self._resolved[location] = resolve_external(self.base_dir, location, tensor_label(tensor))
        return resolved

    def external_bytes(self, tensor: TensorProto) -> bytes:
        """The stored bytes of an external tensor (for small tensors: they are held in memory)."""
        info = external_info(tensor)
        length = tensor_nbytes(tensor)
        with open(self.external_path(tensor), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(length)
        if len(data) != length:
            raise ModelLoadError(f"external data of tensor '{tensor.name}' is shorter than its shape")
        return data

    def weight_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.graph.initializer)

    def copy(self) -> ModelHandle:
        """An independent copy of the model (external references still resolve)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        return ModelHandle(proto=proto, base_dir=self.base_dir, path=self.path, checked=self.checked,
                           rewritten=self.rewritten, deferred=self.deferred, deferred_location=self.deferred_location)

    def inlined(self, *, copy: bool = False) -> ModelHandle:
        """The model with every external weight read into its proto (into a
        copy with `copy`), through the same checked reads as `array`."""
        target = self.copy() if copy else self
        for tensor in all_tensors(target.proto):
            if not is_external(tensor):
                continue
            data = self.external_bytes(tensor)
            stored = self.deferred_metadata(tensor)
            if stored is not None:  # back to exactly what the file holds
                name = tensor.name
                tensor.CopyFrom(stored)
                tensor.name = name
            else:
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = data
        return ModelHandle(proto=target.proto, path=self.path, checked=self.checked, rewritten=self.rewritten)


def parameter_count(graph: onnx.GraphProto) -> int:
    """Number of floating-point weight elements (initializers)."""
    return sum(element_count(t) for t in graph.initializer if t.data_type in FLOAT_TYPES)


def set_tensor_values(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace the data (and dims) of `tensor` in place, keeping its name and type."""
    name, data_type = tensor.name, tensor.data_type
    array = np.ascontiguousarray(values).reshape(np.shape(values))  # (ascontiguousarray makes 0-d 1-d)
    array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(data_type), copy=False)
    tensor.Clear()
    if array.dtype in _PLAIN_DTYPES and sys.byteorder == "little":
        # What numpy_helper.from_array stores for these types, without
        # building a second TensorProto and copying it in (for large weights).
        tensor.dims.extend(array.shape)
        tensor.data_type = data_type
        tensor.raw_data = array.tobytes()
    else:
        tensor.CopyFrom(numpy_helper.from_array(array, name))
    tensor.name = name


_PLAIN_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int8, np.int16, np.int32,
                                                np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_))


def load(path: str | os.PathLike, *, lazy: bool = False) -> ModelHandle:
    """Load a model file, checking it can be trusted before reading any weight.

    Args:
        path: the model file.
        lazy: leave the bytes of inline tensors of `LAZY_TENSOR_BYTES` or more
            in the file (see `ModelHandle.deferred`): the model costs the
            memory of its graph, a rewrite reads the tensors it changes, and
            `save` copies the others from file to file.

    Raises:
        ModelLoadError: the file is missing, not ONNX, unsupported, or its
            external data is unsafe or incomplete.
    """
    path = Path(path)
    check_input_file(path)
    payloads = []
    try:
        proto = parse_model_file(path, lazy_bytes=LAZY_TENSOR_BYTES if lazy else None, payloads=payloads)
    except Exception as exc:  # protobuf raises several unrelated types
        kind = sniff_text(path)
        if kind:
            raise ModelLoadError(f"{path}: not an ONNX model ({kind}, not a binary ONNX protobuf)") from None
        raise ModelLoadError(f"{path}: not a valid ONNX model ({first_line(exc, 200)})") from None
    check_text(proto, path)
    check_model_header(proto, path)
    handle = ModelHandle(proto=proto, base_dir=path.resolve().parent, path=path)
    if payloads:
        _defer(handle, payloads)
    check_tensors(handle.proto, handle.base_dir, handle._data_sizes)
    return handle


def _defer(handle: ModelHandle, payloads: list[Payload]) -> None:
    """Turn the tensors whose raw_data the parse skipped into references to
    the model file itself, after the checks an inline tensor gets."""
    handle.deferred_location = Path(os.path.realpath(handle.path)).name
    for payload in payloads:
        tensor = handle.graph.initializer[payload.index]
        check_tensor_header(tensor)
        check_raw_length(tensor, payload.length)
        stored = TensorProto()
        stored.CopyFrom(tensor)
        handle.deferred[payload.offset] = stored
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", handle.deferred_location), ("offset", payload.offset),
                           ("length", payload.length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ModelHandle:
    """Wrap an in-memory ModelProto (external references resolve in `base_dir`)."""
    check_text(proto, "model")
    check_model_header(proto, "model")
    handle = ModelHandle(proto=proto, base_dir=Path(base_dir).resolve() if base_dir else None)
    if handle.has_external_data() and handle.base_dir is None:
        raise ModelLoadError("model has external data references but no base folder was given")
    check_tensors(handle.proto, handle.base_dir, handle._data_sizes)
    return handle


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
