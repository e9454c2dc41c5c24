"""Unit spaces: the data model of which tensors and weights grow together.

Widening a layer adds units to its output. Every tensor that carries those
units (after activations, normalisation, pooling, residual additions,
concatenations, flattening...) carries the same *unit space* S, and every
weight that produces or consumes S must be rewritten with one mapping g.
A `UnitGroup` is that space with everything that must change when it grows;
the walk (walk.py, with the op rules in rules/) finds it.

A `Placement` says where the n units of S sit on one axis of a tensor. The
axis is `outer` repetitions of a block; in every block unit u occupies the
`inner` consecutive positions starting at `offset + u * inner`:

* a Conv output [N, C, H, W]:           axis 1, offset 0, inner 1, outer 1
* after Concat at channel offset k:      offset k
* Flatten of NCHW into [N, C*H*W]:       inner H*W (each channel is a block)
* Transpose to NHWC, then Flatten:       inner 1, outer H*W (feature p*C + c)
* a depthwise Conv with multiplier m:    inner m
* the same space concatenated k times:   outer k (GhostNet's [x | depthwise(x)])
* ... with other tensors between:        `starts`, the position where each
  repeat begins (DLA's root concat(t2, t1, x, t0): unit u at 0 + u, n + u,
  2n + |x| + u); `outer` is then 1 and `block` means nothing
* heads merged with a batch of unknown size B ([T, B, H*d] viewed as
  [T, B*H, d], as PyTorch's legacy export of nn.MultiheadAttention does):
  axis 1, length H, `batch`: the axis holds B blocks of the H units, B
  unknown (sizes on it are read at run time, see runtime_shapes)
* channels merged with such a batch and a patch dim (MobileViT's unfold,
  [B, C, H, W] viewed as [B*C*H/p, p, W/p, p]): axis 0, length C*H/p,
  inner H/p, `batch`: each of the B blocks holds every channel's H/p rows

The walk produces `Edit`s that the rewrites apply; it never changes the model.

Unit groups and channel routing regions (routing.RoutedGroup) answer the
same questions for callers (the group protocol: `width_refusal`,
`next_width`, `aligned_width`, `grown_weight_bytes`, `step_notes`,
`exact_only`), so no caller needs to know which one it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..io import tensor_nbytes
from ..ir import GraphIR
from .refusal import Refusal


@dataclass(frozen=True)
class Placement:
    """Where the units of a space sit on one axis of a tensor (see module doc)."""

    axis: int
    rank: int
    length: int
    offset: int = 0
    inner: int = 1
    outer: int = 1
    #: the axis also holds a batch of unknown size: B blocks of `length` positions each
    batch: bool = False
    #: the repeats begin at these positions, unevenly spaced (then `outer` is 1): unit u
    #: of repeat r sits at starts[r] + offset + u * inner
    starts: tuple[int, ...] = ()

    @property
    def block(self) -> int:
        """Positions per repeat of the space."""
        return self.length // self.outer

    def fits(self, dim: int | None) -> bool:
        """Whether an axis of `dim` positions holds these units (unknown, for units merged with a batch)."""
        return dim == self.length or (self.batch and dim is None)

    def on_axis(self, axis: int, rank: int) -> Placement:
        """The same units on another axis (and rank)."""
        return replace(self, axis=axis, rank=rank)

    def growth(self) -> int:
        """Positions added on the axis per unit added to the space."""
        return self.inner * (len(self.starts) or self.outer)


@dataclass(frozen=True)
class WeightEdit:
    """Rewrite the constant at `node.input[port]` along `axis`.

    `role` is "copy" for a producer (new unit j copies unit g(j)), "split"
    for a consumer (slot j takes slot g(j)'s weights divided among its copies),
    and "positions" for the indices of a Gather reading every position of the
    axis in order (they become every position of the grown axis).
    """

    node: int
    port: int
    axis: int
    placement: Placement
    role: str
    groups: int = 1
    #: for "copy": the repeats of `placement` whose copies also share their unit's value, each
    #: divided by its copy count (the divided side of a contraction over the units, contraction.py)
    divided: tuple[int, ...] = ()


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
        repeat_of: the layer writing the whole space, when the seed (a
            depthwise convolution) passes one repeat of it (EdgeNeXt's chunk
            convolutions); None otherwise.
        fixed_features: output features of the seed layer outside the space
            (EfficientViT's v channels beside the q and k channels holding
            it): they keep their number.
        contractions: products of two computed tensors that contract the
            units (q^T k); contraction.py divides one side's copies.
        kept_outputs: graph outputs carrying the units (only when asked for):
            the rewrite slices them back to the original units.
        size_edits: entries of size inputs computed at run time that become
            constants following the growth (runtime_shapes.SizeEdit).
        even_splits: Splits written with `num_outputs` (opset 18) whose
            outputs grow unequally: node -> its output sizes; the rewrite
            gives them explicit sizes (which `value_edits` grow).
        runtime_bounds: Slice bounds on the unit axis read at run time:
            (node, port, entry) -> the positions the bound must move by per
            unit added (runtime_shapes checks it).
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
    runtime_bounds: dict[tuple[int, int, int], int] = field(default_factory=dict)
    even_splits: dict[int, tuple[int, ...]] = field(default_factory=dict)
    kept_outputs: dict[str, Placement] = field(default_factory=dict)
    repeat_of: int | None = None
    fixed_features: int = 0
    contractions: list[int] = field(default_factory=list)

    @property
    def features_per_unit(self) -> int:
        """Output features of the seed layer per unit."""
        return self.unit_width * self.repeats

    @property
    def width(self) -> int:
        """The seed layer's width in features (units times features per unit, and those outside the space)."""
        return self.size * self.features_per_unit + self.fixed_features

    def units_of(self, width: int) -> int:
        """The number of units at which the seed layer is `width` features wide."""
        return (width - self.fixed_features) // self.features_per_unit

    @property
    def feature_step(self) -> int:
        """The step in features of the seed layer."""
        return self.step * self.features_per_unit

    @property
    def ok(self) -> bool:
        """Whether the group can grow exactly."""
        return self.refusal is None

    # -- the group protocol (shared with routing.RoutedGroup) ----------------

    @property
    def exact_only(self) -> bool:
        """Whether the group grows only exactly (no random-pad, no noise)."""
        return False

    def width_refusal(self, ir: GraphIR, width: int) -> str | None:
        """Why the seed layer cannot grow to `width` features, which must be
        larger than its width (None: it can)."""
        if (width - self.width) % self.feature_step:
            return f"width must be {self.width} + a multiple of {self.feature_step}{self.step_reason()}"
        return None

    def step_reason(self) -> str:
        """' (whole attention heads)' and the like: why the step is not 1."""
        why = " (whole attention heads" if self.unit_width > 1 else ""
        if self.repeats > 1:
            why += f"{' in' if why else ' (the same units in'} each of its {self.repeats} parts"
        why += ")" if why else ""
        if self.tile and not self.average_expansion:
            why += (f" (statistics are taken over the units, so every unit must be copied equally often; "
                    f"LEMON's average expansion does not apply: {self.average_blocker})")
        return why

    def next_width(self, ir: GraphIR, wanted: int) -> int | None:
        """The first valid width (in features) from `wanted` up."""
        step = self.feature_step
        return self.width + step * math.ceil((wanted - self.width) / step)

    def aligned_width(self, ir: GraphIR, multiple: int) -> int | None:
        """The smallest valid width that is a multiple of `multiple` (None: none nearby)."""
        return next_aligned(self.width, self.feature_step, multiple)

    def grown_weight_bytes(self, ir: GraphIR, size: int) -> float:
        """The bytes of the weights the group rewrites, once grown to `size` units."""
        needed = 0.0
        for edit in self.weight_edits:
            nbytes = constant_nbytes(ir, ir.nodes[edit.node].input[edit.port])
            length = edit.placement.length
            needed += nbytes / max(length, 1) * (length + edit.placement.growth() * (size - self.size))
        return needed

    def step_notes(self, ir: GraphIR) -> list[str]:
        """What `inspect` says about the kind of group, before its unit notes."""
        return []


def whole_axis_as_one_unit(placement: Placement, size: int) -> tuple[tuple[int, int], ...]:
    """A single head: plain units fill the axis a product contracts ([B, 1, T, d],
    no reshape split them), so a walk with all `size` of them as one unit (one
    head growing by copies) is worth a try: the retry factor, or () when the
    units do not fill the axis."""
    whole = (placement.offset == 0 and placement.inner == 1 and placement.outer == 1 and not placement.batch
             and not placement.starts and placement.length == size > 1)
    return ((size, 1),) if whole else ()


def axis_only(placement: Placement) -> Placement:
    """The placement on a parameter vector: the unit axis alone (axis 0, rank 1)."""
    return Placement(axis=0, rank=1, length=placement.length, offset=placement.offset,
                     inner=placement.inner, outer=placement.outer, starts=placement.starts)


def next_aligned(size: int, step: int, multiple: int) -> int | None:
    """The smallest width >= size that is a multiple of `multiple` and reachable
    in steps of `step` (None if there is none below a sane bound)."""
    target = -(-size // multiple) * multiple
    for candidate in range(target, size + multiple * max(step, 1) * 8 + 1, multiple):
        if (candidate - size) % step == 0:
            return candidate
    return None


def constant_nbytes(ir: GraphIR, tensor: str) -> int:
    """The stored size of the constant `tensor` (0 when it is computed)."""
    root = ir.const_root(tensor)
    if root is None:
        return 0
    kind, key = root
    if kind == "init":
        return tensor_nbytes(ir.initializers[key])
    for attr in ir.nodes[key].attribute:
        if attr.name == "value":
            return tensor_nbytes(attr.t)
    return 0
