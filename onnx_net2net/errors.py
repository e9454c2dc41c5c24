"""The few error types of onnx_net2net.

`UserError` (and its subclasses) is a problem with what the user gave us: a bad
file, an unknown layer, a width that cannot be reached. The CLI prints its
message as one line and exits with code 2. `InternalError` is our fault, found
by our own checks: a model we produced that does not check, load or run. It
and anything else escaping the CLI is a bug: reported as such, exit code 3.

Messages name options as the library spells them, marked by `option()`:
"`factor=0.5`: must be larger than 1". The CLI shows the same marks as its
flags ("--factor 0.5: must be larger than 1"), a plan file's errors as its keys.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; shown as one line, exit code 2."""

    exit_code = 2


class ModelLoadError(UserError):
    """The model file cannot be read, parsed or trusted."""


class UnsafePathError(ModelLoadError):
    """A path (output or external data) is outside where it may be."""


class GrowthRefused(UserError):
    """A requested rewrite cannot be done exactly; the message says why."""


class VerificationFailed(Exception):
    """The grown model does not compute the same function (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class InternalError(Exception):
    """A model this tool produced is broken (a bug: exit code 3, please report)."""

    exit_code = 3


_UNSET = object()


def option(name: str, value=_UNSET) -> str:
    """An option (and the value given) as a message names it: `name` or
    `name=value`, with the backquotes the CLI rewrites into its flags."""
    return f"`{name}`" if value is _UNSET else f"`{name}={value}`"


def first_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message as one line (onnx and onnxruntime paste
    multi-line C++ text), or its type's name when it has none."""
    text = str(error).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return " ".join(line.split())[:limit] or type(error).__name__
