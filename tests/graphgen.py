"""Random valid ONNX graphs for property-based tests (a hypothesis strategy).

`models()` draws a small network built with `onnx.helper`: a random stack of
blocks over a 1D/2D convolutional or a dense input, with random widths and
depth. Ingredients (each block picks from them while tracking the shape of the
running tensor):

* layers: Conv 1D/2D (kernel, padding, stride, bias), depthwise Conv, Gemm
  (transB, bias shapes, alpha), MatMul + Add, a channels-last MatMul between
  Transposes;
* per-unit activations: Relu, LeakyRelu, PRelu (per-channel or shared slope),
  Clip, Sigmoid, Tanh, Gelu (opset >= 20) or the Erf formula, SiLU as
  Sigmoid * Mul, Elu, Selu, Softplus, HardSigmoid, HardSwish;
* BatchNormalization, MaxPool / AveragePool / GlobalAveragePool;
* residual Adds, Concats (with identity or layer branches), squeeze-excite
  gates (Mul with a broadcast Sigmoid);
* Flatten, Reshape ([0, -1], [-1, F], [B, F]), Transpose + Flatten into dense
  layers, or tokens (Reshape to [N, C, T], Transpose, MatMul, ReduceMean over T);
* LayerNormalization (fused at opset >= 17, else decomposed) and pre-norm
  residual blocks (dense inputs);
* Identity and Dropout;
* extra graph outputs on intermediate tensors.

Every random decision goes through a `Chooser`, which records it. A drawn
`GeneratedModel` prints as `graphgen.replay([...])`, a literal list of those
decisions: pasting it into a regression test rebuilds exactly the same graph
(weights included: they come from a seed that is one of the decisions).
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

# Hypothesis profiles for the property and fuzz tests: HYPOTHESIS_PROFILE=ci
# (default: derandomized, each test's CI example count) or =long.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, suppress_health_check=_SUPPRESS)
settings.register_profile("long", deadline=None, max_examples=5000, print_blob=True, suppress_health_check=_SUPPRESS)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def examples(ci: int) -> settings:
    """Settings of the active profile; `ci` examples under the "ci" profile."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=ci) if PROFILE == "ci" else profile


OPSETS = (17, 14, 18, 20, 21)
ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Gelu", "ErfGelu", "SiLU", "Elu",
               "Selu", "Softplus", "HardSigmoid", "HardSwish")


class Chooser:
    """Every random decision of the generator: drawn by hypothesis, or replayed."""

    def __init__(self, draw=None, replay: list[int] | None = None):
        self._draw = draw
        self._replay = None if replay is None else list(replay)
        self._position = 0
        self.record: list[int] = []

    def int(self, low: int, high: int) -> int:
        if self._replay is not None:
            if self._position < len(self._replay):
                value = int(self._replay[self._position])
            else:
                value = low  # a shorter list replays with the simplest choices
            if not low <= value <= high:  # (recorded values always are; random lists wrap)
                value = low + (value - low) % (high - low + 1)
            self._position += 1
        else:
            value = self._draw(st.integers(low, high))
        self.record.append(value)
        return value

    def choice(self, options):
        return options[self.int(0, len(options) - 1)]

    def flag(self) -> bool:
        return bool(self.int(0, 1))


class GeneratedModel:
    """A generated model and the decisions that made it."""

    def __init__(self, model: onnx.ModelProto, choices: list[int], outputs: list[str]):
        self.model, self.choices, self.outputs = model, choices, outputs

    def __repr__(self) -> str:
        return f"graphgen.replay({self.choices!r})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' pretty printer
        printer.text(repr(self))

    def text(self) -> str:
        """The graph, one node a line, weights by shape only (for failure messages)."""
        return describe(self.model)


def describe(model: onnx.ModelProto) -> str:
    graph = model.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    lines = [f"opset {model.opset_import[0].version}; inputs "
             + ", ".join(f"{v.name}{dims(v)}" for v in graph.input)]
    for node in graph.node:
        args = ", ".join(f"{name}{shapes[name]}" if name in shapes else name for name in node.input)
        attrs = ", ".join(f"{a.name}={helper.get_attribute_value(a)!r}" for a in node.attribute)
        lines.append(f"  {', '.join(node.output)} = {node.op_type}({args}){' {' + attrs + '}' if attrs else ''}"
                     f"  # {node.name}")
    lines.append("outputs " + ", ".join(f"{v.name}{dims(v)}" for v in graph.output))
    return "\n".join(lines)


class _Graph:
    """A graph under construction; tracks the (concrete) shape of every tensor."""

    def __init__(self, opset: int, seed: int, batch: int | str):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.batch = batch            # int, or a dim_param name (dynamic)
        self.B = batch if isinstance(batch, int) else 2
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.shapes: dict[str, tuple] = {}
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        self.shapes[name] = tuple(np.asarray(value).shape)
        return name

    def weights(self, prefix: str, shape, fan_in: int) -> str:
        return self.const(prefix, (self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32))

    def node(self, op: str, inputs: list[str], shape: tuple, prefix: str | None = None, **attrs) -> str:
        name = self.fresh(prefix or op.lower())
        out = name + "_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        self.shapes[out] = tuple(shape)
        return out

    def input(self, shape: tuple) -> str:
        name = "x"
        dims = [self.batch] + list(shape[1:])
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        self.shapes[name] = tuple(shape)
        return name

    def model(self) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [self.batch] + list(self.shapes[name][1:]))
                   for name in self.outputs]
        graph = helper.make_graph(self.nodes, "generated", self.inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="graphgen")
        model.ir_version = helper.find_min_ir_version_for(opsets)
        _declare_every_tensor(model)
        return model


def _declare_every_tensor(model: onnx.ModelProto) -> None:
    """value_info for every tensor, initializers included, as the dynamo
    exporter writes them: a rewrite must keep every one of them true."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    model.graph.value_info.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                  for t in model.graph.initializer)


# ----------------------------------------------------------------------------
# Pieces


def _conv_out(size: int, k: int, pad: int, stride: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def activation(c: Chooser, g: _Graph, x: str) -> str:
    """A per-unit activation on x (channel axis 1)."""
    names = [a for a in ACTIVATIONS
             if not (a == "Gelu" and g.opset < 20) and not (a == "HardSwish" and g.opset < 14)]
    kind = c.choice(names)
    shape = g.shapes[x]
    if kind in ("Relu", "Sigmoid", "Tanh", "Selu", "Softplus", "HardSwish"):
        return g.node(kind, [x], shape)
    if kind == "LeakyRelu":
        return g.node(kind, [x], shape, alpha=c.choice([0.01, 0.2]))
    if kind == "Elu":
        return g.node(kind, [x], shape, alpha=c.choice([1.0, 0.5]))
    if kind == "HardSigmoid":
        return g.node(kind, [x], shape, alpha=0.2, beta=0.5)
    if kind == "Gelu":
        return g.node(kind, [x], shape, approximate=c.choice(["none", "tanh"]))
    if kind == "PRelu":
        channels = shape[1]
        if c.flag():
            slope_shape = [1]
        else:
            slope_shape = [channels] + [1] * (len(shape) - 2)
        slope = g.const("slope", (0.05 + 0.3 * g.rng.random(slope_shape)).astype(np.float32))
        return g.node("PRelu", [x, slope], shape)
    if kind == "Clip":
        low = g.const("clip_min", np.array(c.choice([0.0, -1.0]), np.float32))
        high = g.const("clip_max", np.array(c.choice([6.0, 1.0]), np.float32))
        return g.node("Clip", [x, low, high], shape)
    if kind == "SiLU":
        gate = g.node("Sigmoid", [x], shape)
        return g.node("Mul", [x, gate] if c.flag() else [gate, x], shape)
    # ErfGelu: x * 0.5 * (1 + erf(x / sqrt(2)))
    scaled = g.node("Div", [x, g.const("sqrt2", np.array(math.sqrt(2), np.float32))], shape)
    erf = g.node("Erf", [scaled], shape)
    shifted = g.node("Add", [erf, g.const("one", np.array(1.0, np.float32))], shape)
    product = g.node("Mul", [x, shifted], shape)
    return g.node("Mul", [product, g.const("half", np.array(0.5, np.float32))], shape)


def maybe_activation(c: Chooser, g: _Graph, x: str) -> str:
    return activation(c, g, x) if c.flag() else x


def batchnorm(c: Chooser, g: _Graph, x: str) -> str:
    channels = g.shapes[x][1]
    rng = g.rng
    inputs = [x,
              g.const("bn_scale", (0.5 + rng.random(channels)).astype(np.float32)),
              g.const("bn_bias", (0.1 * rng.standard_normal(channels)).astype(np.float32)),
              g.const("bn_mean", (0.1 * rng.standard_normal(channels)).astype(np.float32)),
              g.const("bn_var", (0.5 + rng.random(channels)).astype(np.float32))]
    return g.node("BatchNormalization", inputs, g.shapes[x], epsilon=1e-5)


def conv(c: Chooser, g: _Graph, x: str, width: int | None = None, same: bool = False) -> str:
    """Conv (+ BN) (+ activation). `same`: keep the spatial size (for residuals and concats)."""
    shape = g.shapes[x]
    channels, spatial = shape[1], shape[2:]
    if width is None:
        width = c.int(1, 6)
    kernel = c.choice([1, 3, 2])
    if same and kernel % 2 == 0:
        kernel = 3
    pad = kernel // 2 if (same or c.flag() or min(spatial) < kernel) else 0
    stride = 1 if same or c.int(0, 3) else 2
    out_spatial = tuple(_conv_out(s, kernel, pad, stride) for s in spatial)
    if min(out_spatial) < 1:
        stride, pad = 1, kernel // 2
        out_spatial = tuple(_conv_out(s, kernel, pad, stride) for s in spatial)
    rank = len(spatial)
    inputs = [x, g.weights("W", [width, channels] + [kernel] * rank, channels * kernel ** rank)]
    if c.int(0, 3):
        inputs.append(g.const("b", (0.1 * g.rng.standard_normal(width)).astype(np.float32)))
    y = g.node("Conv", inputs, (shape[0], width) + out_spatial, prefix="conv",
               kernel_shape=[kernel] * rank, pads=[pad] * (2 * rank), strides=[stride] * rank)
    if c.int(0, 2) == 0:
        y = batchnorm(c, g, y)
    return maybe_activation(c, g, y)


def depthwise(c: Chooser, g: _Graph, x: str) -> str:
    shape = g.shapes[x]
    channels, rank = shape[1], len(shape) - 2
    multiplier = c.choice([1, 2])
    inputs = [x, g.weights("W", [channels * multiplier, 1] + [3] * rank, 3 ** rank)]
    if c.flag():
        inputs.append(g.const("b", (0.1 * g.rng.standard_normal(channels * multiplier)).astype(np.float32)))
    y = g.node("Conv", inputs, (shape[0], channels * multiplier) + shape[2:], prefix="dwconv",
               kernel_shape=[3] * rank, pads=[1] * (2 * rank), group=channels)
    return maybe_activation(c, g, y)


def dense(c: Chooser, g: _Graph, x: str, width: int | None = None, linear: bool = False) -> str:
    """Gemm or MatMul (+ Add bias) on a [N, F] tensor, (+ BN) (+ activation) unless `linear`."""
    features = g.shapes[x][1]
    if width is None:
        width = c.int(1, 6)
    kind = c.choice(["Gemm", "MatMul"])
    if kind == "Gemm":
        trans_b = c.flag()
        w_shape = [width, features] if trans_b else [features, width]
        inputs = [x, g.weights("W", w_shape, features)]
        bias = c.choice(["vector", "none", "row"])
        if bias != "none":
            b_shape = [width] if bias == "vector" else [1, width]
            inputs.append(g.const("b", (0.1 * g.rng.standard_normal(b_shape)).astype(np.float32)))
        alpha = c.choice([1.0, 0.5])
        y = g.node("Gemm", inputs, (g.shapes[x][0], width), prefix="gemm", transB=int(trans_b), alpha=alpha)
    else:
        y = g.node("MatMul", [x, g.weights("W", [features, width], features)], (g.shapes[x][0], width),
                   prefix="matmul")
        if c.int(0, 3):
            bias = g.const("b", (0.1 * g.rng.standard_normal(width)).astype(np.float32))
            y = g.node("Add", [y, bias] if c.int(0, 3) else [bias, y], g.shapes[y])
    if linear:
        return y
    if c.int(0, 3) == 0:
        y = batchnorm(c, g, y)
    return maybe_activation(c, g, y)


def channels_last_matmul(c: Chooser, g: _Graph, x: str) -> str:
    """[N, C, *S] -> channels last -> MatMul (+ bias) -> activation -> back."""
    shape = g.shapes[x]
    rank = len(shape)
    perm = [0] + list(range(2, rank)) + [1]
    back = [0, rank - 1] + list(range(1, rank - 1))
    moved = g.node("Transpose", [x], tuple(shape[p] for p in perm), perm=perm)
    width = c.int(1, 6)
    y = g.node("MatMul", [moved, g.weights("W", [shape[1], width], shape[1])],
               g.shapes[moved][:-1] + (width,), prefix="matmul")
    if c.flag():
        y = g.node("Add", [y, g.const("b", (0.1 * g.rng.standard_normal(width)).astype(np.float32))], g.shapes[y])
    y = maybe_activation(c, g, y)
    return g.node("Transpose", [y], tuple(g.shapes[y][p] for p in back), perm=back)


def pool(c: Chooser, g: _Graph, x: str) -> str:
    shape = g.shapes[x]
    spatial, rank = shape[2:], len(shape) - 2
    kind = c.choice(["MaxPool", "AveragePool", "GlobalAveragePool"])
    if kind == "MaxPool" and min(spatial) >= 2:
        return g.node("MaxPool", [x], shape[:2] + tuple(s // 2 for s in spatial), kernel_shape=[2] * rank,
                      strides=[2] * rank)
    if kind == "AveragePool":
        return g.node("AveragePool", [x], shape, kernel_shape=[3] * rank, pads=[1] * (2 * rank))
    return g.node("GlobalAveragePool", [x], shape[:2] + (1,) * rank)


def layernorm(c: Chooser, g: _Graph, x: str) -> str:
    """LayerNormalization over the features of [N, F] (opset >= 17), else the
    decomposed ReduceMean / Sub / Mul / ReduceMean / Sqrt / Div form."""
    shape, width, rng = g.shapes[x], g.shapes[x][-1], g.rng
    scale = g.const("ln_scale", (0.5 + rng.random(width)).astype(np.float32))
    shift = g.const("ln_bias", (0.1 * rng.standard_normal(width)).astype(np.float32))
    if g.opset >= 17 and c.flag():
        return g.node("LayerNormalization", [x, scale, shift], shape, axis=-1, epsilon=1e-3)
    mean = g.node("ReduceMean", [x], (shape[0], 1), axes=[-1], keepdims=1) if g.opset < 18 else \
        g.node("ReduceMean", [x, g.const("axes", np.array([-1], np.int64))], (shape[0], 1), keepdims=1)
    centred = g.node("Sub", [x, mean], shape)
    square = g.node("Mul", [centred, centred], shape)
    var = g.node("ReduceMean", [square], (shape[0], 1), axes=[-1], keepdims=1) if g.opset < 18 else \
        g.node("ReduceMean", [square, g.const("axes", np.array([-1], np.int64))], (shape[0], 1), keepdims=1)
    std = g.node("Sqrt", [g.node("Add", [var, g.const("eps", np.array(1e-3, np.float32))], (shape[0], 1))],
                 (shape[0], 1))
    normed = g.node("Div", [centred, std], shape)
    return g.node("Add", [g.node("Mul", [normed, scale], shape), shift], shape)


def prenorm_residual(c: Chooser, g: _Graph, x: str) -> str:
    """s = linear(x); s + linear(act(dense(norm(s)))): a pre-norm transformer-style
    block whose stream stays linear up to the norm (LEMON's average expansion)."""
    stream = dense(c, g, x, linear=True)
    hidden = dense(c, g, layernorm(c, g, stream))
    update = dense(c, g, maybe_activation(c, g, hidden), g.shapes[stream][1], linear=True)
    return g.node("Add", [stream, update] if c.flag() else [update, stream], g.shapes[stream])


def residual(c: Chooser, g: _Graph, x: str, spatial: bool) -> str:
    width = g.shapes[x][1]
    if spatial:
        y = conv(c, g, x, None if c.flag() else width, same=True)
        if g.shapes[y][1] != width:
            y = conv(c, g, y, width, same=True)
    else:
        y = dense(c, g, x, width)
    out = g.node("Add", [x, y] if c.flag() else [y, x], g.shapes[x])
    return maybe_activation(c, g, out)


def concat(c: Chooser, g: _Graph, x: str, spatial: bool) -> str:
    branches = []
    for _ in range(c.int(2, 3)):
        if c.int(0, 2) == 0:
            branches.append(x)
        else:
            branches.append(conv(c, g, x, same=True) if spatial else dense(c, g, x))
    shape = list(g.shapes[branches[0]])
    shape[1] = sum(g.shapes[b][1] for b in branches)
    axis = c.choice([1, 1 - len(shape)])
    return g.node("Concat", branches, tuple(shape), axis=axis)


def squeeze_excite(c: Chooser, g: _Graph, x: str) -> str:
    shape = g.shapes[x]
    rank = len(shape) - 2
    squeezed = g.node("GlobalAveragePool", [x], shape[:2] + (1,) * rank)
    hidden = c.int(1, 4)
    a = g.node("Conv", [squeezed, g.weights("W", [hidden, shape[1]] + [1] * rank, shape[1])],
               shape[:1] + (hidden,) + (1,) * rank, prefix="conv", kernel_shape=[1] * rank)
    a = g.node("Relu", [a], g.shapes[a])
    b = g.node("Conv", [a, g.weights("W", [shape[1], hidden] + [1] * rank, hidden)], g.shapes[squeezed],
               prefix="conv", kernel_shape=[1] * rank)
    gate = g.node("Sigmoid", [b], g.shapes[b])
    return g.node("Mul", [x, gate] if c.flag() else [gate, x], shape)


def flatten(c: Chooser, g: _Graph, x: str) -> str:
    """[N, C, *S] -> [N, F]."""
    shape = g.shapes[x]
    kinds = ["Flatten", "Reshape0", "ReshapeMinus", "GlobalPoolFlatten", "TransposeFlatten"]
    if isinstance(g.batch, int):
        kinds.append("ReshapeStatic")
    kinds.append("Tokens")  # (new options go last: kept regression cases replay the same graphs)
    kind = c.choice(kinds)
    if kind == "Tokens":
        return tokens(c, g, x)
    if kind == "GlobalPoolFlatten":
        x = g.node("GlobalAveragePool", [x], shape[:2] + (1,) * (len(shape) - 2))
        shape = g.shapes[x]
        kind = c.choice(["Flatten", "Reshape0"])
    if kind == "TransposeFlatten":
        perm = [0] + list(range(2, len(shape))) + [1]
        x = g.node("Transpose", [x], tuple(shape[p] for p in perm), perm=perm)
        shape = g.shapes[x]
        kind = "Flatten"
    features = int(np.prod(shape[1:]))
    flat = (shape[0], features)
    if kind == "Flatten":
        return g.node("Flatten", [x], flat, axis=1)
    target = {"Reshape0": [0, -1], "ReshapeMinus": [-1, features], "ReshapeStatic": [g.B, features]}[kind]
    return g.node("Reshape", [x, g.const("shape", np.array(target, np.int64))], flat)


def tokens(c: Chooser, g: _Graph, x: str) -> str:
    """[N, C, *S] -> [N, C, T] -> [N, T, C] -> MatMul (+ bias) (+ activation) -> mean over tokens -> [N, F]."""
    shape = g.shapes[x]
    count = int(np.prod(shape[2:]))
    seq = g.node("Reshape", [x, g.const("shape", np.array([0, shape[1], -1], np.int64))], (shape[0], shape[1], count))
    seq = g.node("Transpose", [seq], (shape[0], count, shape[1]), perm=[0, 2, 1])
    width = c.int(1, 6)
    y = g.node("MatMul", [seq, g.weights("W", [shape[1], width], shape[1])], (shape[0], count, width),
               prefix="matmul")
    if c.flag():
        y = g.node("Add", [y, g.const("b", (0.1 * g.rng.standard_normal(width)).astype(np.float32))], g.shapes[y])
    y = maybe_activation(c, g, y)
    if g.opset >= 18:
        return g.node("ReduceMean", [y, g.const("axes", np.array([1], np.int64))], (shape[0], width), keepdims=0)
    return g.node("ReduceMean", [y], (shape[0], width), axes=[1], keepdims=0)


def passthrough(c: Chooser, g: _Graph, x: str) -> str:
    kind = c.choice(["Identity", "Dropout"])
    return g.node(kind, [x], g.shapes[x])


def side_output(g: _Graph, x: str) -> None:
    if x not in g.outputs and x != "x":
        g.outputs.append(x)


# ----------------------------------------------------------------------------
# The whole model


_BLOCKS = {"conv": conv, "dense": dense, "activation": activation, "batchnorm": batchnorm, "pool": pool,
           "depthwise": depthwise, "squeeze_excite": squeeze_excite, "passthrough": passthrough,
           "layernorm": layernorm, "prenorm_residual": prenorm_residual,
           "channels_last_matmul": channels_last_matmul}


def build(c: Chooser) -> GeneratedModel:
    opset = c.choice(OPSETS)
    kind = c.choice(["conv2d", "dense", "conv1d"])
    batch = c.choice([2, "N", 1])
    g = _Graph(opset, seed=c.int(0, 2**16), batch=batch)
    if kind == "dense":
        x = g.input((g.B, c.int(1, 6)))
    elif kind == "conv1d":
        x = g.input((g.B, c.int(1, 4), c.int(2, 8)))
    else:
        x = g.input((g.B, c.int(1, 4), c.int(2, 6), c.int(2, 6)))
    spatial = kind != "dense"
    for _ in range(c.int(1, 6)):
        if spatial:
            block = c.choice(["conv", "activation", "pool", "residual", "concat", "flatten", "side_output",
                              "batchnorm", "depthwise", "squeeze_excite", "channels_last_matmul", "passthrough"])
        else:
            block = c.choice(["dense", "activation", "residual", "concat", "side_output", "batchnorm",
                              "passthrough", "layernorm", "prenorm_residual"])  # new kinds go last (replays)
        if block in _BLOCKS:
            x = _BLOCKS[block](c, g, x)
        elif block in ("residual", "concat"):
            x = (residual if block == "residual" else concat)(c, g, x, spatial)
        elif block == "flatten":
            x = flatten(c, g, x)
            spatial = False
        else:
            side_output(g, x)
    head = c.choice(["dense", "conv", "none"])
    if head == "dense" or (head == "conv" and not spatial):
        if spatial:
            x = flatten(c, g, x)
        x = dense(c, g, x, c.int(1, 5))
    elif head == "conv":
        x = conv(c, g, x, c.int(1, 5))
    if x == "x":
        x = g.node("Relu", [x], g.shapes[x])
    side_output(g, x)
    return GeneratedModel(g.model(), list(c.record), list(g.outputs))


@st.composite
def models(draw) -> GeneratedModel:
    """A random valid model (see the module docstring)."""
    return build(Chooser(draw=draw))


def replay(choices: list[int]) -> GeneratedModel:
    """Rebuild the model a failing example printed as `graphgen.replay([...])`."""
    return build(Chooser(replay=choices))
