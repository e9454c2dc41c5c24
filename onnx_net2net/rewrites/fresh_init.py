"""`init="fresh"`: new units with fresh incoming and zero outgoing weights.

A new unit j gets incoming weights (and its layer's own bias) drawn from
U(-b, b), b = 1/sqrt(fan_in) of the grown layer (PyTorch's default), and
zero outgoing weights; old units keep theirs and nothing is divided. The
output is unchanged exactly when the new units reach it through their
outgoing weights alone: `fresh_refusal` says why not otherwise (a
normalisation or reduction over the units, an op that could make a fresh
value NaN or infinite). On a contraction's divided side (q^T k) the new
units are zero, so the product does not see them. Per-unit constants other
than a layer's bias (BatchNormalization's parameters and statistics, PReLU
slopes, per-channel scales, embedding columns) are copied from the unit g(j),
as Net2Net does. A layer that both reads and writes the group (a residual
branch) gets fresh entries also where a new unit reads a new unit; a layer
whose input grows in a *later* widening keeps zeros there (still exact).
"""

from __future__ import annotations

import numpy as np

from ..analysis import UnitGroup
from ..ir import GraphIR
from ..ops import WEIGHTED_LAYERS
from .unit_mapping import UnitMapping, repeat_index, unit_slots


#: Ops that may turn a finite input into NaN or infinity (on the input named by the port).
_MAY_NOT_BE_FINITE = {"Log": 0, "Sqrt": 0, "Reciprocal": 0, "Div": 1, "Pow": 0}


def fresh_refusal(ir: GraphIR, group: UnitGroup) -> str | None:
    """Why `init="fresh"` would change the function of this group (None: it
    is exact). Fresh new units carry values unlike any old unit's; they stay
    invisible only if they reach the output through their zero outgoing
    weights alone: not through a normalisation or reduction over the units
    (their statistics would change), nor an op that could make them NaN or
    infinite (0 * NaN is NaN)."""
    for index in list(group.norms) + list(group.reductions):
        node = ir.nodes[index]
        return (f"the units pass {node.op_type} {ir.label(index)}, which takes statistics over them: fresh new "
                "units would change them (use init net2net)")
    if group.tile or group.decomposed_norms:
        return ("a normalisation takes statistics over the units: fresh new units would change them "
                "(use init net2net)")
    for index, node in enumerate(ir.nodes):
        port = _MAY_NOT_BE_FINITE.get(node.op_type)
        if port is None or port >= len(node.input) or node.input[port] not in group.placements:
            continue
        if node.op_type == "Pow" and _integer_exponent(ir, node):
            continue
        return (f"the units reach {node.op_type} {ir.label(index)}, which may make fresh new units NaN or "
                "infinite, and zero outgoing weights do not cancel those (use init net2net)")
    return None


def _integer_exponent(ir: GraphIR, node) -> bool:
    if len(node.input) < 2 or not ir.is_const(node.input[1]):
        return False
    exponent = np.asarray(ir.const_value(node.input[1]), dtype=np.float64)
    return bool(np.all(exponent == np.round(exponent)) and np.all(exponent >= 0))


def fresh_units(ir: GraphIR, by_input: dict, new_values: dict, mapping: UnitMapping,
                 rng: np.random.Generator) -> None:
    """`init="fresh"`: the new units' entries of each producing layer's weight
    and own bias become U(-b, b), b = 1/sqrt(fan_in) of the grown layer
    (PyTorch's default); entries on a contraction's divided side stay zero.
    Drawn in the order of the layers' nodes, weight before bias."""
    from .perturb import bias_tensors, layer_fan_in

    layer_of = {}   # (node, port) -> the weighted layer whose fresh init it takes
    for (node, port) in by_input:
        op = ir.nodes[node].op_type
        if op in WEIGHTED_LAYERS and port in (1, 2) and (port == 1 or op != "MatMul"):
            layer_of[(node, port)] = node
    producers = {node for (node, port) in layer_of if ir.nodes[node].op_type == "MatMul"}
    for layer in producers:   # MatMul -> Add(bias): nn.Linear on 3-D inputs
        weight_shape = ir.const_value(ir.nodes[layer].input[1]).shape
        for tensor in bias_tensors(ir, layer, weight_shape):
            for (node, port) in by_input:
                if ir.nodes[node].input[port] == tensor and ir.nodes[node].op_type == "Add":
                    layer_of[(node, port)] = layer
    for key in sorted(layer_of, key=lambda k: (layer_of[k], k[0] != layer_of[k], k)):
        value = new_values[key]
        if not np.issubdtype(value.dtype, np.floating):
            continue
        layer = layer_of[key]
        weight = new_values.get((layer, 1))
        shape = weight.shape if weight is not None else ir.const_value(ir.nodes[layer].input[1]).shape
        bound = 1.0 / np.sqrt(max(layer_fan_in(ir, layer, shape), 1))
        for edit in by_input[key]:
            if edit.role != "copy" or edit.groups > 1:
                continue
            slots = unit_slots(edit.placement, mapping)
            fresh = (slots >= 0) & mapping.is_new[np.maximum(slots, 0)]
            fresh &= ~np.isin(repeat_index(edit.placement, mapping), edit.divided)
            if not fresh.any():
                continue
            moved = np.moveaxis(value, edit.axis, 0).copy()
            draws = rng.uniform(-bound, bound, size=(int(fresh.sum()),) + moved.shape[1:])
            moved[fresh] = draws.astype(value.dtype)
            value = np.moveaxis(moved, 0, edit.axis)
        new_values[key] = np.ascontiguousarray(value)
