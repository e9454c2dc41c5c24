"""onnx_net2net: grow trained ONNX models wider or deeper, exactly.

The public API works on an `onnx.ModelProto`, a path, an `onnx_ir.Model` or an
`onnx_graphsurgeon.Graph`, and gives back the kind it was given (a path gives
a ModelProto); models given as objects are never modified:

    import onnx_net2net as n2n
    model = n2n.load("models/cnn.onnx")                 # onnx.ModelProto
    report = n2n.inspect(model)                         # layers, widths, what can grow
    wider, info = n2n.widen(model, {"/4/Conv": 24})     # verified before it is returned
    deeper, info = n2n.deepen(model, ["/4/Conv"])
    ready, info = n2n.perturb(wider, shrink=0.4, fresh=0.1)  # shrink and perturb: reports the deviation
    n2n.save(wider, "cnn_wider.onnx")
    result = n2n.verify(model, wider)                   # VerificationReport

Pass objects (`WidenPass`, `DeepenPass`, `Pipeline`) give the same rewrites as
composable passes: `result = WidenPass(factor=2)(model)` ->
`PassResult(model, modified, report)`.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

__all__ = [
    "load", "save", "inspect", "widen", "deepen", "perturb", "verify",
    "WidenPass", "DeepenPass", "AlignPass", "PerturbPass", "Pipeline", "VerifiedPass", "PassResult", "WidenOptions",
    "DeepenOptions", "PerturbOptions",
    "UserError", "GrowthRefused", "VerificationFailed", "InternalError",
]

from .errors import GrowthRefused, InternalError, UserError, VerificationFailed  # noqa: E402


def __getattr__(name):
    # Lazy: importing the package stays cheap (no onnxruntime/networkx until used).
    if name in ("WidenPass", "DeepenPass", "AlignPass", "PerturbPass", "Pipeline", "VerifiedPass", "PassResult"):
        from . import passes

        return getattr(passes, name)
    if name == "WidenOptions":
        from .rewrites.wider import WidenOptions

        return WidenOptions
    if name == "DeepenOptions":
        from .rewrites.deeper import DeepenOptions

        return DeepenOptions
    if name == "PerturbOptions":
        from .rewrites.perturb import PerturbOptions

        return PerturbOptions
    raise AttributeError(name)


def _as_proto(model):
    """An `onnx_ir.Model` or `onnx_graphsurgeon.Graph` as a ModelProto;
    anything else unchanged."""
    kind = type(model).__module__.split(".")[0]
    if kind == "onnx_ir":
        from .passes import ir_model_to_proto

        return ir_model_to_proto(model)
    if kind == "onnx_graphsurgeon":
        import onnx_graphsurgeon

        return onnx_graphsurgeon.export_onnx(model)
    return model


def _like(given, proto):
    """`proto` as the kind of model the caller gave."""
    kind = type(given).__module__.split(".")[0]
    if kind == "onnx_ir":
        import onnx_ir

        return onnx_ir.serde.deserialize_model(proto)
    if kind == "onnx_graphsurgeon":
        import onnx_graphsurgeon

        return onnx_graphsurgeon.import_onnx(proto)
    return proto


def _handle(model, *, inline: bool = True):
    """A handle for the API. With `inline`, a model from a file comes with all
    its weights in memory (the API returns ModelProtos; the CLI streams large
    models instead); without, external weights are read when needed."""
    from . import io

    if not isinstance(model, (str, Path)):
        return io.from_proto(_as_proto(model))
    handle = io.load(model)
    return handle.inlined() if inline else handle


def load(path):
    """Load a model file (external data included) as an `onnx.ModelProto`."""
    return _handle(path).proto


def save(model, path, *, external: bool | None = None):
    """Write a ModelProto atomically (never over its source)."""
    from . import io

    return io.save(io.from_proto(_as_proto(model)), path, external=external)


def inspect(model, *, trial: bool | None = None) -> dict:
    """Every weighted layer, its width, and whether widen/deepen are exact for it."""
    from .inspection import inspect_model

    return inspect_model(_handle(model, inline=False), trial=trial)


def verify(reference, candidate, *, mode: str = "full", **options):
    """Compare two models' outputs in onnxruntime (see `verify.ReferenceRun`).
    mode: "full" (both whole models), "region" (only the part that differs,
    see `onnx_net2net.region`) or "auto" (region for large models)."""
    from .options import VerifyMode, parse
    from .region import verify_models

    mode = parse(VerifyMode, "mode", mode)
    return verify_models(_as_proto(reference), _as_proto(candidate), mode=mode, **options)


def widen(model, widths: dict[str, int] | None = None, *, factor: float | None = None, split: str = "equal",
          noise: float = 0.0, init: str = "net2net", seed: int = 0, keep_output_shapes: bool = False,
          verify: bool = True, verify_mode: str = "full", **verify_options):
    """Net2WiderNet. Returns (new ModelProto, report).

    Args:
        model: ModelProto or path.
        widths: {layer name: new width}, or `factor` to widen every growable group.
        split: "equal", "random" or "zero-sum" (all exact; zero-sum adds
            noise to the copies' outgoing weights that sums to zero over the
            copies, HyperCloning-style).
        noise: with "equal"/"random": relative noise on replicated weights
            (changes the function); with "zero-sum": the relative std of its
            zero-sum noise (still exact; 0 means 0.1).
        init: "net2net", "fresh" (exact: new units get PyTorch's default
            init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for their incoming
            weights and their layer's bias, and zero outgoing weights; old
            units keep their weights; per-unit constants such as
            BatchNormalization's are copied; seeded by `seed`; refused, with
            the reason, where the units meet a normalisation or reduction
            over them; `split` and `noise` do not apply) or "random-pad"
            (the paper's baseline, not exact).
        seed: seeds the mapping and the random choices.
        keep_output_shapes: let graph outputs carry the widened units (an
            encoder's last hidden state) and slice them back to the original
            units; the report lists them per change ("sliced_outputs").
        verify: compare outputs with onnxruntime; raises VerificationFailed
            when an exact rewrite does not match.
        verify_mode: "full" (both whole models), "region" (only the changed
            region) or "auto"; further keyword arguments go to `verify`.
    """
    from .passes import WidenPass
    from .rewrites.wider import WidenOptions

    options = WidenOptions(split=split, noise=noise, init=init, seed=seed)
    return _run_pass(model, WidenPass(widths, factor, options, keep_output_shapes), verify, verify_mode,
                     verify_options)


def deepen(model, after: list[str] | str, *, kernel: int | None = None, mode: str = "auto", batchnorm: bool = False,
           noise: float = 0.0, seed: int = 0, verify: bool = True, verify_mode: str = "full", **verify_options):
    """Net2DeeperNet: insert identity constructions after the named layers
    (or a selector: "all", "stages", "last"). `mode` is the construction
    (see `options.DeepenMode`); `verify`, `verify_mode` and further keyword
    arguments are as for `widen`. Returns (new ModelProto, report)."""
    from .passes import DeepenPass
    from .rewrites.deeper import DeepenOptions

    options = DeepenOptions(kernel=kernel, mode=mode, batchnorm=batchnorm, noise=noise, seed=seed)
    return _run_pass(model, DeepenPass(after if isinstance(after, str) else list(after), options), verify,
                     verify_mode, verify_options)


def perturb(model, *, shrink: float = 0.4, fresh: float = 0.1, seed: int = 0, verify: bool = True,
            verify_mode: str = "full", **verify_options):
    """Shrink and perturb (Ash & Adams 2020): theta <- shrink * theta + fresh *
    theta_fresh for every weighted layer's weight and bias, theta_fresh drawn
    from PyTorch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Not
    function-preserving: with `verify`, report["verification"] holds the
    deviation (never raises for it). Returns (new ModelProto, report).
    """
    from .passes import PerturbPass
    from .rewrites.perturb import PerturbOptions

    options = PerturbOptions(shrink=shrink, fresh=fresh, seed=seed)
    return _run_pass(model, PerturbPass(options), verify, verify_mode, verify_options)


def _run_pass(model, grow, verify: bool, verify_mode: str, verify_options: dict):
    """Apply a pass (it works on a copy of a ModelProto; a file is loaded into
    memory) and verify the result against the input."""
    from .errors import InternalError, UserError
    from .options import VerifyMode, parse
    from .skeleton import full_check_error

    verify_mode = parse(VerifyMode, "verify_mode", verify_mode)
    if "mode" in verify_options:
        raise UserError("`mode` is not a verification option here: give `verify_mode`")

    given, model = model, _as_proto(model)
    from_file = isinstance(model, (str, Path))
    handle = _handle(model) if from_file else _handle(model).copy()
    input_valid = full_check_error(handle) is None
    result = grow(handle)
    report = result.report
    problem = full_check_error(handle) if input_valid else None
    if problem:
        raise InternalError(f"the grown model fails onnx.checker's full check: {problem}")
    if verify:
        from .region import verify_models

        outcome = verify_models(str(model) if from_file else model, result.model, mode=verify_mode,
                                **verify_options)
        report["verification"] = outcome.to_dict()
        report["exact"] = grow.exact
        if grow.exact and not outcome.passed:
            raise VerificationFailed(outcome.summary(), report)
    return _like(given, result.model), report
