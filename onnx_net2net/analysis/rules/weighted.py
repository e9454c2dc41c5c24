"""Rules for the weighted layers: where units are produced and consumed.

A layer whose output carries the units is a producer: its weight rows (the
output-channel axis of a Conv weight, the columns of a MatMul weight) and
its bias are copied, W'[.., j, ..] = W[.., g(j), ..]. A layer reading them is
a consumer: the contracted axis of its weight is split, V'[.., j, ..] =
V[.., g(j), ..] * a_j, with the a_j of the copies of a unit summing to one.

* grouped convolutions split the channels into `group` blocks: the space
  must fill the axis and grow in whole blocks (the step becomes a multiple);
* a depthwise convolution (group = channels) acts per channel: it is no
  producer, its filters are copied with its input (`passthrough`), its
  `group` attribute grows with them; with M filters per channel a unit of
  its input is a block of M output channels, so the output space grows in
  whole blocks (a walk reaching it from the output side retries with units
  of M channels), and producers of that space copy blocks of M rows;
* a MatMul of two computed tensors is attention (rules/attention.py);
* rows pass through a product with a constant unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from ...ir import node_attr
from ..quantized import dequantized_constant
from ..units import AttributeEdit, Placement, axis_only
from ..walk import Walk
from .attention import batched_matmul


def conv(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """A producer on its output channels, a consumer on its input channels."""
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weights or bias")
    walk.require_channel_axis(index, placement, allow_blocks=True)
    weight = walk.const(index, node.input[1], "weight")
    groups = int(node_attr(node, "group", 1))
    channels_in = weight.shape[1] * groups
    if placement.starts and groups != 1:
        walk.refuse(index, "grouped convolution over units repeated at uneven offsets of a concatenation")
    if groups == 1:
        _split_or_copy(walk, index, side, placement, input_axis=1, output_axis=0)
        return
    if groups == channels_in and groups == walk.dim(index, node.input[0], 1):
        _depthwise(walk, index, side, placement, weight.shape[0] // groups)
        return
    block_in, block_out = channels_in // groups, weight.shape[0] // groups
    if _units_are_whole_groups(placement, block_in if side == "in" else block_out):
        _groupwise(walk, index, side, placement, block_in, block_out)
        return
    walk.require_blocks(index, placement, groups)
    _split_or_copy(walk, index, side, placement, input_axis=1, output_axis=0, groups=groups)


def _split_or_copy(walk: Walk, index: int, side: str, placement: Placement, *, input_axis: int, output_axis: int,
                   groups: int = 1) -> None:
    """A consumer splits its weight along its input axis; a producer copies
    its weight along its output axis and its bias."""
    if side == "in":
        walk.weight(index, 1, input_axis, axis_only(placement), "split", groups)
    else:
        walk.weight(index, 1, output_axis, axis_only(placement), "copy")
        walk.weight(index, 2, 0, axis_only(placement), "copy")
        walk.group.producers.append(index)


def _depthwise(walk: Walk, index: int, side: str, placement: Placement, multiplier: int) -> None:
    """A depthwise conv acts per channel: its filters grow with its input."""
    node = walk.ir.nodes[index]
    if side == "in":
        inp = placement
        out = replace(placement, offset=placement.offset * multiplier, inner=placement.inner * multiplier,
                      length=placement.length * multiplier)
    else:
        if placement.inner % multiplier or placement.offset % multiplier:
            whole = ((multiplier // placement.inner, 1),) if multiplier % placement.inner == 0 else ()
            walk.refuse(index, "the units split a depthwise filter group", whole)
        out = placement
        inp = replace(placement, offset=placement.offset // multiplier, inner=placement.inner // multiplier,
                      length=placement.length // multiplier)
    walk.weight(index, 1, 0, axis_only(out), "copy")
    walk.weight(index, 2, 0, axis_only(out), "copy")
    walk.group.attribute_edits.append(AttributeEdit(index, "group", inp.growth()))
    walk.group.passthrough.append(index)
    walk.add(node.input[0], inp)
    walk.add(node.output[0], out)


def _units_are_whole_groups(placement: Placement, block: int) -> bool:
    """Whether every unit is whole groups of `block` channels of a grouped
    convolution (EfficientViT's multi-scale attention: heads of q | k | v
    through a grouped 1x1 conv of one group per q, k or v)."""
    return (block > 1 and placement.outer == 1 and not placement.starts and placement.inner % block == 0
            and placement.offset % block == 0)


def _groupwise(walk: Walk, index: int, side: str, placement: Placement, block_in: int, block_out: int) -> None:
    """A grouped conv whose units are whole groups acts per unit (a depthwise
    conv with groups of `block_in` channels): a copied unit copies its groups'
    filters and the group count grows by the unit's groups."""
    node = walk.ir.nodes[index]

    def scaled(known: Placement, by_from: int, by_to: int) -> Placement:
        return replace(known, offset=known.offset // by_from * by_to, inner=known.inner // by_from * by_to,
                       length=known.length // by_from * by_to)

    inp = placement if side == "in" else scaled(placement, block_out, block_in)
    out = scaled(placement, block_in, block_out) if side == "in" else placement
    walk.weight(index, 1, 0, axis_only(out), "copy")
    walk.weight(index, 2, 0, axis_only(out), "copy")
    walk.group.attribute_edits.append(AttributeEdit(index, "group", inp.growth() // block_in))
    walk.group.passthrough.append(index)
    walk.add(node.input[0], inp)
    walk.add(node.output[0], out)


def conv_transpose(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """A producer on its output channels (weight axis 1), a consumer on its input channels."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weights or bias")
    walk.require_channel_axis(index, placement)
    walk.const(index, node.input[1], "weight")
    if int(node_attr(node, "group", 1)) != 1:
        walk.refuse(index, "grouped transposed convolution is not supported yet")
    if node_attr(node, "output_shape") is not None:
        walk.refuse(index, "explicit output_shape attribute")
    _split_or_copy(walk, index, side, placement, input_axis=0, output_axis=1)


def gemm(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """A producer on its output columns, a consumer on its contracted axis."""
    node = walk.ir.nodes[index]
    trans_a, trans_b = int(node_attr(node, "transA", 0)), int(node_attr(node, "transB", 0))
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weight or bias")
    walk.const(index, node.input[1], "weight")
    if side == "in":
        if placement.axis != (0 if trans_a else 1):
            walk.refuse(index, "the units are on its row (batch) axis")
        walk.weight(index, 1, 1 if trans_b else 0, axis_only(placement), "split")
        return
    if placement.axis != 1:
        walk.refuse(index, "the units are on its row (batch) axis")
    walk.weight(index, 1, 0 if trans_b else 1, axis_only(placement), "copy")
    if len(node.input) > 2 and node.input[2]:
        bias_shape = walk.shape(index, node.input[2])
        if bias_shape and bias_shape[-1] != 1:
            walk.weight(index, 2, len(bias_shape) - 1, axis_only(placement), "copy")
    walk.group.producers.append(index)


def matmul(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """x @ W: a producer on W's last axis, a consumer on its contracted axis; rows pass through."""
    ir = walk.ir
    node = ir.nodes[index]
    if not ir.is_const(node.input[1]) and not ir.is_const(node.input[0]):
        if dequantized_constant(ir, node.input[1]) is not None:
            walk.const(index, node.input[1], "weight")  # refuses, naming the quantization
        batched_matmul(walk, index, side, port, placement)
        return
    if not ir.is_const(node.input[1]) or ir.is_const(node.input[0]):
        walk.refuse(index, "a product of two computed tensors mixes units (attention-style MatMul)")
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weight")
    weight_rank = walk.rank(index, node.input[1])
    last = placement.rank - 1
    if weight_rank > 2 and placement.axis < placement.rank - 2:
        walk.refuse(index, "the units are on a batch axis of a batched weight")
    if side == "in" and placement.axis == last:
        walk.weight(index, 1, weight_rank - 2, axis_only(placement), "split")
    elif side == "out" and placement.axis == last:
        walk.weight(index, 1, weight_rank - 1, axis_only(placement), "copy")
        walk.group.producers.append(index)
    else:
        # Rows pass through a matrix product unchanged.
        out_rank = walk.rank(index, node.output[0])
        in_rank = walk.rank(index, node.input[0])
        if side == "in":
            walk.add(node.output[0], placement.on_axis(placement.axis + out_rank - in_rank, out_rank))
        else:
            walk.add(node.input[0], placement.on_axis(placement.axis - out_rank + in_rank, in_rank))
