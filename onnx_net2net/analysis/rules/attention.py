"""Rules for attention: products of two computed tensors, and softmax.

Q K^T and softmax(..) V contract their last two axes: they are per unit on
their batch axes, such as the head axis once Q, K and V are viewed as
[B, heads, T, head size]. The units (whole heads) pass from every operand to
the output there. A @ B is also per unit on A's rows and on B's columns
(which reach the output's rows and columns), when the other operand does not
carry the units (EfficientViT's v @ attn^T). On the contracted axes the
units are refused; where plain
units fill a contracted axis (a single head: no reshape split the features
into heads), the refusal asks for a walk with the whole axis as one unit. A softmax is
per unit on every axis but the one it normalises.
"""

from __future__ import annotations

from ...ir import node_attr
from ..units import Placement, whole_axis_as_one_unit
from ..walk import Walk


def batched_matmul(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """A product of two computed tensors (attention) is per unit only on its
    batch axes (e.g. the head axis of Q K^T and of softmax(..) V)."""
    node = walk.ir.nodes[index]
    from_end = placement.rank - placement.axis
    if _on_a_free_axis(side, port, from_end) and not placement.batch and _both_matrices(walk, index):
        _free_axis(walk, index, placement, from_end)
        return
    if _on_the_contracted_axis(side, port, from_end) and not placement.batch and _both_matrices(walk, index):
        _contracted_axis(walk, index, port, placement)
        return
    if from_end <= 2:
        walk.refuse(index, "a product of two computed tensors contracts or mixes the unit axis",
                    whole_axis_as_one_unit(placement, walk.group.size))
    for name in list(node.input) + list(node.output):
        shape = walk.shape(index, name)
        axis = len(shape) - from_end
        if axis < 0 or (shape[axis] == 1 and placement.length != 1):
            continue
        if not placement.fits(shape[axis]):
            walk.refuse(index, f"'{name}' has {shape[axis]} positions on the unit axis, not {placement.length}")
        walk.add(name, placement.on_axis(axis, len(shape)))


def _on_a_free_axis(side: str, port: int, from_end: int) -> bool:
    """Whether the units are on A's rows or B's columns of A @ B (or the output's)."""
    if side == "out":
        return from_end in (1, 2)
    return (port, from_end) in ((0, 2), (1, 1))


def _on_the_contracted_axis(side: str, port: int, from_end: int) -> bool:
    """Whether the units are on A's columns or B's rows of A @ B (the axis it sums over)."""
    return side == "in" and (port, from_end) in ((0, 1), (1, 2))


def _contracted_axis(walk: Walk, index: int, port: int, placement: Placement) -> None:
    """(A @ B)[.., i, j] = sum_t A[.., i, t] B[.., t, j] with the units on t
    (q^T k over the key channels): position t of both operands is the same
    unit, so the other operand holds the units the same way on its
    contracted axis, and the product does not hold them. Copies of a unit
    would count its term once per copy: contraction.py divides one side's
    copies by their number once the walk is done."""
    node = walk.ir.nodes[index]
    other = node.input[1 - port]
    shape = walk.shape(index, other)
    axis = len(shape) - (1 if port == 1 else 2)
    if axis < 0 or not placement.fits(shape[axis]):
        walk.refuse(index, f"'{other}' does not hold the units on the axis the product contracts")
    walk.add(other, placement.on_axis(axis, len(shape)))
    walk.group.contractions.append(index)


def _both_matrices(walk: Walk, index: int) -> bool:
    """Whether both operands have rows and columns (a vector operand has only the contracted axis)."""
    return all(walk.rank(index, name) >= 2 for name in walk.ir.nodes[index].input[:2])


def _free_axis(walk: Walk, index: int, placement: Placement, from_end: int) -> None:
    """(A @ B)[.., i, j] = sum_t A[.., i, t] B[.., t, j]: row i of the product
    reads row i of A alone, column j column j of B alone (EfficientViT's
    v @ attn^T with the units on v's rows), so units there pass between that
    operand and the output. The other operand must not carry them: if it did,
    its own visit here would place them on the output again, differently, and
    the walk refuses the second layout."""
    node = walk.ir.nodes[index]
    operand = node.input[0] if from_end == 2 else node.input[1]
    for name in (operand, node.output[0]):
        shape = walk.shape(index, name)
        axis = len(shape) - from_end
        if axis < 0 or not placement.fits(shape[axis]):
            walk.refuse(index, f"'{name}' does not hold the units on the axis {from_end} from its end")
        walk.add(name, placement.on_axis(axis, len(shape)))


def softmax(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Per unit on every axis but the normalised one."""
    node = walk.ir.nodes[index]
    opset = walk.ir.opset
    axis = int(node_attr(node, "axis", -1 if opset >= 13 else 1)) % placement.rank
    if axis == placement.axis or (opset < 13 and placement.axis >= axis):
        walk.refuse(index, "it normalises over the unit axis")
    walk.same_on_ports(index, placement)
