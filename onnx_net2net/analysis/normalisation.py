"""LEMON's average expansion: normalised units at any width (Wang et al., 2023).

Widen n units to q = k*n + r: units j < k*n copy unit j mod n, and the r
extra units carry the mean of the n units. A LayerNorm input
x' = [x, .., x, mean(x), ..] then has the same mean mu and the variance
s * var(x), s = k*n / q, so with epsilon * s and Scale * sqrt(s) every copy
normalises exactly as before; the extras normalise to 0 (B = 0 there) and
their readers give them weight 0. For an RMS norm the extras carry zero: the
mean square becomes s times smaller and the same epsilon and Scale rule holds.

The extras carry the mean (or zero) only if every op from the producers up to
each norm keeps them there: sums, shared (broadcast) scales, layout ops and
producers whose extra rows are the mean of their rows. This module decides
that for a group found by the walk (search.py), for fused norms (LayerNormalization,
RMSNormalization) and for norms written out as ops:

    LayerNorm: mu = ReduceMean(x); d = x - mu; v = ReduceMean(d^2)
    RMSNorm:   d = x;              v = ReduceMean(d^2)
    both:      y = d / Sqrt(v + eps) * gamma (+ beta)

A group normalisation (statistics over the units and positions together:
GroupNorm with one group) is not averaged: extras carrying the mean of the
units at each position keep the mean but not the variance.

(d^2 as Pow(d, 2) or Mul(d, d); the division as Div, or Mul by Reciprocal).
There eps is a constant the rewrite scales by s, gamma the scale it
multiplies by sqrt(s), beta the shift that is 0 on the extras.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..ir import GraphIR, node_attr
from ..storage import FLOAT_TYPES
from .units import Placement, UnitGroup


@dataclass(frozen=True)
class DecomposedNorm:
    """A normalisation written out as ops (see the module docstring)."""

    kind: str                         # "LayerNormalization" or "RMSNormalization"
    source: str                       # x, the normalised tensor
    reductions: tuple[int, ...]       # its ReduceMean nodes
    epsilon: tuple[int, int]          # (node, port) of the eps constant
    scale: tuple[int, int]            # (node, port) of gamma
    shift: tuple[int, int] | None     # (node, port) of beta
    output: int                       # the node computing y


_AVERAGE_SAFE = frozenset("""
    Add Sub Identity Dropout Reshape Flatten Squeeze Unsqueeze Transpose Concat Slice Split Gather Expand Pad
    AveragePool GlobalAveragePool Mul Div
""".split())


#: Per-unit ops with f(0) = 0: zero extras stay zero through them.
_ZERO_AT_ZERO = frozenset("""
    Relu LeakyRelu Tanh Gelu Erf Neg Abs Elu Selu Celu Mish HardSwish Softsign Sin Sinh Asinh Atan Atanh
    ThresholdedRelu
""".split())


def average_expansion_blocker(ir: GraphIR, group: UnitGroup) -> str | None:
    """Why LEMON's average expansion cannot be used for this group (None: it
    can). Sets `group.extras` (what the extra units carry) and
    `group.decomposed_norms`, and gives their gamma / beta edits the norm roles."""
    if group.unit_width != 1:
        return "the units are whole attention heads"
    if group.repeats != 1:
        return f"the units repeat {group.repeats}x along the output"
    if group.step != group.size:
        return "the units come in grouped-convolution groups"
    grouped = [norm for norm in group.norms if ir.nodes[norm].op_type == "InstanceNormalization"]
    if grouped:
        return (f"{ir.nodes[grouped[0]].op_type} {ir.label(grouped[0])} normalises the units together with their "
                "positions (a group normalisation): extra units carrying the mean of the units at each position "
                "would change its variance")
    decomposed, unmatched = _decomposed_norms(ir, group)
    if unmatched is not None:
        return (f"{ir.nodes[unmatched].op_type} {ir.label(unmatched)} takes statistics over the units outside a "
                "normalisation (or in a form this tool does not recognise)")
    if any(dn.scale is None for dn in decomposed):
        return "a normalisation written as ops has no scale after it (the rewrite multiplies it by sqrt(s))"
    kinds = {ir.nodes[norm].op_type for norm in group.norms} | {dn.kind for dn in decomposed}
    if len(kinds) > 1:
        return "both LayerNorms (extra units must carry the mean) and RMSNorms (extra units must be zero) " \
               "normalise these units"
    group.extras = "zero" if kinds == {"RMSNormalization"} else "mean"
    sources = [ir.nodes[norm].input[0] for norm in group.norms] + [dn.source for dn in decomposed]
    if any(group.placements[source].outer != 1 for source in sources):
        return "a normalisation takes the units repeated in several blocks together (patch merging): only " \
               "widths that copy every unit equally often keep its statistics"
    if group.extras == "mean" and any(group.placements[source].inner != 1 for source in sources):
        return "a normalisation takes each unit's several features together with the others (the mean of the " \
               "units would differ from the mean of the features)"
    ends = set(group.norms) | {dn.output for dn in decomposed}
    inside = {index for dn in decomposed for index in _nodes_between(ir, dn)}
    writers = set(group.producers)
    frontier = list(sources)
    seen = set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        found = ir.producer.get(tensor)
        if found is None or ir.is_const(tensor):
            continue  # a constant carrying the units: its extras get the mean (or zero)
        index = found[0]
        if index in writers:
            continue
        if index in inside and index not in ends:
            return f"a normalisation's inner op {ir.label(index)} feeds another normalisation"
        reason = _blocks_extras(ir, group, index, ends)
        if reason:
            return reason
        if index not in ends:  # an RMS norm's extras are zero again: the walk stops there
            frontier += [name for name in ir.nodes[index].input if name in group.placements]
    group.decomposed_norms = decomposed
    _give_norm_roles(group, decomposed)
    return None


def _blocks_extras(ir: GraphIR, group: UnitGroup, index: int, ends: set[int]) -> str | None:
    """Why the op at `index` (before a normalisation) would not keep the extra
    units at the mean (LayerNorm) or at zero (RMSNorm)."""
    node, label = ir.nodes[index], f"{ir.nodes[index].op_type} {ir.label(index)}"
    zero = group.extras == "zero"
    if index in ends:
        return None if zero else (f"the output of the normalisation ending at {ir.label(index)} feeds another "
                                  "normalisation (post-norm): its extra units would not carry the mean")
    if zero and node.op_type in _ZERO_AT_ZERO:
        return None
    if node.op_type not in _AVERAGE_SAFE and not _float_cast(node):
        return f"{label} acts on the units before a normalisation and does not commute with averaging them"
    if not all(_fills_axis(group, group.placements[name]) for name in list(node.input) + list(node.output)
               if name in group.placements):
        return f"{label} mixes the units with other data before a normalisation"
    spaced = [port for port, name in enumerate(node.input) if name and name in group.placements]
    per_unit = [port for port in range(len(node.input)) if port not in spaced and _edits_port(group, index, port)]
    shared = [port for port, name in enumerate(node.input) if name and port not in spaced + per_unit]
    if node.op_type == "Div" and spaced != [0]:
        return f"{label} divides by the units"
    if node.op_type == "Div" and per_unit and zero:
        return f"{label} divides each unit by its own factor (the zero extras would become 0/0)"
    if node.op_type in ("Mul", "Div") and not zero and (len(spaced) > 1 or per_unit):
        return f"{label} scales each unit by its own factor before a normalisation"
    if node.op_type in ("Add", "Sub") and zero and shared:
        return f"{label} adds the same value to every unit, so the extra units would not stay zero"
    if node.op_type == "Pad" and zero and node_attr(node, "mode", b"constant") in (b"constant", "constant") \
            and len(node.input) > 2 and node.input[2] and np.any(ir.const_value(node.input[2]) != 0):
        return f"{label} pads with a value that is not zero, so the extra units would not stay zero"
    return None


def _float_cast(node) -> bool:
    return node.op_type == "Cast" and node_attr(node, "to") in FLOAT_TYPES




def _fills_axis(group: UnitGroup, placement: Placement) -> bool:
    return placement.offset == 0 and placement.outer == 1 and group.size * placement.inner == placement.length


def _edits_port(group: UnitGroup, node: int, port: int) -> bool:
    return any(edit.node == node and edit.port == port for edit in group.weight_edits)


# ----------------------------------------------------------------------------
# Normalisations written out as ops


def _decomposed_norms(ir: GraphIR, group: UnitGroup) -> tuple[list[DecomposedNorm], int | None]:
    """The decomposed norms of the group, and a reduction over the units that
    is not part of one (None when every one is)."""
    found, covered = [], set()
    for reduction in group.reductions:
        norm = _match_from_variance(ir, group, reduction)
        if norm is not None and norm not in found:
            found.append(norm)
            covered |= set(norm.reductions)
    for reduction in group.reductions:
        if reduction not in covered:
            return found, reduction
    return found, None


def _match_from_variance(ir: GraphIR, group: UnitGroup, reduction: int) -> DecomposedNorm | None:
    """v = ReduceMean(d^2) -> Sqrt(v + eps) -> d / that (-> * gamma (+ beta))."""
    node = ir.nodes[reduction]
    if node.op_type != "ReduceMean" or not int(node_attr(node, "keepdims", 1)):
        return None
    d = _squared(ir, node.input[0])
    epsilon = _only_use(ir, node.output[0], "Add")
    if d is None or epsilon is None:
        return None
    eps_port = _constant_port(ir, epsilon, node.output[0])
    sqrt = _only_use(ir, ir.nodes[epsilon].output[0], "Sqrt")
    if eps_port is None or ir.const_value(ir.nodes[epsilon].input[eps_port]).size != 1 or sqrt is None:
        return None
    normalised = _divided(ir, d, ir.nodes[sqrt].output[0])
    if normalised is None:
        return None
    kind, source, reductions = "RMSNormalization", d, (reduction,)
    sub = ir.producer_node(d)
    if sub is not None and ir.nodes[sub].op_type == "Sub":  # d = x - ReduceMean(x): a LayerNorm
        x, mean = ir.nodes[sub].input[0], ir.producer_node(ir.nodes[sub].input[1])
        if mean in group.reductions and ir.nodes[mean].input[0] == x:
            kind, source, reductions = "LayerNormalization", x, (mean, reduction)
    output, scale, shift = normalised, None, None
    mul = _only_use(ir, ir.nodes[output].output[0], "Mul")
    if mul is not None and _edited_port(group, mul) is not None:
        scale, output = (mul, _edited_port(group, mul)), mul
        add = _only_use(ir, ir.nodes[output].output[0], "Add")
        if add is not None and _edited_port(group, add) is not None:
            shift, output = (add, _edited_port(group, add)), add
    return DecomposedNorm(kind, source, reductions, (epsilon, eps_port), scale, shift, output)


def _squared(ir: GraphIR, tensor: str) -> str | None:
    """d when `tensor` is Pow(d, 2) or Mul(d, d)."""
    producer = ir.producer_node(tensor)
    if producer is None:
        return None
    node = ir.nodes[producer]
    if node.op_type == "Pow" and ir.is_const(node.input[1]) and np.all(ir.const_value(node.input[1]) == 2):
        return node.input[0]
    if node.op_type == "Mul" and node.input[0] == node.input[1]:
        return node.input[0]
    return None


def _divided(ir: GraphIR, d: str, sigma: str) -> int | None:
    """The node computing d / sigma (Div, or Mul by Reciprocal(sigma))."""
    for use in ir.uses(sigma):
        node = ir.nodes[use.node]
        if node.op_type == "Div" and use.port == 1 and node.input[0] == d:
            return use.node
        if node.op_type == "Reciprocal":
            for inner in ir.uses(node.output[0]):
                other = ir.nodes[inner.node]
                if other.op_type == "Mul" and other.input[1 - inner.port] == d:
                    return inner.node
    return None


def _only_use(ir: GraphIR, tensor: str, op_type: str) -> int | None:
    uses = ir.uses(tensor)
    if len(uses) == 1 and ir.nodes[uses[0].node].op_type == op_type:
        return uses[0].node
    return None


def _constant_port(ir: GraphIR, index: int, data: str) -> int | None:
    node = ir.nodes[index]
    for port, name in enumerate(node.input):
        if name != data and ir.is_const(name):
            return port
    return None


def _edited_port(group: UnitGroup, index: int) -> int | None:
    """The port of a per-unit constant (gamma, beta) the walk edits on this node."""
    ports = [edit.port for edit in group.weight_edits if edit.node == index]
    return ports[0] if len(ports) == 1 else None


def _nodes_between(ir: GraphIR, norm: DecomposedNorm) -> set[int]:
    """The norm's own nodes from its reductions to its output."""
    inside, stack = set(), [norm.output]
    sources = set(norm.reductions)
    while stack:
        index = stack.pop()
        if index in inside:
            continue
        inside.add(index)
        if index in sources:
            continue
        for name in ir.nodes[index].input:
            producer = ir.producer_node(name)
            if producer is not None and name != norm.source:
                stack.append(producer)
    return inside


def _give_norm_roles(group: UnitGroup, decomposed: list[DecomposedNorm]) -> None:
    roles = {}
    for norm in decomposed:
        roles[norm.scale] = "norm-scale"
        if norm.shift is not None:
            roles[norm.shift] = "norm-bias"
    group.weight_edits = [replace(edit, role=roles[(edit.node, edit.port)]) if (edit.node, edit.port) in roles
                          else edit for edit in group.weight_edits]
