"""Apply `runtime_shapes.SizeEdit`s: entries of a size computed at run time
that must become constants following the growth.

A size input s of node N (a Reshape's shape...) whose entries k must now be
c_k = base_k + per_unit_k * D is replaced, for N only, by

    Where(mask, c, s)      mask[k] = True for the replaced entries

which equals s everywhere else. The Where node is inserted just before N.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir import GraphIR


def apply_size_edits(ir: GraphIR, edits, added: int) -> list[str]:
    """Rewire every edited size input; returns the names of the new sizes.
    Call last in a rewrite: it inserts nodes, so node indices change."""
    inserted: dict[int, list[onnx.NodeProto]] = {}
    written = []
    for edit in edits:
        node = ir.nodes[edit.node]
        original = node.input[edit.port]
        length = _length(ir, original, edit)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ir.dtypes.get(original, onnx.TensorProto.INT64))
        mask, values = np.zeros(length, dtype=bool), np.zeros(length, dtype=dtype)
        for index, base, per_unit in edit.entries:
            mask[index], values[index] = True, base + per_unit * added
        prefix = ir.fresh_prefix(f"{original}/grown")
        names = [f"{prefix}_mask", f"{prefix}_values", prefix]
        for name, array in zip(names, (mask, values)):
            ir.graph.initializer.append(numpy_helper.from_array(array, name))
            ir.initializers[name] = ir.graph.initializer[-1]
        inserted.setdefault(edit.node, []).append(
            helper.make_node("Where", [names[0], names[1], original], [names[2]], name=names[2]))
        node.input[edit.port] = names[2]
        written.append(names[2])
    if inserted:
        nodes = []
        for index, node in enumerate(ir.graph.node):
            nodes += inserted.get(index, []) + [node]
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
        del ir.graph.node[:]
        ir.graph.node.extend(nodes)
    return written


def _length(ir: GraphIR, name: str, edit) -> int:
    shape = ir.shape(name)
    if shape and len(shape) == 1 and shape[0] is not None:
        return int(shape[0])
    return max(index for index, _, _ in edit.entries) + 1
