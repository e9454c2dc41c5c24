"""Growth dispatch: widen a group by the rewrite that fits its kind.

A unit group (analysis.units.UnitGroup) grows by Net2WiderNet's copy and
split (wider.py); a channel routing region (analysis.routing.RoutedGroup)
grows by assigning every old channel a slot with the same fate (routed.py).
Callers hold either and call `grow_group`.
"""

from __future__ import annotations

from functools import singledispatch

from ..analysis import RoutedGroup, UnitGroup
from ..ir import GraphIR
from . import routed, wider
from .wider import GrownGroup, WidenOptions


@singledispatch
def grow_group(group: UnitGroup, ir: GraphIR, size: int, options: WidenOptions, layer_names: list[str]) -> GrownGroup:
    """Grow `group` of `ir` to `size` units, in place; what changed."""
    return wider.widen_group(ir, group, size, options, layer_names)


@grow_group.register
def _(group: RoutedGroup, ir: GraphIR, size: int, options: WidenOptions, layer_names: list[str]) -> GrownGroup:
    return routed.widen_routed(ir, group, size, options, layer_names)
