"""`inspect`: every weighted layer and what can be done to it, exactly.

`ok: true` is a promise. The static analysis (unit groups and insertion plans)
decides what is possible; for models small enough to run cheaply, each
possible rewrite is also tried once (widen by one step, deepen once) and
verified in onnxruntime, so a promise is never made on analysis alone.
"""

from __future__ import annotations

import onnx

from .analysis import Refusal, RefusalKind, UnitGroup, groups_by_layer, layer_name, layer_width
from .analysis.quantized import quantized_deepen_reason, quantized_layer_refusal, quantized_layers
from .errors import UserError
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
    _cache_constants(ir)
    if trial is None:
        trial = handle.weight_bytes() <= TRIAL_LIMIT_BYTES and not handle.has_external_data()
    if trial and handle.has_external_data():
        handle = handle.inlined(copy=True)
    reference = ReferenceRun(handle.proto, inputs=inputs, providers=providers) if trial else None
    # Each layer's own walk decides its promise (a layer can be a partial
    # producer in another layer's group and still be refused on its own), except
    # where the layer's whole output carries an ok group already walked
    # (analysis.shares_space: seeding from it gives that same group).
    groups = groups_by_layer(ir)
    if reference is not None:
        _widen_trials(ir, groups, reference, handle)
    deepen = _deepen_statuses(ir, list(groups), reference, handle)
    described = {index: _describe(ir, index, group, deepen[index]) for index, group in groups.items()}
    described.update({index: _describe_quantized(ir, index) for index in quantized_layers(ir)})
    layers = [described[index] for index in sorted(described)]
    report = {"model": name or (str(handle.path) if handle.path else handle.graph.name), "layers": layers}
    if folded:
        report["folded"] = folded  # weights computed from constants, folded before the analysis
    return report


#: Constants up to this size are kept once read (inspect never rewrites its IR).
CONST_CACHE_BYTES = 256 << 20


def _cache_constants(ir: GraphIR) -> None:
    """Read each constant at most once per `inspect`: every layer's walk asks
    for the weights it meets, and walks of one group meet the same weights
    (on a 32-layer transformer, ~40,000 reads of a few hundred tensors). Safe
    because this IR is never rewritten (trials rewrite copies); bounded by
    CONST_CACHE_BYTES, beyond which values are read again."""
    read = ir.const_value
    cache, held = {}, [0]

    def const_value(tensor: str):
        if tensor in cache:
            return cache[tensor]
        value = read(tensor)
        if value is None or held[0] + value.nbytes <= CONST_CACHE_BYTES:
            cache[tensor] = value
            held[0] += 0 if value is None else value.nbytes
        return value

    ir.const_value = const_value


def _widen_trials(ir: GraphIR, groups: dict, reference: ReferenceRun, handle: ModelHandle) -> None:
    """One trial per group and layout (the same layers in another layout
    promise other widths), all in one model first (see `_batched`)."""
    trials = {}
    for group in groups.values():
        if group.ok:
            key = (frozenset(group.producers + group.passthrough), group.features_per_unit, group.feature_step)
            trials.setdefault(key, []).append(group)

    def widen(members):
        widths = {layer_name(ir, g[0].seed): g[0].width + g[0].feature_step for g in members}
        return lambda: WidenPass(widths)(handle.copy()).model

    failures = _batched(list(trials.values()), reference, widen)
    for members, failure in zip(trials.values(), failures):
        if failure:
            for group in members:
                group.refusal = Refusal(failure, RefusalKind.TRIAL_FAILED)


def _deepen_statuses(ir: GraphIR, layers: list[int], reference, handle: ModelHandle) -> dict[int, dict]:
    statuses, planned = {}, []
    for index in layers:
        try:
            deeper.plan(ir, index, deeper.DeepenOptions())
        except Refusal as refused:
            statuses[index] = {"ok": False, "reason": str(refused)}
            continue
        statuses[index] = {"ok": True, "reason": None}
        planned.append(index)
    if reference is not None and planned:
        def deepen(members):
            return lambda: DeepenPass([layer_name(ir, i) for i in members])(handle.copy()).model

        for index, failure in zip(planned, _batched(planned, reference, deepen)):
            if failure:
                statuses[index].update(ok=False, reason=failure)
    return statuses


def _batched(items: list, reference: ReferenceRun, build) -> list[str | None]:
    """Trial every item's rewrite: first all of them in one model (one rewrite,
    one onnxruntime session); when that verifies, each one did (an error in one
    rewrite would have to be cancelled exactly by another, elsewhere in the
    network, on random inputs). When it does not, or the combination cannot
    be built, each item is tried alone, as before."""
    if len(items) > 1 and _try(reference, build(items)) is None:
        return [None] * len(items)
    return [_try(reference, build([item])) for item in items]


def _describe(ir: GraphIR, index: int, group: UnitGroup, deepen: dict) -> dict:
    node = ir.nodes[index]
    names = sorted(layer_name(ir, p) for p in group.producers + group.passthrough) if group.ok else []
    widen = {"ok": group.ok, "reason": None if group.ok else str(group.refusal), "step": group.feature_step,
             "group": names, "note": _widen_note(group, ir) if group.ok else None}
    return {
        "name": layer_name(ir, index),
        "op": node.op_type,
        "weight": node.input[1] if len(node.input) > 1 else None,
        "width": layer_width(ir, index),
        "widen": widen,
        "deepen": deepen,
    }


def _describe_quantized(ir: GraphIR, index: int) -> dict:
    """A layer whose weight is quantized (QDQ): listed, refused with the reason."""
    node = ir.nodes[index]
    reason = str(quantized_layer_refusal(ir, index))
    return {
        "name": layer_name(ir, index),
        "op": node.op_type,
        "weight": node.input[1],
        "width": layer_width(ir, index),
        "widen": {"ok": False, "reason": reason, "step": 1, "group": [], "note": None},
        "deepen": {"ok": False, "reason": quantized_deepen_reason(ir, index)},
    }


def _widen_note(group: UnitGroup, ir: GraphIR) -> str | None:
    """Why the step is what it is, when that is not obvious."""
    notes = group.step_notes(ir)
    if group.unit_width > 1:
        notes.append(f"whole attention heads of {group.unit_width}")
    if group.repeats > 1 and group.fixed_features:
        notes.append(f"the units sit in {group.repeats} parts of the output; its other {group.fixed_features} "
                     "features keep their number")
    elif group.repeats > 1:
        why = "a concatenation of the same units" if "Concat" in group.ops else "fused projections"
        notes.append(f"the units repeat {group.repeats}x along the output ({why})")
    if any(edit.divided for edit in group.weight_edits):
        divided = sorted({layer_name(ir, edit.node) if edit.node in group.producers else ir.label(edit.node)
                          for edit in group.weight_edits if edit.divided})
        notes.append(f"a product sums over the units (q^T k): the copies made by {', '.join(divided)} share "
                     "their unit's value")
    if group.repeat_of is not None:
        notes.append(f"it passes one repeat of the units '{layer_name(ir, group.repeat_of)}' writes, and grows "
                     "with them")
    if group.tile and group.average_expansion:
        carry = "the mean" if group.extras == "mean" else "zero (RMS norms)"
        notes.append(f"normalised units: widths that are not multiples use LEMON's average expansion "
                     f"(extra units carry {carry})")
    elif group.tile:
        notes.append(f"normalised units: multiples only ({group.average_blocker})")
    return "; ".join(notes) or None


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
