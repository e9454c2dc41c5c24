#!/usr/bin/env python
"""Does a grown student beat a *tuned* random-init student? Net2Net with onnx_net2net, protocol v2.

Models (all data on every machine, generated or read offline; sockets are blocked while it runs):

* ``mnist1d-cnn``, ``mnist1d-mlp``: MNIST-1D (``mnist1d.data.make_dataset``, 20,000 samples generated with
  ``train_split=0.5``: 8,000 train, 2,000 validation, 10,000 test);
* ``digits-cnn``: scikit-learn's ``load_digits`` (8x8 images; 25 % test, 20 % of the rest validation);
* ``char-lm``: a character-level transformer language model (pre-norm, 2 blocks, d_model 64, 4 heads of
  16, fused QKV, MLP 4x, GELU, context 32) on the source of 24 modules of the running Python's standard
  library (``LM_FILES``), split 90/5/5 into train/validation/test; metric: bits per character.

For each model and seed:

1. train a teacher in PyTorch (its own fixed recipe), export it to ONNX (opset 17);
2. grow it with onnx_net2net (every rewrite checked in onnxruntime): ``n2n.widen(factor=2)`` (every hidden
   layer 2x wider; for the LM the residual stream 64 -> 128, heads 4 -> 8, MLP 256 -> 512) with
   ``split="random"`` (exact) and ``split="zero-sum"`` (exact, HyperCloning's +N/-N), and
   ``n2n.deepen`` (identity layers; for the LM ``mode="block"``: each block copied, output projections
   zeroed, 2 -> 4 blocks); each of these also with ``n2n.perturb(shrink=λ, fresh=p)`` on top (θ <- λθ +
   p·θ_fresh; by default the single point λ = 0.4, p = 0.1; ``--sp-grid`` gives several, see below);
3. load every grown model back into PyTorch with onnx2torch and assert that the exact ones reproduce the
   teacher's test metric at step 0;
4. train every arm with Adam, 5 % linear warmup then cosine decay to zero over the arm's own budget.

Arms and budgets (T: the budget of the random-init student of the grown architecture, ``Experiment.T``):

* widen:  ``random-init`` (T), ``random-init-T/3``, ``net2net`` (random split), ``zero-sum``,
  ``net2net+sp``, ``zero-sum+sp`` (shrink and perturb), all grown ones T/3; on request (``--arms``, see below)
  also ``fresh`` (``n2n.widen(factor=2, init="fresh", seed=seed)``: new units get PyTorch's default init for
  their incoming weights and bias and zero outgoing weights, the old units keep theirs; exact, checked at
  step 0 like the other exact arms) and ``fresh+sp`` (that model after shrink and perturb), T/3;
* deepen: ``random-init`` (T), ``random-init-T/3``, ``net2net``, ``net2net+sp`` (T/3);
* ``teacher+T/3``: the teacher itself trained T/3 more steps (a control: is the growth needed?).

Every arm's peak learning rate is chosen on the validation split (final metric, mean over the tuning seeds)
from the experiment's grid; then every seed is run at that rate and measured on the test split. For the
``+sp`` arms, ``--sp-grid`` (pairs ``λ:p``) makes (λ, p) a tuned knob too: the triple (λ, p, lr) with the best
mean final validation metric over the same tuning seeds is chosen (ties, within ``TIE``: the first in grid
order, λ:p pairs in the order given, then rates), never on test. This is a knob the random-init students do not have: they
tune the rate only. The chosen λ and p are recorded per arm (``shrink``, ``fresh``; null on other arms). The
random-init students are PyTorch's default initialisation of the student architecture (the onnx2torch
module's layers re-initialised by ``reset_parameters``; for the LM, a fresh model of the grown shape
exported and converted the same way).

onnx2torch keeps MatMul weights, LayerNormalization scales and other initializers as buffers: the script
turns every floating-point initializer except the attention mask into a trainable parameter
(``make_trainable``), a workaround on the model side, not in the tool.

Outputs (``--out``, default /tmp/net2net-experiment): ``results.json`` (every curve, every tuning run,
the checks), ``summary.json`` (one row per arm: experiment, growth, arm, lr, steps, steps_to_target,
target_steps, final_mean, final_sem, seeds; target = the tuned random-init student's final test metric at
T; ``shrink``, ``fresh``: the chosen shrink-and-perturb point of a ``+sp`` arm, else null), ``results.md``
(the table and the validation tuning tables) and PNG curves. Grown models and runs are cached in ``--out``
(per (λ, p) for the perturbed ones), so an interrupted run resumes and a wider grid reuses what exists.

``--tune-seeds N`` overrides the number of tuning seeds (every arm alike; the models' defaults: 2, the LM 1).
``--teacher-steps N`` grows from a teacher trained for N steps (its own complete schedule: 5 % warmup,
cosine to zero) instead of the model's default ("grow earlier": Ash & Adams, NeurIPS 2020, find warm starts
from less-trained networks generalise better); every other part of the protocol is unchanged. The teacher's
steps are never counted in the students' budget (T/3 is the student's alone, for every teacher length);
each row records ``teacher_steps`` (null for the random-init students, which do not use the teacher) so that
teacher + student steps can be read off. Such a teacher's grown models and the runs that depend on it
(grown arms, ``teacher+T/3``) are cached apart, in ``cache/<model>/teacher<N>/``; the random-init runs are
shared.

``--wd-grid`` makes decoupled weight decay (AdamW; 0, the default, is plain Adam) a knob tuned with the rate on
validation for *every* arm alike (random init included); for a +sp arm jointly with (λ, p). The chosen decay
is recorded per arm and row (``weight_decay``).

``--noise-grid`` makes the zero-sum split's noise scale (``n2n.widen(split="zero-sum", noise=S)``: the std of
the +N/-N noise relative to each consumer weight's std; exact for every S; default the single scale
``ZERO_SUM_NOISE``) a knob of the zero-sum arms (``zero-sum``, ``zero-sum+sp``), tuned on validation with the
rate (and the +sp point and weight decay); the chosen scale is recorded per arm and row (``noise``; null on the
other arms). Zero-sum models and runs of a non-default scale are cached with an ``_n<S>`` suffix.

``--student-steps N`` gives the grown students and the equal-budget controls (``random-init-T/3``,
``teacher+T/3``) N steps instead of T/3 (each on its own complete schedule); the target (random init at T)
is unchanged and, cached by step count, shared between runs of different N. Sweeping N draws the *budget
frontier*: the fewest student steps at which a grown arm reaches the target (``tools/budget_frontier.py``
runs the sweep and tabulates it). Arm names keep their ``T/3`` suffix; ``steps`` in every row is the truth.

``--arms`` restricts which arms run (``widen/net2net+sp``, or a whole growth: ``widen``); the random-init
student at T of every growth involved (the target; ``teacher+T/3`` is measured against the widen one) is
always added. The ``fresh`` arms (``OPT_IN_ARMS``) run only when named (``--arms widen/fresh widen/fresh+sp``),
never by default nor with a whole growth: the LM's widened residual stream passes its LayerNorms, for which
``init="fresh"`` is refused (fresh new units would change the statistics), and the default runs and their
committed tables stay as they were.

Usage::

    python tools/reproduce_net2net.py                        # everything (CPU time: docs/experiments/results.md)
    python tools/reproduce_net2net.py --only mnist1d-mlp     # one model
    python tools/reproduce_net2net.py --quick --out /tmp/q   # tiny budgets, 1 seed: ~1-2 minutes
    python tools/reproduce_net2net.py --only char-lm --budget 3000 --grid 0.003 0.001   # T and LR grid overridden
    python tools/reproduce_net2net.py --only mnist1d-cnn --arms widen --sp-grid 0.2:0.1 0.4:0.1 0.8:0.1
                                                             # widen arms only, (λ, p) tuned on validation
    python tools/reproduce_net2net.py --only mnist1d-cnn --arms widen --teacher-steps 2000
                                                             # grow from a teacher trained 2,000 steps
    python tools/reproduce_net2net.py --only mnist1d-cnn --arms widen/zero-sum --noise-grid 0.01 0.1 1
                                                             # the zero-sum noise scale tuned on validation
    python tools/reproduce_net2net.py --only mnist1d-cnn --arms widen/net2net --student-steps 2000
                                                             # students get 2,000 steps instead of T/3

Needs the experiment extras: torch, onnx2torch, mnist1d, scikit-learn, matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import socket
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("/tmp/net2net-experiment")
_T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def no_network():
    """The data are generated or read locally: make any connection attempt fail loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("reproduce_net2net: network access attempted; the experiments must run offline")

    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection
    socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection = saved


# --------------------------------------------------------------------------- experiments

#: The growth options (the recipe under test). SHRINK, FRESH: the default (single) shrink-and-perturb point.
ZERO_SUM_NOISE = 0.1
SHRINK, FRESH = 0.4, 0.1


@dataclass
class Experiment:
    name: str
    dataset: str              # "mnist1d", "digits" or "text"
    model: str                # "cnn1d", "mlp", "cnn2d", "charlm"
    title: str
    widths: dict              # teacher constructor kwargs
    deepen: str               # which layers get an identity layer ("all", "last-conv+last-dense", "blocks")
    teacher_steps: int
    teacher_lr: float
    T: int                    # budget of the random-init students; grown students get T // 3 (or student_steps)
    grid: tuple               # peak learning rates tried for every arm
    tune_seeds: int = 2
    seeds: int = 5
    batch: int = 100
    input_shape: tuple = ()
    metric: str = "acc"       # "acc" (higher is better) or "bpc" (lower is better)
    evals: int = 8            # test/validation evaluations per run (plus step 0)
    quick: dict = field(default_factory=dict)
    sp_grid: tuple = ((SHRINK, FRESH),)   # (shrink, fresh) points tried for the +sp arms
    teacher_tag: str = ""     # set when --teacher-steps differs from the default: the grown models' cache folder
    wd_grid: tuple = (0.0,)   # decoupled weight decays tried for every arm (0: plain Adam)
    noise_grid: tuple = (ZERO_SUM_NOISE,)   # zero-sum noise scales tried for the zero-sum arms
    student_steps: int | None = None   # the grown students' and controls' budget (None: T // 3)


EXPERIMENTS = {
    "mnist1d-mlp": Experiment(
        "mnist1d-mlp", "mnist1d", "mlp", "MNIST-1D, MLP (hidden 32 -> 64)", {"hidden": 32}, "all",
        10000, 1e-2, 3000, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), input_shape=(40,),
        quick={"teacher_steps": 600, "T": 240, "grid": (1e-2, 3e-2), "tune_seeds": 1, "seeds": 1, "evals": 3}),
    "mnist1d-cnn": Experiment(
        "mnist1d-cnn", "mnist1d", "cnn1d", "MNIST-1D, 1D CNN (8 -> 16 channels, hidden 32 -> 64)",
        {"channels": 8, "hidden": 32}, "last-conv+last-dense", 6000, 1e-2, 3000, (3e-3, 1e-2, 3e-2, 1e-1),
        input_shape=(1, 40),
        quick={"teacher_steps": 300, "T": 120, "grid": (1e-2, 3e-2), "tune_seeds": 1, "seeds": 1, "evals": 3}),
    "digits-cnn": Experiment(
        "digits-cnn", "digits", "cnn2d", "sklearn digits, 2D CNN (4/8 -> 8/16 channels, hidden 16 -> 32)",
        {"c1": 4, "c2": 8, "hidden": 16}, "last-conv+last-dense", 2000, 1e-2, 1500, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        input_shape=(1, 8, 8),
        quick={"teacher_steps": 200, "T": 90, "grid": (1e-2, 3e-2), "tune_seeds": 1, "seeds": 1, "evals": 3}),
    "char-lm": Experiment(
        "char-lm", "text", "charlm", "char-level transformer LM (d_model 64 -> 128; 2 -> 4 blocks)",
        {"d": 64, "heads": 4, "layers": 2, "ctx": 32}, "blocks", 2000, 3e-3, 900, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        tune_seeds=1, batch=16, metric="bpc", evals=6,
        quick={"teacher_steps": 60, "T": 30, "grid": (3e-3,), "tune_seeds": 1, "seeds": 1, "evals": 2}),
}

WIDEN_ARMS = ("random-init", "random-init-T/3", "net2net", "zero-sum", "net2net+sp", "zero-sum+sp", "fresh",
              "fresh+sp")
DEEPEN_ARMS = ("random-init", "random-init-T/3", "net2net", "net2net+sp")
ARMS = [("widen", a) for a in WIDEN_ARMS] + [("deepen", a) for a in DEEPEN_ARMS] + [("teacher", "teacher+T/3")]
#: Arms that run only when named in --arms (not by default, not with a whole growth).
OPT_IN_ARMS = (("widen", "fresh"), ("widen", "fresh+sp"))
LABELS = {"random-init": "random init, T", "random-init-T/3": "random init, T/3",
          "net2net": "Net2Net (exact)", "zero-sum": "Net2Net zero-sum split (exact)",
          "net2net+sp": "Net2Net + shrink-perturb", "zero-sum+sp": "zero-sum + shrink-perturb",
          "fresh": "fresh new units, zero outgoing (exact)", "fresh+sp": "fresh new units + shrink-perturb",
          "teacher+T/3": "teacher trained T/3 more"}
LM_FILES = ("argparse.py", "ast.py", "collections/__init__.py", "configparser.py", "csv.py", "dataclasses.py",
            "datetime.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py",
            "inspect.py", "json/decoder.py", "json/encoder.py", "pathlib.py", "pprint.py", "shutil.py",
            "string.py", "tarfile.py", "textwrap.py", "typing.py", "zipfile.py")
SUMMARY_KEYS = ("experiment", "growth", "arm", "lr", "steps", "steps_to_target", "target_steps", "final_mean",
                "final_sem", "seeds")


def settle(exp: Experiment, quick: bool) -> Experiment:
    return replace(exp, **exp.quick) if quick else exp


def short(exp: Experiment) -> int:
    """The budget of every arm but the random-init student at T: T // 3, or ``--student-steps``."""
    return exp.student_steps or exp.T // 3


def is_sp(arm: str) -> bool:
    return arm.endswith("+sp")


def sp_tag(sp) -> str:
    """File-name suffix of a shrink-and-perturb point: empty for the default one (the caches of earlier
    versions stay valid), else ``_s<shrink>_f<fresh>``."""
    if sp is None or tuple(sp) == (SHRINK, FRESH):
        return ""
    return f"_s{sp[0]:g}_f{sp[1]:g}"


def sp_key(sp) -> str:
    return f"{sp[0]:g}:{sp[1]:g}"


def is_zero_sum(arm: str) -> bool:
    """The arms grown with ``split="zero-sum"`` (with or without shrink and perturb): they have a noise scale."""
    return arm in ("zero-sum", "zero-sum+sp")


def noise_tag(noise) -> str:
    """File-name suffix of a zero-sum noise scale: empty for the default one (the caches of earlier versions
    stay valid), else ``_n<noise>``."""
    if noise is None or noise == ZERO_SUM_NOISE:
        return ""
    return f"_n{noise:g}"


# --------------------------------------------------------------------------- data (numpy)

def load_dataset(name: str) -> dict:
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset   # generates; no download

        args = get_dataset_args()
        args.num_samples, args.train_split = 20000, 0.5
        ds = make_dataset(args)
        x, y = ds["x"].astype(np.float32), ds["y"].astype(np.int64)
        return {"x_train": x[:8000], "y_train": y[:8000], "x_val": x[8000:], "y_val": y[8000:],
                "x_test": ds["x_test"].astype(np.float32), "y_test": ds["y_test"].astype(np.int64),
                "source": f"mnist1d.data.make_dataset(num_samples=20000, train_split=0.5, seed={args.seed}): "
                          "train[:8000] train, train[8000:] validation, x_test test"}
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)
        xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=0.25, random_state=0,
                                              stratify=d.target)
        xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=0.2, random_state=1, stratify=ytr)
        return {"x_train": xtr, "y_train": ytr, "x_val": xva, "y_val": yva, "x_test": xte, "y_test": yte,
                "source": "sklearn load_digits /16; test 25 % (random_state=0), validation 20 % of the rest (1)"}
    if name == "text":
        root = Path(sysconfig.get_paths()["stdlib"])
        text = "\n".join((root / f).read_text(encoding="utf-8", errors="replace") for f in LM_FILES)
        codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
        n = len(codes)
        a, b = int(n * 0.9), int(n * 0.95)
        return {"train": codes[:a], "val": codes[a:b], "test": codes[b:],
                "source": f"Python {platform.python_version()} stdlib ({root}): {', '.join(LM_FILES)}; "
                          f"{n} ASCII chars, 90/5/5 % train/validation/test"}
    raise ValueError(name)


# --------------------------------------------------------------------------- models (torch)

def build_model(exp: Experiment, overrides: dict | None = None):
    import torch.nn as nn

    w = dict(exp.widths, **(overrides or {}))
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
    if exp.model == "charlm":
        return char_lm(**w)
    raise ValueError(exp.model)


def char_lm(d: int, heads: int, layers: int, ctx: int, vocab: int = 128):
    """A GPT-style pre-norm transformer written with ops that both onnx_net2net and onnx2torch handle:
    fixed context (the causal mask is a constant, no Shape-dependent slicing), fused QKV cut by Split,
    head reshapes with constant shapes, LayerNormalization, erf GELU, untied output head."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out, self.act = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.GELU()
            self.register_buffer("mask", torch.triu(torch.full((ctx, ctx), -1e9), 1))

        def forward(self, x):
            dh = d // heads
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (t.reshape(-1, ctx, heads, dh).transpose(1, 2) for t in (q, k, v))
            att = torch.softmax(q @ k.transpose(2, 3) * (1.0 / math.sqrt(dh)) + self.mask, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(-1, ctx, d))
            return x + self.out(self.act(self.fc(self.ln2(x))))

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

        def forward(self, idx):
            return self.head(self.ln(self.blocks(self.tok(idx) + self.pos)))

    return CharLM()


def export_onnx(model, exp: Experiment):
    import onnx
    import torch

    model.eval()
    example = (torch.zeros((2, exp.widths["ctx"]), dtype=torch.int64) if exp.model == "charlm"
               else torch.zeros((2,) + tuple(exp.input_shape)))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def to_torch(proto):
    import onnx2torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_trainable(onnx2torch.convert(proto))


def make_trainable(module):
    """onnx2torch keeps initializers that are not Conv/Gemm weights (MatMul weights, embeddings, LayerNorm
    scales, the position table) as buffers: make every floating-point one a parameter, except constant
    attention masks (only 0 and <= -1e8)."""
    import torch

    holder = getattr(module, "initializers", None)
    if holder is None:
        return module
    for name, buffer in list(holder.named_buffers(recurse=False)):
        mask = bool(((buffer == 0) | (buffer <= -1e8)).all()) and bool((buffer <= -1e8).any())
        if buffer.is_floating_point() and buffer.ndim >= 1 and not mask:
            del holder._buffers[name]
            holder.register_parameter(name, torch.nn.Parameter(buffer.detach().clone()))
    return module


def reinitialise(module, seed: int):
    """Torch's default init for every parameter of an onnx2torch module (classification random-init)."""
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


# --------------------------------------------------------------------------- task: batches and metric

class Task:
    """Training batches (the same for every arm of a seed), and the metric on the validation/test split."""

    def __init__(self, exp: Experiment, data: dict):
        import torch

        self.exp, self.lm = exp, exp.model == "charlm"
        if self.lm:
            self.ctx = exp.widths["ctx"]
            self.text = {k: torch.from_numpy(data[k]) for k in ("train", "val", "test")}
            self.eval_windows = {k: self._windows(v, 256) for k, v in self.text.items() if k != "train"}
        else:
            shape = tuple(exp.input_shape)
            t = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in data if k.startswith(("x_", "y_"))}
            self.x = {s: t[f"x_{s}"].reshape((-1,) + shape) for s in ("train", "val", "test")}
            self.y = {s: t[f"y_{s}"] for s in ("train", "val", "test")}

    def _windows(self, codes, count: int):
        starts = np.linspace(0, len(codes) - self.ctx - 2, count).astype(np.int64)
        return self._gather(codes, starts)

    def _gather(self, codes, starts):
        import torch

        index = torch.as_tensor(starts)[:, None] + torch.arange(self.ctx + 1)[None]
        chunk = codes[index]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, seed: int):
        import torch

        order = torch.Generator().manual_seed(10_000 + seed)
        if self.lm:
            codes = self.text["train"]
            while True:
                starts = torch.randint(0, len(codes) - self.ctx - 1, (self.exp.batch,), generator=order)
                yield self._gather(codes, starts)
        n = len(self.y["train"])
        while True:
            perm = torch.randperm(n, generator=order)
            for pos in range(0, n - self.exp.batch + 1, self.exp.batch):
                idx = perm[pos:pos + self.exp.batch]
                yield self.x["train"][idx], self.y["train"][idx]

    def loss(self, model, x, y):
        import torch.nn.functional as F

        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def evaluate(self, model, split: str) -> float:
        """Accuracy, or bits per character."""
        import torch

        model.eval()
        with torch.no_grad():
            if self.lm:
                x, y = self.eval_windows[split]
                return float(self.loss(model, x, y)) / math.log(2)
            return float((model(self.x[split]).argmax(1) == self.y[split]).float().mean())

    def better(self, a: float, b: float, tie: float = 0.0) -> bool:
        """`a` better than `b` by more than `tie`."""
        return a < b - tie if self.exp.metric == "bpc" else a > b + tie


#: Validation scores closer than this are a tie (accuracies are float32 means: the same count of correct
#: answers on two seeds can differ in the 8th digit); a tie keeps the earlier candidate.
TIE = 1e-6


def lr_at(step: int, steps: int, peak: float, warmup: float = 0.05) -> float:
    """Update `step` (1-based) of `steps`: linear warmup over 5 % of the steps, then cosine decay to zero."""
    w = max(1, int(round(warmup * steps)))
    if step <= w:
        return peak * step / w
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def eval_points(steps: int, count: int) -> list[int]:
    return sorted({0} | {int(round(steps * k / count)) for k in range(1, count + 1)})


def train(model, task: Task, steps: int, peak: float, seed: int, evals: int, wd: float = 0.0) -> dict:
    """Adam over `steps` on the schedule of `lr_at` (AdamW with decoupled weight decay `wd` when `wd` > 0, on
    every parameter); validation and test metric at `eval_points`."""
    import torch

    opt = (torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=wd) if wd
           else torch.optim.Adam(model.parameters(), lr=peak))
    points = eval_points(steps, evals)
    curve = {"steps": [0], "val": [task.evaluate(model, "val")], "test": [task.evaluate(model, "test")]}
    batches = task.batches(seed)
    for step in range(1, steps + 1):
        x, y = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak)
        model.train()
        opt.zero_grad(set_to_none=True)
        task.loss(model, x, y).backward()
        opt.step()
        if step in points:
            curve["steps"].append(step)
            curve["val"].append(task.evaluate(model, "val"))
            curve["test"].append(task.evaluate(model, "test"))
    if not all(math.isfinite(v) for v in curve["val"]):
        curve["diverged"] = True
    return curve


# --------------------------------------------------------------------------- teachers and growth

RELAXED_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def grow(fn, proto, relaxed: list, *args, **kwargs):
    """An n2n rewrite; an exact one that fails onnx_net2net's default check (float32 rounding on a trained
    model) is retried once with RELAXED_TOLERANCE and recorded; the step-0 check below still applies."""
    import onnx_net2net as n2n

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(proto, *args, **kwargs)[0]
        except n2n.VerificationFailed as exc:
            relaxed.append({"call": fn.__name__, "kwargs": {k: str(v) for k, v in kwargs.items()},
                            "error": str(exc).splitlines()[0]})
            return fn(proto, *args, **kwargs, **RELAXED_TOLERANCE)[0]


def deepen_after(exp: Experiment, proto) -> tuple[list[str] | str, str]:
    import onnx_net2net as n2n

    if exp.deepen == "blocks":
        return "all", "block"
    ok = [layer for layer in n2n.inspect(proto)["layers"] if layer["deepen"]["ok"]]
    if exp.deepen == "all":
        return [layer["name"] for layer in ok], "auto"
    convs = [layer["name"] for layer in ok if layer["op"] == "Conv"]
    dense = [layer["name"] for layer in ok if layer["op"] in ("Gemm", "MatMul")]
    return convs[-1:] + dense[-1:], "auto"


class Lab:
    """Teachers, grown models and runs of one experiment, cached under `out`."""

    def __init__(self, exp: Experiment, data: dict, out: Path, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.exp, self.task, self.out = exp, Task(exp, data), out
        self.dir = out / "cache" / exp.name
        # what depends on the teacher (grown models, their runs, teacher+T/3) of a --teacher-steps teacher
        # lives in its own folder; the random-init students do not depend on it and stay shared
        self.grown_dir = self.dir / exp.teacher_tag if exp.teacher_tag else self.dir
        self.grown_dir.mkdir(parents=True, exist_ok=True)
        self.checks, self.relaxed, self.teachers, self.grown_models = [], [], {}, {}
        self.perturbed_models, self.zero_sum_models, self.fresh_models = {}, {}, {}

    # -- teachers ----------------------------------------------------------------
    def teacher(self, seed: int):
        import onnx
        import torch

        if seed in self.teachers:
            return self.teachers[seed]
        exp = self.exp
        path = self.dir / f"teacher_seed{seed}_{exp.teacher_steps}.onnx"
        if path.is_file():
            proto = onnx.load(str(path))
            curve = json.loads(path.with_suffix(".json").read_text())
        else:
            t = time.time()
            torch.manual_seed(seed)
            model = build_model(exp)
            curve = train(model, self.task, exp.teacher_steps, exp.teacher_lr, seed, 4)
            proto = export_onnx(model, exp)
            onnx.save(proto, str(path))
            path.with_suffix(".json").write_text(json.dumps(curve))
            log(f"{exp.name} seed {seed}: teacher {exp.teacher_steps} steps (lr {exp.teacher_lr:g}): test "
                f"{curve['test'][-1]:.4f} ({time.time() - t:.0f}s)")
        metric = self.task.evaluate(to_torch(proto), "test")
        self.teachers[seed] = (proto, metric, curve)
        return self.teachers[seed]

    # -- grown models ------------------------------------------------------------
    def grown(self, seed: int) -> dict:
        """{(growth, arm): ModelProto} of the exact grown students of a seed (cached), step 0 checked once."""
        import onnx

        import onnx_net2net as n2n

        if seed in self.grown_models:
            return self.grown_models[seed]
        names = [("widen", "net2net"), ("widen", "zero-sum"), ("deepen", "net2net")]
        paths = {key: self.grown_dir / f"seed{seed}_{key[0]}_{key[1]}.onnx" for key in names}
        proto, teacher_metric, _ = self.teacher(seed)
        if all(p.is_file() for p in paths.values()):
            models = {key: onnx.load(str(p)) for key, p in paths.items()}
        else:
            after, mode = deepen_after(self.exp, proto)
            models = {("widen", "net2net"): grow(n2n.widen, proto, self.relaxed, factor=2.0, split="random",
                                                 seed=seed),
                      ("widen", "zero-sum"): grow(n2n.widen, proto, self.relaxed, factor=2.0, split="zero-sum",
                                                  noise=ZERO_SUM_NOISE, seed=seed),
                      ("deepen", "net2net"): grow(n2n.deepen, proto, self.relaxed, after, mode=mode, seed=seed)}
            for key, p in paths.items():
                onnx.save(models[key], str(p))
        for key, model in models.items():
            self.check_step0(seed, key, model, teacher_metric)
        self.grown_models[seed] = models
        return models

    def zero_sum(self, seed: int, noise: float | None):
        """The zero-sum widened model of a seed at noise scale `noise` (``n2n.widen(split="zero-sum",
        noise=noise)``; exact whatever the scale). The default scale is the one of `grown`; the others are
        cached per scale (``seed<N>_widen_zero-sum_n<noise>.onnx``), step 0 checked once."""
        if noise is None or noise == ZERO_SUM_NOISE:
            return self.grown(seed)[("widen", "zero-sum")]
        return self._widened_once(seed, "zero-sum", noise_tag(noise), self.zero_sum_models, (seed, noise),
                                  dict(split="zero-sum", noise=noise), noise=noise)

    def fresh(self, seed: int):
        """The model widened with ``n2n.widen(factor=2, init="fresh", seed=seed)`` (exact: new units freshly
        initialised, their outgoing weights zero), cached as ``seed<N>_widen_fresh.onnx``, step 0 checked once."""
        return self._widened_once(seed, "fresh", "", self.fresh_models, seed, dict(init="fresh"))

    def _widened_once(self, seed: int, arm: str, tag: str, cache: dict, key, options: dict, **check):
        """``n2n.widen(factor=2, seed=seed, **options)`` of a seed's teacher: from `cache`, else from
        ``seed<N>_widen_<arm><tag>.onnx``, else grown and saved; its step 0 checked once."""
        import onnx

        import onnx_net2net as n2n

        if key in cache:
            return cache[key]
        path = self.grown_dir / f"seed{seed}_widen_{arm}{tag}.onnx"
        proto, teacher_metric, _ = self.teacher(seed)
        if path.is_file():
            model = onnx.load(str(path))
        else:
            model = grow(n2n.widen, proto, self.relaxed, factor=2.0, seed=seed, **options)
            onnx.save(model, str(path))
        self.check_step0(seed, ("widen", arm), model, teacher_metric, **check)
        cache[key] = model
        return model

    def perturbed(self, seed: int, growth: str, base: str, sp: tuple, noise: float | None = None):
        """The exact grown model `base` of a seed (for ``zero-sum``, at noise scale `noise`) after
        ``n2n.perturb(shrink=sp[0], fresh=sp[1], seed=seed)`` (the same fresh draw for every (λ, p) of a seed),
        cached per (noise, λ, p); step 0 recorded once."""
        import onnx

        import onnx_net2net as n2n

        noise = noise if is_zero_sum(base) else None
        key = (seed, growth, base, tuple(sp), noise)
        if key in self.perturbed_models:
            return self.perturbed_models[key]
        path = self.grown_dir / f"seed{seed}_{growth}_{base}{noise_tag(noise)}_sp{sp_tag(sp)}.onnx"
        if path.is_file():
            model = onnx.load(str(path))
        else:
            source = (self.zero_sum(seed, noise) if is_zero_sum(base) else self.fresh(seed) if base == "fresh"
                      else self.grown(seed)[(growth, base)])
            model = grow(n2n.perturb, source, self.relaxed, shrink=sp[0], fresh=sp[1], seed=seed)
            onnx.save(model, str(path))
        self.check_step0(seed, (growth, f"{base}+sp"), model, self.teacher(seed)[1], sp, noise)
        self.perturbed_models[key] = model
        return model

    def check_step0(self, seed: int, key: tuple, model, teacher_metric: float, sp=None, noise=None) -> None:
        exact = not is_sp(key[1])
        metric = self.task.evaluate(to_torch(model), "test")
        check = {"seed": seed, "growth": key[0], "arm": key[1], "exact": exact, "teacher": teacher_metric,
                 "step0": metric}
        if sp is not None:
            check.update(shrink=sp[0], fresh=sp[1])
        if noise is not None and noise != ZERO_SUM_NOISE:
            check.update(noise=noise)
        self.checks.append(check)
        if exact:
            tolerance = 1e-4 if self.exp.metric == "bpc" else 0.001 + 1e-9
            if abs(metric - teacher_metric) > tolerance:
                raise AssertionError(f"{self.exp.name} seed {seed}: {key}: the grown model loaded with onnx2torch "
                                     f"does not reproduce the teacher's test metric ({metric} vs {teacher_metric})")

    # -- students ----------------------------------------------------------------
    def student(self, growth: str, arm: str, seed: int, sp=None, noise=None):
        exp = self.exp
        if growth == "teacher":
            return to_torch(self.teacher(seed)[0])
        if is_sp(arm):
            return to_torch(self.perturbed(seed, growth, arm[:-len("+sp")], sp, noise))
        if is_zero_sum(arm):
            return to_torch(self.zero_sum(seed, noise))
        if arm == "fresh":
            return to_torch(self.fresh(seed))
        if not arm.startswith("random-init"):
            return to_torch(self.grown(seed)[(growth, arm)])
        if exp.model == "charlm":
            import torch

            torch.manual_seed(1_000 + seed)
            w = exp.widths
            shape = {"d": 2 * w["d"], "heads": 2 * w["heads"]} if growth == "widen" else {"layers": 2 * w["layers"]}
            return to_torch(export_onnx(build_model(exp, shape), exp))
        return reinitialise(to_torch(self.grown(seed)[(growth, "net2net")]), 1_000 + seed)

    def run(self, growth: str, arm: str, lr: float, seed: int, sp=None, wd: float = 0.0, noise=None) -> dict:
        """One training run (cached); `sp` (shrink, fresh) for the +sp arms; `wd` the weight decay; `noise` the
        zero-sum noise scale of a zero-sum arm (None: the default, ZERO_SUM_NOISE; ignored on other arms)."""
        exp = self.exp
        if is_sp(arm) and sp is None:
            raise ValueError(f"{growth}/{arm}: a shrink-and-perturb arm needs its (shrink, fresh)")
        sp = tuple(sp) if is_sp(arm) else None
        noise = (ZERO_SUM_NOISE if noise is None else noise) if is_zero_sum(arm) else None
        steps = exp.T if arm == "random-init" else short(exp)
        wd_tag = f"_wd{wd:g}" if wd else ""
        # both random-init arms train the same student: named alike, a run of N steps is shared between them
        model = "random-init" if arm.startswith("random-init") else arm.replace('/', '_').replace('+', '_')
        name = f"{growth}_{model}{noise_tag(noise)}{sp_tag(sp)}{wd_tag}_lr{lr:g}_seed{seed}_{steps}.json"
        path = (self.dir if arm.startswith("random-init") else self.grown_dir) / "runs" / name
        if path.is_file():
            return json.loads(path.read_text())
        t = time.time()
        curve = train(self.student(growth, arm, seed, sp, noise), self.task, steps, lr, seed, exp.evals, wd)
        curve.update(lr=lr, seed=seed, seconds=round(time.time() - t, 1))
        if wd:
            curve.update(weight_decay=wd)
        if noise_tag(noise):
            curve.update(noise=noise)
        if sp is not None:
            curve.update(shrink=sp[0], fresh=sp[1])
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(curve))
        point = ((f" noise {noise:g}" if noise_tag(noise) else "") + (f" shrink {sp[0]:g} fresh {sp[1]:g}" if sp
                                                                      else "") + (f" wd {wd:g}" if wd else ""))
        log(f"{exp.name} {growth}/{arm}{point} lr {lr:g} seed {seed}: {steps} steps, val {curve['val'][-1]:.4f} "
            f"test {curve['test'][-1]:.4f} ({curve['seconds']:.0f}s)")
        return curve

    def tune(self, growth: str, arm: str) -> tuple[float, tuple | None, float, float | None, dict]:
        """The peak rate, the weight decay of ``exp.wd_grid``, for a zero-sum arm the noise scale of
        ``exp.noise_grid`` and for a +sp arm the (shrink, fresh) point of ``exp.sp_grid``, with the best mean
        final validation metric over the tuning seeds (ties, within TIE of float32 rounding: the first in grid
        order, noise scales in the order given, then λ:p pairs, then weight decays, then rates).
        Returns (lr, sp or None, wd, noise or None, {(noise or None, sp or None, wd): {lr: validation}})."""
        points = [tuple(sp) for sp in self.exp.sp_grid] if is_sp(arm) else [None]
        noises = list(self.exp.noise_grid) if is_zero_sum(arm) else [None]
        table, best = {}, None
        for noise in noises:
            for sp in points:
                for wd in self.exp.wd_grid:
                    scores = table.setdefault((noise, sp, wd), {})
                    for lr in self.exp.grid:
                        finals = [self.run(growth, arm, lr, seed, sp, wd, noise)["val"][-1]
                                  for seed in range(self.exp.tune_seeds)]
                        scores[lr] = float(np.mean(finals)) if all(math.isfinite(f) for f in finals) else float("nan")
                        if math.isfinite(scores[lr]) and (best is None or
                                                          self.task.better(scores[lr], table[best[0]][best[1]], TIE)):
                            best = ((noise, sp, wd), lr)
        if best is None:
            raise RuntimeError(f"{self.exp.name} {growth}/{arm}: every tuning run diverged")
        (noise, sp, wd), lr = best
        return lr, sp, wd, noise, table


# --------------------------------------------------------------------------- summary

def sem(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def steps_to(steps, values, target: float, metric: str):
    for s, v in zip(steps, values):
        if (v <= target + 1e-12) if metric == "bpc" else (v >= target - 1e-12):
            return int(s)
    return None


def select_arms(selection=None) -> list[tuple[str, str]]:
    """The arms of `selection` (``growth/arm`` or a whole growth), in ARMS order, plus the random-init
    student at T of every growth involved (the target; the teacher arm is measured against widen's)."""
    if not selection:
        return [key for key in ARMS if key not in OPT_IN_ARMS]
    chosen = set()
    for item in selection:
        matched = [(g, a) for g, a in ARMS if item == f"{g}/{a}" or (item == g and (g, a) not in OPT_IN_ARMS)]
        if not matched:
            raise ValueError(f"unknown arm {item!r}: one of {', '.join(arm_choices())}")
        chosen.update(matched)
    for growth, _ in list(chosen):
        chosen.add(("widen" if growth == "teacher" else growth, "random-init"))
    return [key for key in ARMS if key in chosen]


def arm_choices() -> list[str]:
    return ["widen", "deepen", "teacher"] + [f"{g}/{a}" for g, a in ARMS]


def run_experiment(exp: Experiment, data: dict, out: Path, threads: int, selected=None) -> dict:
    selected = select_arms() if selected is None else selected
    lab = Lab(exp, data, out, threads)
    for seed in range(exp.seeds):
        lab.teacher(seed)
        lab.grown(seed)
    arms = {}
    for growth, arm in selected:
        noises = list(exp.noise_grid) if is_zero_sum(arm) else [None]
        for seed in range(exp.tune_seeds):   # the step-0 record of every grown model the runs use (cached runs
            for noise in noises:             # included)
                if is_sp(arm):
                    for point in exp.sp_grid:
                        lab.perturbed(seed, growth, arm[:-len("+sp")], tuple(point), noise)
                elif is_zero_sum(arm):
                    lab.zero_sum(seed, noise)
                elif arm == "fresh":
                    lab.fresh(seed)
        lr, sp, wd, noise, table = lab.tune(growth, arm)
        for seed in range(exp.seeds):
            if sp is not None:
                lab.perturbed(seed, growth, arm[:-len("+sp")], sp, noise)
            elif noise is not None:
                lab.zero_sum(seed, noise)
        curves = [lab.run(growth, arm, lr, seed, sp, wd, noise) for seed in range(exp.seeds)]
        entry = {"growth": growth, "arm": arm, "lr": lr, "shrink": sp[0] if sp else None,
                 "fresh": sp[1] if sp else None, "weight_decay": wd, "noise": noise,
                 "validation_by_lr": table[(noise, sp, wd)]}
        if sp is not None:   # at the chosen weight decay (and noise)
            entry["validation_by_sp"] = {sp_key(point): scores for (n, point, w), scores in table.items()
                                         if w == wd and n == noise}
        if len(exp.wd_grid) > 1:   # at the chosen (shrink, fresh) (and noise)
            entry["validation_by_wd"] = {f"{w:g}": scores for (n, point, w), scores in table.items()
                                         if point == sp and n == noise}
        several_noise = noise is not None and len(exp.noise_grid) > 1
        if several_noise:   # at the chosen (shrink, fresh) and weight decay
            entry["validation_by_noise"] = {f"{n:g}": scores for (n, point, w), scores in table.items()
                                            if point == sp and w == wd}
        if (len(exp.wd_grid) > 1 and sp is not None) or several_noise:   # every candidate
            entry["validation_grid"] = [
                {"shrink": point[0] if point else None, "fresh": point[1] if point else None, "weight_decay": w,
                 **({"noise": n} if several_noise else {}), "lr": x, "val": v}
                for (n, point, w), scores in table.items() for x, v in scores.items()]
        arms[f"{growth}/{arm}"] = entry | {"steps": curves[0]["steps"], "curves": curves}
        point = ((f", noise {noise:g}" if several_noise else "") + (f", shrink {sp[0]:g} fresh {sp[1]:g}" if sp
                                                                    else "") + (f", wd {wd:g}" if wd else ""))
        log(f"{exp.name} {growth}/{arm}: lr {lr:g}{point} (validation {entry.get('validation_by_sp', table[(noise, sp, wd)])}); "
            f"test {np.mean([c['test'][-1] for c in curves]):.4f}")
    teachers = [lab.teacher(seed)[1] for seed in range(exp.seeds)]
    return {"title": exp.title, "metric": exp.metric, "dataset": data["source"], "T": exp.T, "short": short(exp),
            "grid": list(exp.grid), "sp_grid": [list(sp) for sp in exp.sp_grid], "wd_grid": list(exp.wd_grid),
            "noise_grid": list(exp.noise_grid), "tune_seeds": exp.tune_seeds,
            "seeds": exp.seeds, "batch": exp.batch,
            "teacher": {"steps": exp.teacher_steps, "lr": exp.teacher_lr, "test": teachers,
                        "mean": float(np.mean(teachers)), "widths": exp.widths},
            "step0_checks": lab.checks, "verification_relaxed": lab.relaxed, "arms": arms,
            "rows": summary_rows(exp, arms)}


def summary_rows(exp: Experiment, arms: dict) -> list[dict]:
    rows = []
    targets = {}
    for growth in ("widen", "deepen"):
        base = arms.get(f"{growth}/random-init")
        if base is None:     # --arms without this growth
            continue
        mean = np.mean([c["test"] for c in base["curves"]], axis=0)
        targets[growth] = (float(mean[-1]), steps_to(base["steps"], mean, float(mean[-1]), exp.metric))
    if "widen" in targets:
        targets["teacher"] = targets["widen"]
    for key, entry in arms.items():
        growth = entry["growth"]
        target, target_steps = targets[growth]
        finals = [c["test"][-1] for c in entry["curves"]]
        mean = np.mean([c["test"] for c in entry["curves"]], axis=0)
        rows.append({"experiment": exp.name, "growth": growth, "arm": entry["arm"], "lr": entry["lr"],
                     "steps": entry["steps"][-1], "steps_to_target": steps_to(entry["steps"], mean, target, exp.metric),
                     "target_steps": target_steps, "final_mean": float(np.mean(finals)), "final_sem": sem(finals),
                     "seeds": len(finals), "target": target, "metric": exp.metric,
                     "step0_mean": float(mean[0]), "shrink": entry.get("shrink"), "fresh": entry.get("fresh"),
                     "teacher_steps": None if entry["arm"].startswith("random-init") else exp.teacher_steps,
                     "weight_decay": entry.get("weight_decay", 0.0), "noise": entry.get("noise")})
    return rows


def arm_label(row: dict) -> str:
    """The arm, with its zero-sum noise scale when not the default, its shrink-and-perturb point for a +sp arm
    and its weight decay when not 0."""
    extra = [f"noise {row['noise']:g}"] if noise_tag(row.get("noise")) else []
    extra += [] if row.get("shrink") is None else [f"{row['shrink']:g}/{row['fresh']:g}"]
    extra += [f"wd {row['weight_decay']:g}"] if row.get("weight_decay") else []
    return f"{row['arm']} ({', '.join(extra)})" if extra else row["arm"]


def format_table(rows: list[dict]) -> str:
    lines = ["| experiment | growth | arm | peak lr | steps | steps to target | target (random init, T) | "
             "final (mean +- sem) | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:   # a +sp arm's arm cell: "net2net+sp (shrink/fresh)"
        scale, unit = (1, " bpc") if r["metric"] == "bpc" else (100, " %")
        fmt = "{:.3f}" if r["metric"] == "bpc" else "{:.1f}"
        reach = "never" if r["steps_to_target"] is None else str(r["steps_to_target"])
        lines.append(f"| {r['experiment']} | {r['growth']} | {arm_label(r)} | {r['lr']:g} | {r['steps']} | {reach} | "
                     f"{fmt.format(r['target'] * scale)}{unit} | {fmt.format(r['final_mean'] * scale)} +- "
                     f"{fmt.format(r['final_sem'] * scale)}{unit} | {r['seeds']} |")
    return "\n".join(lines)


def format_details(experiments: dict) -> str:
    """Per model: data, teacher, T, and every arm's validation metric per peak rate (the tuning); a +sp arm
    has one line per shrink/fresh point tried, the chosen one marked."""
    parts = []
    for name, exp in experiments.items():
        scale, fmt = (1, "{:.3f}") if exp["metric"] == "bpc" else (100, "{:.2f}")   # choices differ by 0.05 %
        teacher = exp["teacher"]
        grid_points = exp.get("sp_grid") or [[SHRINK, FRESH]]
        several_wd = len(exp.get("wd_grid") or [0.0]) > 1
        several_noise = len(exp.get("noise_grid") or [ZERO_SUM_NOISE]) > 1
        parts.append(f"### {name}: {exp['title']}\n\n"
                     f"data: {exp['dataset']}\n\n"
                     f"teacher: {teacher['steps']} steps, Adam peak {teacher['lr']:g}, test "
                     f"{teacher['mean'] * scale:.{3 if exp['metric'] == 'bpc' else 1}f} "
                     f"(mean of {len(teacher['test'])}); T = {exp['T']}, "
                     f"grown students and controls {exp['short']} steps; batch {exp['batch']}; learning rate tuned on "
                     f"{exp['tune_seeds']} seed(s), reported on {exp['seeds']}; shrink/fresh points tried for "
                     f"the +sp arms: {', '.join(f'{a:g}/{b:g}' for a, b in grid_points)}"
                     f"{' (tuned on validation with the rate)' if len(grid_points) > 1 else ''}"
                     + (f"; weight decays tried for every arm (AdamW, tuned on validation with the rate): "
                        f"{', '.join(f'{w:g}' for w in exp['wd_grid'])}" if several_wd else "")
                     + (f"; zero-sum noise scales tried for the zero-sum arms (relative to each consumer weight's "
                        f"std, tuned on validation with the rate): {', '.join(f'{n:g}' for n in exp['noise_grid'])}"
                        if several_noise else "") + ".\n")
        grid = exp["grid"]
        lines = [f"| arm | shrink/fresh{', weight decay' if several_wd else ''}{', noise' if several_noise else ''} | "
                 + " | ".join(f"val @ {lr:g}" for lr in grid) + " | chosen lr |",
                 "|---|---|" + "---|" * (len(grid) + 1)]
        for key, entry in exp["arms"].items():
            candidates = tuning_candidates(entry)
            chosen = (sp_key((entry["shrink"], entry["fresh"])) if entry.get("shrink") is not None else "-",
                      entry.get("weight_decay", 0.0), entry.get("noise"))
            tables = []
            for (point, wd, noise), scores in candidates:
                label = (point.replace(":", "/") + (f", wd {wd:g}" if several_wd else "")
                         + (f", noise {noise:g}" if several_noise and noise is not None else ""))
                mark = (point, wd, noise) == chosen
                tables.append((label + (" (chosen)" if mark and len(candidates) > 1 else ""), scores, mark))
            for point, scores, chosen_row in tables:
                cells = []
                for lr in grid:
                    value = scores.get(str(lr), scores.get(lr))
                    cells.append("-" if value is None or not math.isfinite(value) else fmt.format(value * scale))
                lines.append(f"| {key} | {point} | " + " | ".join(cells) +
                             f" | {format(entry['lr'], 'g') if chosen_row else ''} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def tuning_candidates(entry: dict) -> list[tuple[tuple[str, float, float | None], dict]]:
    """An arm's validation tables: [((shrink/fresh key or "-", weight decay, noise or None), {lr: validation})]
    (noise: the arm's zero-sum noise scale; None on the other arms)."""
    wd, noise = entry.get("weight_decay", 0.0), entry.get("noise")
    sp = sp_key((entry["shrink"], entry["fresh"])) if entry.get("shrink") is not None else "-"
    if "validation_grid" in entry:
        grouped = {}
        for c in entry["validation_grid"]:
            point = sp_key((c["shrink"], c["fresh"])) if c.get("shrink") is not None else "-"
            grouped.setdefault((point, c["weight_decay"], c.get("noise", noise)), {})[c["lr"]] = c["val"]
        return list(grouped.items())
    if "validation_by_wd" in entry:
        return [((sp, float(w), noise), scores) for w, scores in entry["validation_by_wd"].items()]
    if "validation_by_sp" in entry:
        return [((point, wd, noise), scores) for point, scores in entry["validation_by_sp"].items()]
    return [((sp, wd, noise), entry["validation_by_lr"])]


def budget_label(label: str, exp: dict) -> str:
    """A label naming T/3, with the students' actual budget when ``--student-steps`` changed it."""
    return label if exp["short"] == exp["T"] // 3 else label.replace("T/3", f"{exp['short']} steps")


def plot(experiments: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = dict(zip(WIDEN_ARMS + ("teacher+T/3",), ("black", "tab:gray", "tab:blue", "tab:green", "tab:orange",
                                                      "tab:red", "tab:brown", "tab:pink", "tab:purple")))
    for name, exp in experiments.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        scale = 1 if exp["metric"] == "bpc" else 100
        for ax, growth in zip(axes, ("widen", "deepen")):
            for key, entry in exp["arms"].items():
                if entry["growth"] != growth and not (growth == "widen" and entry["growth"] == "teacher"):
                    continue
                values = np.array([c["test"] for c in entry["curves"]]) * scale
                m = values.mean(0)
                e = values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0 * m
                point = "" if entry.get("shrink") is None else f", {entry['shrink']:g}/{entry['fresh']:g}"
                point += f", wd {entry['weight_decay']:g}" if entry.get("weight_decay") else ""
                point += f", noise {entry['noise']:g}" if noise_tag(entry.get("noise")) else ""
                ax.plot(entry["steps"], m, color=colors[entry["arm"]], marker=".",
                        label=f"{budget_label(LABELS[entry['arm']], exp)} (lr {entry['lr']:g}{point})")
                ax.fill_between(entry["steps"], m - e, m + e, color=colors[entry["arm"]], alpha=0.2, lw=0)
            rows = [r for r in exp["rows"] if r["growth"] == growth]
            if not rows:      # --arms without this growth
                ax.set_axis_off()
                continue
            target = rows[0]["target"] * scale
            ax.axhline(target, color="black", ls=":", lw=1, label="target: random init at T")
            ax.axhline(exp["teacher"]["mean"] * scale, color="tab:purple", ls="--", lw=0.8, label="teacher")
            ax.axvline(exp["short"], color="tab:gray", ls="--", lw=0.8)
            finals = [r["final_mean"] * scale for r in exp["rows"]]
            if exp["metric"] == "bpc":
                ax.set_ylim(min(finals) - 0.1, max(finals) + 0.6)
                ax.set_ylabel("test bits per character (lower is better)")
            else:
                ax.set_ylim(min(finals) - 8, max(finals) + 2)
                ax.set_ylabel("test accuracy (%)")
            ax.set_xlabel("student training steps")
            ax.set_title(f"{exp['title']}: {'Net2WiderNet' if growth == 'widen' else 'Net2DeeperNet'}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"mean +- sem over {exp['seeds']} seeds; every arm at its own tuned peak lr, 5 % warmup, "
                     "cosine", fontsize=9)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


# --------------------------------------------------------------------------- main

def sp_point(text: str) -> tuple[float, float]:
    """``λ:p`` -> (shrink, fresh)."""
    try:
        shrink, fresh = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SHRINK:FRESH, e.g. 0.4:0.1") from None
    if not (math.isfinite(shrink) and math.isfinite(fresh)) or shrink < 0 or fresh < 0 or shrink + fresh == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: shrink and fresh must be >= 0, not both 0")
    return shrink, fresh


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 1-2 learning rates (a smoke test)")
    p.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=None, help="run only these models")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    p.add_argument("--grid", type=float, nargs="+", default=None, metavar="LR",
                   help="override the peak learning rates tried for every arm (the same grid for all arms)")
    p.add_argument("--tune-seeds", type=int, default=None, metavar="N",
                   help="override the number of seeds every arm's learning rate (and +sp point) is tuned on "
                        "(the same for all arms; at most --seeds)")
    p.add_argument("--teacher-steps", type=int, default=None, metavar="N",
                   help="train the teacher for N steps (its own complete warmup + cosine schedule) instead of "
                        "the model's default before growing ('grow earlier'); not counted in the students' "
                        "budget; the grown models and their runs are cached apart (cache/<model>/teacherN/)")
    p.add_argument("--wd-grid", type=float, nargs="+", default=[0.0], metavar="WD",
                   help="decoupled weight decays (AdamW; 0: plain Adam, the default) tuned with the learning rate "
                        "on validation for every arm alike, e.g. 0 0.01 0.1")
    p.add_argument("--student-steps", type=int, default=None, metavar="N",
                   help="give the grown students and the controls N steps instead of T/3 (each on its own complete "
                        "schedule, rates tuned as always): how long a grown student needs to reach the target, "
                        "against random init at the same budget; the arms keep their names (random-init-T/3 is "
                        "random init for N steps)")
    p.add_argument("--budget", type=int, default=None, metavar="T",
                   help="override T, the random-init students' budget (grown students get T/3), e.g. a longer "
                        "check of a model whose random-init student has not converged at its default T")
    p.add_argument("--sp-grid", type=sp_point, nargs="+", default=[(SHRINK, FRESH)], metavar="SHRINK:FRESH",
                   help="shrink-and-perturb points for the +sp arms (theta <- shrink*theta + fresh*theta_fresh), "
                        "tuned with the learning rate on the validation split (default: the single point "
                        f"{SHRINK:g}:{FRESH:g}), e.g. 0.2:0.1 0.4:0.1 0.6:0.1 0.8:0.1 0.4:0.3")
    p.add_argument("--noise-grid", type=float, nargs="+", default=None, metavar="S",
                   help="zero-sum noise scales (n2n.widen(split='zero-sum', noise=S): the std of the +N/-N noise "
                        "relative to each consumer weight's std; exact for every S) for the zero-sum arms, tuned "
                        "with the learning rate (and the +sp point and weight decay) on the validation split "
                        f"(default: the single scale {ZERO_SUM_NOISE:g}), e.g. 0.01 0.03 0.1 0.3 1")
    p.add_argument("--arms", nargs="+", default=None, choices=arm_choices(), metavar="ARM",
                   help="run only these arms (growth/arm, or a whole growth: widen, deepen, teacher); the "
                        "random-init student at T of each growth involved (the target) is always added. "
                        f"Choices: {', '.join(arm_choices())}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds {args.seeds}: must be at least 1")
    for flag, value in (("--tune-seeds", args.tune_seeds), ("--teacher-steps", args.teacher_steps),
                        ("--student-steps", args.student_steps)):
        if value is not None and value < 1:
            p.error(f"{flag} {value}: must be at least 1")
    if args.budget is not None and args.budget < 3:
        p.error(f"--budget {args.budget}: must be at least 3 (grown students get T/3 steps)")
    if args.grid is not None and not all(lr > 0 for lr in args.grid):
        p.error(f"--grid {' '.join(map(str, args.grid))}: learning rates must be positive")
    if not all(math.isfinite(wd) and wd >= 0 for wd in args.wd_grid):
        p.error(f"--wd-grid {' '.join(map(str, args.wd_grid))}: weight decays must be >= 0")
    if args.noise_grid is not None and not all(math.isfinite(n) and n > 0 for n in args.noise_grid):
        p.error(f"--noise-grid {' '.join(map(str, args.noise_grid))}: noise scales must be > 0")
    args.noise_grid = list(dict.fromkeys(float(n) for n in (args.noise_grid or [ZERO_SUM_NOISE])))
    args.sp_grid = list(dict.fromkeys(tuple(sp) for sp in args.sp_grid))   # duplicates dropped, order kept
    args.wd_grid = list(dict.fromkeys(float(wd) for wd in args.wd_grid))
    args.selected = select_arms(args.arms)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.only or list(EXPERIMENTS)
    args.out.mkdir(parents=True, exist_ok=True)
    results, errors, previous_order = {}, [], []
    previous = args.out / "results.json"
    if previous.is_file():   # keep the models finished by earlier invocations (runs are cached anyway)
        earlier = json.loads(previous.read_text())
        results = {k: v for k, v in earlier.get("experiments", {}).items() if k not in names}
        previous_order = list(earlier.get("experiments", {}))
        for exp in results.values():   # written before shrink/fresh were per arm: the meta's single point
            fill_sp(exp, earlier.get("meta", {}))
    for name in names:
        exp = settle(EXPERIMENTS[name], args.quick)
        if args.seeds:
            exp = replace(exp, seeds=args.seeds, tune_seeds=min(exp.tune_seeds, args.seeds))
        if args.tune_seeds is not None:
            exp = replace(exp, tune_seeds=min(args.tune_seeds, exp.seeds))
        if args.teacher_steps is not None and args.teacher_steps != exp.teacher_steps:
            exp = replace(exp, teacher_steps=args.teacher_steps, teacher_tag=f"teacher{args.teacher_steps}")
        if args.budget is not None:
            exp = replace(exp, T=args.budget)
        if args.student_steps is not None:
            exp = replace(exp, student_steps=args.student_steps)
        if args.grid:
            exp = replace(exp, grid=tuple(args.grid))
        exp = replace(exp, sp_grid=tuple(args.sp_grid), wd_grid=tuple(args.wd_grid),
                      noise_grid=tuple(args.noise_grid))
        try:
            with no_network():
                data = load_dataset(exp.dataset)
                results[name] = run_experiment(exp, data, args.out, args.threads, args.selected)
        except Exception as exc:  # noqa: BLE001 - report, keep the other models going
            import traceback

            log(f"{name}: FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            errors.append({"experiment": name, "error": f"{type(exc).__name__}: {exc}"})
        order = [*previous_order, *(k for k in EXPERIMENTS if k not in previous_order)]
        results = {k: results[k] for k in sorted(results, key=order.index)}   # the models keep their places
        write_outputs(results, errors, args, argv)
    return 1 if errors else 0


def fill_sp(exp: dict, meta: dict) -> None:
    """An experiment of a results.json written before (λ, p) were tuned: its +sp arms used the meta's single
    point; record it per arm and row like the current version does (and the teacher's steps and weight decay
    0 per row)."""
    point = (meta.get("shrink", SHRINK), meta.get("fresh", FRESH))
    exp.setdefault("sp_grid", [list(point)])
    for item in list(exp.get("arms", {}).values()) + exp.get("rows", []):
        if "shrink" not in item:
            sp = is_sp(item["arm"])
            item["shrink"], item["fresh"] = (point if sp else (None, None))
    for row in exp.get("rows", []):   # written before teacher_steps and weight_decay were recorded per row
        if "teacher_steps" not in row:
            row["teacher_steps"] = None if row["arm"].startswith("random-init") else exp["teacher"]["steps"]
        row.setdefault("weight_decay", 0.0)
    for item in list(exp.get("arms", {}).values()) + exp.get("rows", []):   # written before noise was tuned
        item.setdefault("noise", meta.get("zero_sum_noise", ZERO_SUM_NOISE) if is_zero_sum(item["arm"]) else None)


def write_outputs(results: dict, errors: list, args, argv) -> None:
    import torch

    rows = [r for exp in results.values() for r in exp["rows"]]
    meta = {"quick": args.quick, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "runtime_s": round(time.time() - _T0, 1),
            # shrink/fresh: the default point; the point each +sp arm used is in its row (``shrink``, ``fresh``)
            "zero_sum_noise": ZERO_SUM_NOISE, "shrink": SHRINK, "fresh": FRESH, "warmup": 0.05,
            "sp_grid": [list(sp) for sp in args.sp_grid], "wd_grid": list(args.wd_grid),
            "noise_grid": list(args.noise_grid), "arms": [f"{g}/{a}" for g, a in args.selected],
            "command": " ".join(["tools/reproduce_net2net.py"] + (argv if argv is not None else sys.argv[1:]))}
    plots = [] if args.no_plots or not results else plot(results, args.out)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "errors": errors,
                                                       "plots": plots, "experiments": results}, indent=1))
    (args.out / "summary.json").write_text(json.dumps([{k: r[k] for k in SUMMARY_KEYS} | {
        "target": r["target"], "metric": r["metric"], "shrink": r.get("shrink"), "fresh": r.get("fresh"),
        "teacher_steps": r.get("teacher_steps"), "weight_decay": r.get("weight_decay", 0.0), "noise": r.get("noise")}
        for r in rows], indent=1))
    table = format_table(rows)
    (args.out / "results.md").write_text(table + "\n\n" + format_details(results))
    print(table, flush=True)


if __name__ == "__main__":
    sys.exit(main())
