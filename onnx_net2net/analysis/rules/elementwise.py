"""Rules for ops that act on each element, or each channel, separately.

* unary ops (Relu, Cast, Dropout...): y[i] = f(x[i]), so the units sit where
  they sat: every data port shares the placement;
* broadcasting ops (Add, Mul, Where...): operands with the unit axis at full
  width join the space (constants are copied like a producer's bias), size-1
  operands broadcast and stay as they are;
* pooling: pools each channel over its own window, so the units must be on
  the channel axis (blocks of channels are fine);
* Shape / Size read sizes at run time: they follow the new width by
  themselves (runtime_shapes checks what is computed from them).
"""

from __future__ import annotations

from ..units import Placement
from ..walk import Walk


def unary(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """y = f(x) per element: the units stay where they are."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, f"the units reach its parameter input {port}")
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] and walk.ir.uses(node.output[1]):
        walk.same_on_ports(index, placement, outputs=(0, 1))
    else:
        walk.same_on_ports(index, placement)


def pool(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Pooling per channel: the units must be on the channel axis."""
    node = walk.ir.nodes[index]
    walk.require_channel_axis(index, placement, allow_blocks=True)
    if len(node.output) > 1 and node.output[1] and walk.ir.uses(node.output[1]):
        walk.refuse(index, "its indices output depends on the channel count")
    walk.same_on_ports(index, placement)


def elementwise(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Broadcasting ops: operands with the unit axis at full width join the space
    (constants are copied like a producer's bias); size-1 operands broadcast."""
    ir = walk.ir
    node = ir.nodes[index]
    from_end = placement.rank - placement.axis
    out_rank = walk.rank(index, node.output[0])
    for other, name in enumerate(node.input):
        if not name or (side == "in" and other == port):
            continue
        shape = walk.shape(index, name)
        axis = len(shape) - from_end
        # A full-width operand joins the space (checked first: with one unit,
        # a size-1 operand is full width, and both must grow together).
        if axis < 0 or (shape[axis] == 1 and placement.length != 1):
            continue
        if not placement.fits(shape[axis]):
            walk.refuse(index, f"operand '{name}' has {shape[axis]} positions on the unit axis, "
                               f"not {placement.length}")
        if ir.is_const(name):
            walk.weight(index, other, axis, placement, "copy")
        else:
            walk.add(name, placement.on_axis(axis, len(shape)))
    for out in node.output:
        if out:
            walk.add(out, placement.on_axis(out_rank - from_end, out_rank))


def shape_op(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    # The shape is read at run time, so it follows the new width by itself.
    """Shape / Size: read at run time, so they follow the new width by themselves."""
    walk.group.dynamic_shapes = True
