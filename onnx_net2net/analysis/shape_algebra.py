"""Shape algebra: where units land through reshapes, and slice bounds.

A reshape of `src` into `dst` pairs runs of axes with equal element counts
(`reshape_segments`): [2, 3, 4] -> [6, 4] pairs (0, 2) with (0, 1) and
(2, 3) with (1, 2). Units on axis a of a run move as follows
(`map_through_reshape`):

* the run keeps one axis of the same length: the placement moves to it;
* flattening [.., F, r..] into one axis of F * prod(r) * prod(l) features
  (l the axes before a in the run): every unit becomes a block of
  `inner * prod(r)` consecutive positions, repeated `outer = prod(l)` times;
* the exact inverse (unflattening [.., F, ..] into [.., d_0, .., d_k, ..]):
  the units land on the axis d_j whose trailing product prod(d_j+1..d_k)
  divides their block, the leading ones matching their repeats;
* heads merged with a batch of unknown size B just before them, [.., B,
  H*d, ..] -> [.., B*H, d, ..] or [.., B, H, ..] -> [.., B*H, ..] (PyTorch's
  legacy `nn.MultiheadAttention`), and the inverse splits: row-major order
  puts head h of batch element b at b*H + h, so the units stay whole and
  apart, H per batch element (`Placement.batch`); the other dims must be
  known and equal on both sides (`_batch_merge`);
* otherwise the units are looked for by their flat-index strides
  (`_by_strides`): a reshape that regroups the axes around them (MobileViT's
  unfold, [1, C, H, W] -> [C * H / p, p, W / p, p]) keeps them apart when
  some axis of `dst` holds whole chunks and whole periods of their pattern;
  with a dynamic batch ([B, C, H, W] -> [B * C * H / p, p, W / p, p], the
  TorchScript export) the axis is the one of unknown size, whose extent is
  whole periods for every batch (`_by_strides_into_batch`): the units stay
  whole blocks of H / p rows, C * H / p rows per batch item
  (`Placement.batch`), and the fold maps them back (`_by_strides`);
* anything else (regrouping the unit axis itself) is refused, with the
  reason said precisely for a merge with a batch of unknown size.

`unit_layout_hints` proposes unit layouts (whole heads, repeated spaces)
suggested by a refused split; `clamp` resolves a Slice bound as ONNX does.
Pure functions of shapes: no graph, no walk.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .refusal import Refusal, RefusalKind
from .units import Placement

#: A placement mapped through a reshape, or the refusal (naming no node).
Mapped = tuple[Placement | None, Refusal | None]


def map_through_reshape(placement: Placement, src: tuple, dst: tuple) -> tuple[Placement | None, Refusal | None]:
    """Where the units land when a tensor of shape `src` is viewed as `dst`.

    Returns (placement, None) or (None, a Refusal naming no node). Handles axes that keep their
    length, merges of the unit axis with its neighbours (flattening), and the
    exact inverse of such a merge.
    """
    # A unit axis of 1 (a single head) beside a batch of unknown size is moved, not merged: shapes
    # cannot tell [?, 1] -> [1, ?] (an axis of 1 removed, another inserted) from a merge, and only
    # the first keeps a single head apart from the batch.
    merged = None if placement.length == 1 and not placement.batch else _batch_merge(placement, src, dst)
    if merged is not None:
        return merged
    lone = _lone_unit_on_an_axis_of_one(placement, src, dst)
    if lone is not None:
        return lone, None
    segments = reshape_segments(src, dst)
    if segments is None:
        # Unknown leading dims (a dynamic batch merged with the sequence, as
        # GPT-2's Conv1D does): axes in a common known suffix keep their place.
        from_end = placement.rank - placement.axis
        if from_end <= _common_known_suffix(src, dst):
            return placement.on_axis(len(dst) - from_end, len(dst)), None
        segments = _known_suffix_segments(src, dst)  # [T, B, H, d] -> [T*B, H*d]: H, d keep their block
        if not any(i0 <= placement.axis < i1 for (i0, i1), _ in segments):
            moved = _by_strides(placement, src, dst) or _by_strides_into_batch(placement, src, dst)
            return (moved, None) if moved is not None else (None, _unknown_dims_refusal(placement, src, dst))
    for (i0, i1), (j0, j1) in segments:
        if not i0 <= placement.axis < i1:
            continue
        a = placement.axis
        # Axes of size 1 merged in or split off (a batch of 1 merged with the heads) change nothing.
        lone_src = all(src[i] == 1 for i in range(i0, i1) if i != a)
        kept_dst = [j for j in range(j0, j1) if dst[j] != 1]
        if lone_src and len(kept_dst) == 1:
            if _one_unit_filling(placement, src) and kept_dst[0] > j0:
                # [.., d] -> [.., 1, d] with the d features one unit (a single head): the unit is the axis of 1
                return Placement(axis=kept_dst[0] - 1, rank=len(dst), length=1), None
            return placement.on_axis(kept_dst[0], len(dst)), None
        if len(kept_dst) == 1 and j1 - j0 > 1:
            j0, j1 = kept_dst[0], kept_dst[0] + 1
        if i1 - i0 == 1 and j1 - j0 == 1:
            return placement.on_axis(j0, len(dst)), None
        if j1 - j0 == 1:
            after = int(np.prod(src[a + 1:i1], dtype=np.int64))
            before = int(np.prod(src[i0:a], dtype=np.int64))
            if placement.outer != 1 and before == 1:
                # the repeats of a space stay on the merged axis ([.., 2 n, d] -> [.., 2 n d])
                return replace(placement, axis=j0, rank=len(dst), length=placement.length * after,
                               offset=placement.offset * after, inner=placement.inner * after), None
            if placement.outer != 1:
                return None, Refusal("flattening interleaved features again")
            length = placement.length * after
            return Placement(axis=j0, rank=len(dst), length=length * before, offset=placement.offset * after,
                             inner=placement.inner * after, outer=before), None
        if i1 - i0 == 1 or all(src[i] == 1 for i in range(i0, i1) if i != a):
            # (axes of size 1 merged in, such as a batch of 1 with the heads, change nothing)
            return _unflatten(placement, dst, j0, j1)
        moved = _by_strides(placement, src, dst)
        if moved is not None:
            return moved, None
        return None, Refusal(f"reshape {format_shape(src)} -> {format_shape(dst)} regroups the unit axis")
    return None, Refusal("the unit axis is not in the reshape")


def _unknown_dims_refusal(placement: Placement, src: tuple, dst: tuple) -> Refusal:
    """Why a reshape with unknown dims is refused: for a merge of the units
    with a batch of unknown size into one axis of `dst` (MobileViT's unfold
    with a dynamic batch), why the units would not stay whole there."""
    shapes = f"reshape {format_shape(src)} -> {format_shape(dst)}"
    unknown = [j for j, d in enumerate(dst) if d is None]
    if len(unknown) != 1 or None in src[placement.axis + 1:]:
        return Refusal(f"cannot match shape {format_shape(src)} to {format_shape(dst)} (unknown dims)")
    j = unknown[0]
    if _rows_on_axis(_unit_pattern(placement, src), int(np.prod(dst[j + 1:], dtype=np.int64))) is None:
        return Refusal(f"{shapes} merges the unit axis with a dim of unknown size (a dynamic batch) into axis {j}, "
                       f"and a position of axis {j} would hold parts of several units")
    return Refusal(f"{shapes} merges the unit axis with a dim of unknown size (a dynamic batch) into axis {j}, and "
                   f"the {int(np.prod(dst[:j], dtype=np.int64))} positions of the axes before it do not split the "
                   "units' layout into whole repeats")


def _unit_pattern(placement: Placement, src: tuple) -> tuple[int, int, int] | None:
    """(c, offset * S, Q) of `_by_strides`: the units' chunk, start and period
    in the flat index (None when a dim after the unit axis is unknown)."""
    if None in src[placement.axis + 1:] or placement.length % placement.outer or placement.starts:
        return None
    stride = int(np.prod(src[placement.axis + 1:], dtype=np.int64))
    return placement.inner * stride, placement.offset * stride, placement.block * stride


def _rows_on_axis(pattern: tuple[int, int, int] | None, step: int) -> int | None:
    """Positions per unit on an axis of stride `step` when its positions
    (rows) each hold a part of one unit only, else None."""
    if pattern is None or any(value % step for value in pattern):
        return None
    return pattern[0] // step


def _by_strides(placement: Placement, src: tuple, dst: tuple) -> Placement | None:
    """The units' positions in the flat (row-major) index, found again on one
    axis of `dst` (None if on none, or if a dim needed is unknown).

    With S = prod(src[a+1:]) the stride of the unit axis a, unit u holds, in
    every period of Q = block * S flat positions, the chunk of c = inner * S
    positions starting at (offset + u * inner) * S. An axis j of `dst` with
    stride S' = prod(dst[j+1:]) and extent E = S' * dst[j] holds the same
    units iff S' divides c, offset * S and Q (chunks and periods start on
    whole positions of j) and Q divides E (j holds whole periods): position y
    of j then belongs to unit u iff y mod (Q / S') lies in the chunk u of
    c / S' positions from offset * S / S'. MobileViT's unfold, [1, C, H, W] ->
    [C * H / p, p, W / p, p], keeps each channel in H / p consecutive rows.
    """
    pattern = _unit_pattern(placement, src)
    for j in range(len(dst)):
        if None in dst[j:] or dst[j] == 1:
            continue
        step = int(np.prod(dst[j + 1:], dtype=np.int64))
        extent = step * dst[j]
        if _rows_on_axis(pattern, step) is None or extent % pattern[2]:
            continue
        chunk, start, period = pattern
        return Placement(axis=j, rank=len(dst), length=dst[j], offset=start // step, inner=chunk // step,
                         outer=extent // period)
    return None


def _by_strides_into_batch(placement: Placement, src: tuple, dst: tuple) -> Placement | None:
    """`_by_strides` onto the one axis j of `dst` whose size is unknown: the
    units merged there with a batch of unknown size (MobileViT's unfold with
    a dynamic batch, [B, C, H, W] -> [B * C * H / p, p, W / p, p]).

    The flat index is U * K positions: U the product of the unknown dims
    (the batch), K that of the known ones (with the units' `length` for a
    placement already merged with a batch, whose axis is unknown). The units'
    pattern (chunk c, start, period Q) repeats K / Q times per batch item.
    Axis j has stride S' = prod(dst[j+1:]) and extent U * K / prod(dst[:j]):
    when S' divides c, start and Q, and Q * prod(dst[:j]) divides K, every
    extent holds whole periods for every U, so axis j holds blocks of Q / S'
    positions in which unit u has the `inner` = c / S' positions from
    (start + u * c) / S' (`Placement.batch`). Both ratios keep while the units
    grow: K / Q does not depend on their number."""
    unknown = [j for j, d in enumerate(dst) if d is None]
    pattern = _unit_pattern(placement, src)
    if len(unknown) != 1 or pattern is None or placement.outer != 1 and placement.batch:
        return None
    j = unknown[0]
    step = int(np.prod(dst[j + 1:], dtype=np.int64))
    chunk, start, period = pattern
    known = int(np.prod([d for d in src if d is not None], dtype=np.int64))
    if placement.batch and src[placement.axis] is None:
        known *= placement.length
    if _rows_on_axis(pattern, step) is None or known % (period * int(np.prod(dst[:j], dtype=np.int64))):
        return None
    return Placement(axis=j, rank=len(dst), length=period // step, offset=start // step, inner=chunk // step,
                     batch=True)


def _batch_merge(placement: Placement, src: tuple, dst: tuple) -> Mapped | None:
    """Units merged into (or split out of) a batch axis of unknown size just
    before them; None when the reshape is none of these forms."""
    for case in (_heads_into_batch, _axis_into_batch, _flat_into_batch, _heads_out_of_batch, _axis_out_of_batch,
                 _batch_out_both_ways):
        found = case(placement, src, dst)
        if found is not None:
            return found
    return None


def merges_only_if_batch_first(placement: Placement, src: tuple, dst: tuple) -> bool:
    """Whether `map_through_reshape` merges the units with a batch by the
    form [.., X*B, H*d, ..] -> [.., X, B*H, d, ..] (`_flat_into_batch`),
    which shapes alone do not prove."""
    return _flat_into_batch(placement, src, dst) is not None


def _merges_before(placement: Placement, src: tuple, dst: tuple) -> bool:
    """Plain units filling their axis, after an axis of unknown size in `src`."""
    a = placement.axis
    return (not placement.batch and a >= 1 and src[a - 1] is None and src[a] is not None and not placement.offset
            and placement.outer == 1 and placement.length == src[a])


def _heads_into_batch(placement: Placement, src: tuple, dst: tuple) -> Mapped | None:
    """[.., B, H*d, ..] -> [.., B*H, d, ..]: units of whole rows of d."""
    a = placement.axis
    if not _merges_before(placement, src, dst) or len(src) != len(dst) or dst[a - 1] is not None:
        return None
    width = dst[a]
    if not _equal_known(src, dst, (a - 1, a)) or not width or src[a] % width or src[a] <= width:
        return None
    if placement.inner % width:
        return None, Refusal("the reshape splits the unit axis across the units", RefusalKind.SPLITS_UNIT_AXIS,
                             retry=((width // math.gcd(placement.inner, width), 1),))
    return Placement(axis=a - 1, rank=len(dst), length=src[a] // width, inner=placement.inner // width,
                     batch=True), None


def _axis_into_batch(placement: Placement, src: tuple, dst: tuple) -> Mapped | None:
    """[.., B, H, ..] -> [.., B*H, ..]. Every other dim must be known: an
    unknown one before B could take part of the units ([T, B, 4] viewed as
    [T*B*2, 2] also reads [?, ?, 4] -> [?, ?])."""
    a = placement.axis
    if not _merges_before(placement, src, dst) or len(dst) != len(src) - 1 or dst[a - 1] is not None:
        return None
    if src[:a - 1] != dst[:a - 1] or src[a + 1:] != dst[a:] or None in src[:a - 1] or None in src[a + 1:]:
        return None
    return replace(placement, axis=a - 1, rank=len(dst), batch=True), None


def _flat_into_batch(placement: Placement, src: tuple, dst: tuple) -> Mapped | None:
    """[.., X*B, H*d, ..] -> [.., X, B*H, d, ..] (the inverse of
    `_batch_out_both_ways`), X known. Shapes alone do not show that the
    first axis is X*B: the walk accepts it only where the other side is
    already known to hold the units merged with the batch (rules/layout.py)."""
    a = placement.axis
    if not _merges_before(placement, src, dst) or len(dst) != len(src) + 1 or dst[a] is not None:
        return None
    width = dst[a + 1]
    if width is None or dst[a - 1] is None or src[a] % width or placement.inner % width:
        return None
    if src[:a - 1] != dst[:a - 1] or src[a + 1:] != dst[a + 2:] or None in src[a + 1:] or None in src[:a - 1]:
        return None
    return Placement(axis=a, rank=len(dst), length=src[a] // width, inner=placement.inner // width, batch=True), None


def _heads_out_of_batch(placement: Placement, src: tuple, dst: tuple) -> Mapped | None:
    """[.., B*H, d, ..] -> [.., B, H*d, ..] (the inverse of `_heads_into_batch`)."""
    a = placement.axis
    if not placement.batch or len(src) != len(dst) or a + 1 >= len(src) or dst[a] is not None:
        return None
    width = src[a + 1]
    if width is None or dst[a + 1] != width * placement.length or not _equal_known(src, dst, (a, a + 1)):
        return None
    return Placement(axis=a + 1, rank=len(dst), length=dst[a + 1], inner=placement.inner * width), None


def _axis_out_of_batch(placement: Placement, src: tuple, dst: tuple) -> Mapped | None:
    """[.., B*H, ..] -> [.., B, H, ..] (the inverse of `_axis_into_batch`)."""
    a = placement.axis
    if not placement.batch or len(dst) != len(src) + 1 or dst[a] is not None or dst[a + 1] != placement.length:
        return None
    if src[:a] != dst[:a] or src[a + 1:] != dst[a + 2:] or None in src[a + 1:]:
        return None
    return replace(placement, axis=a + 1, rank=len(dst), batch=False), None


def _batch_out_both_ways(placement: Placement, src: tuple, dst: tuple) -> Mapped | None:
    """[.., X, B*H, d, ..] -> [.., X*B, H*d, ..]: the batch joins the axis
    before, the units the features after (row-major: (x*B + b, h*d + i))."""
    a = placement.axis
    if not placement.batch or len(dst) != len(src) - 1 or a < 1 or a + 1 >= len(src) or src[a + 1] is None:
        return None
    if dst[a - 1] is not None or dst[a] != placement.length * src[a + 1] or src[:a - 1] != dst[:a - 1] or \
            src[a + 2:] != dst[a + 1:] or None in src[a + 2:] or None in src[:a - 1]:
        return None
    return Placement(axis=a, rank=len(dst), length=dst[a], inner=placement.inner * src[a + 1]), None


def _known_suffix_segments(src: tuple, dst: tuple) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Runs of trailing axes with equal known products, paired from the end
    (row-major order keeps such a trailing block whatever comes before it)."""
    segments, i, j = [], len(src), len(dst)
    while i > 0 and j > 0 and src[i - 1] is not None and dst[j - 1] is not None:
        i0, j0 = i - 1, j - 1
        a, b = src[i0], dst[j0]
        while a != b:
            if a < b and i0 > 0 and src[i0 - 1] is not None:
                i0 -= 1
                a *= src[i0]
            elif a > b and j0 > 0 and dst[j0 - 1] is not None:
                j0 -= 1
                b *= dst[j0]
            else:
                return segments
        segments.append(((i0, i), (j0, j)))
        i, j = i0, j0
    return segments


def _equal_known(src: tuple, dst: tuple, skip: tuple[int, ...]) -> bool:
    """Every axis but `skip` has the same known length on both sides."""
    return all(src[i] is not None and src[i] == dst[i] for i in range(len(src)) if i not in skip)


def _common_known_suffix(src: tuple, dst: tuple) -> int:
    """How many trailing axes `src` and `dst` share with equal, known lengths."""
    count = 0
    for a, b in zip(reversed(src), reversed(dst)):
        if a is None or a != b:
            break
        count += 1
    return count


def unit_layout_hints(placement: Placement, src: tuple, dst: tuple) -> tuple[tuple[int, int], ...]:
    """For plain units split as [.., F, ..] -> [.., d_0, ..., d_k, ..]: each
    axis d_j could hold the units, with d_j+1*..*d_k features per unit (the
    head size) repeated d_0*..*d_j-1 times (q, k, v of a fused projection)."""
    if placement.inner != 1 or placement.outer != 1 or placement.offset:
        return ()
    segments = reshape_segments(src, dst) or []
    for (i0, i1), (j0, j1) in segments:
        lone = all(src[i] == 1 for i in range(i0, i1) if i != placement.axis)
        if i0 <= placement.axis < i1 and lone and j1 - j0 > 1:
            return tuple((int(np.prod(dst[j + 1:j1], dtype=np.int64)), int(np.prod(dst[j0:j], dtype=np.int64)))
                         for j in range(j0, j1) if dst[j] > 1)
    return ()


def _unflatten(placement: Placement, dst: tuple, j0: int, j1: int) -> tuple[Placement | None, Refusal | None]:
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
    after = int(np.prod(dst[j0 + 1:j1], dtype=np.int64))
    if placement.outer > 1 and not placement.inner % after and not placement.offset % after \
            and not placement.block % after:
        # the repeats stay on the first axis ([S | S] of heads of d: [.., 2 n d] -> [.., 2 n, d])
        return Placement(axis=j0, rank=len(dst), length=dst[j0], offset=placement.offset // after,
                         inner=placement.inner // after, outer=placement.outer), None
    return None, Refusal("the reshape splits the unit axis across the units", RefusalKind.SPLITS_UNIT_AXIS)


def _lone_unit_on_an_axis_of_one(placement: Placement, src: tuple, dst: tuple) -> Placement | None:
    """A single unit on an axis of 1 (one head, [1, 1, T, d] with a static
    batch of 1) lands on the last axis of 1 of `dst` that starts where it
    does: merged with axes of 1 before it ([1, 1, T, d] -> [1, T, d]: the
    batch times the heads), or split out after them ([1, T, d] -> [1, 1, T,
    d]: the heads after the batch), never merged into the features after it:
    the axes after it must stay as they are (a flatten [1, 1, h, w] -> [1, h*w]
    of a one-channel map keeps the old reading). Only when every dim is known."""
    a = placement.axis
    if (placement.batch or placement.length != 1 or len(src) != placement.rank or src[a] != 1
            or None in src or None in dst):
        return None
    start = int(np.prod(src[:a], dtype=np.int64))
    axes = [d for d in range(len(dst)) if dst[d] == 1 and int(np.prod(dst[:d], dtype=np.int64)) == start
            and tuple(dst[d + 1:]) == tuple(src[a + 1:])]
    return Placement(axis=axes[-1], rank=len(dst), length=1) if axes else None


def _one_unit_filling(placement: Placement, src: tuple) -> bool:
    """One unit whose features fill its axis (a single attention head)."""
    return (placement.inner > 1 and placement.length == placement.inner == src[placement.axis]
            and placement.outer == 1 and not placement.offset and not placement.batch and not placement.starts)


def reshape_segments(src: tuple, dst: tuple) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """Pair runs of axes with equal element counts: [((i0, i1), (j0, j1)), ...]
    (None when unknown dims keep the runs from being matched)."""
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


def format_shape(shape) -> str:
    """[1, ?, 64]: a shape as messages show it (? for an unknown dim)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def clamp(value: int, length: int) -> int:
    """A Slice bound as ONNX resolves it on an axis of `length` positions."""
    if value < 0:
        value += length
    return max(0, min(value, length))
