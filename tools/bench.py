#!/usr/bin/env python
"""Benchmark the onnx_net2net CLI against the cost of just reading and writing the model.

The benchmark builds its own models (seeded) in ``--workdir`` (default
``/tmp/onnx_net2net_bench``):

* ``mlp:GB``      a deep MLP of about GB gigabytes, fp32, weights inline
                  (Gemm with transB=1, bias, Relu), e.g. ``mlp:0.5``;
* ``mlp:LxH``     L Gemm layers of H x H, inline, e.g. ``mlp:8x4096`` (few large
                  layers, 537 MB: the grown group is 25 % of the weights) and
                  ``mlp:30x2048`` (many small layers, 503 MB: 7 %);
* ``mlp-ext:GB``  MatMul + Add + Relu layers, every weight in one external
                  data file, e.g. ``mlp-ext:3`` (45 x 4096 x 4096, 2.8 GB);
* ``stream-ext:GB`` a residual MLP (blocks s + W2 relu(W1 s), external data):
                  widening its stream changes every weight, so region
                  verification runs block by block, e.g. ``stream-ext:1``;
* ``llama:N``     Hugging Face LLaMA with N layers (hidden 64, random weights),
                  exported by torch.onnx's dynamo exporter: 135 nodes at N=2,
                  ~1,750 at N=32 (needs torch + transformers; skipped without);
* ``shufflenet``  torchvision shufflenet_v2_x0_5, random weights (channel
                  shuffles: routing regions, many trial widths);
* ``cnn``         a small ResNet-style CNN, inline;
* ``repo:FILE:LAYER=WIDTH``  a model shipped in ``models/``; aliases
                  ``repo-cnn`` and ``repo-sklearn``.

Every measurement runs in its own subprocess; wall time is taken around the
process, CPU time and peak RSS from ``os.wait4`` (the child's ``ru_maxrss``).
Each model's cases run once per *round*, ``--repeat`` rounds: every case's
run sits next to the floor's run of the same round, so ratios are paired and
reported as the median over rounds with their min-max spread.

Cases:

* ``floor:io``     ``onnx.load`` + ``onnx.save`` of the same model (external
                   data loaded and saved as external data for such models);
* MLPs: ``widen --no-verify``, ``widen --verify full``, ``widen --verify region``
  on a middle layer (1.5x); ``--all-cases`` adds ``floor:ort``, ``startup``,
  ``deepen`` and ``deepen --no-verify`` (the issue-6 set);
* LLaMA: ``inspect --no-trial``; ShuffleNet: ``inspect --no-trial`` and ``inspect``.

Outputs are checked (exit code, ``onnx.checker.check_model(path)``, external
data present when expected) and deleted right after each run.

Targets (issue 17), evaluated on the medians and printed after the table:

* inline MLPs, ``widen --no-verify``: wall <= 1.2x floor:io, peak RSS <= 1.5x model;
* external-data MLP, ``widen --verify region``: wall <= 1.5x ``widen --no-verify``,
  peak RSS < 0.5x model;
* ``inspect --no-trial`` on the largest ``llama:N`` <= 1.5x the smallest;
* ShuffleNet ``inspect`` (with trials) < 3 s.

Usage::

    python tools/bench.py                       # the issue-17 matrix (~30-40 min under load, ~9 GB disk)
    python tools/bench.py --quick               # tiny models: a smoke test
    python tools/bench.py --models mlp:8x4096 llama:2 llama:32 --repeat 5 --json /tmp/bench.json
    python tools/bench.py --quick --profile     # also cProfile widen --no-verify, top functions

Models are cached in the workdir (named by their parameters) and reused by the
next run; ``--clean`` deletes them at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ["mlp:8x4096", "mlp:30x2048", "mlp-ext:3", "llama:2", "llama:32", "shufflenet"]
QUICK_MODELS = ["mlp:0.004", "mlp-ext:0.02", "repo-cnn"]  # run once each (--quick implies --repeat 1)
#: MLPs above this are written with external data whatever their kind says.
EXTERNAL_ABOVE = 1_800_000_000
GB = 1e9
SMALL_MODEL_BYTES = 64 << 20
MB = 1 << 20

# ----------------------------------------------------------------------------
# Model generation


@dataclass
class BenchModel:
    """A generated model and what to grow in it."""

    name: str
    kind: str
    path: Path
    external: bool
    layer: str            # layer to widen / deepen after
    width: int            # new width
    old_width: int
    size_bytes: int = 0   # model file + its data file
    params: dict = field(default_factory=dict)

    def files(self) -> list[Path]:
        return [self.path] + ([data_path(self.path)] if self.external else [])


def data_path(model: Path) -> Path:
    return model.with_name(model.name + ".data")


def _hidden_for(target_bytes: float) -> int:
    """Hidden width for an MLP of this size: wide enough to be realistic, deep enough to be 'deep'."""
    if target_bytes >= 1.5e9:
        return 4096
    if target_bytes >= 1e8:
        return 2048
    if target_bytes >= 5e6:
        return 512
    return 256


def mlp_spec(name: str, kind: str, size: str) -> dict:
    """`size`: gigabytes ("0.5"), or LAYERSxHIDDEN ("8x4096")."""
    if "x" in size:  # every layer hidden x hidden, the last too (8x4096: 537 MB)
        layers, hidden = (int(v) for v in size.split("x"))
        return dict(hidden=hidden, layers=layers, out=hidden, op="matmul" if kind == "mlp-ext" else "gemm",
                    external=kind == "mlp-ext" or layers * hidden * hidden * 4 > EXTERNAL_ABOVE, seed=0)
    else:
        target = float(size) * GB
        hidden = _hidden_for(target)
        layers = max(4, round(target / (hidden * hidden * 4)))
    external = kind == "mlp-ext" or layers * hidden * hidden * 4 > EXTERNAL_ABOVE
    op = "matmul" if kind == "mlp-ext" else "gemm"
    return dict(hidden=hidden, layers=layers, out=16, op=op, external=external, seed=0)


def build_mlp(workdir: Path, name: str, kind: str, size: str) -> BenchModel:
    import numpy as np
    from onnx import TensorProto, helper

    spec = mlp_spec(name, kind, size)
    hidden, layers, out, op, external = spec["hidden"], spec["layers"], spec["out"], spec["op"], spec["external"]
    stem = f"{kind}_h{hidden}_l{layers}_{op}" + ("" if out == 16 else f"_o{out}")
    path = workdir / f"{stem}.onnx"
    middle = layers // 2
    layer = f"fc{middle}" if op == "gemm" else f"fc{middle}/MatMul"
    model = BenchModel(name, kind, path, external, layer, hidden + hidden // 2, hidden, params=spec)
    if all(p.exists() for p in model.files()):
        model.size_bytes = sum(p.stat().st_size for p in model.files())
        return model

    rng = np.random.default_rng(spec["seed"])
    nodes = []
    writer = WeightWriter(path, external)
    add_tensor, initializers = writer.add, writer.initializers

    x = "x"
    for i in range(layers):
        fan_out = out if i == layers - 1 else hidden
        weight = rng.standard_normal((hidden, fan_out), dtype=np.float32)
        weight *= np.float32(math.sqrt(2.0 / hidden))
        bias = (0.01 * rng.standard_normal(fan_out)).astype(np.float32)
        y = f"fc{i}_out"
        if op == "gemm":
            add_tensor(f"fc{i}.weight", weight.T)  # [out, in] with transB=1, like PyTorch
            add_tensor(f"fc{i}.bias", bias)
            nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [y], name=f"fc{i}", transB=1))
        else:
            add_tensor(f"fc{i}.weight", weight)
            add_tensor(f"fc{i}.bias", bias)
            nodes.append(helper.make_node("MatMul", [x, f"fc{i}.weight"], [f"fc{i}_mm"], name=f"fc{i}/MatMul"))
            nodes.append(helper.make_node("Add", [f"fc{i}_mm", f"fc{i}.bias"], [y], name=f"fc{i}/Add"))
        del weight
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}_out"], name=f"relu{i}"))
            x = f"relu{i}_out"
        else:
            x = y
    graph = helper.make_graph(
        nodes, f"bench_{stem}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", out])],
        initializer=initializers)
    return writer.save(model, graph)


class WeightWriter:
    """Initializers of a generated model: inline, or appended to one external data file (64 KiB aligned)."""

    def __init__(self, path: Path, external: bool):
        self.path, self.initializers = path, []
        self.tmp_model, self.tmp_data = path.with_suffix(".onnx.partial"), data_path(path).with_suffix(".partial")
        self.data_file = open(self.tmp_data, "wb") if external else None

    def add(self, name: str, array) -> None:
        import numpy as np
        from onnx import TensorProto, numpy_helper

        array = np.ascontiguousarray(array, dtype=np.float32)
        if self.data_file is None or array.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(array, name))
            return
        position = self.data_file.tell()
        offset = position + (-position) % 65536  # aligned, so onnxruntime may map it
        self.data_file.write(b"\0" * (offset - position))
        self.data_file.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_path(self.path).name), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)

    def save(self, model: "BenchModel", graph) -> "BenchModel":
        """Write the model (and its data file) atomically, check it, record its size."""
        import onnx
        from onnx import helper

        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tools/bench.py")
        proto.ir_version = 9
        if self.data_file is not None:
            self.data_file.flush()
            os.fsync(self.data_file.fileno())
            self.data_file.close()
            os.replace(self.tmp_data, data_path(self.path))
        onnx.save(proto, self.tmp_model)
        os.replace(self.tmp_model, self.path)
        del proto, graph
        onnx.checker.check_model(str(self.path))
        model.size_bytes = sum(p.stat().st_size for p in model.files())
        return model


def build_stream(workdir: Path, name: str, size: str) -> BenchModel:
    """A residual MLP, external data: x -> proj -> B blocks of s + W2 relu(W1 s) -> head.

    Widening `proj` widens the stream every block reads and writes: the
    changed region is the whole model (region verification runs block by block)."""
    import numpy as np
    from onnx import TensorProto, helper

    hidden = _hidden_for(float(size) * GB)
    blocks = max(2, round(float(size) * GB / (2 * hidden * hidden * 4)))
    path = workdir / f"stream-ext_h{hidden}_b{blocks}.onnx"
    model = BenchModel(name, "stream-ext", path, True, "proj", hidden + hidden // 2, hidden,
                       params=dict(hidden=hidden, blocks=blocks))
    if all(p.exists() for p in model.files()) and grown_path(path).exists():  # (the verify case reads both)
        model.size_bytes = sum(p.stat().st_size for p in model.files())
        return model
    rng = np.random.default_rng(0)
    writer = WeightWriter(path, True)

    def weight(rows, cols, gain=1.0):
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(gain * math.sqrt(1.0 / rows))

    writer.add("proj.weight", weight(64, hidden))
    nodes, stream = [helper.make_node("MatMul", ["x", "proj.weight"], ["s0"], name="proj")], "s0"
    for k in range(blocks):
        writer.add(f"up{k}.weight", weight(hidden, hidden, 2.0))
        writer.add(f"down{k}.weight", weight(hidden, hidden, 0.3))
        nodes += [helper.make_node("MatMul", [stream, f"up{k}.weight"], [f"u{k}"], name=f"up{k}"),
                  helper.make_node("Relu", [f"u{k}"], [f"r{k}"], name=f"relu{k}"),
                  helper.make_node("MatMul", [f"r{k}", f"down{k}.weight"], [f"d{k}"], name=f"down{k}"),
                  helper.make_node("Add", [stream, f"d{k}"], [f"s{k + 1}"], name=f"add{k}")]
        stream = f"s{k + 1}"
    writer.add("head.weight", weight(hidden, 16))
    nodes.append(helper.make_node("MatMul", [stream, "head.weight"], ["y"], name="head"))
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                              initializer=writer.initializers)
    writer.save(model, graph)
    grown = grown_path(path)
    subprocess.run([sys.executable, "-m", "onnx_net2net", "widen", str(path), "-o", str(grown), "--layer",
                    f"proj={model.width}", "--no-verify", "--external-data", "yes"], check=True, cwd=REPO,
                   env=_child_env(), capture_output=True)
    return model


def grown_path(model: Path) -> Path:
    """The stream model widened once (by `build_stream`), for the `verify` case."""
    return model.with_name(model.stem + ".widened.onnx")


def build_cnn(workdir: Path) -> BenchModel:
    """A small ResNet-style CNN (widths 16/32/64, 2 basic blocks per stage, BN, GAP, Gemm)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = workdir / "cnn_resnet_w16-32-64.onnx"
    model = BenchModel("cnn", "cnn", path, False, "stage2/block1/conv1", 48, 32,
                       params=dict(widths=[16, 32, 64], blocks=2, input=[3, 32, 32]))
    if path.exists():
        model.size_bytes = path.stat().st_size
        return model
    rng = np.random.default_rng(1)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def conv(name, x, cin, cout, k, stride):
        w = rng.standard_normal((cout, cin, k, k)) * math.sqrt(2.0 / (cin * k * k))
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.weight", w)], [f"{name}_out"], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]))
        return f"{name}_out"

    def bn(name, x, c):
        params = [const(f"{name}.scale", rng.uniform(0.5, 1.5, c)), const(f"{name}.bias", rng.normal(0, 0.1, c)),
                  const(f"{name}.mean", rng.normal(0, 0.1, c)), const(f"{name}.var", rng.uniform(0.5, 1.5, c))]
        nodes.append(helper.make_node("BatchNormalization", [x] + params, [f"{name}_out"], name=name, epsilon=1e-5))
        return f"{name}_out"

    def relu(name, x):
        nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    x = relu("stem/relu", bn("stem/bn", conv("stem/conv", "input", 3, 16, 3, 1), 16), )
    cin = 16
    for s, cout in enumerate([16, 32, 64], start=1):
        for b in (1, 2):
            prefix = f"stage{s}/block{b}"
            stride = 2 if (b == 1 and s > 1) else 1
            h = relu(f"{prefix}/relu1", bn(f"{prefix}/bn1", conv(f"{prefix}/conv1", x, cin, cout, 3, stride), cout))
            h = bn(f"{prefix}/bn2", conv(f"{prefix}/conv2", h, cout, cout, 3, 1), cout)
            short = x
            if stride != 1 or cin != cout:
                short = bn(f"{prefix}/proj_bn", conv(f"{prefix}/proj", x, cin, cout, 1, stride), cout)
            nodes.append(helper.make_node("Add", [h, short], [f"{prefix}/add_out"], name=f"{prefix}/add"))
            x = relu(f"{prefix}/relu2", f"{prefix}/add_out")
            cin = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1))
    fc_w = const("fc.weight", rng.standard_normal((10, 64)) * math.sqrt(1 / 64))
    nodes.append(helper.make_node("Gemm", ["flat_out", fc_w, const("fc.bias", np.zeros(10))], ["output"], name="fc",
                                  transB=1))
    graph = helper.make_graph(nodes, "bench_resnet",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tools/bench.py")
    proto.ir_version = 9
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    model.size_bytes = path.stat().st_size
    return model


LLAMA_EXPORT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import LlamaConfig, LlamaForCausalLM

layers, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                     num_hidden_layers=layers, vocab_size=100, max_position_embeddings=64,
                     attn_implementation="eager")
model = LlamaForCausalLM(config).eval()


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits


torch.onnx.export(Logits(model), (torch.zeros(1, 8, dtype=torch.long),), out, dynamo=True, opset_version=18,
                  input_names=["input_ids"], output_names=["logits"], external_data=False,
                  dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}})
"""

SHUFFLENET_EXPORT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch, torchvision

torch.manual_seed(0)
model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), sys.argv[1], dynamo=False, opset_version=17,
                  input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
"""


def _export_with_torch(script: str, args: list[str], path: Path) -> bool:
    """Run an export script in a child; False when torch/transformers are missing."""
    partial = path.with_name(path.stem + ".partial.onnx")
    result = subprocess.run([sys.executable, "-c", script, *args[:-1], str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        if "ModuleNotFoundError" in result.stderr:
            return False
        raise SystemExit(f"{path.name}: export failed:\n{result.stderr[-2000:]}")
    os.replace(partial, path)
    return True


def build_llama(workdir: Path, name: str, layers: int) -> BenchModel | None:
    """Hugging Face LLaMA (hidden 64, 4 heads, random weights) exported with the
    dynamo exporter: about 64 nodes per layer (2 layers: 135, 32 layers: ~2,050)."""
    path = workdir / f"llama_l{layers}.onnx"
    model = BenchModel(name, "llama", path, False, "", 0, 64, params=dict(layers=layers, hidden=64))
    if not path.exists() and not _export_with_torch(LLAMA_EXPORT, [str(layers), str(path)], path):
        return None
    model.size_bytes = path.stat().st_size
    return model


def build_shufflenet(workdir: Path, name: str) -> BenchModel | None:
    """torchvision shufflenet_v2_x0_5, random weights (Split/Concat/channel shuffle: many trial widths)."""
    path = workdir / "shufflenet_v2_x0_5.onnx"
    model = BenchModel(name, "shufflenet", path, False, "", 0, 0, params=dict(source="torchvision"))
    if not path.exists() and not _export_with_torch(SHUFFLENET_EXPORT, [str(path)], path):
        return None
    model.size_bytes = path.stat().st_size
    return model


REPO_ALIASES = {"repo-cnn": "repo:cnn.onnx:/4/Conv=24", "repo-sklearn": "repo:sklearn_mlp.onnx:MatMul=48"}


def repo_model(spec: str) -> BenchModel | None:
    """`repo:FILE:LAYER=WIDTH`: a model shipped in models/ (the small-model CLI cases)."""
    name = spec
    spec = REPO_ALIASES.get(spec, spec)
    _, file, rest = spec.split(":", 2)
    layer, _, width = rest.rpartition("=")
    path = REPO / "models" / file
    if not path.exists() or not layer or not width.isdigit():
        return None
    return BenchModel(name, "repo", path, False, layer, int(width), 0, path.stat().st_size,
                      params=dict(source=f"models/{file}"))


def make_model(spec: str, workdir: Path) -> BenchModel | None:
    """Build (or reuse) the model in a child process, so this process stays small.

    Linux gives a child the parent's peak RSS as its starting ru_maxrss (fork/vfork
    copy the parent's memory map), so a parent that once held a model in memory
    would inflate every measurement after it.
    """
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_generate", spec,
                             "--workdir", str(workdir)], capture_output=True, text=True, env=_child_env())
    if result.returncode != 0:
        raise SystemExit(f"{spec}: model generation failed:\n{result.stderr[-2000:]}")
    data = json.loads(result.stdout)
    if data is None:
        return None
    data["path"] = Path(data["path"])
    return BenchModel(**data)


def _generate(spec: str, workdir: Path) -> BenchModel | None:
    kind, _, size = spec.partition(":")
    if kind in ("mlp", "mlp-ext"):
        if not size:
            raise SystemExit(f"{spec}: give a size in GB, e.g. {kind}:0.5")
        return build_mlp(workdir, spec, kind, size)
    if kind == "stream-ext":
        return build_stream(workdir, spec, size or "1")
    if kind == "cnn":
        return build_cnn(workdir)
    if kind == "llama":
        return build_llama(workdir, spec, int(size or 32))
    if kind == "shufflenet":
        return build_shufflenet(workdir, spec)
    if kind in ("repo", *REPO_ALIASES):
        return repo_model(spec)
    raise SystemExit(f"unknown model '{spec}' (mlp:GB, mlp:LxH, mlp-ext:GB, stream-ext:GB, cnn, llama:LAYERS, shufflenet, "
                     f"repo:FILE:LAYER=WIDTH, "
                     f"{', '.join(REPO_ALIASES)})")


# ----------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    model: str
    case: str
    wall_s: float         # median of the repeats
    walls: list
    cpu_s: float          # median user + system CPU time (less sensitive to a busy machine)
    peak_rss_bytes: int   # median of the repeats' peaks
    returncode: int
    checks: dict = field(default_factory=dict)
    stderr_tail: str = ""
    rss_all: list = field(default_factory=list)
    cpus: list = field(default_factory=list)


def median(values: list) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run_measured(cmd: list[str], *, cwd: Path, timeout: float) -> tuple[float, int, int, str, str, float]:
    """Run `cmd` as a child; return (wall s, peak RSS bytes, exit code, stdout, stderr, CPU s)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=_child_env())
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (wall, usage.ru_maxrss * 1024, proc.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), usage.ru_utime + usage.ru_stime)


#: --pythonpath: a package tree to benchmark instead of the installed onnx_net2net.
PYTHONPATH: str | None = None


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    if PYTHONPATH:
        env["PYTHONPATH"] = PYTHONPATH + os.pathsep + env.get("PYTHONPATH", "")
    return env


FLOOR_IO = r"""
import sys, onnx
src, dst, external = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = onnx.load(src, load_external_data=True)
if external:
    import os
    onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(dst) + ".data", size_threshold=1024)
else:
    onnx.save(model, dst)
"""

FLOOR_ORT = r"""
import ctypes, sys
import numpy as np, onnxruntime as ort
try:
    ctypes.CDLL("libcuda.so.1")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
except OSError:
    cuda = False
providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=providers)
rng = np.random.default_rng(0)
feeds = {}
for value in session.get_inputs():
    shape = [d if isinstance(d, int) and d > 0 else (2 if axis == 0 else 1) for axis, d in enumerate(value.shape)]
    feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
session.run(None, feeds)
print(session.get_providers()[0])
"""

CHECK_OUTPUT = r"""
import json, os, sys, onnx
path = sys.argv[1]
result = {"data_file": os.path.exists(path + ".data")}
try:
    onnx.checker.check_model(path)
    result["check_model"] = True
except Exception as exc:
    result["check_model"] = False
    result["check_error"] = str(exc).strip().splitlines()[0][:300]
model = onnx.load(path, load_external_data=False)
result["external_tensors"] = sum(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
result["output_bytes"] = os.path.getsize(path) + (os.path.getsize(path + ".data") if result["data_file"] else 0)
print(json.dumps(result))
"""


def remove_outputs(out: Path) -> None:
    for p in (out, data_path(out)):
        p.unlink(missing_ok=True)
    for stale in out.parent.glob(f".{out.name}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def cases_for(model: BenchModel, full: bool) -> list[tuple[str, list[str], bool]]:
    """(case name, argv after `python`, writes an output to check). `full`: the
    original issue-6 set (floor:ort, startup, deepen) as well."""
    py = sys.executable
    cli = [py, "-m", "onnx_net2net"]
    floor = ("floor:io", [py, "-c", FLOOR_IO, str(model.path), "{out}", "1" if model.external else "0"], True)
    if model.kind == "llama":
        return [floor, ("inspect --no-trial", cli + ["inspect", str(model.path), "--no-trial"], False)]
    if model.kind == "stream-ext":
        verify = cli + ["verify", str(model.path), str(grown_path(model.path)), "--verify"]
        return [floor, *cases_for_widen(model, cli), ("verify --verify full", verify + ["full"], False),
                ("verify --verify region", verify + ["region"], False)]
    if model.kind == "shufflenet":
        return [floor, ("inspect --no-trial", cli + ["inspect", str(model.path), "--no-trial"], False),
                ("inspect", cli + ["inspect", str(model.path)], False)]
    cases = [floor, *cases_for_widen(model, cli)]
    if full:
        deepen = cli + ["deepen", str(model.path), "-o", "{out}", "--after", model.layer]
        cases[1:1] = [("floor:ort", [py, "-c", FLOOR_ORT, str(model.path)], False),
                      ("startup", cli + ["--version"], False)]
        cases += [("deepen --no-verify", deepen + ["--no-verify"], True), ("deepen", deepen, True)]
    return cases


def cases_for_widen(model: BenchModel, cli: list[str]) -> list[tuple[str, list[str], bool]]:
    widen = cli + ["widen", str(model.path), "-o", "{out}", "--layer", f"{model.layer}={model.width}"]
    return [("widen --no-verify", widen + ["--no-verify"], True),
            ("widen --verify full", widen + ["--verify", "full"], True),
            ("widen --verify region", widen + ["--verify", "region"], True)]


def measure_model(model: BenchModel, workdir: Path, repeat: int, timeout: float, log, full: bool = False
                  ) -> list[Measurement]:
    """Every case once per round, `repeat` rounds: each case's run sits next to
    the floor's run of the same round, so ratios are paired."""
    out = workdir / "out" / f"{model.path.stem}.grown.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    cases = [(case, [a.replace("{out}", str(out)) for a in argv], writes) for case, argv, writes in cases_for(model, full)]
    runs = {case: dict(walls=[], cpus=[], rss=[], code=0, err="", checks={}) for case, _, _ in cases}
    for attempt in range(repeat):
        for case, argv, writes in cases:
            record = runs[case]
            if record["code"] != 0:
                continue
            remove_outputs(out)
            wall, peak, code, stdout, err, cpu = run_measured(argv, cwd=workdir, timeout=timeout)
            record["walls"].append(wall)
            record["cpus"].append(cpu)
            record["rss"].append(peak)
            record["code"], record["err"] = code, err
            if code == 0 and writes and attempt == repeat - 1:
                _, _, check_code, check_out, check_err, _ = run_measured(
                    [sys.executable, "-c", CHECK_OUTPUT, str(out)], cwd=workdir, timeout=timeout)
                record["checks"] = json.loads(check_out) if check_code == 0 else {"check_model": False,
                                                                                    "check_error": check_err[-300:]}
            log(f"  {model.name:>12} {case:<22} round {attempt + 1}: {wall:8.2f} s (cpu {cpu:6.2f} s) "
                f"{peak / MB:9.0f} MiB  rc {code}" + (f"  {err.strip().splitlines()[-1]}" if code and err.strip() else ""))
        remove_outputs(out)
    results = []
    for case, _, _ in cases:
        r = runs[case]
        results.append(Measurement(model.name, case, median(r["walls"]), [round(w, 3) for w in r["walls"]],
                                   round(median(r["cpus"]), 3), int(median(r["rss"])), r["code"], r["checks"],
                                   "" if r["code"] == 0 else r["err"].strip()[-600:], r["rss"],
                                   [round(c, 3) for c in r["cpus"]]))
    return results


def import_time(model: BenchModel) -> list[tuple[str, float]]:
    """Top cumulative imports of a CLI widen run (`python -X importtime`)."""
    out = Path(tempfile.mkdtemp(prefix="bench_importtime_")) / "x.onnx"
    try:
        argv = [sys.executable, "-X", "importtime", "-m", "onnx_net2net", "widen", str(model.path), "-o", str(out),
                "--layer", f"{model.layer}={model.width}"]
        _, _, _, _, err, _ = run_measured(argv, cwd=out.parent, timeout=120)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    rows = []
    for line in err.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(3)) <= 3:  # top-level imports only (one level of indent)
            rows.append((match.group(4), int(match.group(2)) / 1e6))
    rows.sort(key=lambda r: -r[1])
    return rows[:10]


def profile_widen(model: BenchModel, workdir: Path, log) -> str:
    """cProfile of `widen --no-verify`; returns the top of the cumulative listing."""
    out = workdir / "out" / f"{model.path.stem}.profiled.onnx"
    prof = workdir / f"{model.path.stem}.widen.prof"
    argv = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "onnx_net2net", "widen", str(model.path),
            "-o", str(out), "--layer", f"{model.layer}={model.width}", "--no-verify"]
    try:
        run_measured(argv, cwd=workdir, timeout=3600)
    finally:
        remove_outputs(out)
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(str(prof), stream=text).sort_stats("cumulative").print_stats(25)
    log(f"  profile written to {prof}")
    return text.getvalue()


# ----------------------------------------------------------------------------
# Report


def paired_ratios(case: Measurement, base: Measurement, cpu: bool = False) -> list[float]:
    """case / base, round by round (the runs that sat next to each other);
    `cpu`: of CPU times (user + system), steadier on a busy machine."""
    pairs = zip(case.cpus, base.cpus) if cpu else zip(case.walls, base.walls)
    return [c / b for c, b in pairs if b > 0]


def summarise(models: list[BenchModel], results: list[Measurement], quick: bool) -> tuple[list[dict], list[dict]]:
    by = {(m.model, m.case): m for m in results}
    rows = []
    for model in models:
        floor = by.get((model.name, "floor:io"))
        for m in (r for r in results if r.model == model.name):
            row = dict(model=model.name, case=m.case, wall_s=round(m.wall_s, 3), walls=m.walls,
                       wall_min=round(min(m.walls), 3), wall_max=round(max(m.walls), 3), cpu_s=m.cpu_s,
                       peak_rss_mib=round(m.peak_rss_bytes / MB, 1), returncode=m.returncode,
                       model_mib=round(model.size_bytes / MB, 2),
                       rss_over_model=round(m.peak_rss_bytes / model.size_bytes, 2))
            if floor and floor.returncode == 0 and m.walls:
                ratios = paired_ratios(m, floor)
                cpu_ratios = paired_ratios(m, floor, cpu=True)
                row.update(x_floor_io=round(median(ratios), 2), x_floor_min=round(min(ratios), 2),
                           x_floor_max=round(max(ratios), 2), x_floor_cpu=round(median(cpu_ratios), 2))
            if m.checks:
                row["checks"] = m.checks
            if m.stderr_tail:
                row["error"] = m.stderr_tail
            rows.append(row)
    return rows, evaluate_targets(models, by, quick)


def evaluate_targets(models: list[BenchModel], by: dict, quick: bool) -> list[dict]:
    """The targets of issue 17 (ratios are medians of paired rounds)."""
    targets = []

    def target(name, model, ok, detail):
        targets.append(dict(target=name, model=model.name, met=bool(ok), detail=detail,
                            meaningful=not quick or model.kind == "repo"))

    def spread(ratios, cpu_ratios=None):
        text = f"median {median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        if cpu_ratios:
            text += f"; CPU time median {median(cpu_ratios):.2f}x ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"
        return text

    for model in models:
        get = lambda case: by.get((model.name, case))  # noqa: E731
        floor, plain = get("floor:io"), get("widen --no-verify")
        if model.kind == "mlp" and not model.external and floor and plain and plain.returncode == 0:
            ratios = paired_ratios(plain, floor)
            target("widen --no-verify wall <= 1.2x floor:io", model, median(ratios) <= 1.2,
                   spread(ratios, paired_ratios(plain, floor, cpu=True)))
            rss = plain.peak_rss_bytes / model.size_bytes
            target("widen --no-verify peak RSS <= 1.5x model", model, rss <= 1.5,
                   f"{plain.peak_rss_bytes / MB:.0f} MiB vs model {model.size_bytes / MB:.0f} MiB = {rss:.2f}x")
        region = get("widen --verify region")
        if model.external and plain and region and region.returncode == 0 and plain.returncode == 0:
            ratios = paired_ratios(region, plain)
            target("widen --verify region wall <= 1.5x widen --no-verify", model, median(ratios) <= 1.5,
                   spread(ratios, paired_ratios(region, plain, cpu=True)))
            rss = region.peak_rss_bytes / model.size_bytes
            target("widen --verify region peak RSS < 0.5x model", model, rss < 0.5,
                   f"{region.peak_rss_bytes / MB:.0f} MiB vs model {model.size_bytes / MB:.0f} MiB = {rss:.2f}x")
        if model.kind == "shufflenet" and get("inspect"):
            m = get("inspect")
            target("inspect (with trials) < 3 s", model, m.returncode == 0 and m.wall_s < 3,
                   f"median {m.wall_s:.2f} s (runs {m.walls}, CPU {m.cpu_s:.2f} s)")
    llamas = sorted((m for m in models if m.kind == "llama"), key=lambda m: m.params["layers"])
    if len(llamas) >= 2:
        small, large = (by.get((m.name, "inspect --no-trial")) for m in (llamas[0], llamas[-1]))
        if small and large and small.returncode == 0 and large.returncode == 0:
            ratios = paired_ratios(large, small)
            target(f"inspect --no-trial {llamas[-1].name} <= 1.5x {llamas[0].name}", llamas[-1],
                   median(ratios) <= 1.5, f"{large.wall_s:.2f} s vs {small.wall_s:.2f} s: "
                                          f"{spread(ratios, paired_ratios(large, small, cpu=True))}")
    return targets


def format_table(rows: list[dict]) -> str:
    header = ["model", "MiB", "case", "wall s (median)", "wall min-max", "x floor:io (median, min-max)",
              "x floor CPU", "CPU s",
              "peak RSS MiB", "RSS/model", "ok"]
    lines = [header]
    for r in rows:
        ok = "yes" if r["returncode"] == 0 else f"rc {r['returncode']}"
        checks = r.get("checks")
        if checks and not checks.get("check_model", True):
            ok += " (check_model FAILED)"
        ratio = f"{r['x_floor_io']:.2f} ({r['x_floor_min']:.2f}-{r['x_floor_max']:.2f})" if "x_floor_io" in r else ""
        lines.append([r["model"], f"{r['model_mib']:g}", r["case"], f"{r['wall_s']:.2f}",
                      f"{r['wall_min']:.2f}-{r['wall_max']:.2f}", ratio,
                      f"{r['x_floor_cpu']:.2f}" if "x_floor_cpu" in r else "", f"{r['cpu_s']:.2f}",
                      f"{r['peak_rss_mib']:.0f}", f"{r['rss_over_model']:.2f}", ok])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def format_targets(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        mark = "MET " if t["met"] else "MISS"
        note = "" if t["meaningful"] else "  (quick model: not meaningful)"
        lines.append(f"  [{mark}] {t['model']}: {t['target']} -- {t['detail']}{note}")
    return "\n".join(lines)


def machine() -> dict:
    info = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count())
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    for module in ("onnx", "onnxruntime", "numpy", "networkx"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001
            info[module] = None
    try:
        info["package"] = subprocess.run([sys.executable, "-c", "import onnx_net2net; print(onnx_net2net.__file__)"],
                                         capture_output=True, text=True, env=_child_env(), cwd=tempfile.gettempdir(),
                                         timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                                     text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Model specs: mlp:GB (inline, Gemm), mlp-ext:GB (external data, "
                                            "MatMul+Add), cnn (ResNet-style), repo:FILE:LAYER=WIDTH (a model in "
                                            "models/), repo-cnn, repo-sklearn.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnx_net2net_bench"),
                        help="where models and outputs go (default /tmp/onnx_net2net_bench)")
    parser.add_argument("--models", "--sizes", nargs="+", metavar="SPEC", dest="models",
                        help=f"models to run (default: {' '.join(DEFAULT_MODELS)}; --quick: {' '.join(QUICK_MODELS)})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models: a smoke test (~30-40 s: each of ~25 processes costs ~1 s)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds per model; every case runs once per round, medians and paired ratios "
                             "are reported (default: 5 for models under 64 MB, 3 above)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement (default 1800)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--profile", action="store_true", help="also cProfile widen --no-verify on each MLP")
    parser.add_argument("--all-cases", action="store_true",
                        help="also floor:ort, startup and deepen (the issue-6 set) for the MLPs")
    parser.add_argument("--no-importtime", action="store_true", help="skip the -X importtime run")
    parser.add_argument("--clean", action="store_true", help="delete the generated models at the end")
    parser.add_argument("--pythonpath", metavar="DIR",
                        help="benchmark the onnx_net2net package found in DIR (e.g. a patched copy) instead of "
                             "the installed one; children run with PYTHONPATH=DIR and the workdir as cwd")
    parser.add_argument("--_generate", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global PYTHONPATH
    PYTHONPATH = str(Path(args.pythonpath).resolve()) if args.pythonpath else None
    if args._generate:  # child process: build one model, print its description
        args.workdir.mkdir(parents=True, exist_ok=True)
        model = _generate(args._generate, args.workdir.resolve())
        print(json.dumps(None if model is None else dict(asdict(model), path=str(model.path))))
        return 0

    specs = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    if args.quick and not args.repeat:
        args.repeat = 1
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    started = time.time()
    models, results, profiles = [], [], {}
    for spec in specs:
        t0 = time.perf_counter()
        model = make_model(spec, workdir)
        if model is None:
            log(f"{spec}: not available, skipped")
            continue
        log(f"{spec}: {model.path.name} ({model.size_bytes / MB:.1f} MiB{', external data' if model.external else ''}"
            f", layer {model.layer} {model.old_width or '?'} -> {model.width})"
            f" ready in {time.perf_counter() - t0:.1f} s")
        models.append(model)
        runs = args.repeat or (5 if model.size_bytes < SMALL_MODEL_BYTES else 3)
        results += measure_model(model, workdir, runs, args.timeout, log, full=args.all_cases)
        if args.profile and model.kind in ("mlp", "mlp-ext"):
            profiles[model.name] = profile_widen(model, workdir, log)
    imports = []
    small = next((m for m in models if m.name == "repo-cnn"), None) or next((m for m in models
                                                                             if m.kind == "repo"), None)
    if small and not args.no_importtime:
        imports = import_time(small)

    import resource

    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a lower bound of every child's peak
    rows, targets = summarise(models, results, args.quick)
    print(format_table(rows))
    print()
    print("Targets:")
    print(format_targets(targets))
    if imports:
        print()
        print("Heaviest imports (two top levels) of `widen` on the small model, cumulative s: "
              + ", ".join(f"{name} {seconds:.2f}" for name, seconds in imports[:6]))
    for name, text in profiles.items():
        print(f"\ncProfile of widen --no-verify on {name}:\n{text}")
    if args.json:
        report = dict(machine=machine(), started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                      duration_s=round(time.time() - started, 1), quick=args.quick, repeat=args.repeat,
                      models=[dict(asdict(m), path=str(m.path)) for m in models], results=rows, targets=targets,
                      imports=imports, profiles=profiles, bench_process_peak_rss_mib=round(parent_rss / MB, 1))
        args.json.write_text(json.dumps(report, indent=2, default=str))
        log(f"written {args.json}")
    shutil.rmtree(workdir / "out", ignore_errors=True)
    if args.clean:
        for model in models:
            if model.path.is_relative_to(workdir):
                for p in model.files():
                    p.unlink(missing_ok=True)
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
