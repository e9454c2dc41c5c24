"""Sizes computed at run time: follow `Shape` of a grown tensor to every size input.

Exporters write sizes that depend on the input as small integer programs:
`Shape(x) -> Gather -> Unsqueeze -> Concat -> Reshape`, `Div` for a head
size, `Shape(x)[0:2]` concatenated with constants for a `Resize`. When a unit
group grows by D units, every tensor t of the group gains `growth(t) * D`
positions on its unit axis, so an entry of a size vector is an *affine*
function of D:

    entry(D) = base + slope * D

`Shape(t)[axis]` has base = the current length and slope = growth(t); other
dims have slope 0 (their base is unknown for a symbolic batch). Gather,
Slice, Concat, (Un)squeeze, Cast, Identity and a 1-D Reshape move entries;
Add / Sub add them; Mul and Div by a constant scale them; a floor division
that does not divide base and slope exactly makes the slope *irregular*
(known now, but not affine in D).

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

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx

from .ir import GraphIR, node_attr
from .ops import ELEMENTWISE_NARY, ELEMENTWISE_UNARY

#: Ops that compute sizes from sizes (entries are followed through them).
SIZE_OPS = frozenset("""
    Gather Slice Concat Unsqueeze Squeeze Cast Identity Reshape Add Sub Mul Div Mod Neg Where Equal Transpose
""".split())
#: Size inputs, by op: port -> what the port holds.
SINK_PORTS = {"Reshape": {1: "shape"}, "Expand": {1: "shape"}, "Tile": {1: "repeats"},
              "Slice": {1: "starts", 2: "ends"}, "Resize": {3: "sizes"}, "Pad": {1: "pads"}}


@dataclass(frozen=True)
class Entry:
    """One entry of a size vector: base + slope * D (D: units added).

    base None: not known statically (a symbolic batch). slope None: depends
    on D, but not affinely (an inexact floor division, a product of sizes).
    """

    base: int | None
    slope: Fraction | None = Fraction(0)

    @property
    def depends(self) -> bool:
        return self.slope != 0


@dataclass(frozen=True)
class SizeEdit:
    """Feed the size input `port` of node `node` with entry `index` replaced by
    `base + per_unit * D` (one tuple per entry)."""

    node: int
    port: int
    entries: tuple[tuple[int, int, int], ...]
    #: the input is a size used as data (a scale computed from a width): it is
    #: replaced as a whole by a constant of its shape holding the old values
    whole: bool = False


@dataclass(frozen=True)
class SizeRefusal:
    node: int
    reason: str


class _Refuse(Exception):
    def __init__(self, node: int, reason: str):
        super().__init__(reason)
        self.refusal = SizeRefusal(node, reason)


class SizeEvaluator:
    """Entries of integer size tensors as affine functions of the units added.

    `placements` are the group's tensors (name -> Placement); `value_edits`
    the group's edits of constants (a literal that grows with the units).
    """

    def __init__(self, ir: GraphIR, placements: dict, value_edits=()):
        self.ir = ir
        self.placements = placements
        self.value_edits = {}
        for edit in value_edits:
            self.value_edits[(edit.node, edit.port, edit.index)] = edit.per_unit
        self.memo: dict[str, list[Entry] | None] = {}
        #: shapes of evaluated tensors with more than one axis (entries are kept flat, row-major)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def entries(self, tensor: str) -> list[Entry] | None:
        """The entries of `tensor` (scalars as one entry), or None when unknown."""
        if tensor not in self.memo:
            self.memo[tensor] = None  # guards against cycles through malformed graphs
            self.memo[tensor] = self._evaluate(tensor)
        return self.memo[tensor]

    def port_entries(self, index: int, port: int) -> list[Entry] | None:
        """Entries of a node's input, with the group's edits of that constant."""
        node = self.ir.nodes[index]
        values = self.entries(node.input[port])
        if values is None:
            return None
        return [Entry(e.base, None if e.slope is None else e.slope + self.value_edits.get((index, port, k), 0))
                for k, e in enumerate(values)]

    def array(self, index: int, port: int) -> np.ndarray | None:
        """A node input's entries as an array of Entry with the tensor's shape."""
        values = self.port_entries(index, port)
        if values is None:
            return None
        name = self.ir.nodes[index].input[port]
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(self.shapes.get(name, (len(values),)))

    def _evaluate(self, tensor: str) -> list[Entry] | None:
        ir = self.ir
        value = ir.const_value(tensor)
        if value is not None:
            if value.dtype.kind not in "iu" or value.ndim > 2:
                return None
            if value.ndim == 2:
                self.shapes[tensor] = value.shape
            return [Entry(int(v)) for v in value.reshape(-1)]
        index = ir.producer_node(tensor)
        if index is None:
            return self._independent(tensor)
        node = ir.nodes[index]
        rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            return self._independent(tensor)
        return rule(self, index)

    def _independent(self, tensor: str) -> list[Entry] | None:
        """A size computed by an op we do not follow: independent of the growth
        (a dependent size never reaches such an op: `check_sizes` refuses it)."""
        shape = self.ir.shape(tensor)
        if shape is None or len(shape) > 1 or (shape and shape[0] is None):
            return None
        return [Entry(None) for _ in range(shape[0] if shape else 1)]


# -- evaluation rules: each returns the entries of the node's first output


def _shape(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    node = ev.ir.nodes[index]
    shape = ev.ir.shape(node.input[0])
    if shape is None:
        return None
    placement = ev.placements.get(node.input[0])
    dims = [Entry(None if d is None else int(d)) for d in shape]
    if placement is not None:
        dims[placement.axis] = Entry(placement.length, Fraction(placement.growth()))
    if node.op_type == "Size":
        return [_product(dims)]
    rank = len(dims)
    start, end = int(node_attr(node, "start", 0)), node_attr(node, "end")
    start = max(0, min(rank, start + rank if start < 0 else start))
    end = rank if end is None else max(0, min(rank, int(end) + rank if int(end) < 0 else int(end)))
    return dims[start:end]


def _product(entries: list[Entry]) -> Entry:
    base, slope = 1, Fraction(0)
    for entry in entries:
        if entry.depends and slope:
            return Entry(None, None)
        if entry.depends:
            if base is None or entry.slope is None:
                return Entry(None, None)
            slope, base = entry.slope * base, base * entry.base
        elif entry.base is None:
            if slope:
                return Entry(None, None)
            base = None
        else:
            slope = slope * entry.base
            base = None if base is None else base * entry.base
    return Entry(base, slope)


def _passthrough(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    """Unsqueeze, Squeeze, Cast, Identity, Reshape: the entries in order."""
    node = ev.ir.nodes[index]
    if node.op_type == "Cast" and int(node_attr(node, "to", 0)) not in _INTEGER_TYPES:
        return None
    values = ev.port_entries(index, 0)
    if node.op_type == "Reshape" and values is not None:
        shape = _reshape_target(ev, index, len(values))
        if shape is None:
            return None
        if len(shape) > 1:
            ev.shapes[node.output[0]] = shape
    elif node.input[0] in ev.shapes and node.op_type in ("Cast", "Identity"):
        ev.shapes[node.output[0]] = ev.shapes[node.input[0]]
    elif node.input[0] in ev.shapes:
        return None  # (un)squeezing a matrix of sizes: not followed
    return values


def _reshape_target(ev: SizeEvaluator, index: int, count: int) -> tuple[int, ...] | None:
    """The static shape a Reshape of `count` size entries produces."""
    target = ev.port_entries(index, 1)
    if target is None or any(e.base is None or e.depends or e.base == 0 for e in target):
        return None
    dims = [e.base for e in target]
    if -1 in dims:
        rest = int(np.prod([d for d in dims if d != -1]))
        if rest == 0 or count % rest:
            return None
        dims[dims.index(-1)] = count // rest
    return tuple(dims) if int(np.prod(dims)) == count else None


def _transpose(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    node = ev.ir.nodes[index]
    array = ev.array(index, 0)
    if array is None:
        return None
    moved = np.transpose(array, node_attr(node, "perm"))
    if moved.ndim > 1:
        ev.shapes[node.output[0]] = moved.shape
    return list(moved.reshape(-1))


#: uint8 int8 uint16 int16 int32 int64 uint32 uint64, and float float16 double bfloat16 (a size cast to
#: a float to compute a scale: followed so that it can be frozen, see _freezable)
_INTEGER_TYPES = {2, 3, 4, 5, 6, 7, 12, 13, 1, 10, 11, 16}


def _gather(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    node = ev.ir.nodes[index]
    data = ev.port_entries(index, 0)
    indices = ev.ir.const_value(node.input[1])
    if data is None or indices is None or int(node_attr(node, "axis", 0)) != 0:
        return None
    return [data[int(i)] for i in indices.reshape(-1)]


def _slice(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    node = ev.ir.nodes[index]
    data = ev.array(index, 0)
    if data is None or len(node.input) < 3:
        return None
    bounds = []
    for port in range(1, 5):
        if port >= len(node.input) or not node.input[port]:
            bounds.append(None)
            continue
        values = ev.port_entries(index, port)
        if values is None or any(v.base is None or v.depends for v in values):
            return None
        bounds.append([v.base for v in values])
    starts, ends, axes, steps = bounds
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else [a % data.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    window = [slice(None)] * data.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps):
        window[axis] = slice(start, None if step < 0 and end < -data.shape[axis] else end, step)
    sliced = data[tuple(window)]
    if sliced.ndim > 1:
        ev.shapes[node.output[0]] = sliced.shape
    return list(sliced.reshape(-1))


def _concat(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    node = ev.ir.nodes[index]
    pieces = [ev.port_entries(index, port) for port in range(len(node.input))]
    if any(piece is None for piece in pieces):
        return None
    return [entry for piece in pieces for entry in piece]


def _arithmetic(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    node = ev.ir.nodes[index]
    if node.op_type == "Neg":
        values = ev.port_entries(index, 0)
        return None if values is None else [_scale(e, -1) for e in values]
    left, right = ev.port_entries(index, 0), ev.port_entries(index, 1)
    if left is None or right is None or 1 not in (len(left), len(right)) and len(left) != len(right):
        return None
    count = max(len(left), len(right))
    left, right = (left * count if len(left) == 1 else left), (right * count if len(right) == 1 else right)
    if node.op_type == "Mod" and int(node_attr(node, "fmod", 0)):
        return None
    combine = _COMBINE[node.op_type]
    return [combine(a, b) for a, b in zip(left, right)]


def _add(a: Entry, b: Entry, sign: int = 1) -> Entry:
    base = None if a.base is None or b.base is None else a.base + sign * b.base
    slope = None if a.slope is None or b.slope is None else a.slope + sign * b.slope
    return Entry(base, slope)


def _scale(entry: Entry, factor: int) -> Entry:
    return Entry(None if entry.base is None else entry.base * factor,
                 None if entry.slope is None else entry.slope * factor)


def _mul(a: Entry, b: Entry) -> Entry:
    if a.depends and b.depends:
        return Entry(None, None)
    if b.depends:
        a, b = b, a
    if b.base is None:
        return Entry(None, None if a.depends else Fraction(0))
    return _scale(a, b.base)


def _div(a: Entry, b: Entry) -> Entry:
    """Integer division by a constant: affine only if it divides base and slope."""
    if b.depends or b.base in (None, 0):
        return Entry(None, None if a.depends or b.depends else Fraction(0))
    base = None if a.base is None else int(np.trunc(a.base / b.base))
    if not a.depends:
        return Entry(base, Fraction(0))
    exact = a.slope is not None and a.base is not None and a.base % b.base == 0 and (a.slope / b.base).denominator == 1
    return Entry(base, a.slope / b.base if exact else None)


def _where(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    """Where picks entries where the condition is known; elsewhere both
    candidates must agree (else: known only to depend, or not, on the growth)."""
    pieces = [ev.port_entries(index, port) for port in range(3)]
    if any(piece is None for piece in pieces):
        return None
    count = max(len(piece) for piece in pieces)
    if any(len(piece) not in (1, count) for piece in pieces):
        return None
    condition, chosen, other = (piece * count if len(piece) == 1 else piece for piece in pieces)
    picked = []
    for c, a, b in zip(condition, chosen, other):
        if c.base is not None and not c.depends:
            picked.append(a if c.base else b)
        elif a == b:
            picked.append(a)
        else:
            picked.append(Entry(None, None if a.depends or b.depends or c.depends else Fraction(0)))
    return picked


def _mod(a: Entry, b: Entry) -> Entry:
    if a.depends or b.depends:
        return Entry(None, None)
    return Entry(None if a.base is None or not b.base else a.base % b.base)  # fmod=0: the divisor's sign


def _equal(a: Entry, b: Entry) -> Entry:
    """Equality; a size growing away from a constant (a dim compared with -1,
    as the `expand(..., -1, ...)` idiom does) is never equal to it."""
    if b.depends:
        a, b = b, a
    if a.depends and b.depends:
        return Entry(None, None)
    if a.depends:
        if a.base is None or a.slope is None or b.base is None:
            return Entry(None, None)
        apart = a.slope > 0 and b.base < a.base or a.slope < 0 and b.base > a.base
        return Entry(0) if apart else Entry(None, None)
    return Entry(None if a.base is None or b.base is None else int(a.base == b.base))


def _constant_of_shape(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    """A 1-D ConstantOfShape of known length (the `expand(B, -1, -1)` idiom)."""
    node = ev.ir.nodes[index]
    length = ev.port_entries(index, 0)
    attribute = node_attr(node, "value")
    value = 0 if attribute is None else onnx.numpy_helper.to_array(attribute).reshape(-1)[0]
    if length is None or len(length) != 1 or length[0].base is None or length[0].depends:
        return None
    if not float(value).is_integer():
        return None
    return [Entry(int(value))] * length[0].base


_COMBINE = {"Mod": _mod, "Equal": _equal, "Add": _add, "Sub": lambda a, b: _add(a, b, -1), "Mul": _mul, "Div": _div}
_RULES = {"Shape": _shape, "Size": _shape, "Unsqueeze": _passthrough, "Squeeze": _passthrough,
          "Cast": _passthrough, "Identity": _passthrough, "Reshape": _passthrough, "Gather": _gather,
          "Slice": _slice, "Concat": _concat, "Add": _arithmetic, "Sub": _arithmetic, "Mul": _arithmetic,
          "Div": _arithmetic, "Neg": _arithmetic, "Where": _where,
          "Equal": _arithmetic, "Mod": _arithmetic, "ConstantOfShape": _constant_of_shape, "Transpose": _transpose}


def reshape_output_shape(ir: GraphIR, index: int) -> tuple | None:
    """The output shape of Reshape `index` from its target computed at run
    time (None where a dim is not static: a symbolic batch), for when ONNX
    shape inference could not follow the target."""
    node = ir.nodes[index]
    target = SizeEvaluator(ir, {}).port_entries(index, 1)
    source = ir.shape(node.input[0])
    if target is None:
        return None
    dims = []
    for k, entry in enumerate(target):
        if entry.base == 0 and not int(node_attr(node, "allowzero", 0)):
            dims.append(source[k] if source is not None and k < len(source) else None)
        else:
            dims.append(None if entry.base is None or entry.base < 0 else entry.base)
    if -1 in [e.base for e in target] and source is not None and None not in source and dims.count(None) == 1:
        known = int(np.prod([d for d in dims if d is not None]))
        dims[dims.index(None)] = int(np.prod(source)) // known if known else None
    return tuple(dims)


def pad_output_shape(ir: GraphIR, index: int) -> tuple | None:
    """The output shape of Pad `index` (all axes padded) from pads computed at
    run time, where the input's dims and the pads are static."""
    node = ir.nodes[index]
    source = ir.shape(node.input[0])
    if source is None or len(node.input) < 2 or (len(node.input) > 3 and node.input[3]):
        return None
    pads = SizeEvaluator(ir, {}).port_entries(index, 1)
    rank = len(source)
    if pads is None or len(pads) != 2 * rank:
        return None
    return tuple(None if d is None or pads[k].base is None or pads[k + rank].base is None
                 else d + pads[k].base + pads[k + rank].base for k, d in enumerate(source))


# ----------------------------------------------------------------------------
# The check


def check_sizes(ir: GraphIR, group) -> tuple[list[SizeEdit], SizeRefusal | None]:
    """Every size input touched by the growth of `group`: the edits that keep
    them right, or the first size that cannot be kept right."""
    evaluator = SizeEvaluator(ir, group.placements, group.value_edits)
    try:
        sinks, frozen = _dependent_sinks(ir, evaluator)
        sinks |= _group_sinks(ir, group)
        edits = [edit for sink in sorted(sinks) for edit in _sink_edits(ir, evaluator, group, *sink)] + frozen
    except _Refuse as refused:
        return [], refused.refusal
    return edits, None


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
                raise _Refuse(use.node, f"it uses '{tensor}' as data, a size read at run time from a tensor "
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
        raise _Refuse(index, f"its {what} '{node.input[port]}' is computed at run time in a way not followed")
    required = _REQUIRED[node.op_type](ir, ev, group, index, port, actual)
    replaced = []
    for k, (entry, need) in enumerate(zip(actual, required)):
        if need is _ANY or entry.slope == need:
            continue
        if entry.base is None:
            raise _Refuse(index, f"entry {k} of its {what} is read at run time and does not follow the units "
                                 f"(it would have to grow by {need} per unit)" if need else
                                 f"entry {k} of its {what} changes with the units, but this op's data does not")
        replaced.append((k, entry.base, int(need)))
    return [SizeEdit(index, port, tuple(replaced))] if replaced else []


_ANY = object()


def _unit_axis(group, tensor: str):
    placement = group.placements.get(tensor)
    return (None, 0) if placement is None else (placement.axis, placement.growth())


def _required_reshape(ir, ev, group, index, port, actual):
    node = ir.nodes[index]
    axis, growth = _unit_axis(group, node.output[0])
    in_axis, in_growth = _unit_axis(group, node.input[0])
    required = []
    for k, entry in enumerate(actual):
        need = Fraction(growth if k == axis else 0)
        if entry.base == -1 and not entry.depends:
            required.append(_ANY)  # inferred from the element count
        elif entry.base == 0 and not entry.depends and not int(node_attr(node, "allowzero", 0)):
            # copies the input's dim k
            if Fraction(in_growth if k == in_axis else 0) != need:
                raise _Refuse(index, f"entry {k} of its shape copies the input's dim (0), which does not follow "
                                     "the units there")
            required.append(_ANY)
        else:
            required.append(need)
    return required


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
            raise _Refuse(index, f"it changes the unit axis ({placement.length} -> {entry.base} positions)")
        else:
            required.append(Fraction(placement.growth()))
    return required


def _required_tile(ir, ev, group, index, port, actual):
    node = ir.nodes[index]
    axis, _ = _unit_axis(group, node.input[0])
    if axis is not None and axis < len(actual) and (actual[axis].base != 1 or actual[axis].depends):
        raise _Refuse(index, "it repeats the unit axis (or its repeats there are not known to be 1)")
    return [Fraction(0)] * len(actual)


def _required_slice(ir, ev, group, index, port, actual):
    """Bounds on axes other than the unit axis must not change with the units;
    bounds read at run time on the unit axis are refused."""
    node = ir.nodes[index]
    axes = ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(actual))
    if axes is None:
        raise _Refuse(index, "its axes are not constant")
    axis, _ = _unit_axis(group, node.input[0])
    rank = ir.rank(node.input[0])
    for k, a in enumerate(axes):
        if axis is not None and rank is not None and int(a) % rank == axis:
            raise _Refuse(index, "it slices the unit axis with bounds read at run time")
    return [Fraction(0)] * len(actual)


def _required_pad(ir, ev, group, index, port, actual):
    """Pads read at run time (Swin's window padding): 0 on the unit axis."""
    node = ir.nodes[index]
    rank = ir.rank(node.input[0])
    axes = list(range(rank or 0))
    if len(node.input) > 3 and node.input[3]:
        value = ir.const_value(node.input[3])
        if value is None or rank is None:
            raise _Refuse(index, "its axes are not constant")
        axes = [int(a) % rank for a in value]
    axis, _ = _unit_axis(group, node.input[0])
    if axis in axes:
        k, count = axes.index(axis), len(axes)
        if len(actual) != 2 * count or any(actual[i].base != 0 or actual[i].depends for i in (k, k + count)):
            raise _Refuse(index, "it may pad the unit axis (its pads there are read at run time and not known "
                                 "to be 0)")
    return [Fraction(0)] * len(actual)


_REQUIRED = {"Reshape": _required_reshape, "Expand": _required_from_end, "Resize": _required_from_end,
             "Tile": _required_tile, "Slice": _required_slice, "Pad": _required_pad}
