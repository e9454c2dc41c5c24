"""The unit mapping g of a widening and where it puts each position.

A group of n units grows to q: new unit j copies old unit g(j) (the first n
keep their place; with blocks, each block keeps its units first). On a
tensor whose axis holds the space at a `Placement` (an offset, units of
`inner` features, `outer` repeats, or repeats at uneven `starts`), the
grown axis reads old position `source_index[p]` at each position p, and
`unit_slots[p]` is the unit j there (-1 outside the space).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..analysis import Placement


@dataclass
class UnitMapping:
    """g: new unit j -> old unit g(j), which new units are added, and c(u).

    With `blocks` > 1 (grouped convolutions) the units form equal blocks; each
    block keeps its old units in order, followed by its new units, which copy
    units of the same block. With one block, the first n units keep their place.
    """

    g: np.ndarray
    is_new: np.ndarray
    counts: np.ndarray
    #: Units that carry the mean of the old units (LEMON's average expansion)
    #: instead of copying one; their g is 0 and they are not in `counts`.
    is_average: np.ndarray | None = None
    #: What the average units carry: "mean" (LayerNorm) or "zero" (RMSNorm).
    extras: str = "mean"

    @property
    def old(self) -> int:
        return len(self.counts)

    @property
    def new(self) -> int:
        return len(self.g)

    @classmethod
    def tile(cls, n: int, q: int) -> UnitMapping:
        """Every unit copied q/n times: g(j) = j mod n."""
        g = np.arange(q, dtype=np.int64) % n
        return cls(g, np.arange(q) >= n, np.bincount(g, minlength=n))

    @classmethod
    def average(cls, n: int, q: int, extras: str = "mean") -> UnitMapping:
        """LEMON: each unit copied q // n times, then q % n units that carry
        the mean of the units (or zero, for an RMS norm)."""
        tiled = q // n * n
        g = np.concatenate([np.arange(tiled) % n, np.zeros(q - tiled)]).astype(np.int64)
        is_average = np.arange(q) >= tiled
        return cls(g, np.arange(q) >= n, np.bincount(g[:tiled], minlength=n), is_average, extras)

    @property
    def variance_ratio(self) -> float:
        """s = k*n / q: the variance of the widened units over that of the old."""
        return 1.0 if self.is_average is None else float((~self.is_average).sum()) / self.new

    @classmethod
    def draw(cls, n: int, q: int, rng: np.random.Generator, blocks: int = 1) -> UnitMapping:
        per_old, per_added = n // blocks, (q - n) // blocks
        g, is_new = [], []
        for block in range(blocks):
            start = block * per_old
            g += [start + np.arange(per_old), start + rng.integers(0, per_old, size=per_added)]
            is_new += [np.zeros(per_old, bool), np.ones(per_added, bool)]
        g = np.concatenate(g).astype(np.int64)
        return cls(g, np.concatenate(is_new), np.bincount(g, minlength=n))

    def block(self, index: int, blocks: int) -> UnitMapping:
        """The mapping restricted to one block, in the block's local numbering."""
        per_new, per_old = self.new // blocks, self.old // blocks
        window = slice(index * per_new, (index + 1) * per_new)
        local = self.g[window] - index * per_old
        return UnitMapping(local, self.is_new[window], self.counts[index * per_old:(index + 1) * per_old])


def source_index(placement: Placement, mapping: UnitMapping) -> np.ndarray:
    """For each position of the widened axis, the old position it copies."""
    if placement.starts:
        return _uneven_repeats(placement, mapping)[0]
    block = placement.block
    base = np.arange(block)
    units = (placement.offset + mapping.g[:, None] * placement.inner + np.arange(placement.inner)).ravel()
    end = placement.offset + mapping.old * placement.inner
    new_block = np.concatenate([base[: placement.offset], units, base[end:]])
    return (new_block[None, :] + block * np.arange(placement.outer)[:, None]).ravel()


def unit_slots(placement: Placement, mapping: UnitMapping) -> np.ndarray:
    """For each position of the widened axis, its unit j (or -1 outside the space)."""
    if placement.starts:
        return _uneven_repeats(placement, mapping)[1]
    n, q = mapping.old, mapping.new
    new_block = placement.block + (q - n) * placement.inner
    slots = np.full(new_block, -1, dtype=np.int64)
    span = np.repeat(np.arange(q), placement.inner)
    slots[placement.offset: placement.offset + q * placement.inner] = span
    return np.tile(slots, placement.outer)


def _uneven_repeats(placement: Placement, mapping: UnitMapping) -> tuple[np.ndarray, np.ndarray]:
    """source_index and unit_slots of a space repeated at uneven starts: the
    data between the repeats keeps its order, each repeat is widened by g."""
    n, q, inner = mapping.old, mapping.new, placement.inner
    units = (mapping.g[:, None] * inner + np.arange(inner)).ravel()
    sources, slots, done = [], [], 0
    for start in placement.starts:
        first = start + placement.offset
        sources += [np.arange(done, first), first + units]
        slots += [np.full(first - done, -1), np.repeat(np.arange(q), inner)]
        done = first + n * inner
    sources.append(np.arange(done, placement.length))
    slots.append(np.full(placement.length - done, -1))
    return np.concatenate(sources).astype(np.int64), np.concatenate(slots).astype(np.int64)


def original_positions(placement: Placement, mapping: UnitMapping) -> np.ndarray:
    """Positions of the widened axis that hold an original unit or other data."""
    slots = unit_slots(placement, mapping)
    return np.flatnonzero((slots < 0) | ~mapping.is_new[np.maximum(slots, 0)])


def repeat_index(placement: Placement, mapping: UnitMapping) -> np.ndarray:
    """For each position of the widened axis, the repeat of the space it is in (or -1 outside it)."""
    slots = unit_slots(placement, mapping)
    if placement.starts:
        span = mapping.new * placement.inner
        repeats, done = [], 0
        for r, start in enumerate(placement.starts):
            first = start + placement.offset + (mapping.new - mapping.old) * placement.inner * r
            repeats += [np.full(first - done, -1), np.full(span, r)]
            done = first + span
        repeats.append(np.full(len(slots) - done, -1))
        return np.concatenate(repeats).astype(np.int64)
    block = len(slots) // placement.outer
    return np.where(slots >= 0, np.arange(len(slots)) // block, -1)
