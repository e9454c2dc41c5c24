"""verify: the API and `python -m onnx_net2net verify`."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnx_net2net as n2n
from onnx_net2net import cli
from onnx_net2net.verification import (DEFAULT_ATOL, DEFAULT_RTOL, InputSpec, compare_arrays, parse_input_shapes,
                                       verify_models)
from helpers import H, make_model, model_path, rand


def changed_copy(path, tmp_path, weight="9.weight", delta=1.0):
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.name == weight:
            value = numpy_helper.to_array(tensor).copy()
            value.flat[0] += delta
            tensor.CopyFrom(numpy_helper.from_array(value, weight))
    out = tmp_path / "changed.onnx"
    onnx.save(model, str(out))
    return out


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------
# API


def test_model_against_itself():
    report = verify_models(str(model_path("cnn")), str(model_path("cnn")))
    assert report.passed and report.max_abs == 0 and report.max_rel == 0
    assert [o.name for o in report.outputs] == ["output"]
    assert report.outputs[0].shape == [2, 10]
    assert report.outputs[0].argmax_agreement == 1.0
    assert report.provider == "CPUExecutionProvider"


def test_changed_weight_fails_and_names_the_output(tmp_path):
    report = verify_models(str(model_path("cnn")), str(changed_copy(model_path("cnn"), tmp_path)))
    assert not report.passed
    assert report.max_abs > 1e-4
    assert "FAILED" in report.summary() and "mismatch in output" in report.summary()
    assert report.outputs[0].passed is False


def test_only_the_changed_output_fails(tmp_path):
    """sklearn_mlp has two outputs; changing the last bias may keep the label."""
    model = onnx.load(str(model_path("sklearn_mlp")))
    for tensor in model.graph.initializer:
        if tensor.name == "intercepts2":
            value = numpy_helper.to_array(tensor) + np.float32(1e-3)
            tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
    report = verify_models(onnx.load(str(model_path("sklearn_mlp"))), model,
                        inputs=InputSpec(seed=1, shapes={"float_input": [4, 64]}))
    by_name = {o.name: o for o in report.outputs}
    assert set(by_name) == {"label", "probabilities"}
    # adding the same constant to every logit leaves the softmax unchanged up to rounding
    assert by_name["probabilities"].max_rel < 1e-5


def test_tolerances():
    a = np.array([[1000.0, 0.0]], np.float32)
    b = np.array([[1000.005, 0.0]], np.float32)
    strict = compare_arrays("o", a, b, atol=1e-6, rtol=1e-9)
    loose = compare_arrays("o", a, b, atol=1e-6, rtol=1e-5)
    assert not strict.passed and loose.passed
    assert loose.max_rel == pytest.approx(0.005 / 1000, rel=1e-2)


def test_nonfinite_reference_proves_nothing_unless_allowed():
    a = np.array([1.0, np.nan, np.inf], np.float32)
    same = compare_arrays("o", a, a.copy(), 1e-6, 1e-5)
    assert not same.passed and same.nonfinite == 2 and "non-finite" in same.problem
    assert compare_arrays("o", a, a.copy(), 1e-6, 1e-5, allow_nonfinite=True).passed
    moved = np.array([1.0, 2.0, np.inf], np.float32)
    assert not compare_arrays("o", a, moved, 1e-6, 1e-5, allow_nonfinite=True).passed
    flipped = np.array([1.0, np.nan, -np.inf], np.float32)
    assert not compare_arrays("o", a, flipped, 1e-6, 1e-5, allow_nonfinite=True).passed


def test_nonfinite_candidate_fails():
    a = np.array([1.0, 2.0], np.float32)
    result = compare_arrays("o", a, np.array([1.0, np.nan], np.float32), 1e-6, 1e-5)
    assert not result.passed and result.nonfinite == 0 and "candidate" in result.problem


def test_shape_mismatch():
    a = np.array([1.0, 2.0], np.float32)
    result = compare_arrays("o", a, np.ones(3, np.float32), 1e-6, 1e-5)
    assert not result.passed and "shape" in result.problem


def test_signed_errors_do_not_cancel():
    a = np.zeros(4, np.float32)
    b = np.array([0.1, -0.1, 0.1, -0.1], np.float32)
    result = compare_arrays("o", a, b, 1e-6, 1e-5)
    assert not result.passed and result.max_abs == pytest.approx(0.1)


def test_integer_outputs_compare_exactly():
    assert compare_arrays("l", np.array([1, 2]), np.array([1, 2]), 0, 0).passed
    assert not compare_arrays("l", np.array([1, 2]), np.array([1, 3]), 1, 1).passed


def test_parse_input_shapes():
    assert parse_input_shapes(["input:[4,3,8,8]", "ids:(2, 5)"]) == {"input": [4, 3, 8, 8], "ids": [2, 5]}
    for bad in ["input", "input:[0,3]", "input:[a,b]", ":[1]"]:
        with pytest.raises(n2n.UserError):
            parse_input_shapes([bad])


# ----------------------------------------------------------------------------
# CLI


def test_cli_same_model_exit_0(capsys):
    code, out, _ = run_cli(capsys, "verify", str(model_path("mlp")), str(model_path("mlp")))
    assert code == 0
    assert "PASSED" in out and "output" in out


def test_cli_changed_weight_exit_1_names_output(tmp_path, capsys):
    changed = changed_copy(model_path("mlp"), tmp_path, weight="4.weight")
    code, out, _ = run_cli(capsys, "verify", str(model_path("mlp")), str(changed))
    assert code == 1
    assert "FAILED" in out and "mismatch in output" in out
    assert "output [2, 10]" in out and "MISMATCH" in out


def test_cli_json(tmp_path, capsys):
    changed = changed_copy(model_path("mlp"), tmp_path, weight="4.weight")
    code, out, _ = run_cli(capsys, "verify", str(model_path("mlp")), str(changed), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["passed"] is False
    assert {"passed", "provider", "atol", "rtol", "outputs", "notes", "max_abs", "max_rel"} <= set(report)
    assert report["outputs"][0]["name"] == "output" and report["outputs"][0]["passed"] is False
    assert report["rtol"] == DEFAULT_RTOL == 1e-4 and report["atol"] == DEFAULT_ATOL == 1e-5  # as the README says


def test_cli_inputs_npz_are_used(tmp_path, capsys):
    """Two models agree on random normal inputs but not on large real ones."""
    a = make_model([H("Relu", ["x"], ["y"])], [("x", ["N", 3])], ["y"])
    inits = {"cap": np.array(50.0, np.float32)}
    b = make_model([H("Relu", ["x"], ["r"]), H("Min", ["r", "cap"], ["y"])], [("x", ["N", 3])], ["y"], inits)
    onnx.save(a, str(tmp_path / "a.onnx"))
    onnx.save(b, str(tmp_path / "b.onnx"))
    code, _, _ = run_cli(capsys, "verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"))
    assert code == 0
    np.savez(tmp_path / "real.npz", x=np.full((5, 3), 100.0, np.float32))
    code, out, _ = run_cli(capsys, "verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                           "--inputs", str(tmp_path / "real.npz"), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["outputs"][0]["shape"] == [5, 3]
    assert report["max_abs"] == pytest.approx(50.0)


def test_cli_bad_npz_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"nope")
    code, _, err = run_cli(capsys, "verify", str(model_path("mlp")), str(model_path("mlp")),
                           "--inputs", str(tmp_path / "bad.npz"))
    assert code == 2 and "cannot read inputs" in err


def test_cli_input_shapes(capsys):
    code, out, err = run_cli(capsys, "verify", str(model_path("cnn")), str(model_path("cnn")), "--json",
                             "--input-shapes", "input:[3,1,16,16]")
    assert code == 0
    assert json.loads(out)["outputs"][0]["shape"] == [3, 10]
    code, out, err = run_cli(capsys, "verify", str(model_path("cnn")), str(model_path("cnn")), "--json")
    assert json.loads(out)["outputs"][0]["shape"] == [2, 10]
    assert "dynamic dims" in err and "batch=2" in err
    code, _, err = run_cli(capsys, "verify", str(model_path("cnn")), str(model_path("cnn")),
                           "--input-shapes", "input:[x]")
    assert code == 2 and "--input-shapes" in err


def embedding_model(tmp_path):
    rng = np.random.default_rng(0)
    model = make_model([H("Gather", ["table", "ids"], ["e"]), H("ReduceSum", ["e", "ax"], ["y"], keepdims=0)],
                       [("ids", ["N", 3], TensorProto.INT64)], ["y"],
                       {"table": rand(rng, 5, 4), "ax": np.array([1], np.int64)})
    path = tmp_path / "emb.onnx"
    onnx.save(model, str(path))
    return path


def test_cli_integer_inputs_int_range(tmp_path, capsys):
    path = str(embedding_model(tmp_path))
    code, out, _ = run_cli(capsys, "verify", path, path, "--int-range", "0", "5")
    assert code == 0 and "PASSED" in out
    # ids up to 49 are out of the 5-row table: onnxruntime refuses, a usage error
    code, _, err = run_cli(capsys, "verify", path, path, "--int-range", "0", "50", "--input-seed", "3")
    assert code == 2 and "onnxruntime" in err
    code, _, err = run_cli(capsys, "verify", path, path, "--int-range", "5", "0")
    assert code == 2 and "--int-range" in err


def test_cli_int_range_default_is_0_10(tmp_path, capsys):
    path = str(embedding_model(tmp_path))
    # the default range 0..9 exceeds the 5-row table on most seeds
    code, _, _ = run_cli(capsys, "verify", path, path)
    assert code == 2


def test_cli_tolerance_options(tmp_path, capsys):
    changed = changed_copy(model_path("mlp"), tmp_path, weight="4.bias", delta=1e-3)
    code, _, _ = run_cli(capsys, "verify", str(model_path("mlp")), str(changed))
    assert code == 1
    code, _, _ = run_cli(capsys, "verify", str(model_path("mlp")), str(changed), "--rtol", "1e-2")
    assert code == 0
    code, _, err = run_cli(capsys, "verify", str(model_path("mlp")), str(changed), "--rtol", "-1")
    assert code == 2


def test_cli_different_outputs_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "verify", str(model_path("mlp")), str(model_path("sklearn_mlp")))
    assert code == 2


def test_cli_missing_model_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "none.onnx"), str(model_path("mlp")))
    assert code == 2 and "no such file" in err
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------
# Blind outputs: near zero everywhere, so all zeros would pass


def _tiny_head_mlp(scale: float):
    """fc1 -> Relu -> fc2 whose weights are `scale` times random: at 1e-9 the
    output is ~1e-9, below atol, so no change of fc1 can show in it."""
    from helpers import mlp_model

    model = mlp_model(4, 6, 3, seed=0)
    for tensor in model.graph.initializer:
        if tensor.name in ("W2", "b2"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(scale), tensor.name))
    return model


def _corrupted_fc1(model):
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for tensor in bad.graph.initializer:
        if tensor.name == "W1":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(3), "W1"))
    return bad


def test_an_output_near_zero_is_reported_blind_not_silently_passed():
    model = _tiny_head_mlp(1e-9)
    report = verify_models(model, _corrupted_fc1(model))
    # the corruption cannot show at this output: the report must say so
    assert report.passed and report.outputs[0].blind
    assert 0 < report.outputs[0].scale < DEFAULT_ATOL
    assert "WARNING" in report.summary() and "would pass as all zeros" in report.summary()


def test_an_output_of_normal_size_is_not_blind_and_catches_the_same_corruption():
    model = _tiny_head_mlp(1.0)
    report = verify_models(model, _corrupted_fc1(model))
    assert not report.passed and not report.outputs[0].blind
    assert "WARNING" not in verify_models(model, model).summary()


def test_cli_verify_marks_a_blind_output(tmp_path, capsys):
    model = _tiny_head_mlp(1e-9)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model, str(a))
    onnx.save(_corrupted_fc1(model), str(b))
    code, out, _ = run_cli(capsys, "verify", str(a), str(b))
    assert code == 0 and "blind" in out and "WARNING" in out
