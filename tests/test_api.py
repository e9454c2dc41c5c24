"""The public API: inspect's JSON schema, widen/deepen/verify/load/save,
pass objects and pipelines."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_net2net as n2n
from onnx_net2net.rewrites import wider as wider_module
from onnx_net2net.verification import InputSpec
from helpers import (assert_same_function, conv_sandwich, dense_sandwich, model_path, node_weight, unary,
                     widen_exact)

LAYER_KEYS = {"name", "op", "weight", "width", "widen", "deepen"}
WIDEN_KEYS = {"ok", "reason", "step", "group", "note"}
DEEPEN_KEYS = {"ok", "reason"}


def check_schema(report):
    assert set(report) == {"model", "layers"}
    assert isinstance(report["model"], str)
    json.dumps(report)                                     # JSON-serialisable as is
    for layer in report["layers"]:
        assert set(layer) == LAYER_KEYS
        assert isinstance(layer["name"], str) and isinstance(layer["op"], str)
        assert isinstance(layer["weight"], str) and type(layer["width"]) is int
        assert set(layer["widen"]) == WIDEN_KEYS and set(layer["deepen"]) == DEEPEN_KEYS
        widen, deepen = layer["widen"], layer["deepen"]
        assert type(widen["ok"]) is bool and type(deepen["ok"]) is bool
        assert type(widen["step"]) is int and widen["step"] >= 1
        assert isinstance(widen["group"], list) and all(isinstance(g, str) for g in widen["group"])
        assert (widen["reason"] is None) == widen["ok"]
        assert (deepen["reason"] is None) == deepen["ok"]
        if not widen["ok"]:
            assert isinstance(widen["reason"], str) and widen["reason"]


@pytest.mark.parametrize("trial", [None, False, True])
def test_inspect_schema(trial):
    report = n2n.inspect(str(model_path("resnet_block")), trial=trial)
    check_schema(report)
    first = report["layers"][0]
    assert first == {
        "name": "/stem/stem.0/Conv", "op": "Conv", "weight": "stem.0.weight", "width": 16,
        "widen": {"ok": True, "reason": None, "step": 1,
                  "group": ["/layer1/layer1.0/conv2/Conv", "/layer1/layer1.1/conv2/Conv", "/stem/stem.0/Conv"],
                  "note": None},
        "deepen": {"ok": True, "reason": None},
    }


def test_inspect_proto_and_path_agree():
    model = onnx.load(str(model_path("cnn")))
    from_path = n2n.inspect(str(model_path("cnn")))
    from_proto = n2n.inspect(model)
    assert from_path["layers"] == from_proto["layers"]
    assert from_path["model"].endswith("cnn.onnx")


def test_inspect_reports_new_width_after_widening():
    model = onnx.load(str(model_path("cnn")))
    wider, _ = widen_exact(model, {"/4/Conv": 20})
    report = n2n.inspect(wider)
    check_schema(report)
    widths = {layer["name"]: layer["width"] for layer in report["layers"]}
    assert widths == {"/0/Conv": 8, "/4/Conv": 20, "/9/Gemm": 32, "/11/Gemm": 10}


def test_inspect_after_deepening_lists_the_new_layer():
    model = onnx.load(str(model_path("mlp")))
    deeper, _ = n2n.deepen(model, ["/2/Gemm"])
    report = n2n.inspect(deeper)
    check_schema(report)
    layers = {layer["name"]: layer for layer in report["layers"]}
    new = layers["/2/Gemm/deeper0"]
    assert new["op"] == "Gemm" and new["width"] == 32 and new["widen"]["ok"] and new["deepen"]["ok"]


def test_widen_returns_report_and_verifies():
    model = onnx.load(str(model_path("mlp")))
    wider, report = n2n.widen(model, {"/2/Gemm": 40})
    assert isinstance(wider, onnx.ModelProto)
    assert report["pass"] == "widen" and report["exact"] is True
    assert report["verification"]["passed"] is True and report["verification"]["max_rel"] <= 1e-5
    assert report["options"] == {"split": "equal", "noise": 0.0, "init": "net2net", "seed": 0}
    assert_same_function(model, wider)


def test_widen_without_verification():
    wider, report = n2n.widen(str(model_path("mlp")), {"/2/Gemm": 40}, verify=False)
    assert "verification" not in report
    assert node_weight(wider, "/4/Gemm").shape == (10, 40)


def test_widen_verify_options_are_passed_on():
    _, report = n2n.widen(str(model_path("cnn")), {"/0/Conv": 9},
                          inputs=InputSpec(seed=4, shapes={"input": [5, 1, 16, 16]}))
    assert report["verification"]["outputs"][0]["shape"] == [5, 10]


def test_growth_functions_take_a_verification_mode_apart_from_their_own_mode():
    model = onnx.load(str(model_path("mlp")))
    _, report = n2n.deepen(model, ["/0/Gemm"], mode="identity", verify_mode="region")
    by_region = [note for note in report["verification"]["notes"] if note.startswith("region verification")]
    assert report["verification"]["passed"] is True and by_region
    _, report = n2n.widen(model, {"/2/Gemm": 40}, verify_mode="region")
    assert any(note.startswith("region verification") for note in report["verification"]["notes"])
    _, report = n2n.widen(model, {"/2/Gemm": 40})
    assert not any(note.startswith("region verification") for note in report["verification"]["notes"])
    with pytest.raises(n2n.UserError, match="verify_mode"):
        n2n.widen(model, {"/2/Gemm": 40}, mode="region")
    with pytest.raises(n2n.UserError, match="`verify_mode=partial`"):
        n2n.widen(model, {"/2/Gemm": 40}, verify_mode="partial")


def test_widen_raises_verification_failed_on_a_wrong_rewrite(monkeypatch):
    original = wider_module.widen_group

    def corrupted(ir, *args, **kwargs):
        result = original(ir, *args, **kwargs)
        tensor = next(t for t in ir.graph.initializer if len(t.dims) == 2)
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(2), tensor.name))
        return result

    monkeypatch.setattr(wider_module, "widen_group", corrupted)
    with pytest.raises(n2n.VerificationFailed) as info:
        n2n.widen(str(model_path("mlp")), {"/0/Gemm": 50})
    assert "FAILED" in str(info.value) and "output" in str(info.value)
    assert info.value.report["verification"]["passed"] is False


def test_verify_api_stays_callable_after_other_calls():
    """`n2n.verify` is a function; importing the `verify` submodule must not replace it."""
    n2n.widen(str(model_path("mlp")), {"/2/Gemm": 40})
    assert callable(n2n.verify)
    report = n2n.verify(str(model_path("mlp")), str(model_path("mlp")))
    assert report.passed


def test_lazy_exports():
    assert n2n.WidenOptions().split == "equal"
    assert n2n.DeepenOptions().mode == "auto"
    with pytest.raises(AttributeError):
        n2n.no_such_thing  # noqa: B018
    assert set(n2n.__all__) >= {"load", "save", "inspect", "widen", "deepen", "verify", "WidenPass", "DeepenPass",
                                "Pipeline", "PassResult"}


# ----------------------------------------------------------------------------
# Passes


def test_widen_pass_does_not_modify_its_input():
    model = onnx.load(str(model_path("cnn1d")))
    before = model.SerializeToString()
    result = n2n.WidenPass(factor=2)(model)
    assert isinstance(result, n2n.PassResult) and result.modified
    assert model.SerializeToString() == before
    assert node_weight(result.model, "/0/Conv").shape == (16, 1, 5)
    assert_same_function(model, result.model)


def test_pipeline_deepen_then_widen():
    model = onnx.load(str(model_path("mlp")))
    pipeline = n2n.Pipeline([n2n.DeepenPass(["/0/Gemm"]), n2n.WidenPass({"/0/Gemm/deeper0": 64})])
    result = pipeline(model)
    assert result.modified
    assert [step["pass"] for step in result.report["steps"]] == ["deepen", "widen"]
    assert len(result.report["changes"]) == 2
    assert node_weight(result.model, "/0/Gemm/deeper0").shape == (64, 48)
    assert_same_function(model, result.model)


def test_pass_options():
    options = n2n.WidenOptions(split="random", seed=5)
    result = n2n.WidenPass({"L1": 6}, options=options)(conv_sandwich(unary("Relu")))
    assert result.report["options"]["split"] == "random"
    assert_same_function(conv_sandwich(unary("Relu")), result.model)
    with pytest.raises(n2n.UserError, match="split"):
        n2n.WidenPass({"L1": 6}, options=n2n.WidenOptions(split="weird"))
    with pytest.raises(n2n.UserError):
        n2n.WidenPass()
    with pytest.raises(n2n.UserError):
        n2n.DeepenPass([])


class _CorruptedWiden(n2n.WidenPass):
    """Widens, then doubles a weight: an exact pass whose result is wrong."""

    def apply(self, handle):
        report = super().apply(handle)
        tensor = next(t for t in handle.proto.graph.initializer if len(t.dims) == 2)
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(2), tensor.name))
        return report


def test_verified_pass_checks_each_step_against_the_model_before_it():
    model = onnx.load(str(model_path("mlp")))
    seen = []
    pipeline = n2n.Pipeline([n2n.WidenPass({"/0/Gemm": 64}), n2n.DeepenPass(["/2/Gemm"])]).verified(
        on_result=lambda step, result: seen.append((step.label, result.passed)))
    result = pipeline(model)
    assert seen == [("step 1 (widen)", True), ("step 2 (deepen)", True)]
    assert all(step["verification"]["passed"] for step in result.report["steps"])
    assert_same_function(model, result.model)

    broken = n2n.Pipeline([n2n.DeepenPass(["/2/Gemm"]), _CorruptedWiden({"/0/Gemm": 64})]).verified()
    with pytest.raises(n2n.VerificationFailed, match=r"^step 2 \(widen\): FAILED"):
        broken(model)
    kept = n2n.VerifiedPass(_CorruptedWiden({"/0/Gemm": 64}), keep_failures=True)(model)
    assert kept.report["verification"]["passed"] is False


def test_verified_steps_can_check_only_the_region_each_step_changed():
    model = onnx.load(str(model_path("mlp")))
    pipeline = n2n.Pipeline([n2n.WidenPass({"/0/Gemm": 64}), n2n.DeepenPass(["/2/Gemm"])]).verified(mode="region")
    result = pipeline(model)
    for step in result.report["steps"]:
        assert step["verification"]["passed"]
        assert any(note.startswith("region verification") for note in step["verification"]["notes"])
    broken = n2n.VerifiedPass(_CorruptedWiden({"/0/Gemm": 64}), mode="region", keep_failures=True)(model)
    assert broken.report["verification"]["passed"] is False
    with pytest.raises(n2n.UserError, match="`verify_mode=partial`"):
        n2n.VerifiedPass(n2n.WidenPass({"/0/Gemm": 64}), mode="partial")


def test_factor_with_nothing_growable_is_refused():
    model = dense_sandwich(unary("Softmax"))
    with pytest.raises(n2n.GrowthRefused, match="no layer"):
        n2n.widen(model, factor=2)


def test_factor_rounds_up():
    model = dense_sandwich(unary("Relu"), c=3)
    wider, _ = widen_exact(model, factor=1.2)         # ceil(3.6) = 4
    assert node_weight(wider, "L1").shape == (4, 4)


def test_errors_are_user_errors():
    assert issubclass(n2n.GrowthRefused, n2n.UserError)
    assert not issubclass(n2n.VerificationFailed, n2n.UserError)


# ----------------------------------------------------------------------------
# onnx_ir and onnx-graphsurgeon


def test_passes_run_inside_onnx_ir_pass_manager():
    import onnx_ir

    from onnx_net2net import DeepenPass, WidenPass

    original = onnx.load(str(model_path("cnn")))
    model = onnx_ir.serde.deserialize_model(original)
    widen = WidenPass(factor=2)
    result = onnx_ir.passes.PassManager([widen, DeepenPass(["/4/Conv"])])(model)
    assert isinstance(result.model, onnx_ir.Model) and result.modified and result.model is not model
    assert widen.report["changes"]
    grown = onnx_ir.serde.serialize_model(result.model)
    assert n2n.verify(original, grown).passed
    assert len(grown.graph.node) > len(original.graph.node)


def test_api_gives_back_the_kind_it_was_given():
    import onnx_graphsurgeon as gs
    import onnx_ir

    original = onnx.load(str(model_path("cnn")))
    graph = gs.import_onnx(original)
    wider, report = n2n.widen(graph, factor=2)
    assert isinstance(wider, gs.Graph) and report["verification"]["passed"]
    assert n2n.verify(original, gs.export_onnx(wider)).passed
    deeper, _ = n2n.deepen(onnx_ir.serde.deserialize_model(original), ["/4/Conv"])
    assert isinstance(deeper, onnx_ir.Model)
    assert n2n.verify(original, onnx_ir.serde.serialize_model(deeper)).passed


def test_api_saves_and_grows_onnx_ir_models_with_external_data(tmp_path):
    import onnx_ir

    original = onnx.load(str(model_path("mlp")))
    onnx.save(original, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    model = onnx_ir.load(str(tmp_path / "m.onnx"))
    wider, report = n2n.widen(model, factor=2)
    assert isinstance(wider, onnx_ir.Model) and report["verification"]["passed"]
    n2n.save(wider, tmp_path / "w.onnx")
    assert n2n.verify(str(model_path("mlp")), str(tmp_path / "w.onnx")).passed
