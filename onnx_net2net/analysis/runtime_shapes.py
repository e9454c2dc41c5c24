"""Sizes computed at run time: follow `Shape` of a grown tensor to every size input.

Exporters write sizes that depend on the input as small integer programs:
`Shape(x) -> Gather -> Unsqueeze -> Concat -> Reshape`, `Div` for a head
size, `Shape(x)[0:2]` concatenated with constants for a `Resize`. When a unit
group grows by D units, each entry of a size vector is an affine function
base + slope * D of D, or irregular (`size_evaluator` states the algebra and
computes the entries).

A *size sink* is a port that reads sizes: Reshape's shape, Expand's shape,
Tile's repeats, Slice's starts / ends, Resize's sizes. The walk tells each
sink what slope every entry must have: the growth of the sink's output on its
unit axis, 0 everywhere else (and everywhere for a sink outside the group).
An entry whose slope is right follows the growth by itself. An entry whose
base is known statically but whose slope is wrong is replaced by the constant
base + required * D (a `SizeEdit`: the rewrite feeds the sink
`Where(mask, constants, computed)`): exact, because the entry equalled base
for every input of the original model. Anything else is refused, and so is a
size that depends on D reaching any op that is neither a size op nor a sink
(it would be used as data).

Example, nanoGPT's `y.view(B, T, D)` after the heads with D read from the
residual stream: widening the heads needs slope `head size` at entry 2, the
stream's D has slope 0 but base 64: it becomes the constant 64 + 16 D.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..ir import GraphIR, node_attr
from ..ops import ELEMENTWISE_NARY, ELEMENTWISE_UNARY
from .refusal import Refusal, RefusalKind
from .size_evaluator import SINK_PORTS, SIZE_OPS, SizeEdit, SizeEvaluator


def reshape_output_shape(ir: GraphIR, index: int, shape_of=None) -> tuple | None:
    """The output shape of Reshape `index` from its target computed at run
    time (None where a dim is not static: a symbolic batch), for when ONNX
    shape inference could not follow the target. `shape_of` gives the shapes
    of the tensors it reads (default `GraphIR.shape`)."""
    node = ir.nodes[index]
    shape_of = shape_of or ir.shape
    target = SizeEvaluator(ir, {}, shape_of=shape_of).port_entries(index, 1)
    source = shape_of(node.input[0])
    if target is None:
        return None
    dims, kept = [], {}  # kept: target axis -> the input axis whose dim it copies
    for j, entry in enumerate(target):
        if entry.base == 0 and not int(node_attr(node, "allowzero", 0)):
            kept[j] = j
        elif entry.base is None and entry.dim_of is not None and entry.dim_of[0] == node.input[0]:
            kept[j] = entry.dim_of[1]
        if j in kept:
            dims.append(source[kept[j]] if source is not None and kept[j] < len(source) else None)
        else:
            dims.append(None if entry.base is None or entry.base < 0 else entry.base)
    inferred = [j for j, e in enumerate(target) if e.base == -1]
    if len(inferred) == 1 and source is not None and len(set(kept.values())) == len(kept):
        # numel(input) / the other target dims, the dims copied from the input cancelled on both sides
        rest = [d for k, d in enumerate(source) if k not in kept.values()]
        others = [d for j, d in enumerate(dims) if j not in kept and j != inferred[0]]
        if None not in rest and None not in others:
            known = int(np.prod(others, dtype=np.int64))
            dims[inferred[0]] = int(np.prod(rest, dtype=np.int64)) // known if known else None
    return tuple(dims)


def slice_output_shape(ir: GraphIR, index: int, shape_of=None) -> tuple | None:
    """The output shape of Slice `index` from bounds computed at run time (a
    channel split `x[:, :C // 2]` written with Shape, Div and Mul): each
    sliced axis whose dim and bounds are static gets its length, the others
    keep the input's dims (`shape_of`: as for `reshape_output_shape`)."""
    node = ir.nodes[index]
    shape_of = shape_of or ir.shape
    source = shape_of(node.input[0])
    if source is None or len(node.input) < 3:
        return None
    evaluator = SizeEvaluator(ir, {}, shape_of=shape_of)
    bounds = []
    for port in range(1, 5):
        entries = evaluator.port_entries(index, port) if port < len(node.input) and node.input[port] else None
        if entries is None and port < 3:
            return None
        bounds.append(None if entries is None else [entry.base for entry in entries])
    starts, ends, axes, steps = bounds
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if None in axes or not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    dims = list(source)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        axis %= len(dims)
        if None in (start, end, step, dims[axis]) or step == 0:
            dims[axis] = None
        else:
            dims[axis] = len(range(*slice(start, end, step).indices(dims[axis])))
    return tuple(dims)


def pad_output_shape(ir: GraphIR, index: int, shape_of=None) -> tuple | None:
    """The output shape of Pad `index` (all axes padded) from pads computed at
    run time, where the input's dims and the pads are static (`shape_of`: as
    for `reshape_output_shape`)."""
    node = ir.nodes[index]
    shape_of = shape_of or ir.shape
    source = shape_of(node.input[0])
    if source is None or len(node.input) < 2 or (len(node.input) > 3 and node.input[3]):
        return None
    pads = SizeEvaluator(ir, {}, shape_of=shape_of).port_entries(index, 1)
    rank = len(source)
    if pads is None or len(pads) != 2 * rank:
        return None
    return tuple(None if d is None or pads[k].base is None or pads[k + rank].base is None
                 else d + pads[k].base + pads[k + rank].base for k, d in enumerate(source))


def tile_output_shape(ir: GraphIR, index: int, shape_of=None) -> tuple | None:
    """The output shape of Tile `index` from repeats computed at run time: an
    axis repeated once keeps the input's dim, even an unknown one (`shape_of`:
    as for `reshape_output_shape`)."""
    node = ir.nodes[index]
    shape_of = shape_of or ir.shape
    source = shape_of(node.input[0])
    repeats = SizeEvaluator(ir, {}, shape_of=shape_of).port_entries(index, 1)
    if source is None or repeats is None or len(repeats) != len(source):
        return None
    return tuple(d if r.base == 1 else None if d is None or r.base is None else d * r.base
                 for d, r in zip(source, repeats))


def check_sizes(ir: GraphIR, group, shape_of=None) -> list[SizeEdit]:
    """Every size input touched by the growth of `group`: the edits that keep
    them right (`shape_of`: as for `reshape_output_shape`).

    Raises:
        Refusal: (kind RUNTIME_SIZE) the first size that cannot be kept right.
    """
    evaluator = SizeEvaluator(ir, group.placements, group.value_edits, shape_of)
    sinks, frozen = _dependent_sinks(ir, evaluator)
    sinks |= _group_sinks(ir, group)
    return [edit for sink in sorted(sinks) for edit in _sink_edits(ir, evaluator, group, *sink)] + frozen


def _refused(ir: GraphIR, index: int, reason: str) -> Refusal:
    return Refusal.at_op(ir, index, reason, RefusalKind.RUNTIME_SIZE)


def _dependent_sinks(ir: GraphIR, ev: SizeEvaluator) -> tuple[set[tuple[int, int]], list[SizeEdit]]:
    """Follow every size read from a grown tensor forward: each must end in
    size inputs (sinks), or be a scalar used as data by an elementwise op (Swin's
    `head_dim ** -0.5` from x.shape), which is frozen at its old value; any
    other use is refused."""
    frontier = [ir.nodes[i].output[0] for i in range(len(ir.nodes))
                if ir.nodes[i].op_type in ("Shape", "Size") and ir.nodes[i].input[0] in ev.placements]
    sinks, seen, frozen = set(), set(), []
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        values = ev.entries(tensor)
        if values is not None and not any(e.depends for e in values):
            continue
        for use in ir.uses(tensor):
            node = ir.nodes[use.node]
            if node.op_type in ("Shape", "Size"):
                continue  # the length of a size vector does not change
            if use.port in SINK_PORTS.get(node.op_type, {}):
                sinks.add((use.node, use.port))
            elif node.op_type in SIZE_OPS and use.port >= 0:
                frontier.extend(o for o in node.output if o)
            elif node.op_type in ELEMENTWISE_UNARY | ELEMENTWISE_NARY and _freezable(ir, tensor, values):
                frozen.append(SizeEdit(use.node, use.port, tuple((k, e.base, 0) for k, e in enumerate(values)),
                                       whole=True))
            else:
                raise _refused(ir, use.node, f"it uses '{tensor}' as data, a size read at run time from a tensor "
                                        "whose width changes with the units")
    return sinks, frozen


def _freezable(ir: GraphIR, tensor: str, values) -> bool:
    """A size used as data can be frozen when it is a static scalar (or one
    element): the op's output shape does not depend on its value."""
    shape = ir.shape(tensor)
    return (values is not None and len(values) == 1 and values[0].base is not None and shape is not None
            and len(shape) <= 1 and None not in shape)


def _group_sinks(ir: GraphIR, group) -> set[tuple[int, int]]:
    """Size inputs computed at run time on ops whose data carries the units."""
    sinks = set()
    for index, node in enumerate(ir.nodes):
        ports = SINK_PORTS.get(node.op_type)
        if not ports or not (node.input[0] in group.placements or node.output[0] in group.placements):
            continue
        for port in ports:
            if port < len(node.input) and node.input[port] and not ir.is_const(node.input[port]):
                sinks.add((index, port))
    return sinks


def _sink_edits(ir: GraphIR, ev: SizeEvaluator, group, index: int, port: int) -> list[SizeEdit]:
    node = ir.nodes[index]
    what = SINK_PORTS[node.op_type][port]
    actual = ev.port_entries(index, port)
    if actual is None:
        raise _refused(ir, index, f"its {what} '{node.input[port]}' is computed at run time in a way not followed")
    required = _REQUIRED[node.op_type](ir, ev, group, index, port, actual)
    replaced = []
    for k, (entry, need) in enumerate(zip(actual, required)):
        if need is _ANY or entry.slope == need:
            continue
        if need is _BATCH:
            replaced.append((k, -1, 0))
            continue
        if entry.base is None:
            raise _refused(ir, index, f"entry {k} of its {what} is read at run time and does not follow the units "
                                 f"(it would have to grow by {need} per unit)" if need else
                                 f"entry {k} of its {what} changes with the units, but this op's data does not")
        replaced.append((k, entry.base, int(need)))
    if required.count(_BATCH) > 1 or _BATCH in required and any(e.base == -1 and not e.depends for e in actual):
        raise _refused(ir, index, f"its {what} merges the units with a batch of unknown size on one axis, and another "
                                  "entry is inferred (-1) too")
    return [SizeEdit(index, port, tuple(replaced))] if replaced else []


_ANY = object()
#: An axis holding the units times a batch of unknown size: its entry becomes -1,
#: inferred from the element count (exact: every other entry is right).
_BATCH = object()


def _unit_axis(group, tensor: str):
    placement = group.placements.get(tensor)
    return (None, 0) if placement is None else (placement.axis, placement.growth())


def _required_reshape(ir, ev, group, index, port, actual):
    node = ir.nodes[index]
    required = []
    for k, entry in enumerate(actual):
        need = _reshape_need(group, node.output[0], k)
        if entry.base == -1 and not entry.depends:
            required.append(_ANY)  # inferred from the element count
        elif entry.base == 0 and not entry.depends and not int(node_attr(node, "allowzero", 0)):
            # copies the input's dim k
            if _reshape_need(group, node.input[0], k) != need:
                raise _refused(ir, index, f"entry {k} of its shape copies the input's dim (0), which does not follow "
                                     "the units there")
            required.append(_ANY)
        else:
            required.append(need)
    return required


def _reshape_need(group, tensor: str, k: int):
    """What dim k of `tensor` gains per unit added: its growth on the unit axis
    (_BATCH where the units are merged with a batch of unknown size), else 0."""
    placement = group.placements.get(tensor)
    if placement is None or placement.axis != k:
        return Fraction(0)
    return _BATCH if placement.batch else Fraction(placement.growth())


def _required_from_end(ir, ev, group, index, port, actual):
    """Expand's shape and Resize's sizes: the output's unit axis, aligned from
    the end, must keep its length (the op is then per unit there)."""
    node = ir.nodes[index]
    placement = group.placements.get(node.output[0])
    rank = ir.rank(node.output[0])
    position = None if placement is None or rank is None else len(actual) - (rank - placement.axis)
    required = []
    for k, entry in enumerate(actual):
        if k != position:
            required.append(Fraction(0))
        elif node.op_type == "Expand" and entry.base == 1 and not entry.depends:
            required.append(_ANY)  # broadcasting 1 keeps the input's (grown) dim
        elif entry.base is not None and entry.base != placement.length:
            raise _refused(ir, index, f"it changes the unit axis ({placement.length} -> {entry.base} positions)")
        else:
            required.append(Fraction(placement.growth()))
    return required


def _required_tile(ir, ev, group, index, port, actual):
    node = ir.nodes[index]
    axis, _ = _unit_axis(group, node.input[0])
    if axis is not None and axis < len(actual) and (actual[axis].base != 1 or actual[axis].depends):
        raise _refused(ir, index, "it repeats the unit axis (or its repeats there are not known to be 1)")
    return [Fraction(0)] * len(actual)


def _required_slice(ir, ev, group, index, port, actual):
    """Bounds on axes other than the unit axis must not change with the units;
    those on the unit axis move as the walk found (`group.runtime_bounds`)."""
    node = ir.nodes[index]
    axes = ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(actual))
    if axes is None:
        raise _refused(ir, index, "its axes are not constant")
    axis, _ = _unit_axis(group, node.input[0])
    rank = ir.rank(node.input[0])
    required = [Fraction(0)] * len(actual)
    for k, a in enumerate(axes):
        if axis is not None and rank is not None and int(a) % rank == axis:
            growth = group.runtime_bounds.get((index, port, k))
            if growth is None:
                raise _refused(ir, index, "it slices the unit axis with bounds read at run time")
            required[k] = Fraction(growth)
    return required


def _required_pad(ir, ev, group, index, port, actual):
    """Pads read at run time (Swin's window padding): 0 on the unit axis."""
    node = ir.nodes[index]
    rank = ir.rank(node.input[0])
    axes = list(range(rank or 0))
    if len(node.input) > 3 and node.input[3]:
        value = ir.const_value(node.input[3])
        if value is None or rank is None:
            raise _refused(ir, index, "its axes are not constant")
        axes = [int(a) % rank for a in value]
    axis, _ = _unit_axis(group, node.input[0])
    if axis in axes:
        k, count = axes.index(axis), len(axes)
        if len(actual) != 2 * count or any(actual[i].base != 0 or actual[i].depends for i in (k, k + count)):
            raise _refused(ir, index, "it may pad the unit axis (its pads there are read at run time and not known "
                                 "to be 0)")
    return [Fraction(0)] * len(actual)


_REQUIRED = {"Reshape": _required_reshape, "Expand": _required_from_end, "Resize": _required_from_end,
             "Tile": _required_tile, "Slice": _required_slice, "Pad": _required_pad}
