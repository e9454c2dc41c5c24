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
from helpers import tool_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "reproduce_net2net.py"
SUMMARY_KEYS = ("experiment", "growth", "arm", "lr", "steps", "steps_to_target", "target_steps", "final_mean",
                "final_sem", "seeds")
EXPERIMENTS = {"mnist1d-cnn", "mnist1d-mlp", "digits-cnn", "char-lm"}
ARMS = {("widen", "random-init"), ("widen", "random-init-T/3"), ("widen", "net2net"), ("widen", "zero-sum"),
        ("widen", "net2net+sp"), ("widen", "zero-sum+sp"), ("deepen", "random-init"), ("deepen", "random-init-T/3"),
        ("deepen", "net2net"), ("deepen", "net2net+sp"), ("teacher", "teacher+T/3")}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    start = time.time()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text()), out, time.time() - start, proc


def test_quick_summary_rows(quick):
    results, out, _, proc = quick
    rows = results["summary"]
    assert {r["experiment"] for r in rows} == EXPERIMENTS
    for name in EXPERIMENTS:
        assert {(r["growth"], r["arm"]) for r in rows if r["experiment"] == name} == ARMS
    for r in rows:
        assert set(SUMMARY_KEYS) <= set(r), set(SUMMARY_KEYS) - set(r)
        short = r["arm"] != "random-init"
        exp = results["experiments"][r["experiment"]]
        assert r["steps"] == (exp["short"] if short else exp["T"]) and exp["short"] == exp["T"] // 3
        if r["arm"] == "random-init":   # the target is the random-init student's own final metric
            assert r["steps_to_target"] is not None and r["final_mean"] == r["target"]
        assert r["lr"] in exp["grid"]
        # the default shrink-and-perturb point, recorded on the +sp rows only
        assert (r["shrink"], r["fresh"]) == ((0.4, 0.1) if r["arm"].endswith("+sp") else (None, None))
    written = json.loads((out / "summary.json").read_text())
    assert [{k: w[k] for k in SUMMARY_KEYS} for w in written] == [{k: r[k] for k in SUMMARY_KEYS} for r in rows]
    assert [(w["shrink"], w["fresh"]) for w in written] == [(r["shrink"], r["fresh"]) for r in rows]
    assert "| experiment |" in proc.stdout and (out / "results.md").is_file()
    for path in results["plots"]:
        assert Path(path).is_file() and Path(path).parent == out


def test_quick_exact_students_start_at_the_teachers_metric(quick):
    results = quick[0]
    checked = 0
    for name, exp in results["experiments"].items():
        tolerance = 1e-4 if exp["metric"] == "bpc" else 0.001 + 1e-9
        for check in exp["step0_checks"]:
            if check["exact"]:
                assert abs(check["step0"] - check["teacher"]) <= tolerance, (name, check)
                checked += 1
        teacher = exp["teacher"]["test"][0]
        for arm in ("net2net", "zero-sum"):   # and the training curves start there too
            assert abs(exp["arms"][f"widen/{arm}"]["curves"][0]["test"][0] - teacher) <= tolerance
        assert abs(exp["arms"]["deepen/net2net"]["curves"][0]["test"][0] - teacher) <= tolerance
    assert checked == 3 * len(EXPERIMENTS)   # Net2WiderNet random split and zero-sum, Net2DeeperNet


def test_quick_runtime(quick):
    # The budget is about 2 minutes on 2 idle cores; allow for a loaded test machine.
    assert quick[2] < 360


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
    """tools/reproduce_net2net.py as a module."""
    return tool_module("reproduce_net2net")


def test_schedule_warms_up_then_decays_to_zero():
    r = _script_module()
    assert r.lr_at(1, 100, 0.01) == pytest.approx(0.002)        # warmup: 5 steps of 100
    assert r.lr_at(5, 100, 0.01) == pytest.approx(0.01)         # the peak
    assert r.lr_at(53, 100, 0.01) == pytest.approx(0.005, rel=0.05)
    assert 0 <= r.lr_at(100, 100, 0.01) < 1e-6
    assert r.eval_points(30, 3) == [0, 10, 20, 30]


def test_char_lm_grows_exactly_and_trains_through_onnx2torch():
    """The language model of the experiment: widened (stream, heads, MLP) and deepened by blocks, exactly,
    and every weight trainable after onnx2torch (make_trainable)."""
    r = _script_module()
    exp = r.settle(r.EXPERIMENTS["char-lm"], quick=True)
    torch.manual_seed(0)
    proto = r.export_onnx(r.build_model(exp), exp)
    wide, report = n2n.widen(proto, factor=2.0, split="zero-sum", seed=0)
    assert report["verification"]["passed"] and report["parameters"]["after"] > 3 * report["parameters"]["before"]
    deep, report = n2n.deepen(proto, "all", mode="block")
    assert report["verification"]["passed"] and len(report["changes"]) == exp.widths["layers"]
    x = torch.randint(0, 128, (3, exp.widths["ctx"]))
    reference = r.to_torch(proto)(x)
    for grown in (wide, deep):
        student = r.to_torch(grown)
        torch.testing.assert_close(student(x), reference, atol=1e-4, rtol=1e-4)
        names = {name for name, _ in student.named_parameters()}
        buffers = [b for _, b in student.named_buffers() if b.is_floating_point() and b.ndim >= 2]
        assert all(float(b.min()) <= -1e8 for b in buffers)   # only the causal masks stay constant
        assert len(names) > 10


def test_overrides_are_checked_before_anything_runs(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_net2net", SCRIPT)
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tool)  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    for argv in (["--budget", "2"], ["--grid", "0.1", "0"], ["--seeds", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            tool.parse_args(argv)
        assert exit_info.value.code == 2
    args = tool.parse_args(["--budget", "300", "--grid", "0.1", "0.01"])
    assert args.budget == 300 and args.grid == [0.1, 0.01]


def test_sp_grid_and_arms_options_are_parsed_and_checked():
    r = _script_module()
    args = r.parse_args([])
    default = [a for a in r.ARMS if a not in r.OPT_IN_ARMS]
    assert args.sp_grid == [(0.4, 0.1)] and args.selected == default   # the default: unchanged behaviour
    args = r.parse_args(["--sp-grid", "0.2:0.1", "0.4:0.3", "0.2:0.1", "--arms", "widen/net2net+sp"])
    assert args.sp_grid == [(0.2, 0.1), (0.4, 0.3)]
    assert args.selected == [("widen", "random-init"), ("widen", "net2net+sp")]   # the target is always run
    assert r.select_arms(["teacher"]) == [("widen", "random-init"), ("teacher", "teacher+T/3")]
    assert r.select_arms(["deepen"]) == [a for a in r.ARMS if a[0] == "deepen"]
    # the fresh arms run only when named
    assert ("widen", "fresh") in r.ARMS and not set(r.OPT_IN_ARMS) & set(r.select_arms(["widen"]))
    assert r.parse_args(["--arms", "widen/fresh", "widen/fresh+sp"]).selected == [
        ("widen", "random-init"), ("widen", "fresh"), ("widen", "fresh+sp")]
    for argv in (["--sp-grid", "0.4"], ["--sp-grid", "a:b"], ["--sp-grid", "-1:0.1"], ["--sp-grid", "0:0"],
                 ["--arms", "widen/nope"]):
        with pytest.raises(SystemExit) as exit_info:
            r.parse_args(argv)
        assert exit_info.value.code == 2
    assert r.sp_tag((0.4, 0.1)) == "" and r.sp_tag(None) == "" and r.sp_tag((0.2, 0.3)) == "_s0.2_f0.3"


def test_tuning_ties_within_float32_rounding_keep_the_earlier_candidate():
    """Two seeds with the same count of correct validation answers can average to values 3e-8 apart: a tie."""
    from types import SimpleNamespace

    r = _script_module()
    acc, bpc = (SimpleNamespace(exp=SimpleNamespace(metric=m)) for m in ("acc", "bpc"))
    assert not r.Task.better(acc, 0.9888888895511627, 0.9888888597488403, r.TIE)
    assert r.Task.better(acc, 0.9907407164573669, 0.9888888597488403, r.TIE)
    assert r.Task.better(bpc, 2.30, 2.31, r.TIE) and not r.Task.better(bpc, 2.31, 2.30, r.TIE)


def test_quick_sp_grid_is_tuned_on_validation_and_cached(tmp_path):
    """--sp-grid with --arms: (shrink, fresh, lr) chosen on the validation split, recorded per arm and row,
    every point's grown model and runs cached; a second invocation recomputes nothing."""
    argv = [sys.executable, str(SCRIPT), "--quick", "--only", "mnist1d-cnn", "--arms", "widen/net2net+sp",
            "--sp-grid", "0.4:0.1", "0.8:0.1", "--out", str(tmp_path)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    exp = results["experiments"]["mnist1d-cnn"]
    assert list(exp["arms"]) == ["widen/random-init", "widen/net2net+sp"]
    entry = exp["arms"]["widen/net2net+sp"]
    table = entry["validation_by_sp"]
    assert set(table) == {"0.4:0.1", "0.8:0.1"}
    best = max(((v, point, float(lr)) for point, scores in table.items() for lr, v in scores.items()),
               key=lambda t: t[0])[0]
    chosen = f"{entry['shrink']:g}:{entry['fresh']:g}"
    assert table[chosen][str(entry["lr"])] >= best - 1e-6 and entry["validation_by_lr"] == table[chosen]
    rows = {r["arm"]: r for r in results["summary"]}
    assert set(rows) == {"random-init", "net2net+sp"} and rows["random-init"]["shrink"] is None
    assert (rows["net2net+sp"]["shrink"], rows["net2net+sp"]["fresh"]) == (entry["shrink"], entry["fresh"])
    assert all(c.get("shrink") == entry["shrink"] for c in entry["curves"])
    cache = tmp_path / "cache" / "mnist1d-cnn"
    assert (cache / "seed0_widen_net2net_sp.onnx").is_file()            # the default point: the old name
    assert (cache / "seed0_widen_net2net_sp_s0.8_f0.1.onnx").is_file()
    assert len(list((cache / "runs").glob("widen_net2net_sp_s0.8_f0.1_lr*.json"))) == 2
    md = (tmp_path / "results.md").read_text()
    assert "| widen/net2net+sp | 0.4/0.1" in md and "| widen/net2net+sp | 0.8/0.1" in md and "(chosen)" in md
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and "steps, val" not in again.stderr   # every run came from the cache


def test_tune_seeds_and_teacher_steps_options_are_parsed_and_checked():
    r = _script_module()
    args = r.parse_args([])
    assert args.tune_seeds is None and args.teacher_steps is None            # the default: unchanged behaviour
    assert {name: exp.tune_seeds for name, exp in r.EXPERIMENTS.items()} == {   # the CNN tunes like the others
        "mnist1d-mlp": 2, "mnist1d-cnn": 2, "digits-cnn": 2, "char-lm": 1}
    args = r.parse_args(["--tune-seeds", "3", "--teacher-steps", "2000"])
    assert args.tune_seeds == 3 and args.teacher_steps == 2000
    for argv in (["--tune-seeds", "0"], ["--teacher-steps", "0"], ["--teacher-steps", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            r.parse_args(argv)
        assert exit_info.value.code == 2


def test_quick_teacher_steps_grows_from_a_shorter_teacher_cached_apart(tmp_path):
    """--teacher-steps: the teacher trained N steps on its own schedule, its grown models and runs cached in
    cache/<model>/teacher<N>/, the random-init runs shared with the default teacher's; rows record it."""
    base = [sys.executable, str(SCRIPT), "--quick", "--only", "mnist1d-cnn", "--arms", "widen/net2net",
            "--out", str(tmp_path), "--no-plots"]
    proc = subprocess.run(base + ["--teacher-steps", "150"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    exp = json.loads((tmp_path / "results.json").read_text())["experiments"]["mnist1d-cnn"]
    assert exp["teacher"]["steps"] == 150
    rows = {r["arm"]: r for r in exp["rows"]}
    assert rows["net2net"]["teacher_steps"] == 150 and rows["random-init"]["teacher_steps"] is None
    assert rows["net2net"]["steps"] == exp["short"]                # the student's budget is unchanged
    written = {r["arm"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert written["net2net"]["teacher_steps"] == 150
    checks = [c for c in exp["step0_checks"] if c["exact"]]
    assert checks and all(abs(c["step0"] - c["teacher"]) <= 0.001 + 1e-9 for c in checks)
    cache = tmp_path / "cache" / "mnist1d-cnn"
    assert (cache / "teacher_seed0_150.onnx").is_file()
    assert (cache / "teacher150" / "seed0_widen_net2net.onnx").is_file()
    assert not (cache / "seed0_widen_net2net.onnx").exists()
    assert list((cache / "teacher150" / "runs").glob("widen_net2net_lr*.json"))
    assert list((cache / "runs").glob("widen_random-init_lr*.json"))
    assert not list((cache / "runs").glob("widen_net2net_lr*.json"))
    # the default teacher: its own grown models and runs; the random-init runs come from the cache
    again = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-5000:]
    assert "widen/net2net lr" in again.stderr and "widen/random-init lr" not in again.stderr
    assert (cache / "seed0_widen_net2net.onnx").is_file()
    exp = json.loads((tmp_path / "results.json").read_text())["experiments"]["mnist1d-cnn"]
    assert exp["teacher"]["steps"] == 300


def test_student_steps_option_is_parsed_and_checked():
    r = _script_module()
    assert r.parse_args([]).student_steps is None                  # the default: T/3, unchanged behaviour
    assert r.parse_args(["--student-steps", "1500"]).student_steps == 1500
    exp = r.EXPERIMENTS["mnist1d-cnn"]
    assert r.short(exp) == exp.T // 3 and r.short(r.replace(exp, student_steps=1500)) == 1500
    for argv in (["--student-steps", "0"], ["--student-steps", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            r.parse_args(argv)
        assert exit_info.value.code == 2


def test_quick_student_steps_gives_every_arm_but_the_target_that_budget(tmp_path):
    """--student-steps N: the grown students and the controls train N steps (their runs cached by budget, so
    the random-init target at T is shared with the default run); the target keeps T."""
    base = [sys.executable, str(SCRIPT), "--quick", "--only", "mnist1d-cnn", "--arms", "widen/net2net",
            "widen/random-init-T/3", "teacher", "--out", str(tmp_path), "--no-plots"]
    proc = subprocess.run(base + ["--student-steps", "60"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    exp = json.loads((tmp_path / "results.json").read_text())["experiments"]["mnist1d-cnn"]
    rows = {r["arm"]: r for r in exp["rows"]}
    assert exp["short"] == 60 and exp["T"] == 120
    assert rows["random-init"]["steps"] == 120
    assert rows["net2net"]["steps"] == rows["random-init-T/3"]["steps"] == rows["teacher+T/3"]["steps"] == 60
    again = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-5000:]
    assert "widen/net2net lr" in again.stderr and "widen/random-init lr" not in again.stderr
    exp = json.loads((tmp_path / "results.json").read_text())["experiments"]["mnist1d-cnn"]
    assert {r["arm"]: r["steps"] for r in exp["rows"]}["net2net"] == 40 == exp["short"]
    at_T = subprocess.run(base + ["--student-steps", "120"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)   # random init for N = T steps is the target's own runs, not trained again
    assert at_T.returncode == 0, at_T.stderr[-5000:]
    assert "widen/random-init-T/3: lr" in at_T.stderr and "widen/random-init-T/3 lr" not in at_T.stderr
    exp = json.loads((tmp_path / "results.json").read_text())["experiments"]["mnist1d-cnn"]
    assert exp["arms"]["widen/random-init-T/3"]["curves"] == exp["arms"]["widen/random-init"]["curves"]


def test_wd_grid_option_is_parsed_and_checked():
    r = _script_module()
    assert r.parse_args([]).wd_grid == [0.0]                     # the default: plain Adam, unchanged behaviour
    assert r.parse_args(["--wd-grid", "0", "0.01", "0"]).wd_grid == [0.0, 0.01]
    for argv in (["--wd-grid", "-0.1"], ["--wd-grid", "nan"], ["--wd-grid", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            r.parse_args(argv)
        assert exit_info.value.code == 2


def test_quick_wd_grid_is_tuned_for_every_arm_and_recorded(tmp_path):
    """--wd-grid: the weight decay chosen with the rate (and a +sp arm's point) on validation, for random
    init as for the grown arms; recorded per arm, row and run; the default decay 0 keeps the cache names."""
    argv = [sys.executable, str(SCRIPT), "--quick", "--only", "digits-cnn", "--arms", "widen/net2net+sp",
            "--sp-grid", "0.4:0.1", "0.8:0.1", "--wd-grid", "0", "0.05", "--out", str(tmp_path), "--no-plots"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    exp = results["experiments"]["digits-cnn"]
    assert exp["wd_grid"] == [0.0, 0.05]
    base, sp = exp["arms"]["widen/random-init"], exp["arms"]["widen/net2net+sp"]
    assert set(base["validation_by_wd"]) == {"0", "0.05"} and "validation_grid" not in base
    assert {(c["shrink"], c["fresh"], c["weight_decay"]) for c in sp["validation_grid"]} == {
        (a, 0.1, w) for a in (0.4, 0.8) for w in (0.0, 0.05)}
    for entry in (base, sp):
        best = max(c for c in (v for table in entry["validation_by_wd"].values() for v in table.values()))
        assert entry["validation_by_lr"][str(entry["lr"])] >= best - 1e-6
        assert all(c.get("weight_decay", 0.0) == entry["weight_decay"] for c in entry["curves"])
    rows = {r["arm"]: r for r in results["summary"]}
    assert rows["net2net+sp"]["weight_decay"] == sp["weight_decay"]
    runs = tmp_path / "cache" / "digits-cnn" / "runs"
    assert len(list(runs.glob("widen_random-init_wd0.05_lr*.json"))) == 2
    assert len(list(runs.glob("widen_random-init_lr*.json"))) >= 2                 # decay 0: the old names
    md = (tmp_path / "results.md").read_text()
    assert "weight decays tried for every arm" in md and "| widen/random-init | -, wd 0.05" in md


def test_experiments_kept_from_an_older_results_json_get_teacher_steps_and_weight_decay():
    r = _script_module()
    exp = {"teacher": {"steps": 6000}, "arms": {},
           "rows": [{"arm": "random-init", "shrink": None, "fresh": None}, {"arm": "net2net", "shrink": None,
                                                                             "fresh": None}]}
    r.fill_sp(exp, {})
    assert [(row["teacher_steps"], row["weight_decay"]) for row in exp["rows"]] == [(None, 0.0), (6000, 0.0)]


def test_noise_grid_option_is_parsed_and_checked():
    r = _script_module()
    assert r.parse_args([]).noise_grid == [r.ZERO_SUM_NOISE] == [0.1]   # the default: unchanged behaviour
    assert r.parse_args(["--noise-grid", "0.3", "0.01", "0.3"]).noise_grid == [0.3, 0.01]
    for argv in (["--noise-grid", "0"], ["--noise-grid", "-0.1"], ["--noise-grid", "nan"], ["--noise-grid", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            r.parse_args(argv)
        assert exit_info.value.code == 2


def test_quick_noise_grid_is_tuned_for_the_zero_sum_arms_and_recorded(tmp_path):
    """--noise-grid: the zero-sum noise scale chosen with the rate (and a +sp arm's point) on validation, for
    the zero-sum arms only; every scale's model exact at step 0 and cached apart (the default keeps the old
    names); the choice recorded per arm, row and run; a second invocation recomputes nothing."""
    argv = [sys.executable, str(SCRIPT), "--quick", "--only", "mnist1d-cnn", "--arms", "widen/net2net",
            "widen/zero-sum", "widen/zero-sum+sp", "--noise-grid", "0.1", "1.5", "--out", str(tmp_path),
            "--no-plots"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    exp = results["experiments"]["mnist1d-cnn"]
    assert exp["noise_grid"] == [0.1, 1.5] and results["meta"]["noise_grid"] == [0.1, 1.5]
    arms = exp["arms"]
    for key in ("widen/random-init", "widen/net2net"):   # not a zero-sum arm: no noise, no noise tuning
        assert arms[key]["noise"] is None and "validation_by_noise" not in arms[key]
    for key in ("widen/zero-sum", "widen/zero-sum+sp"):
        entry = arms[key]
        assert set(entry["validation_by_noise"]) == {"0.1", "1.5"} and entry["noise"] in (0.1, 1.5)
        grid = entry["validation_grid"]
        assert {c["noise"] for c in grid} == {0.1, 1.5} and len(grid) == 2 * len(exp["grid"])
        best = max(c["val"] for c in grid)
        assert entry["validation_by_lr"][str(entry["lr"])] >= best - 1e-6
        assert entry["validation_by_lr"] == entry["validation_by_noise"][f"{entry['noise']:g}"]
        assert all(c.get("noise", 0.1) == entry["noise"] for c in entry["curves"])
    rows = {r["arm"]: r for r in results["summary"]}
    written = {r["arm"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    for arm in ("random-init", "net2net", "zero-sum", "zero-sum+sp"):
        expected = arms[f"widen/{arm}"]["noise"]
        assert rows[arm]["noise"] == written[arm]["noise"] == expected
    # every scale's zero-sum model is exact (step 0 = the teacher's metric), and the scales differ
    checks = [c for c in exp["step0_checks"] if c["arm"] == "zero-sum"]
    assert {c.get("noise", 0.1) for c in checks} == {0.1, 1.5}
    assert all(c["exact"] and abs(c["step0"] - c["teacher"]) <= 0.001 + 1e-9 for c in checks)
    cache = tmp_path / "cache" / "mnist1d-cnn"
    # the scale reaches the rewrite: distance of each zero-sum model from the plain equal split of the teacher
    equal = n2n.widen(onnx.load(str(cache / f"teacher_seed0_{exp['teacher']['steps']}.onnx")), factor=2.0,
                      split="equal", seed=0)[0]
    reference = {i.name: onnx.numpy_helper.to_array(i) for i in equal.graph.initializer}
    spread = {}
    for scale, name in ((0.1, "seed0_widen_zero-sum.onnx"), (1.5, "seed0_widen_zero-sum_n1.5.onnx")):
        weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(cache / name)).graph.initializer}
        assert weights.keys() == reference.keys()
        spread[scale] = sum(float(abs(weights[k] - reference[k]).sum()) for k in weights)
    assert spread[1.5] > 5 * spread[0.1] > 0
    assert (cache / "seed0_widen_zero-sum_n1.5_sp.onnx").is_file()
    assert (cache / "seed0_widen_zero-sum_sp.onnx").is_file()                  # the default: the old name
    runs = cache / "runs"
    assert len(list(runs.glob("widen_zero-sum_n1.5_lr*.json"))) == len(exp["grid"])
    assert len(list(runs.glob("widen_zero-sum_lr*.json"))) == len(exp["grid"])       # the default: old names
    assert len(list(runs.glob("widen_zero-sum_sp_n1.5_lr*.json"))) == len(exp["grid"])
    md = (tmp_path / "results.md").read_text()
    assert "zero-sum noise scales tried" in md and "| widen/zero-sum | -, noise 1.5" in md
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and "steps, val" not in again.stderr   # every run came from the cache


def test_quick_fresh_arms_start_exact_and_are_recorded(tmp_path):
    """--arms widen/fresh widen/fresh+sp: the model grown with init="fresh" reproduces the teacher at step 0
    (through onnx2torch), the perturbed one does not have to; both get summary rows."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO))   # this checkout's onnx_net2net, whatever is installed
    argv = [sys.executable, str(SCRIPT), "--quick", "--only", "mnist1d-cnn", "--arms", "widen/fresh",
            "widen/fresh+sp", "--out", str(tmp_path)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    exp = results["experiments"]["mnist1d-cnn"]
    assert list(exp["arms"]) == ["widen/random-init", "widen/fresh", "widen/fresh+sp"]
    checks = [c for c in exp["step0_checks"] if c["arm"] == "fresh"]
    assert checks and all(c["exact"] and abs(c["step0"] - c["teacher"]) <= 0.001 for c in checks)
    assert abs(exp["arms"]["widen/fresh"]["curves"][0]["test"][0] - exp["teacher"]["test"][0]) <= 0.001
    rows = {r["arm"]: r for r in results["summary"]}
    assert set(rows) == {"random-init", "fresh", "fresh+sp"} and rows["fresh+sp"]["shrink"] == 0.4
    assert (tmp_path / "cache" / "mnist1d-cnn" / "seed0_widen_fresh.onnx").is_file()
