"""Contractions over the units: one side's copies share their unit's value.

A product of two computed tensors may sum over the units (rules/attention.py):
EfficientViT's attention scores q^T k sum over the key channels,
s = sum_t q_t k_t. Widened with g, where unit u has c(u) copies, q and k both
copied would give sum_j q_g(j) k_g(j) = sum_u c(u) q_u k_u. Dividing one
side's copies by their number, k'_j = k_g(j) / c(g(j)), gives
sum_u c(u) q_u k_u / c(u) = s exactly.

k is a computed tensor, so the division is made where it is produced: the
weight rows (and bias) of the layer writing it, or the columns of the
embedding table it is gathered from, are divided along with being copied
(`WeightEdit.divided`). That is exact when everything between that
layer and the product is linear in k and reads nothing else: reshapes and
transposes, a Split or Slice taking k's part of a wider output (q | k | v:
only k's repeat of the space is divided), products and quotients by
constants, a constant bias (divided too), a depthwise convolution (its bias
divided), a BatchNormalization (its scale and bias divided instead of the
layer's rows), and no other reader on the way but Shape, nor a graph output
(its values would change). The side tried first is B's (k of q^T k), then A's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..ir import GraphIR, node_attr
from .refusal import Refusal
from .units import Placement, UnitGroup, whole_axis_as_one_unit

#: Ops that move values without changing them.
_MOVES = frozenset("Reshape Flatten Transpose Squeeze Unsqueeze Identity".split())
#: Readers that see only the shape of a tensor.
_SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass
class _Path:
    """The walk back from one side of a contraction to where it is produced."""

    ir: GraphIR
    group: UnitGroup
    contraction: int
    #: (node, port) of a constant -> the repeats of its placement to divide; None: all of them
    divisions: dict[tuple[int, int], tuple[int, ...] | None]
    #: the repeats a Split or Slice on the way selected, with the placement they were counted in
    selected: tuple[Placement, tuple[int, ...]] | None = None

    def refuse(self, reason: str) -> Refusal:
        """Why this side cannot be divided (divide_contractions names the product)."""
        return Refusal(reason)


def divide_contractions(ir: GraphIR, group: UnitGroup) -> None:
    """Mark, for every product contracting the units, one side's producing
    constants as divided by the copy counts (refused when neither side can be)."""
    for index in dict.fromkeys(group.contractions):
        retry = whole_axis_as_one_unit(group.placements[ir.nodes[index].input[0]], group.size)
        if group.tile:
            raise Refusal.at_op(ir, index, "it contracts units over which a normalisation takes statistics "
                                "(the divided copies would change it)", retry=retry)
        refusals = []
        for port in (1, 0):
            try:
                divisions = _divisions(ir, group, index, port)
                break
            except Refusal as refusal:
                refusals.append(refusal)
        else:
            right, left = refusals
            raise Refusal.at_op(ir, index, f"it contracts the units, and neither side can be divided: the right "
                                f"one (k of q^T k) because {right.reason}; the left one because {left.reason}",
                                retry=retry)
        _mark(group, divisions)


def whole_axis_layouts(ir: GraphIR, group: UnitGroup) -> tuple[tuple[int, int], ...]:
    """Layouts (as factors of the group's) in which no product contracts the
    units: a single head whose units fill the contracted axis may grow by
    copies of the whole head instead of by its size (also the retry when
    neither side can be divided: a norm on q and on k)."""
    placements = [group.placements[ir.nodes[index].input[0]] for index in group.contractions]
    return tuple(dict.fromkeys(factor for placement in placements
                               for factor in whole_axis_as_one_unit(placement, group.size)))


def _divisions(ir: GraphIR, group: UnitGroup, index: int, port: int) -> dict[tuple[int, int], tuple[int, ...] | None]:
    """The constants to divide for operand `port` of the product at `index`, found walking back to its producer."""
    path = _Path(ir, group, index, {})
    tensor, reader = ir.nodes[index].input[port], index
    while True:
        _check_sole_reader(path, tensor, reader)
        producer = None if ir.is_const(tensor) else ir.producer_node(tensor)
        if producer is None:
            raise path.refuse(f"'{tensor}', the side it would divide, is not computed by a layer")
        node = ir.nodes[producer]
        if producer in group.producers:  # its weight and bias, or an embedding table (a Gather's input 0)
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] \
                    and not _carries_units(group, producer, 2):
                raise path.refuse(f"Gemm {ir.label(producer)} adds a bias that is not per unit, so '{tensor}' is "
                                  "not linear in what it would divide")
            _divide_outputs(path, producer, _copied_ports(group, producer))
            return path.divisions
        if node.op_type == "BatchNormalization":
            _divide_outputs(path, producer, (1, 2))
            return path.divisions
        tensor, reader = _step_back(path, producer, tensor), producer


def _step_back(path: _Path, index: int, tensor: str) -> str:
    """The input of node `index` that `tensor` (its output) is linear in, recording what it divides."""
    ir, group = path.ir, path.group
    node = ir.nodes[index]
    computed = [name for name in node.input if name and not ir.is_const(name)]
    op = node.op_type
    if op in _MOVES or (op in ("Mul", "Div") and len(computed) == 1 and (op == "Mul" or computed[0] == node.input[0])):
        return computed[0]
    if op in ("Add", "Sub") and len(computed) == 1:
        bias_port = 1 - list(node.input).index(computed[0])
        if not _carries_units(group, index, bias_port):
            raise path.refuse(f"{op} {ir.label(index)} adds a constant that is not per unit, so '{tensor}' is not "
                              "linear in what it would divide")
        path.divisions[(index, bias_port)] = _repeats_at(path, index)
        return computed[0]
    if op == "Conv" and index in group.passthrough:  # depthwise: linear per channel, but for its bias
        path.divisions[(index, 2)] = _repeats_at(path, index)
        return node.input[0]
    if op in ("Split", "Slice") and path.selected is None:
        path.selected = _selected_repeats(path, index, tensor)
        return node.input[0]
    raise path.refuse(f"{op} {ir.label(index)} on the way to the layer producing that side is not linear "
                      "(the copies' share cannot be divided there)")


def _carries_units(group: UnitGroup, index: int, port: int) -> bool:
    return any(edit.node == index and edit.port == port and edit.role == "copy" for edit in group.weight_edits)


def _check_sole_reader(path: _Path, tensor: str, reader: int) -> None:
    ir = path.ir
    if tensor in ir.graph_outputs:  # kept with keep_output_shapes: its copies would be divided
        raise path.refuse(f"'{tensor}', on the side it would divide, is a graph output")
    for use in ir.uses(tensor):
        if use.node != reader and ir.nodes[use.node].op_type not in _SHAPE_READERS:
            raise path.refuse(f"'{tensor}', on the side it would divide, is also read by "
                              f"{ir.nodes[use.node].op_type} {ir.label(use.node)}")


def _selected_repeats(path: _Path, index: int, tensor: str) -> tuple[Placement, tuple[int, ...]]:
    """The repeats of the space a Split output or Slice keeps (q, k or v of a fused projection)."""
    ir, group = path.ir, path.group
    node = ir.nodes[index]
    source = group.placements.get(node.input[0])
    if source is None:
        raise path.refuse(f"the input of {node.op_type} {ir.label(index)} does not hold the units")
    bounds = _kept_range(ir, index, tensor, source)
    if bounds is None:
        raise path.refuse(f"{node.op_type} {ir.label(index)} does not cut the unit axis at constant positions")
    lo, hi = bounds
    span = group.size * source.inner
    kept = tuple(r for r, first in enumerate(_repeat_starts(source)) if lo <= first and first + span <= hi)
    if not kept:
        raise path.refuse(f"{node.op_type} {ir.label(index)} keeps no whole repeat of the units")
    return source, kept


def _kept_range(ir: GraphIR, index: int, tensor: str, source: Placement) -> tuple[int, int] | None:
    """The positions [lo, hi) of the unit axis that output `tensor` of a Split or Slice keeps."""
    node = ir.nodes[index]
    if node.op_type == "Split":
        if int(node_attr(node, "axis", 0)) % source.rank != source.axis:
            return None
        sizes = [(ir.shape(name) or [None] * source.rank)[source.axis] for name in node.output]
        if any(size is None for size in sizes):
            return None
        port = list(node.output).index(tensor)
        return sum(sizes[:port]), sum(sizes[:port + 1])
    starts, ends, axes, steps = (_const_input(ir, node, port) for port in (1, 2, 3, 4))
    if starts is None or ends is None or len(starts.reshape(-1)) != 1:
        return None
    axis = int(axes.reshape(-1)[0]) % source.rank if axes is not None else 0
    if axis != source.axis or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return None
    lo, hi = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    if lo < 0 or hi < 0:
        return None
    return lo, min(hi, source.length)


def _const_input(ir: GraphIR, node, port: int):
    """The constant at input `port` of `node` (None when absent or computed)."""
    return ir.const_value(node.input[port]) if port < len(node.input) and node.input[port] else None


def _repeat_starts(placement: Placement) -> list[int]:
    """The position of the first unit of each repeat."""
    if placement.starts:
        return [start + placement.offset for start in placement.starts]
    return [r * placement.block + placement.offset for r in range(placement.outer)]


def _divide_outputs(path: _Path, index: int, ports: tuple[int, ...]) -> None:
    """Divide the constants of node `index` that produce the units (weight rows and bias, or a norm's scale and bias)."""
    repeats = _repeats_at(path, index)
    divided = [port for port in ports if _carries_units(path.group, index, port)]
    if not divided:
        raise path.refuse(f"{path.ir.label(index)} has no constant copying the units to divide")
    for port in divided:
        path.divisions[(index, port)] = repeats


def _copied_ports(group: UnitGroup, index: int) -> tuple[int, ...]:
    """The ports of node `index` whose constants a copy edit grows."""
    return tuple(sorted({edit.port for edit in group.weight_edits if edit.node == index and edit.role == "copy"}))


def _repeats_at(path: _Path, index: int) -> tuple[int, ...] | None:
    """The repeats of node `index`'s constants to divide: those a Split or
    Slice further down the path selected (q | k | v: k's only), else all."""
    if path.selected is None:
        return None
    ir = path.ir
    counted_in, repeats = path.selected
    produced = path.group.placements.get(ir.nodes[index].output[0])
    if produced is None or _layout(produced) != _layout(counted_in):
        raise path.refuse(f"the repeats of the units change between {ir.label(index)} and the part it divides")
    return repeats


def _layout(placement: Placement) -> Placement:
    return replace(placement, axis=0, rank=0)


def _mark(group: UnitGroup, divisions: dict) -> None:
    """Record the divisions on the groups' copy edits (repeats merged with earlier contractions')."""
    edits = []
    for edit in group.weight_edits:
        key = (edit.node, edit.port)
        if edit.role == "copy" and key in divisions:
            repeats = divisions[key]
            if repeats is None:
                repeats = range(len(edit.placement.starts) or edit.placement.outer)
            edit = replace(edit, divided=tuple(sorted(set(edit.divided) | set(repeats))))
        edits.append(edit)
    group.weight_edits = edits
