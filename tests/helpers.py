"""Shared test helpers: build tiny graphs with onnx.helper, run them in
onnxruntime (graph optimisations off) and compare outputs independently of
onnx_net2net.verify.

The tolerance is the project's: max |a - b| / max(1, |a|) <= 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnx_net2net as n2n

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHIPPED = ["cnn", "mlp", "resnet_block", "cnn1d", "dense_concat", "sklearn_mlp"]
TOL = 1e-5
FLOAT = TensorProto.FLOAT


def model_path(name: str) -> Path:
    return MODELS / f"{name}.onnx"


def tool_module(name: str):
    """tools/<name>.py as a module, loaded once (registered before it runs: dataclasses look their module up)."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ----------------------------------------------------------------------------
# Building graphs


def inspected(model) -> dict[str, dict]:
    """`inspect` without trial rewrites, as {layer name: its entry}."""
    return {layer["name"]: layer for layer in n2n.inspect(model, trial=False)["layers"]}


def inspected_layer(model, name: str) -> dict:
    return inspected(model)[name]


def inspected_widen(model, name: str) -> dict:
    return inspected(model)[name]["widen"]


def vi(name: str, shape=None, dtype=FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def make_model(nodes, inputs, outputs, inits: dict | None = None, *, opset: int = 17, ir_version: int = 10,
               extra_opsets=(), name: str = "g", value_info=(), check: bool = True) -> onnx.ModelProto:
    """A model from nodes. `inputs`/`outputs`: ValueInfoProtos or (name, shape)
    pairs (float32); outputs may be plain names (shape left to inference)."""

    def as_vi(item):
        if isinstance(item, onnx.ValueInfoProto):
            return item
        if isinstance(item, str):
            return vi(item, None)
        return vi(*item)

    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(list(nodes), name, [as_vi(i) for i in inputs], [as_vi(o) for o in outputs],
                              initializer=initializers, value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape") and out.name in inferred:
                out.CopyFrom(inferred[out.name])
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def mlp_model(d_in: int, hidden: int, d_out: int, *, seed: int = 0, scale: float = 1.0,
              opset: int = 17) -> onnx.ModelProto:
    """x[N, d_in] -> fc1 (Gemm) -> Relu -> fc2 (Gemm) -> y[N, d_out], IR version 8;
    initializers W1, b1, W2, b2 in that order, drawn N(0, scale) with `seed`."""
    rng = np.random.default_rng(seed)
    inits = {name: rand(rng, *shape, scale=scale)
             for name, shape in (("W1", (d_in, hidden)), ("b1", (hidden,)), ("W2", (hidden, d_out)), ("b2", (d_out,)))}
    nodes = [H("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"], name="relu"),
             H("Gemm", ["a", "W2", "b2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["N", d_in])], [("y", ["N", d_out])], inits, opset=opset, ir_version=8)


def rand(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------
# Running


def session(model):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def random_feeds(model, seed: int = 123, batch: int = 3, int_high: int = 5) -> dict:
    """Seeded inputs for every input of `model` (dynamic dims: `batch` first, 1 after)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in session(model).get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1) for i, d in enumerate(value.shape)]
        dtype = _NP[value.type]
        if np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, int_high, size=shape).astype(dtype)
        else:
            feeds[value.name] = (rng.standard_normal(shape) * 2).astype(dtype)
    return feeds


def run(model, feeds: dict) -> list[np.ndarray]:
    sess = session(model)
    wanted = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in wanted})


def max_rel_error(reference, candidate, feeds=None) -> float:
    """max over outputs of |a - b| / max(1, |a|), from our own ORT runs."""
    feeds = feeds if feeds is not None else random_feeds(reference)
    worst = 0.0
    for a, b in zip(run(reference, feeds), run(candidate, feeds), strict=True):
        assert a.shape == b.shape, f"output shape changed: {a.shape} -> {b.shape}"
        if a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                return float("inf")
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        assert np.array_equal(np.isnan(a64), np.isnan(b64))
        finite = ~np.isnan(a64)
        if finite.any():
            worst = max(worst, float((np.abs(a64 - b64)[finite] / np.maximum(1.0, np.abs(a64[finite]))).max()))
    return worst


def assert_same_function(reference, candidate, feeds=None, tol: float = TOL) -> float:
    onnx.checker.check_model(candidate if not isinstance(candidate, (str, Path)) else str(candidate))
    err = max_rel_error(reference, candidate, feeds)
    assert err <= tol, f"max rel err {err:.3g} > {tol:g}"
    return err


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the intermediate tensors `names`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def run_intermediates(model, names: list[str], feeds: dict) -> dict[str, np.ndarray]:
    extended = with_outputs(model, names)
    sess = session(extended)
    values = sess.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
    return dict(zip(names, values))


# ----------------------------------------------------------------------------
# Looking into models


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


def node_weight(model: onnx.ModelProto, node_name: str, port: int = 1) -> np.ndarray:
    """The constant at `node.input[port]` (initializer, maybe renamed by a clone)."""
    return init(model, node(model, node_name).input[port])


def attr(n: onnx.NodeProto, name: str, default=None):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def infer_mapping(old: np.ndarray, new: np.ndarray, axis: int = 0) -> np.ndarray:
    """Recover g from a producer's copied weight: new[j] == old[g(j)] along `axis`."""
    old_m = np.moveaxis(old, axis, 0).reshape(old.shape[axis], -1)
    new_m = np.moveaxis(new, axis, 0).reshape(new.shape[axis], -1)
    g = []
    for row in new_m:
        matches = np.nonzero((old_m == row).all(axis=1))[0]
        assert matches.size >= 1, "a new unit is not a copy of an old one"
        g.append(int(matches[0]))
    return np.array(g)


# ----------------------------------------------------------------------------
# Growing, checked independently


def widen_exact(model, widths=None, *, feeds=None, **kwargs):
    """n2n.widen, then our own ORT comparison. Returns (model, report)."""
    wider, report = n2n.widen(model, widths, **kwargs)
    reference = model
    assert_same_function(reference, wider, feeds)
    assert report["verification"]["passed"] is True
    assert report["exact"] is True
    return wider, report


def deepen_exact(model, after, *, feeds=None, **kwargs):
    deeper, report = n2n.deepen(model, after, **kwargs)
    assert_same_function(model, deeper, feeds)
    assert report["verification"]["passed"] is True
    assert len(deeper.graph.node) > len((onnx.load(str(model)) if isinstance(model, (str, Path)) else model)
                                        .graph.node)
    return deeper, report


# ----------------------------------------------------------------------------
# Tiny graphs for the widen/deepen tests: a weighted layer L1, something in
# between, and a consumer layer L2 (so L1's units do not reach a graph output).

H = helper.make_node


def conv_sandwich(middle=None, *, dims: int = 2, c_in: int = 2, c: int = 3, c_out: int = 2, size: int = 5,
                  k: int = 3, opset: int = 17, seed: int = 0, l2: str = "conv", bias: bool = True):
    """x [N, c_in, size...] -> Conv L1 (c_in -> c, k, pad k//2) -> middle -> L2 -> y.

    middle(t, inits, rng, c) -> (nodes, out): the ops between L1 and L2.
    l2: "conv" (k x k conv to c_out) or "flatten-gemm" (handled by middle).
    """
    rng = np.random.default_rng(seed)
    spatial = [size] * dims
    inits = {"W1": rand(rng, c, c_in, *[k] * dims), "W2": rand(rng, c_out, c, *[k] * dims)}
    if bias:
        inits["B1"] = rand(rng, c)
        inits["B2"] = rand(rng, c_out)
    nodes = [H("Conv", ["x", "W1"] + (["B1"] if bias else []), ["t1"], name="L1", pads=[k // 2] * 2 * dims)]
    out = "t1"
    if middle is not None:
        more, out = middle(out, inits, rng, c)
        nodes += more
    nodes.append(H("Conv", [out, "W2"] + (["B2"] if bias else []), ["y"], name="L2", pads=[k // 2] * 2 * dims))
    return make_model(nodes, [("x", ["N", c_in] + spatial)], ["y"], inits, opset=opset)


def dense_sandwich(middle=None, *, d_in: int = 4, c: int = 3, d_out: int = 2, kind: str = "gemm",
                   trans_b: int = 1, opset: int = 17, seed: int = 0):
    """x [N, d_in] -> L1 (Gemm or MatMul+Add, d_in -> c) -> middle -> L2 (same kind, c -> d_out) -> y."""
    rng = np.random.default_rng(seed)
    inits, nodes = {}, []

    def layer(name, x, y, k, n):
        w = f"W{name[-1]}"
        b = f"B{name[-1]}"
        inits[b] = rand(rng, n)
        if kind == "gemm":
            inits[w] = rand(rng, n, k) if trans_b else rand(rng, k, n)
            nodes.append(H("Gemm", [x, w, b], [y], name=name, transB=trans_b))
        else:
            inits[w] = rand(rng, k, n)
            nodes.append(H("MatMul", [x, w], [y + "_mm"], name=name))
            nodes.append(H("Add", [y + "_mm", b], [y], name=name + "/bias"))

    layer("L1", "x", "t1", d_in, c)
    out = "t1"
    if middle is not None:
        more, out = middle(out, inits, rng, c)
        nodes += more
    layer("L2", out, "y", c, d_out)
    return make_model(nodes, [("x", ["N", d_in])], ["y"], inits, opset=opset)


# ----------------------------------------------------------------------------
# Middles


def unary(op, **attrs):
    def middle(t, inits, rng, c):
        return [H(op, [t], [t + "_" + op], name=op, **attrs)], t + "_" + op
    return middle


def chain(*middles):
    def middle(t, inits, rng, c):
        nodes = []
        for m in middles:
            more, t = m(t, inits, rng, c)
            nodes += more
        return nodes, t
    return middle


def clip(t, inits, rng, c):
    inits["clip_min"] = np.array(-0.5, np.float32)
    inits["clip_max"] = np.array(0.7, np.float32)
    return [H("Clip", [t, "clip_min", "clip_max"], ["clipped"], name="Clip")], "clipped"


def erf_gelu(t, inits, rng, c):
    """x * 0.5 * (1 + erf(x / sqrt(2))), as exporters decompose it."""
    inits.update(sqrt2=np.array(1.4142135, np.float32), one=np.array(1.0, np.float32),
                 half=np.array(0.5, np.float32))
    return [H("Div", [t, "sqrt2"], ["g_div"], name="g/Div"), H("Erf", ["g_div"], ["g_erf"], name="g/Erf"),
            H("Add", ["g_erf", "one"], ["g_add"], name="g/Add"), H("Mul", [t, "g_add"], ["g_mul"], name="g/Mul"),
            H("Mul", ["g_mul", "half"], ["gelu"], name="g/Mul2")], "gelu"


def silu(t, inits, rng, c):
    return [H("Sigmoid", [t], ["sig"], name="silu/Sigmoid"), H("Mul", [t, "sig"], ["silu"], name="silu/Mul")], "silu"


def batchnorm(t, inits, rng, c):
    inits.update(bn_scale=(rng.uniform(0.5, 1.5, c)).astype(np.float32), bn_bias=rand(rng, c),
                 bn_mean=rand(rng, c), bn_var=rng.uniform(0.5, 2.0, c).astype(np.float32))
    return [H("BatchNormalization", [t, "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="BN",
              epsilon=1e-3)], "bn"


def per_channel(op, spatial_rank: int, name: str = "pc"):
    """Mul/Add/Sub/Div/PRelu/Max with a per-channel constant [c, 1, ...]."""
    def middle(t, inits, rng, c):
        value = rng.uniform(0.5, 1.5, [c] + [1] * spatial_rank).astype(np.float32)
        inits[name] = value
        return [H(op, [t, name], [t + "_" + name], name=f"{op}_{name}")], t + "_" + name
    return middle


class ReadSpy:
    """Records the name of every weight read from outside the ModelProto
    (external data, or inline bytes a lazy load left in the file) through a
    ModelHandle; with `streamed`, also every chunked byte comparison of region
    verification."""

    def __init__(self, monkeypatch, *, streamed: bool = False):
        from onnx_net2net import io, region_diff

        self.names = []
        for method in ("external_bytes", "array"):
            monkeypatch.setattr(io.ModelHandle, method, self._wrap(getattr(io.ModelHandle, method)))
        if streamed:
            reader = region_diff.byte_reader
            monkeypatch.setattr(region_diff, "byte_reader", lambda h, t: self.names.append(t.name) or reader(h, t))

    def _wrap(self, original):
        def spy(handle, tensor):
            if tensor.data_location == TensorProto.EXTERNAL or handle.deferred_metadata(tensor) is not None:
                self.names.append(tensor.name)
            return original(handle, tensor)
        return spy
