"""The checks a model passes before it is trusted, and before any weight is read.

* The input file exists, is a readable regular file, and is not text.
* Every text field is valid UTF-8; the IR version, opsets and outputs are usable.
* Every tensor has a known type, non-negative dims and data matching its shape.
* Every external-data location is relative, resolves (links followed, as the
  kernel does) to a regular file inside the model's folder, and its offset and
  length lie within that file. Readers open the resolved path, never the raw
  location.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from .errors import ModelLoadError, UnsafePathError, first_line
from .storage import KNOWN_TYPES, all_tensors, element_bits, element_count, external_info, is_external


def check_input_file(path: Path) -> None:
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


def sniff_text(path: Path) -> str | None:
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


def check_text(proto: onnx.ModelProto, where) -> None:
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


def check_model_header(proto: onnx.ModelProto, where) -> None:
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


def check_tensors(proto: onnx.ModelProto, base_dir: Path | None, data_sizes: dict) -> None:
    """Every tensor of the model: a known type, sane dims, data that matches
    them; external references are checked before any byte of them is read."""
    base = base_dir.resolve() if base_dir is not None else None
    for tensor in all_tensors(proto):
        check_tensor_header(tensor)
        if is_external(tensor):
            _check_external_tensor(tensor, base, data_sizes)
        else:
            _check_inline_tensor(tensor)


def tensor_label(tensor: TensorProto) -> str:
    return f"tensor '{printable(tensor.name) or '<unnamed>'}'"


def check_tensor_header(tensor: TensorProto) -> None:
    if tensor.data_type not in KNOWN_TYPES:
        raise ModelLoadError(f"{tensor_label(tensor)} has unknown data type {tensor.data_type}")
    if any(dim < 0 for dim in tensor.dims):
        raise ModelLoadError(f"{tensor_label(tensor)} has a negative dimension {list(tensor.dims)}")


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


def check_raw_length(tensor: TensorProto, got: int) -> None:
    """`got` bytes of raw data are what the tensor's type and shape need."""
    bits = element_bits(tensor.data_type)
    if bits is None:
        return
    expected = (element_count(tensor) * bits + 7) // 8
    if got != expected:
        raise ModelLoadError(f"{tensor_label(tensor)}: shape {list(tensor.dims)} needs {expected} bytes of "
                             f"data, the model holds {got}")


def _check_inline_tensor(tensor: TensorProto) -> None:
    """The data held in the model matches the tensor's shape (numpy would fail later otherwise)."""
    count = element_count(tensor)
    bits = element_bits(tensor.data_type)
    if _has_raw(tensor):
        if bits is None:
            return
        check_raw_length(tensor, len(tensor.raw_data))
        return
    field_name, per_element = _TYPED_FIELDS.get(tensor.data_type, (None, 1))
    if field_name is None:
        # Packed and exotic types: decode small ones once, to fail here rather than later.
        if count <= 1 << 16:
            try:
                numpy_helper.to_array(tensor)
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(f"{tensor_label(tensor)}: its data does not match its type and shape "
                                     f"({first_line(exc, 200)})") from None
        return
    got = len(getattr(tensor, field_name))
    expected = count * per_element
    if got != expected and not (got == 0 and count == 0):
        raise ModelLoadError(f"{tensor_label(tensor)}: shape {list(tensor.dims)} has {count} element(s), "
                             f"the model holds {got // per_element if got >= expected else got} value(s)")


def _has_raw(tensor: TensorProto) -> bool:
    try:
        return tensor.HasField("raw_data")
    except ValueError:  # proto3-style field without presence
        return bool(tensor.raw_data)


def _check_external_tensor(tensor: TensorProto, base: Path | None, sizes: dict) -> None:
    info = external_info(tensor)
    name = tensor_label(tensor)
    location = info.get("location", "")
    shown = printable(location)
    if base is None:
        raise ModelLoadError(f"{name} has external data but the model has no folder")
    if tensor.data_type == TensorProto.STRING:
        raise ModelLoadError(f"{name}: string tensors cannot be stored as external data")
    real = resolve_external(base, location, name)
    size = sizes.get(real)
    if size is None:
        size = sizes[real] = real.stat().st_size
    offset = _external_int(info, "offset", 0, name)
    bits = element_bits(tensor.data_type)
    expected = None if bits is None else (element_count(tensor) * bits + 7) // 8
    length = _external_int(info, "length", expected, name)
    if length is None:
        raise ModelLoadError(f"{name}: external data has no length and its type has no fixed size")
    if offset + length > size:
        raise ModelLoadError(
            f"{name}: external data [{offset}, {offset + length}) runs past the end of '{shown}' ({size} bytes)")
    if expected is not None and length != expected:
        raise ModelLoadError(f"{name}: external data holds {length} bytes but its shape needs {expected}")


def resolve_external(base: Path, location: str, name: str) -> Path:
    """The real path of an external data file, checked to be a regular file
    inside `base`; raises otherwise. Readers open this path, never the raw
    location: the kernel resolves `d/../x` through a symlinked `d`, which a
    purely lexical check would miss."""
    shown = printable(location)
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
        raise ModelLoadError(f"{name}: external data {key} '{printable(text)}' is not an integer") from None
    if value < 0:
        raise ModelLoadError(f"{name}: external data {key} {value} is negative")
    return value


def printable(text: str, limit: int = 120) -> str:
    """Text safe for a one-line message (control characters escaped, length capped)."""
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text[:limit])
    return shown + ("..." if len(text) > limit else "")
