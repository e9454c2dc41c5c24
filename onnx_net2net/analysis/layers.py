"""Weighted layers: which nodes are layers, their names and their widths.

A layer is a Conv, ConvTranspose or Gemm with a constant weight, or a MatMul
of a computed tensor by a constant. Its width n is its number of output
units (C_out of a Conv, the columns of a MatMul weight, rows of a transposed
Gemm weight); its name is its node name, else its weight's name.
"""

from __future__ import annotations

from dataclasses import replace

from ..ir import GraphIR, node_attr
from .refusal import Refusal
from .units import Placement


def weighted_layers(ir: GraphIR) -> list[int]:
    """Node indices of Conv, ConvTranspose, Gemm, and MatMul with a constant weight."""
    return [index for index in range(len(ir.nodes)) if is_weighted_layer(ir, index)]


def is_weighted_layer(ir: GraphIR, index: int) -> bool:
    """Whether node `index` is a Conv, ConvTranspose, Gemm or MatMul with a constant weight."""
    node = ir.nodes[index]
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return len(node.input) > 1 and ir.is_const(node.input[1])
    return node.op_type == "MatMul" and ir.is_const(node.input[1]) and not ir.is_const(node.input[0])


def layer_name(ir: GraphIR, index: int) -> str:
    """The name users give a layer: the node name, else its weight's name."""
    node = ir.nodes[index]
    return node.name or node.input[1]


def find_layer(ir: GraphIR, name: str) -> int | None:
    """The weighted layer called `name` (node name or weight initializer name)."""
    layers = weighted_layers(ir)
    for index in layers:
        if ir.nodes[index].name == name:
            return index
    for index in layers:
        if ir.nodes[index].input[1] == name:
            return index
    return None


def layer_width(ir: GraphIR, index: int) -> int:
    """The number of output units of a weighted layer."""
    node = ir.nodes[index]
    weight = ir.shape(node.input[1]) or ir.const_value(node.input[1]).shape
    if node.op_type == "Conv":
        return int(weight[0])
    if node.op_type == "ConvTranspose":
        return int(weight[1]) * int(node_attr(node, "group", 1))
    if node.op_type == "Gemm":
        return int(weight[0] if node_attr(node, "transB", 0) else weight[1])
    return int(weight[-1])


def layer_output_placement(ir: GraphIR, index: int) -> Placement:
    """Where a weighted layer's output units sit: its last axis (Gemm,
    MatMul) or its channel axis (convolutions), one unit per feature."""
    node = ir.nodes[index]
    output = node.output[0]
    rank = ir.rank(output)
    if rank is None:
        raise Refusal.at_layer(ir, index, f"the rank of output '{output}' is unknown")
    axis = rank - 1 if node.op_type in ("MatMul", "Gemm") else 1
    return Placement(axis=axis, rank=rank, length=layer_width(ir, index))


def seed_placement(ir: GraphIR, layer: int, unit_width: int = 1, repeats: int = 1,
                   starts: tuple[int, ...] = ()) -> Placement:
    """The layer's output placement with units of `unit_width` features,
    the whole space repeated `repeats` times along the axis, or once at each
    of `starts` (the rest of the output holding other data)."""
    if len(starts) == 1:
        return replace(layer_output_placement(ir, layer), inner=unit_width, offset=starts[0])
    if starts:
        return replace(layer_output_placement(ir, layer), inner=unit_width, starts=starts)
    return replace(layer_output_placement(ir, layer), inner=unit_width, outer=repeats)
