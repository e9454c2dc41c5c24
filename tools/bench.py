#!/usr/bin/env python
"""Benchmark the onnx_net2net CLI against the cost of just reading and writing the model.

The benchmark builds its own models (seeded, with ``onnx.helper`` and numpy)
in ``--workdir`` (default ``/tmp/onnx_net2net_bench``):

* ``mlp:GB``      a deep MLP of about GB gigabytes, fp32, weights inline
                  (Gemm with transB=1, bias, Relu), e.g. ``mlp:0.5``;
* ``mlp-ext:GB``  the same with MatMul + Add + Relu layers and every weight
                  in one external data file, e.g. ``mlp-ext:3`` (an MLP above
                  ~1.8 GB is always written with external data: protobuf
                  cannot hold more than 2 GB);
* ``cnn``         a small ResNet-style CNN (stem, 3 stages of 2 residual
                  blocks with BatchNormalization, projection shortcuts, GAP,
                  classifier), inline;
* ``repo:FILE:LAYER=WIDTH``  a model shipped in ``models/``: the "small model,
                  whole CLI under 1.5 s" cases. Aliases: ``repo-cnn``
                  (``models/cnn.onnx``, ``/4/Conv`` to 24 units) and
                  ``repo-sklearn`` (``models/sklearn_mlp.onnx``, ``MatMul`` to 48).

For every model, each measurement runs in its own subprocess; wall time is
taken around the process and peak RSS from ``os.wait4`` (the child's
``ru_maxrss``, which includes any children it waited for):

* ``floor:io``     ``onnx.load`` + ``onnx.save`` of the model (external data
                   loaded, and saved with ``save_as_external_data=True``, for
                   an external-data model);
* ``floor:ort``    onnxruntime session creation + one run (batch 2, graph
                   optimisations off, the provider the CLI would pick): what
                   verification costs per model;
* ``startup``      ``python -m onnx_net2net --version`` (interpreter + CLI import);
* ``widen``, ``widen --no-verify``, ``deepen``, ``deepen --no-verify``: the
  CLI on a middle hidden layer (widened by 1.5x; deepened after it).

Outputs are checked (exit code, ``onnx.checker.check_model(path)``, external
data present when expected) and deleted right after each run, so disk use
stays at about the model plus one output.

Targets (issue 6) are evaluated on the numbers and printed after the table:

* widen --no-verify on an inline MLP: wall <= 1.5x floor:io, peak RSS <= 2x model size;
* widen --no-verify on an external-data MLP: completes, wall <= 1.5x floor:io,
  output has external data, check_model passes, peak RSS <= 1/3 of model size;
* widen / deepen with verification: wall <= floor:io + 2 x floor:ort;
* repo models, widen (verified): whole CLI <= 1.5 s (best of the repeats).

Usage::

    python tools/bench.py                       # mlp:0.5 mlp-ext:3 cnn repo-cnn repo-sklearn
                                                # (~10-15 min, ~9 GB free disk in the workdir)
    python tools/bench.py --quick               # tiny models: a smoke test (~30-40 s, ~1 s per CLI process)
    python tools/bench.py --models mlp:0.5 cnn --repeat 3 --json /tmp/bench.json
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
DEFAULT_MODELS = ["mlp:0.5", "mlp-ext:3", "cnn", "repo-cnn", "repo-sklearn"]
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


def mlp_spec(name: str, kind: str, gigabytes: float) -> dict:
    target = gigabytes * GB
    hidden = _hidden_for(target)
    layers = max(4, round(target / (hidden * hidden * 4)))
    external = kind == "mlp-ext" or layers * hidden * hidden * 4 > EXTERNAL_ABOVE
    op = "matmul" if kind == "mlp-ext" else "gemm"
    return dict(hidden=hidden, layers=layers, out=16, op=op, external=external, seed=0)


def build_mlp(workdir: Path, name: str, kind: str, gigabytes: float) -> BenchModel:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = mlp_spec(name, kind, gigabytes)
    hidden, layers, out, op, external = spec["hidden"], spec["layers"], spec["out"], spec["op"], spec["external"]
    stem = f"{kind}_h{hidden}_l{layers}_{op}"
    path = workdir / f"{stem}.onnx"
    middle = layers // 2
    layer = f"fc{middle}" if op == "gemm" else f"fc{middle}/MatMul"
    model = BenchModel(name, kind, path, external, layer, hidden + hidden // 2, hidden, params=spec)
    if all(p.exists() for p in model.files()):
        model.size_bytes = sum(p.stat().st_size for p in model.files())
        return model

    rng = np.random.default_rng(spec["seed"])
    nodes, initializers = [], []
    data_file = None
    tmp_model, tmp_data = path.with_suffix(".onnx.partial"), data_path(path).with_suffix(".partial")
    if external:
        data_file = open(tmp_data, "wb")

    def add_tensor(tname: str, array: "np.ndarray") -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if data_file is None or array.nbytes < 1024:
            initializers.append(numpy_helper.from_array(array, tname))
            return
        position = data_file.tell()
        offset = position + (-position) % 65536  # aligned, so onnxruntime may map it
        data_file.write(b"\0" * (offset - position))
        data_file.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=tname, data_type=TensorProto.FLOAT, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_path(path).name), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        initializers.append(tensor)

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
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tools/bench.py")
    proto.ir_version = 9
    if data_file is not None:
        data_file.flush()
        os.fsync(data_file.fileno())
        data_file.close()
        os.replace(tmp_data, data_path(path))
    onnx.save(proto, tmp_model)
    os.replace(tmp_model, path)
    del proto, graph, initializers
    onnx.checker.check_model(str(path))
    model.size_bytes = sum(p.stat().st_size for p in model.files())
    return model


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
        return build_mlp(workdir, spec, kind, float(size))
    if kind == "cnn":
        return build_cnn(workdir)
    if kind in ("repo", *REPO_ALIASES):
        return repo_model(spec)
    raise SystemExit(f"unknown model '{spec}' (mlp:GB, mlp-ext:GB, cnn, repo:FILE:LAYER=WIDTH, "
                     f"{', '.join(REPO_ALIASES)})")


# ----------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    model: str
    case: str
    wall_s: float         # best (minimum) of the repeats: the least disturbed by other load
    walls: list
    cpu_s: float          # user + system CPU time of that best run (less sensitive to a busy machine)
    peak_rss_bytes: int
    returncode: int
    checks: dict = field(default_factory=dict)
    stderr_tail: str = ""


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


def cases_for(model: BenchModel) -> list[tuple[str, list[str], bool]]:
    """(case name, argv after `python`, writes an output to check)."""
    py = sys.executable
    cli = [py, "-m", "onnx_net2net"]
    return [
        ("floor:io", [py, "-c", FLOOR_IO, str(model.path), "{out}", "1" if model.external else "0"], True),
        ("floor:ort", [py, "-c", FLOOR_ORT, str(model.path)], False),
        ("startup", cli + ["--version"], False),
        ("widen --no-verify", cli + ["widen", str(model.path), "-o", "{out}", "--layer",
                                     f"{model.layer}={model.width}", "--no-verify"], True),
        ("widen", cli + ["widen", str(model.path), "-o", "{out}", "--layer", f"{model.layer}={model.width}"], True),
        ("deepen --no-verify", cli + ["deepen", str(model.path), "-o", "{out}", "--after", model.layer,
                                      "--no-verify"], True),
        ("deepen", cli + ["deepen", str(model.path), "-o", "{out}", "--after", model.layer], True),
    ]


def measure_model(model: BenchModel, workdir: Path, repeat: int, timeout: float, log) -> list[Measurement]:
    out = workdir / "out" / f"{model.path.stem}.grown.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for case, argv, writes in cases_for(model):
        argv = [a.replace("{out}", str(out)) for a in argv]
        walls, cpus, rss, code, err, checks = [], [], 0, 0, "", {}
        for attempt in range(repeat):
            remove_outputs(out)
            wall, peak, code, stdout, err, cpu = run_measured(argv, cwd=workdir, timeout=timeout)
            walls.append(wall)
            cpus.append(cpu)
            rss = max(rss, peak)
            if code != 0:
                break
            if writes and attempt == repeat - 1:
                _, _, check_code, check_out, check_err, _ = run_measured(
                    [sys.executable, "-c", CHECK_OUTPUT, str(out)], cwd=workdir, timeout=timeout)
                checks = json.loads(check_out) if check_code == 0 else {"check_model": False,
                                                                          "check_error": check_err[-300:]}
        remove_outputs(out)
        best = min(range(len(walls)), key=walls.__getitem__)
        m = Measurement(model.name, case, walls[best], [round(w, 3) for w in walls], round(cpus[best], 3), rss, code,
                        checks, "" if code == 0 else err.strip()[-600:])
        results.append(m)
        log(f"  {model.name:>12} {case:<20} {m.wall_s:8.2f} s (cpu {m.cpu_s:6.2f} s) {rss / MB:9.0f} MiB  rc {code}"
            + (f"  {m.stderr_tail.splitlines()[-1] if m.stderr_tail else ''}" if code else ""))
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


def summarise(models: list[BenchModel], results: list[Measurement], quick: bool) -> tuple[list[dict], list[dict]]:
    by = {(m.model, m.case): m for m in results}
    rows = []
    for model in models:
        floor = by.get((model.name, "floor:io"))
        ort = by.get((model.name, "floor:ort"))
        for m in (r for r in results if r.model == model.name):
            row = dict(model=model.name, case=m.case, wall_s=round(m.wall_s, 3), walls=m.walls, cpu_s=m.cpu_s,
                       peak_rss_mib=round(m.peak_rss_bytes / MB, 1), returncode=m.returncode,
                       model_mib=round(model.size_bytes / MB, 2),
                       rss_over_model=round(m.peak_rss_bytes / model.size_bytes, 2))
            if floor and floor.returncode == 0:
                row["x_floor_io"] = round(m.wall_s / floor.wall_s, 2)
            if floor and ort and not m.case.startswith(("floor", "startup")) and "--no-verify" not in m.case:
                budget = floor.wall_s + 2 * ort.wall_s
                row["verify_budget_s"] = round(budget, 3)
                row["x_verify_budget"] = round(m.wall_s / budget, 2)
            if m.checks:
                row["checks"] = m.checks
            if m.stderr_tail:
                row["error"] = m.stderr_tail
            rows.append(row)
    targets = []

    def target(name, model, ok, detail):
        targets.append(dict(target=name, model=model.name, met=bool(ok), detail=detail,
                            meaningful=not quick or model.kind == "repo"))

    for model in models:
        get = lambda case: by.get((model.name, case))  # noqa: E731
        floor, ort, widen = get("floor:io"), get("floor:ort"), get("widen --no-verify")
        if model.kind in ("mlp", "mlp-ext") and floor and widen:
            ratio = widen.wall_s / floor.wall_s
            rss_ratio = widen.peak_rss_bytes / model.size_bytes
            ok_run = widen.returncode == 0
            if not model.external:
                target("widen --no-verify wall <= 1.5x floor:io", model, ok_run and ratio <= 1.5,
                       f"{widen.wall_s:.2f} s vs floor {floor.wall_s:.2f} s = {ratio:.2f}x")
                target("widen --no-verify peak RSS <= 2x model", model, ok_run and rss_ratio <= 2,
                       f"{widen.peak_rss_bytes / MB:.0f} MiB vs model {model.size_bytes / MB:.0f} MiB "
                       f"= {rss_ratio:.2f}x")
            else:
                checks = widen.checks
                target("widen --no-verify completes", model, ok_run, f"exit code {widen.returncode}")
                target("widen --no-verify wall <= 1.5x floor:io", model, ok_run and ratio <= 1.5,
                       f"{widen.wall_s:.2f} s vs floor {floor.wall_s:.2f} s = {ratio:.2f}x")
                target("output has external data", model, checks.get("data_file") and checks.get("external_tensors"),
                       f"data file {checks.get('data_file')}, {checks.get('external_tensors')} external tensors")
                target("onnx.checker.check_model(path) passes", model, checks.get("check_model"),
                       checks.get("check_error", "ok" if checks.get("check_model") else "not run"))
                target("widen --no-verify peak RSS <= 1/3 model", model, ok_run and rss_ratio <= 1 / 3,
                       f"{widen.peak_rss_bytes / MB:.0f} MiB vs model {model.size_bytes / MB:.0f} MiB "
                       f"= {rss_ratio:.2f}x")
        if floor and ort and model.kind != "repo":
            budget = floor.wall_s + 2 * ort.wall_s
            for case in ("widen", "deepen"):
                m = get(case)
                if m:
                    target(f"{case} (verified) wall <= floor:io + 2 floor:ort", model,
                           m.returncode == 0 and m.wall_s <= budget,
                           f"{m.wall_s:.2f} s vs {floor.wall_s:.2f} + 2 x {ort.wall_s:.2f} = {budget:.2f} s")
        if model.kind == "repo" and get("widen"):
            m = get("widen")
            target("small model: whole CLI widen <= 1.5 s", model, m.returncode == 0 and m.wall_s <= 1.5,
                   f"best of {len(m.walls)}: {m.wall_s:.2f} s (CPU {m.cpu_s:.2f} s; all runs {m.walls})")
    return rows, targets


def format_table(rows: list[dict]) -> str:
    header = ["model", "MiB", "case", "wall s", "CPU s", "x floor:io", "x verify budget", "peak RSS MiB",
              "RSS/model", "ok"]
    lines = [header]
    for r in rows:
        ok = "yes" if r["returncode"] == 0 else f"rc {r['returncode']}"
        checks = r.get("checks")
        if checks and not checks.get("check_model", True):
            ok += " (check_model FAILED)"
        lines.append([r["model"], f"{r['model_mib']:g}", r["case"], f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                      f"{r['x_floor_io']:.2f}" if "x_floor_io" in r else "",
                      f"{r['x_verify_budget']:.2f}" if "x_verify_budget" in r else "",
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
                        help="runs per measurement, the best (least disturbed) reported (default: 5 for models "
                             "under 64 MB, 1 above)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement (default 1800)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--profile", action="store_true", help="also cProfile widen --no-verify on each MLP")
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
        runs = args.repeat or (5 if model.size_bytes < SMALL_MODEL_BYTES else 1)
        results += measure_model(model, workdir, runs, args.timeout, log)
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
