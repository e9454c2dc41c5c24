"""Shapes that shape inference left unknown, computed from sizes read at run time.

ONNX shape inference (and onnxruntime's symbolic inference, which `GraphIR`
tries next) gives up at a Reshape whose target is computed at run time in a
way it cannot follow, such as PyTorch's legacy export of
`nn.MultiheadAttention` (`Shape(x)[0:Mod(2, 3)]` concatenated with
`[3, E]`): that output, and everything after it, has no shape. The analysis
computes the target itself (`runtime_shapes.reshape_output_shape`, the size
algebra of size_evaluator), then follows the ops after it with ONNX's
inference of one node at a time (`onnx.shape_inference.infer_node_outputs`),
fed the refined shapes of its inputs and the values of its constant inputs.

A refined dim is exactly the dim the model has at run time for every input
(the sizes are followed exactly, and a dim that depends on the input stays
None); dims already known are kept.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from ..ir import GraphIR
from .runtime_shapes import pad_output_shape, reshape_output_shape, slice_output_shape, tile_output_shape

#: Ops followed one node at a time (a shape computed from their inputs' shapes).
FOLLOWED = frozenset("""
    Unsqueeze Squeeze Transpose Gather Identity Cast Add Sub Mul Div Pow Sqrt Erf Tanh Sigmoid Relu Softmax MatMul
    Where Neg Exp Dropout Flatten Concat Split Slice LayerNormalization
    Conv MaxPool AveragePool GlobalAveragePool BatchNormalization Clip LeakyRelu HardSigmoid HardSwish
""".split())
#: Ops whose output shape is computed from sizes read at run time (runtime_shapes).
_COMPUTED = {"Reshape": reshape_output_shape, "Pad": pad_output_shape, "Tile": tile_output_shape}
#: How far back an unknown shape is followed (a bound on the recursion).
MAX_DEPTH = 48


def refined_shape(ir: GraphIR, tensor: str) -> tuple | None:
    """The tensor's shape, with dims shape inference left unknown computed
    where the model determines them (None when even the rank is unknown)."""
    shape, final = _refined(ir, tensor, ir.refined_shapes, {}, 0)
    if final:
        return shape
    # Cut short by MAX_DEPTH (a long chain of unknown shapes: ShuffleNet's
    # stages): refine the tensors before it from the first on, each then
    # reading its inputs' cached shapes, and ask again.
    producer = ir.producer_node(tensor)
    position = {node: k for k, node in enumerate(ir.topological_order())}
    for node in sorted(ir.ancestors(producer), key=position.__getitem__):
        for output in ir.nodes[node].output:
            if output:
                _refined(ir, output, ir.refined_shapes, {}, 0)
    shape, final = _refined(ir, tensor, ir.refined_shapes, {}, 0)
    return shape if final else _merge(shape, ir.shape(tensor))


def _refined(ir: GraphIR, tensor: str, cache: dict, partial: dict, depth: int) -> tuple[tuple | None, bool]:
    """(the refined shape, whether it is final): a shape cut short by
    MAX_DEPTH is not final and is kept for this question only (`partial`),
    not in the index's `cache`, so a later question closer to the unknown
    dims still computes them (the answer does not depend on which tensor was
    asked first)."""
    shape = ir.inferred_shape(tensor)
    if shape is not None and None not in shape:
        return shape, True
    if tensor in cache:
        return cache[tensor], True
    if tensor in partial:
        return partial[tensor], False
    producer = ir.producer_node(tensor)
    if producer is not None and depth >= MAX_DEPTH:
        return shape, False
    cache[tensor] = shape  # guards against cycles in malformed graphs
    computed, final = None, True
    if producer is not None:
        op = ir.nodes[producer].op_type
        reads_final = []

        def shape_of(name: str) -> tuple | None:  # for the size algebra: refined shapes, finality recorded
            refined_input, input_final = _refined(ir, name, cache, partial, depth + 1)
            reads_final.append(input_final)
            return refined_input

        if op in _COMPUTED:
            computed = _COMPUTED[op](ir, producer, shape_of)
            final = all(reads_final)
        elif op == "Slice":
            inferred, final = _infer_node(ir, producer, tensor, cache, partial, depth)
            kept, kept_final = _slice_kept(ir, producer, cache, partial, depth)
            bounded = slice_output_shape(ir, producer, shape_of)
            computed, final = _merge(_merge(inferred, kept), bounded), final and kept_final and all(reads_final)
        elif op in FOLLOWED and ir.nodes[producer].domain in ("", "ai.onnx"):
            computed, final = _infer_node(ir, producer, tensor, cache, partial, depth)
    refined = _merge(shape, computed)
    if final and (refined is None or None in refined[1:]):
        # Left to onnxruntime's symbolic inference (one run per index, costly:
        # asked only where the size algebra above could not finish).
        refined = _merge(refined, ir.shape(tensor))
    if final:
        cache[tensor] = refined
    else:
        del cache[tensor]
        partial[tensor] = refined
    return refined, final


def _slice_kept(ir: GraphIR, index: int, cache: dict, partial: dict, depth: int) -> tuple[tuple | None, bool]:
    """A Slice with constant axes keeps the dims of the axes it does not slice
    (its bounds on the others may be computed at run time: Swin's x[:, :H, :W]);
    with whether that is final (see `_refined`)."""
    node = ir.nodes[index]
    if len(node.input) < 4 or not node.input[3]:
        return None, True
    axes = ir.const_value(node.input[3])
    source, final = _refined(ir, node.input[0], cache, partial, depth + 1)
    if axes is None or source is None:
        return None, final
    sliced = {int(a) % len(source) for a in axes.reshape(-1)}
    return tuple(None if axis in sliced else d for axis, d in enumerate(source)), final


def _merge(known: tuple | None, computed: tuple | None) -> tuple | None:
    """Known dims win; computed ones fill the unknown (ranks must agree)."""
    if computed is None or (known is not None and len(known) != len(computed)):
        return known
    if known is None:
        return computed
    return tuple(k if k is not None else c for k, c in zip(known, computed))


def _infer_node(ir: GraphIR, index: int, tensor: str, cache: dict, partial: dict, depth: int
                ) -> tuple[tuple | None, bool]:
    """ONNX's inference of one node, fed its inputs' refined shapes (and
    whether those were final, see `_refined`)."""
    node = ir.nodes[index]
    types, data = {}, {}
    final = True
    for name in node.input:
        if not name:
            continue
        value = ir.const_value(name)
        if value is not None:
            data[name] = numpy_helper.from_array(value, name)
            shape = value.shape
        else:
            shape, complete = _refined(ir, name, cache, partial, depth + 1)
            final = final and complete
        if shape is None:
            return None, final
        dtype = ir.dtypes.get(name, onnx.TensorProto.FLOAT) if value is None else helper.np_dtype_to_tensor_dtype(
            value.dtype)
        types[name] = helper.make_tensor_type_proto(dtype, list(shape))
    try:
        schema = onnx.defs.get_schema(node.op_type, ir.opset, node.domain)
        outputs = onnx.shape_inference.infer_node_outputs(schema, node, types, data)
    except Exception:  # noqa: BLE001 - best effort: the shape stays unknown
        return None, final
    if tensor not in outputs or not outputs[tensor].tensor_type.HasField("shape"):
        return None, final
    dims = outputs[tensor].tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims), final
