"""Shrink and perturb (Ash & Adams, "On Warm-Starting Neural Network Training",
NeurIPS 2020): prepare a warm-started (for example a grown) model for training.

For every weighted layer (Conv, ConvTranspose, Gemm, MatMul with a constant
weight) and its bias:

    theta' = shrink * theta + fresh * theta_fresh

where theta_fresh is a fresh initialisation of the same tensor drawn with
PyTorch's default rule for that layer (`nn.Linear` / `nn.ConvNd`
`reset_parameters`: kaiming_uniform_(a=sqrt(5)) for the weight, which is
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias):

    theta_fresh ~ U(-b, b),  b = 1 / sqrt(fan_in)

with fan_in the inputs that one output unit reads: in_channels/groups * kernel
size for Conv, out_channels/groups * kernel size for ConvTranspose (PyTorch
computes it from the weight's second axis), and the contracted dimension K for
Gemm and MatMul. The bias is the layer's own (Conv/ConvTranspose/Gemm input
2), or, for MatMul, a constant added right after it (`MatMul -> Add(bias)`,
how exporters write `nn.Linear` on 3-D inputs) when it has one value per
output unit.

Left unchanged, on purpose: normalisation layers (BatchNormalization,
LayerNormalization and their decomposed forms: their scales and shifts are
not layers with a fan-in, and their fresh initialisation, scale 1 and shift 0,
would only move the scale towards 1), embeddings (Gather), and every other
constant. Weights that are not floating point are skipped and listed.

Draws come from numpy's default_rng(seed), one layer after another in graph
order; each tensor is computed in float64 and rounded once to its dtype. A
weight shared by several layers is perturbed once. The function changes:
callers report the deviation instead of verifying equality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..analysis import layer_name, weighted_layers
from ..editor import GraphEditor
from ..ir import GraphIR, node_attr

#: Ash & Adams' code defaults.
DEFAULT_SHRINK = 0.4
DEFAULT_FRESH = 0.1


@dataclass
class PerturbOptions:
    """How much of the old weights to keep and how much fresh init to add.

    Attributes:
        shrink: lambda, the factor on the current weights.
        fresh: p, the factor on the fresh initialisation.
        seed: seeds numpy's generator for the fresh draws.
    """

    shrink: float = DEFAULT_SHRINK
    fresh: float = DEFAULT_FRESH
    seed: int = 0


@dataclass
class PerturbedLayer:
    """What one layer got (for the report)."""

    layers: list[str]
    op: str
    fan_in: int
    bound: float
    tensors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def perturb_model(ir: GraphIR, options: PerturbOptions) -> list[PerturbedLayer]:
    """Shrink and perturb every weighted layer of the model of `ir`, in place."""
    rng = np.random.default_rng(options.seed)
    order = {node: position for position, node in enumerate(ir.topological_order())}
    edit = GraphEditor(ir)
    done: set = set()
    changes = []
    for layer in sorted(weighted_layers(ir), key=order.__getitem__):
        node = ir.nodes[layer]
        weight = ir.const_value(node.input[1])
        fan_in = layer_fan_in(ir, layer, weight.shape)
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        record = PerturbedLayer([layer_name(ir, layer)], node.op_type, int(fan_in), bound)
        for tensor in [node.input[1]] + bias_tensors(ir, layer, weight.shape):
            root = ir.const_root(tensor)
            if root in done:
                continue
            done.add(root)
            value = ir.const_value(tensor)
            if not np.issubdtype(value.dtype, np.floating):
                record.skipped.append(tensor)
                continue
            fresh = rng.uniform(-bound, bound, size=value.shape)
            mixed = options.shrink * value.astype(np.float64) + options.fresh * fresh
            edit.set_constant(root, mixed.astype(value.dtype))
            record.tensors.append(tensor)
        changes.append(record)
    return changes


def layer_fan_in(ir: GraphIR, layer: int, shape: tuple) -> int:
    """The fan-in PyTorch's default initialisation uses for this layer's weight."""
    node = ir.nodes[layer]
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if node.op_type == "Conv":
        return int(shape[1]) * receptive
    if node.op_type == "ConvTranspose":
        return int(shape[1]) * receptive
    if node.op_type == "Gemm":
        return int(shape[1] if node_attr(node, "transB", 0) else shape[0])
    return int(shape[-2]) if len(shape) >= 2 else int(shape[0])  # MatMul: x @ W, W is [..., K, N]


def bias_tensors(ir: GraphIR, layer: int, weight_shape: tuple) -> list[str]:
    """The layer's own bias (input 2), or a MatMul's per-unit bias added right after it (also used by
    wider.py's `init="fresh"`)."""
    node = ir.nodes[layer]
    if node.op_type != "MatMul":
        return [node.input[2]] if len(node.input) > 2 and node.input[2] and ir.is_const(node.input[2]) else []
    uses = ir.uses(node.output[0])
    if len(uses) != 1 or ir.nodes[uses[0].node].op_type != "Add":
        return []
    add = ir.nodes[uses[0].node]
    other = add.input[1 - uses[0].port]
    if not ir.is_const(other):
        return []
    value = ir.const_value(other)
    units = int(weight_shape[-1])
    return [other] if value.size == units and value.shape[-1:] == (units,) else []
