"""Shrink and perturb: every weighted layer changes, shapes stay, the deviation is reported."""

import json

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

import onnx_net2net as n2n
from onnx_net2net import cli
from onnx_net2net.analysis import weighted_layers
from onnx_net2net.io import from_proto
from onnx_net2net.ir import GraphIR
from helpers import conv_sandwich, dense_sandwich, max_rel_error, model_path, unary


def layer_tensors(model) -> dict[str, np.ndarray]:
    """Every weighted layer's weight (and Gemm/Conv bias), by tensor name."""
    ir = GraphIR(from_proto(model))
    found = {}
    for layer in weighted_layers(ir):
        node = ir.nodes[layer]
        for tensor in node.input[1:3]:
            if tensor and ir.is_const(tensor):
                found[tensor] = ir.const_value(tensor).copy()
    return found


@pytest.mark.parametrize("name", ["cnn", "mlp", "gpt2_tiny"])
def test_perturb_changes_every_weighted_layer_and_keeps_shapes(name):
    model = onnx.load(str(model_path(name)))
    perturbed, report = n2n.perturb(model, shrink=0.4, fresh=0.1, seed=3)
    before, after = layer_tensors(model), layer_tensors(perturbed)
    assert before.keys() == after.keys() and before
    for tensor, old in before.items():
        assert after[tensor].shape == old.shape and after[tensor].dtype == old.dtype
        assert not np.allclose(after[tensor], old), tensor
    assert report["exact"] is False and report["verification"]["max_abs"] > 0
    assert report["options"] == {"shrink": 0.4, "fresh": 0.1, "seed": 3}
    assert len(report["changes"]) == len(weighted_layers(GraphIR(from_proto(model))))
    assert max_rel_error(model, perturbed) > 1e-3


def test_perturb_is_the_formula_with_torch_default_bounds():
    model = dense_sandwich(unary("Relu"), d_in=4, c=3)
    old = layer_tensors(model)
    shrunk, _ = n2n.perturb(model, shrink=0.5, fresh=0.0)
    for tensor, value in layer_tensors(shrunk).items():
        np.testing.assert_allclose(value, 0.5 * old[tensor], rtol=1e-6)
    fresh_only, report = n2n.perturb(model, shrink=0.0, fresh=1.0, seed=1)
    bounds = {change["layers"][0]: change["bound"] for change in report["changes"]}
    fan_in = {change["layers"][0]: change["fan_in"] for change in report["changes"]}
    assert fan_in == {"L1": 4, "L2": 3}
    for change in report["changes"]:
        for tensor in change["tensors"]:
            value = layer_tensors(fresh_only)[tensor]
            assert np.abs(value).max() <= bounds[change["layers"][0]] + 1e-7


def test_perturb_is_reproducible_with_a_seed():
    model = conv_sandwich(unary("Relu"))
    first, _ = n2n.perturb(model, seed=7)
    again, _ = n2n.perturb(model, seed=7)
    other, _ = n2n.perturb(model, seed=8)
    a, b, c = layer_tensors(first), layer_tensors(again), layer_tensors(other)
    assert all(np.array_equal(a[t], b[t]) for t in a)
    assert not all(np.array_equal(a[t], c[t]) for t in a)


def test_perturb_matmul_add_bias_is_perturbed():
    model = onnx.load(str(model_path("gpt2_tiny")))
    _, report = n2n.perturb(model, verify=False)
    tensors = [t for change in report["changes"] for t in change["tensors"]]
    assert any(change["op"] == "MatMul" and len(change["tensors"]) == 2 for change in report["changes"]) \
        or any("bias" in t for t in tensors)


def test_perturb_refuses_nonsense_options():
    model = conv_sandwich(unary("Relu"))
    with pytest.raises(n2n.UserError, match="shrink"):
        n2n.perturb(model, shrink=-1.0)
    with pytest.raises(n2n.UserError, match="changes nothing"):
        n2n.perturb(model, shrink=1.0, fresh=0.0)


def test_cli_perturb_reports_and_exits_zero(tmp_path, capsys):
    source = model_path("cnn")
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    code = cli.main(["perturb", str(source), "-o", str(out), "--shrink", "0.4", "--fresh", "0.1", "--seed", "2",
                     "--report", str(report_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "deviation" in captured.out and "perturbed" in captured.out
    report = json.loads(report_path.read_text())
    assert report["pass"] == "perturb" and report["options"] == {"shrink": 0.4, "fresh": 0.1, "seed": 2}
    assert report["exact"] is False and report["verification"]["max_abs"] > 0
    assert {c["layers"][0] for c in report["changes"]} == set(layer_names(source))
    assert max_rel_error(onnx.load(str(source)), onnx.load(str(out))) > 1e-3


def layer_names(path):
    from onnx_net2net.analysis import layer_name

    ir = GraphIR(from_proto(onnx.load(str(path))))
    return [layer_name(ir, i) for i in weighted_layers(ir)]


def test_cli_perturb_usage_errors_exit_two(tmp_path, capsys):
    source = model_path("cnn")
    code = cli.main(["perturb", str(source), "-o", str(tmp_path / "p.onnx"), "--shrink", "-0.5"])
    assert code == 2 and "shrink" in capsys.readouterr().err
    code = cli.main(["perturb", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "p.onnx")])
    assert code == 2


def test_cli_widen_zero_sum_verifies(tmp_path, capsys):
    out = tmp_path / "w.onnx"
    code = cli.main(["widen", str(model_path("cnn")), "--factor", "2", "--split", "zero-sum", "--noise", "0.2",
                     "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "PASSED" in captured.out
    equal = tmp_path / "e.onnx"
    assert cli.main(["widen", str(model_path("cnn")), "--factor", "2", "-o", str(equal)]) == 0
    zero_sum = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    plain = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(equal)).graph.initializer}
    assert zero_sum.keys() == plain.keys()
    assert any(not np.array_equal(zero_sum[k], plain[k]) for k in plain)  # the copies' weights differ


def test_plan_perturb_step(tmp_path, capsys):
    plan = tmp_path / "plan.toml"
    plan.write_text('[[steps]]\nop = "widen"\nfactor = 2.0\nsplit = "zero-sum"\n\n'
                    '[[steps]]\nop = "perturb"\nshrink = 0.5\nfresh = 0.05\nseed = 1\n')
    out, report_path = tmp_path / "g.onnx", tmp_path / "r.json"
    code = cli.main(["grow", str(model_path("mlp")), "--plan", str(plan), "-o", str(out), "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    steps = json.loads(report_path.read_text())["steps"]
    assert [s["pass"] for s in steps] == ["widen", "perturb"]
    assert steps[1]["options"] == {"shrink": 0.5, "fresh": 0.05, "seed": 1}
