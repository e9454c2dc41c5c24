"""`python -m onnx_net2net`: info, inspect, verify, widen, deepen, grow, align, perturb.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage (one line,
no traceback), 3 internal error (a bug).

Argument groups (verification, output) are defined once and shared by every
subcommand that needs them. Heavy imports (onnxruntime, networkx) happen inside
the commands, so `--help` and errors in arguments stay fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .errors import InternalError, UserError, VerificationFailed
from .options import WIDEN_INITS, DeepenMode, ExternalData, Fill, Split, VerifyMode

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3
PROG = "onnx_net2net"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------
# Shared argument groups


def _add_verify_args(parser: argparse.ArgumentParser, *, for_growth: bool) -> None:
    group = parser.add_argument_group("verification (onnxruntime, graph optimisations off)")
    if for_growth:
        group.add_argument("--no-verify", action="store_true",
                           help="skip the comparison with the input model (not recommended)")
        group.add_argument("--save-on-failure", action="store_true",
                           help="write the output even when verification fails (exit code is still 1)")
    group.add_argument("--inputs", metavar="FILE.npz",
                       help="real inputs: exactly one array per model input, named like it (dtype and shape checked)")
    group.add_argument("--input-shapes", nargs="+", metavar="NAME:[D,...]",
                       help="shapes for inputs with dynamic dims, e.g. input:[4,3,224,224] "
                            "(default: 2 for the first dynamic dim, 1 for the others, announced on stderr)")
    group.add_argument("--int-range", nargs=2, type=int, default=(0, 10), metavar=("LOW", "HIGH"),
                       help="range [LOW, HIGH) of random integer inputs, e.g. token ids (default 0 10)")
    group.add_argument("--input-seed", type=int, default=0, help="seed of the random inputs (default 0)")
    group.add_argument("--rtol", type=float, default=None,
                       help="relative tolerance: an element passes when |a-b| <= atol + rtol*max(1,|a|) "
                            "(default by each output's type: 1e-4 float32, 1e-2 float16, 5e-2 bfloat16)")
    group.add_argument("--atol", type=float, default=None,
                       help="absolute tolerance (default by type: 1e-5 float32, 1e-3 float16, 1e-2 bfloat16)")
    group.add_argument("--allow-nonfinite", action="store_true",
                       help="accept NaN/Inf in the reference's outputs where the candidate has the same "
                            "(default: they prove nothing, so verification fails)")
    group.add_argument("--verify", choices=VerifyMode.spellings(), default="auto", dest="verify_mode",
                       help="full: run both whole models; region: only the part of the graph that differs, fed "
                            "the same values at its boundary (memory and time scale with the change); auto: "
                            "region above 1 GiB of weights or a third of free memory, else full (default auto)")
    group.add_argument("--providers", nargs="+", metavar="PROVIDER",
                       help="onnxruntime providers (default: CUDAExecutionProvider when a GPU is usable, "
                            "else CPUExecutionProvider)")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("-o", "--output", required=True, metavar="OUT.onnx",
                       help="where to write the grown model (never the input; written atomically)")
    group.add_argument("--external-data", choices=ExternalData.spellings(), default="auto",
                       help="store weights in OUT.onnx.data (auto: when the input did, or above ~1.8 GB)")
    group.add_argument("--report", metavar="FILE.json",
                       help="write what grew, widths, parameter counts, verification figures and options")


def _add_growth_command(commands, name: str, run, help: str, description: str):
    """A subcommand that changes a model: MODEL, then its own flags, then the
    shared output and verification groups (added by `_finish_growth_command`)."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("model", help="the ONNX model (never modified)")
    parser.set_defaults(run=run)
    return parser


def _finish_growth_command(parser) -> None:
    _add_output_args(parser)
    _add_verify_args(parser, for_growth=True)


def _verify_options(args) -> dict:
    from .verification import InputSpec, parse_input_shapes, stderr_note

    low, high = args.int_range
    if high <= low:
        raise UserError(f"--int-range {low} {high}: HIGH must be larger than LOW")
    spec = InputSpec(seed=args.input_seed, shapes=parse_input_shapes(args.input_shapes), int_range=(low, high),
                     npz=args.inputs)
    if (args.atol is not None and args.atol < 0) or (args.rtol is not None and args.rtol < 0):
        raise UserError("--atol and --rtol must be >= 0")
    return dict(inputs=spec, atol=args.atol, rtol=args.rtol, providers=args.providers,
                announce=lambda text: stderr_note(_shown(args, text)),
                allow_nonfinite=args.allow_nonfinite)


# ----------------------------------------------------------------------------
# Commands


def cmd_info(args) -> int:
    from .info import format_info, model_info
    from .io import load
    from .ir import GraphIR

    handle = load(args.model)
    GraphIR(handle)  # the graph checks the growth commands make: no cycle, nothing dangling, consistent shapes
    info = model_info(handle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return EXIT_OK


def cmd_verify(args) -> int:
    from .region import verify_files

    # verify_files loads both models with io.load: the same safety checks as any input
    report = verify_files(args.reference, args.candidate, mode=args.verify_mode, **_verify_options(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for output in report.outputs:
            agreement = "" if output.argmax_agreement is None else f", argmax agreement {output.argmax_agreement:.1%}"
            problem = f" ({_shown(args, output.problem)})" if output.problem else ""
            fp32 = "" if output.fp32_max_rel is None else f", upcast to fp32: max rel {output.fp32_max_rel:.3g}"
            blind = f" (blind: max |value| {output.scale:.2g}, all zeros would pass)" if output.blind else ""
            print(f"  {output.name} {output.shape}: max abs {output.max_abs:.3g}, max rel {output.max_rel:.3g}"
                  f"{agreement}{fp32} {'ok' if output.passed else 'MISMATCH'}{blind}{problem}")
        for note in report.notes:
            print(f"  note: {_shown(args, note)}")
        print(_shown(args, report.summary()))
    return EXIT_OK if report.passed else EXIT_MISMATCH


def cmd_inspect(args) -> int:
    from .inspection import inspect_model
    from .io import load
    from .verification import InputSpec, parse_input_shapes

    trial = False if args.no_trial else (True if args.trial else None)
    spec = InputSpec(shapes=parse_input_shapes(args.input_shapes))
    report = inspect_model(load(args.model), trial=trial, inputs=spec, name=args.model)
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"{report['model']}: {len(report['layers'])} weighted layer(s)")
    for layer in report["layers"]:
        widen, deepen = layer["widen"], layer["deepen"]
        w = f"widen ok (step {widen['step']}, group {', '.join(widen['group'])})" if widen["ok"] \
            else f"widen no: {widen['reason']}"
        if widen.get("note"):
            w += f"\n        {widen['note']}"
        d = "deepen ok" if deepen["ok"] else f"deepen no: {deepen['reason']}"
        print(f"  {layer['name']} [{layer['op']}, width {layer['width']}]\n      {w}\n      {d}")
    return EXIT_OK


def cmd_widen(args) -> int:
    from .passes import WidenPass
    from .rewrites.wider import WidenOptions

    widths = _parse_layer_widths(args.layer)
    if args.factor is None and not widths:
        raise UserError("give --layer NAME=WIDTH (repeatable) or --factor F")
    if args.factor is not None and widths:
        raise UserError("give either --layer or --factor, not both")
    options = WidenOptions(split=args.split, noise=args.noise, init=args.init, seed=args.seed)
    if options.init == "random-pad":
        print("WARNING: --init random-pad is the paper's baseline: new units are random and the grown model "
              "does NOT compute the same function (for experiments only)", file=sys.stderr)
    return _grow(args, WidenPass(widths or None, args.factor, options, args.keep_output_shapes))


def cmd_deepen(args) -> int:
    from .passes import DeepenPass
    from .rewrites.deeper import DeepenOptions

    options = DeepenOptions(kernel=args.kernel, mode=args.mode, batchnorm=args.batchnorm, noise=args.noise,
                            seed=args.seed)
    return _grow(args, DeepenPass(_after(args.after), options))


def _after(names: list[str]) -> list[str] | str:
    """`--after all|stages|last` (alone) is a selector, as in the API and plans; else layer names."""
    from .passes import SELECTORS

    if any(name in SELECTORS for name in names) and len(names) > 1:
        raise UserError(f"--after {' / '.join(SELECTORS)} selects layers by itself: give it alone")
    return names[0] if names[0] in SELECTORS else names


def cmd_align(args) -> int:
    from .passes import AlignPass

    return _grow(args, AlignPass(args.multiple, args.fill, args.seed))


def cmd_perturb(args) -> int:
    from .passes import PerturbPass
    from .rewrites.perturb import PerturbOptions

    print("perturb is not function-preserving: the deviation from the input model is reported, not verified",
          file=sys.stderr)
    return _grow(args, PerturbPass(PerturbOptions(shrink=args.shrink, fresh=args.fresh, seed=args.seed)))


def cmd_grow(args) -> int:
    from .plans import load_plan

    plan = load_plan(args.plan)
    args.plan_object = plan
    pipeline = plan.pipeline()
    if plan.verify_each or args.verify_each:
        def print_step(step, result) -> None:
            print(f"{step.label}: {_shown(args, result.summary())}")

        pipeline = pipeline.verified(mode=args.verify_mode, keep_failures=args.save_on_failure, on_result=print_step,
                                     **_verify_options(args))
    return _grow(args, pipeline)


def _grow(args, grow_pass) -> int:
    """Load, rewrite, check, verify against the input, write atomically, report."""
    from . import io
    from .progress import Progress

    source = Path(args.model)
    io.check_output_path(args.output, [source])
    verify_options = _verify_options(args) if not args.no_verify else None
    progress = Progress.for_model(source.stat().st_size if source.is_file() else 0)
    with progress.stage(f"loading {source}"):
        handle = io.load(source, lazy=True)  # weights stay in the file until the rewrite reads them
    progress.include(handle.weight_bytes())
    _check_plan_layers(args, handle)
    try:
        with progress.stage("rewriting"):
            report, broken = _rewrite(args, grow_pass, handle)
    except InternalError as error:
        if not args.save_on_failure:
            raise
        report, broken = {"internal_error": str(error)}, str(error)  # keep the model as far as it got
    outcome = {}

    def check(staged: Path) -> None:
        if broken and not args.save_on_failure:
            raise InternalError(broken)
        if verify_options is None or broken:
            return
        try:
            with progress.stage("verifying with onnxruntime"):
                outcome["result"] = _verify_output(args, source, handle, staged, verify_options, grow_pass.exact,
                                                   report)
        except InternalError as error:
            report["internal_error"] = str(error)
            if not args.save_on_failure:
                raise
            outcome["internal"] = str(error)

    external = ExternalData(args.external_data).as_flag
    try:
        with progress.bytes_bar("writing", handle.weight_bytes()) as advance:
            io.save(handle, args.output, external=external, protected=[source], before_commit=check,
                    progress=advance)
    finally:
        if args.report:
            _write_json(args.report, report)
    _print_changes(report)
    internal = broken or outcome.get("internal")
    if internal:
        raise InternalError(f"{internal} (kept in {args.output} as asked by --save-on-failure)")
    return _print_outcome(args, outcome.get("result"), grow_pass.exact)


def _check_plan_layers(args, handle) -> None:
    plan = getattr(args, "plan_object", None)
    if plan is not None:
        from .analysis import layer_name, weighted_layers
        from .ir import GraphIR

        ir = GraphIR(handle)
        plan.check_layers({layer_name(ir, i) for i in weighted_layers(ir)} | {n.name for n in ir.nodes})


def _rewrite(args, grow_pass, handle) -> tuple[dict, str | None]:
    """Apply the pass in place; return its report and, when the input passed
    onnx's full check and the output does not, why (our bug)."""
    from .provenance import record_provenance
    from .skeleton import full_check_error

    input_valid = full_check_error(handle) is None
    report = grow_pass.apply(handle)
    report["command"] = sys.argv[1:] if args.argv is None else args.argv
    record_provenance(handle.proto, report)
    problem = full_check_error(handle) if input_valid else None
    broken = f"the grown model fails onnx.checker's full check: {problem}" if problem else None
    if broken:
        report["internal_error"] = broken
    return report, broken


def _verify_output(args, source: Path, handle, staged: Path, verify_options: dict, exact: bool, report: dict):
    """Compare the rewritten model with the input by --verify's mode (full:
    the staged file); raise to abandon the write."""
    from .region import verify_grown

    result = verify_grown(source, handle, staged, mode=args.verify_mode, **verify_options)
    report["verification"] = result.to_dict()
    report["exact"] = exact
    if exact and not result.passed and not args.save_on_failure:
        raise VerificationFailed(result.summary(), report)
    return result


def _print_outcome(args, result, exact: bool) -> int:
    if result is None:
        print(f"written {args.output} (not verified)")
        return EXIT_OK
    if not exact:
        print(f"deviation (expected: this rewrite is not exact by design): max abs {result.max_abs:.3g}, "
              f"max rel {result.max_rel:.3g}")
        print(f"written {args.output}")
        return EXIT_OK
    print(_shown(args, result.summary()))
    print(f"written {args.output}")
    return EXIT_OK if result.passed else EXIT_MISMATCH


def _print_changes(report: dict) -> None:
    for change in report.get("changes", []):
        if "fan_in" in change:
            print(f"perturbed {', '.join(change['layers'])} [{change['op']}]: {', '.join(change['tensors'])} "
                  f"(fresh bound {change['bound']:.3g})")
        elif "old_width" in change:
            print(f"widened {', '.join(change['layers'])}: {change['old_width']} -> {change['new_width']} "
                  f"({len(change['tensors'])} tensors, {len(change['weights'])} weights rewritten)")
            if change.get("sliced_outputs"):
                print(f"    outputs sliced back to their original units: {', '.join(change['sliced_outputs'])}")
        else:
            print(f"deepened after {change['after']}: mode {change['mode']} (activation {change['activation']}), "
                  f"new nodes {', '.join(change['nodes'])}")
    params = report.get("parameters")
    if params:
        print(f"parameters: {params['before']} -> {params['after']}")


def _parse_layer_widths(items: list[str] | None) -> dict[str, int]:
    widths = {}
    for item in items or []:
        name, sep, width = item.rpartition("=")
        if not sep or not name:
            raise UserError(f"--layer '{item}': expected NAME=WIDTH")
        try:
            widths[name] = int(width)
        except ValueError:
            raise UserError(f"--layer '{item}': WIDTH must be an integer") from None
    return widths


def _write_json(path: str, data: dict) -> None:
    import os
    import tempfile

    target = Path(path)
    if target.is_dir():
        raise UserError(f"{path}: report path is a directory")
    if not target.resolve().parent.is_dir():
        raise UserError(f"{path}: report folder does not exist")
    fd, tmp = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, target)


# ----------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Grow ONNX models wider (Net2WiderNet) or deeper (Net2DeeperNet), "
                                            "computing exactly the same function, verified with onnxruntime.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    info = commands.add_parser("info", help="opset, inputs/outputs, op histogram, parameters",
                               description="Summarise a model: opset, inputs and outputs with shapes, op "
                                           "histogram, parameter count and bytes.")
    info.add_argument("model", help="the ONNX model")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=cmd_info)

    verify = commands.add_parser("verify", help="do two models compute the same function?",
                                 description="Run both models in onnxruntime on the same inputs and compare every "
                                             "output. Exit 0 when all match, 1 when not.")
    verify.add_argument("reference", help="the reference model")
    verify.add_argument("candidate", help="the model to check against it")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_verify_args(verify, for_growth=False)
    verify.set_defaults(run=cmd_verify)

    inspect = commands.add_parser("inspect", help="every weighted layer and what can grow exactly",
                                  description="List every Conv, ConvTranspose, Gemm and MatMul with a constant "
                                              "weight: name, width, and whether widen/deepen are exact (with the "
                                              "reason when not). ok: true is a promise.")
    inspect.add_argument("model", help="the ONNX model")
    inspect.add_argument("--json", action="store_true", help="print JSON (schema in the README)")
    trial = inspect.add_mutually_exclusive_group()
    trial.add_argument("--trial", action="store_true",
                       help="try and verify every possible rewrite (default: for models under 64 MB)")
    trial.add_argument("--no-trial", action="store_true", help="static analysis only")
    inspect.add_argument("--input-shapes", nargs="+", metavar="NAME:[D,...]",
                         help="shapes for dynamic inputs in trial runs")
    inspect.set_defaults(run=cmd_inspect)

    widen = _add_growth_command(commands, "widen", cmd_widen, "Net2WiderNet: more units, same function",
                                "Widen layers by replicating units and dividing their outgoing weights; every "
                                "tensor coupled with the layer grows with it.")
    widen.add_argument("--layer", action="append", metavar="NAME=WIDTH",
                       help="new width of a layer (node name or weight name, as `inspect` lists); repeatable")
    widen.add_argument("--factor", type=float, help="widen every growable group by this factor instead")
    widen.add_argument("--split", choices=Split.spellings(), default="equal",
                       help="equal: divide by the copy count (the paper); random: random fractions that sum to "
                            "one (exact, breaks symmetry); zero-sum: equal split plus +N/-N noise on the copies' "
                            "outgoing weights that sums to zero over the copies (HyperCloning; exact, the copies "
                            "differ from step 0)")
    widen.add_argument("--noise", type=float, default=0.0, metavar="STD",
                       help="with --split equal/random: noise on the replicated weights, relative to each "
                            "weight's std (changes the function slightly; the deviation is reported). With "
                            "--split zero-sum: the std of the zero-sum noise relative to each consumer weight's "
                            "std (stays exact; default 0.1)")
    widen.add_argument("--init", choices=[str(init) for init in WIDEN_INITS], default="net2net",
                       help="net2net: new units copy old ones, outgoing weights divided among the copies; "
                            "fresh: new units get PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for "
                            "their incoming weights and bias and zero outgoing weights, old units untouched "
                            "(exact; refused where the units meet a normalisation over them); random-pad: the "
                            "paper's baseline, new units random (NOT function-preserving)")
    widen.add_argument("--seed", type=int, default=0, help="seed of the unit mapping, splits and noise")
    widen.add_argument("--keep-output-shapes", action="store_true",
                       help="graph outputs may carry the widened units (an encoder's hidden state): they are "
                            "sliced back to the original units, so output shapes stay as they are")
    _finish_growth_command(widen)

    deepen = _add_growth_command(commands, "deepen", cmd_deepen, "Net2DeeperNet: more layers, same function",
                                 "Insert layers initialised to the identity after named layers.")
    deepen.add_argument("--after", action="append", required=True, metavar="NAME",
                        help="insert after this layer (and its activation); repeatable; or one selector: all "
                             "(every deepenable layer), stages (the last one of each run of equal-width layers), "
                             "last")
    deepen.add_argument("--kernel", type=int, help="odd kernel size of a new conv (default: the layer's)")
    deepen.add_argument("--mode", choices=DeepenMode.spellings(),
                        default="auto",
                        help="auto: identity after Relu/Clip or no activation, else prelu; identity: identity "
                             "layer + the same activation; before-activation: identity before the activation; "
                             "residual: x + 0*act(I x); prelu: identity + PRelu(slope 1); block: a copy of the "
                             "residual block the layer writes into, its output projections zeroed "
                             "(LLaMA Pro); fresh-block: the same block structure with new random weights "
                             "(LayerNorms reset, biases zero), its output projections zeroed")
    deepen.add_argument("--batchnorm", action="store_true", help="add an exact identity BatchNormalization")
    deepen.add_argument("--noise", type=float, default=0.0, metavar="STD",
                        help="noise on the identity weights, relative to the layer's weight std")
    deepen.add_argument("--seed", type=int, default=0, help="seed of the noise")
    _finish_growth_command(deepen)

    grow = _add_growth_command(commands, "grow", cmd_grow, "run a growth plan (TOML) as one pipeline",
                               "Run the steps of a growth plan (widen / deepen / align, see passes/README.md) as "
                               "one pipeline, verified once at the end (or after each step).")
    grow.add_argument("--plan", required=True, metavar="PLAN.toml", help="the growth plan")
    grow.add_argument("--verify-each", action="store_true", help="also verify after every step")
    _finish_growth_command(grow)

    align = _add_growth_command(commands, "align", cmd_align, "widen every growable group to a multiple of N, "
                                "exactly", "Deployment pass: widen every growable group to the next multiple of N "
                                "(tensor cores and SIMD units like such widths), preserving the function.")
    align.add_argument("--multiple", type=int, default=8, metavar="N", help="the multiple (default 8)")
    align.add_argument("--fill", choices=Fill.spellings(), default="zero",
                       help="zero: new units with zero outgoing weights, original weights untouched (default); "
                            "replicate: Net2Net replicate-and-divide")
    align.add_argument("--seed", type=int, default=0, help="seed of the unit mapping")
    _finish_growth_command(align)
    perturb = _add_growth_command(commands, "perturb", cmd_perturb, "shrink and perturb before training (NOT "
                                  "function-preserving)", "Shrink and perturb (Ash & Adams 2020): every Conv, "
                                  "ConvTranspose, Gemm and MatMul weight and bias becomes SHRINK * w + FRESH * "
                                  "w_fresh, w_fresh drawn from PyTorch's default init U(-1/sqrt(fan_in), "
                                  "1/sqrt(fan_in)). Norm layers and embeddings are kept. The output deviation is "
                                  "reported (exit 0), not verified.")
    perturb.add_argument("--shrink", type=float, default=0.4, help="factor on the current weights (default 0.4)")
    perturb.add_argument("--fresh", type=float, default=0.1,
                         help="factor on the fresh initialisation (default 0.1)")
    perturb.add_argument("--seed", type=int, default=0, help="seed of the fresh initialisation (default 0)")
    _finish_growth_command(perturb)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except VerificationFailed as failed:
        message = _shown(args, str(failed))
        print(message if "FAILED" in message else f"FAILED: {message}", file=sys.stderr)
        print("nothing written (use --save-on-failure to keep the output)", file=sys.stderr)
        return EXIT_MISMATCH
    except InternalError as error:
        print(f"{PROG}: internal error (a bug, please report it to the onnx_net2net issue tracker with the "
              f"command and, if you can, the model): {_one_line(error)}", file=sys.stderr)
        return EXIT_BUG
    except UserError as error:
        print(f"{PROG}: error: {_shown(args, _one_line(error))}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(f"{PROG}: error: out of memory (the model or the requested growth is too large for this machine)",
              file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except OSError as error:
        print(f"{PROG}: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence
        print(f"{PROG}: internal error (a bug, please report it to the onnx_net2net issue tracker with the "
              f"command and, if you can, the model): {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return EXIT_BUG


#: Library options whose flag is not `--` and the name with dashes.
_FLAGS = {"verify_mode": "--verify"}
_OPTION = re.compile(r"`(\w+)(?:=([^`]*))?`")


def _shown(args, message: str) -> str:
    """A library message with its options as this command's user wrote them:
    flags ("`factor=0.5`" as "--factor 0.5"), or a plan's keys ("factor = 0.5")
    for what a plan holds (`grow`'s verification options stay flags)."""
    keys = set()
    if getattr(args, "plan", None):
        from .plans import key_names

        keys = key_names()

    def shown(match) -> str:
        if match[1] in keys:
            return match[1] if match[2] is None else f"{match[1]} = {match[2]}"
        return _flag(match[1]) + ("" if match[2] is None else f" {match[2]}")

    return _OPTION.sub(shown, message)


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:500] or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
