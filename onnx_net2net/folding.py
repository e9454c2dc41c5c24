"""Weights computed from constants: fold them into plain initializers.

A layer's weight W may be computed by a small subgraph of constants only:
weight normalisation W = g * v / ||v|| (Mul, Div, ReduceL2...), a weight
transposed or reshaped by a node, a product of constants. Such a W is the
same tensor for every input, so evaluating the subgraph once (onnx.reference)
and reading the result as an initializer computes exactly the same function;
the same holds for a MatMul's bias (the operand of the Add after it), such as
torchvision's Swin V2 qkv bias, a copy of the bias with its K part zeroed by
ScatterND;
the layer can then grow like any other. The parametrisation is lost (the
grown model stores W, not g and v): the report says so.

Not folded: quantized weights (DequantizeLinear). Growing them means copying
rows with their per-channel scales (exact) but also dividing the consumer's
weights by the copy count, which int8 values cannot hold exactly: such a
weight stays computed, and the walk refuses it with that reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .editor import GraphEditor, orphans_removed
from .ir import GraphIR

#: Ports of the layers' weights (and biases).
WEIGHT_PORTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}
QUANTIZED = frozenset("DequantizeLinear QuantizeLinear DynamicQuantizeLinear".split())
_NOT_FOLDED = QUANTIZED | frozenset("""
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Bernoulli Multinomial If Loop Scan
""".split())
MAX_FOLDED_NODES = 64


def computed_weights(ir: GraphIR) -> list[tuple[int, int, list[int]]]:
    """(node, port, subgraph nodes in order) for each weight computed from constants."""
    found = []
    for index, node in enumerate(ir.nodes):
        for port in WEIGHT_PORTS.get(node.op_type, ()) or _matmul_bias_ports(ir, node):
            if port >= len(node.input) or not node.input[port] or ir.is_const(node.input[port]):
                continue
            if node.op_type == "MatMul" and ir.is_const(node.input[0]):
                continue
            subgraph = constant_subgraph(ir, node.input[port])
            if subgraph:
                found.append((index, port, subgraph))
    return found


def _matmul_bias_ports(ir: GraphIR, node) -> tuple[int, ...]:
    """The port of an Add's operand that is the bias of the MatMul (with a
    constant weight) feeding its other port."""
    if node.op_type != "Add" or len(node.input) != 2:
        return ()
    ports = []
    for port in (0, 1):
        other = ir.producer_node(node.input[1 - port])
        if other is not None and ir.nodes[other].op_type == "MatMul" and ir.is_const(ir.nodes[other].input[1]):
            ports.append(port)
    return tuple(ports)


def constant_subgraph(ir: GraphIR, tensor: str) -> list[int] | None:
    """The nodes computing `tensor` from constants only, in graph order; None
    if it reads an input, a quantized or random op, or is too large."""
    nodes, frontier = set(), [tensor]
    while frontier:
        name = frontier.pop()
        if ir.is_const(name):
            continue
        index = ir.producer_node(name)
        if index is None:
            return None  # a graph input
        node = ir.nodes[index]
        if node.op_type in _NOT_FOLDED or node.domain not in ("", "ai.onnx") or index in nodes:
            if index in nodes:
                continue
            return None
        nodes.add(index)
        if len(nodes) > MAX_FOLDED_NODES:
            return None
        frontier += [i for i in node.input if i]
    return sorted(nodes)


def fold_computed_weights(handle) -> list[dict]:
    """Replace every weight computed from constants by an initializer holding
    its value; returns what was folded (weight, ops) for the report."""
    if not handle.checked:
        GraphIR(handle)  # the model as given is checked before anything changes (its faults are the user's)
    ir = GraphIR(handle, infer_shapes=False)
    folded = []
    # What computed the weights goes (orphans_removed), what the input left unread stays.
    with orphans_removed(handle), GraphEditor(ir) as edit:
        for index, port, subgraph in computed_weights(ir):
            tensor = ir.nodes[index].input[port]
            name = edit.add_initializer(_evaluate(ir, subgraph, tensor), edit.fresh_name(f"{tensor}_folded"))
            edit.set_input(index, port, name)
            folded.append({"weight": name, "from": sorted({ir.nodes[i].op_type for i in subgraph})})
    return folded


def _evaluate(ir: GraphIR, subgraph: list[int], tensor: str) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    nodes = [ir.nodes[i] for i in subgraph]
    produced = {o for node in nodes for o in node.output}
    leaves = {name for node in nodes for name in node.input if name and name not in produced}
    initializers = [numpy_helper.from_array(np.asarray(ir.const_value(name)), name) for name in sorted(leaves)]
    graph = helper.make_graph(nodes, "fold", [], [helper.make_value_info(tensor, onnx.TypeProto())],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=list(ir.handle.proto.opset_import))
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
