"""Writing a model atomically: complete or absent, never over its input.

The model is written into a private staging folder beside the output (the
skeleton, then one initializer at a time, so no serialized copy of the whole
model is built), optionally checked by a `before_commit` callback, then renamed
into place. External weights that did not change are copied from the input's
data file to the output's in the kernel (`os.copy_file_range`) where the file
system allows it. Staging folders of killed runs are removed by the next save
into the same folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import onnx
from onnx import TensorProto, numpy_helper

from .errors import ModelLoadError, UserError
from .storage import all_tensors, copy_metadata, external_info, is_external, tensor_nbytes

if TYPE_CHECKING:
    from .io import ModelHandle


#: Above this many bytes of weights an output is written with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors smaller than this stay inline even in an external-data output.
INLINE_TENSOR_BYTES = 1024
_COPY_CHUNK = 64 << 20


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
    sources = list(protected) + ([handle.path] if handle.path else []) + data_files(handle)
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
                    write_model(handle, model_file, data_file, data_name, progress)
                    _sync(data_file)
            else:
                write_model(handle, model_file, None, None, progress)
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


def write_model(handle: ModelHandle, model_file: BinaryIO, data_file: BinaryIO | None,
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
            copy_metadata(tensor, out_tensor)
            offset = _align(data_file)
            length = _write_tensor_bytes(handle, tensor, data_file)
            out_tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = out_tensor.external_data.add()
                entry.key, entry.value = key, value
        elif is_external(tensor):
            _write_inline_from_file(handle, tensor, model_file)
            if progress is not None:
                progress(tensor_nbytes(tensor))
            continue
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


_MODEL_GRAPH_TAG = bytes([7 << 3 | 2])        # ModelProto.graph
_GRAPH_INITIALIZER_TAG = bytes([5 << 3 | 2])  # GraphProto.initializer
_TENSOR_RAW_DATA_TAG = bytes([9 << 3 | 2])    # TensorProto.raw_data
_RAW_DATA_FIELD = 9


def _write_inline_from_file(handle: ModelHandle, tensor: TensorProto, model_file: BinaryIO) -> None:
    """Write an initializer whose bytes are in a file as an inline tensor,
    copying the bytes from file to file.

    The piece is what `SerializeToString` gives for a ModelProto holding only
    this initializer, with raw_data set: protobuf writes known fields in field
    number order (unknown ones last), so the fields before raw_data, raw_data
    itself, and the fields after it can be written one after the other, and
    only the raw_data bytes are never in memory. The tensor is written as it
    was stored when `load(lazy=True)` deferred it, else with the fields an
    inlined external tensor keeps (`copy_metadata`).
    """
    stored = handle.deferred_metadata(tensor)
    metadata = TensorProto()
    if stored is not None:
        metadata.CopyFrom(stored)
        metadata.name = tensor.name
    else:
        copy_metadata(tensor, metadata)
    before, after = _fields_around_raw_data(metadata)
    length = tensor_nbytes(tensor)
    raw_header = _TENSOR_RAW_DATA_TAG + _varint(length)
    tensor_length = len(before) + len(raw_header) + length + len(after)
    initializer = _GRAPH_INITIALIZER_TAG + _varint(tensor_length)
    model_file.write(_MODEL_GRAPH_TAG + _varint(len(initializer) + tensor_length) + initializer + before + raw_header)
    _copy_external(handle, tensor, model_file)
    model_file.write(after)


def _fields_around_raw_data(metadata: TensorProto) -> tuple[bytes, bytes]:
    """The serialized fields numbered below raw_data's, and those above it (unknown fields last)."""
    before, after = TensorProto(), TensorProto()
    before.CopyFrom(metadata)
    after.CopyFrom(metadata)
    for descriptor, _ in metadata.ListFields():
        (after if descriptor.number < _RAW_DATA_FIELD else before).ClearField(descriptor.name)
    before.DiscardUnknownFields()
    return before.SerializeToString(), after.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _copy_external(handle: ModelHandle, tensor: TensorProto, out: BinaryIO) -> int:
    """Append an external tensor's stored bytes to `out`, in the kernel where possible."""
    length = tensor_nbytes(tensor)
    offset = int(external_info(tensor).get("offset", 0))
    with open(handle.external_path(tensor), "rb") as src:
        if _copy_in_kernel(src, offset, out, length):
            return length
        src.seek(offset)
        remaining = length
        while remaining:
            chunk = src.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                raise ModelLoadError(f"external data of '{tensor.name}' ended early")
            out.write(chunk)
            remaining -= len(chunk)
    return length


def _write_tensor_bytes(handle: ModelHandle, tensor: TensorProto, data_file: BinaryIO) -> int:
    if is_external(tensor):
        return _copy_external(handle, tensor, data_file)
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


def data_files(handle: ModelHandle) -> list[Path]:
    if handle.base_dir is None:
        return []
    return sorted({handle.external_path(t) for t in all_tensors(handle.proto) if is_external(t)})
