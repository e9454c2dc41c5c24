"""Every weighted layer's unit group in one model, each walk done once.

`groups_by_layer` seeds one walk per space (`find_group`), giving a layer
whose whole output carries a group already found that group; `space_key`
tells groups apart by where each producer holds the units (one layer may
write two spaces: EfficientViT's q | k beside v, MambaOut's gated parts).
Shared by the widening pass and `inspect`.
"""

from __future__ import annotations

from ..ir import GraphIR
from .layers import weighted_layers
from .search import find_group, shares_space
from .units import UnitGroup


def analyse_groups(ir: GraphIR, keep_outputs: bool = False) -> list[UnitGroup]:
    """The group of every weighted layer, each group once (in layer order)."""
    unique = {}
    for group in groups_by_layer(ir, keep_outputs).values():
        unique.setdefault(id(group), group)
    return list(unique.values())


def space_key(ir: GraphIR, group: UnitGroup) -> frozenset:
    """What tells groups apart: their producers, and where each one's output
    holds the units (one layer may write two spaces: EfficientViT's q | k
    beside v; the same space seeded from another layer has the same key)."""
    return frozenset((p, group.placements.get(ir.nodes[p].output[0])) for p in group.producers)


def groups_by_layer(ir: GraphIR, keep_outputs: bool = False) -> dict[int, UnitGroup]:
    """Every weighted layer's group, one walk per group: a layer whose whole
    output carries an ok group already found (`analysis.shares_space`) gets
    that group instead of a walk of its own (on a transformer's residual
    stream, 2 x layers producers share one walk instead of one each)."""
    seen = {}
    for layer in weighted_layers(ir):
        if layer in seen:
            continue
        group = find_group(ir, layer, keep_outputs=keep_outputs)
        seen[layer] = group
        if group.ok:
            for member in group.producers + group.passthrough:
                if shares_space(ir, group, member):
                    seen.setdefault(member, group)
    return {layer: seen[layer] for layer in weighted_layers(ir)}
