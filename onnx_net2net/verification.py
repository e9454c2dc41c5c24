"""Does the candidate compute the same function as the reference?

Both models run in onnxruntime with graph optimisations off, on the same
inputs (seeded random data honouring each input's type and shape, or arrays
from an .npz file). Every output is compared element by element:

* max_abs = max |a - b|
* max_rel = max |a - b| / max(1, |a|)   (absolute near zero, relative for large values)
* argmax agreement for classifier-like outputs ([N, C] floats, C > 1)

An output passes when every element satisfies |a - b| <= atol + rtol * max(1, |a|).
Errors are never summed with their signs (that lets them cancel) and shapes
alone prove nothing.

An output that a candidate of all zeros would pass is *blind*: on these
inputs the reference is near zero everywhere (a zero-initialised head, a
network whose random weights shrink every activation), so a change that
keeps it near zero cannot show there (one that makes it large still fails). It still passes (the models agree as far as anything can tell),
but the report says so instead of letting PASSED claim what it did not see;
give real inputs (`--inputs`) or a smaller `--atol`.

Tolerances follow each output's element type unless the caller sets them
(`TOLERANCES`): float32/float64 rtol 1e-4, atol 1e-5; float16 rtol 1e-2,
atol 1e-3 (about 10 units of fp16's last place, 2**-10); bfloat16 rtol 5e-2,
atol 1e-2 (about 6 of bf16's, 2**-7). A low-precision model is also run with
every float upcast to float32 (`precision.upcast`), on both sides, and that
comparison is reported beside the native one: it shows how exact the rewrite
is in the math, and how much of the native error is low-precision rounding.

A non-finite (NaN or Inf) element in the reference proves nothing: the
number of them is reported per output, and the output fails unless the
caller allows non-finite values (then the candidate must have the same
non-finite values in the same places, and the rest is compared as usual).
"""

from __future__ import annotations

import contextlib
import ctypes
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InternalError, UserError, first_line, option
from .sessions import ModelRunError, make_session, run_session

#: Exact rewrites of trained models measure up to ~1e-5 here (fp32 sums in a
#: different order, fractions like 1/3); a wrong rewrite moves outputs by
#: orders of magnitude more. The measured errors are always reported.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
DEFAULT_BATCH = 2
#: Default (rtol, atol) by onnxruntime element type (see the module docstring).
TOLERANCES = {
    "tensor(float)": (DEFAULT_RTOL, DEFAULT_ATOL),
    "tensor(double)": (DEFAULT_RTOL, DEFAULT_ATOL),
    "tensor(float16)": (1e-2, 1e-3),
    "tensor(bfloat16)": (5e-2, 1e-2),
}
LOW_PRECISION = ("tensor(float16)", "tensor(bfloat16)")


@dataclass
class InputSpec:
    """How verification inputs are made."""

    seed: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)
    int_range: tuple[int, int] = (0, 10)
    npz: str | None = None


@dataclass
class OutputComparison:
    """One output compared: errors, tolerance used, non-finite count, and for
    low-precision outputs the same comparison with both models upcast to fp32."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    passed: bool
    argmax_agreement: float | None = None
    problem: str | None = None
    dtype: str | None = None
    rtol: float | None = None
    atol: float | None = None
    nonfinite: int = 0
    fp32_max_abs: float | None = None
    fp32_max_rel: float | None = None
    #: max |reference| over its finite elements (float outputs)
    scale: float | None = None
    #: a candidate of all zeros would pass: a change keeping it near zero cannot show
    blind: bool = False


@dataclass
class VerificationReport:
    """`atol`/`rtol` are the tolerances the caller set, or the float32 defaults;
    each output records the tolerance it was held to."""

    passed: bool
    provider: str
    atol: float
    rtol: float
    outputs: list[OutputComparison]
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def summary(self) -> str:
        """One line: PASSED/FAILED, the errors, the tolerances, the provider."""
        verdict = "PASSED" if self.passed else "FAILED"
        failing = [f"{o.name} ({o.problem})" if o.problem else o.name for o in self.outputs if not o.passed]
        where = f"; mismatch in {', '.join(failing)}" if failing else ""
        return (f"{verdict}: {len(self.outputs)} output(s), max abs err {self.max_abs:.3g}, "
                f"max rel err {self.max_rel:.3g} ({self._tolerances()}) on {self.provider}{self._fp32()}{where}"
                f"{self._blind()}")

    def _blind(self) -> str:
        blind = [o for o in self.outputs if o.blind]
        if not blind:
            return ""
        names = ", ".join(f"{o.name} (max |value| {o.scale:.2g})" for o in blind[:3])
        more = f" and {len(blind) - 3} more" if len(blind) > 3 else ""
        return (f"; WARNING: {names}{more} would pass as all zeros: near zero on these inputs, so a change "
                f"that keeps them near zero cannot show (give real inputs with {option('inputs')} or a smaller "
                f"{option('atol')})")

    def _tolerances(self) -> str:
        used = {(o.dtype, o.rtol, o.atol) for o in self.outputs if o.rtol is not None}
        if len({(r, a) for _, r, a in used}) <= 1:
            return f"rtol {self.rtol:g}, atol {self.atol:g}" if not used else \
                "rtol {1:g}, atol {2:g}".format(*next(iter(used)))
        return "; ".join(f"{d[7:-1]}: rtol {r:g}, atol {a:g}" for d, r, a in sorted(used, key=str))

    def _fp32(self) -> str:
        upcast = [o for o in self.outputs if o.fp32_max_rel is not None]
        if not upcast:
            return ""
        worst = max(o.fp32_max_rel for o in upcast)
        return f"; the same weights in fp32 arithmetic: max rel err {worst:.3g} (the rest is low-precision arithmetic)"

    @property
    def nonfinite(self) -> int:
        return sum(o.nonfinite for o in self.outputs)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["max_abs"], data["max_rel"] = self.max_abs, self.max_rel
        return data


# ----------------------------------------------------------------------------
# onnxruntime


def cuda_available() -> bool:
    """Whether a CUDA GPU can be used (without letting onnxruntime try and fail)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_providers(requested: list[str] | None = None) -> list[str]:
    if requested:
        import onnxruntime as ort

        unknown = [p for p in requested if p not in ort.get_available_providers()]
        if unknown:
            raise UserError(f"unknown or unavailable provider(s): {', '.join(unknown)}")
        return requested
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_available() else ["CPUExecutionProvider"]


@contextlib.contextmanager
def ours(what: str = "the grown model"):
    """Failures of onnxruntime on a model this tool produced are our bug (exit 3)."""
    try:
        yield
    except ModelRunError as error:
        raise InternalError(f"{what} does not run in onnxruntime: {error}") from None


# ----------------------------------------------------------------------------
# Inputs


_NUMPY_OF_ORT = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def make_inputs(session, spec: InputSpec, announce=None) -> dict[str, np.ndarray]:
    """Inputs for every graph input of the session: the arrays of `spec.npz`
    (which must name every input, with its type and shape), else seeded
    random data."""
    if spec.npz:
        return _given_inputs(session, spec)
    rng = np.random.default_rng(spec.seed)
    feeds = {}
    for value in session.get_inputs():
        dtype = _NUMPY_OF_ORT.get(value.type)
        if dtype is None:
            raise UserError(f"input '{value.name}' has type {value.type}, which random inputs cannot fill")
        shape = _concrete_shape(value, spec, announce)
        feeds[value.name] = _random_array(rng, shape, dtype, spec.int_range)
    return feeds


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (a regular file; no pickled objects)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise UserError(f"{path}: cannot read inputs ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: inputs must be a regular .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single .npy array, not an .npz archive of named arrays")
            return {name: data[name] for name in data.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, OSError, zipfile errors...
        raise UserError(f"{path}: cannot read inputs ({first_line(exc)})") from None


def _given_inputs(session, spec: InputSpec) -> dict[str, np.ndarray]:
    given = read_npz(spec.npz)
    inputs = {value.name: value for value in session.get_inputs()}
    extra, missing = sorted(set(given) - set(inputs)), sorted(set(inputs) - set(given))
    if extra:
        raise UserError(f"{spec.npz}: array(s) {', '.join(extra)} match no input of the model "
                        f"(its inputs: {', '.join(inputs)})")
    if missing:
        raise UserError(f"{spec.npz}: no array for input(s) {', '.join(missing)} (give every input)")
    shaped = sorted(set(spec.shapes) & set(given))
    if shaped:
        raise UserError(f"{option('input_shapes')} {', '.join(shaped)}: these inputs come from {spec.npz}")
    for name, value in inputs.items():
        _check_given_array(spec.npz, value, given[name])
    return given


def _check_given_array(path: str, value, array: np.ndarray) -> None:
    expected = _NUMPY_OF_ORT.get(value.type)
    if expected is None or array.dtype != np.dtype(expected):
        raise UserError(f"{path}: array '{value.name}' is {array.dtype}, the input is {value.type[7:-1]}")
    dims = list(value.shape)
    fits = len(dims) == array.ndim and all(not isinstance(d, int) or d <= 0 or d == n
                                          for d, n in zip(dims, array.shape))
    if not fits:
        wanted = "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in dims) + "]"
        raise UserError(f"{path}: array '{value.name}' has shape {list(array.shape)}, the input is {wanted}")


def _concrete_shape(value, spec: InputSpec, announce) -> list[int]:
    if value.name in spec.shapes:
        return list(spec.shapes[value.name])
    shape, guessed = [], []
    for axis, dim in enumerate(value.shape):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        else:
            size = DEFAULT_BATCH if axis == 0 else 1
            shape.append(size)
            guessed.append(f"{dim or '?'}={size}")
    if guessed and announce:
        announce(f"input '{value.name}': dynamic dims set to {', '.join(guessed)} "
                 f"(choose with {option('input_shapes', value.name + ':[...]')})")
    return shape


def _random_array(rng, shape, dtype, int_range) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        low, high = int_range
        return rng.integers(low, high, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


# ----------------------------------------------------------------------------
# Comparison


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float,
                   allow_nonfinite: bool = False) -> OutputComparison:
    """Compare one output element by element (see the module docstring)."""
    if reference.shape != candidate.shape:
        return OutputComparison(name, list(reference.shape), float("inf"), float("inf"), False,
                                problem=f"shape {list(candidate.shape)} instead of {list(reference.shape)}",
                                rtol=rtol, atol=atol)
    if reference.dtype.kind not in "fc":
        equal = bool(np.array_equal(reference, candidate))
        diff = 0.0 if equal else float("inf")
        return OutputComparison(name, list(reference.shape), diff, diff, equal, rtol=rtol, atol=atol)
    a, b = _as_float64(reference), _as_float64(candidate)
    max_abs, max_rel, passed, problem = _errors(a, b, atol, rtol)
    nonfinite = int(np.count_nonzero(~np.isfinite(a)))
    if nonfinite:
        same = bool(np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(a)], equal_nan=True))
        passed = passed and same and allow_nonfinite
        problem = problem or (f"{nonfinite} non-finite (NaN/Inf) element(s) in the reference"
                              + ("" if same else ", not the same in the candidate")
                              + ("" if allow_nonfinite else f": they prove nothing ({option('allow_nonfinite')} accepts them)"))
    agreement = None
    if a.ndim == 2 and a.shape[1] > 1 and not nonfinite:
        agreement = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    finite = np.abs(a[np.isfinite(a)])
    scale = float(finite.max()) if finite.size else 0.0
    blind = bool(finite.size) and bool(np.all(finite <= atol + rtol * np.maximum(1.0, finite)))
    return OutputComparison(name, list(a.shape), max_abs, max_rel, passed, agreement, problem, rtol=rtol, atol=atol,
                            nonfinite=nonfinite, scale=scale, blind=blind)


def _as_float64(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint16:  # onnxruntime hands bfloat16 outputs over as their bits
        import ml_dtypes

        array = array.view(ml_dtypes.bfloat16)
    return array.astype(np.float64)


def _errors(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> tuple[float, float, bool, str | None]:
    """max_abs and max_rel over the elements finite in the reference; whether
    they pass; a problem found there."""
    finite = np.isfinite(a)
    diff = np.abs(a[finite] - b[finite])
    scale = np.maximum(1.0, np.abs(a[finite]))
    if diff.size and not np.all(np.isfinite(diff)):
        bad = int(np.count_nonzero(~np.isfinite(diff)))
        return float("inf"), float("inf"), False, f"{bad} non-finite element(s) in the candidate where the reference is finite"
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / scale).max()) if diff.size else 0.0
    return max_abs, max_rel, bool(np.all(diff <= atol + rtol * scale)), None


def tolerance_for(output_type: str | np.dtype, rtol: float | None = None, atol: float | None = None
                  ) -> tuple[float, float]:
    """(rtol, atol) for an output of this onnxruntime type (or numpy dtype):
    the caller's where given, else `TOLERANCES`."""
    if not isinstance(output_type, str):
        output_type = {np.dtype(np.float16): "tensor(float16)"}.get(np.dtype(output_type), "tensor(float)")
    default_rtol, default_atol = TOLERANCES.get(output_type, (DEFAULT_RTOL, DEFAULT_ATOL))
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


class ReferenceRun:
    """The reference model run once; candidates are compared against it.

    Args:
        reference: ModelProto or a path (paths let onnxruntime read models
            over 2 GB and their external data directly).
        inputs: how to make the inputs.
        atol, rtol: the tolerance for every output; None (default): by each
            output's element type (`TOLERANCES`).
        providers: onnxruntime providers; default CUDA when available, else CPU.
        announce: called with one-line notes (e.g. dynamic dims chosen).
        base_dir: where external data of in-memory models (the reference and
            the candidates) lives.
        allow_nonfinite: accept NaN/Inf in the reference (where the candidate
            has the same).
        upcast: also compare low-precision models with both upcast to fp32.
    """

    def __init__(self, reference, *, inputs: InputSpec | None = None, atol: float | None = None,
                 rtol: float | None = None, providers: list[str] | None = None, announce=None,
                 base_dir: Path | None = None, allow_nonfinite: bool = False, upcast: bool = True):
        self.atol, self.rtol = atol, rtol
        self.allow_nonfinite = allow_nonfinite
        self.providers = choose_providers(providers)
        self.base_dir = base_dir
        self.reference = reference
        session = _readable_session(reference, self.providers, base_dir)
        self.feeds = make_inputs(session, inputs or InputSpec(), announce)
        self.names = [o.name for o in session.get_outputs()]
        cast = getattr(session, "bfloat16_outputs", [])
        self.types = ["tensor(bfloat16)" if o.name in cast else o.type for o in session.get_outputs()]
        self.outputs = run_session(session, self.feeds)
        self.provider = session.get_providers()[0]
        self.upcast = upcast and any(t in LOW_PRECISION for t in self.types)
        self._fp32_outputs = None

    def tolerance(self, output_type: str) -> tuple[float, float]:
        """(rtol, atol) for an output of this onnxruntime type."""
        return tolerance_for(output_type, self.rtol, self.atol)

    def compare(self, candidate) -> VerificationReport:
        session = _readable_session(candidate, self.providers, self.base_dir)
        names = [o.name for o in session.get_outputs()]
        if names != self.names:
            raise UserError(f"the models have different outputs: {self.names} vs {names}")
        wanted = {i.name for i in session.get_inputs()}
        missing = sorted(wanted - set(self.feeds))
        if missing:
            raise UserError(f"the candidate needs inputs the reference does not have: {missing}")
        produced = run_session(session, {k: v for k, v in self.feeds.items() if k in wanted})
        outputs = []
        for name, kind, ref, cand in zip(self.names, self.types, self.outputs, produced):
            rtol, atol = self.tolerance(kind)
            outputs.append(compare_arrays(name, ref, cand, atol, rtol, self.allow_nonfinite))
            outputs[-1].dtype = kind
        if self.upcast:
            self._add_fp32_comparison(candidate, outputs)
        rtol, atol = self.tolerance("tensor(float)")
        return VerificationReport(all(o.passed for o in outputs), self.provider, atol, rtol, outputs)

    def _add_fp32_comparison(self, candidate, outputs: list[OutputComparison]) -> None:
        from .precision import upcast_outputs

        if self._fp32_outputs is None:
            self._fp32_outputs = upcast_outputs(self.reference, self.feeds, self.providers, self.base_dir)
        produced = upcast_outputs(candidate, self.feeds, self.providers, self.base_dir)
        for output, ref, cand in zip(outputs, self._fp32_outputs, produced):
            if output.dtype in LOW_PRECISION and ref.shape == cand.shape:
                output.fp32_max_abs, output.fp32_max_rel, _, _ = _errors(ref.astype(np.float64),
                                                                         cand.astype(np.float64), 0.0, 0.0)


def _readable_session(model, providers: list[str], base_dir: Path | None):
    """A session whose outputs numpy can hold: onnxruntime's Python API returns
    no bfloat16 arrays, so bfloat16 graph outputs are cast to float32 on the
    way out (exact: every bfloat16 value is a float32 value). The session's
    outputs keep their names; `bfloat16_outputs` lists the ones cast."""
    session = make_session(model, providers, base_dir)
    cast = [o.name for o in session.get_outputs() if o.type == "tensor(bfloat16)"]
    if not cast:
        return session
    from . import io
    from .precision import with_float32_outputs

    handle = io.load(model) if isinstance(model, (str, Path)) else io.from_proto(model, base_dir)
    session = make_session(with_float32_outputs(handle.inlined(copy=True).proto, cast), providers)
    session.bfloat16_outputs = cast
    return session


def verify_models(reference, candidate, **options) -> VerificationReport:
    """Run both models on the same inputs and compare every output
    (options as for `ReferenceRun`)."""
    return ReferenceRun(reference, **options).compare(candidate)


def stderr_note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def parse_input_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """Parse ["name:[1,3,224,224]", ...] into {name: [1, 3, 224, 224]}."""
    shapes = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        dims = dims.strip().strip("[]()")
        try:
            values = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            values = None
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise UserError(f"{option('input_shapes', repr(item))}: expected name:[d0,d1,...] with positive dims")
        shapes[name] = values
    return shapes
