"""Unit spaces: which tensors and weights must grow together, and why not.

Widening a layer adds units to its output. Every tensor that carries those
units (after activations, normalisation, pooling, residual additions,
concatenations, flattening...) carries the same *unit space* S, and every
weight that produces or consumes S must be rewritten with one mapping g.
This module finds that whole group by walking the graph from the layer's
output, in both directions, op by op.

A `Placement` says where the n units of S sit on one axis of a tensor. The
axis is `outer` repetitions of a block; in every block unit u occupies the
`inner` consecutive positions starting at `offset + u * inner`:

* a Conv output [N, C, H, W]:           axis 1, offset 0, inner 1, outer 1
* after Concat at channel offset k:      offset k
* Flatten of NCHW into [N, C*H*W]:       inner H*W (each channel is a block)
* Transpose to NHWC, then Flatten:       inner 1, outer H*W (feature p*C + c)
* a depthwise Conv with multiplier m:    inner m

The walk produces `Edit`s that the rewrites apply; it never changes the model.
Anything it does not understand exactly stops the walk with a `Refusal` that
names the op and the reason: a refusal is always preferred to a wrong answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .ir import GraphIR, node_attr

# Ops that act on each element independently (all data ports share the placement).
ELEMENTWISE_UNARY = frozenset("""
    Relu LeakyRelu Sigmoid Tanh Gelu Erf Elu Selu Celu Softplus Softsign HardSigmoid
    HardSwish Mish ThresholdedRelu Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round
    Sign Sin Cos Tan Sinh Cosh Asin Acos Atan Asinh Acosh Atanh Identity Cast CastLike
    Dropout Not IsNaN IsInf Shrink Clip Bernoulli
""".split())
# Ops whose inputs broadcast against each other elementwise.
ELEMENTWISE_NARY = frozenset("""
    Add Sub Mul Div Pow Max Min Sum Mean Mod Where Equal Less LessOrEqual Greater
    GreaterOrEqual And Or Xor BitShift PRelu
""".split())
POOLING = frozenset("""
    MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool
""".split())
REDUCTIONS = frozenset("""
    ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceSumSquare
""".split())
RESHAPES = frozenset("Flatten Reshape Squeeze Unsqueeze".split())
WEIGHTED_LAYERS = frozenset("Conv ConvTranspose Gemm MatMul".split())


@dataclass(frozen=True)
class Placement:
    """Where the units of a space sit on one axis of a tensor (see module doc)."""

    axis: int
    rank: int
    length: int
    offset: int = 0
    inner: int = 1
    outer: int = 1

    @property
    def block(self) -> int:
        return self.length // self.outer

    def on_axis(self, axis: int, rank: int) -> "Placement":
        return replace(self, axis=axis, rank=rank)

    def growth(self) -> int:
        """Positions added on the axis per unit added to the space."""
        return self.inner * self.outer


@dataclass(frozen=True)
class WeightEdit:
    """Rewrite the constant at `node.input[port]` along `axis`.

    `role` is "copy" for a producer (new unit j copies unit g(j)) and "split"
    for a consumer (slot j takes slot g(j)'s weights divided among its copies).
    """

    node: int
    port: int
    axis: int
    placement: Placement
    role: str
    groups: int = 1


@dataclass(frozen=True)
class ValueEdit:
    """Add `per_unit * (q - n)` to element `index` of the constant at
    `node.input[port]` (a Reshape shape, Split sizes, Slice ends)."""

    node: int
    port: int
    index: int
    per_unit: int


@dataclass(frozen=True)
class AttributeEdit:
    """Add `per_unit * (q - n)` to an integer attribute (depthwise `group`)."""

    node: int
    name: str
    per_unit: int


@dataclass
class Refusal:
    """Why a group cannot grow: the op, the node and the reason."""

    node: str | None
    reason: str
    op: str | None = None           # the op type of the node that refused, when one did
    #: Other unit layouts worth a walk, as factors (features per unit, repeats)
    #: of the current one: a reshape into [heads, head size] suggests whole
    #: heads; an even Split of the whole space suggests one space repeated.
    retry: tuple[tuple[int, int], ...] = ()

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}" if self.node else self.reason


class _Refused(Exception):
    def __init__(self, refusal: Refusal):
        super().__init__(str(refusal))
        self.refusal = refusal


@dataclass
class UnitGroup:
    """A unit space and everything that must change when it grows.

    Attributes:
        seed: the node index of the layer the walk started from.
        size: n, the current number of units.
        placements: every tensor carrying the space, with its placement.
        producers: node indices of the weighted layers whose output is the space.
        passthrough: weighted layers that act per unit inside the space
            (depthwise convolutions): they grow with it.
        weight_edits, value_edits, attribute_edits: what the rewrite changes.
        step: valid new sizes are size + k * step.
        refusal: set when the group cannot grow exactly.
        dynamic_shapes: the space's size is also read at run time (Shape ops).
        ops: the op types the walk went through.
        unit_width: features per unit: 1, or the head size when the units are
            attention heads (the space is split into [heads, head size]).
        repeats: how often the space repeats along the seed layer's output
            (3 for a fused Q/K/V projection: [q heads | k heads | v heads]).
        tile: statistics are taken over the units (a normalisation): every
            unit must be copied equally often, new sizes are multiples of the
            size, unless `average_expansion` allows any size.
        norms: the LayerNormalization / RMSNormalization nodes normalising
            over the units.
        reductions: the Reduce nodes taking statistics over the units.
        decomposed_norms: normalisations written with ReduceMean .. Sqrt
            (normalisation.DecomposedNorm), found when deciding on LEMON.
        average_expansion: LEMON's average expansion keeps the function at
            any width (extra units carry the mean of the units up to every
            LayerNormalization, or zero up to every RMSNormalization);
            `average_blocker` says why not otherwise.
        extras: what the extra units carry, "mean" or "zero".
        kept_outputs: graph outputs carrying the units (only when asked for):
            the rewrite slices them back to the original units.
        size_edits: entries of size inputs computed at run time that become
            constants following the growth (runtime_shapes.SizeEdit).
    """

    seed: int
    size: int
    placements: dict[str, Placement] = field(default_factory=dict)
    producers: list[int] = field(default_factory=list)
    passthrough: list[int] = field(default_factory=list)
    weight_edits: list[WeightEdit] = field(default_factory=list)
    value_edits: list[ValueEdit] = field(default_factory=list)
    attribute_edits: list[AttributeEdit] = field(default_factory=list)
    step: int = 1
    refusal: Refusal | None = None
    dynamic_shapes: bool = False
    ops: set[str] = field(default_factory=set)
    unit_width: int = 1
    repeats: int = 1
    tile: bool = False
    norms: list[int] = field(default_factory=list)
    reductions: list[int] = field(default_factory=list)
    decomposed_norms: list = field(default_factory=list)
    average_expansion: bool = False
    average_blocker: str | None = None
    extras: str = "mean"
    size_edits: list = field(default_factory=list)
    kept_outputs: dict[str, Placement] = field(default_factory=dict)

    @property
    def features_per_unit(self) -> int:
        """Output features of the seed layer per unit."""
        return self.unit_width * self.repeats

    @property
    def width(self) -> int:
        """The seed layer's width in features (units times features per unit)."""
        return self.size * self.features_per_unit

    @property
    def feature_step(self) -> int:
        return self.step * self.features_per_unit

    @property
    def ok(self) -> bool:
        return self.refusal is None


# ----------------------------------------------------------------------------
# Layers


def weighted_layers(ir: GraphIR) -> list[int]:
    """Node indices of Conv, ConvTranspose, Gemm, and MatMul with a constant weight."""
    found = []
    for index, node in enumerate(ir.nodes):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 1 and ir.is_const(node.input[1]):
            found.append(index)
        elif node.op_type == "MatMul" and ir.is_const(node.input[1]) and not ir.is_const(node.input[0]):
            found.append(index)
    return found


def layer_name(ir: GraphIR, index: int) -> str:
    """The name users give a layer: the node name, else its weight's name."""
    node = ir.nodes[index]
    return node.name or node.input[1]


def find_layer(ir: GraphIR, name: str) -> int | None:
    """The weighted layer called `name` (node name or weight initializer name)."""
    layers = weighted_layers(ir)
    for index in layers:
        if ir.nodes[index].name == name:
            return index
    for index in layers:
        if ir.nodes[index].input[1] == name:
            return index
    return None


def layer_width(ir: GraphIR, index: int) -> int:
    """The number of output units of a weighted layer."""
    node = ir.nodes[index]
    weight = ir.shape(node.input[1]) or ir.const_value(node.input[1]).shape
    if node.op_type == "Conv":
        return int(weight[0])
    if node.op_type == "ConvTranspose":
        return int(weight[1]) * int(node_attr(node, "group", 1))
    if node.op_type == "Gemm":
        return int(weight[0] if node_attr(node, "transB", 0) else weight[1])
    return int(weight[-1])


def layer_output_placement(ir: GraphIR, index: int) -> Placement:
    node = ir.nodes[index]
    output = node.output[0]
    rank = ir.rank(output)
    if rank is None:
        raise _Refused(Refusal(ir.label(index), f"the rank of output '{output}' is unknown"))
    axis = rank - 1 if node.op_type in ("MatMul", "Gemm") else 1
    return Placement(axis=axis, rank=rank, length=layer_width(ir, index))


# ----------------------------------------------------------------------------
# The walk


MAX_LAYOUT_TRIES = 8
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
    tried, queue, failures = set(), [(1, 1)], []
    width = layer_width(ir, layer)
    while queue and len(tried) < MAX_LAYOUT_TRIES:
        unit_width, repeats = queue.pop(0)
        if (unit_width, repeats) in tried or width % (unit_width * repeats):
            continue
        tried.add((unit_width, repeats))
        group = _walk_layout(ir, layer, unit_width, repeats, keep_outputs)
        if group.ok:
            return group
        failures.append(group)
        queue += [(unit_width * w, repeats * r) for w, r in group.refusal.retry]
        queue += _grouped_heads(group)
    routing_refusal = None
    if any(f.refusal.op in _ROUTING_OPS for f in failures):
        from .routing import find_routed_group  # the stage grows as one routing region

        routed, routing_refusal = find_routed_group(ir, layer)
        if routed is not None:
            return routed
    group = failures[0]
    structured = [f for f in failures[1:] if f.size > 1]
    if structured:
        later = structured[0]
        layout = f"{later.size} units of {later.unit_width} features" + (
            f", repeated {later.repeats}x" if later.repeats > 1 else "")
        group.refusal = replace(group.refusal, reason=f"{group.refusal.reason}; as {layout}: {later.refusal}",
                                retry=())
    if routing_refusal and "channel shuffle" in group.refusal.reason:
        group.refusal = replace(group.refusal, reason=f"{group.refusal.reason}; as a routing region: {routing_refusal}")
    return group


def _grouped_heads(group: UnitGroup) -> list[tuple[int, int]]:
    """Heads that another reshape merges in groups (grouped-query attention:
    K/V heads repeated for n_rep query heads each): units of d heads, for the
    small divisors d of the head count."""
    refusal = group.refusal
    if group.unit_width == 1 or refusal.op != "Reshape" or "splits the unit axis" not in refusal.reason:
        return []
    return [(group.unit_width * d, group.repeats) for d in range(2, 9) if group.size % d == 0 and d < group.size]


def _walk_layout(ir: GraphIR, layer: int, unit_width: int, repeats: int, keep_outputs: bool = False) -> UnitGroup:
    width = layer_width(ir, layer)
    group = UnitGroup(seed=layer, size=width // (unit_width * repeats), unit_width=unit_width, repeats=repeats)
    try:
        _Walk(ir, group, keep_outputs).run(ir.nodes[layer].output[0], seed_placement(ir, layer, unit_width, repeats))
        _deduplicate(group)
        _check_runtime_sizes(ir, group)
        if layer not in group.producers and layer not in group.passthrough:
            raise _Refused(Refusal(ir.label(layer), "the layer's output units are not its own"))
        if not group.producers:
            raise _Refused(Refusal(ir.label(layer), "no layer produces these units"))
        if group.tile:
            from .normalisation import average_expansion_blocker

            group.average_blocker = average_expansion_blocker(ir, group)
            group.average_expansion = group.average_blocker is None
            if group.average_expansion:
                group.step = 1
    except (IndexError, KeyError, TypeError, ValueError) as error:
        # A node that breaks its op's schema: never promise anything about it.
        group.refusal = Refusal(ir.label(layer), f"malformed graph near this layer ({type(error).__name__}: {error})")
    except _Refused as refused:
        group.refusal = refused.refusal
    return group


def _check_runtime_sizes(ir: GraphIR, group: UnitGroup) -> None:
    """Sizes read at run time from grown tensors (and size inputs computed at
    run time on the group's ops) must follow the units (see runtime_shapes)."""
    from .runtime_shapes import check_sizes

    edits, refusal = check_sizes(ir, group)
    if refusal is not None:
        node = ir.nodes[refusal.node]
        raise _Refused(Refusal(f"{node.op_type} {ir.label(refusal.node)}", refusal.reason, node.op_type))
    group.size_edits = edits


def seed_placement(ir: GraphIR, layer: int, unit_width: int = 1, repeats: int = 1) -> Placement:
    return replace(layer_output_placement(ir, layer), inner=unit_width, outer=repeats)


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
    except _Refused:
        return False
    return placement == own and layer_width(ir, layer) == group.width


def _deduplicate(group: UnitGroup) -> None:
    """A node reached from several of its ports records its edits once."""
    for name in ("producers", "passthrough", "weight_edits", "value_edits", "attribute_edits", "norms",
                 "reductions"):
        setattr(group, name, list(dict.fromkeys(getattr(group, name))))


class _Walk:
    """Breadth-first walk over (tensor, placement), dispatching to op rules."""

    def __init__(self, ir: GraphIR, group: UnitGroup, keep_outputs: bool = False):
        self.keep_outputs = keep_outputs
        self.ir = ir
        self.group = group
        self.queue: list[tuple[str, Placement]] = []
        self.visited_ports: set[tuple[int, str, int]] = set()
        self.outputs = set(ir.graph_outputs)
        self.inputs = set(ir.graph_inputs)

    def run(self, tensor: str, placement: Placement) -> None:
        self.add(tensor, placement)
        while self.queue:
            tensor, placement = self.queue.pop(0)
            self.visit(tensor, placement)

    def add(self, tensor: str, placement: Placement) -> None:
        shape = self.ir.shapes.get(tensor)  # as inferred; no extra inference here
        if shape is not None and (len(shape) != placement.rank or
                                  shape[placement.axis] not in (None, placement.length)):
            raise _Refused(Refusal(None, f"tensor '{tensor}' does not have the layout the walk expects "
                                         f"({placement.length} positions on axis {placement.axis} of {shape})"))
        known = self.group.placements.get(tensor)
        if known is not None:
            if known != placement:
                raise _Refused(Refusal(None, f"tensor '{tensor}' carries the units in two different layouts"))
            return
        self.group.placements[tensor] = placement
        self.queue.append((tensor, placement))

    def visit(self, tensor: str, placement: Placement) -> None:
        if tensor in self.outputs and self.keep_outputs:
            self.group.kept_outputs[tensor] = placement
        elif tensor in self.outputs:
            raise _Refused(Refusal(None, f"the units reach graph output '{tensor}' (its shape would change)"))
        if tensor in self.inputs:
            raise _Refused(Refusal(None, f"the units reach graph input '{tensor}' (its shape would change)"))
        if self.ir.is_const(tensor):
            # A constant carrying the units (a class token, a learned table):
            # its entries are copied like a producer's.
            for use in self.ir.uses(tensor):
                self.group.weight_edits.append(WeightEdit(use.node, use.port, placement.axis, placement, "copy"))
        producer = None if self.ir.is_const(tensor) else self.ir.producer.get(tensor)
        if producer is not None:
            self.dispatch(producer[0], "out", producer[1], placement)
        for use in self.ir.uses(tensor):
            if use.port < 0:
                raise _Refused(Refusal(self.ir.label(use.node),
                                       f"{self.ir.nodes[use.node].op_type} reads '{tensor}' inside a subgraph"))
            self.dispatch(use.node, "in", use.port, placement)

    def dispatch(self, index: int, side: str, port: int, placement: Placement) -> None:
        key = (index, side, port)
        if key in self.visited_ports:
            return
        self.visited_ports.add(key)
        node = self.ir.nodes[index]
        rule = _RULES.get(node.op_type)
        if rule is None:
            for family, family_rule in _FAMILY_RULES:
                if node.op_type in family:
                    rule = family_rule
                    break
        if rule is None or node.domain not in ("", "ai.onnx"):
            self.refuse(index, "this op is not known to act on each unit separately")
        self.group.ops.add(node.op_type)
        rule(self, index, side, port, placement)

    # -- helpers for rules --------------------------------------------------

    def refuse(self, index: int, reason: str, retry: tuple[tuple[int, int], ...] = ()):
        node = self.ir.nodes[index]
        raise _Refused(Refusal(f"{node.op_type} {self.ir.label(index)}", reason, node.op_type, retry))

    def shape(self, index: int, tensor: str) -> tuple:
        shape = self.ir.shape(tensor)
        if shape is None:
            self.refuse(index, f"the shape of '{tensor}' is unknown")
        return shape

    def const(self, index: int, tensor: str, what: str) -> np.ndarray:
        value = self.ir.const_value(tensor)
        producer = self.ir.producer_node(tensor) if value is None else None
        if producer is not None and self.ir.nodes[producer].op_type == "DequantizeLinear":
            self.refuse(index, f"its {what} '{tensor}' is quantized (DequantizeLinear): the consumers' weights "
                               "would have to be divided by the copy count, which int8 values cannot hold exactly")
        if value is None:
            self.refuse(index, f"its {what} '{tensor}' is not a constant")
        return value

    def weight(self, index: int, port: int, axis: int, placement: Placement, role: str, groups: int = 1) -> None:
        node = self.ir.nodes[index]
        if port >= len(node.input) or not node.input[port]:
            return
        self.const(index, node.input[port], "weight")
        self.group.weight_edits.append(WeightEdit(index, port, axis, placement, role, groups))

    def require_blocks(self, index: int, placement: Placement, blocks: int) -> None:
        """The space must split into `blocks` equal blocks (grouped convolution)."""
        group = self.group
        if placement.offset or placement.inner != 1 or placement.outer != 1 or placement.length != group.size:
            self.refuse(index, f"grouped convolution (group={blocks}) over part of a concatenation")
        step = math.lcm(group.step, blocks)
        if group.size % step:
            self.refuse(index, f"grouped convolutions with {group.step} and {blocks} groups do not nest")
        group.step = step

    def same_on_ports(self, index: int, placement: Placement, inputs=(0,), outputs=(0,)) -> None:
        node = self.ir.nodes[index]
        for port in inputs:
            if port < len(node.input) and node.input[port]:
                self.add(node.input[port], placement)
        for port in outputs:
            if port < len(node.output) and node.output[port]:
                self.add(node.output[port], placement)

    def require_channel_axis(self, index: int, placement: Placement, allow_blocks: bool = False) -> None:
        if placement.axis != 1 or placement.rank < 3:
            self.refuse(index, f"the units are on axis {placement.axis}, not the channel axis")
        if placement.outer != 1 or (placement.inner != 1 and not allow_blocks):
            self.refuse(index, "the units are interleaved with other data on the channel axis")


# ----------------------------------------------------------------------------
# Op rules. Each receives the node, the side ("in"/"out") and port where the
# units arrived, and their placement there; it adds the other tensors of the
# space and the edits, or refuses.


def _unary(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, f"the units reach its parameter input {port}")
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] and walk.ir.uses(node.output[1]):
        walk.same_on_ports(index, placement, outputs=(0, 1))
    else:
        walk.same_on_ports(index, placement)


def _pool(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    walk.require_channel_axis(index, placement, allow_blocks=True)
    if len(node.output) > 1 and node.output[1] and walk.ir.uses(node.output[1]):
        walk.refuse(index, "its indices output depends on the channel count")
    walk.same_on_ports(index, placement)


def _batchnorm(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach a statistics input")
    if len([o for o in node.output if o]) > 1 or node_attr(node, "training_mode", 0):
        walk.refuse(index, "training-mode BatchNormalization (running statistics outputs)")
    walk.require_channel_axis(index, placement, allow_blocks=True) if placement.rank >= 3 else None
    if placement.axis != 1:
        walk.refuse(index, f"the units are on axis {placement.axis}, not the channel axis")
    params = (1, 2) if node.op_type == "InstanceNormalization" else (1, 2, 3, 4)
    if node.op_type == "InstanceNormalization" and placement.inner != 1:
        walk.refuse(index, "instance normalisation over a block of channels")
    for param in params:
        walk.weight(index, param, 0, _axis_only(placement), "copy")
    walk.same_on_ports(index, placement)


def _axis_only(placement: Placement) -> Placement:
    return Placement(axis=0, rank=1, length=placement.length, offset=placement.offset,
                     inner=placement.inner, outer=placement.outer)


def _elementwise(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Broadcasting ops: operands with the unit axis at full width join the space
    (constants are copied like a producer's bias); size-1 operands broadcast."""
    ir = walk.ir
    node = ir.nodes[index]
    from_end = placement.rank - placement.axis
    out_rank = walk.shape(index, node.output[0]).__len__()
    for other, name in enumerate(node.input):
        if not name or (side == "in" and other == port):
            continue
        shape = walk.shape(index, name)
        axis = len(shape) - from_end
        # A full-width operand joins the space (checked first: with one unit,
        # a size-1 operand is full width, and both must grow together).
        if axis < 0 or (shape[axis] == 1 and placement.length != 1):
            continue
        if shape[axis] != placement.length:
            walk.refuse(index, f"operand '{name}' has {shape[axis]} positions on the unit axis, "
                               f"not {placement.length}")
        if ir.is_const(name):
            walk.weight(index, other, axis, placement, "copy")
        else:
            walk.add(name, placement.on_axis(axis, len(shape)))
    for out in node.output:
        if out:
            walk.add(out, placement.on_axis(out_rank - from_end, out_rank))


def _concat(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    rank = placement.rank
    axis = node_attr(node, "axis") % rank
    if axis != placement.axis:
        walk.same_on_ports(index, placement, inputs=range(len(node.input)))
        return
    if _concat_of_one_space(walk, index, side, placement):
        return
    if placement.outer != 1:
        walk.refuse(index, "concatenation of interleaved features")
    sizes = [walk.shape(index, name)[axis] for name in node.input]
    if any(size is None for size in sizes):
        walk.refuse(index, "an input's size on the concatenation axis is unknown")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    total = int(starts[-1])
    if side == "in":
        walk.add(node.output[0], replace(placement, offset=placement.offset + int(starts[port]), length=total))
        return
    lo, hi = placement.offset, placement.offset + walk.group.size * placement.inner
    for source, name in enumerate(node.input):
        if starts[source] <= lo and hi <= starts[source + 1]:
            walk.add(name, replace(placement, offset=lo - int(starts[source]), length=sizes[source]))
            return
    walk.refuse(index, "the units span several concatenated inputs")


def _concat_of_one_space(walk: _Walk, index: int, side: str, placement: Placement) -> bool:
    """Swin's patch merging: strided slices of one tensor (all slicing other
    axes) concatenated along the unit axis hold the same units k times: the
    output is the space repeated k times (outer = k)."""
    ir = walk.ir
    node = ir.nodes[index]
    roots = {_slice_root(ir, name, placement.axis) for name in node.input}
    if len(node.input) < 2 or len(roots) != 1 or None in roots:
        return False
    # Slices that do not touch the unit axis keep its length (also where shape inference lost it).
    shapes = [ir.shape(name) for name in node.input]
    length = placement.length if side == "in" else placement.block
    sizes = {length if shape is None or shape[placement.axis] is None else shape[placement.axis] for shape in shapes}
    count = len(node.input)
    if side == "in":
        if placement.outer != 1 or sizes != {placement.length}:
            return False
        for name in node.input:
            walk.add(name, placement)
        walk.add(node.output[0], replace(placement, outer=count, length=placement.length * count))
        return True
    if placement.outer != count or sizes != {placement.block}:
        return False
    for name in node.input:
        walk.add(name, replace(placement, outer=1, length=placement.block))
    return True


def _slice_root(ir: GraphIR, tensor: str, unit_axis: int) -> str | None:
    """The tensor a chain of Slices (none on `unit_axis`) starts from, or None."""
    producer = ir.producer_node(tensor)
    if producer is None or ir.nodes[producer].op_type != "Slice":
        return None
    while producer is not None and ir.nodes[producer].op_type == "Slice":
        node = ir.nodes[producer]
        axes = ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        rank = ir.rank(node.input[0])
        if axes is None or rank is None or unit_axis in [int(a) % rank for a in axes]:
            return None
        tensor = node.input[0]
        producer = ir.producer_node(tensor)
    return tensor


def _split(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    axis = node_attr(node, "axis", 0) % placement.rank
    if axis != placement.axis:
        walk.same_on_ports(index, placement, outputs=range(len(node.output)))
        return
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its split sizes")
    sizes = [walk.shape(index, name)[axis] for name in node.output]
    if any(size is None for size in sizes):
        walk.refuse(index, "an output's size on the split axis is unknown")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    source = ir.nodes[index].input[0]
    known = walk.group.placements.get(source)
    if side == "out" and known is not None and _split_pieces(walk, index, known, sizes, starts).get(port) == placement:
        return  # reached again from a piece of a repeated space already mapped from the input
    if side == "out":
        walk.add(source, replace(placement, offset=placement.offset + int(starts[port]), length=int(starts[-1])))
        _split_size_edits(walk, index, {port: placement})
        return
    pieces = _split_pieces(walk, index, placement, sizes, starts)
    for piece, piece_placement in pieces.items():
        walk.add(node.output[piece], piece_placement)
    _split_size_edits(walk, index, pieces)


def _split_pieces(walk: _Walk, index: int, placement: Placement, sizes: list, starts) -> dict[int, Placement]:
    """The outputs of a Split that carry the units, with their placements:
    the one output holding all of them, or, for a space repeated once per
    output (q | k | v of a fused projection), every output."""
    lo, hi = placement.offset, placement.offset + walk.group.size * placement.inner
    if placement.outer == 1:
        for piece in range(len(sizes)):
            if starts[piece] <= lo and hi <= starts[piece + 1]:
                return {piece: replace(placement, offset=lo - int(starts[piece]), length=sizes[piece])}
    per_piece, uneven = divmod(placement.outer, len(sizes))
    if not uneven and all(size == placement.block * per_piece for size in sizes):
        return {piece: replace(placement, outer=per_piece, length=size) for piece, size in enumerate(sizes)}
    fills_blocks = placement.offset == 0 and hi == placement.block
    equal = len(set(sizes)) == 1 and placement.block % len(sizes) == 0
    retry = ((1, len(sizes)),) if fills_blocks and placement.outer == 1 and equal else ()
    walk.refuse(index, "the units span several split outputs", retry)


def _split_size_edits(walk: _Walk, index: int, pieces: dict[int, Placement]) -> None:
    """Grow the sizes of the outputs that gain units (an even split of a space
    repeated in every output stays even by itself)."""
    node = walk.ir.nodes[index]
    if len(node.input) > 1 and node.input[1]:
        walk.const(index, node.input[1], "split sizes")
        for piece, placement in pieces.items():
            walk.group.value_edits.append(ValueEdit(index, 1, piece, placement.growth()))
        return
    if node_attr(node, "split") is not None:
        walk.refuse(index, "its split sizes are an attribute (opset < 13); re-export at opset 13 or later")
    if len(pieces) != len(node.output):
        walk.refuse(index, "it splits evenly and the units are in one output only (the split would become uneven)")


def _slice(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its slice bounds")
    if len(node.input) < 3:
        walk.refuse(index, "Slice with attribute bounds (opset < 10)")
    rank = placement.rank
    if not (ir.is_const(node.input[1]) and ir.is_const(node.input[2])):
        _slice_with_runtime_bounds(walk, index, placement)
        return
    starts = walk.const(index, node.input[1], "starts")
    ends = walk.const(index, node.input[2], "ends")
    axes = walk.const(index, node.input[3], "axes") if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
    steps = walk.const(index, node.input[4], "steps") if len(node.input) > 4 and node.input[4] else np.ones(len(starts))
    axes = [int(a) % rank for a in axes]
    if placement.axis not in axes:
        walk.same_on_ports(index, placement)
        return
    k = axes.index(placement.axis)
    if steps[k] != 1:
        walk.refuse(index, "it slices the unit axis with a step")
    in_length = placement.length if side == "in" else walk.shape(index, node.input[0])[placement.axis]
    first, last = int(starts[k]), int(ends[k])
    start, end = _clamp(first, in_length), _clamp(last, in_length)
    growth = placement.growth()
    known = walk.group.placements.get(node.input[0])
    if side == "out" and known is not None and known.outer > 1:
        if _slice_of_repeats(walk, index, k, first, last, known, record=False) == placement:
            return  # reached again from one part of a repeated space already mapped from the input
    if side == "out":
        walk.add(node.input[0], replace(placement, offset=placement.offset + start, length=in_length))
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, True, False)
        return
    lo, hi = placement.offset, placement.offset + walk.group.size * placement.inner
    if placement.outer != 1:
        walk.add(node.output[0], _slice_of_repeats(walk, index, k, first, last, placement))
        return
    if start <= lo and hi <= end:
        walk.add(node.output[0], replace(placement, offset=lo - start, length=end - start))
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, True, False)
    elif end <= lo:
        # The slice lies before the units: only bounds counted from the end move.
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, True, True)
    elif hi <= start:
        # The slice lies after the units: it moves right with them.
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, False, False)
    else:
        span = end - start
        fills = lo == 0 and hi == placement.length
        retry = ((1, in_length // span),) if fills and 0 < span < in_length and in_length % span == 0 \
            and start % span == 0 else ()
        walk.refuse(index, "it cuts through the units", retry)


def _slice_with_runtime_bounds(walk: _Walk, index: int, placement: Placement) -> None:
    """Bounds read at run time (`pos[:, :T]`) on other axes than the unit axis:
    the units pass; runtime_shapes checks the bounds do not change with them."""
    node = walk.ir.nodes[index]
    if len(node.input) < 4 or not node.input[3]:
        walk.refuse(index, "its bounds are read at run time and its axes are implicit")
    axes = walk.const(index, node.input[3], "axes")
    if placement.axis in [int(a) % placement.rank for a in axes]:
        walk.refuse(index, "it slices the unit axis with bounds read at run time")
    walk.same_on_ports(index, placement)


def _slice_of_repeats(walk: _Walk, index: int, k: int, first: int, last: int, placement: Placement,
                      record: bool = True) -> Placement:
    """A Slice taking whole repeats of a repeated space (q, k or v of a fused
    projection): the output holds those repeats; bounds move by the growth of
    the repeats before them."""
    block, length, per_repeat = placement.block, placement.length, placement.inner
    if first < 0 or last < 0:
        walk.refuse(index, "it slices a repeated space with bounds counted from the end")
    start, end = min(first, length), min(last, length)
    if start % block or end % block or end <= start:
        walk.refuse(index, "it cuts through the repeats of the units")
    if record:
        if start:
            walk.group.value_edits.append(ValueEdit(index, 1, k, start // block * per_repeat))
        if last <= length:  # a larger end is clamped to the new length as well
            walk.group.value_edits.append(ValueEdit(index, 2, k, end // block * per_repeat))
    return replace(placement, outer=(end - start) // block, length=end - start)


def _shift_slice_bounds(walk: _Walk, index: int, k: int, first: int, last: int, length: int, growth: int,
                        start_before_units: bool, end_before_units: bool) -> None:
    """Keep a Slice's bounds on the same data once `growth` positions per unit
    are inserted: a bound before the units keeps its absolute position, one
    after them moves right (bounds counted from the end move by themselves)."""
    for port, value, units_after in ((1, first, start_before_units), (2, last, end_before_units)):
        if value < 0 and not units_after:
            continue  # counted from the end, and the units are before it: moves by itself
        if value < 0:
            walk.group.value_edits.append(ValueEdit(index, port, k, -growth))
        elif not units_after and value <= length:
            walk.group.value_edits.append(ValueEdit(index, port, k, growth))


def _clamp(value: int, length: int) -> int:
    if value < 0:
        value += length
    return max(0, min(value, length))


def _transpose(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    perm = node_attr(node, "perm") or list(reversed(range(placement.rank)))
    if side == "in":
        walk.add(node.output[0], placement.on_axis(list(perm).index(placement.axis), placement.rank))
    else:
        walk.add(node.input[0], placement.on_axis(int(perm[placement.axis]), placement.rank))


def _reshape(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its shape input")
    src_name, dst_name = (node.input[0], node.output[0]) if side == "in" else (node.output[0], node.input[0])
    src, dst = _refined_shape(walk, index, src_name), _refined_shape(walk, index, dst_name)
    moved, reason = map_through_reshape(placement, src, dst)
    if moved is None:
        if _channel_shuffle(ir, index if side == "in" else None) and placement.length != walk.group.size:
            reason = ("a channel shuffle (Reshape -> Transpose -> Reshape) interleaves these units with other "
                      "channels (the other concatenated branch)")
        walk.refuse(index, reason, _unit_layout_hints(placement, src, dst))
    walk.add(dst_name, moved)
    if node.op_type == "Reshape":
        out_placement = moved if side == "in" else placement
        _update_shape_input(walk, index, out_placement)


def _refined_shape(walk: _Walk, index: int, tensor: str) -> tuple:
    """The inferred shape, with the dims of a Reshape's output that ONNX shape
    inference left unknown filled in from its target computed at run time."""
    ir = walk.ir
    shape = ir.shape(tensor)
    producer = ir.producer_node(tensor)
    if (shape is None or None in shape) and producer is not None and ir.nodes[producer].op_type in ("Reshape", "Pad"):
        from .runtime_shapes import pad_output_shape, reshape_output_shape

        node = ir.nodes[producer]
        computed = (reshape_output_shape if node.op_type == "Reshape" else pad_output_shape)(ir, producer)
        if computed is not None and (shape is None or len(shape) == len(computed)):
            shape = tuple(c if c is not None else (None if shape is None else d)
                          for c, d in zip(computed, shape or computed))
    if shape is None:
        walk.refuse(index, f"the shape of '{tensor}' is unknown")
    return shape


def _channel_shuffle(ir: GraphIR, index: int | None) -> bool:
    """Reshape [.., C, ..] -> [.., g, C/g, ..], then a Transpose swapping those two axes."""
    if index is None or ir.nodes[index].op_type != "Reshape":
        return False
    src, dst = ir.shape(ir.nodes[index].input[0]), ir.shape(ir.nodes[index].output[0])
    uses = ir.uses(ir.nodes[index].output[0])
    if src is None or dst is None or len(dst) != len(src) + 1 or len(uses) != 1:
        return False
    transpose = ir.nodes[uses[0].node]
    perm = node_attr(transpose, "perm")
    if transpose.op_type != "Transpose" or perm is None:
        return False
    swapped = [axis for axis, source in enumerate(perm) if axis != source]
    return len(swapped) == 2 and swapped[1] == swapped[0] + 1


def map_through_reshape(placement: Placement, src: tuple, dst: tuple):
    """Where the units land when a tensor of shape `src` is viewed as `dst`.

    Returns (placement, None) or (None, reason). Handles axes that keep their
    length, merges of the unit axis with its neighbours (flattening), and the
    exact inverse of such a merge.
    """
    segments = _reshape_segments(src, dst)
    if segments is None:
        # Unknown leading dims (a dynamic batch merged with the sequence, as
        # GPT-2's Conv1D does): axes in a common known suffix keep their place.
        from_end = placement.rank - placement.axis
        if from_end <= _common_known_suffix(src, dst):
            return placement.on_axis(len(dst) - from_end, len(dst)), None
        unit_dims_known = None not in src[placement.axis:] and None not in dst[1:]
        if unit_dims_known and dst[0] is None and len(src) - placement.axis > _common_known_suffix(src, dst):
            return None, (f"reshape {_fmt(src)} -> {_fmt(dst)} merges the unit axis into an axis of unknown size "
                          "(with the batch, as MobileViT's unfold does): the units would not stay apart")
        return None, f"cannot match shape {_fmt(src)} to {_fmt(dst)} (unknown dims)"
    for (i0, i1), (j0, j1) in segments:
        if not i0 <= placement.axis < i1:
            continue
        a = placement.axis
        # Axes of size 1 merged in or split off (a batch of 1 merged with the heads) change nothing.
        lone_src = all(src[i] == 1 for i in range(i0, i1) if i != a)
        kept_dst = [j for j in range(j0, j1) if dst[j] != 1]
        if lone_src and len(kept_dst) == 1:
            return placement.on_axis(kept_dst[0], len(dst)), None
        if len(kept_dst) == 1 and j1 - j0 > 1:
            j0, j1 = kept_dst[0], kept_dst[0] + 1
        if i1 - i0 == 1 and j1 - j0 == 1:
            return placement.on_axis(j0, len(dst)), None
        if j1 - j0 == 1:
            if placement.outer != 1:
                return None, "flattening interleaved features again"
            after = int(np.prod(src[a + 1:i1], dtype=np.int64))
            before = int(np.prod(src[i0:a], dtype=np.int64))
            length = placement.length * after
            return Placement(axis=j0, rank=len(dst), length=length * before, offset=placement.offset * after,
                             inner=placement.inner * after, outer=before), None
        if i1 - i0 == 1 or all(src[i] == 1 for i in range(i0, i1) if i != a):
            # (axes of size 1 merged in, such as a batch of 1 with the heads, change nothing)
            return _unflatten(placement, dst, j0, j1)
        return None, f"reshape {_fmt(src)} -> {_fmt(dst)} regroups the unit axis"
    return None, "the unit axis is not in the reshape"


def _common_known_suffix(src: tuple, dst: tuple) -> int:
    count = 0
    for a, b in zip(reversed(src), reversed(dst)):
        if a is None or a != b:
            break
        count += 1
    return count


def _unit_layout_hints(placement: Placement, src: tuple, dst: tuple) -> tuple[tuple[int, int], ...]:
    """For plain units split as [.., F, ..] -> [.., d_0, ..., d_k, ..]: each
    axis d_j could hold the units, with d_j+1*..*d_k features per unit (the
    head size) repeated d_0*..*d_j-1 times (q, k, v of a fused projection)."""
    if placement.inner != 1 or placement.outer != 1 or placement.offset:
        return ()
    segments = _reshape_segments(src, dst) or []
    for (i0, i1), (j0, j1) in segments:
        lone = all(src[i] == 1 for i in range(i0, i1) if i != placement.axis)
        if i0 <= placement.axis < i1 and lone and j1 - j0 > 1:
            return tuple((int(np.prod(dst[j + 1:j1], dtype=np.int64)), int(np.prod(dst[j0:j], dtype=np.int64)))
                         for j in range(j0, j1) if dst[j] > 1)
    return ()


def _unflatten(placement: Placement, dst: tuple, j0: int, j1: int):
    """The inverse of flattening: [.., F, ..] -> [.., d_j0, ..., d_j1-1, ..]."""
    for j in range(j0, j1):
        after = int(np.prod(dst[j + 1:j1], dtype=np.int64))
        before = int(np.prod(dst[j0:j], dtype=np.int64))
        block = dst[j] * after
        if placement.inner % after or placement.offset % after:
            continue
        if placement.outer != before or (before > 1 and placement.block != block):
            continue
        return Placement(axis=j, rank=len(dst), length=dst[j], offset=placement.offset // after,
                         inner=placement.inner // after), None
    return None, "the reshape splits the unit axis across the units"


def _reshape_segments(src: tuple, dst: tuple):
    """Pair runs of axes with equal element counts: [((i0, i1), (j0, j1)), ...]."""
    segments, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        i0, j0 = i, j
        if i < len(src) and j < len(dst) and (src[i] is None or dst[j] is None):
            if src[i] is None and dst[j] is None:
                segments.append(((i, i + 1), (j, j + 1)))
                i, j = i + 1, j + 1
                continue
            return None
        a = src[i] if i < len(src) else 1
        b = dst[j] if j < len(dst) else 1
        i, j = min(i + 1, len(src)) if i < len(src) else i, min(j + 1, len(dst)) if j < len(dst) else j
        while a != b:
            if a < b:
                if i >= len(src) or src[i] is None:
                    return None
                a *= src[i]
                i += 1
            else:
                if j >= len(dst) or dst[j] is None:
                    return None
                b *= dst[j]
                j += 1
        segments.append(((i0, i), (j0, j)))
        if i0 == i and j0 == j:
            break
    return segments


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _update_shape_input(walk: _Walk, index: int, out_placement: Placement) -> None:
    """Record the edit of the literal dim of a Reshape's target shape."""
    ir = walk.ir
    node = ir.nodes[index]
    shape_name = node.input[1]
    axis = out_placement.axis
    value = ir.const_value(shape_name)
    if value is not None:
        if int(value[axis]) > 0:
            walk.group.value_edits.append(ValueEdit(index, 1, axis, out_placement.growth()))
        elif int(value[axis]) == 0:
            walk.refuse(index, "its target shape copies the unit axis from the input (0) across a move")
        return
    # A target computed at run time: runtime_shapes checks (and edits) its entries.
    walk.group.dynamic_shapes = True


def _shape_op(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    # The shape is read at run time, so it follows the new width by itself.
    walk.group.dynamic_shapes = True


def _conv(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weights or bias")
    walk.require_channel_axis(index, placement, allow_blocks=True)
    weight = walk.const(index, node.input[1], "weight")
    groups = int(node_attr(node, "group", 1))
    channels_in = weight.shape[1] * groups
    if groups == 1:
        if placement.inner != 1 and side == "out":
            walk.refuse(index, "the units are blocks of channels")
        if side == "in":
            walk.weight(index, 1, 1, _axis_only(placement), "split")
        else:
            walk.weight(index, 1, 0, _axis_only(placement), "copy")
            walk.weight(index, 2, 0, _axis_only(placement), "copy")
            walk.group.producers.append(index)
        return
    if groups == channels_in and groups == walk.shape(index, node.input[0])[1]:
        _depthwise(walk, index, side, placement, weight.shape[0] // groups)
        return
    walk.require_blocks(index, placement, groups)
    if side == "in":
        walk.weight(index, 1, 1, _axis_only(placement), "split", groups)
    else:
        walk.weight(index, 1, 0, _axis_only(placement), "copy")
        walk.weight(index, 2, 0, _axis_only(placement), "copy")
        walk.group.producers.append(index)


def _depthwise(walk: _Walk, index: int, side: str, placement: Placement, multiplier: int) -> None:
    """A depthwise conv acts per channel: its filters grow with its input."""
    node = walk.ir.nodes[index]
    if side == "in":
        inp = placement
        out = replace(placement, offset=placement.offset * multiplier, inner=placement.inner * multiplier,
                      length=placement.length * multiplier)
    else:
        if placement.inner % multiplier or placement.offset % multiplier:
            walk.refuse(index, "the units split a depthwise filter group")
        out = placement
        inp = replace(placement, offset=placement.offset // multiplier, inner=placement.inner // multiplier,
                      length=placement.length // multiplier)
    walk.weight(index, 1, 0, _axis_only(out), "copy")
    walk.weight(index, 2, 0, _axis_only(out), "copy")
    walk.group.attribute_edits.append(AttributeEdit(index, "group", inp.inner))
    walk.group.passthrough.append(index)
    walk.add(node.input[0], inp)
    walk.add(node.output[0], out)


def _conv_transpose(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weights or bias")
    walk.require_channel_axis(index, placement)
    walk.const(index, node.input[1], "weight")
    if int(node_attr(node, "group", 1)) != 1:
        walk.refuse(index, "grouped transposed convolution is not supported yet")
    if node_attr(node, "output_shape") is not None:
        walk.refuse(index, "explicit output_shape attribute")
    if side == "in":
        walk.weight(index, 1, 0, _axis_only(placement), "split")
    else:
        walk.weight(index, 1, 1, _axis_only(placement), "copy")
        walk.weight(index, 2, 0, _axis_only(placement), "copy")
        walk.group.producers.append(index)


def _gemm(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    trans_a, trans_b = int(node_attr(node, "transA", 0)), int(node_attr(node, "transB", 0))
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weight or bias")
    walk.const(index, node.input[1], "weight")
    if side == "in":
        if placement.axis != (0 if trans_a else 1):
            walk.refuse(index, "the units are on its row (batch) axis")
        walk.weight(index, 1, 1 if trans_b else 0, _axis_only(placement), "split")
        return
    if placement.axis != 1:
        walk.refuse(index, "the units are on its row (batch) axis")
    walk.weight(index, 1, 0 if trans_b else 1, _axis_only(placement), "copy")
    if len(node.input) > 2 and node.input[2]:
        bias_shape = walk.shape(index, node.input[2])
        if bias_shape and bias_shape[-1] != 1:
            walk.weight(index, 2, len(bias_shape) - 1, _axis_only(placement), "copy")
    walk.group.producers.append(index)


def _matmul(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    if not ir.is_const(node.input[1]) and not ir.is_const(node.input[0]):
        weight = ir.producer_node(node.input[1])
        if weight is not None and ir.nodes[weight].op_type == "DequantizeLinear":
            walk.const(index, node.input[1], "weight")  # refuses, naming the quantization
        _batched_matmul(walk, index, side, port, placement)
        return
    if not ir.is_const(node.input[1]) or ir.is_const(node.input[0]):
        walk.refuse(index, "a product of two computed tensors mixes units (attention-style MatMul)")
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its weight")
    weight_rank = len(walk.shape(index, node.input[1]))
    last = placement.rank - 1
    if weight_rank > 2 and placement.axis < placement.rank - 2:
        walk.refuse(index, "the units are on a batch axis of a batched weight")
    if side == "in" and placement.axis == last:
        walk.weight(index, 1, weight_rank - 2, _axis_only(placement), "split")
    elif side == "out" and placement.axis == last:
        walk.weight(index, 1, weight_rank - 1, _axis_only(placement), "copy")
        walk.group.producers.append(index)
    else:
        # Rows pass through a matrix product unchanged.
        out_rank = len(walk.shape(index, node.output[0]))
        in_rank = len(walk.shape(index, node.input[0]))
        if side == "in":
            walk.add(node.output[0], placement.on_axis(placement.axis + out_rank - in_rank, out_rank))
        else:
            walk.add(node.input[0], placement.on_axis(placement.axis - out_rank + in_rank, in_rank))


def _batched_matmul(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """A product of two computed tensors (attention) is per unit only on its
    batch axes (e.g. the head axis of Q K^T and of softmax(..) V)."""
    node = walk.ir.nodes[index]
    from_end = placement.rank - placement.axis
    if from_end <= 2:
        walk.refuse(index, "a product of two computed tensors contracts or mixes the unit axis")
    for name in list(node.input) + list(node.output):
        shape = walk.shape(index, name)
        axis = len(shape) - from_end
        if axis < 0 or (shape[axis] == 1 and placement.length != 1):
            continue
        if shape[axis] != placement.length:
            walk.refuse(index, f"'{name}' has {shape[axis]} positions on the unit axis, not {placement.length}")
        walk.add(name, placement.on_axis(axis, len(shape)))


def _softmax(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    opset = _opset(walk.ir)
    axis = int(node_attr(node, "axis", -1 if opset >= 13 else 1)) % placement.rank
    if axis == placement.axis or (opset < 13 and placement.axis >= axis):
        walk.refuse(index, "it normalises over the unit axis")
    walk.same_on_ports(index, placement)


def _reduce(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its axes input")
    axes = node_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = walk.const(index, node.input[1], "axes").tolist()
    if axes is None or len(axes) == 0:
        if node_attr(node, "noop_with_empty_axes", 0):
            walk.same_on_ports(index, placement)
            return
        walk.refuse(index, "it reduces over every axis, the unit axis included")
    in_rank = len(walk.shape(index, node.input[0]))
    axes = sorted(int(a) % in_rank for a in axes)
    keep = int(node_attr(node, "keepdims", 1))
    if side == "in":
        if placement.axis in axes:
            if node.op_type not in ("ReduceMean", "ReduceMax", "ReduceMin"):
                walk.refuse(index, "it reduces over the unit axis")
            # A mean / max / min over equally copied units is unchanged.
            _require_tiling(walk, index, placement)
            walk.group.reductions.append(index)
            return
        axis = placement.axis if keep else placement.axis - sum(a < placement.axis for a in axes)
        walk.add(node.output[0], placement.on_axis(axis, in_rank if keep else in_rank - len(axes)))
    else:
        axis = placement.axis
        if not keep:
            kept = [a for a in range(in_rank) if a not in axes]
            axis = kept[placement.axis]
        walk.add(node.input[0], placement.on_axis(axis, in_rank))


def _layernorm(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Normalising over the unit axis is exact when every unit is copied equally
    often (mean and variance unchanged): the group must tile."""
    node = walk.ir.nodes[index]
    axis = int(node_attr(node, "axis", -1)) % placement.rank
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its scale or bias")
    if any(o and walk.ir.uses(o) for o in node.output[1:]):
        walk.refuse(index, "its mean / inverse-std outputs are used")
    if placement.axis >= axis:
        if axis != placement.rank - 1:
            walk.refuse(index, "it normalises over the unit axis together with other axes")
        _require_tiling(walk, index, placement)
        walk.group.norms.append(index)
        walk.weight(index, 1, 0, _axis_only(placement), "norm-scale")
        if node.op_type == "LayerNormalization":
            walk.weight(index, 2, 0, _axis_only(placement), "norm-bias")
    walk.same_on_ports(index, placement)


def _require_tiling(walk: _Walk, index: int, placement: Placement) -> None:
    """Statistics over the unit axis survive only if every unit is copied
    equally often (widths that are multiples of the current width)."""
    group = walk.group
    if placement.offset or placement.block != group.size * placement.inner:
        # (repeated blocks that each hold exactly the units, as in patch merging, are fine: every unit is
        # still copied equally often)
        walk.refuse(index, "it takes statistics over the units and other data together")
    if group.step not in (1, group.size):
        walk.refuse(index, "it takes statistics over grouped-convolution units")
    group.tile = True
    group.step = group.size


def _pad(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its pads")
    pads = node_attr(node, "pads")
    if pads is None and not walk.ir.is_const(node.input[1]):
        walk.same_on_ports(index, placement)  # pads read at run time: runtime_shapes checks the unit axis's
        return
    if pads is None:
        pads = walk.const(index, node.input[1], "pads").tolist()
    rank = placement.rank
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % rank for a in walk.const(index, node.input[3], "axes")]
    count = len(axes)
    if placement.axis in axes:
        k = axes.index(placement.axis)
        if pads[k] != 0 or pads[k + count] != 0:
            walk.refuse(index, "it pads the unit axis")
    walk.same_on_ports(index, placement)


def _gather(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units are used as indices")
    in_rank = len(walk.shape(index, node.input[0]))
    axis = int(node_attr(node, "axis", 0)) % in_rank
    index_rank = len(walk.shape(index, node.input[1]))
    if side == "in" and placement.axis == axis or side == "out" and axis <= placement.axis < axis + index_rank:
        _gather_as_reshape(walk, index, side, placement, axis, in_rank, index_rank)
        return
    if side == "in":
        moved = placement.axis if placement.axis < axis else placement.axis - 1 + index_rank
        walk.add(node.output[0], placement.on_axis(moved, in_rank - 1 + index_rank))
    else:
        moved = placement.axis if placement.axis < axis else placement.axis + 1 - index_rank
        if ir.is_const(node.input[0]):
            # An embedding table: its columns are the units (a producer).
            walk.weight(index, 0, moved, _axis_only(placement), "copy")
            walk.group.producers.append(index)
        else:
            walk.add(node.input[0], placement.on_axis(moved, in_rank))


def _gather_as_reshape(walk: _Walk, index: int, side: str, placement: Placement, axis: int, in_rank: int,
                       index_rank: int) -> None:
    """A Gather of every position in order (indices arange(L) in a shape with
    one non-1 axis, as exporters write `as_strided`) only moves the axis: the
    units move with it and the indices are copied like a producer's entries
    (a copied index reads the copied unit)."""
    node = walk.ir.nodes[index]
    indices = walk.ir.const_value(node.input[1])
    length = placement.length
    if (indices is None or indices.size != length or not np.array_equal(indices.reshape(-1), np.arange(length))
            or sum(d != 1 for d in indices.shape) != 1):
        walk.refuse(index, "it gathers along the unit axis")
    if placement.offset or placement.outer != 1 or walk.group.size * placement.inner != length:
        walk.refuse(index, "it gathers part of an axis that holds other data besides the units")
    k = next(i for i, d in enumerate(indices.shape) if d != 1)
    walk.weight(index, 1, k, replace(placement, axis=k, rank=index_rank), "copy")
    walk.add(node.input[0], placement.on_axis(axis, in_rank))
    walk.add(node.output[0], placement.on_axis(axis + k, in_rank - 1 + index_rank))


def _expand(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its shape input")
    from_end = placement.rank - placement.axis
    in_shape = walk.shape(index, node.input[0])
    out_shape = walk.shape(index, node.output[0])
    in_axis = len(in_shape) - from_end
    if in_axis < 0 or in_shape[in_axis] != placement.length and side == "out":
        walk.refuse(index, "it broadcasts along the unit axis")
    walk.add(node.input[0], placement.on_axis(in_axis, len(in_shape)))
    walk.add(node.output[0], placement.on_axis(len(out_shape) - from_end, len(out_shape)))
    target = ir.const_value(node.input[1])
    if target is None:
        walk.group.dynamic_shapes = True
        return
    position = len(target) - from_end
    if position >= 0 and int(target[position]) > 1:
        walk.group.value_edits.append(ValueEdit(index, 1, position, placement.growth()))


def _resize(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its scales or sizes")
    scales = walk.ir.const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = walk.ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and scales.size:
        if scales.size <= placement.axis or scales[placement.axis] != 1:
            walk.refuse(index, "it resizes the unit axis")
    elif sizes is not None and sizes.size:
        if sizes.size <= placement.axis or int(sizes[placement.axis]) != placement.length:
            walk.refuse(index, "it resizes the unit axis")
        walk.group.value_edits.append(ValueEdit(index, 3, placement.axis, placement.growth()))
    elif len(node.input) > 3 and node.input[3] and (len(node.input) < 3 or not node.input[2]
                                                     or walk.ir.shape(node.input[2]) == (0,)):
        pass  # sizes computed at run time: runtime_shapes checks their unit-axis entry follows
    else:
        walk.refuse(index, "its scales are not constant")
    walk.same_on_ports(index, placement)


def _tile(walk: _Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Tile repeats whole axes: per unit when the unit axis is repeated once."""
    node = walk.ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its repeats")
    repeats = walk.ir.const_value(node.input[1])
    if repeats is not None and int(repeats[placement.axis]) != 1:
        walk.refuse(index, "it repeats the unit axis")
    walk.same_on_ports(index, placement)  # repeats read at run time: checked by runtime_shapes


def _opset(ir: GraphIR) -> int:
    for opset in ir.handle.proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


_RULES = {
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _batchnorm,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Transpose": _transpose,
    "Shape": _shape_op,
    "Size": _shape_op,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "LayerNormalization": _layernorm,
    "RMSNormalization": _layernorm,
    "Pad": _pad,
    "Gather": _gather,
    "Resize": _resize,
    "Expand": _expand,
    "Tile": _tile,
}
_FAMILY_RULES = [
    (ELEMENTWISE_UNARY, _unary),
    (ELEMENTWISE_NARY, _elementwise),
    (POOLING, _pool),
    (REDUCTIONS, _reduce),
    (RESHAPES, _reshape),
]
