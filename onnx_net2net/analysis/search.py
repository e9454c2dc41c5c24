"""The search for a layer's unit group: layouts, norms, then routing.

`find_group` composes the analysis (the one module that does):

1. walk the layer's output units (walk.py with the op rules of rules/) in
   the plain layout, one unit per feature; when a reshape or a split shows
   that the features are structured (whole attention heads, a fused Q/K/V
   projection, grouped-query heads, or, last, a space in some parts of the
   output only, suggested by the cut that refused it (part_layouts.py:
   EfficientViT's q | k beside v, FasterNet's partial conv), walk again in
   that layout, at most MAX_LAYOUT_TRIES layouts, each checked by a full
   walk (a wrong guess is only a refusal); a layout in which a product sums
   over the units (q^T k, contraction.py: one side's copies divided) gives
   way to a later one in which none does (whole heads);
2. check the sizes read at run time from grown tensors (runtime_shapes) and,
   for units normalised together, whether LEMON's average expansion applies
   (normalisation.py);
3. when every layout was refused at an op that only moves channels, try the
   layer's channel routing region (routing.py: shuffles grow as a stage);
4. a depthwise convolution refused otherwise may pass one repeat of a space
   that the layer writing it sees whole (EdgeNeXt's chunk convs), or a space
   of one of that layer's other part layouts (MambaOut's conv over c): it
   takes that layer's group, seeded from itself.

The refusal returned is the plain layout's, with what the structured
layouts and the routing region said (its `causes`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..ir import GraphIR, node_attr
from ..ops import WEIGHTED_LAYERS
from .contraction import divide_contractions, whole_axis_layouts
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
    whole_layer_as_one_unit = found is not None and found.size == 1 and not found.fixed_features and failures
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
            f", repeated {later.repeats}x" if later.repeats > 1 else "") + (
            f" beside {later.fixed_features} other features" if later.fixed_features else "")
        group.refusal = replace(group.refusal, reason=f"{group.refusal.reason}; as {layout}: {later.refusal}",
                                retry=(), causes=group.refusal.causes + (later.refusal,))
    if routing_refusal and group.refusal.has_kind(RefusalKind.CHANNEL_SHUFFLE):
        group.refusal = replace(group.refusal, reason=f"{group.refusal.reason}; as a routing region: {routing_refusal}",
                                causes=group.refusal.causes + (routing_refusal,))
    return group


@dataclass(frozen=True)
class Layout:
    """A guess at how the seed layer's output holds its units: units of
    `unit_width` features, the space repeated `repeats` times along the
    output, or once at each of `starts` in parts of `part` features (the
    rest of the output holding other data: EfficientViT's q | k | v)."""

    unit_width: int = 1
    repeats: int = 1
    starts: tuple[int, ...] = ()
    part: int = 0

    def fits(self, width: int) -> bool:
        if self.starts:
            return self.part % self.unit_width == 0
        return width % (self.unit_width * self.repeats) == 0

    def size(self, width: int) -> int:
        """The number of units of a layer `width` features wide."""
        return (self.part if self.starts else width // self.repeats) // self.unit_width

    def scaled(self, unit_width: int, repeats: int) -> Layout | None:
        """The layout with units `unit_width` times wider, repeated `repeats` times more (None: not with parts)."""
        if self.starts and repeats != 1:
            return None
        return replace(self, unit_width=self.unit_width * unit_width, repeats=self.repeats * repeats)


def _walk_layouts(ir: GraphIR, layer: int, keep_outputs: bool) -> tuple[UnitGroup | None, list[UnitGroup]]:
    """The first layout whose walk succeeds (or None), and the refused ones in the order tried.

    A layout whose units a product contracts (q^T k: contraction.py) gives way
    to a later one in which no product does (whole heads of a multi-head
    attention grow rather than their size)."""
    tried, queue, failures = set(), [Layout()], []
    in_parts = []  # the space in some parts of the output only: the last guesses (most layers fill theirs)
    contracted = None  # the first layout found whose units a product contracts
    width = layer_width(ir, layer)
    while (queue or (in_parts and contracted is None)) and len(tried) < MAX_LAYOUT_TRIES:
        layout = queue.pop(0) if queue else in_parts.pop(0)
        if layout is None or layout in tried or not layout.fits(width):
            continue
        tried.add(layout)
        group = _walk_layout(ir, layer, layout, keep_outputs)
        if group.ok and not group.contractions:
            return group, failures
        if group.ok:
            contracted = contracted or _parts_instead(ir, layer, group, in_parts, keep_outputs) or group
            queue += [layout.scaled(w, r) for w, r in whole_axis_layouts(ir, group)]
            continue
        failures.append(group)
        queue += [layout.scaled(w, r) for w, r in group.refusal.retry]
        queue += [layout.scaled(d, 1) for d in _grouped_heads(group)]
        in_parts += [Layout(repeats=len(parts.starts), starts=parts.starts, part=parts.size)
                     for parts in group.refusal.parts]
    return contracted, failures


def _parts_instead(ir: GraphIR, layer: int, group: UnitGroup, in_parts: list[Layout],
                   keep_outputs: bool) -> UnitGroup | None:
    """A space repeated in every part of a split output that contracts with
    itself (q | k | v of equal sizes, q^T k summing over the units) holds v
    only because the sizes are equal: v's channels may belong to another
    space (EfficientViT's v, a chunk of the stream). The first layout of
    some parts only that also walks is the finer group (q and k alone)."""
    if not group.contractions or group.repeats == 1:
        return None
    for layout in in_parts[:MAX_LAYOUT_TRIES]:
        if len(layout.starts) < 2:
            continue  # a part alone (v of q | k | v) is no finer group of q and k
        finer = _walk_layout(ir, layer, layout, keep_outputs)
        if finer.ok:
            return finer
    return None


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
        for group in _spaces_of(ir, writer, keep_outputs):
            if layer in group.passthrough and group.placements.get(output) == seed_placement(
                    ir, layer, group.unit_width):
                return replace(group, seed=layer, repeats=1, repeat_of=writer, fixed_features=0)
    return None


def _spaces_of(ir: GraphIR, layer: int, keep_outputs: bool):
    """The groups of a layer's output: the one its search finds, then those of
    the other part layouts its refusals suggested (MambaOut's fc1 writes
    [g | i | c]: the head of g pairs with i, its tail with c, two spaces)."""
    found, failures = _walk_layouts(ir, layer, keep_outputs)
    if found is None:
        return
    yield found
    tried = 0
    for failure in failures:
        for parts in failure.refusal.parts:
            if tried >= MAX_LAYOUT_TRIES:
                return
            layout = Layout(repeats=len(parts.starts), starts=parts.starts, part=parts.size)
            tried += 1
            group = _walk_layout(ir, layer, layout, keep_outputs)
            if group.ok and not group.contractions:
                yield group


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


def _grouped_heads(group: UnitGroup) -> list[int]:
    """Heads that another reshape merges in groups (grouped-query attention:
    K/V heads repeated for n_rep query heads each): units of d heads, for the
    small divisors d of the head count (as factors of the unit width)."""
    refusal = group.refusal
    if group.unit_width == 1 or refusal.op != "Reshape" or refusal.kind != RefusalKind.SPLITS_UNIT_AXIS:
        return []
    return [d for d in range(2, 9) if group.size % d == 0 and d < group.size]


def _walk_layout(ir: GraphIR, layer: int, layout: Layout, keep_outputs: bool = False) -> UnitGroup:
    """One walk of the layer's units in `layout`, then the contractions, the
    runtime size and normalisation checks; refusals land in the group."""
    width = layer_width(ir, layer)
    repeats = len(layout.starts) or layout.repeats
    size = layout.size(width)
    group = UnitGroup(seed=layer, size=size, unit_width=layout.unit_width, repeats=repeats,
                      fixed_features=width - size * layout.unit_width * repeats)
    try:
        seed = seed_placement(ir, layer, layout.unit_width, layout.repeats, layout.starts)
        Walk(ir, group, rule_for, keep_outputs).run(ir.nodes[layer].output[0], seed)
        divide_contractions(ir, group)
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
