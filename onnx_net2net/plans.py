"""Growth plans: a TOML file of steps run as one pass pipeline.

    [plan]
    name = "wider-and-deeper"
    description = "..."

    [[steps]]
    op = "widen"            # widen | deepen | align | perturb
    factor = 2.0            # or: widths = { "/4/Conv" = 24 }
    split = "random"        # widen options: split (equal | random | zero-sum), noise, init, seed

    [[steps]]
    op = "deepen"
    after = "stages"        # a list of layer names, or "all" | "stages" | "last"
    mode = "auto"           # deepen options: mode, kernel, batchnorm, noise, seed

    [[steps]]
    op = "perturb"          # shrink and perturb (not function-preserving)
    shrink = 0.4            # perturb options: shrink, fresh, seed
    fresh = 0.1

Selectors are resolved against the model as it is when the step runs, so a
plan applies to any model. A bad plan is a one-line error naming the line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .errors import UserError
from .passes import AlignPass, DeepenPass, PerturbPass, Pipeline, WidenPass
from .rewrites.deeper import DeepenOptions
from .rewrites.perturb import DEFAULT_FRESH, DEFAULT_SHRINK, PerturbOptions
from .rewrites.wider import WidenOptions

#: A plan longer than this is almost surely a mistake (each step rewrites the whole model).
MAX_STEPS = 256

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_PLAN_KEYS = {"name": str, "description": str, "verify": str}
_STEP_KEYS = {
    "widen": {"op": str, "factor": (int, float), "widths": dict, "split": str, "noise": (int, float),
              "init": str, "seed": int},
    "deepen": {"op": str, "after": (str, list), "mode": str, "kernel": int, "batchnorm": bool,
               "noise": (int, float), "seed": int},
    "align": {"op": str, "multiple": int, "fill": str, "seed": int},
    "perturb": {"op": str, "shrink": (int, float), "fresh": (int, float), "seed": int},
}


def key_names() -> set[str]:
    """Every key a plan file may hold ([plan] and [[steps]] of any op)."""
    return set(_PLAN_KEYS).union(*_STEP_KEYS.values())


class Plan:
    """A parsed plan: its passes and whether to verify after each step."""

    def __init__(self, name: str, description: str, steps: list, verify_each: bool, locate: "_Locator"):
        self.name, self.description, self.steps, self.verify_each = name, description, steps, verify_each
        self._locate = locate

    def check_layers(self, known: set[str]) -> None:
        """Refuse, naming the line, layer names the model does not have (names
        made by an earlier deepen step of the plan, `.../deeperK`, are allowed)."""
        for number, step in enumerate(self.steps):
            names = list(getattr(step, "widths", {}) or {})
            if isinstance(step, DeepenPass) and step.selector is None:
                names += step.after
            for name in names:
                if name not in known and "/deeper" not in name:
                    key = "widths" if isinstance(step, WidenPass) else "after"
                    raise UserError(f"{self._locate.step(number, key)}: step {number + 1}: unknown layer '{name}'")

    def pipeline(self) -> Pipeline:
        return Pipeline(self.steps)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"{path}: cannot read plan ({error.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: invalid TOML: {error}") from None
    locate = _Locator(path, text)
    unknown = set(data) - {"plan", "steps"}
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"{locate.key(key)}: unknown section or key '{key}' (expected [plan] and [[steps]])")
    header = data.get("plan", {})
    _check_keys(header, _PLAN_KEYS, locate, "[plan]")
    verify = header.get("verify", "end")
    if verify not in ("end", "each"):
        raise UserError(f"{locate.key('verify')}: verify must be \"end\" or \"each\"")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise UserError(f"{path}: the plan has no [[steps]]")
    if len(steps) > MAX_STEPS:
        raise UserError(f"{path}: the plan has {len(steps)} steps; at most {MAX_STEPS}")
    passes = [_step(step, number, locate) for number, step in enumerate(steps)]
    return Plan(header.get("name", path.stem), header.get("description", ""), passes, verify == "each", locate)


def _step(step: dict, number: int, locate: "_Locator"):
    where = f"step {number + 1}"
    op = step.get("op")
    if op not in _STEP_KEYS:
        raise UserError(f"{locate.step(number, 'op')}: {where}: op must be one of {', '.join(_STEP_KEYS)} (got {op!r})")
    _check_keys(step, _STEP_KEYS[op], locate, where, number)
    try:
        if op == "widen":
            options = WidenOptions(split=step.get("split", "equal"), noise=float(step.get("noise", 0.0)),
                                   init=step.get("init", "net2net"), seed=step.get("seed", 0))
            widths = step.get("widths")
            if widths is not None and not all(isinstance(v, int) for v in widths.values()):
                raise UserError("widths must map layer names to integers")
            factor = step.get("factor")
            return WidenPass(widths, None if factor is None else float(factor), options)
        if op == "deepen":
            options = DeepenOptions(kernel=step.get("kernel"), mode=step.get("mode", "auto"),
                                    batchnorm=step.get("batchnorm", False), noise=float(step.get("noise", 0.0)),
                                    seed=step.get("seed", 0))
            after = step.get("after")
            if after is None:
                raise UserError("deepen needs 'after' (layer names, or \"all\", \"stages\", \"last\")")
            return DeepenPass(after, options)
        if op == "perturb":
            return PerturbPass(PerturbOptions(shrink=float(step.get("shrink", DEFAULT_SHRINK)),
                                              fresh=float(step.get("fresh", DEFAULT_FRESH)), seed=step.get("seed", 0)))
        return AlignPass(step.get("multiple", 8), step.get("fill", "zero"), step.get("seed", 0))
    except UserError as error:
        raise UserError(f"{locate.step(number, 'op')}: {where}: {error}") from None


def _check_keys(table: dict, allowed: dict, locate: "_Locator", where: str, step: int | None = None) -> None:
    for key, value in table.items():
        line = locate.step(step, key) if step is not None else locate.key(key)
        if key not in allowed:
            raise UserError(f"{line}: {where}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
        expected = allowed[key]
        if isinstance(value, bool) and expected is not bool and bool not in (
                expected if isinstance(expected, tuple) else (expected,)):
            raise UserError(f"{line}: {where}: '{key}' has the wrong type (bool)")
        if not isinstance(value, expected):
            raise UserError(f"{line}: {where}: '{key}' has the wrong type ({type(value).__name__})")


class _Locator:
    """Line numbers of keys in the plan text, for error messages."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()
        self.step_starts = [i for i, line in enumerate(self.lines) if line.strip().startswith("[[steps]]")]

    def key(self, key: str) -> str:
        line = self._find(key, 0, len(self.lines))
        return f"{self.path}:{line}" if line else str(self.path)

    def step(self, number: int | None, key: str) -> str:
        if number is None or number >= len(self.step_starts):
            return self.key(key)
        start = self.step_starts[number]
        end = self.step_starts[number + 1] if number + 1 < len(self.step_starts) else len(self.lines)
        return f"{self.path}:{self._find(key, start, end) or start + 1}"

    def _find(self, key: str, start: int, end: int) -> int | None:
        pattern = re.compile(rf'^\s*\[*\s*"?{re.escape(key)}"?\s*[=\]]')
        for i in range(start, end):
            if pattern.match(self.lines[i]):
                return i + 1
        return None
