"""`inspect`: every weighted layer and what can be done to it, exactly.

`ok: true` is a promise. The static analysis (coupling and insertion plans)
decides what is possible; for models small enough to run cheaply, each
possible rewrite is also tried once (widen by one step, deepen once) and
verified in onnxruntime, so a promise is never made on analysis alone.
"""

from __future__ import annotations

import onnx

from . import coupling, routing
from .errors import GrowthRefused, UserError
from .folding import computed_weights, fold_computed_weights
from .io import ModelHandle
from .ir import GraphIR
from .passes import DeepenPass, WidenPass
from .rewrites import deeper
from .verification import InputSpec, ReferenceRun

#: Models with more weight bytes than this are not trial-run by default.
TRIAL_LIMIT_BYTES = 64 << 20


def inspect_model(handle: ModelHandle, *, trial: bool | None = None, inputs: InputSpec | None = None,
                  providers: list[str] | None = None, name: str | None = None) -> dict:
    """Describe every weighted layer (see the JSON schema in the README).

    Args:
        handle: the model.
        trial: try each possible rewrite and verify it (default: for models
            whose weights are under 64 MB and inline).
        inputs, providers: for the trial runs.
        name: the model's name in the report.
    """
    ir = GraphIR(handle)
    folded = []
    if computed_weights(ir):  # layers whose weights are computed from constants grow once folded
        handle = handle.copy()
        folded = fold_computed_weights(handle)
        ir = GraphIR(handle)
    if trial is None:
        trial = handle.weight_bytes() <= TRIAL_LIMIT_BYTES and not handle.has_external_data()
    if trial and handle.has_external_data():
        handle = handle.inlined(copy=True)
    reference = ReferenceRun(handle.proto, inputs=inputs, providers=providers) if trial else None
    # Each layer's own walk decides its promise (a layer can be a partial
    # producer in another layer's group and still be refused on its own).
    groups = {index: coupling.find_group(ir, index) for index in coupling.weighted_layers(ir)}
    if reference is not None:
        tried = {}
        for group in groups.values():
            if group.ok:
                # One trial per group and layout (the same layers in another layout promise other widths).
                key = (frozenset(group.producers + group.passthrough), group.features_per_unit, group.feature_step)
                if key not in tried:
                    tried[key] = _trial(group, reference, lambda g=group: WidenPass(
                        {coupling.layer_name(ir, g.seed): g.width + g.feature_step})(handle.copy()).model)
                elif tried[key]:
                    group.refusal = coupling.Refusal(None, tried[key])
    layers = [_describe(ir, index, group, reference, handle) for index, group in groups.items()]
    report = {"model": name or (str(handle.path) if handle.path else handle.graph.name), "layers": layers}
    if folded:
        report["folded"] = folded  # weights computed from constants, folded before the analysis
    return report


def _describe(ir: GraphIR, index: int, group: coupling.UnitGroup, reference, handle) -> dict:
    node = ir.nodes[index]
    names = sorted(coupling.layer_name(ir, p) for p in group.producers + group.passthrough) if group.ok else []
    widen = {"ok": group.ok, "reason": None if group.ok else str(group.refusal), "step": group.feature_step,
             "group": names, "note": _widen_note(group, ir) if group.ok else None}
    return {
        "name": coupling.layer_name(ir, index),
        "op": node.op_type,
        "weight": node.input[1] if len(node.input) > 1 else None,
        "width": coupling.layer_width(ir, index),
        "widen": widen,
        "deepen": _deepen_status(ir, index, reference, handle),
    }


def _widen_note(group: coupling.UnitGroup, ir: GraphIR) -> str | None:
    """Why the step is what it is, when that is not obvious."""
    notes = []
    if isinstance(group, routing.RoutedGroup):
        notes.append(f"channel routing region: its {len(group.producers)} layers grow together (shuffles or "
                     "slices route each channel to later layers, and every one must still reach the same layers)")
        if group.step != 1:
            notes.append(routing.describe_valid_widths(ir, group))
    if group.unit_width > 1:
        notes.append(f"whole attention heads of {group.unit_width}")
    if group.repeats > 1:
        notes.append(f"the units repeat {group.repeats}x along the output (fused projections)")
    if group.tile and group.average_expansion:
        carry = "the mean" if group.extras == "mean" else "zero (RMS norms)"
        notes.append(f"normalised units: widths that are not multiples use LEMON's average expansion "
                     f"(extra units carry {carry})")
    elif group.tile:
        notes.append(f"normalised units: multiples only ({group.average_blocker})")
    return "; ".join(notes) or None


def _deepen_status(ir: GraphIR, index: int, reference, handle) -> dict:
    try:
        deeper.plan(ir, index, deeper.DeepenOptions())
    except GrowthRefused as refused:
        return {"ok": False, "reason": str(refused)}
    status = {"ok": True, "reason": None}
    if reference is not None:
        name = coupling.layer_name(ir, index)
        failure = _try(reference, lambda: DeepenPass([name])(handle.copy()).model)
        if failure:
            status.update(ok=False, reason=failure)
    return status


def _trial(group: coupling.UnitGroup, reference: ReferenceRun, build) -> str | None:
    failure = _try(reference, build)
    if failure:
        group.refusal = coupling.Refusal(None, failure)
    return failure


def _try(reference: ReferenceRun, build) -> str | None:
    """Run a trial rewrite; a failure message, or None when it verified."""
    try:
        candidate: onnx.ModelProto = build()
        report = reference.compare(candidate)
    except UserError as error:
        return f"trial rewrite failed ({error}); refused to be safe"
    except Exception as error:  # noqa: BLE001 - a bug here must not become a promise
        return f"trial rewrite raised {type(error).__name__}: {error}; refused to be safe"
    if not report.passed:
        return f"trial rewrite did not verify (max rel err {report.max_rel:.2g}); refused to be safe"
    return None
