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
* anything else (regrouping the unit axis) is refused.

`unit_layout_hints` proposes unit layouts (whole heads, repeated spaces)
suggested by a refused split; `clamp` resolves a Slice bound as ONNX does.
Pure functions of shapes: no graph, no walk.
"""

from __future__ import annotations

import numpy as np

from .refusal import Refusal, RefusalKind
from .units import Placement


def map_through_reshape(placement: Placement, src: tuple, dst: tuple) -> tuple[Placement | None, Refusal | None]:
    """Where the units land when a tensor of shape `src` is viewed as `dst`.

    Returns (placement, None) or (None, a Refusal naming no node). Handles axes that keep their
    length, merges of the unit axis with its neighbours (flattening), and the
    exact inverse of such a merge.
    """
    segments = reshape_segments(src, dst)
    if segments is None:
        # Unknown leading dims (a dynamic batch merged with the sequence, as
        # GPT-2's Conv1D does): axes in a common known suffix keep their place.
        from_end = placement.rank - placement.axis
        if from_end <= _common_known_suffix(src, dst):
            return placement.on_axis(len(dst) - from_end, len(dst)), None
        unit_dims_known = None not in src[placement.axis:] and None not in dst[1:]
        if unit_dims_known and dst[0] is None and len(src) - placement.axis > _common_known_suffix(src, dst):
            return None, Refusal(f"reshape {format_shape(src)} -> {format_shape(dst)} merges the unit axis into an "
                                 "axis of unknown size (with the batch, as MobileViT's unfold does): the units would "
                                 "not stay apart")
        return None, Refusal(f"cannot match shape {format_shape(src)} to {format_shape(dst)} (unknown dims)")
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
                return None, Refusal("flattening interleaved features again")
            after = int(np.prod(src[a + 1:i1], dtype=np.int64))
            before = int(np.prod(src[i0:a], dtype=np.int64))
            length = placement.length * after
            return Placement(axis=j0, rank=len(dst), length=length * before, offset=placement.offset * after,
                             inner=placement.inner * after, outer=before), None
        if i1 - i0 == 1 or all(src[i] == 1 for i in range(i0, i1) if i != a):
            # (axes of size 1 merged in, such as a batch of 1 with the heads, change nothing)
            return _unflatten(placement, dst, j0, j1)
        return None, Refusal(f"reshape {format_shape(src)} -> {format_shape(dst)} regroups the unit axis")
    return None, Refusal("the unit axis is not in the reshape")


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
    return None, Refusal("the reshape splits the unit axis across the units", RefusalKind.SPLITS_UNIT_AXIS)


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
