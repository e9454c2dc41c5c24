"""Rule for activations quantized and dequantized (a QDQ model's activations).

QuantizeLinear and DequantizeLinear with one scale and zero point act on each
element separately, y[i] = f(x[i]) with the same f everywhere, so copies of a
unit carry identical values through them: the units sit where they sat. With
scales per channel along the unit axis each unit has its own f: refused (the
scales would have to be copied with the units, which is not done). A
quantized *weight* (DequantizeLinear of a constant) is refused where a layer
reads it (analysis/quantized.py says why).
"""

from __future__ import annotations

from ...ir import node_attr
from ..quantized import quantized_reason
from ..units import Placement
from ..walk import Walk


def quantize_linear(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Per element with one scale: the units stay where they are."""
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, f"the units reach its scale or zero point (input {port})")
    if ir.is_const(node.input[0]):
        walk.refuse(index, quantized_reason(ir, index, node.output[0], "value"))
    shape = ir.shape(node.input[1]) if len(node.input) > 1 else ()
    if shape is None:
        walk.refuse(index, "the shape of its scale is unknown")
    if any(d != 1 for d in shape):
        axis = int(node_attr(node, "axis", 1)) % placement.rank
        if axis == placement.axis or len(shape) > 1:
            walk.refuse(index, f"it quantizes with scales per channel on the unit axis (axis {axis}): each unit has "
                               "its own scale, which the rewrite does not copy")
    walk.same_on_ports(index, placement)
