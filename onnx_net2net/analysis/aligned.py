"""Aligned tensors: tensors whose positions on one axis are the same positions.

An op that acts on each position of an axis separately and keeps the axis
maps position i of its input to position i of its output:

* an elementwise op (an activation, a cast), and a broadcasting op (a sum)
  between operands of the same size on the axis;
* on the channel axis: a per-channel normalisation, pooling, a depthwise
  convolution with one filter per channel (GhostNet's cheap operation).

Tensors connected by such ops, in either direction, are *aligned* on the
axis. Whatever unit space one of them carries on that axis, the walk gives
every other one the same placement (its rules for these ops say so), so a
Concat of aligned tensors holds one space several times over: GhostNet's
ghost module concat(x, depthwise(x)), DLA's root concat(relu(f(x) + x), x).
Chunks (Slice or Split outputs) of one tensor that the inputs of a Concat are
aligned with suggest that it holds one space once per chunk (chunked_source).
This is only a guide for the Concat rule: the walk still checks every
tensor it adds, so a wrong answer here costs a refusal, never a wrong model.
"""

from __future__ import annotations

from ..ir import GraphIR, node_attr
from ..ops import ELEMENTWISE_NARY, ELEMENTWISE_UNARY, POOLING
from .refined_shapes import refined_shape

#: Tensors visited at most per question (the answer is then "not aligned").
MAX_VISITS = 512
_PER_CHANNEL = POOLING | {"BatchNormalization", "InstanceNormalization"}


def aligned_inputs(ir: GraphIR, index: int, port: int, axis: int) -> list[int]:
    """The input ports of node `index` aligned on `axis` with its input `port` (`port` included)."""
    node = ir.nodes[index]
    reached = _aligned_component(ir, node.input[port], axis, set(node.input))
    return [other for other, name in enumerate(node.input) if name in reached]


def chunked_source(ir: GraphIR, tensors: list[str], axis: int) -> str | None:
    """The one tensor whose parts on `axis` (Slice or Split outputs) the given
    tensors are all aligned with, if there is one: EdgeNeXt's
    concat(conv(x[:, :c] ...), x[:, c:]) holds chunks of x."""
    sources = set()
    for tensor in tensors:
        parts = [name for name in _aligned_component(ir, tensor, axis, None) if _part_of(ir, name, axis)]
        sources |= {ir.nodes[ir.producer_node(name)].input[0] for name in parts}
        if not parts or len(sources) != 1:
            return None
    return sources.pop() if sources else None


def _part_of(ir: GraphIR, tensor: str, axis: int) -> bool:
    """Whether `tensor` is an output of a Slice or Split cutting `axis`."""
    producer = None if ir.is_const(tensor) else ir.producer_node(tensor)
    if producer is None or ir.nodes[producer].op_type not in ("Slice", "Split"):
        return False
    source, shape = refined_shape(ir, ir.nodes[producer].input[0]), refined_shape(ir, tensor)
    return (source is not None and shape is not None and len(source) == len(shape) > axis
            and source[axis] is not None and shape[axis] is not None and shape[axis] < source[axis])


def _aligned_component(ir: GraphIR, tensor: str, axis: int, wanted: set[str] | None) -> set[str]:
    """The tensors aligned with `tensor` on `axis` (all of them, or as many as
    MAX_VISITS allows: then only `tensor` itself), those in `wanted` only
    when it is given."""
    seen, queue = {tensor}, [tensor]
    while queue:
        current = queue.pop()
        producer = None if ir.is_const(current) else ir.producer_node(current)
        nodes = ([producer] if producer is not None else []) + [use.node for use in ir.uses(current) if use.port >= 0]
        for index in nodes:
            ports = _aligned_ports(ir, index, axis)
            for name in ports if current in ports else ():
                if name not in seen:
                    seen.add(name)
                    queue.append(name)
        if len(seen) > MAX_VISITS:
            return {tensor}
    return seen if wanted is None else seen & (wanted | {tensor})


def _aligned_ports(ir: GraphIR, index: int, axis: int) -> list[str]:
    """The tensors of node `index` whose positions on `axis` are the same
    positions (none when the op moves or mixes them)."""
    node = ir.nodes[index]
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or not node.input or not node.output:
        return []
    out = node.output[0]
    out_shape = refined_shape(ir, out)
    if out_shape is None or not 0 <= axis < len(out_shape) or out_shape[axis] is None:
        return []
    if op in ELEMENTWISE_UNARY:
        return [node.input[0], out]
    if op in _PER_CHANNEL or (op == "Conv" and _one_filter_per_channel(ir, index)):
        return [node.input[0], out] if axis == 1 and len(out_shape) >= 3 else []
    if op in ELEMENTWISE_NARY:
        return [name for name in node.input if name and not ir.is_const(name)
                and _same_on_axis(ir, name, out_shape, axis)] + [out]
    return []


def _same_on_axis(ir: GraphIR, tensor: str, shape: tuple, axis: int) -> bool:
    """Whether `tensor` has `shape`'s rank and size on `axis`."""
    own = refined_shape(ir, tensor)
    return own is not None and len(own) == len(shape) and own[axis] == shape[axis]


def _one_filter_per_channel(ir: GraphIR, index: int) -> bool:
    """A depthwise convolution with multiplier 1: output channel c filters input channel c alone."""
    node = ir.nodes[index]
    groups = int(node_attr(node, "group", 1))
    weight = refined_shape(ir, node.input[1]) if len(node.input) > 1 else None
    source = refined_shape(ir, node.input[0])
    return (groups > 1 and weight is not None and source is not None and len(source) >= 3
            and weight[0] == groups and weight[1] == 1 and source[1] == groups)
