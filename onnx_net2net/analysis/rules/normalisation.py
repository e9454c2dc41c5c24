"""Rules for normalisations and reductions.

* BatchNormalization / InstanceNormalization normalise each channel alone:
  the units must be on the channel axis, their per-channel parameters are
  copied like a producer's;
* group normalisation with one group, GroupNorm(1, C), takes its statistics
  over every channel and position of a sample: mean and variance are
  unchanged when every unit is copied equally often (x' holds each value of
  x exactly k times: the same mean, the same mean square), so the group
  tiles. PyTorch exports it as Reshape [N, C, H, W] -> [N, 1, C*H*W],
  InstanceNormalization (scale and bias of size 1: statistics over axes 2..),
  Reshape back, then the per-channel affine Mul and Add: the units reach the
  InstanceNormalization on an axis after the channel axis, flattened with
  the positions. More groups put the channels of each group together: new
  channels, added after the old ones, would join the last group (refused:
  the reshape splits the unit axis). GroupNormalization (opset 21) is
  refused: with one group it is the same norm, but ONNX shape inference
  gives its output no type, so the grown model could not be checked;
* LayerNormalization / RMSNormalization over the unit axis, and ReduceMean /
  Max / Min over it (normalisations written as ops), take statistics over
  the units: they are unchanged only if every unit is copied equally often,
  so the group tiles (new sizes are multiples of the size) unless LEMON's
  average expansion applies (see analysis/normalisation.py);
* other reductions keep the units on the axes they do not reduce.
"""

from __future__ import annotations

from ...ir import node_attr
from ..units import Placement, axis_only
from ..walk import Walk


def batchnorm(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Per-channel normalisation: its parameters are copied like a producer's."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach a statistics input")
    if len([o for o in node.output if o]) > 1 or node_attr(node, "training_mode", 0):
        walk.refuse(index, "training-mode BatchNormalization (running statistics outputs)")
    walk.require_channel_axis(index, placement, allow_blocks=True) if placement.rank >= 3 else None
    if placement.axis != 1:
        walk.refuse(index, f"the units are on axis {placement.axis}, not the channel axis")
    params = (1, 2) if node.op_type == "InstanceNormalization" else (1, 2, 3, 4)
    if node.op_type == "InstanceNormalization" and placement.inner != 1:
        walk.refuse(index, "instance normalisation over a block of channels")
    for param in params:
        walk.weight(index, param, 0, axis_only(placement), "copy")
    walk.same_on_ports(index, placement)


def instancenorm(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Per-channel normalisation when the units are on the channel axis; a
    group normalisation (statistics over all of axes 2..) when they are
    flattened with the positions after it."""
    if placement.axis < 2:
        batchnorm(walk, index, side, port, placement)
        return
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its scale or bias")
    # Statistics per (sample, group) over every axis from 2 on, the units'
    # axis among them: unchanged when every unit is copied equally often.
    _require_tiling(walk, index, placement)
    walk.group.norms.append(index)
    walk.same_on_ports(index, placement)


def groupnorm(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """GroupNormalization (opset 21) is refused, with what would be needed."""
    groups = int(node_attr(walk.ir.nodes[index], "num_groups", 0))
    if groups != 1:
        walk.refuse(index, f"it normalises the channels in {groups} groups: new channels would join the last group "
                           "(exact only with one group)")
    walk.refuse(index, "one group would grow by multiples, but ONNX shape inference gives GroupNormalization's "
                       "output no type, so the grown model's shapes could not be checked (PyTorch exports GroupNorm "
                       "as InstanceNormalization, which grows)")


def reduce(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """The units pass on the kept axes; a mean / max / min over them needs tiling."""
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its axes input")
    axes = node_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = walk.const(index, node.input[1], "axes").tolist()
    if axes is None or len(axes) == 0:
        if node_attr(node, "noop_with_empty_axes", 0):
            walk.same_on_ports(index, placement)
            return
        walk.refuse(index, "it reduces over every axis, the unit axis included")
    in_rank = walk.rank(index, node.input[0])
    axes = sorted(int(a) % in_rank for a in axes)
    keep = int(node_attr(node, "keepdims", 1))
    if side == "in":
        if placement.axis in axes:
            if node.op_type not in ("ReduceMean", "ReduceMax", "ReduceMin"):
                walk.refuse(index, "it reduces over the unit axis")
            # A mean / max / min over equally copied units is unchanged.
            _require_tiling(walk, index, placement)
            walk.group.reductions.append(index)
            return
        axis = placement.axis if keep else placement.axis - sum(a < placement.axis for a in axes)
        walk.add(node.output[0], placement.on_axis(axis, in_rank if keep else in_rank - len(axes)))
    else:
        axis = placement.axis
        if not keep:
            kept = [a for a in range(in_rank) if a not in axes]
            axis = kept[placement.axis]
        walk.add(node.input[0], placement.on_axis(axis, in_rank))


def layernorm(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Normalising over the unit axis is exact when every unit is copied equally
    often (mean and variance unchanged): the group must tile."""
    node = walk.ir.nodes[index]
    axis = int(node_attr(node, "axis", -1)) % placement.rank
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its scale or bias")
    if any(o and walk.ir.uses(o) for o in node.output[1:]):
        walk.refuse(index, "its mean / inverse-std outputs are used")
    if placement.axis >= axis:
        if axis != placement.rank - 1:
            walk.refuse(index, "it normalises over the unit axis together with other axes")
        _require_tiling(walk, index, placement)
        walk.group.norms.append(index)
        walk.weight(index, 1, 0, axis_only(placement), "norm-scale")
        if node.op_type == "LayerNormalization":
            walk.weight(index, 2, 0, axis_only(placement), "norm-bias")
    walk.same_on_ports(index, placement)


def _require_tiling(walk: Walk, index: int, placement: Placement) -> None:
    """Statistics over the unit axis survive only if every unit is copied
    equally often (widths that are multiples of the current width)."""
    group = walk.group
    if placement.offset or placement.block != group.size * placement.inner:
        # (repeated blocks that each hold exactly the units, as in patch merging, are fine: every unit is
        # still copied equally often)
        walk.refuse(index, "it takes statistics over the units and other data together")
    grouped = any(1 < edit.groups < group.size for edit in group.weight_edits)
    if grouped or group.step not in (1, group.size):
        walk.refuse(index, "it takes statistics over grouped-convolution units")
    group.tile = True
    group.step = group.size
