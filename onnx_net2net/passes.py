"""Rewrites as passes: a model in, the model and whether it changed out.

Each pass resolves the user's layer names, asks the analysis for the
groups, applies the rewrite and returns a report. Passes compose in a
`Pipeline`, take an `onnx.ModelProto` (never modified: the pass works on a
copy) or a `ModelHandle` (modified in place, which is what lets the CLI avoid
copying large models), and never verify by themselves: verification is the
caller's choice (see `onnx_net2net.widen` and the CLI).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import onnx
import onnx_ir
import onnx_ir.external_data
import onnx_ir.passes

from . import typeinfo
from .analysis import (
    Refusal,
    UnitGroup,
    analyse_groups,
    find_group,
    find_layer,
    layer_name,
    layer_width,
    space_key,
    weighted_layers,
)
from .analysis.quantized import quantized_layer_refusal, quantized_layers
from .editor import orphans_removed
from .errors import GrowthRefused, UserError, VerificationFailed, option
from .folding import fold_computed_weights
from .io import ModelHandle, available_memory, from_proto
from .io import parameter_count as io_parameter_count
from .ir import GraphIR
from .options import DeepenMode, Fill, Init, Split, VerifyMode, parse
from .rewrites import blocks, deeper, perturb
from .rewrites.deeper import DeepenOptions
from .rewrites.grow import grow_group
from .rewrites.perturb import PerturbOptions
from .rewrites.fresh_init import fresh_refusal
from .rewrites.wider import WidenOptions


@contextlib.contextmanager
def _rewriting(handle: ModelHandle):
    """One rewrite of `handle`: what it orphans is removed, and its type
    declarations are made true afterwards."""
    with typeinfo.kept_consistent(handle), orphans_removed(handle):
        yield


@dataclass
class PassResult:
    """What a pass returns: the model, whether it changed, and what it did."""

    model: onnx.ModelProto
    modified: bool
    report: dict = field(default_factory=dict)


class _Pass(onnx_ir.passes.FunctionalPass):
    """A pass over an `onnx.ModelProto` (a copy is rewritten), a `ModelHandle`
    (rewritten in place: the CLI's way to avoid copying large models), or an
    `onnx_ir.Model` (the onnx_ir contract: a new model in an
    `onnx_ir.passes.PassResult`, so the pass runs inside `PassManager`; the
    report of the last run is `self.report`)."""

    name = "pass"
    #: Whether the pass preserves the function (verification must then pass).
    exact = True
    report: dict | None = None

    def __call__(self, model):
        if isinstance(model, ModelHandle):
            handle = model
        elif isinstance(model, onnx.ModelProto):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            handle = from_proto(copy)
        else:
            return super().__call__(model)
        self.report = self.apply(handle)
        return PassResult(handle.proto, bool(self.report.get("changes")), self.report)

    def call(self, model: onnx_ir.Model) -> onnx_ir.passes.PassResult:
        result = self(ir_model_to_proto(model))
        return onnx_ir.passes.PassResult(onnx_ir.serde.deserialize_model(result.model), result.modified)

    def apply(self, handle: ModelHandle) -> dict:
        """Rewrite the model of `handle` in place; return the report."""
        raise NotImplementedError


def ir_model_to_proto(model: onnx_ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto with every weight inline: weights an
    `onnx_ir.Model` keeps in external files are read into it first (their
    values do not change; their folder is not carried by a ModelProto)."""
    onnx_ir.external_data.load_to_model(model)
    return onnx_ir.serde.serialize_model(model)


class WidenPass(_Pass):
    """Net2WiderNet on the groups of the named layers (or every group).

    Args:
        widths: {layer name: new width}; a layer name is its node name or its
            weight initializer's name.
        factor: widen every growable group by this factor instead (rounded up
            to the group's step).
        options: split, noise, init and seed.
    """

    name = "widen"

    def __init__(self, widths: dict[str, int] | None = None, factor: float | None = None,
                 options: WidenOptions | None = None, keep_output_shapes: bool = False):
        if bool(widths) == (factor is not None):
            raise UserError("give either layer widths or a factor")
        if factor is not None and not factor > 1:
            raise UserError(f"{option('factor', factor)}: must be larger than 1")
        self.widths = dict(widths or {})
        self.factor = factor
        self.keep_output_shapes = keep_output_shapes
        self.options = options or WidenOptions()
        self.exact = self.options.exact
        self.options.split = parse(Split, "split", self.options.split)
        self.options.init = parse(Init, "init", self.options.init)
        if self.options.noise < 0:
            raise UserError(f"{option('noise', self.options.noise)}: must be >= 0")
        if self.options.init == Init.FRESH and (self.options.noise or self.options.split != Split.EQUAL):
            given = [option(name, value) for name, value in (("noise", self.options.noise),
                                                             ("split", self.options.split))
                     if value and value != Split.EQUAL]
            raise UserError(f"{', '.join(given)}: not used by {option('init', 'fresh')} (it copies no unit: new "
                            "units are freshly initialised and their outgoing weights are zero)")

    def apply(self, handle: ModelHandle) -> dict:
        before = parameter_count(handle)
        with typeinfo.kept_consistent(handle):  # folding removes what it orphans itself
            folded = fold_computed_weights(handle)
        ir = GraphIR(handle)
        requests = self._requests(ir)
        changes = []
        for number, (name, units, width) in enumerate(requests):
            if number:
                ir = GraphIR(handle)  # the previous request rewrote the model
            group = _group_of(ir, name, self.keep_output_shapes)
            if width is not None and group.fixed_features:
                units = _units_beside_grown_features(ir, name, group, width)
                if units == group.size:
                    continue  # the other requests already made it `width` wide
            _check_memory(ir, group, units)
            options = WidenOptions(self.options.split, self.options.noise, self.options.init,
                                   self.options.seed + number)
            names = [layer_name(ir, p) for p in group.producers + group.passthrough]
            with _rewriting(handle):
                changes.append(asdict(grow_group(group, ir, units, options, names)))
        return {"pass": self.name, "options": asdict(self.options), "changes": changes, "folded": folded,
                "parameters": {"before": before, "after": parameter_count(handle)}}

    def _requests(self, ir: GraphIR) -> list[tuple[str, int, int | None]]:
        """One (layer, number of units, requested width or None) per group,
        checked before anything changes. A layer whose width also counts
        features of other groups (EfficientViT's qkv: q and k beside v) comes
        last: its units are counted again once the others have grown."""
        if self.factor is not None:
            requests, grown = [], set()
            for group in analyse_groups(ir, self.keep_output_shapes):
                # The same space seeded from layers writing it once and twice (GhostNet's
                # primary convolution and the stem writing [S | S]) is one group: grown once.
                if group.ok and space_key(ir, group) not in grown:
                    grown.add(space_key(ir, group))
                    width = self._factor_width(ir, group)
                    if width is not None:
                        self._check_options(ir, group)
                        requests.append((layer_name(ir, group.seed), group.units_of(width), None))
            if not requests:
                raise GrowthRefused("no layer of this model can be widened exactly (see `inspect`)")
            return requests
        by_group: dict[frozenset, tuple[str, int, int]] = {}
        counted_last = set()  # layers whose width also counts other groups' features
        for name, width in self.widths.items():
            group = _group_of(ir, name, self.keep_output_shapes)
            _check_width(ir, name, group, width)
            self._check_options(ir, group)
            key = space_key(ir, group)
            units = group.units_of(width)  # layers of one group may hold it once or several times
            if key in by_group and by_group[key][1] != units:
                other = by_group[key][0]
                raise UserError(f"layers '{other}' and '{name}' grow together; give them widths for the same "
                                "number of units (see `inspect`)")
            by_group.setdefault(key, (name, units, width))
            if group.fixed_features:
                counted_last.add(by_group[key][0])
        return sorted(by_group.values(), key=lambda request: request[0] in counted_last)

    def _factor_width(self, ir: GraphIR, group: UnitGroup) -> int | None:
        """The first valid width from the group's own features times the factor up (a layer's
        features outside the group, EfficientViT's v beside q and k, keep their number)."""
        own = group.width - group.fixed_features
        if group.width * self.factor >= MAX_UNITS:
            raise UserError(f"factor {self.factor:g}: layer '{layer_name(ir, group.seed)}' would grow to "
                            f"{group.width * self.factor:.3g} features; widths are limited to {MAX_UNITS - 1}")
        return group.next_width(ir, math.ceil(own * self.factor) + group.fixed_features)

    def _check_options(self, ir: GraphIR, group: UnitGroup) -> None:
        if group.exact_only and (self.options.init == "random-pad" or self.options.added_noise):
            raise UserError("channel routing regions (shuffles, slices) grow exactly only (no random-pad, no noise)")
        if self.options.init == Init.FRESH:
            if group.exact_only:
                raise UserError(f"layer '{layer_name(ir, group.seed)}': {option('init', 'fresh')} is not offered "
                                "for channel routing regions (shuffles, slices); use init net2net")
            if why := fresh_refusal(ir, group):
                raise UserError(f"layer '{layer_name(ir, group.seed)}': {option('init', 'fresh')} would change "
                                f"the function: {why}")


def _units_beside_grown_features(ir: GraphIR, name: str, group: UnitGroup, width: int) -> int:
    """The units at which layer `name` is `width` features wide, counted after
    the other requests have grown the features it writes beside its group's."""
    own = width - group.fixed_features
    units = group.units_of(width)
    if own % group.features_per_unit or units < group.size or (units - group.size) % group.step:
        raise UserError(f"layer '{name}': width {width} cannot hold its {group.fixed_features} features outside "
                        f"this group as the other requested widths leave them (its width is {group.width} "
                        f"now; ask {group.width} + a multiple of {group.feature_step})")
    return units


def _check_width(ir: GraphIR, name: str, group: UnitGroup, width: int) -> None:
    """Refuse, naming the valid widths, a width the group cannot take."""
    if width <= group.width:
        raise UserError(f"layer '{name}': new width {width} is not larger than its width {group.width}")
    if why := group.width_refusal(ir, width):
        raise UserError(f"layer '{name}': {why}")


SELECTORS = ("all", "stages", "last")
#: A deepen step, or a whole plan, inserts at most this many layers (a plan
#: repeating after = "all" doubles the depth at each step).
MAX_INSERTIONS = 256


class DeepenPass(_Pass):
    """Net2DeeperNet: an identity construction after each named layer.

    Args:
        after: layer names, or a selector resolved against the model when the
            pass runs: "all" (every layer that can be deepened), "stages" (the
            last deepenable layer of each run of equal-width layers), "last".
        options: mode, kernel, batchnorm, noise, seed.
    """

    name = "deepen"

    def __init__(self, after: list[str] | str, options: DeepenOptions | None = None):
        if not after:
            raise UserError("name at least one layer to deepen after")
        self.selector = after if isinstance(after, str) else None
        if self.selector is not None and self.selector not in SELECTORS:
            raise UserError(f"after = '{after}': give layer names or one of {', '.join(SELECTORS)}")
        self.after = [] if self.selector else list(after)
        self.options = options or DeepenOptions()
        self.exact = self.options.noise == 0
        self.budget = MAX_INSERTIONS  # layers this pass may still insert (a Pipeline lowers it)
        self.options.mode = parse(DeepenMode, "mode", self.options.mode)
        kernel = self.options.kernel
        if kernel is not None and (kernel < 1 or kernel % 2 == 0):
            raise UserError(f"{option('kernel', kernel)}: must be a positive odd number")
        if self.options.noise < 0:
            raise UserError(f"{option('noise', self.options.noise)}: must be >= 0")
        if self.options.mode.copies_a_block:
            given = [option(name) for name, value in (("kernel", kernel), ("batchnorm", self.options.batchnorm),
                                                      ("noise", self.options.noise)) if value]
            if given:
                raise UserError(f"{', '.join(given)}: not used by {option('mode', self.options.mode)} (a block "
                                "copies its own layers)")

    def apply(self, handle: ModelHandle) -> dict:
        before = parameter_count(handle)
        with typeinfo.kept_consistent(handle):  # folding removes what it orphans itself
            folded = fold_computed_weights(handle)
        names = self._select(GraphIR(handle)) if self.selector else self.after
        if len(names) > self.budget:
            raise UserError(f"this step would insert {len(names)} layers; a deepen step or plan inserts at most "
                            f"{MAX_INSERTIONS} in all")
        if self.options.mode.copies_a_block:
            changes = self._insert_blocks(handle, names)
        else:
            changes = self._insert_identities(handle, names)
        return {"pass": self.name, "options": asdict(self.options), "changes": changes, "folded": folded,
                "parameters": {"before": before, "after": parameter_count(handle)}}


    def _insert_blocks(self, handle: ModelHandle, names: list[str]) -> list[dict]:
        """One block copy after another (a copy changes what the next block is)."""
        changes = []
        for number, name in enumerate(names):
            ir = GraphIR(handle)
            fresh_seed = self.options.seed + number if self.options.mode == DeepenMode.FRESH_BLOCK else None
            with _rewriting(handle):
                changes.append(_insert_block(ir, _layer(ir, name), name, fresh_seed))
        return changes

    def _insert_identities(self, handle: ModelHandle, names: list[str]) -> list[dict]:
        """Every identity construction planned on one index, then inserted in
        one edit (`deeper.insert_all` says why that equals inserting them one
        by one); a layer named twice is deepened twice, one insertion at a time."""
        ir = GraphIR(handle)
        planned = [(self._plan(ir, name), self._layer_options(number)) for number, name in enumerate(names)]
        if len({insertion.tensor for insertion, _ in planned}) < len(planned):
            return self._insert_identities_one_by_one(handle, names)
        with _rewriting(handle):
            return [asdict(inserted) for inserted in deeper.insert_all(ir, planned)]

    def _insert_identities_one_by_one(self, handle: ModelHandle, names: list[str]) -> list[dict]:
        changes = []
        for number, name in enumerate(names):
            ir = GraphIR(handle)
            with _rewriting(handle):
                changes.append(asdict(deeper.insert(ir, self._plan(ir, name), self._layer_options(number))))
        return changes

    def _plan(self, ir: GraphIR, name: str) -> deeper.Insertion:
        try:
            return deeper.plan(ir, _layer(ir, name), self.options)
        except Refusal as refused:
            raise GrowthRefused(f"layer '{name}' cannot be deepened: {refused}") from None

    def _layer_options(self, number: int) -> DeepenOptions:
        """The pass's options, with a seed of its own for the `number`-th layer's noise."""
        return DeepenOptions(self.options.kernel, self.options.mode, self.options.batchnorm, self.options.noise,
                             self.options.seed + number)

    def _select(self, ir: GraphIR) -> list[str]:
        order = {node: position for position, node in enumerate(ir.topological_order())}
        layers = sorted(weighted_layers(ir), key=order.__getitem__)
        possible, blocks_seen = [], set()
        for layer in layers:
            try:
                if self.options.mode.copies_a_block:
                    end = blocks.plan_block(ir, layer).end
                    if end in blocks_seen:
                        continue  # one copy per block, whichever of its layers names it
                    blocks_seen.add(end)
                else:
                    deeper.plan(ir, layer, self.options)
                possible.append(layer)
            except Refusal:
                continue
        if self.selector == "last":
            possible = possible[-1:]
        elif self.selector == "stages":
            possible = _stage_ends(ir, layers, set(possible))
        if not possible:
            raise GrowthRefused(f"no layer matches after = '{self.selector}' (see `inspect`)")
        return [layer_name(ir, layer) for layer in possible]


def _insert_block(ir: GraphIR, layer: int, name: str, fresh_seed: int | None) -> dict:
    try:
        block = blocks.plan_block(ir, layer)
    except Refusal as refused:
        raise GrowthRefused(f"layer '{name}' cannot be deepened by a block: {refused}") from None
    return blocks.insert_block(ir, block, name, fresh_seed)


def _stage_ends(ir: GraphIR, layers: list[int], possible: set[int]) -> list[int]:
    """The last deepenable layer of each run of consecutive equal-width layers."""
    ends, run = [], []
    for layer in layers + [None]:
        if run and (layer is None or layer_width(ir, layer) != layer_width(ir, run[-1])):
            candidates = [member for member in run if member in possible]
            ends += candidates[-1:]
            run = []
        if layer is not None:
            run.append(layer)
    return ends


class AlignPass(_Pass):
    """Widen every growable group to the next multiple of `multiple`, exactly.

    Channel counts that are multiples of 8/16/32/64 suit tensor cores and SIMD
    units. `fill="zero"` (default) gives new units zero outgoing weights and
    keeps every original weight as it was; `fill="replicate"` uses Net2Net
    replication (replicate and divide).
    """

    name = "align"

    def __init__(self, multiple: int = 8, fill: str = "zero", seed: int = 0):
        if multiple < 2:
            raise UserError(f"{option('multiple', multiple)}: must be at least 2")
        self.multiple, self.fill, self.seed = multiple, parse(Fill, "fill", fill), seed

    def apply(self, handle: ModelHandle) -> dict:
        ir = GraphIR(handle)
        widths, spaces = {}, set()
        for group in analyse_groups(ir):
            if not group.ok or space_key(ir, group) in spaces:
                continue  # a space seeded from two layers (a depthwise conv passing it) is aligned once
            spaces.add(space_key(ir, group))
            target = group.aligned_width(ir, self.multiple)
            if target is not None and target != group.width:
                widths[layer_name(ir, group.seed)] = target
        if not widths:
            return {"pass": self.name, "options": self._options(), "changes": [],
                    "parameters": {"before": parameter_count(handle), "after": parameter_count(handle)}}
        init = Init.ZERO if self.fill == Fill.ZERO else Init.NET2NET
        options = WidenOptions(split=Split.EQUAL, init=init, seed=self.seed)
        report = WidenPass(widths, options=options).apply(handle)
        report.update(self._options(), **{"pass": self.name})
        return report

    def _options(self) -> dict:
        return {"options": {"multiple": self.multiple, "fill": self.fill, "seed": self.seed}}


class PerturbPass(_Pass):
    """Shrink and perturb every weighted layer (see rewrites/perturb.py).

    Not function-preserving (`exact` is False): callers report the deviation.

    Args:
        options: shrink, fresh and seed.
    """

    name = "perturb"
    exact = False

    def __init__(self, options: PerturbOptions | None = None):
        self.options = options or PerturbOptions()
        for what, value in (("shrink", self.options.shrink), ("fresh", self.options.fresh)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{option(what, value)}: must be a finite number >= 0")
        if self.options.shrink == 1 and self.options.fresh == 0:
            raise UserError(f"{option('shrink', 1)} with {option('fresh', 0)} changes nothing")

    def apply(self, handle: ModelHandle) -> dict:
        before = parameter_count(handle)
        changes = perturb.perturb_model(GraphIR(handle), self.options)
        if not changes:
            raise GrowthRefused("the model has no weighted layer (Conv, ConvTranspose, Gemm, MatMul with a "
                                "constant weight) to perturb")
        return {"pass": self.name, "options": asdict(self.options), "changes": [asdict(c) for c in changes],
                "parameters": {"before": before, "after": parameter_count(handle)}}


class Pipeline(_Pass):
    """Passes applied in order; the report lists each pass's report."""

    name = "pipeline"

    def __init__(self, passes: list[_Pass]):
        self.passes = list(passes)
        self.exact = all(p.exact for p in self.passes)

    def verified(self, *, mode: str = "full", keep_failures: bool = False, on_result=None,
                 **verify_options) -> Pipeline:
        """This pipeline with every step wrapped in a `VerifiedPass` (labelled
        "step N (name)"), so each is checked against the model before it."""
        steps = [VerifiedPass(step, mode=mode, label=f"step {number + 1} ({step.name})",
                              keep_failures=keep_failures, on_result=on_result, **verify_options)
                 for number, step in enumerate(self.passes)]
        return Pipeline(steps)

    def apply(self, handle: ModelHandle) -> dict:
        """Run the passes in order; the report lists each step's report."""
        reports, inserted = [], 0
        for number, step in enumerate(self.passes):
            reports.append(self._apply_step(number, step, handle, MAX_INSERTIONS - inserted))
            inserted += sum(1 for change in reports[-1]["changes"] if "after" in change)
        return {"pass": self.name, "steps": reports, "changes": [c for r in reports for c in r["changes"]]}

    def _apply_step(self, number: int, step: _Pass, handle: ModelHandle, budget: int) -> dict:
        """One step; a refusal says which step, after which others (the model
        has changed since the first)."""
        deepen = step
        while isinstance(deepen, VerifiedPass):
            deepen = deepen.step
        if isinstance(deepen, DeepenPass):
            deepen.budget = budget
        try:
            return step.apply(handle)
        except (GrowthRefused, UserError) as error:
            before = ", ".join(f"{i + 1} ({p.name})" for i, p in enumerate(self.passes[:number]))
            if number > 3:
                before = f"1-{number}"
            where = f"step {number + 1} ({step.name})" + (f", after step(s) {before}" if before else "")
            raise type(error)(f"{where}: {error}") from None
        finally:
            if isinstance(deepen, DeepenPass):
                deepen.budget = MAX_INSERTIONS


class VerifiedPass(_Pass):
    """A pass followed by verification: its result is compared in onnxruntime
    with the model before it (`verification.ReferenceRun`), and the outcome is
    the report's "verification".

    Args:
        step: the pass to run.
        mode: "full" (both whole models), "region" (only the part the step
            changed, see `onnx_net2net.region`) or "auto".
        label: how errors name the step (default: its name).
        keep_failures: record a failed verification instead of raising
            `VerificationFailed` (a pass that is not exact never raises).
        on_result: optional `on_result(pass, result)` called after each check
            (the CLI prints it).
        **verify_options: for `ReferenceRun` (inputs, tolerances, provider).
    """

    def __init__(self, step: _Pass, *, mode: str = "full", label: str | None = None, keep_failures: bool = False,
                 on_result=None, **verify_options):
        self.step, self.label = step, label or step.name
        self.mode = parse(VerifyMode, "verify_mode", mode)
        self.name, self.exact = step.name, step.exact
        self.keep_failures, self.on_result, self.verify_options = keep_failures, on_result, verify_options

    def apply(self, handle: ModelHandle) -> dict:
        from .region import verify_pair
        from .verification import ReferenceRun, ours

        before = handle.copy()
        report = self.step.apply(handle)

        def full():
            reference = ReferenceRun(before.proto, base_dir=before.base_dir, **self.verify_options)
            return reference.compare(handle.proto)

        with ours(f"the model after {self.label}"):
            result = verify_pair(before, handle, full, mode=self.mode, candidate_is_ours=True, **self.verify_options)
        report["verification"] = result.to_dict()
        if self.on_result is not None:
            self.on_result(self, result)
        if self.exact and not result.passed and not self.keep_failures:
            raise VerificationFailed(f"{self.label}: {result.summary()}", report)
        return report


def _layer(ir: GraphIR, name: str) -> int:
    index = find_layer(ir, name)
    if index is None:
        quantized = [i for i in quantized_layers(ir) if layer_name(ir, i) == name or ir.nodes[i].name == name]
        if quantized:
            raise GrowthRefused(f"layer '{name}' cannot be grown: {quantized_layer_refusal(ir, quantized[0]).reason}")
        known = [layer_name(ir, i) for i in weighted_layers(ir)]
        hint = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
        raise UserError(f"unknown layer '{name}' (layers: {hint or 'none'})")
    return index


def _group_of(ir: GraphIR, name: str, keep_outputs: bool = False) -> UnitGroup:
    group = find_group(ir, _layer(ir, name), keep_outputs=keep_outputs)
    if not group.ok:
        raise GrowthRefused(f"layer '{name}' cannot be widened exactly: {group.refusal}")
    return group


MAX_UNITS = 1 << 31


def _check_memory(ir: GraphIR, group: UnitGroup, units: int) -> None:
    """Refuse, before allocating, a widening that cannot fit in memory."""
    needed = group.grown_weight_bytes(ir, units)
    available = available_memory()
    features = units * group.features_per_unit + group.fixed_features
    if features >= MAX_UNITS:
        raise UserError(f"width {features} would need about {needed / 2**30:.3g} GiB for the new "
                        f"weights; widths are limited to {MAX_UNITS - 1}")
    if available and needed * 3 > available:
        raise UserError(f"widening to {features} needs about {needed / 2**30:.3g} GiB for the new weights, "
                        f"more than this machine can hold ({available / 2**30:.1f} GiB available)")


def parameter_count(handle: ModelHandle) -> int:
    return io_parameter_count(handle.graph)

