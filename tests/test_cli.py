"""`python -m onnx_net2net`: help, info, inspect, widen, deepen, reports, exit codes."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_net2net import cli, provenance
from onnx_net2net.rewrites import deeper, wider
from helpers import ROOT, assert_same_function, init, model_path, node_weight


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", [[], ["info"], ["inspect"], ["verify"], ["widen"], ["deepen"]])
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "onnx_net2net", *command, "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    if command:
        assert command[0] in result.stdout


def test_version_and_no_command():
    result = subprocess.run([sys.executable, "-m", "onnx_net2net", "--version"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0 and "0.1.0" in result.stdout
    result = subprocess.run([sys.executable, "-m", "onnx_net2net"], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bad_option_is_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["widen", str(model_path("mlp")), "--bogus"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------
# info / inspect


def test_info_text_and_json(capsys):
    code, out, _ = run_cli(capsys, "info", model_path("cnn"))
    assert code == 0 and "Conv 2" in out and "input" in out
    code, out, _ = run_cli(capsys, "info", model_path("sklearn_mlp"), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["opsets"] == {"ai.onnx": 17, "ai.onnx.ml": 1}
    assert [o["name"] for o in info["outputs"]] == ["label", "probabilities"]
    assert info["inputs"] == [{"name": "float_input", "dtype": "float", "shape": ["?", 64]}]
    assert info["ops"]["MatMul"] == 3
    assert info["parameters"] == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert info["external_data"] is False


def test_inspect_text_and_json(capsys):
    code, out, _ = run_cli(capsys, "inspect", model_path("mlp"))
    assert code == 0 and "/0/Gemm [Gemm, width 48]" in out and "widen no" in out
    code, out, _ = run_cli(capsys, "inspect", model_path("mlp"), "--json", "--no-trial")
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"model", "layers"}
    assert [layer["name"] for layer in report["layers"]] == ["/0/Gemm", "/2/Gemm", "/4/Gemm"]
    assert report["layers"][0]["widen"]["ok"] is True
    assert report["layers"][2]["widen"]["ok"] is False


def test_inspect_missing_file_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing.onnx")
    assert code == 2 and "no such file" in err


# ----------------------------------------------------------------------------
# widen / deepen


def test_widen_with_report(tmp_path, capsys):
    out, report_path = tmp_path / "wide.onnx", tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/0/Gemm=50", "-o", out,
                              "--report", report_path)
    assert code == 0, stdout
    assert "PASSED" in stdout and "written" in stdout
    assert "/0/Gemm: 48 -> 50" in stdout
    model = onnx.load(str(out))
    assert node_weight(model, "/0/Gemm").shape == (50, 64)
    assert_same_function(model_path("mlp"), out)
    report = json.loads(report_path.read_text())
    assert report["pass"] == "widen"
    change = report["changes"][0]
    assert change["layers"] == ["/0/Gemm"] and change["old_width"] == 48 and change["new_width"] == 50
    # W1 gains 2 rows of 64, its bias 2, W2 gains 2 columns of 32
    assert report["parameters"]["after"] - report["parameters"]["before"] == 2 * 64 + 2 + 2 * 32
    assert report["verification"]["passed"] is True and report["exact"] is True
    assert report["verification"]["max_rel"] <= 1e-5
    assert report["command"][0] == "widen"
    history = provenance.history(model)
    assert history and history[-1]["pass"] == "widen"
    assert history[-1]["changes"][0]["new_width"] == 50


def test_widen_factor(tmp_path, capsys):
    out = tmp_path / "wide.onnx"
    code, stdout, _ = run_cli(capsys, "widen", model_path("cnn"), "--factor", "1.5", "-o", out)
    assert code == 0
    model = onnx.load(str(out))
    assert node_weight(model, "/0/Conv").shape[0] == 12 and node_weight(model, "/4/Conv").shape[0] == 24
    assert node_weight(model, "/9/Gemm").shape == (48, 24 * 16)
    assert_same_function(model_path("cnn"), out)


def test_widen_split_random_and_seed(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out, seed in ((a, 1), (b, 2)):
        code, _, _ = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/2/Gemm=40", "--split", "random",
                             "--seed", seed, "-o", out)
        assert code == 0
    assert not np.array_equal(node_weight(onnx.load(str(a)), "/4/Gemm"), node_weight(onnx.load(str(b)), "/4/Gemm"))


def test_widen_noise_reports_deviation(tmp_path, capsys):
    out, report_path = tmp_path / "n.onnx", tmp_path / "r.json"
    code, stdout, _ = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/0/Gemm=60", "--noise", "0.05",
                              "-o", out, "--report", report_path)
    assert code == 0 and out.exists()
    assert "deviation" in stdout
    report = json.loads(report_path.read_text())
    assert report["exact"] is False and report["verification"]["max_abs"] > 0


def test_widen_random_pad_warns(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    code, _, err = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/0/Gemm=60", "--init", "random-pad",
                           "-o", out)
    assert code == 0 and "NOT compute the same function" in err and out.exists()


def test_widen_init_fresh_is_exact_and_a_refusal_names_the_norm(tmp_path, capsys):
    out, report_path = tmp_path / "f.onnx", tmp_path / "report.json"
    code, _, err = run_cli(capsys, "widen", model_path("cnn"), "--factor", "2", "--init", "fresh", "--seed", "3",
                           "-o", out, "--report", report_path)
    assert code == 0 and "WARNING" not in err and out.exists()
    assert_same_function(model_path("cnn"), out)
    report = json.loads(report_path.read_text())
    assert report["exact"] is True and report["options"]["init"] == "fresh"
    code, _, err = run_cli(capsys, "widen", model_path("gpt2_tiny"), "--factor", "2", "--init", "fresh",
                           "-o", tmp_path / "g.onnx")
    assert code != 0 and "--init fresh" in err and "LayerNormalization" in err


def test_deepen_with_report(tmp_path, capsys):
    out, report_path = tmp_path / "deep.onnx", tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, "deepen", model_path("cnn"), "--after", "/0/Conv", "--after", "/9/Gemm",
                              "--batchnorm", "-o", out, "--report", report_path)
    assert code == 0, stdout
    assert "deepened after /0/Conv" in stdout
    model = onnx.load(str(out))
    names = {n.name for n in model.graph.node}
    assert {"/0/Conv/deeper0", "/9/Gemm/deeper0"} <= names
    assert_same_function(model_path("cnn"), out)
    report = json.loads(report_path.read_text())
    assert [c["after"] for c in report["changes"]] == ["/0/Conv", "/9/Gemm"]
    # conv 8x8x3x3 + bias 8 + BN 4x8; gemm 32x32 + bias 32 + BN 4x32
    assert report["parameters"]["after"] - report["parameters"]["before"] == \
        8 * 8 * 9 + 8 + 4 * 8 + 32 * 32 + 32 + 4 * 32
    assert report["verification"]["passed"] is True


def test_deepen_mode_and_kernel(tmp_path, capsys):
    out = tmp_path / "deep.onnx"
    code, _, _ = run_cli(capsys, "deepen", model_path("cnn1d"), "--after", "/0/Conv", "--kernel", "7",
                         "--mode", "residual", "-o", out)
    assert code == 0
    model = onnx.load(str(out))
    assert node_weight(model, "/0/Conv/deeper0").shape == (8, 8, 7)
    assert_same_function(model_path("cnn1d"), out)


@pytest.mark.parametrize("selector", ["all", "stages", "last"])
def test_deepen_after_a_selector_matches_the_api(tmp_path, capsys, selector):
    import onnx_net2net as n2n

    out, report_path = tmp_path / "deep.onnx", tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, "deepen", model_path("resnet_block"), "--after", selector, "-o", out,
                              "--report", report_path)
    assert code == 0, stdout
    _, api_report = n2n.deepen(str(model_path("resnet_block")), selector, verify=False)
    after = [c["after"] for c in json.loads(report_path.read_text())["changes"]]
    assert after == [c["after"] for c in api_report["changes"]] and after
    assert (len(after) == 1) == (selector == "last")
    assert_same_function(model_path("resnet_block"), out)


def test_deepen_selector_with_names_is_exit_2(tmp_path, capsys):
    out = tmp_path / "deep.onnx"
    code, _, err = run_cli(capsys, "deepen", model_path("cnn"), "--after", "all", "--after", "/0/Conv", "-o", out)
    assert code == 2 and "give it alone" in err and not out.exists()


def test_deepen_refused_identity_after_tanh_exit_2(tmp_path, capsys):
    out = tmp_path / "deep.onnx"
    code, _, err = run_cli(capsys, "deepen", model_path("mlp"), "--after", "/2/Gemm", "--mode", "identity", "-o", out)
    assert code == 2 and "Tanh" in err and not out.exists()


def test_external_data_output(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(onnx.load(str(model_path("cnn"))), str(src / "cnn.onnx"), save_as_external_data=True,
              location="cnn.bin", size_threshold=0)
    out = tmp_path / "wide.onnx"
    code, stdout, err = run_cli(capsys, "widen", src / "cnn.onnx", "--layer", "/4/Conv=20", "-o", out)
    assert code == 0, err
    assert (tmp_path / "wide.onnx.data").is_file()
    assert_same_function(model_path("cnn"), out)
    out2 = tmp_path / "inline.onnx"
    code, _, _ = run_cli(capsys, "widen", src / "cnn.onnx", "--layer", "/4/Conv=20", "-o", out2,
                         "--external-data", "no")
    assert code == 0 and not (tmp_path / "inline.onnx.data").exists()


# ----------------------------------------------------------------------------
# Failed verification writes nothing


def corrupt_first_weight(monkeypatch, module, function):
    original = getattr(module, function)

    def corrupted(ir, *args, **kwargs):
        result = original(ir, *args, **kwargs)
        tensor = next(t for t in ir.graph.initializer if t.dims and len(t.dims) >= 2)
        value = numpy_helper.to_array(tensor) * np.float32(1.5)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
        return result

    monkeypatch.setattr(module, function, corrupted)


def test_failed_widen_verification_writes_nothing(tmp_path, capsys, monkeypatch):
    corrupt_first_weight(monkeypatch, wider, "widen_group")
    out, report_path = tmp_path / "wide.onnx", tmp_path / "report.json"
    code, _, err = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/0/Gemm=50", "-o", out,
                           "--report", report_path)
    assert code == 1
    assert "FAILED" in err and "nothing written" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]     # no staging leftovers
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is False


def test_failed_deepen_verification_writes_nothing(tmp_path, capsys, monkeypatch):
    corrupt_first_weight(monkeypatch, deeper, "insert_all")
    out = tmp_path / "deep.onnx"
    code, _, err = run_cli(capsys, "deepen", model_path("mlp"), "--after", "/0/Gemm", "-o", out)
    assert code == 1 and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_on_failure_keeps_output_exit_1(tmp_path, capsys, monkeypatch):
    corrupt_first_weight(monkeypatch, wider, "widen_group")
    out = tmp_path / "wide.onnx"
    code, stdout, _ = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/0/Gemm=50", "-o", out,
                              "--save-on-failure")
    assert code == 1 and out.exists() and "FAILED" in stdout


def test_no_verify(tmp_path, capsys, monkeypatch):
    corrupt_first_weight(monkeypatch, wider, "widen_group")
    out = tmp_path / "wide.onnx"
    code, stdout, _ = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/0/Gemm=50", "-o", out, "--no-verify")
    assert code == 0 and out.exists() and "not verified" in stdout


# ----------------------------------------------------------------------------
# Exit codes for user errors


@pytest.mark.parametrize("args, message", [
    (["--layer", "nope=5"], "unknown layer"),
    (["--layer", "/0/Gemm=48"], "not larger"),
    (["--layer", "/0/Gemm=abc"], ""),
    (["--layer", "/4/Gemm=12"], "graph output"),
    ([], "--layer"),
    (["--layer", "/0/Gemm=50", "--factor", "2"], "either"),
    (["--factor", "0.5"], "larger than 1"),
    (["--layer", "/0/Gemm=50", "--noise", "-1"], "noise"),
])
def test_widen_usage_errors_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "widen", model_path("mlp"), *args, "-o", out)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_output_equal_to_input_exit_2(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(model_path("mlp").read_bytes())
    code, _, err = run_cli(capsys, "widen", src, "--layer", "/0/Gemm=50", "-o", src)
    assert code == 2 and "input" in err
    assert src.read_bytes() == model_path("mlp").read_bytes()


def test_output_folder_missing_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "deepen", model_path("mlp"), "--after", "/0/Gemm", "-o",
                           tmp_path / "no" / "o.onnx")
    assert code == 2 and "does not exist" in err


def test_not_an_onnx_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    code, _, err = run_cli(capsys, "widen", bad, "--factor", "2", "-o", tmp_path / "o.onnx")
    assert code == 2


def test_internal_error_exit_3(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(wider, "widen_group", boom)
    code, _, err = run_cli(capsys, "widen", model_path("mlp"), "--layer", "/0/Gemm=50", "-o", tmp_path / "o.onnx")
    assert code == 3 and "internal error" in err and "simulated bug" in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_model_is_not_modified(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(model_path("cnn").read_bytes())
    before = src.read_bytes()
    code, _, _ = run_cli(capsys, "widen", src, "--factor", "2", "-o", tmp_path / "w.onnx")
    assert code == 0 and src.read_bytes() == before
    assert init(onnx.load(str(tmp_path / "w.onnx")), "0.weight").shape == (16, 1, 3, 3)


def test_library_errors_name_parameters_and_the_cli_names_flags(tmp_path, capsys):
    """The library's message names the Python parameter; the CLI shows the
    flag a user typed; a plan's error shows the plan's key."""
    import onnx_net2net as n2n

    with pytest.raises(n2n.UserError, match=r"^`factor=0.5`: must be larger than 1$"):
        n2n.widen(str(model_path("mlp")), factor=0.5)
    with pytest.raises(n2n.UserError, match=r"^`split=halves`: choose one of equal, random, zero-sum$"):
        n2n.widen(str(model_path("mlp")), factor=2, split="halves")
    out = tmp_path / "out.onnx"
    assert cli.main(["widen", str(model_path("mlp")), "--factor", "0.5", "-o", str(out)]) == 2
    assert "error: --factor 0.5: must be larger than 1" in capsys.readouterr().err
    assert cli.main(["deepen", str(model_path("mlp")), "--after", "fc1", "--mode", "block", "--noise", "0.1",
                     "-o", str(out)]) == 2
    assert "error: --noise: not used by --mode block" in capsys.readouterr().err
    plan = tmp_path / "plan.toml"
    plan.write_text('[[steps]]\nop = "widen"\nfactor = 0.5\n')
    assert cli.main(["grow", str(model_path("mlp")), "--plan", str(plan), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "factor = 0.5: must be larger than 1" in err and "--factor" not in err
    assert not out.exists()


def test_grow_verify_each_names_the_failing_step_exit_1(tmp_path, capsys, monkeypatch):
    corrupt_first_weight(monkeypatch, deeper, "insert_all")
    out = tmp_path / "grown.onnx"
    plan = ROOT / "passes" / "wider-and-deeper.toml"
    code, stdout, err = run_cli(capsys, "grow", model_path("cnn"), "-o", out, "--plan", plan, "--verify-each")
    assert code == 1 and not out.exists()
    assert "step 1 (widen): PASSED" in stdout and "step 2 (deepen): FAILED" in stdout
    failures = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failures) == 1 and failures[0].startswith("step 2 (deepen): FAILED") and "nothing written" in err
    code, stdout, _ = run_cli(capsys, "grow", model_path("cnn"), "-o", out, "--plan", plan, "--verify-each",
                              "--save-on-failure")
    assert code == 1 and out.exists()
