#!/usr/bin/env python
"""Reproduce the Net2Net experiments (Chen, Goodfellow & Shlens, ICLR 2016) with onnx_net2net.

For each dataset/model below and each seed:

1. train a *teacher* in PyTorch to convergence and export it to ONNX
   (``torch.onnx.export(..., dynamo=False)``, opset 17, dynamic batch axis);
2. grow it with onnx_net2net: Net2WiderNet (``n2n.widen(factor=2)``: every
   hidden layer 2x wider, the paper's setting) and Net2DeeperNet
   (``n2n.deepen``: identity layers inserted);
3. load each grown ONNX model back into PyTorch with ``onnx2torch.convert``
   and assert that, before any training, it reproduces the teacher's test
   accuracy (to 0.1%, and no prediction differs except on float ties) for the
   exact rewrites;
4. train the students next to the paper's baselines: the same student
   architecture from random init (the onnx2torch module with every
   parameter re-initialised by torch's default ``reset_parameters``) and,
   for widening, the *random-pad* student (``n2n.widen(init="random-pad")``:
   new units random, old weights unchanged);
5. record test accuracy against training steps.

Students (all trained with Adam, batch 100, the same batches for a seed):

* widen:  ``random-init``, ``net2net`` (split="random", exact),
  ``net2net-noise`` (split="equal" + ``--noise``, the paper's symmetry
  breaking, not exact), ``random-pad``;
* deepen: ``random-init``, ``net2net`` (identity layers, mode="auto").

Protocol (the default; every student of a comparison gets the same budget,
learning rate, schedule and batches):

* teachers trained to convergence. The MNIST-1D teachers use their own
  recipe, Adam 1e-2 with cosine decay to 0 over the teacher budget (the best
  mean over 3 seeds of 1e-2 and 3e-2 cosine, after 1e-3 constant or cosine
  was still improving or stuck lower on seed 0); digits uses ``--lr`` constant (its teacher
  gains nothing in the last quarter). ``--teacher-lr`` and
  ``--teacher-schedule`` override both;
* students: Adam ``--lr`` (1e-3, the issue's), ``--schedule`` (constant by
  default; ``cosine`` decays to 0 over the student budget), the issue's
  calibration budget of 3,000 student steps for MNIST-1D.
  ``--student-lr`` / ``--random-init-lr`` set the grown and the random-init
  students apart (both default to ``--lr``).

The conclusion depends on the student learning rate: at Adam 1e-3 the
Net2WiderNet students meet the issue's targets on MNIST-1D because the wide
random-init student is still below the teacher after 3,000 steps; with every
student at the random-init student's best rate (``--schedule cosine``, ``--lr
3e-2`` for the CNN, ``1e-2`` for the MLP; see docs/experiments/results.md) it
is not met.

Datasets (both offline; the script blocks sockets while it runs):

* MNIST-1D (``mnist1d.data.make_dataset``, generated locally, 10,000
  samples, 8,000 train / 2,000 test): a 1D CNN and an MLP;
* scikit-learn's ``load_digits`` (8x8 images, 1,797 samples, 25% test): a
  small 2D CNN.

Outputs: a JSON file with every curve and the summary figures, and PNG plots
(test accuracy against student training steps, mean over seeds with the
min..max spread shaded; one panel per dataset/model and growth kind).

Summary per student (from the mean-over-seeds curves): accuracy at step 0,
steps to first reach the random-init student's final accuracy (and the ratio
to the random-init student's own steps), and final accuracy after the same
budget. Per-seed versions, and the same measure against 1/4, 1/2 and 3/4 of
the budget ("by_budget"), are in the JSON too. The issue's targets (start at
the teacher's accuracy, reach the target in at most 1/3 of the steps, end at
least as high) are checked and listed, not asserted.

Usage::

    python tools/reproduce_net2net.py             # full run, 3 seeds (CPU time: see docs/experiments/results.md)
    python tools/reproduce_net2net.py --only mnist1d-cnn mnist1d-mlp --schedule cosine --lr 3e-2 \
        --tag tuned-cosine-3e-2                   # every student at the random-init student's best rate
    python tools/reproduce_net2net.py --quick     # 1 seed, short budgets: ~65 CPU-seconds (< 2 min)
    python tools/reproduce_net2net.py --teacher-cache ~/.cache/n2n-teachers   # reuse trained teachers
    python tools/reproduce_net2net.py --replot docs/experiments/results.json  # redraw the plots only

The exit status is 1 when a job failed (the others still run and are reported).

Needs the experiment extras: torch, onnx2torch, mnist1d, scikit-learn,
matplotlib (``pip install -e .[experiments]``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "experiments"
_T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- network guard

@contextlib.contextmanager
def no_network():
    """Both datasets are generated/loaded locally: make any connection attempt fail loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("reproduce_net2net: network access attempted; the experiments must run offline")

    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection = saved


# --------------------------------------------------------------------------- experiments

@dataclass
class Budget:
    teacher_steps: int
    student_steps: int
    eval_every: int


@dataclass
class Experiment:
    name: str
    dataset: str            # "mnist1d" or "digits"
    model: str              # "cnn1d", "mlp", "cnn2d"
    title: str
    widths: dict            # teacher widths (constructor kwargs)
    deepen: str             # which layers get an identity layer: "all" or "last-conv+last-dense"
    full: Budget
    quick: Budget
    input_shape: tuple = ()
    teacher_lr: float | None = None       # default: --lr
    teacher_schedule: str = "constant"    # "constant" or "cosine" (decay to 0 over the teacher's budget)


EXPERIMENTS = {
    "mnist1d-cnn": Experiment(
        "mnist1d-cnn", "mnist1d", "cnn1d", "MNIST-1D, 1D CNN", {"channels": 8, "hidden": 32},
        "last-conv+last-dense", Budget(16000, 3000, 100), Budget(1500, 600, 100), (1, 40),
        teacher_lr=1e-2, teacher_schedule="cosine"),
    "mnist1d-mlp": Experiment(
        "mnist1d-mlp", "mnist1d", "mlp", "MNIST-1D, MLP", {"hidden": 32},
        "all", Budget(10000, 3000, 100), Budget(1500, 600, 100), (40,),
        teacher_lr=1e-2, teacher_schedule="cosine"),
    "digits-cnn": Experiment(
        "digits-cnn", "digits", "cnn2d", "sklearn digits, 2D CNN", {"c1": 4, "c2": 8, "hidden": 16},
        "last-conv+last-dense", Budget(2000, 1500, 50), Budget(500, 300, 50), (1, 8, 8)),
}

#: How each student is made. "exact": the rewrite preserves the function (step-0 accuracy asserted).
WIDEN_STUDENTS = ("random-init", "net2net", "net2net-noise", "random-pad")
DEEPEN_STUDENTS = ("random-init", "net2net")
STUDENT_LABELS = {
    ("widen", "random-init"): "random init (same wider architecture)",
    ("widen", "net2net"): "Net2WiderNet (random split, exact)",
    ("widen", "net2net-noise"): "Net2WiderNet (equal split + noise)",
    ("widen", "random-pad"): "random pad (paper's baseline)",
    ("deepen", "random-init"): "random init (same deeper architecture)",
    ("deepen", "net2net"): "Net2DeeperNet (identity layers, exact)",
}


def build_model(exp: Experiment, widths: dict | None = None):
    import torch.nn as nn

    w = dict(exp.widths, **(widths or {}))
    if exp.model == "cnn1d":            # input (N, 1, 40) -> pool -> 20 -> pool -> 10
        c, h = w["channels"], w["hidden"]
        return nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(c, c, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Flatten(), nn.Linear(c * 10, h), nn.ReLU(), nn.Linear(h, 10))
    if exp.model == "mlp":              # input (N, 40)
        h = w["hidden"]
        return nn.Sequential(nn.Linear(40, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    if exp.model == "cnn2d":            # input (N, 1, 8, 8) -> pool -> 4x4
        c1, c2, h = w["c1"], w["c2"], w["hidden"]
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, h), nn.ReLU(), nn.Linear(h, 10))
    raise ValueError(exp.model)


# --------------------------------------------------------------------------- data (numpy only in the parent)

def load_dataset(name: str, mnist1d_samples: int) -> dict:
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset   # make_dataset generates; no download

        args = get_dataset_args()
        args.num_samples = mnist1d_samples
        ds = make_dataset(args)
        return {"x_train": ds["x"].astype(np.float32), "y_train": ds["y"].astype(np.int64),
                "x_test": ds["x_test"].astype(np.float32), "y_test": ds["y_test"].astype(np.int64),
                "source": f"mnist1d.data.make_dataset(num_samples={mnist1d_samples}, seed={args.seed})"}
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)
        xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=0.25, random_state=0,
                                              stratify=d.target)
        return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte,
                "source": "sklearn.datasets.load_digits, /16, train_test_split(test_size=0.25, random_state=0)"}
    raise ValueError(name)


# --------------------------------------------------------------------------- torch helpers (workers only)

def tensors(data: dict, shape: tuple):
    import torch

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x.reshape((len(x),) + tuple(shape))))

    return (t(data["x_train"]), torch.from_numpy(data["y_train"]),
            t(data["x_test"]), torch.from_numpy(data["y_test"]))


def evaluate(model, x, y):
    """(accuracy, correct count, logits)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(x)
    correct = int((logits.argmax(1) == y).sum())
    return correct / len(y), correct, logits


SCHEDULES = ("constant", "cosine")


def lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate of update `step` (1-based) of `steps`: constant, or cosine decay from lr to 0."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
    raise ValueError(schedule)


def train(model, data, steps: int, lr: float, batch: int, eval_every: int, seed: int, schedule: str = "constant"):
    """Adam, cross-entropy, shuffled epochs (the order depends on `seed` only, so every
    student of a seed sees the same batches), learning rate `schedule` over the `steps`.
    Returns (steps, test accuracies)."""
    import torch
    import torch.nn.functional as F

    x_train, y_train, x_test, y_test = data
    order = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(y_train)
    perm, pos = None, n
    xs, accs = [0], [evaluate(model, x_test, y_test)[0]]
    for step in range(1, steps + 1):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=order), 0
        idx = perm[pos:pos + batch]
        pos += batch
        if schedule != "constant":
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, schedule)
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            xs.append(step)
            accs.append(evaluate(model, x_test, y_test)[0])
    return xs, accs


def export_onnx(model, shape: tuple):
    import onnx
    import torch

    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros((2,) + tuple(shape)),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def to_torch(proto):
    import onnx2torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnx2torch.convert(proto)


def reinitialise(module, seed: int):
    """Torch's default init for every parameter of an onnx2torch module (the random-init baseline)."""
    import torch

    torch.manual_seed(seed)
    covered = set()
    for sub in module.modules():
        if sub is not module and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
            covered.update(id(p) for p in sub.parameters(recurse=False))
    missing = [name for name, p in module.named_parameters() if id(p) not in covered]
    if missing:
        raise RuntimeError(f"random-init baseline: no reset_parameters for {missing}")
    return module


def deepen_layers(info: dict, rule: str) -> list[str]:
    ok = [layer for layer in info["layers"] if layer["deepen"]["ok"]]
    if rule == "all":
        return [layer["name"] for layer in ok]
    if rule == "last-conv+last-dense":
        convs = [layer["name"] for layer in ok if layer["op"] == "Conv"]
        dense = [layer["name"] for layer in ok if layer["op"] in ("Gemm", "MatMul")]
        return convs[-1:] + dense[-1:]
    raise ValueError(rule)


def widths_of(info: dict) -> dict:
    return {layer["name"]: layer["width"] for layer in info["layers"]}


# --------------------------------------------------------------------------- one (experiment, seed) job

#: Used only when onnx_net2net's own check (atol 1e-6, rtol 1e-5) rejects an exact rewrite of a trained model
#: for float32 rounding (the split fractions 1/c and random a_j are not exact in float32); the onnx2torch
#: round trip on the real test set below stays the assertion that matters.
RELAXED_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def grow(fn, proto, relaxed: list, tag: str, *args, **kwargs):
    """n2n.widen / n2n.deepen; on VerificationFailed retry once with RELAXED_TOLERANCE and record it."""
    import onnx_net2net as n2n

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(proto, *args, **kwargs)
        except n2n.VerificationFailed as exc:
            shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
            call = f"n2n.{fn.__name__}({', '.join(shown)})"
            log(f"{tag}: WARNING {call} raised VerificationFailed ({str(exc).splitlines()[0]}); "
                f"retrying with {RELAXED_TOLERANCE}")
            model, report = fn(proto, *args, **kwargs, **RELAXED_TOLERANCE)
            relaxed.append({"call": call, "error": str(exc).splitlines()[0], "tolerance": RELAXED_TOLERANCE,
                            "max_abs": report["verification"]["max_abs"], "max_rel": report["verification"]["max_rel"]})
            return model, report


def budget_of(exp: Experiment, settings: dict) -> Budget:
    budget = exp.quick if settings["quick"] else exp.full
    return Budget(settings.get("teacher_steps") or budget.teacher_steps,
                  settings.get("student_steps") or budget.student_steps, budget.eval_every)


def teacher_recipe(exp: Experiment, settings: dict) -> tuple[float, str]:
    """(learning rate, schedule) of the teacher: --teacher-lr / --teacher-schedule, else the experiment's own,
    else --lr and a constant rate."""
    return (settings.get("teacher_lr") or exp.teacher_lr or settings["lr"],
            settings.get("teacher_schedule") or exp.teacher_schedule)


def run_job(exp_name: str, seed: int, settings: dict, data_np: dict) -> dict:
    import torch

    import onnx_net2net as n2n

    torch.set_num_threads(settings["threads"])
    exp = EXPERIMENTS[exp_name]
    budget = budget_of(exp, settings)
    tag = f"{exp_name} seed {seed}"
    data = tensors(data_np, exp.input_shape)
    x_test, y_test = data[2], data[3]
    n_test = len(y_test)
    tolerance = int(math.floor(0.001 * n_test))          # "to 0.1%", in test samples
    lr, student_lr, batch = settings["lr"], settings["student_lr"], settings["batch"]
    teacher_lr, teacher_schedule = teacher_recipe(exp, settings)
    schedule = settings.get("schedule", "constant")
    result = {"seed": seed, "students": {"widen": {}, "deepen": {}}, "checks": []}

    # 1. teacher
    t = time.time()
    cache = None
    if settings.get("teacher_cache"):
        key = (f"{exp_name}_seed{seed}_steps{budget.teacher_steps}_lr{teacher_lr:g}"
               f"{'' if teacher_schedule == 'constant' else '_' + teacher_schedule}_batch{batch}"
               f"_n{len(data[1]) + n_test}_{'_'.join(f'{k}{v}' for k, v in exp.widths.items())}")
        cache = Path(settings["teacher_cache"]) / key
    onnx_path = Path(f"{cache}.onnx") if cache else None
    json_path = Path(f"{cache}.json") if cache else None
    if cache is not None and onnx_path.is_file() and json_path.is_file():
        import onnx

        proto = onnx.load(str(onnx_path))
        teacher = to_torch(proto)
        steps, accs = (json.loads(json_path.read_text())[k] for k in ("steps", "acc"))
        how = f"loaded from {onnx_path}"
    else:
        torch.manual_seed(seed)
        teacher = build_model(exp)
        steps, accs = train(teacher, data, budget.teacher_steps, teacher_lr, batch, budget.eval_every, seed,
                            teacher_schedule)
        proto = export_onnx(teacher, exp.input_shape)
        how = f"trained {budget.teacher_steps} steps (lr {teacher_lr:g}, {teacher_schedule})"
        if cache is not None:
            import onnx

            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(proto, str(onnx_path))
            json_path.write_text(json.dumps({"steps": steps, "acc": accs}))
    teacher_acc, teacher_correct, teacher_logits = evaluate(teacher, x_test, y_test)
    result["teacher"] = {"steps": steps, "acc": accs, "final_acc": teacher_acc, "lr": teacher_lr,
                         "schedule": teacher_schedule}
    log(f"{tag}: teacher {how}, test acc {teacher_acc:.4f} ({time.time() - t:.1f}s)")
    info = n2n.inspect(proto)
    result["teacher"]["widths"] = widths_of(info)

    # 2. growth
    after = deepen_layers(info, exp.deepen)
    relaxed = []
    grown = {
        ("widen", "net2net"): grow(n2n.widen, proto, relaxed, tag, factor=2.0, split="random", seed=seed),
        ("widen", "net2net-noise"): grow(n2n.widen, proto, relaxed, tag, factor=2.0, split="equal",
                                         noise=settings["noise"], seed=seed),
        ("widen", "random-pad"): grow(n2n.widen, proto, relaxed, tag, factor=2.0, init="random-pad", seed=seed),
        ("deepen", "net2net"): grow(n2n.deepen, proto, relaxed, tag, after, mode="auto", seed=seed),
    }
    result["verification_relaxed"] = relaxed
    wide_widths = widths_of(n2n.inspect(grown[("widen", "net2net")][0], trial=False))
    deep_report = grown[("deepen", "net2net")][1]
    result["growth"] = {
        "widen": {"widths": wide_widths, "call": "n2n.widen(model, factor=2.0, ...)",
                  "parameters": grown[("widen", "net2net")][1].get("parameters")},
        "deepen": {"after": after, "call": f"n2n.deepen(model, {after}, mode='auto')",
                   "inserted": [{k: v for k, v in layer.items() if k in ("after", "mode", "activation")}
                                for layer in deep_report.get("inserted", deep_report.get("changes", []))
                                if isinstance(layer, dict)]},
    }
    grew = ", ".join(f"{k} {v}->{wide_widths[k]}" for k, v in result["teacher"]["widths"].items()
                     if wide_widths.get(k) != v)
    log(f"{tag}: grown (widen {grew}; deepen after {after})")

    # 3. onnx2torch round trip, before training
    students = {}
    for (kind, name), (model_proto, report) in grown.items():
        module = to_torch(model_proto)
        acc, correct, logits = evaluate(module, x_test, y_test)
        exact = name == "net2net"
        check = {"growth": kind, "student": name, "exact": exact, "teacher_acc": teacher_acc, "step0_acc": acc,
                 "teacher_correct": teacher_correct, "step0_correct": correct,
                 "prediction_agreement": float((logits.argmax(1) == teacher_logits.argmax(1)).float().mean()),
                 "max_abs_logit_diff": float((logits - teacher_logits).abs().max()),
                 "onnxruntime_max_abs": (report.get("verification") or {}).get("max_abs")}
        # predictions that differ from the teacher's are only allowed on float ties (top-2 logit gap < 1e-4)
        top2 = teacher_logits.topk(2, dim=1).values
        flipped = logits.argmax(1) != teacher_logits.argmax(1)
        check["flipped_off_tie"] = int((flipped & ((top2[:, 0] - top2[:, 1]) >= 1e-4)).sum())
        result["checks"].append(check)
        if exact and (abs(correct - teacher_correct) > tolerance or check["flipped_off_tie"]):
            raise AssertionError(
                f"{tag}: {kind}/{name}: the grown model loaded with onnx2torch does not reproduce the teacher's test "
                f"accuracy ({acc:.4f} vs {teacher_acc:.4f}; max |logit diff| {check['max_abs_logit_diff']:.3g})")
        students[(kind, name)] = module
    for kind in ("widen", "deepen"):
        students[(kind, "random-init")] = reinitialise(to_torch(grown[(kind, "net2net")][0]), 1_000 + seed)
    log(f"{tag}: onnx2torch round trip ok (exact students reproduce the teacher's {teacher_correct}/{n_test})")

    # 4. training the students
    for kind, names in (("widen", WIDEN_STUDENTS), ("deepen", DEEPEN_STUDENTS)):
        for name in names:
            t = time.time()
            rate = settings.get("random_init_lr", lr) if name == "random-init" else student_lr
            steps, accs = train(students[(kind, name)], data, budget.student_steps, rate, batch, budget.eval_every,
                                seed, schedule)
            result["students"][kind][name] = {"steps": steps, "acc": accs, "lr": rate, "schedule": schedule}
            log(f"{tag}: {kind}/{name}: step0 {accs[0]:.4f} -> final {accs[-1]:.4f} "
                f"({budget.student_steps} steps, {time.time() - t:.1f}s)")
    return result


def _job(args):
    exp_name, seed, settings, data_np = args
    try:
        with no_network():
            return exp_name, seed, run_job(exp_name, seed, settings, data_np)
    except Exception as exc:  # noqa: BLE001 - report now, keep the other jobs going
        import traceback

        log(f"{exp_name} seed {seed}: FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return exp_name, seed, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


# --------------------------------------------------------------------------- summary

def first_reach(steps, accs, target, eps=1e-9):
    for s, a in zip(steps, accs):
        if a >= target - eps:
            return s
    return None


def last_quarter_gain(curve: dict) -> float:
    steps, accs = curve["steps"], curve["acc"]
    start = next(i for i, s in enumerate(steps) if s >= 0.75 * steps[-1])
    return float(accs[-1] - accs[start])


def summarise(exp_name: str, kind: str, runs: list[dict]) -> dict:
    """Summary figures for one experiment/growth kind, from the mean-over-seeds curves
    (and per seed, with each seed's own random-init target)."""
    names = WIDEN_STUDENTS if kind == "widen" else DEEPEN_STUDENTS
    steps = runs[0]["students"][kind]["random-init"]["steps"]
    mean = {n: np.mean([r["students"][kind][n]["acc"] for r in runs], axis=0) for n in names}
    teacher = float(np.mean([r["teacher"]["final_acc"] for r in runs]))
    target = float(mean["random-init"][-1])
    base_steps = first_reach(steps, mean["random-init"], target)
    out = {"teacher_acc": teacher, "target_acc": target, "target": "random-init student's final accuracy "
           "(mean over seeds)", "budget_steps": steps[-1], "seeds": [r["seed"] for r in runs], "students": {}}
    for n in names:
        reach = first_reach(steps, mean[n], target)
        per_seed = []
        for r in runs:
            own_target = r["students"][kind]["random-init"]["acc"][-1]
            own_base = first_reach(steps, r["students"][kind]["random-init"]["acc"], own_target)
            s = first_reach(steps, r["students"][kind][n]["acc"], own_target)
            per_seed.append({"seed": r["seed"], "target_acc": own_target, "steps_to_target": s,
                             "ratio": (s / own_base) if (s is not None and own_base) else None,
                             "step0_acc": r["students"][kind][n]["acc"][0],
                             "teacher_acc": r["teacher"]["final_acc"],
                             "final_acc": r["students"][kind][n]["acc"][-1]})
        # the same measure against shorter budgets: random-init's mean accuracy after 1/4, 1/2, 3/4 of the steps
        by_budget = []
        for frac in (0.25, 0.5, 0.75, 1.0):
            i = max(k for k, s in enumerate(steps) if s <= frac * steps[-1])
            goal = float(mean["random-init"][i])
            base = first_reach(steps[:i + 1], mean["random-init"][:i + 1], goal)
            hit = first_reach(steps, mean[n], goal)
            by_budget.append({"budget_steps": steps[i], "target_acc": goal, "steps_to_target": hit,
                              "random_init_steps": base, "ratio": (hit / base) if (hit is not None and base) else None})
        finals = [p["final_acc"] for p in per_seed]
        out["students"][n] = {
            "label": STUDENT_LABELS[(kind, n)],
            "net2net": n.startswith("net2net"),
            "exact": n == "net2net",
            "step0_acc": float(mean[n][0]),
            "step0_minus_teacher": float(mean[n][0]) - teacher,
            "max_abs_step0_minus_teacher": float(max(abs(p["step0_acc"] - p["teacher_acc"]) for p in per_seed)),
            "steps_to_target": reach,
            "ratio_to_random_init": (reach / base_steps) if (reach is not None and base_steps) else None,
            "final_acc": float(mean[n][-1]),
            "final_acc_std": float(np.std(finals)),
            "final_minus_random_init": float(mean[n][-1]) - target,
            "per_seed": per_seed,
            "by_budget": by_budget,
        }
    return out


SUMMARY_KEYS = ("experiment", "growth", "student", "net2net", "exact", "teacher_acc", "step0_acc",
                "step0_minus_teacher", "target_acc", "steps_to_target", "random_init_steps_to_target",
                "ratio_to_random_init", "final_acc", "final_acc_std", "budget_steps")


def summary_rows(experiments: dict) -> list[dict]:
    rows = []
    for exp_name, exp in experiments.items():
        for kind, growth in exp["growth"].items():
            s = growth["summary"]
            base = s["students"]["random-init"]["steps_to_target"]
            for n, st in s["students"].items():
                rows.append({"experiment": exp_name, "growth": kind, "student": n, "net2net": st["net2net"],
                             "exact": st["exact"], "teacher_acc": s["teacher_acc"], "step0_acc": st["step0_acc"],
                             "step0_minus_teacher": st["step0_minus_teacher"], "target_acc": s["target_acc"],
                             "steps_to_target": st["steps_to_target"], "random_init_steps_to_target": base,
                             "ratio_to_random_init": st["ratio_to_random_init"], "final_acc": st["final_acc"],
                             "final_acc_std": st["final_acc_std"], "budget_steps": s["budget_steps"]})
    return rows


def targets_met(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the summary (reported, not asserted)."""
    notes = []
    for r in rows:
        if not r["net2net"]:
            continue
        where = f"{r['experiment']}/{r['growth']}/{r['student']}"
        if abs(r["step0_minus_teacher"]) > 0.001:
            notes.append(f"{where}: step-0 accuracy {r['step0_acc']:.4f} differs from the teacher's "
                         f"{r['teacher_acc']:.4f} by more than 0.1%")
        ratio = r["ratio_to_random_init"]
        if ratio is None:
            notes.append(f"{where}: never reached the random-init student's final accuracy {r['target_acc']:.4f}")
        elif ratio > 1 / 3:
            notes.append(f"{where}: reached the random-init target in {r['steps_to_target']} steps, "
                         f"ratio {ratio:.2f} > 1/3")
        if r["final_acc"] < r["target_acc"] - 1e-9:
            notes.append(f"{where}: final accuracy {r['final_acc']:.4f} below random-init's {r['target_acc']:.4f}")
    return notes


def format_table(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| experiment | growth | student | teacher acc | step-0 acc | steps to random-init final "
             "(random-init) | ratio | final acc (± std) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"])
        ratio = "-" if r["ratio_to_random_init"] is None else f"{r['ratio_to_random_init']:.2f}"
        lines.append(f"| {r['experiment']} | {r['growth']} | {r['student']} | {pct(r['teacher_acc'])} | "
                     f"{pct(r['step0_acc'])} | {steps} ({r['random_init_steps_to_target']}) | {ratio} | "
                     f"{pct(r['final_acc'])} ± {100 * r['final_acc_std']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it (the JSON is committed), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


COLORS = {"random-init": "tab:gray", "net2net": "tab:blue", "net2net-noise": "tab:green", "random-pad": "tab:red"}


def plot(experiments: dict, out_dir: Path, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def panel(ax, exp, kind):
        growth = exp["growth"][kind]
        s = growth["summary"]
        mixed_lr = len({c[0].get("lr") for c in growth["students"].values()}) > 1
        for n, st in s["students"].items():
            curves = growth["students"][n]
            steps = np.array(curves[0]["steps"])
            accs = np.array([c["acc"] for c in curves]) * 100
            m = accs.mean(0)
            label = st["label"] + (f", lr {curves[0]['lr']:g}" if mixed_lr else "")
            ax.plot(steps, m, color=COLORS[n], label=label, lw=1.6)
            if len(curves) > 1:
                ax.fill_between(steps, accs.min(0), accs.max(0), color=COLORS[n], alpha=0.15, lw=0)
        ax.axhline(100 * s["teacher_acc"], color="black", ls="--", lw=1, label="teacher (final)")
        ax.axhline(100 * s["target_acc"], color="tab:gray", ls=":", lw=1, label="random-init final (target)")
        # zoom on the region that matters (teacher and targets); the baselines' first steps are cut off
        top = max(100 * s["teacher_acc"], max(100 * st["final_acc"] for st in s["students"].values()))
        bottom = min(100 * s["teacher_acc"] - 12, 100 * s["target_acc"] - 5)
        ax.set_ylim(max(0, bottom), min(100, top + 2))
        widths = exp["teacher"]["widths"]
        if kind == "widen":
            new = growth["widths"]
            desc = ", ".join(f"{widths[k]}->{new[k]}" for k in widths if new.get(k) != widths[k])
            title = f"{exp['title']}: Net2WiderNet ({desc})"
        else:
            title = f"{exp['title']}: Net2DeeperNet (+{len(growth['after'])} layers)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("student training steps")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")

    names = list(experiments)
    if len(names) > 1:
        written.append(_plot_all(plt, panel, experiments, names, out_dir, suffix))
    for exp_name in names:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
        for j, kind in enumerate(("widen", "deepen")):
            panel(axes[0][j], experiments[exp_name], kind)
        fig.tight_layout()
        path = out_dir / f"{exp_name}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(_shown(path))
    return written


def _plot_all(plt, panel, experiments: dict, names: list, out_dir: Path, suffix: str) -> str:
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 3.8 * len(names)), squeeze=False)
    for i, exp_name in enumerate(names):
        for j, kind in enumerate(("widen", "deepen")):
            panel(axes[i][j], experiments[exp_name], kind)
    first = next(iter(experiments.values()))
    seeds = len(first["teacher"]["curves"])
    curve = first["growth"]["widen"]["students"]["random-init"][0]
    recipe = f"Adam {curve['lr']:g}, {curve.get('schedule', 'constant')}"
    fig.suptitle(f"Net2Net with onnx_net2net: test accuracy vs student training steps ({recipe}; "
                 f"mean over {seeds} seed{'s' if seeds > 1 else ''}, shaded: min..max)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path = out_dir / f"net2net_all{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return _shown(path)


# --------------------------------------------------------------------------- main

def import_snapshot() -> dict:
    import importlib
    import pkgutil
    import subprocess

    for module in ("torch", "onnx", "onnxruntime", "onnx2torch", "onnx_net2net"):
        importlib.import_module(module)
    import onnx_net2net

    for info in pkgutil.walk_packages(onnx_net2net.__path__, "onnx_net2net."):
        if not info.name.endswith("__main__"):
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional part; the workers import what they use
                pass

    state = {"onnx_net2net": onnx_net2net.__version__}
    try:
        git = ["git", "-C", str(REPO)]
        state["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                         timeout=10).stdout.strip() or None
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "onnx_net2net"], capture_output=True, text=True,
                               timeout=10).stdout
        state["package_modified"] = [line[3:] for line in dirty.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, short budgets (under 2 minutes on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    p.add_argument("--json", type=Path, default=None,
                   help="results JSON (default docs/experiments/results.json, results_quick.json with --quick)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG plots (default %(default)s)")
    p.add_argument("--tag", default=None,
                   help="suffix for the output file names (default: none; 'quick' with --quick)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only redraw the plots of an earlier results JSON (into --out), then exit")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=None, help="run only these experiments")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="override every selected experiment's teacher budget")
    p.add_argument("--student-steps", type=int, default=None,
                   help="override every selected experiment's student budget")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="directory to keep trained teachers (ONNX + curve) and reuse them on reruns with the same "
                        "experiment, seed, steps, lr, batch and data size")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate of every student (and of the teachers of experiments without their own "
                        "teacher recipe) (default %(default)s)")
    p.add_argument("--student-lr", type=float, default=None,
                   help="Adam learning rate for the grown students (Net2Net, random pad); default --lr")
    p.add_argument("--random-init-lr", type=float, default=None,
                   help="Adam learning rate for the random-init students; default --lr")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="learning-rate schedule of every student, over the student budget (default %(default)s)")
    p.add_argument("--teacher-lr", type=float, default=None,
                   help="Adam learning rate of the teachers (default: each experiment's own, see EXPERIMENTS)")
    p.add_argument("--teacher-schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule of the teachers (default: each experiment's own)")
    p.add_argument("--noise", type=float, default=0.01,
                   help="relative noise for the 'net2net-noise' student (equal split + noise; default %(default)s)")
    p.add_argument("--batch", type=int, default=100, help="batch size (default %(default)s)")
    p.add_argument("--mnist1d-samples", type=int, default=None, help="MNIST-1D size (default 10000; 5000 with --quick)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one (experiment, seed) job each (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quick = args.quick
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    tag = args.tag if args.tag is not None else ("quick" if quick else "")
    suffix = f"_{tag}" if tag else ""
    json_path = args.json or (DEFAULT_OUT / f"results{suffix}.json")
    names = args.only or list(EXPERIMENTS)
    settings = {"quick": quick, "lr": args.lr, "student_lr": args.student_lr if args.student_lr else args.lr,
                "random_init_lr": args.random_init_lr if args.random_init_lr else args.lr,
                "schedule": args.schedule, "teacher_lr": args.teacher_lr, "teacher_schedule": args.teacher_schedule,
                "noise": args.noise, "batch": args.batch, "threads": args.threads,
                "teacher_steps": args.teacher_steps, "student_steps": args.student_steps,
                "teacher_cache": str(args.teacher_cache) if args.teacher_cache else None}
    mnist1d_samples = args.mnist1d_samples or (5000 if quick else 10000)
    if args.replot:
        previous = json.loads(args.replot.read_text())
        if args.tag is None and previous["meta"].get("quick"):
            suffix = "_quick"
        args.out.mkdir(parents=True, exist_ok=True)
        for pth in plot(previous["experiments"], args.out, suffix):
            log(f"wrote {pth}")
        return 0

    with no_network():
        datasets = {}
        for name in sorted({EXPERIMENTS[n].dataset for n in names}):
            t = time.time()
            datasets[name] = load_dataset(name, mnist1d_samples)
            log(f"dataset {name}: {len(datasets[name]['y_train'])} train / {len(datasets[name]['y_test'])} test "
                f"({time.time() - t:.1f}s)")

    # Import everything the workers use before forking them: each job then runs on the same snapshot of
    # onnx_net2net (the package may be edited while a long run goes on) and skips the imports.
    snapshot = import_snapshot()

    # Largest jobs first so that the workers finish together.
    cost = {n: budget_of(EXPERIMENTS[n], settings) for n in names}
    weight = {"cnn1d": 5.0, "cnn2d": 8.0, "mlp": 1.4}
    jobs = [(n, seed, settings, datasets[EXPERIMENTS[n].dataset]) for seed in range(seeds) for n in names]
    jobs.sort(key=lambda j: -weight[EXPERIMENTS[j[0]].model]
              * (cost[j[0]].teacher_steps + 6 * cost[j[0]].student_steps))
    log(f"{len(jobs)} jobs ({', '.join(names)} x {seeds} seed(s)) on {args.jobs} worker(s), "
        f"{settings['threads']} torch thread(s) each")
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # fork: the parent has done no torch work yet (numpy only), so forking is safe and skips re-imports.
        with mp.get_context("fork").Pool(min(args.jobs, len(jobs)), maxtasksperchild=1) as pool:
            done = pool.map(_job, jobs, chunksize=1)
    else:
        done = [_job(j) for j in jobs]

    errors = [{"experiment": e, "seed": seed, "error": r["error"], "traceback": r["traceback"]}
              for (e, seed, r) in done if "error" in r]
    experiments = {}
    for n in names:
        exp = EXPERIMENTS[n]
        runs = sorted([r for (e, _, r) in done if e == n and "error" not in r], key=lambda r: r["seed"])
        if not runs:
            continue
        budget = budget_of(exp, settings)
        entry = {"title": exp.title, "dataset": exp.dataset, "dataset_source": datasets[exp.dataset]["source"],
                 "model": exp.model, "budget": asdict(budget),
                 "teacher": {"widths": runs[0]["teacher"]["widths"], "constructor": exp.widths,
                             "steps": budget.teacher_steps, "lr": runs[0]["teacher"].get("lr"),
                             "schedule": runs[0]["teacher"].get("schedule"),
                             "acc_mean": float(np.mean([r["teacher"]["final_acc"] for r in runs])),
                             "acc_per_seed": [r["teacher"]["final_acc"] for r in runs],
                             # convergence check: test-accuracy gain over the last quarter of the teacher's steps
                             "gain_last_quarter": float(np.mean([last_quarter_gain(r["teacher"]) for r in runs])),
                             "curves": [{"seed": r["seed"], "steps": r["teacher"]["steps"], "acc": r["teacher"]["acc"]}
                                        for r in runs]},
                 "roundtrip_checks": [dict(c, seed=r["seed"]) for r in runs for c in r["checks"]],
                 "verification_relaxed": [dict(v, seed=r["seed"]) for r in runs for v in r["verification_relaxed"]],
                 "growth": {}}
        for kind in ("widen", "deepen"):
            growth = dict(runs[0]["growth"][kind])
            growth["students"] = {s: [{"seed": r["seed"], "steps": r["students"][kind][s]["steps"],
                                       "acc": r["students"][kind][s]["acc"], "lr": r["students"][kind][s]["lr"],
                                       "schedule": r["students"][kind][s].get("schedule", "constant")}
                                      for r in runs] for s in runs[0]["students"][kind]}
            entry["growth"][kind] = growth
            growth["summary"] = summarise(n, kind, runs)
        experiments[n] = entry

    rows = summary_rows(experiments)
    notes = targets_met(rows)
    import torch

    meta = {"quick": quick, "seeds": seeds, "settings": settings, "mnist1d_samples": mnist1d_samples,
            "runtime_s": round(time.time() - _T0, 1), "jobs": args.jobs, "package": snapshot,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "command": " ".join(["tools/reproduce_net2net.py"] + (argv if argv is not None else sys.argv[1:]))}
    out = {"meta": meta, "summary": rows, "summary_keys": list(SUMMARY_KEYS), "targets_not_met": notes,
           "errors": errors, "experiments": experiments}
    plots = []
    if not args.no_plots and experiments:
        args.out.mkdir(parents=True, exist_ok=True)
        plots = plot(experiments, args.out, suffix)
        for pth in plots:
            log(f"wrote {pth}")
    out["plots"] = plots
    out["meta"]["runtime_s"] = round(time.time() - _T0, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1))
    log(f"wrote {_shown(json_path)}")
    print(format_table(rows))
    if notes:
        print("\nTargets not met:\n" + "\n".join(f"- {n}" for n in notes))
    relaxed = [(n, v) for n, e in experiments.items() for v in e["verification_relaxed"]]
    if relaxed:
        print("\nonnx_net2net's verification rejected exact rewrites (float32 rounding; passed with "
              f"{RELAXED_TOLERANCE}):\n" + "\n".join(f"- {n} seed {v['seed']}: {v['call']}: {v['error']}"
                                                      for n, v in relaxed))
    for err in errors:
        print(f"\nFAILED: {err['experiment']} seed {err['seed']}: {err['error']}")
    log(f"done in {time.time() - _T0:.1f}s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
