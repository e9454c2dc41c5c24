"""Integer size tensors as affine functions of the units a group gains.

When a unit group grows by D units, every tensor t of the group gains
`growth(t) * D` positions on its unit axis, so an entry of a size vector is an
*affine* function of D:

    entry(D) = base + slope * D

`Shape(t)[axis]` has base = the current length and slope = growth(t); other
dims have slope 0 (their base is unknown for a symbolic batch). Gather,
Slice, Concat, (Un)squeeze, Cast, Identity and a 1-D Reshape move entries;
Add / Sub add them; Mul and Div by a constant scale them; a floor division
that does not divide base and slope exactly makes the slope *irregular*
(known now, but not affine in D). `SizeEvaluator` computes these entries;
`runtime_shapes` uses them to check and fix the size inputs of a grown group.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np
import onnx

from ..ir import GraphIR, node_attr

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
    #: (tensor, axis) when the entry is that tensor's dim read by Shape and
    #: moved unchanged since: a dim unknown statically still equals itself
    #: (a Reshape target [x.shape[0], C, -1] of x keeps x's batch).
    dim_of: tuple[str, int] | None = field(default=None, compare=False)

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


class SizeEvaluator:
    """Entries of integer size tensors as affine functions of the units added.

    `placements` are the group's tensors (name -> Placement); `value_edits`
    the group's edits of constants (a literal that grows with the units);
    `shape_of` answers the shapes of tensors read by Shape ops.
    """

    def __init__(self, ir: GraphIR, placements: dict, value_edits=(), shape_of=None):
        self.ir = ir
        #: tensor -> shape (None: unknown); `GraphIR.shape` unless the caller refines shapes itself
        self.shape_of = shape_of or ir.shape
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
        return [replace(e, slope=None if e.slope is None else e.slope + self.value_edits.get((index, port, k), 0))
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
            if value.dtype.kind not in "iub" or value.ndim > 2:
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
        shape = self.shape_of(tensor)
        if shape is None or len(shape) > 1 or (shape and shape[0] is None):
            return None
        return [Entry(None) for _ in range(shape[0] if shape else 1)]


# -- evaluation rules: each returns the entries of the node's first output


def _shape(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    node = ev.ir.nodes[index]
    shape = ev.shape_of(node.input[0])
    if shape is None:
        return None
    placement = ev.placements.get(node.input[0])
    source = node.input[0]
    dims = [Entry(None if d is None else int(d), dim_of=(source, k)) for k, d in enumerate(shape)]
    if placement is not None and placement.batch:
        dims[placement.axis] = Entry(None, None)  # B x units, B unknown: not affine in the units added
    elif placement is not None:
        dims[placement.axis] = Entry(placement.length, Fraction(placement.growth()), (source, placement.axis))
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


def _one_hot(ev: SizeEvaluator, index: int) -> list[Entry] | None:
    """OneHot of constant indices into a size vector (`x.repeat` exported by
    TorchScript: [1, n, 1, 1, 1] as OneHot([1], 5, [1, n]))."""
    node = ev.ir.nodes[index]
    indices, depth = ev.ir.const_value(node.input[0]), ev.port_entries(index, 1)
    values = ev.port_entries(index, 2)
    if indices is None or indices.ndim > 1 or depth is None or len(depth) != 1 or depth[0].base is None:
        return None
    if values is None or len(values) != 2 or any(v.depends for v in values) or depth[0].depends:
        return None
    if int(node_attr(node, "axis", -1)) not in (-1, indices.ndim):
        return None
    size = depth[0].base
    # index i (or i + depth when negative) is on; one outside [-depth, depth) leaves its row all off
    rows = [[values[1] if -size <= int(i) < size and j == int(i) % size else values[0] for j in range(size)]
            for i in indices.reshape(-1)]
    if indices.ndim == 1:
        ev.shapes[node.output[0]] = (len(rows), size)
    return [entry for row in rows for entry in row]


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
            picked.append(a if a.dim_of == b.dim_of else replace(a, dim_of=None))  # equal sizes, not one dim
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
          "Equal": _arithmetic, "Mod": _arithmetic, "ConstantOfShape": _constant_of_shape, "Transpose": _transpose,
          "OneHot": _one_hot}
