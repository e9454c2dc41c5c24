"""Refusals: why a model, a layer or a width cannot grow exactly.

The analysis and the rewrites raise one type, `Refusal`: the reason users
read, a `RefusalKind` that code tests instead of the wording, the node that
refused (index and name) with its op, and the refusals it was derived from
(`causes`: a later layout tried, a routing region). Passes turn a refusal
into the user-facing `errors.GrowthRefused` (passes.py); nothing else does.

Its message is `"<op> <node>: <reason>"` (or `"<node>: <reason>"` when the
node is a layer refused as a whole, or only the reason when no node is to
blame).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RefusalKind(Enum):
    """What kind of obstacle a refusal names (tested by code, never shown)."""

    UNSUPPORTED = "unsupported"            # an op or layout the analysis does not handle exactly
    CHANNEL_SHUFFLE = "channel shuffle"    # a shuffle interleaves the units with other channels
    SPLITS_UNIT_AXIS = "splits unit axis"  # a reshape splits the unit axis across the units
    MALFORMED = "malformed"                # a node breaks its op's schema
    RUNTIME_SIZE = "runtime size"          # a size read at run time would not follow the units
    NOT_ROUTABLE = "not routable"          # not a channel routing region, or not at this width
    TRIAL_FAILED = "trial failed"          # inspect's trial rewrite did not verify
    NOT_DEEPENABLE = "not deepenable"      # no identity layer or block can be inserted here


@dataclass(frozen=True)
class Parts:
    """Parts of a layer's output that may hold one space each (of `size`
    features, at `starts`), the rest of the output holding other data."""

    size: int
    starts: tuple[int, ...]


@dataclass(eq=False)
class Refusal(Exception):
    """Why something cannot grow exactly.

    Attributes:
        reason: what users read (after the node).
        kind: the obstacle, for code that decides by it.
        node: the index of the node that refused, when one did.
        node_name: its readable name (`GraphIR.label`).
        op: its op type, when the node refused as an op (shown before its
            name); None when a layer is refused as a whole.
        causes: the refusals this one was derived from.
        retry: other unit layouts worth a walk, as factors (features per
            unit, repeats) of the current one: a reshape into [heads, head
            size] suggests whole heads; an even Split of the whole space
            suggests one space repeated.
        parts: layouts worth a walk in which the space sits in some parts of
            the layer's output only (an uneven split of the whole output:
            EfficientViT's q | k | v, q and k holding one space, v another).
    """

    reason: str
    kind: RefusalKind = RefusalKind.UNSUPPORTED
    node: int | None = None
    node_name: str | None = None
    op: str | None = None
    causes: tuple[Refusal, ...] = ()
    retry: tuple[tuple[int, int], ...] = ()
    parts: tuple[Parts, ...] = ()

    def __post_init__(self) -> None:
        super().__init__(self.reason)

    def __str__(self) -> str:
        where = " ".join(part for part in (self.op, self.node_name) if part)
        return f"{where}: {self.reason}" if where else self.reason

    @classmethod
    def not_deepenable(cls, reason: str) -> Refusal:
        """No identity layer (or block copy) can be inserted here: why."""
        return cls(reason, RefusalKind.NOT_DEEPENABLE)

    @classmethod
    def at_op(cls, ir, index: int, reason: str, kind: RefusalKind = RefusalKind.UNSUPPORTED,
              retry: tuple[tuple[int, int], ...] = (), parts: tuple[Parts, ...] = ()) -> Refusal:
        """A refusal by node `index` of `ir` (a GraphIR) acting as its op."""
        return cls(reason, kind, index, ir.label(index), ir.nodes[index].op_type, retry=retry, parts=parts)

    @classmethod
    def at_layer(cls, ir, index: int, reason: str, kind: RefusalKind = RefusalKind.UNSUPPORTED) -> Refusal:
        """A refusal of the layer (or reader) at `index` of `ir` as a whole."""
        return cls(reason, kind, index, ir.label(index))

    def has_kind(self, kind: RefusalKind) -> bool:
        """Whether this refusal, or one it was derived from, is of `kind`."""
        return self.kind == kind or any(cause.has_kind(kind) for cause in self.causes)
