"""Net2WiderNet: replicate units and divide their outgoing weights.

A unit space S of n units grows to q units with a mapping
g: {0..q-1} -> {0..n-1}, g(j) = j for j < n and g(j) drawn uniformly for j >= n.
With c(u) = |{j : g(j) = u}| copies of unit u:

* producers (Conv/Gemm/MatMul outputs, biases, BatchNormalization and other
  per-unit constants) copy:        W'[.., j, ..] = W[.., g(j), ..]
* consumers (the contracted axis of the next Conv/Gemm/MatMul) split:
                                   V'[.., j, ..] = V[.., g(j), ..] * a_j
  with sum over the copies of u of a_j = 1: a_j = 1/c(u) for `split="equal"`
  (the paper), random positive fractions for `split="random"` (exact, and
  the copies no longer get identical gradients).
* `split="zero-sum"` (HyperCloning): V'[.., j, ..] = V[.., g(j), ..] / c(u) + e_j
  with e_j ~ N(0, (s * std(V))^2) drawn per element and centred over the
  copies of u (e_j - mean over the copies), so sum_j e_j = 0: +e/-e for two
  copies, a zero-sum vector for more. s is `noise` (ZERO_SUM_NOISE when 0).
  The sum over the copies, and so the function, is unchanged (exact up to one
  float rounding: computed in float64, rounded once), yet the copies differ.

Every op between producers and consumers acts per unit, so the copies carry
identical values and y' = y. Divisions live in the consumers' weights, never
on activations, which is why any activation stays exact.

Otherwise `noise` adds the paper's Gaussian noise (relative to each weight's std) to the
replicated entries; `init="random-pad"` is the paper's non-preserving baseline
(new units random, old units untouched). Both change the function on purpose.

`init="fresh"` copies no unit: new units get a fresh incoming side and zero
outgoing weights (fresh_init.py states the rule and when it is exact).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from ..analysis import Placement, UnitGroup
from ..editor import GraphEditor
from ..ir import GraphIR
from ..ops import WEIGHTED_LAYERS
from ..options import Init, Split
from .fresh_init import fresh_units
from .unit_mapping import UnitMapping, original_positions, repeat_index, source_index, unit_slots

#: The +/- magnitude of `split="zero-sum"`, relative to each consumer weight's
#: std, when `noise` is 0.
ZERO_SUM_NOISE = 0.1
#: Ops that keep finite values finite whatever the input: units with zero
#: incoming weights stay harmless through them.
_FINITE_SAFE = frozenset("""
    Conv ConvTranspose Gemm MatMul Add Sub Mul Relu LeakyRelu PRelu Sigmoid Tanh Gelu Erf Elu Selu Celu
    Softplus Softsign HardSigmoid HardSwish Mish Clip Abs Neg Identity Dropout Cast BatchNormalization
    MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool Concat Split Slice Transpose
    Flatten Reshape Squeeze Unsqueeze Pad Shape Max Min Where Sum Mean Gather Resize
""".split())


@dataclass
class WidenOptions:
    """How new units are initialised.

    Attributes:
        split: "equal" (divide by the copy count), "random" (random fractions
            summing to one) or "zero-sum" (equal fractions plus noise that sums
            to zero over the copies); all three are exact, the last two break
            the copies' symmetry.
        noise: with split "equal" or "random": std of Gaussian noise added to
            replicated weights, relative to each weight tensor's std (changes
            the function; 0: exact). With split "zero-sum": the std of the
            zero-sum noise, relative to each consumer weight's std (the model
            stays exact; 0 means ZERO_SUM_NOISE).
        init: "net2net" (function-preserving), "fresh" (function-preserving:
            new units get PyTorch's default init for their incoming weights
            and bias and zero outgoing weights; the old units are untouched),
            "zero" (function-preserving: new units get zero outgoing weights,
            so the original weights are kept as they are; for alignment, not
            for training), or "random-pad" (the paper's baseline: new units
            random, not preserving).
        seed: seeds the mapping g, the split fractions and the noise.
    """

    split: str = "equal"
    noise: float = 0.0
    init: str = "net2net"
    seed: int = 0

    @property
    def exact(self) -> bool:
        return (self.noise == 0 or self.split == Split.ZERO_SUM) and self.init != Init.RANDOM_PAD

    @property
    def zero_sum_scale(self) -> float:
        """The relative std of the zero-sum noise (0 unless split is "zero-sum")."""
        if self.split != Split.ZERO_SUM:
            return 0.0
        return self.noise or ZERO_SUM_NOISE

    @property
    def added_noise(self) -> float:
        """The relative std of the function-changing noise on replicated weights."""
        return 0.0 if self.split == Split.ZERO_SUM else self.noise


@dataclass
class GrownGroup:
    """What one widening changed (for the report)."""

    layers: list[str]
    old_width: int
    new_width: int
    tensors: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    #: size inputs computed at run time now fed constants following the growth
    size_inputs: list[str] = field(default_factory=list)
    #: graph outputs sliced back to their original units (keep_output_shapes)
    sliced_outputs: list[str] = field(default_factory=list)


def widen_group(ir: GraphIR, group: UnitGroup, size: int, options: WidenOptions,
                layer_names: list[str]) -> GrownGroup:
    """Apply the widening of `group` to `size` units (heads when the units
    are attention heads) on the model of `ir`."""
    n, q = group.size, size
    rng = np.random.default_rng(options.seed)
    if group.tile:
        mapping = UnitMapping.tile(n, q) if q % n == 0 else UnitMapping.average(n, q, group.extras)
    else:
        mapping = UnitMapping.draw(n, q, rng, group.step)
    record = GrownGroup(layers=layer_names, old_width=group.width, new_width=q * group.features_per_unit + group.fixed_features,
                        tensors=sorted(group.placements))

    by_input = defaultdict(list)
    for edit in group.weight_edits:
        by_input[(edit.node, edit.port)].append(edit)
    zero_incoming = options.init == Init.ZERO and group.ops <= _FINITE_SAFE
    new_values = {}
    for (node, port), edits in by_input.items():
        value = ir.const_value(ir.nodes[node].input[port])
        edit_context = _EditContext(options, rng, value,
                                    is_layer_weight=port == 1 and ir.nodes[node].op_type in WEIGHTED_LAYERS,
                                    zero_incoming=zero_incoming)
        for edit in sorted(edits, key=lambda e: (e.axis, e.role)):
            value = _apply_edit(value, edit, mapping, edit_context)
        new_values[(node, port)] = value
    if options.init == Init.FRESH:
        fresh_units(ir, by_input, new_values, mapping, rng)
    ratio = mapping.variance_ratio
    for norm in group.decomposed_norms if ratio != 1.0 else ():
        node, port = norm.epsilon
        epsilon = ir.const_value(ir.nodes[node].input[port])
        new_values[(node, port)] = (epsilon.astype(np.float64) * ratio).astype(epsilon.dtype)
    with GraphEditor(ir) as edit:
        record.weights = edit.store_constants(new_values)
        _apply_value_edits(edit, group, q - n)
        for change in group.attribute_edits:
            edit.add_to_attribute(ir.nodes[change.node], change.name, change.per_unit * (q - n))
        _scale_norm_epsilons(edit, group, mapping.variance_ratio)
        if group.size_edits:
            from .sizes import apply_size_edits

            record.size_inputs = apply_size_edits(edit, group.size_edits, q - n)
        if group.kept_outputs:
            from .outputs import slice_kept_outputs

            record.sliced_outputs = slice_kept_outputs(edit, group.kept_outputs,
                                                       lambda placement: original_positions(placement, mapping))
    return record


def _scale_norm_epsilons(edit: GraphEditor, group: UnitGroup, ratio: float) -> None:
    """epsilon * s keeps (var + eps) in proportion when the variance became s * var."""
    if ratio == 1.0:
        return
    for index in group.norms:
        edit.scale_attribute(edit.ir.nodes[index], "epsilon", ratio, default=1e-5)


@dataclass
class _EditContext:
    options: WidenOptions
    rng: np.random.Generator
    original: np.ndarray  # the constant before its edits
    is_layer_weight: bool
    zero_incoming: bool

    @cached_property
    def reference_std(self) -> float:
        """The std of the original constant (computed only for the options that scale noise by it)."""
        return float(np.std(self.original)) if self.original.size else 0.0


def _apply_edit(value: np.ndarray, edit, mapping: UnitMapping, context: _EditContext) -> np.ndarray:
    if edit.groups > 1:
        return _apply_grouped_edit(value, edit, mapping, context)
    placement, axis = edit.placement, edit.axis
    if edit.role == "positions":
        return _every_position(value, axis, len(source_index(placement, mapping)))
    original = value
    value = np.take(value, source_index(placement, mapping), axis=axis)
    slots = unit_slots(placement, mapping)
    if mapping.is_average is not None:
        value = _average_units(value, original, edit, mapping, slots)
    shape = [1] * value.ndim
    shape[axis] = -1
    in_space = slots >= 0
    new = (in_space & mapping.is_new[np.maximum(slots, 0)]).reshape(shape)
    options = context.options
    if edit.divided:
        value = _divide_copies(value, edit, mapping, slots, options)
    if options.init in (Init.ZERO, Init.FRESH):  # FRESH: the incoming side is drawn later (fresh_units)
        if edit.role == "split" or (context.zero_incoming and context.is_layer_weight):
            value = np.where(new, np.zeros((), value.dtype), value)
        return value
    if options.init == Init.RANDOM_PAD:
        if edit.role == "split" or context.is_layer_weight:
            noise = context.rng.normal(0.0, context.reference_std or 1.0, size=value.shape).astype(value.dtype)
            value = np.where(new, noise, value)
        return value
    if edit.role == "split":
        split = Split.EQUAL if options.split == Split.ZERO_SUM else options.split
        factors = _split_factors(value.shape, axis, slots, mapping, split, context.rng)
        if options.zero_sum_scale and np.issubdtype(value.dtype, np.floating):
            split_value = value.astype(np.float64) * factors
            scale = options.zero_sum_scale * context.reference_std
            split_value += _zero_sum_noise(value.shape, axis, slots, mapping, scale, context.rng)
            value = split_value.astype(value.dtype)  # one rounding, not two
        else:
            value = scaled_once(value, factors)
    if options.added_noise > 0 and np.issubdtype(value.dtype, np.floating):
        copies = mapping.counts[mapping.g[np.maximum(slots, 0)]]
        replicated = in_space & (copies > 1) if edit.role == "split" else new.reshape(-1)
        noise = context.rng.normal(0.0, options.added_noise * context.reference_std, size=value.shape)
        value = value + (noise * replicated.reshape(shape)).astype(value.dtype)
    return value


def _divide_copies(value: np.ndarray, edit, mapping: UnitMapping, slots: np.ndarray,
                   options: WidenOptions) -> np.ndarray:
    """The divided side of a contraction over the units (analysis/contraction.py):
    in the repeats `edit.divided`, every copy of unit u carries its value / c(u)
    (with `init="zero"`: the old units keep theirs, the new ones carry 0)."""
    shape = [1] * value.ndim
    shape[edit.axis] = -1
    divided = (slots >= 0) & np.isin(repeat_index(edit.placement, mapping), edit.divided)
    if options.init in (Init.ZERO, Init.FRESH):
        new = divided & mapping.is_new[np.maximum(slots, 0)]
        return np.where(new.reshape(shape), np.zeros((), value.dtype), value)
    copies = mapping.counts[mapping.g[np.maximum(slots, 0)]]
    factors = np.where(divided, 1.0 / np.maximum(copies, 1), 1.0)
    return scaled_once(value, factors.reshape(shape))


def _give_split_sizes(edit: GraphEditor, index: int, sizes: tuple[int, ...], changes, added: int) -> None:
    """A Split of `num_outputs` equal parts whose outputs grow unequally
    reads explicit sizes instead (the attribute and a sizes input exclude
    each other)."""
    grown = np.array(sizes, dtype=np.int64)
    for change in changes:
        grown[change.index] += change.per_unit * added
    node = edit.ir.nodes[index]
    name = edit.add_initializer(grown, edit.fresh_name(f"{node.output[0]}/sizes"))
    if len(node.input) > 1:
        node.input[1] = name  # an empty name: the optional input left out
    else:
        node.input.append(name)
    kept = [attribute for attribute in node.attribute if attribute.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _every_position(indices: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Gather indices reading every position of the grown axis in order (they read every old one)."""
    shape = list(indices.shape)
    shape[axis] = length
    return np.arange(length, dtype=indices.dtype).reshape(shape)


def _average_units(value: np.ndarray, original: np.ndarray, edit, mapping: UnitMapping,
                   slots: np.ndarray) -> np.ndarray:
    """LEMON's entries for the average units and the normalisation's scale:
    producers give the extra units the mean of the units' entries (zero
    before an RMS norm), consumers read them with weight 0, a LayerNorm's B
    is 0 there and its Scale is multiplied by sqrt(s) everywhere (the copies'
    variance, or mean square, shrank by s)."""
    placement, axis = edit.placement, edit.axis
    extra = (slots >= 0) & mapping.is_average[np.maximum(slots, 0)]
    moved = np.moveaxis(value, axis, 0).copy()
    if edit.role == "copy" and mapping.extras == "zero":
        moved[extra] = 0
    elif edit.role in ("copy", "norm-scale"):
        old = np.moveaxis(original, axis, 0).astype(np.float64)
        per_block = old.reshape((placement.outer, placement.block) + old.shape[1:])
        units = per_block[:, placement.offset: placement.offset + mapping.old * placement.inner]
        units = units.reshape((placement.outer, mapping.old, placement.inner) + old.shape[1:])
        mean = units.mean(axis=1)  # [outer, inner, ...]
        positions = np.nonzero(extra)[0]
        block, within = np.divmod(positions, len(slots) // placement.outer)
        moved[positions] = mean[block, (within - placement.offset) % placement.inner].astype(value.dtype)
    elif edit.role in ("split", "norm-bias"):
        moved[extra] = 0
    if edit.role == "norm-scale":
        moved = (moved.astype(np.float64) * np.sqrt(mapping.variance_ratio)).astype(value.dtype)
    return np.moveaxis(moved, 0, axis)


def _apply_grouped_edit(value: np.ndarray, edit, mapping: UnitMapping, context: _EditContext) -> np.ndarray:
    """A grouped conv's input channels: its weight holds each group's channels
    in local numbering on axis 1, for that group's block of output rows (with
    the space repeated R times, group k is block k mod G/R of its repeat)."""
    groups = edit.groups
    per_repeat = groups // edit.placement.outer
    rows = value.shape[0] // groups
    local = replace(edit, groups=1, placement=Placement(axis=1, rank=value.ndim, length=value.shape[1]))
    pieces = [_apply_edit(value[k * rows:(k + 1) * rows], local, mapping.block(k % per_repeat, per_repeat), context)
              for k in range(groups)]
    return np.concatenate(pieces, axis=0)


_SCALE_BLOCK_BYTES = 16 << 20


def scaled_once(value: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """`(value.astype(float64) * factors).astype(value.dtype)` (one rounding),
    a block of leading-axis rows at a time: the same values without a float64
    copy of the whole tensor."""
    if value.ndim == 0 or value.nbytes <= _SCALE_BLOCK_BYTES:
        return (value.astype(np.float64) * factors).astype(value.dtype)
    out = np.empty(np.broadcast_shapes(value.shape, factors.shape), dtype=value.dtype)
    rows = max(1, _SCALE_BLOCK_BYTES // max(1, value[0].size * 8))
    for start in range(0, value.shape[0], rows):
        block = slice(start, start + rows)
        block_factors = factors if factors.shape[0] == 1 else factors[block]
        out[block] = value[block].astype(np.float64) * block_factors
    return out


def _split_factors(shape, axis, slots, mapping: UnitMapping, split, rng) -> np.ndarray:
    """Per-element fractions a_j that sum to one over the copies of each unit."""
    positions_shape = [1] * len(shape)
    positions_shape[axis] = -1
    g, counts = mapping.g, mapping.counts
    copies = np.where(slots >= 0, counts[g[np.maximum(slots, 0)]], 1).astype(np.float64)
    if split == "equal":
        return (1.0 / copies).reshape(positions_shape)
    factors = np.ones(shape, dtype=np.float64)
    moved = np.moveaxis(factors, axis, 0)
    copies_of = g if mapping.is_average is None else np.where(mapping.is_average, -1, g)
    for unit in np.nonzero(counts > 1)[0]:
        positions = np.stack([np.nonzero(slots == j)[0] for j in np.nonzero(copies_of == unit)[0]])
        moved[positions] = random_fractions(rng, positions.shape + moved.shape[1:])
    return factors


def random_fractions(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """`split="random"`: fractions that sum to one over axis 0 (the copies of
    a unit), each drawn from U(0.25, 1.75) before normalising, so no copy
    gets less than 1/7 of another's share."""
    draws = rng.uniform(0.25, 1.75, size=shape)
    return draws / draws.sum(axis=0, keepdims=True)


def _zero_sum_noise(shape, axis, slots, mapping: UnitMapping, scale: float, rng) -> np.ndarray:
    """Per-element Gaussian noise (std `scale`) on the copies of each copied
    unit, centred over those copies so that it sums to zero there."""
    noise = np.zeros(shape, dtype=np.float64)
    moved = np.moveaxis(noise, axis, 0)
    g, counts = mapping.g, mapping.counts
    copies_of = g if mapping.is_average is None else np.where(mapping.is_average, -1, g)
    for unit in np.nonzero(counts > 1)[0]:
        positions = np.stack([np.nonzero(slots == j)[0] for j in np.nonzero(copies_of == unit)[0]])
        draws = rng.normal(0.0, scale, size=positions.shape + moved.shape[1:])
        moved[positions] = draws - draws.mean(axis=0, keepdims=True)
    return noise


def _apply_value_edits(edit: GraphEditor, group: UnitGroup, added: int) -> None:
    ir = edit.ir
    grouped = defaultdict(list)
    for change in group.value_edits:
        grouped[(change.node, change.port)].append(change)
    values = {}
    for (node, port), changes in grouped.items():
        if node in group.even_splits:
            _give_split_sizes(edit, node, group.even_splits[node], changes, added)
            continue
        value = ir.const_value(ir.nodes[node].input[port]).copy()
        flat = value.reshape(-1)
        for change in changes:
            flat[change.index] += change.per_unit * added
        values[(node, port)] = value
    edit.store_constants(values)
