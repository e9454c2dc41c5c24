"""The choices users make, defined once for the library, the CLI and plans.

Each enum's values are the spellings users type (`--split zero-sum`, `split =
"zero-sum"` in a plan, `split="zero-sum"` in Python). The enums subclass `str`,
so a member equals its spelling and serialises to it in JSON reports.

This module imports neither numpy nor onnx: the CLI builds its argument
parser from it before any heavy import.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import UserError, option


class Choice(str, Enum):
    """A set of spellings; `str(member)` is the spelling."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def spellings(cls) -> list[str]:
        return [member.value for member in cls]


class Split(Choice):
    """How a replicated unit's outgoing weights are divided among its copies."""

    EQUAL = "equal"
    RANDOM = "random"
    ZERO_SUM = "zero-sum"


class Init(Choice):
    """How new units of a widened group start."""

    NET2NET = "net2net"
    RANDOM_PAD = "random-pad"
    #: New units get a fresh default initialisation (incoming) and zero outgoing weights (exact).
    FRESH = "fresh"
    #: New units get zero outgoing weights (alignment; not offered by `widen`).
    ZERO = "zero"


#: The inits `widen` offers (ZERO is what `align --fill zero` uses).
WIDEN_INITS = (Init.NET2NET, Init.FRESH, Init.RANDOM_PAD)


class DeepenMode(Choice):
    """How Net2DeeperNet builds the inserted layer."""

    AUTO = "auto"
    IDENTITY = "identity"
    BEFORE_ACTIVATION = "before-activation"
    RESIDUAL = "residual"
    PRELU = "prelu"
    BLOCK = "block"
    FRESH_BLOCK = "fresh-block"

    @property
    def copies_a_block(self) -> bool:
        return self in (DeepenMode.BLOCK, DeepenMode.FRESH_BLOCK)


class Fill(Choice):
    """What `align` gives the units it adds."""

    ZERO = "zero"
    REPLICATE = "replicate"


class VerifyMode(Choice):
    """How a rewrite is verified: the whole model, the changed region, or the
    region when the model is large."""

    AUTO = "auto"
    FULL = "full"
    REGION = "region"


class ExternalData(Choice):
    """Whether an output keeps its weights in a separate file."""

    AUTO = "auto"
    YES = "yes"
    NO = "no"

    @property
    def as_flag(self) -> bool | None:
        """`io.save`'s `external`: None lets the size decide."""
        return {ExternalData.AUTO: None, ExternalData.YES: True, ExternalData.NO: False}[self]


ChoiceT = TypeVar("ChoiceT", bound=Choice)


def parse(kind: type[ChoiceT], name: str, value, allowed=None) -> ChoiceT:
    """`value` as a member of `kind`, or a UserError naming option `name`.

    Args:
        kind: the enum.
        name: the option's parameter name (shown as its flag by the CLI).
        value: a member or its spelling.
        allowed: the members accepted here (default: all of them).
    """
    allowed = list(allowed or kind)
    try:
        member = kind(value)
    except ValueError:
        member = None
    if member not in allowed:
        spellings = ", ".join(str(choice) for choice in allowed)
        raise UserError(f"{option(name, value)}: choose one of {spellings}")
    return member
