"""Does the candidate compute the same function as the reference?

Both models run in onnxruntime with graph optimisations off, on the same
inputs (seeded random data honouring each input's type and shape, or arrays
from an .npz file). Every output is compared element by element:

* max_abs = max |a - b|
* max_rel = max |a - b| / max(1, |a|)   (absolute near zero, relative for large values)
* argmax agreement for classifier-like outputs ([N, C] floats, C > 1)

An output passes when every element satisfies |a - b| <= atol + rtol * max(1, |a|),
and NaNs appear in the same places. Errors are never summed with their signs
(that lets them cancel) and shapes alone prove nothing.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import UserError

#: Exact rewrites of trained models measure up to ~1e-5 here (fp32 sums in a
#: different order, fractions like 1/3); a wrong rewrite moves outputs by
#: orders of magnitude more. The measured errors are always reported.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
DEFAULT_BATCH = 2


@dataclass
class InputSpec:
    """How verification inputs are made."""

    seed: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)
    int_range: tuple[int, int] = (0, 10)
    npz: str | None = None


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    passed: bool
    argmax_agreement: float | None = None
    problem: str | None = None


@dataclass
class VerificationReport:
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
        verdict = "PASSED" if self.passed else "FAILED"
        failing = [o.name for o in self.outputs if not o.passed]
        where = f"; mismatch in {', '.join(failing)}" if failing else ""
        return (f"{verdict}: {len(self.outputs)} output(s), max abs err {self.max_abs:.3g}, "
                f"max rel err {self.max_rel:.3g} (rtol {self.rtol:g}, atol {self.atol:g}) on {self.provider}{where}")

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


def make_session(model: onnx.ModelProto | str | Path, providers: list[str], base_dir: Path | None = None):
    """A session with graph optimisation off; `base_dir` is where the external
    data of an in-memory model lives."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if base_dir is not None and not isinstance(model, (str, Path)):
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot load the model: {message[:300]}") from None


# ----------------------------------------------------------------------------
# Inputs


_NUMPY_OF_ORT = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def make_inputs(session, spec: InputSpec, announce=None) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input of the session."""
    given = {}
    if spec.npz:
        try:
            with np.load(spec.npz) as data:
                given = {k: data[k] for k in data.files}
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{spec.npz}: cannot read inputs ({exc})") from None
    rng = np.random.default_rng(spec.seed)
    feeds = {}
    for value in session.get_inputs():
        if value.name in given:
            feeds[value.name] = given[value.name]
            continue
        dtype = _NUMPY_OF_ORT.get(value.type)
        if dtype is None:
            raise UserError(f"input '{value.name}' has type {value.type}, which random inputs cannot fill")
        shape = _concrete_shape(value, spec, announce)
        feeds[value.name] = _random_array(rng, shape, dtype, spec.int_range)
    return feeds


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
                 f"(choose with --input-shapes {value.name}:[...])")
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


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float
                   ) -> OutputComparison:
    if reference.shape != candidate.shape:
        return OutputComparison(name, list(reference.shape), float("inf"), float("inf"), False,
                                problem=f"shape {list(candidate.shape)} instead of {list(reference.shape)}")
    if reference.dtype.kind not in "fc":
        equal = bool(np.array_equal(reference, candidate))
        diff = 0.0 if equal else float("inf")
        return OutputComparison(name, list(reference.shape), diff, diff, equal)
    a = reference.astype(np.float64)
    b = candidate.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return OutputComparison(name, list(a.shape), float("inf"), float("inf"), False, problem="NaNs differ")
    finite = ~nan_a
    diff = np.abs(a - b)[finite]
    scale = np.maximum(1.0, np.abs(a))[finite]
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / scale).max()) if diff.size else 0.0
    passed = bool(np.all(diff <= atol + rtol * scale))
    agreement = None
    if a.ndim == 2 and a.shape[1] > 1:
        agreement = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    return OutputComparison(name, list(a.shape), max_abs, max_rel, passed, agreement)


class ReferenceRun:
    """The reference model run once; candidates are compared against it.

    Args:
        reference: ModelProto or a path (paths let onnxruntime read models
            over 2 GB and their external data directly).
        inputs: how to make the inputs.
        atol, rtol: the tolerance, see the module docstring.
        providers: onnxruntime providers; default CUDA when available, else CPU.
        announce: called with one-line notes (e.g. dynamic dims chosen).
        base_dir: where external data of in-memory models (the reference and
            the candidates) lives.
    """

    def __init__(self, reference, *, inputs: InputSpec | None = None, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL, providers: list[str] | None = None, announce=None,
                 base_dir: Path | None = None):
        self.atol, self.rtol = atol, rtol
        self.providers = choose_providers(providers)
        self.base_dir = base_dir
        session = make_session(reference, self.providers, base_dir)
        self.feeds = make_inputs(session, inputs or InputSpec(), announce)
        self.names = [o.name for o in session.get_outputs()]
        self.outputs = _run(session, self.feeds)
        self.provider = session.get_providers()[0]

    def compare(self, candidate) -> VerificationReport:
        session = make_session(candidate, self.providers, self.base_dir)
        names = [o.name for o in session.get_outputs()]
        if names != self.names:
            raise UserError(f"the models have different outputs: {self.names} vs {names}")
        wanted = {i.name for i in session.get_inputs()}
        missing = sorted(wanted - set(self.feeds))
        if missing:
            raise UserError(f"the candidate needs inputs the reference does not have: {missing}")
        produced = _run(session, {k: v for k, v in self.feeds.items() if k in wanted})
        outputs = [compare_arrays(name, r, c, self.atol, self.rtol)
                   for name, r, c in zip(self.names, self.outputs, produced)]
        return VerificationReport(all(o.passed for o in outputs), self.provider, self.atol, self.rtol, outputs)


def verify_models(reference, candidate, **options) -> VerificationReport:
    """Run both models on the same inputs and compare every output
    (options as for `ReferenceRun`)."""
    return ReferenceRun(reference, **options).compare(candidate)


def _run(session, feeds):
    try:
        return [np.asarray(x) for x in session.run(None, feeds)]
    except Exception as exc:  # noqa: BLE001
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime failed to run the model: {message[:300]}") from None


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
            raise UserError(f"--input-shapes '{item}': expected name:[d0,d1,...] with positive dims")
        shapes[name] = values
    return shapes
