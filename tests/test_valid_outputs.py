"""Every written model is valid for the rest of the toolchain (issue 13).

Declared types stay true after every rewrite (value_info of intermediates and
initializers, graph inputs listing initializers, symbolic dims), outputs pass
onnx's full check, our own broken output is exit 3 (never the user's fault),
`--inputs` files are taken as given or refused, non-finite outputs prove
nothing, and fp16 models verify with default settings.
"""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_net2net as n2n
from onnx_net2net import cli
from onnx_net2net.sessions import make_session, plain_onnxruntime_error, ModelRunError
from helpers import H, make_model, mlp_model, model_path, rand


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def declared(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with value_info for every tensor, initializers included, as
    torch.onnx.export(dynamo=True) writes them."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.value_info.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                  for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    return model


def dims(model: onnx.ModelProto, name: str) -> list:
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.name == name:
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in value.type.tensor_type.shape.dim]
    raise KeyError(name)


def residual_cnn() -> onnx.ModelProto:
    """conv1 -> relu -> conv2 (+ skip) -> relu -> flatten -> fc, symbolic batch."""
    rng = np.random.default_rng(0)
    inits = {"w1": rand(rng, 4, 3, 3, 3), "b1": rand(rng, 4), "w2": rand(rng, 4, 4, 3, 3), "b2": rand(rng, 4),
             "wf": rand(rng, 4 * 5 * 5, 3), "bf": rand(rng, 3), "shape": np.array([0, -1], np.int64)}
    nodes = [H("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             H("Relu", ["c1"], ["r1"]),
             H("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             H("Add", ["c2", "r1"], ["s"]), H("Relu", ["s"], ["r2"]),
             H("Reshape", ["r2", "shape"], ["flat"]),
             H("Gemm", ["flat", "wf", "bf"], ["y"], name="fc")]
    return declared(make_model(nodes, [("x", ["batch", 3, 5, 5])], [("y", ["batch", 3])], inits))


# ----------------------------------------------------------------------------
# Declared types after rewrites


def test_widen_keeps_every_declaration_true(tmp_path, capsys):
    model = residual_cnn()
    source, out = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(model, source)
    code, stdout, _ = run_cli(capsys, "widen", source, "-o", out, "--factor", "1.5")
    assert code == 0 and "PASSED" in stdout
    grown = onnx.load(out)
    onnx.checker.check_model(grown, full_check=True)
    assert dims(grown, "c2") == ["batch", 6, 5, 5] and dims(grown, "flat") == ["batch", 150]
    assert dims(grown, "w1") == [6, 3, 3, 3] and dims(grown, "wf") == [150, 3]
    assert dims(grown, "y") == ["batch", 3]
    assert {v.name for v in grown.graph.value_info} == {v.name for v in model.graph.value_info}
    code, stdout, _ = run_cli(capsys, "inspect", out, "--no-trial")
    assert code == 0 and "width 6" in stdout


def test_declarations_of_unchanged_tensors_are_kept_verbatim():
    model = residual_cnn()
    deeper, _ = n2n.deepen(model, ["conv1"])
    wider, _ = n2n.widen(model, {"conv1": 6})
    before = {v.name: v for v in model.graph.value_info}
    after = {v.name: v for v in wider.graph.value_info}
    assert after["bf"] == before["bf"] and after["shape"] == before["shape"]  # untouched initializers
    assert after["c1"] != before["c1"] and after["b2"] != before["b2"]
    assert {v.name: v for v in deeper.graph.value_info}["wf"] == before["wf"]


def test_graph_inputs_that_list_initializers_follow_them():
    """IR version 3 models list every initializer as a graph input."""
    model = residual_cnn()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))
    onnx.checker.check_model(model, full_check=True)
    wider, _ = n2n.widen(model, factor=2)
    onnx.checker.check_model(wider, full_check=True)
    assert dims(wider, "w2") == [8, 8, 3, 3]


def test_deepen_keeps_declarations_true():
    model = residual_cnn()
    deeper, _ = n2n.deepen(model, ["conv1"], batchnorm=True)
    onnx.checker.check_model(deeper, full_check=True)
    wider, _ = n2n.widen(deeper, factor=1.5)
    onnx.checker.check_model(wider, full_check=True)


def test_shipped_models_grow_into_valid_files(tmp_path, capsys):
    for name in ("resnet_block", "gpt2_tiny", "vit_tiny"):
        model = declared(onnx.load(model_path(name)))
        source, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}_w.onnx"
        onnx.save(model, source)
        code, stdout, err = run_cli(capsys, "widen", source, "-o", out, "--factor", "1.5")
        assert code == 0, err
        onnx.checker.check_model(onnx.load(out), full_check=True)


# ----------------------------------------------------------------------------
# Our bugs are ours


def _break_shapes(monkeypatch):
    """Simulate a rewrite bug: every widened model gets a Reshape to an impossible shape."""
    from onnx_net2net.rewrites import wider

    real = wider.widen_group

    def broken(ir, group, *args, **kwargs):
        record = real(ir, group, *args, **kwargs)
        for tensor in ir.graph.initializer:
            if tensor.name == "shape":
                tensor.CopyFrom(numpy_helper.from_array(np.array([0, 7, 7], np.int64), "shape"))
        return record

    monkeypatch.setattr(wider, "widen_group", broken)


def test_a_broken_output_is_an_internal_error_and_is_not_written(tmp_path, capsys, monkeypatch):
    source, out = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(residual_cnn(), source)
    _break_shapes(monkeypatch)
    code, _, err = run_cli(capsys, "widen", source, "-o", out, "--layer", "conv1=6")
    assert code == 3 and "internal error" in err and err.count("\n") == 1
    assert not out.exists() and os.listdir(tmp_path) == ["m.onnx"]


def test_save_on_failure_keeps_a_broken_output_and_still_exits_3(tmp_path, capsys, monkeypatch):
    source, out = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(residual_cnn(), source)
    _break_shapes(monkeypatch)
    code, _, err = run_cli(capsys, "widen", source, "-o", out, "--layer", "conv1=6", "--save-on-failure")
    assert code == 3 and "kept in" in err and out.exists()


def test_failed_verification_says_failed_once(tmp_path, capsys, monkeypatch):
    from onnx_net2net.rewrites import wider

    real = wider.widen_group

    def inexact(ir, group, *args, **kwargs):
        record = real(ir, group, *args, **kwargs)
        tensor = ir.initializers["bf"]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + 1, "bf"))
        return record

    monkeypatch.setattr(wider, "widen_group", inexact)
    source, out = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(residual_cnn(), source)
    code, _, err = run_cli(capsys, "widen", source, "-o", out, "--layer", "conv1=6")
    assert code == 1 and err.count("FAILED") == 1 and not out.exists()


# ----------------------------------------------------------------------------
# Inputs given in a file


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(onnx.load(model_path("mlp")), path)
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"input": np.zeros((2, 64), np.float32), "other": np.zeros(3)}, "other"),
    ({"inputs": np.zeros((2, 64), np.float32)}, "inputs"),
    ({}, "no array for input(s) input"),
    ({"input": np.zeros((2, 64), np.float64)}, "float64"),
    ({"input": np.zeros((2, 63), np.float32)}, "[2, 63]"),
    ({"input": np.zeros((64,), np.float32)}, "[64]"),
])
def test_inputs_file_must_match_the_model(tmp_path, capsys, mlp_file, arrays, message):
    np.savez(tmp_path / "in.npz", **arrays)
    code, _, err = run_cli(capsys, "verify", mlp_file, mlp_file, "--inputs", tmp_path / "in.npz")
    assert code == 2 and message in err and err.count("\n") == 1


def test_inputs_file_with_pickled_objects_is_refused(tmp_path, capsys, mlp_file):
    np.savez(tmp_path / "in.npz", input=np.array([{"a": 1}, None], dtype=object))
    code, _, err = run_cli(capsys, "verify", mlp_file, mlp_file, "--inputs", tmp_path / "in.npz")
    assert code == 2 and "pickle" in err.lower()


def test_inputs_file_that_is_a_fifo_is_refused_without_blocking(tmp_path, capsys, mlp_file):
    fifo = tmp_path / "in.npz"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "verify", mlp_file, mlp_file, "--inputs", fifo)
    assert code == 2 and "regular" in err


def test_inputs_file_is_used_by_widen(tmp_path, capsys, mlp_file):
    np.savez(tmp_path / "in.npz", input=np.full((3, 64), 5.0, np.float32))
    code, stdout, _ = run_cli(capsys, "widen", mlp_file, "-o", tmp_path / "w.onnx", "--factor", "2",
                              "--inputs", tmp_path / "in.npz", "--report", tmp_path / "r.json")
    assert code == 0 and "PASSED" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["outputs"][0]["shape"] == [3, 10]  # the file's batch of 3, not a random 2


# ----------------------------------------------------------------------------
# Non-finite outputs


def nan_weight_model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w1 = rand(rng, 4, 6)
    w1[0, 0] = np.nan
    inits = {"w1": w1, "w2": rand(rng, 6, 2)}
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
             H("MatMul", ["a", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 2])], inits)


def test_nan_outputs_fail_verification_unless_allowed(tmp_path, capsys):
    source, out = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(nan_weight_model(), source)
    code, _, err = run_cli(capsys, "widen", source, "-o", out, "--layer", "fc1=9")
    assert code == 1 and "non-finite" in err and not out.exists()
    code, stdout, _ = run_cli(capsys, "widen", source, "-o", out, "--layer", "fc1=9", "--allow-nonfinite")
    assert code == 0 and out.exists()


def test_verify_reports_nonfinite_counts(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(nan_weight_model(), source)
    code, stdout, _ = run_cli(capsys, "verify", source, source, "--json")
    assert code == 1 and '"nonfinite": ' in stdout


# ----------------------------------------------------------------------------
# Low precision


def fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(model, keep_io_types=False)


@pytest.mark.parametrize("name", ["cnn", "resnet_block", "vit_tiny", "bert_tiny"])
def test_fp16_models_widen_and_verify_with_default_settings(tmp_path, capsys, name):
    source, out = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(fp16(onnx.load(model_path(name))), source)
    code, stdout, err = run_cli(capsys, "widen", source, "-o", out, "--factor", "1.5")
    assert code == 0, err
    assert "PASSED" in stdout and "rtol 0.01, atol 0.001" in stdout and "in fp32 arithmetic" in stdout
    grown = onnx.load(out)
    onnx.checker.check_model(grown, full_check=True)
    assert any(t.data_type == TensorProto.FLOAT16 for t in grown.graph.initializer)


def test_fp16_split_is_rounded_once_from_float64():
    """A unit copied three times: each copy holds round_fp16(w / 3), not round(round(w) / 3) done in fp16."""
    rng = np.random.default_rng(3)
    inits = {"w1": rand(rng, 4, 1).astype(np.float16), "w2": rand(rng, 1, 2).astype(np.float16)}
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
             H("MatMul", ["a", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [("x", ["N", 4], TensorProto.FLOAT16)], [("y", ["N", 2], TensorProto.FLOAT16)], inits)
    wider, _ = n2n.widen(model, {"fc1": 3})
    w2 = numpy_helper.to_array(next(t for t in wider.graph.initializer if t.name == "w2"))
    expected = (inits["w2"].astype(np.float64) / 3).astype(np.float16)
    assert w2.dtype == np.float16 and np.array_equal(w2, np.repeat(expected, 3, axis=0))


# ----------------------------------------------------------------------------
# Messages


def test_onnxruntime_errors_in_plain_words():
    ir = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:/onnxruntime_src/onnxruntime/"
                      "core/graph/model.cc:181 onnxruntime::Model::Model(ModelProto&&, const PathString&, "
                      "const IOnnxRuntimeOpSchemaRegistryList*, const logging::Logger&, const ModelOptions&) "
                      "Unsupported model IR version: 13, max supported IR version: 11\n")
    message = plain_onnxruntime_error(ir)
    assert "IR version 13 is newer than onnxruntime" in message and "up to IR version 11" in message
    assert "onnxruntime_src" not in message


def test_onnxruntime_log_stays_off_stderr(capfd):
    bad = make_model([H("Foo", ["x"], ["y"], domain="custom.nowhere")], [("x", [2])], [("y", [2])],
                     extra_opsets=[("custom.nowhere", 1)], check=False)
    with pytest.raises(ModelRunError) as error:
        make_session(bad, ["CPUExecutionProvider"])
    assert "\n" not in str(error.value) and capfd.readouterr().err == ""


# ----------------------------------------------------------------------------
# Absurd requests are refused quickly, in one line


def test_absurd_factor_is_refused_in_plain_numbers(tmp_path, capsys, mlp_file):
    code, _, err = run_cli(capsys, "widen", mlp_file, "-o", tmp_path / "w.onnx", "--factor", "1e300")
    assert code == 2 and "limited to 2147483647" in err and len(err) < 300


def test_a_plan_that_doubles_depth_every_step_stops_at_the_insertion_limit(tmp_path, capsys):
    from onnx_net2net.passes import MAX_INSERTIONS

    model = mlp_model(4, 3, 2)
    source = tmp_path / "m.onnx"
    onnx.save(model, source)
    steps = 9  # 1 + 2 + 4 + ... + 256 layers: the ninth step goes over the limit
    (tmp_path / "plan.toml").write_text('[[steps]]\nop = "deepen"\nafter = "all"\n' * steps)
    code, _, err = run_cli(capsys, "grow", source, "-o", tmp_path / "g.onnx", "--plan", tmp_path / "plan.toml")
    assert code == 2 and f"at most {MAX_INSERTIONS}" in err and not (tmp_path / "g.onnx").exists()


def test_a_grown_model_that_fails_in_onnxruntime_is_ours_in_region_mode_too(tmp_path, capsys, monkeypatch):
    """A rewrite bug that shape inference cannot see (a Gather index out of range)."""
    from onnx_net2net.rewrites import wider

    rng = np.random.default_rng(0)
    inits = {"W1": rand(rng, 4, 8), "W2": rand(rng, 8, 6), "idx": np.array([5], np.int64)}
    nodes = [H("MatMul", ["x", "W1"], ["m"], name="fc1"), H("Relu", ["m"], ["r"]),
             H("MatMul", ["r", "W2"], ["z"], name="fc2"), H("Gather", ["z", "idx"], ["y"], axis=1)]
    source = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [("x", ["N", 4])], [("y", ["N", 1])], inits), source)
    real = wider.widen_group

    def buggy(ir, group, *args, **kwargs):
        record = real(ir, group, *args, **kwargs)
        ir.initializers["idx"].CopyFrom(numpy_helper.from_array(np.array([20], np.int64), "idx"))
        return record

    monkeypatch.setattr(wider, "widen_group", buggy)
    for mode in ("full", "region"):
        out = tmp_path / f"{mode}.onnx"
        code, _, err = run_cli(capsys, "widen", source, "-o", out, "--layer", "fc1=12", "--verify", mode)
        assert code == 3 and "internal error" in err.splitlines()[-1] and not out.exists(), (mode, err)
        assert "Traceback" not in err and "onnxruntime_src" not in err


def test_the_users_invalid_model_is_theirs_even_when_a_weight_is_folded(tmp_path, capsys):
    rng = np.random.default_rng(0)
    inits = {"Wt": rand(rng, 8, 4), "W2": rand(rng, 8, 2)}
    nodes = [H("Transpose", ["Wt"], ["W1"], perm=[1, 0]), H("MatMul", ["x", "W1"], ["m"], name="fc1"),
             H("Relu", ["m"], ["r"], foo=1), H("MatMul", ["r", "W2"], ["y"], name="fc2")]
    source = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [("x", ["N", 4])], [("y", ["N", 2])], inits, check=False), source)
    for command in (["widen", "--layer", "fc1=12"], ["deepen", "--after", "fc1"]):
        code, _, err = run_cli(capsys, command[0], source, "-o", tmp_path / "o.onnx", *command[1:])
        assert code == 2 and "invalid model" in err, err


def test_region_sessions_keep_onnxruntime_log_off_stderr(tmp_path, capfd):
    model = mlp_model(4, 6, 2)
    wider, _ = n2n.widen(model, {"fc1": 9})
    bad = onnx.ModelProto()
    bad.CopyFrom(wider)
    for tensor in bad.graph.initializer:
        if tensor.name == "W2":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + 1, "W2"))
    onnx.save(model, tmp_path / "a.onnx")
    onnx.save(bad, tmp_path / "b.onnx")
    code = cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--verify", "region"])
    assert code == 1 and "onnxruntime" not in capfd.readouterr().err


def test_bfloat16_outputs_verify_with_bfloat16_tolerances(tmp_path, capsys):
    rng = np.random.default_rng(0)
    inits = {"w1": rand(rng, 4, 6), "w2": rand(rng, 6, 3)}
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
             H("MatMul", ["a", "w2"], ["z"], name="fc2"), H("Cast", ["z"], ["y"], to=TensorProto.BFLOAT16)]
    source = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [("x", ["N", 4])], [("y", ["N", 3], TensorProto.BFLOAT16)], inits), source)
    code, stdout, err = run_cli(capsys, "widen", source, "-o", tmp_path / "w.onnx", "--layer", "fc1=9")
    assert code == 0 and "PASSED" in stdout and "rtol 0.05, atol 0.01" in stdout, err
    broken = onnx.load(tmp_path / "w.onnx")
    for tensor in broken.graph.initializer:
        if tensor.name == "w2":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, "w2"))
    onnx.save(broken, tmp_path / "b.onnx")
    code, _, _ = run_cli(capsys, "verify", source, tmp_path / "b.onnx")
    assert code == 1


# ----------------------------------------------------------------------------
# Leftovers: what a rewrite stops reading is removed, what the input left unread stays


def _unread(model: onnx.ModelProto) -> tuple[set, set]:
    read = {name for node in model.graph.node for name in node.input} | {v.name for v in model.graph.output}
    nodes = {node.output[0] for node in model.graph.node if not any(o in read for o in node.output)}
    return nodes, {t.name for t in model.graph.initializer if t.name not in read}


def _with_unread_input_leftovers(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "user_unused"))
    model.graph.node.append(H("Constant", [], ["user_unused_constant"], value=numpy_helper.from_array(np.ones(2, np.float32))))
    return model


def test_run_time_size_edits_leave_nothing_unread_and_keep_the_inputs_leftovers():
    """Growing heads merged with a dynamic batch fixes the merged entry of each
    view to -1: the nodes that computed B * heads are then read by nothing."""
    from test_mha_legacy import HEAD, legacy_attention

    model = _with_unread_input_leftovers(legacy_attention())
    grown, _ = n2n.widen(model, {"in_proj": 9 * HEAD})
    onnx.checker.check_model(grown, full_check=True)
    assert _unread(grown) == ({"user_unused_constant"}, {"user_unused"})
    assert len(grown.graph.node) < len(model.graph.node)  # the B * heads computations are gone


def test_deepen_and_widen_of_a_shipped_model_leave_nothing_unread():
    model = onnx.load(str(model_path("cnn")))
    assert _unread(model) == (set(), set())
    for grown in (n2n.widen(model, factor=1.5)[0], n2n.deepen(model, "all")[0]):
        assert _unread(grown) == (set(), set())


def test_folding_a_computed_weight_keeps_the_inputs_leftovers():
    """Folding removes the nodes that computed a weight, not the input's own unread nodes."""
    from test_folding import weight_normed_conv

    model = _with_unread_input_leftovers(weight_normed_conv())
    for grown, report in (n2n.widen(model, {"c1": 9}), n2n.deepen(model, ["c1"])):
        assert report["folded"]
        onnx.checker.check_model(grown, full_check=True)
        assert _unread(grown) == ({"user_unused_constant"}, {"user_unused"})
        assert not any(n.op_type == "ReduceL2" for n in grown.graph.node)
