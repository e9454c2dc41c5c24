"""Channel routing regions: layers whose channels are shuffled, not shared.

ShuffleNetV2 concatenates two branches, interleaves their channels (Reshape
[N, 2, C/2, H, W] -> Transpose -> Reshape), and the next block splits the
result in halves: one half passes on untouched, the other feeds a branch.
Units here are not one space copied everywhere (units.py's model): each
channel is *routed*, and where it ends (which later convolution reads it)
depends on the width. So the whole stage grows together:

* the region: every tensor reachable from the seed layer through routing ops
  (Concat, Split, Slice, Reshape, Transpose, per-channel ops such as Relu,
  BatchNormalization, depthwise Conv, pooling), the weighted layers writing
  into it (all of width h) and the weighted layers reading it;
* the routing, found by running it (routing_simulation.py): a small model
  of the region's routing ops, fed with each channel's label as its value
  (per-channel ops become identities), gives the label at every position a
  reader sees, at the old width h and at a new width h'. Dynamic shapes
  (Shape -> Div -> Reshape, Split by num_outputs) route exactly as they
  will at run time;
* the fate of a channel: the set of reading layers it reaches. At width h',
  every old channel is given a new slot of its writer with the same fate (a
  copy keeps its function), extra slots of a fate copy channels of that fate
  (Net2Net: the readers divide), and slots of a fate no old channel had are
  read with weight 0. A width where some fate has fewer slots than channels
  is refused, and so is a region where a channel reaches a reader at
  several positions (the fate does not count them).

Everything outside the region is untouched, and the result is verified by
the caller like any other widening.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np

from ..ir import GraphIR, node_attr
from ..ops import ELEMENTWISE_UNARY
from .layers import layer_width, seed_placement
from .refusal import Refusal, RefusalKind
from .routing_simulation import Region, Routing, label_of, simulate, simulate_many
from .units import UnitGroup, constant_nbytes

_ROUTING = frozenset("Concat Split Slice Reshape Transpose Flatten Squeeze Unsqueeze".split())


_PER_CHANNEL = frozenset("BatchNormalization MaxPool AveragePool GlobalAveragePool GlobalMaxPool".split())


@dataclass
class RoutedGroup(UnitGroup):
    """A channel routing region seen as a group (see the module docstring)."""

    region: Region | None = None
    old_routing: Routing | None = None
    old_fates: dict | None = None
    feasible: dict[int, str | None] = field(default_factory=dict)     # width -> why not (None: it routes)
    routings: dict[int, Routing] = field(default_factory=dict)         # width -> its routing, once run

    @property
    def exact_only(self) -> bool:
        """Routing regions grow exactly only (no random-pad, no noise)."""
        return True

    def width_refusal(self, ir: GraphIR, width: int) -> str | None:
        """Why the region cannot grow to `width` (None: every channel still
        reaches the layers it reached)."""
        if why := check_width(ir, self, width):
            return (f"its channels are routed to later layers (shuffles, slices) and width {width} would change "
                    f"where they go ({why}); {describe_valid_widths(ir, self)}")
        return None

    def next_width(self, ir: GraphIR, wanted: int) -> int | None:
        """The first width that routes from `wanted` up, else down."""
        return nearest_width(ir, self, wanted)

    def aligned_width(self, ir: GraphIR, multiple: int) -> int | None:
        """The nearest width that routes and is a multiple of `multiple`."""
        aligned = -(-self.width // multiple) * multiple
        return aligned if aligned == self.width else nearest_width(ir, self, aligned, multiple)

    def grown_weight_bytes(self, ir: GraphIR, size: int) -> float:
        """Its writers and readers grow in proportion to the width."""
        layers = self.region.writers + [node for node, _ in self.region.readers]
        return sum(constant_nbytes(ir, ir.nodes[layer].input[1]) for layer in layers) * size / self.size

    def step_notes(self, ir: GraphIR) -> list[str]:
        """The notes `inspect` gives a routing region (and its valid widths)."""
        notes = [f"channel routing region: its {len(self.producers)} layers grow together (shuffles or "
                 "slices route each channel to later layers, and every one must still reach the same layers)"]
        if self.step != 1:
            notes.append(describe_valid_widths(ir, self))
        return notes


_REGIONS: weakref.WeakKeyDictionary[GraphIR, list[RoutedGroup]] = weakref.WeakKeyDictionary()


def find_routed_group(ir: GraphIR, layer: int) -> tuple[RoutedGroup | None, Refusal | None]:
    """The routing region of `layer`, or (None, why it cannot grow as one)."""
    known = _REGIONS.setdefault(ir, [])
    for group in known:
        if layer in group.producers or layer in group.passthrough:
            return group, None
    try:
        region = _discover(ir, layer)
        old = simulate(ir, region, region.width)
        _refuse_repeated_channels(region, old)
    except Refusal as refusal:
        return None, refusal
    group = RoutedGroup(seed=layer, size=region.width, region=region, old_routing=old,
                        producers=list(region.writers),
                        passthrough=[i for i in region.per_channel_tensors(ir) if ir.nodes[i].op_type == "Conv"])
    group.ops = {ir.nodes[i].op_type for i in region.routing}
    for writer in region.writers:
        group.placements[ir.nodes[writer].output[0]] = seed_placement(ir, writer)
    step = _step(ir, group)
    if step is None:
        return None, Refusal(f"no width up to {min(2 * region.width, region.width + MAX_WIDTHS_LISTED)} routes",
                             RefusalKind.NOT_ROUTABLE)
    group.step = step
    known.append(group)
    return group, None


def _refuse_repeated_channels(region: Region, routing: Routing) -> None:
    """A channel reaching a reader at several positions is refused: there
    they hold different values (a per-channel op such as a depthwise
    convolution on one path: GhostNet's concat(x, depthwise(x))), and a
    fate counts the readers a channel reaches, not how often, so a width
    that drops one of the positions would still seem to route."""
    for tensor in sorted(region.reader_tensors):
        labels = routing.labels.get(tensor)
        real = labels[labels > 0] if labels is not None else np.zeros(0)
        if len(np.unique(real)) < len(real):
            raise Refusal(f"a channel reaches '{tensor}' at several positions (through a per-channel op on one "
                          f"path, as in concat(x, depthwise(x))), which the routing does not tell apart",
                          RefusalKind.NOT_ROUTABLE)


def check_width(ir: GraphIR, group: RoutedGroup, width: int) -> str | None:
    """Why the region cannot grow to `width` (None: it can)."""
    if width not in group.feasible:
        prefetch(ir, group, [width])
    return group.feasible[width]


def prefetch(ir: GraphIR, group: RoutedGroup, widths) -> None:
    """Decide many widths (one onnxruntime session for the region: see `simulate_many`)."""
    wanted = [w for w in dict.fromkeys(widths) if w not in group.feasible]
    if not wanted:
        return
    found = simulate_many(ir, group.region, wanted)
    for width in wanted:
        new = found[width]
        try:
            if isinstance(new, Refusal):
                raise new
            assign(group, new, width, np.random.default_rng(0))
            group.routings[width] = new
            group.feasible[width] = None
        except Refusal as refused:
            group.feasible[width] = str(refused)


def _step(ir: GraphIR, group: RoutedGroup) -> int | None:
    """1 when every width tried routes (the next three, 1.5x, 2x); else the
    smallest increment that routes, with `valid_widths` telling the others."""
    h = group.size
    tried = [h + 1, h + 2, h + 3, (3 * h + 1) // 2, 2 * h]
    prefetch(ir, group, tried)
    if all(check_width(ir, group, w) is None for w in tried):
        return 1
    last = min(2 * h, h + MAX_WIDTHS_LISTED)
    for start in range(h + 1, last + 1, _PREFETCH_CHUNK):  # in chunks: the first width that routes ends it
        prefetch(ir, group, range(start, min(start + _PREFETCH_CHUNK, last + 1)))
        if any(group.feasible[w] is None for w in range(start, min(start + _PREFETCH_CHUNK, last + 1))):
            break
    first = next((w for w in range(h + 1, last + 1) if check_width(ir, group, w) is None), None)
    return None if first is None else first - h


_PREFETCH_CHUNK = 8


MAX_WIDTHS_LISTED = 128


def valid_widths(ir: GraphIR, group: RoutedGroup, factor: int = 2) -> list[int]:
    """The widths up to `factor` times the current one (at most
    MAX_WIDTHS_LISTED of them) at which the region routes."""
    last = min(factor * group.size, group.size + MAX_WIDTHS_LISTED)
    prefetch(ir, group, range(group.size + 1, last + 1))
    return [w for w in range(group.size + 1, last + 1) if check_width(ir, group, w) is None]


def nearest_width(ir: GraphIR, group: RoutedGroup, wanted: int, multiple: int = 1) -> int | None:
    """The first width that routes from `wanted` up, else down (multiples of
    `multiple` only), trying at most MAX_WIDTHS_LISTED widths."""
    up = range(wanted, 4 * group.size + 1)
    down = range(wanted - 1, group.size, -1)
    candidates = [w for w in list(up) + list(down) if w % multiple == 0][:MAX_WIDTHS_LISTED]
    prefetch(ir, group, candidates)
    return next((w for w in candidates if check_width(ir, group, w) is None), None)


def describe_valid_widths(ir: GraphIR, group: RoutedGroup) -> str:
    """'widths that route: 57-64 (checked up to 96)'."""
    last = min(2 * group.size, group.size + MAX_WIDTHS_LISTED)
    return f"widths that route: {width_ranges(valid_widths(ir, group)) or 'none'} (checked up to {last})"


def width_ranges(widths: list[int]) -> str:
    """[57, 58, 59, 60, 97] -> '57-60, 97'."""
    runs, start = [], None
    for k, w in enumerate(widths):
        start = w if start is None else start
        if k + 1 == len(widths) or widths[k + 1] != w + 1:
            runs.append(f"{start}-{w}" if w > start else f"{w}")
            start = None
    return ", ".join(runs)


# ----------------------------------------------------------------------------
# Discovery


def _discover(ir: GraphIR, seed: int) -> Region:
    """Every tensor, writer, reader and routing op connected to `seed` (a
    writer, or a depthwise convolution inside the region)."""
    if _is_writer(ir, seed):
        writers, routing = {seed}, set()
    elif _is_routing(ir, seed):
        writers, routing = set(), {seed}
    else:
        raise Refusal("not a plain convolution, dense layer or depthwise convolution", RefusalKind.NOT_ROUTABLE)
    readers, tensors, width = [], set(), layer_width(ir, seed) if writers else None
    queue = [ir.nodes[seed].output[0]] + ([ir.nodes[seed].input[0]] if routing else [])
    while queue:
        tensor = queue.pop()
        if tensor in tensors:
            continue
        tensors.add(tensor)
        if tensor in ir.graph_outputs or tensor in ir.graph_inputs:
            raise Refusal("reaches a graph input or output", RefusalKind.NOT_ROUTABLE)
        producer = ir.producer_node(tensor)
        if producer is not None and producer not in writers and producer not in routing:
            if _is_writer(ir, producer) and ir.nodes[producer].output[0] == tensor:
                width = width or layer_width(ir, producer)
                if layer_width(ir, producer) != width:
                    raise Refusal("writers of different widths", RefusalKind.NOT_ROUTABLE)
                writers.add(producer)
            elif _is_routing(ir, producer):
                routing.add(producer)
                queue += _data_inputs(ir, producer) + [o for o in ir.nodes[producer].output if o]
            else:
                raise Refusal(f"{ir.nodes[producer].op_type} writes into the region", RefusalKind.NOT_ROUTABLE)
        for use in ir.uses(tensor):
            node = ir.nodes[use.node]
            if use.port < 0:
                raise Refusal("read inside a subgraph", RefusalKind.NOT_ROUTABLE)
            if node.op_type in ("Shape", "Size"):
                continue
            if _is_reader(ir, use.node, use.port):
                readers.append((use.node, use.port))
            elif _is_routing(ir, use.node) and tensor in _data_inputs(ir, use.node):
                routing.add(use.node)
                queue += _data_inputs(ir, use.node) + [o for o in node.output if o]
            else:
                raise Refusal(f"{node.op_type} reads the region", RefusalKind.NOT_ROUTABLE)
    if not writers or not readers:
        raise Refusal("no layer writes or reads the region", RefusalKind.NOT_ROUTABLE)
    order = {index: position for position, index in enumerate(ir.topological_order())}
    routing_sorted = sorted(routing, key=order.__getitem__)
    support = _support_nodes(ir, routing_sorted, tensors)
    return Region(sorted(writers, key=order.__getitem__), sorted(set(readers)), routing_sorted,
                  sorted(support, key=order.__getitem__), tensors, width,
                  {ir.nodes[node].input[port] for node, port in readers})


def _is_writer(ir: GraphIR, index: int) -> bool:
    node = ir.nodes[index]
    if len(node.input) < 2 or not ir.is_const(node.input[1]):
        return False
    if node.op_type == "Conv":
        return int(node_attr(node, "group", 1)) == 1
    return node.op_type == "Gemm" and not node_attr(node, "transA", 0)


def _is_reader(ir: GraphIR, index: int, port: int) -> bool:
    return port == 0 and _is_writer(ir, index)


def _is_routing(ir: GraphIR, index: int) -> bool:
    node = ir.nodes[index]
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Conv":
        weight = ir.const_value(node.input[1]) if len(node.input) > 1 else None
        groups = int(node_attr(node, "group", 1))
        return weight is not None and groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1
    if node.op_type in ("Dropout", "BatchNormalization", "MaxPool") and len([o for o in node.output if o]) > 1:
        return False
    return node.op_type in _ROUTING | _PER_CHANNEL or node.op_type in ELEMENTWISE_UNARY


def _data_inputs(ir: GraphIR, index: int) -> list[str]:
    node = ir.nodes[index]
    if node.op_type == "Concat":
        return [name for name in node.input if name]
    return [node.input[0]]


def _support_nodes(ir: GraphIR, routing: list[int], tensors: set[str]) -> set[int]:
    """Nodes computing the non-constant shape inputs of routing ops."""
    support, stack = set(), []
    for index in routing:
        data = set(_data_inputs(ir, index))
        stack += [name for name in ir.nodes[index].input[1:] if name and name not in data and not ir.is_const(name)]
    while stack:
        producer = ir.producer_node(stack.pop())
        if producer is None:
            raise Refusal("a shape input comes from a graph input", RefusalKind.NOT_ROUTABLE)
        if producer in support or producer in routing:
            continue
        support.add(producer)
        node = ir.nodes[producer]
        if node.op_type in ("Shape", "Size"):
            if node.input[0] not in tensors:
                raise Refusal("a shape input reads a tensor outside the region", RefusalKind.NOT_ROUTABLE)
            continue
        stack += [name for name in node.input if name and not ir.is_const(name)]
    return support


# ----------------------------------------------------------------------------
# Assignment: which old channel each new slot carries


@dataclass
class Assignment:
    """For writer k and new slot j: the old channel it copies, or -1 (read
    with weight 0 everywhere)."""

    source: dict[int, np.ndarray]


def assign(group: RoutedGroup, new: Routing, width: int, rng: np.random.Generator,
           replicate: bool = True) -> Assignment:
    """Give every old channel a new slot with the same fate (see the module
    docstring); extra slots copy a channel of their fate (`replicate`) or
    carry nothing (read with weight 0)."""
    region = group.region
    if group.old_fates is None:
        group.old_fates = _fates_from(region, group.old_routing)
    old_fates, new_fates = group.old_fates, _fates_from(region, new)
    source = {}
    for number in range(len(region.writers)):
        by_fate_old: dict[frozenset, list[int]] = {}
        for c in range(region.width):
            by_fate_old.setdefault(old_fates.get(label_of(number, c), frozenset()), []).append(c)
        by_fate_new: dict[frozenset, list[int]] = {}
        for j in range(width):
            by_fate_new.setdefault(new_fates.get(label_of(number, j), frozenset()), []).append(j)
        chosen = np.full(width, -1, dtype=np.int64)
        for fate, channels in by_fate_old.items():
            slots = by_fate_new.get(fate, [])
            if len(slots) < len(channels):
                raise Refusal(f"at width {width}, {len(slots)} channels reach what {len(channels)} did", RefusalKind.NOT_ROUTABLE)
            chosen[slots[:len(channels)]] = channels
            extra = slots[len(channels):]
            if extra and fate and replicate:
                chosen[extra] = rng.choice(channels, size=len(extra))
        source[number] = chosen
    return Assignment(source)


def _fates_from(region: Region, routing: Routing) -> dict[int, frozenset]:
    found: dict[int, set] = {}
    for tensor, labels in routing.labels.items():
        if tensor not in region.reader_tensors:
            continue
        for label in labels:
            found.setdefault(int(label), set()).add(tensor)
    return {label: frozenset(tensors) for label, tensors in found.items()}
