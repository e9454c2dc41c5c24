"""Quantized (QDQ) weights: what they are, and why they are not grown.

A QDQ model stores a layer's weight as integers q with a scale s and a zero
point z, dequantized at run time: W = (q - z) * s (DequantizeLinear), with one
scale for the tensor or one per channel along its `axis`. Growing the layer's
units would copy rows of q with their scales and zero points (exact), but
every layer reading the units must divide its weights by the copy count:
V'[.., j, ..] = V[.., g(j), ..] / c(g(j)). For an integer V that is exact only
when c divides every entry, or when the scale is per channel on the divided
axis (dividing the scale instead); neither holds in general (weights are
quantized per output channel, and the division is along the input axis), so
quantized layers are refused with that reason: grow the float model, then
quantize it again.

Activations quantized and dequantized with one scale (QuantizeLinear ->
DequantizeLinear, per tensor) act on each unit separately: copies of a unit
carry identical values through them (rules/quantized.py).
"""

from __future__ import annotations

import numpy as np

from ..ir import GraphIR, node_attr
from .refusal import Refusal

QUANTIZED_OPS = frozenset(("QuantizeLinear", "DequantizeLinear"))


def dequantized_constant(ir: GraphIR, tensor: str) -> int | None:
    """The DequantizeLinear node computing `tensor` from constants (a quantized weight), else None."""
    index = ir.producer_node(tensor)
    if index is None or ir.is_const(tensor):
        return None
    node = ir.nodes[index]
    if node.op_type != "DequantizeLinear" or not all(ir.is_const(name) for name in node.input if name):
        return None
    return index


def describe(ir: GraphIR, index: int) -> str:
    """A DequantizeLinear of a constant, in words: its integer type and scales."""
    node = ir.nodes[index]
    values = ir.const_value(node.input[0])
    scale = ir.const_value(node.input[1])
    dtype = "integer" if values is None else np.dtype(values.dtype).name
    if scale is None or scale.size <= 1:
        scales = "one scale"
    elif scale.ndim == 1:
        scales = f"per-channel scales on axis {int(node_attr(node, 'axis', 1))}"
    else:
        scales = f"blocked scales on axis {int(node_attr(node, 'axis', 1))}"
    return f"{dtype} '{node.input[0]}' through DequantizeLinear, {scales}"


def quantized_reason(ir: GraphIR, index: int, tensor: str, what: str = "weight") -> str:
    """Why a weight computed by DequantizeLinear node `index` stops the growth."""
    dtype = np.dtype(ir.const_value(ir.nodes[index].input[0]).dtype).name
    return (f"its {what} '{tensor}' is quantized ({describe(ir, index)}): copying units with their scales would be "
            f"exact, but a layer reading copied units must divide its weights by the copy count, which {dtype} "
            "values cannot hold exactly; quantized layers are not grown (grow the float model, then quantize it)")


def quantized_layers(ir: GraphIR) -> list[int]:
    """Conv, ConvTranspose, Gemm and MatMul nodes whose weight is a quantized constant."""
    found = []
    for index, node in enumerate(ir.nodes):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            if dequantized_constant(ir, node.input[1]) is not None and not ir.is_const(node.input[0]):
                found.append(index)
    return found


def quantized_layer_refusal(ir: GraphIR, index: int) -> Refusal:
    """The refusal of quantized layer `index` as a whole."""
    weight = ir.nodes[index].input[1]
    return Refusal.at_layer(ir, index, quantized_reason(ir, dequantized_constant(ir, weight), weight))


def quantized_deepen_reason(ir: GraphIR, index: int) -> str:
    """Why no identity layer is inserted after quantized layer `index`."""
    dequantize = dequantized_constant(ir, ir.nodes[index].input[1])
    return (f"{ir.label(index)}: its weight is quantized ({describe(ir, dequantize)}): an identity layer inserted "
            "after it would run in float inside the quantized graph; deepen the float model, then quantize it")
