"""Layouts of a unit space in some parts of a layer's output.

When the walk of a layer's whole output refuses at a Split, Slice or
Concat that cuts through its units, the space may sit in some parts only,
the other parts holding other data (`UnitGroup.fixed_features`). These
functions list the layouts worth a walk (`Refusal.parts`), each a `Parts`
of `size` features at `starts` of the seed's output: one start is a space at
that offset; several are one space repeated there (q and k of q | k | v).
A wrong guess costs one walk: every layout is checked by a full walk
(search.py), at most MAX_PART_LAYOUTS per refusal.

* `part_layouts`: the parts of a split of the seed's whole output:
  neighbouring equal parts as repeats (EfficientViT's q | k), each part
  alone, largest first (FasterNet's [C/4 | 3C/4], InceptionNeXt), a run of
  parts as long as another part, piece by piece (MambaOut's [g | i | c],
  g's head gating i and its tail c), then larger sets of equal parts;
* `slice_parts`: the same over the ranges between the cuts of a Slice and
  its siblings (RexNet's `out[:, :C] += x`);
* `seed_parts`: where the seed's output sits inside a longer axis that a
  later cut passes through (MixNet's kernel groups over concatenated
  pointwise convs), the pieces in the seed's own positions.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from typing import TYPE_CHECKING

from ..ir import GraphIR
from .refusal import Parts
from .shape_algebra import clamp
from .units import Placement

if TYPE_CHECKING:  # the walk calls these; they only read its group and index
    from .walk import Walk

#: At most this many layouts of parts are suggested by one split or slice.
MAX_PART_LAYOUTS = 6


def part_layouts(sizes: list, starts) -> tuple[Parts, ...]:
    """Layouts in which some parts of a split of the whole seed output hold
    one space each: pairs of equal neighbouring parts first (q and k of
    q | k | v or q | k | v | g); when the parts are unequal, then each part
    alone, the largest first (FasterNet's partial convolution over
    [C/4 | 3C/4], InceptionNeXt's identity part), then runs of parts as long
    as another (`_gated_runs`), then larger sets of equal parts; when they are
    all equal, the larger sets (all of them alike is the (1, k) retry
    already), then each part alone (MixNet's kernel groups, which a later
    split cuts otherwise)."""
    by_size = defaultdict(list)
    for piece, size in enumerate(sizes):
        by_size[size].append(piece)
    neighbours, larger = [], []
    for size, pieces in by_size.items():
        for count in range(len(pieces), 1, -1):
            for chosen in combinations(pieces, count):
                if count == len(sizes):
                    continue
                layout = Parts(size, tuple(int(starts[piece]) for piece in chosen))
                (neighbours if count == 2 and chosen[1] == chosen[0] + 1 else larger).append(layout)
    alone = sorted((Parts(int(size), (int(starts[piece]),)) for piece, size in enumerate(sizes)),
                   key=lambda parts: -parts.size)  # the largest space first
    if len(by_size) > 1:
        return tuple((neighbours + alone + _gated_runs(sizes, starts) + larger)[:MAX_PART_LAYOUTS])
    return tuple((neighbours + larger + alone)[:MAX_PART_LAYOUTS])  # equal parts alone last (MixNet's groups)


def _gated_runs(sizes: list, starts) -> list[Parts]:
    """A run of neighbouring parts as long as another part may be its repeat,
    piece by piece (MambaOut's gated block: [g | i | c], g gating cat(i,
    conv(c)), pairs the head of g with i and its tail with c): each part of
    the run with the same range of the longer part."""
    layouts = []
    for whole, size in enumerate(sizes):
        for first in range(len(sizes)):
            for last in range(first + 1, len(sizes)):
                if first <= whole <= last or sum(sizes[first:last + 1]) != size:
                    continue
                for piece in range(first, last + 1):
                    inside = int(starts[whole]) + int(starts[piece] - starts[first])
                    layouts.append(Parts(int(sizes[piece]), tuple(sorted((inside, int(starts[piece]))))))
    return layouts


def seed_parts(walk: Walk, placement: Placement, cuts) -> tuple[Parts, ...]:
    """Where the seed's units sit in a range of a longer axis (MixNet's
    grouped pointwise convs concatenated, then split again into kernel groups
    of other sizes) and the cuts there pass through them: the pieces between
    the cuts, in the seed's own positions, all alike when equal (one space
    repeated), then each alone, the largest first. The units may themselves be
    one part of the seed's output (a part of a part: MixNet's squeeze-excite
    gate, cut in halves by the projection and in kernel groups by the
    product it gates)."""
    group = walk.group
    seed = group.placements.get(walk.ir.nodes[group.seed].output[0])
    if (seed is None or seed.starts or placement.outer != 1 or placement.inner != 1 or placement.starts
            or group.unit_width != 1 or group.repeats != 1):
        return ()
    lo, hi = placement.offset, placement.offset + group.size
    local = sorted({0, group.size} | {int(cut) - lo for cut in cuts if lo < cut < hi})
    pieces = [(seed.offset + start, end - start) for start, end in zip(local, local[1:])]
    if len(pieces) < 2:
        return ()
    sizes = {size for _, size in pieces}
    alike = [Parts(pieces[0][1], tuple(start for start, _ in pieces))] if len(sizes) == 1 else []
    alone = sorted((Parts(size, (start,)) for start, size in pieces), key=lambda parts: -parts.size)
    return tuple(alike + alone)[:MAX_PART_LAYOUTS]


def slice_parts(ir: GraphIR, index: int, axis: int, kept: tuple[int, int], length: int) -> tuple[Parts, ...]:
    """Layouts of a space in some parts of the seed output, for a Slice that
    cuts through it: the parts are the ranges between the cuts this Slice and
    its siblings (Slices of the same tensor with constant bounds on the axis:
    the chunks of a stream) make, tried as for a Split (`part_layouts`;
    RexNet's partial residual adds the shortcut to the first channels of a
    wider output: the kept range alone)."""
    cuts = {0, length, *kept}
    source = ir.nodes[index].input[0]
    for use in ir.uses(source):
        bounds = _constant_bounds(ir, use.node, axis, length) if use.port == 0 else None
        cuts.update(bounds or ())
    cuts = sorted(cuts)
    return part_layouts([hi - lo for lo, hi in zip(cuts, cuts[1:])], cuts)


def _constant_bounds(ir: GraphIR, index: int, axis: int, length: int) -> tuple[int, int] | None:
    """[start, end) of a Slice with constant bounds and step 1 on `axis`, clamped to `length`."""
    node = ir.nodes[index]
    if node.op_type != "Slice" or len(node.input) < 3:
        return None
    names = (list(node.input[1:5]) + ["", ""])[:4]
    if any(name and not ir.is_const(name) for name in names):
        return None
    starts, ends, axes, steps = (ir.const_value(name) if name else None for name in names)
    rank = ir.rank(node.input[0])
    if rank is None:
        return None
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    if axis not in axes:
        return None
    k = axes.index(axis)
    if steps is not None and int(steps.reshape(-1)[k]) != 1:
        return None
    return clamp(int(starts.reshape(-1)[k]), length), clamp(int(ends.reshape(-1)[k]), length)
