"""Rules for ops that move positions: Transpose, Reshape and its kin, Gather,
Expand, Resize, Tile, Pad.

* Transpose moves the unit axis by its permutation;
* Reshape / Flatten / Squeeze / Unsqueeze map the placement through the
  reshape (shape_algebra.map_through_reshape); a literal target dim on the
  unit axis grows by the placement's growth per unit;
* Gather along another axis moves the unit axis by the index rank; a Gather
  of a constant table along another axis is an embedding (a producer); a
  Gather of every position in order only moves the axis;
* GatherND (batch_dims 0) with indices [..., k] picks positions on the first
  k axes of its data and keeps the axes after them whole, in order, behind
  the indices' leading axes: the unit axis moves there when it is not among
  the k gathered ones (the dynamo export of a relative position bias table
  [positions, heads] read at [window^2, 1] indices);
* Expand, Resize, Tile and Pad must leave the unit axis alone (a literal
  Expand target or Resize size on it grows with the units).

Positions are not units: a reshape that flattens the spatial axes of a
convolution's output [N, C, H, W] into tokens [N, C, H*W] (a patch stem, as
MLP-Mixer's token mixing reads them) gives H*W positions whose number is
fixed by the input's size; a group reaching them is refused as such.

Sizes read at run time (Shape -> ... -> Reshape) are checked by
runtime_shapes, called by the search once the walk is done.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...ir import GraphIR, node_attr
from ..refined_shapes import refined_shape
from ..refusal import RefusalKind
from ..size_evaluator import SizeEvaluator
from ..shape_algebra import format_shape, map_through_reshape, merges_only_if_batch_first, unit_layout_hints
from ..units import Placement, ValueEdit, axis_only
from ..walk import Walk


def transpose(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """The unit axis moves by the permutation."""
    node = walk.ir.nodes[index]
    perm = node_attr(node, "perm") or list(reversed(range(placement.rank)))
    if side == "in":
        walk.add(node.output[0], placement.on_axis(list(perm).index(placement.axis), placement.rank))
    else:
        walk.add(node.input[0], placement.on_axis(int(perm[placement.axis]), placement.rank))


def reshape(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Reshape and its kin: the placement mapped through the reshape; a literal target dim grows."""
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its shape input")
    src_name, dst_name = (node.input[0], node.output[0]) if side == "in" else (node.output[0], node.input[0])
    src, dst = walk.shape(index, src_name), walk.shape(index, dst_name)  # refined where inference gave up
    src = _with_unit_axis(src, placement)
    dst = _with_unit_axis(dst, walk.group.placements.get(dst_name))
    moved_dim = _unknown_dim_moved(ir, index)
    if moved_dim is not None:
        walk.refuse(index, f"its target puts its input's dim {moved_dim[0]} (of unknown size) at axis {moved_dim[1]} "
                           "with another stride: a reshape moves no data between axes, so its unknown dims cannot "
                           "be matched")
    moved, refusal = map_through_reshape(placement, src, dst)
    if moved is None:
        if side == "out":
            _refuse_spatial_positions(walk, index, placement, src, dst_name)
        reason, kind = refusal.reason, refusal.kind
        if _channel_shuffle(ir, index if side == "in" else None) and placement.length != walk.group.size:
            reason = ("a channel shuffle (Reshape -> Transpose -> Reshape) interleaves these units with other "
                      "channels (the other concatenated branch)")
            kind = RefusalKind.CHANNEL_SHUFFLE
        walk.refuse(index, reason, refusal.retry or unit_layout_hints(placement, src, dst), kind)
    if placement.starts and replace(moved, axis=placement.axis, rank=placement.rank) != placement:
        walk.refuse(index, f"reshape {format_shape(src)} -> {format_shape(dst)} regroups an axis holding the units "
                           "at uneven offsets")
    if node.op_type in ("Squeeze", "Unsqueeze") and replace(moved, axis=0, rank=0) != replace(placement, axis=0,
                                                                                              rank=0):
        # Only a Reshape's target can grow an axis: these insert or remove axes of 1, nothing else.
        walk.refuse(index, f"{node.op_type} {format_shape(src)} -> {format_shape(dst)} would have to grow the axis "
                           "of 1 it inserts or removes (it holds the units)")
    if (moved.batch and not placement.batch and merges_only_if_batch_first(placement, src, dst)
            and walk.group.placements.get(dst_name) != moved):
        walk.refuse(index, f"reshape {format_shape(src)} -> {format_shape(dst)} would merge the units with a batch "
                           "of unknown size only if its first axis is that batch times the axis before")
    walk.add(dst_name, moved)
    if node.op_type == "Reshape":
        out_placement = moved if side == "in" else placement
        _update_shape_input(walk, index, out_placement)


def _unknown_dim_moved(ir: GraphIR, index: int) -> tuple[int, int] | None:
    """(k, j) when Reshape `index`'s target entry j is its input's own dim k
    of unknown size read at run time, at another stride: the positions after
    axis k of the input (prod src[k+1:]) differ from those after axis j of
    the output, or are unknown ([x.shape[2], -1, x.shape[0]] moves no data
    between axes; reshape_segments would pair the unknown dims by position).
    [B*H, T, d] from [B, H, T, d] keeps T's stride (d)."""
    node = ir.nodes[index]
    if node.op_type != "Reshape" or len(node.input) < 2:
        return None
    known = ir.inferred_shape(node.input[0])  # ONNX's inference: cheap, and exact where it knows a dim
    if known is not None and None not in known:
        return None  # no dim of unknown size to move (and no target to evaluate on every visit)
    target = SizeEvaluator(ir, {}).port_entries(index, 1)
    src, dst = refined_shape(ir, node.input[0]), refined_shape(ir, node.output[0])
    for j, entry in enumerate(target or ()):
        if entry.base is not None or entry.dim_of is None or entry.dim_of[0] != node.input[0]:
            continue
        k = entry.dim_of[1]
        if k == j:
            continue
        after = [src[k + 1:] if src else (None,), dst[j + 1:] if dst and len(dst) == len(target) else (None,)]
        if any(None in dims for dims in after) or int(np.prod(after[0])) != int(np.prod(after[1])):
            return k, j
    return None


def _refuse_spatial_positions(walk: Walk, index: int, placement: Placement, flat: tuple, input_name: str) -> None:
    """Refuse when the units on a reshape's output (`flat`) are the positions
    flattened from the spatial axes (2 and on) of a convolution's output, its
    input `input_name` (the tokens of a patch stem): their number is fixed by
    the input's size."""
    ir = walk.ir
    producer = ir.producer_node(input_name)
    spatial = refined_shape(ir, input_name)
    if producer is None or ir.nodes[producer].op_type not in ("Conv", "ConvTranspose") or spatial is None:
        return
    axis = placement.axis
    merged = tuple(spatial[axis:axis + len(spatial) - len(flat) + 1])
    if (len(flat) >= len(spatial) or axis < 2 or None in merged or int(np.prod(merged)) != flat[axis]
            or tuple(spatial[:axis]) != tuple(flat[:axis])):
        return
    walk.refuse(index, f"the units are the {flat[axis]} positions (tokens) flattened from the spatial axes "
                       f"{list(merged)} of {ir.nodes[producer].op_type} {ir.label(producer)}: their number is fixed "
                       "by the input's size")


def _with_unit_axis(shape: tuple, placement: Placement | None) -> tuple:
    """The shape with the length of its unit axis filled in where inference
    left it unknown: the walk holds it (`Walk.add` checks every placement
    against the inferred shape), as when Swin's rolled windows lose every dim.
    Not for units merged with a batch of unknown size: that axis is B * length."""
    if placement is None or placement.batch or len(shape) != placement.rank or shape[placement.axis] is not None:
        return shape
    return shape[:placement.axis] + (placement.length,) + shape[placement.axis + 1:]


def _channel_shuffle(ir: GraphIR, index: int | None) -> bool:
    """Reshape [.., C, ..] -> [.., g, C/g, ..], then a Transpose swapping those two axes."""
    if index is None or ir.nodes[index].op_type != "Reshape":
        return False
    src, dst = ir.rank(ir.nodes[index].input[0]), ir.rank(ir.nodes[index].output[0])
    uses = ir.uses(ir.nodes[index].output[0])
    if src is None or dst is None or dst != src + 1 or len(uses) != 1:
        return False
    transpose = ir.nodes[uses[0].node]
    perm = node_attr(transpose, "perm")
    if transpose.op_type != "Transpose" or perm is None:
        return False
    swapped = [axis for axis, source in enumerate(perm) if axis != source]
    return len(swapped) == 2 and swapped[1] == swapped[0] + 1


def _update_shape_input(walk: Walk, index: int, out_placement: Placement) -> None:
    """Record the edit of the literal dim of a Reshape's target shape."""
    ir = walk.ir
    node = ir.nodes[index]
    shape_name = node.input[1]
    axis = out_placement.axis
    value = ir.const_value(shape_name)
    if value is not None:
        if int(value[axis]) > 0:
            walk.group.value_edits.append(ValueEdit(index, 1, axis, out_placement.growth()))
        elif int(value[axis]) == 0:
            walk.refuse(index, "its target shape copies the unit axis from the input (0) across a move")
        return
    # A target computed at run time: runtime_shapes checks (and edits) its entries.
    walk.group.dynamic_shapes = True


def pad(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Padding must leave the unit axis alone."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its pads")
    pads = node_attr(node, "pads")
    if pads is None and not walk.ir.is_const(node.input[1]):
        walk.same_on_ports(index, placement)  # pads read at run time: runtime_shapes checks the unit axis's
        return
    if pads is None:
        pads = walk.const(index, node.input[1], "pads").tolist()
    rank = placement.rank
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % rank for a in walk.const(index, node.input[3], "axes")]
    count = len(axes)
    if placement.axis in axes:
        k = axes.index(placement.axis)
        if pads[k] != 0 or pads[k + count] != 0:
            walk.refuse(index, "it pads the unit axis")
    walk.same_on_ports(index, placement)


def gather(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Along another axis the unit axis moves; a constant table gathered is an embedding (a producer)."""
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units are used as indices")
    in_rank = walk.rank(index, node.input[0])
    axis = int(node_attr(node, "axis", 0)) % in_rank
    index_rank = walk.rank(index, node.input[1])
    if side == "in" and placement.axis == axis or side == "out" and axis <= placement.axis < axis + index_rank:
        _gather_as_reshape(walk, index, side, placement, axis, in_rank, index_rank)
        return
    if side == "in":
        moved = placement.axis if placement.axis < axis else placement.axis - 1 + index_rank
        walk.add(node.output[0], placement.on_axis(moved, in_rank - 1 + index_rank))
    else:
        moved = placement.axis if placement.axis < axis else placement.axis + 1 - index_rank
        if ir.is_const(node.input[0]):
            # An embedding table: its columns are the units (a producer).
            walk.weight(index, 0, moved, axis_only(placement), "copy")
            walk.group.producers.append(index)
        else:
            walk.add(node.input[0], placement.on_axis(moved, in_rank))


def gather_nd(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """The data axes after the k gathered ones follow the indices' leading axes."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units are used as indices")
    if int(node_attr(node, "batch_dims", 0)):
        walk.refuse(index, "it gathers with batch dimensions")
    in_rank = len(walk.shape(index, node.input[0]))
    index_shape = walk.shape(index, node.input[1])
    depth, lead = index_shape[-1], len(index_shape) - 1
    if depth is None:
        walk.refuse(index, "the depth of its indices is unknown")
    out_rank = lead + in_rank - depth
    if side == "in" and placement.axis < depth or side == "out" and placement.axis < lead:
        walk.refuse(index, "it gathers along the unit axis")
    if side == "in":
        walk.add(node.output[0], placement.on_axis(placement.axis - depth + lead, out_rank))
    else:
        walk.add(node.input[0], placement.on_axis(placement.axis - lead + depth, in_rank))


def _gather_as_reshape(walk: Walk, index: int, side: str, placement: Placement, axis: int, in_rank: int,
                       index_rank: int) -> None:
    """A Gather of every position in order (indices arange(L) in a shape with
    one non-1 axis, as exporters write `as_strided`) only moves the axis: the
    units move with it, wherever they sit on it, and the indices become every
    position of the grown axis (role "positions")."""
    node = walk.ir.nodes[index]
    indices = walk.ir.const_value(node.input[1])
    length = placement.length
    if (indices is None or indices.size != length or not np.array_equal(indices.reshape(-1), np.arange(length))
            or sum(d != 1 for d in indices.shape) != 1):
        walk.refuse(index, "it gathers along the unit axis")
    k = next(i for i, d in enumerate(indices.shape) if d != 1)
    walk.weight(index, 1, k, replace(placement, axis=k, rank=index_rank), "positions")
    walk.add(node.input[0], placement.on_axis(axis, in_rank))
    walk.add(node.output[0], placement.on_axis(axis + k, in_rank - 1 + index_rank))


def expand(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Broadcasting must leave the unit axis alone; a literal target dim on it grows."""
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its shape input")
    from_end = placement.rank - placement.axis
    in_shape = walk.shape(index, node.input[0])
    out_shape = walk.shape(index, node.output[0])
    in_axis = len(in_shape) - from_end
    if in_axis < 0 or in_shape[in_axis] != placement.length and side == "out":
        walk.refuse(index, "it broadcasts along the unit axis")
    walk.add(node.input[0], placement.on_axis(in_axis, len(in_shape)))
    walk.add(node.output[0], placement.on_axis(len(out_shape) - from_end, len(out_shape)))
    target = ir.const_value(node.input[1])
    if target is None:
        walk.group.dynamic_shapes = True
        return
    position = len(target) - from_end
    if position >= 0 and int(target[position]) > 1:
        walk.group.value_edits.append(ValueEdit(index, 1, position, placement.growth()))


def resize(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Resizing must leave the unit axis alone; a literal size on it grows."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its scales or sizes")
    scales = walk.ir.const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = walk.ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and scales.size:
        if scales.size <= placement.axis or scales[placement.axis] != 1:
            walk.refuse(index, "it resizes the unit axis")
    elif sizes is not None and sizes.size:
        if sizes.size <= placement.axis or int(sizes[placement.axis]) != placement.length:
            walk.refuse(index, "it resizes the unit axis")
        walk.group.value_edits.append(ValueEdit(index, 3, placement.axis, placement.growth()))
    elif len(node.input) > 3 and node.input[3] and (len(node.input) < 3 or not node.input[2]
                                                     or walk.ir.shape(node.input[2]) == (0,)):
        pass  # sizes computed at run time: runtime_shapes checks their unit-axis entry follows
    else:
        walk.refuse(index, "its scales are not constant")
    walk.same_on_ports(index, placement)


def tile(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Tile repeats whole axes: per unit when the unit axis is repeated once."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its repeats")
    repeats = walk.ir.const_value(node.input[1])
    if repeats is not None and int(repeats[placement.axis]) != 1:
        walk.refuse(index, "it repeats the unit axis")
    walk.same_on_ports(index, placement)  # repeats read at run time: checked by runtime_shapes
