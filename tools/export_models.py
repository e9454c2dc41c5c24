#!/usr/bin/env python
"""Build the small example / test ONNX models under ``models/``.

Requirements
------------
The optional experiment dependencies (torch, torchvision, onnxscript,
scikit-learn, skl2onnx) on top of the core ones (onnx, onnxruntime)::

    pip install -e .[experiments]

Usage
-----
::

    python tools/export_models.py               # (re)export all models, then verify them
    python tools/export_models.py --check       # only verify the files already in models/
    python tools/export_models.py --only cnn mlp --out /tmp/models

Export then verify is the default.  ``--check`` writes nothing: it rebuilds
the seeded reference models in memory and compares them with the files on
disk, so it also catches stale files.

How the models are made
-----------------------
All weights are random but seeded (``torch.manual_seed`` per model; the
sklearn model uses ``random_state=0``), so a rerun gives the same weights and
the same files.  Nothing is trained, except the sklearn model (on
``sklearn.datasets.load_digits``, which ships with scikit-learn, so no
download is needed).

* PyTorch models (``cnn``, ``mlp``, ``resnet_block``, ``cnn1d``,
  ``dense_concat``) are exported with the legacy TorchScript exporter
  (``torch.onnx.export(..., dynamo=False)``), opset 17, one float input named
  ``input`` and one output named ``output``, batch dimension dynamic
  (``batch``) and every other dimension static.
* BatchNormalization: before export every BN layer gets a random affine
  scale/shift and is calibrated by a few train-mode forward passes on random
  data, so running mean/var are not the trivial 0/1.  The model is then put
  in eval mode and exported with ``training=TrainingMode.PRESERVE``: that
  skips the exporter's eval-mode peephole pass which folds Conv+BN, while the
  eval-mode aten op still makes a plain inference BatchNormalization node
  (one output; scale/bias/mean/var are constant initializers).
* The exporter shares identical initializers through ``Identity`` nodes; a
  small post-pass replaces such Identity-of-initializer nodes by the
  initializer itself (there are none with random BN parameters, but the
  pass keeps the graphs free of them regardless).
* ``sklearn_mlp`` is ``MLPClassifier(hidden_layer_sizes=(32, 16),
  activation='relu', max_iter=200, random_state=0)`` fitted on the raw
  (unscaled, 0..16) load_digits pixels, converted with skl2onnx
  ``convert_sklearn`` (``FloatTensorType([None, 64])`` named
  ``float_input``, ``zipmap=False``, ``target_opset=17``).  skl2onnx picks
  the lowest opset its ops need (16), so the default domain is then raised
  to 17 with ``onnx.version_converter`` (no node changes).  Its input/output
  names are whatever skl2onnx produces (``float_input`` ->
  ``label``, ``probabilities``).

Verification (for each model): ``onnx.checker.check_model(full_check=True)``,
the interface (names, opset, dynamic batch / static other dims), that BN nodes
are single-output with initializer parameters where expected, and that
onnxruntime (CPUExecutionProvider) on random inputs (batch 1 and 3) matches
torch eval output to 1e-5 max abs diff (sklearn ``predict_proba`` to 1e-4,
and ``predict`` exactly).  One line per model is printed: name, size in KB and
the node op histogram.
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models"
OPSET = 17
TORCH_ATOL = 1e-5
SKLEARN_ATOL = 1e-4
MAX_BYTES = 1 << 20  # hard limit; the models are all far below this


# --------------------------------------------------------------------------
# PyTorch model definitions
# --------------------------------------------------------------------------

def _torch():
    import torch  # imported lazily so that --help works without torch

    return torch


def build_cnn():
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def build_mlp():
    nn = _torch().nn
    return nn.Sequential(
        nn.Linear(64, 48),
        nn.ReLU(),
        nn.Linear(48, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def build_cnn1d():
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 40, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def build_resnet_block():
    torch = _torch()
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(cout),
                )
            else:
                self.shortcut = nn.Identity()

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.shortcut(x))

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
            )
            self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
            self.layer2 = BasicBlock(16, 32, stride=2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            return self.fc(self.flatten(self.pool(x)))

    return TinyResNet()


def build_dense_concat():
    torch = _torch()
    nn = torch.nn

    class DenseLayer(nn.Module):
        def __init__(self, cin: int, growth: int = 4):
            super().__init__()
            self.conv = nn.Conv2d(cin, growth, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return torch.cat([x, self.relu(self.conv(x))], dim=1)

    class TinyDenseNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.dense1 = DenseLayer(8)    # 8  -> 12 channels
            self.dense2 = DenseLayer(12)   # 12 -> 16 channels
            self.transition = nn.Conv2d(16, 8, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.dense2(self.dense1(self.stem(x)))
            return self.fc(self.flatten(self.pool(self.transition(x))))

    return TinyDenseNet()


@dataclass(frozen=True)
class TorchSpec:
    name: str
    build: Callable
    input_shape: tuple  # without the batch dimension
    seed: int
    n_batchnorm: int  # expected BatchNormalization nodes in the ONNX graph


TORCH_MODELS = [
    TorchSpec("cnn", build_cnn, (1, 16, 16), 0, 2),
    TorchSpec("mlp", build_mlp, (64,), 1, 0),
    TorchSpec("resnet_block", build_resnet_block, (3, 16, 16), 2, 8),
    TorchSpec("cnn1d", build_cnn1d, (1, 40), 3, 0),
    TorchSpec("dense_concat", build_dense_concat, (3, 8, 8), 4, 0),
]
SKLEARN_NAME = "sklearn_mlp"
ALL_NAMES = [s.name for s in TORCH_MODELS] + [SKLEARN_NAME]


def make_torch_model(spec: TorchSpec):
    """Build the seeded model, calibrate its BN layers, return it in eval mode."""
    torch = _torch()
    torch.manual_seed(spec.seed)
    model = spec.build()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            # Non-trivial affine parameters (default init is weight=1, bias=0).
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
        if bns:
            # Calibrate running stats with a few train-mode passes; momentum=None
            # gives an exact cumulative average over the passes.
            saved = [bn.momentum for bn in bns]
            for bn in bns:
                bn.momentum = None
                bn.reset_running_stats()
            model.train()
            for _ in range(8):
                # Shifted/scaled input so the statistics are clearly not 0/1.
                model(torch.randn(16, *spec.input_shape) * 1.5 + 0.3)
            for bn, m in zip(bns, saved):
                bn.momentum = m
    model.eval()
    return model


def _inline_initializer_identities(model: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a direct use of the initializer."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    rename = {}
    keep = []
    for node in g.node:
        if (node.op_type == "Identity" and node.input[0] in inits
                and node.output[0] not in graph_outputs):
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not rename:
        return
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    used = {n for node in g.node for n in node.input}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)


def export_torch(spec: TorchSpec) -> onnx.ModelProto:
    torch = _torch()
    model = make_torch_model(spec)
    dummy = torch.randn(1, *spec.input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            input_names=["input"],
            output_names=["output"],
            opset_version=OPSET,
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            # PRESERVE (with the model in eval mode) skips the eval peephole
            # pass that folds BatchNormalization into the preceding Conv.
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    _inline_initializer_identities(proto)
    proto.doc_string = (
        f"onnx_net2net example model '{spec.name}': PyTorch {torch.__version__}, "
        f"legacy exporter, opset {OPSET}, torch.manual_seed({spec.seed}); "
        "regenerate with tools/export_models.py"
    )
    return proto


def torch_reference(spec: TorchSpec, x: np.ndarray) -> np.ndarray:
    torch = _torch()
    model = make_torch_model(spec)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------
# scikit-learn model
# --------------------------------------------------------------------------

def make_sklearn_model():
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), activation="relu",
                        max_iter=200, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    return clf, X


def export_sklearn() -> onnx.ModelProto:
    import skl2onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf, _ = make_sklearn_model()
    proto = convert_sklearn(
        clf,
        initial_types=[("float_input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset=OPSET,
    )
    # skl2onnx emits the lowest opset its ops need (16 here) even when asked
    # for 17; bump the default domain to 17 so all models share one opset.
    ops_before = [n.op_type for n in proto.graph.node]
    if any(o.domain in ("", "ai.onnx") and o.version < OPSET for o in proto.opset_import):
        proto = onnx.version_converter.convert_version(proto, OPSET)
    assert [n.op_type for n in proto.graph.node] == ops_before
    proto.graph.name = SKLEARN_NAME  # skl2onnx uses a random uuid; keep files reproducible
    proto.doc_string = (
        "onnx_net2net example model 'sklearn_mlp': scikit-learn MLPClassifier"
        "(hidden_layer_sizes=(32, 16), relu, max_iter=200, random_state=0) on "
        f"load_digits, skl2onnx {skl2onnx.__version__}, opset {OPSET}; "
        "regenerate with tools/export_models.py"
    )
    return proto


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------

def op_histogram(model: onnx.ModelProto) -> str:
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return " ".join(f"{op}:{c}" for op, c in sorted(counts.items()))


def _dims(value_info) -> list:
    return [d.dim_param if d.HasField("dim_param") else
            (d.dim_value if d.HasField("dim_value") else None)
            for d in value_info.type.tensor_type.shape.dim]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_common(path: Path) -> onnx.ModelProto:
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path} is {size} bytes"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    default_opset = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default_opset == [OPSET], f"opset {default_opset}"
    return model


def check_torch(spec: TorchSpec, path: Path) -> onnx.ModelProto:
    model = _check_common(path)
    g = model.graph
    init_names = {t.name for t in g.initializer}
    assert [i.name for i in g.input] == ["input"], [i.name for i in g.input]
    assert [o.name for o in g.output] == ["output"], [o.name for o in g.output]
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims, out_dims = _dims(g.input[0]), _dims(g.output[0])
    assert in_dims == ["batch", *spec.input_shape], in_dims
    assert out_dims == ["batch", 10], out_dims
    bns = [n for n in g.node if n.op_type == "BatchNormalization"]
    assert len(bns) == spec.n_batchnorm, f"{len(bns)} BN nodes, want {spec.n_batchnorm}"
    for bn in bns:
        assert len(bn.output) == 1, f"BN {bn.name} has training outputs {list(bn.output)}"
        assert all(p in init_names for p in bn.input[1:5]), f"BN {bn.name}: {list(bn.input)}"
        attrs = {a.name for a in bn.attribute}
        assert "training_mode" not in attrs or onnx.helper.get_attribute_value(
            next(a for a in bn.attribute if a.name == "training_mode")) == 0
    if bns:
        # Running stats must be non-trivial (not the 0/1 defaults).
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
        for bn in bns:
            mean, var = inits[bn.input[3]], inits[bn.input[4]]
            assert np.abs(mean).max() > 1e-3 and np.abs(var - 1).max() > 1e-3, bn.name
    assert not any(n.op_type == "Identity" for n in g.node), "leftover Identity nodes"

    sess = _session(path)
    rng = np.random.default_rng(1234 + spec.seed)
    for batch in (1, 3):
        x = rng.standard_normal((batch, *spec.input_shape)).astype(np.float32)
        (got,) = sess.run(["output"], {"input": x})
        want = torch_reference(spec, x)
        diff = float(np.abs(got - want).max())
        assert got.shape == want.shape and diff < TORCH_ATOL, (
            f"{spec.name}: onnxruntime vs torch max abs diff {diff:g} (batch {batch})")
    return model


def check_sklearn(path: Path) -> onnx.ModelProto:
    model = _check_common(path)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Add", "Relu"} <= ops, ops
    clf, X = make_sklearn_model()
    sess = _session(path)
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    assert out_names == ["label", "probabilities"], out_names
    rng = np.random.default_rng(99)
    rand = rng.uniform(0, 16, size=(5, 64)).astype(np.float32)
    for x in (X[:50], rand):
        label, proba = sess.run(out_names, {in_name: x})
        diff = float(np.abs(proba - clf.predict_proba(x)).max())
        assert diff < SKLEARN_ATOL, f"sklearn_mlp: predict_proba max abs diff {diff:g}"
        # Labels must match except where the top-2 probabilities are (nearly) tied.
        want = clf.predict(x)
        top2 = np.sort(clf.predict_proba(x), axis=1)[:, -2:]
        mismatch = (label != want) & (top2[:, 1] - top2[:, 0] > 1e-4)
        assert not mismatch.any(), f"sklearn_mlp: labels differ {label} vs {want}"
    return model


def report(name: str, path: Path, model: onnx.ModelProto) -> None:
    ins = ",".join(i.name for i in model.graph.input)
    outs = ",".join(o.name for o in model.graph.output)
    kb = path.stat().st_size / 1024
    print(f"{name:<14} {kb:7.1f} KB  in={ins} out={outs}  ops: {op_histogram(model)}")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output folder (default: models/ in the repository)")
    ap.add_argument("--only", nargs="+", choices=ALL_NAMES, metavar="NAME",
                    help=f"restrict to these models ({', '.join(ALL_NAMES)})")
    ap.add_argument("--check", action="store_true",
                    help="only verify the existing files, write nothing")
    args = ap.parse_args(argv)

    names = args.only or ALL_NAMES
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in names:
        path = args.out / f"{name}.onnx"
        try:
            if not args.check:
                proto = export_sklearn() if name == SKLEARN_NAME else export_torch(
                    next(s for s in TORCH_MODELS if s.name == name))
                onnx.save(proto, str(path))
            if not path.exists():
                raise FileNotFoundError(path)
            if name == SKLEARN_NAME:
                model = check_sklearn(path)
            else:
                model = check_torch(next(s for s in TORCH_MODELS if s.name == name), path)
            report(name, path, model)
        except Exception as exc:  # report every model, fail at the end
            failures += 1
            print(f"{name:<14} FAILED: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
