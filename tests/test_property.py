"""Property-based tests: every growth `inspect` promises is exact.

For random valid graphs (tests/graphgen.py):

* every layer the *static* analysis (`inspect(trial=False)`) calls widenable,
  widened to a random valid width (one group at a time, and all groups at
  once), computes the same function in onnxruntime; likewise every layer it
  calls deepenable, deepened (one at a time with random modes, and all at
  once). Static analysis is what is checked: with trial runs, `inspect` would
  hide an analysis bug by refusing the layer;
* every refusal carries a non-empty reason;
* the grown model is itself a valid model that the analysis accepts, and the
  layer has the width that was asked for;
* with trial runs, `inspect` agrees with the static analysis.

Profiles: HYPOTHESIS_PROFILE=ci (default: derandomized, a few hundred
examples) or HYPOTHESIS_PROFILE=long (thousands, random, with the example
database). A failing example prints as `graphgen.replay([...])`: add its
choices to tests/regressions/property_cases.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import graphgen  # noqa: E402

import onnx_net2net as n2n  # noqa: E402
from onnx_net2net.errors import GrowthRefused, UserError, VerificationFailed  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", deadline=None, max_examples=5000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
LONG = PROFILE != "ci"


def examples(ci: int) -> settings:
    """The active profile, with `ci` examples in CI (the profile's own count otherwise)."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=ci if not LONG else profile.max_examples)


REGRESSIONS = json.loads((Path(__file__).parent / "regressions" / "property_cases.json").read_text())


# ----------------------------------------------------------------------------
# The property


def check_report(report: dict) -> None:
    """Schema and reasons of an inspect report."""
    for layer in report["layers"]:
        widen, deepen = layer["widen"], layer["deepen"]
        assert isinstance(layer["name"], str) and layer["name"]
        assert isinstance(layer["width"], int) and layer["width"] >= 1
        if widen["ok"]:
            assert widen["reason"] is None
            assert isinstance(widen["step"], int) and widen["step"] >= 1
            assert layer["name"] in widen["group"], layer
        else:
            assert isinstance(widen["reason"], str) and widen["reason"].strip(), layer
        if deepen["ok"]:
            assert deepen["reason"] is None
        else:
            assert isinstance(deepen["reason"], str) and deepen["reason"].strip(), layer


def _fail(generated, what: str, error: BaseException) -> None:
    pytest.fail(f"{what}: {type(error).__name__}: {error}\nmodel: {generated!r}\n{generated.text()}", pytrace=False)


def _grow(generated, what: str, call):
    try:
        return call()
    except (VerificationFailed, UserError) as error:  # refused after a promise, or a broken result
        _fail(generated, what, error)


def _width_of(model, name: str) -> int:
    layers = {layer["name"]: layer for layer in n2n.inspect(model, trial=False)["layers"]}
    return layers[name]["width"]


def check_growth(generated, draw) -> None:
    """The whole property for one model; `draw(strategy)` picks the random parts."""
    model = generated.model
    report = n2n.inspect(model, trial=False)
    check_report(report)
    layers = report["layers"]
    note(f"static inspect: {json.dumps(layers)}")

    groups = {}
    for layer in layers:
        if layer["widen"]["ok"]:
            groups.setdefault(tuple(layer["widen"]["group"]), layer)
    requests = {}
    for members, layer in groups.items():
        name = draw(st.sampled_from(members))
        width = layer["width"] + draw(st.integers(1, 3)) * layer["widen"]["step"]
        split = draw(st.sampled_from(["equal", "random"]))
        init = draw(st.sampled_from(["net2net", "zero"]))
        seed = draw(st.integers(0, 3))
        what = f"widen {name!r} {layer['width']} -> {width} (split {split}, init {init}, seed {seed})"
        wider, _ = _grow(generated, what, lambda: n2n.widen(model, {name: width}, split=split, init=init,
                                                            seed=seed))
        try:
            assert _width_of(wider, name) == width
        except Exception as error:  # noqa: BLE001 - the grown model must stay analysable
            _fail(generated, f"{what}: the grown model", error)
        requests[name] = width
    if len(requests) > 1:
        _grow(generated, f"widen all groups at once {requests}", lambda: n2n.widen(model, requests))

    deepenable = [layer["name"] for layer in layers if layer["deepen"]["ok"]]
    for name in deepenable:
        mode = draw(st.sampled_from(["auto", "residual", "prelu", "before-activation", "identity"]))
        batchnorm = draw(st.booleans())
        what = f"deepen after {name!r} (mode {mode}, batchnorm {batchnorm})"
        try:
            deeper, _ = n2n.deepen(model, [name], mode=mode, batchnorm=batchnorm)
        except GrowthRefused as refused:
            if mode == "auto" and not batchnorm:
                _fail(generated, what, refused)  # inspect promised exactly this
            assert str(refused).strip()
            continue
        except (VerificationFailed, UserError) as error:
            _fail(generated, what, error)
        try:
            n2n.inspect(deeper, trial=False)
        except Exception as error:  # noqa: BLE001
            _fail(generated, f"{what}: the grown model", error)
    if len(deepenable) > 1:
        _grow(generated, f"deepen after all of {deepenable}", lambda: n2n.deepen(model, deepenable))


@examples(ci=250)
@given(generated=graphgen.models(), data=st.data())
def test_promised_growth_is_exact(generated, data):
    check_growth(generated, data.draw)


@examples(ci=40)
@given(generated=graphgen.models())
def test_trial_inspect_agrees_with_static_analysis(generated):
    static = n2n.inspect(generated.model, trial=False)
    trial = n2n.inspect(generated.model, trial=True)
    check_report(trial)
    for before, after in zip(static["layers"], trial["layers"]):
        assert before["name"] == after["name"]
        for kind in ("widen", "deepen"):
            if before[kind]["ok"] and not after[kind]["ok"]:
                pytest.fail(f"{kind} {before['name']!r}: static analysis says ok, the trial run says "
                            f"{after[kind]['reason']}\nmodel: {generated!r}\n{generated.text()}", pytrace=False)
            assert before[kind]["ok"] == after[kind]["ok"], (kind, before, after)


def test_generator_covers_the_listed_ops():
    """The strategy really produces every ingredient the property is about."""
    import random

    seen = set()
    for seed in range(400):
        rng = random.Random(seed)
        choices = [rng.randrange(0, 1 << 16) for _ in range(400)]
        seen.update(node.op_type for node in graphgen.replay(choices).model.graph.node)
    wanted = {"Conv", "Gemm", "MatMul", "Add", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Gelu",
              "Erf", "Mul", "Elu", "Selu", "Softplus", "HardSigmoid", "HardSwish", "BatchNormalization",
              "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Flatten", "Reshape", "Transpose"}
    assert wanted <= seen, wanted - seen


# ----------------------------------------------------------------------------
# Failing examples found so far, kept (tests/regressions/property_cases.json)


def _regression_params():
    params = []
    for case in REGRESSIONS:
        marks = []
        if case.get("open"):
            marks.append(pytest.mark.xfail(strict=True, reason=case["bug"]))
        params.append(pytest.param(case, id=case["id"], marks=marks))
    return params


@pytest.mark.parametrize("case", _regression_params())
def test_regression(case):
    generated = graphgen.replay(case["choices"])
    if case.get("ops"):
        present = {node.op_type for node in generated.model.graph.node}
        assert set(case["ops"]) <= present, "the generator changed: this case no longer builds the same graph"
    picks = iter(case.get("draws", []))

    def draw(strategy):
        # Replays the recorded draws; past them, the simplest value of the strategy.
        value = next(picks, None)
        return value if value is not None else _simplest(strategy)

    check_growth(generated, draw)


def _simplest(strategy):
    from hypothesis import find

    return find(strategy, lambda _: True)
