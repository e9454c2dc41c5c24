"""Net2DeeperNet: insert layers initialised to the identity.

A new layer L with L(x) = x is inserted after an existing layer's activation.
The constructions, each exact for the case it is chosen for:

* identity:  y = act(L(act(z))) = act(act(z)) = act(z) when act is idempotent
  (Relu, Clip/Relu6); with no activation after the layer, L alone (linear).
* before-activation:  act(L(z)) = act(z) for any act: L goes between the
  layer (and its bias / BatchNormalization) and the activation.
* prelu:  PRelu_1(L(a)) = a with slope 1 per channel: exact for any act, and
  the slope can train back towards a non-linearity.
* residual:  y = a + W2 act(W1 a + b1) + b2 with W1 = I, b1 = 0, W2 = 0, b2 = 0:
  exact for any act (in fp32 too: a + 0 = a).

L is a Conv with an odd kernel k (zero except W[i, i mod C/G, k//2, ...] = 1;
pads k//2, stride 1, dilation 1; depthwise or grouped like the layer) for
convolutional layers, and Gemm or MatMul + Add with I and a zero bias for
dense layers. An identity BatchNormalization (scale 1, B 0, mean 0,
var = 1 - eps, picked so that var + eps == 1 in fp32) can follow the conv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analysis import Refusal, layer_name, layer_width
from ..editor import GraphEditor
from ..errors import option
from ..ir import GraphIR, node_attr
from ..ops import ELEMENTWISE_UNARY
from ..options import DeepenMode

#: Activations f with f(f(x)) = f(x): the identity layer can repeat them.
IDEMPOTENT = frozenset({"Relu", "Clip"})
_NOT_ACTIVATIONS = frozenset({"Identity", "Cast", "CastLike", "Dropout", "Bernoulli"})
ACTIVATIONS = ELEMENTWISE_UNARY - _NOT_ACTIVATIONS | {"PRelu"}


@dataclass
class DeepenOptions:
    """How the identity layer is built.

    Attributes:
        kernel: odd kernel size for convolutional identities (default: the
            layer's own kernel, made odd).
        mode: a DeepenMode; "auto" picks an exact construction.
        batchnorm: add an identity BatchNormalization after the new layer.
        noise: std of noise added to the identity weights, relative to the std
            of the layer's weights (0: exact).
        seed: seeds the noise.
    """

    kernel: int | None = None
    mode: DeepenMode = DeepenMode.AUTO
    batchnorm: bool = False
    noise: float = 0.0
    seed: int = 0


@dataclass
class Insertion:
    """Where and how a layer can be deepened (the plan, before any change)."""

    layer: int
    kind: str                    # "conv", "gemm" or "matmul"
    mode: str
    tensor: str                  # the tensor the new layer reads
    activation: list[int] = field(default_factory=list)   # the activation's nodes
    activation_name: str = "none"
    width: int = 0


@dataclass
class InsertedLayer:
    after: str
    mode: str
    activation: str
    nodes: list[str]
    initializers: list[str]


def plan(ir: GraphIR, layer: int, options: DeepenOptions) -> Insertion:
    """Choose where and how to insert after `layer`, or raise a Refusal."""
    node = ir.nodes[layer]
    kind = {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul"}.get(node.op_type)
    if kind is None:
        raise Refusal.not_deepenable(f"{node.op_type} layers cannot be deepened yet")
    pre, after, activation, name = _follow_activation(ir, node.output[0])
    mode = _choose_mode(options.mode, activation, name)
    tensor = pre if mode == DeepenMode.BEFORE_ACTIVATION else after
    if tensor in ir.graph_outputs:
        raise Refusal.not_deepenable(f"'{tensor}' is a graph output: the identity would rename it")
    for use in ir.uses(tensor):
        if use.port < 0:
            raise Refusal.not_deepenable(f"'{tensor}' is read inside a subgraph")
    if kind == "gemm" and ir.rank(tensor) not in (None, 2):
        raise Refusal.not_deepenable(f"'{tensor}' is not a matrix")
    if options.batchnorm and kind == "matmul" and ir.rank(tensor) != 2:
        raise Refusal.not_deepenable(f"{option('batchnorm')} needs the units on axis 1, and '{tensor}' has them on its last axis "
                            f"(rank {ir.rank(tensor)})")
    return Insertion(layer, kind, mode, tensor, activation, name, layer_width(ir, layer))


def _follow_activation(ir: GraphIR, tensor: str):
    """From a layer's output, step over its bias and BatchNormalization to its
    activation. Returns (pre-activation tensor, post-activation tensor,
    activation nodes, activation name)."""
    while tensor not in ir.graph_outputs and len(ir.uses(tensor)) == 1:
        use = ir.uses(tensor)[0]
        node = ir.nodes[use.node]
        if node.op_type == "BatchNormalization" and use.port == 0 and len([o for o in node.output if o]) == 1:
            tensor = node.output[0]
        elif node.op_type == "Add" and ir.is_const(node.input[1 - use.port]):
            tensor = node.output[0]
        elif node.op_type == "Sub" and use.port == 0 and ir.is_const(node.input[1]):
            tensor = node.output[0]
        elif node.op_type in ACTIVATIONS and use.port == 0:
            return tensor, node.output[0], [use.node], node.op_type
        else:
            break
    silu = _silu(ir, tensor)
    if silu:
        return tensor, ir.nodes[silu[1]].output[0], silu, "SiLU"
    return tensor, tensor, [], "none"


def _silu(ir: GraphIR, tensor: str):
    """x * Sigmoid(x) as two nodes: returns [sigmoid, mul] indices or None."""
    uses = ir.uses(tensor)
    if len(uses) != 2 or tensor in ir.graph_outputs:
        return None
    by_op = {ir.nodes[u.node].op_type: u.node for u in uses}
    if set(by_op) != {"Sigmoid", "Mul"}:
        return None
    sigmoid, mul = by_op["Sigmoid"], by_op["Mul"]
    if set(ir.nodes[mul].input) != {tensor, ir.nodes[sigmoid].output[0]}:
        return None
    if len(ir.uses(ir.nodes[sigmoid].output[0])) != 1:
        return None
    return [sigmoid, mul]


def _choose_mode(requested: DeepenMode, activation: list[int], name: str) -> DeepenMode:
    idempotent = not activation or name in IDEMPOTENT
    if requested == DeepenMode.AUTO:
        return DeepenMode.IDENTITY if idempotent else DeepenMode.PRELU
    if requested == DeepenMode.IDENTITY and not idempotent:
        raise Refusal.not_deepenable(
            f"{option('mode', DeepenMode.IDENTITY)} is not exact after {name}: {name}({name}(x)) != {name}(x); "
            f"use {option('mode')} before-activation, prelu or residual")
    if requested == DeepenMode.BEFORE_ACTIVATION and not activation:
        raise Refusal.not_deepenable(f"{option('mode', DeepenMode.BEFORE_ACTIVATION)} needs an activation after the layer, "
                            "and it has none")
    return requested


def _identity_groups(layer: onnx.NodeProto, width: int) -> int:
    """The new conv mirrors the layer: depthwise after depthwise (group = C),
    grouped after grouped (same group count), dense otherwise."""
    groups = int(node_attr(layer, "group", 1))
    return groups if groups > 1 and width % groups == 0 else 1


# ----------------------------------------------------------------------------
# Building


def insert(ir: GraphIR, insertion: Insertion, options: DeepenOptions) -> InsertedLayer:
    """Insert the planned identity construction into the model of `ir`."""
    return insert_all(ir, [(insertion, options)])[0]


def insert_all(ir: GraphIR, planned: list[tuple[Insertion, DeepenOptions]]) -> list[InsertedLayer]:
    """Insert several constructions planned on the same index, in one edit.

    The result is the one of inserting them one after the other, re-planning
    each on the graph the previous ones left: a plan follows its own layer's
    chain (bias, norm, activation: nodes with one non-constant input), so the
    chains of two layers share no tensor, and an insertion changes only the
    readers of its own tensor. Two plans for the same tensor (one layer named
    twice) are not independent: ValueError (insert those one by one).
    """
    tensors = [insertion.tensor for insertion, _ in planned]
    if len(set(tensors)) != len(tensors):
        raise ValueError("two insertions read the same tensor: insert them one after the other")
    edit = GraphEditor(ir)
    inserted = []
    with edit:
        for insertion, options in planned:
            builder = _Builder(ir, edit.fresh_prefix(f"{layer_name(ir, insertion.layer)}/deeper"), options, insertion)
            out = builder.build()
            edit.redirect_uses(insertion.tensor, out)
            edit.insert_after_producer(insertion.tensor, builder.nodes)
            edit.add_initializers(builder.initializers)
            inserted.append(InsertedLayer(after=layer_name(ir, insertion.layer), mode=insertion.mode,
                                          activation=insertion.activation_name, nodes=[n.name for n in builder.nodes],
                                          initializers=[t.name for t in builder.initializers]))
    return inserted


class _Builder:
    def __init__(self, ir: GraphIR, base: str, options: DeepenOptions, insertion: Insertion):
        self.ir, self.base, self.options, self.insertion = ir, base, options, insertion
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.dtype = ir.const_value(ir.nodes[insertion.layer].input[1]).dtype
        self.rng = np.random.default_rng(options.seed)

    def build(self) -> str:
        x = self.insertion.tensor
        mode = self.insertion.mode
        if mode == DeepenMode.RESIDUAL:
            branch = self.identity_layer(x, "", zero=False)
            branch = self.activation(branch, "/act", fallback="Relu")
            branch = self.identity_layer(branch, "/out", zero=True)
            return self.node("Add", [x, branch], "/add")
        y = self.identity_layer(x, "", zero=False)
        if self.options.batchnorm:
            y = self.batchnorm(y)
        if mode == DeepenMode.IDENTITY and self.insertion.activation:
            y = self.activation(y, "/act")
        elif mode == DeepenMode.PRELU:
            y = self.prelu(y)
        return y

    # -- pieces -------------------------------------------------------------

    def name(self, suffix: str) -> str:
        return self.base + suffix

    def node(self, op: str, inputs: list[str], suffix: str, **attrs) -> str:
        output = self.name(suffix) + "_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.name(suffix), **attrs))
        return output

    def constant(self, suffix: str, value: np.ndarray) -> str:
        name = self.name(suffix)
        self.initializers.append(numpy_helper.from_array(value.astype(self.dtype), name))
        return name

    def identity_layer(self, x: str, suffix: str, zero: bool) -> str:
        width = self.insertion.width
        kind = self.insertion.kind
        layer = self.ir.nodes[self.insertion.layer]
        if kind == "conv":
            weight, attrs = self.conv_identity(layer, width)
        else:
            weight, attrs = np.eye(width), {}
        if zero:
            weight = np.zeros_like(weight)
        elif self.options.noise > 0:
            scale = self.options.noise * float(np.std(self.ir.const_value(layer.input[1])))
            weight = weight + self.rng.normal(0.0, scale, size=weight.shape)
        w = self.constant(f"{suffix}.weight", weight)
        b = self.constant(f"{suffix}.bias", np.zeros(width))
        if kind == "conv":
            return self.node("Conv", [x, w, b], suffix, **attrs)
        if kind == "gemm":
            return self.node("Gemm", [x, w, b], suffix, transB=int(node_attr(layer, "transB", 0)))
        product = self.node("MatMul", [x, w], suffix)
        return self.node("Add", [product, b], f"{suffix}/bias")

    def conv_identity(self, layer: onnx.NodeProto, width: int):
        layer_kernel = list(node_attr(layer, "kernel_shape") or self.ir.shape(layer.input[1])[2:])
        if self.options.kernel is not None:
            kernel = [self.options.kernel] * len(layer_kernel)
        else:
            kernel = [k if k % 2 else k + 1 for k in layer_kernel]
        groups = _identity_groups(layer, width)
        per_group = width // groups
        weight = np.zeros([width, per_group] + kernel)
        centre = tuple(k // 2 for k in kernel)
        for channel in range(width):
            weight[(channel, channel % per_group) + centre] = 1.0
        attrs = dict(kernel_shape=kernel, pads=[k // 2 for k in kernel] * 2,
                     strides=[1] * len(kernel), dilations=[1] * len(kernel), group=groups)
        return weight, attrs

    def activation(self, x: str, suffix: str, fallback: str | None = None) -> str:
        if not self.insertion.activation:
            return self.node(fallback, [x], suffix) if fallback else x
        if self.insertion.activation_name == "SiLU":
            gate = self.node("Sigmoid", [x], suffix + "/sigmoid")
            return self.node("Mul", [x, gate], suffix)
        original = self.ir.nodes[self.insertion.activation[0]]
        inputs = [x] + list(original.input[1:])
        copy = helper.make_node(original.op_type, inputs, [self.name(suffix) + "_out"], name=self.name(suffix),
                                domain=original.domain)
        copy.attribute.extend(original.attribute)
        self.nodes.append(copy)
        return copy.output[0]

    def prelu(self, x: str) -> str:
        shape = [self.insertion.width] + ([1] * (self._spatial_rank()) if self.insertion.kind == "conv" else [])
        slope = self.constant("/prelu.slope", np.ones(shape))
        return self.node("PRelu", [x, slope], "/prelu")

    def batchnorm(self, x: str) -> str:
        eps = np.float32(1e-5)
        var = _variance_for_unit_scale(eps)
        width = self.insertion.width
        inputs = [x, self.constant("/bn.scale", np.ones(width)), self.constant("/bn.bias", np.zeros(width)),
                  self.constant("/bn.mean", np.zeros(width)), self.constant("/bn.var", np.full(width, var))]
        return self.node("BatchNormalization", inputs, "/bn", epsilon=float(eps))

    def _spatial_rank(self) -> int:
        return len(self.ir.shape(self.ir.nodes[self.insertion.layer].input[1])) - 2


def _variance_for_unit_scale(eps: np.float32) -> np.float32:
    """A float32 var with var + eps == 1 exactly, so sqrt(var + eps) == 1."""
    var = np.float32(1.0) - eps
    for _ in range(64):
        total = np.float32(var + eps)
        if total == np.float32(1.0):
            return var
        var = np.nextafter(var, np.float32(0.0) if total > 1 else np.float32(2.0), dtype=np.float32)
    return var
