"""The search for a layer's unit group: layouts, norms, then routing.

`find_group` composes the analysis (the one module that does):

1. walk the layer's output units (walk.py with the op rules of rules/) in
   the plain layout, one unit per feature; when a reshape or a split shows
   that the features are structured (whole attention heads, a fused Q/K/V
   projection, grouped-query heads), walk again in that layout, at most
   MAX_LAYOUT_TRIES layouts, each checked by a full walk (a wrong guess is
   only a refusal);
2. check the sizes read at run time from grown tensors (runtime_shapes) and,
   for units normalised together, whether LEMON's average expansion applies
   (normalisation.py);
3. when every layout was refused at an op that only moves channels, try the
   layer's channel routing region (routing.py: shuffles grow as a stage);
4. a depthwise convolution refused otherwise may pass one repeat of a space
   that the layer writing it sees whole (EdgeNeXt's chunk convs): it takes
   that layer's group, seeded from itself.

The refusal returned is the plain layout's, with what the structured
layouts and the routing region said (its `causes`).
"""

from __future__ import annotations

from dataclasses import replace

from ..ir import GraphIR, node_attr
from ..ops import WEIGHTED_LAYERS
from .layers import is_weighted_layer, layer_width, seed_placement
from .normalisation import average_expansion_blocker
from .refined_shapes import refined_shape
from .refusal import Refusal, RefusalKind
from .routing import find_routed_group
from .rules import rule_for
from .runtime_shapes import check_sizes
from .units import UnitGroup
from .walk import Walk

MAX_LAYOUT_TRIES = 8
#: Layers above a depthwise convolution whose spaces it may pass one repeat of, and tensors visited to find them.
MAX_UPSTREAM_LAYERS = 4
MAX_UPSTREAM_VISITS = 64
#: Refusals at ops that only move channels: the layer may belong to a routing
#: region (channel shuffles) that grows as a whole (see routing.py).
_ROUTING_OPS = frozenset("Reshape Transpose Concat Split Slice".split())


def find_group(ir: GraphIR, layer: int, *, keep_outputs: bool = False) -> UnitGroup:
    """The unit space produced by `layer`, with every coupled tensor and edit.

    The first walk takes each output feature as a unit. When a reshape or a
    split shows that the features are structured (whole attention heads, a
    fused Q/K/V projection), the walk starts again with that layout; every
    candidate is checked by a full walk, so a wrong guess is only a refusal.
    `keep_outputs`: graph outputs may carry the units (the rewrite slices them
    back to the original units: `UnitGroup.kept_outputs`).
    """
    found, failures = _walk_layouts(ir, layer, keep_outputs)
    # A layout with the whole layer as one unit grows by doubling only; a routing region, where the
    # plain layout stopped at an op that moves channels, may grow the same layer one channel at a time.
    whole_layer_as_one_unit = found is not None and found.size == 1 and failures
    if found is not None and not whole_layer_as_one_unit:
        return found
    routing_refusal = None
    if any(f.refusal.op in _ROUTING_OPS for f in failures):  # the stage may grow as one routing region
        routed, routing_refusal = find_routed_group(ir, layer)
        if routed is not None:
            return routed
    if found is not None:  # the whole layer as one unit (only doubles and more): no routing region grows finer
        return found
    shared = _space_of_upstream_layer(ir, layer, keep_outputs)
    if shared is not None:
        return shared
    group = failures[0]
    structured = [f for f in failures[1:] if f.size > 1]
    if structured:
        later = structured[0]
        layout = f"{later.size} units of {later.unit_width} features" + (
            f", repeated {later.repeats}x" if later.repeats > 1 else "")
        group.refusal = replace(group.refusal, reason=f"{group.refusal.reason}; as {layout}: {later.refusal}",
                                retry=(), causes=group.refusal.causes + (later.refusal,))
    if routing_refusal and group.refusal.has_kind(RefusalKind.CHANNEL_SHUFFLE):
        group.refusal = replace(group.refusal, reason=f"{group.refusal.reason}; as a routing region: {routing_refusal}",
                                causes=group.refusal.causes + (routing_refusal,))
    return group


def _walk_layouts(ir: GraphIR, layer: int, keep_outputs: bool) -> tuple[UnitGroup | None, list[UnitGroup]]:
    """The first layout whose walk succeeds (or None), and the refused ones in the order tried."""
    tried, queue, failures = set(), [(1, 1)], []
    width = layer_width(ir, layer)
    while queue and len(tried) < MAX_LAYOUT_TRIES:
        unit_width, repeats = queue.pop(0)
        if (unit_width, repeats) in tried or width % (unit_width * repeats):
            continue
        tried.add((unit_width, repeats))
        group = _walk_layout(ir, layer, unit_width, repeats, keep_outputs)
        if group.ok:
            return group, failures
        failures.append(group)
        queue += [(unit_width * w, repeats * r) for w, r in group.refusal.retry]
        queue += _grouped_heads(group)
    return None, failures


def _space_of_upstream_layer(ir: GraphIR, layer: int, keep_outputs: bool) -> UnitGroup | None:
    """A depthwise convolution over one repeat of a space (EdgeNeXt's convs
    over the chunks of a stream that holds its units once per chunk): walked
    from its own output, the chunks look like different units, and only the
    layer writing the whole space sees them as one. That layer's group, when
    this layer passes one repeat of it through, is this layer's group too,
    seeded here (its width is one repeat)."""
    node = ir.nodes[layer]
    if node.op_type != "Conv" or int(node_attr(node, "group", 1)) == 1:
        return None
    output = node.output[0]
    for writer in _upstream_layers(ir, layer, MAX_UPSTREAM_LAYERS):
        group, _ = _walk_layouts(ir, writer, keep_outputs)
        if group is None or layer not in group.passthrough:
            continue
        if group.placements.get(output) == seed_placement(ir, layer, group.unit_width):
            return replace(group, seed=layer, repeats=1, repeat_of=writer)
    return None


def _upstream_layers(ir: GraphIR, layer: int, limit: int) -> list[int]:
    """The nearest weighted layers above `layer`'s data input (breadth first,
    at most `limit`); past a depthwise one too (a chain of them over a chunk),
    since its own search may not see the space either."""
    found, seen = [], set()
    queue = [ir.nodes[layer].input[0]]
    while queue and len(found) < limit and len(seen) < MAX_UPSTREAM_VISITS:
        tensor = queue.pop(0)
        producer = None if tensor in seen or ir.is_const(tensor) else ir.producer_node(tensor)
        seen.add(tensor)
        if producer is None:
            continue
        node = ir.nodes[producer]
        if is_weighted_layer(ir, producer):
            found.append(producer)
            if node.op_type == "Conv" and int(node_attr(node, "group", 1)) > 1:
                queue.append(node.input[0])
            continue
        queue += [name for name in node.input if name]
    return found


def _grouped_heads(group: UnitGroup) -> list[tuple[int, int]]:
    """Heads that another reshape merges in groups (grouped-query attention:
    K/V heads repeated for n_rep query heads each): units of d heads, for the
    small divisors d of the head count."""
    refusal = group.refusal
    if group.unit_width == 1 or refusal.op != "Reshape" or refusal.kind != RefusalKind.SPLITS_UNIT_AXIS:
        return []
    return [(group.unit_width * d, group.repeats) for d in range(2, 9) if group.size % d == 0 and d < group.size]


def _walk_layout(ir: GraphIR, layer: int, unit_width: int, repeats: int, keep_outputs: bool = False) -> UnitGroup:
    """One walk with units of `unit_width` features repeated `repeats` times,
    then the runtime size and normalisation checks; refusals land in the group."""
    width = layer_width(ir, layer)
    group = UnitGroup(seed=layer, size=width // (unit_width * repeats), unit_width=unit_width, repeats=repeats)
    try:
        Walk(ir, group, rule_for, keep_outputs).run(ir.nodes[layer].output[0], seed_placement(ir, layer, unit_width, repeats))
        _deduplicate(group)
        _check_runtime_sizes(ir, group)
        if layer not in group.producers and layer not in group.passthrough:
            raise Refusal.at_layer(ir, layer, "the layer's output units are not its own")
        if not group.producers:
            raise Refusal.at_layer(ir, layer, "no layer produces these units")
        if group.tile:
            group.average_blocker = average_expansion_blocker(ir, group) or _uneven_blocker(group)
            group.average_expansion = group.average_blocker is None
            if group.average_expansion:
                group.step = 1
    except (IndexError, KeyError, TypeError, ValueError) as error:
        # A node that breaks its op's schema: never promise anything about it.
        group.refusal = Refusal.at_layer(ir, layer, f"malformed graph near this layer ({type(error).__name__}: {error})",
                                         RefusalKind.MALFORMED)
    except Refusal as refusal:
        group.refusal = refusal
    return group


def _uneven_blocker(group: UnitGroup) -> str | None:
    """LEMON's extra units are not placed in repeats at uneven offsets (the rewrite averages evenly spaced blocks)."""
    if any(placement.starts for placement in group.placements.values()):
        return "the units repeat at uneven offsets of a concatenation"
    return None


def _check_runtime_sizes(ir: GraphIR, group: UnitGroup) -> None:
    """Sizes read at run time from grown tensors (and size inputs computed at
    run time on the group's ops) must follow the units (see runtime_shapes)."""
    group.size_edits = check_sizes(ir, group, lambda tensor: refined_shape(ir, tensor))


def shares_space(ir: GraphIR, group: UnitGroup, layer: int) -> bool:
    """Whether the group seeded from `layer` would be this same group: the
    layer's whole output carries the units (not a slice of a wider tensor)."""
    if layer not in group.producers and layer not in group.passthrough:
        return False
    if ir.nodes[layer].op_type not in WEIGHTED_LAYERS:
        return False  # an embedding table (Gather) is no layer of its own
    placement = group.placements.get(ir.nodes[layer].output[0])
    try:
        own = seed_placement(ir, layer, group.unit_width, group.repeats)
    except Refusal:
        return False
    return placement == own and layer_width(ir, layer) == group.width


def _deduplicate(group: UnitGroup) -> None:
    """A node reached from several of its ports records its edits once."""
    for name in ("producers", "passthrough", "weight_edits", "value_edits", "attribute_edits", "norms",
                 "reductions"):
        setattr(group, name, list(dict.fromkeys(getattr(group, name))))
