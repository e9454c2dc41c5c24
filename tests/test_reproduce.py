"""tools/reproduce_net2net.py (the Net2Net reproduction) and the onnx2torch round trip it relies on.

Needs the experiment extras (torch, onnx2torch, mnist1d, scikit-learn, matplotlib); skipped without them.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx2torch = pytest.importorskip("onnx2torch")
pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import onnx  # noqa: E402

import onnx_net2net as n2n  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "reproduce_net2net.py"
SUMMARY_KEYS = ("experiment", "growth", "student", "net2net", "exact", "teacher_acc", "step0_acc",
                "step0_minus_teacher", "target_acc", "steps_to_target", "random_init_steps_to_target",
                "ratio_to_random_init", "final_acc", "final_acc_std", "budget_steps")
STUDENT_KEYS = ("step0_acc", "steps_to_target", "ratio_to_random_init", "final_acc", "per_seed")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    json_path = out / "results.json"
    start = time.time()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(json_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(json_path.read_text()), out, time.time() - start, proc


def test_quick_summary_keys(quick):
    results, out, _, proc = quick
    assert results["meta"]["quick"] is True
    rows = results["summary"]
    experiments = {"mnist1d-cnn", "mnist1d-mlp", "digits-cnn"}
    assert {r["experiment"] for r in rows} == experiments
    for r in rows:
        assert set(SUMMARY_KEYS) <= set(r), set(SUMMARY_KEYS) - set(r)
    students = {(r["growth"], r["student"]) for r in rows}
    assert students == {("widen", "random-init"), ("widen", "net2net"), ("widen", "net2net-noise"),
                        ("widen", "random-pad"), ("deepen", "random-init"), ("deepen", "net2net")}
    for name, exp in results["experiments"].items():
        for kind in ("widen", "deepen"):
            summary = exp["growth"][kind]["summary"]
            assert {"teacher_acc", "target_acc", "budget_steps"} <= set(summary)
            for student in summary["students"].values():
                assert set(STUDENT_KEYS) <= set(student)
            for curves in exp["growth"][kind]["students"].values():
                for curve in curves:
                    assert curve["steps"][0] == 0 and curve["steps"][-1] == summary["budget_steps"]
                    assert len(curve["steps"]) == len(curve["acc"])
    # the random-init student reaches its own final accuracy, by definition
    for r in rows:
        if r["student"] == "random-init":
            assert r["steps_to_target"] is not None and r["ratio_to_random_init"] == 1.0
    assert "| experiment |" in proc.stdout
    for path in results["plots"]:
        assert Path(path).is_file() and Path(path).parent == out


def test_quick_net2net_students_start_at_teacher_accuracy(quick):
    results = quick[0]
    checked = 0
    for r in results["summary"]:
        if r["exact"]:
            assert abs(r["step0_acc"] - r["teacher_acc"]) <= 0.001 + 1e-9, r
            checked += 1
    assert checked == 6            # 3 experiments x (Net2WiderNet, Net2DeeperNet)
    for exp in results["experiments"].values():
        for kind in ("widen", "deepen"):
            for name, student in exp["growth"][kind]["summary"]["students"].items():
                for seed in student["per_seed"]:
                    if student["exact"]:
                        assert abs(seed["step0_acc"] - seed["teacher_acc"]) <= 0.001 + 1e-9, (name, seed)
                    elif student["net2net"]:
                        # equal split + noise is not function-preserving on purpose: close, not exact
                        assert abs(seed["step0_acc"] - seed["teacher_acc"]) <= 0.02, (name, seed)
        for check in exp["roundtrip_checks"]:
            if check["exact"]:
                assert check["prediction_agreement"] >= 0.999, check
                assert check["max_abs_logit_diff"] < 1e-4, check
                assert check["flipped_off_tie"] == 0, check


def test_quick_runtime(quick):
    # The budget is 2 minutes on 2 idle cores; allow for a loaded test machine.
    assert quick[2] < 300


def _export(model, shape):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros((2,) + shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("kind", ["cnn1d", "mlp"])
def test_widened_model_loads_in_onnx2torch_and_trains(kind):
    """The documented round trip: torch -> ONNX -> n2n.widen -> onnx2torch -> same outputs -> optimizer step."""
    nn = torch.nn
    torch.manual_seed(0)
    if kind == "cnn1d":
        shape = (1, 40)
        model = nn.Sequential(nn.Conv1d(1, 4, 5, stride=2, padding=2), nn.ReLU(),
                              nn.Conv1d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 10))
    else:
        shape = (40,)
        model = nn.Sequential(nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    wider, report = n2n.widen(_export(model, shape), factor=2.0, split="random", seed=0)
    assert report["verification"]["passed"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = onnx2torch.convert(wider)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), atol=1e-5, rtol=1e-5)
    widths = sorted(p.shape[0] for name, p in student.named_parameters() if name.endswith("weight"))
    assert widths == sorted([10] + _doubled(model))
    params = list(student.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    loss = torch.nn.functional.cross_entropy(student.train()(x), torch.randint(0, 10, (16,)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def _doubled(model):
    """Output widths of the hidden layers after factor-2 widening."""
    layers = [m for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    return [2 * (m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels) for m in layers[:-1]]


def test_deepened_model_loads_in_onnx2torch():
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    proto = _export(model, (40,))
    after = [layer["name"] for layer in n2n.inspect(proto)["layers"] if layer["deepen"]["ok"]]
    deeper, _ = n2n.deepen(proto, after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = onnx2torch.convert(deeper)
    x = torch.randn(16, 40)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(list(student.parameters())) == len(list(model.parameters())) + 2 * len(after)


def _script_module():
    """tools/reproduce_net2net.py as a module (registered first: its dataclasses look their module up)."""
    import importlib.util

    if "reproduce_net2net" not in sys.modules:
        spec = importlib.util.spec_from_file_location("reproduce_net2net", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["reproduce_net2net"] = module
        spec.loader.exec_module(module)
    return sys.modules["reproduce_net2net"]


def test_schedules_and_teacher_recipe():
    r = _script_module()
    assert r.lr_at(1, 100, 0.01, "constant") == r.lr_at(100, 100, 0.01, "constant") == 0.01
    assert r.lr_at(1, 100, 0.01, "cosine") == pytest.approx(0.01)
    assert r.lr_at(51, 100, 0.01, "cosine") == pytest.approx(0.005)
    assert 0 < r.lr_at(100, 100, 0.01, "cosine") < 1e-5
    with pytest.raises(ValueError):
        r.lr_at(1, 10, 0.01, "linear")
    settings = {"lr": 1e-3, "teacher_lr": None, "teacher_schedule": None}
    # MNIST-1D teachers have their own recipe (trained to convergence); digits uses --lr, constant
    assert r.teacher_recipe(r.EXPERIMENTS["mnist1d-cnn"], settings) == (1e-2, "cosine")
    assert r.teacher_recipe(r.EXPERIMENTS["digits-cnn"], settings) == (1e-3, "constant")
    forced = dict(settings, teacher_lr=5e-3, teacher_schedule="constant")
    assert r.teacher_recipe(r.EXPERIMENTS["mnist1d-cnn"], forced) == (5e-3, "constant")
    args = r.parse_args(["--schedule", "cosine", "--lr", "3e-2"])
    assert args.schedule == "cosine" and args.lr == 3e-2
