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
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import ModelLoadError, UnsafePathError, UserError

PROTOBUF_LIMIT = 2**31 - 1
#: Above this many bytes of weights an output is written with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors smaller than this stay inline even in an external-data output.
INLINE_TENSOR_BYTES = 1024
_COPY_CHUNK = 64 << 20


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
    """

    proto: onnx.ModelProto
    base_dir: Path | None = None
    path: Path | None = None
    checked: bool = False
    rewritten: bool = False
    _data_sizes: dict = field(default_factory=dict, repr=False)
    _resolved: dict = field(default_factory=dict, repr=False)  # location -> checked real path

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def has_external_data(self) -> bool:
        return any(_is_external(t) for t in _all_tensors(self.proto))

    def array(self, tensor: TensorProto) -> np.ndarray:
        """The values of `tensor`, read from its external file if needed."""
        if not _is_external(tensor):
            try:
                return numpy_helper.to_array(tensor)
            except Exception as exc:  # noqa: BLE001 - onnx/numpy raise ValueError, TypeError, KeyError...
                raise ModelLoadError(f"{_tensor_label(tensor)}: its data cannot be read ({_first_line(exc)})") from None
        if self.base_dir is None:
            raise ModelLoadError(f"tensor '{tensor.name}' has external data but the model has no folder")
        info = _external_info(tensor)
        if tensor.data_type in _PACKED_BITS:
            inline = TensorProto()
            _copy_metadata(tensor, inline)
            inline.raw_data = self.external_bytes(tensor)
            return numpy_helper.to_array(inline)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = _element_count(tensor)
        # The checked, resolved path: never the raw location (see _resolve_external).
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
            raise ModelLoadError(f"{_tensor_label(tensor)} has external data but the model has no folder")
        location = _external_info(tensor).get("location", "")
        resolved = self._resolved.get(location)
        if resolved is None:
            resolved = self._resolved[location] = _resolve_external(self.base_dir, location, _tensor_label(tensor))
        return resolved

    def external_bytes(self, tensor: TensorProto) -> bytes:
        """The stored bytes of an external tensor (for small tensors: they are held in memory)."""
        info = _external_info(tensor)
        length = tensor_nbytes(tensor)
        with open(self.external_path(tensor), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(length)
        if len(data) != length:
            raise ModelLoadError(f"external data of tensor '{tensor.name}' is shorter than its shape")
        return data

    def weight_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.graph.initializer)

    def copy(self) -> "ModelHandle":
        """An independent copy of the model (external references still resolve)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        return ModelHandle(proto=proto, base_dir=self.base_dir, path=self.path, checked=self.checked,
                           rewritten=self.rewritten)

    def inlined(self, *, copy: bool = False) -> "ModelHandle":
        """The model with every external weight read into its proto (into a
        copy with `copy`), through the same checked reads as `array`."""
        target = self.copy() if copy else self
        for tensor in _all_tensors(target.proto):
            if _is_external(tensor):
                data = self.external_bytes(tensor)
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = data
        return ModelHandle(proto=target.proto, path=self.path, checked=self.checked, rewritten=self.rewritten)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Size in bytes of a tensor's data, without loading it."""
    if _is_external(tensor):
        length = _external_info(tensor).get("length")
        if length is not None:
            return int(length)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    bits = _element_bits(tensor.data_type)
    if bits is None:
        raise ModelLoadError(f"tensor '{tensor.name}' has unknown data type {tensor.data_type}")
    return (_element_count(tensor) * bits + 7) // 8


#: Types stored several elements to a byte (raw_data and external data are packed).
_PACKED_BITS = {TensorProto.UINT4: 4, TensorProto.INT4: 4, TensorProto.FLOAT4E2M1: 4,
                TensorProto.UINT2: 2, TensorProto.INT2: 2}
_KNOWN_TYPES = frozenset(value for name, value in TensorProto.DataType.items() if name != "UNDEFINED")


def _element_bits(data_type: int) -> int | None:
    """Bits per element in raw/external storage, or None for an unknown or variable-size type."""
    if data_type in _PACKED_BITS:
        return _PACKED_BITS[data_type]
    if data_type not in _KNOWN_TYPES or data_type == TensorProto.STRING:
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:  # noqa: BLE001 - a type this numpy/onnx cannot map
        return None
    return dtype.itemsize * 8


def _element_count(tensor: TensorProto) -> int:
    """The number of elements (a Python int: no int64 overflow)."""
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count


_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})


def parameter_count(graph: onnx.GraphProto) -> int:
    """Number of floating-point weight elements (initializers)."""
    return sum(_element_count(t) for t in graph.initializer if t.data_type in _FLOAT_TYPES)


def set_tensor_values(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace the data (and dims) of `tensor` in place, keeping its name and type."""
    name, data_type = tensor.name, tensor.data_type
    array = np.ascontiguousarray(values).reshape(np.shape(values))  # (ascontiguousarray makes 0-d 1-d)
    new = numpy_helper.from_array(array.astype(onnx.helper.tensor_dtype_to_np_dtype(data_type), copy=False), name)
    tensor.Clear()
    tensor.CopyFrom(new)
    tensor.name = name


# ----------------------------------------------------------------------------
# Loading


def load(path: str | os.PathLike) -> ModelHandle:
    """Load a model file, checking it can be trusted before reading any weight.

    Raises:
        ModelLoadError: the file is missing, not ONNX, unsupported, or its
            external data is unsafe or incomplete.
    """
    path = Path(path)
    _check_input_file(path)
    try:
        proto = _parse_model_file(path)
    except Exception as exc:  # protobuf raises several unrelated types
        kind = _sniff_text(path)
        if kind:
            raise ModelLoadError(f"{path}: not an ONNX model ({kind}, not a binary ONNX protobuf)") from None
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    _check_text(proto, path)
    _check_model_header(proto, path)
    handle = ModelHandle(proto=proto, base_dir=path.resolve().parent, path=path)
    _check_tensors(handle)
    return handle


_MODEL_GRAPH_KEY = 7 << 3 | 2        # ModelProto.graph, length-delimited
_GRAPH_INITIALIZER_KEY = 5 << 3 | 2  # GraphProto.initializer, length-delimited
_MERGE_BATCH = 16 << 20


def _parse_model_file(path: Path) -> onnx.ModelProto:
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


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ModelHandle:
    """Wrap an in-memory ModelProto (external references resolve in `base_dir`)."""
    _check_text(proto, "model")
    _check_model_header(proto, "model")
    handle = ModelHandle(proto=proto, base_dir=Path(base_dir).resolve() if base_dir else None)
    if handle.has_external_data() and handle.base_dir is None:
        raise ModelLoadError("model has external data references but no base folder was given")
    _check_tensors(handle)
    return handle


def _sniff_text(path: Path) -> str | None:
    """'a JSON file' / 'a text file' when the start of the file is text."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.strip() or any(ch < " " and ch not in "\t\r\n" for ch in text):
        return None
    return "a JSON file" if text.lstrip()[:1] in ("{", "[") else "a text file"


def _check_input_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: not readable")


def _check_text(proto: onnx.ModelProto, where) -> None:
    """Every text field is valid UTF-8. Protobuf parses invalid text without a
    complaint, then hands it to Python as bytes or fails when it is read."""
    try:
        _check_text_fields(proto)
    except _BadText as bad:
        raise ModelLoadError(f"{where}: not a valid ONNX model (field '{bad}' is not valid UTF-8 text)") from None


class _BadText(Exception):
    pass


_STRING = 9  # FieldDescriptor.TYPE_STRING
_MESSAGE = 11  # FieldDescriptor.TYPE_MESSAGE


def _check_text_fields(message) -> None:
    """Only the fields that are set (ListFields): an unset field holds no text,
    and a NodeProto's many empty attribute fields cost most of the walk."""
    try:
        fields = message.ListFields()
    except UnicodeDecodeError:
        raise _BadText(message.DESCRIPTOR.full_name) from None
    for descriptor, value in fields:
        if descriptor.type not in (_STRING, _MESSAGE):
            continue
        try:
            values = list(value) if _is_repeated(descriptor) else [value]
        except UnicodeDecodeError:
            raise _BadText(descriptor.full_name) from None
        for item in values:
            if descriptor.type == _MESSAGE:
                _check_text_fields(item)
            elif not isinstance(item, str):
                raise _BadText(descriptor.full_name)


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return field.label == field.LABEL_REPEATED


def _check_model_header(proto: onnx.ModelProto, where) -> None:
    if not proto.HasField("graph") or not proto.ir_version:
        raise ModelLoadError(f"{where}: not an ONNX model (no graph or IR version)")
    if proto.ir_version < 3:
        raise ModelLoadError(f"{where}: unsupported IR version {proto.ir_version} (3 or newer is needed)")
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{where}: unsupported IR version {proto.ir_version} (this onnx supports up to {onnx.IR_VERSION})")
    if not proto.opset_import:
        raise ModelLoadError(f"{where}: not an ONNX model (no opset_import)")
    if not proto.graph.output:
        raise ModelLoadError(f"{where}: graph has no outputs")
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise ModelLoadError(
                f"{where}: unsupported opset {opset.version} for the ONNX domain (supported: 1..{newest})")


def _check_tensors(handle: ModelHandle) -> None:
    """Every tensor of the model: a known type, sane dims, data that matches
    them; external references are checked before any byte of them is read."""
    base = handle.base_dir.resolve() if handle.base_dir is not None else None
    for tensor in _all_tensors(handle.proto):
        _check_tensor_header(tensor)
        if _is_external(tensor):
            _check_external_tensor(tensor, base, handle._data_sizes)
        else:
            _check_inline_tensor(tensor)


def _tensor_label(tensor: TensorProto) -> str:
    return f"tensor '{_printable(tensor.name) or '<unnamed>'}'"


def _check_tensor_header(tensor: TensorProto) -> None:
    if tensor.data_type not in _KNOWN_TYPES:
        raise ModelLoadError(f"{_tensor_label(tensor)} has unknown data type {tensor.data_type}")
    if any(dim < 0 for dim in tensor.dims):
        raise ModelLoadError(f"{_tensor_label(tensor)} has a negative dimension {list(tensor.dims)}")


# Where the values of each type live when they are not in raw_data (and how many fields per element).
_TYPED_FIELDS = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
    **{t: ("int32_data", 1) for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
                                      TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16,
                                      TensorProto.BFLOAT16)},
}


def _check_inline_tensor(tensor: TensorProto) -> None:
    """The data held in the model matches the tensor's shape (numpy would fail later otherwise)."""
    count = _element_count(tensor)
    bits = _element_bits(tensor.data_type)
    if _has_raw(tensor):
        if bits is None:
            return
        expected = (count * bits + 7) // 8
        got = len(tensor.raw_data)
        if got != expected:
            raise ModelLoadError(f"{_tensor_label(tensor)}: shape {list(tensor.dims)} needs {expected} bytes of "
                                 f"data, the model holds {got}")
        return
    field_name, per_element = _TYPED_FIELDS.get(tensor.data_type, (None, 1))
    if field_name is None:
        # Packed and exotic types: decode small ones once, to fail here rather than later.
        if count <= 1 << 16:
            try:
                numpy_helper.to_array(tensor)
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(f"{_tensor_label(tensor)}: its data does not match its type and shape "
                                     f"({_first_line(exc)})") from None
        return
    got = len(getattr(tensor, field_name))
    expected = count * per_element
    if got != expected and not (got == 0 and count == 0):
        raise ModelLoadError(f"{_tensor_label(tensor)}: shape {list(tensor.dims)} has {count} element(s), "
                             f"the model holds {got // per_element if got >= expected else got} value(s)")


def _has_raw(tensor: TensorProto) -> bool:
    try:
        return tensor.HasField("raw_data")
    except ValueError:  # proto3-style field without presence
        return bool(tensor.raw_data)


def _check_external_tensor(tensor: TensorProto, base: Path | None, sizes: dict) -> None:
    info = _external_info(tensor)
    name = _tensor_label(tensor)
    location = info.get("location", "")
    shown = _printable(location)
    if base is None:
        raise ModelLoadError(f"{name} has external data but the model has no folder")
    if tensor.data_type == TensorProto.STRING:
        raise ModelLoadError(f"{name}: string tensors cannot be stored as external data")
    real = _resolve_external(base, location, name)
    size = sizes.get(real)
    if size is None:
        size = sizes[real] = real.stat().st_size
    offset = _external_int(info, "offset", 0, name)
    bits = _element_bits(tensor.data_type)
    expected = None if bits is None else (_element_count(tensor) * bits + 7) // 8
    length = _external_int(info, "length", expected, name)
    if length is None:
        raise ModelLoadError(f"{name}: external data has no length and its type has no fixed size")
    if offset + length > size:
        raise ModelLoadError(
            f"{name}: external data [{offset}, {offset + length}) runs past the end of '{shown}' ({size} bytes)")
    if expected is not None and length != expected:
        raise ModelLoadError(f"{name}: external data holds {length} bytes but its shape needs {expected}")


def _resolve_external(base: Path, location: str, name: str) -> Path:
    """The real path of an external data file, checked to be a regular file
    inside `base`; raises otherwise. Readers open this path, never the raw
    location: the kernel resolves `d/../x` through a symlinked `d`, which a
    purely lexical check would miss."""
    shown = _printable(location)
    if not location:
        raise UnsafePathError(f"{name}: external data has no location")
    if "\0" in location:
        raise UnsafePathError(f"{name}: external data location '{shown}' contains a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise UnsafePathError(f"{name}: external data location '{shown}' is absolute")
    normal = os.path.normpath(location)
    if normal == ".." or normal.startswith(".." + os.sep):
        raise UnsafePathError(f"{name}: external data location '{shown}' escapes the model's folder")
    base = Path(os.path.realpath(base))
    try:
        real = Path(os.path.realpath(base / location))  # symlinks first, then '..', as the kernel does
        if real != base and base not in real.parents:
            raise UnsafePathError(f"{name}: external data location '{shown}' resolves outside the model's folder")
        if not real.exists():
            raise ModelLoadError(f"{name}: external data file '{shown}' is missing")
        if not real.is_file():
            raise ModelLoadError(f"{name}: external data '{shown}' is not a regular file")
    except OSError as exc:  # a name too long, a loop of links...
        raise ModelLoadError(f"{name}: external data location '{shown}' cannot be used "
                             f"({exc.strerror or exc})") from None
    return real


def _external_int(info: dict, key: str, default, name: str):
    text = info.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ModelLoadError(f"{name}: external data {key} '{_printable(text)}' is not an integer") from None
    if value < 0:
        raise ModelLoadError(f"{name}: external data {key} {value} is negative")
    return value


def _printable(text: str, limit: int = 120) -> str:
    """Text safe for a one-line message (control characters escaped, length capped)."""
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text[:limit])
    return shown + ("..." if len(text) > limit else "")


# ----------------------------------------------------------------------------
# Saving


def check_output_path(out: str | os.PathLike, inputs: list[Path] = ()) -> Path:
    """Refuse an output path that is unusable or would overwrite an input."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: output path is a directory")
    parent = out.resolve().parent if out.parent != Path("") else Path.cwd()
    if not parent.is_dir():
        raise UserError(f"{out}: output folder '{out.parent}' does not exist")
    if not os.access(parent, os.W_OK) or (parent.stat().st_mode & 0o222) == 0:
        raise UserError(f"{out}: output folder '{out.parent}' is read-only")
    real_out = os.path.realpath(out)
    for source in inputs:
        if os.path.realpath(source) == real_out:
            raise UserError(f"{out}: output path is the input model; choose another path")
    return out


def save(handle: ModelHandle, out: str | os.PathLike, *, external: bool | None = None,
         protected: list[Path] = (), before_commit: Callable[[Path], None] | None = None,
         progress: Callable[[int], None] | None = None) -> Path:
    """Write the model atomically to `out`.

    Everything is first written into a private temporary folder beside `out`;
    `before_commit(temporary_model_path)` may inspect it (verification) and
    raise to abandon the write. Then the data file and the model are renamed
    into place, so a reader never sees a partial output.

    Args:
        handle: the model to write; it is not modified.
        out: the output model path.
        external: write weights to `<out name>.data` beside the output. Default:
            when the input had external data or the weights exceed about 1.8 GB.
        protected: files that must not be overwritten (the input and its data).
        before_commit: called with the temporary model path before renaming.
        progress: called with the bytes of each weight written.

    Returns:
        The output path.
    """
    out = Path(out)
    sources = list(protected) + ([handle.path] if handle.path else []) + _data_files(handle)
    check_output_path(out, sources)
    if external is None:
        external = handle.has_external_data()
    external = external or handle.weight_bytes() > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    data_path = out.parent / data_name
    if external and any(os.path.realpath(data_path) == os.path.realpath(s) for s in sources):
        raise UserError(f"{data_path}: output data file would overwrite the input's data")
    remove_stale_temporaries(out.parent)
    staging = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}.tmp"
    if staging.is_dir() and not staging.is_symlink():  # a leftover of this same process (a pid reused)
        shutil.rmtree(staging, ignore_errors=True)
    elif staging.exists() or staging.is_symlink():
        staging.unlink()
    staging.mkdir()
    try:
        staged_model = staging / out.name
        with open(staged_model, "wb") as model_file:
            if external:
                with open(staging / data_name, "wb") as data_file:
                    _write_model(handle, model_file, data_file, data_name, progress)
                    _sync(data_file)
            else:
                _write_model(handle, model_file, None, None, progress)
            _sync(model_file)
        if before_commit is not None:
            before_commit(staged_model)
        if external:
            # Two renames cannot be one atomic step. Remove an older model at
            # `out` first, so that a run killed between the renames leaves no
            # model (never an old model reading the new data file).
            if out.exists() or out.is_symlink():
                out.unlink()
            os.replace(staging / data_name, data_path)
        os.replace(staged_model, out)
        _sync_folder(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_model(handle: ModelHandle, model_file: BinaryIO, data_file: BinaryIO | None,
                 data_name: str | None, progress: Callable[[int], None] | None = None) -> None:
    """Stream the model: skeleton first, then one initializer at a time.

    Protobuf merges concatenated messages (repeated fields append), so a model
    can be written as its skeleton followed by one small ModelProto per
    initializer; no copy of the whole model is ever built in memory.
    """
    model_file.write(_skeleton(handle.proto).SerializeToString())
    for tensor in handle.graph.initializer:
        piece = onnx.ModelProto()
        out_tensor = piece.graph.initializer.add()
        if data_file is not None and tensor_nbytes(tensor) >= INLINE_TENSOR_BYTES:
            _copy_metadata(tensor, out_tensor)
            offset = _align(data_file)
            length = _write_tensor_bytes(handle, tensor, data_file)
            out_tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = out_tensor.external_data.add()
                entry.key, entry.value = key, value
        elif _is_external(tensor):
            _copy_metadata(tensor, out_tensor)
            out_tensor.raw_data = handle.external_bytes(tensor)
        else:
            out_tensor.CopyFrom(tensor)
        model_file.write(piece.SerializeToString())
        if progress is not None:
            progress(tensor_nbytes(tensor))


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its initializers (which are streamed)."""
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip="graph")
    copy_fields(model.graph, skeleton.graph, skip="initializer")
    return skeleton


def copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of a proto message but `skip` (no deep copy of what is skipped)."""
    for descriptor, value in src.ListFields():
        if descriptor.name == skip:
            continue
        if isinstance(value, (str, bytes, int, float, bool)):
            setattr(dst, descriptor.name, value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, descriptor.name).CopyFrom(value)
        else:
            getattr(dst, descriptor.name).extend(value)


def _copy_metadata(src: TensorProto, dst: TensorProto) -> None:
    dst.name = src.name
    dst.data_type = src.data_type
    dst.dims.extend(src.dims)
    if src.doc_string:
        dst.doc_string = src.doc_string


def _write_tensor_bytes(handle: ModelHandle, tensor: TensorProto, data_file: BinaryIO) -> int:
    if _is_external(tensor):
        info = _external_info(tensor)
        length = tensor_nbytes(tensor)
        with open(handle.external_path(tensor), "rb") as src:
            offset = int(info.get("offset", 0))
            if _copy_in_kernel(src, offset, data_file, length):
                return length
            src.seek(offset)
            remaining = length
            while remaining:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise ModelLoadError(f"external data of '{tensor.name}' ended early")
                data_file.write(chunk)
                remaining -= len(chunk)
        return length
    if tensor.raw_data:
        data_file.write(tensor.raw_data)
        return len(tensor.raw_data)
    data = numpy_helper.to_array(tensor).tobytes()
    data_file.write(data)
    return len(data)


def _copy_in_kernel(src: BinaryIO, offset: int, data_file: BinaryIO, length: int) -> bool:
    """Copy `length` bytes at `offset` of `src` to the end of `data_file` with
    os.copy_file_range (no trip through Python buffers); False where the
    platform or file system cannot, before anything was written."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None or length == 0:
        return False
    data_file.flush()
    start = data_file.tell()
    done = 0
    try:
        while done < length:
            copied = copy(src.fileno(), data_file.fileno(), length - done, offset + done, start + done)
            if copied == 0:
                raise ModelLoadError("external data ended early")
            done += copied
    except OSError:
        if done:
            raise
        return False
    data_file.seek(start + length)
    return True


def _align(data_file: BinaryIO, alignment: int = 4096) -> int:
    position = data_file.tell()
    padding = (-position) % alignment if position else 0
    if padding:
        data_file.write(b"\0" * padding)
    return position + padding


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TMP_TAG = ".onnx_net2net-"


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the staging folders of runs that were killed (their process is gone)."""
    for entry in folder.glob(f".*{_TMP_TAG}*.tmp"):
        pid = entry.name.rsplit(_TMP_TAG, 1)[1][: -len(".tmp")]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)  # (rmtree never follows links inside)
        else:
            entry.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another save of this process may be writing (save clears its own leftover)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------
# Helpers


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _external_info(tensor: TensorProto) -> dict:
    return {entry.key: entry.value for entry in tensor.external_data}


def _data_files(handle: ModelHandle) -> list[Path]:
    if handle.base_dir is None:
        return []
    return sorted({handle.external_path(t) for t in _all_tensors(handle.proto) if _is_external(t)})


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


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
