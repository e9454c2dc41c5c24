"""Apply `runtime_shapes.SizeEdit`s: entries of a size computed at run time
that must become constants following the growth.

A size input s of node N (a Reshape's shape...) whose entries k must now be
c_k = base_k + per_unit_k * D is replaced, for N only, by

    Where(mask, c, s)      mask[k] = True for the replaced entries

which equals s everywhere else. The Where node is inserted just before N.
When s is a Concat of one-element pieces read only by sinks wanting the same
entries (the usual `Concat(Unsqueeze(Gather(Shape(x), i)), ...)`), the pieces
are replaced by constants instead: no node is added, and ONNX shape inference
still sees the target (the next group's analysis needs it). When other
readers of that Concat want other entries (exporters share one target among
layers), the edited sinks read a copy of the Concat with the pieces replaced.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..editor import GraphEditor
from ..ir import GraphIR


def apply_size_edits(edit: GraphEditor, edits, added: int) -> list[str]:
    """Rewire every edited size input; returns the names of the new sizes."""
    ir = edit.ir
    written, replaced = [], set()
    for change in edits:
        if change.whole:
            written.append(_freeze_input(edit, change))
            continue
        if _replace_concat_pieces(edit, change, edits, added, written, replaced):
            continue
        original = ir.nodes[change.node].input[change.port]
        length = _length(ir, original, change)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ir.dtypes.get(original, onnx.TensorProto.INT64))
        mask, values = np.zeros(length, dtype=bool), np.zeros(length, dtype=dtype)
        for index, base, per_unit in change.entries:
            mask[index], values[index] = True, base + per_unit * added
        prefix = edit.fresh_prefix(f"{original}/grown")
        names = [f"{prefix}_mask", f"{prefix}_values", prefix]
        for name, array in zip(names, (mask, values)):
            edit.add_initializer(array, name)
        edit.insert_before(change.node, [
            helper.make_node("Where", [names[0], names[1], original], [names[2]], name=names[2])])
        edit.set_input(change.node, change.port, names[2])
        written.append(names[2])
    return written


def _freeze_input(edit: GraphEditor, change) -> str:
    """A size used as data becomes a constant holding its old value."""
    ir = edit.ir
    original = ir.nodes[change.node].input[change.port]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(ir.dtypes.get(original, onnx.TensorProto.INT64))
    shape = ir.shape(original) or ()
    value = np.array([base for _, base, _ in change.entries], dtype=dtype).reshape(shape)
    name = edit.add_initializer(value, edit.fresh_name(f"{original}/frozen"))
    edit.set_input(change.node, change.port, name)
    return name


def _copy_for(edit: GraphEditor, producer: int, readers: list, size: str) -> onnx.NodeProto:
    """A copy of the Concat computing `size`, read by `readers` instead."""
    name = edit.fresh_prefix(f"{size}/grown")
    copy = onnx.NodeProto()
    copy.CopyFrom(edit.ir.nodes[producer])
    copy.name, copy.output[0] = name, name
    for node, port in readers:
        edit.set_input(node, port, name)
    edit.insert_before(min(node for node, _ in readers), [copy])
    return copy


def _replace_concat_pieces(edit: GraphEditor, change, edits, added: int, written: list, replaced: set) -> bool:
    """Replace the edited entries' one-element pieces of the Concat that
    computes the size, when every reader of it wants the same entries."""
    ir = edit.ir
    size = ir.nodes[change.node].input[change.port]
    if size in replaced:
        return True  # an earlier sink reading this size wanted the same entries
    readers = {(use.node, use.port) for use in ir.uses(size)}
    wanting = {(e.node, e.port) for e in edits
               if ir.nodes[e.node].input[e.port] == size and e.entries == change.entries}
    producer = ir.producer_node(size)
    if producer is None or ir.nodes[producer].op_type != "Concat":
        return False
    concat = ir.nodes[producer]
    starts, position = [], 0
    for piece in concat.input:
        shape = ir.shape(piece)
        if shape is None or len(shape) != 1 or shape[0] is None:
            return False
        starts.append(position)
        position += int(shape[0])
    pieces = {}
    for index, base, per_unit in change.entries:
        piece = max(p for p, start in enumerate(starts) if start <= index)
        if ir.shape(concat.input[piece]) != (1,) or starts[piece] != index:
            return False
        pieces[piece] = base + per_unit * added
    copy = None
    if not readers <= wanting:
        copy = _copy_for(edit, producer, sorted(wanting), size)
        replaced.add(copy.output[0])  # the edited sinks read the copy now
    dtype = onnx.helper.tensor_dtype_to_np_dtype(ir.dtypes.get(size, onnx.TensorProto.INT64))
    for piece, value in pieces.items():
        name = edit.add_initializer(np.array([value], dtype=dtype), edit.fresh_prefix(f"{size}/grown"))
        if copy is None:
            edit.set_input(producer, piece, name)
        else:
            copy.input[piece] = name  # queued, not in the index
        written.append(name)
    replaced.add(size)
    return True


def _length(ir: GraphIR, name: str, edit) -> int:
    shape = ir.shape(name)
    if shape and len(shape) == 1 and shape[0] is not None:
        return int(shape[0])
    return max(index for index, _, _ in edit.entries) + 1
