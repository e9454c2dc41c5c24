"""The unit-space analysis: which tensors and weights grow together, or why not.

Modules, each importing only those listed before it:

* refusal.py: `Refusal`, the one error type of the analysis and rewrites;
* units.py: `Placement`, the edits and `UnitGroup` (the group protocol);
* layers.py: weighted layers, their names and widths;
* shape_algebra.py: units through reshapes, slice bounds (pure functions);
* size_evaluator.py, runtime_shapes.py: sizes computed at run time;
* refined_shapes.py: shapes ONNX inference left unknown, computed;
* quantized.py: quantized (QDQ) weights, refused with the reason;
* part_layouts.py: layouts of a space in some parts of an output, suggested
  by the rules that cut through the units;
* walk.py: the walk over the tensors carrying a unit space;
* rules/: the op rules the walk dispatches to, by op family;
* normalisation.py: LEMON's average expansion for normalised units;
* routing_simulation.py, routing.py: channel routing regions (shuffles);
* search.py: `find_group`, composing layouts, norms and routing;
* model_groups.py: every layer's group in one model, each walk done once.
"""

from __future__ import annotations

from .layers import (
    find_layer,
    layer_name,
    layer_output_placement,
    layer_width,
    seed_placement,
    weighted_layers,
)
from .refusal import Refusal, RefusalKind
from .routing import RoutedGroup, describe_valid_widths, nearest_width, valid_widths
from .model_groups import analyse_groups, groups_by_layer, space_key
from .search import find_group, shares_space
from .shape_algebra import map_through_reshape, reshape_segments
from .units import AttributeEdit, Placement, UnitGroup, ValueEdit, WeightEdit

__all__ = [
    "AttributeEdit", "Placement", "Refusal", "RefusalKind", "RoutedGroup", "UnitGroup", "ValueEdit", "WeightEdit",
    "analyse_groups", "describe_valid_widths", "groups_by_layer", "space_key", "find_group", "find_layer", "layer_name", "layer_output_placement", "layer_width",
    "map_through_reshape", "nearest_width", "reshape_segments", "seed_placement", "shares_space", "valid_widths",
    "weighted_layers",
]
