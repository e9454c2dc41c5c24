"""Growth plans (`grow`), the `align` deployment pass, and provenance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnx_net2net as n2n
from onnx_net2net.passes import AlignPass, DeepenPass, Pipeline, WidenPass
from onnx_net2net.plans import load_plan
from onnx_net2net.provenance import history

from helpers import MODELS, ROOT, assert_same_function

PLANS = sorted((ROOT / "passes").glob("*.toml"))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnx_net2net", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.stem)
@pytest.mark.parametrize("model", ["cnn", "resnet_block", "dense_concat", "sklearn_mlp"])
def test_shipped_plans_are_exact_on_shipped_models(plan, model, tmp_path):
    out = tmp_path / "grown.onnx"
    report = tmp_path / "report.json"
    result = run_cli("grow", MODELS / f"{model}.onnx", "-o", out, "--plan", plan, "--report", report)
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] and data["exact"]
    grown = onnx.load(str(out))
    entry = history(grown)[-1]
    assert entry["pass"] == "pipeline" and entry["steps"]
    assert_same_function(MODELS / f"{model}.onnx", out)


def test_plan_verify_each_reports_every_step(tmp_path):
    result = run_cli("grow", MODELS / "cnn.onnx", "-o", tmp_path / "g.onnx", "--plan",
                     ROOT / "passes" / "wider-and-deeper.toml", "--verify-each")
    assert result.returncode == 0, result.stderr
    assert "step 1 (widen): PASSED" in result.stdout and "step 2 (deepen): PASSED" in result.stdout


def test_plan_verify_each_on_external_data_from_another_folder(tmp_path):
    """Each step's models hold external references: they resolve in the model's
    folder, not in the working directory."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(onnx.load(str(MODELS / "cnn.onnx")), str(folder / "cnn.onnx"), save_as_external_data=True,
              location="cnn.onnx.data", size_threshold=0)
    result = run_cli("grow", folder / "cnn.onnx", "-o", tmp_path / "g.onnx", "--plan",
                     ROOT / "passes" / "wider-and-deeper.toml", "--verify-each", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "step 2 (deepen): PASSED" in result.stdout


def test_api_inspect_reads_no_external_weights_and_skips_trials(tmp_path, monkeypatch):
    onnx.save(onnx.load(str(MODELS / "cnn.onnx")), str(tmp_path / "cnn.onnx"), save_as_external_data=True,
              location="cnn.onnx.data", size_threshold=0)
    import onnx_net2net.inspection as inspection

    def no_reference(*args, **kwargs):
        raise AssertionError("a trial ran on an external-data model")
    monkeypatch.setattr(inspection, "ReferenceRun", no_reference)
    report = n2n.inspect(tmp_path / "cnn.onnx")
    assert all(layer["widen"]["ok"] for layer in report["layers"][:-1])


@pytest.mark.parametrize("text, message", [
    ('[[steps]]\nop = "widen"\nfactr = 2\n', ":3: step 1: unknown key 'factr'"),
    ('[[steps]]\nop = "widen"\nfactor = "two"\n', ":3: step 1: 'factor' has the wrong type"),
    ('[[steps]]\nop = "shrink"\n', ":2: step 1: op must be one of"),
    ('[[steps]]\nop = "widen"\nwidths = {"nope" = 3}\n', ":3: step 1: unknown layer 'nope'"),
    ('[plan]\nverify = "sometimes"\n[[steps]]\nop = "widen"\nfactor = 2.0\n', ":2: verify must be"),
    ('[[steps]]\nop = "deepen"\nafter = "everywhere"\n', ":2: step 1: after = 'everywhere'"),
    ("this is not toml", "invalid TOML"),
    ('[plan]\nname = "empty"\n', "no [[steps]]"),
])
def test_bad_plan_is_one_line_naming_the_line(text, message, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    out = tmp_path / "out.onnx"
    result = run_cli("grow", MODELS / "cnn.onnx", "-o", out, "--plan", plan)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_plan_loads_into_a_pipeline():
    plan = load_plan(ROOT / "passes" / "wider-and-deeper.toml")
    assert [type(step) for step in plan.steps] == [WidenPass, DeepenPass]
    model = onnx.load(str(MODELS / "resnet_block.onnx"))
    result = plan.pipeline()(model)
    assert result.modified
    assert_same_function(model, result.model)


@pytest.mark.parametrize("fill", ["zero", "replicate"])
@pytest.mark.parametrize("multiple", [8, 16])
def test_align_makes_every_growable_width_a_multiple(fill, multiple, tmp_path):
    model = _awkward_cnn()
    result = AlignPass(multiple, fill)(model)
    assert result.modified
    assert_same_function(model, result.model)
    for layer in n2n.inspect(result.model, trial=False)["layers"]:
        if layer["widen"]["ok"]:
            assert layer["width"] % multiple == 0, layer


def test_align_zero_fill_keeps_original_weights():
    model = _awkward_cnn()
    result = AlignPass(8, "zero")(model)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name, old in before.items():
        new = after[name]
        window = tuple(slice(0, d) for d in old.shape)
        np.testing.assert_array_equal(new[window], old)


def test_align_cli(tmp_path):
    source = tmp_path / "awkward.onnx"
    onnx.save(_awkward_cnn(), str(source))
    out = tmp_path / "aligned.onnx"
    result = run_cli("align", source, "-o", out, "--multiple", "8")
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout
    widths = {l["name"]: l["width"] for l in n2n.inspect(str(out), trial=False)["layers"]}
    assert widths["c1"] == 32 and widths["c2"] == 64


def test_pipeline_of_passes_on_a_model_proto():
    model = onnx.load(str(MODELS / "cnn.onnx"))
    original = model.SerializeToString()
    result = Pipeline([WidenPass(factor=1.5), DeepenPass(["/4/Conv"]), AlignPass(8)])(model)
    assert model.SerializeToString() == original  # the input is never modified
    assert result.modified and len(result.report["steps"]) == 3
    assert_same_function(model, result.model)


def _awkward_cnn() -> onnx.ModelProto:
    """Conv 3->30 -> Relu -> Conv 30->60 -> Relu -> GAP -> Flatten -> Gemm 60->10."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((30, 3, 3, 3)), "b1": rng.standard_normal(30),
             "w2": rng.standard_normal((60, 30, 3, 3)) * 0.1, "b2": rng.standard_normal(60),
             "w3": rng.standard_normal((60, 10)), "b3": rng.standard_normal(10)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["y2"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y2"], ["a2"]),
             helper.make_node("GlobalAveragePool", ["a2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["out"], name="fc")]
    graph = helper.make_graph(nodes, "awkward", [helper.make_tensor_value_info("x", 1, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", 1, [2, 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_grow_notes_name_verification_options_as_flags(tmp_path):
    """`input_shapes` is no plan key: grow's note names the flag it has."""
    result = run_cli("grow", MODELS / "cnn.onnx", "-o", tmp_path / "g.onnx", "--plan",
                     ROOT / "passes" / "widen-2x.toml", "--verify-each")
    assert result.returncode == 0, result.stderr
    assert "--input-shapes input:[...]" in result.stderr and "input_shapes =" not in result.stderr
